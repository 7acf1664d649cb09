//! Processes of a benchmark run: spawning the `mtunnel` binary itself (for `serve`,
//! `tunnel` and the baseline relay) so that every measured hop is a real process, guards
//! that kill them on every exit path (drop, panic, and `PR_SET_PDEATHSIG` if the bench
//! process dies first), a sweeper for QEMU processes left in run directories, and the
//! per-process counters read from `/proc`: CPU time (user + system, all threads, dead ones
//! included) and resident memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::Context;
use tokio::process::{Child, Command};

/// The `mtunnel` binary under test: the one running this benchmark.
pub fn mtunnel_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating the mtunnel binary (current_exe)")
}

/// A command for the `mtunnel` binary whose child dies with us: `kill_on_drop` for the
/// normal paths and `PR_SET_PDEATHSIG` (SIGKILL) for a bench process that is killed.
pub fn mtunnel_command(args: &[&str], log: &Path) -> anyhow::Result<Command> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(mtunnel_exe()?);
    cmd.args(args)
        .env("MTUNNEL_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    Ok(cmd)
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(ChildGuard { child })
    }

    /// The process id (0 once it was reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Reap it now so no zombie outlives the bench step (SIGKILL is immediate).
            for _ in 0..200 {
                if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// Kills every QEMU whose pidfile lies in one of the run directories when dropped: VMs
/// started by `mtunnel vm start` or by a `serve` node outlive those processes by design.
#[derive(Default)]
pub struct QemuSweeper {
    dirs: Vec<PathBuf>,
}

impl QemuSweeper {
    pub fn watch(&mut self, run_dir: &Path) {
        self.dirs.push(run_dir.to_path_buf());
    }

    /// Kills the QEMUs found now.
    pub fn sweep(&self) {
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(vmid) = name
                    .strip_suffix(".pid")
                    .and_then(|v| v.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(pid) = mtunnel::qemu::is_running(dir, vmid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Drop for QemuSweeper {
    fn drop(&mut self) {
        self.sweep();
    }
}

pub(super) fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&t| t > 0)
            .map(|t| t as f64)
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a whole process (`pid` 0: this process), from
/// `/proc/<pid>/stat`; includes threads that already ended. Resolution: one clock tick.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |n: usize| -> anyhow::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("field {n} of {path}"))
    };
    Ok((field(14)? + field(15)?) / clock_ticks())
}

/// Machine-wide CPU seconds from the first line of `/proc/stat`: (busy, steal), where busy
/// is user + nice + system + irq + softirq over all cores and steal is time the hypervisor
/// gave to other guests. Busy time not accounted to the measured processes is load from
/// elsewhere that disturbed the measurement.
pub fn system_cpu() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0.0) / clock_ticks();
    (f(0) + f(1) + f(2) + f(5) + f(6), f(7))
}

/// CPU nanoseconds of the live threads of a process (`/proc/<pid>/task/*/schedstat`):
/// finer than [`cpu_seconds`], for short windows; threads that ended are missing.
pub fn cpu_ns_threads(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_field(pid, "VmRSS:")
}

/// Number of threads (`Threads` of `/proc/<pid>/status`).
pub fn threads(pid: u32) -> anyhow::Result<u64> {
    status_field(pid, "Threads:")
}

/// Number of open file descriptors.
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn status_field(pid: u32, key: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each counter moves with what this process does: CPU burnt, memory touched, files
    /// opened, threads started (lower bounds only: a test runner may add threads or fds of
    /// its own); `pid` 0 and this process's pid read the same process.
    #[test]
    fn counters_follow_this_process() {
        let me = std::process::id();

        // CPU: burn until the tick-based counter moved 5 ticks (at most 30 s of it).
        let (cpu0, ns0) = (cpu_seconds(0).unwrap(), cpu_ns_threads(me));
        let goal = cpu0 + 5.0 / clock_ticks();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        while cpu_seconds(0).unwrap() < goal && std::time::Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let cpu1 = cpu_seconds(0).unwrap();
        assert!(cpu1 >= goal, "CPU seconds stayed at {cpu1} (from {cpu0})");
        assert!(
            cpu_seconds(me).unwrap() >= cpu1,
            "pid {me} is not this process"
        );
        let ns1 = cpu_ns_threads(me);
        assert!(
            ns1 >= ns0 + 10_000_000,
            "live threads' CPU went from {ns0} to {ns1} ns while {cpu0} -> {cpu1} s"
        );

        // Memory: 64 MiB touched page by page is resident.
        let rss0 = rss_kib(me).unwrap();
        let mut block = vec![0u8; 64 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        let rss1 = rss_kib(me).unwrap();
        std::hint::black_box(&block);
        assert!(rss1 >= rss0 + (48 << 10), "RSS {rss0} -> {rss1} KiB");
        drop(block);

        // Files: 8 more open descriptors.
        let fds0 = open_fds(me);
        let files: Vec<std::fs::File> = (0..8)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let fds1 = open_fds(me);
        assert!(fds1 >= fds0 + 8, "open fds {fds0} -> {fds1}");
        drop(files);

        // Threads: 3 more, parked until counted.
        let threads0 = threads(me).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let parked: Vec<_> = (0..3)
            .map(|_| {
                let rx = std::sync::Arc::clone(&rx);
                std::thread::spawn(move || {
                    let _ = rx.lock().map(|r| r.recv());
                })
            })
            .collect();
        let threads1 = threads(me).unwrap();
        drop(tx);
        for t in parked {
            t.join().unwrap();
        }
        assert!(threads1 >= threads0 + 3, "threads {threads0} -> {threads1}");
    }
}
