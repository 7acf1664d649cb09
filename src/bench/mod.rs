//! `mtunnel bench`: one command that measures the tunnel side by side with baselines on
//! the machine it runs on, prints a table with ratios and the targets of issue 5, and
//! writes every figure as JSON so runs can be compared.
//!
//! Sections (each with its own processes, on loopback or inside network namespaces of its
//! own, all in one short temporary directory under `/tmp`, all bounded in time):
//! - [`throughput`]: bulk MB/s and CPU-seconds per GiB of UNIX → `mtunnel tunnel` forward
//!   → WebSocket → `mtunnel serve` → UNIX, plain and TLS, against a writer → reader UNIX
//!   socket, a two-process tokio copy relay (UNIX → TCP → UNIX, 1 MiB buffers) and the
//!   same pair speaking WebSocket through `fastwebsockets` (the peer baseline),
//! - [`latency`]: round trips of `version`, `ticket` and `bwlimit` through WebSocket →
//!   worker → Lua → reply against a raw echo over the same WebSocket path,
//! - [`idle`]: 100 tunnels open at once: RSS per idle tunnel and setup time,
//! - [`migration`]: a QEMU live migration (KVM when usable, else TCG; one fixed switchover
//!   rule on every path) through the tunnel against the same migration over a direct UNIX
//!   socket and through two copy relays,
//! - [`wan_bench`] (`--wan LINK`, root only): plain TCP, the tunnel and a live migration
//!   side by side across an emulated WAN link ([`wan`]: two network namespaces, TUN, a
//!   userspace delay line), the only section that leaves loopback besides
//! - [`busy`] (`--busy-guest LINK`, root only): a real guest ([`guest`]) dirtying memory,
//!   live-migrated across an emulated link by QEMU with its defaults, by QEMU with PVE's
//!   tuning and by `mtunnel migrate --online`: converged or not, total time, downtime.
//!
//! Every measured hop is a real process: the bench spawns its own binary
//! (`std::env::current_exe()`) as `serve`, `tunnel` and `bench-relay` ([`relay`]); the
//! guards in [`procs`] kill them (and QEMUs) on every way out. `serve` nodes run with
//! `--backend scripted:` and a script ([`nodes::write_script`]) whose `start_incoming`
//! names a UNIX socket of the bench process, so `start` registers it and the WebSocket
//! endpoint forwards to it.

pub mod busy;
pub mod guest;
pub mod idle;
pub mod latency;
pub mod migration;
pub mod nodes;
pub mod procs;
pub mod relay;
mod report;
pub mod throughput;
pub mod wan;
pub mod wan_bench;
pub mod wan_disk;
pub mod wan_replica;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// The sections of a run.
pub const SECTIONS: &[&str] = &["throughput", "latency", "idle", "migration"];

/// What to measure and how much.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per transfer and path.
    pub size: u64,
    /// Transfers per path (the table shows medians).
    pub repeat: u32,
    /// Round trips per command kind.
    pub commands: u32,
    /// Tunnels held open at once.
    pub tunnels: u32,
    pub ram_mib: u64,
    pub ram_data_mib: u64,
    /// Migrations per mode (on a WAN link 0 skips the RAM migrations).
    pub migrations: u32,
    /// MiB of the disk moved across each WAN link (0: no disk runs).
    pub disk_mib: u64,
    /// `tcp_buffer_mib` of every node of the WAN section (`None`: the default).
    pub tcp_buffer_mib: Option<u64>,
    /// `--ram-queue-mib` of every `mtunnel migrate` of the WAN and busy-guest sections
    /// (`None`: its default).
    pub ram_queue_mib: Option<u32>,
    /// Skip the QEMU section.
    pub no_qemu: bool,
    /// Sections to run (all when empty).
    pub only: Vec<String>,
    pub json: PathBuf,
    /// Keep the temporary directory (logs of every process).
    pub keep: bool,
    pub quick: bool,
    /// Emulated WAN links to measure across (`--wan`); with any, only the WAN section
    /// runs unless `--only` names loopback sections too.
    pub wan: Vec<wan::LinkSpec>,
    /// The link of the busy-guest section (`--busy-guest`; none: not run); like `--wan`,
    /// it keeps the loopback sections from running unless `--only` names them.
    pub busy_guest: Option<wan::LinkSpec>,
    pub busy_shape: busy::BusyShape,
    /// Each busy-guest run gives up after this (s).
    pub busy_cap_s: u64,
}

