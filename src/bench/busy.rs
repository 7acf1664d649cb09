//! `mtunnel bench --busy-guest LINK`: does a busy guest's live migration converge across
//! an emulated WAN link ([`super::wan`])? A real guest ([`super::guest`]: a Debian kernel
//! and a busybox init under TCG) rewrites a working set at a set rate
//! ([`BusyShape`]) while it is moved from side A to side B, three ways side by side:
//! - `defaults`: QMP `migrate` straight to a target QEMU's `-incoming tcp:` across the link,
//!   QEMU's own defaults (no capability or parameter set: downtime limit 300 ms);
//! - `tuned`: the same with Proxmox's tuning as `mtunnel migrate` applies it, taken from
//!   the library (`client::migrate::tuning`): auto-converge, an XBZRLE cache of a tenth of
//!   the RAM, downtime limit 100 ms doubled while the remaining RAM grows;
//! - `mtunnel`: `mtunnel migrate --online` with its defaults to a TLS `serve` in side B.
//!
//! Each run boots a fresh guest, waits for its memory writer's first rate report, and is
//! capped ([`Options::busy_cap_s`](super::Options::busy_cap_s)): a direct run still going
//! then is cancelled, `mtunnel migrate` gets the cap as `--max-ram-time`; either counts as
//! not converged. The figures are QEMU's own (`total-time`, `downtime` of
//! `query-migrate`), the wall time from the target's start to `completed` (direct) or of
//! the whole command (mtunnel), and the guest's real pause ([`BusyRun::pause_ms`]): QEMU's
//! `downtime` ends when the source wrote its last byte, and leaves out whatever still
//! stood queued between the two QEMUs (on the 20 ms, 200 Mbit/s link a direct
//! QEMU-to-QEMU socket keeps ~11 MB queued, the tunnel ~2 MB: docs/performance.md).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::guest::{Console, GuestImage, dirty_rates, heartbeats};
use super::migration::{mt, mt_in, mt_output, number_after, qemu_version};
use super::nodes::{Placement, ServeNode};
use super::procs::QemuSweeper;
use super::report::{Target, num, target};
use super::wan::{ADDR_B, LinkSpec, Wan};
use super::{Options, median, slowest};
use mtunnel::client::migrate::tuning::{DowntimeEscalation, INITIAL_DOWNTIME_MS, RamTuning};
use mtunnel::guest::config::VmConfig;
use mtunnel::qemu::{
    Accel, MigrationParams, MigrationProgress, MigrationWait, QemuError, StartOptions,
    StopTimeouts, VmHandle, VmSpec,
};

/// The guest: `RAM,WORKSET,RATE` = MiB of RAM, MiB it keeps rewriting, MB/s it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BusyShape {
    pub ram_mib: u64,
    pub workset_mib: u64,
    pub dirty_mb_s: u64,
}

impl BusyShape {
    /// The case of issue 21: 1 GiB of RAM, 256 MiB rewritten at 40 MB/s.
    pub const FULL: BusyShape = BusyShape {
        ram_mib: 1024,
        workset_mib: 256,
        dirty_mb_s: 40,
    };
    /// `--quick`: 128 MiB of RAM, 8 MiB rewritten at 32 MB/s.
    pub const QUICK: BusyShape = BusyShape {
        ram_mib: 128,
        workset_mib: 8,
        dirty_mb_s: 32,
    };
}

impl FromStr for BusyShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let n: Vec<u64> = s
            .split(',')
            .map(|p| p.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!("'{s}': expected RAM,WORKSET,RATE in MiB, MiB, MB/s (e.g. 1024,256,40)")
            })?;
        let [ram_mib, workset_mib, dirty_mb_s] = n[..] else {
            return Err(format!(
                "'{s}': expected three numbers RAM,WORKSET,RATE (e.g. 1024,256,40)"
            ));
        };
        if ram_mib < 64 || workset_mib == 0 || dirty_mb_s == 0 || workset_mib + 48 > ram_mib {
            return Err(format!(
                "'{s}': RAM at least 64 MiB, a working set and rate above 0, the working set at \
                 least 48 MiB below the RAM (the guest's kernel and init need it)"
            ));
        }
        Ok(BusyShape {
            ram_mib,
            workset_mib,
            dirty_mb_s,
        })
    }
}

