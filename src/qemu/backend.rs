//! The real [`Hypervisor`]: QEMU processes for VMs whose configs live in the node's config
//! store and whose disks live in its storage. Also [`spec_for`], which turns a PVE-format
//! config into a [`VmSpec`] by resolving every volume, for the target (`start`) and for
//! local VMs (`mtunnel vm start`) alike, so both sides build the same machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;

use super::{Accel, DiskFormat, StartOptions, StopTimeouts, VmHandle, VmSpec, agent};
use crate::guest::config::{self as vmconf, VmConfig};
use crate::guest::{Hypervisor, IncomingStart, IncomingStarted};
use crate::storage::Storage;

/// Builds the QEMU spec of `vmid` from its config, resolving volumes through `storage`.
pub fn spec_for(
    vmid: u32,
    config: &VmConfig,
    storage: &dyn Storage,
    run_dir: &std::path::Path,
    accel: Accel,
) -> anyhow::Result<VmSpec> {
    let mut spec = VmSpec::new(vmid, run_dir);
    spec.accel = accel;
    spec.options = config.options.clone();
    for (key, value) in &config.options {
        if !vmconf::is_drive_key(key) || key.starts_with("unused") {
            continue;
        }
        let Some(volid) = vmconf::drive_volume(value) else {
            continue;
        };
        let path = storage
            .path(&volid)
            .with_context(|| format!("{key}: resolving volume '{volid}'"))?;
        let format = match volid.rsplit('.').next() {
            Some("qcow2") => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        };
        spec.disks
            .insert(key.clone(), super::DiskSource::new(path, format));
    }
    Ok(spec)
}

/// QEMU for this node's VMs.
pub struct QemuHypervisor {
    storage: Arc<dyn Storage>,
    run_dir: PathBuf,
    accel: Accel,
    /// VMs started by this process, for their exit status and QMP connection.
    started: Mutex<HashMap<u32, Arc<VmHandle>>>,
}

impl QemuHypervisor {
    pub fn new(storage: Arc<dyn Storage>, run_dir: PathBuf, accel: Accel) -> Self {
        QemuHypervisor {
            storage,
            run_dir,
            accel,
            started: Mutex::new(HashMap::new()),
        }
    }

    /// The VM's handle: ours if we started it, else attached through its pidfile.
    fn handle(&self, vmid: u32) -> anyhow::Result<Arc<VmHandle>> {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = started.get(&vmid)
            && h.is_running()
        {
            return Ok(Arc::clone(h));
        }
        started.remove(&vmid);
        let h = VmHandle::attach(&self.run_dir, vmid)
            .map_err(|_| anyhow::anyhow!("VM {vmid} not running"))?;
        Ok(Arc::new(h))
    }

    async fn start_incoming_impl(&self, req: IncomingStart) -> anyhow::Result<IncomingStarted> {
        let vmid = req.vmid;
        if super::is_running(&self.run_dir, vmid).is_some() {
            anyhow::bail!("VM {vmid} already running");
        }
        let mut spec = spec_for(vmid, &req.config, &*self.storage, &self.run_dir, self.accel)?;
        spec.force_machine = req.machine.clone();
        spec.force_cpu = req.cpu.clone();
        let keys: Vec<&str> = req.nbd.keys().map(String::as_str).collect();
        for key in &keys {
            if !spec.disks.contains_key(*key) {
                anyhow::bail!("drive '{key}' to export over NBD is not a disk of VM {vmid}");
            }
        }
        let ram = super::IncomingRam {
            multifd: req.multifd,
            compression: req.compression.clone(),
            postcopy: req.postcopy,
        };
        let incoming = super::start_incoming_multifd(&spec, &keys, &StartOptions::default(), &ram)
            .await
            .with_context(|| format!("starting VM {vmid} for the incoming migration"))?;
        // QMP allows one client: do not hold it between commands, so `mtunnel vm status`
        // and other tools can reach the VM while the tunnel runs.
        incoming.vm.release_qmp().await;
        let vm = Arc::new(incoming.vm);
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vmid, vm);
        Ok(IncomingStarted {
            migrate_socket: incoming.migrate_socket,
            nbd_socket: incoming.nbd_socket,
            nbd_uris: incoming.nbd_uris,
        })
    }
}

/// How long `resume` waits for QEMU to finish loading an incoming migration: under the 30 s
/// a source (PVE's and ours) gives `resume` for its reply.
const INCOMING_LOAD_BOUND: Duration = Duration::from_secs(25);

/// A failed target gets little patience: stop fast.
const QUICK_STOP: StopTimeouts = StopTimeouts {
    quit: Duration::from_secs(5),
    term: Duration::from_secs(3),
    kill: Duration::from_secs(5),
};

impl Hypervisor for QemuHypervisor {
    fn start_incoming(&self, req: IncomingStart) -> BoxFuture<'_, anyhow::Result<IncomingStarted>> {
        Box::pin(self.start_incoming_impl(req))
    }

    fn resume(&self, vmid: u32) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let vm = self.handle(vmid)?;
            vm.resume_incoming(INCOMING_LOAD_BOUND)
                .await
                .with_context(|| format!("resuming VM {vmid}"))?;
            // The migrated VM is an ordinary VM now: free its QMP socket for other clients.
            vm.release_qmp().await;
            self.started
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&vmid);
            Ok(())
        })
    }

    fn stop(&self, vmid: u32) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            if let Ok(vm) = self.handle(vmid) {
                vm.stop(QUICK_STOP)
                    .await
                    .with_context(|| format!("stopping VM {vmid}"))?;
            }
            self.started
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&vmid);
            // A QEMU that died (e.g. its migration stream was cut) leaves its sockets.
            let paths = super::VmPaths::new(&self.run_dir, vmid);
            for leftover in [
                &paths.qmp,
                &paths.qga,
                &paths.pid,
                &paths.serial0,
                &paths.migrate,
                &paths.nbd,
            ] {
                let _ = std::fs::remove_file(leftover);
            }
            // Stopped for good (a failed or cancelled migration): its log goes too.
            super::process::remove_log(&self.run_dir, vmid);
            Ok(())
        })
    }

    fn nbd_stop(&self, vmid: u32) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let vm = self.handle(vmid)?;
            let result = vm
                .nbd_server_stop()
                .await
                .with_context(|| format!("stopping the NBD server of VM {vmid}"));
            vm.release_qmp().await;
            result
        })
    }

    fn is_running(&self, vmid: u32) -> BoxFuture<'_, bool> {
        Box::pin(async move { super::is_running(&self.run_dir, vmid).is_some() })
    }

    fn fstrim(&self, vmid: u32) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let vm = self.handle(vmid)?;
            let agent = vm.agent();
            agent
                .ping()
                .await
                .with_context(|| format!("guest agent of VM {vmid} does not answer"))?;
            agent
                .fstrim(agent::FSTRIM_TIMEOUT)
                .await
                .with_context(|| format!("guest-fstrim in VM {vmid}"))?;
            Ok(())
        })
    }
}