impl Options {
    /// The full run: ~1 GiB per path three times, 10 000 commands, 100 tunnels, a 512 MiB
    /// VM with 448 MiB of data migrated seven times each way (migration times scatter most).
    pub fn full() -> Self {
        Options {
            size: GIB,
            repeat: 3,
            commands: 10_000,
            tunnels: 100,
            ram_mib: 512,
            ram_data_mib: 448,
            migrations: 7,
            disk_mib: 1024,
            tcp_buffer_mib: None,
            ram_queue_mib: None,
            no_qemu: false,
            only: Vec::new(),
            json: PathBuf::from("bench-results.json"),
            keep: false,
            quick: false,
            wan: Vec::new(),
            busy_guest: None,
            busy_shape: busy::BusyShape::FULL,
            busy_cap_s: 180,
        }
    }

    /// The defaults of a `--wan` run: enough bytes to leave slow start behind on a
    /// 1 Gbit/s link, each link a minute or two.
    pub fn wan() -> Self {
        Options {
            size: 512 * MIB,
            repeat: 2,
            migrations: 2,
            ..Options::full()
        }
    }

    /// `--quick`: tiny sizes that only prove every section works (seconds, not minutes).
    pub fn quick() -> Self {
        Options {
            size: 16 * MIB,
            repeat: 1,
            commands: 200,
            tunnels: 5,
            ram_mib: 128,
            ram_data_mib: 32,
            migrations: 1,
            disk_mib: 16,
            quick: true,
            busy_shape: busy::BusyShape::QUICK,
            busy_cap_s: 60,
            ..Options::full()
        }
    }

    fn wants(&self, section: &str) -> bool {
        if self.only.is_empty() {
            self.wan.is_empty() && self.busy_guest.is_none()
        } else {
            self.only.iter().any(|s| s == section)
        }
    }

    /// Runs of each busy-guest row: `--migrations`, at least one.
    pub fn busy_runs(&self) -> u32 {
        self.migrations.max(1)
    }
}

/// Parses `1G`, `16M`, `512MiB`, `2GiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    mtunnel::guest::config::parse_size(t)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid size '{s}' (e.g. 16M, 1G, 2GiB)"))
}

/// Largest of the finite values (NaN if none): the slowest run's time.
pub fn slowest(values: impl Iterator<Item = f64>) -> f64 {
    values
        .filter(|x| x.is_finite())
        .fold(f64::NAN, |a, b| if a.is_nan() { b } else { a.max(b) })
}

/// Median of the finite values (NaN if none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted values (NaN if empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The temporary directory of a run, removed at the end unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(keep: bool) -> anyhow::Result<Self> {
        // Short on purpose: UNIX socket paths must stay below 108 bytes.
        let base = if Path::new("/tmp").is_dir() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        for _ in 0..100 {
            let path = base.join(format!("mtb{:06x}", rand::random::<u32>() & 0xff_ffff));
            if std::fs::create_dir(&path).is_ok() {
                return Ok(WorkDir { path, keep });
            }
        }
        anyhow::bail!("cannot create a directory under {}", base.display())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Bounds an async section in time.
async fn bounded<T>(
    what: &str,
    secs: u64,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(std::time::Duration::from_secs(secs), fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{what} did not finish within {secs} s"),
    }
}

fn progress(msg: &str) {
    eprintln!("{msg}");
}

fn section_value<T: serde::Serialize>(r: &anyhow::Result<T>) -> Value {
    match r {
        Ok(v) => serde_json::to_value(v).unwrap_or(Value::Null),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

/// Runs the selected sections, prints the table, writes the JSON. Fails (after writing
/// everything) when a section failed.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    tokio::select! {
        r = run_inner(&opts) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; every child process was killed"),
    }
}

