//! A TCP relay in front of a test server that a test can freeze (a peer that stops
//! answering) or reset (a cut connection); it counts the bytes it forwarded, so a test can
//! wait for a phase of a migration to move data before it strikes. Used by the fault and
//! migration tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Pass,
    /// Keep both sockets open but forward nothing (a peer that stopped answering).
    Freeze,
    /// Close both sockets with RST (SO_LINGER 0): no close frame, no FIN.
    Reset,
}

/// A TCP relay in front of a server that a test can freeze or reset; counts the bytes it
/// forwarded (both directions) so a test can wait for a phase to be under way.
pub struct FaultProxy {
    pub port: u16,
    flow: watch::Sender<Flow>,
    bytes: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (flow, rx) = watch::channel(Flow::Pass);
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&bytes);
        let accept = tokio::spawn(async move {
            // Ends when the proxy is dropped (the task is aborted).
            while let Ok((inbound, _)) = listener.accept().await {
                if *rx.borrow() != Flow::Pass {
                    let _ = inbound.set_zero_linger();
                    continue;
                }
                tokio::spawn(relay(inbound, upstream, rx.clone(), Arc::clone(&counter)));
            }
        });
        FaultProxy {
            port,
            flow,
            bytes,
            accept,
        }
    }

    /// Keeps every connection open but forwards nothing more, and refuses new ones.
    pub fn freeze(&self) {
        self.flow.send_replace(Flow::Freeze);
    }

    /// Resets every connection (RST) and refuses new ones.
    pub fn reset(&self) {
        self.flow.send_replace(Flow::Reset);
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.flow.send_replace(Flow::Reset);
    }
}

async fn relay(
    mut a: TcpStream,
    upstream: u16,
    mut flow: watch::Receiver<Flow>,
    bytes: Arc<AtomicU64>,
) {
    let Ok(mut b) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        let _ = a.set_zero_linger();
        return;
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let mut buf_a = vec![0u8; 64 * 1024];
        let mut buf_b = vec![0u8; 64 * 1024];
        let (mut a_open, mut b_open) = (true, true);
        // Ends at EOF on both sides, on an error, or when the flow changes.
        while *flow.borrow_and_update() == Flow::Pass && (a_open || b_open) {
            tokio::select! {
                changed = flow.changed() => if changed.is_err() { break },
                r = ar.read(&mut buf_a), if a_open => match r {
                    Ok(n) if n > 0 => {
                        if bw.write_all(&buf_a[..n]).await.is_err() {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => {
                        a_open = false;
                        let _ = bw.shutdown().await;
                    }
                },
                r = br.read(&mut buf_b), if b_open => match r {
                    Ok(n) if n > 0 => {
                        if aw.write_all(&buf_b[..n]).await.is_err() {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => {
                        b_open = false;
                        let _ = aw.shutdown().await;
                    }
                },
            }
        }
        if !a_open && !b_open {
            return;
        }
    }
    // Frozen: hold both sockets, read nothing, until told to reset (or the proxy is gone).
    while *flow.borrow_and_update() == Flow::Freeze {
        if flow.changed().await.is_err() {
            break;
        }
    }
    let _ = a.set_zero_linger();
    let _ = b.set_zero_linger();
}
