//! The QMP side of a replica run on the source VM: whether its dirty bitmaps allow an
//! incremental run, one NBD client node per disk (`replica-<key>`, connected to the local
//! end of the forward), one `transaction` that starts every backup job (and, for a full
//! run, adds the bitmap that the next run copies from: persistent in a qcow2 image, kept
//! in the running QEMU for raw), waiting for the jobs, and taking it all down again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Disk;
use crate::client::progress::{Progress, human};
use crate::qemu::VmHandle;

const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The names of one replica's things in the source QEMU: its dirty bitmap and, per disk,
/// its NBD client node and backup job (`replica-<first 8 digits of its id>-<key>`, under
/// QEMU's 31-character node names), so runs of one VM to two targets never touch each
/// other's.
pub(super) struct Names {
    pub bitmap: String,
    prefix: String,
}

impl Names {
    pub fn new(replica_id: &str) -> Self {
        Names {
            bitmap: format!("mtunnel-replica-{replica_id}"),
            prefix: format!("replica-{}-", &replica_id[..8.min(replica_id.len())]),
        }
    }

    pub fn of(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The replica's short tag (the first 8 digits of its id), for names outside QEMU.
    pub fn tag(&self) -> &str {
        self.prefix
            .trim_start_matches("replica-")
            .trim_end_matches('-')
    }
}

/// How the jobs copy.
pub(super) struct Backup<'a> {
    pub incremental: bool,
    /// Bytes/s per job.
    pub speed: Option<u64>,
    /// Where the jobs' progress is kept while they run (a failed run reports it).
    pub copied: &'a AtomicU64,
    /// How long the jobs may make no progress before the run gives up (`--stall-timeout`).
    pub stall: Duration,
}

async fn qmp(vm: &VmHandle, cmd: &str, args: Value) -> anyhow::Result<Value> {
    vm.execute(cmd, args, QMP_TIMEOUT)
        .await
        .with_context(|| format!("QMP '{cmd}' on VM {}", vm.vmid()))
}

/// The dirty bitmap `name` of drive `key` (`query-block`), if the drive has one.
async fn bitmap_of(vm: &VmHandle, key: &str, name: &str) -> anyhow::Result<Option<Value>> {
    let blocks = qmp(vm, "query-block", Value::Null).await?;
    // The drives are `-blockdev` pairs: the device's backend is anonymous, its root is
    // the format node `drive-<key>`.
    let node = format!("drive-{key}");
    let block = blocks
        .as_array()
        .and_then(|a| a.iter().find(|b| b["inserted"]["node-name"] == json!(node)))
        .with_context(|| format!("VM {} has no drive with node '{node}'", vm.vmid()))?;
    Ok(block["inserted"]["dirty-bitmaps"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == json!(name)))
        .cloned())
}

/// How a run copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every disk (`blockdev-backup sync=full`, or a stopped VM's non-zero blocks).
    Full,
    /// What the replica's dirty bitmap marked since the last run.
    Incremental,
    /// A block-hash comparison with the target's working copies (`hashsync.rs`).
    Hash,
}

/// How a run of a running VM copies, and why: incremental when the target's last run
/// completed and every disk still has a consistent, recording bitmap of this replica;
/// full on a first run; a hash sync otherwise (the working copies hold data, no bitmap
/// can be trusted). For a full run or a hash sync, bitmaps of this replica left from
/// before are removed (the run adds them anew).
pub(super) async fn choose(
    vm: &VmHandle,
    disks: &[Disk],
    bitmap: &str,
    prepared: &Value,
    progress: &Progress,
) -> anyhow::Result<Mode> {
    let target_ok = prepared["incremental_ok"].as_bool() == Some(true);
    let mut missing = Vec::new();
    let mut found = Vec::new();
    for d in disks {
        match bitmap_of(vm, &d.key, bitmap).await? {
            Some(b)
                if b["recording"] != json!(false)
                    && b["inconsistent"] != json!(true)
                    && b["busy"] != json!(true) =>
            {
                found.push(d.key.clone())
            }
            Some(_) => {
                found.push(d.key.clone());
                missing.push(d.key.clone());
            }
            None => missing.push(d.key.clone()),
        }
    }
    if target_ok && missing.is_empty() {
        progress.log(format!(
            "incremental run: copying what bitmap '{bitmap}' marked since the last run"
        ));
        return Ok(Mode::Incremental);
    }
    let mode = if prepared["first"].as_bool() == Some(true) {
        progress.log("first run of this replica: this run copies every disk in full");
        Mode::Full
    } else {
        let why = if !target_ok {
            "the replica's last run did not complete".to_string()
        } else {
            format!(
                "no usable dirty bitmap '{bitmap}' on {} (QEMU restarted since the last run?)",
                missing.join(", ")
            )
        };
        progress.log(format!(
            "{why}: hash sync (only the blocks whose hashes differ from the target's are sent)"
        ));
        Mode::Hash
    };
    for key in found {
        qmp(
            vm,
            "block-dirty-bitmap-remove",
            json!({"node": format!("drive-{key}"), "name": bitmap}),
        )
        .await?;
    }
    Ok(mode)
}

