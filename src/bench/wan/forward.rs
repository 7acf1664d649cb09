//! One direction's forwarder: the schedule that gives each packet read from one TUN fd
//! its release time (bottleneck, per-flow cap, loss, one-way delay) and writes it to the
//! other TUN fd when that time comes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Counters, LinkSpec, MTU};

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
pub(super) struct DelayLine {
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
    pub(super) fn new(spec: &LinkSpec, counters: Arc<Counters>) -> Self {
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
    pub(super) fn forward(
        mut self,
        from: &OwnedFd,
        to: &OwnedFd,
        stop: &AtomicBool,
        deadline: Instant,
    ) {
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
