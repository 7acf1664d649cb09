//! Bulk throughput and CPU cost per GiB, writer → path → reader, every path measured in
//! the same run, repetitions interleaved so drift hits all paths alike:
//! - `direct`: writer → UNIX socket → reader (no relay; the ceiling),
//! - `relay`: writer → UNIX → relay → TCP → relay → UNIX → reader, two `mtunnel
//!   bench-relay` processes copying with 1 MiB buffers (the baseline),
//! - `plain`: writer → UNIX → `mtunnel tunnel` forward → WebSocket (`ws://`) → `mtunnel
//!   serve` → UNIX → reader,
//! - `tls`: the same over `wss://`.
//!
//! Writer and reader are threads of the bench process with 1 MiB buffers; the reader stops
//! the clock at EOF. CPU seconds come from `/proc/<pid>/stat` of each middle process.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use super::nodes::{NodeSpec, ServeNode, TunnelProc, forwarding_tunnel, write_script};
use super::procs::{ChildGuard, cpu_seconds, mtunnel_command};
use super::{GIB, median};

const IO_BUF: usize = 1 << 20;

/// One transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub bytes: u64,
    pub secs: f64,
    pub mb_per_s: f64,
    /// CPU seconds per middle process role (`client`, `server`, `relay1`, ...).
    pub cpu_s: Vec<(String, f64)>,
    /// CPU seconds of the bench process (writer + reader threads).
    pub bench_cpu_s: f64,
    /// Busy CPU seconds of the machine not spent by the processes above: other load.
    pub other_cpu_s: f64,
    /// CPU seconds the hypervisor gave to other guests meanwhile.
    pub steal_s: f64,
}

/// The medians of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub name: String,
    pub label: String,
    pub runs: Vec<Run>,
    pub mb_per_s: f64,
    /// Sum over the middle processes, CPU seconds per GiB moved (median over runs).
    pub cpu_s_per_gib: f64,
    /// Per middle process role.
    pub cpu_s_per_gib_by_process: Vec<(String, f64)>,
    pub bench_cpu_s_per_gib: f64,
    /// Median of [`Run::other_cpu_s`] per second of transfer: how busy the rest of the
    /// machine was (0 = quiet, 1 = one core's worth of other work).
    pub other_load: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub size_bytes: u64,
    pub repeat: u32,
    pub baseline: String,
    pub paths: Vec<PathResult>,
}

impl Throughput {
    pub fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }
}

/// A reader listening on a UNIX socket: reads every accepted connection to EOF and reports
/// (bytes, time of EOF).
struct Sink {
    path: PathBuf,
    rx: mpsc::Receiver<(u64, Instant)>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn listen(path: &Path) -> anyhow::Result<Sink> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; IO_BUF];
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut n = 0u64;
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(got) => n += got as u64,
                    }
                }
                if tx.send((n, Instant::now())).is_err() {
                    break;
                }
            }
        });
        Ok(Sink {
            path: path.to_path_buf(),
            rx,
            stop,
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so its thread ends.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One path under test and the processes that make it.
struct Route {
    name: &'static str,
    label: String,
    entry: PathBuf,
    sink: Sink,
    procs: Vec<(String, u32)>,
    _guards: Vec<ChildGuard>,
    _tunnel: Option<TunnelProc>,
    _node: Option<ServeNode>,
    runs: Vec<Run>,
}

fn connect_retry(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(IO_BUF);
    while out.len() < IO_BUF {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn write_all(entry: &Path, size: u64) -> std::io::Result<()> {
    let mut s = connect_retry(entry)?;
    let buf = pattern();
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Moves `size` bytes through `p` once (blocking).
fn transfer(p: &Route, size: u64) -> anyhow::Result<Run> {
    // Nothing left over from an earlier run.
    while p.sink.rx.try_recv().is_ok() {}
    let before: Vec<f64> = p
        .procs
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid))
        .collect::<anyhow::Result<_>>()?;
    let bench_before = cpu_seconds(0)?;
    let (sys_before, steal_before) = super::procs::system_cpu();
    let start = Instant::now();
    let entry = p.entry.clone();
    let writer = std::thread::spawn(move || write_all(&entry, size));
    // Bounded: even 20 MB/s finishes well within this.
    let limit = Duration::from_secs(30 + size / 20_000_000);
    let (bytes, end) = p
        .sink
        .rx
        .recv_timeout(limit)
        .with_context(|| format!("{}: no EOF at the reader within {limit:?}", p.name))?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
        .with_context(|| format!("{}: writing", p.name))?;
    let after: Vec<f64> = p
        .procs
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid))
        .collect::<anyhow::Result<_>>()?;
    let bench_after = cpu_seconds(0)?;
    let (sys_after, steal_after) = super::procs::system_cpu();
    if bytes != size {
        bail!("{}: the reader got {bytes} of {size} bytes", p.name);
    }
    let secs = (end - start).as_secs_f64().max(1e-9);
    let ours: f64 =
        after.iter().zip(&before).map(|(a, b)| a - b).sum::<f64>() + (bench_after - bench_before);
    Ok(Run {
        bytes,
        secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        cpu_s: p
            .procs
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((role, _), (b, a))| (role.clone(), a - b))
            .collect(),
        bench_cpu_s: bench_after - bench_before,
        other_cpu_s: (sys_after - sys_before - ours).max(0.0),
        steal_s: steal_after - steal_before,
    })
}

