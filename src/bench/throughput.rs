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
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;

use super::nodes::{Placement, ServeNode, TunnelProc, forwarding_tunnel, write_script};
use super::procs::{ChildGuard, cpu_seconds, mtunnel_command};
use super::wan::Netns;
use super::{GIB, median};

const IO_BUF: usize = 1 << 20;

/// One transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub bytes: u64,
    pub secs: f64,
    pub mb_per_s: f64,
    /// From the writer's connect to the reader's first byte (connection setup, handshakes).
    pub first_byte_s: f64,
    /// From the reader's first byte to EOF: the rate once data flows.
    pub stream_mb_per_s: f64,
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
    /// Median of [`Run::stream_mb_per_s`].
    pub stream_mb_per_s: f64,
    /// Median of [`Run::first_byte_s`], in ms.
    pub first_byte_ms: f64,
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

/// When a transfer's bytes reached the reader.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival {
    pub bytes: u64,
    /// First byte read (None for an empty transfer).
    pub first: Option<Instant>,
    pub eof: Instant,
}

/// How to wake a sink's accept loop so its thread ends.
enum Wake {
    Unix(PathBuf),
    Tcp(Arc<Netns>, SocketAddr),
}

/// A reader listening on a UNIX socket (or a TCP port inside a namespace): reads every
/// accepted connection to EOF and reports an [`Arrival`].
pub(super) struct Sink {
    pub path: PathBuf,
    pub rx: mpsc::Receiver<Arrival>,
    stop: Arc<AtomicBool>,
    wake: Wake,
}

/// Reads accepted connections to EOF until `stop`.
fn drain<S: Read>(
    mut accept: impl FnMut() -> std::io::Result<S>,
    tx: mpsc::Sender<Arrival>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; IO_BUF];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = accept() else { continue };
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (mut n, mut first) = (0u64, None);
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(got) => {
                    first.get_or_insert_with(Instant::now);
                    n += got as u64;
                }
            }
        }
        let arrival = Arrival {
            bytes: n,
            first,
            eof: Instant::now(),
        };
        if tx.send(arrival).is_err() {
            break;
        }
    }
}

impl Sink {
    pub(super) fn listen(path: &Path) -> anyhow::Result<Sink> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || drain(|| listener.accept().map(|(c, _)| c), tx, stopped));
        Ok(Sink {
            path: path.to_path_buf(),
            rx,
            stop,
            wake: Wake::Unix(path.to_path_buf()),
        })
    }

    /// A TCP reader on `ip` (port chosen by the kernel) inside `ns`.
    pub(super) fn listen_tcp(ns: &Arc<Netns>, ip: Ipv4Addr) -> anyhow::Result<(Sink, SocketAddr)> {
        let listener = ns.run(|| {
            std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))
        })?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || drain(|| listener.accept().map(|(c, _)| c), tx, stopped));
        let sink = Sink {
            path: PathBuf::new(),
            rx,
            stop,
            wake: Wake::Tcp(Arc::clone(ns), addr),
        };
        Ok((sink, addr))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so its thread ends.
        match &self.wake {
            Wake::Unix(path) => {
                let _ = UnixStream::connect(path);
                let _ = std::fs::remove_file(path);
            }
            Wake::Tcp(ns, addr) => {
                let _ = ns.run(|| Ok(TcpStream::connect_timeout(addr, Duration::from_secs(1))?));
            }
        }
    }
}

/// Where a writer connects.
#[derive(Clone)]
pub(super) enum Entry {
    Unix(PathBuf),
    /// A TCP address, connected from inside a namespace.
    Tcp(Arc<Netns>, SocketAddr),
}

