//! The node's Prometheus metrics: one [`Metrics`] value per node owns the registry and
//! every metric family, and offers one small method per thing counted, so the layers that
//! count (tunnel, worker, forwarder, journal, Lua host functions, API) stay one-liners
//! and never see a label set. Every label value comes from a fixed list here (or, for
//! command names, a handler that exists), so no client can grow the number of series.
//! Exposition (`encode`) is `prometheus-client`'s; the HTTP listener is
//! [`crate::api::metrics`]. Counters start at zero with each process. The replicas'
//! series are the exception: [`ReplicaCollector`] asks for them at each scrape (the node
//! reads them from the replica records: one series per replica it holds), so they survive
//! restarts.

use std::path::Path;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of the OpenMetrics text format (what Prometheus asks for first).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `Content-Type` of the Prometheus text format 0.0.4 (what `promtool` and `curl` get).
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Label value for a command name that is not a handler (or not a plausible name).
pub const UNKNOWN_COMMAND: &str = "unknown";

/// Which tunnel stream a WebSocket carries, from the socket it was opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    /// The tunnel's control socket (`{vmid}.mtunnel`).
    Control,
    /// RAM migration (`{vmid}.migrate`).
    Ram,
    /// NBD disk mirroring (`{vmid}_nbd.migrate`).
    Nbd,
    /// Offline disk import (`{vmid}.storage`).
    Import,
    Other,
}

impl Stream {
    const ALL: [Stream; 5] = [
        Stream::Control,
        Stream::Ram,
        Stream::Nbd,
        Stream::Import,
        Stream::Other,
    ];

    /// The kind of the stream to `socket`; `control` is the tunnel's control socket.
    pub fn of_socket(socket: &Path, control: &Path) -> Stream {
        let name = socket.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if socket == control || name.ends_with(".mtunnel") {
            Stream::Control
        } else if name.ends_with("_nbd.migrate") {
            Stream::Nbd
        } else if name.ends_with(".migrate") {
            Stream::Ram
        } else if name.ends_with(".storage") {
            Stream::Import
        } else {
            Stream::Other
        }
    }

    /// The metric's `stream` label (`control`, `ram`, `nbd`, `import`, `other`).
    pub fn label(self) -> &'static str {
        match self {
            Stream::Control => "control",
            Stream::Ram => "ram",
            Stream::Nbd => "nbd",
            Stream::Import => "import",
            Stream::Other => "other",
        }
    }
}

/// Why an API request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Missing, malformed or wrong API token (401).
    BadToken,
    /// A WebSocket ticket that does not verify (401).
    BadTicket,
    /// Authenticated, but lacking a privilege or not the tunnel's owner (403).
    PermissionDenied,
}

impl AuthFailure {
    const ALL: [AuthFailure; 3] = [
        AuthFailure::BadToken,
        AuthFailure::BadTicket,
        AuthFailure::PermissionDenied,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthFailure::BadToken => "bad_token",
            AuthFailure::BadTicket => "bad_ticket",
            AuthFailure::PermissionDenied => "permission_denied",
        }
    }
}

/// Why a migration failed (the tunnel ended before it was committed).
pub mod migration_failure {
    /// The source sent `quit` (usually with `cleanup=1`: it aborted).
    pub const SOURCE_ABORTED: &str = "source_aborted";
    /// The control connection ended or broke without `quit` (includes a silent peer).
    pub const PEER_GONE: &str = "peer_gone";
    /// The tunnel's task was stopped or `serve` shut down.
    pub const SHUTDOWN: &str = "shutdown";
    /// A command handler panicked.
    pub const HANDLER_PANIC: &str = "handler_panic";
    /// A previous `serve` died with the tunnel open; counted by the recovery at start.
    pub const CRASH_RECOVERED: &str = "crash_recovered";
    pub const ALL: [&str; 5] = [
        SOURCE_ABORTED,
        PEER_GONE,
        SHUTDOWN,
        HANDLER_PANIC,
        CRASH_RECOVERED,
    ];
}

