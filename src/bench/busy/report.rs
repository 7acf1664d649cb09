//! The busy-guest section's human side: its targets and its table.

use std::fmt::Write as _;

use super::super::median;
use super::super::report::{Target, num, target};
use super::{BusyGuest, ROWS};

/// Issue 21's goals on this link: mtunnel converges, in no more time than PVE's tuning,
/// with a downtime of at most 300 ms.
pub(super) fn targets(r: &BusyGuest) -> Vec<Target> {
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
         mtunnel: downtime + the summary's '+ H ms until the target ran the guest'); a run not \
         done at the cap counts as not converged)"
    );
    o
}
