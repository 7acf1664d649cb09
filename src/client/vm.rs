//! Local VMs of a node, for `mtunnel vm create|start|stop|status|list|destroy`: the same
//! config store, storage and QEMU backend the server uses, without the server, so a node can
//! be the source of a migration. Every change happens under the VM's config lock (flock),
//! so the CLI cannot race a running server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::NodeConfig;
use crate::guest::config::{self as vmconf, VmConfig};
use crate::guest::{ConfigStore, store::DEFAULT_LOCK_TIMEOUT};
use crate::qemu::{self, StartOptions, StopTimeouts, VmHandle, backend::spec_for};
use crate::storage::{NodeStorage, Storage};

/// The parts of a node a VM command needs.
pub struct LocalVms {
    pub cfg: NodeConfig,
    pub guests: ConfigStore,
    pub storage: Arc<dyn Storage>,
    /// The cluster registry (`[cluster]`): VMIDs created or destroyed here are registered.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// A disk for `vm create`: `STORAGE:SIZE[:FORMAT]`, e.g. `local:64M:qcow2`.
#[derive(Debug, Clone)]
pub struct DiskArg {
    pub storage: String,
    pub size_bytes: u64,
    pub format: String,
}

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let storage = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("disk needs STORAGE:SIZE[:FORMAT]")?;
        let size = parts.next().ok_or("disk needs STORAGE:SIZE[:FORMAT]")?;
        let size_bytes = vmconf::parse_size(size)
            .filter(|s| *s > 0)
            .ok_or(format!("invalid disk size '{size}' (e.g. 64M, 2G)"))?;
        let format = parts.next().unwrap_or("raw").to_string();
        if format != "raw" && format != "qcow2" {
            return Err(format!("unsupported disk format '{format}' (raw or qcow2)"));
        }
        Ok(DiskArg {
            storage: storage.to_string(),
            size_bytes,
            format,
        })
    }
}

/// What `vm create` builds.
#[derive(Debug, Clone, Default)]
pub struct CreateArgs {
    pub name: Option<String>,
    pub memory_mib: u64,
    pub cores: u32,
    pub disks: Vec<DiskArg>,
    pub bridge: Option<String>,
    pub agent: bool,
}

/// Releases `vmid` in the cluster registry; a failure only warns (the serve's reconcile
/// loop releases entries whose config is gone).
pub async fn release_logged(cluster: &crate::cluster::Cluster, vmid: u32) {
    if let Err(e) = cluster.release(vmid).await {
        tracing::warn!(vmid, "releasing the VMID in the cluster registry: {e:#}");
    }
}

impl LocalVms {
    pub fn open(cfg: NodeConfig) -> anyhow::Result<Self> {
        crate::util::ensure_dir(&cfg.run_dir, 0o755)?;
        let guests = ConfigStore::new(&cfg.node, &cfg.data_dir)?;
        let storage: Arc<dyn Storage> = Arc::new(NodeStorage::new(cfg.storages.clone()));
        Ok(LocalVms {
            cluster: crate::cluster::Cluster::new(&cfg)?,
            cfg,
            guests,
            storage,
        })
    }

    fn load(&self, vmid: u32) -> anyhow::Result<VmConfig> {
        let text = self.guests.read_text(vmid)?;
        VmConfig::parse(&text).with_context(|| format!("parsing config of VM {vmid}"))
    }

    /// Whether the VM runs: its pidfile names its QEMU, or (pidfile lost or replaced)
    /// something still listens on its QMP socket. Destroying a VM judged "stopped" wrongly
    /// would free the disks of a running QEMU.
    pub fn is_running(&self, vmid: u32) -> bool {
        qemu::is_running(&self.cfg.run_dir, vmid).is_some()
            || std::os::unix::net::UnixStream::connect(
                qemu::VmPaths::new(&self.cfg.run_dir, vmid).qmp,
            )
            .is_ok()
    }

