//! QMP client: one connection to a QEMU monitor socket (`{run}/{vmid}.qmp`), the greeting and
//! `qmp_capabilities` handshake, commands with ids and timeouts, and asynchronous events fanned
//! out to subscribers.
//!
//! A background task owns the read half: replies are matched to callers by `id`, events go to
//! a broadcast channel ([`Qmp::events`]), and end of file (QEMU exited or closed the monitor)
//! fails every pending and later command with [`QmpError::Closed`]. QEMU serves one client per
//! monitor socket at a time, so hold one [`Qmp`] per VM rather than connecting per command.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Timeout for ordinary commands when the caller has no better idea.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Replies longer than this are treated as a protocol error (QEMU never sends such lines).
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error(
        "cannot connect to QMP socket {path} within {secs:.1} s: {source} (is the VM running? its log is next to the socket)"
    )]
    Connect {
        path: PathBuf,
        secs: f64,
        source: io::Error,
    },
    #[error(
        "QMP socket {path}: no greeting within {secs:.1} s (another client may hold the monitor)"
    )]
    NoGreeting { path: PathBuf, secs: f64 },
    #[error("QMP socket {path}: protocol error: {msg}")]
    Protocol { path: PathBuf, msg: String },
    #[error("QMP command '{cmd}' failed: {class}: {desc}")]
    Command {
        cmd: String,
        class: String,
        desc: String,
    },
    #[error("QMP command '{cmd}' got no reply within {secs:.1} s")]
    Timeout { cmd: String, secs: f64 },
    #[error("QMP connection {path} closed: {reason}")]
    Closed { path: PathBuf, reason: String },
    #[error("QMP socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl QmpError {
    /// QEMU's error class (`GenericError`, `CommandNotFound`, ...) for command errors.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when QEMU does not know the command (older QEMU).
    pub fn is_command_not_found(&self) -> bool {
        self.class() == Some("CommandNotFound")
    }

    /// True when the connection is gone (QEMU exited).
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. })
    }
}

/// An asynchronous QMP event (`BLOCK_JOB_READY`, `MIGRATION`, `STOP`, ...).
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

type Reply = Result<Value, (String, String)>;

struct Shared {
    path: PathBuf,
    pending: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Set once the reader saw EOF or an error; later commands fail at once.
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        // A poisoned lock only means another task panicked while holding it; the map is
        // still consistent (insert/remove only).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One QMP connection.
pub struct Qmp {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    events: broadcast::Sender<QmpEvent>,
    closed_rx: watch::Receiver<bool>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    version: String,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.shared.path)
            .field("version", &self.version)
            .finish()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to `path`, retrying while the socket is missing or refuses (QEMU creates it
    /// asynchronously) until `deadline` has passed, then does the handshake.
    pub async fn connect(path: &Path, deadline: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        secs: deadline.as_secs_f64(),
                        source: e,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let left = deadline.saturating_sub(start.elapsed());
        Self::handshake(path, stream, left.max(Duration::from_secs(3))).await
    }

    /// One connection attempt (no retries): for callers that poll readiness themselves.
    pub async fn connect_once(path: &Path, greeting_timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QmpError::Connect {
                path: path.to_path_buf(),
                secs: 0.0,
                source: e,
            })?;
        Self::handshake(path, stream, greeting_timeout).await
    }

