//! Tasks as PVE has them: every long-running job (a tunnel worker, a migration) gets a UPID
//! `UPID:node:PID:PSTART:STARTTIME:type:id:user:` and a log file
//! `{data}/tasks/<last hex digit of starttime>/<UPID>` whose last line is `TASK OK`,
//! `TASK WARNINGS: n` or `TASK ERROR: msg`. Status and lists are read back from disk, so a
//! restarted server still knows the history; which tasks run right now lives in memory.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::util::unix_now;

/// A parsed UPID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    pub kind: String,
    pub id: String,
    pub user: String,
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UPID:{}:{:08X}:{:08X}:{:08X}:{}:{}:{}:",
            self.node, self.pid, self.pstart, self.starttime, self.kind, self.id, self.user
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unable to parse worker upid '{0}'")]
pub struct UpidParseError(pub String);

impl FromStr for Upid {
    type Err = UpidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UpidParseError(s.to_string());
        let fields: Vec<&str> = s.split(':').collect();
        if fields.len() != 9 || fields[0] != "UPID" || !fields[8].is_empty() {
            return Err(err());
        }
        let hex = |f: &str, max: usize| {
            if f.is_empty() || f.len() > max || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
                None
            } else {
                u64::from_str_radix(f, 16).ok()
            }
        };
        let node = fields[1];
        let safe = |f: &str| !f.is_empty() && !f.contains(['/', '\0']) && f != "." && f != "..";
        if !crate::ident::is_node_name(node)
            || !safe(fields[5])
            || !safe(fields[7])
            || fields[6].contains(['/', '\0'])
        {
            return Err(err());
        }
        Ok(Upid {
            node: node.to_string(),
            pid: hex(fields[2], 8).ok_or_else(err)? as u32,
            pstart: hex(fields[3], 9).ok_or_else(err)?,
            starttime: hex(fields[4], 8).ok_or_else(err)?,
            kind: fields[5].to_string(),
            id: fields[6].to_string(),
            user: fields[7].to_string(),
        })
    }
}

impl Upid {
    /// Fields of `GET .../tasks/{upid}/status` and of list entries.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("upid".into(), json!(self.to_string()));
        map.insert("node".into(), json!(self.node));
        map.insert("pid".into(), json!(self.pid));
        map.insert("pstart".into(), json!(self.pstart));
        map.insert("starttime".into(), json!(self.starttime));
        map.insert("type".into(), json!(self.kind));
        map.insert("id".into(), json!(self.id));
        // As PVE reports it: a token id is split into `user` and `tokenid`.
        match self.token_split() {
            Some((user, token)) => {
                map.insert("user".into(), json!(user));
                map.insert("tokenid".into(), json!(token));
            }
            None => {
                map.insert("user".into(), json!(self.user));
            }
        }
        map
    }

    /// `(user, token name)` if the task's user is an API token id.
    pub fn token_split(&self) -> Option<(&str, &str)> {
        if crate::ident::is_token_id(&self.user) {
            self.user.split_once('!')
        } else {
            None
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Ok,
    Warnings(u64),
    Error(String),
    /// No final line and not running: the process died mid-task.
    Unknown,
}

impl ExitStatus {
    /// The `exitstatus` text PVE reports.
    pub fn as_text(&self) -> String {
        match self {
            ExitStatus::Ok => "OK".into(),
            ExitStatus::Warnings(n) => format!("WARNINGS: {n}"),
            ExitStatus::Error(msg) => msg.clone(),
            ExitStatus::Unknown => "unexpected status".into(),
        }
    }

    fn parse_last_line(line: &str) -> Option<Self> {
        if line == "TASK OK" {
            Some(ExitStatus::Ok)
        } else if let Some(n) = line.strip_prefix("TASK WARNINGS: ") {
            n.trim().parse().ok().map(ExitStatus::Warnings)
        } else {
            line.strip_prefix("TASK ERROR: ")
                .map(|m| ExitStatus::Error(m.to_string()))
        }
    }
}

/// A task's state as read from memory and disk.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    pub upid: Upid,
    pub running: bool,
    pub exit: Option<ExitStatus>,
    pub endtime: Option<u64>,
}

