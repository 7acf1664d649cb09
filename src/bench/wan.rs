//! A WAN emulator for the bench and tests (this kernel has no `netem`): two network
//! namespaces, each with a TUN device (`10.77.0.1` in side A, `10.77.0.2` in side B, MTU
//! 9000), and one forwarder thread per direction in the bench process that reads whole IP
//! packets from one TUN fd and writes them to the other after
//! - a bottleneck: packets leave in arrival order at the set rate (serialization time =
//!   size / rate) from a bounded queue; only an overflow of that queue drops (tail drop),
//!   as at a real bottleneck,
//! - optionally a per-flow cap (flows keyed by the 5-tuple), each flow serialized at its
//!   own rate behind its own bounded queue, as VPNs and some WAN paths limit each TCP
//!   connection,
//! - optional random loss, and
//! - one-way delay (RTT / 2 in each direction).
//!
//! TCP is never terminated: both ends are the kernel's own stacks in their namespaces, so
//! slow start, congestion control and loss recovery are TCP's own. The namespaces' TCP
//! buffer limits (`tcp_rmem`/`tcp_wmem` max) are raised to 4 × the bandwidth-delay product
//! (at least the kernel's 32 MiB), as a host tuned for that path would be; every path
//! measured across the link shares them.
//!
//! Lifetime: [`Wan::start`] first deletes namespaces left by a dead bench process (names
//! `mtwan<pid>a`/`b`, the pid no longer alive); the forwarders stop at a deadline even if
//! nobody stops them; dropping the [`Wan`] (normal end, error, panic unwinding) stops
//! them, closes the TUN fds and deletes both namespaces. It owns nothing outside its two
//! namespaces and never touches the host's own interfaces or routes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// Address of side A (the source side) and side B (the target side).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// MTU of both TUN devices: a jumbo-frame path (fewer packets per byte for the forwarder).
pub const MTU: usize = 9000;
/// Name prefix of every namespace this module creates (and sweeps when stale).
const PREFIX: &str = "mtwan";
const TUN_NAME: &str = "mtw0";

/// A link: `RTT,RATE[,loss=P][,flowcap=RATE][,queue=BYTES]`, e.g. `20ms,1gbit`,
/// `50ms,1gbit,loss=0.1%`, `20ms,10gbit,flowcap=1gbit`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkSpec {
    pub rtt: Duration,
    /// Bottleneck rate, bits per second.
    pub rate_bps: u64,
    /// Probability of dropping a packet at random (0..1).
    pub loss: f64,
    /// Rate cap per flow (5-tuple), bits per second.
    pub flowcap_bps: Option<u64>,
    /// Bottleneck queue in bytes (default: one bandwidth-delay product, at least 64 packets).
    pub queue_bytes: u64,
    /// `buffers=host`: both namespaces keep the host's TCP buffer limits (a new namespace
    /// copies `tcp_rmem`/`tcp_wmem` from the host) instead of ones tuned for the path.
    pub host_buffers: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("bps")
        .map(|x| format!("{x}bit"))
        .unwrap_or(t);
    let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.to_string(), *m)))
        .ok_or_else(|| format!("rate '{s}': give a unit, e.g. 200mbit, 1gbit, 10gbit"))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("rate '{s}': not a number"))?;
    let bps = v * mult;
    if !(1e3..=1e12).contains(&bps) {
        return Err(format!("rate '{s}': out of range (1kbit..1000gbit)"));
    }
    Ok(bps as u64)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, unit_s) = [("us", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.to_string(), *m)))
        .ok_or_else(|| format!("RTT '{s}': give a unit, e.g. 20ms, 0.5ms, 1s"))?;
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("RTT '{s}': not a number"))?;
    let secs = v * unit_s;
    if !(0.0..=10.0).contains(&secs) {
        return Err(format!("RTT '{s}': out of range (0..10 s)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("loss '{s}': e.g. 0.1% or 0.001"))?;
    if !(0.0..0.5).contains(&v) {
        return Err(format!("loss '{s}': must be below 50%"));
    }
    Ok(v)
}

impl LinkSpec {
    /// Bandwidth-delay product in bytes.
    pub fn bdp_bytes(&self) -> u64 {
        (self.rate_bps as f64 / 8.0 * self.rtt.as_secs_f64()) as u64
    }

    /// The TCP buffer maximum set in both namespaces (unless [`Self::host_buffers`]).
    pub fn tcp_buffer_max(&self) -> u64 {
        (4 * (self.bdp_bytes() + self.queue_bytes)).max(32 << 20)
    }
}

impl FromStr for LinkSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',').map(str::trim);
        let rtt = parse_duration(parts.next().unwrap_or(""))?;
        let rate_bps = parse_rate(
            parts
                .next()
                .ok_or_else(|| format!("link '{s}': expected RTT,RATE e.g. 20ms,1gbit"))?,
        )?;
        let mut spec = LinkSpec {
            rtt,
            rate_bps,
            loss: 0.0,
            flowcap_bps: None,
            queue_bytes: 0,
            host_buffers: false,
        };
        let mut queue = None;
        for kv in parts {
            match kv.split_once('=') {
                Some(("loss", v)) => spec.loss = parse_loss(v)?,
                Some(("flowcap", v)) => spec.flowcap_bps = Some(parse_rate(v)?),
                Some(("queue", v)) => {
                    queue = Some(super::parse_size(v).map_err(|e| format!("queue: {e}"))?)
                }
                Some(("buffers", "host")) => spec.host_buffers = true,
                Some(("buffers", "tuned")) => spec.host_buffers = false,
                _ => {
                    return Err(format!(
                        "link '{s}': unknown option '{kv}' (loss=P, flowcap=RATE, queue=BYTES, \
                         buffers=host|tuned)"
                    ));
                }
            }
        }
        spec.queue_bytes = queue.unwrap_or_else(|| spec.bdp_bytes().max(64 * MTU as u64));
        Ok(spec)
    }
}

