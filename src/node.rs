//! The composition root: the services of one node, wired together once at start
//! (settings, tokens, ticket key, tasks, VM configs, the backends, the cluster and the
//! metrics). The API holds the whole `Arc<Node>`; the layers below get only the narrow
//! views they use, handed out here: [`Node::tunnel_services`] for the tunnel layer,
//! [`Node::command_host`] for a tunnel's command handler, [`Node::journal_services`] and
//! [`Node::recovery_services`] for freeing what a tunnel left, with the cluster's VMID
//! registry behind [`crate::command::VmidRegistry`]. The API's privilege checks live here
//! too.

use std::sync::Arc;

use anyhow::Context;
use futures_util::future::BoxFuture;

use crate::auth::{TicketKey, TokenStore};
use crate::cluster::{Cluster, LocalState};
use crate::command::{self, Refusal, VmidRegistry};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::guest::{ConfigStore, Hypervisor};
use crate::journal;
use crate::metrics::Metrics;
use crate::storage::{NodeStorage, Storage};
use crate::task::TaskManager;
use crate::tunnel;

pub struct Node {
    pub cfg: Arc<NodeConfig>,
    pub tokens: Arc<TokenStore>,
    pub tickets: TicketKey,
    pub tasks: Arc<TaskManager>,
    pub guests: Arc<ConfigStore>,
    pub storage: Arc<dyn Storage>,
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The cluster this node is a member of (`[cluster]`); `None`: a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// What `GET /metrics` exposes; every layer counts into it.
    pub metrics: Arc<Metrics>,
}

/// The data dir is locked by another process (a running `serve`, or `mtunnel cleanup`).
#[derive(Debug, thiserror::Error)]
#[error("another mtunnel process (pid {pid}) holds the data dir {}", data_dir.display())]
pub struct DataDirBusy {
    pub pid: String,
    pub data_dir: std::path::PathBuf,
}

/// What the holder of `{data}/serve.lock` writes into it: its pid, and where a `serve`
/// keeps its VMs' pidfiles and sockets (`run_dir`) and which config file it read. Admin
/// commands given only `--data-dir` read it ([`ServeRecord::read`]) to see the node as
/// its `serve` does: a VM `serve` started runs on after `serve` exits, and judging it
/// "stopped" by the wrong run dir would free its disks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServeRecord {
    pub pid: u32,
    pub run_dir: std::path::PathBuf,
    #[serde(default)]
    pub config: Option<std::path::PathBuf>,
}

impl ServeRecord {
    /// `{data}/serve.lock`.
    pub fn path(data_dir: &std::path::Path) -> std::path::PathBuf {
        data_dir.join("serve.lock")
    }

