//! The hash sync of a replica run (docs/replicas.md, "Hash sync"): used when the target's
//! working copies hold data but no dirty bitmap can be trusted (an interrupted run, a
//! source QEMU that restarted, a stopped VM). Each disk is read on the source through an
//! NBD export (the running QEMU's own read-only export of the drive, or a `qemu-nbd -r`
//! of a stopped VM's image), compared range by range with the target's block hashes
//! (`replica-hashes`), and only the blocks that differ are written — with this crate's
//! NBD client, through the tunnel's forward, several requests in flight
//! ([`WRITES_IN_FLIGHT`]), paced to `--bwlimit` ([`Pace`]) — into the target's working
//! copy. A stopped VM's first run is the same walk against a new
//! (all-zero) working copy, without asking for hashes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Run;
use super::jobs;
use super::remote::Remote;
use crate::client::progress::{Progress, human};
use crate::replica::hashes::{self, BLOCK, MAX_HASHES};
use crate::replica::nbd_client::{MAX_REQUEST, NbdClient};

/// What a hash sync found and did, summed over the disks.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashFigures {
    /// Bytes compared (read on both sides).
    pub compared: u64,
    /// Bytes that differed and were written.
    pub differing: u64,
    /// Bytes of hash replies received over the control channel.
    pub hash_bytes: u64,
}

/// The byte ranges of one disk that differ (adjacent blocks merged, each at most one NBD
/// request long).
#[derive(Debug, Default)]
pub(super) struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn push(&mut self, offset: u64, len: u64) {
        if let Some(last) = self.0.last_mut()
            && last.0 + last.1 == offset
            && last.1 + len <= u64::from(MAX_REQUEST)
        {
            last.1 += len;
            return;
        }
        self.0.push((offset, len));
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }
}

/// Whether the target's hashes are asked (`Ask`) or known: a new working copy reads as
/// zeroes everywhere (`Zero`); a target that cannot tell them (an older mtunnel without
/// `replica-hashes`) gets every block (`All`, zero blocks as write-zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Ask,
    Zero,
    All,
}

/// Compares disk `key` (`size` bytes, read through `source`) with the target's working
/// copy; returns the ranges that differ. Adds to `figures`.
pub(super) async fn compare(
    remote: &Remote,
    source: &mut NbdClient,
    (key, size): (&str, u64),
    target: Target,
    figures: &mut HashFigures,
    progress: &Progress,
) -> anyhow::Result<Ranges> {
    if source.size() < size {
        bail!(
            "{key}: the source's export has {} bytes, the disk {size}",
            source.size()
        );
    }
    if target == Target::Ask {
        progress.log(format!(
            "hash sync: comparing {key} ({}) with the target's working copy",
            human(size)
        ));
    }
    let mut ranges = Ranges::default();
    let span = MAX_HASHES * BLOCK;
    let mut logged = Instant::now();
    let mut offset = 0;
    while offset < size {
        let length = span.min(size - offset);
        let ours = hashes::of_range(source, offset, length, BLOCK).await?;
        let theirs = match target {
            Target::Ask => target_hashes(remote, key, offset, length, figures).await?,
            Target::Zero | Target::All => Vec::new(),
        };
        for (i, mine) in ours.iter().enumerate() {
            let at = offset + i as u64 * BLOCK;
            let len = BLOCK.min(size - at);
            let same = match target {
                Target::Ask => theirs.get(i) == Some(mine),
                Target::Zero => *mine == hashes::zero_hash(len as usize),
                Target::All => false,
            };
            if !same {
                ranges.push(at, len);
            }
        }
        offset += length;
        figures.compared += length;
        if logged.elapsed() > Duration::from_secs(5) {
            progress.log(format!(
                "hash sync: {key}: {} of {} compared, {} differ so far",
                human(offset),
                human(size),
                human(ranges.bytes())
            ));
            logged = Instant::now();
        }
    }
    figures.differing += ranges.bytes();
    Ok(ranges)
}

