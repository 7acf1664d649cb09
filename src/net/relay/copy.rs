//! The byte-exact WebSocket ⇄ UNIX socket relay used for every tunnel stream (control
//! channel, RAM migration, NBD disks, disk imports), on the server and in the tunnel client.
//!
//! The tunnel is a byte stream, so frames are never assembled into messages: payload bytes
//! go from the read buffer straight to the other side after unmasking in place, and bytes
//! read from the UNIX socket get their frame header written into headroom in front of them
//! and leave in one write — no copies beyond the kernel's. A client masks with the all-zero
//! key, as Proxmox's own tunnel client does (RFC 6455 requires a mask, not a random one over
//! an encrypted link), which makes masking free. Text, binary and continuation frames are all
//! payload; a ping is answered with a pong; a Close half-closes the UNIX socket (the tunnel
//! client shuts it down both ways: its peer is gone); EOF on the UNIX socket sends a Close
//! and half-closes the connection, as pveproxy tears it down, and the relay then reads on
//! until the peer closes too (at most [`LINGER`]), so no reset cuts off what it sent.
//! General-purpose WebSocket libraries cost two extra copies per byte here (measured in
//! `mtunnel bench`), which is why this one path has its own small codec.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::watch::{PeerWatch, watch_peer};
use crate::metrics::ByteCounters;

/// Bytes read from the UNIX socket per frame sent. Larger reads mean fewer system calls
/// (a UNIX read returns at most ~208 KiB anyway); 128 KiB is also the largest frame
/// pveproxy accepts from a client.
pub const CHUNK: usize = 128 * 1024;
/// Read buffer of the WebSocket side.
const READ_BUF: usize = 256 * 1024;
/// Room for the largest frame header: 2 + 8 (length) + 4 (mask).
pub(super) const HEADROOM: usize = 14;

/// Which end of the WebSocket we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends unmasked frames.
    Server,
    /// Sends frames masked with the all-zero key.
    Client,
}

/// Bytes moved by one relayed connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwardStats {
    pub to_socket: u64,
    pub from_socket: u64,
}

pub(super) const OP_CONT: u8 = 0x0;
pub(super) const OP_TEXT: u8 = 0x1;
pub(super) const OP_BINARY: u8 = 0x2;
pub(super) const OP_CLOSE: u8 = 0x8;
pub(super) const OP_PING: u8 = 0x9;
pub(super) const OP_PONG: u8 = 0xA;