impl TaskStatus {
    pub fn to_json(&self) -> Value {
        let mut map = self.upid.to_json();
        map.insert(
            "status".into(),
            json!(if self.running { "running" } else { "stopped" }),
        );
        if let Some(exit) = &self.exit {
            map.insert("exitstatus".into(), json!(exit.as_text()));
        }
        Value::Object(map)
    }
}

/// The handle a running task writes its log through.
#[derive(Clone)]
pub struct TaskLog {
    inner: Arc<TaskLogInner>,
}

struct TaskLogInner {
    upid: Upid,
    file: Mutex<File>,
    warnings: AtomicU64,
}

impl TaskLog {
    pub fn upid(&self) -> &Upid {
        &self.inner.upid
    }

    /// Appends one line (newlines inside `line` become separate lines).
    pub fn log(&self, line: impl AsRef<str>) {
        let mut file = self.inner.file.lock().unwrap_or_else(|e| e.into_inner());
        for part in line.as_ref().split('\n') {
            if let Err(e) = writeln!(file, "{part}") {
                tracing::error!(upid = %self.inner.upid, "cannot write task log: {e}");
            }
        }
    }

    /// Appends a `WARN: ` line and counts it for `TASK WARNINGS: n`.
    pub fn warn(&self, line: impl AsRef<str>) {
        self.inner.warnings.fetch_add(1, Ordering::Relaxed);
        self.log(format!("WARN: {}", line.as_ref()));
    }

    fn finish(&self, result: &anyhow::Result<()>) -> ExitStatus {
        let warnings = self.inner.warnings.load(Ordering::Relaxed);
        let status = match result {
            Err(e) => ExitStatus::Error(
                format!("{e:#}")
                    .lines()
                    .next()
                    .unwrap_or("error")
                    .to_string(),
            ),
            Ok(()) if warnings > 0 => ExitStatus::Warnings(warnings),
            Ok(()) => ExitStatus::Ok,
        };
        self.log(match &status {
            ExitStatus::Ok => "TASK OK".to_string(),
            ExitStatus::Warnings(n) => format!("TASK WARNINGS: {n}"),
            ExitStatus::Error(m) => format!("TASK ERROR: {m}"),
            ExitStatus::Unknown => "TASK ERROR: unexpected status".into(),
        });
        status
    }
}

