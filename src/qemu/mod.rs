//! The QEMU layer: command lines from PVE-format VM configs ([`cmdline`], one file per
//! section of the command line), QEMU processes
//! ([`process`]), the QMP client ([`qmp`]) and the guest agent ([`agent`]), plus the small
//! high-level API below that tunnel handlers (target side) and the migration source use.
//!
//! Target side (the `start`, `nbdstop`, `resume`, `stop`, `fstrim` tunnel commands):
//! [`start_incoming`] starts the VM with `-incoming unix:{run}/{vmid}.migrate -S`, the NBD
//! server on `{run}/{vmid}_nbd.migrate` and one writable export `drive-<key>` per disk, and
//! kills the VM again if any of that fails; then [`VmHandle::nbd_server_stop`],
//! [`VmHandle::resume`], [`VmHandle::stop`], [`Agent::ping`] + [`Agent::fstrim`].
//!
//! Source side: [`VmHandle::drive_mirror`] to the target's NBD URI,
//! [`VmHandle::wait_block_job_ready`], [`VmHandle::mirror_write_blocking`],
//! [`VmHandle::migrate_set_parameters`], [`VmHandle::migrate`], [`VmHandle::wait_migration`]
//! (progress callback, stall detection), [`VmHandle::block_job_cancel`] (cancel + dismiss),
//! and on failure [`VmHandle::migrate_cancel`] and [`VmHandle::block_job_abort`] (forced);
//! [`VmHandle::clear_jobs`] ends jobs an earlier run left.
//!
//! Everything talks to QEMU through one cached QMP connection per [`VmHandle`]; a handle for a
//! VM started by another process comes from [`VmHandle::attach`].

pub mod agent;
pub mod backend;
pub mod cmdline;
pub mod process;
pub mod qmp;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::time::Instant;

pub use crate::config::Accel;
pub use agent::{Agent, AgentError};
pub use cmdline::{CmdlineError, DiskFormat, DiskSource, VmPaths, VmSpec, build_command};
pub use process::{
    ProcessError, StartOptions, StopMethod, StopOutcome, StopTimeouts, VmGuard, VmHandle,
    is_running,
};
pub use qmp::{Qmp, QmpError, QmpEvent, QmpEvents};

/// Timeout of `nbd-server-stop` (Proxmox: 25 s).
pub const NBD_STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// What the QEMU layer reports to its callers.
#[derive(Debug, Error)]
pub enum QemuError {
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("VM {vmid}: block job '{job}' {what}")]
    BlockJob {
        vmid: u32,
        job: String,
        what: String,
    },
    #[error("VM {vmid}: migration {status}: {desc}")]
    Migration {
        vmid: u32,
        status: String,
        desc: String,
    },
    #[error(
        "VM {vmid}: migration made no progress for {secs:.0} s (status {status}, {transferred} bytes sent); the link is probably frozen: cancel it with migrate_cancel"
    )]
    MigrationStalled {
        vmid: u32,
        secs: f64,
        status: String,
        transferred: u64,
    },
    #[error("VM {vmid}: no {what} within {secs:.0} s")]
    Timeout { vmid: u32, what: String, secs: f64 },
    #[error("VM {vmid}: unexpected QMP reply to {cmd}: {reply}")]
    Reply {
        vmid: u32,
        cmd: String,
        reply: String,
    },
}

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// QEMU's run state: `running`, `paused`, `inmigrate`, `postmigrate`, `suspended`, ...
    pub status: String,
    pub running: bool,
}

/// A VM started for an incoming migration, with what the `start` reply needs.
#[derive(Debug)]
pub struct IncomingVm {
    pub vm: VmHandle,
    /// `unix:{run}/{vmid}.migrate`
    pub migrate_uri: String,
    pub migrate_socket: PathBuf,
    /// The NBD server socket, when disks are exported.
    pub nbd_socket: Option<PathBuf>,
    /// Drive key → `nbd:unix:{socket}:exportname=drive-<key>`.
    pub nbd_uris: BTreeMap<String, String>,
}

