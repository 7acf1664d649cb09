//! `mtunnel replicate`: one run of a VM's replica (running or stopped) on a remote mtunnel
//! node (docs/replicas.md). The first run copies every disk; later runs copy only the
//! blocks QEMU's dirty bitmap (`mtunnel-replica-<replica id>`) marked since the last
//! completed run, or — where no bitmap can be trusted (an interrupted run, a restarted
//! QEMU, a stopped VM) — do a hash sync (`hashsync.rs`). The disks move by QEMU
//! `blockdev-backup` (and a hash sync's own NBD client) into the target's `qemu-nbd`
//! export of the working copy, through a forwarded WebSocket of the tunnel; the target
//! makes a restore point only when every write completed (`replica-commit`).
//!
//! Files: this one owns the options, the plan and the order of a run; `remote.rs` the
//! tunnel (open with `replica=1`, the `mtunnel-features` check, the commands, forwards);
//! `jobs.rs` the QMP side (bitmaps, NBD client nodes, backup jobs, the read-only export of
//! a hash sync); `hashsync.rs` the block-hash comparison. Nothing here changes the source
//! VM's config (a stopped VM's config lock is held for the run); a failed run cancels its
//! jobs, removes its NBD nodes and asks the target to clean up (which frees only the
//! run's transient things once a replica has a point); `mtunnel replicate` stopped by
//! SIGTERM or SIGINT does the same at once ([`replicate_until`]). A copy that makes no
//! progress for `--stall-timeout` (a frozen link) fails the run; its forwarded connections
//! are closed first, so QEMU's NBD requests stuck on the link fail and its jobs can end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::endpoint::{IdMap, TargetEndpoint};
use super::migrate::SourceNode;
use super::progress::{Progress, human};
use crate::guest::config as vmconf;
use crate::qemu::{self, VmHandle};

mod hashsync;
mod jobs;
mod remote;

pub use hashsync::HashFigures;
use jobs::Mode;
use remote::Remote;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    pub vmid: u32,
    pub target: TargetEndpoint,
    /// The node to replicate to, through the one answering at `target` (`None`: that one).
    pub target_node: Option<String>,
    pub storage_map: IdMap,
    /// Restore points to keep on the target (`None`: all).
    pub keep: Option<u32>,
    /// KiB/s for the backup jobs (`None`: no limit).
    pub bwlimit: Option<u64>,
}

/// What a completed run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub target_node: String,
    pub point: String,
    pub points: Vec<String>,
    pub incremental: bool,
    /// Set when the run was a hash sync: what it compared and found different.
    pub hash: Option<HashFigures>,
    /// Bytes the backup jobs copied (a full run counts every byte of every disk, zeroes
    /// included; an incremental one the dirty blocks), plus the blocks a hash sync (or a
    /// stopped VM's first run) wrote itself.
    pub copied: u64,
    /// Bytes that went through the tunnel's NBD connections (payload and NBD protocol).
    pub sent: u64,
    pub duration: Duration,
}

impl RunSummary {
    /// The line the CLI prints.
    pub fn line(&self, opts: &ReplicateOptions) -> String {
        format!(
            "replica run of VM {vmid} to {host}:{port} (node '{node}') completed in {secs:.1} s: \
             {kind}, {copied} copied ({copied_b} bytes), {sent} sent through the tunnel \
             ({sent_b} bytes); restore point '{point}' ({n} kept)",
            vmid = opts.vmid,
            host = opts.target.host,
            port = opts.target.port,
            node = self.target_node,
            secs = self.duration.as_secs_f64(),
            kind = self.kind(),
            copied = human(self.copied),
            copied_b = self.copied,
            sent = human(self.sent),
            sent_b = self.sent,
            point = self.point,
            n = self.points.len(),
        )
    }

    /// `full copy`, `incremental` or `hash sync (...)` for the summary line.
    fn kind(&self) -> String {
        match (&self.hash, self.incremental) {
            (Some(h), _) => format!(
                "hash sync ({} compared, {} differed, {} bytes of hashes received)",
                human(h.compared),
                human(h.differing),
                h.hash_bytes
            ),
            (None, true) => "incremental".into(),
            (None, false) => "full copy".into(),
        }
    }
}