    /// Creates a VM config with new disks; on failure frees the disks it made.
    pub async fn create(&self, vmid: u32, args: &CreateArgs) -> anyhow::Result<VmConfig> {
        let guard = self.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
        if self.guests.exists(vmid) {
            bail!("VM {vmid} already exists on node '{}'", self.cfg.node);
        }
        if let Some(cluster) = &self.cluster {
            // The config first (as a tunnel's reservation), so the serve's reconcile sees a
            // local VM and never releases the entry made next.
            self.guests.write_text_locked(&guard, "lock: create\n")?;
            if let Err(e) = cluster
                .reserve(vmid, crate::cluster::registry::Hold::Present)
                .await
            {
                let _ = self.guests.remove_locked(&guard);
                bail!("{e}");
            }
        }
        let mut conf = VmConfig::default();
        let o = &mut conf.options;
        o.insert("memory".into(), args.memory_mib.to_string());
        o.insert("cores".into(), args.cores.max(1).to_string());
        o.insert("scsihw".into(), "virtio-scsi-single".into());
        if let Some(name) = &args.name {
            o.insert("name".into(), name.clone());
        }
        if args.agent {
            o.insert("agent".into(), "1".into());
        }
        if let Some(bridge) = &args.bridge {
            let mac = format!(
                "BC:24:11:{:02X}:{:02X}:{:02X}",
                (vmid >> 16) & 0xff,
                (vmid >> 8) & 0xff,
                vmid & 0xff
            );
            o.insert("net0".into(), format!("virtio={mac},bridge={bridge}"));
        }
        let mut made = Vec::new();
        let result = async {
            for (i, d) in args.disks.iter().enumerate() {
                let volid = self
                    .storage
                    .alloc(
                        &d.storage,
                        vmid,
                        &d.format,
                        None,
                        d.size_bytes.div_ceil(1024),
                    )
                    .await?;
                made.push(volid.clone());
                conf.options.insert(
                    format!("scsi{i}"),
                    format!(
                        "{volid},iothread=1,size={}",
                        vmconf::format_size(d.size_bytes)
                    ),
                );
            }
            if !args.disks.is_empty() {
                conf.options.insert("boot".into(), "order=scsi0".into());
            }
            self.guests.write_text_locked(&guard, &conf.write())?;
            Ok::<(), anyhow::Error>(())
        }
        .await;
        if let Err(e) = result {
            for volid in made {
                let _ = self.storage.free(&volid).await;
            }
            if let Some(cluster) = &self.cluster {
                let _ = self.guests.remove_locked(&guard);
                release_logged(cluster, vmid).await;
            }
            return Err(e);
        }
        Ok(conf)
    }

    /// Starts a VM (it keeps running after this process exits); `extra_args` are appended
    /// to QEMU's command line verbatim (tests use them to load data into RAM).
    pub async fn start(&self, vmid: u32, extra_args: &[String]) -> anyhow::Result<i32> {
        let _guard = self.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
        let conf = self.load(vmid)?;
        if conf.options.get("lock").map(String::as_str) == Some(crate::replica::LOCK) {
            bail!(
                "VM {vmid} is a replica (lock 'replica') and cannot be started: promote one \
                 of its restore points first ('mtunnel replica promote {vmid}')"
            );
        }
        if let Some(lock) = conf.options.get("lock") {
            bail!("VM {vmid} is locked ({lock})");
        }
        if self.is_running(vmid) {
            bail!("VM {vmid} already running");
        }
        let mut spec = spec_for(
            vmid,
            &conf,
            &*self.storage,
            &self.cfg.run_dir,
            self.cfg.qemu_accel,
        )?;
        spec.extra_args = extra_args.to_vec();
        let vm = VmHandle::start(&spec, &StartOptions::default()).await?;
        Ok(vm.pid())
    }

