//! The QMP side of a replica run on the source VM: whether its dirty bitmaps allow an
//! incremental run, one NBD client node per disk (`replica-<key>`, connected to the local
//! end of the forward), one `transaction` that starts every backup job (and, for a full
//! run, adds the bitmap that the next run copies from: persistent in a qcow2 image, kept
//! in the running QEMU for raw), waiting for the jobs, and taking it all down again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Disk;
use crate::client::progress::{Progress, human};
use crate::qemu::VmHandle;

/// How long the backup jobs may make no progress before the run gives up.
const STALL: Duration = Duration::from_secs(60);
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

    fn of(&self, key: &str) -> String {
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
pub(super) struct Backup {
    pub incremental: bool,
    /// Bytes/s per job.
    pub speed: Option<u64>,
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

/// Whether this run may be incremental: the target's last run completed and every disk
/// still has a consistent, recording bitmap of this replica. For a full run, bitmaps of
/// this replica left from before are removed (the run adds them anew).
pub(super) async fn choose_incremental(
    vm: &VmHandle,
    disks: &[Disk],
    bitmap: &str,
    prepared: &Value,
    progress: &Progress,
) -> anyhow::Result<bool> {
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
    let incremental = target_ok && missing.is_empty();
    if !incremental {
        let why = if prepared["first"].as_bool() == Some(true) {
            "first run of this replica".to_string()
        } else if !target_ok {
            "the replica's last run did not complete (or it has no point yet)".to_string()
        } else {
            format!(
                "no usable dirty bitmap '{bitmap}' on {} (QEMU restarted since the last run?); \
                 the block-hash fallback is not built yet",
                missing.join(", ")
            )
        };
        progress.log(format!("{why}: this run copies every disk in full"));
        for key in found {
            qmp(
                vm,
                "block-dirty-bitmap-remove",
                json!({"node": format!("drive-{key}"), "name": bitmap}),
            )
            .await?;
        }
    } else {
        progress.log(format!(
            "incremental run: copying what bitmap '{bitmap}' marked since the last run"
        ));
    }
    Ok(incremental)
}

/// Adds the NBD client nodes, starts every job in one transaction and waits for all of
/// them; returns the bytes they copied. The nodes and jobs are gone afterwards.
pub(super) async fn copy(
    vm: &VmHandle,
    disks: &[Disk],
    locals: &BTreeMap<String, (PathBuf, String)>,
    spec: &Backup,
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
    let copied = wait_jobs(vm, disks, names, progress).await?;
    take_down(vm, disks, names).await;
    Ok(copied)
}

/// Waits until every job concluded; fails on a job's error or when no job moved for
/// [`STALL`]. Returns the bytes copied.
async fn wait_jobs(
    vm: &VmHandle,
    disks: &[Disk],
    names: &Names,
    progress: &Progress,
) -> anyhow::Result<u64> {
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
        } else if last.1.elapsed() > STALL {
            bail!(
                "the backup jobs made no progress for {} s (link frozen?)",
                STALL.as_secs()
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
