//! `--postcopy`: the switch from precopy to postcopy, next to the RAM progress. When
//! [`tuning::PostcopySwitch`] says precopy does not converge, the target is sent `resume`
//! first: it commits its VMID (the cluster's fencing: only a node that still holds the
//! VMID may run the VM) and `cont`s its QEMU, which is still loading (`inmigrate`), so it
//! runs the guest the moment its device state arrives. Only then `migrate-start-postcopy`
//! stops the guest here and moves it. A target that refused `resume` (fenced) runs
//! nothing: the migration is cancelled and the VM runs on here. After the switch the
//! guest's memory is split between both hosts until the migration completes; a cut link
//! then stops the guest (QEMU can resume such a migration by hand from
//! `postcopy-paused`), and nothing here resumes the source's copy or stops the target's
//! (docs/performance.md, "Compression and postcopy").

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde_json::json;

use super::remote::Remote;
use super::tuning;
use crate::client::progress::{Progress, human};
use crate::qemu::VmHandle;

/// How far the switch got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Switch {
    /// Nothing sent: the source's copy is the only one.
    #[default]
    Precopy,
    /// `resume` went to the target (and may have committed it) but the migration has not
    /// switched (yet).
    ResumeSent,
    /// The target committed; `migrate-start-postcopy` was accepted.
    Postcopy,
}

/// Why [`watch`] ended the RAM phase.
pub(super) enum Ended {
    /// No switch within `--max-ram-time`: give up as a precopy does.
    NotConverged,
    /// `resume` failed (fenced, or the target out of reach).
    Failed(anyhow::Error),
}

/// What [`watch`] works with.
pub(super) struct Watch<'a> {
    pub(super) vm: &'a VmHandle,
    pub(super) remote: &'a Remote,
    pub(super) progress: &'a Progress,
    pub(super) max_ram_time: Duration,
    pub(super) state: &'a Cell<Switch>,
}

/// Samples `query-migrate` every second and switches when precopy does not converge.
/// Ends before a switch ([`Ended`]) or when the migration breaks in postcopy; otherwise it
/// waits for the caller to drop it when the migration ends.
pub(super) async fn watch(w: Watch<'_>) -> Ended {
    let started = Instant::now();
    let mut switch = tuning::PostcopySwitch::default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if started.elapsed() >= w.max_ram_time {
            return Ended::NotConverged;
        }
        let Ok(p) = w.vm.query_migrate().await else {
            continue;
        };
        if p.status != "active" || !switch.sample(p.dirty_sync_count, p.remaining) {
            continue;
        }
        w.progress.log(format!(
            "RAM: precopy does not converge ({} left after the first full pass, the guest dirties {}/s): switching to postcopy; the target commits VM {} first ('resume')",
            human(p.remaining),
            human(p.dirty_rate),
            w.remote.tvmid
        ));
        if let Err(e) = resume_target(&w).await {
            return Ended::Failed(e);
        }
        return start_postcopy(&w, started).await;
    }
}

/// `migrate-start-postcopy`, once the target committed; refused (e.g. by a migration in
/// its final stage) it is tried again every second while precopy goes on, which the
/// caller ends when the migration completes (the target then runs the VM) or fails.
async fn start_postcopy(w: &Watch<'_>, started: Instant) -> Ended {
    let mut warned = false;
    loop {
        match w.vm.migrate_start_postcopy().await {
            Ok(()) => {
                w.state.set(Switch::Postcopy);
                w.progress.log(format!(
                    "RAM: switched to postcopy after {} s: VM {} runs on the target and fetches the pages it lacks from here; until the RAM completes a cut link stops the guest on both sides",
                    started.elapsed().as_secs(),
                    w.remote.tvmid
                ));
                return watch_paused(w.vm).await;
            }
            Err(e) if !warned => {
                warned = true;
                w.progress.log(format!(
                    "WARN: migrate-start-postcopy failed ({e}); tried again every second while precopy goes on (the target runs the VM when it completes)"
                ));
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `resume` on the target before the switch: the fencing commit and the target's `cont`
/// while it loads. A refusal that says the target resumed nothing undoes the state.
async fn resume_target(w: &Watch<'_>) -> anyhow::Result<()> {
    w.state.set(Switch::ResumeSent);
    match w.remote.cmd(json!({"cmd": "resume"}), 30).await {
        Ok(_) => Ok(()),
        Err(e) => {
            if format!("{e:#}").contains(&format!("VM {} was not resumed: ", w.remote.tvmid)) {
                w.state.set(Switch::Precopy);
            }
            Err(e.context("the target did not commit the VM before the switch to postcopy"))
        }
    }
}

/// After the switch: ends when the source's migration is `postcopy-paused` (its stream to
/// the target broke), at once rather than after the progress watch's stall timeout: the
/// guest waits on the target for pages that can no longer come.
async fn watch_paused(vm: &VmHandle) -> Ended {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(p) = vm.query_migrate().await
            && p.status == "postcopy-paused"
        {
            return Ended::Failed(anyhow::anyhow!(
                "the migration stream broke in postcopy (QEMU: postcopy-paused)"
            ));
        }
    }
}
