//! QEMU process lifecycle: starting `qemu-system-x86_64` from a [`VmSpec`], telling whether a
//! VM runs ([`is_running`]: pidfile plus `/proc/<pid>/cmdline`, so a recycled pid is never taken
//! for the VM), stopping it (QMP `quit`, then SIGTERM, then SIGKILL, each with a wait) and
//! reporting how it ended.
//!
//! Decision: VMs are started with `setsid` instead of `-daemonize`. They run in their own
//! session, so they survive the mtunnel process that started them (as PVE's VMs do) and no
//! terminal signal reaches them, yet they stay our children while we live: we learn their
//! exit status, and QEMU's stdout/stderr go to `{run}/{vmid}.log` for the VM's whole life
//! (`-daemonize` would send everything after startup to /dev/null; [`remove_log`] removes
//! it once a cleanup stopped the VM for good). Readiness is "the QMP
//! handshake succeeded"; if QEMU exits first, the error carries the tail of its log. Every
//! failure after the spawn kills the process before returning. (Under systemd the service needs
//! `KillMode=process`, or VMs must be moved into their own scope, for VMs to outlive a service
//! restart: not handled here.)

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cmdline::{CmdlineError, VmPaths, VmSpec, build_command};
use super::qmp::{Qmp, QmpError};

/// The emulator binary when [`StartOptions::binary`] is not changed.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

#[derive(Debug, Error)]
pub enum ProcessError {
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("VM {vmid} is already running (pid {pid})")]
    AlreadyRunning { vmid: u32, pid: i32 },
    #[error("VM {vmid} is not running")]
    NotRunning { vmid: u32 },
    #[error("cannot start {binary}: {source}{hint}")]
    Spawn {
        binary: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("VM {vmid}: QEMU exited during startup ({status}); QEMU said: {log}")]
    StartFailed {
        vmid: u32,
        status: String,
        log: String,
    },
    #[error("VM {vmid}: QMP not ready within {secs:.0} s (QEMU killed): {last_error}; log: {log}")]
    StartTimeout {
        vmid: u32,
        secs: f64,
        last_error: String,
        log: String,
    },
    #[error(
        "VM {vmid} (pid {pid}) is still alive after SIGKILL ({secs:.0} s); check `ps -o stat -p {pid}` (uninterruptible I/O?)"
    )]
    Unkillable { vmid: u32, pid: i32, secs: f64 },
    #[error("VM {vmid}: {what} {path}: {source}")]
    File {
        vmid: u32,
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// How a VM was started.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub binary: PathBuf,
    /// From spawn to a completed QMP handshake.
    pub ready_timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            binary: PathBuf::from(QEMU_BINARY),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// Waits of [`VmHandle::stop`].
#[derive(Debug, Clone, Copy)]
pub struct StopTimeouts {
    /// After QMP `quit`.
    pub quit: Duration,
    /// After SIGTERM.
    pub term: Duration,
    /// After SIGKILL.
    pub kill: Duration,
}

impl Default for StopTimeouts {
    fn default() -> Self {
        StopTimeouts {
            quit: Duration::from_secs(10),
            term: Duration::from_secs(5),
            kill: Duration::from_secs(5),
        }
    }
}

/// What ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMethod {
    /// It was not running (any more) when asked.
    AlreadyStopped,
    Quit,
    Term,
    Kill,
}

#[derive(Debug, Clone, Copy)]
pub struct StopOutcome {
    pub method: StopMethod,
    /// Known when this process started the VM.
    pub exit: Option<ExitStatus>,
}

/// A running (or recently running) VM: its pid, its files and a cached QMP connection.
pub struct VmHandle {
    vmid: u32,
    paths: VmPaths,
    pid: i32,
    /// Exit status, fed by the task that owns the child (only when we spawned it).
    exit: Option<watch::Receiver<Option<ExitStatus>>>,
    qmp: tokio::sync::Mutex<Option<Arc<Qmp>>>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vmid", &self.vmid)
            .field("pid", &self.pid)
            .field("qmp", &self.paths.qmp)
            .finish()
    }
}

