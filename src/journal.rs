//! The durable record of what one tunnel created ([`Created`]) and the one way to free it
//! ([`free_created`]), used alike when a tunnel ends (any way: `quit cleanup=1`, a lost
//! connection, a dead peer, shutdown) and when a restarted `serve` or `mtunnel cleanup`
//! recovers the tunnels of a process that died.
//!
//! Each open tunnel keeps `{data}/tunnels/{vmid}.json`, rewritten atomically and fsync'd
//! before the reply of every command that changed it. Intents are recorded before the act
//! (`vm_started` before QEMU starts, `resume_requested` before `cont`), so a crash in
//! between errs on the side of freeing what may exist, or of keeping a VM that may be
//! live. Volumes created in flight (an `alloc` or a partial import when the process died)
//! are found as the VMID's volumes that did not exist when the tunnel opened: the VMID was
//! reserved by this tunnel the whole time, so nobody else can have made them.
//!
//! A journal acts only on what it can prove is its own: the config must carry the
//! tunnel's reservation id as its origin ([`crate::guest::ConfigStore::origin`]), so a
//! stale journal never touches a later VM of the same VMID; and a journal must pass
//! [`validate`] (its file name, UPID, sockets and volumes all of its own VMID), so a
//! crafted or damaged one is set aside unread ([`set_aside`]), never acted on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::guest::{ConfigStore, Hypervisor, VmConfig};
use crate::metrics::{Metrics, cleanup_action};
use crate::storage::Storage;
use crate::task::TaskLog;

/// What freeing a tunnel's leftovers reads and touches, and nothing more: the node's VM
/// configs, its storage and hypervisor, the metrics it counts into and where things live.
/// The composition root (`node::Node`) and a handler's [`crate::command::Host`] hand it
/// out; a journal never sees the whole node.
#[derive(Clone)]
pub struct Services {
    pub guests: Arc<ConfigStore>,
    pub storage: Arc<dyn Storage>,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub metrics: Arc<Metrics>,
    pub dirs: Dirs,
}

/// The node's directories a journal and its freeing use.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// The journals themselves (`{data}/tunnels`).
    pub journal_dir: PathBuf,
    /// VM sockets, pidfiles and the replicas' NBD servers.
    pub run_dir: PathBuf,
    /// Replica records.
    pub data_dir: PathBuf,
    /// Firewall files a tunnel wrote (`{vmid}.fw`).
    pub firewall_dir: PathBuf,
}

/// The process that owns a tunnel: pid and start time (as the UPID names it) and the boot
/// it ran in, so a pid reused after a reboot is not taken for the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Owner {
    pub pid: u32,
    pub pstart: u64,
    #[serde(default)]
    pub boot_id: String,
}

impl Owner {
    /// This process.
    pub fn current() -> Self {
        Owner {
            pid: std::process::id(),
            pstart: crate::task::process_start_ticks(std::process::id()).unwrap_or(0),
            boot_id: boot_id(),
        }
    }