/// The target's hashes of one range (`replica-hashes`), exactly one per block (asked
/// with `runs` where the target offers it, and expanded here).
async fn target_hashes(
    remote: &Remote,
    key: &str,
    offset: u64,
    length: u64,
    figures: &mut HashFigures,
) -> anyhow::Result<Vec<String>> {
    let mut cmd = json!({"cmd": "replica-hashes", "disk": key, "offset": offset,
                         "length": length, "block": BLOCK});
    if remote.hash_runs {
        cmd["runs"] = json!(true);
    }
    let reply = remote
        .cmd(cmd)
        .await
        .with_context(|| format!("reading the block hashes of {key} on the target"))?;
    figures.hash_bytes += reply.to_string().len() as u64;
    let blocks = length.div_ceil(BLOCK);
    let what = || format!("replica-hashes of {key} at {offset}+{length}");
    let list = expand_runs(&reply["hashes"], blocks).with_context(what)?;
    if list.len() as u64 != blocks {
        bail!("{}: {} hashes, not {blocks}", what(), list.len());
    }
    Ok(list)
}

/// The hashes of a `replica-hashes` reply, each count (the repeats of the hash before
/// it, from a target asked with `runs`) expanded; at most `blocks` of them.
fn expand_runs(hashes: &Value, blocks: u64) -> anyhow::Result<Vec<String>> {
    let items = hashes.as_array().context("no 'hashes' list in the reply")?;
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        if let Some(h) = item.as_str() {
            out.push(h.to_string());
            continue;
        }
        let more = item
            .as_u64()
            .with_context(|| format!("'{item}' is neither a hash nor a count"))?;
        let last = out.last().cloned().context("a count before any hash")?;
        if out.len() as u64 + more > blocks {
            bail!("more than {blocks} hashes");
        }
        out.extend(std::iter::repeat_n(last, more as usize));
    }
    Ok(out)
}

/// `--bwlimit` on a hash sync's own writes (QEMU's jobs take it as their `speed`): after
/// each write is sent the writer waits until the payload sent so far is not ahead of the
/// rate since the first write. Zero ranges go as write-zeroes requests, without payload, and
/// are not counted. What it waited is reported, so a run shows the limit applied.
#[derive(Debug)]
pub(super) struct Pace {
    /// Bytes per second.
    rate: u64,
    start: Option<Instant>,
    paid: u64,
    /// Time spent waiting, and how many times.
    pub waited: Duration,
    pub pauses: u64,
}

impl Pace {
    pub fn new(rate: u64) -> Self {
        Pace {
            rate: rate.max(1),
            start: None,
            paid: 0,
            waited: Duration::ZERO,
            pauses: 0,
        }
    }

    /// The payload of one write: a tenth of a second's worth (64 KiB at least), so a low
    /// limit is an even flow rather than 4 MiB bursts and long pauses.
    fn chunk(&self) -> usize {
        usize::try_from((self.rate / 10).clamp(BLOCK, u64::from(MAX_REQUEST))).unwrap_or(65536)
    }

    /// Counts `bytes` written and waits while the writes are ahead of the rate.
    async fn paid(&mut self, bytes: u64) {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.paid += bytes;
        let due = start + Duration::from_secs_f64(self.paid as f64 / self.rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
            self.waited += due - now;
            self.pauses += 1;
        }
    }
}

/// Writes kept in flight on a target connection: enough for a 4 MiB request per 0.5 MiB
/// of bandwidth-delay product up to 32 MiB (500 Mbit/s at 500 ms), few enough that a
/// failed run has little unacknowledged.
pub(super) const WRITES_IN_FLIGHT: usize = 8;

/// What [`send`] did.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sent {
    /// Bytes written (zero ranges included).
    pub bytes: u64,
    /// The most writes that were in flight at once.
    pub in_flight: usize,
}

/// Writes `ranges` read from `source` into `target` (zero ranges as write-zeroes, the
/// others paced by `pace` when given) with up to [`WRITES_IN_FLIGHT`] requests in flight,
/// then flushes. The pace and `copied` count a write when it is sent, so what is in
/// flight never runs ahead of the limit.
pub(super) async fn send(
    source: &mut NbdClient,
    target: &mut NbdClient,
    ranges: &Ranges,
    copied: &AtomicU64,
    mut pace: Option<&mut Pace>,
) -> anyhow::Result<Sent> {
    let mut written = 0;
    let mut writes = target.pipeline(WRITES_IN_FLIGHT);
    for &(offset, len) in &ranges.0 {
        let data = source.read(offset, len).await?;
        if hashes::is_zero(&data) {
            writes.write_zeroes(offset, len).await?;
            copied.fetch_add(len, Ordering::SeqCst);
        } else {
            let chunk = pace.as_ref().map_or(data.len(), |p| p.chunk()).max(1);
            let mut at = offset;
            for piece in data.chunks(chunk) {
                writes.write(at, piece).await?;
                let n = piece.len() as u64;
                at += n;
                copied.fetch_add(n, Ordering::SeqCst);
                if let Some(p) = pace.as_deref_mut() {
                    p.paid(n).await;
                }
            }
        }
        written += len;
    }
    let in_flight = writes.peak();
    writes.finish().await?;
    target.flush().await?;
    Ok(Sent {
        bytes: written,
        in_flight,
    })
}