impl std::fmt::Display for BusyShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{},{},{}",
            self.ram_mib, self.workset_mib, self.dirty_mb_s
        )
    }
}

/// The rows, in table order: (mode, label).
pub const ROWS: &[(&str, &str)] = &[
    ("defaults", "direct: QMP migrate, QEMU defaults"),
    (
        "tuned",
        "direct: + PVE's tuning (auto-converge, XBZRLE, downtime)",
    ),
    ("mtunnel", "mtunnel migrate --online, its defaults (TLS)"),
];

/// One migration of a busy guest.
#[derive(Debug, Clone, Serialize)]
pub struct BusyRun {
    /// `defaults`, `tuned` or `mtunnel`.
    pub mode: String,
    pub converged: bool,
    /// Direct: from starting the target QEMU to `completed`; mtunnel: the whole command.
    pub total_s: f64,
    /// QEMU's `total-time` of the RAM migration.
    pub ram_s: f64,
    /// QEMU's `downtime`.
    pub downtime_ms: f64,
    /// The guest's real pause, from the source's `STOP` until the target runs it. Direct:
    /// the source's `STOP` to the target's `RESUME` event (the target is armed with `cont`
    /// before the migration, so it runs the guest once it loaded the whole stream); mtunnel:
    /// QEMU's `downtime` plus the time from the command's "RAM: ... transferred" to its
    /// "VM ... resumed on the target" line (its log's 0.1 s steps).
    pub pause_ms: f64,
    /// The memory writer's last report before the migration started (MB/s).
    pub guest_dirty_mb_s: f64,
    /// The highest `cpu-throttle-percentage` seen (mtunnel: as it reports it).
    pub max_throttle_pct: f64,
    /// Not converged: what was left and how fast the guest dirtied it at the cap.
    pub last: Option<String>,
    /// mtunnel: what the command printed.
    pub output: Option<String>,
    /// mtunnel, converged: whether the guest's heartbeat went on on the target.
    pub heartbeat_on_target: Option<bool>,
}

/// The section's result.
#[derive(Debug, Clone, Serialize)]
pub struct BusyGuest {
    pub link: String,
    pub spec: LinkSpec,
    pub shape: BusyShape,
    pub cap_s: u64,
    pub repeat: u32,
    pub qemu: String,
    pub accel: String,
    /// Seconds from `vm start` to the memory writer's first report (median).
    pub boot_s: f64,
    pub runs: Vec<BusyRun>,
    pub targets: Vec<Target>,
}

impl BusyGuest {
    fn of(&self, mode: &str) -> impl Iterator<Item = &BusyRun> + Clone {
        let mode = mode.to_string();
        self.runs.iter().filter(move |r| r.mode == mode)
    }

    /// Converged runs of `mode` and all runs of it.
    pub fn converged(&self, mode: &str) -> (usize, usize) {
        let all = self.of(mode);
        (all.clone().filter(|r| r.converged).count(), all.count())
    }

    /// Median and slowest of `f` over the converged runs of `mode` (NaN when none).
    pub fn stat(&self, mode: &str, f: fn(&BusyRun) -> f64) -> (f64, f64) {
        let v = self.of(mode).filter(|r| r.converged).map(f);
        (median(v.clone()), slowest(v))
    }
}

/// Where the guest's kernel and initramfs are cached: `guest/` in the cargo target dir the
/// running binary was built in (a `CACHEDIR.TAG` beside its profile dir; the tests share
/// it), else `$XDG_CACHE_HOME/mtunnel/guest` or `~/.cache/mtunnel/guest` (an installed
/// `mtunnel`).
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let exe = super::procs::mtunnel_exe()?;
    if let Some(target) = exe.parent().and_then(Path::parent)
        && target.join("CACHEDIR.TAG").is_file()
    {
        return Ok(target.join("guest"));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("no cache directory for the guest: set XDG_CACHE_HOME or HOME")?;
    Ok(cache.join("mtunnel").join("guest"))
}

