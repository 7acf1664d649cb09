//! The switch of a single RAM stream that struggles: the queue behind QEMU and when QEMU
//! may switch over. QEMU switches once `remaining < avail-switchover-bandwidth ×
//! downtime-limit` (without the bandwidth: what it wrote in its last ~100 ms), and it
//! knows nothing of what stands queued after its socket, which still has to cross while
//! the guest is paused. Behind the kernel's ~200 KiB its own estimate reads the pauses of
//! its thread (dirty-bitmap syncs, XBZRLE) as a slow link and the switch comes late; behind
//! a deep queue the estimate is the speed of memory and the queue drains during the pause
//! (docs/performance.md). So once the RAM struggles (CPU throttle, a raised downtime
//! limit) [`pace`] sizes the queue to half the downtime limit at the link's rate and gives
//! QEMU as bandwidth what is left of the link's rate once a full queue is paid for: the
//! guest's real pause then stays within the downtime limit, whatever QEMU put into the
//! queue just before it switched.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::client::progress::{Progress, human};
use crate::qemu::{MigrationParams, MigrationProgress, VmHandle};

/// How far back the link's rate is measured: long enough to smooth QEMU's bursts.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// How often the queue and QEMU's switchover bandwidth follow the rate and the limit.
const EVERY: Duration = Duration::from_secs(1);

/// The smallest queue once paced (below it the pauses of QEMU's thread idle the link).
const MIN_QUEUE: u64 = 256 << 10;

/// QEMU's end of a single RAM stream (our copy of the descriptor; the relay reads the
/// other end). It keeps the kernel's ~200 KiB until the RAM struggles, so an idle guest's
/// switch leaves little queued. Not with `--postcopy`: after its switch the guest's
/// faulted pages would wait behind the queue.
pub(super) struct QueueBehindQemu {
    conn: std::os::unix::net::UnixStream,
    /// `--ram-queue-mib`: the most it may hold.
    max: u64,
    /// Its size once paced (0: the kernel's default).
    size: Cell<u64>,
}

/// What the queue holds and what QEMU is told (bytes, bytes/s) for a link that moves
/// `rate` bytes/s under a downtime limit of `limit_ms`, the queue holding at most `max`.
pub(super) fn pace(rate: f64, limit_ms: u64, max: u64) -> (u64, u64) {
    let limit = limit_ms.max(1) as f64 / 1000.0;
    // Whole pages: the kernel keeps a buffer size even (it doubles half of it).
    let queue = ((rate * limit / 2.0) as u64 & !4095).clamp(MIN_QUEUE.min(max), max);
    // A full queue costs `queue / rate` of the pause: QEMU may fill the rest. At least 1
    // byte/s: QEMU's 0 means "your own estimate".
    let bandwidth = (rate - queue as f64 / limit).max(1.0) as u64;
    (queue, bandwidth)
}

impl QueueBehindQemu {
    pub(super) fn new(conn: std::os::unix::net::UnixStream, max_mib: u32) -> Self {
        QueueBehindQemu {
            conn,
            max: u64::from(max_mib) << 20,
            size: Cell::new(0),
        }
    }

    /// Resizes the queue to `bytes` when that is more than a tenth off its size; the first
    /// time it says so. A UNIX stream socket queues what its sender's buffer allows, from
    /// the sender's next write on (bytes queued beyond a smaller size drain first).
    fn resize(&self, bytes: u64, rate: f64, progress: &Progress) {
        let size = self.size.get();
        if size != 0 && bytes.abs_diff(size) <= size / 10 {
            return;
        }
        let got = crate::net::sockbuf::set_send_buffer(&self.conn, bytes) as u64;
        if size == 0 {
            let capped = if got < bytes {
                " (capped by net.core.wmem_max: as root it gets the whole size)"
            } else {
                ""
            };
            progress.log(format!(
                "RAM: the guest keeps dirtying: the queue behind QEMU holds half the downtime \
                 limit at the link's rate ({} at {}/s, at most --ram-queue-mib {}){capped} and \
                 QEMU switches over only when the rest fits the other half, so the guest's \
                 pause stays within the limit",
                human(got),
                human(rate as u64),
                self.max >> 20
            ));
        }
        tracing::debug!(bytes, got, rate, "queue behind QEMU resized");
        self.size.set(bytes);
    }
}

/// Gives QEMU its own bandwidth estimate back (`avail-switchover-bandwidth` 0), as a new
/// attempt starts and when a paced one failed and the VM runs on: QEMU keeps parameters
/// from one migration to the next. Best effort: a QEMU before 8.2 has no such parameter.
pub(super) async fn unpace(vm: &VmHandle) {
    let params = MigrationParams {
        avail_switchover_bandwidth: Some(0),
        ..MigrationParams::default()
    };
    if let Err(e) = vm.migrate_set_parameters(&params).await {
        tracing::debug!("avail-switchover-bandwidth not reset: {e}");
    }
}

