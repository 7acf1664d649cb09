//! TCP socket buffers sized for long fat paths. Linux autotunes a connection's buffers
//! only up to `net.ipv4.tcp_wmem`/`tcp_rmem`'s maximum (4 MiB for sending by default), and
//! one flow can never have more bytes in flight than its send buffer holds: at 100 ms RTT
//! that caps a flow at ~32 MB/s whatever the line (a 500 Mbit/s line's bandwidth-delay
//! product is 6.25 MB). So the tunnel's own sockets get a buffer of [`tcp_buffer`] bytes
//! in the direction a migration's data takes — the send buffer of client connections, the
//! receive buffer of `serve`'s listener (accepted sockets inherit it) — when that is more
//! than the sysctl maximum; the other direction carries only replies and stays autotuned,
//! so a peer that stops reading ties up no more than before. As root with
//! `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE`
//! (past `net.core.wmem_max`/`rmem_max`), else `SO_SNDBUF`/`SO_RCVBUF` up to those. Set
//! before `connect`/`listen`, so the window scale of the handshake covers it. A buffer is a
//! limit, not an allocation: memory is used only by bytes queued or in flight (both ends
//! of a tunnel connection also keep at most 1 MiB unsent, `TCP_NOTSENT_LOWAT`, see
//! [`super::stream::NOTSENT_LOWAT`]: the buffer's size bounds what is in flight, not what
//! stands queued). Everything here is
//! best effort: a socket option that cannot be set is logged and the kernel's own
//! autotuning stays.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

/// Default buffer per connection and direction (config `tcp_buffer_mib`). Measured on
/// the bench's 100 ms / 1 Gbit/s link (BDP 12.5 MB, a queue of one BDP): with 32 MiB a
/// 2 GiB disk moved at 0.84 (offline) and 0.80 (online) of the line, with 64 MiB at 0.87
/// and 0.88; BBR keeps up to twice the BDP in flight while the queue fills, and only part
/// of a send buffer is payload in flight.
pub const DEFAULT_TCP_BUFFER: u64 = 64 << 20;

static TCP_BUFFER: AtomicU64 = AtomicU64::new(DEFAULT_TCP_BUFFER);

/// Sets the buffer size of the connections this process opens from now on (0: leave the
/// kernel's autotuning alone).
pub fn set_tcp_buffer(bytes: u64) {
    TCP_BUFFER.store(bytes, Ordering::Relaxed);
}

/// The buffer size set by [`set_tcp_buffer`] (or the default).
pub fn tcp_buffer() -> u64 {
    TCP_BUFFER.load(Ordering::Relaxed)
}

/// The host's TCP buffer limits, as `/proc/sys/net` shows them (0 when unreadable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `net.ipv4.tcp_wmem` / `tcp_rmem` maximum: where autotuning stops.
    pub tcp_wmem_max: u64,
    pub tcp_rmem_max: u64,
    /// `net.core.wmem_max` / `rmem_max`: the most `SO_SNDBUF`/`SO_RCVBUF` may ask for
    /// without privilege.
    pub wmem_max: u64,
    pub rmem_max: u64,
}

impl Limits {
    /// Reads them in the calling thread's network namespace.
    pub fn read() -> Limits {
        let last = |key: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/{key}"))
                .ok()
                .and_then(|t| t.split_whitespace().last()?.parse().ok())
                .unwrap_or(0)
        };
        Limits {
            tcp_wmem_max: last("ipv4/tcp_wmem"),
            tcp_rmem_max: last("ipv4/tcp_rmem"),
            wmem_max: last("core/wmem_max"),
            rmem_max: last("core/rmem_max"),
        }
    }
}

/// Which direction of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Send,
    Recv,
}

/// What to ask for: `Some((value, force))` for `setsockopt` (the kernel doubles the
/// value), `None` when autotuning already reaches `want` or nothing larger is allowed.
pub fn plan(want: u64, dir: Dir, limits: &Limits, root: bool) -> Option<(u64, bool)> {
    let (autotune_max, core_max) = match dir {
        Dir::Send => (limits.tcp_wmem_max, limits.wmem_max),
        Dir::Recv => (limits.tcp_rmem_max, limits.rmem_max),
    };
    if want <= autotune_max {
        return None;
    }
    if root {
        return Some((want / 2, true));
    }
    let value = (want / 2).min(core_max);
    (2 * value > autotune_max).then_some((value, false))
}