/// `qemu-nbd -r` of a stopped VM's image on `socket` (its export `drive-<key>`, its pid in
/// `<socket>.pid`); killed when dropped. Its one client's disconnect ends it too, and one
/// left by a killed `mtunnel replicate` is stopped by the next run's start.
pub(super) struct ImageReader {
    child: tokio::process::Child,
    pub socket: PathBuf,
}

impl ImageReader {
    pub async fn start(socket: PathBuf, key: &str, image: (&Path, &str)) -> anyhow::Result<Self> {
        crate::replica::stop_one(&socket).await;
        let mut child = tokio::process::Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                crate::replica::pid_path(&socket).display()
            ))
            .arg(format!("--export-name=drive-{key}"))
            .arg(format!("--format={}", image.1))
            .args(["--read-only", "--shared=1", "--cache=none", "--aio=threads"])
            .arg(image.0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting qemu-nbd (install qemu-utils)")?;
        for _ in 0..500 {
            if socket.exists() {
                return Ok(ImageReader { child, socket });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                bail!(
                    "qemu-nbd -r {} exited ({status}): {}",
                    image.0.display(),
                    err.trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "qemu-nbd -r {} did not listen on {} within 10 s",
            image.0.display(),
            socket.display()
        )
    }

    /// Stops the server (its socket and pid file go with the drop).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for ImageReader {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(crate::replica::pid_path(&self.socket));
    }
}

/// Where a hash sync reads the source's disks: the running QEMU's NBD server (one socket,
/// an export per disk) or one `qemu-nbd -r` per image of a stopped VM.
enum ReadSide {
    Qemu(PathBuf),
    Images(Vec<ImageReader>),
}

