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
//!
//! One file per side of it: `direct` (the two QMP rows), `tunnel` (the `mtunnel` row),
//! `report` (targets and table); this file holds the shape, the results and the runs' order.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::guest::{Console, GuestImage, dirty_rates, heartbeats};
use super::migration::{mt, mt_in, qemu_version};
use super::nodes::{Placement, ServeNode};
use super::procs::QemuSweeper;
use super::report::Target;
use super::wan::{ADDR_B, LinkSpec, Wan};
use super::{Options, median, slowest};
use mtunnel::qemu::Accel;

mod direct;
mod report;
mod tunnel;

use direct::direct_run;
pub use report::table;
use report::targets;
use tunnel::tunnel_run;

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
    /// QEMU's `downtime` plus the summary's `+ H ms until the target ran the guest` (from
    /// the source's `completed` to the target's `resume` reply, one round trip more than
    /// the guest waited), else the time between its log's "RAM: ... transferred" and "VM ...
    /// resumed on the target" lines (0.1 s steps).
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
    /// `mtunnel migrate --ram-queue-mib` (`None`: its default).
    ram_queue_mib: Option<u32>,
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
        ram_queue_mib: o.ram_queue_mib,
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

#[cfg(test)]
mod tests {
    use super::*;

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