/// Runs the section across `link`, or says why it cannot (`skipped: ...`, `ERROR: ...`).
pub async fn run(
    base: &Path,
    link: &LinkSpec,
    o: &Options,
    log: &dyn Fn(&str),
) -> Result<BusyGuest, String> {
    if o.no_qemu {
        return Err("skipped: --no-qemu".into());
    }
    super::wan::available().map_err(|why| format!("skipped: {why}"))?;
    let qemu = qemu_version().map_err(|why| format!("skipped: {why}"))?;
    let image = tokio::task::spawn_blocking(|| super::guest::build(&cache_dir()?))
        .await
        .map_err(|e| format!("ERROR: building the guest: {e}"))?
        .map_err(|e| {
            format!("skipped: cannot build the guest (a Debian kernel and busybox-static): {e:#}")
        })?;
    super::bounded(
        "the busy-guest section",
        section_secs(o),
        measure(base, link, o, qemu, image, log),
    )
    .await
    .map_err(|e| format!("ERROR: {e:#}"))
}

/// Seconds the whole section may take: per run a boot, the cap and the cleanup.
pub fn section_secs(o: &Options) -> u64 {
    120 + 3 * u64::from(o.busy_runs()) * (240 + o.busy_cap_s)
}

/// What every run of the section shares.
struct Setup {
    src_dir: PathBuf,
    src_config: PathBuf,
    direct_run: PathBuf,
    target: ServeNode,
    place: Placement,
    image: GuestImage,
    shape: BusyShape,
    cap: Duration,
}

impl Setup {
    fn src_run(&self) -> PathBuf {
        self.src_dir.join("r")
    }
}

async fn measure(
    base: &Path,
    link: &LinkSpec,
    o: &Options,
    qemu: String,
    image: GuestImage,
    log: &dyn Fn(&str),
) -> anyhow::Result<BusyGuest> {
    let wan = Wan::start(link, Duration::from_secs(section_secs(o) + 60))?;
    let place = Placement {
        client: Some(Arc::clone(&wan.a)),
        server: Some((Arc::clone(&wan.b), ADDR_B)),
        server_toml: String::new(),
        shared_toml: o
            .tcp_buffer_mib
            .map(|m| format!("tcp_buffer_mib = {m}\n"))
            .unwrap_or_default(),
    };
    // Under this machine's KVM a stock kernel does not boot (issue 21): TCG everywhere.
    let tcg = super::accel_toml(Accel::Tcg);
    let src_dir = base.join("src");
    let (src_config, target) = place.source_and_target(base, tcg).await?;
    let direct_run = base.join("direct");
    std::fs::create_dir_all(&direct_run)?;
    let mut sweeper = QemuSweeper::default();
    sweeper.watch(&src_dir.join("r"));
    sweeper.watch(&target.run);
    sweeper.watch(&direct_run);
    let s = Setup {
        src_dir,
        src_config,
        direct_run,
        target,
        place,
        image,
        shape: o.busy_shape,
        cap: Duration::from_secs(o.busy_cap_s),
    };
    let mut runs = Vec::new();
    let mut boots = Vec::new();
    let repeat = o.busy_runs();
    for k in 0..repeat {
        for (i, (mode, _)) in ROWS.iter().enumerate() {
            let vmid = 300 + 10 * k + i as u32;
            let (run, boot_s) = one_run(&s, mode, vmid).await?;
            log(&format!(
                "  round {}/{repeat} {mode:<8} {} (guest dirtied {:.1} MB/s before)",
                k + 1,
                if run.converged {
                    format!(
                        "converged: total {:.1} s, RAM {:.1} s, downtime {:.0} ms",
                        run.total_s, run.ram_s, run.downtime_ms
                    )
                } else {
                    format!(
                        "not converged within {} s: {}",
                        o.busy_cap_s,
                        run.last.as_deref().unwrap_or("?")
                    )
                },
                run.guest_dirty_mb_s
            ));
            boots.push(boot_s);
            runs.push(run);
        }
    }
    sweeper.sweep();
    let mut r = BusyGuest {
        link: link.to_string(),
        spec: link.clone(),
        shape: o.busy_shape,
        cap_s: o.busy_cap_s,
        repeat,
        qemu,
        accel: "tcg".into(),
        boot_s: median(boots.into_iter()),
        runs,
        targets: Vec::new(),
    };
    r.targets = targets(&r);
    drop(wan);
    Ok(r)
}

