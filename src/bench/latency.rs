//! Round trip of one tunnel command, measured from the bench process over its own
//! WebSocket (the same client library `mtunnel tunnel` uses): command line out, reply line
//! back, one at a time. Kinds:
//! - `echo`: WebSocket → serve → a UNIX echo socket of the bench process, registered via
//!   `start` like a migration socket (the transport alone),
//! - `version`: WebSocket → serve → worker → Lua handler → reply,
//! - `ticket`: the same plus a host function (HMAC ticket for a registered socket),
//! - `bwlimit`: the same plus a host function that calls the storage backend.
//!
//! Kinds are interleaved in blocks so drift hits them alike; the serve process's CPU time
//! per command comes from its threads' schedstat.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::nodes::{NodeSpec, ServeNode, start_commands, write_script};
use super::percentile;
use super::procs::cpu_ns_threads;
use mtunnel::net::ws::WsStream;

#[derive(Debug, Clone, Serialize)]
pub struct KindResult {
    pub name: String,
    pub label: String,
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// CPU time of the serve process per command.
    pub server_cpu_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub transport: String,
    pub commands: u32,
    pub kinds: Vec<KindResult>,
}

impl Latency {
    pub fn kind(&self, name: &str) -> Option<&KindResult> {
        self.kinds.iter().find(|k| k.name == name)
    }
}

fn echo_server(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// One line out, one line back.
pub async fn roundtrip(
    ws: &mut WsStream,
    line: &[u8],
    pending: &mut Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    ws.send(Message::binary(line.to_vec())).await?;
    loop {
        if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            return Ok(pending.drain(..=pos).collect());
        }
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => pending.extend_from_slice(&data),
            Some(Ok(Message::Text(text))) => pending.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) | None => bail!("the WebSocket closed"),
            Some(Err(e)) => bail!("WebSocket: {e}"),
        }
    }
}

/// A command that must succeed; returns the reply.
pub async fn command(
    ws: &mut WsStream,
    cmd: &Value,
    pending: &mut Vec<u8>,
) -> anyhow::Result<Value> {
    let mut line = serde_json::to_vec(cmd)?;
    line.push(b'\n');
    let reply: Value = serde_json::from_slice(&roundtrip(ws, &line, pending).await?)?;
    if reply["success"] != json!(true) {
        bail!("{} failed: {reply}", cmd["cmd"]);
    }
    Ok(reply)
}

struct Kind {
    name: &'static str,
    label: &'static str,
    line: Vec<u8>,
    /// Index into the connections: 0 control, 1 echo.
    conn: usize,
    samples: Vec<f64>,
    cpu_ns: u64,
}

/// Runs the section against a fresh scripted node (`tls` or plain).
pub async fn run(base: &Path, tls: bool, commands: u32) -> anyhow::Result<Latency> {
    let transport = if tls { "tls" } else { "plain" };
    let dir = base.join(format!("lat-{transport}"));
    let sockets = dir.join("s");
    std::fs::create_dir_all(&sockets)?;
    let script = write_script(&sockets)?;
    let node = ServeNode::start(
        &dir.join("n"),
        &NodeSpec {
            tls,
            script: Some(script),
            extra_toml: String::new(),
            ..NodeSpec::default()
        },
    )
    .await?;
    let vmid = 110;
    let echo_path = sockets.join(format!("{vmid}.sock"));
    echo_server(&echo_path)?;
    let api = node.api()?;
    let opened = node.open_tunnel(&api, vmid).await?;
    let mut control = node.ws(&node.control_url(&opened)).await?;
    let mut pending_c = Vec::new();
    command(&mut control, &json!({"cmd": "version"}), &mut pending_c).await?;
    let (config, start) = start_commands();
    command(&mut control, &config, &mut pending_c).await?;
    let started = command(&mut control, &start, &mut pending_c).await?;
    let echo = started["migrate"]["addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if Path::new(&echo) != echo_path {
        bail!(
            "start answered socket {echo}, expected {}",
            echo_path.display()
        );
    }
    let ticket = command(
        &mut control,
        &json!({"cmd": "ticket", "path": echo}),
        &mut pending_c,
    )
    .await?["ticket"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let echo_ws = node.ws(&node.socket_url(vmid, &echo, &ticket)).await?;
    let mut conns = [control, echo_ws];
    let mut pendings = [pending_c, Vec::new()];

    let line = |v: Value| {
        let mut l = serde_json::to_vec(&v).unwrap_or_default();
        l.push(b'\n');
        l
    };
    let version = line(json!({"cmd": "version"}));
    let mut kinds = vec![
        Kind {
            name: "echo",
            label: "raw echo: WebSocket -> serve -> UNIX echo socket",
            line: version.clone(),
            conn: 1,
            samples: vec![],
            cpu_ns: 0,
        },
        Kind {
            name: "version",
            label: "version: worker -> Lua handler",
            line: version,
            conn: 0,
            samples: vec![],
            cpu_ns: 0,
        },
        Kind {
            name: "ticket",
            label: "ticket: Lua + host fn (HMAC)",
            line: line(json!({"cmd": "ticket", "path": echo})),
            conn: 0,
            samples: vec![],
            cpu_ns: 0,
        },
        Kind {
            name: "bwlimit",
            label: "bwlimit: Lua + host fn -> storage backend",
            line: line(json!({"cmd": "bwlimit", "storages": ["local"]})),
            conn: 0,
            samples: vec![],
            cpu_ns: 0,
        },
    ];
    // Every kind must answer as expected before it is timed.
    for k in &kinds {
        let reply = roundtrip(&mut conns[k.conn], &k.line, &mut pendings[k.conn]).await?;
        if k.name == "echo" {
            if reply != k.line {
                bail!(
                    "the echo socket answered {:?}",
                    String::from_utf8_lossy(&reply)
                );
            }
        } else {
            let v: Value = serde_json::from_slice(&reply)?;
            if v["success"] != json!(true) {
                bail!("{} failed: {v}", k.name);
            }
        }
    }
    let warmup = (commands / 10).clamp(10, 500) as usize;
    let block = (commands as usize).clamp(1, 500);
    let pid = node.pid();
    let mut left = commands as usize;
    let mut first = true;
    while left > 0 {
        let n = left.min(block);
        for k in &mut kinds {
            if first {
                for _ in 0..warmup {
                    roundtrip(&mut conns[k.conn], &k.line, &mut pendings[k.conn]).await?;
                }
            }
            let cpu0 = cpu_ns_threads(pid);
            for _ in 0..n {
                let t = Instant::now();
                roundtrip(&mut conns[k.conn], &k.line, &mut pendings[k.conn]).await?;
                k.samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
            k.cpu_ns += cpu_ns_threads(pid).saturating_sub(cpu0);
        }
        first = false;
        left -= n;
    }
    for c in &mut conns {
        let _ = c.close(None).await;
    }
    let kinds = kinds
        .into_iter()
        .map(|mut k| {
            k.samples.sort_by(f64::total_cmp);
            let count = k.samples.len();
            KindResult {
                name: k.name.into(),
                label: k.label.into(),
                count,
                p50_us: percentile(&k.samples, 50.0),
                p90_us: percentile(&k.samples, 90.0),
                p99_us: percentile(&k.samples, 99.0),
                max_us: k.samples.last().copied().unwrap_or(0.0),
                mean_us: k.samples.iter().sum::<f64>() / count.max(1) as f64,
                server_cpu_us: k.cpu_ns as f64 / 1e3 / count.max(1) as f64,
            }
        })
        .collect();
    drop(node);
    Ok(Latency {
        transport: transport.into(),
        commands,
        kinds,
    })
}