fn rate_text(bps: u64) -> String {
    let (v, u) = if bps >= 1_000_000_000 {
        (bps as f64 / 1e9, "gbit")
    } else if bps >= 1_000_000 {
        (bps as f64 / 1e6, "mbit")
    } else {
        (bps as f64 / 1e3, "kbit")
    };
    format!("{}{u}", (v * 1000.0).round() / 1000.0)
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.rtt.as_secs_f64() * 1e3;
        write!(
            f,
            "{}ms,{}",
            (ms * 1000.0).round() / 1000.0,
            rate_text(self.rate_bps)
        )?;
        if self.loss > 0.0 {
            write!(f, ",loss={}%", (self.loss * 1e6).round() / 1e4)?;
        }
        if let Some(cap) = self.flowcap_bps {
            write!(f, ",flowcap={}", rate_text(cap))?;
        }
        if self.host_buffers {
            write!(f, ",buffers=host")?;
        }
        Ok(())
    }
}

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    fd: OwnedFd,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn create(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name])?;
        let path = format!("/run/netns/{name}");
        match std::fs::File::open(&path) {
            Ok(f) => Ok(Netns {
                name: name.to_string(),
                fd: f.into(),
            }),
            Err(e) => {
                let _ = ip(&["netns", "del", name]);
                Err(e).with_context(|| format!("opening {path}"))
            }
        }
    }

    /// Moves the calling thread into this namespace (sockets it creates afterwards, and
    /// processes it forks, live there).
    pub fn enter(&self) -> anyhow::Result<()> {
        nix::sched::setns(self.fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// Makes `cmd` start inside this namespace (setns between fork and exec).
    pub fn apply(&self, cmd: &mut tokio::process::Command) -> anyhow::Result<()> {
        let fd = self.fd.try_clone().context("duplicating a namespace fd")?;
        // SAFETY: setns(2) is a plain system call, async-signal-safe, touching no memory of
        // the parent; it runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
        })
    }

    /// Runs a future on its own single-thread runtime on a thread inside this namespace:
    /// every socket it opens (an API call, a QEMU it spawns) is on this side of the link.
    /// Nothing it creates may outlive it except processes and plain data.
    pub fn block_on<T: Send, F: std::future::Future<Output = anyhow::Result<T>>>(
        &self,
        f: impl FnOnce() -> F + Send,
    ) -> anyhow::Result<T> {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a runtime inside the namespace")?
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("wan: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces of this module whose creating process is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix(['a', 'b']))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("wan: deleting stale namespace {name} (process {pid} is gone)");
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Opens a TUN device named [`TUN_NAME`] (IP packets, no extra header) in the calling
/// thread's network namespace; non-blocking.
fn open_tun() -> anyhow::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (TUN support)")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(TUN_NAME.bytes()) {
        *d = s as nix::libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (nix::libc::IFF_TUN | nix::libc::IFF_NO_PI) as nix::libc::c_short;
    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca; // _IOW('T', 202, int)
    // SAFETY: TUNSETIFF reads (and updates) one ifreq that lives for the call.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    let fd: OwnedFd = file.into();
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(fd)
}

/// One side: its namespace, its TUN fd, its address configured.
fn side(name: &str, addr: Ipv4Addr, spec: &LinkSpec) -> anyhow::Result<(Netns, OwnedFd)> {
    let ns = Netns::create(name)?;
    let tun = ns.run(|| {
        let tun = open_tun()?;
        if spec.host_buffers {
            return Ok(tun);
        }
        let max = spec.tcp_buffer_max();
        for (key, val) in [
            ("tcp_rmem", format!("4096 131072 {max}")),
            ("tcp_wmem", format!("4096 16384 {max}")),
        ] {
            let path = format!("/proc/sys/net/ipv4/{key}");
            std::fs::write(&path, val).with_context(|| format!("writing {path}"))?;
        }
        Ok(tun)
    })?;
    let mtu = MTU.to_string();
    let cidr = format!("{addr}/24");
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    ip(&["-n", name, "addr", "add", &cidr, "dev", TUN_NAME])?;
    // A long device queue: a forwarder that falls briefly behind must not cause drops the
    // link itself would not.
    ip(&[
        "-n",
        name,
        "link",
        "set",
        TUN_NAME,
        "mtu",
        &mtu,
        "txqueuelen",
        "10000",
        "up",
    ])?;
    Ok((ns, tun))
}

/// Counters of one direction.
#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    flow_drops: AtomicU64,
    /// Largest lateness of a packet behind its release time, in µs: how far the forwarder
    /// fell behind the schedule (its own ceiling).
    max_late_us: AtomicU64,
    /// Packets sent more than 1 ms after their release time.
    late_1ms: AtomicU64,
    /// Thread id, for its CPU time.
    tid: AtomicU64,
}

