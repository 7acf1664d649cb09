//! A real live migration with QEMU (KVM when usable, else TCG): a diskless VM whose RAM
//! holds `data_mib` of incompressible bytes (`-device loader`), moved
//! - through the tunnel: `mtunnel migrate --online` from a source node to a `mtunnel serve`
//!   target node (TLS, real backend), everything as separate processes, and
//! - directly: the same source VM shape, QMP `migrate` straight to a target QEMU's
//!   `-incoming unix:` socket (no tunnel at all),
//!
//! - through two copy-relay processes (UNIX → TCP → UNIX, the throughput baseline) between
//!   the QEMUs of the direct case: what any relay costs on this machine,
//!
//! alternating, `repeat` times each, every path with the same fixed switchover rule
//! ([`SWITCHOVER_BANDWIDTH`]) so that each run does its whole first pass live. The figures
//! compared are QEMU's own `total-time` of the RAM migration and its `downtime`, both read
//! on the source; for the tunnel the wall time of the whole `mtunnel migrate` command is
//! kept too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use super::median;
use super::nodes::{NodeSpec, Placement, ServeNode, write_node_config};
use super::procs::{QemuSweeper, cpu_seconds, mtunnel_exe};
use super::wan::Netns;
use mtunnel::guest::config::VmConfig;
use mtunnel::qemu::{
    Accel, MigrationParams, MigrationWait, StartOptions, StopTimeouts, VmHandle, VmSpec,
};

#[derive(Debug, Clone, Serialize)]
pub struct MigrationRun {
    /// `direct`, `relay` or `tunnel`.
    pub mode: String,
    pub ram_ms: f64,
    pub downtime_ms: f64,
    /// Tunnel: the whole `mtunnel migrate` command; direct: `migrate` to `completed`.
    pub wall_s: f64,
    /// How long the fresh source VM took to become idle before the migration started.
    pub settle_s: f64,
    /// QEMU's `ram.transferred` (direct and relay; the tunnel's source QEMU has quit).
    pub ram_transferred: Option<u64>,
    /// QEMU's final `query-migrate` (direct and relay).
    pub query_migrate: Option<Value>,
    /// Tunnel: what `mtunnel migrate` printed (its steps with their times).
    pub output: Option<String>,
    /// Tunnel: the whole `mtunnel migrate` command; direct and relay: from starting the
    /// target QEMU to `completed` (what a migration costs end to end).
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    pub ram_mib: u64,
    pub data_mib: u64,
    pub repeat: u32,
    pub qemu: String,
    pub runs: Vec<MigrationRun>,
    pub direct_ram_ms: f64,
    /// Through two copy relays (UNIX → TCP → UNIX).
    pub relay_ram_ms: f64,
    pub relay_downtime_ms: f64,
    pub tunnel_ram_ms: f64,
    pub direct_downtime_ms: f64,
    pub tunnel_downtime_ms: f64,
    pub tunnel_wall_s: f64,
    /// tunnel / direct, RAM phase.
    pub ratio: f64,
    /// Medians of [`MigrationRun::total_s`].
    pub direct_total_s: f64,
    pub tunnel_total_s: f64,
    /// `kvm` or `tcg`.
    pub accel: String,
}

/// A run whose downtime stayed under this did its whole RAM pass while the VM ran (full
/// precopy); above it, QEMU switched over early and sent the rest with the VM stopped.
pub const EARLY_SWITCHOVER_MS: f64 = 20.0;

/// Bytes/s QEMU is told to assume for the final switchover (`avail-switchover-bandwidth`)
/// on every path, instead of its own estimate. QEMU stops the VM once what is left fits
/// into `downtime-limit` at that rate; its estimate, taken over the first 100 ms, runs
/// to several GB/s on loopback, so with 100 ms allowed it switched over in the middle of
/// the first pass in some runs and not in others, and the ratio of two such runs meant
/// nothing. At 128 MiB/s × 100 ms only the last ~13 MiB may be left, which an idle guest
/// reaches only after its whole first pass, on every path alike.
pub const SWITCHOVER_BANDWIDTH: u64 = 128 << 20;