async fn run_inner(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let work = WorkDir::create(opts.keep)?;
    let base = work.path.clone();
    let machine = report::machine();
    let versions = report::versions();
    progress(&format!(
        "mtunnel bench: {} build, working in {}",
        versions["profile"].as_str().unwrap_or("?"),
        base.display()
    ));
    if cfg!(debug_assertions) && !opts.quick {
        progress("WARNING: a debug build; build with --release for meaningful figures");
    }
    let not_selected = || json!({"skipped": "not selected (--only)"});

    let throughput = if opts.wants("throughput") {
        progress(&format!(
            "== throughput: {} per transfer, {} round(s)",
            report::bytes(opts.size),
            opts.repeat
        ));
        Some(throughput::run(&base, opts.size, opts.repeat, &progress).await)
    } else {
        None
    };
    let latency = if opts.wants("latency") {
        progress(&format!(
            "== command round trips: {} per kind",
            opts.commands
        ));
        let secs = 60 + u64::from(opts.commands) / 100;
        let plain = bounded(
            "latency (plain)",
            secs,
            latency::run(&base, false, opts.commands),
        )
        .await;
        let tls = bounded(
            "latency (tls)",
            secs,
            latency::run(&base, true, opts.commands),
        )
        .await;
        Some((plain, tls))
    } else {
        None
    };
    let idle = if opts.wants("idle") {
        progress(&format!("== {} tunnels open at once", opts.tunnels));
        let secs = 60 + u64::from(opts.tunnels);
        Some(bounded("idle tunnels", secs, idle::run(&base, opts.tunnels)).await)
    } else {
        None
    };
    let migration: Result<migration::Migration, String> = if !opts.wants("migration") {
        Err("not selected (--only)".into())
    } else if opts.no_qemu {
        Err("--no-qemu".into())
    } else {
        match migration::qemu_version() {
            Err(why) => Err(why),
            Ok(_) => {
                progress(&format!(
                    "== live migration: {} MiB RAM, {} MiB data, {} round(s)",
                    opts.ram_mib, opts.ram_data_mib, opts.migrations
                ));
                let secs = 120 + 90 * u64::from(opts.migrations);
                bounded(
                    "live migration",
                    secs,
                    migration::run(
                        &base,
                        opts.ram_mib,
                        opts.ram_data_mib,
                        opts.migrations,
                        &progress,
                    ),
                )
                .await
                .map_err(|e| format!("ERROR: {e:#}"))
            }
        }
    };

    let wan_runs = run_wan(&base, opts).await;
    let busy = run_busy(&base, opts).await;

    let tp = throughput.as_ref().and_then(|r| r.as_ref().ok());
    let lat_plain = latency.as_ref().and_then(|(p, _)| p.as_ref().ok());
    let lat_tls = latency.as_ref().and_then(|(_, t)| t.as_ref().ok());
    let idle_ok = idle.as_ref().and_then(|r| r.as_ref().ok());
    let mig_ok = migration.as_ref().ok();
    let targets = report::targets(tp, lat_plain, idle_ok, mig_ok);
    let measured = report::Measured {
        tp,
        lat_plain,
        lat_tls,
        idle: idle_ok,
        mig: mig_ok,
    };
    let mut table = report::table(opts, &machine, &versions, &measured, &targets);
    table.push_str(&wan_tables(&wan_runs));
    table.push_str(&busy_table(&busy));
    println!("{table}");

    let mut errors = Vec::new();
    let mut note = |name: &str, v: &Value| {
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            errors.push(format!("{name}: {e}"));
        }
    };
    let throughput_v = throughput.as_ref().map_or_else(not_selected, section_value);
    note("throughput", &throughput_v);
    let latency_v = match &latency {
        None => not_selected(),
        Some((p, t)) => {
            let (p, t) = (section_value(p), section_value(t));
            note("latency (plain)", &p);
            note("latency (tls)", &t);
            json!({"plain": p, "tls": t})
        }
    };
    let idle_v = idle.as_ref().map_or_else(not_selected, section_value);
    note("idle", &idle_v);
    let migration_v = match &migration {
        Ok(m) => serde_json::to_value(m)?,
        Err(e) if e.starts_with("ERROR: ") => json!({"error": e["ERROR: ".len()..]}),
        Err(why) => json!({"skipped": why}),
    };
    note("migration", &migration_v);
    let wan_v: Vec<Value> = wan_runs
        .iter()
        .map(|(link, r)| match r {
            Ok(w) => serde_json::to_value(w).unwrap_or(Value::Null),
            Err(e) if e.starts_with("ERROR: ") => {
                json!({"link": link.to_string(), "error": e["ERROR: ".len()..]})
            }
            Err(why) => json!({"link": link.to_string(), "skipped": why}),
        })
        .collect();
    let mut wan_errors = Vec::new();
    for v in &wan_v {
        note(&format!("wan {}", v["link"].as_str().unwrap_or("?")), v);
        for key in ["migration_missing", "multifd_missing"] {
            if let Some(e) = v[key].as_str().filter(|e| e.starts_with("ERROR")) {
                wan_errors.push(format!("wan {} {key}: {e}", v["link"]));
            }
        }
    }
    errors.extend(wan_errors);
    let busy_v = match &busy {
        None => json!({"skipped": "not selected (--busy-guest)"}),
        Some((_, Ok(b))) => serde_json::to_value(b)?,
        Some((link, Err(e))) if e.starts_with("ERROR: ") => {
            errors.push(format!("busy guest: {e}"));
            json!({"link": link.to_string(), "error": e["ERROR: ".len()..]})
        }
        Some((link, Err(why))) => json!({"link": link.to_string(), "skipped": why}),
    };
    let doc = json!({
        "schema": "mtunnel-bench/1",
        "finished_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "duration_s": started.elapsed().as_secs_f64(),
        "machine": machine,
        "versions": versions,
        "options": {
            "size_bytes": opts.size, "repeat": opts.repeat, "commands": opts.commands,
            "tunnels": opts.tunnels, "ram_mib": opts.ram_mib, "ram_data_mib": opts.ram_data_mib,
            "migrations": opts.migrations, "quick": opts.quick, "only": opts.only,
            "wan": opts.wan.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "busy_guest": opts.busy_guest.as_ref().map(ToString::to_string),
            "busy_shape": opts.busy_shape.to_string(), "busy_cap_s": opts.busy_cap_s,
        },
        "throughput": throughput_v,
        "latency": latency_v,
        "idle": idle_v,
        "migration": migration_v,
        "wan": wan_v,
        "busy_guest": busy_v,
        "targets": targets,
        "errors": errors,
        "table": table,
    });
    std::fs::write(&opts.json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    progress(&format!(
        "results: {} ({:.0} s)",
        opts.json.display(),
        started.elapsed().as_secs_f64()
    ));
    if !errors.is_empty() {
        anyhow::bail!("{} section(s) failed:\n{}", errors.len(), errors.join("\n"));
    }
    Ok(())
}

