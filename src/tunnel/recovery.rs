//! Recovery after a crash and the operator's `mtunnel cleanup`: finds what tunnels of a
//! dead `serve` process left (their journals in `{data}/tunnels/`), frees exactly that
//! through the same path a live tunnel's cleanup takes ([`journal::free_created`]), ends
//! their task logs with the reason, and removes stale tunnel sockets. `serve` runs it at
//! start, before it accepts connections; a crash during recovery leaves the journal in
//! place, so the next start finishes the job (every step tolerates "already gone").
//!
//! [`find_leftovers`] also lists what no journal explains — empty `lock: create`
//! reservations, configs locked by no live tunnel, volumes of VMIDs without a config —
//! for `mtunnel cleanup`, which frees the first and last kind and names the commands for
//! the middle one (only an operator can tell whether such a VM is complete).

use std::sync::{Arc, Mutex};

use crate::guest::VmConfig;
use crate::journal::{self, Created, Report};
use crate::task::TaskManager;

/// What recovery reads and frees through: the journals' services and the task logs it
/// ends (nothing else of the node).
#[derive(Clone)]
pub struct Services {
    pub journal: journal::Services,
    pub tasks: Arc<TaskManager>,
}

/// Collects what freeing reports, for the task log and the caller's output.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Report for Lines {
    fn info(&self, msg: &str) {
        tracing::info!("{msg}");
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg.into());
    }
    fn warn(&self, msg: &str) {
        tracing::warn!("{msg}");
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("WARN: {msg}"));
    }
}

/// What recovery did (or, dry, would do) for one dead tunnel.
#[derive(Debug)]
pub struct Recovered {
    pub vmid: u32,
    pub upid: String,
    pub lines: Vec<String>,
}

/// Who recovers, for the task logs: `serve` at its start or `mtunnel cleanup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveredBy {
    Restart,
    Cleanup,
}

/// Which journals no worker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphans {
    /// The caller holds the data dir's lock (`serve.lock`): no `serve` runs, so every
    /// journal is of a dead process — also one whose pid and start time a new boot happens
    /// to repeat.
    All,
    /// `serve` runs: only journals its workers gave up on (cleanup incomplete).
    Abandoned,
}

/// Frees what every orphaned tunnel created and ends its task log; with `dry_run`, only
/// describes it.
pub async fn recover_dead_tunnels(
    svc: &Services,
    which: Orphans,
    dry_run: bool,
    by: RecoveredBy,
) -> Vec<Recovered> {
    let (journals, _untrusted) =
        journal::load_all(&svc.journal.dirs.journal_dir, &svc.journal.dirs.run_dir);
    let mut out = Vec::new();
    for created in journals {
        if which == Orphans::Abandoned && !created.abandoned {
            continue;
        }
        let lines = if dry_run {
            describe(svc, &created).await
        } else {
            recover_one(svc, &created, by).await
        };
        out.push(Recovered {
            vmid: created.vmid,
            upid: created.upid.clone(),
            lines,
        });
    }
    out
}

