//! Phase 2 of a migration, for a running VM: `start` on the target, the target's migration
//! and NBD sockets forwarded to local ones, every live disk mirrored into its NBD export,
//! then the RAM (`ram.rs`; a cutover mirrors nothing: its last delta goes while the
//! migration waits in `pre-switchover`, `cutover.rs`). On failure the source VM keeps running (migration and mirrors cancelled,
//! resumed if paused) and the target VM is stopped; the caller's abort then cleans up.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::ram::{Ram, RamInto};
use super::{Migration, STALE_JOB_TIMEOUT, as_u64, cutover, min_limit};
use crate::client::progress::Progress;
use crate::qemu::VmHandle;

impl Migration<'_> {
    /// Phase 2. `nbd` is phase 1's `disk` replies.
    pub(super) async fn phase2_live(&mut self, nbd: Map<String, Value>) -> anyhow::Result<()> {
        let vmid = self.opts.vmid;
        let vm = VmHandle::attach(&self.src.cfg.run_dir, vmid)
            .context("attaching to the running source VM")?;
        let machine = vm.running_machine().await?;
        self.clear_stale_mirrors(&vm).await?;
        let ram = self.ram_mode(&vm).await?;
        let mut migrate_opts = json!({
            "spice_ticket": null, "type": "websocket", "network": null, "storagemap": {},
            "migratedfrom": self.src.cfg.node, "nbd_proto_version": 1, "nbd": nbd,
            "remote_node": self.remote.node,
        });
        // mtunnel's extensions go only to a target that announced them: a PVE target's
        // strict schema would refuse the unknown keys.
        if ram.streams > 1 {
            migrate_opts["multifd_channels"] = json!(ram.streams);
        }
        if let Some(c) = ram.compression {
            migrate_opts["multifd_compression"] = json!(c);
        }
        if ram.postcopy {
            migrate_opts["postcopy"] = json!(true);
        }
        let start = json!({
            "cmd": "start",
            "start_params": {"statefile": "unix", "forcemachine": machine, "forcecpu": null, "skiplock": 1},
            "migrate_opts": migrate_opts,
        });
        let bwlimit = json!({"cmd": "bwlimit", "operation": "migration", "storages": [null], "bwlimit": self.opts.bwlimit});
        // `bwlimit` goes out right behind `start` (the target answers in order), saving a
        // round trip: it only reads the target's limits, so when `start` fails it did
        // nothing and its reply is dropped unread. `join!` polls `start` first, and a
        // command is queued on its first poll, so the order on the wire is fixed.
        let (reply, limit) = tokio::join!(self.remote.cmd(start, 60), self.remote.cmd(bwlimit, 70));
        let reply = reply?;
        let remote_limit = limit?.get("bwlimit").and_then(as_u64);
        let live_disks = self.plan.volumes.iter().filter(|v| v.live).count();
        let started = check_start_reply(&reply, self.remote.tvmid, live_disks)?;
        if ram.streams > 1 {
            self.progress.log(format!(
                "RAM in {} parallel streams (multifd, one WebSocket each)",
                ram.streams
            ));
        }
        let ram = Ram {
            limit: min_limit(self.opts.bwlimit, remote_limit),
            ..ram
        };
        if let Err(e) = self.transfer(&vm, &started, &ram).await {
            if self.remote.resume_sent {
                // The target may run the guest (or its memory is split between both
                // hosts in postcopy): nothing may resume the source's copy now.
                return Err(e);
            }
            self.cancel_live(&vm, ram.streams).await;
            return Err(e);
        }
        self.remote.ram_done = true;
        self.summary.ram_completed = Some(Instant::now());
        Ok(())
    }

    /// Ends the `mirror-*` jobs an earlier, failed migration of this VM left (its cancel
    /// may have timed out while the link was frozen, and the job concluded with an I/O
    /// error later): QEMU refuses a new `mirror-scsi0` while the old one exists. No other
    /// migration of the VM runs: this one holds its config lock `migrate`.
    async fn clear_stale_mirrors(&self, vm: &VmHandle) -> anyhow::Result<()> {
        let ended = vm.clear_jobs("mirror-", STALE_JOB_TIMEOUT).await.context(
            "ending the disk mirror jobs an earlier migration left on the source VM \
                 (see 'query-jobs' on its QMP socket)",
        )?;
        if !ended.is_empty() {
            self.progress.log(format!(
                "ended block job(s) {} left by an earlier migration",
                ended.join(", ")
            ));
        }
        Ok(())
    }

    /// Forwards, disks, RAM.
    async fn transfer(
        &mut self,
        vm: &VmHandle,
        started: &StartReply,
        ram: &Ram,
    ) -> anyhow::Result<()> {
        let local_nbd = self.forward_nbd(started)?;
        if let Some(c) = &mut self.cutover {
            // The target runs on the replica: only the last delta goes to its exports.
            c.exports = local_uris(started, &local_nbd);
        }
        let mirrored = match self.cutover {
            Some(_) => Ok(Vec::new()),
            None => self.mirror_disks(vm, started, &local_nbd).await,
        };
        let jobs = match mirrored {
            Ok(jobs) => jobs,
            Err(e) => {
                let locals: Vec<&Path> = local_nbd.values().map(PathBuf::as_path).collect();
                return Err(self.remote.name_break(&locals, "disk stream", e));
            }
        };
        // The RAM WebSockets open now, while the source is set up, and not before: an
        // incoming multifd QEMU blocks its main loop (and so its NBD server) on a
        // connected channel until the channel's first bytes arrive.
        let local_migrate = self
            .src
            .cfg
            .run_dir
            .join(format!("{}.migrate", self.opts.vmid));
        let channels = if ram.streams > 1 { ram.streams + 1 } else { 1 };
        let forward =
            self.remote
                .forward(&local_migrate, &started.migrate_addr, channels as usize)?;
        let into = if ram.streams == 1 && self.opts.tuning.ram_queue_mib > 0 {
            let (qemu_end, ours) =
                crate::net::sockbuf::unix_pair().context("a socket pair for the RAM stream")?;
            forward.adopt(ours);
            RamInto::Socket(qemu_end)
        } else {
            RamInto::Path(&local_migrate)
        };
        if let Err(e) = self.migrate_ram(vm, into, ram).await {
            return Err(self.remote.name_break(&[&local_migrate], "RAM stream", e));
        }
        for job in &jobs {
            vm.block_job_cancel(job, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// Local NBD sockets: the remote paths with the target VMID replaced by ours. Returns
    /// the local socket of each remote NBD socket.
    fn forward_nbd(&mut self, started: &StartReply) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let vmid = self.opts.vmid;
        let tvmid = self.remote.tvmid;
        let mut local_nbd = BTreeMap::new();
        for sock in &started.unix_sockets {
            let name = Path::new(sock)
                .file_name()
                .and_then(|n| n.to_str())
                .context("socket without file name")?
                .replacen(&tvmid.to_string(), &vmid.to_string(), 1);
            let local = self.src.cfg.run_dir.join(name);
            self.remote.forward(&local, sock, 0)?;
            local_nbd.insert(sock.clone(), local);
        }
        Ok(local_nbd)
    }

    /// Disks: mirror to the target's NBD exports, wait until every mirror is ready and
    /// switch it to write-blocking. Returns the block job ids.
    async fn mirror_disks(
        &mut self,
        vm: &VmHandle,
        started: &StartReply,
        local_nbd: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<Vec<String>> {
        let plan = self.plan.clone();
        let mirrors = Instant::now();
        let mut jobs = Vec::new();
        for v in plan.volumes.iter().filter(|v| v.live) {
            let uri = started
                .nbd_uris
                .get(&v.key)
                .with_context(|| format!("start reply has no NBD URI for {}", v.key))?;
            let local_uri = local_uri(uri, local_nbd);
            let speed = self.opts.bwlimit.map(|k| k * 1024);
            let job = vm.drive_mirror(&v.key, &local_uri, speed).await?;
            jobs.push((job, v));
        }
        for (job, v) in &jobs {
            wait_mirror(vm, job, &v.key, self.progress, self.opts.stall_timeout)
                .await
                .with_context(|| {
                    format!(
                        "mirroring {} to the target failed (target VM or tunnel gone?)",
                        v.key
                    )
                })?;
            vm.mirror_write_blocking(job).await?;
            self.summary.disk_bytes += v.size;
        }
        if !jobs.is_empty() {
            self.summary.add_disk_time(mirrors.elapsed());
        }
        Ok(jobs.into_iter().map(|(job, _)| job).collect())
    }

    /// What a cutover's last delta works with (`None`: no cutover).
    pub(super) fn delta<'a>(
        &'a self,
        vm: &'a VmHandle,
        stopped_at: &'a Cell<Option<Instant>>,
        copied: &'a Cell<u64>,
    ) -> Option<cutover::Delta<'a>> {
        self.cutover.as_ref().map(|c| cutover::Delta {
            vm,
            progress: self.progress,
            bitmap: &c.bitmap,
            exports: &c.exports,
            stall: self.opts.stall_timeout,
            stopped_at,
            copied,
        })
    }

    /// A cutover whose last delta is copied while the migration waits in
    /// `pre-switchover` (not `--final-sync`, whose guest is paused since the last run).
    pub(super) fn live_delta(&self) -> bool {
        self.cutover.as_ref().is_some_and(|c| !c.final_sync)
    }

    /// Phase 2 cleanup: stop the migration, keep the source VM running (multifd off again,
    /// so a later PVE-style migration gets one stream), stop the target VM.
    async fn cancel_live(&self, vm: &VmHandle, streams: u32) {
        let _ = vm.migrate_cancel().await;
        if streams > 1 {
            // Refused while the cancel is still under way; the next `mtunnel migrate` sets
            // the capability either way, so this is best effort for other tools.
            let _ = vm.set_migration_capabilities(&[("multifd", false)]).await;
        }
        self.keep_source_running(vm).await;
    }

    /// The source VM runs on: paused (the RAM migration completed, or was cancelled) it is
    /// resumed, and its disk mirror jobs end, so its writes stay local.
    /// Returns whether it runs now.
    pub(super) async fn keep_source_running(&self, vm: &VmHandle) -> bool {
        let running = match vm.status().await {
            Ok(st) if st.running => true,
            Ok(_) => vm.resume().await.is_ok(),
            Err(_) => false,
        };
        // Forced and bounded: the target may be out of reach (a frozen link), and a clean
        // cancel of a READY mirror first drains to it. A job still ending then is ended
        // by the next migration's `clear_stale_mirrors`.
        for v in self.plan.volumes.iter().filter(|v| v.live) {
            let job = format!("mirror-{}", v.key);
            if let Err(e) = vm.block_job_abort(&job, STALE_JOB_TIMEOUT).await {
                tracing::warn!("cancelling block job {job}: {e}");
            }
        }
        if let Err(se) = self.remote.cmd(json!({"cmd": "stop"}), 10).await {
            self.progress
                .log(format!("WARN: remote stop failed: {se:#}"));
        }
        running
    }
}

