//! The RAM of a live migration: how it moves (streams, compression, postcopy), QEMU's
//! capabilities and parameters for it, `migrate` into the forward (a socket pair with a
//! chosen buffer for one stream, the forward's socket for multifd channels) and the wait
//! for it, with the progress line, PVE's downtime escalation, the postcopy switch and a
//! cutover's last delta alongside.

use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::switchover::{self, QueueBehindQemu};
use super::{DEFAULT_STREAMS, Migration, cutover, postcopy, tuning};
use crate::client::progress::{Progress, human};
use crate::qemu::{self, MigrationParams, VmHandle};

impl Migration<'_> {
    /// The RAM streams: 1 unless the target announced multifd; then `--streams` or
    /// [`DEFAULT_STREAMS`], at most what the target accepts.
    pub(super) fn streams(&self) -> u32 {
        match (self.opts.streams, self.remote.multifd_max) {
            (Some(1), _) => 1,
            (asked, None) => {
                if asked.is_some() {
                    self.progress
                        .log("the target does not announce multifd: RAM moves in one stream");
                }
                1
            }
            (asked, Some(max)) => asked.unwrap_or(DEFAULT_STREAMS).min(max),
        }
    }

    /// How the RAM moves (streams, compression, postcopy), each choice logged with its
    /// reason; the source QEMU gets the compression now, so one that cannot do it fails
    /// before the target starts anything.
    pub(super) async fn ram_mode(&self, vm: &VmHandle) -> anyhow::Result<Ram> {
        let tuning = self.opts.tuning;
        let postcopy = tuning.postcopy && self.remote.postcopy_offered;
        if tuning.postcopy && !postcopy {
            self.progress
                .log("RAM: the target does not offer postcopy: precopy only");
        }
        let streams = if postcopy { 1 } else { self.streams() };
        let (compression, why) = tuning::choose_compression(
            tuning.compress,
            streams,
            self.opts.bwlimit,
            self.remote.zstd_offered,
        );
        self.progress.log(format!("RAM: {why}"));
        let params = MigrationParams {
            multifd_compression: Some(compression.unwrap_or("none").to_string()),
            ..MigrationParams::default()
        };
        vm.migrate_set_parameters(&params).await.with_context(|| {
            format!(
                "setting multifd-compression {} on the source VM (QEMU 5.0 or later has the parameter)",
                compression.unwrap_or("none")
            )
        })?;
        if postcopy {
            self.progress.log(format!(
                "RAM: postcopy on request (--postcopy): after the first full pass, once the remaining RAM stopped shrinking for {} s, the target commits the VM ('resume') and the guest moves to it, fetching the pages it still lacks from here",
                tuning::POSTCOPY_FLAT_SAMPLES
            ));
        }
        Ok(Ram {
            streams,
            limit: None,
            compression,
            postcopy,
        })
    }

    /// The RAM's migration capabilities and parameters: the limit, multifd and the
    /// convergence tuning for this VM's RAM size, each choice logged with its reason.
    async fn configure_ram(&self, vm: &VmHandle, ram: &Ram) -> anyhow::Result<tuning::Plan> {
        let memory = vm
            .execute(
                "query-memory-size-summary",
                Value::Null,
                Duration::from_secs(10),
            )
            .await
            .context("asking the source VM for its RAM size (query-memory-size-summary)")?
            .get("base-memory")
            .and_then(Value::as_u64)
            .context("query-memory-size-summary reply without base-memory")?;
        let plan = self.opts.tuning.plan(memory, ram.streams);
        for note in &plan.notes {
            self.progress.log(format!("RAM: {note}"));
        }
        // Set either way: an earlier attempt may have left them on.
        let mut caps = vec![
            ("multifd", ram.streams > 1),
            ("xbzrle", plan.xbzrle_cache.is_some()),
            ("auto-converge", plan.auto_converge),
            ("postcopy-ram", ram.postcopy),
        ];
        // A failed live cutover leaves it on: set where QEMU knows it.
        if cutover::has_capability(vm, cutover::PAUSE_CAPABILITY).await? {
            caps.push((cutover::PAUSE_CAPABILITY, self.live_delta()));
        }
        vm.set_migration_capabilities(&caps).await?;
        vm.migrate_set_parameters(&MigrationParams {
            max_bandwidth: Some(ram.limit.map(|k| k * 1024).unwrap_or(16 << 30)),
            downtime_limit: Some(tuning::INITIAL_DOWNTIME_MS),
            multifd_channels: (ram.streams > 1).then_some(u64::from(ram.streams)),
            xbzrle_cache_size: plan.xbzrle_cache,
            // Postcopy's own limit (QEMU's 0: none); `max-bandwidth` is precopy's.
            max_postcopy_bandwidth: Some(ram.limit.map(|k| k * 1024).unwrap_or(0)),
            cpu_throttle_increment: plan.throttle_increment.map(u64::from),
            ..MigrationParams::default()
        })
        .await?;
        // An earlier attempt's pacing may have left a switchover bandwidth behind.
        switchover::unpace(vm).await;
        Ok(plan)
    }

    /// RAM: the limit, multifd and the convergence tuning, `migrate` into the forwarded
    /// socket, progress (with what is left, the dirty rate and the throttle) until
    /// completed; the downtime limit raised alongside while the remaining RAM grows, and
    /// with `--postcopy` the switch to postcopy when precopy does not converge.
    pub(super) async fn migrate_ram(
        &mut self,
        vm: &VmHandle,
        into: RamInto<'_>,
        ram: &Ram,
    ) -> anyhow::Result<()> {
        let tuning = self.opts.tuning;
        let plan = self.configure_ram(vm, ram).await?;
        // Our copy of QEMU's end stays open until the RAM phase ends, to size its queue
        // (the relay sees the end of the stream only once it is closed).
        let queue = match into {
            RamInto::Path(path) => {
                vm.migrate(&format!("unix:{}", path.display())).await?;
                None
            }
            RamInto::Socket(conn) => {
                vm.migrate_into(std::os::fd::AsFd::as_fd(&conn)).await?;
                // After a switch to postcopy the guest's faulted pages would wait behind
                // the queue: a postcopy-capable stream keeps it shallow.
                (!ram.postcopy).then(|| QueueBehindQemu::new(conn, tuning.ram_queue_mib))
            }
        };
        let bar = self.progress.bar("RAM", 0);
        // With postcopy the switcher keeps `--max-ram-time` until the switch; after it the
        // migration must run to its end.
        let wait = qemu::MigrationWait {
            timeout: if ram.postcopy {
                qemu::MigrationWait::default().timeout
            } else {
                tuning.max_ram_time
            },
            // After a switch to postcopy, ending this process would cut the stream the
            // guest's missing pages come through: only QEMU's own end counts then.
            stall: if ram.postcopy {
                qemu::MigrationWait::default().timeout
            } else {
                self.opts.stall_timeout
            },
            ..qemu::MigrationWait::default()
        };
        let mut last = qemu::MigrationProgress::default();
        let mut max_throttle = 0;
        let escalation = Cell::new(tuning::INITIAL_DOWNTIME_MS);
        let pacer = switchover::Pacer::default();
        let switch = Cell::new(postcopy::Switch::Precopy);
        let watch = postcopy::Watch {
            vm,
            remote: &self.remote,
            progress: self.progress,
            max_ram_time: tuning.max_ram_time,
            state: &switch,
        };
        let (stopped_at, delta_copied) = (Cell::new(None), Cell::new(0));
        let live_delta = self.live_delta();
        let delta = self.delta(vm, &stopped_at, &delta_copied);
        let waited = tokio::select! {
            r = vm.wait_migration(wait, |p| {
                bar.set_detail(ram_detail(p));
                bar.set(p.transferred, p.total.max(p.transferred));
                max_throttle = max_throttle.max(p.throttle_pct);
                pacer.observe(
                    p,
                    p.throttle_pct > 0 || escalation.get() > tuning::INITIAL_DOWNTIME_MS,
                );
                last = p.clone();
            }) => Ok(r),
            never = escalate_downtime(vm, self.progress, &escalation, plan.max_downtime_ms), if plan.escalate_downtime => {
                match never {}
            }
            never = async {
                match &queue {
                    Some(q) => switchover::pace_switchover(vm, self.progress, q, &pacer, &escalation).await,
                    None => std::future::pending().await,
                }
            } => {
                match never {}
            }
            ended = postcopy::watch(watch), if ram.postcopy => Err(ended),
            ended = async {
                match delta {
                    Some(d) => cutover::final_delta(d).await,
                    None => std::future::pending().await,
                }
            }, if live_delta => Err(ended),
        };
        if let Some(c) = &mut self.cutover
            && live_delta
        {
            c.stopped_at = stopped_at.get();
            c.figures.delta_copied = delta_copied.get();
        }
        self.remote.resume_sent |= switch.get() != postcopy::Switch::Precopy;
        self.remote.resumed_early = self.remote.resume_sent;
        self.remote.postcopy = switch.get() == postcopy::Switch::Postcopy;
        if queue.is_some() && !matches!(waited, Ok(Ok(_))) {
            // The VM runs on here: it keeps none of this migration's pacing.
            switchover::unpace(vm).await;
        }
        let done = match waited {
            Ok(Ok(done)) => done,
            Ok(Err(qemu::QemuError::Timeout { what, .. }))
                if what == qemu::MIGRATION_COMPLETION =>
            {
                bar.finish("not converged");
                return Err(not_converged(&tuning, &last));
            }
            Err(postcopy::Ended::NotConverged) => {
                bar.finish("not converged");
                return Err(not_converged(&tuning, &last));
            }
            Ok(Err(qemu::QemuError::MigrationStalled {
                vmid,
                secs,
                status,
                transferred,
            })) => {
                bar.finish("stalled");
                bail!(
                    "VM {vmid}: the RAM migration made no progress for {secs:.0} s \
                     (--stall-timeout; status {status}, {} sent): the link is probably frozen",
                    human(transferred)
                );
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(postcopy::Ended::Failed(e)) => return Err(e),
        };
        let how = if self.remote.postcopy {
            ", postcopy"
        } else {
            ""
        };
        bar.finish(&format!(
            "{} transferred (CPU throttle at most {max_throttle} %, downtime limit {} ms{how})",
            human(done.transferred),
            escalation.get()
        ));
        self.summary.ram_bytes = done.transferred;
        self.summary.ram_ms = Some(done.total_time_ms).filter(|&ms| ms > 0);
        self.summary.downtime_ms = vm
            .execute("query-migrate", Value::Null, Duration::from_secs(10))
            .await
            .ok()
            .and_then(|v| v.get("downtime").and_then(Value::as_u64));
        Ok(())
    }
}

