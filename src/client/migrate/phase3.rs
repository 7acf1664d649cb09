//! Phase 3 of a migration: for a running VM the hand-over (`nbdstop`, `resume`, `fstrim` if
//! the config asks, stop the source VM), then `unlock` and `quit` on the target, and the
//! source VM deleted with `--delete`, else left stopped and locked `migrate`.

use serde_json::json;

use super::{Migration, SourceNode, Volume};
use crate::client::progress::Progress;
use crate::guest::config::{self as vmconf, VmConfig};
use crate::guest::store::DEFAULT_LOCK_TIMEOUT;
use crate::qemu::{self, VmHandle};

impl Migration<'_> {
    /// Phase 3.
    pub(super) async fn phase3_finish(&mut self) -> anyhow::Result<()> {
        let vmid = self.opts.vmid;
        if self.plan.running {
            self.hand_over().await?;
        }
        // The source VM stops while `unlock` and `quit` cross the link: neither depends on
        // the other, and the source stays locked `migrate` whatever the target answers.
        let stop_source = async {
            if self.plan.running {
                self.stop_source().await;
            }
        };
        let finish_remote = async {
            self.remote.cmd(json!({"cmd": "unlock"}), 10).await?;
            if let Err(e) = self
                .remote
                .cmd(json!({"cmd": "quit", "cleanup": 0}), 30)
                .await
            {
                self.progress.log(format!("WARN: quit failed: {e:#}"));
            }
            Ok::<_, anyhow::Error>(())
        };
        let ((), finished) = tokio::join!(stop_source, finish_remote);
        finished?;
        self.remote.forwards.clear();
        self.remote.control.clone().close();
        if self.opts.delete {
            destroy_source(self.src, vmid, &self.plan.volumes, self.progress).await?;
        } else {
            self.progress.log(format!(
                "source VM {vmid} stays, stopped and locked 'migrate' (use --delete to remove it)"
            ));
        }
        Ok(())
    }

    /// The target VM takes over: NBD exports stopped, `resume`, `fstrim`.
    async fn hand_over(&mut self) -> anyhow::Result<()> {
        let tvmid = self.remote.tvmid;
        let live = self.plan.volumes.iter().any(|v| v.live);
        if live {
            self.remote.cmd(json!({"cmd": "nbdstop"}), 30).await?;
        }
        if self.remote.resumed_early {
            // `resume` went out before the switch to postcopy (or a postcopy switch that
            // precopy's completion overtook): the target committed then and runs the VM.
            self.progress.log(format!(
                "VM {tvmid} runs on the target (resumed before the switch to postcopy)"
            ));
            self.fstrim(live).await;
            return Ok(());
        }
        self.remote.resume_sent = true;
        if let Err(e) = self.remote.cmd(json!({"cmd": "resume"}), 30).await {
            // A target that refused before resuming (fenced: its cluster gave the VMID to
            // another node) runs nothing: the source VM may run on.
            if format!("{e:#}").contains(&format!("VM {tvmid} was not resumed: ")) {
                self.remote.resume_sent = false;
            }
            return Err(e);
        }
        self.summary.handover_ms = self
            .summary
            .ram_completed
            .map(|at| at.elapsed().as_millis() as u64);
        self.progress
            .log(format!("VM {tvmid} resumed on the target"));
        if let Some(c) = &mut self.cutover {
            c.resumed(self.progress);
            self.summary.disk_bytes = c.figures.refresh_sent + c.figures.delta_copied;
        }
        self.fstrim(live).await;
        Ok(())
    }

    /// As upstream: mirrored disks are fully allocated; the guest trims them if the
    /// config asks (`fstrim_cloned_disks`).
    async fn fstrim(&self, live: bool) {
        if live
            && fstrim_cloned_disks(&self.plan.conf)
            && let Err(e) = self.remote.cmd(json!({"cmd": "fstrim"}), 600).await
        {
            self.progress
                .log(format!("WARN: fstrim on the target failed: {e:#}"));
        }
    }

    /// The source VM stops (it is paused since the RAM migration completed).
    async fn stop_source(&self) {
        let stopped = match VmHandle::attach(&self.src.cfg.run_dir, self.opts.vmid) {
            Ok(vm) => vm
                .stop(qemu::process::StopTimeouts::default())
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = stopped {
            self.progress
                .log(format!("WARN: stopping the source VM failed: {e:#}"));
        }
    }
}

/// The `agent` option asks for `fstrim_cloned_disks` (PVE: `agent: 1,fstrim_cloned_disks=1`).
pub(super) fn fstrim_cloned_disks(conf: &VmConfig) -> bool {
    conf.options
        .get("agent")
        .and_then(|a| vmconf::parse_property_string(a, Some("enabled")).ok())
        .is_some_and(|props| {
            props.iter().any(|(k, v)| {
                k == "fstrim_cloned_disks" && crate::util::lenient_bool(&json!(v)) == Some(true)
            })
        })
}

async fn destroy_source(
    src: &SourceNode,
    vmid: u32,
    volumes: &[Volume],
    progress: &Progress,
) -> anyhow::Result<()> {
    let guard = src.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
    for v in volumes {
        match src.storage.free(&v.volid).await {
            Ok(()) => progress.log(format!("deleted source volume {}", v.volid)),
            Err(e) => progress.log(format!("WARN: deleting {} failed: {e}", v.volid)),
        }
    }
    src.guests.remove_locked(&guard)?;
    if let Some(cluster) = &src.cluster {
        crate::client::vm::release_logged(cluster, vmid).await;
    }
    progress.log(format!("deleted source VM {vmid}"));
    Ok(())
}
