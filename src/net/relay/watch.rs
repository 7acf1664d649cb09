//! The peer watchdog of both relays (copying and splice): what the relay did with its
//! WebSocket peer ([`PeerWatch`]: reads and writes, and whether one waits right now) and
//! the rule that turns a dead peer into an error ([`watch_peer`]). A peer that lost power
//! or a path that went dark sends no FIN, and a peer that stops reading leaves our writes
//! blocked for ever: without this the relay, and the tunnel behind it, would never end.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::copy::{OP_PING, Role, control_frame};

/// Reads from and writes to the peer, as the watchdog sees them.
#[derive(Debug, Default)]
pub(super) struct PeerWatch {
    reads: AtomicU64,
    reading: AtomicBool,
    writes: AtomicU64,
    writing: AtomicBool,
}

/// Marks one direction busy while it lives (also when the I/O is cancelled).
struct Busy<'a>(&'a AtomicBool);

impl<'a> Busy<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Busy(flag)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl PeerWatch {
    /// Runs `io`, a read from the peer: only time spent in it counts as silence (not
    /// time in which the local side is slow to take what already arrived).
    pub(super) async fn read<T>(&self, io: impl Future<Output = T>) -> T {
        track(&self.reading, &self.reads, io).await
    }

    /// Runs `io`, a write (or flush) to the peer: time blocked in it counts as the peer
    /// taking nothing.
    pub(super) async fn write<T>(&self, io: impl Future<Output = T>) -> T {
        track(&self.writing, &self.writes, io).await
    }
}

/// Runs `io` with `busy` set, and counts it in `done` once it completed.
async fn track<T>(busy: &AtomicBool, done: &AtomicU64, io: impl Future<Output = T>) -> T {
    let marked = Busy::new(busy);
    let out = io.await;
    done.fetch_add(1, Ordering::Relaxed);
    drop(marked);
    out
}

/// How long one direction has been stuck, sampled every interval.
#[derive(Default)]
struct Stuck {
    last: u64,
    for_: Duration,
}

impl Stuck {
    /// Adds `interval` if the direction waited the whole time without completing an
    /// I/O; starts over otherwise. Returns the time stuck.
    fn sample(&mut self, done: &AtomicU64, busy: &AtomicBool, interval: Duration) -> Duration {
        let now = done.load(Ordering::Relaxed);
        if now != self.last || !busy.load(Ordering::Relaxed) {
            self.last = now;
            self.for_ = Duration::ZERO;
        } else {
            self.for_ += interval;
        }
        self.for_
    }
}

/// Resolves (with the error to fail with) once the relay waited `timeout` for the peer —
/// to send anything, or to take what we write — and pings the peer every third of it
/// meanwhile. Any frame counts as the peer being there, so a busy stream needs no pongs.
/// Never resolves without a timeout.
pub(super) async fn watch_peer(
    timeout: Option<Duration>,
    watch: Arc<PeerWatch>,
    ping_tx: mpsc::Sender<Vec<u8>>,
    role: Role,
) -> io::Error {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let interval = (timeout / 3).max(Duration::from_millis(100));
    let (mut silent, mut refusing) = (Stuck::default(), Stuck::default());
    loop {
        tokio::time::sleep(interval).await;
        let silent_for = silent.sample(&watch.reads, &watch.reading, interval);
        let refusing_for = refusing.sample(&watch.writes, &watch.writing, interval);
        let what = if silent_for >= timeout {
            "sent"
        } else if refusing_for >= timeout {
            "took"
        } else {
            // A full queue means the writer is busy: the peer gets data, no ping needed.
            let _ = ping_tx.try_send(control_frame(OP_PING, b"mtunnel", role));
            continue;
        };
        return io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "peer {what} nothing for {} s (peer_timeout_secs)",
                timeout.as_secs()
            ),
        );
    }
}
