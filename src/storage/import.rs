//! Import streams (`raw+size`, `qcow2+size`): choosing the stream format for a storage,
//! reading the 8-byte size header, and copying the payload into a freshly created file
//! while leaving all-zero blocks as holes (like `dd conv=sparse`).
//!
//! This file only moves bytes; which file to write and what to check afterwards is decided
//! by the backend in [`super::dir`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::{Storage, StorageError, StorageResult};

/// Length of the `*+size` header: the image's virtual size, unsigned 64-bit little-endian.
pub const SIZE_HEADER_LEN: usize = 8;

/// Bytes read from the stream per write batch.
const CHUNK: usize = 1 << 20;

/// Granularity of hole detection (a common file-system block size).
const BLOCK: usize = 4096;

/// Picks the first entry of the source's comma-separated `export_formats` that `storage`
/// can import for an image of `format`; errors like PVE when there is none.
pub fn choose_stream_format<S: Storage + ?Sized>(
    backend: &S,
    storage: &str,
    format: &str,
    export_formats: &str,
) -> StorageResult<String> {
    let importable = backend.import_formats(storage, format)?;
    export_formats
        .split(',')
        .map(str::trim)
        .find(|f| importable.iter().any(|i| i == f))
        .map(str::to_string)
        .ok_or_else(|| StorageError::NoMatchingFormat {
            storage: storage.to_string(),
        })
}

/// Reads the 8-byte little-endian size header of a `*+size` stream.
pub async fn read_size_header<R>(reader: &mut R) -> StorageResult<u64>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0u8; SIZE_HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => Ok(u64::from_le_bytes(header)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(StorageError::MissingSizeHeader),
        Err(e) => Err(StorageError::io("reading the import stream size header", e)),
    }
}

/// Copies `reader` until EOF into `file` (which must be new: holes are assumed to read as
/// zeros), skipping all-zero blocks, then sets the file length to the number of bytes read
/// and syncs it. With `exact_len`, a payload of any other length is an error. Returns the
/// payload length. `path` is only used in messages.
///
/// Reading the next chunk overlaps with writing the previous one.
pub async fn copy_sparse<R>(
    reader: &mut R,
    file: File,
    path: &Path,
    exact_len: Option<u64>,
) -> StorageResult<u64>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut pending: Option<JoinHandle<io::Result<Vec<u8>>>> = None;
    let mut spare: Option<Vec<u8>> = None;
    loop {
        let mut buf = spare.take().unwrap_or_else(|| vec![0u8; CHUNK]);
        let n = fill(reader, &mut buf).await.map_err(|e| {
            StorageError::io(format!("reading import stream for '{}'", path.display()), e)
        })?;
        if let Some(write) = pending.take() {
            spare = Some(join_write(write, path).await?);
        }
        if n == 0 {
            break;
        }
        if let Some(expected) = exact_len
            && offset + n as u64 > expected
        {
            return Err(StorageError::LongStream {
                path: path.to_path_buf(),
                expected,
            });
        }
        let f = Arc::clone(&file);
        let at = offset;
        pending = Some(tokio::task::spawn_blocking(move || {
            write_nonzero(&f, &buf[..n], at)?;
            Ok(buf)
        }));
        offset += n as u64;
    }
    if let Some(expected) = exact_len
        && offset < expected
    {
        return Err(StorageError::ShortStream {
            path: path.to_path_buf(),
            got: offset,
            expected,
        });
    }
    let f = Arc::clone(&file);
    let finish = tokio::task::spawn_blocking(move || {
        f.set_len(offset)?;
        f.sync_all()
    });
    flatten_join(finish.await, || {
        format!("finishing import into '{}'", path.display())
    })?;
    Ok(offset)
}

/// Reads until `buf` is full or the stream ends; returns the number of bytes read.
async fn fill<R>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn join_write(write: JoinHandle<io::Result<Vec<u8>>>, path: &Path) -> StorageResult<Vec<u8>> {
    flatten_join(write.await, || {
        format!("writing import data to '{}'", path.display())
    })
}

fn flatten_join<T>(
    joined: Result<io::Result<T>, tokio::task::JoinError>,
    context: impl FnOnce() -> String,
) -> StorageResult<T> {
    match joined {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StorageError::io(context(), e)),
        Err(e) => Err(StorageError::io(context(), io::Error::other(e))),
    }
}

/// Writes the non-zero blocks of `data` at file offset `at`, coalescing neighbours.
fn write_nonzero(file: &File, data: &[u8], at: u64) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    for block in data.chunks(BLOCK) {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                file.write_all_at(&data[start..pos], at + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos += block.len();
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], at + start as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn size_header() {
        let mut r = Cursor::new(1234u64.to_le_bytes().to_vec());
        assert_eq!(read_size_header(&mut r).await.unwrap(), 1234);
        let mut short = Cursor::new(vec![1u8, 2, 3]);
        assert!(matches!(
            read_size_header(&mut short).await,
            Err(StorageError::MissingSizeHeader)
        ));
    }

    #[tokio::test]
    async fn sparse_copy_keeps_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let len = 8 * CHUNK + 123;
        let mut data = vec![0u8; len];
        data[5] = 1;
        data[3 * CHUNK..3 * CHUNK + 10_000].fill(0x5a);
        data[len - 1] = 7;
        let file = File::create_new(&path).unwrap();
        let n = copy_sparse(
            &mut Cursor::new(data.clone()),
            file,
            &path,
            Some(len as u64),
        )
        .await
        .unwrap();
        assert_eq!(n, len as u64);
        let back = std::fs::read(&path).unwrap();
        assert!(back == data);
        let used = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(used < 1 << 20, "{used} bytes allocated");
    }

    #[tokio::test]
    async fn exact_length_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create_new(&path).unwrap();
        let err = copy_sparse(&mut Cursor::new(vec![1u8; 100]), file, &path, Some(99))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::LongStream { .. }), "{err}");
        let path2 = dir.path().join("out2");
        let file = File::create_new(&path2).unwrap();
        let err = copy_sparse(&mut Cursor::new(vec![1u8; 100]), file, &path2, Some(101))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "import stream for '{}' ended early: got 100 of 101 bytes",
                path2.display()
            )
        );
    }
}