/// One disk of the VM.
#[derive(Debug, Clone)]
struct Disk {
    key: String,
    volid: String,
    format: String,
    size: u64,
    target_storage: String,
}

/// The VM a run reads: its running QEMU, or a stopped VM whose config lock the run
/// holds (so nobody starts it meanwhile: `vm start` waits for the lock and gives up).
enum Subject {
    Running(VmHandle),
    Stopped { _lock: crate::guest::VmLockGuard },
}

impl Subject {
    async fn of(src: &SourceNode, vmid: u32, progress: &Progress) -> anyhow::Result<Subject> {
        let attach = || {
            VmHandle::attach(&src.cfg.run_dir, vmid)
                .map(Subject::Running)
                .context("attaching to the running VM")
        };
        if qemu::process::is_running(&src.cfg.run_dir, vmid).is_some() {
            return attach();
        }
        let guard = src
            .guests
            .lock(vmid, crate::guest::store::DEFAULT_LOCK_TIMEOUT)
            .await
            .with_context(|| format!("taking the config lock of VM {vmid} (stopped)"))?;
        // Started between the check and the lock: replicate the running VM.
        if qemu::process::is_running(&src.cfg.run_dir, vmid).is_some() {
            drop(guard);
            return attach();
        }
        src.unlocked_config(vmid)?;
        progress.log(format!(
            "VM {vmid} is stopped: its images are read with qemu-nbd, and its config lock is \
             held until the run ends (it cannot be started meanwhile)"
        ));
        Ok(Subject::Stopped { _lock: guard })
    }

    fn vm(&self) -> Option<&VmHandle> {
        match self {
            Subject::Running(vm) => Some(vm),
            Subject::Stopped { .. } => None,
        }
    }
}

/// How long a run's copy may make no progress before the run gives up, unless
/// `--stall-timeout` says otherwise: the backup jobs' stall bound and the wait for each NBD
/// request of a hash sync.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a failed or interrupted run that the target keeps says about the next one.
pub(super) const NEXT_RUN: &str =
    "the next run continues it, sending only what the target has not acknowledged";

/// Runs one replica run of a VM (running or stopped), with [`DEFAULT_STALL_TIMEOUT`].
pub async fn replicate(
    src: &SourceNode,
    opts: &ReplicateOptions,
    progress: &Progress,
) -> anyhow::Result<RunSummary> {
    let stop = std::future::pending();
    replicate_until(src, opts, DEFAULT_STALL_TIMEOUT, progress, stop).await
}

/// The first SIGTERM or SIGINT, by name, for [`replicate_until`]. The handlers are
/// installed now (call it inside the runtime, before the run): from then on neither signal
/// ends the process by itself.
pub fn termination_signals() -> anyhow::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// [`replicate`] with the stall bound `stall` (`--stall-timeout`) that stops when `stop`
/// resolves (to the signal's name): the run's work is dropped where it stands, then what
/// it added to the source QEMU is removed as after a failure
/// ([`Run::clean_up_interrupted`]), the target is asked to clean up (it ends the run as
/// cut: the replica is `interrupted`, its points intact), and the error says the next run
/// continues it. A stopped VM's `qemu-nbd -r` are killed when their work is dropped, its
/// config lock when the run returns.
pub async fn replicate_until(
    src: &SourceNode,
    opts: &ReplicateOptions,
    stall: Duration,
    progress: &Progress,
    stop: impl Future<Output = &'static str>,
) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    tokio::pin!(stop);
    let opening = async {
        let (conf_text, disks) = plan(src, opts).await?;
        let subject = Subject::of(src, opts.vmid, progress).await?;
        let remote = Remote::open(opts, &src.cfg.node, &disks, progress).await?;
        anyhow::Ok((conf_text, disks, subject, remote))
    };
    // Nothing is added to the source before the tunnel is open: dropping this is enough
    // (a tunnel opened meanwhile ends with its connection).
    let (conf_text, disks, subject, mut remote) = tokio::select! {
        opened = opening => opened?,
        signal = &mut stop => bail!(
            "replica run of VM {} interrupted ({signal}) before it started: nothing was \
             copied; the next run does it",
            opts.vmid
        ),
    };
    let run = Run {
        src,
        opts,
        progress,
        vm: subject.vm(),
        disks: &disks,
        stall,
        copied: AtomicU64::new(0),
        first: AtomicBool::new(false),
        exported: AtomicBool::new(false),
        names: std::sync::OnceLock::new(),
        fresh_bitmaps: AtomicBool::new(false),
    };
    let work = run.work(&mut remote, &conf_text);
    let result = tokio::select! {
        result = work => result,
        signal = &mut stop => {
            run.clean_up_interrupted().await;
            remote.quit_within(true, INTERRUPTED_QUIT).await;
            return Err(anyhow::anyhow!(run.interrupted(signal)));
        }
    };
    match result {
        Ok(mut summary) => {
            remote.quit(false).await;
            summary.duration = started.elapsed();
            Ok(summary)
        }
        Err(e) => {
            // What went out before the failure: the next run (a hash sync) sends the rest.
            let copied = run.copied.load(Ordering::SeqCst);
            progress.log(format!(
                "replica run failed after copying {} ({copied} bytes) toward the target{}: \
                 {e:#}",
                human(copied),
                run.kept_note()
            ));
            // A frozen link would keep the `quit` unanswered: the stall bound is the wait.
            remote.quit_within(true, stall.min(FAILED_QUIT)).await;
            Err(e)
        }
    }
}

