//! `mtunnel bench --wan LINK`: the tunnel and a live migration across an emulated WAN link
//! ([`super::wan`]), side by side with their baselines on the same link in the same run:
//! - bulk transfer: one plain TCP stream (writer in side A → reader in side B, the
//!   baseline), and `mtunnel tunnel` (side A) → `ws://` / `wss://` → `mtunnel serve` (side
//!   B), the same writer and reader on UNIX sockets at both ends; rounds interleaved,
//! - live migration: QEMU migrating straight over TCP across the link (the baseline) and
//!   `mtunnel migrate --online` (side A) to a TLS `serve` (side B), KVM when usable: once
//!   with one RAM stream (the target offers no multifd, `multifd_channels_max = 1`: what a
//!   PVE node gets) and once with [`STREAMS`] (multifd), each beside its own direct runs,
//! - disk moves ([`super::wan_disk`]): a VM's disk of `--disk-mib` moved offline and
//!   online by `mtunnel migrate`, its disk phase against the line rate,
//! - a replica ([`super::wan_replica`]): the same size of disk replicated by `mtunnel
//!   replicate`, a full run and an incremental one after a write, seconds and bytes sent.
//!
//! Rates are judged from the reader's first byte to EOF (the rate once data flows: slow
//! start counts, connection setup does not); the time to the first byte is shown beside
//! it. It owns the link for the section and drops it (namespaces deleted) on every way out.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::migration::{self, Migration, Plan};
use super::nodes::Placement;
use super::report::{Target, bytes, num, target};
use super::throughput::{PathResult, setup, summarize, transfer};
use super::wan::{ADDR_B, DirStats, LinkSpec, MTU, Wan};
use super::wan_disk::DiskMoves;
use super::wan_replica::ReplicaRuns;
use super::{Options, bounded};
use mtunnel::qemu::Accel;

/// One link's results.
#[derive(Debug, Clone, Serialize)]
pub struct WanResult {
    pub link: String,
    pub spec: LinkSpec,
    pub mtu: usize,
    pub bdp_bytes: u64,
    /// `tcp_wmem` and `tcp_rmem` maximum in both namespaces (tuned, or the host's).
    pub tcp_wmem_max: u64,
    pub tcp_rmem_max: u64,
    pub congestion_control: String,
    pub size_bytes: u64,
    pub repeat: u32,
    /// `tcp` (baseline), `plain`, `tls`.
    pub paths: Vec<PathResult>,
    /// One RAM stream.
    pub migration: Option<Migration>,
    /// Why there is no migration: `skipped: ...` or `ERROR: ...`.
    pub migration_missing: Option<String>,
    /// [`STREAMS`] RAM streams (multifd).
    pub multifd: Option<Migration>,
    pub multifd_missing: Option<String>,
    /// The disk moved offline and online.
    pub disk: Option<DiskMoves>,
    pub disk_missing: Option<String>,
    /// A full and an incremental `mtunnel replicate` run.
    pub replica: Option<ReplicaRuns>,
    pub replica_missing: Option<String>,
    /// The forwarder of A → B and of B → A over the whole section.
    pub emulator: [DirStats; 2],
    pub emulator_s: f64,
    pub targets: Vec<Target>,
}

impl WanResult {
    fn path(&self, name: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name == name)
    }
}