/// Why a disk import failed.
pub mod import_failure {
    /// The source never connected to the import socket.
    pub const NO_CONNECTION: &str = "no_connection";
    /// The storage ran out of space.
    pub const STORAGE_FULL: &str = "storage_full";
    /// The stream broke or did not verify.
    pub const STREAM_ERROR: &str = "stream_error";
    /// The imported image referenced other files and was removed.
    pub const REJECTED: &str = "rejected";
    /// The tunnel ended while the import ran.
    pub const ABORTED: &str = "aborted";
    pub const ALL: [&str; 5] = [NO_CONNECTION, STORAGE_FULL, STREAM_ERROR, REJECTED, ABORTED];
}

/// What a cleanup (a tunnel's end, or the recovery at start) did.
pub mod cleanup_action {
    pub const VM_STOPPED: &str = "vm_stopped";
    pub const VOLUME_FREED: &str = "volume_freed";
    pub const FIREWALL_REMOVED: &str = "firewall_removed";
    pub const CONFIG_REMOVED: &str = "config_removed";
    pub const SOCKET_REMOVED: &str = "socket_removed";
    /// A VM past `resume` (or under another lock) was left in place.
    pub const VM_KEPT: &str = "vm_kept";
    /// A dead process's tunnel was recovered when `serve` started.
    pub const RECOVERED_AT_START: &str = "recovered_at_start";
    pub const ALL: [&str; 7] = [
        VM_STOPPED,
        VOLUME_FREED,
        FIREWALL_REMOVED,
        CONFIG_REMOVED,
        SOCKET_REMOVED,
        VM_KEPT,
        RECOVERED_AT_START,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    stream: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Command latencies from 1 ms to ~4 min (a `start` or a `disk-import` poll can be slow).
fn command_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// The two byte counters of one relayed stream, looked up once per relay; adding to them
/// is an atomic add or two, no lock and no allocation.
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    /// Peer → node (WebSocket → UNIX socket).
    pub inbound: ByteCounter,
    /// Node → peer.
    pub outbound: ByteCounter,
}

impl ByteCounters {
    /// These counters, also adding to `inbound` and `outbound` (a tunnel's own stream
    /// counters, which the status page shows per tunnel; the metric counts all tunnels).
    pub fn also_counting(self, inbound: Counter, outbound: Counter) -> Self {
        ByteCounters {
            inbound: self.inbound.also(inbound),
            outbound: self.outbound.also(outbound),
        }
    }
}

/// One direction of a relayed stream: the metric's counter and, for a tunnel's relay,
/// that tunnel's counter of the stream.
#[derive(Clone, Debug, Default)]
pub struct ByteCounter {
    metric: Counter,
    tunnel: Option<Counter>,
}

impl ByteCounter {
    fn also(self, tunnel: Counter) -> Self {
        ByteCounter {
            tunnel: Some(tunnel),
            ..self
        }
    }

    /// Counts `n` bytes relayed.
    pub fn inc_by(&self, n: u64) {
        self.metric.inc_by(n);
        if let Some(t) = &self.tunnel {
            t.inc_by(n);
        }
    }