/// Writes a frame header for `len` payload bytes ending at `buf[end]`; returns its start.
pub(super) fn put_header(buf: &mut [u8], end: usize, opcode: u8, len: usize, role: Role) -> usize {
    let mut head = [0u8; HEADROOM];
    head[0] = 0x80 | opcode;
    let mask_bit = if role == Role::Client { 0x80 } else { 0 };
    let mut n = if len < 126 {
        head[1] = mask_bit | len as u8;
        2
    } else if len <= 0xffff {
        head[1] = mask_bit | 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = mask_bit | 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if role == Role::Client {
        // The all-zero masking key: payload bytes stay as they are.
        n += 4;
    }
    let start = end - n;
    buf[start..end].copy_from_slice(&head[..n]);
    start
}

/// A small control frame (close, ping, pong) as bytes.
pub(super) fn control_frame(opcode: u8, payload: &[u8], role: Role) -> Vec<u8> {
    let mut buf = vec![0u8; HEADROOM + payload.len()];
    buf[HEADROOM..].copy_from_slice(payload);
    let start = put_header(&mut buf, HEADROOM, opcode, payload.len(), role);
    buf.drain(..start);
    buf
}

/// XORs `data` with `mask`, `offset` bytes into the masked payload.
pub(super) fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    if mask == [0; 4] {
        return;
    }
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// How a relay watches its peer and where it counts its bytes.
#[derive(Debug, Clone, Default)]
pub struct RelayOpts {
    /// With a timeout, the relay pings the peer every third of it and fails with
    /// `TimedOut` when nothing at all arrived from the peer for that long, or a write to the
    /// peer was blocked that long (see `net::relay::watch`).
    pub peer_timeout: Option<Duration>,
    /// Added to per chunk relayed (`inbound`: WebSocket → socket).
    pub counters: ByteCounters,
}

/// Relays between an established WebSocket connection `ws` (after the handshake; `leftover`
/// holds bytes already read past it) and the byte stream `read`/`write`, until the socket
/// side ends or the peer closes, watching the peer as `opts` says and counting the payload
/// bytes of each direction in `opts.counters` as they pass (one atomic add per chunk).
pub(super) async fn relay_with<S, R, W>(
    ws: S,
    leftover: Vec<u8>,
    role: Role,
    mut read: R,
    mut write: W,
    opts: RelayOpts,
) -> io::Result<ForwardStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let RelayOpts {
        peer_timeout,
        counters,
    } = opts;
    let ByteCounters { inbound, outbound } = counters;
    let (mut ws_read, mut ws_write) = tokio::io::split(ws);
    // Control frames (pongs for the peer's pings, our pings) go through the writing side.
    let (pong_tx, mut pong_rx) = mpsc::channel::<Vec<u8>>(4);
    let ping_tx = pong_tx.clone();
    let watch = Arc::new(PeerWatch::default());

    let reads = Arc::clone(&watch);
    let inbound = async move {
        let mut frames = FrameReader::new(leftover, reads, inbound);
        let mut n = 0u64;
        loop {
            match frames.next(&mut ws_read, &mut write, &mut n).await? {
                Event::Close | Event::Eof => break,
                Event::Ping(payload) => {
                    // Waits while the writer is behind (a peer that floods pings and reads
                    // nothing then stops being read: the watchdog sees it); fails at once
                    // after our side closed (the writer closed the queue).
                    let _ = pong_tx.send(control_frame(OP_PONG, &payload, role)).await;
                }
                Event::Data => {}
            }
        }
        write.shutdown().await?;
        Ok::<u64, io::Error>(n)
    };

    let outbound = async {
        let mut n = 0u64;
        let mut buf = vec![0u8; HEADROOM + CHUNK];
        let mut pongs_open = true;
        // A TLS stream may keep what `write_all` handed it in its own buffer when the
        // socket was full (tokio-rustls returns success anyway): nothing sends those bytes
        // until the next write, which for the last bytes of a burst can be our next ping,
        // a third of the peer timeout later. So once nothing more is ready to send, flush.
        let mut unflushed = false;
        loop {
            tokio::select! {
                biased;
                frame = pong_rx.recv(), if pongs_open => match frame {
                    Some(frame) => {
                        watch.write(ws_write.write_all(&frame)).await?;
                        unflushed = true;
                    }
                    None => pongs_open = false,
                },
                got = read.read(&mut buf[HEADROOM..]) => {
                    let got = got?;
                    if got == 0 {
                        break;
                    }
                    n += got as u64;
                    outbound.inc_by(got as u64);
                    let start = put_header(&mut buf, HEADROOM, OP_BINARY, got, role);
                    watch.write(ws_write.write_all(&buf[start..HEADROOM + got])).await?;
                    unflushed = true;
                }
                flushed = watch.write(ws_write.flush()), if unflushed => {
                    flushed?;
                    unflushed = false;
                }
            }
        }
        // The backend is done: say so and stop (normal closure, 1000). No pong follows a
        // Close: a reader waiting to queue one goes on reading.
        pong_rx.close();
        let close = control_frame(OP_CLOSE, &1000u16.to_be_bytes(), role);
        let _ = watch.write(ws_write.write_all(&close)).await;
        let _ = watch.write(ws_write.flush()).await;
        let _ = ws_write.shutdown().await;
        Ok::<u64, io::Error>(n)
    };

    let watchdog = watch_peer(peer_timeout, Arc::clone(&watch), ping_tx, role);
    run_directions(inbound, outbound, watchdog).await
}