    async fn handshake(
        path: &Path,
        stream: UnixStream,
        timeout: Duration,
    ) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let qmp = tokio::time::timeout(timeout, read_greeting(path, &mut reader))
            .await
            .map_err(|_| QmpError::NoGreeting {
                path: path.to_path_buf(),
                secs: timeout.as_secs_f64(),
            })??;
        let v = &qmp["QMP"]["version"]["qemu"];
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);

        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            pending: Mutex::new(PendingState::default()),
        });
        let (events, _) = broadcast::channel(1024);
        let (closed_tx, closed_rx) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            reader,
            Arc::clone(&shared),
            events.clone(),
            closed_tx,
        ));
        let qmp = Qmp {
            shared,
            writer: tokio::sync::Mutex::new(write),
            events,
            closed_rx,
            next_id: AtomicU64::new(1),
            reader,
            version,
        };
        qmp.execute("qmp_capabilities", Value::Null, timeout)
            .await?;
        Ok(qmp)
    }

    /// QEMU version from the greeting, `major.minor.micro`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the connection has ended (QEMU exited or closed the monitor).
    pub fn is_closed(&self) -> bool {
        *self.closed_rx.borrow()
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        let mut rx = self.closed_rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Events from now on. Subscribe *before* sending the command that causes them.
    pub fn events(&self) -> QmpEvents {
        QmpEvents {
            rx: self.events.subscribe(),
            closed: self.closed_rx.clone(),
            path: self.shared.path.clone(),
        }
    }

    /// Runs `cmd` with `args` (`Value::Null` = no arguments) and returns its `return` value.
    pub async fn execute(
        &self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_passing(cmd, args, None, timeout).await
    }

    /// Hands `fd` to QEMU under `fdname` (`getfd`); a later command names it, e.g.
    /// `migrate` to `fd:NAME`. QEMU keeps its own copy: the caller may close `fd`.
    pub async fn send_fd(
        &self,
        fdname: &str,
        fd: std::os::fd::BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let args = json!({ "fdname": fdname });
        self.execute_passing("getfd", args, Some(fd), timeout)
            .await
            .map(|_| ())
    }

    /// [`Qmp::execute`], the command's bytes carrying `fd` (SCM_RIGHTS) when given: QEMU
    /// takes a passed descriptor from the message that brings the command.
    async fn execute_passing(
        &self,
        cmd: &str,
        args: Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(QmpError::Closed {
                    path: self.shared.path.clone(),
                    reason: reason.clone(),
                });
            }
            st.waiters.insert(id, tx);
        }
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tracing::debug!(path = %self.shared.path.display(), %cmd, id, "QMP ->");

        let result = tokio::time::timeout(timeout, async {
            {
                let mut w = self.writer.lock().await;
                let sent = match fd {
                    Some(fd) => send_with_fd(w.as_ref(), line.as_bytes(), fd).await,
                    None => Ok(0),
                };
                let written = match sent {
                    Ok(n) => w.write_all(&line.as_bytes()[n..]).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    return Err(self.closed_or_io(e));
                }
            }
            match rx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err((class, desc))) => Err(QmpError::Command {
                    cmd: cmd.to_string(),
                    class,
                    desc,
                }),
                Err(_) => Err(self.closed_error()),
            }
        })
        .await;
        match result {
            Ok(r) => {
                if let Err(e) = &r {
                    tracing::debug!(%cmd, id, error = %e, "QMP <- error");
                }
                r
            }
            Err(_) => {
                self.shared.lock().waiters.remove(&id);
                Err(QmpError::Timeout {
                    cmd: cmd.to_string(),
                    secs: timeout.as_secs_f64(),
                })
            }
        }
    }

    fn closed_error(&self) -> QmpError {
        let reason = self
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        QmpError::Closed {
            path: self.shared.path.clone(),
            reason,
        }
    }

    fn closed_or_io(&self, e: io::Error) -> QmpError {
        if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            QmpError::Closed {
                path: self.shared.path.clone(),
                reason: format!("write failed: {e} (QEMU exited?)"),
            }
        } else {
            QmpError::Io {
                path: self.shared.path.clone(),
                source: e,
            }
        }
    }
}

/// Sends the first bytes of `line` with `fd` attached; how many went (at least one).
async fn send_with_fd(
    stream: &UnixStream,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::{AsRawFd, RawFd};
    let fds: [RawFd; 1] = [fd.as_raw_fd()];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [io::IoSlice::new(line)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                .map_err(io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one line, refusing absurdly long ones.
async fn read_line(reader: &mut BufReader<OwnedReadHalf>, line: &mut String) -> io::Result<usize> {
    line.clear();
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == MAX_LINE && buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "QMP line too long",
        ));
    }
    line.push_str(&String::from_utf8_lossy(&buf));
    Ok(n)
}

