//! Block hashes of a disk, the same on both sides of a hash sync (docs/replicas.md): a
//! block's hash is the first 16 bytes of its SHA-256 in hex. The source compares the
//! hashes of its disk with the target's (`replica-hashes`) range by range and writes
//! only the blocks that differ. A block of zeroes is recognised without hashing (most of
//! a sparse disk), and its hash is [`zero_hash`] of the block's length.

use anyhow::bail;
use sha2::{Digest, Sha256};

use super::nbd_client::{MAX_REQUEST, NbdClient};

/// The block size of a hash sync: QEMU's default cluster and bitmap granularity.
pub const BLOCK: u64 = 64 << 10;
/// The most hashes one `replica-hashes` reply carries (about 560 KB of JSON).
pub const MAX_HASHES: u64 = 16384;

fn hex16(digest: &[u8]) -> String {
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash of `data`.
pub fn hash(data: &[u8]) -> String {
    if is_zero(data) {
        return zero_hash(data.len());
    }
    hex16(&Sha256::digest(data))
}

/// The hash of `len` zero bytes.
pub fn zero_hash(len: usize) -> String {
    // Computed once per length: a sync sees one or two lengths (the block, the tail).
    use std::sync::Mutex;
    static CACHE: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = cache.iter().find(|(l, _)| *l == len) {
        return h.clone();
    }
    let h = hex16(&Sha256::digest(vec![0u8; len]));
    if cache.len() < 8 {
        cache.push((len, h.clone()));
    }
    h
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Slice equality is a `memcmp`: fast even in an unoptimised build.
    static ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Checks a range request: `offset` and `length` are whole blocks of `block` (the last
/// one may end at the disk's end), inside a disk of `size` bytes, and at most
/// [`MAX_HASHES`] blocks long. Returns the number of blocks.
pub fn check_range(size: u64, offset: u64, length: u64, block: u64) -> anyhow::Result<u64> {
    if block == 0 || !block.is_multiple_of(4096) || block > u64::from(MAX_REQUEST) {
        bail!("block must be a multiple of 4096 bytes, at most {MAX_REQUEST}, not {block}");
    }
    if !offset.is_multiple_of(block) {
        bail!("offset {offset} is not a multiple of the block ({block})");
    }
    let end = offset.checked_add(length).filter(|&e| e <= size);
    let Some(end) = end else {
        bail!("{offset}+{length} is beyond the end of the disk ({size} bytes)");
    };
    if !length.is_multiple_of(block) && end != size {
        bail!(
            "length {length} is not a multiple of the block ({block}) and does not end at the disk's end"
        );
    }
    let blocks = length.div_ceil(block);
    if blocks > MAX_HASHES {
        bail!("{blocks} blocks asked, at most {MAX_HASHES} per request");
    }
    Ok(blocks)
}

/// The hashes of the blocks of `block` bytes in `offset..offset + length` of the export.
pub async fn of_range(
    nbd: &mut NbdClient,
    offset: u64,
    length: u64,
    block: u64,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(length.div_ceil(block.max(1)) as usize);
    // Whole blocks per read, as many as fit in one request.
    let step = (u64::from(MAX_REQUEST) / block).max(1) * block;
    let end = offset + length;
    let mut at = offset;
    while at < end {
        let n = step.min(end - at);
        let data = nbd.read(at, n).await?;
        for chunk in data.chunks(block as usize) {
            out.push(hash(chunk));
        }
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_hash_like_any_block() {
        let zeros = vec![0u8; 65536];
        assert!(is_zero(&zeros));
        assert_eq!(hash(&zeros), hex16(&Sha256::digest(&zeros)));
        let mut one = zeros.clone();
        one[65535] = 1;
        assert!(!is_zero(&one));
        assert_ne!(hash(&one), hash(&zeros));
        assert_eq!(hash(&one).len(), 32);
        assert!(is_zero(&[0u8; 5]) && !is_zero(&[0, 0, 0, 0, 7]));
    }

    #[test]
    fn ranges_are_checked() {
        let size = 10 * BLOCK + 4096;
        assert_eq!(check_range(size, 0, 10 * BLOCK, BLOCK).unwrap(), 10);
        assert_eq!(check_range(size, 10 * BLOCK, 4096, BLOCK).unwrap(), 1);
        assert!(check_range(size, 1, BLOCK, BLOCK).is_err());
        assert!(check_range(size, 0, 11 * BLOCK, BLOCK).is_err());
        assert!(check_range(size, 0, BLOCK + 1, BLOCK).is_err());
        assert!(check_range(size, 0, BLOCK, 1000).is_err());
        let big = (MAX_HASHES + 1) * 4096;
        assert!(check_range(big, 0, big, 4096).is_err());
    }
}
