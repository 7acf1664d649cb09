//! What an open tunnel is doing, for `GET /nodes/{node}/mtunnel-status` and the status
//! page: the command it ran last and, per socket its WebSockets reach (control, RAM, NBD,
//! disk import), the bytes relayed each way and the connections open now. The relays add
//! to these counters as they add to the metrics (one more atomic add per chunk); the
//! API reads a [`TunnelStatus`] snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};

use super::Tunnel;
use crate::metrics::{ByteCounters, Stream};
use crate::util::unix_now;

/// The live activity of one tunnel (a field of [`Tunnel`]).
#[derive(Default)]
pub struct Activity {
    /// By stream kind, then socket path: the order the status lists them in.
    streams: Mutex<BTreeMap<(Stream, PathBuf), Arc<StreamStat>>>,
    command: Mutex<Option<(String, u64)>>,
    commands: AtomicU64,
}

/// The counters of one socket of a tunnel, over all its WebSocket connections.
struct StreamStat {
    inbound: Counter,
    outbound: Counter,
    open: AtomicUsize,
    since: Instant,
}

/// One WebSocket connection to a tunnel socket, counted as open until dropped.
pub struct Connection {
    stat: Arc<StreamStat>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stat.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// Records that the worker started `cmd` (a known command).
    pub fn command_started(&self, cmd: &str) {
        *self.command.lock().unwrap_or_else(|e| e.into_inner()) = Some((cmd.into(), unix_now()));
        self.commands.fetch_add(1, Ordering::Relaxed);
    }

    /// A WebSocket connection to `socket` opens: `counters` (the metric's) also count into
    /// this tunnel's stream of `socket`; the connection counts as open while the returned
    /// guard lives.
    pub fn connect(
        &self,
        socket: &Path,
        kind: Stream,
        counters: ByteCounters,
    ) -> (ByteCounters, Connection) {
        let stat = {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            let entry = streams
                .entry((kind, socket.to_path_buf()))
                .or_insert_with(|| {
                    Arc::new(StreamStat {
                        inbound: Counter::default(),
                        outbound: Counter::default(),
                        open: AtomicUsize::new(0),
                        since: Instant::now(),
                    })
                });
            Arc::clone(entry)
        };
        stat.open.fetch_add(1, Ordering::AcqRel);
        let counters = counters.also_counting(stat.inbound.clone(), stat.outbound.clone());
        (counters, Connection { stat })
    }

    /// Payload bytes peer → node through the WebSockets to `socket` so far (a replica
    /// run's received bytes, docs/replicas.md).
    pub fn inbound_bytes(&self, socket: &Path) -> u64 {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .iter()
            .filter(|((_, path), _)| path == socket)
            .map(|(_, stat)| stat.inbound.get())
            .sum()
    }
}

/// A snapshot of one open tunnel.
pub struct TunnelStatus {
    pub vmid: u32,
    /// The tunnel's task.
    pub upid: String,
    /// Who opened it.
    pub authid: String,
    /// Whether the source holds the control connection.
    pub connected: bool,
    /// The last command started and when (UNIX time).
    pub command: Option<(String, u64)>,
    pub commands: u64,
    pub streams: Vec<StreamStatus>,
}

/// A snapshot of one socket's WebSocket traffic.
pub struct StreamStatus {
    pub kind: Stream,
    pub socket: PathBuf,
    /// Payload bytes peer → node.
    pub netin: u64,
    /// Payload bytes node → peer.
    pub netout: u64,
    /// Connections open now (a RAM migration may use several).
    pub open: usize,
    /// Seconds since the first connection (to the millisecond: the page's first rate is
    /// the average over it).
    pub uptime: f64,
}

impl TunnelStatus {
    pub fn of(tunnel: &Tunnel) -> Self {
        let activity = &tunnel.activity;
        let streams = activity
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((kind, socket), stat)| StreamStatus {
                kind: *kind,
                socket: socket.clone(),
                netin: stat.inbound.get(),
                netout: stat.outbound.get(),
                open: stat.open.load(Ordering::Acquire),
                uptime: stat.since.elapsed().as_millis() as f64 / 1000.0,
            })
            .collect::<Vec<_>>();
        TunnelStatus {
            vmid: tunnel.vmid,
            upid: tunnel.instance.clone(),
            authid: tunnel.authid.clone(),
            connected: streams_have_open_control(&streams),
            command: activity
                .command
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            commands: activity.commands.load(Ordering::Relaxed),
            streams,
        }
    }

    /// The entry of `GET /nodes/{node}/mtunnel-status`.
    pub fn to_json(&self) -> Value {
        let streams: Vec<Value> = self
            .streams
            .iter()
            .map(|s| {
                json!({
                    "stream": s.kind.label(),
                    "socket": s.socket.display().to_string(),
                    "netin": s.netin,
                    "netout": s.netout,
                    "open": s.open,
                    "uptime": s.uptime,
                })
            })
            .collect();
        let mut out = json!({
            "vmid": self.vmid,
            "upid": self.upid,
            "user": self.authid,
            "connected": u8::from(self.connected),
            "commands": self.commands,
            "streams": streams,
        });
        if let Some((cmd, time)) = &self.command {
            out["command"] = json!(cmd);
            out["commandtime"] = json!(time);
        }
        out
    }
}

/// Whether a WebSocket holds the control socket now.
fn streams_have_open_control(streams: &[StreamStatus]) -> bool {
    streams
        .iter()
        .any(|s| s.kind == Stream::Control && s.open > 0)
}