    /// Whether the owning process still runs: same boot, same pid, same start time. When
    /// `/proc` cannot tell (hidden pids, another pid namespace), it counts as alive:
    /// mistaking a live tunnel for a dead one would destroy a migration in progress.
    pub fn is_alive(&self) -> bool {
        if !self.boot_id.is_empty() && self.boot_id != boot_id() {
            return false;
        }
        match std::fs::metadata(format!("/proc/{}", self.pid)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => true,
            Ok(_) => match crate::task::process_start_ticks(self.pid) {
                Some(start) => start == self.pstart,
                // Gone (or a zombie) between the two reads.
                None => !std::path::Path::new(&format!("/proc/{}", self.pid)).exists(),
            },
        }
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What a tunnel created and how far it got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Created {
    pub vmid: u32,
    /// The tunnel's task, whose log recovery ends.
    pub upid: String,
    pub owner: Owner,
    /// The id the tunnel reserved the VMID under, also the config's origin: the proof
    /// that the config (and what was made for it) is this tunnel's. Empty in journals of
    /// older versions: then nothing of the VM is provably ours.
    #[serde(default)]
    pub reservation: String,
    /// Volumes of the VMID that existed when the tunnel opened, by storage: never freed.
    /// Only the storages listed here were scanned, so only they are scanned for volumes
    /// made in flight.
    pub preexisting: BTreeMap<String, Vec<String>>,
    /// Volumes this tunnel allocated or imported.
    pub volumes: Vec<String>,
    /// A disk import was running (its partial volume is found by the preexisting rule).
    pub import_running: bool,
    /// A target VM was (or was being) started.
    pub vm_started: bool,
    /// `resume` was asked for: from here on the target VM may be the only live copy.
    pub resume_requested: bool,
    /// The migration passed its point of no return (`resume`/`unlock` succeeded).
    pub committed: bool,
    pub firewall_written: bool,
    /// The lock the config must carry for cleanup to touch it (`create`, then `migrate`).
    pub expected_lock: Option<String>,
    /// Sockets in the run dir that belong to this tunnel.
    pub sockets: Vec<PathBuf>,
    /// Everything was freed (`quit cleanup=1`): the VMID may already belong to a new
    /// tunnel, so nothing may be freed in its name again.
    #[serde(default)]
    pub released: bool,
    /// The tunnel ended with its cleanup incomplete: no worker owns the journal any more,
    /// so `mtunnel cleanup` may retry it while `serve` runs.
    #[serde(default)]
    pub abandoned: bool,
    /// A replica run (docs/replicas.md): its NBD servers (`{run}/{vmid}-<key>.replica`)
    /// are stopped whenever the tunnel is freed, even once the replica is committed.
    #[serde(default)]
    pub replica: bool,
}

impl Created {
    /// Whether freeing may stop the VM and destroy its volumes and config.
    pub fn may_destroy(&self) -> bool {
        !self.committed && !self.resume_requested
    }
}

/// `{data}/tunnels/{upid}.json`: one file per tunnel, so a tunnel still closing and the
/// next one of the same VMID never share a journal.
pub fn journal_path(journal_dir: &Path, upid: &str) -> PathBuf {
    journal_dir.join(format!("{upid}.json"))
}

/// Writes the record durably (atomic rename, file and directory fsync'd).
pub fn store(journal_dir: &Path, created: &Created) -> anyhow::Result<()> {
    crate::util::ensure_dir(journal_dir, 0o700)?;
    let text = serde_json::to_vec_pretty(created)?;
    crate::util::write_atomic(&journal_path(journal_dir, &created.upid), &text, 0o600)
}

/// Like [`store`], off the async runtime.
pub async fn store_async(journal_dir: PathBuf, created: Created) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || store(&journal_dir, &created))
        .await
        .map_err(|e| anyhow::anyhow!("journal writer failed: {e}"))?
}

/// The journal of tunnel `upid`, if it exists and reads.
pub fn load(journal_dir: &Path, upid: &str) -> Option<Created> {
    let bytes = std::fs::read(journal_path(journal_dir, upid)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remove(journal_dir: &Path, upid: &str) {
    match std::fs::remove_file(journal_path(journal_dir, upid)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(upid, "removing tunnel journal: {e}"),
    }
}

/// A journal that cannot be trusted: where it is and why.
#[derive(Debug)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

/// Every journal in the directory that passes [`validate`], newest first within a
/// VMID (a later tunnel of a VMID is recovered before an older one); the others, with
/// the reason, for [`set_aside`].
pub fn load_all(journal_dir: &Path, run_dir: &Path) -> (Vec<Created>, Vec<Rejected>) {
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    let Ok(entries) = std::fs::read_dir(journal_dir) else {
        return (out, rejected);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") || !path.is_file() {
            continue;
        }
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let read = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Created>(&b).map_err(|e| e.to_string()))
            .and_then(|c| validate(&c, &file_name, run_dir).map(|()| c));
        match read {
            Ok(c) => out.push(c),
            Err(reason) => rejected.push(Rejected { path, reason }),
        }
    }
    let started = |c: &Created| {
        c.upid
            .parse::<crate::task::Upid>()
            .map(|u| u.starttime)
            .unwrap_or(0)
    };
    out.sort_by_key(|c| (c.vmid, std::cmp::Reverse(started(c))));
    (out, rejected)
}

