//! The contract between a tunnel's wire loop ([`crate::tunnel::worker`]) and whatever runs
//! its commands (the Lua handlers of [`crate::script`], or a test's stand-in):
//! [`CommandHandler`] and its [`Outcome`]; [`TunnelSockets`], what a handler may do with
//! its tunnel (register sockets, mint tickets bound to it); and [`HandlerFactory`], which
//! [`crate::tunnel::Tunnels`] is given where the node is put together, so the tunnel layer
//! builds handlers without knowing the engine behind them. Implementations live
//! elsewhere; this module owns only the shapes.

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use crate::journal::Created;
use crate::node::Node;
use crate::task::TaskLog;

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
    pub node: Arc<Node>,
    pub tunnel: Arc<dyn TunnelSockets>,
    /// The tunnel's task log.
    pub log: TaskLog,
    /// The tunnel's journal as written when it opened.
    pub created: Created,
}

/// Builds the command handler of a new tunnel.
pub type HandlerFactory =
    Arc<dyn Fn(HandlerSetup) -> anyhow::Result<Box<dyn CommandHandler>> + Send + Sync>;
