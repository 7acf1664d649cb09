//! The WebSocket ⇄ UNIX socket relay of every tunnel stream (control channel, RAM
//! migration, NBD disks, disk imports), on the server and in the tunnel client, behind one
//! entry point, [`relay`]: it takes the upgraded connection and picks how bytes move. A
//! plain TCP connection (`ws://`, a node with `tls = false`) moves its payload with
//! splice(2) (`splice`); any other stream (TLS, or whatever the HTTP server hands over)
//! goes through the copying relay (`copy`), which has its own small codec. Both speak the
//! same wire rules and are watched by the same peer watchdog (`watch`).

mod copy;
mod splice;
mod watch;

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{TcpStream, UnixStream};

use super::stream::Stream;

pub use copy::{CHUNK, ForwardStats, RelayOpts, Role};

/// The WebSocket side of a relay, after the handshake.
pub enum Upgraded<S> {
    /// A plain TCP connection: its payload moves with splice(2).
    Plain(TcpStream),
    /// Any other stream (TLS, an HTTP server's upgraded connection): the copying relay.
    Other(S),
}

/// A client's connection ([`super::ws::connect_raw`]): plain TCP is spliced, TLS copied.
impl From<Stream> for Upgraded<Stream> {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Plain(tcp) => Upgraded::Plain(tcp),
            tls => Upgraded::Other(tls),
        }
    }
}

/// Relays between the WebSocket `ws` (`leftover`: the bytes already read past its
/// handshake) and the connected UNIX socket `unix`, until the socket side ends or the peer
/// closes; the bytes moved each way. At the peer's Close a server half-closes `unix`, as
/// pveproxy does, and a client shuts it down both ways (its local program's writes would
/// reach nobody, so they fail at once instead of blocking).
///
/// # Errors
/// The first failure of either side while the socket side still ran, or the peer
/// watchdog's `TimedOut` (see [`RelayOpts::peer_timeout`]).
pub async fn relay<S>(
    ws: Upgraded<S>,
    leftover: Vec<u8>,
    role: Role,
    unix: UnixStream,
    opts: RelayOpts,
) -> io::Result<ForwardStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match ws {
        Upgraded::Plain(tcp) => splice::relay_spliced(tcp, leftover, role, unix, opts).await,
        Upgraded::Other(stream) => {
            let (read, write) = unix.into_split();
            match role {
                Role::Server => copy::relay_with(stream, leftover, role, read, write, opts).await,
                Role::Client => {
                    let write = ShutBoth(write);
                    copy::relay_with(stream, leftover, role, read, write, opts).await
                }
            }
        }
    }
}

/// The UNIX socket's writing half for a client's copying relay: its shutdown (the relay's
/// answer to the peer's close) shuts the whole connection down, as the splice relay does.
struct ShutBoth(OwnedWriteHalf);

impl AsyncWrite for ShutBoth {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes stay readable on both sides; new writes fail at once.
        let socket: &UnixStream = self.0.as_ref();
        let fd = socket.as_raw_fd();
        Poll::Ready(
            nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both)
                .map_err(io::Error::from),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The peer sent its Close but keeps the connection open, reading nothing: the local
    /// program (QEMU) sees EOF and its next write fails at once (the copying relay's
    /// writer; a plain TCP stream passed as `Other` stands in for a TLS one).
    #[tokio::test]
    async fn a_peers_close_cuts_a_clients_local_connection_both_ways() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (ours, mut peer) = (ours.unwrap(), accepted.unwrap().0);
        let (local, mut program) = UnixStream::pair().unwrap();
        let ws = Upgraded::Other(ours);
        let relayed = relay(ws, Vec::new(), Role::Client, local, RelayOpts::default());
        let program = async {
            peer.write_all(&[0x88, 2, 0x03, 0xe8]).await.unwrap();
            let mut rest = Vec::new();
            program.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            let err = splice::tests::write_until_refused(&mut program).await;
            assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
        };
        let (relayed, ()) = tokio::join!(relayed, program);
        relayed.unwrap();
    }
}