/// Whether a journal is one a tunnel of this node wrote: its file is `{upid}.json`, the
/// UPID is a tunnel task of its VMID, it expects one of a tunnel's locks (or none, once
/// committed), and its sockets
/// (tunnel sockets of that VMID in the run dir) and volumes (of that VMID) are its own.
pub fn validate(c: &Created, file_name: &str, run_dir: &Path) -> Result<(), String> {
    let vmid = c.vmid;
    let upid: crate::task::Upid = c
        .upid
        .parse()
        .map_err(|_| format!("'{}' is not a UPID", c.upid))?;
    if file_name != format!("{}.json", c.upid) {
        return Err(format!(
            "its file name does not match its UPID '{}'",
            c.upid
        ));
    }
    if upid.kind != "qmtunnel" || upid.id != vmid.to_string() {
        return Err(format!("UPID '{}' is not a tunnel of VM {vmid}", c.upid));
    }
    // After `unlock` a committed tunnel expects no lock (and never destroys anything).
    let lock_ok = match c.expected_lock.as_deref() {
        Some("create" | "migrate" | "replica") => true,
        None => c.committed,
        Some(_) => false,
    };
    if !lock_ok {
        return Err(format!(
            "it expects the lock {:?}, not 'create', 'migrate' or 'replica'",
            c.expected_lock
        ));
    }
    let own_sockets = [format!("{vmid}.mtunnel"), format!("{vmid}.storage")];
    for socket in &c.sockets {
        let own = socket.parent() == Some(run_dir)
            && socket
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| own_sockets.iter().any(|o| o == n));
        if !own {
            return Err(format!(
                "socket {} is not a tunnel socket of VM {vmid} in {}",
                socket.display(),
                run_dir.display()
            ));
        }
    }
    let preexisting = c.preexisting.values().flatten();
    for volid in c.volumes.iter().chain(preexisting) {
        match crate::storage::VolumeId::parse(volid) {
            Ok(v) if v.vmid == vmid => {}
            _ => return Err(format!("volume '{volid}' is not a volume of VM {vmid}")),
        }
    }
    Ok(())
}

/// Moves a rejected journal to `{journal_dir}/rejected/` (so no later start reads it
/// again) and says where; it stays there for an operator to look at.
pub fn set_aside(journal_dir: &Path, rejected: &Rejected) -> String {
    let dir = journal_dir.join("rejected");
    let name = rejected
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = dir.join(format!("{}-{name}", crate::util::unix_now()));
    let moved = crate::util::ensure_dir(&dir, 0o700)
        .and_then(|()| Ok(std::fs::rename(&rejected.path, &target)?));
    match moved {
        Ok(()) => format!(
            "tunnel journal {} not trusted ({}): set aside as {}, nothing done",
            rejected.path.display(),
            rejected.reason,
            target.display()
        ),
        Err(e) => format!(
            "tunnel journal {} not trusted ({}): nothing done; moving it aside failed: {e:#}",
            rejected.path.display(),
            rejected.reason
        ),
    }
}

/// Retires the journals of `vmid` that no live worker owns (its process is gone, or it
/// gave up on its cleanup) because the VMID was given a new life: destroyed or unlocked
/// by an operator, or reserved by a new tunnel. An abandoned journal (its task ended) is
/// removed; one of a dead process is marked released, so recovery frees nothing in its
/// name and only ends its task log. Returns one line per journal retired.
pub fn retire(journal_dir: &Path, run_dir: &Path, vmid: u32, why: &str) -> Vec<String> {
    let (journals, _) = load_all(journal_dir, run_dir);
    let mut lines = Vec::new();
    for mut c in journals.into_iter().filter(|c| c.vmid == vmid) {
        let result = if c.abandoned {
            std::fs::remove_file(journal_path(journal_dir, &c.upid)).map_err(Into::into)
        } else if !c.owner.is_alive() && !c.released {
            c.released = true;
            store(journal_dir, &c)
        } else {
            continue;
        };
        lines.push(match result {
            Ok(()) => format!("retired the journal of tunnel {} ({why})", c.upid),
            Err(e) => format!("retiring the journal of tunnel {} failed: {e:#}", c.upid),
        });
    }
    for line in &lines {
        tracing::info!(vmid, "{line}");
    }
    lines
}

/// Where freeing reports each step: a task log (live tunnel) or a line sink (recovery).
pub trait Report: Send + Sync {
    fn info(&self, msg: &str);
    fn warn(&self, msg: &str);
}

impl Report for TaskLog {
    fn info(&self, msg: &str) {
        tracing::info!("{msg}");
        self.log(msg);
    }
    fn warn(&self, msg: &str) {
        tracing::warn!("{msg}");
        TaskLog::warn(self, msg);
    }
}