/// The migration parameters of every path: what `mtunnel migrate` sets, plus the fixed
/// switchover bandwidth.
async fn set_switchover_bandwidth(vm: &VmHandle) -> anyhow::Result<()> {
    vm.execute(
        "migrate-set-parameters",
        serde_json::json!({ "avail-switchover-bandwidth": SWITCHOVER_BANDWIDTH }),
        Duration::from_secs(10),
    )
    .await
    .context("setting avail-switchover-bandwidth on the source VM")?;
    Ok(())
}

impl Migration {
    /// Median RAM phase (ms) and count of the runs of `mode` that did a full precopy.
    pub fn precopy(&self, mode: &str) -> (f64, usize) {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.mode == mode && r.downtime_ms < EARLY_SWITCHOVER_MS)
            .map(|r| r.ram_ms)
            .collect();
        (median(v.iter().copied()), v.len())
    }

    /// Smallest and largest RAM phase of a mode, in ms.
    pub fn range(&self, mode: &str) -> (f64, f64) {
        let v = self
            .runs
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| r.ram_ms);
        let min = v.clone().fold(f64::INFINITY, f64::min);
        (min, v.fold(f64::NEG_INFINITY, f64::max))
    }
}

/// The QEMU version line, or why QEMU cannot be used.
pub fn qemu_version() -> Result<String, String> {
    let out = std::process::Command::new(mtunnel::qemu::process::QEMU_BINARY)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} not runnable: {e}", mtunnel::qemu::process::QEMU_BINARY))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    Ok(first
        .strip_prefix("QEMU emulator version ")
        .unwrap_or(&first)
        .to_string())
}

fn blob(path: &Path, size: usize) -> anyhow::Result<()> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, &data).with_context(|| format!("writing {}", path.display()))
}

/// Runs `mtunnel ARGS --config CONFIG`, bounded; returns stdout or fails with its output.
pub(super) async fn mt(config: &Path, args: &[&str]) -> anyhow::Result<String> {
    Ok(mt_in(None, config, args).await?.0)
}