impl Run<'_> {
    /// A hash sync (`target` [`Target::Ask`]) or a stopped VM's full copy ([`Target::Zero`]
    /// for a first run: the target's new working copies are all zeroes; else [`Target::All`]:
    /// every block, for a target without `replica-hashes`). A running VM's bitmaps are added
    /// first; after the differing blocks are written, one incremental backup of them
    /// copies what the guest wrote meanwhile (see [`jobs::add_bitmaps`]), so the point is
    /// consistent as of that backup's start. Returns the bytes written and the figures.
    pub(super) async fn hash_sync(
        &self,
        remote: &mut Remote,
        names: &jobs::Names,
        target: Target,
    ) -> anyhow::Result<(u64, HashFigures)> {
        if let Some(vm) = self.vm {
            if target == Target::Ask {
                self.begin_on_target(remote).await?;
            }
            self.fresh_bitmaps.store(true, Ordering::SeqCst);
            jobs::add_bitmaps(vm, self.disks, names).await?;
        }
        let result = async {
            let (side, mut sources) = self.open_reads(names).await?;
            let result = self
                .compare_and_send(remote, names, target, &mut sources, &side)
                .await;
            drop(sources);
            self.close_reads(side, result.is_err()).await;
            result
        }
        .await;
        if let (Some(vm), Err(_)) = (self.vm, &result) {
            // Best effort (the target's record already says the run did not complete, so
            // the next run does not trust them either).
            jobs::remove_bitmaps(vm, self.disks, names).await;
        }
        result
    }

    /// Has the target record the run as begun before the bitmaps are added: they miss
    /// every write before them, so if the run dies before its point (even by kill -9 of
    /// this process) the next run must not take them for an incremental one. The target
    /// does so on the first `replica-hashes` of a run; this asks for one block's.
    async fn begin_on_target(&self, remote: &Remote) -> anyhow::Result<()> {
        let first = self.disks.first().context("no disk to replicate")?;
        let mut ignored = HashFigures::default();
        target_hashes(remote, &first.key, 0, BLOCK.min(first.size), &mut ignored).await?;
        Ok(())
    }

    /// Ends the reading side of a hash sync (the QEMU's NBD server is stopped by
    /// [`Self::compare_and_send`] on success, here on `failed`).
    async fn close_reads(&self, side: ReadSide, failed: bool) {
        match side {
            ReadSide::Qemu(socket) => {
                if let (Some(vm), true) = (self.vm, failed) {
                    jobs::stop_read(vm, &socket).await;
                }
            }
            ReadSide::Images(readers) => {
                for r in readers {
                    r.stop().await;
                }
            }
        }
    }

    async fn compare_and_send(
        &self,
        remote: &mut Remote,
        names: &jobs::Names,
        target: Target,
        sources: &mut [NbdClient],
        side: &ReadSide,
    ) -> anyhow::Result<(u64, HashFigures)> {
        let mut figures = HashFigures::default();
        let mut diffs = Vec::new();
        for (d, source) in self.disks.iter().zip(sources.iter_mut()) {
            let disk = (d.key.as_str(), d.size);
            let ranges = compare(remote, source, disk, target, &mut figures, self.progress).await?;
            diffs.push(ranges);
        }
        let locals = self.export(remote, names).await?;
        let mut targets = Vec::new();
        let mut written = 0;
        let mut pace = self.speed().map(Pace::new);
        let mut in_flight = 0;
        for ((d, source), ranges) in self.disks.iter().zip(sources.iter_mut()).zip(&diffs) {
            let (socket, export) = locals.get(&d.key).context("no forward for a disk")?;
            let mut t = NbdClient::connect(socket, export, self.stall)
                .await
                .with_context(|| format!("{}: connecting to the target's working copy", d.key))
                .map_err(|e| self.stalled(e))?;
            let sent = send(source, &mut t, ranges, &self.copied, pace.as_mut())
                .await
                .with_context(|| format!("{}: writing the blocks that differ", d.key))
                .map_err(|e| self.stalled(e))?;
            written += sent.bytes;
            in_flight = in_flight.max(sent.in_flight);
            targets.push(t);
        }
        let paced = match (&pace, self.opts.bwlimit) {
            (Some(p), Some(kib)) => format!(
                ", paced to --bwlimit {kib} KiB/s (the writes waited {:.1} s in {} pauses)",
                p.waited.as_secs_f64(),
                p.pauses
            ),
            _ => String::new(),
        };
        self.progress.log(format!(
            "hash sync: {} compared, {} differed and were written (up to {in_flight} \
             writes in flight){paced}",
            human(figures.compared),
            human(written)
        ));
        let mut copied = written;
        if let (Some(vm), ReadSide::Qemu(socket)) = (self.vm, side) {
            jobs::stop_read(vm, socket).await;
            // Our connections stay open until QEMU's are: the target's server ends when
            // its last client leaves.
            let spec = jobs::Backup {
                incremental: true,
                speed: self.speed(),
                copied: &self.copied,
                stall: self.stall,
            };
            copied += jobs::copy(vm, self.disks, &locals, &spec, names, self.progress).await?;
        }
        for t in targets {
            t.disconnect().await?;
        }
        Ok((copied, figures))
    }

    /// Opens one NBD connection per disk to the source's disks (in `self.disks` order).
    async fn open_reads(&self, names: &jobs::Names) -> anyhow::Result<(ReadSide, Vec<NbdClient>)> {
        let run_dir = &self.src.cfg.run_dir;
        let vmid = self.opts.vmid;
        let mut clients = Vec::new();
        if let Some(vm) = self.vm {
            let socket = super::read_socket(run_dir, vmid, names.tag());
            jobs::export_read(vm, self.disks, &socket, names).await?;
            for d in self.disks {
                let export = format!("drive-{}", d.key);
                match NbdClient::connect(&socket, &export, self.stall).await {
                    Ok(c) => clients.push(c),
                    Err(e) => {
                        jobs::stop_read(vm, &socket).await;
                        return Err(e.context(format!("{}: reading the source disk", d.key)));
                    }
                }
            }
            return Ok((ReadSide::Qemu(socket), clients));
        }
        let mut readers = Vec::new();
        for d in self.disks {
            let file = self.src.storage.path(&d.volid)?;
            let socket = run_dir.join(format!("{vmid}-{}.{}.replica-read", d.key, names.tag()));
            let reader = ImageReader::start(socket, &d.key, (&file, &d.format)).await?;
            let export = format!("drive-{}", d.key);
            clients.push(NbdClient::connect(&reader.socket, &export, self.stall).await?);
            readers.push(reader);
        }
        Ok((ReadSide::Images(readers), clients))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::nbd_client::tests::{EIO_AT_256K, Server, block, serve, serve_with};

    #[test]
    fn runs_of_hashes_expand_and_bad_ones_are_refused() {
        let hashes = json!(["aa", 3, "bb", "cc", 1]);
        let list = expand_runs(&hashes, 7).unwrap();
        assert_eq!(list, ["aa", "aa", "aa", "aa", "bb", "cc", "cc"]);
        assert_eq!(expand_runs(&json!(["aa", "bb"]), 2).unwrap(), ["aa", "bb"]);
        let err = |v: Value, n| format!("{:#}", expand_runs(&v, n).unwrap_err());
        assert_eq!(err(json!([2, "aa"]), 3), "a count before any hash");
        assert_eq!(err(json!(["aa", 16384]), 16384), "more than 16384 hashes");
        assert_eq!(
            err(json!(["aa", -1]), 3),
            "'-1' is neither a hash nor a count"
        );
        assert_eq!(err(json!({}), 3), "no 'hashes' list in the reply");
    }

    #[test]
    fn adjacent_blocks_merge_up_to_one_request() {
        let mut r = Ranges::default();
        r.push(0, BLOCK);
        r.push(BLOCK, BLOCK);
        r.push(4 * BLOCK, BLOCK);
        assert_eq!(r.0, [(0, 2 * BLOCK), (4 * BLOCK, BLOCK)]);
        let mut r = Ranges::default();
        let per_request = u64::from(MAX_REQUEST) / BLOCK;
        for i in 0..per_request + 1 {
            r.push(i * BLOCK, BLOCK);
        }
        let cut = u64::from(MAX_REQUEST);
        assert_eq!(r.0, [(0, cut), (cut, BLOCK)]);
        assert_eq!(r.bytes(), cut + BLOCK);
    }

    /// A source and a target `qemu-nbd` (1 MiB each; the target's writes behind `debug`
    /// rules when given); the source holds [`block`] `i` at each 4 KiB block `i`, zeroes in
    /// its last 64 KiB.
    async fn pair(debug: Option<&str>) -> ((Server, NbdClient), (Server, NbdClient)) {
        let t = Duration::from_secs(10);
        let s = serve(&[]).await;
        let mut source = NbdClient::connect(&s.socket, "disk", t).await.unwrap();
        for i in 0..240u64 {
            source.write(i * 4096, &block(i)).await.unwrap();
        }
        let d = serve_with(&["--shared=2"], debug).await;
        let target = NbdClient::connect(&d.socket, "disk", t).await.unwrap();
        ((s, source), (d, target))
    }

    /// Every other 4 KiB block of the 1 MiB (128 ranges that do not merge).
    fn every_other_block() -> Ranges {
        let mut r = Ranges::default();
        for i in (0..256u64).step_by(2) {
            r.push(i * 4096, 4096);
        }
        r
    }

    #[tokio::test]
    async fn send_keeps_writes_in_flight_and_fails_at_the_offset_of_a_failed_one() {
        let ((_s, mut source), (d, mut target)) = pair(None).await;
        let ranges = every_other_block();
        let copied = AtomicU64::new(0);
        let sent = send(&mut source, &mut target, &ranges, &copied, None)
            .await
            .unwrap();
        assert_eq!(sent.bytes, 128 * 4096);
        assert_eq!(sent.in_flight, WRITES_IN_FLIGHT);
        assert_eq!(copied.load(Ordering::SeqCst), 128 * 4096);
        let t = Duration::from_secs(10);
        let mut check = NbdClient::connect(&d.socket, "disk", t).await.unwrap();
        let got = check.read(0, 1 << 20).await.unwrap();
        for i in 0..256u64 {
            let at = (i * 4096) as usize;
            let want = match i {
                i if i % 2 == 0 && i < 240 => block(i),
                _ => vec![0u8; 4096],
            };
            assert!(got[at..at + 4096] == want[..], "block {i} differs");
        }

        let ((_s, mut source), (_d, mut target)) = pair(Some(EIO_AT_256K)).await;
        let err = send(&mut source, &mut target, &ranges, &copied, None)
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("NBD write at 262144+4096 on NBD export 'disk' on ")
                && text.ends_with(": the server answered error 5 (EIO)"),
            "{text}"
        );
    }
}