/// Migration parameters for `migrate-set-parameters`; `None` leaves QEMU's value.
#[derive(Debug, Clone, Default)]
pub struct MigrationParams {
    /// Bytes/s. QEMU's default is only 128 MiB/s; Proxmox uses 16 GiB/s when unlimited.
    pub max_bandwidth: Option<u64>,
    /// Milliseconds of tolerated downtime.
    pub downtime_limit: Option<u64>,
    pub xbzrle_cache_size: Option<u64>,
    pub multifd_channels: Option<u64>,
    /// `none` or `zstd`: how multifd channels compress pages (both sides must agree).
    pub multifd_compression: Option<String>,
    /// Bytes/s of the postcopy phase (QEMU's 0 = unlimited; `max-bandwidth` is precopy's).
    pub max_postcopy_bandwidth: Option<u64>,
    /// Bytes/s QEMU assumes for the switchover instead of its own estimate (what it wrote in
    /// its last ~100 ms); QEMU's 0: its own estimate. QEMU 8.2 or later.
    pub avail_switchover_bandwidth: Option<u64>,
    /// Percent auto-converge adds to the vCPU throttle each time the guest still dirties
    /// faster than the link sends (QEMU's default 10).
    pub cpu_throttle_increment: Option<u64>,
}

/// How the RAM of an incoming migration arrives (`None`/`false`: one stream, precopy only,
/// as a PVE source sends it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncomingRam {
    /// Multifd channels.
    pub multifd: Option<u32>,
    /// `zstd`: the multifd channels carry compressed pages (only with `multifd`).
    pub compression: Option<String>,
    /// The `postcopy-ram` capability: the source may switch to postcopy.
    pub postcopy: bool,
}

/// How often [`VmHandle::wait_migration`] polls once the source VM stopped for the
/// switchover (`STOP`), for at most [`SWITCHOVER_FAST`]: until the caller sees `completed`
/// and resumes the target, the guest is paused, so a 200 ms poll adds up to 200 ms pause.
const SWITCHOVER_POLL: Duration = Duration::from_millis(10);
const SWITCHOVER_FAST: Duration = Duration::from_secs(30);

/// Waits `poll`, or less: until a `STOP` (returns true: the switchover began) or `MIGRATION`
/// event. Without events (none subscribed, or the connection ended) it just sleeps.
async fn next_sample(events: &mut Option<qmp::QmpEvents>, poll: Duration) -> bool {
    let Some(ev) = events.as_mut() else {
        tokio::time::sleep(poll).await;
        return false;
    };
    let sleep = tokio::time::sleep(poll);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return false,
            r = ev.next() => match r {
                Ok(e) if e.name == "STOP" => return true,
                Ok(e) if e.name == "MIGRATION" => return false,
                Ok(_) => {}
                Err(_) => {
                    // Closed: the next query fails and says why; until then, plain sleeps.
                    *events = None;
                    sleep.as_mut().await;
                    return false;
                }
            },
        }
    }
}

/// One `query-migrate` sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// `none`, `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// RAM bytes sent / left / total.
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Milliseconds since the migration started (when QEMU reports it).
    pub total_time_ms: u64,
    /// Bytes/s the guest dirties (`ram.dirty-pages-rate` × `ram.page-size`; 0 until QEMU
    /// measured it after its first dirty sync).
    pub dirty_rate: u64,
    /// Percent of vCPU time auto-converge takes from the guest (`cpu-throttle-percentage`).
    pub throttle_pct: u64,
    /// Dirty bitmap syncs so far (`ram.dirty-sync-count`): 1 during the first pass over
    /// the RAM, 2 once it is done.
    pub dirty_sync_count: u64,
    pub error_desc: Option<String>,
}

impl MigrationProgress {
    fn from_reply(v: &Value) -> Self {
        let ram = &v["ram"];
        let n = |x: &Value| x.as_u64().unwrap_or(0);
        MigrationProgress {
            status: v["status"].as_str().unwrap_or("none").to_string(),
            transferred: n(&ram["transferred"]),
            remaining: n(&ram["remaining"]),
            total: n(&ram["total"]),
            total_time_ms: n(&v["total-time"]),
            dirty_rate: n(&ram["dirty-pages-rate"]).saturating_mul(n(&ram["page-size"])),
            throttle_pct: n(&v["cpu-throttle-percentage"]),
            dirty_sync_count: n(&ram["dirty-sync-count"]),
            error_desc: v["error-desc"].as_str().map(str::to_string),
        }
    }
}