/// What the pacing learns from the RAM progress the migration already polls: QEMU's
/// `transferred` over the last [`RATE_WINDOW`], and whether the RAM struggles.
#[derive(Default)]
pub(super) struct Pacer {
    samples: RefCell<VecDeque<(Instant, u64)>>,
    struggling: Cell<bool>,
}

impl Pacer {
    /// Takes one progress sample; `struggling`: a CPU throttle or a raised downtime limit.
    pub(super) fn observe(&self, p: &MigrationProgress, struggling: bool) {
        if struggling {
            self.struggling.set(true);
        }
        if p.status != "active" {
            return;
        }
        let now = Instant::now();
        let mut samples = self.samples.borrow_mut();
        samples.push_back((now, p.transferred));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// The link's rate (bytes/s) once the RAM struggles and half a window was seen: what
    /// QEMU sent over the window (the queue is bounded, so that is what left it).
    fn rate(&self) -> Option<f64> {
        if !self.struggling.get() {
            return None;
        }
        let samples = self.samples.borrow();
        let (first, last) = (samples.front()?, samples.back()?);
        let secs = last.0.duration_since(first.0).as_secs_f64();
        (secs >= RATE_WINDOW.as_secs_f64() / 2.0)
            .then(|| last.1.saturating_sub(first.1) as f64 / secs)
    }
}

/// Paces the switch while the RAM moves: every [`EVERY`], once the RAM struggles, sizes
/// the queue and sets QEMU's `avail-switchover-bandwidth` by [`pace`] for the link's rate
/// ([`Pacer::rate`]) and the current downtime limit (`limit_ms`, which the escalation
/// raises). Bytes past the queue (the relay's TCP socket keeps at most 1 MiB unsent) are
/// not counted. Never returns: the caller drops it when the migration ends.
pub(super) async fn pace_switchover(
    vm: &VmHandle,
    progress: &Progress,
    queue: &QueueBehindQemu,
    pacer: &Pacer,
    limit_ms: &Cell<u64>,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(rate) = pacer.rate() else {
            continue;
        };
        let (bytes, bandwidth) = pace(rate, limit_ms.get(), queue.max);
        let params = MigrationParams {
            avail_switchover_bandwidth: Some(bandwidth),
            ..MigrationParams::default()
        };
        // First QEMU's bandwidth, then the queue: a queue sized for a bandwidth QEMU was
        // not told would switch by its own estimate with the queue full.
        if let Err(e) = vm.migrate_set_parameters(&params).await {
            if queue.size.get() == 0 {
                progress.log(format!(
                    "RAM: the switch is not paced: the source QEMU refused \
                     avail-switchover-bandwidth (QEMU 8.2 or later has it): {e}"
                ));
                return std::future::pending().await;
            }
            tracing::warn!("setting avail-switchover-bandwidth to {bandwidth} B/s: {e}");
            continue;
        }
        queue.resize(bytes, rate, progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = (1 << 20) as f64;

    /// Half the limit's worth queued, QEMU told the other half: a full queue and what QEMU
    /// may leave cross within the limit (23 MiB/s × 0.4 s = 9.2 MiB).
    #[test]
    fn the_queue_and_the_rest_fit_the_limit() {
        let rate = 23.0 * MIB;
        let (queue, bandwidth) = pace(rate, 400, 32 << 20);
        assert_eq!(queue, (rate * 0.2) as u64 & !4095);
        let left_at_switch = bandwidth as f64 * 0.4;
        let pause = (queue as f64 + left_at_switch) / rate;
        assert!(pause <= 0.4 && pause > 0.399, "{pause}");
    }

    /// `--ram-queue-mib` bounds the queue (a long limit then leaves QEMU more), and a tiny
    /// limit keeps [`MIN_QUEUE`] with QEMU told 1 byte/s: it waits for the escalation.
    #[test]
    fn the_queue_stays_within_its_bounds() {
        let rate = 23.0 * MIB;
        let (queue, bandwidth) = pace(rate, 3200, 32 << 20);
        assert_eq!(queue, 32 << 20);
        assert_eq!(bandwidth, (rate - (32 << 20) as f64 / 3.2) as u64);
        assert_eq!(pace(rate, 10, 32 << 20), (MIN_QUEUE, 1));
        assert_eq!(pace(rate, 400, 1 << 20).0, 1 << 20);
        assert_eq!(pace(0.0, 400, 32 << 20), (MIN_QUEUE, 1));
    }
}
