//! The cutover of a migration to a node that holds a current replica of the VM
//! (docs/replicas.md, "Cut over"): the disks are not copied again, only what changed
//! since the replica's last run. First one replica run (`client::replicate`) brings the
//! replica up to date; then the migration's tunnel (opened with `replica=1`) takes the
//! replica over (`replica-cutover`: the target VM runs on the working copies) and the RAM
//! moves as in any live migration. The last delta:
//!
//! - online: QEMU's `pause-before-switchover` stops the migration once the guest is
//!   stopped and the RAM sent; `blockdev-backup sync=bitmap` then copies the blocks the
//!   replica's dirty bitmap marked since that run into the target's NBD exports, and
//!   `migrate-continue` lets QEMU switch over;
//! - `--final-sync`: the guest is paused before that replica run, which then is the last
//!   delta; the RAM of the paused guest follows.
//!
//! The downtime (source guest stopped → VM running on the target) is measured here.
//!
//! A stopped VM cuts over offline: that one replica run (a hash sync of its images, read
//! under its config lock) is the last delta; `replica-cutover` then `unlock` make the
//! replica the VM, and the source ends as after any offline migration. No guest ran, so
//! there is no downtime.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::{MigrateOptions, Migration, Plan, SourceNode, postcopy};
use crate::client::progress::{Progress, human};
use crate::client::replicate::{ReplicateOptions, replicate};
use crate::qemu::VmHandle;

/// QEMU's migration capability that makes the last delta possible while the guest is
/// stopped (QEMU 2.11 and later).
pub(super) const PAUSE_CAPABILITY: &str = "pause-before-switchover";

/// A migration onto the target's replica of the VM.
pub(super) struct Cutover {
    /// `--final-sync`: the guest was paused before the last replica run.
    pub(super) final_sync: bool,
    /// When the source guest stopped (`--final-sync`: paused; online: seen in
    /// `pre-switchover`).
    pub(super) stopped_at: Option<Instant>,
    /// The replica's dirty bitmap on each source disk (`mtunnel-replica-<id>`), from
    /// `replica-cutover`.
    pub(super) bitmap: String,
    /// Each disk's local NBD URI of the target's export (online: the last delta's target).
    pub(super) exports: Vec<(String, String)>,
    /// The restore point the replica run before the migration made.
    pub(super) point: String,
    pub(super) figures: Figures,
}

/// What the cutover moved and how long the guest was stopped.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Bytes the replica run right before the migration sent through its tunnel.
    pub refresh_sent: u64,
    /// Bytes the last delta's backup jobs copied (online; 0 with `--final-sync`).
    pub delta_copied: u64,
    /// Bytes of block hashes the replica run received (a hash sync; else 0).
    pub hashes_received: u64,
    /// Source guest stopped → VM running on the target.
    pub downtime_ms: Option<u64>,
    /// The VM was stopped: an offline cutover, without downtime.
    pub stopped_vm: bool,
}

impl Figures {
    /// The end of the migration's summary line.
    pub fn summary(&self) -> String {
        if self.stopped_vm {
            return format!(
                "; cut over to the replica: {} bytes of disks (replica run {} bytes sent, {} \
                 bytes of hashes received), no downtime (the VM was stopped)",
                self.refresh_sent, self.refresh_sent, self.hashes_received
            );
        }
        format!(
            "; cut over to the replica: {} bytes of disks (replica run {} bytes sent, last \
             delta {} bytes copied), cutover downtime {} ms",
            self.refresh_sent + self.delta_copied,
            self.refresh_sent,
            self.delta_copied,
            self.downtime_ms
                .map_or_else(|| "?".to_string(), |ms| ms.to_string()),
        )
    }
}

