//! The relay of [`super::copy`] for a WebSocket on a plain TCP connection (no TLS), with
//! the payload moved by `splice(2)` through a pipe instead of through our memory: the
//! kernel hands the socket buffers' pages on, so the two copies per byte a relay makes
//! (socket → user, user → socket) go away on both ends of a `ws://` tunnel. It is
//! possible because frames are not reassembled and the mask of our peers is all-zero
//! (PROTOCOL.md: Proxmox's tunnel client and ours), which leaves payload bytes verbatim on
//! the wire. Frame headers are still read and written by hand, a few bytes per frame;
//! a frame with a real mask, control frames and bytes that arrived together with the
//! handshake take the copying path. Wire behaviour (pings, pongs, Close, the peer
//! watchdog) is that of [`super::copy::relay_with`]; TLS connections use that one.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use super::copy::{
    CHUNK, ForwardStats, Header, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, RelayOpts, Role,
    control_frame, parse_header, put_header, run_directions, unmask,
};
use super::watch::{PeerWatch, watch_peer};
use crate::metrics::{ByteCounter, ByteCounters};

/// What the pipe between the two sockets may hold: one [`CHUNK`] frame (the kernel's
/// default of 64 KiB would split each into two splices).
const PIPE_BYTES: usize = CHUNK;

/// A pipe with both ends non-blocking, sized for one frame when the kernel allows it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe only means more splices per frame.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
        Ok(Pipe { read, write })
    }
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves up to `len` bytes from the socket `from` into `pipe`; 0 at EOF.
async fn socket_to_pipe<S: Ready + AsFd>(from: &S, pipe: &Pipe, len: usize) -> io::Result<usize> {
    from.ready_io(Interest::READABLE, || {
        splice(from, None, &pipe.write, None, len, splice_flags()).map_err(io::Error::from)
    })
    .await
}

/// Moves exactly `len` bytes that are in `pipe` on to the socket `to`.
async fn pipe_to_socket<S: Ready + AsFd>(pipe: &Pipe, to: &S, mut len: usize) -> io::Result<()> {
    while len > 0 {
        let n = to
            .ready_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to, None, len, splice_flags()).map_err(io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        len -= n;
    }
    Ok(())
}

/// Tokio's readiness for the two socket types.
trait Ready {
    async fn ready_io<R>(
        &self,
        interest: Interest,
        f: impl FnMut() -> io::Result<R>,
    ) -> io::Result<R>;
}

/// Both socket types have the same `async_io`.
macro_rules! ready_by_async_io {
    ($($socket:ty),*) => {$(
        impl Ready for $socket {
            async fn ready_io<R>(
                &self,
                interest: Interest,
                f: impl FnMut() -> io::Result<R>,
            ) -> io::Result<R> {
                self.async_io(interest, f).await
            }
        }
    )*};
}
ready_by_async_io!(TcpStream, UnixStream);