/// Runs the section on one link.
pub async fn run(
    base: &Path,
    link: &LinkSpec,
    o: &Options,
    log: &dyn Fn(&str),
) -> anyhow::Result<WanResult> {
    // The link outlives every transfer and migration of the section (each bounded), and
    // its forwarders stop by themselves after this even if nothing drops it.
    let wan = Wan::start(link, Duration::from_secs(3600))?;
    let started = Instant::now();
    let place = Placement {
        client: Some(Arc::clone(&wan.a)),
        server: Some((Arc::clone(&wan.b), ADDR_B)),
        server_toml: String::new(),
        shared_toml: o
            .tcp_buffer_mib
            .map(|m| format!("tcp_buffer_mib = {m}\n"))
            .unwrap_or_default(),
    };
    let sysctl = |key: &str| {
        let path = format!("/proc/sys/net/ipv4/{key}");
        wan.a
            .run(|| Ok(std::fs::read_to_string(&path)?))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("? ({e})"))
    };
    let congestion_control = sysctl("tcp_congestion_control");
    let max_of = |v: String| {
        v.split_whitespace()
            .last()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    };
    let tcp_wmem_max = max_of(sysctl("tcp_wmem"));
    let tcp_rmem_max = max_of(sysctl("tcp_rmem"));
    let mut routes = Vec::new();
    for name in ["tcp", "plain", "tls"] {
        routes.push(setup(base, name, &place).await?);
    }
    for round in 0..o.repeat {
        for r in &mut routes {
            let run = transfer(r, o.size)?;
            log(&format!(
                "  round {}/{} {:<5} {:>7.0} MB/s flowing, first byte after {:.0} ms",
                round + 1,
                o.repeat,
                r.name,
                run.stream_mb_per_s,
                run.first_byte_s * 1e3
            ));
            r.runs.push(run);
        }
    }
    let paths: Vec<PathResult> = routes.iter().map(summarize).collect();
    drop(routes);
    let (disk, disk_missing) = split(disks(base, &place, link, o, log).await);
    let (replica, replica_missing) = split(replicas(base, &place, link, o, log).await);
    let (migration, migration_missing) = split(migrate(base, &place, 1, o, log).await);
    let (multifd, multifd_missing) = split(migrate(base, &place, STREAMS, o, log).await);
    let mut result = WanResult {
        link: link.to_string(),
        spec: link.clone(),
        mtu: MTU,
        bdp_bytes: link.bdp_bytes(),
        tcp_wmem_max,
        tcp_rmem_max,
        congestion_control,
        size_bytes: o.size,
        repeat: o.repeat,
        paths,
        migration,
        migration_missing,
        multifd,
        multifd_missing,
        disk,
        disk_missing,
        replica,
        replica_missing,
        emulator: wan.stats(),
        emulator_s: started.elapsed().as_secs_f64(),
        targets: Vec::new(),
    };
    result.targets = targets(&result);
    Ok(result)
}

/// RAM streams of the multifd runs (`mtunnel migrate --streams 4`): the count issue 13
/// judges against one stream.
pub const STREAMS: u32 = 4;

fn split<T>(r: Result<T, String>) -> (Option<T>, Option<String>) {
    match r {
        Ok(m) => (Some(m), None),
        Err(why) => (None, Some(why)),
    }
}

/// Direct and tunnel migrations; the target offers `streams` multifd channels at most
/// (`multifd_channels_max`), which `mtunnel migrate` then uses by default.
async fn migrate(
    base: &Path,
    place: &Placement,
    streams: u32,
    o: &Options,
    log: &dyn Fn(&str),
) -> Result<Migration, String> {
    if o.no_qemu {
        return Err("skipped: --no-qemu".into());
    }
    if o.migrations == 0 {
        return Err("skipped: --migrations 0".into());
    }
    if let Err(why) = migration::qemu_version() {
        return Err(format!("skipped: {why}"));
    }
    let mut place = place.clone();
    place.server_toml = format!("multifd_channels_max = {streams}\n");
    let plan = Plan {
        ram_mib: o.ram_mib,
        data_mib: o.ram_data_mib,
        repeat: o.migrations,
        place,
        relay: false,
        accel: Accel::Auto.resolve(),
        streams,
        ram_queue_mib: o.ram_queue_mib,
    };
    log(&format!(
        "  live migration: {} MiB RAM, {} MiB data, {} round(s), {streams} stream(s)",
        o.ram_mib, o.ram_data_mib, o.migrations
    ));
    let secs = 120 + 120 * u64::from(o.migrations);
    let dir = base.join(format!("streams{streams}"));
    bounded(
        "live migration over the link",
        secs,
        migration::run_plan(&dir, &plan, log),
    )
    .await
    .map_err(|e| format!("ERROR: {e:#}"))
}

/// Seconds the disk runs of a link may take: each at a third of the line or better.
pub fn disk_secs(link: &LinkSpec, o: &Options) -> u64 {
    let per_run = 90 + 3 * (o.disk_mib << 20) * 8 / link.rate_bps.max(1);
    2 * u64::from(o.repeat) * per_run
}

