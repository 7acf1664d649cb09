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
    /// Where plain-HTTP `GET /metrics` listens; `None` (the default): no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode (`[cluster]`): VMIDs, membership and views shared through etcd.
    /// `None`: a single node, exactly as without clustering.
    pub cluster: Option<ClusterConfig>,
    /// Most multifd channels (parallel RAM streams) an incoming migration may use, as
    /// offered to mtunnel sources by `mtunnel-features`; 1 offers none (one stream).
    pub multifd_channels_max: u32,
    /// TCP buffer per connection and direction of the tunnel's sockets (`serve`'s
    /// listener, client connections), in bytes; 0 leaves the kernel's autotuning alone
    /// (`crate::net::sockbuf`).
    pub tcp_buffer: u64,
}

/// Default `[cluster] lease_ttl_secs`: how long a dead node's membership and open-tunnel
/// reservations outlive it.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;
/// Default `[cluster] timeout_secs`: the bound on one etcd call, failover included.
pub const DEFAULT_ETCD_TIMEOUT_SECS: u64 = 5;

/// The `[cluster]` settings, resolved.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Cluster name: every key lives under `/mtunnel/{name}/`.
    pub name: String,
    /// etcd client URLs (`http://host:port` or `https://host:port`), tried in order.
    pub endpoints: Vec<String>,
    /// TTL of this node's etcd lease (membership and open-tunnel reservations).
    pub lease_ttl: Duration,
    /// Bound on one etcd call; a call that takes longer counts as "no quorum".
    pub timeout: Duration,
    /// The API address other members reach this node at (`https://host:port`); `None`:
    /// derived from the listen address once it is bound.
    pub advertise_url: Option<String>,
    /// CA certificate (PEM) that signed the etcd servers' certificates (`https://`
    /// endpoints); without it the system trust store is used.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The secret all nodes of the cluster share (`secret_file`): it signs member records,
    /// so that whoever can write etcd cannot point forwarding elsewhere.
    pub member_secret: MemberSecret,
}

/// The cluster's shared secret; never printed.
#[derive(Clone)]
pub struct MemberSecret(pub Vec<u8>);

impl std::fmt::Debug for MemberSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberSecret(..)")
    }
}

/// Fewest bytes of a `[cluster] secret_file` (after trimming whitespace).
pub const MIN_MEMBER_SECRET_BYTES: usize = 16;

/// `[cluster]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub name: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub lease_ttl_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub advertise_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub secret_file: Option<PathBuf>,
}

/// Reads the cluster's shared secret from `path`.
fn read_member_secret(path: &std::path::Path) -> anyhow::Result<MemberSecret> {
    let text = std::fs::read(path)
        .with_context(|| format!("reading [cluster] secret_file {}", path.display()))?;
    let secret = text.trim_ascii().to_vec();
    if secret.len() < MIN_MEMBER_SECRET_BYTES {
        bail!(
            "[cluster] secret_file {} holds {} bytes; use at least {MIN_MEMBER_SECRET_BYTES} \
             (e.g. head -c 32 /dev/urandom | base64)",
            path.display(),
            secret.len()
        );
    }
    Ok(MemberSecret(secret))
}