    /// The metric's count.
    pub fn get(&self) -> u64 {
        self.metric.get()
    }
}

/// Every metric of one node.
pub struct Metrics {
    registry: Registry,
    tunnels_open: Gauge,
    tunnels_opened: Counter,
    commands: Family<CommandLabels, Counter>,
    command_duration: HistogramFamily<CommandLabel>,
    forwarded: Family<StreamLabels, Counter>,
    migrations: Family<ResultLabel, Counter>,
    migration_failures: Family<ReasonLabel, Counter>,
    imports: Family<ResultLabel, Counter>,
    import_failures: Family<ReasonLabel, Counter>,
    cleanup: Family<ActionLabel, Counter>,
    auth_failures: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("mtunnel"),
            tunnels_open: Gauge::default(),
            tunnels_opened: Counter::default(),
            commands: Family::default(),
            command_duration: Family::new_with_constructor(command_histogram),
            forwarded: Family::default(),
            migrations: Family::default(),
            migration_failures: Family::default(),
            imports: Family::default(),
            import_failures: Family::default(),
            cleanup: Family::default(),
            auth_failures: Family::default(),
        };
        m.register();
        m.zero_known_series();
        m
    }

    /// These metrics plus the series of the replicas `figures` gives, asked at each scrape.
    pub fn with_replicas(
        mut self,
        figures: impl Fn() -> Vec<ReplicaFigures> + Send + Sync + 'static,
    ) -> Self {
        let collector = ReplicaCollector {
            figures: Box::new(figures),
        };
        self.registry.register_collector(Box::new(collector));
        self
    }

    /// Creates every series whose labels are known in advance at 0, so that a query
    /// sees "none yet" rather than "no data" (and `rate()` works from the first event).
    fn zero_known_series(&self) {
        for result in ["started", "completed", "failed"] {
            self.migrations.get_or_create_owned(&ResultLabel { result });
            self.imports.get_or_create_owned(&ResultLabel { result });
        }
        for reason in migration_failure::ALL {
            self.migration_failures
                .get_or_create_owned(&ReasonLabel { reason });
        }
        for reason in import_failure::ALL {
            self.import_failures
                .get_or_create_owned(&ReasonLabel { reason });
        }
        for action in cleanup_action::ALL {
            self.cleanup.get_or_create_owned(&ActionLabel { action });
        }
        for kind in AuthFailure::ALL {
            let kind = kind.label();
            self.auth_failures.get_or_create_owned(&KindLabel { kind });
        }
        for stream in Stream::ALL {
            self.byte_counters(stream);
        }
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "tunnels_open",
            "Tunnels open now",
            self.tunnels_open.clone(),
        );
        r.register(
            "tunnels_opened",
            "Tunnels opened (POST .../mtunnel succeeded)",
            self.tunnels_opened.clone(),
        );
        r.register(
            "commands",
            "Tunnel commands answered, by command and outcome (ok or error)",
            self.commands.clone(),
        );
        r.register_with_unit(
            "command_duration",
            "Time a command took, from its line being read to its reply being ready",
            Unit::Seconds,
            self.command_duration.clone(),
        );
        r.register_with_unit(
            "forwarded",
            "Payload bytes relayed between WebSocket and UNIX socket, by stream kind and \
             direction (in: peer to node)",
            Unit::Bytes,
            self.forwarded.clone(),
        );
        r.register(
            "migrations",
            "Incoming migrations: started (source connected), completed (committed), failed",
            self.migrations.clone(),
        );
        r.register(
            "migration_failures",
            "Failed incoming migrations by reason",
            self.migration_failures.clone(),
        );
        r.register(
            "imports",
            "Disk imports: started, completed, failed",
            self.imports.clone(),
        );
        r.register(
            "import_failures",
            "Failed disk imports by reason",
            self.import_failures.clone(),
        );
        r.register(
            "cleanup_actions",
            "What cleanups of tunnels did, by action",
            self.cleanup.clone(),
        );
        r.register(
            "auth_failures",
            "Refused API requests by kind",
            self.auth_failures.clone(),
        );
        let build: Family<VersionLabel, Gauge> = Family::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The running mtunnel version", build);
    }

    /// A tunnel was opened (its worker started).
    pub fn tunnel_opened(&self) {
        self.tunnels_opened.inc();
        self.tunnels_open.inc();
    }

    /// A tunnel's worker ended.
    pub fn tunnel_closed(&self) {
        self.tunnels_open.dec();
    }

    /// A command got its reply; `command` is a label from [`command_label`].
    pub fn command_done(&self, command: &str, ok: bool, elapsed: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        let command = command.to_string();
        self.command_duration
            .get_or_create(&CommandLabel {
                command: command.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.commands
            .get_or_create(&CommandLabels { command, outcome })
            .inc();
    }

    /// The counters a relay of `stream` adds to.
    pub fn byte_counters(&self, stream: Stream) -> ByteCounters {
        let get = |direction| {
            self.forwarded.get_or_create_owned(&StreamLabels {
                stream: stream.label(),
                direction,
            })
        };
        ByteCounters {
            inbound: ByteCounter {
                metric: get("in"),
                tunnel: None,
            },
            outbound: ByteCounter {
                metric: get("out"),
                tunnel: None,
            },
        }
    }

    pub fn migration_started(&self) {
        self.result(&self.migrations, "started");
    }

    pub fn migration_completed(&self) {
        self.result(&self.migrations, "completed");
    }

    /// `reason` is one of [`migration_failure`].
    pub fn migration_failed(&self, reason: &'static str) {
        self.result(&self.migrations, "failed");
        self.migration_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn import_started(&self) {
        self.result(&self.imports, "started");
    }

    pub fn import_completed(&self) {
        self.result(&self.imports, "completed");
    }

    /// `reason` is one of [`import_failure`].
    pub fn import_failed(&self, reason: &'static str) {
        self.result(&self.imports, "failed");
        self.import_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// `action` is one of [`cleanup_action`].
    pub fn cleanup(&self, action: &'static str) {
        self.cleanup.get_or_create(&ActionLabel { action }).inc();
    }

    pub fn auth_failure(&self, kind: AuthFailure) {
        self.auth_failures
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }

    fn result(&self, family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// The exposition: OpenMetrics text (ends with `# EOF`), or the Prometheus text format
    /// 0.0.4, which `promtool check metrics` and older scrapers parse.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = encoded {
            // Writing into a String fails only on a broken metric; say so in the scrape.
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmidLabel {
    vmid: String,
}

/// What the metrics show of one replica (the node fills it from the replica's record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaFigures {
    pub vmid: u32,
    pub points: u64,
    /// Unix time of the newest restore point.
    pub newest_point_time: Option<u64>,
    /// Bytes received through the NBD streams of the last completed run.
    pub last_run_received: Option<u64>,
    /// Bytes the source's backup jobs copied in the last completed run.
    pub last_run_copied: Option<u64>,
    pub failed_runs: u64,
}

/// The replicas' series (docs/metrics.md), asked for at each scrape: the label values are
/// the VMIDs of replicas this node holds, so no client makes series at will.
struct ReplicaCollector {
    figures: Box<dyn Fn() -> Vec<ReplicaFigures> + Send + Sync>,
}

impl std::fmt::Debug for ReplicaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaCollector")
    }
}

/// One per-replica metric family: name, help, unit, and the value of a replica (`None`:
/// no series for it).
type ReplicaSeries = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&ReplicaFigures) -> Option<u64>,
);