/// The disk moved offline and online, `--repeat` times each.
async fn disks(
    base: &Path,
    place: &Placement,
    link: &LinkSpec,
    o: &Options,
    log: &dyn Fn(&str),
) -> Result<DiskMoves, String> {
    if o.no_qemu {
        return Err("skipped: --no-qemu".into());
    }
    if o.disk_mib == 0 {
        return Err("skipped: --disk-mib 0".into());
    }
    log(&format!(
        "  disk: {} MiB, offline and online, {} round(s)",
        o.disk_mib, o.repeat
    ));
    bounded(
        "moving the disk over the link",
        disk_secs(link, o),
        super::wan_disk::run(base, place, o.disk_mib, o.repeat, log),
    )
    .await
    .map_err(|e| format!("ERROR: {e:#}"))
}

/// One full and one incremental replica run of a `--disk-mib` disk.
async fn replicas(
    base: &Path,
    place: &Placement,
    link: &LinkSpec,
    o: &Options,
    log: &dyn Fn(&str),
) -> Result<ReplicaRuns, String> {
    if o.no_qemu {
        return Err("skipped: --no-qemu".into());
    }
    if o.disk_mib == 0 {
        return Err("skipped: --disk-mib 0".into());
    }
    log(&format!(
        "  replica: {} MiB, a full and an incremental `mtunnel replicate` run",
        o.disk_mib
    ));
    // Two runs, the first as long as one disk move; the second moves little.
    let secs = disk_secs(link, o) / u64::from(o.repeat).max(1);
    bounded(
        "replicating the disk over the link",
        secs,
        super::wan_replica::run(base, place, o.disk_mib, log),
    )
    .await
    .map_err(|e| format!("ERROR: {e:#}"))
}

/// The targets of issue 13 (and issue 21's disk phase) on this link.
fn targets(r: &WanResult) -> Vec<Target> {
    let rate = |name: &str| r.path(name).map(|p| p.stream_mb_per_s);
    let tcp = rate("tcp");
    let set_mb_s = one_flow_mb_s(&r.spec);
    let ratio = |name: &str| rate(name).zip(tcp).map(|(a, b)| a / b);
    let mig = r.migration.as_ref();
    let multi = r.multifd.as_ref();
    let l = &r.link;
    let disk = |mode: &str| {
        r.disk
            .as_ref()
            .map(|d| d.median_mb_s(mode) / line_mb_s(&r.spec))
    };
    vec![
        target(
            &format!("{l}: disk phase, migrate offline / line"),
            disk("offline"),
            ">=",
            0.85,
            "x",
        ),
        target(
            &format!("{l}: disk phase, migrate --online / line"),
            disk("online"),
            ">=",
            0.85,
            "x",
        ),
        target(
            &format!("{l}: emulator, plain TCP / one flow's rate"),
            tcp.map(|t| t / set_mb_s),
            ">=",
            0.9,
            "x",
        ),
        target(
            &format!("{l}: tunnel plain / plain TCP"),
            ratio("plain"),
            ">=",
            0.9,
            "x",
        ),
        target(
            &format!("{l}: tunnel TLS / plain TCP"),
            ratio("tls"),
            ">=",
            0.9,
            "x",
        ),
        target(
            &format!("{l}: migrate --online total / direct"),
            mig.map(|m| m.tunnel_total_s / m.direct_total_s),
            "<=",
            1.15,
            "x",
        ),
        target(
            &format!("{l}: migrate --online {STREAMS} streams total / direct"),
            multi.map(|m| m.tunnel_total_s / m.direct_total_s),
            "<=",
            1.15,
            "x",
        ),
        target(
            &format!("{l}: RAM phase 1 stream / {STREAMS} streams"),
            mig.zip(multi)
                .map(|(one, n)| one.tunnel_ram_ms / n.tunnel_ram_ms),
            ">=",
            3.0,
            "x",
        ),
    ]
}

