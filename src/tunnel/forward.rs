//! The byte-exact WebSocket ⇄ UNIX socket forwarder used for every tunnel stream (control
//! channel, RAM migration, NBD disks, disk imports). Text and binary frames are one byte
//! stream; message boundaries carry no meaning. A Close frame half-closes the UNIX socket;
//! EOF on the UNIX socket ends the WebSocket with a Close frame. Pings are answered by the
//! WebSocket library while reading.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Bytes per WebSocket message sent toward the peer: ~64 KiB is the sweet spot.
pub const CHUNK: usize = 64 * 1024;

/// Limits for frames we accept: far above PVE's 128 KiB (a `config` line may be one large
/// frame), yet bounded so a peer cannot make us buffer without end.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
        .accept_unmasked_frames(true)
}

/// Bytes moved by one forwarded connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct ForwardStats {
    pub to_socket: u64,
    pub from_socket: u64,
}

/// Forwards between an established WebSocket and a connected UNIX stream until both
/// directions are done (or either fails).
pub async fn forward<S>(ws: WebSocketStream<S>, unix: UnixStream) -> std::io::Result<ForwardStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (unix_read, unix_write) = unix.into_split();
    pump(ws, unix_read, unix_write).await
}

/// Same as [`forward`] over any reader/writer pair (a split UNIX stream, a child's pipes).
pub async fn pump<S, R, W>(
    ws: WebSocketStream<S>,
    mut read: R,
    mut write: W,
) -> std::io::Result<ForwardStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let inbound = async {
        let mut n = 0u64;
        while let Some(msg) = stream.next().await {
            match msg.map_err(to_io)? {
                Message::Binary(data) => {
                    n += data.len() as u64;
                    write.write_all(&data).await?;
                }
                Message::Text(text) => {
                    n += text.len() as u64;
                    write.write_all(text.as_bytes()).await?;
                }
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        write.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    let outbound = async {
        let mut n = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let got = read.read(&mut buf).await?;
            if got == 0 {
                break;
            }
            n += got as u64;
            sink.send(Message::binary(buf[..got].to_vec()))
                .await
                .map_err(to_io)?;
        }
        // The backend is done: say so and stop, as pveproxy tears the connection down.
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
        Ok::<u64, std::io::Error>(n)
    };
    tokio::pin!(inbound, outbound);
    let mut stats = ForwardStats::default();
    let mut inbound_done = false;
    loop {
        tokio::select! {
            r = &mut inbound, if !inbound_done => {
                inbound_done = true;
                stats.to_socket = r?;
            }
            r = &mut outbound => {
                // The socket side ended: whatever the client still sends has nowhere to go.
                stats.from_socket = r?;
                break;
            }
        }
    }
    Ok(stats)
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => std::io::ErrorKind::BrokenPipe.into(),
        other => std::io::Error::other(other.to_string()),
    }
}