/// How long an interrupted run waits for the target's `quit` (the connection closes
/// anyway, which the target treats the same).
const INTERRUPTED_QUIT: Duration = Duration::from_secs(10);

/// The most a failed run waits for the target's `quit`.
const FAILED_QUIT: Duration = Duration::from_secs(60);

/// One run under way: what it copies, from where.
struct Run<'a> {
    src: &'a SourceNode,
    opts: &'a ReplicateOptions,
    progress: &'a Progress,
    /// `None`: the VM is stopped.
    vm: Option<&'a VmHandle>,
    disks: &'a [Disk],
    /// `--stall-timeout`: how long the copy may make no progress.
    stall: Duration,
    /// Bytes written toward the target so far (backup jobs and hash sync writes).
    copied: AtomicU64,
    /// The run made the replica (`replica-prepare` said `first`).
    first: AtomicBool,
    /// `replica-export` succeeded (the target committed the tunnel).
    exported: AtomicBool,
    /// The names of the replica's things in the source QEMU, once `replica-prepare` told
    /// its id.
    names: std::sync::OnceLock<jobs::Names>,
    /// A hash sync is adding (or added) the replica's fresh bitmaps: they miss the writes
    /// before them, so a run that does not complete removes them.
    fresh_bitmaps: AtomicBool,
}