/// Where the source QEMU writes the RAM stream.
pub(super) enum RamInto<'a> {
    /// It connects to the forward's socket (each multifd channel connects there).
    Path(&'a Path),
    /// Its end of a socket pair whose buffer we size ([`QueueBehindQemu`]).
    Socket(std::os::unix::net::UnixStream),
}

/// The RAM progress line's detail: what is left, how fast the guest dirties, the throttle.
fn ram_detail(p: &qemu::MigrationProgress) -> String {
    format!(
        "remaining {}, guest dirties {}/s, CPU throttle {} %",
        human(p.remaining),
        human(p.dirty_rate),
        p.throttle_pct
    )
}

/// The error of a RAM phase that hit `--max-ram-time`; `last` is its last sample.
fn not_converged(tuning: &tuning::RamTuning, last: &qemu::MigrationProgress) -> anyhow::Error {
    let off: Vec<&str> = [
        (!tuning.auto_converge).then_some("--no-auto-converge"),
        (!tuning.xbzrle).then_some("--no-xbzrle"),
        (!tuning.escalate_downtime).then_some("--no-downtime-escalation"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let hint = if off.is_empty() {
        "a higher --bwlimit, a quieter guest or a larger --max-ram-time may let it converge"
            .to_string()
    } else {
        format!(
            "the tuning that lets a busy guest converge is off: leave out {}",
            off.join(" ")
        )
    };
    anyhow::anyhow!(
        "the RAM did not converge within {} s (--max-ram-time): {} still to send while the guest dirties {}/s (CPU throttle {} %); migration cancelled, the VM keeps running on the source; {hint}",
        tuning.max_ram_time.as_secs(),
        human(last.remaining),
        human(last.dirty_rate),
        last.throttle_pct
    )
}

/// PVE's downtime escalation next to the RAM progress: every second one `query-migrate`;
/// the limit is doubled when the remaining RAM grew in 6 samples, at most to `max_ms`.
/// Never returns: the
/// caller drops it when the migration ends. `limit` holds the current limit.
async fn escalate_downtime(
    vm: &VmHandle,
    progress: &Progress,
    limit: &Cell<u64>,
    max_ms: Option<u64>,
) -> std::convert::Infallible {
    let mut escalation = tuning::DowntimeEscalation::up_to(max_ms);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(p) = vm.query_migrate().await else {
            continue;
        };
        if p.status != "active" {
            continue;
        }
        let Some(ms) = escalation.sample(p.remaining) else {
            continue;
        };
        let params = MigrationParams {
            downtime_limit: Some(ms),
            ..MigrationParams::default()
        };
        match vm.migrate_set_parameters(&params).await {
            Ok(()) => {
                limit.set(ms);
                progress.log(format!(
                    "RAM: the remaining RAM keeps growing ({} left): downtime limit raised to {ms} ms",
                    human(p.remaining)
                ));
            }
            Err(e) => tracing::warn!("raising the downtime limit to {ms} ms: {e}"),
        }
    }
}

/// How the RAM moves: streams (multifd channels, 1 = none), the limit in KiB/s, the
/// channels' compression and whether it may switch to postcopy.
pub(super) struct Ram {
    pub(super) streams: u32,
    pub(super) limit: Option<u64>,
    pub(super) compression: Option<&'static str>,
    pub(super) postcopy: bool,
}