/// Writes all of `buf` to a socket.
async fn write_all<S: Ready + AsFd>(sock: &S, mut buf: &[u8], more: bool) -> io::Result<()> {
    use nix::sys::socket::{MsgFlags, send};
    let flags = if more {
        MsgFlags::from_bits_retain(nix::libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL
    } else {
        MsgFlags::MSG_NOSIGNAL
    };
    while !buf.is_empty() {
        let n = sock
            .ready_io(Interest::WRITABLE, || {
                use std::os::fd::AsRawFd;
                send(sock.as_fd().as_raw_fd(), buf, flags).map_err(io::Error::from)
            })
            .await?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads at most `buf.len()` bytes; 0 at EOF.
async fn read_some(tcp: &TcpStream, buf: &mut [u8], watch: &PeerWatch) -> io::Result<usize> {
    let read = tcp.async_io(Interest::READABLE, || {
        nix::unistd::read(tcp.as_fd(), buf).map_err(io::Error::from)
    });
    watch.read(read).await
}

fn shutdown<S: AsFd>(sock: &S, how: nix::sys::socket::Shutdown) {
    use std::os::fd::AsRawFd;
    let _ = nix::sys::socket::shutdown(sock.as_fd().as_raw_fd(), how);
}

/// Relays between the WebSocket on `tcp` (after the handshake; `leftover` holds bytes
/// already read past it) and `unix`, like [`super::copy::relay_with`].
pub(super) async fn relay_spliced(
    tcp: TcpStream,
    leftover: Vec<u8>,
    role: Role,
    unix: UnixStream,
    opts: RelayOpts,
) -> io::Result<ForwardStats> {
    let RelayOpts {
        peer_timeout,
        counters: ByteCounters { inbound, outbound },
    } = opts;
    let (to_unix, from_unix) = (Pipe::new()?, Pipe::new()?);
    let (pong_tx, mut pong_rx) = mpsc::channel::<Vec<u8>>(4);
    let ping_tx = pong_tx.clone();
    let watch = Arc::new(PeerWatch::default());
    let mut inbound_state = Inbound {
        tcp: &tcp,
        unix: &unix,
        pipe: &to_unix,
        pending: leftover,
        watch: &watch,
        last_header: 2,
        counter: inbound,
    };

    let inbound = async {
        let mut n = 0u64;
        loop {
            match inbound_state.frame(&mut n).await? {
                Some(Some(ping)) => {
                    // Waits while the writer is behind (a peer that floods pings and reads
                    // nothing then stops being read: the watchdog sees it); fails at once
                    // after our side closed (the writer closed the queue).
                    let _ = pong_tx.send(control_frame(OP_PONG, &ping, role)).await;
                }
                Some(None) => {}
                None => break,
            }
        }
        // The peer is gone: a client (`mtunnel migrate`'s forwards) also stops its local
        // program's writes, which nobody would read (QEMU fails at once instead of
        // blocking); a server half-closes, as pveproxy does.
        let how = match role {
            Role::Client => nix::sys::socket::Shutdown::Both,
            Role::Server => nix::sys::socket::Shutdown::Write,
        };
        shutdown(&unix, how);
        Ok::<u64, io::Error>(n)
    };

    let outbound = async {
        let mut n = 0u64;
        let mut pongs_open = true;
        let mut head = [0u8; super::copy::HEADROOM];
        loop {
            tokio::select! {
                got = socket_to_pipe(&unix, &from_unix, CHUNK) => {
                    let got = got?;
                    if got == 0 {
                        break;
                    }
                    n += got as u64;
                    outbound.inc_by(got as u64);
                    let end = head.len();
                    let start = put_header(&mut head, end, OP_BINARY, got, role);
                    watch.write(write_all(&tcp, &head[start..], true)).await?;
                    watch.write(pipe_to_socket(&from_unix, &tcp, got)).await?;
                }
                frame = pong_rx.recv(), if pongs_open => match frame {
                    Some(frame) => watch.write(write_all(&tcp, &frame, false)).await?,
                    None => pongs_open = false,
                },
            }
        }
        // No pong follows a Close: a reader waiting to queue one goes on reading.
        pong_rx.close();
        let close = control_frame(OP_CLOSE, &1000u16.to_be_bytes(), role);
        let _ = watch.write(write_all(&tcp, &close, false)).await;
        shutdown(&tcp, nix::sys::socket::Shutdown::Write);
        Ok::<u64, io::Error>(n)
    };

    let watchdog = watch_peer(peer_timeout, Arc::clone(&watch), ping_tx, role);
    run_directions(inbound, outbound, watchdog).await
}

/// The peer → UNIX direction: frame headers by hand, payload spliced.
struct Inbound<'a> {
    tcp: &'a TcpStream,
    unix: &'a UnixStream,
    pipe: &'a Pipe,
    /// Bytes read from the peer and not yet used (at first: those read with the handshake).
    pending: Vec<u8>,
    /// Where reads from the peer are counted, for the peer watchdog.
    watch: &'a PeerWatch,
    /// Size of the previous frame header: how much the next header read asks for.
    last_header: usize,
    /// Payload bytes passed on (the metrics' inbound counter).
    counter: ByteCounter,
}

impl Inbound<'_> {
    /// Reads from the peer until `pending` holds at least `want` bytes; false at EOF.
    /// Never reads past `want`, so payload stays in the socket for splicing.
    async fn fill_to(&mut self, want: usize) -> io::Result<bool> {
        while self.pending.len() < want {
            let have = self.pending.len();
            self.pending.resize(want, 0);
            let got = read_some(self.tcp, &mut self.pending[have..], self.watch).await?;
            self.pending.truncate(have + got);
            if got == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One read of at most `upto - pending` bytes (whatever has arrived, at least one);
    /// false at EOF.
    async fn read_once(&mut self, upto: usize) -> io::Result<bool> {
        let have = self.pending.len();
        self.pending.resize(upto.max(have + 1), 0);
        let got = read_some(self.tcp, &mut self.pending[have..], self.watch).await?;
        self.pending.truncate(have + got);
        Ok(got > 0)
    }

    /// The next header; `None` at EOF.
    async fn header(&mut self) -> io::Result<Option<Header>> {
        // Ask for as many bytes as the last header had: one read per frame in a stream of
        // equal frames. A read never waits for more than has arrived, and bytes past a
        // shorter header stay in `pending` as payload.
        let mut upto = self.last_header.max(2);
        loop {
            if let Some(h) = parse_header(&self.pending)? {
                self.pending.drain(..h.size);
                self.last_header = h.size;
                return Ok(Some(h));
            }
            if self.pending.len() >= 2 {
                let b = &self.pending;
                upto =
                    2 + match b[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    } + if b[1] & 0x80 != 0 { 4 } else { 0 };
            }
            if !self.read_once(upto).await? {
                return Ok(None);
            }
        }
    }

    /// One frame: `Some(Some(payload))` for a ping, `Some(None)` for data or a pong,
    /// `None` for Close or EOF.
    async fn frame(&mut self, written: &mut u64) -> io::Result<Option<Option<Vec<u8>>>> {
        let Some(h) = self.header().await? else {
            return Ok(None);
        };
        if h.opcode >= 0x8 {
            let len = h.len as usize;
            if !self.fill_to(len).await? {
                return Ok(None);
            }
            let mut payload: Vec<u8> = self.pending.drain(..len).collect();
            unmask(&mut payload, h.mask, 0);
            return Ok(match h.opcode {
                OP_CLOSE => None,
                OP_PING => Some(Some(payload)),
                _ => Some(None),
            });
        }
        let mut remaining = h.len;
        // Payload that came in with earlier reads: written as it is.
        let buffered = (self.pending.len() as u64).min(remaining) as usize;
        if buffered > 0 {
            let mut chunk: Vec<u8> = self.pending.drain(..buffered).collect();
            unmask(&mut chunk, h.mask, 0);
            write_all(self.unix, &chunk, false).await?;
            remaining -= buffered as u64;
            *written += buffered as u64;
            self.counter.inc_by(buffered as u64);
        }
        if h.mask != [0; 4] {
            return self.copy_masked(remaining, h.mask, buffered, written).await;
        }
        while remaining > 0 {
            let want = remaining.min(PIPE_BYTES as u64) as usize;
            let got = (self.watch)
                .read(socket_to_pipe(self.tcp, self.pipe, want))
                .await?;
            if got == 0 {
                return Ok(None);
            }
            pipe_to_socket(self.pipe, self.unix, got).await?;
            remaining -= got as u64;
            *written += got as u64;
            self.counter.inc_by(got as u64);
        }
        Ok(Some(None))
    }

    /// A frame with a real mask: read, unmask, write (the copying path).
    async fn copy_masked(
        &mut self,
        mut remaining: u64,
        mask: [u8; 4],
        mut offset: usize,
        written: &mut u64,
    ) -> io::Result<Option<Option<Vec<u8>>>> {
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let got = read_some(self.tcp, &mut buf[..want], self.watch).await?;
            if got == 0 {
                return Ok(None);
            }
            unmask(&mut buf[..got], mask, offset);
            write_all(self.unix, &buf[..got], false).await?;
            offset = (offset + got) % 4;
            remaining -= got as u64;
            *written += got as u64;
            self.counter.inc_by(got as u64);
        }
        Ok(Some(None))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected TCP pair on loopback and a UNIX socket pair.
    async fn sockets() -> ((TcpStream, TcpStream), (UnixStream, UnixStream)) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let tcp = (client.unwrap(), accepted.unwrap().0);
        (tcp, UnixStream::pair().unwrap())
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut buf = vec![0u8; super::super::copy::HEADROOM + payload.len()];
        let end = super::super::copy::HEADROOM;
        buf[end..].copy_from_slice(payload);
        let start = put_header(&mut buf, end, opcode, payload.len(), Role::Client);
        // put_header wrote the all-zero key; put the real one in and mask.
        buf[end - 4..end].copy_from_slice(&mask);
        unmask(&mut buf[end..], mask, 0);
        buf.drain(..start);
        buf
    }

    #[tokio::test]
    async fn frames_of_every_kind_arrive_verbatim() {
        let ((mut peer, ours), (local, mut backend)) = sockets().await;
        let big = pattern(300_000, 1);
        let masked = pattern(70_000, 2);
        let mut wire = frame(OP_BINARY, &big[..5], [0; 4]);
        let leftover = wire.split_off(3); // the handshake read the first 3 bytes too
        let leftover = std::mem::replace(&mut wire, leftover);
        wire.extend(frame(OP_BINARY, &big[5..], [0; 4]));
        wire.extend(frame(OP_PING, b"p", [0; 4]));
        wire.extend(frame(OP_BINARY, &masked, [9, 8, 7, 6]));
        wire.extend(frame(0x1, b"", [0; 4]));
        wire.extend(frame(OP_CLOSE, &1000u16.to_be_bytes(), [1, 2, 3, 4]));
        let relay = tokio::spawn(relay_spliced(
            ours,
            leftover,
            Role::Server,
            local,
            RelayOpts::default(),
        ));
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(7777) {
                peer.write_all(piece).await.unwrap();
            }
            peer
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        let mut want = big.clone();
        want.extend(&masked);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "payload differs");
        let mut peer = writer.await.unwrap();
        // The backend closes: the relay sends a Close and ends; the pong came before it.
        drop(backend);
        let mut back = Vec::new();
        peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(&back[..3], &[0x8a, 1, b'p']);
        assert_eq!(&back[3..], &[0x88, 2, 0x03, 0xe8]);
        let stats = relay.await.unwrap().unwrap();
        assert_eq!(stats.to_socket, want.len() as u64);
        assert_eq!(stats.from_socket, 0);
    }

    #[tokio::test]
    async fn bytes_from_the_socket_leave_as_masked_client_frames() {
        let ((mut peer, ours), (local, mut backend)) = sockets().await;
        let data = pattern(1_000_000, 3);
        let relay = tokio::spawn(relay_spliced(
            ours,
            Vec::new(),
            Role::Client,
            local,
            RelayOpts::default(),
        ));
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            backend.write_all(&sent).await.unwrap();
            backend.shutdown().await.unwrap();
            backend
        });
        let mut wire = Vec::new();
        peer.read_to_end(&mut wire).await.unwrap();
        let mut payload = Vec::new();
        let mut at = 0;
        let mut closed = false;
        while at < wire.len() {
            let h = parse_header(&wire[at..]).unwrap().expect("whole frames");
            assert_eq!(h.mask, [0; 4], "the client masks with the zero key");
            let body = &wire[at + h.size..at + h.size + h.len as usize];
            match h.opcode {
                OP_BINARY => {
                    assert!(h.len as usize <= CHUNK);
                    payload.extend_from_slice(body);
                }
                OP_CLOSE => closed = true,
                other => panic!("unexpected opcode {other}"),
            }
            at += h.size + h.len as usize;
        }
        assert!(closed);
        assert!(payload == data, "payload differs");
        drop(peer);
        drop(writer.await.unwrap());
        assert_eq!(relay.await.unwrap().unwrap().from_socket, data.len() as u64);
    }

    #[tokio::test]
    async fn a_short_frame_after_long_ones_is_answered_without_more_bytes() {
        // After frames with 14-byte headers, a ping (6-byte header) and then silence: the
        // relay must not wait for bytes the peer will only send after the pong.
        let ((mut peer, ours), (local, mut backend)) = sockets().await;
        let relay = tokio::spawn(relay_spliced(
            ours,
            Vec::new(),
            Role::Server,
            local,
            RelayOpts::default(),
        ));
        let big = pattern(200_000, 4);
        peer.write_all(&frame(OP_BINARY, &big, [0; 4]))
            .await
            .unwrap();
        peer.write_all(&frame(OP_PING, b"hi", [0; 4]))
            .await
            .unwrap();
        let mut pong = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut pong))
            .await
            .expect("no pong while the peer waits")
            .unwrap();
        assert_eq!(pong, [0x8a, 2, b'h', b'i']);
        let mut got = vec![0u8; big.len()];
        backend.read_exact(&mut got).await.unwrap();
        assert!(got == big);
        peer.write_all(&frame(OP_CLOSE, b"", [0; 4])).await.unwrap();
        drop(backend);
        relay.await.unwrap().unwrap();
    }

    /// A client's peer sent its Close but keeps the connection open, reading nothing: the
    /// local program sees EOF and its next write fails at once, instead of filling
    /// buffers nobody reads (a source QEMU would block in its migration).
    #[tokio::test]
    async fn a_clients_local_side_is_cut_when_its_peer_closes() {
        let ((mut peer, ours), (local, mut backend)) = sockets().await;
        let relay = tokio::spawn(relay_spliced(
            ours,
            Vec::new(),
            Role::Client,
            local,
            RelayOpts::default(),
        ));
        peer.write_all(&frame(OP_CLOSE, &1000u16.to_be_bytes(), [0; 4]))
            .await
            .unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let err = write_until_refused(&mut backend).await;
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        relay.await.unwrap().unwrap();
        drop(peer);
    }

    /// Writes 64 KiB at a time (at most 256 MiB, at most 10 s) until a write fails.
    pub(crate) async fn write_until_refused(local: &mut UnixStream) -> io::Error {
        let chunk = vec![7u8; 64 << 10];
        let writes = async {
            for _ in 0..4096 {
                if let Err(e) = local.write_all(&chunk).await {
                    return Some(e);
                }
            }
            None
        };
        match tokio::time::timeout(Duration::from_secs(10), writes).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("256 MiB written into a connection whose peer closed"),
            Err(_) => panic!("a write blocked for 10 s: nothing shut the local side down"),
        }
    }

    /// On tokio's paused clock (time moves only while every task waits): real sockets
    /// from which nothing ever arrives, so the clock jumps from one watchdog look to the
    /// next and "300 ms" is the peer's silence, never a starved test thread.
    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let ((_peer, ours), (local, _backend)) = sockets().await;
        let timeout = Duration::from_millis(300);
        let opts = RelayOpts {
            peer_timeout: Some(timeout),
            ..RelayOpts::default()
        };
        let started = tokio::time::Instant::now();
        let relay = relay_spliced(ours, Vec::new(), Role::Server, local, opts);
        let err = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the watchdog fires within 10 s")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // After `timeout` of silence, at the watchdog's first look past it (every third).
        let waited = started.elapsed();
        assert!(
            waited >= timeout && waited <= timeout + timeout / 3,
            "timed out after {waited:?}"
        );
    }
}
