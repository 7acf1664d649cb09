//! `mtunnel doctor ENDPOINT`: what limits a migration to that target. It measures
//! - the round-trip time: TCP connects to the endpoint (the handshake is one round trip)
//!   and authenticated API GETs on one kept-alive connection,
//! - the throughput of the path a disk takes: a tunnel opened as `mtunnel migrate` opens
//!   it, a `disk-import` of a throw-away volume on a target storage fed through a
//!   forwarded socket with `size` bytes, timed from the first byte to the target's
//!   `query-disk-import` answering done; the tunnel then quits with cleanup (the volume is
//!   destroyed on the target), and the CPU this process used meanwhile,
//! - the host's TCP buffer limits (`/proc/sys/net`) and the tunnel's own buffer
//!   ([`crate::net::sockbuf`]), and the target storage's `bwlimit`,
//!
//! and says which of them caps a flow at that RTT. It changes nothing but that volume and
//! its local forward socket (in a directory of its own, removed at the end).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::endpoint::TargetEndpoint;
use super::http::{ApiClient, encode_segment};
use super::tunnel::{Control, Endpoint, forward};
use crate::net::sockbuf::{self, Limits};

/// What to measure.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub target: TargetEndpoint,
    /// Target storage of the throw-away volume.
    pub storage: String,
    /// Bytes pushed through the tunnel.
    pub size: u64,
    /// Where the local forward socket's directory is made.
    pub run_dir: PathBuf,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub node: String,
    /// TCP connect times, ms.
    pub connect_ms: Vec<f64>,
    /// Authenticated GET times on one connection, ms.
    pub get_ms: Vec<f64>,
    pub size: u64,
    pub transfer_s: f64,
    /// CPU seconds this process used during the transfer.
    pub cpu_s: f64,
    pub limits: Limits,
    /// The tunnel's buffer setting (bytes; 0: autotuning).
    pub tcp_buffer: u64,
    pub root: bool,
    /// The target storage's limit for a migration, KiB/s.
    pub bwlimit_kib: Option<u64>,
}

/// Runs every measurement.
pub async fn doctor(o: &DoctorOptions) -> anyhow::Result<Report> {
    let connect_ms = connect_times(&o.target, 5).await?;
    let fingerprint = match o.target.fingerprint.clone() {
        Some(f) => f,
        None => super::migrate::pinned_fingerprint(&o.target).await?,
    };
    let api = ApiClient::new(
        o.target.host.clone(),
        o.target.port,
        o.target.apitoken.clone(),
        fingerprint,
    )?
    .keep_alive();
    let mut get_ms = Vec::new();
    let mut node = String::new();
    for _ in 0..4 {
        let t0 = Instant::now();
        let status = api
            .get("/cluster/status", &[])
            .await
            .context("an authenticated GET /cluster/status on the target")?;
        get_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        node = local_node(&status)?;
    }
    // The first GET opens the connection (TCP and TLS): only the others are round trips.
    get_ms.remove(0);
    let cpu0 = process_cpu_s();
    let (transfer_s, bwlimit_kib) = transfer(&api, &node, o).await?;
    Ok(Report {
        node,
        connect_ms,
        get_ms,
        size: o.size,
        transfer_s,
        cpu_s: process_cpu_s() - cpu0,
        limits: Limits::read(),
        tcp_buffer: sockbuf::tcp_buffer(),
        root: nix::unistd::geteuid().is_root(),
        bwlimit_kib,
    })
}

async fn connect_times(target: &TargetEndpoint, n: usize) -> anyhow::Result<Vec<f64>> {
    let bare = target.host.trim_start_matches('[').trim_end_matches(']');
    let mut out = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((bare, target.port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {}:{}: no answer in 10 s", bare, target.port))?
        .with_context(|| format!("connecting to {}:{}", bare, target.port))?;
        out.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(tcp);
    }
    Ok(out)
}

fn local_node(status: &Value) -> anyhow::Result<String> {
    status
        .as_array()
        .and_then(|a| {
            a.iter().find(|e| {
                e["type"] == json!("node")
                    && e.get("local").and_then(crate::util::lenient_bool) == Some(true)
            })
        })
        .and_then(|e| e["name"].as_str())
        .map(str::to_string)
        .context("the target's /cluster/status has no local node entry")
}

/// CPU seconds (user + system) of this process so far.
fn process_cpu_s() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(f64::NAN)
}

