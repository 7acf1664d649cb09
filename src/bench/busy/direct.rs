//! The `defaults` and `tuned` rows of the busy-guest section: QMP `migrate` from the source
//! QEMU straight to a target QEMU listening on TCP in side B, and the guest's real pause
//! from the two QEMUs' `STOP` and `RESUME` events.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::{BusyRun, Setup, not_converged};
use mtunnel::client::migrate::tuning::{DowntimeEscalation, INITIAL_DOWNTIME_MS, RamTuning};
use mtunnel::guest::config::VmConfig;
use mtunnel::qemu::{
    Accel, MigrationParams, MigrationProgress, MigrationWait, QemuError, StartOptions,
    StopTimeouts, VmHandle, VmSpec,
};

/// QMP `migrate` straight to a target QEMU listening on TCP in side B: QEMU's defaults, or
/// with `tuned` Proxmox's tuning as the library plans it.
pub(super) async fn direct_run(s: &Setup, vmid: u32, tuned: bool) -> anyhow::Result<BusyRun> {
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
