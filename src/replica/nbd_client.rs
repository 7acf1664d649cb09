//! A small NBD client over a UNIX socket (the NBD protocol's fixed-newstyle handshake,
//! `NBD_OPT_GO` for one export, then `READ`, `WRITE`, `WRITE_ZEROES`, `FLUSH` and `DISC`
//! with simple replies). Replica runs use it to read disks (a source QEMU's read-only
//! export, a `qemu-nbd -r` of an image), one request at a time, and to write the blocks a
//! block-hash comparison found different into a target's working copy, with several
//! writes in flight ([`Pipeline`]: a long round trip through the tunnel does not stall
//! each one; replies are matched to their requests by handle, in whatever order they
//! come). Every request and every reply waits at most the client's timeout.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

const TX_READ_ONLY: u16 = 1 << 1;
const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;

/// The largest payload one request carries (QEMU's servers take up to 32 MiB).
pub const MAX_REQUEST: u32 = 4 << 20;

/// One connection to one export.
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
    timeout: Duration,
    what: String,
}

impl NbdClient {
    /// Connects to `socket` and opens export `export`; each step and each later request
    /// waits at most `timeout`.
    pub async fn connect(socket: &Path, export: &str, timeout: Duration) -> anyhow::Result<Self> {
        let what = format!("NBD export '{export}' on {}", socket.display());
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {what}: timed out"))?
            .with_context(|| format!("connecting to {what}"))?;
        let mut c = NbdClient {
            stream,
            size: 0,
            flags: 0,
            cookie: 0,
            timeout,
            what,
        };
        let handshake = tokio::time::timeout(timeout, c.handshake(export)).await;
        match handshake {
            Ok(r) => r.with_context(|| format!("opening {}", c.what))?,
            Err(_) => bail!(
                "opening {}: no answer within {} s",
                c.what,
                timeout.as_secs()
            ),
        }
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TX_READ_ONLY != 0
    }