/// The anchor of a hash sync: the replica's bitmap, fresh, on every disk in one
/// transaction. It records every guest write from now on, so whatever the comparison
/// reads a block before or after such a write, the incremental backup that ends the run
/// copies the block again as of that backup's start.
pub(super) async fn add_bitmaps(
    vm: &VmHandle,
    disks: &[Disk],
    names: &Names,
) -> anyhow::Result<()> {
    let actions: Vec<Value> = disks
        .iter()
        .map(|d| {
            json!({"type": "block-dirty-bitmap-add",
                   "data": {"node": format!("drive-{}", d.key), "name": names.bitmap,
                            "persistent": d.format == "qcow2"}})
        })
        .collect();
    qmp(vm, "transaction", json!({ "actions": actions }))
        .await
        .context("adding the replica's dirty bitmaps")?;
    Ok(())
}

/// Removes the replica's bitmaps from every disk that has one (best effort: after a
/// failed hash sync, whose fresh bitmaps would miss the writes before them).
pub(super) async fn remove_bitmaps(vm: &VmHandle, disks: &[Disk], names: &Names) {
    for d in disks {
        let args = json!({"node": format!("drive-{}", d.key), "name": names.bitmap});
        match vm
            .execute("block-dirty-bitmap-remove", args, QMP_TIMEOUT)
            .await
        {
            Ok(_) => tracing::info!(
                vmid = vm.vmid(),
                "{}: removed bitmap {}",
                d.key,
                names.bitmap
            ),
            Err(e) => tracing::warn!(
                vmid = vm.vmid(),
                "{}: removing bitmap {} after the failed run: {e}",
                d.key,
                names.bitmap
            ),
        }
    }
}

