//! The NBD servers of a replica run: one `qemu-nbd` per disk, exporting the disk's working
//! copy as `drive-<key>` on `{run}/{vmid}-<key>.replica`, with its pid in
//! `{run}/{vmid}-<key>.replica.pid`. Everything about them is derived from the run dir
//! and the VMID, never from a journal's text, so [`stop_servers`] — called when a run
//! commits, when its tunnel ends, and by recovery after a crash of `serve` — finds exactly
//! them. A server exits by itself once its last client (the source's backup job, or its
//! own NBD client of a hash sync, through the tunnel) disconnects. `replica-hashes` reads
//! a working copy through a read-only server on the same socket, so the same cleanup
//! finds it too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

/// `{run}/{vmid}-{key}.replica`: the socket of disk `key`'s NBD server.
pub fn nbd_socket(run_dir: &Path, vmid: u32, key: &str) -> PathBuf {
    run_dir.join(format!("{vmid}-{key}.replica"))
}

fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// How long a new server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a server serves its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A run's export: writable, at most two clients at once (a hash sync's own NBD
    /// client and QEMU's backup job, which connects before the first one leaves).
    Write,
    /// `replica-hashes`: read-only, one client.
    Read,
}

/// Starts the NBD server of disk `key` over the image `file` (`format`); returns its
/// socket once it listens. A server left on the socket (an earlier run) is stopped first.
pub async fn start_nbd(
    run_dir: &Path,
    vmid: u32,
    key: &str,
    image: (&Path, &str),
    access: Access,
) -> anyhow::Result<PathBuf> {
    let (file, format) = image;
    let socket = nbd_socket(run_dir, vmid, key);
    stop_one(&socket).await;
    let pid_path = pid_file(&socket);
    let mut child = tokio::process::Command::new("qemu-nbd")
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--pid-file={}", pid_path.display()))
        .arg(format!("--export-name=drive-{key}"))
        .arg(format!("--format={format}"))
        .args(["--cache=none", "--aio=threads"])
        .args(match access {
            Access::Write => ["--discard=unmap", "--shared=2"],
            Access::Read => ["--read-only", "--shared=1"],
        })
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting qemu-nbd (install qemu-utils)")?;
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    loop {
        if socket.exists() && pid_path.exists() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = stderr.read_to_string(&mut err).await;
            }
            bail!(
                "qemu-nbd for {key} ({}) exited ({status}): {}",
                file.display(),
                err.trim()
            );
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            bail!(
                "qemu-nbd for {key} did not listen on {} within 10 s",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reaped when it exits (after its client disconnects, or when stopped).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(socket)
}

/// Whether `pid` is the `qemu-nbd` serving `socket` (not a reused pid).
fn is_server_of(pid: i32, socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let text = String::from_utf8_lossy(&cmdline);
    let mut args = text.split('\0');
    args.next().is_some_and(|a| a.ends_with("qemu-nbd"))
        && args.any(|a| a == format!("--socket={}", socket.display()))
}

/// `<socket>.pid`: where a `qemu-nbd` on `socket` keeps its pid.
pub fn pid_path(socket: &Path) -> PathBuf {
    pid_file(socket)
}

/// Stops the server on `socket` if one runs (TERM, then KILL after 5 s) and removes its
/// socket and pid file. Returns whether a server was stopped. Only a `qemu-nbd` whose
/// command line names `socket` is signalled (the pid file may be stale).
pub async fn stop_one(socket: &Path) -> bool {
    let pid_path = pid_file(socket);
    let pid = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let mut stopped = false;
    if let Some(pid) = pid.filter(|&p| p > 1 && is_server_of(p, socket)) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGTERM);
        for i in 0..100 {
            if !is_server_of(pid.as_raw(), socket) {
                break;
            }
            if i == 99 {
                let _ = kill(pid, Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stopped = true;
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&pid_path);
    stopped
}

/// Stops every NBD server of VM `vmid`'s replica runs and removes their files; one line
/// per server stopped.
pub async fn stop_servers(run_dir: &Path, vmid: u32) -> Vec<String> {
    let prefix = format!("{vmid}-");
    let mut sockets = Vec::new();
    if let Ok(entries) = std::fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = name.strip_prefix(&prefix).and_then(|r| {
                r.strip_suffix(".replica")
                    .or(r.strip_suffix(".replica.pid"))
            });
            if key.is_some_and(crate::guest::config::is_drive_key) {
                let socket = nbd_socket(run_dir, vmid, key.unwrap_or_default());
                if !sockets.contains(&socket) {
                    sockets.push(socket);
                }
            }
        }
    }
    let mut lines = Vec::new();
    for socket in sockets {
        if stop_one(&socket).await {
            lines.push(format!(
                "stopped the replica NBD server on {}",
                socket.display()
            ));
        }
    }
    lines
}

/// Waits (at most `wait`) for the server on `socket` to exit by itself (its client is
/// gone), then stops it; whether it had ended by itself (or was gone already).
pub async fn wait_exit(socket: &Path, wait: Duration) -> bool {
    let pid = std::fs::read_to_string(pid_file(socket))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    // No pid file: no server is left to wait for.
    let mut ended = pid.is_none();
    if let Some(pid) = pid {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !is_server_of(pid, socket) {
                ended = true;
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop_one(socket).await;
    ended
}

/// Whether an NBD server of VM `vmid`'s replica runs (a run is under way).
pub fn run_alive(run_dir: &Path, vmid: u32) -> bool {
    let prefix = format!("{vmid}-");
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(key) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".replica.pid"))
        else {
            return false;
        };
        let socket = nbd_socket(run_dir, vmid, key);
        std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .is_some_and(|pid| is_server_of(pid, &socket))
    })
}
