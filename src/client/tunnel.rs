//! The tunnel client, compatible with Proxmox's `proxmox-websocket-tunnel`: one control
//! WebSocket carrying newline-delimited JSON commands whose replies are matched purely by
//! order (FIFO), and forwards that listen on a local UNIX socket and open a new WebSocket
//! for every accepted connection, each with a fresh ticket fetched over the control
//! channel. `mtunnel tunnel` drives this from stdin; `mtunnel migrate` uses it directly.
//! When a forward's WebSocket ends (broken, reset, or closed by the peer) its local
//! connection is shut down both ways at once, so the local program (QEMU's migration or
//! mirror) fails right away instead of writing into a socket nobody reads; the forward
//! keeps the first such break for its owner to report.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::ApiError;
use crate::net::relay::{self, RelayOpts, Role};
use crate::net::ws::{self, WsStream};

/// Why a tunnel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("tunnel closed: {0}")]
    Closed(String),
    #[error("no reply to tunnel command '{cmd}' within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("tunnel command '{cmd}' failed - {msg}")]
    Failed { cmd: String, msg: String },
    #[error("{0}")]
    Other(String),
}

/// How to reach the remote: URL, headers (the `Authorization` token) and fingerprint.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoint {
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub fingerprint: Option<String>,
}

impl Endpoint {
    /// Opens a WebSocket to `url`; a `wss://`/`https://` URL needs the fingerprint, a plain
    /// `ws://`/`http://` one (a `tls = false` node) does not.
    async fn connect(&self, url: &str) -> Result<WsStream, ApiError> {
        Ok(ws::connect_opt(url, &self.headers, self.fingerprint.as_deref()).await?)
    }

    async fn connect_raw(&self, url: &str) -> Result<ws::RawWs, ApiError> {
        Ok(ws::connect_raw(url, &self.headers, self.fingerprint.as_deref()).await?)
    }
}

type Pending = oneshot::Sender<Result<String, TunnelError>>;

/// The control channel: send a JSON line, get the next reply line.
#[derive(Clone)]
pub struct Control {
    tx: mpsc::UnboundedSender<(String, Pending)>,
}

impl Control {
    /// Opens the control WebSocket (URL with `ticket` and `socket` in the query).
    pub async fn connect(endpoint: &Endpoint) -> Result<Control, TunnelError> {
        let ws = endpoint.connect(&endpoint.url).await?;
        Ok(Self::over(ws))
    }

    /// Runs the FIFO command channel over an established WebSocket.
    pub fn over(ws: WsStream) -> Control {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(control_loop(ws, rx));
        Control { tx }
    }

