//! The human side of a run: machine and version facts, the table with ratios, and the
//! targets of issue 5 judged PASS/MISS with how far off they are.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use super::Options;
use super::idle::Idle;
use super::latency::Latency;
use super::migration::Migration;
use super::throughput::Throughput;

/// CPU model, cores, kernel, memory and load of this machine.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
        "mem_total_kib": mem_kib,
        "loadavg_at_start": load,
    })
}

/// mtunnel, rustc (of the build), QEMU, build profile.
pub fn versions() -> Value {
    let rustc = option_env!("MTUNNEL_RUSTC_VERSION")
        .filter(|v| !v.is_empty())
        .unwrap_or("unknown");
    json!({
        "mtunnel": env!("CARGO_PKG_VERSION"),
        "rustc": rustc,
        "qemu": super::migration::qemu_version().unwrap_or_else(|e| format!("none ({e})")),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

pub fn bytes(n: u64) -> String {
    if n >= super::GIB && n.is_multiple_of(super::GIB) {
        format!("{} GiB", n / super::GIB)
    } else if n >= super::MIB {
        format!("{:.0} MiB", n as f64 / super::MIB as f64)
    } else {
        format!("{n} B")
    }
}

/// One target of issue 5.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: f64,
    pub goal: f64,
    /// `<=` or `>=`.
    pub op: String,
    pub unit: String,
    /// None when the figure was not measured.
    pub pass: Option<bool>,
    /// How far from the goal: positive = worse than the goal, as a fraction of it.
    pub off_by: f64,
}

pub(super) fn target(name: &str, measured: Option<f64>, op: &str, goal: f64, unit: &str) -> Target {
    let m = measured.filter(|v| v.is_finite());
    let (pass, off_by) = match m {
        None => (None, f64::NAN),
        Some(v) if op == "<=" => (Some(v <= goal), v / goal - 1.0),
        Some(v) => (Some(v >= goal), 1.0 - v / goal),
    };
    Target {
        name: name.into(),
        measured: m.unwrap_or(f64::NAN),
        goal,
        op: op.into(),
        unit: unit.into(),
        pass,
        off_by,
    }
}

/// The targets of issue 5 against what was measured.
pub fn targets(
    tp: Option<&Throughput>,
    lat: Option<&Latency>,
    idle: Option<&Idle>,
    mig: Option<&Migration>,
) -> Vec<Target> {
    let plain = tp.and_then(|t| t.path("plain"));
    let tls = tp.and_then(|t| t.path("tls"));
    let relay = tp.and_then(|t| t.path("relay"));
    let fastws = tp.and_then(|t| t.path("fastws"));
    let echo = lat.and_then(|l| l.kind("echo")).map(|k| k.p50_us);
    let lua = |name: &str| {
        lat.and_then(|l| l.kind(name))
            .zip(echo)
            .map(|(k, e)| k.p50_us / e)
    };
    vec![
        target(
            "plain: CPU-s/GiB, client + server",
            plain.map(|p| p.cpu_s_per_gib),
            "<=",
            0.5,
            "CPU-s/GiB",
        ),
        target(
            "plain: CPU-s/GiB / fastwebsockets pair",
            plain
                .zip(fastws)
                .map(|(p, f)| p.cpu_s_per_gib / f.cpu_s_per_gib),
            "<=",
            0.7,
            "x",
        ),
        target(
            "plain: throughput / copy relay",
            plain.zip(relay).map(|(p, r)| p.mb_per_s / r.mb_per_s),
            ">=",
            0.75,
            "x",
        ),
        target(
            "TLS: CPU-s/GiB, client + server",
            tls.map(|p| p.cpu_s_per_gib),
            "<=",
            0.9,
            "CPU-s/GiB",
        ),
        target(
            "Lua p50 / raw echo p50: version",
            lua("version"),
            "<=",
            1.5,
            "x",
        ),
        target(
            "Lua p50 / raw echo p50: ticket",
            lua("ticket"),
            "<=",
            1.5,
            "x",
        ),
        target(
            "Lua p50 / raw echo p50: bwlimit",
            lua("bwlimit"),
            "<=",
            1.5,
            "x",
        ),
        target(
            "idle tunnel: RSS of serve per tunnel",
            idle.map(|i| i.rss_per_tunnel_kib / 1024.0),
            "<=",
            1.0,
            "MiB",
        ),
        target(
            "tunnel setup, POST -> 1st reply, p99",
            idle.map(|i| i.setup_p99_ms),
            "<=",
            10.0,
            "ms",
        ),
        target(
            "migration RAM phase / direct",
            mig.map(|m| m.ratio),
            "<=",
            1.2,
            "x",
        ),
        target(
            "migration downtime: tunnel - direct",
            mig.map(|m| m.tunnel_downtime_ms - m.direct_downtime_ms),
            "<=",
            10.0,
            "ms",
        ),
    ]
}

pub(super) fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// A block of targets with PASS/MISS and how far off.
pub fn targets_table(title: &str, targets: &[Target]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\n{title}");
    let _ = writeln!(
        o,
        "{:<60} {:>10} {:>18}  result",
        "target", "measured", "goal"
    );
    for t in targets {
        let result = match t.pass {
            None => "not measured".to_string(),
            Some(true) => format!("PASS ({:.0}% margin)", -t.off_by * 100.0),
            Some(false) => format!("MISS ({:.0}% off)", t.off_by * 100.0),
        };
        let _ = writeln!(
            o,
            "{:<60} {:>10} {:>18}  {result}",
            t.name,
            num(t.measured, 2),
            format!("{} {} {}", t.op, t.goal, t.unit),
        );
    }
    o
}

/// What one run measured, for the report; a section is absent when it was not selected
/// or failed.
pub struct Measured<'a> {
    pub tp: Option<&'a Throughput>,
    pub lat_plain: Option<&'a Latency>,
    pub lat_tls: Option<&'a Latency>,
    pub idle: Option<&'a Idle>,
    pub mig: Option<&'a Migration>,
}

/// The whole report as text.
pub fn table(
    opts: &Options,
    machine: &Value,
    versions: &Value,
    measured: &Measured,
    targets: &[Target],
) -> String {
    let mut o = facts_block(machine, versions);
    if let Some(tp) = measured.tp {
        o.push_str(&throughput_block(tp));
    }
    for lat in [measured.lat_plain, measured.lat_tls].into_iter().flatten() {
        o.push_str(&latency_block(lat));
    }
    if let Some(i) = measured.idle {
        o.push_str(&idle_block(i));
    }
    if let Some(m) = measured.mig {
        o.push_str(&migration_block(m));
    }
    // A run across emulated links only (--wan, --busy-guest) measured none of these: no
    // block of "not measured".
    let remote_only = !opts.wan.is_empty() || opts.busy_guest.is_some();
    if !remote_only || targets.iter().any(|t| t.pass.is_some()) {
        o.push_str(&targets_table("Targets", targets));
    }
    if opts.quick {
        let _ = writeln!(o, "(--quick: tiny sizes, the figures mean nothing)");
    }
    o
}

/// The machine and version lines that open the report.
fn facts_block(machine: &Value, versions: &Value) -> String {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("?").to_string();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "machine:  {}, {} cores, Linux {}, {:.0} GiB RAM, load {} at start",
        s(machine, "cpu"),
        machine["cores"],
        s(machine, "kernel"),
        machine["mem_total_kib"].as_f64().unwrap_or(0.0) / 1048576.0,
        s(machine, "loadavg_at_start")
    );
    let _ = writeln!(
        o,
        "versions: mtunnel {} ({} build), {}, QEMU {}",
        s(versions, "mtunnel"),
        s(versions, "profile"),
        s(versions, "rustc"),
        s(versions, "qemu").split_whitespace().next().unwrap_or("?")
    );
    o
}

