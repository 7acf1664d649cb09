//! Node settings: paths, listen address, node name, storages and bridges.
//!
//! Everything has an embedded default so `mtunnel serve` runs without a config file; an
//! optional TOML file overrides any default, and command-line flags override the file.
//! This module only describes settings (plain types such as [`Accel`] and [`LuaLimits`]
//! included, so it depends on no engine); it opens no sockets and creates no files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::storage::{StorageDef, StorageKind};

/// Default HTTPS listen address (PVE's port, loopback only until the operator opens it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8006";

/// Which accelerator QEMU runs with (`qemu_accel`). [`Accel::resolve`], which probes the
/// host, lives with the QEMU command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    Kvm,
    /// Software emulation. What tests use: an idle TCG guest costs ~0.4 % of a core.
    Tcg,
    /// KVM when `/dev/kvm` can be opened read-write, else TCG. The config option `kvm: 0`
    /// forces TCG in any case.
    #[default]
    Auto,
}

/// Resource limits of each tunnel's Lua VM (`lua_memory_mib`, `lua_instruction_limit`).
#[derive(Debug, Clone, Copy)]
pub struct LuaLimits {
    /// Bytes the Lua heap of one tunnel may hold.
    pub memory_bytes: usize,
    /// Lua VM instructions one command (or loading the handlers) may execute.
    pub instructions: i64,
}

impl Default for LuaLimits {
    fn default() -> Self {
        LuaLimits {
            memory_bytes: 32 << 20,
            instructions: 50_000_000,
        }
    }
}

/// Settings of one node, resolved from defaults, the optional config file and flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub listen: SocketAddr,
    /// Serve HTTPS (the default). `false` serves plain HTTP: for benchmarks and for nodes
    /// behind a TLS-terminating proxy; tokens and tickets then cross the wire in clear.
    pub tls: bool,
    /// Delay before a 401 reply (pveproxy waits 3 s to slow down guessing).
    pub auth_failure_delay: Duration,
    /// How long a new tunnel worker waits for its one control connection.
    pub tunnel_accept_timeout: Duration,
    /// Bridges accepted by `mtunnel` besides the ones present in `/sys/class/net`.
    pub bridges: Vec<String>,
    pub storages: BTreeMap<String, StorageDef>,
    /// Directory whose `*.lua` files override the built-in handlers.
    pub handlers_dir: PathBuf,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest time a request body may take to arrive, counted from the end of the
    /// headers (a client trickling bytes must not hold a request open forever).
    pub body_read_timeout: Duration,
    /// QEMU acceleration: `kvm`, `tcg` or `auto` (KVM when `/dev/kvm` is usable).
    pub qemu_accel: Accel,
    /// Memory and instruction limits of each tunnel's Lua VM.
    pub lua_limits: LuaLimits,
    /// A WebSocket peer from which no frame arrived for this long is dropped (the server
    /// pings every connection at a third of it), and its tunnel cleans up.
    pub peer_timeout: Duration,
    /// How long SIGTERM/SIGINT waits for open tunnels to clean up before `serve` exits.
    pub shutdown_timeout: Duration,
    /// Open tunnels at most; more get 503.
    pub max_tunnels: usize,
    /// Concurrent HTTP connections (including WebSocket streams) at most; more get 503.
    pub max_connections: usize,
    /// Most multifd channels (parallel RAM streams) an incoming migration may use, as
    /// offered to mtunnel sources by `mtunnel-features`; 1 offers none (one stream).
    pub multifd_channels_max: u32,
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub node: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// `false`: plain HTTP instead of HTTPS.
    pub tls: Option<bool>,
    pub auth_failure_delay_ms: Option<u64>,
    pub tunnel_accept_timeout_secs: Option<u64>,
    pub bridges: Option<Vec<String>>,
    pub handlers_dir: Option<PathBuf>,
    pub max_body_bytes: Option<usize>,
    /// Seconds a request body may take to arrive (default 30).
    pub body_read_timeout_secs: Option<u64>,
    /// `kvm`, `tcg` or `auto`.
    pub qemu_accel: Option<String>,
    /// Lua heap per tunnel, MiB (default 32).
    pub lua_memory_mib: Option<usize>,
    /// Lua VM instructions one command may run (default 50 000 000).
    pub lua_instruction_limit: Option<i64>,
    /// Drop a WebSocket peer silent for this long (default 60).
    pub peer_timeout_secs: Option<u64>,
    /// Time open tunnels get to clean up on SIGTERM (default 30).
    pub shutdown_timeout_secs: Option<u64>,
    pub max_tunnels: Option<usize>,
    pub max_connections: Option<usize>,
    /// Most multifd channels of an incoming migration, 1..=16 (default 16; 1 = one stream).
    pub multifd_channels_max: Option<u32>,
    #[serde(default)]
    pub storage: BTreeMap<String, StorageDef>,
}

/// Command-line overrides (each wins over the config file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub node: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
}