    /// Sends one raw line (without newline) and returns the reply line.
    pub async fn raw(&self, line: String, timeout: Duration) -> Result<String, TunnelError> {
        let cmd = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("cmd").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((line, reply_tx))
            .map_err(|_| TunnelError::Closed("control connection is gone".into()))?;
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(TunnelError::Closed("control connection is gone".into())),
            Err(_) => Err(TunnelError::Timeout {
                cmd,
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Sends a command object and returns the reply object (whatever its `success`).
    pub async fn request(&self, command: &Value, timeout: Duration) -> Result<Value, TunnelError> {
        let line = serde_json::to_string(command).map_err(|e| TunnelError::Other(e.to_string()))?;
        let reply = self.raw(line, timeout).await?;
        serde_json::from_str(&reply)
            .map_err(|e| TunnelError::Other(format!("unparsable reply '{reply}': {e}")))
    }

    /// Sends a command and fails unless the reply says `success: true`.
    pub async fn command(&self, command: &Value, timeout: Duration) -> Result<Value, TunnelError> {
        let reply = self.request(command, timeout).await?;
        if reply.get("success").and_then(Value::as_bool) == Some(true) {
            Ok(reply)
        } else {
            Err(TunnelError::Failed {
                cmd: command
                    .get("cmd")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                msg: reply
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or("no error message")
                    .trim_end()
                    .to_string(),
            })
        }
    }

    /// Closes the control connection (a Close frame; the remote worker sees EOF).
    pub fn close(self) {
        drop(self.tx);
    }
}

async fn control_loop(ws: WsStream, mut rx: mpsc::UnboundedReceiver<(String, Pending)>) {
    let (mut sink, mut stream) = ws.split();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut buf: Vec<u8> = Vec::new();
    let reason = loop {
        tokio::select! {
            req = rx.recv() => match req {
                Some((mut line, reply)) => {
                    line.push('\n');
                    if let Err(e) = sink.send(Message::binary(line.into_bytes())).await {
                        let _ = reply.send(Err(TunnelError::Closed(e.to_string())));
                        break e.to_string();
                    }
                    pending.push_back(reply);
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    let _ = sink.close().await;
                    break "closed by the client".to_string();
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => buf.extend_from_slice(&data),
                Some(Ok(Message::Text(text))) => buf.extend_from_slice(text.as_bytes()),
                Some(Ok(Message::Close(_))) | None => break "remote closed the control connection".into(),
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e.to_string(),
            }
        }
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            match pending.pop_front() {
                Some(reply) => {
                    let _ = reply.send(Ok(text));
                }
                None => tracing::warn!("unexpected reply line on the control channel: {text}"),
            }
        }
    };
    for reply in pending {
        let _ = reply.send(Err(TunnelError::Closed(reason.clone())));
    }
    rx.close();
    while let Some((_, reply)) = rx.recv().await {
        let _ = reply.send(Err(TunnelError::Closed(reason.clone())));
    }
}

/// A running forward; dropping it stops accepting new connections (and closes WebSockets
/// opened ahead that no connection took).
pub struct Forward {
    pub local: PathBuf,
    /// Connections and bytes carried so far.
    pub stats: Arc<ForwardStats>,
    /// Where the WebSockets go (`host:port`), for messages.
    pub peer: String,
    broken: Arc<std::sync::Mutex<Option<String>>>,
    relays: Arc<Relays>,
    accept: tokio::task::JoinHandle<()>,
    openers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accept.abort();
        for o in &self.openers {
            o.abort();
        }
        let _ = std::fs::remove_file(&self.local);
    }
}

impl Forward {
    /// Why the first of this forward's WebSockets broke, if one did (an I/O or protocol
    /// error; a peer's orderly close is no break).
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }

    /// Relays `conn` as if it had connected to [`Forward::local`]: for a program that
    /// was handed its end of a socket pair instead of connecting.
    pub fn adopt(&self, conn: tokio::net::UnixStream) {
        self.relays.spawn(conn);
    }

    /// Ends every connection this forward relays now, without waiting for the remote
    /// (its local end closes): for a caller that gave up on a frozen link, whose local
    /// clients would otherwise wait forever.
    pub fn cut(&self) {
        if let Ok(running) = self.relays.running.lock() {
            for task in running.iter() {
                task.abort();
            }
        }
    }
}

/// What a forward carried: connections accepted and ended, bytes sent to the remote by
/// the connections that ended (a replica run reports them).
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub accepted: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

type Opened = Result<ws::RawWs, TunnelError>;

/// WebSockets opened before their local connection arrives: the first `left` accepted
/// connections take one each, in the order they were opened.
struct Prepared {
    left: std::sync::atomic::AtomicUsize,
    opened: tokio::sync::Mutex<mpsc::Receiver<Opened>>,
}

impl Prepared {
    /// One prepared WebSocket, or `None` when all were handed out.
    async fn take(&self) -> Option<Opened> {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()?;
        let got = self.opened.lock().await.recv().await;
        Some(got.unwrap_or_else(|| Err(TunnelError::Closed("prepared WebSocket lost".into()))))
    }
}

/// Listens on `local`; for each connection asks the remote for a ticket for
/// `remote_path`, appends `ticket=<pct-encoded>` to `endpoint.url` (which ends in `&` or
/// `?`) and pipes bytes both ways over a new WebSocket.
///
/// With `prepared > 0` that many WebSockets (ticket and connection each) are opened at
/// once, in parallel, for the first connections: over a long link a connection then
/// starts without the four round trips of ticket, TCP, TLS and upgrade. Only for a socket
/// whose server waits patiently for its client's first bytes (QEMU's incoming
/// migration), as the remote end is connected before the local one.
pub fn forward(
    control: &Control,
    endpoint: Endpoint,
    local: &Path,
    remote_path: String,
    prepared: usize,
) -> Result<Forward, TunnelError> {
    let _ = std::fs::remove_file(local);
    let listener = UnixListener::bind(local)
        .map_err(|e| TunnelError::Other(format!("unable to listen on {}: {e}", local.display())))?;
    let endpoint = Arc::new(endpoint);
    let (tx, rx) = mpsc::channel(prepared.max(1));
    let pool = Arc::new(Prepared {
        left: std::sync::atomic::AtomicUsize::new(prepared),
        opened: tokio::sync::Mutex::new(rx),
    });
    let openers = (0..prepared)
        .map(|_| {
            let (control, endpoint, path, tx) = (
                control.clone(),
                Arc::clone(&endpoint),
                remote_path.clone(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let _ = tx.send(open_ws(&control, &endpoint, &path).await).await;
            })
        })
        .collect();
    let stats = Arc::new(ForwardStats::default());
    let peer = peer_of(&endpoint.url);
    let broken = Arc::new(std::sync::Mutex::new(None));
    let relays = Arc::new(Relays {
        control: control.clone(),
        endpoint,
        remote_path,
        pool,
        stats: Arc::clone(&stats),
        broken: Arc::clone(&broken),
        running: std::sync::Mutex::new(Vec::new()),
    });
    let accepting = Arc::clone(&relays);
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => accepting.spawn(conn),
                Err(e) => {
                    tracing::warn!("forward accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(Forward {
        local: local.to_path_buf(),
        stats,
        peer,
        broken,
        relays,
        accept,
        openers,
    })
}

/// What every connection of one forward shares.
struct Relays {
    control: Control,
    endpoint: Arc<Endpoint>,
    remote_path: String,
    pool: Arc<Prepared>,
    stats: Arc<ForwardStats>,
    broken: Arc<std::sync::Mutex<Option<String>>>,
    /// The relays' tasks, for [`Forward::cut`] (finished ones are pruned as new come).
    running: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Relays {
    /// Relays `conn` over a prepared or a new WebSocket, in its own task.
    fn spawn(self: &Arc<Self>, conn: tokio::net::UnixStream) {
        let me = Arc::clone(self);
        me.stats.accepted.fetch_add(1, Ordering::SeqCst);
        let relays = Arc::clone(&me);
        let task = tokio::spawn(async move {
            let ws = match me.pool.take().await {
                Some(ws) => ws,
                None => open_ws(&me.control, &me.endpoint, &me.remote_path).await,
            };
            let link = Link {
                remote_path: &me.remote_path,
                broken: &me.broken,
            };
            if let Some(sent) = relay_one(ws, link, conn).await {
                me.stats.sent.fetch_add(sent, Ordering::SeqCst);
            }
            me.stats.finished.fetch_add(1, Ordering::SeqCst);
        });
        if let Ok(mut list) = relays.running.lock() {
            list.retain(|t| !t.is_finished());
            list.push(task.abort_handle());
        }
    }
}

/// A fresh ticket for `remote_path` and a WebSocket to it.
async fn open_ws(control: &Control, endpoint: &Endpoint, remote_path: &str) -> Opened {
    let reply = control
        .command(
            &json!({"cmd": "ticket", "path": remote_path}),
            Duration::from_secs(30),
        )
        .await?;
    let ticket = reply
        .get("ticket")
        .and_then(Value::as_str)
        .ok_or_else(|| TunnelError::Other("ticket reply without ticket".into()))?;
    let encoded = percent_encoding::utf8_percent_encode(ticket, percent_encoding::NON_ALPHANUMERIC);
    let sep = if endpoint.url.ends_with('&') || endpoint.url.ends_with('?') {
        ""
    } else if endpoint.url.contains('?') {
        "&"
    } else {
        "?"
    };
    let url = format!("{}{sep}ticket={encoded}", endpoint.url);
    Ok(endpoint.connect_raw(&url).await?)
}

/// Where a forwarded connection goes and where its break is kept.
struct Link<'a> {
    remote_path: &'a str,
    broken: &'a std::sync::Mutex<Option<String>>,
}

/// Relays one accepted connection; the bytes it sent, or `None` when its WebSocket broke
/// (then the break is kept in `link.broken` before the local side learns of it).
async fn relay_one(ws: Opened, link: Link<'_>, conn: tokio::net::UnixStream) -> Option<u64> {
    // A second handle on the local socket: whatever the relay does with its own, the
    // connection is shut down here, after the break is on record.
    let (guard, conn) = match with_guard(conn) {
        Ok(both) => both,
        Err(e) => {
            note_break(&link, format!("taking the local connection: {e}"));
            return None;
        }
    };
    let relayed = relay_ws(ws, conn).await;
    match relayed {
        Ok(sent) => Some(sent),
        Err(e) => {
            note_break(&link, e.to_string());
            let _ = guard.shutdown(std::net::Shutdown::Both);
            None
        }
    }
}

/// Logs a broken forwarded connection and keeps the forward's first break.
fn note_break(link: &Link<'_>, error: String) {
    tracing::warn!(remote = %link.remote_path, "forwarded connection failed: {error}");
    if let Ok(mut first) = link.broken.lock() {
        first.get_or_insert(error);
    }
}

/// The connection and a second (std) handle on the same socket.
fn with_guard(
    conn: tokio::net::UnixStream,
) -> std::io::Result<(std::os::unix::net::UnixStream, tokio::net::UnixStream)> {
    let conn = conn.into_std()?;
    let guard = conn.try_clone()?;
    Ok((guard, tokio::net::UnixStream::from_std(conn)?))
}

/// Pipes `conn` through the WebSocket; the bytes sent to the peer. A peer's close (or EOF)
/// shuts `conn` down both ways at once (the relay's client role): nothing more it writes
/// can reach the peer.
async fn relay_ws(ws: Opened, conn: tokio::net::UnixStream) -> Result<u64, TunnelError> {
    let ws = ws?;
    let opts = RelayOpts::default();
    let relayed = relay::relay(ws.stream.into(), ws.leftover, Role::Client, conn, opts).await;
    let stats = relayed.map_err(|e| TunnelError::Other(e.to_string()))?;
    tracing::debug!(
        sent = stats.from_socket,
        received = stats.to_socket,
        "forward done"
    );
    Ok(stats.from_socket)
}

/// `host:port` of a WebSocket URL, for messages (no path, no ticket).
fn peer_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

/// `proxmox-websocket-tunnel`'s stdin language: control messages (`connect`, `forward`)
/// and relayed commands; one stdout line per line that expects a reply.
pub async fn run_stdio() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut control: Option<Control> = None;
    let mut forwards: Vec<Forward> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let reply =
                    json!({"success": false, "msg": format!("failed to parse command - {e}")});
                stdout.write_all(format!("{reply}\n").as_bytes()).await?;
                stdout.flush().await?;
                continue;
            }
        };
        let is_control = parsed.get("control").and_then(crate::util::lenient_bool) == Some(true);
        if is_control {
            let cmd = parsed.get("cmd").and_then(Value::as_str).unwrap_or("");
            let data = parsed.get("data").cloned().unwrap_or(Value::Null);
            match cmd {
                "connect" => {
                    let endpoint: Endpoint = serde_json::from_value(data)?;
                    eprintln!("connecting to {}", redact(&endpoint.url));
                    control = Some(Control::connect(&endpoint).await?);
                    // No reply line: the caller sends `version` next.
                }
                "forward" => {
                    let reply = match (&control, forward_request(data)) {
                        (None, _) => json!({"success": false, "msg": "not connected"}),
                        (_, Err(e)) => json!({"success": false, "msg": e.to_string()}),
                        (Some(c), Ok((endpoint, unix, path))) => {
                            match forward(c, endpoint, &unix, path, 0) {
                                Ok(f) => {
                                    eprintln!("forwarding {}", f.local.display());
                                    forwards.push(f);
                                    json!({"success": true})
                                }
                                Err(e) => json!({"success": false, "msg": e.to_string()}),
                            }
                        }
                    };
                    stdout.write_all(format!("{reply}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
                other => {
                    let reply = json!({"success": false, "msg": format!("unknown control command '{other}'")});
                    stdout.write_all(format!("{reply}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
            }
            continue;
        }
        let Some(c) = &control else {
            let reply = json!({"success": false, "msg": "not connected"});
            stdout.write_all(format!("{reply}\n").as_bytes()).await?;
            stdout.flush().await?;
            continue;
        };
        let cmd = parsed
            .get("cmd")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        eprintln!("-> sending command \"{cmd}\" to remote");
        let reply = match c.raw(line, Duration::from_secs(3600)).await {
            Ok(reply) => {
                eprintln!("<- got reply");
                reply
            }
            Err(e) => {
                eprintln!("<- {e}");
                json!({"success": false, "msg": e.to_string()}).to_string()
            }
        };
        stdout.write_all(format!("{reply}\n").as_bytes()).await?;
        stdout.flush().await?;
    }
    drop(forwards);
    if let Some(c) = control {
        c.close();
        // Give the close frame a moment to leave.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn forward_request(data: Value) -> Result<(Endpoint, PathBuf, String), TunnelError> {
    #[derive(Deserialize)]
    struct Ticket {
        path: String,
    }
    #[derive(Deserialize)]
    struct Req {
        #[serde(flatten)]
        endpoint: Endpoint,
        unix: PathBuf,
        ticket: Ticket,
    }
    let req: Req = serde_json::from_value(data)
        .map_err(|e| TunnelError::Other(format!("bad forward request: {e}")))?;
    Ok((req.endpoint, req.unix, req.ticket.path))
}

/// Hides the ticket of a URL in log lines.
fn redact(url: &str) -> String {
    match url.find("ticket=") {
        Some(i) => {
            let end = url[i..].find('&').map(|e| i + e).unwrap_or(url.len());
            format!("{}ticket=...{}", &url[..i], &url[end..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_is_host_and_port() {
        assert_eq!(
            peer_of("https://10.0.0.1:8006/api2/json/nodes/n/qemu/1/mtunnelwebsocket?socket=a&"),
            "10.0.0.1:8006"
        );
        assert_eq!(peer_of("ws://[::1]:80?ticket=x"), "[::1]:80");
    }
}