    async fn handshake(&mut self, export: &str) -> anyhow::Result<()> {
        let s = &mut self.stream;
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            bail!("the server does not speak the NBD newstyle protocol");
        }
        let server = s.read_u16().await?;
        if server & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("the server does not offer fixed-newstyle negotiation");
        }
        s.write_u32(u32::from(server & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
            .await?;
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len()).context("export name too long")?;
        let mut opt = Vec::with_capacity(name.len() + 22);
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(name_len + 6).to_be_bytes());
        opt.extend_from_slice(&name_len.to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        s.write_all(&opt).await?;
        loop {
            if s.read_u64().await? != REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _option = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await?;
            if len > 64 << 10 {
                bail!("option reply of {len} bytes");
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    self.size = u64::from_be_bytes(data[2..10].try_into()?);
                    self.flags = u16::from_be_bytes(data[10..12].try_into()?);
                }
                REP_INFO => {}
                REP_ERR_UNKNOWN => bail!("the server has no export '{export}'"),
                k if k & (1 << 31) != 0 => bail!(
                    "the server refused the export (error {:#x}): {}",
                    k,
                    String::from_utf8_lossy(&data)
                ),
                k => bail!("unexpected option reply {k}"),
            }
        }
        Ok(())
    }

    /// The bytes of one request (with `payload` for a write); returns them and its handle.
    fn encode(&mut self, cmd: (u16, u16), offset: u64, len: u32, payload: &[u8]) -> (Vec<u8>, u64) {
        self.cookie += 1;
        let mut head = Vec::with_capacity(28 + payload.len());
        head.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head.extend_from_slice(&cmd.1.to_be_bytes());
        head.extend_from_slice(&cmd.0.to_be_bytes());
        head.extend_from_slice(&self.cookie.to_be_bytes());
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(payload);
        (head, self.cookie)
    }

    /// Reads the head of one simple reply: its handle and error.
    async fn reply_head(stream: &mut UnixStream) -> anyhow::Result<(u64, u32)> {
        if stream.read_u32().await? != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic (structured replies are not negotiated)");
        }
        let error = stream.read_u32().await?;
        Ok((stream.read_u64().await?, error))
    }

    /// Sends one request (with `payload` for a write) and reads its simple reply (with
    /// `reply_len` bytes of data for a read).
    async fn request(
        &mut self,
        cmd: (u16, u16),
        offset: u64,
        len: u32,
        payload: &[u8],
        reply_len: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let (head, cookie) = self.encode(cmd, offset, len, payload);
        let s = &mut self.stream;
        let exchange = async {
            s.write_all(&head).await?;
            if cmd.0 == CMD_DISC {
                return Ok::<_, anyhow::Error>(Vec::new());
            }
            let (handle, error) = Self::reply_head(s).await?;
            if handle != cookie {
                bail!("reply to another request");
            }
            server_error(error)?;
            let mut data = vec![0u8; reply_len];
            s.read_exact(&mut data).await?;
            Ok(data)
        };
        let secs = self.timeout.as_secs();
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => {
                r.with_context(|| format!("{} at {offset}+{len} on {}", cmd_name(cmd.0), self.what))
            }
            Err(_) => bail!(
                "{} at {offset}+{len} on {}: no answer within {secs} s",
                cmd_name(cmd.0),
                self.what
            ),
        }
    }

    /// Writes with up to `depth` (at least 1) requests in flight; see [`Pipeline`].
    pub fn pipeline(&mut self, depth: usize) -> Pipeline<'_> {
        Pipeline {
            client: self,
            depth: depth.max(1),
            pending: HashMap::new(),
            peak: 0,
        }
    }

    fn check_writable(&self) -> anyhow::Result<()> {
        if self.read_only() {
            bail!("{} is read-only: nothing is written", self.what);
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> anyhow::Result<u32> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            bail!(
                "{offset}+{len} is beyond the end of {} ({} bytes)",
                self.what,
                self.size
            );
        }
        u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_REQUEST)
            .with_context(|| format!("a request of {len} bytes is larger than {MAX_REQUEST}"))
    }

    /// Reads `len` bytes (at most [`MAX_REQUEST`]) at `offset`.
    pub async fn read(&mut self, offset: u64, len: u64) -> anyhow::Result<Vec<u8>> {
        let n = self.check_range(offset, len)?;
        self.request((CMD_READ, 0), offset, n, &[], n as usize)
            .await
    }

    /// Writes `data` (at most [`MAX_REQUEST`] bytes) at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.check_writable()?;
        let n = self.check_range(offset, data.len() as u64)?;
        self.request((CMD_WRITE, 0), offset, n, data, 0).await?;
        Ok(())
    }

    /// Makes `len` bytes (at most [`MAX_REQUEST`]) at `offset` read as zeroes; a server
    /// without `WRITE_ZEROES` gets a write of zeroes.
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.check_writable()?;
        let n = self.check_range(offset, len)?;
        if self.flags & TX_SEND_WRITE_ZEROES == 0 {
            return self.write(offset, &vec![0u8; n as usize]).await;
        }
        self.request((CMD_WRITE_ZEROES, 0), offset, n, &[], 0)
            .await?;
        Ok(())
    }

    /// Asks the server to make every acknowledged write durable.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.request((CMD_FLUSH, 0), 0, 0, &[], 0).await?;
        Ok(())
    }

    /// Ends the connection politely (`NBD_CMD_DISC`) and closes it.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.request((CMD_DISC, 0), 0, 0, &[], 0).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// Writes on one connection with up to `depth` requests in flight: each write is sent at
/// once unless `depth` are unanswered, then the next reply to come (to any of them: the
/// server may answer out of order) is read first. A failed reply fails the write that
/// is under way (or [`Pipeline::finish`]) with the failed request's own command and
/// range; the connection is then only fit to be dropped. Dropping a pipeline with
/// requests in flight leaves their replies unread: finish it, or drop the client.
pub struct Pipeline<'a> {
    client: &'a mut NbdClient,
    depth: usize,
    /// Handle → (command, offset, length) of each request not yet answered.
    pending: HashMap<u64, (u16, u64, u32)>,
    peak: usize,
}