/// Starts one `mtunnel bench-relay` process; returns it and the address it listens on.
pub(super) async fn relay(
    base: &Path,
    name: &str,
    listen: &str,
    to: &str,
) -> anyhow::Result<(ChildGuard, String)> {
    let cmd = mtunnel_command(
        &["bench-relay", "--listen", listen, "--connect", to],
        &base.join(format!("{name}.log")),
    )?;
    let mut child = ChildGuard::spawn(name, cmd)?;
    let stdout = child.child.stdout.take().context("relay stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("relay did not start")??
        .context("relay exited")?;
    let addr = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected relay output '{line}'"))?
        .to_string();
    Ok((child, addr))
}

async fn setup(base: &Path, name: &'static str) -> anyhow::Result<Route> {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let p = match name {
        "direct" => {
            let sink = Sink::listen(&dir.join("sink.sock"))?;
            Route {
                name,
                label: "UNIX writer -> reader, no relay".into(),
                entry: sink.path.clone(),
                sink,
                procs: vec![],
                _guards: vec![],
                _tunnel: None,
                _node: None,
                runs: vec![],
            }
        }
        "relay" => {
            let sink = Sink::listen(&dir.join("sink.sock"))?;
            let entry = dir.join("in.sock");
            let (b, b_addr) = relay(
                &dir,
                "relay2",
                "tcp:127.0.0.1:0",
                &format!("unix:{}", sink.path.display()),
            )
            .await?;
            let (a, _) = relay(
                &dir,
                "relay1",
                &format!("unix:{}", entry.display()),
                &b_addr,
            )
            .await?;
            Route {
                name,
                label: "copy relay x2, UNIX->TCP->UNIX, 1 MiB buffers (baseline)".into(),
                entry,
                sink,
                procs: vec![("relay1".into(), a.pid()), ("relay2".into(), b.pid())],
                _guards: vec![a, b],
                _tunnel: None,
                _node: None,
                runs: vec![],
            }
        }
        "plain" | "tls" => {
            let tls = name == "tls";
            let sockets = dir.join("s");
            std::fs::create_dir_all(&sockets)?;
            let script = write_script(&sockets)?;
            let node = ServeNode::start(
                &dir.join("n"),
                &NodeSpec {
                    tls,
                    script: Some(script),
                    extra_toml: String::new(),
                },
            )
            .await?;
            let vmid = 100;
            let sink = Sink::listen(&sockets.join(format!("{vmid}.sock")))?;
            let entry = dir.join("fwd.sock");
            let (tunnel, remote) =
                forwarding_tunnel(&node, vmid, &entry, &dir.join("tunnel.log")).await?;
            if Path::new(&remote) != sink.path {
                bail!(
                    "start answered socket {remote}, expected {}",
                    sink.path.display()
                );
            }
            let label = if tls {
                "mtunnel tunnel -> wss:// -> mtunnel serve (TLS)"
            } else {
                "mtunnel tunnel -> ws:// -> mtunnel serve (plain)"
            };
            Route {
                name,
                label: label.into(),
                entry,
                sink,
                procs: vec![
                    ("client".into(), tunnel.pid()),
                    ("server".into(), node.pid()),
                ],
                _guards: vec![],
                _tunnel: Some(tunnel),
                _node: Some(node),
                runs: vec![],
            }
        }
        other => bail!("unknown path {other}"),
    };
    // One small warm-up transfer: first-connection costs stay out of the numbers.
    // Blocking on purpose (bounded by the reader's timeout): children are spawned only
    // from the runtime's long-lived worker threads, as `PR_SET_PDEATHSIG` fires when the
    // spawning thread ends, which `block_in_place` hand-offs could cause.
    transfer(&p, 8 << 20).with_context(|| format!("warm-up of path {name}"))?;
    Ok(p)
}

/// Runs the section: `repeat` rounds, each moving `size` bytes through every path.
pub async fn run(
    base: &Path,
    size: u64,
    repeat: u32,
    log: &dyn Fn(&str),
) -> anyhow::Result<Throughput> {
    let mut paths = Vec::new();
    for name in ["direct", "relay", "plain", "tls"] {
        paths.push(setup(base, name).await?);
    }
    for round in 0..repeat {
        for p in &mut paths {
            let run = transfer(p, size)?;
            log(&format!(
                "  round {}/{repeat} {:<6} {:>7.0} MB/s  cpu {}",
                round + 1,
                p.name,
                run.mb_per_s,
                run.cpu_s
                    .iter()
                    .map(|(r, s)| format!("{r} {s:.2}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            p.runs.push(run);
        }
    }
    let results = paths
        .iter()
        .map(|p| {
            let per_gib = |cpu: f64, bytes: u64| cpu / (bytes as f64 / GIB as f64);
            let roles: Vec<String> = p.procs.iter().map(|(r, _)| r.clone()).collect();
            PathResult {
                name: p.name.to_string(),
                label: p.label.clone(),
                mb_per_s: median(p.runs.iter().map(|r| r.mb_per_s)),
                cpu_s_per_gib: median(
                    p.runs
                        .iter()
                        .map(|r| per_gib(r.cpu_s.iter().map(|(_, s)| s).sum(), r.bytes)),
                ),
                cpu_s_per_gib_by_process: roles
                    .iter()
                    .enumerate()
                    .map(|(i, role)| {
                        (
                            role.clone(),
                            median(p.runs.iter().map(|r| per_gib(r.cpu_s[i].1, r.bytes))),
                        )
                    })
                    .collect(),
                other_load: median(p.runs.iter().map(|r| r.other_cpu_s / r.secs)),
                bench_cpu_s_per_gib: median(p.runs.iter().map(|r| per_gib(r.bench_cpu_s, r.bytes))),
                runs: p.runs.clone(),
            }
        })
        .collect();
    Ok(Throughput {
        size_bytes: size,
        repeat,
        baseline: "relay".into(),
        paths: results,
    })
}
