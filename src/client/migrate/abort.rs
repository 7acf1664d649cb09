//! Aborting a migration after a phase failed: the source VM keeps its config and disks and
//! loses its `migrate` lock, and the target is asked to destroy what the migration created
//! (`quit` with `cleanup`); a source VM paused by a completed RAM migration (or by
//! `--final-sync`) runs on. Once `resume` was sent the target may run the only live copy:
//! then the source stays locked and nothing on the target is touched.

use serde_json::json;

use super::remote::Remote;
use super::{Migration, set_source_lock};
use crate::client::progress::Progress;
use crate::qemu::VmHandle;

impl Migration<'_> {
    /// Cleans up after `e` and returns it.
    pub(super) async fn abort(self, e: anyhow::Error) -> anyhow::Error {
        let vmid = self.opts.vmid;
        let tvmid = self.remote.tvmid;
        let progress = self.progress;
        if self.remote.postcopy && !self.remote.ram_done {
            // Neither copy is whole: the source must not run its copy, nor the target be
            // stopped. QEMU can resume the migration over a new connection; we do not.
            progress.log(format!(
                "ERROR: the RAM migration failed in postcopy: {e:#} - the guest's memory is \
                 split between this host and the target: VM {tvmid} on the target has run \
                 since the switch and waits for the pages still here. Do not stop either \
                 QEMU: once both show 'postcopy-paused' (QMP 'query-migrate'), QEMU can \
                 resume the migration over a new connection (target: 'migrate-recover', \
                 source: 'migrate' with resume=true); mtunnel does not do that. The source \
                 VM {vmid} stays locked 'migrate'."
            ));
            self.remote.control.clone().close();
            return e;
        }
        if self.remote.resume_sent {
            // The target may already run the VM: unlocking (and so allowing a start of)
            // the source copy could run it twice.
            progress.log(format!(
                "ERROR: migration failed after 'resume' was sent: {e:#} - VM {tvmid} may be \
                 running on the target; the source VM {vmid} stays locked 'migrate'. Check \
                 the target, then remove the lock where the VM should live ('mtunnel vm \
                 unlock')."
            ));
            self.remote.control.clone().close();
            return e;
        }
        let e = match &self.cutover {
            Some(c) => c.failed(e, self.src, vmid),
            None => e,
        };
        progress.log(format!("ERROR: migration failed: {e:#}"));
        if let Some(c) = self.cutover.as_ref().filter(|_| !self.remote.ram_done) {
            // --final-sync paused the guest: the source VM is still the live one.
            c.resume_source(self.src, vmid, progress).await;
        }
        if self.remote.ram_done {
            match VmHandle::attach(&self.src.cfg.run_dir, vmid) {
                Ok(vm) if self.keep_source_running(&vm).await => {
                    progress.log(format!("source VM {vmid} runs on"));
                }
                Ok(_) => progress.log(format!(
                    "WARN: the source VM {vmid} is still paused: resume it by hand (QMP 'cont')"
                )),
                Err(ae) => progress.log(format!(
                    "WARN: resuming the paused source VM {vmid} failed ({ae:#}): resume it by \
                     hand (QMP 'cont')"
                )),
            }
        }
        if let Err(le) = set_source_lock(self.src, vmid, None).await {
            progress.log(format!("WARN: removing the source lock failed: {le:#}"));
        }
        self.remote.request_cleanup(progress).await;
        e
    }
}

impl Remote {
    /// Tells the target to destroy what this migration created, then closes the tunnel.
    pub(super) async fn request_cleanup(&self, progress: &Progress) {
        match self.cmd(json!({"cmd": "quit", "cleanup": 1}), 30).await {
            Ok(_) => progress.log("target cleaned up"),
            Err(e) => progress.log(format!(
                "WARN: remote cleanup request failed ({e:#}); the target cleans up when the tunnel closes"
            )),
        }
        self.control.clone().close();
    }
}