/// [`mt`] inside a network namespace (and every QEMU it starts with it); returns stdout
/// and stderr (where `mtunnel migrate` logs its steps with their times).
pub(super) async fn mt_in(
    ns: Option<&Netns>,
    config: &Path,
    args: &[&str],
) -> anyhow::Result<(String, String)> {
    let out = mt_output(ns, config, args, Duration::from_secs(300)).await?;
    if !out.status.success() {
        bail!(
            "mtunnel {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `mtunnel ARGS --config CONFIG` inside `ns` (when given), killed after `limit`; its exit
/// status and output, whatever the status.
pub(super) async fn mt_output(
    ns: Option<&Netns>,
    config: &Path,
    args: &[&str],
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(mtunnel_exe()?);
    if let Some(ns) = ns {
        ns.apply(&mut cmd)?;
    }
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("MTUNNEL_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("mtunnel {args:?} took over {} s", limit.as_secs()))?
        .with_context(|| format!("running mtunnel {args:?}"))
}

/// The number before `unit` after `key` in `text` ("downtime 35 ms" → 35).
pub(super) fn number_after(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

struct Setup {
    src_config: PathBuf,
    src_run: PathBuf,
    direct_run: PathBuf,
    target: ServeNode,
    loader: String,
    ram_mib: u64,
    place: Placement,
    accel: Accel,
    streams: u32,
    ram_queue_mib: Option<u32>,
}

/// What the section runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ram_mib: u64,
    pub data_mib: u64,
    pub repeat: u32,
    /// Source and target sides; on a WAN link the direct migration goes over TCP.
    pub place: Placement,
    /// Also migrate through two copy relays (loopback only).
    pub relay: bool,
    /// Resolved accelerator of every QEMU.
    pub accel: Accel,
    /// `mtunnel migrate --streams` (RAM streams; 1 = one stream, as upstream).
    pub streams: u32,
    /// `mtunnel migrate --ram-queue-mib` (`None`: its default).
    pub ram_queue_mib: Option<u32>,
}

/// Waits until the freshly started source VM is idle: its firmware runs for a while under
/// TCG, and a VCPU busy on one of two cores would make the migration time vary with when
/// the migration happens to start. Idle means under `busy` of a core: 10 % under TCG; an
/// idle KVM guest costs ~40 % here (QEMU.md), so KVM is idle under 50 %. Returns the
/// seconds waited.
async fn settle(run_dir: &Path, vmid: u32, accel: Accel) -> anyhow::Result<f64> {
    let busy = if accel == Accel::Kvm { 0.5 } else { 0.1 };
    let pid = mtunnel::qemu::is_running(run_dir, vmid).context("the source VM is not running")?;
    let t0 = Instant::now();
    let window = Duration::from_millis(250);
    let mut quiet = 0;
    let mut last = cpu_seconds(pid as u32)?;
    while quiet < 2 && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(window).await;
        let now = cpu_seconds(pid as u32)?;
        if now - last < busy * window.as_secs_f64() {
            quiet += 1;
        } else {
            quiet = 0;
        }
        last = now;
    }
    Ok(t0.elapsed().as_secs_f64())
}

async fn start_source(s: &Setup, vmid: u32) -> anyhow::Result<f64> {
    let id = vmid.to_string();
    let mem = s.ram_mib.to_string();
    let ns = s.place.client.as_deref();
    mt(&s.src_config, &["vm", "create", &id, "--memory", &mem]).await?;
    mt_in(
        ns,
        &s.src_config,
        &[
            "vm",
            "start",
            &id,
            "--qemu-arg=-device",
            &format!("--qemu-arg={}", s.loader),
        ],
    )
    .await?;
    settle(&s.src_run, vmid, s.accel).await
}

async fn tunnel_run(s: &Setup, vmid: u32, target_vmid: u32) -> anyhow::Result<MigrationRun> {
    let settle_s = start_source(s, vmid).await?;
    // `mtunnel migrate` sets its own parameters but leaves this one as it finds it.
    set_switchover_bandwidth(
        &VmHandle::attach(&s.src_run, vmid).context("attaching to the source VM")?,
    )
    .await?;
    let target = s.target.target_endpoint();
    let t0 = Instant::now();
    let (id, tid, streams) = (
        vmid.to_string(),
        target_vmid.to_string(),
        s.streams.to_string(),
    );
    let mut args = vec![
        "migrate",
        &id,
        "--target",
        &target,
        "--target-storage",
        "local",
        "--online",
        "--target-vmid",
        &tid,
        "--streams",
        &streams,
        // The direct paths run QEMU's defaults and the loader guest dirties nothing:
        // the busy-guest tuning would only make the paths unequal.
        "--no-auto-converge",
        "--no-xbzrle",
        "--no-downtime-escalation",
    ];
    let queue = s.ram_queue_mib.map(|m| m.to_string());
    if let Some(q) = &queue {
        args.extend(["--ram-queue-mib", q]);
    }
    let (out, steps) = mt_in(s.place.client.as_deref(), &s.src_config, &args).await?;
    let wall_s = t0.elapsed().as_secs_f64();
    let ram_ms = number_after(&out, "RAM phase ")
        .with_context(|| format!("no 'RAM phase' in the migrate output: {out}"))?;
    let downtime_ms = number_after(&out, "downtime ").unwrap_or(f64::NAN);
    // The target VM runs under the serve node; the source QEMU has quit.
    let _ = mt(&s.target.config, &["vm", "stop", &target_vmid.to_string()]).await;
    let _ = mt(&s.src_config, &["vm", "stop", &vmid.to_string()]).await;
    Ok(MigrationRun {
        mode: "tunnel".into(),
        ram_ms,
        downtime_ms,
        wall_s,
        settle_s,
        ram_transferred: None,
        query_migrate: None,
        output: Some(format!("{steps}{out}")),
        total_s: wall_s,
    })
}

/// The direct migration, or with `relay` through two copy-relay processes (UNIX → TCP →
/// UNIX, the baseline of the throughput section) between the two QEMUs.
async fn direct_run(s: &Setup, vmid: u32, relay: bool) -> anyhow::Result<MigrationRun> {
    let settle_s = start_source(s, vmid).await?;
    let src = VmHandle::attach(&s.src_run, vmid).context("attaching to the source VM")?;
    let text = std::fs::read_to_string(
        s.src_config
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("d/qemu-server/{vmid}.conf")),
    )
    .context("reading the source VM config")?;
    let conf = VmConfig::parse(&text)?;
    let mut spec = VmSpec::new(vmid, &s.direct_run);
    spec.options = conf.options.clone();
    spec.accel = s.accel;
    spec.force_machine = Some(src.running_machine().await?);
    let socket = s.direct_run.join(format!("{vmid}.migrate"));
    let t_start = Instant::now();
    let (target, mut uri) = match &s.place.server {
        None => {
            spec.incoming = Some(format!("unix:{}", socket.display()));
            let target = VmHandle::start(&spec, &StartOptions::default()).await?;
            (target, format!("unix:{}", socket.display()))
        }
        Some((ns, ip)) => {
            // The far side of the link: QEMU listens on TCP there. It is started from a
            // thread inside the namespace, then attached to from here.
            let addr = format!("tcp:{ip}:{}", 20000 + vmid);
            spec.incoming = Some(addr.clone());
            ns.block_on(|| async {
                let vm = VmHandle::start(&spec, &StartOptions::default()).await?;
                Ok(vm.pid())
            })?;
            let target = VmHandle::attach(&s.direct_run, vmid)
                .context("attaching to the target VM across the link")?;
            (target, addr)
        }
    };
    let mut relays = Vec::new();
    if relay {
        let dir = s.direct_run.join(format!("relay{vmid}"));
        std::fs::create_dir_all(&dir)?;
        let (b, b_addr) = super::throughput::relay(
            &dir,
            "relay2",
            "tcp:127.0.0.1:0",
            &format!("unix:{}", socket.display()),
        )
        .await?;
        let entry = dir.join("in.sock");
        let (a, _) = super::throughput::relay(
            &dir,
            "relay1",
            &format!("unix:{}", entry.display()),
            &b_addr,
        )
        .await?;
        relays = vec![a, b];
        uri = format!("unix:{}", entry.display());
    }
    let result = async {
        target
            .set_migration_capabilities(&[("events", true)])
            .await?;
        // As `mtunnel migrate` does, and the same switchover rule as the tunnel run.
        src.migrate_set_parameters(&MigrationParams {
            max_bandwidth: Some(16 << 30),
            downtime_limit: Some(100),
            ..MigrationParams::default()
        })
        .await?;
        set_switchover_bandwidth(&src).await?;
        let t0 = Instant::now();
        src.migrate(&uri).await?;
        let done = src
            .wait_migration(
                MigrationWait {
                    poll: Duration::from_millis(20),
                    stall: Duration::from_secs(60),
                    timeout: Duration::from_secs(600),
                },
                |_| {},
            )
            .await?;
        let wall_s = t0.elapsed().as_secs_f64();
        let total_s = t_start.elapsed().as_secs_f64();
        let q = src
            .execute("query-migrate", Value::Null, Duration::from_secs(10))
            .await?;
        Ok::<_, anyhow::Error>(MigrationRun {
            mode: if relay { "relay" } else { "direct" }.into(),
            ram_ms: done.total_time_ms as f64,
            downtime_ms: q["downtime"].as_f64().unwrap_or(f64::NAN),
            wall_s,
            settle_s,
            ram_transferred: Some(done.transferred),
            query_migrate: Some(q),
            output: None,
            total_s,
        })
    }
    .await;
    let quick = StopTimeouts {
        quit: Duration::from_secs(5),
        term: Duration::from_secs(3),
        kill: Duration::from_secs(3),
    };
    let _ = target.stop(quick).await;
    let _ = src.stop(quick).await;
    drop(relays);
    result
}

/// Runs the section on loopback (KVM when `/dev/kvm` is usable, else TCG; with the relay
/// baseline).
pub async fn run(
    base: &Path,
    ram_mib: u64,
    data_mib: u64,
    repeat: u32,
    log: &dyn Fn(&str),
) -> anyhow::Result<Migration> {
    let plan = Plan {
        ram_mib,
        data_mib,
        repeat,
        place: Placement::default(),
        relay: true,
        accel: Accel::Auto.resolve(),
        streams: 1,
        ram_queue_mib: None,
    };
    run_plan(base, &plan, log).await
}

/// Runs the section as planned, or returns why it cannot run.
pub async fn run_plan(base: &Path, plan: &Plan, log: &dyn Fn(&str)) -> anyhow::Result<Migration> {
    let Plan {
        ram_mib,
        data_mib,
        repeat,
        ..
    } = *plan;
    let qemu = qemu_version().map_err(anyhow::Error::msg)?;
    if data_mib + 16 > ram_mib {
        bail!("--ram-data-mib {data_mib} does not fit into --ram-mib {ram_mib} above 16 MiB");
    }
    let dir = base.join("mig");
    std::fs::create_dir_all(&dir)?;
    let blob_path = dir.join("ram.blob");
    blob(&blob_path, (data_mib as usize) << 20)?;
    let tcg = super::accel_toml(plan.accel);
    let src_dir = dir.join("src");
    let src_config = write_node_config(
        &src_dir,
        &NodeSpec {
            tls: true,
            script: None,
            extra_toml: tcg.clone() + &plan.place.shared_toml,
            ..NodeSpec::default()
        },
    )?;
    let target =
        ServeNode::start(&dir.join("dst"), &plan.place.server_spec(true, None, tcg)).await?;
    let direct_run_dir = dir.join("direct");
    std::fs::create_dir_all(&direct_run_dir)?;
    let mut sweeper = QemuSweeper::default();
    sweeper.watch(&src_dir.join("r"));
    sweeper.watch(&target.run);
    sweeper.watch(&direct_run_dir);
    let s = Setup {
        src_config,
        src_run: src_dir.join("r"),
        direct_run: direct_run_dir,
        loader: format!(
            "loader,file={},addr=16777216,force-raw=on",
            blob_path.display()
        ),
        target,
        ram_mib,
        place: plan.place.clone(),
        accel: plan.accel,
        streams: plan.streams,
        ram_queue_mib: plan.ram_queue_mib,
    };
    let mut runs = Vec::new();
    for k in 0..repeat {
        let modes = if plan.relay {
            &[(false, 150 + k), (true, 170 + k)][..]
        } else {
            &[(false, 150 + k)][..]
        };
        for &(relay, vmid) in modes {
            let d = direct_run(&s, vmid, relay).await?;
            log(&format!(
                "  round {}/{repeat} {:<7} RAM {:.0} ms, downtime {:.0} ms",
                k + 1,
                d.mode,
                d.ram_ms,
                d.downtime_ms
            ));
            runs.push(d);
        }
        let t = tunnel_run(&s, 100 + k, 200 + k).await?;
        log(&format!(
            "  round {}/{repeat} tunnel  RAM {:.0} ms, downtime {:.0} ms, mtunnel migrate {:.1} s",
            k + 1,
            t.ram_ms,
            t.downtime_ms,
            t.wall_s
        ));
        runs.push(t);
    }
    sweeper.sweep();
    let of = |mode: &str, f: fn(&MigrationRun) -> f64| {
        median(runs.iter().filter(|r| r.mode == mode).map(f))
    };
    let direct_ram_ms = of("direct", |r| r.ram_ms);
    let relay_ram_ms = of("relay", |r| r.ram_ms);
    let tunnel_ram_ms = of("tunnel", |r| r.ram_ms);
    Ok(Migration {
        ram_mib,
        data_mib,
        repeat,
        qemu,
        direct_downtime_ms: of("direct", |r| r.downtime_ms),
        relay_downtime_ms: of("relay", |r| r.downtime_ms),
        relay_ram_ms,
        tunnel_downtime_ms: of("tunnel", |r| r.downtime_ms),
        tunnel_wall_s: of("tunnel", |r| r.wall_s),
        ratio: tunnel_ram_ms / direct_ram_ms.max(1e-9),
        direct_total_s: of("direct", |r| r.total_s),
        tunnel_total_s: of("tunnel", |r| r.total_s),
        accel: super::accel_name(plan.accel).to_string(),
        direct_ram_ms,
        tunnel_ram_ms,
        runs,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_in_the_migrate_summary() {
        let out = "migration of VM 100 to 127.0.0.1:1 (node 'b', VM 200) finished in 3.1 s: 0 B of disks, 449 MiB of RAM, downtime 35 ms, RAM phase 2512 ms";
        assert_eq!(super::number_after(out, "downtime "), Some(35.0));
        assert_eq!(super::number_after(out, "RAM phase "), Some(2512.0));
        assert_eq!(super::number_after(out, "nothing "), None);
    }
}