/// What a [`QemuError::Timeout`] of [`VmHandle::wait_migration`] waited for (its
/// `MigrationWait::timeout` ran out).
pub const MIGRATION_COMPLETION: &str = "migration completion";

/// How [`VmHandle::wait_migration`] polls.
#[derive(Debug, Clone, Copy)]
pub struct MigrationWait {
    pub poll: Duration,
    /// Fail when `ram.transferred` has not grown for this long (a frozen link times out
    /// nowhere else).
    pub stall: Duration,
    /// Give up after this long overall.
    pub timeout: Duration,
}

impl Default for MigrationWait {
    fn default() -> Self {
        MigrationWait {
            poll: Duration::from_millis(200),
            stall: Duration::from_secs(60),
            timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// The NBD URI of a drive's export on `socket`.
pub fn nbd_uri(socket: &Path, drive_key: &str) -> String {
    format!("nbd:unix:{}:exportname=drive-{drive_key}", socket.display())
}

/// Starts a VM and returns once QMP answers.
pub async fn start_vm(spec: &VmSpec) -> Result<VmHandle, QemuError> {
    Ok(VmHandle::start(spec, &StartOptions::default()).await?)
}

/// Starts the target VM of a live migration: `-incoming unix:{run}/{vmid}.migrate -S`,
/// migration `events` enabled, and when `nbd_drives` is not empty the NBD server on
/// `{run}/{vmid}_nbd.migrate` with one writable export per drive key. On any failure the VM
/// is stopped before the error is returned.
pub async fn start_incoming(
    spec: &VmSpec,
    nbd_drives: &[&str],
    opts: &StartOptions,
) -> Result<IncomingVm, QemuError> {
    start_incoming_multifd(spec, nbd_drives, opts, &IncomingRam::default()).await
}

/// [`start_incoming`], with the RAM as `ram` says. With `multifd: Some(n)` (RAM over `n`
/// multifd channels, compressed as `compression` says) or `postcopy` QEMU starts with
/// `-incoming defer`, gets the capabilities (`multifd`, `postcopy-ram`) and parameters
/// (`multifd-channels`, `multifd-compression`), then listens on the same socket with
/// `migrate-incoming` (the listener accepts the main channel and the `n` others, told
/// apart by their first bytes).
pub async fn start_incoming_multifd(
    spec: &VmSpec,
    nbd_drives: &[&str],
    opts: &StartOptions,
    ram: &IncomingRam,
) -> Result<IncomingVm, QemuError> {
    let mut spec = spec.clone();
    let paths = spec.paths();
    let migrate_uri = format!("unix:{}", paths.migrate.display());
    let deferred = ram.multifd.is_some() || ram.postcopy;
    spec.incoming = Some(if deferred {
        "defer".to_string()
    } else {
        migrate_uri.clone()
    });
    let vm = VmHandle::start(&spec, opts).await?;

    let setup = async {
        vm.set_migration_capabilities(&[("events", true)]).await?;
        if deferred {
            vm.set_migration_capabilities(&[
                ("multifd", ram.multifd.is_some()),
                ("postcopy-ram", ram.postcopy),
            ])
            .await?;
            vm.migrate_set_parameters(&MigrationParams {
                multifd_channels: ram.multifd.map(u64::from),
                multifd_compression: ram.compression.clone(),
                ..MigrationParams::default()
            })
            .await?;
            vm.cmd("migrate-incoming", json!({ "uri": migrate_uri }))
                .await?;
        }
        let mut nbd_uris = BTreeMap::new();
        if !nbd_drives.is_empty() {
            vm.nbd_server_start(&paths.nbd).await?;
            for key in nbd_drives {
                nbd_uris.insert(key.to_string(), vm.block_export_add(key, &paths.nbd).await?);
            }
        }
        Ok::<_, QemuError>(nbd_uris)
    };
    match setup.await {
        Ok(nbd_uris) => Ok(IncomingVm {
            vm,
            migrate_uri,
            migrate_socket: paths.migrate.clone(),
            nbd_socket: (!nbd_drives.is_empty()).then(|| paths.nbd.clone()),
            nbd_uris,
        }),
        Err(e) => {
            tracing::warn!(
                vmid = spec.vmid,
                "incoming VM setup failed, stopping it: {e}"
            );
            let quick = StopTimeouts {
                quit: Duration::from_secs(3),
                term: Duration::from_secs(3),
                kill: Duration::from_secs(5),
            };
            if let Err(stop_err) = vm.stop(quick).await {
                tracing::error!(vmid = spec.vmid, "could not stop the failed VM: {stop_err}");
            }
            Err(e)
        }
    }
}

impl VmHandle {
    async fn cmd(&self, cmd: &str, args: Value) -> Result<Value, QemuError> {
        Ok(self.execute(cmd, args, qmp::DEFAULT_TIMEOUT).await?)
    }

    /// `query-status`.
    pub async fn status(&self) -> Result<VmStatus, QemuError> {
        let v = self.cmd("query-status", Value::Null).await?;
        match (v["status"].as_str(), v["running"].as_bool()) {
            (Some(s), Some(r)) => Ok(VmStatus {
                status: s.to_string(),
                running: r,
            }),
            _ => Err(self.bad_reply("query-status", &v)),
        }
    }

    fn bad_reply(&self, cmd: &str, v: &Value) -> QemuError {
        QemuError::Reply {
            vmid: self.vmid(),
            cmd: cmd.to_string(),
            reply: v.to_string(),
        }
    }

    /// Resumes the guest: `system_wakeup` when it is suspended, `cont` otherwise.
    pub async fn resume(&self) -> Result<(), QemuError> {
        let st = self.status().await?;
        if st.status == "suspended" {
            self.cmd("system_wakeup", Value::Null).await?;
        } else {
            self.cmd("cont", Value::Null).await?;
        }
        Ok(())
    }

    /// `cont` for a VM started for an incoming migration, then waits (up to `bound`) until
    /// QEMU has loaded the whole stream and runs the guest. The source's QEMU says
    /// "completed" once it wrote its last byte, while up to a socket buffer per hop may
    /// still be on the way: answering `resume` before the load ends would let the source
    /// stop its copy while a cut could still kill this one. With `postcopy-ram` on, the
    /// guest starts when the source switches to postcopy, which comes after `resume`:
    /// then `cont` only arms the start.
    pub async fn resume_incoming(&self, bound: Duration) -> Result<(), QemuError> {
        self.resume().await?;
        if self.capability("postcopy-ram").await? {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            let st = self.status().await?;
            if st.status != "inmigrate" {
                return Ok(());
            }
            if started.elapsed() >= bound {
                return Err(QemuError::Timeout {
                    vmid: self.vmid(),
                    what: "end of the incoming migration stream (QEMU still loads it; \
                           the guest starts once it has)"
                        .into(),
                    secs: bound.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether migration capability `name` is on.
    async fn capability(&self, name: &str) -> Result<bool, QemuError> {
        let v = self.cmd("query-migrate-capabilities", Value::Null).await?;
        let caps = v
            .as_array()
            .ok_or_else(|| self.bad_reply("query-migrate-capabilities", &v))?;
        Ok(caps
            .iter()
            .any(|c| c["capability"] == name && c["state"] == true))
    }

    /// The concrete machine type QEMU runs (e.g. `pc-i440fx-10.0` for `pc`): what a migration
    /// source sends as `forcemachine`.
    pub async fn running_machine(&self) -> Result<String, QemuError> {
        // The QOM type of /machine is the concrete type plus "-machine"
        // (`query-machines` marks only the default, not the running machine).
        let v = self
            .cmd("qom-get", json!({"path": "/machine", "property": "type"}))
            .await?;
        v.as_str()
            .and_then(|t| t.strip_suffix("-machine"))
            .map(str::to_string)
            .ok_or_else(|| self.bad_reply("qom-get /machine type", &v))
    }

    pub async fn set_migration_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QemuError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await
            .map(|_| ())
    }

    /// `nbd-server-start` on a UNIX socket.
    pub async fn nbd_server_start(&self, socket: &Path) -> Result<(), QemuError> {
        let path = socket.to_string_lossy();
        self.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": path}}}),
        )
        .await
        .map(|_| ())
    }

    /// Exports drive `key` (node `drive-<key>`) writable as `drive-<key>`; returns its URI.
    pub async fn block_export_add(
        &self,
        drive_key: &str,
        socket: &Path,
    ) -> Result<String, QemuError> {
        let name = format!("drive-{drive_key}");
        self.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": name, "name": name, "writable": true}),
        )
        .await?;
        Ok(nbd_uri(socket, drive_key))
    }

    /// `nbd-server-stop` (25 s timeout as Proxmox).
    pub async fn nbd_server_stop(&self) -> Result<(), QemuError> {
        self.execute("nbd-server-stop", Value::Null, NBD_STOP_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Bytes a disk mirror keeps in flight at most (`buf-size`; QEMU's default 16 MiB, in at
    /// most 16 requests of 1 MiB). A mirror write completes only when the target's NBD reply
    /// is back, so on a long path this window, not the link, can set the pace: 16 MiB per
    /// (100 ms RTT + the bottleneck's queue) is near a 500 Mbit/s line already.
    pub const MIRROR_BUF_SIZE: u64 = 64 << 20;

    /// Starts mirroring drive `key` to `target` (an NBD URI, the target's export), full sync,
    /// not auto-dismissed. `speed` in bytes/s (`None` = unlimited). Returns the job id
    /// `mirror-<key>`.
    pub async fn drive_mirror(
        &self,
        drive_key: &str,
        target: &str,
        speed: Option<u64>,
    ) -> Result<String, QemuError> {
        let job = format!("mirror-{drive_key}");
        let mut args = json!({
            "job-id": job,
            "device": format!("drive-{drive_key}"),
            "target": target,
            "format": "nbd",
            "mode": "existing",
            "sync": "full",
            "auto-dismiss": false,
            "buf-size": Self::MIRROR_BUF_SIZE,
        });
        if let Some(s) = speed {
            args["speed"] = json!(s);
        }
        self.cmd("drive-mirror", args).await?;
        Ok(job)
    }

    /// Waits until block job `job` is READY (source and target in sync). Fails when the job
    /// ends first (with QEMU's error) or `timeout` passes. Uses events and, as a fallback for
    /// an event missed before this call, polls `query-block-jobs`.
    pub async fn wait_block_job_ready(
        &self,
        job: &str,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        let qmp = self.qmp().await?;
        let mut events = qmp.events();
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = qmp
                .execute("query-block-jobs", Value::Null, qmp::DEFAULT_TIMEOUT)
                .await?;
            let entry = jobs
                .as_array()
                .and_then(|js| js.iter().find(|j| j["device"].as_str() == Some(job)));
            match entry {
                Some(j) if j["ready"].as_bool() == Some(true) => return Ok(()),
                Some(j) if j["status"].as_str() == Some("concluded") => {
                    let err = j["error"].as_str().unwrap_or("ended before READY");
                    return Err(self.job_error(job, format!("failed: {err}")));
                }
                Some(_) => {}
                None => return Err(self.job_error(job, "does not exist (any more)".into())),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::Timeout {
                    vmid: self.vmid(),
                    what: format!("READY of block job '{job}'"),
                    secs: timeout.as_secs_f64(),
                });
            }
            let wait = (deadline - now).min(Duration::from_secs(1));
            match events
                .wait_for(wait, |e| e.data["device"].as_str() == Some(job))
                .await
            {
                Ok(ev) if ev.name == "BLOCK_JOB_READY" => return Ok(()),
                Ok(ev) if ev.name == "BLOCK_JOB_COMPLETED" || ev.name == "BLOCK_JOB_CANCELLED" => {
                    let err = ev.data["error"].as_str().unwrap_or("ended before READY");
                    return Err(self.job_error(job, format!("failed: {err}")));
                }
                Ok(ev) if ev.name == "BLOCK_JOB_ERROR" => {
                    tracing::warn!(vmid = self.vmid(), job, "block job I/O error: {}", ev.data);
                }
                Ok(_) => {}
                Err(QmpError::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn job_error(&self, job: &str, what: String) -> QemuError {
        QemuError::BlockJob {
            vmid: self.vmid(),
            job: job.to_string(),
            what,
        }
    }

    /// Switches a mirror job to active (write-blocking) mode so guest writes cannot outrun it.
    /// Returns `false` when this QEMU lacks `block-job-change` (before 8.2): not an error.
    pub async fn mirror_write_blocking(&self, job: &str) -> Result<bool, QemuError> {
        let r = self
            .execute(
                "block-job-change",
                json!({"id": job, "type": "mirror", "copy-mode": "write-blocking"}),
                qmp::DEFAULT_TIMEOUT,
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.is_command_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Ends block job `job` cleanly (`block-job-cancel`; from READY this leaves a consistent
    /// target), waits for it to conclude and dismisses it. A job that no longer exists is fine.
    pub async fn block_job_cancel(&self, job: &str, timeout: Duration) -> Result<(), QemuError> {
        self.end_block_job(job, false, timeout).await
    }

    /// Ends block job `job` at once, its target left as it is (`block-job-cancel` with
    /// `force`: a READY mirror does not first drain to a target that may be out of reach),
    /// waits for it to conclude and dismisses it. A job that no longer exists is fine.
    pub async fn block_job_abort(&self, job: &str, timeout: Duration) -> Result<(), QemuError> {
        self.end_block_job(job, true, timeout).await
    }

    /// Ends and dismisses every job whose id starts with `prefix` (concluded ones are only
    /// dismissed), each within `timeout`; returns their ids. For jobs an earlier run left:
    /// a new job under the same id is refused while the old one exists ("Job ID
    /// 'mirror-scsi0' already in use").
    pub async fn clear_jobs(
        &self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, QemuError> {
        let jobs = self.cmd("query-jobs", Value::Null).await?;
        let ids: std::collections::BTreeSet<String> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| j["id"].as_str())
            .filter(|id| id.starts_with(prefix))
            .map(str::to_string)
            .collect();
        for id in &ids {
            self.block_job_abort(id, timeout).await?;
        }
        Ok(ids.into_iter().collect())
    }

    async fn end_block_job(
        &self,
        job: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        match self
            .execute(
                "block-job-cancel",
                json!({"device": job, "force": force}),
                qmp::DEFAULT_TIMEOUT,
            )
            .await
        {
            Ok(_) => {}
            // Gone, or already concluded (a mirror whose target vanished fails with an I/O
            // error and waits to be dismissed, refusing `cancel`): the loop below tells.
            Err(QmpError::Command { desc, .. }) => {
                tracing::debug!(vmid = self.vmid(), job, "block-job-cancel refused: {desc}");
            }
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.cmd("query-jobs", Value::Null).await?;
            let entry = jobs
                .as_array()
                .and_then(|js| js.iter().find(|j| j["id"].as_str() == Some(job)))
                .cloned();
            match entry {
                None => return Ok(()),
                Some(j) if j["status"].as_str() == Some("concluded") => {
                    if let Some(err) = j["error"].as_str() {
                        tracing::warn!(vmid = self.vmid(), job, "block job ended with: {err}");
                    }
                    self.cmd("job-dismiss", json!({"id": job})).await?;
                    return Ok(());
                }
                Some(_) if Instant::now() >= deadline => {
                    return Err(QemuError::Timeout {
                        vmid: self.vmid(),
                        what: format!("end of block job '{job}' after cancel"),
                        secs: timeout.as_secs_f64(),
                    });
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// `migrate-set-parameters` with the fields that are set.
    pub async fn migrate_set_parameters(&self, p: &MigrationParams) -> Result<(), QemuError> {
        let mut args = serde_json::Map::new();
        let mut put = |k: &str, v: Option<u64>| {
            if let Some(v) = v {
                args.insert(k.to_string(), json!(v));
            }
        };
        put("max-bandwidth", p.max_bandwidth);
        put("downtime-limit", p.downtime_limit);
        put("xbzrle-cache-size", p.xbzrle_cache_size);
        put("multifd-channels", p.multifd_channels);
        put("max-postcopy-bandwidth", p.max_postcopy_bandwidth);
        put("avail-switchover-bandwidth", p.avail_switchover_bandwidth);
        put("cpu-throttle-increment", p.cpu_throttle_increment);
        if let Some(c) = &p.multifd_compression {
            args.insert("multifd-compression".into(), json!(c));
        }
        if args.is_empty() {
            return Ok(());
        }
        self.cmd("migrate-set-parameters", Value::Object(args))
            .await
            .map(|_| ())
    }

    /// Starts the RAM migration to `uri` (e.g. `unix:/run/qemu-server/100.migrate`). QEMU
    /// answers `{}` even when nobody listens: watch [`VmHandle::wait_migration`].
    pub async fn migrate(&self, uri: &str) -> Result<(), QemuError> {
        self.cmd("migrate", json!({ "uri": uri })).await.map(|_| ())
    }

    /// Starts the RAM migration into `conn` (one end of a socket pair whose other end the
    /// caller relays): QEMU gets the descriptor over QMP and writes to it as to its own
    /// socket, so the caller chooses the socket's buffer.
    pub async fn migrate_into(&self, conn: std::os::fd::BorrowedFd<'_>) -> Result<(), QemuError> {
        const FDNAME: &str = "mtunnel-migrate";
        if let Err(e) = self.send_fd(FDNAME, conn, qmp::DEFAULT_TIMEOUT).await {
            // QEMU may have taken it before the error (a timeout): it must not keep it.
            let _ = self.cmd("closefd", json!({ "fdname": FDNAME })).await;
            return Err(e.into());
        }
        if let Err(e) = self.migrate(&format!("fd:{FDNAME}")).await {
            // Refused: QEMU would otherwise keep its copy of the descriptor.
            let _ = self.cmd("closefd", json!({ "fdname": FDNAME })).await;
            return Err(e);
        }
        Ok(())
    }

    /// `migrate-start-postcopy`: the source stops the guest, sends its device state and
    /// from then on the target runs it, fetching pages it lacks from the source.
    pub async fn migrate_start_postcopy(&self) -> Result<(), QemuError> {
        self.cmd("migrate-start-postcopy", Value::Null)
            .await
            .map(|_| ())
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationProgress, QemuError> {
        let v = self.cmd("query-migrate", Value::Null).await?;
        Ok(MigrationProgress::from_reply(&v))
    }

    /// Polls `query-migrate` until `completed` (Ok), `failed`/`cancelled` (error with QEMU's
    /// description), no progress for `w.stall`, or `w.timeout`. `on_progress` sees every sample.
    pub async fn wait_migration(
        &self,
        w: MigrationWait,
        mut on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, QemuError> {
        let start = Instant::now();
        let mut last_change = start;
        let mut last_seen: Option<(String, u64)> = None;
        // The guest is paused from `STOP` until the caller sees `completed` and resumes the
        // target: from `STOP` on, poll at SWITCHOVER_POLL instead of `w.poll`.
        let mut events = self.qmp().await.ok().map(|q| q.events());
        let mut stopped_at: Option<Instant> = None;
        loop {
            let p = self.query_migrate().await?;
            on_progress(&p);
            match p.status.as_str() {
                "completed" => return Ok(p),
                "failed" | "cancelled" => {
                    return Err(QemuError::Migration {
                        vmid: self.vmid(),
                        status: p.status.clone(),
                        desc: p
                            .error_desc
                            .clone()
                            .unwrap_or_else(|| "no description from QEMU".into()),
                    });
                }
                _ => {}
            }
            let now = Instant::now();
            let key = (p.status.clone(), p.transferred);
            if last_seen.as_ref() != Some(&key) {
                last_seen = Some(key);
                last_change = now;
            } else if now - last_change >= w.stall {
                return Err(QemuError::MigrationStalled {
                    vmid: self.vmid(),
                    secs: w.stall.as_secs_f64(),
                    status: p.status,
                    transferred: p.transferred,
                });
            }
            if now - start >= w.timeout {
                return Err(QemuError::Timeout {
                    vmid: self.vmid(),
                    what: MIGRATION_COMPLETION.into(),
                    secs: w.timeout.as_secs_f64(),
                });
            }
            // Bounded: a STOP by someone else (a user's `stop`) must not poll fast for long.
            let switchover = stopped_at.is_some_and(|t| now - t < SWITCHOVER_FAST);
            let poll = if switchover { SWITCHOVER_POLL } else { w.poll };
            if next_sample(&mut events, poll).await && stopped_at.is_none() {
                stopped_at = Some(Instant::now());
            }
        }
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<(), QemuError> {
        self.cmd("migrate_cancel", Value::Null).await.map(|_| ())
    }

    /// Writes `size` bytes of guest-physical memory from `addr` to `file` (on the host).
    pub async fn pmemsave(&self, addr: u64, size: u64, file: &Path) -> Result<(), QemuError> {
        self.cmd(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": file.to_string_lossy()}),
        )
        .await
        .map(|_| ())
    }

    /// The guest agent of this VM (`{run}/{vmid}.qga`).
    pub fn agent(&self) -> Agent {
        Agent::new(&self.paths().qga)
    }
}