/// Boots a guest as `vmid`, moves it the `mode` way, stops whatever runs afterwards.
async fn one_run(s: &Setup, mode: &str, vmid: u32) -> anyhow::Result<(BusyRun, f64)> {
    let (console, boot_s) = boot(s, vmid).await?;
    let dirty = dirty_rates(&console.lines())
        .last()
        .copied()
        .unwrap_or(f64::NAN);
    let run = match mode {
        "mtunnel" => tunnel_run(s, vmid, vmid + 100).await,
        _ => direct_run(s, vmid, mode == "tuned").await,
    };
    let _ = mt(&s.src_config, &["vm", "stop", &vmid.to_string()]).await;
    let mut run = run?;
    run.guest_dirty_mb_s = dirty;
    Ok((run, boot_s))
}

/// Creates VM `vmid` on the source (diskless, a serial port) and boots the guest on it in
/// side A with its memory writer; returns its console once the writer reported a rate,
/// and the seconds that took.
async fn boot(s: &Setup, vmid: u32) -> anyhow::Result<(Console, f64)> {
    let id = vmid.to_string();
    let mem = s.shape.ram_mib.to_string();
    mt(&s.src_config, &["vm", "create", &id, "--memory", &mem]).await?;
    let conf = s.src_dir.join(format!("d/qemu-server/{vmid}.conf"));
    let text =
        std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    std::fs::write(&conf, format!("{text}serial0: socket\n"))?;
    let append = format!("mt.dirty={},{}", s.shape.dirty_mb_s, s.shape.workset_mib);
    let mut args = vec!["vm".to_string(), "start".into(), id];
    args.extend(s.image.start_args(&append));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    mt_in(s.place.client.as_deref(), &s.src_config, &args).await?;
    let console = Console::connect(&s.src_run().join(format!("{vmid}.serial0"))).await?;
    console.wait_line(180, "guest: ready").await?;
    console
        .wait(60, "report of the memory writer", |l| {
            !dirty_rates(l).is_empty()
        })
        .await?;
    Ok((console, t0.elapsed().as_secs_f64()))
}

/// `mtunnel migrate --online` with its defaults, the cap as `--max-ram-time`.
async fn tunnel_run(s: &Setup, vmid: u32, target_vmid: u32) -> anyhow::Result<BusyRun> {
    let target = s.target.target_endpoint();
    let cap = s.cap.as_secs().to_string();
    let (id, tid) = (vmid.to_string(), target_vmid.to_string());
    let args = [
        "migrate",
        &id,
        "--target",
        &target,
        "--target-storage",
        "local",
        "--online",
        "--target-vmid",
        &tid,
        "--max-ram-time",
        &cap,
    ];
    let t0 = Instant::now();
    let limit = s.cap + Duration::from_secs(180);
    let out = mt_output(s.place.client.as_deref(), &s.src_config, &args, limit).await?;
    let total_s = t0.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let throttle = number_after(&stderr, "CPU throttle at most ").unwrap_or(f64::NAN);
    let output = Some(format!("{stderr}{stdout}"));
    if !out.status.success() {
        let why = stderr
            .lines()
            .find(|l| l.contains("did not converge"))
            .with_context(|| format!("mtunnel migrate failed:\n{stderr}{stdout}"))?;
        return Ok(BusyRun {
            last: Some(why.trim().to_string()),
            output,
            ..not_converged("mtunnel")
        });
    }
    let heartbeat = heartbeat_goes_on(&s.target.run.join(format!("{tid}.serial0"))).await;
    if let Err(why) = &heartbeat {
        eprintln!("busy guest: no heartbeat on the target after the mtunnel run: {why}");
    }
    let _ = mt(&s.target.config, &["vm", "stop", &tid]).await;
    let downtime_ms = number_after(&stdout, "downtime ").unwrap_or(f64::NAN);
    Ok(BusyRun {
        mode: "mtunnel".into(),
        converged: true,
        total_s,
        ram_s: number_after(&stdout, "RAM phase ").context("no 'RAM phase' in the output")? / 1e3,
        downtime_ms,
        pause_ms: downtime_ms + handover_ms(&stderr, &tid).unwrap_or(f64::NAN),
        guest_dirty_mb_s: f64::NAN,
        max_throttle_pct: throttle,
        last: None,
        output,
        heartbeat_on_target: Some(heartbeat.is_ok()),
    })
}

