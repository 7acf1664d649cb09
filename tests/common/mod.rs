//! Test harness shared by the integration tests: [`TestServer`] runs the real `mtunnel`
//! binary (`mtunnel serve`) on `127.0.0.1:0` with its data and run directories in a short
//! temporary directory (`/tmp/mtXXXXXX`, so UNIX socket paths stay far below 108 bytes),
//! reads the URL, fingerprint and initial token it prints, creates more tokens through the
//! `mtunnel token create` CLI, and kills the process when dropped.
//!
//! Helpers for tunnels (open one, its WebSocket URL, wait for its task) and a time bound
//! for every test live here too. This module only drives the binary from the outside.

#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mtunnel::client::{ApiClient, ApiError};
use serde_json::Value;

pub mod ctl;
pub mod etcd;
pub mod guest;
pub mod proxy;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mtunnel");
/// Node name every test server runs as.
pub const NODE: &str = "testnode";

/// Runs `fut`, failing the test if it takes longer than `secs`.
pub async fn bounded<F: Future>(secs: u64, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(out) => out,
        Err(_) => panic!("test exceeded its time bound of {secs} s"),
    }
}

/// Knobs for a server's config file.
#[derive(Clone, Debug)]
pub struct Options {
    /// `auth_failure_delay_ms`; `None` leaves the default (3 s) in effect.
    pub auth_delay_ms: Option<u64>,
    /// `tunnel_accept_timeout_secs`; `None` leaves the default (300 s).
    pub accept_timeout_secs: Option<u64>,
    /// `max_body_bytes`; `None` leaves the default (1 MiB).
    pub max_body_bytes: Option<usize>,
    /// Node name (default [`NODE`]).
    pub node: Option<String>,
    /// More top-level TOML lines (e.g. `qemu_accel = "tcg"`).
    pub extra_toml: String,
    /// Extra arguments for `mtunnel serve` (e.g. `--backend scripted:FILE.lua`).
    pub serve_args: Vec<String>,
    /// Extra environment of the `mtunnel serve` process (e.g. a `PATH` with a fake tool).
    pub env: Vec<(String, String)>,
    /// TOML tables appended after everything else (e.g. `[cluster]`).
    pub extra_tables: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth_delay_ms: Some(50),
            accept_timeout_secs: None,
            max_body_bytes: None,
            node: None,
            extra_toml: String::new(),
            serve_args: Vec::new(),
            env: Vec::new(),
            extra_tables: String::new(),
        }
    }
}

/// A running `mtunnel serve`.
pub struct TestServer {
    /// Keeps the temporary directory alive; removed on drop.
    dir: tempfile::TempDir,
    pub data: PathBuf,
    pub run: PathBuf,
    pub config: PathBuf,
    pub host: String,
    pub port: u16,
    /// The `URL:` line `serve` printed.
    pub url: String,
    /// The `fingerprint:` line `serve` printed (empty for a `tls = false` server).
    pub fingerprint: String,
    /// The header value of the initial token (`PVEAPIToken=root@pam!mtunnel=..`).
    pub root_token: String,
    /// What `serve` printed on stdout up to and including the token.
    pub stdout: Vec<String>,
    serve_args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl TestServer {
    /// Starts a server with the test defaults (50 ms auth failure delay).
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mt")
            .tempdir_in("/tmp")
            .expect("creating the test directory");
        let base = dir.path().to_path_buf();
        let data = base.join("d");
        let run = base.join("r");
        let config = base.join("mtunnel.toml");
        for sub in ["local", "off", "isos"] {
            std::fs::create_dir_all(base.join("s").join(sub)).unwrap();
        }
        let mut toml = format!(
            "node = \"{node}\"\n\
             data_dir = \"{data}\"\n\
             run_dir = \"{run}\"\n\
             listen = \"127.0.0.1:0\"\n\
             bridges = [\"vmbr0\"]\n",
            data = data.display(),
            run = run.display(),
            node = opts.node.as_deref().unwrap_or(NODE),
        );
        toml.push_str(&opts.extra_toml);
        if let Some(ms) = opts.auth_delay_ms {
            toml.push_str(&format!("auth_failure_delay_ms = {ms}\n"));
        }
        if let Some(secs) = opts.accept_timeout_secs {
            toml.push_str(&format!("tunnel_accept_timeout_secs = {secs}\n"));
        }
        if let Some(bytes) = opts.max_body_bytes {
            toml.push_str(&format!("max_body_bytes = {bytes}\n"));
        }
        toml.push_str(&format!(
            "\n[storage.local]\ntype = \"dir\"\npath = \"{s}/local\"\ncontent = [\"images\"]\n\
             \n[storage.off]\ntype = \"dir\"\npath = \"{s}/off\"\ncontent = [\"images\"]\ndisable = true\n\
             \n[storage.isos]\ntype = \"dir\"\npath = \"{s}/isos\"\ncontent = [\"iso\"]\n",
            s = base.join("s").display()
        ));
        toml.push_str(&opts.extra_tables);
        std::fs::write(&config, toml).unwrap();
        let mut server = TestServer {
            dir,
            data,
            run,
            config,
            host: "127.0.0.1".into(),
            port: 0,
            url: String::new(),
            fingerprint: String::new(),
            root_token: String::new(),
            stdout: Vec::new(),
            serve_args: opts.serve_args.clone(),
            env: opts.env.clone(),
            child: None,
        };
        server.spawn();
        server.root_token = std::fs::read_to_string(server.data.join("priv/initial-token"))
            .expect("serve wrote no initial token")
            .trim()
            .to_string();
        server
    }