/// Bulk transfer: one line per path.
fn throughput_block(tp: &Throughput) -> String {
    let mut o = String::new();
    let relay = tp.path("relay").map(|r| r.mb_per_s).unwrap_or(f64::NAN);
    let _ = writeln!(
        o,
        "\nBulk transfer: writer -> path -> reader, {} x {}, medians (MB = 10^6 bytes)",
        bytes(tp.size_bytes),
        tp.repeat
    );
    let _ = writeln!(
        o,
        "{:<58} {:>6} {:>8} {:>10}  {:<24} {:>6} {:>6}",
        "path", "MB/s", "x relay", "CPU-s/GiB", "per process", "wr+rd", "other"
    );
    for p in &tp.paths {
        let per = p
            .cpu_s_per_gib_by_process
            .iter()
            .map(|(r, v)| format!("{r} {}", num(*v, 2)))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "{:<58} {:>6} {:>7}x {:>10}  {:<24} {:>6} {:>6}",
            p.label,
            num(p.mb_per_s, 0),
            num(p.mb_per_s / relay, 2),
            if p.cpu_s_per_gib_by_process.is_empty() {
                "-".into()
            } else {
                num(p.cpu_s_per_gib, 2)
            },
            per,
            num(p.bench_cpu_s_per_gib, 2),
            num(p.other_load, 2)
        );
    }
    let _ = writeln!(
        o,
        "(wr+rd: CPU-s/GiB of the bench's writer and reader; other: busy cores of the rest \
         of the machine meanwhile, 0 = quiet)"
    );
    o
}

