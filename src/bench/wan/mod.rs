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
//!
//! One file per part: `link` (the link spec), `netns` (namespaces and TUN devices),
//! `forward` (one direction's schedule and forwarder); this file starts and stops them.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

mod forward;
mod link;
mod netns;

use forward::DelayLine;
pub use link::LinkSpec;
pub use netns::Netns;
use netns::{side, sweep_stale};

/// Address of side A (the source side) and side B (the target side).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// MTU of both TUN devices: a jumbo-frame path (fewer packets per byte for the forwarder).
pub const MTU: usize = 9000;
/// Name prefix of every namespace this module creates (and sweeps when stale).
const PREFIX: &str = "mtwan";
const TUN_NAME: &str = "mtw0";

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
