//! A client connection that is either plain TCP (`http://`, `ws://`: a node configured with
//! `tls = false`, e.g. behind a TLS-terminating proxy, or a benchmark) or TLS with the
//! remote pinned by fingerprint (`https://`, `wss://`, the default).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the bytes are encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a plain TCP connection to `host:port` (`TCP_NODELAY` set, as for TLS).
///
/// # Errors
/// [`super::NetError::Connect`] when nobody answers.
pub async fn connect_plain(host: &str, port: u16) -> Result<Stream, super::NetError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = crate::net::sockbuf::connect(bare, port)
        .await
        .map_err(|e| {
            super::NetError::Connect(format!("unable to connect to {host}:{port} - {e}"))
        })?;
    tune(&tcp);
    Ok(Stream::Plain(tcp))
}

/// Most bytes the kernel keeps unsent in a tunnel connection's send buffer
/// (`TCP_NOTSENT_LOWAT`), on client connections and on those `serve` accepts. Without it
/// the buffer fills up to its size (`tcp_buffer_mib`, or `tcp_wmem`'s max: many MB on a long
/// fat path), and at a migration's switchover everything queued there must cross the link
/// while the guest is paused, once per multifd channel. The sender waits in its own process
/// instead (QEMU: in its socket), so its estimate of what is left stays true. Measured on
/// the busy-guest bench (20 ms, 200 Mbit/s, docs/performance.md): the tunnel's RAM stream
/// held 1.7 MB (at most 3.2 MB) in its send buffer, a direct QEMU-to-QEMU socket 11.5 MB.
pub const NOTSENT_LOWAT: u32 = 1 << 20;

/// `TCP_NODELAY` and [`NOTSENT_LOWAT`] on a tunnel connection, either end (both best effort:
/// they change timing, never bytes).
pub(crate) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_connections_cap_unsent_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_plain("127.0.0.1", port).await.unwrap();
        let Stream::Plain(tcp) = &stream else {
            panic!("connect_plain gave TLS")
        };
        let sock = socket2::SockRef::from(tcp);
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
        assert!(tcp.nodelay().unwrap());
    }
}