impl ClusterFile {
    /// Checks and resolves `[cluster]`; `listen` decides whether `advertise_url` is needed.
    pub fn resolve(self, listen: SocketAddr) -> anyhow::Result<ClusterConfig> {
        let name = self.name.context("[cluster] needs a name")?;
        if !crate::ident::is_node_name(&name) {
            bail!("invalid [cluster] name '{name}': use letters, digits and '-'");
        }
        if self.endpoints.is_empty() {
            bail!("[cluster] needs endpoints = [\"http://host:2379\", ...] (the etcd client URLs)");
        }
        for url in &self.endpoints {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!(
                    "invalid [cluster] endpoint '{url}': use http://host:port or https://host:port"
                );
            }
        }
        if self.advertise_url.is_none() && listen.ip().is_unspecified() {
            bail!(
                "[cluster] advertise_url is required when listen is {listen}: \
                 other members need an address they can reach (e.g. \"https://10.0.0.5:8006\")"
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            bail!("[cluster] cert_file and key_file go together");
        }
        let Some(secret_file) = &self.secret_file else {
            bail!(
                "[cluster] needs secret_file: a file with a secret all nodes of the cluster \
                 share (e.g. head -c 32 /dev/urandom | base64 > /etc/mtunnel/cluster.secret, \
                 copied to every node, mode 0600); it signs member records so that whoever \
                 can write etcd cannot redirect forwarded requests"
            );
        };
        let member_secret = read_member_secret(secret_file)?;
        Ok(ClusterConfig {
            name,
            endpoints: self.endpoints,
            lease_ttl: Duration::from_secs(
                self.lease_ttl_secs
                    .unwrap_or(DEFAULT_LEASE_TTL_SECS)
                    .clamp(2, 3600),
            ),
            timeout: Duration::from_secs(
                self.timeout_secs
                    .unwrap_or(DEFAULT_ETCD_TIMEOUT_SECS)
                    .clamp(1, 60),
            ),
            advertise_url: self
                .advertise_url
                .map(|u| u.trim_end_matches('/').to_string()),
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            member_secret,
        })
    }
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
    /// `host:port` of the Prometheus metrics listener; empty or absent: none.
    pub metrics_listen: Option<String>,
    /// Cluster mode: etcd endpoints and the cluster name (see [`ClusterFile`]).
    pub cluster: Option<ClusterFile>,
    /// Most multifd channels of an incoming migration, 1..=16 (default 16; 1 = one stream).
    pub multifd_channels_max: Option<u32>,
    /// TCP buffer of the tunnel's connections in MiB, 0..=1024 (default 64; 0: the
    /// kernel's autotuning); more is refused.
    pub tcp_buffer_mib: Option<u64>,
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
        let metrics_listen = match file.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().with_context(|| {
                format!("invalid metrics_listen '{addr}': use host:port, e.g. 127.0.0.1:9710")
            })?),
        };
        let tcp_buffer = match file.tcp_buffer_mib {
            None => crate::net::sockbuf::DEFAULT_TCP_BUFFER,
            Some(m) if m <= 1024 => m << 20,
            Some(m) => {
                bail!("invalid tcp_buffer_mib {m}: at most 1024 (MiB; 0: the kernel's autotuning)")
            }
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
        let cluster = file.cluster.map(|c| c.resolve(listen)).transpose()?;
        Ok(NodeConfig {
            cluster,
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
            metrics_listen,
            multifd_channels_max: file.multifd_channels_max.unwrap_or(16).clamp(1, 16),
            tcp_buffer,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<NodeConfig> {
        let file: ConfigFile = toml::from_str(text)?;
        NodeConfig::from_parts(
            file,
            &Overrides {
                node: Some("n1".into()),
                data_dir: Some("/tmp/mtunnel-config-test".into()),
                ..Overrides::default()
            },
        )
    }

    #[test]
    fn tcp_buffer_mib_defaults_and_bounds() {
        assert_eq!(parse("").unwrap().tcp_buffer, 64 << 20);
        assert_eq!(parse("tcp_buffer_mib = 0\n").unwrap().tcp_buffer, 0);
        assert_eq!(parse("tcp_buffer_mib = 64\n").unwrap().tcp_buffer, 64 << 20);
        let err = parse("tcp_buffer_mib = 4096\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid tcp_buffer_mib 4096: at most 1024 (MiB; 0: the kernel's autotuning)"
        );
    }

    #[test]
    fn cluster_table_resolves_and_is_checked() {
        assert!(parse("").unwrap().cluster.is_none());
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.secret");
        std::fs::write(&secret, "0123456789abcdef\n").unwrap();
        let table = format!(
            "[cluster]\nname = \"lab\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\
             secret_file = \"{}\"\n",
            secret.display()
        );
        let c = parse(&table).unwrap().cluster.unwrap();
        assert_eq!(c.member_secret.0, b"0123456789abcdef");
        std::fs::write(&secret, "short\n").unwrap();
        let err = parse(&table).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "holds 5 bytes; use at least 16 (e.g. head -c 32 /dev/urandom | base64)"
            ),
            "{err:#}"
        );
        let err = parse("[cluster]\nname = \"lab\"\nendpoints = [\"http://127.0.0.1:2379\"]\n")
            .unwrap_err();
        assert!(
            err.to_string().starts_with("[cluster] needs secret_file: "),
            "{err}"
        );
        assert_eq!(c.lease_ttl, Duration::from_secs(DEFAULT_LEASE_TTL_SECS));
        assert_eq!(c.timeout, Duration::from_secs(DEFAULT_ETCD_TIMEOUT_SECS));
        assert_eq!(c.advertise_url, None);
        let err = parse(
            "listen = \"0.0.0.0:8006\"\n[cluster]\nname = \"lab\"\n\
             endpoints = [\"http://127.0.0.1:2379\"]\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("[cluster] advertise_url is required when listen is 0.0.0.0:8006"),
            "{err}"
        );
        let err = parse("[cluster]\nname = \"lab\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("[cluster] needs endpoints"),
            "{err}"
        );
        let err =
            parse("[cluster]\nname = \"lab\"\nendpoints = [\"127.0.0.1:2379\"]\n").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid [cluster] endpoint"),
            "{err}"
        );
    }
}
