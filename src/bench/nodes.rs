//! The processes a benchmark drives: `mtunnel serve` nodes in a temporary directory (plain
//! HTTP or TLS, scripted or real backend) and `mtunnel tunnel` driven over stdin/stdout the
//! way Proxmox's Perl drives `proxmox-websocket-tunnel` (`connect`, relayed commands,
//! `forward`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

use super::procs::{ChildGuard, mtunnel_command};
use super::wan::Netns;
use mtunnel::client::ApiClient;
use mtunnel::client::http::encode_segment;
use mtunnel::net::ws::{self, WsStream};

/// Node name of every bench node.
pub const NODE: &str = "bench";

/// What a node is started with.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    pub tls: bool,
    /// `--backend scripted:FILE` when set, else the real backend (QEMU).
    pub script: Option<PathBuf>,
    /// More top-level TOML lines.
    pub extra_toml: String,
    /// Run inside this network namespace (default: this process's).
    pub netns: Option<Arc<Netns>>,
    /// Listen on this address (default 127.0.0.1).
    pub listen_ip: Option<Ipv4Addr>,
}

/// Where the two ends of a measured path run: both here on loopback by default, or on the
/// two sides of an emulated WAN link ([`super::wan`]).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Writers, `mtunnel tunnel`, migration sources.
    pub client: Option<Arc<Netns>>,
    /// Readers, `mtunnel serve`, migration targets, and the address they listen on.
    pub server: Option<(Arc<Netns>, Ipv4Addr)>,
    /// Config lines added to every server-side node (e.g. `multifd_channels_max = 1`).
    pub server_toml: String,
    /// Config lines of every client-side node (the source of `mtunnel migrate`) and, after
    /// `server_toml`, of every server-side node: what both ends share (e.g.
    /// `tcp_buffer_mib`).
    pub shared_toml: String,
}

impl Placement {
    /// A node spec on the server side.
    pub fn server_spec(&self, tls: bool, script: Option<PathBuf>, extra_toml: String) -> NodeSpec {
        NodeSpec {
            tls,
            script,
            extra_toml: extra_toml + &self.server_toml + &self.shared_toml,
            netns: self.server.as_ref().map(|(ns, _)| Arc::clone(ns)),
            listen_ip: self.server.as_ref().map(|(_, ip)| *ip),
        }
    }

    /// A migration's two ends under `dir`, both with `accel_toml` and TLS: the source
    /// node's config (`{dir}/src`, client side) and a started target `serve` (`{dir}/dst`).
    pub async fn source_and_target(
        &self,
        dir: &Path,
        accel_toml: String,
    ) -> anyhow::Result<(PathBuf, ServeNode)> {
        let src_config = write_node_config(
            &dir.join("src"),
            &NodeSpec {
                tls: true,
                extra_toml: accel_toml.clone() + &self.shared_toml,
                ..NodeSpec::default()
            },
        )?;
        let target =
            ServeNode::start(&dir.join("dst"), &self.server_spec(true, None, accel_toml)).await?;
        Ok((src_config, target))
    }
}

/// A running `mtunnel serve`.
pub struct ServeNode {
    /// The address it listens on (and clients connect to).
    pub host: String,
    pub run: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub tls: bool,
    pub fingerprint: Option<String>,
    /// `PVEAPIToken=root@pam!mtunnel=...`
    pub token: String,
    pub child: ChildGuard,
}

/// What `POST .../mtunnel` returned.
#[derive(Debug, Clone)]
pub struct Opened {
    pub vmid: u32,
    pub ticket: String,
    pub socket: String,
}

/// Writes a node's config file under `dir` (data, run and storage inside it).
pub fn write_node_config(dir: &Path, spec: &NodeSpec) -> anyhow::Result<PathBuf> {
    let data = dir.join("d");
    let run = dir.join("r");
    let storage = dir.join("st");
    std::fs::create_dir_all(&storage)?;
    std::fs::create_dir_all(&run)?;
    let config = dir.join("node.toml");
    let toml = format!(
        "node = \"{NODE}\"\ndata_dir = \"{}\"\nrun_dir = \"{}\"\nlisten = \"{}:0\"\n\
         tls = {}\nauth_failure_delay_ms = 10\nbridges = [\"vmbr0\"]\n{}\n\
         [storage.local]\ntype = \"dir\"\npath = \"{}\"\ncontent = [\"images\"]\n",
        data.display(),
        run.display(),
        spec.listen_ip.unwrap_or(Ipv4Addr::LOCALHOST),
        spec.tls,
        spec.extra_toml,
        storage.display()
    );
    std::fs::write(&config, toml)?;
    Ok(config)
}

impl ServeNode {
    /// This node as `mtunnel migrate --target` takes it (PVE's `target-endpoint`).
    pub fn target_endpoint(&self) -> String {
        format!(
            "host={},port={},apitoken={},fingerprint={}",
            self.host,
            self.port,
            self.token,
            self.fingerprint.as_deref().unwrap_or_default()
        )
    }