/// Opens a tunnel for a free VMID, imports `size` bytes into a throw-away volume, quits
/// with cleanup (also after a failure). Returns the seconds and the storage's bwlimit.
async fn transfer(
    api: &ApiClient,
    node: &str,
    o: &DoctorOptions,
) -> anyhow::Result<(f64, Option<u64>)> {
    let vmid = api
        .get("/cluster/nextid", &[])
        .await
        .context("asking the target for a free VMID (GET /cluster/nextid)")?;
    let vmid: u32 = vmid
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| vmid.as_u64().and_then(|n| u32::try_from(n).ok()))
        .with_context(|| format!("GET /cluster/nextid answered {vmid}"))?;
    let opened = api
        .post(
            &format!("/nodes/{node}/qemu/{vmid}/mtunnel"),
            &[("storages", &o.storage)],
        )
        .await
        .with_context(|| format!("opening a tunnel on the target (storage '{}')", o.storage))?;
    let get = |k: &str| opened.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(ticket), Some(socket)) = (get("ticket"), get("socket")) else {
        bail!("the target's mtunnel reply lacks ticket/socket: {opened}");
    };
    let base_url = format!(
        "https://{}:{}/api2/json/nodes/{node}/qemu/{vmid}",
        super::migrate::url_host(&o.target.host),
        o.target.port
    );
    let endpoint = |url: String| Endpoint {
        url,
        headers: vec![("Authorization".into(), api.token_header().to_string())],
        fingerprint: Some(api.fingerprint().to_string()),
    };
    let control = Control::connect(&endpoint(format!(
        "{base_url}/mtunnelwebsocket?ticket={}&socket={}",
        encode_segment(&ticket),
        encode_segment(&socket)
    )))
    .await
    .context("connecting the tunnel")?;
    let dir = o.run_dir.join(format!("doctor-{}", std::process::id()));
    crate::util::ensure_dir(&dir, 0o700)?;
    let result = import(&control, &endpoint(base_url), vmid, &dir, o).await;
    // The throw-away volume goes with the tunnel's cleanup, whatever happened.
    let quit = control
        .command(
            &json!({"cmd": "quit", "cleanup": 1}),
            Duration::from_secs(60),
        )
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    let r = result?;
    quit.context("ending the tunnel with cleanup (the throw-away volume may be left)")?;
    Ok(r)
}

/// The `disk-import` itself, through a forward of a local socket in `dir`.
async fn import(
    control: &Control,
    endpoint: &Endpoint,
    vmid: u32,
    dir: &Path,
    o: &DoctorOptions,
) -> anyhow::Result<(f64, Option<u64>)> {
    let cmd = |c: Value| async move { control.command(&c, Duration::from_secs(60)).await };
    cmd(json!({"cmd": "version"})).await?;
    let bw = cmd(json!({"cmd": "bwlimit", "storages": [o.storage.as_str()]})).await?;
    let bwlimit_kib = bw.get("bwlimit").and_then(Value::as_u64).filter(|&k| k > 0);
    let reply = cmd(json!({
        "cmd": "disk-import", "volname": format!("vm-{vmid}-disk-0.raw"), "format": "raw",
        "export_formats": "raw+size", "storage": o.storage, "with_snapshots": false,
        "allow_rename": 1, "migration_snapshot": 0,
    }))
    .await?;
    let remote = reply["socket"]
        .as_str()
        .context("disk-import reply without socket")?
        .to_string();
    let local = dir.join("storage.sock");
    let mut ep = endpoint.clone();
    ep.url = format!(
        "{}/mtunnelwebsocket?socket={}&",
        ep.url,
        encode_segment(&remote)
    );
    let _fwd = forward(control, ep, &local, remote, 0)?;
    let t0 = Instant::now();
    push(&local, o.size).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = cmd(json!({"cmd": "query-disk-import"})).await?;
        match s["status"].as_str() {
            Some("complete") => break,
            Some("error") => bail!("the target's disk import failed: {s}"),
            _ if Instant::now() > deadline => bail!("the target's import did not end in 600 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok((t0.elapsed().as_secs_f64(), bwlimit_kib))
}

/// Writes a `raw+size` stream of `size` bytes into the forwarded socket and waits until
/// the target has read it.
async fn push(local: &Path, size: u64) -> anyhow::Result<()> {
    let mut sock = tokio::net::UnixStream::connect(local)
        .await
        .with_context(|| format!("connecting the forwarded socket {}", local.display()))?;
    sock.write_all(&size.to_le_bytes()).await?;
    // Not zeros: nothing on the way may shrink them.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let chunk: Vec<u8> = (0..(1 << 17))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        sock.write_all(&chunk[..n])
            .await
            .context("writing through the tunnel (cut?)")?;
        left -= n as u64;
    }
    sock.shutdown().await?;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(600), sock.read(&mut sink)).await;
    Ok(())
}