/// Lets a task notice a stop request (`DELETE /nodes/{node}/tasks/{upid}`).
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Resolves once a stop was requested.
    pub async fn requested(&mut self) {
        while !*self.0.borrow() {
            if self.0.changed().await.is_err() {
                // The manager dropped the sender: nobody can ask to stop any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Creates, tracks and reads tasks of this node.
pub struct TaskManager {
    node: String,
    dir: PathBuf,
    pid: u32,
    pstart: u64,
    active: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Woken whenever a task ends ([`TaskManager::wait_idle`]).
    ended: tokio::sync::Notify,
}

impl TaskManager {
    pub fn new(node: &str, dir: &Path) -> anyhow::Result<Arc<Self>> {
        crate::util::ensure_dir(dir, 0o755)?;
        Ok(Arc::new(TaskManager {
            node: node.to_string(),
            dir: dir.to_path_buf(),
            pid: std::process::id(),
            pstart: process_start_ticks(std::process::id()).unwrap_or(0),
            active: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
        }))
    }

    fn log_path(&self, upid: &Upid) -> PathBuf {
        self.dir
            .join(format!("{:X}", upid.starttime & 0xf))
            .join(upid.to_string())
    }

    /// Creates the task's UPID and log file. The UPID is unique: if another task of the
    /// same kind, id and user already started in this second, the start time is moved on.
    pub fn create(&self, kind: &str, id: &str, user: &str) -> anyhow::Result<TaskLog> {
        let mut upid = Upid {
            node: self.node.clone(),
            pid: self.pid,
            pstart: self.pstart,
            starttime: unix_now(),
            kind: kind.to_string(),
            id: id.to_string(),
            user: user.to_string(),
        };
        for _ in 0..1000 {
            let path = self.log_path(&upid);
            if let Some(parent) = path.parent() {
                crate::util::ensure_dir(parent, 0o755)?;
            }
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o640)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TaskLog {
                        inner: Arc::new(TaskLogInner {
                            upid,
                            file: Mutex::new(file),
                            warnings: AtomicU64::new(0),
                        }),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => upid.starttime += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating task log {}", path.display()));
                }
            }
        }
        anyhow::bail!("could not find a free UPID for {kind}:{id}")
    }

    /// Runs `work` as a task in the background; the final line is written when it ends.
    pub fn spawn<F, Fut>(self: &Arc<Self>, log: TaskLog, work: F) -> Upid
    where
        F: FnOnce(TaskLog, StopSignal) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let upid = log.upid().clone();
        let key = upid.to_string();
        let (tx, rx) = watch::channel(false);
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), tx);
        let manager = Arc::clone(self);
        let span = tracing::info_span!("task", upid = %key);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = work(log.clone(), StopSignal(rx)).await;
                if let Err(e) = &result {
                    tracing::warn!("task failed: {e:#}");
                }
                log.finish(&result);
                manager
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                manager.ended.notify_waiters();
            },
            span,
        ));
        upid
    }

    pub fn is_running(&self, upid: &Upid) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&upid.to_string())
    }

    /// Asks a running task to stop. Returns false if it is not running.
    pub fn request_stop(&self, upid: &Upid) -> bool {
        match self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&upid.to_string())
        {
            Some(tx) => tx.send(true).is_ok(),
            None => false,
        }
    }

    /// Ends the log of a task whose process died (no final line): appends `lines` and
    /// `TASK ERROR: {error}`. Does nothing to a log that already ended or a running task.
    pub fn end_orphan(&self, upid: &Upid, lines: &[String], error: &str) -> anyhow::Result<bool> {
        if upid.node != self.node || self.is_running(upid) {
            return Ok(false);
        }
        let path = self.log_path(upid);
        let last = last_line(&path).unwrap_or_default();
        if ExitStatus::parse_last_line(&last).is_some() {
            return Ok(false);
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening task log {}", path.display()))?;
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!("TASK ERROR: {error}\n"));
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing task log {}", path.display()))?;
        Ok(true)
    }

    /// How many tasks run.
    pub fn running_count(&self) -> usize {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits until no task runs, at most `limit`; returns how many still run then.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Armed before the count is read, so a task ending in between still wakes us.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let running = self.running_count();
            if running == 0 || tokio::time::timeout_at(deadline, ended).await.is_err() {
                return self.running_count();
            }
        }
    }

    /// Asks every running task to stop; returns how many were asked.
    pub fn request_stop_all(&self) -> usize {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active.values().filter(|tx| tx.send(true).is_ok()).count()
    }

    /// Status of a task of this node, or `None` if there is no such task.
    pub fn status(&self, upid: &Upid) -> Option<TaskStatus> {
        if upid.node != self.node {
            return None;
        }
        let path = self.log_path(upid);
        let meta = std::fs::metadata(&path).ok()?;
        if self.is_running(upid) {
            return Some(TaskStatus {
                upid: upid.clone(),
                running: true,
                exit: None,
                endtime: None,
            });
        }
        let last = last_line(&path).unwrap_or_default();
        let endtime = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        Some(TaskStatus {
            upid: upid.clone(),
            running: false,
            exit: Some(ExitStatus::parse_last_line(&last).unwrap_or(ExitStatus::Unknown)),
            endtime,
        })
    }

    /// Lines `start..start+limit` of a task log (0-based line numbers) and the line total.
    pub fn read_log(
        &self,
        upid: &Upid,
        start: usize,
        limit: usize,
    ) -> Option<(Vec<(usize, String)>, usize)> {
        if upid.node != self.node {
            return None;
        }
        let file = File::open(self.log_path(upid)).ok()?;
        let mut lines = Vec::new();
        let mut total = 0;
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.unwrap_or_default();
            total += 1;
            if n >= start && lines.len() < limit {
                lines.push((n, line));
            }
        }
        Some((lines, total))
    }

    /// Every task on disk, newest first.
    pub fn list(&self) -> Vec<TaskStatus> {
        let mut out = Vec::new();
        let Ok(buckets) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for bucket in buckets.flatten() {
            let Ok(entries) = std::fs::read_dir(bucket.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(upid) = name.to_str().and_then(|n| n.parse::<Upid>().ok()) else {
                    continue;
                };
                if let Some(status) = self.status(&upid) {
                    out.push(status);
                }
            }
        }
        out.sort_by(|a, b| {
            b.upid
                .starttime
                .cmp(&a.upid.starttime)
                .then_with(|| b.upid.to_string().cmp(&a.upid.to_string()))
        });
        out
    }
}

fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().last().map(str::to_string)
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/{pid}/stat`);
/// `None` if it does not run (or is a zombie).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let mut fields = after_comm.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upid_roundtrip_and_format() {
        let s = "UPID:pve1:00113795:1557C2C4:699F82D3:qmtunnel:567:root@pam!tok:";
        let upid: Upid = s.parse().unwrap();
        assert_eq!(upid.pid, 0x113795);
        assert_eq!(upid.user, "root@pam!tok");
        assert_eq!(upid.to_string(), s);
        let json = upid.to_json();
        assert_eq!(
            (&json["user"], &json["tokenid"]),
            (&json!("root@pam"), &json!("tok"))
        );
        for bad in [
            "UPID:pve1:00113795:1557C2C4:699F82D3:qmtunnel:567:root@pam!tok",
            "UPID:pve1:zz:1557C2C4:699F82D3:qmtunnel:567:root@pam:",
            "UPID:../x:00113795:1557C2C4:699F82D3:qmtunnel:567:root@pam:",
            "UPID:pve1:00113795:1557C2C4:699F82D3:..:567:root@pam:",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn tasks_log_finish_and_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let tm = TaskManager::new("n1", dir.path()).unwrap();
        let a = tm.create("qmtunnel", "100", "root@pam!t").unwrap();
        let b = tm.create("qmtunnel", "100", "root@pam!t").unwrap();
        assert_ne!(a.upid(), b.upid());
        let upid_a = tm.spawn(a, |log, _| async move {
            log.log("hello");
            log.warn("careful");
            Ok(())
        });
        let upid_b = tm.spawn(b, |_, mut stop| async move {
            stop.requested().await;
            anyhow::bail!("received interrupt")
        });
        assert!(tm.is_running(&upid_b));
        assert!(tm.request_stop(&upid_b));
        for _ in 0..100 {
            if !tm.is_running(&upid_a) && !tm.is_running(&upid_b) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let sa = tm.status(&upid_a).unwrap();
        assert_eq!(sa.exit, Some(ExitStatus::Warnings(1)));
        let sb = tm.status(&upid_b).unwrap();
        assert_eq!(
            sb.exit,
            Some(ExitStatus::Error("received interrupt".into()))
        );
        let (lines, total) = tm.read_log(&upid_a, 0, 50).unwrap();
        assert_eq!(total, 3);
        assert_eq!(lines[2].1, "TASK WARNINGS: 1");
        assert_eq!(tm.list().len(), 2);
    }
}