/// How long a relay whose socket side ended (its Close sent, its write side shut) keeps
/// reading the peer until the peer closes too. Closing a TCP socket that holds unread
/// bytes (a ping that just arrived) makes the kernel send a reset, and a reset makes the
/// peer's kernel drop what it received but had not yet read: the tail of the stream just
/// sent (seen as a target QEMU failing to load a complete RAM stream, `Input/output
/// error`). RFC 6455 also has the closing side wait for the peer's Close.
pub(super) const LINGER: Duration = Duration::from_secs(30);

/// Drives a relay's two directions and its peer watchdog until the socket side ends
/// (`outbound`) and then, for at most [`LINGER`], until the peer ends too (`inbound`); the
/// byte counts of both, or the first error while the socket side still ran.
pub(super) async fn run_directions(
    inbound: impl std::future::Future<Output = io::Result<u64>>,
    outbound: impl std::future::Future<Output = io::Result<u64>>,
    watchdog: impl std::future::Future<Output = io::Error>,
) -> io::Result<ForwardStats> {
    tokio::pin!(inbound, outbound, watchdog);
    let mut stats = ForwardStats::default();
    let (mut inbound_done, mut outbound_done) = (false, false);
    // Armed when the socket side ends.
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    loop {
        tokio::select! {
            r = &mut inbound, if !inbound_done => {
                inbound_done = true;
                match r {
                    Ok(n) => stats.to_socket = n,
                    // Our side is done and sent everything: what the peer still had for a
                    // socket that no longer reads is nobody's loss.
                    Err(e) if outbound_done => tracing::debug!("after our close: {e}"),
                    Err(e) => return Err(e),
                }
                if outbound_done {
                    break;
                }
            }
            r = &mut outbound, if !outbound_done => {
                stats.from_socket = r?;
                outbound_done = true;
                if inbound_done {
                    break;
                }
                linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
            }
            // After the peer's Close, silence is expected.
            timeout = &mut watchdog, if !inbound_done => {
                if outbound_done {
                    tracing::debug!("peer silent after our close: {timeout}");
                    break;
                }
                return Err(timeout);
            }
            () = &mut linger, if outbound_done => {
                tracing::debug!("peer did not close within {} s of our close", LINGER.as_secs());
                break;
            }
        }
    }
    Ok(stats)
}

/// The frame header at the start of `b`, `None` if `b` does not hold all of it yet.
pub(super) fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let mut size = 2;
    let len = match b[1] & 0x7f {
        126 => {
            size += 2;
            if b.len() < size {
                return Ok(None);
            }
            u16::from_be_bytes([b[2], b[3]]) as u64
        }
        127 => {
            size += 8;
            if b.len() < size {
                return Ok(None);
            }
            u64::from_be_bytes(b[2..10].try_into().unwrap_or([0; 8]))
        }
        n => n as u64,
    };
    let mut mask = [0u8; 4];
    if masked {
        if b.len() < size + 4 {
            return Ok(None);
        }
        mask.copy_from_slice(&b[size..size + 4]);
        size += 4;
    }
    if opcode >= 0x8 && (len > 125 || b[0] & 0x80 == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid WebSocket control frame",
        ));
    }
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown WebSocket opcode {opcode:#x}"),
        ));
    }
    Ok(Some(Header {
        opcode,
        mask,
        len,
        size,
    }))
}

enum Event {
    /// Payload was written to the socket.
    Data,
    Ping(Vec<u8>),
    Close,
    /// The connection ended without a Close frame.
    Eof,
}

/// Parses frames from a buffer, streaming payload out as it arrives.
struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Where reads from the peer are counted, for the peer watchdog.
    watch: Arc<PeerWatch>,
    /// Payload bytes written to the socket (the metrics' inbound counter).
    counter: crate::metrics::ByteCounter,
}

pub(super) struct Header {
    pub(super) opcode: u8,
    pub(super) mask: [u8; 4],
    pub(super) len: u64,
    /// Bytes of the header itself.
    pub(super) size: usize,
}