    /// The record in `data_dir`, if one was written (also after its writer exited).
    pub fn read(data_dir: &std::path::Path) -> Option<ServeRecord> {
        let text = std::fs::read_to_string(Self::path(data_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Takes `{data}/serve.lock` for as long as the returned file lives: two `serve`
/// processes on one data dir would free each other's tunnels as "dead". Writes a
/// [`ServeRecord`] of this process into it (`config_file`: the config file `cfg` came
/// from). Fails with [`DataDirBusy`] while another process holds it.
pub fn lock_data_dir(
    cfg: &NodeConfig,
    config_file: Option<&std::path::Path>,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = ServeRecord::path(&cfg.data_dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(f) => f,
        Err((mut file, _)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            // Older versions wrote the bare pid.
            let pid = serde_json::from_str::<ServeRecord>(&text)
                .map(|r| r.pid.to_string())
                .unwrap_or_else(|_| text.trim().to_string());
            return Err(DataDirBusy {
                pid,
                data_dir: cfg.data_dir.clone(),
            }
            .into());
        }
    };
    let record = ServeRecord {
        pid: std::process::id(),
        run_dir: std::path::absolute(&cfg.run_dir).unwrap_or_else(|_| cfg.run_dir.clone()),
        config: config_file.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
    };
    let text = serde_json::to_string(&record).context("encoding the serve record")?;
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{text}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// The storage and hypervisor backends a node uses (real ones unless scripted).
pub struct Backends {
    pub storage: Arc<dyn Storage>,
    pub hypervisor: Arc<dyn Hypervisor>,
}

impl Node {
    /// Opens (and on first use creates) the node's directories and keys.
    pub fn open(cfg: NodeConfig) -> anyhow::Result<Arc<Self>> {
        let storage: Arc<dyn Storage> = Arc::new(NodeStorage::new(cfg.storages.clone()));
        let backends = Backends {
            hypervisor: Arc::new(crate::qemu::backend::QemuHypervisor::new(
                Arc::clone(&storage),
                cfg.run_dir.clone(),
                cfg.qemu_accel,
            )),
            storage,
        };
        Self::open_with(cfg, backends)
    }

    /// Like [`Node::open`] with the given backends (e.g. scripted ones).
    pub fn open_with(cfg: NodeConfig, backends: Backends) -> anyhow::Result<Arc<Self>> {
        crate::util::ensure_dir(&cfg.data_dir, 0o755)?;
        crate::util::ensure_dir(&cfg.priv_dir(), 0o700)?;
        crate::util::ensure_dir(&cfg.run_dir, 0o755)?;
        let tokens = Arc::new(TokenStore::open(&cfg.priv_dir())?);
        let tickets = TicketKey::load_or_create(&cfg.priv_dir())?;
        let tasks = TaskManager::new(&cfg.node, &cfg.task_dir())?;
        let guests = Arc::new(ConfigStore::new(&cfg.node, &cfg.data_dir)?);
        let cluster = Cluster::new(&cfg)?;
        let data_dir = cfg.data_dir.clone();
        let metrics = Metrics::new().with_replicas(move || crate::replica::figures(&data_dir));
        let metrics = Arc::new(metrics);
        Ok(Arc::new(Node {
            cluster,
            cfg: Arc::new(cfg),
            tokens,
            tickets,
            tasks,
            guests,
            storage: backends.storage,
            hypervisor: backends.hypervisor,
            metrics,
        }))
    }

    /// What a tunnel's command handler uses of the node ([`command::Host`]).
    pub fn command_host(&self) -> command::Host {
        let vmid_registry = self.cluster.as_ref().map(|c| {
            let registry: Arc<dyn VmidRegistry> = Arc::new(ClusterRegistry(Arc::clone(c)));
            registry
        });
        command::Host {
            cfg: Arc::clone(&self.cfg),
            tokens: Arc::clone(&self.tokens),
            tickets: self.tickets.clone(),
            guests: Arc::clone(&self.guests),
            storage: Arc::clone(&self.storage),
            hypervisor: Arc::clone(&self.hypervisor),
            metrics: Arc::clone(&self.metrics),
            vmid_registry,
        }
    }

    /// What the tunnel layer uses of the node ([`tunnel::Services`]).
    pub fn tunnel_services(&self) -> tunnel::Services {
        tunnel::Services {
            host: self.command_host(),
            tasks: Arc::clone(&self.tasks),
        }
    }

    /// What a journal needs to free a tunnel's leftovers ([`journal::Services`]).
    pub fn journal_services(&self) -> journal::Services {
        self.command_host().journal()
    }

    /// What recovery after a crash and `mtunnel cleanup` use ([`tunnel::recovery`]).
    pub fn recovery_services(&self) -> tunnel::recovery::Services {
        tunnel::recovery::Services {
            journal: self.journal_services(),
            tasks: Arc::clone(&self.tasks),
        }
    }

    /// What the cluster registry compares with: this node's configs, running VMs and replicas.
    pub async fn local_state(&self) -> LocalState {
        let configs: std::collections::BTreeSet<u32> = self.guests.list().into_iter().collect();
        let mut running = std::collections::BTreeSet::new();
        for vmid in &configs {
            if self.hypervisor.is_running(*vmid).await {
                running.insert(*vmid);
            }
        }
        let replicas = crate::replica::listed(&self.cfg.data_dir, &self.cfg.run_dir, &self.guests);
        LocalState {
            configs,
            running,
            replicas,
        }
    }

    /// Joins the cluster (if configured) as reachable at `api_url` with the API certificate
    /// `fingerprint`, and starts its keepalive and reconcile loop. An etcd out of reach is
    /// logged, not fatal: the node serves, refuses new tunnels, and the loop retries. A
    /// name another running mtunnel holds is fatal: the error is returned, nothing started.
    pub async fn join_cluster(
        self: &Arc<Self>,
        api_url: &str,
        fingerprint: &str,
    ) -> anyhow::Result<()> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        match cluster.join(api_url, fingerprint).await {
            Ok(()) => tracing::info!("joined cluster '{}'", cluster.name()),
            Err(e) if e.is::<crate::cluster::NameHeld>() => {
                cluster.leave().await;
                return Err(e);
            }
            Err(e) => tracing::warn!(
                "cannot join cluster '{}' yet (retrying): {e:#}",
                cluster.name()
            ),
        }
        let me = Arc::downgrade(self);
        cluster.spawn(Arc::new(move || {
            let me = me.clone();
            Box::pin(async move {
                match me.upgrade() {
                    Some(node) => node.local_state().await,
                    None => LocalState::default(),
                }
            })
        }));
        Ok(())
    }

    /// Fails with PVE's 403 text unless `authid` holds `privilege` on `path`.
    pub fn require(&self, authid: &str, path: &str, privilege: &str) -> Result<()> {
        if self.tokens.allows(authid, path, privilege) {
            Ok(())
        } else {
            Err(Error::permission(path, privilege))
        }
    }

    pub fn allows(&self, authid: &str, path: &str, privilege: &str) -> bool {
        self.tokens.allows(authid, path, privilege)
    }

    /// The `node` path parameter must name this node (or be `localhost`).
    pub fn check_node(&self, node: &str) -> Result<()> {
        if node == "localhost" || node == self.cfg.node {
            Ok(())
        } else {
            Err(Error::param(
                "node",
                format!(
                    "node needs to be 'localhost' or local hostname '{}'",
                    self.cfg.node
                ),
            ))
        }
    }
}

/// The cluster's VMID registry as the tunnel layer sees it.
struct ClusterRegistry(Arc<Cluster>);

impl VmidRegistry for ClusterRegistry {
    fn reserve_for_tunnel(&self, vmid: u32) -> BoxFuture<'_, std::result::Result<(), Refusal>> {
        use crate::cluster::registry::{Hold, ReserveError};
        Box::pin(async move {
            self.0
                .reserve(vmid, Hold::Tunnel)
                .await
                .map_err(|e| match e {
                    ReserveError::Exists { .. } => Refusal::Taken(e.to_string()),
                    ReserveError::NoQuorum(msg) => Refusal::Unanswered(msg),
                })
        })
    }

    fn commit(&self, vmid: u32) -> BoxFuture<'_, std::result::Result<(), String>> {
        Box::pin(async move { self.0.commit(vmid).await.map_err(|e| e.to_string()) })
    }

    fn lost(&self, vmid: u32) -> Option<String> {
        let node = self.0.lost_to(vmid)?;
        Some(crate::cluster::registry::Fenced::Taken { vmid, node }.to_string())
    }

    fn finish(&self, vmid: u32, kept: bool) -> BoxFuture<'_, ()> {
        Box::pin(self.0.finish(vmid, kept))
    }
}
