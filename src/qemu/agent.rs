//! Guest-agent client on `{run}/{vmid}.qga` (the `virtserialport` named
//! `org.qemu.guest_agent.0` that [`super::cmdline`] adds for `agent: 1`).
//!
//! QEMU accepts the connection whether or not an agent runs inside the guest; without one,
//! nothing ever answers. So every exchange starts with `guest-sync` (a random id the agent
//! echoes, which also skips stale replies from earlier, timed-out clients) under a short
//! timeout (3 s by default, as Proxmox), and only then sends the real command under its own
//! timeout. A fresh connection is used per call: the socket serves one client at a time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Timeout of the `guest-sync` probe (Proxmox uses 3 s).
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of `guest-fstrim` (the protocol gives the target 600 s for `fstrim`).
pub const FSTRIM_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("guest agent socket {path}: {source} (is the VM running with agent: 1 in its config?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "guest agent on {path} did not answer within {secs:.1} s: is qemu-guest-agent installed and running inside the guest?"
    )]
    NoAgent { path: PathBuf, secs: f64 },
    #[error("guest agent command '{cmd}' got no reply within {secs:.1} s")]
    Timeout { cmd: String, secs: f64 },
    #[error("guest agent command '{cmd}' failed: {class}: {desc}")]
    Command {
        cmd: String,
        class: String,
        desc: String,
    },
    #[error("guest agent socket {path} closed the connection (VM exited?)")]
    Closed { path: PathBuf },
    #[error("guest agent socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Client for one VM's guest agent.
#[derive(Debug, Clone)]
pub struct Agent {
    path: PathBuf,
    ping_timeout: Duration,
}

impl Agent {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Agent {
            path: path.into(),
            ping_timeout: DEFAULT_PING_TIMEOUT,
        }
    }

    /// Changes the `guest-sync` timeout (default 3 s).
    pub fn with_ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that an agent answers: `guest-sync` then `guest-ping`.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.execute("guest-ping", Value::Null, self.ping_timeout)
            .await
            .map(|_| ())
    }

    /// `guest-fstrim` after a successful sync; returns the agent's per-mount result.
    pub async fn fstrim(&self, timeout: Duration) -> Result<Value, AgentError> {
        self.execute("guest-fstrim", Value::Null, timeout).await
    }

    /// Syncs (under the ping timeout), then runs `cmd` under `timeout`.
    pub async fn execute(
        &self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| AgentError::Connect {
                path: self.path.clone(),
                source: e,
            })?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);

        let sync_id = sync_id();
        let sync = json!({"execute": "guest-sync", "arguments": {"id": sync_id}});
        let synced = tokio::time::timeout(self.ping_timeout, async {
            self.send(&mut w, &sync).await?;
            loop {
                let msg = self.recv(&mut r).await?;
                if msg.get("return").and_then(Value::as_u64) == Some(sync_id) {
                    return Ok(());
                }
                tracing::debug!(path = %self.path.display(), "agent: skipping stale message {msg}");
            }
        })
        .await;
        match synced {
            Ok(r) => r?,
            Err(_) => {
                return Err(AgentError::NoAgent {
                    path: self.path.clone(),
                    secs: self.ping_timeout.as_secs_f64(),
                });
            }
        }

        let mut msg = json!({"execute": cmd});
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let reply = tokio::time::timeout(timeout, async {
            self.send(&mut w, &msg).await?;
            self.recv(&mut r).await
        })
        .await
        .map_err(|_| AgentError::Timeout {
            cmd: cmd.to_string(),
            secs: timeout.as_secs_f64(),
        })??;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        Err(AgentError::Command {
            cmd: cmd.to_string(),
            class: err["class"].as_str().unwrap_or("GenericError").to_string(),
            desc: err["desc"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("unexpected reply {reply}")),
        })
    }

    async fn send(
        &self,
        w: &mut tokio::net::unix::OwnedWriteHalf,
        msg: &Value,
    ) -> Result<(), AgentError> {
        let mut line = msg.to_string();
        line.push('\n');
        w.write_all(line.as_bytes()).await.map_err(|e| self.io(e))
    }

    /// Next JSON object from the agent; lines that are not JSON (noise after a reset) are
    /// skipped.
    async fn recv(
        &self,
        r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    ) -> Result<Value, AgentError> {
        loop {
            let mut buf = Vec::new();
            let n = r
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(AgentError::Closed {
                    path: self.path.clone(),
                });
            }
            // guest-sync-delimited uses 0xFF as a marker; tolerate it.
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(text) {
                return Ok(v);
            }
        }
    }

    fn io(&self, e: io::Error) -> AgentError {
        AgentError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}

fn sync_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep it well inside the range every JSON implementation represents exactly.
    (nanos ^ (u64::from(std::process::id()) << 20)) % 1_000_000_007
}

#[cfg(test)]
mod tests {
    //! A fake agent on a UNIX socket; the real-QEMU case (no agent in the guest) is in
    //! `qemu::tests`.
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn sync_skips_stale_then_runs_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qga");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            let m: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(m["execute"], "guest-sync");
            let id = m["arguments"]["id"].as_u64().unwrap();
            w.write_all(b"{\"return\": 12345}\n").await.unwrap(); // stale
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            let m: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(m["execute"], "guest-fstrim");
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no fs\"}}\n")
                .await
                .unwrap();
        });
        let err = Agent::new(&path)
            .fstrim(Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no fs"), "{err}");
        server.await.unwrap();
    }
}