/// What [`free_created`] did, for a caller that must say so.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub vm_stopped: bool,
    pub volumes: Vec<String>,
    pub config_removed: bool,
    /// The VM was past `resume` (or the lock was someone else's): left in place.
    pub kept: bool,
    /// A step failed: what is left is still this tunnel's (the journal stays, so a later
    /// recovery can finish).
    pub failed: bool,
}

/// Whose the VMID's config is, as far as `created` can prove.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    /// The config carries this tunnel's reservation id: it and what was made for it are
    /// this tunnel's (within what the journal records).
    Ours,
    /// No config: nobody holds the VMID (checked under its lock), so what the journal
    /// records is still only this tunnel's.
    Gone,
    /// The config is another one (why, for the log): nothing of the VMID is ours.
    Other(&'static str),
}

/// Why the VMID's config is not `created`'s to free (`None`: it is, or there is none).
pub fn not_ours(svc: &Services, created: &Created) -> Option<&'static str> {
    match claim(svc, created) {
        Claim::Other(why) => Some(why),
        Claim::Ours | Claim::Gone => None,
    }
}

fn claim(svc: &Services, created: &Created) -> Claim {
    if !svc.guests.exists(created.vmid) {
        return Claim::Gone;
    }
    match svc.guests.origin(created.vmid) {
        Some(origin) if !created.reservation.is_empty() && origin == created.reservation => {
            Claim::Ours
        }
        Some(_) => Claim::Other("was reserved anew (by another tunnel)"),
        None => Claim::Other("is not one this tunnel reserved (no reservation of it is on record)"),
    }
}

/// Frees what `created` lists, holding the VM's config lock throughout (`guard`, if the
/// caller already holds it): stops a VM it started, frees its volumes (and volumes of the
/// VMID made since it opened), removes a firewall file it wrote, the config it reserved
/// and its sockets. Only what the tunnel can prove is its own (`claim`) is touched: a
/// later config of the same VMID, with its VM and volumes, is left alone. A VM past
/// `resume` is never touched; neither is a config another lock took over. If the VM
/// cannot be stopped, nothing else is freed (its disks are in use). Each step is
/// reported; a failing step is a warning and marks the result failed.
pub async fn free_created(
    svc: &Services,
    created: &Created,
    guard: Option<&crate::guest::VmLockGuard>,
    report: &dyn Report,
) -> Freed {
    let vmid = created.vmid;
    let mut freed = Freed::default();
    if created.released {
        return freed;
    }
    let taken;
    let guard = match guard {
        Some(g) => g,
        None => match svc
            .guests
            .lock(vmid, crate::guest::store::DEFAULT_LOCK_TIMEOUT)
            .await
        {
            Ok(g) => {
                taken = g;
                &taken
            }
            Err(e) => {
                report.warn(&format!(
                    "cleanup: cannot take the config lock of VM {vmid}: {e} - nothing freed \
                     yet (retried later)"
                ));
                freed.failed = true;
                return freed;
            }
        },
    };
    let claim = claim(svc, created);
    let lock_refusal = |found: String| {
        format!(
            "cleanup: config of VM {vmid} {found}, not '{}' - leaving the VM, its volumes and \
             its config in place",
            created.expected_lock.as_deref().unwrap_or("")
        )
    };
    if let Claim::Other(why) = claim {
        report.warn(&foreign_lock(svc, created).map_or_else(
            || {
                format!(
                    "cleanup: the config of VM {vmid} {why} - leaving that VM, its config, its \
                     volumes and its sockets alone"
                )
            },
            lock_refusal,
        ));
        svc.metrics.cleanup(cleanup_action::VM_KEPT);
        freed.kept = true;
        return freed;
    }
    // The VMID is this tunnel's (or nobody's): so are these paths.
    remove_sockets(svc, created);
    if created.replica {
        for line in crate::replica::stop_servers(&svc.dirs.run_dir, vmid).await {
            report.info(&format!("cleanup: {line}"));
        }
        if let Err(e) = crate::replica::run_failed(&svc.dirs.data_dir, vmid, &created.upid) {
            report.warn(&format!("cleanup: counting the failed replica run: {e:#}"));
        }
        // A migration that cut over to the replica and never resumed its VM: the incoming
        // QEMU on the working copies ran no guest (docs/replicas.md, "Cut over").
        if created.vm_started
            && !created.resume_requested
            && !stop_vm(svc, vmid, report, &mut freed).await
        {
            return freed;
        }
    }
    let refusal = if !created.may_destroy() {
        Some(kept_message(created))
    } else if claim == Claim::Ours {
        foreign_lock(svc, created).map(lock_refusal)
    } else {
        None
    };
    if let Some(refusal) = refusal {
        report.warn(&refusal);
        svc.metrics.cleanup(cleanup_action::VM_KEPT);
        freed.kept = true;
        return freed;
    }
    if created.vm_started && !stop_vm(svc, vmid, report, &mut freed).await {
        return freed;
    }
    let volumes = volumes_to_free(svc, created).await;
    free_volumes(svc, volumes, report, &mut freed).await;
    if freed.failed {
        // The config keeps the VMID reserved: no next tunnel may take it (and have its
        // volumes counted as this one's) before a retry has freed what is left.
        if claim == Claim::Ours {
            report.warn(&format!(
                "cleanup: leaving the config of VM {vmid} in place until its volumes are freed"
            ));
        }
        return freed;
    }
    if created.firewall_written {
        remove_firewall(svc, vmid, report, &mut freed);
    }
    if claim == Claim::Ours {
        match svc.guests.remove_locked(guard) {
            Ok(()) => {
                report.info(&format!("cleanup: removed config of VM {vmid}"));
                if created.replica
                    && let Err(e) = crate::replica::remove(&svc.dirs.data_dir, vmid)
                {
                    report.warn(&format!("cleanup: {e:#}"));
                }
                svc.metrics.cleanup(cleanup_action::CONFIG_REMOVED);
                freed.config_removed = true;
            }
            Err(e) => {
                report.warn(&format!(
                    "cleanup: removing config of VM {vmid} failed: {e}"
                ));
                freed.failed = true;
            }
        }
    }
    freed
}