impl NodeConfig {
    /// Resolves defaults, the optional TOML file and the flags, in that order.
    pub fn load(overrides: &Overrides) -> anyhow::Result<Self> {
        let file = match &overrides.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<ConfigFile>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => ConfigFile::default(),
        };
        Self::from_parts(file, overrides)
    }

    pub fn from_parts(file: ConfigFile, overrides: &Overrides) -> anyhow::Result<Self> {
        let is_root = nix::unistd::geteuid().is_root();
        let data_dir = overrides
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| default_data_dir(is_root));
        let run_dir = overrides
            .run_dir
            .clone()
            .or(file.run_dir)
            .unwrap_or_else(|| {
                if is_root {
                    PathBuf::from("/run/qemu-server")
                } else {
                    data_dir.join("run")
                }
            });
        let node = match overrides.node.clone().or(file.node) {
            Some(node) => node,
            None => local_hostname()?,
        };
        if !crate::ident::is_node_name(&node) {
            bail!("invalid node name '{node}': use letters, digits and '-' (as PVE does)");
        }
        let listen = match overrides.listen.or(file.listen) {
            Some(addr) => addr,
            None => DEFAULT_LISTEN.parse().context("default listen address")?,
        };
        let mut storages = file.storage;
        if storages.is_empty() {
            storages.insert(
                "local".to_string(),
                StorageDef {
                    kind: StorageKind::Dir,
                    path: data_dir.clone(),
                    content: vec!["images".to_string()],
                    disable: false,
                    bwlimit: Default::default(),
                },
            );
        }
        for id in storages.keys() {
            if !crate::ident::is_storage_id(id) {
                bail!("invalid storage id '{id}' in config");
            }
        }
        let qemu_accel = match file.qemu_accel.as_deref() {
            None | Some("auto") => Accel::Auto,
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            Some(other) => bail!("invalid qemu_accel '{other}': use kvm, tcg or auto"),
        };
        let defaults = LuaLimits::default();
        let lua_limits = LuaLimits {
            memory_bytes: file
                .lua_memory_mib
                .map(|m| m.max(4) << 20)
                .unwrap_or(defaults.memory_bytes),
            instructions: file
                .lua_instruction_limit
                .map(|n| n.max(100_000))
                .unwrap_or(defaults.instructions),
        };
        Ok(NodeConfig {
            lua_limits,
            qemu_accel,
            node,
            handlers_dir: file
                .handlers_dir
                .unwrap_or_else(|| data_dir.join("handlers")),
            data_dir,
            run_dir,
            listen,
            tls: file.tls.unwrap_or(true),
            auth_failure_delay: Duration::from_millis(file.auth_failure_delay_ms.unwrap_or(3000)),
            tunnel_accept_timeout: Duration::from_secs(
                file.tunnel_accept_timeout_secs.unwrap_or(300),
            ),
            bridges: file.bridges.unwrap_or_default(),
            max_body_bytes: file.max_body_bytes.unwrap_or(1024 * 1024),
            body_read_timeout: Duration::from_secs(file.body_read_timeout_secs.unwrap_or(30)),
            storages,
            peer_timeout: Duration::from_secs(file.peer_timeout_secs.unwrap_or(60).max(1)),
            shutdown_timeout: Duration::from_secs(file.shutdown_timeout_secs.unwrap_or(30)),
            max_tunnels: file.max_tunnels.unwrap_or(64).max(1),
            max_connections: file.max_connections.unwrap_or(1024).max(1),
            multifd_channels_max: file.multifd_channels_max.unwrap_or(16).clamp(1, 16),
        })
    }

    /// `{data}/priv`: secrets (HMAC key, token hashes, TLS key), mode 0700.
    pub fn priv_dir(&self) -> PathBuf {
        self.data_dir.join("priv")
    }

    /// `{data}/tasks`: task logs.
    pub fn task_dir(&self) -> PathBuf {
        self.data_dir.join("tasks")
    }

    /// `{data}/tunnels`: the journal of each open tunnel (what it created), for recovery.
    pub fn journal_dir(&self) -> PathBuf {
        self.data_dir.join("tunnels")
    }

    /// `{data}/firewall`: VM firewall files.
    pub fn firewall_dir(&self) -> PathBuf {
        self.data_dir.join("firewall")
    }

    /// The control socket of the tunnel for `vmid`.
    pub fn tunnel_socket(&self, vmid: u32) -> PathBuf {
        self.run_dir.join(format!("{vmid}.mtunnel"))
    }

    /// Whether a bridge is known on this node (configured, or a Linux interface).
    pub fn bridge_exists(&self, bridge: &str) -> bool {
        let plain = !bridge.is_empty()
            && bridge.len() <= 15
            && bridge != "."
            && bridge != ".."
            && bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        plain
            && (self.bridges.iter().any(|b| b == bridge)
                || Path::new("/sys/class/net").join(bridge).exists())
    }
}

/// A bridge as `GET /nodes/{node}/network` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// Its link is up (a configured bridge that does not exist here is not).
    pub active: bool,
}

impl NodeConfig {
    /// The bridges of this node: Linux bridges (`/sys/class/net/<if>/bridge`) and the
    /// configured `bridges`, sorted by name.
    pub fn bridges(&self) -> Vec<Bridge> {
        let mut out: BTreeMap<String, bool> = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for entry in entries.flatten() {
                let dev = entry.path();
                if dev.join("bridge").is_dir()
                    && let Some(name) = entry.file_name().to_str()
                {
                    let up = std::fs::read_to_string(dev.join("operstate"))
                        .is_ok_and(|s| matches!(s.trim(), "up" | "unknown"));
                    out.insert(name.to_string(), up);
                }
            }
        }
        for name in &self.bridges {
            out.entry(name.clone()).or_insert(false);
        }
        out.into_iter()
            .map(|(name, active)| Bridge { name, active })
            .collect()
    }
}

fn default_data_dir(is_root: bool) -> PathBuf {
    if is_root {
        return PathBuf::from("/var/lib/mtunnel");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("mtunnel");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/mtunnel"),
        None => PathBuf::from("/tmp/mtunnel"),
    }
}

/// The short host name, as PVE uses for its node name.
pub fn local_hostname() -> anyhow::Result<String> {
    let name = nix::unistd::gethostname().context("reading the host name")?;
    let name = name.to_string_lossy();
    let short = name.split('.').next().unwrap_or("localhost");
    Ok(short.to_string())
}