impl Run<'_> {
    /// The run from `replica-prepare` to the restore point; on a failure its jobs (and a
    /// failed hash sync's bitmaps and exports) are gone from the source QEMU.
    async fn work(&self, remote: &mut Remote, conf_text: &str) -> anyhow::Result<RunSummary> {
        let prepared = self.prepare(remote, conf_text).await?;
        let first = prepared["first"].as_bool() == Some(true);
        self.first.store(first, Ordering::SeqCst);
        let id = prepared
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| id.len() >= 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("replica-prepare reply without a valid id: {prepared}"))?;
        let names = self.names.get_or_init(|| jobs::Names::new(id));
        if let Some(vm) = self.vm {
            let socket = read_socket(&self.src.cfg.run_dir, self.opts.vmid, names.tag());
            jobs::clear_read(vm, self.disks, &socket, names).await;
        }
        let transferred = self.transfer(remote, &prepared, names).await;
        if let (Err(_), Some(vm)) = (&transferred, self.vm) {
            // Over a frozen link QEMU's NBD requests never end, and neither would a cancel
            // of the jobs that wait for them: closing the forwarded connections fails them.
            remote.cut_forwards();
            jobs::abort(vm, self.disks, names).await;
        }
        transferred
    }

    /// After the run's work was dropped by a signal: what a failure would have removed
    /// from the source QEMU — this replica's backup jobs and NBD client nodes, the hash
    /// sync's read-only exports and NBD server, and its fresh bitmaps (which the next run
    /// must not trust). Best effort, each step bounded by its QMP timeout.
    async fn clean_up_interrupted(&self) {
        let (Some(vm), Some(names)) = (self.vm, self.names.get()) else {
            return;
        };
        jobs::abort(vm, self.disks, names).await;
        let socket = read_socket(&self.src.cfg.run_dir, self.opts.vmid, names.tag());
        jobs::clear_read(vm, self.disks, &socket, names).await;
        if self.fresh_bitmaps.load(Ordering::SeqCst) {
            jobs::remove_bitmaps(vm, self.disks, names).await;
        }
    }

    /// The one line an interrupted run ends with.
    fn interrupted(&self, signal: &str) -> String {
        let copied = self.copied.load(Ordering::SeqCst);
        let next = if self.first.load(Ordering::SeqCst) && !self.exported.load(Ordering::SeqCst) {
            "the target kept nothing of it, the next run starts the replica anew"
        } else {
            NEXT_RUN
        };
        format!(
            "replica run of VM {} interrupted ({signal}) after copying {} ({copied} bytes) \
             toward the target; stopped cleanly (its jobs and exports removed from the source, \
             the target's run ended as cut): {next}",
            self.opts.vmid,
            human(copied)
        )
    }

    /// A hash sync's failed write toward the target, with what bounds it and what the
    /// next run does.
    fn stalled(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "the hash sync's writes to the target failed (each NBD request waits at most {} s: \
             --stall-timeout); {NEXT_RUN}",
            self.stall.as_secs()
        ))
    }

    /// For a failure line: a first run that exported committed its tunnel, so the target
    /// keeps the replica.
    fn kept_note(&self) -> String {
        if self.first.load(Ordering::SeqCst) && self.exported.load(Ordering::SeqCst) {
            format!(
                "; the target keeps an interrupted replica (no restore point yet) that the \
                 next run continues, or 'mtunnel replica drop {}' on the target frees",
                self.opts.vmid
            )
        } else {
            String::new()
        }
    }

    /// `replica-prepare`: its reply (replica id, whether incremental is possible).
    async fn prepare(&self, remote: &Remote, conf_text: &str) -> anyhow::Result<Value> {
        let disk_map: serde_json::Map<String, Value> = self
            .disks
            .iter()
            .map(|d| {
                let v = json!({"storage": d.target_storage, "format": d.format, "size": d.size});
                (d.key.clone(), v)
            })
            .collect();
        remote
            .cmd(json!({
                "cmd": "replica-prepare", "source_node": self.src.cfg.node,
                "source_vmid": self.opts.vmid, "conf": conf_text, "disks": disk_map,
            }))
            .await
            .context("preparing the replica on the target")
    }

    /// The choice of full, incremental or hash sync, the exports, the copy and the
    /// restore point.
    async fn transfer(
        &self,
        remote: &mut Remote,
        prepared: &Value,
        names: &jobs::Names,
    ) -> anyhow::Result<RunSummary> {
        let mut mode = match self.vm {
            Some(vm) => {
                jobs::choose(vm, self.disks, &names.bitmap, prepared, self.progress).await?
            }
            None => self.stopped_mode(prepared),
        };
        if mode == Mode::Hash && !remote.hashes {
            self.progress.log(format!(
                "the target (node '{}') does not offer 'replica-hashes' (an older mtunnel): \
                 a full copy instead of the hash sync - upgrade it to send only what differs",
                remote.node
            ));
            mode = Mode::Full;
        }
        let first = prepared["first"].as_bool() == Some(true);
        let mut hash = None;
        let copied = match (self.vm, mode) {
            (Some(vm), Mode::Full | Mode::Incremental) => {
                let locals = self.export(remote, names).await?;
                let spec = jobs::Backup {
                    incremental: mode == Mode::Incremental,
                    speed: self.speed(),
                    copied: &self.copied,
                    stall: self.stall,
                };
                jobs::copy(vm, self.disks, &locals, &spec, names, self.progress).await?
            }
            _ => {
                let target = match mode {
                    Mode::Hash => hashsync::Target::Ask,
                    _ if first => hashsync::Target::Zero,
                    _ => hashsync::Target::All,
                };
                let (copied, figures) = self.hash_sync(remote, names, target).await?;
                hash = (mode == Mode::Hash).then_some(figures);
                copied
            }
        };
        let sent = remote.sent_bytes().await;
        let incremental = mode == Mode::Incremental;
        let mut commit =
            json!({"cmd": "replica-commit", "bytes": copied, "incremental": incremental});
        if let Some(keep) = self.opts.keep {
            commit["keep"] = json!(keep);
        }
        let done = remote
            .cmd(commit)
            .await
            .context("making the restore point on the target")?;
        let points = done["points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(RunSummary {
            target_node: remote.node.clone(),
            point: done["point"].as_str().unwrap_or_default().to_string(),
            points,
            incremental,
            hash,
            copied,
            sent,
            duration: Duration::ZERO,
        })
    }

    fn speed(&self) -> Option<u64> {
        self.opts.bwlimit.map(|k| k.saturating_mul(1024))
    }

    /// A stopped VM has no bitmap: its first run copies every non-zero block, every
    /// later one is a hash sync (a stopped disk does not change, so it sends ~nothing).
    fn stopped_mode(&self, prepared: &Value) -> Mode {
        if prepared["first"].as_bool() == Some(true) {
            self.progress
                .log("first run of this replica: every non-zero block of the disks is copied");
            Mode::Full
        } else {
            self.progress.log(
                "a stopped VM has no dirty bitmap: hash sync (only the blocks whose hashes \
                 differ from the target's are sent)",
            );
            Mode::Hash
        }
    }

    /// `replica-export` and one forward per working copy: (local socket, export) by key.
    async fn export(
        &self,
        remote: &mut Remote,
        names: &jobs::Names,
    ) -> anyhow::Result<std::collections::BTreeMap<String, (PathBuf, String)>> {
        let exported = remote.cmd(json!({"cmd": "replica-export"})).await?;
        self.exported.store(true, Ordering::SeqCst);
        remote.forward_exports(
            &self.src.cfg.run_dir,
            self.opts.vmid,
            names.tag(),
            self.disks,
            &exported,
        )
    }
}