/// The pid of VM `vmid` under `run_dir` if it runs: the pidfile names a live, non-zombie
/// process whose command line carries this very `-pidfile`.
pub fn is_running(run_dir: &Path, vmid: u32) -> Option<i32> {
    let paths = VmPaths::new(run_dir, vmid);
    let text = fs::read_to_string(&paths.pid).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    (pid > 0 && pid_is_vm(pid, &paths.pid)).then_some(pid)
}

/// Removes `{run}/{vmid}.log` once the QEMU that wrote it is gone (the log of a running VM
/// stays), for callers that stopped a VM for good, e.g. a failed migration's cleanup: else
/// every failed migration leaves a log. Its last lines go to our own log first, as they
/// often say why QEMU ended.
pub fn remove_log(run_dir: &Path, vmid: u32) {
    if is_running(run_dir, vmid).is_some() {
        return;
    }
    let path = VmPaths::new(run_dir, vmid).log;
    if !path.exists() {
        return;
    }
    let tail = log_tail(&path, 0, 1024);
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(
            vmid,
            "removed QEMU log {}; it ended: {tail}",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(vmid, "removing QEMU log {}: {e}", path.display()),
    }
}

/// Whether `pid` is alive, not a zombie, and was started with `-pidfile <pidfile>`.
fn pid_is_vm(pid: i32, pidfile: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let want = pidfile.as_os_str().as_encoded_bytes();
    let mut found = false;
    while let Some(a) = args.next() {
        if a == b"-pidfile" && args.next() == Some(want) {
            found = true;
            break;
        }
    }
    found && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true; // gone
    };
    // "pid (comm) S ..." — comm may contain spaces and parentheses: take the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// Last `max` bytes of the log from `offset` on, as text (for error messages).