/// What one direction did.
#[derive(Debug, Clone, Serialize)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub queue_drops: u64,
    pub flow_drops: u64,
    pub max_late_us: u64,
    /// Packets sent more than 1 ms behind their schedule.
    pub late_1ms: u64,
    /// CPU seconds of the forwarder thread so far.
    pub cpu_s: f64,
}

/// A running emulated link between two namespaces.
pub struct Wan {
    /// Side A (10.77.0.1): sources. Side B (10.77.0.2): targets.
    pub a: Arc<Netns>,
    pub b: Arc<Netns>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: [Arc<Counters>; 2],
    // Closed after the threads stopped (dropped last).
    _tuns: Vec<Arc<OwnedFd>>,
}

/// Whether this process may build the emulator, or why not.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces and TUN devices)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun on this kernel".into());
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("`ip` (iproute2) is not installed: apt-get install -y iproute2".into()),
    }
}

impl Wan {
    /// Builds the two namespaces and starts forwarding; the forwarders stop by themselves
    /// after `lifetime`.
    pub fn start(spec: &LinkSpec, lifetime: Duration) -> anyhow::Result<Wan> {
        available().map_err(anyhow::Error::msg)?;
        sweep_stale();
        let pid = std::process::id();
        let (a, tun_a) = side(&format!("{PREFIX}{pid}a"), ADDR_A, spec)?;
        let (b, tun_b) = side(&format!("{PREFIX}{pid}b"), ADDR_B, spec)?;
        let (tun_a, tun_b) = (Arc::new(tun_a), Arc::new(tun_b));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + lifetime;
        let counters = [Arc::new(Counters::default()), Arc::new(Counters::default())];
        let mut threads = Vec::new();
        for (i, (from, to)) in [(&tun_a, &tun_b), (&tun_b, &tun_a)].into_iter().enumerate() {
            let line = DelayLine::new(spec, Arc::clone(&counters[i]));
            let (from, to, stop) = (Arc::clone(from), Arc::clone(to), Arc::clone(&stop));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-{}", ["a2b", "b2a"][i]))
                    .spawn(move || line.forward(&from, &to, &stop, deadline))
                    .context("starting a forwarder thread")?,
            );
        }
        Ok(Wan {
            a: Arc::new(a),
            b: Arc::new(b),
            stop,
            threads,
            counters,
            _tuns: vec![tun_a, tun_b],
        })
    }

    /// Counters of A → B and B → A.
    pub fn stats(&self) -> [DirStats; 2] {
        self.counters.clone().map(|c| {
            let tid = c.tid.load(Ordering::Relaxed);
            let cpu_s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
                .ok()
                .and_then(|t| {
                    let rest = t.rsplit_once(')')?.1.to_string();
                    let f: Vec<f64> = rest
                        .split_whitespace()
                        .map(|x| x.parse().unwrap_or(0.0))
                        .collect();
                    Some((f.get(11)? + f.get(12)?) / super::procs::clock_ticks())
                })
                .unwrap_or(f64::NAN);
            DirStats {
                packets: c.packets.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                lost: c.lost.load(Ordering::Relaxed),
                queue_drops: c.queue_drops.load(Ordering::Relaxed),
                flow_drops: c.flow_drops.load(Ordering::Relaxed),
                max_late_us: c.max_late_us.load(Ordering::Relaxed),
                late_1ms: c.late_1ms.load(Ordering::Relaxed),
                cpu_s,
            }
        })
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The TUN fds close with the last Arc (here), then the namespaces go.
    }
}