impl Cutover {
    /// The checks a cutover needs before anything happens, then (`--final-sync`: with the
    /// guest paused) one replica run onto `node` (the replica's). A failed run leaves the
    /// guest running (a stopped VM: stopped and unlocked).
    pub(super) async fn prepare(
        src: &SourceNode,
        opts: &MigrateOptions,
        plan: &Plan,
        node: &str,
        progress: &Progress,
    ) -> anyhow::Result<Cutover> {
        if let Some(v) = plan.volumes.iter().find(|v| v.key.starts_with("unused")) {
            bail!(
                "{}: '{}' is not replicated (a replica holds the VM's attached disks only): \
                 remove it, or migrate with --no-replica after dropping the replica on the \
                 target",
                v.key,
                v.volid
            );
        }
        let mut cutover = Cutover {
            final_sync: opts.final_sync,
            stopped_at: None,
            bitmap: String::new(),
            exports: Vec::new(),
            point: String::new(),
            figures: Figures {
                stopped_vm: !plan.running,
                ..Figures::default()
            },
        };
        if !plan.running {
            progress.log(format!(
                "cutover: VM {} is stopped: an offline cutover, its replica run is the last \
                 delta",
                opts.vmid
            ));
            cutover
                .refresh(src, opts, node, progress)
                .await
                .with_context(|| {
                    format!(
                        "VM {} stays stopped and unlocked, nothing was cut over - migrate \
                         again once the cause is fixed (the next replica run sends only what \
                         differs)",
                        opts.vmid
                    )
                })?;
            return Ok(cutover);
        }
        cutover.prepare_running(src, opts, node, progress).await?;
        Ok(cutover)
    }

    /// The running VM's part of [`Cutover::prepare`]: the capability a live last delta
    /// needs, the pause of `--final-sync`, the replica run.
    async fn prepare_running(
        &mut self,
        src: &SourceNode,
        opts: &MigrateOptions,
        node: &str,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let vmid = opts.vmid;
        let vm = VmHandle::attach(&src.cfg.run_dir, vmid)
            .context("attaching to the running source VM")?;
        if !opts.final_sync && !has_capability(&vm, PAUSE_CAPABILITY).await? {
            bail!(
                "the source's QEMU does not offer the migration capability \
                 '{PAUSE_CAPABILITY}', which a live cutover needs for the last delta: \
                 use --final-sync (the guest pauses for the last replica run and the RAM)"
            );
        }
        if opts.final_sync {
            vm.execute("stop", Value::Null, Duration::from_secs(10))
                .await
                .context("pausing the source VM for the final sync")?;
            self.stopped_at = Some(Instant::now());
            progress.log(format!(
                "cutover: VM {vmid} paused for the final sync (downtime starts)"
            ));
        }
        // QEMU serves one QMP client at a time: the replica run attaches its own.
        vm.release_qmp().await;
        if let Err(e) = self.refresh(src, opts, node, progress).await {
            self.resume_source(src, vmid, progress).await;
            return Err(e);
        }
        Ok(())
    }

    /// One replica run onto `node`: the replica holds the VM as of now (or as of the pause).
    async fn refresh(
        &mut self,
        src: &SourceNode,
        opts: &MigrateOptions,
        node: &str,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        progress.log(format!(
            "cutover: the target holds a replica of VM {}: bringing it up to date",
            opts.vmid
        ));
        let ropts = ReplicateOptions {
            vmid: opts.vmid,
            target: opts.target.clone(),
            target_node: Some(node.to_string()),
            storage_map: opts.storage_map.clone(),
            keep: None,
            bwlimit: opts.bwlimit,
        };
        let run = replicate(src, &ropts, progress)
            .await
            .context("the replica run before the cutover failed")?;
        progress.log(run.line(&ropts));
        // A hash sync (a stopped VM, a lost bitmap) sends only what differs too.
        if !run.incremental && run.hash.is_none() {
            progress.log(
                "WARN: cutover: that replica run was a full copy (see above why), not only what changed",
            );
        }
        self.figures.refresh_sent = run.sent;
        self.figures.hashes_received = run.hash.as_ref().map_or(0, |h| h.hash_bytes);
        self.point = run.point;
        Ok(())
    }

    /// `e`, a failure of the migration before the switch, with what to do when the VM
    /// was stopped (an offline cutover: the source is as it was, stopped and unlocked).
    pub(super) fn failed(&self, e: anyhow::Error, src: &SourceNode, vmid: u32) -> anyhow::Error {
        // Started meanwhile (refused by `take_over_replica`): its own error says so.
        let started = crate::qemu::process::is_running(&src.cfg.run_dir, vmid).is_some();
        if !self.figures.stopped_vm || started {
            return e;
        }
        e.context(format!(
            "the offline cutover of VM {vmid} failed before the switch: VM {vmid} stays \
             stopped and unlocked here, and the replica keeps its newest restore point '{}' \
             - migrate again (its replica run sends only what differs), or start the VM here",
            self.point
        ))
    }