/// One path under test and the processes that make it.
pub(super) struct Route {
    pub name: &'static str,
    pub label: String,
    entry: Entry,
    sink: Sink,
    procs: Vec<(String, u32)>,
    _guards: Vec<ChildGuard>,
    _tunnel: Option<TunnelProc>,
    _node: Option<ServeNode>,
    pub runs: Vec<Run>,
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

fn write_all(entry: &Entry, size: u64) -> anyhow::Result<()> {
    let mut s: Box<dyn Write> = match entry {
        Entry::Unix(path) => Box::new(connect_retry(path)?),
        Entry::Tcp(ns, addr) => {
            // This thread is the writer's own: it may stay in the namespace.
            ns.enter()?;
            Box::new(TcpStream::connect_timeout(addr, Duration::from_secs(10))?)
        }
    };
    let buf = pattern();
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.flush()?;
    // Dropping the stream closes it: EOF for the reader.
    Ok(())
}

/// Moves `size` bytes through `p` once (blocking).
pub(super) fn transfer(p: &Route, size: u64) -> anyhow::Result<Run> {
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
    let arrival = p
        .sink
        .rx
        .recv_timeout(limit)
        .with_context(|| format!("{}: no EOF at the reader within {limit:?}", p.name))?;
    let (bytes, end) = (arrival.bytes, arrival.eof);
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
    let first = arrival.first.unwrap_or(end);
    let stream_secs = (end - first).as_secs_f64().max(1e-9);
    let ours: f64 =
        after.iter().zip(&before).map(|(a, b)| a - b).sum::<f64>() + (bench_after - bench_before);
    Ok(Run {
        bytes,
        secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        first_byte_s: (first - start).as_secs_f64(),
        stream_mb_per_s: bytes as f64 / stream_secs / 1e6,
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
    relay_with(base, name, &["--listen", listen, "--connect", to]).await
}

/// [`relay`] with any `bench-relay` arguments.
async fn relay_with(
    base: &Path,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(ChildGuard, String)> {
    let mut all = vec!["bench-relay"];
    all.extend_from_slice(args);
    let cmd = mtunnel_command(&all, &base.join(format!("{name}.log")))?;
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

/// `mtunnel tunnel` forwarding a UNIX socket → WebSocket (`tls`: wss://) → `mtunnel serve`
/// → the sink's UNIX socket, each process on its side of `place`.
async fn tunnel_route(dir: &Path, name: &'static str, place: &Placement) -> anyhow::Result<Route> {
    let tls = name == "tls";
    let sockets = dir.join("s");
    std::fs::create_dir_all(&sockets)?;
    let script = write_script(&sockets)?;
    let spec = place.server_spec(tls, Some(script), String::new());
    let node = ServeNode::start(&dir.join("n"), &spec).await?;
    let vmid = 100;
    let sink = Sink::listen(&sockets.join(format!("{vmid}.sock")))?;
    let entry = dir.join("fwd.sock");
    let log = dir.join("tunnel.log");
    let (tunnel, remote) =
        forwarding_tunnel(&node, vmid, &entry, &log, place.client.as_deref()).await?;
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
    Ok(Route {
        name,
        label: label.into(),
        entry: Entry::Unix(entry),
        sink,
        procs: vec![
            ("client".into(), tunnel.pid()),
            ("server".into(), node.pid()),
        ],
        _guards: vec![],
        _tunnel: Some(tunnel),
        _node: Some(node),
        runs: vec![],
    })
}

/// Two relay processes in a row, UNIX → TCP → UNIX: the copy relay (`relay`, the
/// baseline) or the fastwebsockets client and server (`fastws`, the peer baseline).
async fn relay_pair(dir: &Path, name: &'static str) -> anyhow::Result<Route> {
    let sink = Sink::listen(&dir.join("sink.sock"))?;
    let entry = dir.join("in.sock");
    let ws = name == "fastws";
    let sink_addr = format!("unix:{}", sink.path.display());
    let entry_addr = format!("unix:{}", entry.display());
    let mut second = vec!["--listen", "tcp:127.0.0.1:0", "--connect", &sink_addr];
    if ws {
        second.extend(["--ws", "server"]);
    }
    let (b, b_addr) = relay_with(dir, "relay2", &second).await?;
    let mut first = vec!["--listen", &entry_addr, "--connect", &b_addr];
    if ws {
        first.extend(["--ws", "client"]);
    }
    let (a, _) = relay_with(dir, "relay1", &first).await?;
    let label = if ws {
        "fastwebsockets client -> ws:// -> server (peer pair)"
    } else {
        "copy relay x2, UNIX->TCP->UNIX, 1 MiB buffers (baseline)"
    };
    Ok(Route {
        name,
        label: label.into(),
        entry: Entry::Unix(entry),
        sink,
        procs: vec![("relay1".into(), a.pid()), ("relay2".into(), b.pid())],
        _guards: vec![a, b],
        _tunnel: None,
        _node: None,
        runs: vec![],
    })
}

/// Starts the processes of path `name` (`direct`, `relay`, `fastws`, `plain`, `tls`;
/// `tcp` only on a WAN link) and runs one warm-up transfer through it.
pub(super) async fn setup(
    base: &Path,
    name: &'static str,
    place: &Placement,
) -> anyhow::Result<Route> {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    let p = match name {
        "direct" => {
            let sink = Sink::listen(&dir.join("sink.sock"))?;
            Route {
                name,
                label: "UNIX writer -> reader, no relay".into(),
                entry: Entry::Unix(sink.path.clone()),
                sink,
                procs: vec![],
                _guards: vec![],
                _tunnel: None,
                _node: None,
                runs: vec![],
            }
        }
        "relay" | "fastws" => relay_pair(&dir, name).await?,
        "plain" | "tls" => tunnel_route(&dir, name, place).await?,
        "tcp" => {
            let (Some(client), Some((server, ip))) = (&place.client, &place.server) else {
                bail!("the plain TCP path needs the two sides of a WAN link");
            };
            let (sink, addr) = Sink::listen_tcp(server, *ip)?;
            Route {
                name,
                label: "plain TCP, one stream (baseline)".into(),
                entry: Entry::Tcp(Arc::clone(client), addr),
                sink,
                procs: vec![],
                _guards: vec![],
                _tunnel: None,
                _node: None,
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

/// The medians of a route's runs.
pub(super) fn summarize(p: &Route) -> PathResult {
    let per_gib = |cpu: f64, bytes: u64| cpu / (bytes as f64 / GIB as f64);
    let roles: Vec<String> = p.procs.iter().map(|(r, _)| r.clone()).collect();
    PathResult {
        name: p.name.to_string(),
        label: p.label.clone(),
        mb_per_s: median(p.runs.iter().map(|r| r.mb_per_s)),
        stream_mb_per_s: median(p.runs.iter().map(|r| r.stream_mb_per_s)),
        first_byte_ms: median(p.runs.iter().map(|r| r.first_byte_s * 1e3)),
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
}

/// Runs the section: `repeat` rounds, each moving `size` bytes through every path.
pub async fn run(
    base: &Path,
    size: u64,
    repeat: u32,
    log: &dyn Fn(&str),
) -> anyhow::Result<Throughput> {
    let mut paths = Vec::new();
    for name in ["direct", "relay", "fastws", "plain", "tls"] {
        paths.push(setup(base, name, &Placement::default()).await?);
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
    let results = paths.iter().map(summarize).collect();
    Ok(Throughput {
        size_bytes: size,
        repeat,
        baseline: "relay".into(),
        paths: results,
    })
}