/// Milliseconds from `mtunnel migrate`'s "RAM: ... transferred" line to its "VM `tvmid`
/// resumed on the target" line (both stamped with the seconds since the command started).
fn handover_ms(log: &str, tvmid: &str) -> Option<f64> {
    let stamp = |needle: &str, also: &str| {
        log.lines()
            .find(|l| l.contains(needle) && l.contains(also))
            .and_then(|l| l.trim_start().split('s').next()?.parse::<f64>().ok())
    };
    let transferred = stamp("RAM: ", " transferred (")?;
    let resumed = stamp(&format!("VM {tvmid} resumed on the target"), "")?;
    Some((resumed - transferred).max(0.0) * 1e3)
}

/// Whether the moved guest's console at `serial` shows 3 heartbeats within 60 s (a loaded
/// 2-core machine can keep a TCG guest slow for a while); if not, why.
async fn heartbeat_goes_on(serial: &Path) -> Result<(), String> {
    let console = Console::connect(serial)
        .await
        .map_err(|e| format!("the target's console: {e:#}"))?;
    console
        .wait(60, "heartbeats", |l| heartbeats(l).len() >= 3)
        .await
        .map_err(|e| format!("{e:#}"))
}

fn not_converged(mode: &str) -> BusyRun {
    BusyRun {
        mode: mode.into(),
        converged: false,
        total_s: f64::NAN,
        ram_s: f64::NAN,
        downtime_ms: f64::NAN,
        pause_ms: f64::NAN,
        guest_dirty_mb_s: f64::NAN,
        max_throttle_pct: f64::NAN,
        last: None,
        output: None,
        heartbeat_on_target: None,
    }
}

/// QMP `migrate` straight to a target QEMU listening on TCP in side B: QEMU's defaults, or
/// with `tuned` Proxmox's tuning as the library plans it.
async fn direct_run(s: &Setup, vmid: u32, tuned: bool) -> anyhow::Result<BusyRun> {
    let src = VmHandle::attach(&s.src_run(), vmid).context("attaching to the source VM")?;
    let t_start = Instant::now();
    let (target, uri) = start_direct_target(s, vmid, &src).await?;
    let result = async {
        target
            .set_migration_capabilities(&[("events", true)])
            .await?;
        let mut pause = Pause::watch(&src, &target).await?;
        let escalation = if tuned {
            Some(apply_tuning(&src, s.shape.ram_mib << 20).await?)
        } else {
            None
        };
        let escalating = escalation.is_some();
        src.migrate(&uri).await?;
        let mut max_throttle = 0;
        let mut last = MigrationProgress::default();
        let wait = MigrationWait {
            timeout: s.cap,
            ..MigrationWait::default()
        };
        let waited = tokio::select! {
            r = src.wait_migration(wait, |p| {
                max_throttle = max_throttle.max(p.throttle_pct);
                last = p.clone();
            }) => r,
            never = escalate(&src, escalation.unwrap_or_default()), if escalating => match never {},
        };
        let mut run = finish_direct(&src, waited, &last, tuned, t_start).await?;
        run.max_throttle_pct = max_throttle as f64;
        if run.converged {
            run.pause_ms = pause.ms().await;
        }
        Ok(run)
    }
    .await;
    let quick = StopTimeouts {
        quit: Duration::from_secs(5),
        term: Duration::from_secs(3),
        kill: Duration::from_secs(3),
    };
    let _ = target.stop(quick).await;
    result
}