/// A packet waiting for its release time.
struct Queued {
    release_ns: u64,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.release_ns, self.seq) == (o.release_ns, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.release_ns, self.seq).cmp(&(o.release_ns, o.seq))
    }
}

/// The 5-tuple of an IPv4 packet (ports 0 for protocols without them).
fn flow_key(p: &[u8]) -> Option<[u8; 13]> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let proto = p[9];
    let mut k = [0u8; 13];
    k[..8].copy_from_slice(&p[12..20]);
    k[8] = proto;
    if matches!(proto, 6 | 17) && p.len() >= ihl + 4 {
        k[9..13].copy_from_slice(&p[ihl..ihl + 4]);
    }
    Some(k)
}

/// One direction's schedule: when each packet may leave.
struct DelayLine {
    one_way_ns: u64,
    rate_bps: u64,
    queue_ns: u64,
    loss: f64,
    flowcap: Option<(u64, u64)>,
    /// When the bottleneck is free again.
    link_free_ns: u64,
    flows: HashMap<[u8; 13], u64>,
    heap: BinaryHeap<Reverse<Queued>>,
    pool: Vec<Vec<u8>>,
    seq: u64,
    rng: u64,
    counters: Arc<Counters>,
}

/// Bounds of one forwarder iteration: packets read per wake-up, and the longest sleep (how
/// soon a stop request is seen).
const READ_BATCH: usize = 256;
const MAX_SLEEP: Duration = Duration::from_millis(50);
/// Flow entries kept at most (older, idle ones are forgotten).
const MAX_FLOWS: usize = 4096;

fn ser_ns(bytes: usize, bps: u64) -> u64 {
    (bytes as u128 * 8 * 1_000_000_000 / u128::from(bps.max(1))) as u64
}