    /// Runs the guest paused by `--final-sync` again (a failed cutover before the RAM
    /// completed: the source VM is still the live one).
    pub(super) async fn resume_source(&self, src: &SourceNode, vmid: u32, progress: &Progress) {
        if self.stopped_at.is_none() || !self.final_sync {
            return;
        }
        let resumed = match VmHandle::attach(&src.cfg.run_dir, vmid) {
            Ok(vm) => match vm.status().await {
                Ok(st) if st.running => Ok(()),
                _ => vm.resume().await.map_err(anyhow::Error::from),
            },
            Err(e) => Err(e.into()),
        };
        match resumed {
            Ok(()) => progress.log(format!("source VM {vmid} runs on")),
            Err(e) => progress.log(format!(
                "WARN: resuming the paused source VM {vmid} failed ({e:#}): resume it by hand \
                 (QMP 'cont')"
            )),
        }
    }

    /// The downtime once the target runs the VM, logged.
    pub(super) fn resumed(&mut self, progress: &Progress) {
        let Some(at) = self.stopped_at else {
            return;
        };
        let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.figures.downtime_ms = Some(ms);
        progress.log(format!(
            "cutover downtime: {ms} ms (source guest stopped -> VM running on the target)"
        ));
    }
}

impl Migration<'_> {
    /// Phase 1 of a cutover: `replica-cutover` instead of allocating or importing disks.
    /// Returns the working copies as `start` exports them (`nbd`).
    pub(super) async fn take_over_replica(&mut self) -> anyhow::Result<Map<String, Value>> {
        let plan = self.plan.clone();
        let vmid = self.opts.vmid;
        // The replica run held the stopped VM's config lock; the `migrate` lock came after
        // it: a VM started in between would have written after the last delta.
        if !plan.running && crate::qemu::process::is_running(&self.src.cfg.run_dir, vmid).is_some()
        {
            bail!(
                "VM {vmid} was started after the cutover's replica run: migrate it again \
                 (--online)"
            );
        }
        let conf = super::phase1::mapped_config(&plan)?;
        let disks: Map<String, Value> = (plan.volumes.iter())
            .map(|v| (v.key.clone(), json!({"size": v.size})))
            .collect();
        let firewall = std::fs::read_to_string(
            self.src
                .cfg
                .firewall_dir()
                .join(format!("{}.fw", self.opts.vmid)),
        )
        .ok();
        let reply = self
            .remote
            .cmd(
                json!({
                    "cmd": "replica-cutover", "source_node": self.src.cfg.node,
                    "source_vmid": self.opts.vmid, "conf": conf.write(), "disks": disks,
                    "firewall-config": firewall,
                }),
                120,
            )
            .await
            .context("taking over the replica on the target")?;
        let id = reply
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("replica-cutover reply without a valid id: {reply}"))?;
        let drives = reply
            .get("drives")
            .and_then(Value::as_object)
            .cloned()
            .with_context(|| format!("replica-cutover reply without drives: {reply}"))?;
        let verb = if plan.running { "runs on" } else { "has" };
        for v in &plan.volumes {
            let d = drives
                .get(&v.key)
                .with_context(|| format!("replica-cutover reply has no drive {}", v.key))?;
            self.progress.log(format!(
                "{}: the target VM {verb} the replica's working copy '{}'",
                v.key,
                d["volid"].as_str().unwrap_or("?")
            ));
        }
        if let Some(c) = &mut self.cutover {
            c.bitmap = format!("mtunnel-replica-{id}");
            if !plan.running {
                // Offline: the replica run was the last delta; `unlock` is the switch.
                self.summary.disk_bytes = c.figures.refresh_sent;
                self.progress.log(format!(
                    "cutover: VM {vmid} was stopped: no downtime, nothing more to copy"
                ));
            }
        }
        self.progress.log("config sent to the target");
        Ok(drives)
    }
}

/// Whether the QEMU of `vm` knows migration capability `name`.
pub(super) async fn has_capability(vm: &VmHandle, name: &str) -> anyhow::Result<bool> {
    let caps = vm
        .execute(
            "query-migrate-capabilities",
            Value::Null,
            Duration::from_secs(10),
        )
        .await
        .context("asking the source VM for its migration capabilities")?;
    Ok(caps
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["capability"] == json!(name))))
}

/// What the last delta works with.
pub(super) struct Delta<'a> {
    pub(super) vm: &'a VmHandle,
    pub(super) progress: &'a Progress,
    pub(super) bitmap: &'a str,
    /// Drive key → local NBD URI of the target's export.
    pub(super) exports: &'a [(String, String)],
    /// A copy that makes no progress for this long fails.
    pub(super) stall: Duration,
    pub(super) stopped_at: &'a Cell<Option<Instant>>,
    pub(super) copied: &'a Cell<u64>,
}

