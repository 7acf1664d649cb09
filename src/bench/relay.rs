//! The baseline of the bulk-transfer benchmark: a plain tokio copy relay with 1 MiB
//! buffers, run as its own process (`mtunnel bench-relay`, hidden) so it is measured like
//! the tunnel's processes. Two of them in a row, UNIX → relay → TCP → relay → UNIX, have
//! the shape of the tunnel path (`mtunnel tunnel` → WebSocket → `mtunnel serve`) minus
//! everything the tunnel adds: framing, masking, TLS, tickets.
//!
//! With `--ws client` / `--ws server` the pair is the peer baseline instead: the TCP
//! side speaks WebSocket frames through the `fastwebsockets` crate (client frames masked
//! with a random key, as that crate and RFC 6455 clients do; 128 KiB frames like ours),
//! carrying the bytes one way, UNIX → client relay → server relay → UNIX: what a relay
//! pair built on a fast general-purpose WebSocket library costs.

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Buffer size of each direction.
pub const RELAY_BUFFER: usize = 1 << 20;

/// `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone)]
pub enum Addr {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Addr::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Addr::Tcp(a.to_string()))
        } else {
            Err(format!("'{s}': expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

async fn connect(addr: &Addr) -> std::io::Result<Box<dyn Io>> {
    Ok(match addr {
        Addr::Unix(p) => Box::new(UnixStream::connect(p).await?),
        Addr::Tcp(a) => {
            let s = TcpStream::connect(a.as_str()).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

/// Which end of a WebSocket the relay's TCP side is (`--ws`), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WsEnd {
    /// Accepts on UNIX, connects TCP, sends masked frames.
    Client,
    /// Accepts on TCP, reads frames, writes their payload to UNIX.
    Server,
}

/// Frame payload of the peer baseline: the size of the tunnel's own frames.
const WS_FRAME: usize = mtunnel::net::relay::CHUNK;

/// One way, UNIX → frames (client) or frames → UNIX (server), then Close / EOF.
async fn relay_ws(end: WsEnd, a: Box<dyn Io>, b: Box<dyn Io>) -> anyhow::Result<()> {
    use fastwebsockets::{Frame, OpCode, Role, WebSocket};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match end {
        WsEnd::Client => {
            let (mut unix, tcp) = (a, b);
            let mut ws = WebSocket::after_handshake(tcp, Role::Client);
            ws.set_writev(true);
            let mut buf = vec![0u8; WS_FRAME];
            loop {
                let n = unix.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let frame = Frame::binary(fastwebsockets::Payload::BorrowedMut(&mut buf[..n]));
                ws.write_frame(frame).await?;
            }
            ws.write_frame(Frame::close(1000, b"")).await?;
        }
        WsEnd::Server => {
            let (tcp, mut unix) = (a, b);
            let mut ws = WebSocket::after_handshake(tcp, Role::Server);
            ws.set_auto_close(true);
            ws.set_auto_pong(true);
            ws.set_max_message_size(2 * WS_FRAME);
            loop {
                let frame = ws.read_frame().await?;
                match frame.opcode {
                    OpCode::Close => break,
                    OpCode::Binary | OpCode::Text | OpCode::Continuation => {
                        unix.write_all(&frame.payload).await?
                    }
                    _ => {}
                }
            }
            unix.shutdown().await?;
        }
    }
    Ok(())
}

/// Listens on `listen`, prints `listening on <addr>` (the real port for `tcp:...:0`), and
/// relays every accepted connection to a new connection to `to`, both directions (with
/// `ws`: one way, as WebSocket frames on the TCP side), until the process is killed.
pub async fn run(listen: Addr, to: Addr, ws: Option<WsEnd>) -> anyhow::Result<()> {
    let listener = match &listen {
        Addr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).with_context(|| format!("binding {}", p.display()))?;
            println!("listening on unix:{}", p.display());
            Listener::Unix(l)
        }
        Addr::Tcp(a) => {
            let l = TcpListener::bind(a.as_str())
                .await
                .with_context(|| format!("binding {a}"))?;
            println!("listening on tcp:{}", l.local_addr()?);
            Listener::Tcp(l)
        }
    };
    use std::io::Write;
    std::io::stdout().flush().ok();
    loop {
        let mut a = match listener.accept().await {
            Ok(a) => a,
            Err(e) => bail!("accept failed: {e}"),
        };
        let to = to.clone();
        tokio::spawn(async move {
            let mut b = match connect(&to).await {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("relay: connecting {to:?} failed: {e}");
                    return;
                }
            };
            if let Some(end) = ws {
                if let Err(e) = relay_ws(end, a, b).await {
                    eprintln!("relay: {e:#}");
                }
                return;
            }
            if let Err(e) =
                tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER)
                    .await
            {
                eprintln!("relay: {e}");
            }
        });
    }
}