impl DelayLine {
    fn new(spec: &LinkSpec, counters: Arc<Counters>) -> Self {
        let queue_ns = ser_ns(spec.queue_bytes as usize, spec.rate_bps);
        DelayLine {
            one_way_ns: spec.rtt.as_nanos() as u64 / 2,
            rate_bps: spec.rate_bps,
            queue_ns,
            loss: spec.loss,
            // A flow's own queue: the same depth in bytes as the bottleneck's.
            flowcap: spec
                .flowcap_bps
                .map(|c| (c, ser_ns(spec.queue_bytes as usize, c))),
            link_free_ns: 0,
            flows: HashMap::new(),
            heap: BinaryHeap::new(),
            pool: Vec::new(),
            seq: 0,
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
            counters,
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Schedules one packet that arrived at `now`; false when it is dropped.
    fn admit(&mut self, len: usize, key: Option<[u8; 13]>, now: u64) -> Option<u64> {
        if self.loss > 0.0 && self.random() < self.loss {
            self.counters.lost.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let c = &self.counters;
        let start = self.link_free_ns.max(now);
        if start - now > self.queue_ns {
            c.queue_drops.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut release = start + ser_ns(len, self.rate_bps);
        if let (Some((cap, flow_queue_ns)), Some(key)) = (self.flowcap, key) {
            if self.flows.len() >= MAX_FLOWS {
                self.flows.retain(|_, free| *free > now);
            }
            let free = self.flows.entry(key).or_insert(0);
            let fstart = (*free).max(now);
            if fstart - now > flow_queue_ns {
                c.flow_drops.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            *free = fstart + ser_ns(len, cap);
            // Simplification: the packet takes its bottleneck slot on arrival, not when its
            // flow's cap lets it go; exact while the cap, not the bottleneck, is the limit.
            // Both schedules are monotonic per flow: a flow is never reordered.
            release = release.max(*free);
        }
        self.link_free_ns = start + ser_ns(len, self.rate_bps);
        Some(release + self.one_way_ns)
    }

    /// Moves packets from `from` to `to` until `stop` or `deadline`.
    fn forward(mut self, from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool, deadline: Instant) {
        self.counters
            .tid
            .store(nix::unistd::gettid().as_raw() as u64, Ordering::Relaxed);
        let epoch = Instant::now();
        let now_ns = || epoch.elapsed().as_nanos() as u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let now = now_ns();
            self.release_due(to, now);
            let wait = self
                .heap
                .peek()
                .map(|Reverse(q)| Duration::from_nanos(q.release_ns.saturating_sub(now)))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            if !wait.is_zero() && !wait_readable(from, wait) {
                continue;
            }
            for _ in 0..READ_BATCH {
                let mut buf = self.pool.pop().unwrap_or_else(|| vec![0u8; MTU + 64]);
                buf.resize(MTU + 64, 0);
                match nix::unistd::read(from, &mut buf) {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        let key = self.flowcap.and_then(|_| flow_key(&buf));
                        match self.admit(n, key, now_ns()) {
                            Some(release_ns) => {
                                self.seq += 1;
                                let seq = self.seq;
                                self.heap.push(Reverse(Queued {
                                    release_ns,
                                    seq,
                                    data: buf,
                                }));
                            }
                            None => self.pool.push(buf),
                        }
                    }
                    _ => {
                        self.pool.push(buf);
                        break;
                    }
                }
            }
        }
    }

    /// Writes every packet whose release time has come.
    fn release_due(&mut self, to: &OwnedFd, now: u64) {
        while let Some(Reverse(q)) = self.heap.peek() {
            if q.release_ns > now {
                break;
            }
            let Some(Reverse(q)) = self.heap.pop() else {
                break;
            };
            let late_us = (now - q.release_ns) / 1000;
            let c = &self.counters;
            c.max_late_us.fetch_max(late_us, Ordering::Relaxed);
            if late_us > 1000 {
                c.late_1ms.fetch_add(1, Ordering::Relaxed);
            }
            // A TUN write injects the packet into the peer's stack; a failure is a drop.
            if nix::unistd::write(to, &q.data).is_ok() {
                c.packets.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(q.data.len() as u64, Ordering::Relaxed);
            }
            if self.pool.len() < 4096 {
                self.pool.push(q.data);
            }
        }
    }
}

/// Waits up to `wait` for `fd` to become readable (nanosecond timeout: ppoll).
fn wait_readable(fd: &OwnedFd, wait: Duration) -> bool {
    let mut pfd = nix::libc::pollfd {
        fd: fd.as_raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    };
    let ts = nix::libc::timespec {
        tv_sec: wait.as_secs() as _,
        tv_nsec: wait.subsec_nanos() as _,
    };
    // SAFETY: one valid pollfd and timespec that live for the call; no signal mask change.
    let rc = unsafe { nix::libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse_and_print() {
        let l: LinkSpec = "20ms,1gbit".parse().unwrap();
        assert_eq!(l.rtt, Duration::from_millis(20));
        assert_eq!(l.rate_bps, 1_000_000_000);
        assert_eq!(l.bdp_bytes(), 2_500_000);
        assert_eq!(l.queue_bytes, 2_500_000);
        assert_eq!(l.to_string(), "20ms,1gbit");
        let l: LinkSpec = "50ms,1gbit,loss=0.1%".parse().unwrap();
        assert!((l.loss - 0.001).abs() < 1e-12);
        assert_eq!(l.to_string(), "50ms,1gbit,loss=0.1%");
        let l: LinkSpec = "20ms,10gbit,flowcap=1gbit".parse().unwrap();
        assert_eq!(l.flowcap_bps, Some(1_000_000_000));
        assert_eq!(l.to_string(), "20ms,10gbit,flowcap=1gbit");
        let l: LinkSpec = "5ms,200mbit,queue=1M".parse().unwrap();
        assert_eq!(l.queue_bytes, 1 << 20);
        assert_eq!(l.to_string(), "5ms,200mbit");
        let l: LinkSpec = "100ms,500mbit,buffers=host".parse().unwrap();
        assert!(l.host_buffers);
        assert_eq!(l.bdp_bytes(), 6_250_000);
        assert_eq!(l.to_string(), "100ms,500mbit,buffers=host");
        for bad in [
            "",
            "20ms",
            "20,1gbit",
            "20ms,1g",
            "20ms,1gbit,loss=60%",
            "20ms,1gbit,x=1",
            "20ms,1gbit,buffers=big",
        ] {
            assert!(bad.parse::<LinkSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn schedule_serializes_caps_flows_and_tail_drops() {
        let spec: LinkSpec = "10ms,80mbit,flowcap=8mbit,queue=20000".parse().unwrap();
        let mut d = DelayLine::new(&spec, Arc::default());
        // 1000 bytes at 80 Mbit/s: 100 µs on the wire, then 5 ms one way.
        let flow_a = Some([1u8; 13]);
        assert_eq!(d.admit(1000, None, 0), Some(100_000 + 5_000_000));
        // The flow-capped packet: 1 ms at 8 Mbit/s.
        assert_eq!(d.admit(1000, flow_a, 0), Some(1_000_000 + 5_000_000));
        assert_eq!(d.admit(1000, flow_a, 0), Some(2_000_000 + 5_000_000));
        // Another flow is not held behind flow A's cap.
        assert_eq!(
            d.admit(1000, Some([2u8; 13]), 0),
            Some(1_000_000 + 5_000_000)
        );
        // Fill the bottleneck queue (20 000 bytes = 2 ms): the overflow is dropped.
        let mut dropped = 0;
        for _ in 0..40 {
            if d.admit(1000, None, 0).is_none() {
                dropped += 1;
            }
        }
        assert!(dropped > 10, "{dropped}");
        assert!(d.counters.queue_drops.load(Ordering::Relaxed) > 10);
    }

    #[test]
    fn flow_keys_of_ipv4_tcp() {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[20..24].copy_from_slice(&[0x12, 0x34, 0x00, 0x50]);
        let k = flow_key(&p).unwrap();
        assert_eq!(&k[9..13], &[0x12, 0x34, 0x00, 0x50]);
        assert!(flow_key(&p[..10]).is_none());
    }
}
