//! The tunnel worker: accepts exactly one connection on the control socket, then reads one
//! JSON command per line and writes exactly one reply line per command, in order. Command
//! semantics live behind [`CommandHandler`], built by the node's handler factory
//! ([`crate::command`]); this loop owns the wire rules (line limit, parse errors,
//! `'cmd' missing`, exit mode after `quit`) and the task log.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::Tunnel;
use crate::command::{self, HandlerSetup, TunnelSockets};
pub use crate::command::{CommandHandler, Outcome};
use crate::metrics::{Metrics, command_label, migration_failure};
use crate::task::{StopSignal, TaskLog};

/// Longest accepted command line; longer lines are discarded with an error reply.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// How the command loop ended.
#[derive(Debug)]
pub enum End {
    /// EOF after `quit`: the normal end.
    Quit,
    /// EOF without `quit`.
    Eof,
    /// Reading or writing the control connection failed (reset, broken pipe, ...).
    Failed(std::io::Error),
    /// A stop was requested (task stop, server shutdown).
    Stopped,
}

impl End {
    /// The [`migration_failure`] reason of a tunnel that ended this way uncommitted.
    fn failure_reason(&self) -> &'static str {
        match self {
            End::Quit => migration_failure::SOURCE_ABORTED,
            End::Eof | End::Failed(_) => migration_failure::PEER_GONE,
            End::Stopped => migration_failure::SHUTDOWN,
        }
    }

    /// The task log's words for this end; `cause` is why the control WebSocket broke, as
    /// its relay reported it (e.g. the peer timeout), which says more than the socket.
    fn describe(&self, cause: Option<&str>) -> String {
        let lost = "control connection lost before the migration finished";
        match (self, cause) {
            (End::Quit, _) => "tunnel closed by 'quit' before the migration finished".into(),
            (End::Eof | End::Failed(_), Some(cause)) => format!("{lost} ({cause})"),
            (End::Eof, None) => lost.into(),
            (End::Failed(e), None) => format!("{lost} ({e})"),
            (End::Stopped, _) => "tunnel stopped before the migration finished".into(),
        }
    }

    /// The task's error (its `TASK ERROR:` line) for this end, `cause` as above.
    fn into_result(self, cause: Option<String>) -> anyhow::Result<()> {
        match (self, cause) {
            (End::Quit, _) => Ok(()),
            (End::Stopped, _) => anyhow::bail!("received interrupt"),
            (End::Eof | End::Failed(_), Some(cause)) => {
                anyhow::bail!("mtunnel exited unexpectedly: {cause}")
            }
            (End::Eof, None) => anyhow::bail!("mtunnel exited unexpectedly"),
            (End::Failed(e), None) => anyhow::bail!("mtunnel exited unexpectedly: {e}"),
        }
    }
}

/// How long the worker waits, after its control socket closed, for the WebSocket relay
/// to say why. The relay reports as it ends, and it ends as the socket closes: this bounds
/// only a relay stuck writing to a peer that does not read.
const CONTROL_END_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The worker's body, run as the `qmtunnel` task. Whatever happens — the source quits,
/// vanishes, a handler panics, the server shuts down — the handler's `finish` runs once,
/// and the task log says how the tunnel ended.
pub async fn run(
    tunnels: &Arc<super::Tunnels>,
    tunnel: &Arc<Tunnel>,
    listener: UnixListener,
    log: &TaskLog,
    created: crate::journal::Created,
    mut stop: StopSignal,
) -> anyhow::Result<()> {
    let svc = &tunnels.services;
    let mut handler = match build_handler(tunnels, tunnel, log, created) {
        Ok(h) => h,
        Err(e) => {
            super::remove_reserved_config(&svc.host.guests, tunnel.vmid).await;
            return Err(e);
        }
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(svc.host.cfg.tunnel_accept_timeout, listener.accept()) => r,
        _ = stop.requested() => {
            handler.finish("tunnel stopped before the source connected").await;
            anyhow::bail!("received interrupt");
        }
    };
    let stream = match accepted {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(e)) => {
            handler
                .finish("accepting the control connection failed")
                .await;
            anyhow::bail!("accepting the control connection failed: {e}");
        }
        Err(_) => {
            log.log(format!(
                "mtunnel timeout: no connection within {} s",
                svc.host.cfg.tunnel_accept_timeout.as_secs()
            ));
            handler.finish("no control connection").await;
            anyhow::bail!("Exiting mtunnel");
        }
    };
    // One connection only: the path goes now, while the config still reserves the VMID
    // (later, a next tunnel of the VMID may have bound the same path).
    drop(listener);
    let _ = std::fs::remove_file(&tunnel.control_socket);
    svc.host.metrics.migration_started();
    let (read, write) = stream.into_split();
    let served = AssertUnwindSafe(serve_until(
        read,
        write,
        &mut *handler,
        log,
        &svc.host.metrics,
        stop.requested(),
    ))
    .catch_unwind()
    .await;
    let end = match served {
        Ok(end) => end,
        Err(panic) => {
            let what = panic_text(&panic);
            log.log(format!("ERROR: command handling panicked: {what}"));
            handler.finish("command handling panicked").await;
            count_migration(&svc.host, tunnel, migration_failure::HANDLER_PANIC);
            anyhow::bail!("mtunnel failed: command handling panicked: {what}");
        }
    };
    let cause = match end {
        End::Eof | End::Failed(_) => tunnel.control_end_reason(CONTROL_END_WAIT).await,
        End::Quit | End::Stopped => None,
    };
    handler.finish(&end.describe(cause.as_deref())).await;
    count_migration(&svc.host, tunnel, end.failure_reason());
    if matches!(end, End::Quit) {
        log.log("mtunnel exited");
    }
    end.into_result(cause)
}