async fn recover_one(svc: &Services, created: &Created, by: RecoveredBy) -> Vec<String> {
    let report = Lines::default();
    report.info(&format!(
        "recovery: mtunnel (pid {}) ended while this tunnel was open; freeing what it created",
        created.owner.pid
    ));
    let freed = journal::free_created(&svc.journal, created, None, &report).await;
    if by == RecoveredBy::Restart {
        svc.journal
            .metrics
            .cleanup(crate::metrics::cleanup_action::RECOVERED_AT_START);
        // Its migration never ended in this process: count how it ends here.
        if !created.committed {
            (svc.journal.metrics)
                .migration_failed(crate::metrics::migration_failure::CRASH_RECOVERED);
        }
    }
    let lines = report.0.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Ok(upid) = created.upid.parse() {
        let when = match by {
            RecoveredBy::Restart => "recovered at restart",
            RecoveredBy::Cleanup => "recovered by 'mtunnel cleanup'",
        };
        let reason = if freed.failed {
            format!(
                "mtunnel was stopped or crashed during the migration; {when}, but not \
                 everything could be freed (retried at the next start)"
            )
        } else if created.resume_requested {
            format!(
                "mtunnel was stopped or crashed after the VM was resumed; {when}, the VM was \
                 left running"
            )
        } else if created.committed {
            format!("mtunnel was stopped or crashed after the migration was committed; {when}")
        } else {
            format!("mtunnel was stopped or crashed during the migration; {when}")
        };
        if let Err(e) = svc.tasks.end_orphan(&upid, &lines, &reason) {
            tracing::warn!(upid = %created.upid, "ending task log: {e:#}");
        }
    }
    // An incomplete recovery keeps the journal: the next one finishes the job.
    if !freed.failed {
        journal::remove(&svc.journal.dirs.journal_dir, &created.upid);
    }
    lines
}

async fn describe(svc: &Services, created: &Created) -> Vec<String> {
    let mut lines = vec![format!(
        "tunnel {} of VM {} (mtunnel pid {} is gone)",
        created.upid, created.vmid, created.owner.pid
    )];
    if created.released {
        lines.push("  everything was freed already; only the journal is left".into());
        return lines;
    }
    if let Some(why) = journal::not_ours(&svc.journal, created) {
        lines.push(format!(
            "  the config of VM {} {why}: nothing would be touched",
            created.vmid
        ));
        return lines;
    }
    if !created.may_destroy() {
        lines.push(
            "  the migration was committed: the VM would be kept, only sockets removed".into(),
        );
        return lines;
    }
    if created.vm_started {
        lines.push(format!("  would stop VM {}", created.vmid));
    }
    for v in journal::volumes_to_free(&svc.journal, created).await {
        lines.push(format!("  would free volume '{v}'"));
    }
    lines.push(format!(
        "  would remove the config of VM {} if still locked '{}'",
        created.vmid,
        created.expected_lock.as_deref().unwrap_or("-")
    ));
    lines
}

/// Sets aside every journal that fails [`journal::validate`] (unreadable, or naming
/// sockets, volumes or a UPID that are not its VMID's): it is never acted on. With
/// `dry_run`, only says so. One line per journal.
pub fn set_aside_untrusted(svc: &Services, dry_run: bool) -> Vec<String> {
    let dir = &svc.journal.dirs.journal_dir;
    let (_, untrusted) = journal::load_all(dir, &svc.journal.dirs.run_dir);
    untrusted
        .iter()
        .map(|r| {
            let line = if dry_run {
                format!(
                    "would set aside tunnel journal {} (not trusted: {})",
                    r.path.display(),
                    r.reason
                )
            } else {
                journal::set_aside(dir, r)
            };
            tracing::warn!("{line}");
            line
        })
        .collect()
}

/// What no journal explains, found by [`find_leftovers`].
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Configs that are only `lock: create` (an empty reservation) with no live tunnel.
    pub empty_reservations: Vec<u32>,
    /// Configs locked `create`/`migrate` with content, by no live tunnel: (vmid, lock).
    pub locked_configs: Vec<(u32, String)>,
    /// Volumes of VMIDs that have no config and no live tunnel.
    pub orphaned_volumes: Vec<String>,
    /// Tunnel and import sockets in the run dir that no live tunnel owns.
    pub stale_sockets: Vec<std::path::PathBuf>,
}