/// Sets the buffer of one direction as [`plan`] says; returns the size the kernel reports.
fn apply(fd: &impl AsFd, dir: Dir, want: u64, limits: &Limits) -> Option<usize> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let root = nix::unistd::geteuid().is_root();
    let (value, force) = plan(want, dir, limits, root)?;
    let value = usize::try_from(value).unwrap_or(usize::MAX / 4);
    let r = match (dir, force) {
        (Dir::Send, true) => setsockopt(fd, sockopt::SndBufForce, &value),
        (Dir::Send, false) => setsockopt(fd, sockopt::SndBuf, &value),
        (Dir::Recv, true) => setsockopt(fd, sockopt::RcvBufForce, &value),
        (Dir::Recv, false) => setsockopt(fd, sockopt::RcvBuf, &value),
    };
    if let Err(e) = r {
        tracing::debug!("{dir:?} buffer of {want} bytes not set: {e}");
        return None;
    }
    match dir {
        Dir::Send => getsockopt(fd, sockopt::SndBuf).ok(),
        Dir::Recv => getsockopt(fd, sockopt::RcvBuf).ok(),
    }
}

/// A connected pair of UNIX stream sockets for a program that writes a stream into the
/// first (handed to it as a descriptor) while this process relays the second (returned
/// ready for tokio). The first keeps the kernel's default buffer until
/// [`set_send_buffer`] resizes it.
pub fn unix_pair() -> std::io::Result<(std::os::unix::net::UnixStream, tokio::net::UnixStream)> {
    let (writer, relay) = std::os::unix::net::UnixStream::pair()?;
    relay.set_nonblocking(true)?;
    Ok((writer, tokio::net::UnixStream::from_std(relay)?))
}

/// Sets the send buffer of `socket` to about `bytes` (as root past `net.core.wmem_max`;
/// the kernel doubles the value for its bookkeeping, as for TCP); the size it reports then.
/// A UNIX stream socket queues as much as its sender's send buffer allows, and a change
/// holds from the sender's next write on, also for a descriptor another process writes to.
pub fn set_send_buffer(socket: &impl AsFd, bytes: u64) -> usize {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let value = usize::try_from(bytes / 2).unwrap_or(usize::MAX / 4);
    let forced = nix::unistd::geteuid().is_root()
        && setsockopt(socket, sockopt::SndBufForce, &value).is_ok();
    if !forced && let Err(e) = setsockopt(socket, sockopt::SndBuf, &value) {
        tracing::debug!("send buffer of {bytes} bytes not set: {e}");
    }
    getsockopt(socket, sockopt::SndBuf).unwrap_or(0)
}

/// A TCP socket for `addr`'s family with the buffer of `dir` sized (before connect or
/// listen).
fn socket(addr: &SocketAddr, dir: Dir) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    let want = tcp_buffer();
    if want > 0 {
        apply(&sock, dir, want, &Limits::read());
    }
    Ok(sock)
}

/// Connects to the first address of `host:port` that answers, its send buffer sized first.
pub async fn connect(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match socket(&addr, Dir::Send)?.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
    }))
}

/// Binds and listens on `addr` (address reuse as `TcpListener::bind`), its receive buffer
/// sized first: accepted connections inherit it, and the handshake's window scale covers it.
pub fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let sock = socket(&addr, Dir::Recv).with_context(|| format!("creating a socket for {addr}"))?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr).with_context(|| format!("binding {addr}"))?;
    sock.listen(1024)
        .with_context(|| format!("listening on {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Limits = Limits {
        tcp_wmem_max: 4 << 20,
        tcp_rmem_max: 6 << 20,
        wmem_max: 208 << 10,
        rmem_max: 208 << 10,
    };

    #[test]
    fn buffers_only_grow_past_autotuning() {
        // Root: forced past net.core.*_max; the kernel doubles the value.
        assert_eq!(
            plan(32 << 20, Dir::Send, &HOST, true),
            Some((16 << 20, true))
        );
        // Autotuning reaches it already: left alone.
        assert_eq!(plan(4 << 20, Dir::Send, &HOST, true), None);
        assert_eq!(plan(0, Dir::Recv, &HOST, true), None);
        // Without privilege, a small wmem_max would shrink it: left alone.
        assert_eq!(plan(32 << 20, Dir::Send, &HOST, false), None);
        let tuned = Limits {
            wmem_max: 16 << 20,
            ..HOST
        };
        assert_eq!(
            plan(64 << 20, Dir::Send, &tuned, false),
            Some((16 << 20, false))
        );
    }

    #[tokio::test]
    async fn connections_and_listeners_get_the_buffer() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let limits = Limits::read();
        let want = 4 * limits.tcp_wmem_max.max(limits.tcp_rmem_max).max(1 << 20);
        set_tcp_buffer(want);
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tcp, accepted) = tokio::join!(connect("127.0.0.1", port), listener.accept());
        set_tcp_buffer(DEFAULT_TCP_BUFFER);
        let (tcp, (accepted, _)) = (tcp.unwrap(), accepted.unwrap());
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(sock.send_buffer_size().unwrap() as u64, want);
        let sock = socket2::SockRef::from(&accepted);
        assert_eq!(sock.recv_buffer_size().unwrap() as u64, want);
    }
}