/// The link's part of the report.
pub fn table(r: &WanResult) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nWAN link {}: RTT {} ms, {} Mbit/s{}{}, MTU {}, queue {}, BDP {}, tcp_wmem max {}, \
         tcp_rmem max {}{}, {}",
        r.link,
        num(r.spec.rtt.as_secs_f64() * 1e3, 1),
        num(r.spec.rate_bps as f64 / 1e6, 0),
        if r.spec.loss > 0.0 {
            format!(", loss {}%", num(r.spec.loss * 100.0, 3))
        } else {
            String::new()
        },
        r.spec
            .flowcap_bps
            .map(|c| format!(", per-flow cap {} Mbit/s", num(c as f64 / 1e6, 0)))
            .unwrap_or_default(),
        r.mtu,
        bytes_dec(r.spec.queue_bytes),
        bytes_dec(r.bdp_bytes),
        bytes_dec(r.tcp_wmem_max),
        bytes_dec(r.tcp_rmem_max),
        if r.spec.host_buffers {
            " (the host's)"
        } else {
            " (tuned)"
        },
        r.congestion_control
    );
    let _ = writeln!(
        o,
        "Bulk transfer across the link, {} x {}, medians (MB = 10^6 bytes)",
        bytes(r.size_bytes),
        r.repeat
    );
    let _ = writeln!(
        o,
        "{:<52} {:>8} {:>7} {:>9} {:>10} {:>9}  CPU-s/GiB",
        "path", "MB/s", "x TCP", "x rate", "1st byte", "MB/s all"
    );
    let tcp = r.path("tcp").map_or(f64::NAN, |p| p.stream_mb_per_s);
    let set = one_flow_mb_s(&r.spec);
    for p in &r.paths {
        let _ = writeln!(
            o,
            "{:<52} {:>8} {:>6}x {:>8}x {:>7} ms {:>9}  {}",
            p.label,
            num(p.stream_mb_per_s, 1),
            num(p.stream_mb_per_s / tcp, 2),
            num(p.stream_mb_per_s / set, 2),
            num(p.first_byte_ms, 0),
            num(p.mb_per_s, 1),
            if p.cpu_s_per_gib_by_process.is_empty() {
                "-".into()
            } else {
                num(p.cpu_s_per_gib, 2)
            }
        );
    }
    let _ = writeln!(
        o,
        "(MB/s: reader's first byte to EOF; MB/s all: writer's connect to EOF; x rate: of the \
         {} MB/s one flow may use)",
        num(set, 1)
    );
    disk_rows(&mut o, r);
    replica_rows(&mut o, r);
    migration_rows(&mut o, r);
    let [ab, ba] = &r.emulator;
    let _ = writeln!(
        o,
        "emulator: A->B {} packets, {} lost at random, {} queue drops, {} flow-cap drops, \
         {} sent > 1 ms behind schedule (worst {} us), {:.1} CPU-s; B->A {} packets, {:.1} CPU-s; \
         over {:.0} s",
        ab.packets,
        ab.lost,
        ab.queue_drops,
        ab.flow_drops,
        ab.late_1ms,
        ab.max_late_us,
        ab.cpu_s,
        ba.packets,
        ba.cpu_s,
        r.emulator_s
    );
    o
}

fn migration_rows(o: &mut String, r: &WanResult) {
    let Some(m) = r.migration.as_ref().or(r.multifd.as_ref()) else {
        let why = r.migration_missing.as_deref().unwrap_or("?");
        let _ = writeln!(o, "Live migration across the link: {why}");
        return;
    };
    let _ = writeln!(
        o,
        "Live migration across the link, QEMU {} {}, {} MiB RAM with {} MiB data, x {}, medians",
        m.qemu.split_whitespace().next().unwrap_or("?"),
        m.accel.to_uppercase(),
        m.ram_mib,
        m.data_mib,
        m.repeat
    );
    let _ = writeln!(
        o,
        "{:<52} {:>8} {:>7} {:>12} {:>12} {:>8}",
        "", "total s", "x direct", "RAM phase ms", "downtime ms", "x RAM"
    );
    let runs = [
        (&r.migration, &r.migration_missing, "1 stream".to_string()),
        (&r.multifd, &r.multifd_missing, format!("{STREAMS} streams")),
    ];
    for (mig, missing, streams) in runs {
        let Some(m) = mig else {
            let why = missing.as_deref().unwrap_or("?");
            let _ = writeln!(o, "tunnel, {streams}: {why}");
            continue;
        };
        let _ = writeln!(
            o,
            "{:<52} {:>8} {:>7}x {:>12} {:>12} {:>7}x",
            "direct: QMP migrate to -incoming tcp: (baseline)",
            num(m.direct_total_s, 2),
            "1.00",
            num(m.direct_ram_ms, 0),
            num(m.direct_downtime_ms, 0),
            "1.00"
        );
        let _ = writeln!(
            o,
            "{:<52} {:>8} {:>6}x {:>12} {:>12} {:>7}x",
            format!("tunnel: mtunnel migrate --online, {streams} (TLS)"),
            num(m.tunnel_total_s, 2),
            num(m.tunnel_total_s / m.direct_total_s, 2),
            num(m.tunnel_ram_ms, 0),
            num(m.tunnel_downtime_ms, 0),
            num(m.ratio, 2)
        );
    }
    let _ = writeln!(
        o,
        "(total: direct = target QEMU start to `completed`; tunnel = the whole `mtunnel migrate` \
         command, tunnel setup, target start and cleanup included; each tunnel row beside its \
         own direct runs; {STREAMS} streams = QEMU multifd, one WebSocket per channel)"
    );
}

