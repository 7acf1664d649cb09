//! `mtunnel doctor ENDPOINT`: runs the measurements of `mtunnel::client::doctor` and turns
//! them into lines an operator can act on: the RTT, the throughput through the tunnel, the
//! CPU it cost, the local TCP buffer limits against the bandwidth-delay product, the target
//! storage's bwlimit, and which of them limits a migration there. Exits 0 whenever it
//! could measure; the verdict is text, not an exit code.

use mtunnel::client::doctor::{DoctorOptions, Report, doctor};
use mtunnel::net::sockbuf::{Dir, plan};

use super::{DoctorArgs, load_config};

/// Share of a send buffer one flow keeps in flight (the rest is the kernel's overhead and
/// the unsent bytes): ~3.2 MB of a 4 MiB `tcp_wmem` on the 100 ms link of issue 21.
const IN_FLIGHT_SHARE: f64 = 0.75;

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    // Without a node config (a host that only sends) the defaults apply.
    let (tcp_buffer, run_dir) = match load_config(&args.node, None) {
        Ok(cfg) => (cfg.tcp_buffer, cfg.run_dir),
        Err(e) => {
            tracing::debug!("no node config, using defaults: {e:#}");
            (
                mtunnel::net::sockbuf::DEFAULT_TCP_BUFFER,
                std::env::temp_dir(),
            )
        }
    };
    mtunnel::net::sockbuf::set_tcp_buffer(tcp_buffer);
    let opts = DoctorOptions {
        target: args.endpoint,
        storage: args.storage,
        size: args.size,
        run_dir,
    };
    let report = doctor(&opts).await?;
    print!("{}", text(&report, &opts));
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &[f64]) -> f64 {
    crate::bench::median(v.iter().copied())
}

/// The send buffer the tunnel's sockets get here, and how.
fn send_buffer(r: &Report) -> (u64, String) {
    let l = &r.limits;
    match plan(r.tcp_buffer, Dir::Send, l, r.root) {
        Some((v, true)) => (2 * v, "forced past net.core.wmem_max as root".into()),
        Some((v, false)) => (2 * v, "up to net.core.wmem_max (not root)".into()),
        None if r.tcp_buffer == 0 => (l.tcp_wmem_max, "tcp_buffer_mib = 0: autotuned".into()),
        None if r.tcp_buffer <= l.tcp_wmem_max => (
            l.tcp_wmem_max,
            "autotuned: tcp_wmem allows more than tcp_buffer_mib".into(),
        ),
        None => (
            l.tcp_wmem_max,
            "autotuned: not root and net.core.wmem_max is smaller".into(),
        ),
    }
}

/// The whole report.
pub fn text(r: &Report, o: &DoctorOptions) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let rtt_ms = min(&r.connect_ms);
    let rate = r.size as f64 / r.transfer_s / 1e6;
    let cores = r.cpu_s / r.transfer_s;
    let (buf, how) = send_buffer(r);
    let in_flight = buf as f64 * IN_FLIGHT_SHARE;
    let cap = in_flight / (rtt_ms.max(0.001) / 1e3) / 1e6;
    let bdp_1g = 125e6 * rtt_ms / 1e3;
    let l = &r.limits;
    let _ = writeln!(
        t,
        "target: {}:{}, node '{}'",
        o.target.host, o.target.port, r.node
    );
    let _ = writeln!(
        t,
        "RTT: {rtt_ms:.2} ms (TCP connect, best of {}; median {:.2} ms), API GET {:.2} ms (median of {})",
        r.connect_ms.len(),
        median(&r.connect_ms),
        median(&r.get_ms),
        r.get_ms.len()
    );
    let _ = writeln!(
        t,
        "throughput: {} in {:.2} s = {rate:.1} MB/s through the tunnel (disk-import to storage '{}', removed again)",
        mib(r.size),
        r.transfer_s,
        o.storage
    );
    let _ = writeln!(
        t,
        "CPU: {:.2} s of this process during the transfer ({cores:.2} of a core)",
        r.cpu_s
    );
    let _ = writeln!(
        t,
        "local TCP buffers: tcp_wmem max {}, tcp_rmem max {}, net.core.wmem_max {}, net.core.rmem_max {}",
        mib(l.tcp_wmem_max),
        mib(l.tcp_rmem_max),
        mib(l.wmem_max),
        mib(l.rmem_max)
    );
    let _ = writeln!(t, "tunnel send buffer: {} ({how})", mib(buf));
    let _ = writeln!(
        t,
        "one flow at this RTT: at most ~{cap:.1} MB/s ({:.1} MB in flight); 1 Gbit/s needs {:.1} MB in flight (BDP)",
        in_flight / 1e6,
        bdp_1g / 1e6
    );
    let _ = writeln!(
        t,
        "bwlimit: {}",
        r.bwlimit_kib
            .map_or(format!("none on storage '{}'", o.storage), |k| format!(
                "{:.1} MB/s on storage '{}' (target)",
                k as f64 * 1024.0 / 1e6,
                o.storage
            ))
    );
    verdict(&mut t, r, rate, cap, cores);
    t
}

/// The `limit:` line and what to do about it.
fn verdict(t: &mut String, r: &Report, rate: f64, cap: f64, cores: f64) {
    use std::fmt::Write as _;
    let bw = r.bwlimit_kib.map(|k| k as f64 * 1024.0 / 1e6);
    if let Some(bw) = bw.filter(|&b| rate >= 0.8 * b) {
        let _ = writeln!(t, "limit: the target storage's bwlimit ({bw:.1} MB/s)");
        let _ = writeln!(
            t,
            "advice: raise or remove the migration bwlimit of that storage on the target"
        );
    } else if rate >= 0.7 * cap {
        let _ = writeln!(
            t,
            "limit: TCP buffers: {rate:.1} MB/s is near the ~{cap:.1} MB/s one flow can reach with this send buffer at this RTT"
        );
        let _ = writeln!(
            t,
            "advice: as root mtunnel forces tcp_buffer_mib (default 64) past the host's limits; raise tcp_buffer_mib in mtunnel.toml on both ends, or install the package's /usr/lib/sysctl.d/60-mtunnel.conf (net.ipv4.tcp_wmem/tcp_rmem max 32 MiB)"
        );
    } else if cores >= 0.8 {
        let _ = writeln!(
            t,
            "limit: CPU: the tunnel kept {cores:.2} of a core busy here (TLS and copying)"
        );
        let _ = writeln!(
            t,
            "advice: a faster CPU or a less loaded host; `--streams N` spreads a live migration's RAM over N connections"
        );
    } else {
        let _ = writeln!(
            t,
            "limit: not on this host: buffers allow ~{cap:.1} MB/s and the CPU was not saturated; the line, other traffic or the target (its receive buffers, CPU or disk) set the pace"
        );
        let _ = writeln!(
            t,
            "advice: run `mtunnel doctor` from the target's side too, and compare with the line rate"
        );
    }
}
