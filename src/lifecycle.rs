//! One way to stop `mtunnel serve`, in the manner of mini-redis' `Shutdown` and pingora's
//! `ShutdownWatch`: the process owns one [`Shutdown`]; every service it starts (the API
//! listener, the metrics listener) holds a [`ShutdownWatch`], stops when the watch says so
//! and drops it when it has stopped; [`Shutdown::stopped`] waits until all have. Tunnels
//! are stopped through their tasks ([`crate::task::TaskManager::request_stop_all`], then
//! [`crate::task::TaskManager::wait_idle`]) and the cluster membership last
//! ([`crate::cluster::Cluster::leave`]), as each still needs what comes after it.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// The stop signal of a process and the count of services still running.
pub struct Shutdown {
    signal: watch::Sender<bool>,
    /// Cloned into every watch; the channel closes when the last watch is dropped.
    running: mpsc::Sender<()>,
    all_stopped: mpsc::Receiver<()>,
}

/// A service's view of the [`Shutdown`]: whether to stop; dropped once it has stopped.
pub struct ShutdownWatch {
    signal: watch::Receiver<bool>,
    _running: mpsc::Sender<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (running, all_stopped) = mpsc::channel(1);
        Shutdown {
            signal: watch::Sender::new(false),
            running,
            all_stopped,
        }
    }

    /// A watch for one more service.
    pub fn watch(&self) -> ShutdownWatch {
        ShutdownWatch {
            signal: self.signal.subscribe(),
            _running: self.running.clone(),
        }
    }

    /// Tells every service to stop.
    pub fn begin(&self) {
        self.signal.send_replace(true);
    }

    /// Tells every service to stop and waits until all have (their watches are gone), at
    /// most `limit`; false if some still ran then.
    pub async fn stopped(self, limit: Duration) -> bool {
        self.begin();
        let Shutdown {
            signal,
            running,
            mut all_stopped,
        } = self;
        drop(running);
        let done = tokio::time::timeout(limit, all_stopped.recv())
            .await
            .is_ok();
        drop(signal);
        done
    }
}

impl ShutdownWatch {
    /// Resolves once the stop was asked for (at once if it already was).
    pub async fn requested(&mut self) {
        // An error means the Shutdown itself is gone: stop as well.
        let _ = self.signal.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn services_stop_on_the_signal_and_report_it() {
        let shutdown = Shutdown::new();
        let mut a = shutdown.watch();
        let mut b = shutdown.watch();
        let (tx, mut stopped) = mpsc::unbounded_channel();
        for (name, mut w) in [("a", a), ("b", b)] {
            let tx = tx.clone();
            tokio::spawn(async move {
                w.requested().await;
                tx.send(name).unwrap();
                drop(w);
            });
        }
        assert!(shutdown.stopped(Duration::from_secs(5)).await);
        let mut names = vec![stopped.recv().await.unwrap(), stopped.recv().await.unwrap()];
        names.sort();
        assert_eq!(names, ["a", "b"]);
        // A service that never lets go of its watch is reported.
        let shutdown = Shutdown::new();
        a = shutdown.watch();
        b = shutdown.watch();
        drop(b);
        assert!(!shutdown.stopped(Duration::from_millis(100)).await);
        a.requested().await;
    }
}