/// Command round trips over one transport.
fn latency_block(lat: &Latency) -> String {
    let mut o = String::new();
    let echo = lat.kind("echo").map(|k| k.p50_us).unwrap_or(f64::NAN);
    let _ = writeln!(
        o,
        "\nCommand round trip over {} (ws{}://), {} each, one at a time",
        if lat.transport == "tls" {
            "TLS"
        } else {
            "plain HTTP"
        },
        if lat.transport == "tls" { "s" } else { "" },
        lat.commands
    );
    let _ = writeln!(
        o,
        "{:<52} {:>8} {:>8} {:>8} {:>9} {:>13}",
        "command", "p50 us", "p99 us", "max us", "p50/echo", "serve CPU us"
    );
    for k in &lat.kinds {
        let _ = writeln!(
            o,
            "{:<52} {:>8} {:>8} {:>8} {:>8}x {:>13}",
            k.label,
            num(k.p50_us, 0),
            num(k.p99_us, 0),
            num(k.max_us, 0),
            num(k.p50_us / echo, 2),
            num(k.server_cpu_us, 0)
        );
    }
    o
}

/// Idle tunnels: memory, descriptors and setup time.
fn idle_block(i: &Idle) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n{} tunnels open at once (TLS, control WebSocket connected, `version` answered)",
        i.tunnels
    );
    let _ = writeln!(
        o,
        "serve RSS {:.1} -> {:.1} MiB: {:.0} KiB per idle tunnel, {:.1} fds per tunnel, threads {} -> {}",
        i.rss_before_kib as f64 / 1024.0,
        i.rss_after_kib as f64 / 1024.0,
        i.rss_per_tunnel_kib,
        i.fds_per_tunnel,
        i.threads_before,
        i.threads_after
    );
    let _ = writeln!(
        o,
        "setup POST -> first reply: p50 {} ms, p99 {} ms, max {} ms (POST alone p50 {} ms)",
        num(i.setup_p50_ms, 2),
        num(i.setup_p99_ms, 2),
        num(i.setup_max_ms, 2),
        num(i.post_p50_ms, 2)
    );
    o
}

/// Live migration: direct, relay and tunnel runs side by side.
fn migration_block(m: &Migration) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nLive migration, QEMU {} {}, {} MiB RAM with {} MiB data, x {}, medians",
        m.qemu.split_whitespace().next().unwrap_or("?"),
        m.accel.to_uppercase(),
        m.ram_mib,
        m.data_mib,
        m.repeat
    );
    let rate = |ms: f64| (m.data_mib << 20) as f64 / (ms / 1e3) / 1e6;
    let range = |mode: &str| {
        let (a, b) = m.range(mode);
        let (p, n) = m.precopy(mode);
        format!("{}-{}  {} ({n})", num(a, 0), num(b, 0), num(p, 0))
    };
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>11} {:>8} {:>12} {:>8}  range ms  full-precopy runs: median (n)",
        "", "RAM phase ms", "data MB/s", "x direct", "downtime ms", "wall s"
    );
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>11} {:>8} {:>12} {:>8}  {}",
        "direct: QMP migrate to -incoming unix:",
        num(m.direct_ram_ms, 0),
        num(rate(m.direct_ram_ms), 0),
        "1.00x",
        num(m.direct_downtime_ms, 0),
        "-",
        range("direct")
    );
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>11} {:>7}x {:>12} {:>8}  {}",
        "relay: via copy relay x2 (UNIX->TCP->UNIX)",
        num(m.relay_ram_ms, 0),
        num(rate(m.relay_ram_ms), 0),
        num(m.relay_ram_ms / m.direct_ram_ms, 2),
        num(m.relay_downtime_ms, 0),
        "-",
        range("relay")
    );
    let _ = writeln!(
        o,
        "{:<44} {:>12} {:>11} {:>7}x {:>12} {:>8}  {}",
        "tunnel: mtunnel migrate --online (TLS)",
        num(m.tunnel_ram_ms, 0),
        num(rate(m.tunnel_ram_ms), 0),
        num(m.ratio, 2),
        num(m.tunnel_downtime_ms, 0),
        num(m.tunnel_wall_s, 1),
        range("tunnel")
    );
    let _ = writeln!(
        o,
        "(full precopy: downtime < {} ms, the whole RAM pass ran live; the other runs \
         switched over early and sent the rest with the VM stopped)",
        super::migration::EARLY_SWITCHOVER_MS
    );
    o
}