impl FrameReader {
    fn new(leftover: Vec<u8>, watch: Arc<PeerWatch>, counter: crate::metrics::ByteCounter) -> Self {
        let mut buf = vec![0u8; READ_BUF.max(leftover.len())];
        let end = leftover.len();
        buf[..end].copy_from_slice(&leftover);
        FrameReader {
            buf,
            start: 0,
            end,
            watch,
            counter,
        }
    }

    /// Reads more bytes after the unconsumed ones; false at EOF.
    async fn fill<S: AsyncRead + Unpin>(&mut self, ws: &mut S) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let got = self.watch.read(ws.read(&mut self.buf[self.end..])).await?;
        self.end += got;
        Ok(got > 0)
    }

    fn header(&self) -> io::Result<Option<Header>> {
        parse_header(&self.buf[self.start..self.end])
    }

    async fn next<S: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        ws: &mut S,
        out: &mut W,
        written: &mut u64,
    ) -> io::Result<Event> {
        let header = loop {
            if let Some(h) = self.header()? {
                break h;
            }
            if !self.fill(ws).await? {
                return Ok(Event::Eof);
            }
        };
        self.start += header.size;
        if header.opcode >= 0x8 {
            let len = header.len as usize;
            while self.end - self.start < len {
                if !self.fill(ws).await? {
                    return Ok(Event::Eof);
                }
            }
            let payload = &mut self.buf[self.start..self.start + len];
            unmask(payload, header.mask, 0);
            let payload = payload.to_vec();
            self.start += len;
            return Ok(match header.opcode {
                OP_CLOSE => Event::Close,
                OP_PING => Event::Ping(payload),
                _ => Event::Data,
            });
        }
        let mut remaining = header.len;
        let mut offset = 0usize;
        while remaining > 0 {
            if self.start == self.end && !self.fill(ws).await? {
                return Ok(Event::Eof);
            }
            let n = (self.end - self.start).min(remaining.min(usize::MAX as u64) as usize);
            let chunk = &mut self.buf[self.start..self.start + n];
            unmask(chunk, header.mask, offset);
            out.write_all(chunk).await?;
            *written += n as u64;
            self.counter.inc_by(n as u64);
            self.start += n;
            offset = (offset + n) % 4;
            remaining -= n as u64;
        }
        Ok(Event::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relays between an established WebSocket connection `ws` (after the handshake; `leftover`
    /// holds bytes already read past it) and the byte stream `read`/`write`, until the socket
    /// side ends or the peer closes.
    async fn relay<S, R, W>(
        ws: S,
        leftover: Vec<u8>,
        role: Role,
        read: R,
        write: W,
    ) -> io::Result<ForwardStats>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        relay_watched(ws, leftover, role, read, write, None).await
    }

    /// Like [`relay`]; with `peer_timeout`, pings the peer every third of it and fails with
    /// `TimedOut` when nothing at all arrived from the peer for that long, or a write to the
    /// peer was blocked that long (see `super::super::watch`).
    async fn relay_watched<S, R, W>(
        ws: S,
        leftover: Vec<u8>,
        role: Role,
        read: R,
        write: W,
        peer_timeout: Option<Duration>,
    ) -> io::Result<ForwardStats>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let opts = RelayOpts {
            peer_timeout,
            counters: ByteCounters::default(),
        };
        relay_with(ws, leftover, role, read, write, opts).await
    }

    #[test]
    fn headers_for_all_length_forms() {
        let mut buf = vec![0u8; HEADROOM + 70000];
        let s = put_header(&mut buf, HEADROOM, OP_BINARY, 5, Role::Server);
        assert_eq!(&buf[s..HEADROOM], &[0x82, 5]);
        let s = put_header(&mut buf, HEADROOM, OP_BINARY, 300, Role::Client);
        assert_eq!(&buf[s..HEADROOM], &[0x82, 0xfe, 1, 44, 0, 0, 0, 0]);
        let s = put_header(&mut buf, HEADROOM, OP_BINARY, 70000, Role::Server);
        assert_eq!(
            &buf[s..HEADROOM],
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
    }

    #[test]
    fn unmask_matches_bytewise_at_any_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for offset in 0..4 {
            for split in [0, 1, 3, 8, 13, 500] {
                let mut a = data.clone();
                unmask(&mut a[..split], mask, offset);
                unmask(&mut a[split..], mask, offset + split);
                let b: Vec<u8> = data
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x ^ mask[(offset + i) % 4])
                    .collect();
                assert_eq!(a, b, "offset {offset} split {split}");
            }
        }
    }

    #[tokio::test]
    async fn relays_frames_split_anywhere_and_answers_pings() {
        // Client frames: masked text "ab" split in the header, a ping, binary "cd", close.
        let mut wire = Vec::new();
        let mask = [1, 2, 3, 4];
        wire.extend_from_slice(&[0x81, 0x82]);
        wire.extend_from_slice(&mask);
        wire.extend([b'a' ^ 1, b'b' ^ 2]);
        wire.extend_from_slice(&[0x89, 0x81, 0, 0, 0, 0, b'p']);
        wire.extend_from_slice(&[0x02, 0x80, 0, 0, 0, 0]); // empty non-final binary
        wire.extend_from_slice(&[0x80, 0x82, 0, 0, 0, 0, b'c', b'd']); // continuation
        wire.extend_from_slice(&[0x88, 0x80, 9, 9, 9, 9]);
        let (client, server) = tokio::io::duplex(64);
        let (sock_r, _sock_w_keep) = tokio::io::duplex(64); // backend that never sends
        let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
        let relay_task = tokio::spawn(relay(server, Vec::new(), Role::Server, sock_r, out_w));
        let (mut cr, mut cw) = tokio::io::split(client);
        for piece in wire.chunks(3) {
            cw.write_all(piece).await.unwrap();
        }
        let mut got = Vec::new();
        out_r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abcd");
        let mut pong = [0u8; 3];
        cr.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x8a, 1, b'p']);
        drop(_sock_w_keep);
        let stats = relay_task.await.unwrap().unwrap();
        assert_eq!(stats.to_socket, 4);
    }

    #[tokio::test]
    async fn counts_payload_bytes_both_ways() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut sock_peer, sock) = tokio::io::duplex(1 << 16);
        let (sock_r, sock_w) = tokio::io::split(sock);
        let opts = RelayOpts::default();
        let counters = opts.counters.clone();
        let relay_task = tokio::spawn(relay_with(
            server,
            Vec::new(),
            Role::Server,
            sock_r,
            sock_w,
            opts,
        ));
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(&client_frame(b"hello")).await.unwrap();
        cw.write_all(&client_frame(b" world")).await.unwrap();
        let mut got = [0u8; 11];
        sock_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        sock_peer.write_all(b"abc").await.unwrap();
        let mut frame = [0u8; 5];
        cr.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame, [0x82, 3, b'a', b'b', b'c']);
        drop(sock_peer);
        // The socket side ended: a Close, then the relay waits for the peer's end.
        let mut close = [0u8; 4];
        cr.read_exact(&mut close).await.unwrap();
        assert_eq!(close, [0x88, 2, 0x03, 0xe8]);
        drop((cr, cw));
        let stats = relay_task.await.unwrap().unwrap();
        assert_eq!(stats.from_socket, 3);
        assert_eq!((counters.inbound.get(), counters.outbound.get()), (11, 3));
    }

    /// Client frames: masked binary `payload`, all-zero mask.
    fn client_frame(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADROOM + payload.len()];
        buf[HEADROOM..].copy_from_slice(payload);
        let start = put_header(&mut buf, HEADROOM, OP_BINARY, payload.len(), Role::Client);
        buf.drain(..start);
        buf
    }

    /// The two watchdog tests run on tokio's paused clock: time moves only while every
    /// task waits, so "300 ms" is the peer's silence, never a starved test thread.
    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (_client, server) = tokio::io::duplex(1 << 16);
        let (sock_r, _keep) = tokio::io::duplex(64);
        let (out_w, _out_r) = tokio::io::duplex(64);
        let timeout = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            relay_watched(
                server,
                Vec::new(),
                Role::Server,
                sock_r,
                out_w,
                Some(timeout),
            ),
        )
        .await
        .expect("the watchdog fires within 10 s");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // After `timeout` of silence, at the watchdog's first look past it (every third).
        let waited = started.elapsed();
        assert!(
            waited >= timeout && waited <= timeout + timeout / 3,
            "timed out after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_local_consumer_is_not_a_silent_peer() {
        // The peer sends 4 MiB at once; the local side takes nothing for 3 timeouts (the
        // clock moves only once the relay is stuck on the local side and the writer on a
        // full buffer).
        let (client, server) = tokio::io::duplex(1 << 20);
        let (sock_r, _keep) = tokio::io::duplex(64);
        let (out_w, mut out_r) = tokio::io::duplex(64 * 1024);
        let timeout = Duration::from_millis(300);
        let relay_task = tokio::spawn(relay_watched(
            server,
            Vec::new(),
            Role::Server,
            sock_r,
            out_w,
            Some(timeout),
        ));
        let (_cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..64 {
                cw.write_all(&client_frame(&chunk)).await.unwrap();
            }
            cw.write_all(&[0x88, 0x80, 0, 0, 0, 0]).await.unwrap();
            cw
        });
        tokio::time::sleep(timeout * 3).await;
        assert!(
            !relay_task.is_finished(),
            "the relay gave up on a busy peer"
        );
        let mut got = Vec::new();
        let read = out_r.read_to_end(&mut got);
        (tokio::time::timeout(Duration::from_secs(10), read).await)
            .expect("the relay delivers within 10 s")
            .unwrap();
        assert_eq!(got.len(), 64 * 64 * 1024);
        let _cw = writer.await.unwrap();
        drop(_keep);
        let stats = relay_task.await.unwrap().unwrap();
        assert_eq!(stats.to_socket, 64 * 64 * 1024);
    }

    /// Over real TCP: when the local side ends while bytes from the peer wait unread in
    /// the relay's socket, the peer still gets every byte and the Close. (A relay that
    /// closed its socket at once made the kernel reset the connection, and the reset
    /// dropped what the peer had received but not yet read.)
    #[tokio::test]
    async fn the_peer_reads_everything_after_our_end_despite_unread_bytes_here() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ws, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (ws, mut peer) = (ws.unwrap(), accepted.unwrap().0);
        let (mut local, relay_side) = tokio::net::UnixStream::pair().unwrap();
        let (read, write) = relay_side.into_split();
        let relay_task = tokio::spawn(relay(ws, Vec::new(), Role::Client, read, write));
        // 1 MiB from the peer that the local side never reads: most of it stays unread in
        // the relay's TCP socket.
        let mut frame = vec![0u8; HEADROOM + (1 << 20)];
        let start = put_header(&mut frame, HEADROOM, OP_BINARY, 1 << 20, Role::Server);
        peer.write_all(&frame[start..]).await.unwrap();
        // The local side sends 1 MiB and ends; the peer reads nothing yet.
        let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        local.write_all(&sent).await.unwrap();
        local.shutdown().await.unwrap();
        for _ in 0..50 {
            if relay_task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut wire = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut wire));
        read.await
            .expect("the relay half-closes within 10 s")
            .expect("the peer reads the whole stream, without a reset");
        let (mut payload, mut at, mut closed) = (Vec::new(), 0, false);
        while let Some(h) = parse_header(&wire[at..]).unwrap() {
            let body = &wire[at + h.size..at + h.size + h.len as usize];
            match h.opcode {
                OP_BINARY => payload.extend_from_slice(body),
                OP_CLOSE => closed = true,
                op => panic!("unexpected opcode {op}"),
            }
            at += h.size + h.len as usize;
        }
        assert_eq!(at, wire.len(), "a whole number of frames");
        assert!(
            payload == sent,
            "{} of {} bytes arrived",
            payload.len(),
            sent.len()
        );
        assert!(closed, "the stream ends with a Close");
        drop((peer, local));
        let stats = relay_task.await.unwrap().unwrap();
        assert_eq!(stats.from_socket, 1 << 20);
    }
}