/// The guest's real pause on the direct path: the target is armed with `cont` (an incoming
/// QEMU then runs the guest as soon as it loaded the whole stream, as `serve`'s `resume`
/// does), and two tasks note when the source's `STOP` and the target's `RESUME` arrive.
struct Pause {
    stop: tokio::task::JoinHandle<Option<Instant>>,
    resume: tokio::task::JoinHandle<Option<Instant>>,
}

impl Pause {
    async fn watch(src: &VmHandle, target: &VmHandle) -> anyhow::Result<Pause> {
        let first = |mut ev: mtunnel::qemu::qmp::QmpEvents, name: &'static str| async move {
            ev.wait_for(Duration::from_secs(24 * 3600), |e| e.name == name)
                .await
                .ok()
                .map(|_| Instant::now())
        };
        let stop = tokio::spawn(first(src.qmp().await?.events(), "STOP"));
        let resume = tokio::spawn(first(target.qmp().await?.events(), "RESUME"));
        target
            .execute("cont", serde_json::Value::Null, Duration::from_secs(10))
            .await
            .context("arming the direct target with 'cont'")?;
        Ok(Pause { stop, resume })
    }

    /// Milliseconds from `STOP` to `RESUME` (NaN when either is missing after 30 s).
    async fn ms(&mut self) -> f64 {
        let stop = (&mut self.stop).await.ok().flatten();
        let resume = tokio::time::timeout(Duration::from_secs(30), &mut self.resume)
            .await
            .ok()
            .and_then(|r| r.ok().flatten());
        match (stop, resume) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64() * 1e3,
            _ => f64::NAN,
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.stop.abort();
        self.resume.abort();
    }
}

/// The run's figures from how the wait ended; a wait that hit the cap cancels the
/// migration (the source runs on, as after any give-up).
async fn finish_direct(
    src: &VmHandle,
    waited: Result<MigrationProgress, QemuError>,
    last: &MigrationProgress,
    tuned: bool,
    t_start: Instant,
) -> anyhow::Result<BusyRun> {
    let mode = if tuned { "tuned" } else { "defaults" };
    match waited {
        Ok(done) => {
            let total_s = t_start.elapsed().as_secs_f64();
            let q = src
                .execute(
                    "query-migrate",
                    serde_json::Value::Null,
                    Duration::from_secs(10),
                )
                .await?;
            Ok(BusyRun {
                mode: mode.into(),
                converged: true,
                total_s,
                ram_s: done.total_time_ms as f64 / 1e3,
                downtime_ms: q["downtime"].as_f64().unwrap_or(f64::NAN),
                ..not_converged(mode)
            })
        }
        Err(QemuError::Timeout { what, .. }) if what == mtunnel::qemu::MIGRATION_COMPLETION => {
            let _ = src.migrate_cancel().await;
            Ok(BusyRun {
                last: Some(format!(
                    "{:.1} MiB left, the guest dirtying {:.1} MB/s, CPU throttle {} %",
                    last.remaining as f64 / (1 << 20) as f64,
                    last.dirty_rate as f64 / 1e6,
                    last.throttle_pct
                )),
                ..not_converged(mode)
            })
        }
        Err(e) => Err(e).context("the direct migration failed"),
    }
}