/// Reads up to the greeting. Other lines may come first: QEMU's monitor keeps output its
/// last client did not read (a job's status change, a reply to a command whose client
/// gave up, the tail of a line) and sends it to the next one before the greeting. At most
/// 64 such lines are skipped.
async fn read_greeting(
    path: &Path,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Value, QmpError> {
    let mut line = String::new();
    for _ in 0..64 {
        line.clear();
        let n = read_line(reader, &mut line)
            .await
            .map_err(|e| QmpError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: path.to_path_buf(),
                reason: "closed before the greeting".into(),
            });
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(msg) if msg.get("QMP").is_some() => return Ok(msg),
            // A stale event or reply, or the tail of a line cut short.
            _ => tracing::debug!(
                path = %path.display(),
                "QMP: skipping a line before the greeting: {}",
                line.trim()
            ),
        }
    }
    Err(QmpError::Protocol {
        path: path.to_path_buf(),
        msg: format!("greeting without 'QMP': {}", line.trim()),
    })
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    let mut line = String::new();
    let reason = loop {
        match read_line(&mut reader, &mut line).await {
            Ok(0) => break "QEMU closed the monitor connection (VM exited?)".to_string(),
            Ok(_) => {}
            Err(e) => break format!("read error: {e}"),
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(path = %shared.path.display(), "QMP: ignoring non-JSON line ({e}): {}", line.trim());
                continue;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            tracing::debug!(path = %shared.path.display(), event = name, "QMP event");
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            });
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(path = %shared.path.display(), "QMP: reply without id: {}", line.trim());
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            let class = err["class"].as_str().unwrap_or("GenericError").to_string();
            let desc = err["desc"]
                .as_str()
                .unwrap_or("(no description)")
                .to_string();
            Err((class, desc))
        } else {
            tracing::warn!(path = %shared.path.display(), "QMP: unknown message: {}", line.trim());
            continue;
        };
        let waiter = shared.lock().waiters.remove(&id);
        match waiter {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(id, "QMP: late reply for a timed-out command dropped"),
        }
    };
    tracing::debug!(path = %shared.path.display(), %reason, "QMP reader finished");
    let waiters = {
        let mut st = shared.lock();
        st.closed = Some(reason);
        std::mem::take(&mut st.waiters)
    };
    drop(waiters); // dropping the senders fails every pending command with Closed
    let _ = closed.send(true);
}

/// A subscription to a connection's events.
pub struct QmpEvents {
    rx: broadcast::Receiver<QmpEvent>,
    closed: watch::Receiver<bool>,
    path: PathBuf,
}

impl QmpEvents {
    /// Next event; [`QmpError::Closed`] once the connection ended and no event is buffered.
    pub async fn next(&mut self) -> Result<QmpEvent, QmpError> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => return Ok(ev),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::warn!(path = %self.path.display(), "QMP: {n} events dropped (slow consumer)");
                    continue;
                }
                Err(broadcast::error::TryRecvError::Empty) => {}
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Err(closed_error(&self.path));
                }
            }
            if *self.closed.borrow() {
                return Err(closed_error(&self.path));
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(ev) => return Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Err(closed_error(&self.path)),
                },
                _ = self.closed.wait_for(|c| *c) => continue,
            }
        }
    }

    /// Waits up to `timeout` for an event for which `pred` holds.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&QmpEvent) -> bool,
    ) -> Result<QmpEvent, QmpError> {
        let fut = async {
            loop {
                let ev = self.next().await?;
                if pred(&ev) {
                    return Ok(ev);
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                cmd: "(waiting for event)".into(),
                secs: timeout.as_secs_f64(),
            }),
        }
    }
}

fn closed_error(path: &Path) -> QmpError {
    QmpError::Closed {
        path: path.to_path_buf(),
        reason: "QEMU closed the monitor connection (VM exited?)".into(),
    }
}