const REPLICA_GAUGES: [ReplicaSeries; 4] = [
    (
        "replica_points",
        "Restore points a replica keeps",
        None,
        |r| Some(r.points),
    ),
    (
        "replica_newest_point_timestamp",
        "Unix time the replica's newest restore point was made (its last completed run)",
        Some(Unit::Seconds),
        |r| r.newest_point_time,
    ),
    (
        "replica_last_run_received",
        "Payload bytes this node received through the NBD streams of the replica's last \
         completed run",
        Some(Unit::Bytes),
        |r| r.last_run_received,
    ),
    (
        "replica_last_run_copied",
        "Bytes the source's backup jobs copied in the replica's last completed run (zeroes \
         included)",
        Some(Unit::Bytes),
        |r| r.last_run_copied,
    ),
];

impl Collector for ReplicaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let replicas = (self.figures)();
        let rows: Vec<_> = replicas
            .iter()
            .map(|r| {
                (
                    VmidLabel {
                        vmid: r.vmid.to_string(),
                    },
                    r,
                )
            })
            .collect();
        for (name, help, unit, value) in &REPLICA_GAUGES {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), kind)?;
            for (label, r) in &rows {
                if let Some(v) = value(r) {
                    let gauge = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                    gauge.encode(family.encode_family(label)?)?;
                }
            }
        }
        let help = "Replica runs that exported the working copies and did not complete \
                    (cut, failed, or the node died)";
        let kind = ConstCounter::new(0u64).metric_type();
        let mut family = encoder.encode_descriptor("replica_runs_failed", help, None, kind)?;
        for (label, r) in &rows {
            ConstCounter::new(r.failed_runs).encode(family.encode_family(label)?)?;
        }
        Ok(())
    }
}

/// The `command` label for `cmd`: the name itself when a handler for it exists and it
/// looks like a command name, else [`UNKNOWN_COMMAND`] — the source chooses command
/// names, so taking them as they come would let it create series without bound.
pub fn command_label(cmd: &str, known: bool) -> &str {
    let plausible = !cmd.is_empty()
        && cmd.len() <= 32
        && cmd
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if known && plausible {
        cmd
    } else {
        UNKNOWN_COMMAND
    }
}