/// Lists leftovers; VMIDs with a live tunnel (a journal of a running process) are skipped.
pub async fn find_leftovers(svc: &Services) -> Leftovers {
    let (journals, _) = journal::load_all(&svc.journal.dirs.journal_dir, &svc.journal.dirs.run_dir);
    let live: Vec<&Created> = journals.iter().filter(|c| c.owner.is_alive()).collect();
    let is_live = |vmid: u32| live.iter().any(|c| c.vmid == vmid);
    let mut out = Leftovers::default();
    for vmid in svc.journal.guests.list() {
        if is_live(vmid) {
            continue;
        }
        let Ok(text) = svc.journal.guests.read_text(vmid) else {
            continue;
        };
        if text.trim() == "lock: create" {
            out.empty_reservations.push(vmid);
        } else if let Ok(conf) = VmConfig::parse(&text)
            && let Some(lock) = conf.options.get("lock")
            && (lock == "create" || lock == "migrate")
        {
            out.locked_configs.push((vmid, lock.clone()));
        }
    }
    if let Ok(vmids) = svc.journal.storage.vmids_with_volumes().await {
        for vmid in vmids {
            if is_live(vmid) || svc.journal.guests.exists(vmid) {
                continue;
            }
            if let Ok(vols) = svc.journal.storage.volumes_of(vmid).await {
                out.orphaned_volumes.extend(vols);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&svc.journal.dirs.run_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some((stem, kind)) = name.to_str().and_then(|n| n.split_once('.')) else {
                continue;
            };
            // `{vmid}.mtunnel`, `{vmid}.storage` (tunnels), `{vmid}.migrate` and
            // `{vmid}_nbd.migrate` (an incoming QEMU that is gone).
            let Ok(vmid) = stem.trim_end_matches("_nbd").parse::<u32>() else {
                continue;
            };
            let ours_gone = match kind {
                "mtunnel" | "storage" => !is_live(vmid),
                "migrate" => !is_live(vmid) && !svc.journal.hypervisor.is_running(vmid).await,
                _ => false,
            };
            // Whatever we think of it: a socket something listens on is in use.
            let stale = ours_gone && nobody_listens(&path).await;
            if stale {
                out.stale_sockets.push(path);
            }
        }
    }
    out
}

/// Whether connecting to the socket `path` is refused (nothing listens on it); a socket
/// that accepts, or whose backlog is full, or that does not answer in time, is in use.
async fn nobody_listens(path: &std::path::Path) -> bool {
    let connect = tokio::net::UnixStream::connect(path);
    match tokio::time::timeout(std::time::Duration::from_secs(1), connect).await {
        Ok(Err(e)) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        ),
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Frees empty reservations, orphaned volumes and stale sockets (not locked configs).
pub async fn free_leftovers(svc: &Services, found: &Leftovers) -> Vec<String> {
    let mut lines = Vec::new();
    for &vmid in &found.empty_reservations {
        if super::remove_reserved_config(&svc.journal.guests, vmid).await {
            lines.push(format!("removed empty reservation of VM {vmid}"));
        }
    }
    for volid in &found.orphaned_volumes {
        match svc.journal.storage.free(volid).await {
            Ok(()) => lines.push(format!("freed orphaned volume '{volid}'")),
            Err(e) => lines.push(format!("WARN: freeing '{volid}' failed: {e}")),
        }
    }
    for path in &found.stale_sockets {
        if std::fs::remove_file(path).is_ok() {
            lines.push(format!("removed stale socket {}", path.display()));
        }
    }
    lines
}

/// What `serve` runs before it accepts connections: recovers every dead tunnel, removes
/// empty reservations and stale tunnel sockets (no tunnel of this process exists yet).
/// Returns one line per action, for the console.
pub async fn recover_at_start(svc: &Services) -> Vec<String> {
    let mut lines = set_aside_untrusted(svc, false);
    for r in recover_dead_tunnels(svc, Orphans::All, false, RecoveredBy::Restart).await {
        lines.push(format!("tunnel {} of VM {}:", r.upid, r.vmid));
        lines.extend(r.lines.into_iter().map(|l| format!("  {l}")));
    }
    let found = find_leftovers(svc).await;
    let safe = Leftovers {
        empty_reservations: found.empty_reservations,
        stale_sockets: found.stale_sockets,
        ..Leftovers::default()
    };
    lines.extend(free_leftovers(svc, &safe).await);
    lines
}