/// Waits for `pre-switchover` (guest stopped, RAM sent), copies the replica bitmap's
/// blocks to the target, then lets QEMU switch over. Never returns after that: the
/// caller's wait for `completed` ends the RAM phase. On failure the jobs and nodes it
/// made are removed.
pub(super) async fn final_delta(d: Delta<'_>) -> postcopy::Ended {
    loop {
        match d.vm.query_migrate().await {
            Ok(p) if p.status == "pre-switchover" => break,
            // The wait for `completed` reports a failed migration.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    d.stopped_at.set(Some(Instant::now()));
    let copied = copy_delta(&d).await;
    for (key, _) in d.exports {
        let _ = (d.vm)
            .execute(
                "job-dismiss",
                json!({"id": job_id(key)}),
                Duration::from_secs(10),
            )
            .await;
        let _ = (d.vm)
            .execute(
                "blockdev-del",
                json!({"node-name": node_name(key)}),
                Duration::from_secs(10),
            )
            .await;
    }
    let copied = match copied {
        Ok(n) => n,
        Err(e) => return postcopy::Ended::Failed(e),
    };
    d.copied.set(copied);
    d.progress.log(format!(
        "cutover: the last delta copied {} ({copied} bytes) while the guest was stopped",
        human(copied)
    ));
    if let Err(e) = (d.vm)
        .execute(
            "migrate-continue",
            json!({"state": "pre-switchover"}),
            Duration::from_secs(10),
        )
        .await
    {
        return postcopy::Ended::Failed(anyhow::Error::from(e).context("migrate-continue"));
    }
    std::future::pending().await
}

fn job_id(key: &str) -> String {
    format!("cutover-{key}")
}

fn node_name(key: &str) -> String {
    format!("cutover-nbd-{key}")
}

/// One `blockdev-backup sync=bitmap` per disk into an NBD client node of the target's
/// export; waits until all concluded. Returns the bytes they copied.
async fn copy_delta(d: &Delta<'_>) -> anyhow::Result<u64> {
    let exec = |cmd: &'static str, args: Value| async move {
        (d.vm)
            .execute(cmd, args, Duration::from_secs(30))
            .await
            .with_context(|| format!("cutover: QMP {cmd}"))
    };
    for (key, uri) in d.exports {
        let (path, export) = parse_nbd_uri(uri)?;
        exec(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": node_name(key),
                   "server": {"type": "unix", "path": path}, "export": export}),
        )
        .await?;
        exec(
            "blockdev-backup",
            json!({"job-id": job_id(key), "device": format!("drive-{key}"),
                   "target": node_name(key), "sync": "bitmap", "bitmap": d.bitmap,
                   "bitmap-mode": "on-success", "auto-dismiss": false}),
        )
        .await?;
    }
    let mut last = (0u64, Instant::now());
    loop {
        let jobs = exec("query-jobs", Value::Null).await?;
        let ours: Vec<&Value> = (d.exports.iter())
            .filter_map(|(key, _)| {
                jobs.as_array()?
                    .iter()
                    .find(|j| j["id"] == json!(job_id(key)))
            })
            .collect();
        if let Some(j) = ours.iter().find(|j| j.get("error").is_some()) {
            bail!(
                "cutover: the last delta's copy {} failed: {}",
                j["id"],
                j["error"]
            );
        }
        let done: u64 = ours
            .iter()
            .filter_map(|j| j["current-progress"].as_u64())
            .sum();
        if ours.len() == d.exports.len() && ours.iter().all(|j| j["status"] == "concluded") {
            return Ok(done);
        }
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > d.stall {
            bail!(
                "cutover: the last delta's copy made no progress for {} s (--stall-timeout)",
                d.stall.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `nbd:unix:<path>:exportname=<name>` → (path, name).
fn parse_nbd_uri(uri: &str) -> anyhow::Result<(String, String)> {
    uri.strip_prefix("nbd:unix:")
        .and_then(|rest| rest.rsplit_once(":exportname="))
        .map(|(p, e)| (p.to_string(), e.to_string()))
        .with_context(|| format!("unexpected NBD URI '{uri}'"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn nbd_uris_split_into_socket_and_export() {
        assert_eq!(
            super::parse_nbd_uri("nbd:unix:/run/x/100_nbd.migrate:exportname=drive-scsi0").unwrap(),
            (
                "/run/x/100_nbd.migrate".to_string(),
                "drive-scsi0".to_string()
            )
        );
        assert!(super::parse_nbd_uri("nbd:tcp:x:1").is_err());
    }
}
