//! Many tunnels open at once: `tunnels` tunnels are opened one after the other, each timed
//! from `POST .../mtunnel` to the reply of its first command (`version`) over its control
//! WebSocket, and all are kept open (connected, idle). The serve process's resident memory
//! before and after, divided by the count, is the memory of one idle tunnel (its worker,
//! Lua VM, task log, control socket, WebSocket and TLS state).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::latency::command;
use super::nodes::{NodeSpec, ServeNode, write_script};
use super::percentile;
use super::procs::{open_fds, rss_kib, threads};

#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub tunnels: u32,
    pub tls: bool,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_tunnel_kib: f64,
    pub fds_per_tunnel: f64,
    pub threads_before: u64,
    pub threads_after: u64,
    pub setup_p50_ms: f64,
    pub setup_p99_ms: f64,
    pub setup_max_ms: f64,
    /// Of the setup: the `POST` alone (p50).
    pub post_p50_ms: f64,
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

pub async fn run(base: &Path, tunnels: u32) -> anyhow::Result<Idle> {
    let dir = base.join("idle");
    let sockets = dir.join("s");
    std::fs::create_dir_all(&sockets)?;
    let script = write_script(&sockets)?;
    let node = ServeNode::start(
        &dir.join("n"),
        &NodeSpec {
            tls: true,
            script: Some(script),
            // The node's cap (default 64) would refuse the section's own tunnels.
            extra_toml: format!("max_tunnels = {}\n", tunnels.max(64)),
            ..NodeSpec::default()
        },
    )
    .await?;
    let api = node.api()?;
    let pid = node.pid();
    let version = json!({"cmd": "version"});
    // Warm-up: the first tunnels pay one-time costs (thread pools, allocator arenas).
    for vmid in 900..903 {
        let opened = node.open_tunnel(&api, vmid).await?;
        let mut ws = node.ws(&node.control_url(&opened)).await?;
        let mut pending = Vec::new();
        command(&mut ws, &version, &mut pending).await?;
        command(&mut ws, &json!({"cmd": "quit"}), &mut pending).await?;
        let _ = ws.close(None).await;
    }
    settle().await;
    let rss_before = rss_kib(pid)?;
    let fds_before = open_fds(pid);
    let threads_before = threads(pid)?;
    let mut open = Vec::new();
    let mut setup_ms = Vec::new();
    let mut post_ms = Vec::new();
    for i in 0..tunnels {
        let vmid = 1000 + i;
        let t0 = Instant::now();
        let opened = node.open_tunnel(&api, vmid).await?;
        post_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut ws = node.ws(&node.control_url(&opened)).await?;
        let mut pending = Vec::new();
        command(&mut ws, &version, &mut pending).await?;
        setup_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        open.push(ws);
    }
    settle().await;
    let rss_after = rss_kib(pid)?;
    let fds_after = open_fds(pid);
    let threads_after = threads(pid)?;
    for mut ws in open {
        let _ = ws.close(None).await;
    }
    setup_ms.sort_by(f64::total_cmp);
    post_ms.sort_by(f64::total_cmp);
    let n = tunnels.max(1) as f64;
    Ok(Idle {
        tunnels,
        tls: true,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_tunnel_kib: rss_after.saturating_sub(rss_before) as f64 / n,
        fds_per_tunnel: fds_after.saturating_sub(fds_before) as f64 / n,
        threads_before,
        threads_after,
        setup_p50_ms: percentile(&setup_ms, 50.0),
        setup_p99_ms: percentile(&setup_ms, 99.0),
        setup_max_ms: setup_ms.last().copied().unwrap_or(0.0),
        post_p50_ms: percentile(&post_ms, 50.0),
    })
}