impl Pipeline<'_> {
    /// Sends a write of `data` (at most [`MAX_REQUEST`] bytes) at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.client.check_writable()?;
        let n = self.client.check_range(offset, data.len() as u64)?;
        self.submit((CMD_WRITE, 0), offset, n, data).await
    }

    /// Sends a write-zeroes of `len` bytes (at most [`MAX_REQUEST`]) at `offset` (a write
    /// of zeroes to a server without `WRITE_ZEROES`).
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.client.check_writable()?;
        let n = self.client.check_range(offset, len)?;
        if self.client.flags & TX_SEND_WRITE_ZEROES == 0 {
            return self
                .submit((CMD_WRITE, 0), offset, n, &vec![0u8; n as usize])
                .await;
        }
        self.submit((CMD_WRITE_ZEROES, 0), offset, n, &[]).await
    }

    /// Waits for every reply still due; the first failed one is the error.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.answer_one().await?;
        }
        Ok(())
    }

    /// The most requests that were in flight at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    async fn submit(
        &mut self,
        cmd: (u16, u16),
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        while self.pending.len() >= self.depth {
            self.answer_one().await?;
        }
        let (head, cookie) = self.client.encode(cmd, offset, len, payload);
        let c = &mut *self.client;
        let sent = tokio::time::timeout(c.timeout, c.stream.write_all(&head)).await;
        let what = || format!("{} at {offset}+{len} on {}", cmd_name(cmd.0), c.what);
        match sent {
            Ok(r) => r.with_context(what)?,
            Err(_) => bail!("{}: not sent within {} s", what(), c.timeout.as_secs()),
        }
        self.pending.insert(cookie, (cmd.0, offset, len));
        self.peak = self.peak.max(self.pending.len());
        Ok(())
    }

    /// Reads one reply and settles the request it answers.
    async fn answer_one(&mut self) -> anyhow::Result<()> {
        let c = &mut *self.client;
        let (timeout, what) = (c.timeout, c.what.clone());
        let in_flight = self.pending.len();
        let (handle, error) =
            match tokio::time::timeout(timeout, NbdClient::reply_head(&mut c.stream)).await {
                Ok(r) => r.with_context(|| {
                    format!("reading a reply on {what} ({in_flight} requests in flight)")
                })?,
                Err(_) => bail!(
                    "{what}: no reply within {} s ({in_flight} requests in flight)",
                    timeout.as_secs()
                ),
            };
        let (cmd, offset, len) = self.pending.remove(&handle).with_context(|| {
            format!("{what}: a reply with handle {handle}, which no request in flight has")
        })?;
        server_error(error)
            .with_context(|| format!("{} at {offset}+{len} on {what}", cmd_name(cmd)))
    }
}

/// A simple reply's error as an error ("the server answered error 5 (EIO)").
fn server_error(error: u32) -> anyhow::Result<()> {
    if error != 0 {
        bail!("the server answered error {error} ({})", errno_name(error));
    }
    Ok(())
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD read",
        CMD_WRITE => "NBD write",
        CMD_DISC => "NBD disconnect",
        CMD_FLUSH => "NBD flush",
        CMD_WRITE_ZEROES => "NBD write-zeroes",
        _ => "NBD request",
    }
}

fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC: the storage is full",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN: the server is shutting down",
        _ => "unknown",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against a real `qemu-nbd` serving a raw image in a temporary directory (the
    //! server is shared with the hash sync's tests).
    use super::*;
    use std::path::PathBuf;

    const T: Duration = Duration::from_secs(10);

    pub(crate) struct Server {
        _child: tokio::process::Child,
        pub socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    /// `qemu-nbd` (persistent, `extra` flags) over a new 1 MiB raw image; ready to connect.
    pub(crate) async fn serve(extra: &[&str]) -> Server {
        serve_with(extra, None).await
    }

    /// [`serve`], the image behind QEMU's `blkdebug` driver with the rules of `debug` (a
    /// blkdebug config file's text) when given.
    pub(crate) async fn serve_with(extra: &[&str], debug: Option<&str>) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("nbdc")
            .tempdir_in("/tmp")
            .unwrap();
        let img = dir.path().join("d.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let socket = dir.path().join("s");
        let image = match debug {
            Some(rules) => {
                let cfg = dir.path().join("blkdebug.cfg");
                std::fs::write(&cfg, rules).unwrap();
                vec![
                    "--image-opts".to_string(),
                    format!(
                        "driver=raw,file.driver=blkdebug,file.config={},\
                         file.image.driver=file,file.image.filename={}",
                        cfg.display(),
                        img.display()
                    ),
                ]
            }
            None => vec!["--format=raw".to_string(), img.display().to_string()],
        };
        let child = tokio::process::Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .args(["--export-name=disk", "--persistent"])
            .args(extra)
            .args(&image)
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-nbd (install qemu-utils)");
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(socket.exists(), "qemu-nbd did not listen within 10 s");
        Server {
            _child: child,
            socket,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn what_is_written_reads_back_on_a_new_connection() {
        let s = serve(&[]).await;
        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert!(!c.read_only());
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        c.write(131072, &data).await.unwrap();
        c.write(0, &[7u8; 8192]).await.unwrap();
        c.write_zeroes(4096, 4096).await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();

        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        assert_eq!(c.read(131072, 65536).await.unwrap(), data);
        let head = c.read(0, 12288).await.unwrap();
        assert_eq!(head[..4096], [7u8; 4096]);
        assert_eq!(head[4096..], [0u8; 8192]);
        let err = c.read(1 << 20, 1).await.unwrap_err().to_string();
        assert!(err.contains("is beyond the end of"), "{err}");
        c.disconnect().await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_export_name_is_a_clear_error() {
        let s = serve(&[]).await;
        let err = NbdClient::connect(&s.socket, "nope", T)
            .await
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("opening NBD export 'nope' on ")
                && text.contains("the server has no export 'nope'"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_read_only_export_refuses_writes() {
        let s = serve(&["--read-only"]).await;
        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        assert!(c.read_only());
        let err = format!("{:#}", c.write(0, &[1u8; 512]).await.unwrap_err());
        assert!(err.starts_with("NBD export 'disk' on "), "{err}");
        assert!(err.ends_with(" is read-only: nothing is written"), "{err}");
        let err = format!("{:#}", c.write_zeroes(0, 512).await.unwrap_err());
        assert!(err.ends_with(" is read-only: nothing is written"), "{err}");
        assert_eq!(c.read(0, 512).await.unwrap(), [0u8; 512]);
    }

    /// blkdebug rules: EIO for every write touching sector 512 (offset 256 KiB), nothing
    /// else.
    pub(crate) const EIO_AT_256K: &str =
        "[inject-error]\nevent = \"none\"\niotype = \"write\"\nerrno = \"5\"\nsector = \"512\"\n";

    /// The 4 KiB block `i` of the pipelined tests: its own pattern.
    pub(crate) fn block(i: u64) -> Vec<u8> {
        (0..4096u64).map(|j| ((i * 31 + j) % 253) as u8).collect()
    }

    #[tokio::test]
    async fn pipelined_writes_land_in_place_with_many_in_flight() {
        // Two clients at once: the reading one need not wait for the writer's to end.
        let s = serve(&["--shared=2"]).await;
        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        c.write(0, &[9u8; 1 << 20]).await.unwrap();
        let mut want = vec![0u8; 1 << 20];
        let mut writes = c.pipeline(8);
        // 256 blocks of 4 KiB from the end to the start; every fifth one zeroed.
        for i in (0..256u64).rev() {
            let at = i * 4096;
            if i % 5 == 0 {
                writes.write_zeroes(at, 4096).await.unwrap();
            } else {
                let data = block(i);
                want[at as usize..at as usize + 4096].copy_from_slice(&data);
                writes.write(at, &data).await.unwrap();
            }
        }
        assert_eq!(writes.peak(), 8, "8 writes were in flight at once");
        writes.finish().await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();

        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        let got = c.read(0, 1 << 20).await.unwrap();
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "the image differs from what was written");
        c.disconnect().await.unwrap();
    }

    #[tokio::test]
    async fn an_error_reply_in_a_pipeline_names_that_requests_range() {
        let s = serve_with(&[], Some(EIO_AT_256K)).await;
        let mut c = NbdClient::connect(&s.socket, "disk", T).await.unwrap();
        let mut writes = c.pipeline(8);
        let mut failed = None;
        for i in 0..128u64 {
            if let Err(e) = writes.write(i * 4096, &block(i)).await {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => writes.finish().await.unwrap_err(),
        };
        let text = format!("{err:#}");
        assert!(
            text.starts_with("NBD write at 262144+4096 on NBD export 'disk' on ")
                && text.ends_with(": the server answered error 5 (EIO)"),
            "{text}"
        );
    }
}