/// The QEMU's NBD server on `socket`, exporting every disk read-only as `drive-<key>`
/// (a hash sync reads the live disks through it). A server left on `socket` by a run of
/// this replica that died is stopped first; any other is not touched (the start fails).
pub(super) async fn export_read(
    vm: &VmHandle,
    disks: &[Disk],
    socket: &std::path::Path,
    names: &Names,
) -> anyhow::Result<()> {
    clear_read(vm, disks, socket, names).await;
    // `nbd-server-start` takes the legacy socket address form (`data` wraps it).
    let addr = json!({"type": "unix", "data": {"path": socket.display().to_string()}});
    qmp(vm, "nbd-server-start", json!({ "addr": addr }))
        .await
        .context("starting the source QEMU's NBD server (does another run or job use it?)")?;
    for d in disks {
        let added = qmp(
            vm,
            "block-export-add",
            json!({"type": "nbd", "id": names.of(&d.key), "node-name": format!("drive-{}", d.key),
                   "name": format!("drive-{}", d.key), "writable": false}),
        )
        .await;
        if let Err(e) = added {
            stop_read(vm, socket).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Removes what a run of this replica killed during its hash sync left in the QEMU: its
/// read-only exports (by their ids, this replica's own) and, when the socket that run
/// started the server on is still there, that server (ours: nobody else uses the path)
/// and the socket file. Done at the start of every run of a running VM.
pub(super) async fn clear_read(
    vm: &VmHandle,
    disks: &[Disk],
    socket: &std::path::Path,
    names: &Names,
) {
    for d in disks {
        let id = json!({"id": names.of(&d.key)});
        if vm
            .execute("block-export-del", id, QMP_TIMEOUT)
            .await
            .is_ok()
        {
            tracing::info!(
                vmid = vm.vmid(),
                "removed the leftover export {}",
                names.of(&d.key)
            );
        }
    }
    if socket.exists() {
        stop_read(vm, socket).await;
    }
}

/// Stops the QEMU's NBD server of [`export_read`] (with its exports).
pub(super) async fn stop_read(vm: &VmHandle, socket: &std::path::Path) {
    if let Err(e) = vm
        .execute("nbd-server-stop", Value::Null, QMP_TIMEOUT)
        .await
    {
        tracing::warn!(
            vmid = vm.vmid(),
            "stopping the NBD server of the hash sync: {e}"
        );
    }
    let _ = std::fs::remove_file(socket);
}

/// Adds the NBD client nodes, starts every job in one transaction and waits for all of
/// them; returns the bytes they copied. The nodes and jobs are gone afterwards.
pub(super) async fn copy(
    vm: &VmHandle,
    disks: &[Disk],
    locals: &BTreeMap<String, (PathBuf, String)>,
    spec: &Backup<'_>,
    names: &Names,
    progress: &Progress,
) -> anyhow::Result<u64> {
    abort(vm, disks, names).await;
    let mut actions = Vec::new();
    for d in disks {
        let (socket, export) = locals.get(&d.key).context("no forward for a disk")?;
        qmp(
            vm,
            "blockdev-add",
            json!({"driver": "nbd", "node-name": names.of(&d.key),
                   "server": {"type": "unix", "path": socket.display().to_string()},
                   "export": export}),
        )
        .await
        .with_context(|| format!("connecting {} to the target's working copy", d.key))?;
        let device = format!("drive-{}", d.key);
        let mut backup = json!({
            "job-id": names.of(&d.key), "device": device,
            "target": names.of(&d.key), "auto-dismiss": false,
        });
        if spec.incremental {
            backup["sync"] = json!("incremental");
            backup["bitmap"] = json!(names.bitmap);
        } else {
            backup["sync"] = json!("full");
            let persistent = d.format == "qcow2";
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": device, "name": names.bitmap, "persistent": persistent}}));
        }
        if let Some(speed) = spec.speed {
            backup["speed"] = json!(speed);
        }
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
    }
    qmp(vm, "transaction", json!({ "actions": actions }))
        .await
        .context("starting the backup jobs")?;
    let copied = wait_jobs(vm, disks, (names, spec), progress).await?;
    take_down(vm, disks, names).await;
    Ok(copied)
}

/// Waits until every job concluded; fails on a job's error or when no job moved for
/// `spec.stall`. Returns the bytes copied.
async fn wait_jobs(
    vm: &VmHandle,
    disks: &[Disk],
    (names, spec): (&Names, &Backup<'_>),
    progress: &Progress,
) -> anyhow::Result<u64> {
    let copied = spec.copied;
    let before = copied.load(Ordering::SeqCst);
    let ids: Vec<String> = disks.iter().map(|d| names.of(&d.key)).collect();
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    let mut logged = Instant::now();
    loop {
        let jobs = qmp(vm, "query-jobs", Value::Null).await?;
        let ours: Vec<&Value> = jobs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|j| ids.iter().any(|id| j["id"] == json!(id)))
                    .collect()
            })
            .unwrap_or_default();
        if ours.len() != ids.len() {
            bail!("a backup job of the run vanished: {jobs}");
        }
        let done: u64 = ours
            .iter()
            .filter_map(|j| j["current-progress"].as_u64())
            .sum();
        let total: u64 = ours
            .iter()
            .filter_map(|j| j["total-progress"].as_u64())
            .sum();
        copied.store(before + done, Ordering::SeqCst);
        if let Some(failed) = ours.iter().find(|j| j["error"].is_string()) {
            bail!("backup job {} failed: {}", failed["id"], failed["error"]);
        }
        if ours.iter().all(|j| j["status"] == json!("concluded")) {
            progress.log(format!(
                "backup jobs done: {} copied in {:.1} s",
                human(done),
                started.elapsed().as_secs_f64()
            ));
            return Ok(done);
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > spec.stall {
            bail!(
                "the backup jobs made no progress for {} s (--stall-timeout): the link to \
                 the target is probably frozen; {}",
                spec.stall.as_secs(),
                super::NEXT_RUN
            );
        }
        if logged.elapsed() > Duration::from_secs(5) {
            progress.log(format!("disks: {} of {}", human(done), human(total)));
            logged = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dismisses the run's concluded jobs and removes its NBD client nodes (which closes the
/// connections, so the target's NBD servers end).
async fn take_down(vm: &VmHandle, disks: &[Disk], names: &Names) {
    for d in disks {
        let id = names.of(&d.key);
        let _ = vm
            .execute("job-dismiss", json!({ "id": id }), QMP_TIMEOUT)
            .await;
        let _ = vm
            .execute("blockdev-del", json!({ "node-name": id }), QMP_TIMEOUT)
            .await;
    }
}

/// Cancels this replica's jobs (also ones an earlier, failed run left) and takes them
/// down; another replica's are left alone.
pub(super) async fn abort(vm: &VmHandle, disks: &[Disk], names: &Names) {
    if let Err(e) = vm.clear_jobs(&names.prefix, Duration::from_secs(10)).await {
        tracing::warn!(vmid = vm.vmid(), "cancelling the replica jobs: {e}");
    }
    take_down(vm, disks, names).await;
}