type WanRun = (wan::LinkSpec, Result<wan_bench::WanResult, String>);

/// The WAN section, one link after another; `Err` holds `ERROR: ...` or why it was skipped.
async fn run_wan(base: &Path, opts: &Options) -> Vec<WanRun> {
    let mut out = Vec::new();
    for (i, link) in opts.wan.iter().enumerate() {
        if let Err(why) = wan::available() {
            progress(&format!("== WAN link {link}: skipped, {why}"));
            out.push((link.clone(), Err(why)));
            continue;
        }
        progress(&format!(
            "== WAN link {link}: {} per transfer, {} round(s)",
            report::bytes(opts.size),
            opts.repeat
        ));
        let dir = base.join(format!("wan{i}"));
        let per_transfer = 30 + opts.size * 8 / link.rate_bps.max(1);
        let secs = 120
            + 3 * (u64::from(opts.repeat) + 1) * per_transfer
            + 120
            + 120 * u64::from(opts.migrations)
            + wan_bench::disk_secs(link, opts);
        let r = match std::fs::create_dir_all(&dir) {
            Ok(()) => bounded(
                "WAN link",
                secs,
                wan_bench::run(&dir, link, opts, &progress),
            )
            .await
            .map_err(|e| format!("ERROR: {e:#}")),
            Err(e) => Err(format!("ERROR: creating {}: {e}", dir.display())),
        };
        out.push((link.clone(), r));
    }
    out
}

fn wan_tables(runs: &[WanRun]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if runs.is_empty() {
        return o;
    }
    let mut targets = Vec::new();
    for (link, r) in runs {
        match r {
            Ok(w) => {
                o.push_str(&wan_bench::table(w));
                targets.extend(w.targets.iter().cloned());
            }
            Err(why) => {
                let _ = writeln!(o, "\nWAN link {link}: {why}");
            }
        }
    }
    o.push_str(&report::targets_table("Targets (WAN)", &targets));
    o
}

type BusyRun = (wan::LinkSpec, Result<busy::BusyGuest, String>);

/// The busy-guest section when `--busy-guest` asked for it; `Err` holds `ERROR: ...` or
/// why it was skipped.
async fn run_busy(base: &Path, opts: &Options) -> Option<BusyRun> {
    let link = opts.busy_guest.clone()?;
    let s = &opts.busy_shape;
    progress(&format!(
        "== busy guest across {link}: {} MiB RAM, {} MiB rewritten at {} MB/s, {} run(s) per \
         row, each capped at {} s",
        s.ram_mib,
        s.workset_mib,
        s.dirty_mb_s,
        opts.busy_runs(),
        opts.busy_cap_s
    ));
    let dir = base.join("busy");
    let r = match std::fs::create_dir_all(&dir) {
        Ok(()) => busy::run(&dir, &link, opts, &progress).await,
        Err(e) => Err(format!("ERROR: creating {}: {e}", dir.display())),
    };
    if let Err(why) = &r {
        progress(&format!("  busy guest: {why}"));
    }
    Some((link, r))
}

fn busy_table(run: &Option<BusyRun>) -> String {
    match run {
        None => String::new(),
        Some((_, Ok(b))) => {
            busy::table(b) + &report::targets_table("Targets (busy guest)", &b.targets)
        }
        Some((link, Err(why))) => format!("\nBusy guest across the link {link}: {why}\n"),
    }
}

/// The name of `accel` as resolved on this host (`Auto` was resolved to KVM or TCG).
pub fn accel_name(accel: mtunnel::qemu::Accel) -> &'static str {
    match accel {
        mtunnel::qemu::Accel::Kvm => "kvm",
        _ => "tcg",
    }
}

/// The `qemu_accel` line of a bench node's config for `accel`.
pub fn accel_toml(accel: mtunnel::qemu::Accel) -> String {
    format!("qemu_accel = \"{}\"\n", accel_name(accel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_medians_percentiles() {
        assert_eq!(parse_size("16M"), Ok(16 * MIB));
        assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("512MB"), Ok(512 * MIB));
        assert!(parse_size("x").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