/// Counts the migration of a tunnel whose handler finished: completed if its journal says
/// it was committed (`resume` or `unlock` succeeded; both the online and the offline path
/// end with `unlock`), else failed for `reason`.
fn count_migration(host: &command::Host, tunnel: &Tunnel, reason: &'static str) {
    let committed = crate::journal::load(&host.cfg.journal_dir(), &tunnel.instance)
        .is_some_and(|c| c.committed);
    if committed {
        host.metrics.migration_completed();
    } else {
        host.metrics.migration_failed(reason);
    }
}

fn build_handler(
    tunnels: &super::Tunnels,
    tunnel: &Arc<Tunnel>,
    log: &TaskLog,
    created: crate::journal::Created,
) -> anyhow::Result<Box<dyn CommandHandler>> {
    let link = Link {
        tunnel: Arc::clone(tunnel),
    };
    let inner = (tunnels.handlers)(HandlerSetup {
        host: tunnels.services.host.clone(),
        tunnel: Arc::new(link),
        log: log.clone(),
        created,
    })?;
    Ok(Box::new(Recorded {
        inner,
        tunnel: Arc::clone(tunnel),
    }))
}

/// A tunnel's handler that records each command it starts in the tunnel's activity (the
/// status page's "last command"), whatever handler the node uses.
struct Recorded {
    inner: Box<dyn CommandHandler>,
    tunnel: Arc<Tunnel>,
}

impl CommandHandler for Recorded {
    fn knows(&self, cmd: &str) -> bool {
        self.inner.knows(cmd)
    }

    fn handle<'a>(
        &'a mut self,
        cmd: &'a str,
        params: serde_json::Map<String, Value>,
    ) -> futures_util::future::BoxFuture<'a, Outcome> {
        self.tunnel.activity.command_started(cmd);
        self.inner.handle(cmd, params)
    }

    fn finish(&mut self, end: &str) -> futures_util::future::BoxFuture<'_, ()> {
        self.inner.finish(end)
    }
}

/// A tunnel as its handler sees it: its sockets.
struct Link {
    tunnel: Arc<Tunnel>,
}

impl TunnelSockets for Link {
    fn vmid(&self) -> u32 {
        self.tunnel.vmid
    }

    fn authid(&self) -> &str {
        &self.tunnel.authid
    }

    fn instance(&self) -> &str {
        &self.tunnel.instance
    }

    fn register_socket(&self, path: &std::path::Path) {
        self.tunnel.register_socket(path)
    }

    fn unregister_socket(&self, path: &std::path::Path) {
        self.tunnel.unregister_socket(path)
    }

    fn is_registered(&self, path: &std::path::Path) -> bool {
        self.tunnel.is_registered(path)
    }