/// The local checks: the VM exists and is not locked; its disks and where each goes.
/// Returns the config text and the disks.
async fn plan(src: &SourceNode, opts: &ReplicateOptions) -> anyhow::Result<(String, Vec<Disk>)> {
    let vmid = opts.vmid;
    if opts.storage_map.identity {
        bail!("replication requires explicit storage mapping (--target-storage)");
    }
    let (text, conf) = src.unlocked_config(vmid)?;
    let mut disks = Vec::new();
    for (key, value) in &conf.options {
        // `unusedN` volumes are attached to nothing: no QEMU node to take a bitmap of.
        if !vmconf::is_drive_key(key) || key.starts_with("unused") {
            continue;
        }
        let props: BTreeMap<String, String> = vmconf::parse_property_string(value, Some("file"))?
            .into_iter()
            .collect();
        let Some(volid) = vmconf::drive_volume(value) else {
            continue;
        };
        if props.get("media").is_some_and(|m| m == "cdrom") {
            continue;
        }
        let (storage, _) = vmconf::parse_volume_id(&volid).with_context(|| {
            format!(
                "{key}: '{volid}' is not a storage volume (passthrough disks cannot be replicated)"
            )
        })?;
        let target_storage = opts.storage_map.map(storage).with_context(|| {
            format!("{key}: no target storage mapped for storage '{storage}' (--target-storage)")
        })?;
        disks.push(Disk {
            key: key.clone(),
            volid: volid.clone(),
            format: src.storage.volume_format(&volid).await?,
            size: src.storage.volume_size(&volid).await?,
            target_storage,
        });
    }
    if disks.is_empty() {
        bail!("VM {vmid} has no disk to replicate");
    }
    Ok((text, disks))
}

/// `{run}/{vmid}-{key}.{tag}.replica-src`: the local end of disk `key`'s NBD forward, `tag`
/// naming the replica, so runs of one VM to two targets never share a socket.
fn local_socket(run_dir: &std::path::Path, vmid: u32, tag: &str, key: &str) -> PathBuf {
    run_dir.join(format!("{vmid}-{key}.{tag}.replica-src"))
}

/// `{run}/{vmid}.{tag}.replica-read`: the source QEMU's NBD server of a hash sync of the
/// replica `tag` (one per QEMU).
fn read_socket(run_dir: &std::path::Path, vmid: u32, tag: &str) -> PathBuf {
    run_dir.join(format!("{vmid}.{tag}.replica-read"))
}