/// Starts the direct target QEMU in side B (from a thread inside it), listening on TCP;
/// returns it (attached from here) and the URI to migrate to.
async fn start_direct_target(
    s: &Setup,
    vmid: u32,
    src: &VmHandle,
) -> anyhow::Result<(VmHandle, String)> {
    let conf = s.src_dir.join(format!("d/qemu-server/{vmid}.conf"));
    let text =
        std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let conf = VmConfig::parse(&text)?;
    let mut spec = VmSpec::new(vmid, &s.direct_run);
    spec.options = conf.options.clone();
    spec.accel = Accel::Tcg;
    spec.force_machine = Some(src.running_machine().await?);
    let (ns, ip) = s
        .place
        .server
        .as_ref()
        .context("the busy-guest section runs across a link")?;
    let uri = format!("tcp:{ip}:{}", 20000 + vmid);
    spec.incoming = Some(uri.clone());
    ns.block_on(|| async {
        let vm = VmHandle::start(&spec, &StartOptions::default()).await?;
        Ok(vm.pid())
    })?;
    let target = VmHandle::attach(&s.direct_run, vmid)
        .context("attaching to the target VM across the link")?;
    Ok((target, uri))
}

/// Proxmox's tuning on the source, as the library plans it for `memory` bytes of RAM and
/// one stream (what `mtunnel migrate` sets too); returns the downtime escalation to run.
async fn apply_tuning(src: &VmHandle, memory: u64) -> anyhow::Result<DowntimeEscalation> {
    let plan = RamTuning::default().plan(memory, 1);
    src.set_migration_capabilities(&[
        ("xbzrle", plan.xbzrle_cache.is_some()),
        ("auto-converge", plan.auto_converge),
    ])
    .await?;
    src.migrate_set_parameters(&MigrationParams {
        max_bandwidth: Some(16 << 30),
        downtime_limit: Some(INITIAL_DOWNTIME_MS),
        xbzrle_cache_size: plan.xbzrle_cache,
        ..MigrationParams::default()
    })
    .await?;
    Ok(DowntimeEscalation::up_to(plan.max_downtime_ms))
}

/// The downtime escalation beside the wait, as `mtunnel migrate` runs it: one sample a
/// second, the raised limit set on the source. Never returns: dropped when the wait ends.
async fn escalate(src: &VmHandle, mut e: DowntimeEscalation) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(p) = src.query_migrate().await else {
            continue;
        };
        if p.status != "active" {
            continue;
        }
        if let Some(ms) = e.sample(p.remaining) {
            let params = MigrationParams {
                downtime_limit: Some(ms),
                ..MigrationParams::default()
            };
            if let Err(err) = src.migrate_set_parameters(&params).await {
                tracing::warn!("raising the downtime limit to {ms} ms: {err}");
            }
        }
    }
}

/// Issue 21's goals on this link: mtunnel converges, in no more time than PVE's tuning,
/// with a downtime of at most 300 ms.
fn targets(r: &BusyGuest) -> Vec<Target> {
    let (ok, n) = r.converged("mtunnel");
    let l = &r.link;
    let slowest_total = |mode| r.stat(mode, |x| x.total_s).1;
    vec![
        target(
            &format!("{l}: busy guest, mtunnel converged / runs"),
            (n > 0).then(|| ok as f64 / n as f64),
            ">=",
            1.0,
            "x",
        ),
        target(
            &format!("{l}: busy guest, mtunnel total / direct tuned"),
            Some(r.stat("mtunnel", |x| x.total_s).0 / r.stat("tuned", |x| x.total_s).0),
            "<=",
            1.0,
            "x",
        ),
        target(
            &format!("{l}: busy guest, mtunnel slowest downtime"),
            Some(r.stat("mtunnel", |x| x.downtime_ms).1),
            "<=",
            300.0,
            "ms",
        ),
        target(
            &format!("{l}: busy guest, mtunnel slowest real pause"),
            Some(r.stat("mtunnel", |x| x.pause_ms).1),
            "<=",
            300.0,
            "ms",
        ),
        target(
            &format!("{l}: busy guest, mtunnel slowest total"),
            Some(slowest_total("mtunnel")),
            "<=",
            r.cap_s as f64,
            "s",
        ),
    ]
}

