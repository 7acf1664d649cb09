//! The contract between a tunnel's wire loop ([`crate::tunnel::worker`]) and whatever runs
//! its commands (the Lua handlers of [`crate::script`], or a test's stand-in):
//! [`CommandHandler`] and its [`Outcome`]; [`TunnelSockets`], what a handler may do with
//! its tunnel (register sockets, mint tickets bound to it); and [`HandlerFactory`], which
//! [`crate::tunnel::Tunnels`] is given where the node is put together, so the tunnel layer
//! builds handlers without knowing the engine behind them. [`Host`] is what a tunnel and
//! its handler may use of their node (never the whole node), with the cluster's VMID
//! registry behind [`VmidRegistry`] so this layer does not name the cluster.
//! Handler implementations live elsewhere; besides the shapes this module holds only
//! `Host`'s own checks (privileges, storage for images) and the journal view it hands out.

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::auth::{TicketKey, TokenStore};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::guest::{ConfigStore, Hypervisor};
use crate::journal::{self, Created};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::task::TaskLog;

/// What a tunnel and its command handler use of their node: the settings, the tokens (for
/// privilege checks), the ticket key (tickets for the tunnel's sockets), the VM configs,
/// the backends, the metrics and, in a cluster, the VMID registry. Handed out by the
/// composition root (`node::Node::command_host`).
#[derive(Clone)]
pub struct Host {
    pub cfg: Arc<NodeConfig>,
    pub tokens: Arc<TokenStore>,
    pub tickets: TicketKey,
    pub guests: Arc<ConfigStore>,
    pub storage: Arc<dyn Storage>,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub metrics: Arc<Metrics>,
    /// The cluster's VMID registry; `None`: a single node.
    pub vmid_registry: Option<Arc<dyn VmidRegistry>>,
}

impl Host {
    /// Whether `authid` holds `privilege` on `path`.
    pub fn allows(&self, authid: &str, path: &str, privilege: &str) -> bool {
        self.tokens.allows(authid, path, privilege)
    }

    /// Fails with PVE's 403 text unless `authid` holds `privilege` on `path`.
    pub fn require(&self, authid: &str, path: &str, privilege: &str) -> Result<()> {
        if self.allows(authid, path, privilege) {
            Ok(())
        } else {
            Err(Error::permission(path, privilege))
        }
    }

    /// A storage a tunnel may put VM images on: exists, enabled, holds `images`, and the
    /// token has `Datastore.AllocateSpace` on `/storage/<id>`.
    pub fn check_storage_for_images(&self, authid: &str, storage: &str) -> Result<()> {
        let def = self
            .cfg
            .storages
            .get(storage)
            .ok_or_else(|| Error::internal(format!("storage '{storage}' does not exist")))?;
        if def.disable {
            return Err(Error::internal(format!("storage '{storage}' is disabled")));
        }
        self.require(
            authid,
            &format!("/storage/{storage}"),
            "Datastore.AllocateSpace",
        )?;
        if !def.holds_images() {
            return Err(Error::internal(format!(
                "storage '{storage}' does not support vm images"
            )));
        }
        Ok(())
    }

    /// What freeing a tunnel's leftovers needs of these ([`journal::Services`]).
    pub fn journal(&self) -> journal::Services {
        journal::Services {
            guests: Arc::clone(&self.guests),
            storage: Arc::clone(&self.storage),
            hypervisor: Arc::clone(&self.hypervisor),
            metrics: Arc::clone(&self.metrics),
            dirs: journal::Dirs {
                journal_dir: self.cfg.journal_dir(),
                run_dir: self.cfg.run_dir.clone(),
                data_dir: self.cfg.data_dir.clone(),
                firewall_dir: self.cfg.firewall_dir(),
            },
        }
    }
}

/// Why the registry refused to reserve a VMID.
#[derive(Debug)]
pub enum Refusal {
    /// Another node holds the VMID (upstream's wording, naming that node).
    Taken(String),
    /// The registry could not answer (etcd out of reach, no quorum): why.
    Unanswered(String),
}

/// The cluster-wide VMID registry as a tunnel and its handler use it: reserve a VMID for
/// a tunnel, make it this node's for good before the point of no return (fencing), learn
/// that another node took it, and let it go when the tunnel ends.
pub trait VmidRegistry: Send + Sync {
    /// Reserves `vmid` for a tunnel being opened (on this node's lease).
    fn reserve_for_tunnel(&self, vmid: u32) -> BoxFuture<'_, std::result::Result<(), Refusal>>;
    /// Makes `vmid` this node's for good, or says why not (the fencing message).
    fn commit(&self, vmid: u32) -> BoxFuture<'_, std::result::Result<(), String>>;
    /// Why `vmid` is no longer this node's (another node took it while this node's lease
    /// had lapsed), as the message a refused command reports; `None` while it is.
    fn lost(&self, vmid: u32) -> Option<String>;
    /// The tunnel of `vmid` ended; `kept`: its VM stays on this node.
    fn finish(&self, vmid: u32, kept: bool) -> BoxFuture<'_, ()>;
}

/// The outcome of one command.
pub struct Outcome {
    /// Reply fields (without `success`), or the error message.
    pub reply: Result<Map<String, Value>, String>,
    /// Switch the tunnel to exit mode after this reply (`quit`).
    pub exit: bool,
}

impl Outcome {
    pub fn ok(fields: Map<String, Value>) -> Self {
        Outcome {
            reply: Ok(fields),
            exit: false,
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Outcome {
            reply: Err(msg.into()),
            exit: false,
        }
    }
}

/// Executes tunnel commands for one tunnel.
pub trait CommandHandler: Send {
    /// Whether `cmd` is a command this handler knows.
    fn knows(&self, cmd: &str) -> bool;
    /// Runs a known command with its parameters (`cmd` already removed).
    fn handle<'a>(&'a mut self, cmd: &'a str, params: Map<String, Value>)
    -> BoxFuture<'a, Outcome>;
    /// Called exactly once when the tunnel ends, however it ends; `end` says how, for the
    /// task log ("control connection lost before the migration finished", ...). Frees
    /// what the tunnel created unless the migration was committed.
    fn finish(&mut self, end: &str) -> BoxFuture<'_, ()>;
}

/// One open tunnel as its command handler sees it.
pub trait TunnelSockets: Send + Sync {
    fn vmid(&self) -> u32;
    /// Who opened the tunnel.
    fn authid(&self) -> &str;
    /// The tunnel's UPID, to which its tickets are bound.
    fn instance(&self) -> &str;
    /// Allows tickets (and WebSocket forwarding) for `path`.
    fn register_socket(&self, path: &Path);
    fn unregister_socket(&self, path: &Path);
    fn is_registered(&self, path: &Path) -> bool;
    /// Payload bytes the peer sent through the WebSockets to `path` so far.
    fn inbound_bytes(&self, path: &Path) -> u64;
}

/// What a [`HandlerFactory`] gets for a new tunnel.
pub struct HandlerSetup {
    pub host: Host,
    pub tunnel: Arc<dyn TunnelSockets>,
    /// The tunnel's task log.
    pub log: TaskLog,
    /// The tunnel's journal as written when it opened.
    pub created: Created,
}

/// Builds the command handler of a new tunnel.
pub type HandlerFactory =
    Arc<dyn Fn(HandlerSetup) -> anyhow::Result<Box<dyn CommandHandler>> + Send + Sync>;