    /// Starts `mtunnel serve` with its state under `dir` and waits for its URL.
    pub async fn start(dir: &Path, spec: &NodeSpec) -> anyhow::Result<ServeNode> {
        std::fs::create_dir_all(dir)?;
        let config = write_node_config(dir, spec)?;
        let config_s = config.display().to_string();
        let mut args = vec!["serve", "--config", &config_s];
        let backend;
        if let Some(script) = &spec.script {
            backend = format!("scripted:{}", script.display());
            args.push("--backend");
            args.push(&backend);
        }
        let mut cmd = mtunnel_command(&args, &dir.join("serve.log"))?;
        if let Some(ns) = &spec.netns {
            ns.apply(&mut cmd)?;
        }
        let mut child = ChildGuard::spawn("mtunnel serve", cmd)?;
        let stdout = child.child.stdout.take().context("serve stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut url = None;
        let mut fingerprint = None;
        let read = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(u) = line.strip_prefix("URL: ") {
                    url = Some(u.to_string());
                }
                if let Some(f) = line.strip_prefix("fingerprint: ") {
                    fingerprint = Some(f.to_string());
                }
                if url.is_some() && (fingerprint.is_some() || !spec.tls) {
                    return Ok::<_, anyhow::Error>(true);
                }
            }
            Ok(false)
        };
        let log = dir.join("serve.log");
        match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) | Err(_) => bail!(
                "mtunnel serve did not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = url.unwrap_or_default();
        let want = if spec.tls { "https://" } else { "http://" };
        let port = url
            .strip_prefix(want)
            .and_then(|r| r.strip_suffix("/api2/json"))
            .and_then(|hp| hp.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .with_context(|| format!("unexpected URL line '{url}'"))?;
        let data = dir.join("d");
        let token = std::fs::read_to_string(data.join("priv/initial-token"))
            .context("reading the initial token")?
            .trim()
            .to_string();
        Ok(ServeNode {
            host: spec.listen_ip.unwrap_or(Ipv4Addr::LOCALHOST).to_string(),
            run: dir.join("r"),
            config,
            port,
            tls: spec.tls,
            fingerprint,
            token,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn api(&self) -> anyhow::Result<ApiClient> {
        let client = match &self.fingerprint {
            Some(fp) if self.tls => {
                ApiClient::new(&self.host, self.port, self.token.clone(), fp.clone())?
            }
            _ => ApiClient::plain(&self.host, self.port, self.token.clone()),
        };
        Ok(client.with_timeout(Duration::from_secs(30)))
    }

    /// `https://HOST:PORT/api2/json/nodes/bench/qemu/VMID/mtunnelwebsocket?`, as
    /// Proxmox builds it (`http://` for a plain node).
    pub fn ws_base(&self, vmid: u32) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!(
            "{scheme}://{}:{}/api2/json/nodes/{NODE}/qemu/{vmid}/mtunnelwebsocket?",
            self.host, self.port
        )
    }

    /// The control connection's URL of an opened tunnel.
    pub fn control_url(&self, t: &Opened) -> String {
        format!(
            "{}ticket={}&socket={}",
            self.ws_base(t.vmid),
            encode_segment(&t.ticket),
            encode_segment(&t.socket)
        )
    }

    /// The URL of a forwarded socket with its ticket.
    pub fn socket_url(&self, vmid: u32, socket: &str, ticket: &str) -> String {
        format!(
            "{}socket={}&ticket={}",
            self.ws_base(vmid),
            encode_segment(socket),
            encode_segment(ticket)
        )
    }

    pub fn headers(&self) -> Vec<(String, String)> {
        vec![("Authorization".to_string(), self.token.clone())]
    }

    /// `POST /nodes/bench/qemu/{vmid}/mtunnel`.
    pub async fn open_tunnel(&self, api: &ApiClient, vmid: u32) -> anyhow::Result<Opened> {
        let data = api
            .post(&format!("/nodes/{NODE}/qemu/{vmid}/mtunnel"), &[])
            .await
            .with_context(|| format!("opening a tunnel for VM {vmid}"))?;
        let field = |k: &str| -> anyhow::Result<String> {
            data.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("no '{k}' in {data}"))
        };
        Ok(Opened {
            vmid,

            ticket: field("ticket")?,
            socket: field("socket")?,
        })
    }

    /// Opens a WebSocket to `url` from this process.
    pub async fn ws(&self, url: &str) -> anyhow::Result<WsStream> {
        let ws = ws::connect_opt(url, &self.headers(), self.fingerprint.as_deref()).await;
        Ok(ws.map_err(mtunnel::client::ApiError::from)?)
    }

    /// The `data` object of `mtunnel tunnel`'s `connect` and `forward` control commands.
    pub fn endpoint_data(&self, url: &str) -> Value {
        json!({
            "url": url,
            "headers": [["Authorization", self.token]],
            "fingerprint": self.fingerprint,
        })
    }
}

/// `mtunnel tunnel`, spoken to over its stdin and stdout.
pub struct TunnelProc {
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pub child: ChildGuard,
}

impl TunnelProc {
    /// Starts `mtunnel tunnel`, inside `netns` when given.
    pub fn start(log: &Path, netns: Option<&Netns>) -> anyhow::Result<TunnelProc> {
        let mut cmd = mtunnel_command(&["tunnel"], log)?;
        cmd.stdin(std::process::Stdio::piped());
        if let Some(ns) = netns {
            ns.apply(&mut cmd)?;
        }
        let mut child = ChildGuard::spawn("mtunnel tunnel", cmd)?;
        let stdin = child.child.stdin.take().context("tunnel stdin")?;
        let stdout = child.child.stdout.take().context("tunnel stdout")?;
        Ok(TunnelProc {
            stdin,
            stdout: BufReader::new(stdout).lines(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Writes one line (no reply expected: `connect`).
    pub async fn send(&mut self, msg: &Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(msg)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Writes one line and reads the one reply line.
    pub async fn request(&mut self, msg: &Value) -> anyhow::Result<Value> {
        self.send(msg).await?;
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .context("no reply from mtunnel tunnel within 60 s")??
            .context("mtunnel tunnel closed its stdout")?;
        serde_json::from_str(&line).with_context(|| format!("unparsable reply '{line}'"))
    }

    /// A command that must succeed.
    pub async fn command(&mut self, msg: &Value) -> anyhow::Result<Value> {
        let reply = self.request(msg).await?;
        if reply["success"] != json!(true) {
            bail!("{} failed: {reply}", msg["cmd"]);
        }
        Ok(reply)
    }
}

/// A tunnel to `node` for `vmid` driven through `mtunnel tunnel` the way a PVE source does
/// before its RAM migration: connect, `version`, `config`, `start` (which registers the
/// socket the backend script names), then `forward` of `local` to that socket. Returns the
/// client process and the remote socket. With `client` the API call and `mtunnel tunnel`
/// run inside that namespace (the source side of a WAN link).
pub async fn forwarding_tunnel(
    node: &ServeNode,
    vmid: u32,
    local: &Path,
    log: &Path,
    client: Option<&Netns>,
) -> anyhow::Result<(TunnelProc, String)> {
    let api = node.api()?;
    let opened = match client {
        None => node.open_tunnel(&api, vmid).await?,
        // A blocking wait of a few round trips, on purpose: the call's socket must be
        // opened inside the namespace.
        Some(ns) => ns.block_on(|| node.open_tunnel(&api, vmid))?,
    };
    let mut t = TunnelProc::start(log, client)?;
    t.send(&json!({"control": true, "cmd": "connect",
                   "data": node.endpoint_data(&node.control_url(&opened))}))
        .await?;
    let version = t.request(&json!({"cmd": "version"})).await?;
    if version["api"].as_u64().unwrap_or(0) < 2 {
        bail!("unexpected version reply {version}");
    }
    let remote = start_vm(&mut t).await?;
    let url = format!("{}socket={}&", node.ws_base(vmid), encode_segment(&remote));
    let mut data = node.endpoint_data(&url);
    data["unix"] = json!(local.display().to_string());
    data["ticket"] = json!({"path": remote});
    t.command(&json!({"control": true, "cmd": "forward", "data": data}))
        .await?;
    Ok((t, remote))
}

/// `config` + `start` as a live migration sends them; returns the migration socket.
async fn start_vm(t: &mut TunnelProc) -> anyhow::Result<String> {
    t.command(&start_commands().0).await?;
    let started = t.command(&start_commands().1).await?;
    started["migrate"]["addr"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("start reply without migrate.addr: {started}"))
}

/// The `config` and `start` commands of a diskless live migration.
pub fn start_commands() -> (Value, Value) {
    (
        json!({"cmd": "config", "conf": "memory: 512\ncores: 1\n"}),
        json!({"cmd": "start",
               "start_params": {"statefile": "unix", "skiplock": 1},
               "migrate_opts": {"migratedfrom": "benchsrc", "type": "websocket",
                                "nbd_proto_version": 1, "nbd": {}}}),
    )
}

/// The backend script of the bench nodes: `start_incoming` answers with the socket
/// `{dir}/{vmid}.sock`, on which the bench process listens (sink, source or echo).
pub fn write_script(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("bench.lua");
    let sockets = dir.display().to_string();
    if sockets.contains(['"', '\\', '\n']) {
        bail!("unusable bench directory {sockets}");
    }
    std::fs::write(
        &path,
        format!(
            r#"-- mtunnel bench: every started VM "listens" on a socket of the bench process
local dir = "{sockets}"
return {{
  hypervisor = {{
    start_incoming = function(req)
      backend.default.hypervisor.start_incoming(req)
      return {{ migrate_socket = dir .. "/" .. req.vmid .. ".sock" }}
    end,
  }},
}}
"#
        ),
    )?;
    Ok(path)
}