/// `uri` with the target's NBD socket replaced by its local forward.
fn local_uri(uri: &str, local_nbd: &BTreeMap<String, PathBuf>) -> String {
    let mut local_uri = uri.to_string();
    for (remote_sock, local) in local_nbd {
        local_uri = local_uri.replace(remote_sock.as_str(), &local.display().to_string());
    }
    local_uri
}

/// Every drive's local NBD URI, by key.
fn local_uris(
    started: &StartReply,
    local_nbd: &BTreeMap<String, PathBuf>,
) -> Vec<(String, String)> {
    (started.nbd_uris.iter())
        .map(|(key, uri)| (key.clone(), local_uri(uri, local_nbd)))
        .collect()
}

async fn wait_mirror(
    vm: &VmHandle,
    job: &str,
    key: &str,
    progress: &Progress,
    stall: Duration,
) -> anyhow::Result<()> {
    let bar = progress.bar(key, 0);
    // A frozen tunnel times out nowhere else: give up when the mirror makes no progress.
    let watch = async {
        let mut last = (0u64, Instant::now());
        loop {
            if let Ok(jobs) = vm
                .execute("query-block-jobs", Value::Null, Duration::from_secs(10))
                .await
                && let Some(j) = jobs
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["device"] == json!(job)))
            {
                let offset = j["offset"].as_u64().unwrap_or(0);
                bar.set(offset, j["len"].as_u64().unwrap_or(0));
                if offset != last.0 {
                    last = (offset, Instant::now());
                }
            }
            if last.1.elapsed() > stall {
                return Err(anyhow::anyhow!(
                    "mirror of {key} made no progress for {} s (--stall-timeout)",
                    stall.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        r = vm.wait_block_job_ready(job, Duration::from_secs(24 * 3600)) => r?,
        r = watch => r?,
    }
    bar.finish("mirrored (ready)");
    Ok(())
}

pub(super) struct StartReply {
    migrate_addr: String,
    unix_sockets: Vec<String>,
    nbd_uris: BTreeMap<String, String>,
}

/// The source's safety checks on the `start` reply (upstream rejects anything else).
pub(super) fn check_start_reply(
    reply: &Value,
    tvmid: u32,
    live_disks: usize,
) -> anyhow::Result<StartReply> {
    let safe = |p: &str| {
        !p.contains("..")
            && p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    };
    let m = &reply["migrate"];
    if m["proto"] != json!("unix") {
        bail!(
            "target offers migration protocol {} - only 'unix' is supported",
            m["proto"]
        );
    }
    let addr = m["addr"]
        .as_str()
        .context("start reply without migrate.addr")?;
    let expected = format!("/{tvmid}.migrate");
    if !safe(addr) || !addr.ends_with(&expected) {
        bail!("unexpected migration socket '{addr}' in the target's start reply");
    }
    let dir = &addr[..addr.len() - expected.len()];
    let mut unix_sockets = Vec::new();
    if let Some(list) = m.get("unix_sockets").and_then(Value::as_array) {
        for s in list {
            let s = s.as_str().context("non-string socket in start reply")?;
            if !safe(s) || !s.starts_with(&format!("{dir}/")) || !s.ends_with(".migrate") {
                bail!("unexpected socket '{s}' in the target's start reply");
            }
            unix_sockets.push(s.to_string());
        }
    }
    let mut nbd_uris = BTreeMap::new();
    if let Some(drives) = reply.get("drives").and_then(Value::as_object) {
        for (key, d) in drives {
            let uri = d["nbd_uri"].as_str().context("drive without nbd_uri")?;
            if !uri.contains(&format!("{dir}/{tvmid}_")) || uri.contains("..") {
                bail!("unexpected NBD URI '{uri}' in the target's start reply");
            }
            nbd_uris.insert(key.clone(), uri.to_string());
        }
    }
    if nbd_uris.len() != live_disks {
        bail!(
            "target exports {} drive(s), expected {live_disks}",
            nbd_uris.len()
        );
    }
    Ok(StartReply {
        migrate_addr: addr.to_string(),
        unix_sockets,
        nbd_uris,
    })
}