/// Stops the VM; false (reported, `freed.failed`) if that failed.
async fn stop_vm(svc: &Services, vmid: u32, report: &dyn Report, freed: &mut Freed) -> bool {
    match svc.hypervisor.stop(vmid).await {
        Ok(()) => {
            report.info(&format!("cleanup: stopped VM {vmid}"));
            svc.metrics.cleanup(cleanup_action::VM_STOPPED);
            freed.vm_stopped = true;
            true
        }
        Err(e) => {
            report.warn(&format!(
                "cleanup: stopping VM {vmid} failed: {e:#} - leaving its volumes and config \
                 in place"
            ));
            freed.failed = true;
            false
        }
    }
}

fn remove_firewall(svc: &Services, vmid: u32, report: &dyn Report, freed: &mut Freed) {
    let path = svc.dirs.firewall_dir.join(format!("{vmid}.fw"));
    match std::fs::remove_file(path) {
        Ok(()) => {
            report.info("cleanup: removed firewall file");
            svc.metrics.cleanup(cleanup_action::FIREWALL_REMOVED);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            report.warn(&format!("cleanup: removing firewall file failed: {e}"));
            freed.failed = true;
        }
    }
}

fn kept_message(created: &Created) -> String {
    let vmid = created.vmid;
    if created.resume_requested {
        format!(
            "VM {vmid} was resumed on this node and may be the only live copy: leaving it \
             running with its volumes and its config (lock kept until 'unlock')"
        )
    } else if created.replica {
        format!(
            "the replica of VM {vmid} is committed (restore points, or a run to continue): \
             leaving its config, working copies and points"
        )
    } else {
        format!("the migration of VM {vmid} was committed: leaving the VM and its volumes")
    }
}

async fn free_volumes(
    svc: &Services,
    volumes: Vec<String>,
    report: &dyn Report,
    freed: &mut Freed,
) {
    for volid in volumes {
        match svc.storage.free(&volid).await {
            Ok(()) => {
                report.info(&format!("cleanup: freed volume '{volid}'"));
                svc.metrics.cleanup(cleanup_action::VOLUME_FREED);
                freed.volumes.push(volid);
            }
            Err(e) => {
                report.warn(&format!("cleanup: freeing volume '{volid}' failed: {e}"));
                freed.failed = true;
            }
        }
    }
}