/// The [`import_failure`] reason of an import error message.
pub fn import_failure_reason(msg: &str) -> &'static str {
    let lower = msg.to_ascii_lowercase();
    if lower.contains("no import connection") || lower.contains("accepting the import") {
        import_failure::NO_CONNECTION
    } else if lower.contains("no space left") || lower.contains("os error 28") {
        import_failure::STORAGE_FULL
    } else {
        import_failure::STREAM_ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_labels_are_bounded() {
        assert_eq!(command_label("version", true), "version");
        assert_eq!(
            command_label("query-disk-import", true),
            "query-disk-import"
        );
        // Not a handler: whatever the source sent collapses into one series.
        assert_eq!(command_label("version", false), UNKNOWN_COMMAND);
        assert_eq!(command_label("x1234", false), UNKNOWN_COMMAND);
        // A handler with an implausible name still gets no series of its own.
        assert_eq!(command_label(&"a".repeat(33), true), UNKNOWN_COMMAND);
        assert_eq!(command_label("Bad Name\n", true), UNKNOWN_COMMAND);
        assert_eq!(command_label("", true), UNKNOWN_COMMAND);
        let m = Metrics::new();
        for i in 0..100 {
            let cmd = format!("junk{i}");
            m.command_done(command_label(&cmd, false), false, Duration::ZERO);
        }
        let text = m.encode(false);
        let series = text
            .lines()
            .filter(|l| l.starts_with("mtunnel_commands_total{"))
            .collect::<Vec<_>>();
        assert_eq!(
            series,
            ["mtunnel_commands_total{command=\"unknown\",outcome=\"error\"} 100"]
        );
    }

    #[test]
    fn streams_are_told_by_their_socket() {
        let control = Path::new("/run/q/100.mtunnel");
        let kind = |p: &str| Stream::of_socket(Path::new(p), control);
        assert_eq!(kind("/run/q/100.mtunnel"), Stream::Control);
        assert_eq!(kind("/run/q/100.migrate"), Stream::Ram);
        assert_eq!(kind("/run/q/100_nbd.migrate"), Stream::Nbd);
        assert_eq!(kind("/run/q/100.storage"), Stream::Import);
        assert_eq!(kind("/run/q/100.qmp"), Stream::Other);
    }

    #[test]
    fn import_failures_are_classified() {
        assert_eq!(
            import_failure_reason("no import connection within 30 s"),
            import_failure::NO_CONNECTION
        );
        assert_eq!(
            import_failure_reason("writing: No space left on device (os error 28)"),
            import_failure::STORAGE_FULL
        );
        assert_eq!(
            import_failure_reason("stream ended early"),
            import_failure::STREAM_ERROR
        );
    }

    #[test]
    fn replicas_have_series_from_their_figures() {
        let figures = ReplicaFigures {
            vmid: 100,
            points: 2,
            newest_point_time: Some(20),
            last_run_received: Some(8389037),
            last_run_copied: Some(8 << 20),
            failed_runs: 3,
        };
        let m = Metrics::new().with_replicas(move || vec![figures.clone()]);
        let text = m.encode(false);
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("mtunnel_replica_"))
            .collect();
        assert_eq!(
            series,
            [
                "mtunnel_replica_points{vmid=\"100\"} 2",
                "mtunnel_replica_newest_point_timestamp_seconds{vmid=\"100\"} 20",
                "mtunnel_replica_last_run_received_bytes{vmid=\"100\"} 8389037",
                "mtunnel_replica_last_run_copied_bytes{vmid=\"100\"} 8388608",
                "mtunnel_replica_runs_failed_total{vmid=\"100\"} 3",
            ],
            "{text}"
        );
    }

    #[test]
    fn both_formats_name_the_metrics_alike() {
        let m = Metrics::new();
        m.tunnel_opened();
        m.byte_counters(Stream::Ram).inbound.inc_by(5);
        let om = m.encode(true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        for text in [om, m.encode(false)] {
            assert!(text.contains("mtunnel_tunnels_opened_total 1\n"), "{text}");
            assert!(text.contains("mtunnel_tunnels_open 1\n"), "{text}");
            assert!(
                text.contains("mtunnel_forwarded_bytes_total{stream=\"ram\",direction=\"in\"} 5\n"),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "mtunnel_build_info{{version=\"{}\"}} 1\n",
                    env!("CARGO_PKG_VERSION")
                )),
                "{text}"
            );
        }
    }
}
