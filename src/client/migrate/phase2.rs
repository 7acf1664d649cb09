//! Phase 2 of a migration, for a running VM: `start` on the target, the target's migration
//! and NBD sockets forwarded to local ones, every live disk mirrored into its NBD export,
//! then the RAM (a cutover mirrors nothing: its last delta goes while the migration waits
//! in `pre-switchover`, `cutover.rs`). On failure the source VM keeps running (migration and mirrors cancelled,
//! resumed if paused) and the target VM is stopped; the caller's abort then cleans up.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::{
    DEFAULT_STREAMS, Migration, STALE_JOB_TIMEOUT, as_u64, cutover, min_limit, postcopy, tuning,
};
use crate::client::progress::{Progress, human};
use crate::qemu::{self, MigrationParams, VmHandle};

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

    /// The RAM streams: 1 unless the target announced multifd; then `--streams` or
    /// [`DEFAULT_STREAMS`], at most what the target accepts.
    fn streams(&self) -> u32 {
        match (self.opts.streams, self.remote.multifd_max) {
            (Some(1), _) => 1,
            (asked, None) => {
                if asked.is_some() {
                    self.progress
                        .log("the target does not announce multifd: RAM moves in one stream");
                }
                1
            }
            (asked, Some(max)) => asked.unwrap_or(DEFAULT_STREAMS).min(max),
        }
    }

    /// How the RAM moves (streams, compression, postcopy), each choice logged with its
    /// reason; the source QEMU gets the compression now, so one that cannot do it fails
    /// before the target starts anything.
    async fn ram_mode(&self, vm: &VmHandle) -> anyhow::Result<Ram> {
        let tuning = self.opts.tuning;
        let postcopy = tuning.postcopy && self.remote.postcopy_offered;
        if tuning.postcopy && !postcopy {
            self.progress
                .log("RAM: the target does not offer postcopy: precopy only");
        }
        let streams = if postcopy { 1 } else { self.streams() };
        let (compression, why) = tuning::choose_compression(
            tuning.compress,
            streams,
            self.opts.bwlimit,
            self.remote.zstd_offered,
        );
        self.progress.log(format!("RAM: {why}"));
        let params = MigrationParams {
            multifd_compression: Some(compression.unwrap_or("none").to_string()),
            ..MigrationParams::default()
        };
        vm.migrate_set_parameters(&params).await.with_context(|| {
            format!(
                "setting multifd-compression {} on the source VM (QEMU 5.0 or later has the parameter)",
                compression.unwrap_or("none")
            )
        })?;
        if postcopy {
            self.progress.log(format!(
                "RAM: postcopy on request (--postcopy): after the first full pass, once the remaining RAM stopped shrinking for {} s, the target commits the VM ('resume') and the guest moves to it, fetching the pages it still lacks from here",
                tuning::POSTCOPY_FLAT_SAMPLES
            ));
        }
        Ok(Ram {
            streams,
            limit: None,
            compression,
            postcopy,
        })
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
        let queue_mib = self.opts.tuning.ram_queue_mib;
        let into = if ram.streams == 1 && queue_mib > 0 {
            let (qemu_end, ours, got) = crate::net::sockbuf::unix_pair(u64::from(queue_mib) << 20)
                .context("a socket pair for the RAM stream")?;
            forward.adopt(ours);
            self.progress.log(format!(
                "RAM: QEMU writes into a socket with a {} send buffer (--ram-queue-mib \
                 {queue_mib}): the queue behind it keeps its bandwidth estimate up",
                human(got as u64)
            ));
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

    /// The RAM's migration capabilities and parameters: the limit, multifd and the
    /// convergence tuning for this VM's RAM size, each choice logged with its reason.
    async fn configure_ram(&self, vm: &VmHandle, ram: &Ram) -> anyhow::Result<tuning::Plan> {
        let memory = vm
            .execute(
                "query-memory-size-summary",
                Value::Null,
                Duration::from_secs(10),
            )
            .await
            .context("asking the source VM for its RAM size (query-memory-size-summary)")?
            .get("base-memory")
            .and_then(Value::as_u64)
            .context("query-memory-size-summary reply without base-memory")?;
        let plan = self.opts.tuning.plan(memory, ram.streams);
        for note in &plan.notes {
            self.progress.log(format!("RAM: {note}"));
        }
        // Set either way: an earlier attempt may have left them on.
        let mut caps = vec![
            ("multifd", ram.streams > 1),
            ("xbzrle", plan.xbzrle_cache.is_some()),
            ("auto-converge", plan.auto_converge),
            ("postcopy-ram", ram.postcopy),
        ];
        // A failed live cutover leaves it on: set where QEMU knows it.
        if cutover::has_capability(vm, cutover::PAUSE_CAPABILITY).await? {
            caps.push((cutover::PAUSE_CAPABILITY, self.live_delta()));
        }
        vm.set_migration_capabilities(&caps).await?;
        vm.migrate_set_parameters(&MigrationParams {
            max_bandwidth: Some(ram.limit.map(|k| k * 1024).unwrap_or(16 << 30)),
            downtime_limit: Some(tuning::INITIAL_DOWNTIME_MS),
            multifd_channels: (ram.streams > 1).then_some(u64::from(ram.streams)),
            xbzrle_cache_size: plan.xbzrle_cache,
            // Postcopy's own limit (QEMU's 0: none); `max-bandwidth` is precopy's.
            max_postcopy_bandwidth: Some(ram.limit.map(|k| k * 1024).unwrap_or(0)),
            ..MigrationParams::default()
        })
        .await?;
        Ok(plan)
    }

    /// RAM: the limit, multifd and the convergence tuning, `migrate` into the forwarded
    /// socket, progress (with what is left, the dirty rate and the throttle) until
    /// completed; the downtime limit raised alongside while the remaining RAM grows, and
    /// with `--postcopy` the switch to postcopy when precopy does not converge.
    async fn migrate_ram(
        &mut self,
        vm: &VmHandle,
        into: RamInto<'_>,
        ram: &Ram,
    ) -> anyhow::Result<()> {
        let tuning = self.opts.tuning;
        let plan = self.configure_ram(vm, ram).await?;
        match into {
            RamInto::Path(path) => vm.migrate(&format!("unix:{}", path.display())).await?,
            // QEMU holds its own copy once it has it: ours closes at the end of this arm.
            RamInto::Socket(conn) => vm.migrate_into(std::os::fd::AsFd::as_fd(&conn)).await?,
        }
        let bar = self.progress.bar("RAM", 0);
        // With postcopy the switcher keeps `--max-ram-time` until the switch; after it the
        // migration must run to its end.
        let wait = qemu::MigrationWait {
            timeout: if ram.postcopy {
                qemu::MigrationWait::default().timeout
            } else {
                tuning.max_ram_time
            },
            // After a switch to postcopy, ending this process would cut the stream the
            // guest's missing pages come through: only QEMU's own end counts then.
            stall: if ram.postcopy {
                qemu::MigrationWait::default().timeout
            } else {
                self.opts.stall_timeout
            },
            ..qemu::MigrationWait::default()
        };
        let mut last = qemu::MigrationProgress::default();
        let mut max_throttle = 0;
        let escalation = Cell::new(tuning::INITIAL_DOWNTIME_MS);
        let switch = Cell::new(postcopy::Switch::Precopy);
        let watch = postcopy::Watch {
            vm,
            remote: &self.remote,
            progress: self.progress,
            max_ram_time: tuning.max_ram_time,
            state: &switch,
        };
        let (stopped_at, delta_copied) = (Cell::new(None), Cell::new(0));
        let live_delta = self.live_delta();
        let delta = self.delta(vm, &stopped_at, &delta_copied);
        let waited = tokio::select! {
            r = vm.wait_migration(wait, |p| {
                bar.set_detail(ram_detail(p));
                bar.set(p.transferred, p.total.max(p.transferred));
                max_throttle = max_throttle.max(p.throttle_pct);
                last = p.clone();
            }) => Ok(r),
            never = escalate_downtime(vm, self.progress, &escalation, plan.max_downtime_ms), if plan.escalate_downtime => {
                match never {}
            }
            ended = postcopy::watch(watch), if ram.postcopy => Err(ended),
            ended = async {
                match delta {
                    Some(d) => cutover::final_delta(d).await,
                    None => std::future::pending().await,
                }
            }, if live_delta => Err(ended),
        };
        if let Some(c) = &mut self.cutover
            && live_delta
        {
            c.stopped_at = stopped_at.get();
            c.figures.delta_copied = delta_copied.get();
        }
        self.remote.resume_sent |= switch.get() != postcopy::Switch::Precopy;
        self.remote.resumed_early = self.remote.resume_sent;
        self.remote.postcopy = switch.get() == postcopy::Switch::Postcopy;
        let done = match waited {
            Ok(Ok(done)) => done,
            Ok(Err(qemu::QemuError::Timeout { what, .. }))
                if what == qemu::MIGRATION_COMPLETION =>
            {
                bar.finish("not converged");
                return Err(not_converged(&tuning, &last));
            }
            Err(postcopy::Ended::NotConverged) => {
                bar.finish("not converged");
                return Err(not_converged(&tuning, &last));
            }
            Ok(Err(qemu::QemuError::MigrationStalled {
                vmid,
                secs,
                status,
                transferred,
            })) => {
                bar.finish("stalled");
                bail!(
                    "VM {vmid}: the RAM migration made no progress for {secs:.0} s \
                     (--stall-timeout; status {status}, {} sent): the link is probably frozen",
                    human(transferred)
                );
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(postcopy::Ended::Failed(e)) => return Err(e),
        };
        let how = if self.remote.postcopy {
            ", postcopy"
        } else {
            ""
        };
        bar.finish(&format!(
            "{} transferred (CPU throttle at most {max_throttle} %, downtime limit {} ms{how})",
            human(done.transferred),
            escalation.get()
        ));
        self.summary.ram_bytes = done.transferred;
        self.summary.ram_ms = Some(done.total_time_ms).filter(|&ms| ms > 0);
        self.summary.downtime_ms = vm
            .execute("query-migrate", Value::Null, Duration::from_secs(10))
            .await
            .ok()
            .and_then(|v| v.get("downtime").and_then(Value::as_u64));
        Ok(())
    }

    /// What a cutover's last delta works with (`None`: no cutover).
    fn delta<'a>(
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
    fn live_delta(&self) -> bool {
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

/// Where the source QEMU writes the RAM stream.
enum RamInto<'a> {
    /// It connects to the forward's socket (each multifd channel connects there).
    Path(&'a Path),
    /// Its end of a socket pair whose buffer we chose (`--ram-queue-mib`).
    Socket(std::os::unix::net::UnixStream),
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

/// The RAM progress line's detail: what is left, how fast the guest dirties, the throttle.
fn ram_detail(p: &qemu::MigrationProgress) -> String {
    format!(
        "remaining {}, guest dirties {}/s, CPU throttle {} %",
        human(p.remaining),
        human(p.dirty_rate),
        p.throttle_pct
    )
}

/// The error of a RAM phase that hit `--max-ram-time`; `last` is its last sample.
fn not_converged(tuning: &tuning::RamTuning, last: &qemu::MigrationProgress) -> anyhow::Error {
    let off: Vec<&str> = [
        (!tuning.auto_converge).then_some("--no-auto-converge"),
        (!tuning.xbzrle).then_some("--no-xbzrle"),
        (!tuning.escalate_downtime).then_some("--no-downtime-escalation"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let hint = if off.is_empty() {
        "a higher --bwlimit, a quieter guest or a larger --max-ram-time may let it converge"
            .to_string()
    } else {
        format!(
            "the tuning that lets a busy guest converge is off: leave out {}",
            off.join(" ")
        )
    };
    anyhow::anyhow!(
        "the RAM did not converge within {} s (--max-ram-time): {} still to send while the guest dirties {}/s (CPU throttle {} %); migration cancelled, the VM keeps running on the source; {hint}",
        tuning.max_ram_time.as_secs(),
        human(last.remaining),
        human(last.dirty_rate),
        last.throttle_pct
    )
}

/// PVE's downtime escalation next to the RAM progress: every second one `query-migrate`;
/// the limit is doubled when the remaining RAM grew in 6 samples, at most to `max_ms`.
/// Never returns: the
/// caller drops it when the migration ends. `limit` holds the current limit.
async fn escalate_downtime(
    vm: &VmHandle,
    progress: &Progress,
    limit: &Cell<u64>,
    max_ms: Option<u64>,
) -> std::convert::Infallible {
    let mut escalation = tuning::DowntimeEscalation::up_to(max_ms);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(p) = vm.query_migrate().await else {
            continue;
        };
        if p.status != "active" {
            continue;
        }
        let Some(ms) = escalation.sample(p.remaining) else {
            continue;
        };
        let params = MigrationParams {
            downtime_limit: Some(ms),
            ..MigrationParams::default()
        };
        match vm.migrate_set_parameters(&params).await {
            Ok(()) => {
                limit.set(ms);
                progress.log(format!(
                    "RAM: the remaining RAM keeps growing ({} left): downtime limit raised to {ms} ms",
                    human(p.remaining)
                ));
            }
            Err(e) => tracing::warn!("raising the downtime limit to {ms} ms: {e}"),
        }
    }
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

/// How the RAM moves: streams (multifd channels, 1 = none), the limit in KiB/s, the
/// channels' compression and whether it may switch to postcopy.
pub(super) struct Ram {
    pub(super) streams: u32,
    pub(super) limit: Option<u64>,
    pub(super) compression: Option<&'static str>,
    pub(super) postcopy: bool,
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
