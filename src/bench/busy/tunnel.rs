//! The `mtunnel` row of the busy-guest section: `mtunnel migrate --online` with its
//! defaults to the TLS `serve` in side B, its figures read from the command's output.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::super::migration::{mt, mt_output, number_after};
use super::{BusyRun, Setup, heartbeat_goes_on, not_converged};

/// `mtunnel migrate --online` with its defaults, the cap as `--max-ram-time`.
pub(super) async fn tunnel_run(s: &Setup, vmid: u32, target_vmid: u32) -> anyhow::Result<BusyRun> {
    let target = s.target.target_endpoint();
    let cap = s.cap.as_secs().to_string();
    let (id, tid) = (vmid.to_string(), target_vmid.to_string());
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
        "--max-ram-time",
        &cap,
    ];
    let queue = s.ram_queue_mib.map(|m| m.to_string());
    if let Some(q) = &queue {
        args.extend(["--ram-queue-mib", q]);
    }
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
        pause_ms: downtime_ms
            + number_after(&stdout, " ms + ")
                .or_else(|| handover_ms(&stderr, &tid))
                .unwrap_or(f64::NAN),
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
}