fn log_tail(path: &Path, offset: u64, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(max));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return format!("(cannot read {})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.trim();
    if text.is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        text.replace('\n', " | ")
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

impl VmHandle {
    /// Starts QEMU for `spec` and returns once QMP answers. On any failure the process is
    /// killed and the error says why (with QEMU's own message when it exited).
    pub async fn start(spec: &VmSpec, opts: &StartOptions) -> Result<VmHandle, ProcessError> {
        let args = build_command(spec)?;
        let vmid = spec.vmid;
        let paths = spec.paths();
        let file_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProcessError::File {
                vmid,
                what,
                path,
                source,
            }
        };
        crate::util::ensure_dir(&spec.run_dir, 0o755).map_err(|e| ProcessError::File {
            vmid,
            what: "creating run directory",
            path: spec.run_dir.clone(),
            source: io::Error::other(format!("{e:#}")),
        })?;
        if let Some(pid) = is_running(&spec.run_dir, vmid) {
            return Err(ProcessError::AlreadyRunning { vmid, pid });
        }
        // Not running: whatever sockets and pidfile remain are stale.
        for p in [&paths.qmp, &paths.qga, &paths.serial0, &paths.pid] {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(file_err("removing stale", p)(e)),
            }
        }

        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&paths.log)
            .map_err(file_err("opening log", &paths.log))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        writeln!(
            log,
            "---- mtunnel: starting VM {vmid} at unix time {now}: {} {}",
            opts.binary.display(),
            args.join(" ")
        )
        .map_err(file_err("writing log", &paths.log))?;
        let offset = log
            .metadata()
            .map(|m| m.len())
            .map_err(file_err("reading log", &paths.log))?;
        let stderr = log
            .try_clone()
            .map_err(file_err("opening log", &paths.log))?;

        let mut cmd = tokio::process::Command::new(&opts.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(false);
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent; it runs
        // in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| ProcessError::Spawn {
            binary: opts.binary.display().to_string(),
            hint: if e.kind() == io::ErrorKind::NotFound {
                " (QEMU is not installed: run .ci/install-qemu.sh as root, or install the package qemu-system-x86)"
            } else {
                ""
            },
            source: e,
        })?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            // Already reaped: it cannot have started properly.
            let status = child.wait().await.map(|s| describe(&s)).unwrap_or_default();
            return Err(ProcessError::StartFailed {
                vmid,
                status,
                log: log_tail(&paths.log, offset, 4096),
            });
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            match status {
                Ok(s) => {
                    tracing::info!(vmid, pid, status = %describe(&s), "QEMU exited");
                    let _ = exit_tx.send(Some(s));
                }
                Err(e) => tracing::warn!(vmid, pid, "waiting for QEMU failed: {e}"),
            }
        });
        tracing::info!(vmid, pid, "QEMU started");

        let handle = VmHandle {
            vmid,
            paths: paths.clone(),
            pid,
            exit: Some(exit_rx),
            qmp: tokio::sync::Mutex::new(None),
        };
        let start = Instant::now();
        let mut last_error = String::from("QMP socket not created yet");
        loop {
            if let Some(status) = handle.exit_status() {
                return Err(ProcessError::StartFailed {
                    vmid,
                    status: describe(&status),
                    log: log_tail(&paths.log, offset, 4096),
                });
            }
            if start.elapsed() >= opts.ready_timeout {
                handle.kill_now();
                let _ = handle.wait_exit(Duration::from_secs(5)).await;
                return Err(ProcessError::StartTimeout {
                    vmid,
                    secs: opts.ready_timeout.as_secs_f64(),
                    last_error,
                    log: log_tail(&paths.log, offset, 4096),
                });
            }
            match Qmp::connect_once(&paths.qmp, Duration::from_secs(5)).await {
                Ok(q) => {
                    *handle.qmp.lock().await = Some(Arc::new(q));
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::debug!(
            vmid,
            pid,
            ms = start.elapsed().as_millis() as u64,
            "QMP ready"
        );
        Ok(handle)
    }

    /// A handle on a VM started elsewhere (by another mtunnel process, or before a restart).
    pub fn attach(run_dir: &Path, vmid: u32) -> Result<VmHandle, ProcessError> {
        let pid = is_running(run_dir, vmid).ok_or(ProcessError::NotRunning { vmid })?;
        Ok(VmHandle {
            vmid,
            paths: VmPaths::new(run_dir, vmid),
            pid,
            exit: None,
            qmp: tokio::sync::Mutex::new(None),
        })
    }

    pub fn vmid(&self) -> u32 {
        self.vmid
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Whether the process still runs (and is still this VM).
    pub fn is_running(&self) -> bool {
        if self.exit_status().is_some() {
            return false;
        }
        pid_is_vm(self.pid, &self.paths.pid)
    }

    /// The exit status once the VM has exited, if this process started it.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.as_ref().and_then(|rx| *rx.borrow())
    }

    /// The VM's QMP connection, (re)connecting when there is none or it was closed.
    pub async fn qmp(&self) -> Result<Arc<Qmp>, QmpError> {
        let mut guard = self.qmp.lock().await;
        if let Some(q) = guard.as_ref()
            && !q.is_closed()
        {
            return Ok(Arc::clone(q));
        }
        let q = Arc::new(Qmp::connect(&self.paths.qmp, Duration::from_secs(5)).await?);
        *guard = Some(Arc::clone(&q));
        Ok(q)
    }

    /// Drops the cached QMP connection so another client can use the monitor.
    pub async fn release_qmp(&self) {
        self.qmp.lock().await.take();
    }

    /// Runs one QMP command on the cached connection.
    pub async fn execute(
        &self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.qmp().await?.execute(cmd, args, timeout).await
    }

    /// Hands `fd` to QEMU under `fdname` ([`Qmp::send_fd`]).
    pub async fn send_fd(
        &self,
        fdname: &str,
        fd: std::os::fd::BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        self.qmp().await?.send_fd(fdname, fd, timeout).await
    }

    /// Waits until the process is gone; returns whether it went within `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if let Some(rx) = &self.exit {
            let mut rx = rx.clone();
            if tokio::time::timeout_at(deadline, rx.wait_for(|s| s.is_some()))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return true;
            }
        }
        loop {
            if !pid_is_vm(self.pid, &self.paths.pid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the VM hard (no guest shutdown): QMP `quit`, then SIGTERM, then SIGKILL.
    pub async fn stop(&self, t: StopTimeouts) -> Result<StopOutcome, ProcessError> {
        let outcome = |method| StopOutcome {
            method,
            exit: self.exit_status(),
        };
        if !self.is_running() {
            self.release_qmp().await;
            return Ok(outcome(StopMethod::AlreadyStopped));
        }
        let cached = self
            .qmp
            .lock()
            .await
            .as_ref()
            .filter(|q| !q.is_closed())
            .cloned();
        let quit = async {
            let q = match cached {
                Some(q) => q,
                // Short greeting wait: a monitor held by another client never greets.
                None => Arc::new(Qmp::connect_once(&self.paths.qmp, Duration::from_secs(1)).await?),
            };
            q.execute("quit", Value::Null, Duration::from_secs(5)).await
        };
        let delivered = match quit.await {
            Ok(_) => true,
            // `quit` may close the connection before the reply arrives.
            Err(e) if e.is_closed() => true,
            Err(e) => {
                tracing::warn!(vmid = self.vmid, "QMP quit failed: {e}");
                false
            }
        };
        self.release_qmp().await;
        if delivered && self.wait_exit(t.quit).await {
            return Ok(outcome(StopMethod::Quit));
        }
        tracing::warn!(vmid = self.vmid, pid = self.pid, "VM did not quit: SIGTERM");
        self.signal(Signal::SIGTERM);
        if self.wait_exit(t.term).await {
            return Ok(outcome(StopMethod::Term));
        }
        tracing::warn!(
            vmid = self.vmid,
            pid = self.pid,
            "VM ignored SIGTERM: SIGKILL"
        );
        self.signal(Signal::SIGKILL);
        if self.wait_exit(t.kill).await {
            return Ok(outcome(StopMethod::Kill));
        }
        Err(ProcessError::Unkillable {
            vmid: self.vmid,
            pid: self.pid,
            secs: t.kill.as_secs_f64(),
        })
    }

    /// SIGKILL right now, without waiting (cleanup paths, Drop).
    pub fn kill_now(&self) {
        self.signal(Signal::SIGKILL);
    }

    fn signal(&self, sig: Signal) {
        // Only signal a pid that is still this VM (a recycled pid must not be hit).
        if self.exit_status().is_none()
            && pid_is_vm(self.pid, &self.paths.pid)
            && let Err(e) = kill(Pid::from_raw(self.pid), sig)
        {
            tracing::debug!(vmid = self.vmid, pid = self.pid, "kill({sig}) failed: {e}");
        }
    }
}

/// For tests and failure paths: owns a [`VmHandle`] and SIGKILLs the VM when dropped.
pub struct VmGuard(Option<VmHandle>);

impl VmGuard {
    pub fn new(vm: VmHandle) -> Self {
        VmGuard(Some(vm))
    }

    /// Gives the handle back without killing the VM.
    pub fn disarm(mut self) -> VmHandle {
        // The Option is only None after disarm/drop.
        self.0
            .take()
            .expect("VmGuard holds a handle until disarmed")
    }
}

impl std::ops::Deref for VmGuard {
    type Target = VmHandle;
    fn deref(&self) -> &VmHandle {
        self.0
            .as_ref()
            .expect("VmGuard holds a handle until disarmed")
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        let Some(vm) = self.0.take() else { return };
        if vm.is_running() {
            tracing::debug!(vmid = vm.vmid, pid = vm.pid, "VmGuard: killing VM");
            vm.kill_now();
            // Wait (briefly, synchronously: Drop cannot await) until it is dead; a zombie
            // counts as dead and is reaped by the task that owns the child.
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while pid_is_vm(vm.pid, &vm.paths.pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