    /// Stops a VM (QMP quit, then SIGTERM, then SIGKILL).
    pub async fn stop(&self, vmid: u32) -> anyhow::Result<bool> {
        let Ok(vm) = VmHandle::attach(&self.cfg.run_dir, vmid) else {
            return Ok(false);
        };
        vm.stop(StopTimeouts::default()).await?;
        Ok(true)
    }

    /// `running (<qemu status>)` or `stopped`.
    pub async fn status(&self, vmid: u32) -> anyhow::Result<String> {
        self.load(vmid)?;
        match VmHandle::attach(&self.cfg.run_dir, vmid) {
            Ok(vm) => match tokio::time::timeout(Duration::from_secs(5), vm.status()).await {
                Ok(Ok(st)) => Ok(format!("running ({})", st.status)),
                _ => Ok("running".into()),
            },
            Err(_) => Ok("stopped".into()),
        }
    }

    /// `(vmid, name, status, lock)` of every VM.
    pub async fn list(&self) -> Vec<(u32, String, String, String)> {
        let mut out = Vec::new();
        for vmid in self.guests.list() {
            let conf = self.load(vmid).unwrap_or_default();
            let name = conf.options.get("name").cloned().unwrap_or_default();
            let lock = conf.options.get("lock").cloned().unwrap_or_default();
            let status = if self.is_running(vmid) {
                "running"
            } else {
                "stopped"
            };
            out.push((vmid, name, status.to_string(), lock));
        }
        out
    }

    /// Removes a stopped VM: its volumes, firewall file, QEMU log and config.
    pub async fn destroy(&self, vmid: u32, skiplock: bool) -> anyhow::Result<Vec<String>> {
        let guard = self.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
        let conf = self.load(vmid)?;
        if let Some(lock) = conf.options.get("lock")
            && !skiplock
        {
            bail!("VM {vmid} is locked ({lock}) - use --skiplock to destroy it anyway");
        }
        if self.is_running(vmid) {
            bail!("VM {vmid} is running - stop it first");
        }
        let mut freed = Vec::new();
        let own_dir = format!("{vmid}/");
        for (_, volid) in conf.volids() {
            // Only volumes owned by this VM: a hand-written config may point elsewhere.
            if !volid
                .split_once(':')
                .is_some_and(|(_, name)| name.starts_with(&own_dir))
            {
                continue;
            }
            match self.storage.free(&volid).await {
                Ok(()) => freed.push(volid),
                Err(e) => tracing::warn!("freeing {volid}: {e}"),
            }
        }
        // As PVE's destroy-unreferenced-disks: also the VMID's volumes no config names
        // (e.g. a partial import of a failed migration).
        for volid in self.storage.volumes_of(vmid).await.unwrap_or_default() {
            if freed.contains(&volid) {
                continue;
            }
            match self.storage.free(&volid).await {
                Ok(()) => freed.push(volid),
                Err(e) => tracing::warn!("freeing {volid}: {e}"),
            }
        }
        let _ = std::fs::remove_file(self.cfg.firewall_dir().join(format!("{vmid}.fw")));
        qemu::process::remove_log(&self.cfg.run_dir, vmid);
        self.guests.remove_locked(&guard)?;
        if let Some(cluster) = &self.cluster {
            release_logged(cluster, vmid).await;
        }
        Ok(freed)
    }

    /// Removes the config's lock; returns the lock it had.
    pub async fn unlock(&self, vmid: u32) -> anyhow::Result<Option<String>> {
        let guard = self.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
        let mut conf = self.load(vmid)?;
        if conf.options.get("lock").is_some_and(|l| l == "replica") {
            // Unlocked, a working copy that may be half written would be startable and
            // the replica's record and restore points stranded.
            bail!(
                "VM {vmid} is a replica (lock 'replica'): use 'mtunnel replica promote {vmid}' to make it a VM, or 'mtunnel replica drop {vmid}' to free it"
            );
        }
        let old = conf.options.remove("lock");
        if old.is_some() {
            self.guests.write_text_locked(&guard, &conf.write())?;
        }
        Ok(old)
    }
}