/// The config's lock if it is not the one this tunnel expects (`None`: ours, or gone).
fn foreign_lock(svc: &Services, created: &Created) -> Option<String> {
    let Some(expected) = created.expected_lock.as_ref() else {
        return Some("is not one this tunnel expects a lock on".to_string());
    };
    let conf = match svc.guests.read_text(created.vmid) {
        Ok(text) => match VmConfig::parse(&text) {
            Ok(conf) => conf,
            Err(e) => return Some(format!("cannot be parsed ({e})")),
        },
        Err(crate::guest::GuestError::Missing { .. }) => return None,
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    match conf.options.get("lock") {
        Some(lock) if lock == expected => None,
        // `config` writes `lock: migrate` just before the tunnel records that it expects
        // it: a crash in between must not orphan the VM.
        Some(lock) if expected == "create" && (lock == "migrate" || lock == "replica") => None,
        Some(lock) => Some(format!("is locked '{lock}'")),
        None => Some("has no lock".to_string()),
    }
}

/// The VMID's volumes that did not exist when the tunnel opened, on the storages listed
/// then (they include the recorded ones and any made in flight), plus recorded ones on
/// storages that cannot be listed now. A recorded volume that is gone is skipped, so a
/// second recovery does not fail on what the first one freed.
pub async fn volumes_to_free(svc: &Services, created: &Created) -> Vec<String> {
    let now = match svc.storage.volumes_by_storage(created.vmid).await {
        Ok(now) => now,
        Err(e) => {
            tracing::debug!(vmid = created.vmid, "listing volumes: {e}");
            return created.volumes.clone();
        }
    };
    let storage_of = |v: &str| v.split_once(':').map(|(s, _)| s.to_string());
    let mut out: Vec<String> = created
        .volumes
        .iter()
        .filter(|v| storage_of(v).is_none_or(|s| !now.contains_key(&s)))
        .cloned()
        .collect();
    for (storage, vols) in now {
        let Some(before) = created.preexisting.get(&storage) else {
            // Not listed at open: only what was recorded there is known to be ours.
            out.extend(vols.into_iter().filter(|v| created.volumes.contains(v)));
            continue;
        };
        out.extend(vols.into_iter().filter(|v| !before.contains(v)));
    }
    out.sort();
    out.dedup();
    out
}

fn remove_sockets(svc: &Services, created: &Created) {
    for socket in &created.sockets {
        if std::fs::remove_file(socket).is_ok() {
            svc.metrics.cleanup(cleanup_action::SOCKET_REMOVED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(expected_lock: Option<&str>, committed: bool) -> Created {
        Created {
            vmid: 100,
            upid: "UPID:n1:00000001:00000001:00000001:qmtunnel:100:root@pam:".into(),
            expected_lock: expected_lock.map(str::to_string),
            committed,
            sockets: vec![PathBuf::from("/run/x/100.mtunnel")],
            volumes: vec!["local:100/vm-100-disk-0.raw".into()],
            ..Created::default()
        }
    }

    #[test]
    fn validation_accepts_what_tunnels_write_and_nothing_else() {
        let run = Path::new("/run/x");
        let ok = |c: &Created| validate(c, &format!("{}.json", c.upid), run);
        assert_eq!(ok(&journal(Some("create"), false)), Ok(()));
        assert_eq!(ok(&journal(Some("migrate"), false)), Ok(()));
        // A replica run's tunnel (docs/replicas.md).
        assert_eq!(ok(&journal(Some("replica"), true)), Ok(()));
        // After `unlock`: committed, no lock expected.
        assert_eq!(ok(&journal(None, true)), Ok(()));
        assert!(ok(&journal(None, false)).is_err());
        assert!(ok(&journal(Some("backup"), false)).is_err());
        let mut other_vm = journal(Some("migrate"), false);
        other_vm.volumes = vec!["local:101/vm-101-disk-0.raw".into()];
        assert_eq!(
            ok(&other_vm),
            Err("volume 'local:101/vm-101-disk-0.raw' is not a volume of VM 100".into())
        );
        let mut outside = journal(Some("migrate"), false);
        outside.sockets = vec![PathBuf::from("/run/x/../100.mtunnel")];
        assert!(ok(&outside).is_err());
        let c = journal(Some("migrate"), false);
        assert!(validate(&c, "other.json", run).is_err());
    }
}