    /// The server's stderr so far (its tracing log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--run-dir")
            .arg(&self.run)
            .args(&self.serve_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("MTUNNEL_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // If the test process dies without running destructors, take the server with it.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("starting mtunnel serve");
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the server never blocks.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut url, mut fingerprint) = (None, None);
        let mut plain = false;
        self.stdout.clear();
        while url.is_none() || (fingerprint.is_none() && !plain) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "mtunnel serve did not print URL and fingerprint; log:\n{}",
                    self.log()
                )
            });
            if let Some(u) = line.strip_prefix("URL: ") {
                url = Some(u.to_string());
            }
            if let Some(f) = line.strip_prefix("fingerprint: ") {
                fingerprint = Some(f.to_string());
            }
            // `tls = false`: no certificate, no fingerprint line.
            if line.starts_with("TLS is off") {
                plain = true;
            }
            self.stdout.push(line);
        }
        // The rest (data dir, initial token) follows right away; collect what comes.
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            self.stdout.push(line);
        }
        let url = url.unwrap();
        let port = url
            .strip_prefix("https://127.0.0.1:")
            .or_else(|| url.strip_prefix("http://127.0.0.1:"))
            .and_then(|r| r.strip_suffix("/api2/json"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected URL line '{url}'"));
        self.url = url;
        self.port = port;
        self.fingerprint = fingerprint.unwrap_or_default();
    }

    /// The `metrics:` URL `serve` printed (set `metrics_listen` in `extra_toml`).
    pub fn metrics_url(&self) -> Option<String> {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("metrics: ").map(str::to_string))
    }

    /// Kills the server (SIGKILL, no cleanup) and starts it again on the same directories.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id (the `pid` field of its UPIDs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether the server process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// A client authenticating with the initial (full access) token.
    pub fn client(&self) -> ApiClient {
        self.client_with(&self.root_token)
    }

    /// A client authenticating with `token_header` (none at all if it is empty); plain
    /// HTTP for a `tls = false` server.
    pub fn client_with(&self, token_header: &str) -> ApiClient {
        let token = token_header.to_string();
        let client = if self.fingerprint.is_empty() {
            ApiClient::plain(&self.host, self.port, token)
        } else {
            ApiClient::new(
                self.host.clone(),
                self.port,
                token,
                self.fingerprint.clone(),
            )
            .unwrap()
        };
        client.with_timeout(Duration::from_secs(30))
    }

    /// `mtunnel token create <authid> <args..>` against this server's config; returns the
    /// printed header value.
    pub fn create_token(&self, authid: &str, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["token", "create", authid])
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("running mtunnel token create");
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let header = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(
            header.starts_with(&format!("PVEAPIToken={authid}=")),
            "{header}"
        );
        header
    }

    /// The directory of VM `vmid`'s volumes on storage `local` (`{base}/s/local/images/{vmid}`).
    pub fn images(&self, vmid: u32) -> PathBuf {
        self.base().join(format!("s/local/images/{vmid}"))
    }

    /// Path of a VM config.
    pub fn vm_config(&self, vmid: u32) -> PathBuf {
        self.data.join("qemu-server").join(format!("{vmid}.conf"))
    }

    /// The control socket path of a tunnel.
    pub fn socket(&self, vmid: u32) -> PathBuf {
        self.run.join(format!("{vmid}.mtunnel"))
    }

    /// The WebSocket URL of a tunnel socket, in the control connection's query order.
    pub fn ws_url(&self, vmid: u32, socket: &str, ticket: &str) -> String {
        format!(
            "wss://{}:{}/api2/json/nodes/{NODE}/qemu/{vmid}/mtunnelwebsocket?ticket={}&socket={}",
            self.host,
            self.port,
            pct(ticket),
            pct(socket)
        )
    }

    /// `POST .../mtunnel` with the root token and no parameters.
    pub async fn open_tunnel(&self, vmid: u32) -> Tunnel {
        let data = self
            .client()
            .post(&format!("/nodes/{NODE}/qemu/{vmid}/mtunnel"), &[])
            .await
            .unwrap_or_else(|e| panic!("opening tunnel {vmid}: {e}"));
        Tunnel::from_reply(vmid, &data)
    }

    /// Opens the control WebSocket of `tunnel` with the root token.
    pub async fn connect(&self, tunnel: &Tunnel) -> mtunnel::net::ws::WsStream {
        self.connect_as(tunnel, &self.root_token).await.unwrap()
    }

    pub async fn connect_as(
        &self,
        tunnel: &Tunnel,
        token: &str,
    ) -> Result<mtunnel::net::ws::WsStream, ApiError> {
        let url = self.ws_url(tunnel.vmid, &tunnel.socket, &tunnel.ticket);
        mtunnel::net::ws::connect(
            &url,
            &[("Authorization".to_string(), token.to_string())],
            &self.fingerprint,
        )
        .await
        .map_err(ApiError::from)
    }

    /// Polls the task status until it is `stopped` (panics after `secs`); returns it.
    pub async fn wait_stopped(&self, upid: &str, secs: u64) -> Value {
        let client = self.client();
        let path = format!("/nodes/{NODE}/tasks/{upid}/status");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let status = client.get(&path, &[]).await.unwrap();
            if status["status"] == "stopped" {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "task {upid} still running after {secs} s: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole task log as lines.
    pub async fn task_log(&self, upid: &str) -> Vec<String> {
        let data = self
            .client()
            .get(
                &format!("/nodes/{NODE}/tasks/{upid}/log"),
                &[("start", "0"), ("limit", "1000")],
            )
            .await
            .unwrap();
        data.as_array()
            .unwrap()
            .iter()
            .map(|l| l["t"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        // VMs outlive the server by design; a test's VMs must not outlive the test, even
        // when it failed halfway.
        if let Ok(entries) = std::fs::read_dir(&self.run) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(vmid) = name.to_str().and_then(|n| n.strip_suffix(".pid")) else {
                    continue;
                };
                if let Some(pid) = vmid
                    .parse()
                    .ok()
                    .and_then(|vmid| mtunnel::qemu::is_running(&self.run, vmid))
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("---- mtunnel serve log ----\n{}", self.log());
        }
    }
}

/// What `POST .../mtunnel` returned.
#[derive(Clone, Debug)]
pub struct Tunnel {
    pub vmid: u32,
    pub upid: String,
    pub ticket: String,
    pub socket: String,
}

impl Tunnel {
    pub fn from_reply(vmid: u32, data: &Value) -> Self {
        let field = |k: &str| {
            data[k]
                .as_str()
                .unwrap_or_else(|| panic!("no '{k}' in {data}"))
                .to_string()
        };
        Tunnel {
            vmid,
            upid: field("upid"),
            ticket: field("ticket"),
            socket: field("socket"),
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (as `uri_escape` does).
pub fn pct(s: &str) -> String {
    mtunnel::client::http::encode_segment(s)
}

/// Polls `cond` every 20 ms; false if it did not become true within `timeout`.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a whole file, `None` if it does not exist.
pub fn read_opt(path: &Path) -> Option<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// Mints a tunnel ticket by hand, independently of the server's code: `PVETUNNEL:<T>::<S>`
/// with `S` = base64 HMAC-SHA256 over `PVETUNNEL:<T>:<authid>:<normalized /socket/ path>`,
/// keyed with `{data}/priv/tunnel.key`.
pub fn mint_ticket(data: &Path, authid: &str, socket: &str, time: u64) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let key = std::fs::read(data.join("priv/tunnel.key")).unwrap();
    let joined = format!("/socket/{socket}");
    let parts: Vec<&str> = joined.split('/').filter(|p| !p.is_empty()).collect();
    let path = format!("/{}", parts.join("/"));
    let t = format!("{time:08X}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("PVETUNNEL:{t}:{authid}:{path}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("PVETUNNEL:{t}::{sig}")
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Like [`mint_ticket`] for the ticket format that binds the tunnel instance: the MAC'd
/// message ends in `:<upid>` of the tunnel the ticket is for, so a ticket of one tunnel is
/// refused by the next tunnel of the same VMID.
pub fn mint_tunnel_ticket(
    data: &Path,
    authid: &str,
    socket: &str,
    upid: &str,
    time: u64,
) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let key = std::fs::read(data.join("priv/tunnel.key")).unwrap();
    let joined = format!("/socket/{socket}");
    let parts: Vec<&str> = joined.split('/').filter(|p| !p.is_empty()).collect();
    let path = format!("/{}", parts.join("/"));
    let t = format!("{time:08X}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("PVETUNNEL:{t}:{authid}:{path}:{upid}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("PVETUNNEL:{t}::{sig}")
}

// ---- process control and on-disk views for the fault tests (tests/faults.rs) ----

impl TestServer {
    /// The temporary directory holding `d/` (data), `r/` (run), `s/` (storages).
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    /// Sends `signal` to the server process (nothing if it is not running).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, signal).expect("signalling mtunnel serve");
        }
    }

    /// Waits up to `secs` for the server process to exit and returns its status; `None`
    /// if it still runs then. The process stays reaped; [`TestServer::restart`] starts a
    /// new one on the same directories.
    pub async fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("waiting for mtunnel serve") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A task's log read from `{data}/tasks/*/<UPID>` (works while the server is down).
    pub fn task_log_file(&self, upid: &str) -> Option<String> {
        let tasks = self.data.join("tasks");
        for entry in std::fs::read_dir(tasks).ok()?.flatten() {
            let path = entry.path().join(upid);
            if let Some(text) = read_opt(&path) {
                return Some(text);
            }
        }
        None
    }

    /// UPIDs of the `qmtunnel` tasks of `vmid` found in `{data}/tasks`, oldest first.
    pub fn tunnel_upids(&self, vmid: u32) -> Vec<String> {
        let needle = format!(":qmtunnel:{vmid}:");
        let mut found: Vec<(u64, String)> = Vec::new();
        let Ok(dirs) = std::fs::read_dir(self.data.join("tasks")) else {
            return Vec::new();
        };
        for dir in dirs.flatten() {
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                if name.starts_with("UPID:") && name.contains(&needle) {
                    // UPID:node:pid:pstart:starttime:...
                    let start = name
                        .split(':')
                        .nth(4)
                        .and_then(|t| u64::from_str_radix(t, 16).ok())
                        .unwrap_or(0);
                    found.push((start, name));
                }
            }
        }
        found.sort();
        found.into_iter().map(|(_, n)| n).collect()
    }
}

// ---- a real btrfs for the btrfs storage tests (tests/btrfs.rs) ----

/// A 512 MiB btrfs made with `mkfs.btrfs` on a sparse file under `/tmp` and loop-mounted;
/// unmounted and removed on drop, also when the test panics. Needs root and btrfs-progs
/// (`apt-get install btrfs-progs`; `scripts/test-all.sh` installs it).
pub struct LoopBtrfs {
    dir: tempfile::TempDir,
    /// The mount point: use it as a `btrfs` storage's `path`.
    pub mnt: PathBuf,
}

impl LoopBtrfs {
    pub fn new() -> Self {
        Self::with_size(512 << 20)
    }

    /// A file system of `size` bytes (a sparse image file: it takes what is written).
    pub fn with_size(size: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("btrfs")
            .tempdir_in("/tmp")
            .expect("creating the btrfs test directory");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .expect("creating the btrfs image file");
        run_tool("mkfs.btrfs", &["-q".as_ref(), img.as_os_str()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run_tool(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        );
        LoopBtrfs { dir, mnt }
    }

    /// `[storage.<id>]` of type `btrfs` on this file system, as a top-level TOML line for
    /// [`Options::extra_toml`].
    pub fn storage_toml(&self, id: &str) -> String {
        format!(
            "storage.{id} = {{ type = \"btrfs\", path = \"{}\", content = [\"images\"] }}\n",
            self.mnt.display()
        )
    }

    /// Paths of the subvolumes below the mount point (`btrfs subvolume list -o`), sorted.
    pub fn subvolumes(&self) -> Vec<String> {
        let out = Command::new("btrfs")
            .args(["subvolume", "list", "-o"])
            .arg(&self.mnt)
            .output()
            .expect("running btrfs subvolume list");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(" path ").nth(1).map(str::to_string))
            .collect();
        paths.sort();
        paths
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Busy (a QEMU still closing its file): detach lazily so the loop file goes.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Runs a tool and panics with its stderr (or an install hint) when it fails.
pub fn run_tool(cmd: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd}: {e} (install it: apt-get install btrfs-progs qemu-utils)")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- driving the `mtunnel` CLI of a node (migrations, VMs) ----

/// Runs `mtunnel <args> --config <node's config>` (at most 120 s); output goes to files
/// next to the node's directories, so a command that hangs still shows what it did.
pub async fn mt(node: &TestServer, args: &[&str]) -> std::process::Output {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let out_path = node.base().join(format!("cli{seq}.out"));
    let err_path = node.base().join(format!("cli{seq}.err"));
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(&node.config)
        .env("MTUNNEL_LOG", "info")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("running mtunnel");
    let status = match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(status) => status.expect("waiting for mtunnel"),
        Err(_) => panic!(
            "mtunnel {args:?} did not finish within 120 s\nstderr:\n{}\nserver log:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default(),
            node.log()
        ),
    };
    std::process::Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// [`mt`] that must succeed; returns its stdout.
pub async fn mt_ok(node: &TestServer, args: &[&str]) -> String {
    succeeded(args, mt(node, args).await)
}

/// The stdout of a `mtunnel ARGS` run that must have succeeded.
fn succeeded(args: &[&str], out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "mtunnel {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `--target` argument of `mtunnel migrate` for `target` reached on `port`.
pub fn target_arg(target: &TestServer, port: u16) -> String {
    format!(
        "host=127.0.0.1,port={port},apitoken={},fingerprint={}",
        target.root_token, target.fingerprint
    )
}

/// A node whose VMs run under TCG (real guests cannot boot under this machine's KVM, and
/// TCG behaves alike everywhere); skips the test without QEMU.
pub fn tcg_node(name: &str) -> TestServer {
    require_qemu();
    TestServer::start_with(Options {
        node: Some(name.into()),
        extra_toml: "qemu_accel = \"tcg\"\n".into(),
        ..Options::default()
    })
}

/// `mtunnel migrate VMID --online` from `src` to `dst` onto storage `local`, as most
/// migration tests run it.
pub async fn migrate_online(src: &TestServer, dst: &TestServer, vmid: u32) -> std::process::Output {
    let (target, vmid) = (target_arg(dst, dst.port), vmid.to_string());
    mt(src, &online_args(&vmid, &target)).await
}

/// Like [`migrate_online`]; it must succeed: its stdout.
pub async fn migrate_online_ok(src: &TestServer, dst: &TestServer, vmid: u32) -> String {
    let (target, vmid) = (target_arg(dst, dst.port), vmid.to_string());
    let args = online_args(&vmid, &target);
    succeeded(&args, mt(src, &args).await)
}

fn online_args<'a>(vmid: &'a str, target: &'a str) -> [&'a str; 7] {
    [
        "migrate",
        vmid,
        "--target",
        target,
        "--target-storage",
        "local",
        "--online",
    ]
}

/// `qemu-io -f <fmt> -c <cmd> <path>`.
pub fn qemu_io(fmt: &str, cmd: &str, path: &Path) {
    run_tool(
        "qemu-io",
        &[
            "-f".as_ref(),
            fmt.as_ref(),
            "-c".as_ref(),
            cmd.as_ref(),
            path.as_os_str(),
        ],
    );
}

/// Asserts that `qemu-img compare` finds the guest-visible bytes of `a` (in format
/// `a_fmt`) and `b` (in `b_fmt`) identical, e.g. a qcow2 source and its raw copy.
pub fn assert_same_guest_bytes(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()
        .expect("running qemu-img compare");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Images are identical.",
        "{} vs {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`assert_same_guest_bytes`] for two image files whose names say their format
/// (`*.qcow2` is qcow2, anything else raw).
pub fn assert_identical(a: &Path, b: &Path) {
    let format = |p: &Path| {
        if p.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        }
    };
    assert_same_guest_bytes(a, format(a), b, format(b));
}

/// A 64 MiB qcow2 image `dir/src.qcow2` of pseudo-random data (nothing sparse), made by
/// qemu-img from `dir/src.raw`.
pub fn random_qcow2(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    blob(&raw, 64 << 20);
    let img = dir.join("src.qcow2");
    run_tool(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            img.as_os_str(),
        ],
    );
    img
}

// ---- real QEMU, shared by the migration and fault tests ----

/// Fails (with the install hint) unless QEMU's binaries are on PATH.
pub fn require_qemu() {
    for tool in ["qemu-system-x86_64", "qemu-img", "qemu-io"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        assert!(
            found,
            "{tool} is not installed: run `bash .ci/install-qemu.sh` (scripts/test-all.sh does)"
        );
    }
}

/// One QMP command to VM `vmid` of the node with run dir `run`.
pub async fn qmp(run: &Path, vmid: u32, cmd: &str, args: Value) -> Value {
    let qmp =
        mtunnel::qemu::Qmp::connect(&run.join(format!("{vmid}.qmp")), Duration::from_secs(10))
            .await
            .expect("QMP connect");
    qmp.execute(cmd, args, Duration::from_secs(30))
        .await
        .expect("QMP command")
}

/// 8 MiB of 0x5a at 100 MiB of the running VM's `scsi0`, written by its QEMU (HMP
/// `qemu-io`): guest writes a dirty bitmap sees, without a guest OS.
pub async fn write_8m_live(node: &TestServer, vmid: u32) {
    let wrote = qmp(
        &node.run,
        vmid,
        "human-monitor-command",
        serde_json::json!({"command-line": "qemu-io -d scsi0 \"write -P 0x5a 100M 8M\""}),
    )
    .await;
    // HMP answers an error as text; success is silent.
    assert_eq!(wrote, serde_json::json!(""), "HMP qemu-io failed");
}

/// The pid of VM `vmid`'s QEMU on `node`, if it runs.
pub fn pid_of(node: &TestServer, vmid: u32) -> Option<i32> {
    mtunnel::qemu::is_running(&node.run, vmid)
}

/// Writes `size` pseudo-random bytes to a file (a RAM blob).
pub fn blob(path: &Path, size: usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, &data[..size]).unwrap();
}

/// Starts VM `vmid` on `node` with `ram_mib` MiB of pseudo-random data ([`blob`]) loaded
/// at 16 MiB of its RAM; returns the blob's path (to compare the target's RAM with).
pub async fn start_with_ram(node: &TestServer, vmid: u32, ram_mib: usize) -> PathBuf {
    let blob_path = node.base().join(format!("blob{vmid}"));
    blob(&blob_path, ram_mib << 20);
    let loader = format!(
        "loader,file={},addr=16777216,force-raw=on",
        blob_path.display()
    );
    mt_ok(
        node,
        &[
            "vm",
            "start",
            &vmid.to_string(),
            "--qemu-arg=-device",
            &format!("--qemu-arg={loader}"),
        ],
    )
    .await;
    blob_path
}