fn disk_rows(o: &mut String, r: &WanResult) {
    let Some(d) = &r.disk else {
        let why = r.disk_missing.as_deref().unwrap_or("?");
        let _ = writeln!(o, "Disk across the link: {why}");
        return;
    };
    let line = line_mb_s(&r.spec);
    let _ = writeln!(
        o,
        "Disk across the link: {} of incompressible data, x {}, `mtunnel migrate` (TLS), disk phase",
        bytes(d.disk_bytes),
        r.repeat
    );
    let _ = writeln!(
        o,
        "{:<52} {:>8} {:>7} {:>9} {:>8}",
        "", "MB/s", "x line", "slowest", "x line"
    );
    for (mode, label) in [
        ("offline", "migrate (offline: disk-import)"),
        ("online", "migrate --online (drive-mirror over NBD)"),
    ] {
        let (med, slow) = (d.median_mb_s(mode), d.slowest_mb_s(mode));
        let _ = writeln!(
            o,
            "{label:<52} {:>8} {:>6}x {:>9} {:>7}x",
            num(med, 1),
            num(med / line, 2),
            num(slow, 1),
            num(slow / line, 2)
        );
    }
    let _ = writeln!(
        o,
        "(disk phase as `mtunnel migrate` reports it: the imports, or the mirrors until ready; \
         x line: of the link's {} MB/s; slowest: the slowest run)",
        num(line, 1)
    );
}

fn replica_rows(o: &mut String, r: &WanResult) {
    let Some(rep) = &r.replica else {
        let why = r.replica_missing.as_deref().unwrap_or("?");
        let _ = writeln!(o, "Replica across the link: {why}");
        return;
    };
    let line = line_mb_s(&r.spec);
    let _ = writeln!(
        o,
        "Replica across the link: a running VM's {} disk of incompressible data, \
         `mtunnel replicate` (TLS), then {} written by the guest's QEMU",
        bytes(rep.disk_bytes),
        bytes(rep.written_bytes)
    );
    let _ = writeln!(
        o,
        "{:<52} {:>8} {:>10} {:>14} {:>14} {:>8} {:>7}",
        "", "run s", "command s", "copied bytes", "sent bytes", "MB/s", "x line"
    );
    for run in [&rep.full, &rep.incremental] {
        // The full run's rate only: a short incremental run measures its setup.
        let mb_s = if std::ptr::eq(run, &rep.full) {
            run.sent_bytes as f64 / 1e6 / run.run_s
        } else {
            f64::NAN
        };
        let _ = writeln!(
            o,
            "{:<52} {:>8} {:>10} {:>14} {:>14} {:>8} {:>7}",
            format!("mtunnel replicate, {} run", run.kind),
            num(run.run_s, 1),
            num(run.command_s, 1),
            run.copied_bytes,
            run.sent_bytes,
            num(mb_s, 1),
            if mb_s.is_finite() {
                format!("{}x", num(mb_s / line, 2))
            } else {
                "-".into()
            }
        );
    }
    let _ = writeln!(
        o,
        "(run s, copied, sent: the run's summary line; sent: through the tunnel's NBD \
         connections; command s: the whole command, tunnel setup and restore point included; \
         MB/s: the full run's sent / run s; x line: of the link's {} MB/s)",
        num(line, 1)
    );
}

/// The link's rate in MB/s (10^6 bytes).
fn line_mb_s(spec: &LinkSpec) -> f64 {
    spec.rate_bps as f64 / 8e6
}

/// What one flow may use: the rate, or the per-flow cap when lower (MB/s).
fn one_flow_mb_s(spec: &LinkSpec) -> f64 {
    spec.rate_bps.min(spec.flowcap_bps.unwrap_or(u64::MAX)) as f64 / 8e6
}

fn bytes_dec(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{} MB", num(n as f64 / 1e6, 1))
    } else {
        format!("{} kB", num(n as f64 / 1e3, 0))
    }
}
