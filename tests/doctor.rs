//! `mtunnel doctor ENDPOINT` against a real `mtunnel serve` on 127.0.0.1 (HTTPS, the real
//! backend): the report has its lines in order with the values of this run (RTT, the
//! throughput of a real disk-import through a real tunnel, this host's TCP buffer limits
//! read from /proc), names one limit, exits 0, and leaves no volume on the target.

mod common;

use std::time::Duration;

use common::{BIN, TestServer, target_arg};

/// The number right after `prefix` in `line` ("RTT: 0.05 ms" → 0.05).
fn number_after(line: &str, prefix: &str) -> f64 {
    let rest = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line:?}"))
}

fn proc_max(key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/sys/net/{key}")).unwrap();
    let max: u64 = text.split_whitespace().last().unwrap().parse().unwrap();
    format!("{:.1} MiB", max as f64 / (1u64 << 20) as f64)
}

#[tokio::test]
async fn doctor_reports_rtt_throughput_buffers_and_the_limit() {
    let dst = TestServer::start();
    let dir = tempfile::Builder::new()
        .prefix("mtd")
        .tempdir_in("/tmp")
        .unwrap();
    let config = dir.path().join("src.toml");
    std::fs::write(
        &config,
        format!(
            "node = \"src\"\ndata_dir = \"{d}/d\"\nrun_dir = \"{d}/r\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let target = target_arg(&dst, dst.port);
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["doctor", &target, "--size", "32M", "--config"])
        .arg(&config)
        .env("MTUNNEL_LOG", "warn")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("doctor finished within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dst.log()
    );
    eprintln!("{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    assert_eq!(
        lines[0],
        format!("target: 127.0.0.1:{}, node 'testnode'", dst.port)
    );
    let rtt = number_after(lines[1], "RTT: ");
    assert!(rtt > 0.0 && rtt < 1000.0, "{}", lines[1]);
    assert!(
        lines[1].contains(" ms (TCP connect, best of 5; median "),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains(" ms (median of 3)"), "{}", lines[1]);
    let secs = number_after(lines[2], "throughput: 32.0 MiB in ");
    assert!(secs > 0.0, "{}", lines[2]);
    assert!(
        lines[2]
            .ends_with(" MB/s through the tunnel (disk-import to storage 'local', removed again)"),
        "{}",
        lines[2]
    );
    number_after(lines[3], "CPU: ");
    assert!(lines[3].contains(" of a core)"), "{}", lines[3]);
    assert_eq!(
        lines[4],
        format!(
            "local TCP buffers: tcp_wmem max {}, tcp_rmem max {}, net.core.wmem_max {}, \
             net.core.rmem_max {}",
            proc_max("ipv4/tcp_wmem"),
            proc_max("ipv4/tcp_rmem"),
            proc_max("core/wmem_max"),
            proc_max("core/rmem_max")
        )
    );
    assert!(lines[5].starts_with("tunnel send buffer: "), "{}", lines[5]);
    number_after(lines[6], "one flow at this RTT: at most ~");
    assert!(lines[6].contains(" MB in flight (BDP)"), "{}", lines[6]);
    assert_eq!(lines[7], "bwlimit: none on storage 'local'");
    assert!(
        [
            "limit: TCP buffers",
            "limit: CPU",
            "limit: not on this host"
        ]
        .iter()
        .any(|p| lines[8].starts_with(p)),
        "{}",
        lines[8]
    );
    assert!(lines[9].starts_with("advice: "), "{}", lines[9]);
    // The throw-away volume went with the tunnel's cleanup.
    let images = dst.base().join("s/local/images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "volumes left on the target: {left:?}");
}