#[cfg(test)]
mod tests {
    //! Protocol tests against a fake QMP server on a UNIX socket (no QEMU needed).
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    async fn fake_server(
        path: PathBuf,
        script: impl FnOnce(UnixStream) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            script(s).await;
        })
    }

    async fn recv_json(r: &mut BufReader<OwnedReadHalf>) -> Value {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap()
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n";

    /// QEMU hands a new client what its monitor did not deliver to the last one (here a
    /// job's status change) before the greeting.
    #[tokio::test]
    async fn events_left_from_a_previous_client_come_before_the_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qmp");
        let stale = "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \
                     \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"ready\", \"id\": \"mirror-scsi1\"}}\n";
        let _server = fake_server(path.clone(), move |s| {
            Box::pin(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(stale.as_bytes()).await.unwrap();
                w.write_all(b"{\"return\": {}, \"id\": 7}\nrunning\": true}}\n")
                    .await
                    .unwrap();
                w.write_all(GREETING.as_bytes()).await.unwrap();
                let m = recv_json(&mut r).await;
                assert_eq!(m["execute"], "qmp_capabilities");
                w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", m["id"]).as_bytes())
                    .await
                    .unwrap();
                let _ = recv_json(&mut r).await;
            })
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        assert_eq!(qmp.version(), "10.0.2");
        // So is a stale reply and a cut line; more than 64 lines without a greeting are not.
        let path = dir.path().join("u.qmp");
        let _server = fake_server(path.clone(), |s| {
            Box::pin(async move {
                let (_r, mut w) = s.into_split();
                for _ in 0..65 {
                    w.write_all(b"{\"return\": {}}\n").await.unwrap();
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
        })
        .await;
        let err = Qmp::connect(&path, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "QMP socket {}: protocol error: greeting without 'QMP': {{\"return\": {{}}}}",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn handshake_commands_errors_events_and_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qmp");
        let server = fake_server(path.clone(), |s| {
            Box::pin(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(GREETING.as_bytes()).await.unwrap();
                let m = recv_json(&mut r).await;
                assert_eq!(m["execute"], "qmp_capabilities");
                w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", m["id"]).as_bytes())
                    .await
                    .unwrap();
                // query-status: event first, then the reply.
                let m = recv_json(&mut r).await;
                assert_eq!(m["execute"], "query-status");
                w.write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n")
                    .await
                    .unwrap();
                w.write_all(
                    format!("{{\"return\": {{\"status\": \"running\", \"running\": true}}, \"id\": {}}}\n", m["id"])
                        .as_bytes(),
                )
                .await
                .unwrap();
                let m = recv_json(&mut r).await;
                assert_eq!(m["arguments"]["x"], 1);
                w.write_all(
                    format!("{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}, \"id\": {}}}\n", m["id"])
                        .as_bytes(),
                )
                .await
                .unwrap();
                // swallow the next command, then close: the caller must see Closed.
                let _ = recv_json(&mut r).await;
                let mut rest = Vec::new();
                drop(w);
                let _ = r.read_to_end(&mut rest).await;
            })
        })
        .await;

        let qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        assert_eq!(qmp.version(), "10.0.2");
        let mut events = qmp.events();
        let st = qmp
            .execute("query-status", Value::Null, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(st["status"], "running");
        let ev = events.next().await.unwrap();
        assert_eq!(ev.name, "STOP");
        let err = qmp
            .execute("nope", json!({"x": 1}), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.is_command_not_found(), "{err}");
        assert!(err.to_string().contains("has not been found"));
        let err = qmp
            .execute("hang", Value::Null, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.is_closed(), "{err}");
        assert!(qmp.is_closed());
        assert!(events.next().await.unwrap_err().is_closed());
        let err = qmp
            .execute("after", Value::Null, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.is_closed(), "{err}");
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn timeout_and_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.qmp");
        let t = Instant::now();
        let err = Qmp::connect(&missing, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));

        let path = dir.path().join("slow.qmp");
        let _server = fake_server(path.clone(), |s| {
            Box::pin(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(GREETING.as_bytes()).await.unwrap();
                let m = recv_json(&mut r).await;
                w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", m["id"]).as_bytes())
                    .await
                    .unwrap();
                let _ = recv_json(&mut r).await; // never answered
                tokio::time::sleep(Duration::from_secs(10)).await;
            })
        })
        .await;
        let qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        let err = qmp
            .execute("slow", Value::Null, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }
}