    fn inbound_bytes(&self, path: &std::path::Path) -> u64 {
        self.tunnel.activity.inbound_bytes(path)
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Reads commands until EOF; returns whether the tunnel was in exit mode (clean end).
pub async fn serve<R, W>(
    read: R,
    write: W,
    handler: &mut dyn CommandHandler,
    log: &TaskLog,
) -> anyhow::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let metrics = Metrics::new();
    let forever = std::future::pending::<()>();
    match serve_until(read, write, handler, log, &metrics, forever).await {
        End::Quit => Ok(true),
        End::Eof => Ok(false),
        End::Failed(e) => Err(e.into()),
        End::Stopped => Ok(false),
    }
}

/// Reads commands until EOF, an I/O error, or `stop` resolves. A stop is noticed between
/// commands: a running command finishes (and replies) first, so what it creates is
/// recorded before cleanup runs. Each reply is counted in `metrics`.
pub async fn serve_until<R, W>(
    read: R,
    mut write: W,
    handler: &mut dyn CommandHandler,
    log: &TaskLog,
    metrics: &Metrics,
    stop: impl std::future::Future<Output = ()>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut exit_mode = false;
    let mut line = Vec::new();
    tokio::pin!(stop);
    loop {
        line.clear();
        let read = tokio::select! {
            biased;
            _ = &mut stop => return End::Stopped,
            r = read_bounded_line(&mut reader, &mut line) => r,
        };
        let (got_any, too_long) = match read {
            Ok(r) => r,
            Err(e) => return End::Failed(e),
        };
        if !got_any {
            return if exit_mode { End::Quit } else { End::Eof };
        }
        let started = std::time::Instant::now();
        let (cmd, outcome) = if too_long {
            let msg =
                format!("failed to parse command - line too long (limit {MAX_LINE_BYTES} bytes)");
            (None, Outcome::err(msg))
        } else {
            super::off_runtime(dispatch(&line, exit_mode, handler, log)).await
        };
        let label = command_label(
            cmd.as_deref().unwrap_or(""),
            cmd.as_deref().is_some_and(|c| handler.knows(c)),
        );
        metrics.command_done(label, outcome.reply.is_ok(), started.elapsed());
        if outcome.exit {
            exit_mode = true;
        }
        let reply = match outcome.reply {
            Ok(mut fields) => {
                fields.insert("success".into(), Value::Bool(true));
                Value::Object(fields)
            }
            Err(msg) => {
                log.log(format!("ERROR: {msg}"));
                json!({"success": false, "msg": msg})
            }
        };
        let mut bytes = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{}".to_vec());
        bytes.push(b'\n');
        if let Err(e) = write_reply(&mut write, &bytes).await {
            return End::Failed(e);
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(write: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    write.write_all(bytes).await?;
    write.flush().await
}

/// Runs one command line; returns the command's name (if the line had one) and outcome.
async fn dispatch(
    line: &[u8],
    exit_mode: bool,
    handler: &mut dyn CommandHandler,
    log: &TaskLog,
) -> (Option<String>, Outcome) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let mut request = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return (
                None,
                Outcome::err("failed to parse command - not a JSON object"),
            );
        }
        Err(e) => return (None, Outcome::err(format!("failed to parse command - {e}"))),
    };
    let cmd = match request.remove("cmd") {
        Some(Value::String(cmd)) => cmd,
        _ => return (None, Outcome::err("'cmd' missing")),
    };
    let outcome = run_command(&cmd, request, exit_mode, handler, log).await;
    (Some(cmd), outcome)
}

async fn run_command(
    cmd: &str,
    request: serde_json::Map<String, Value>,
    exit_mode: bool,
    handler: &mut dyn CommandHandler,
    log: &TaskLog,
) -> Outcome {
    let span = tracing::info_span!("cmd", cmd = %cmd);
    let _enter = span.enter();
    if exit_mode {
        return Outcome::err(format!(
            "tunnel is in exit-mode, processing '{cmd}' cmd not possible"
        ));
    }
    if !handler.knows(cmd) {
        return Outcome::err(format!("unknown command '{cmd}' given"));
    }
    log.log(format!("received command '{cmd}'"));
    tracing::debug!("handling command");
    drop(_enter);
    let mut outcome = handler.handle(cmd, request).await;
    if let Err(msg) = &mut outcome.reply {
        *msg = format!("failed to handle '{cmd}' command - {msg}");
    }
    outcome
}

/// Reads one line into `out` (without its newline), at most [`MAX_LINE_BYTES`]; a longer
/// line is consumed to its end and reported as too long. Returns (line read, too long).
async fn read_bounded_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    out: &mut Vec<u8>,
) -> std::io::Result<(bool, bool)> {
    let mut got_any = false;
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((got_any, too_long));
        }
        got_any = true;
        let (chunk, done) = match memchr(buf) {
            Some(pos) => (&buf[..pos], Some(pos + 1)),
            None => (buf, None),
        };
        if !too_long {
            if out.len() + chunk.len() > MAX_LINE_BYTES {
                too_long = true;
                out.clear();
            } else {
                out.extend_from_slice(chunk);
            }
        }
        let consumed = done.unwrap_or(buf.len());
        reader.consume(consumed);
        if done.is_some() {
            return Ok((true, too_long));
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}