/// The section's table.
pub fn table(r: &BusyGuest) -> String {
    let mut o = String::new();
    let s = &r.shape;
    let dirtied = median(r.runs.iter().map(|x| x.guest_dirty_mb_s));
    let _ = writeln!(
        o,
        "\nBusy guest across the link {}: QEMU {} {}, {} MiB RAM, the guest rewrites {} MiB at \
         {} MB/s (reached {} MB/s), booted in {} s; each run capped at {} s, x {}",
        r.link,
        r.qemu.split_whitespace().next().unwrap_or("?"),
        r.accel.to_uppercase(),
        s.ram_mib,
        s.workset_mib,
        s.dirty_mb_s,
        num(dirtied, 1),
        num(r.boot_s, 0),
        r.cap_s,
        r.repeat
    );
    let _ = writeln!(
        o,
        "{:<58} {:>9} {:>8} {:>8} {:>7} {:>8} {:>9} {:>8} {:>9} {:>8}",
        "",
        "converged",
        "total s",
        "slowest",
        "RAM s",
        "slowest",
        "downtime",
        "slowest",
        "pause",
        "slowest"
    );
    for (mode, label) in ROWS {
        let (ok, n) = r.converged(mode);
        let (t, ts) = r.stat(mode, |x| x.total_s);
        let (ram, rams) = r.stat(mode, |x| x.ram_s);
        let (d, ds) = r.stat(mode, |x| x.downtime_ms);
        let (p, ps) = r.stat(mode, |x| x.pause_ms);
        let _ = writeln!(
            o,
            "{label:<58} {:>9} {:>8} {:>8} {:>7} {:>8} {:>6} ms {:>5} ms {:>6} ms {:>5} ms",
            format!("{ok}/{n}"),
            num(t, 1),
            num(ts, 1),
            num(ram, 1),
            num(rams, 1),
            num(d, 0),
            num(ds, 0),
            num(p, 0),
            num(ps, 0)
        );
    }
    let beats: Vec<bool> = r
        .runs
        .iter()
        .filter_map(|x| x.heartbeat_on_target)
        .collect();
    let _ = writeln!(
        o,
        "the guest's heartbeat went on on the target after {}/{} converged mtunnel runs",
        beats.iter().filter(|b| **b).count(),
        beats.len()
    );
    let _ = writeln!(
        o,
        "(medians and slowest of the converged runs; total: direct = target QEMU start to \
         `completed`, mtunnel = the whole `mtunnel migrate` command; RAM s and downtime: \
         QEMU's `total-time` and `downtime` (until the source wrote its last byte); pause: \
         the guest's real pause, source `STOP` until the target runs it (direct: QMP events; \
         mtunnel: downtime + its log's 'transferred' to 'resumed', 0.1 s steps); a run not \
         done at the cap counts as not converged)"
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_is_read_from_the_migrate_log() {
        let log = "  141.4s RAM: 3.0 GiB of 3.0 GiB (21.6 MiB/s), remaining 0 B\n  \
                   141.4s RAM: 3.0 GiB transferred (CPU throttle at most 99 %)\n  \
                   141.6s VM 402 resumed on the target\n";
        let ms = handover_ms(log, "402").unwrap();
        assert!((ms - 200.0).abs() < 1e-6, "{ms}");
        assert_eq!(handover_ms(log, "403"), None);
    }

    #[test]
    fn shapes_parse_and_bad_ones_say_why() {
        assert_eq!("1024,256,40".parse(), Ok(BusyShape::FULL));
        assert_eq!(BusyShape::QUICK.to_string(), "128,8,32");
        assert!(
            "1024,256"
                .parse::<BusyShape>()
                .unwrap_err()
                .contains("three numbers")
        );
        assert!(
            "128,100,40"
                .parse::<BusyShape>()
                .unwrap_err()
                .contains("48 MiB below")
        );
        assert!(
            "a,b,c"
                .parse::<BusyShape>()
                .unwrap_err()
                .contains("RAM,WORKSET,RATE")
        );
    }
}
