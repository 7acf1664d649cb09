//! The Prometheus metrics of a live target after a real online migration (real QEMU, TCG)
//! and one request with a bad token: `GET /metrics` on the `metrics_listen` address is
//! validated by Prometheus' own `promtool check metrics`, and the counters moved as the
//! migration says they must. The OpenMetrics form (what Prometheus asks for) carries the
//! same samples and ends with `# EOF`.
//!
//! QEMU and promtool must be installed (`scripts/test-all.sh` installs both); a missing one
//! fails this test with that hint instead of skipping it.

mod common;

use std::time::{Duration, Instant};

use common::{Options, TestServer, bounded, mt_ok, require_qemu, target_arg};
use hyper::Method;
use mtunnel::client::http::{ApiClient, RawResponse};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

fn node(name: &str, extra: &str) -> TestServer {
    TestServer::start_with(Options {
        node: Some(name.into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{extra}"),
        ..Options::default()
    })
}

/// The port of `node`'s metrics listener.
fn metrics_port(node: &TestServer) -> u16 {
    let url = node
        .metrics_url()
        .expect("serve printed no 'metrics:' line");
    url.strip_prefix("http://127.0.0.1:")
        .and_then(|r| r.strip_suffix("/metrics"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected metrics URL '{url}'"))
}

/// `GET path` on the metrics listener of `node`, with `accept` if given.
async fn get(node: &TestServer, path: &str, accept: Option<&str>) -> RawResponse {
    let port = metrics_port(node);
    let client =
        ApiClient::plain("127.0.0.1", port, String::new()).with_timeout(Duration::from_secs(10));
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    client
        .raw(Method::GET, path, &headers, Vec::new())
        .await
        .expect("scraping the metrics listener")
}

async fn scrape(node: &TestServer) -> String {
    let r = get(node, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type(), Some(TEXT_004));
    String::from_utf8(r.body).expect("the exposition is UTF-8")
}

/// The value of the sample `series` (name with its labels exactly as exposed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of the sample `series` in the scrape `text`; a missing series fails the test
/// with the whole scrape (a counter that was never exposed is not a zero).
#[track_caller]
fn sample(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in the scrape:\n{text}"))
}

/// `promtool check metrics` on `text`: must exit 0 and report nothing.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e} - install it (Debian package prometheus; scripts/test-all.sh \
                 installs it)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {:?}\n{report}\nexposition:\n{text}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_real_migration_pass_promtool_and_count_it() {
    require_qemu();
    let src = node("msrc", "");
    let dst = node(common::NODE, "metrics_listen = \"127.0.0.1:0\"\n");
    assert!(src.metrics_url().is_none(), "metrics are off by default");

    // Before anything happened: valid, and zero open tunnels.
    let fresh = scrape(&dst).await;
    promtool_check(&fresh);
    assert_eq!(value(&fresh, "mtunnel_tunnels_open"), Some(0.0), "{fresh}");

    mt_ok(
        &src,
        &[
            "vm",
            "create",
            "100",
            "--memory",
            "64",
            "--bridge",
            "vmbr0",
            "--disk",
            "local:16M:raw",
        ],
    )
    .await;
    mt_ok(&src, &["vm", "start", "100"]).await;
    let target = target_arg(&dst, dst.port);
    let migrate = [
        "migrate",
        "100",
        "--target",
        &target,
        "--target-storage",
        "local",
        "--online",
    ];
    let out = mt_ok(&src, &migrate).await;
    assert!(out.contains("migration of VM 100 to 127.0.0.1"), "{out}");

    let refused = dst
        .client_with("PVEAPIToken=root@pam!mtunnel=00000000-0000-0000-0000-000000000000")
        .get("/version", &[])
        .await
        .expect_err("a bad token is refused");
    assert_eq!(refused.status(), Some(401), "{refused}");

    // The target's tunnel task ends right after the source's `quit`: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&dst).await;
        let done = value(&text, "mtunnel_tunnels_open") == Some(0.0)
            && value(&text, "mtunnel_migrations_total{result=\"completed\"}").is_some();
        if done || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("GET /metrics after the migration:\n{text}");
    promtool_check(&text);

    let v = |series: &str| sample(&text, series);
    assert_eq!(v("mtunnel_tunnels_open"), 0.0, "{text}");
    assert_eq!(v("mtunnel_tunnels_opened_total"), 1.0, "{text}");
    assert!(
        v("mtunnel_commands_total{command=\"version\",outcome=\"ok\"}") >= 1.0,
        "{text}"
    );
    for cmd in ["config", "start", "resume", "unlock", "quit"] {
        let series = format!("mtunnel_commands_total{{command=\"{cmd}\",outcome=\"ok\"}}");
        assert_eq!(v(&series), 1.0, "{series}\n{text}");
    }
    assert!(
        v("mtunnel_command_duration_seconds_count{command=\"start\"}") == 1.0,
        "{text}"
    );
    for stream in ["control", "ram", "nbd"] {
        let series =
            format!("mtunnel_forwarded_bytes_total{{stream=\"{stream}\",direction=\"in\"}}");
        assert!(v(&series) > 0.0, "{series}\n{text}");
    }
    assert!(
        v("mtunnel_forwarded_bytes_total{stream=\"control\",direction=\"out\"}") > 0.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_migrations_total{result=\"started\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_migrations_total{result=\"completed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_migrations_total{result=\"failed\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_auth_failures_total{kind=\"bad_token\"}"),
        1.0,
        "{text}"
    );
    let version = format!(
        "mtunnel_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(v(&version), 1.0, "{text}");

    // What Prometheus asks for: OpenMetrics, the same samples, `# EOF` at the end.
    let om = get(
        &dst,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(om.status, 200);
    assert_eq!(om.content_type(), Some(OPENMETRICS));
    let om = String::from_utf8(om.body).unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert_eq!(
        value(&om, "mtunnel_migrations_total{result=\"completed\"}"),
        Some(1.0),
        "{om}"
    );

    // Only /metrics is served there.
    assert_eq!(get(&dst, "/api2/json/version", None).await.status, 404);
    mt_ok(&dst, &["vm", "stop", "100"]).await;

    failures_are_counted_by_kind_and_reason(&dst).await;
}

/// A tunnel whose source vanishes, a bad ticket and a missing privilege, on `dst` after
/// the one migration above.
async fn failures_are_counted_by_kind_and_reason(dst: &TestServer) {
    let opened = dst
        .client()
        .post("/nodes/localhost/qemu/200/mtunnel", &[])
        .await
        .expect("opening a tunnel");
    let tunnel = common::Tunnel::from_reply(200, &opened);
    let forged = common::Tunnel {
        // Same shape, wrong signature.
        ticket: format!("{}AAAA", &tunnel.ticket[..tunnel.ticket.len() - 4]),
        ..tunnel.clone()
    };
    match dst.connect_as(&forged, &dst.root_token).await {
        Err(err) => assert_eq!(err.status(), Some(401), "{err}"),
        Ok(_) => panic!("a forged ticket was accepted"),
    }
    let control = dst.connect(&tunnel).await;
    drop(control);
    let nobody = dst.create_token("nobody@pve!t", &["--privs", "Sys.Audit"]);
    let denied = dst
        .client_with(&nobody)
        .post("/nodes/localhost/qemu/201/mtunnel", &[])
        .await
        .expect_err("no VM.Allocate");
    assert_eq!(denied.status(), Some(403), "{denied}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(dst).await;
        let failed = value(&text, "mtunnel_migrations_total{result=\"failed\"}");
        if failed == Some(1.0) && value(&text, "mtunnel_tunnels_open") == Some(0.0)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    promtool_check(&text);
    let v = |series: &str| sample(&text, series);
    assert_eq!(v("mtunnel_tunnels_opened_total"), 2.0, "{text}");
    assert_eq!(v("mtunnel_tunnels_open"), 0.0, "{text}");
    assert_eq!(
        v("mtunnel_migrations_total{result=\"started\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_migrations_total{result=\"failed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_migration_failures_total{reason=\"peer_gone\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_cleanup_actions_total{action=\"config_removed\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_auth_failures_total{kind=\"bad_ticket\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        v("mtunnel_auth_failures_total{kind=\"permission_denied\"}"),
        1.0,
        "{text}"
    );
}

/// One HTTP/1.1 request on a fresh connection that asks to be kept alive; returns the
/// response head (lower case) and body once the server has closed the connection (at
/// most 5 s).
async fn get_until_closed(port: u16) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut all))
        .await
        .expect("the server closes the connection after one answer")
        .unwrap();
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_lowercase(), body.to_string())
}

/// Issue 17: 16 idle or kept-alive connections delayed a scrape by 10-59 s (Prometheus
/// gives up after 10 s). Idle connections now neither queue a scrape nor hold their place
/// for long, every connection serves one request and is closed, and when the listener is
/// full a scrape is answered 503 at once instead of waiting in the accept queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_a_scrape() {
    bounded(60, async {
        let server = TestServer::start_with(Options {
            extra_toml: "metrics_listen = \"127.0.0.1:0\"\n".into(),
            ..Options::default()
        });
        let port = metrics_port(&server);
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        // A hang detector, not a performance bound: the old listener made this wait 10 s.
        let text = tokio::time::timeout(Duration::from_secs(5), scrape(&server))
            .await
            .expect("a scrape is answered while 20 idle connections are open");
        assert_eq!(value(&text, "mtunnel_tunnels_open"), Some(0.0), "{text}");
        let (head, body) = get_until_closed(port).await;
        assert!(head.starts_with("http/1.1 200 ok"), "{head}");
        assert!(body.contains("mtunnel_tunnels_open 0"), "{body}");
        assert!(head.contains("\r\nconnection: close"), "{head}");

        // Full: every place taken by a connection that sends nothing; the next one is
        // told so at once. The places are held for HEADER_TIMEOUT (3 s) from their
        // connect; a machine too slow to open them in that time gets two more tries.
        let mut full = None;
        for _ in 0..3 {
            let mut held = Vec::new();
            for _ in 0..64 {
                held.push(
                    tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .unwrap(),
                );
            }
            let answer = get_until_closed(port).await;
            if answer.0.starts_with("http/1.1 503") {
                full = Some(answer);
                break;
            }
        }
        let (head, body) = full.expect("a connection beyond the 64 held ones is answered 503");
        assert!(
            head.starts_with("http/1.1 503 service unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert_eq!(
            body,
            "too many metrics connections (at most 64) - try again later\n"
        );
        drop(idle);
    })
    .await
}

/// `mtunnel replicate VMID ENDPOINT --target-storage local` from `src` to `dst`, which must
/// succeed: (bytes copied, bytes sent through the tunnel) from its summary line.
async fn replicate(src: &TestServer, dst: &TestServer, vmid: &str) -> (u64, u64) {
    let target = target_arg(dst, dst.port);
    let out = mt_ok(
        src,
        &["replicate", vmid, &target, "--target-storage", "local"],
    )
    .await;
    let number_before = |marker: &str| -> u64 {
        let head = &out[..out.find(marker).unwrap_or_else(|| panic!("{out}"))];
        let start = head.rfind('(').expect("a '(' before the byte count") + 1;
        head[start..].trim().parse().expect("a byte count")
    };
    (
        number_before(" bytes), "),
        number_before(" bytes); restore point"),
    )
}

/// The replica series of a target: after a full and an incremental run, the last run's
/// bytes (received here = what the source says it sent; copied = what its jobs copied),
/// the newest point's time and the number of points, exactly; a run cut by kill -9 of
/// the target counts as failed, also after the next run completed; a promoted replica
/// has no series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_series_follow_the_runs() {
    require_qemu();
    let src = node("rsrc", "");
    let mut dst = node("rdst", "metrics_listen = \"127.0.0.1:0\"\n");
    mt_ok(
        &src,
        &[
            "vm",
            "create",
            "110",
            "--memory",
            "64",
            "--disk",
            "local:128M:qcow2",
        ],
    )
    .await;
    let img = src.images(110).join("vm-110-disk-0.qcow2");
    let data = src.base().join("data110");
    common::blob(&data, 32 << 20);
    common::qemu_io("qcow2", &format!("write -s {} 0 32M", data.display()), &img);
    std::fs::remove_file(&data).unwrap();
    mt_ok(&src, &["vm", "start", "110"]).await;
    let replica_json = dst.data.join("replicas").join("110.json");
    let record = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&replica_json).unwrap()).unwrap()
    };

    let (copied1, sent1) = replicate(&src, &dst, "110").await;
    let wrote = common::qmp(
        &src.run,
        110,
        "human-monitor-command",
        serde_json::json!({"command-line": "qemu-io -d scsi0 \"write -P 0x5a 64M 8M\""}),
    )
    .await;
    assert_eq!(wrote, serde_json::json!(""), "HMP qemu-io failed");
    let (copied2, sent2) = replicate(&src, &dst, "110").await;
    eprintln!("run 1: copied {copied1}, sent {sent1}; run 2: copied {copied2}, sent {sent2}");
    let text = scrape(&dst).await;
    promtool_check(&text);
    let newest = record()["points"][1]["time"].as_u64().unwrap();
    let l = "{vmid=\"110\"}";
    assert_eq!(sample(&text, &format!("mtunnel_replica_points{l}")), 2.0);
    assert_eq!(
        sample(
            &text,
            &format!("mtunnel_replica_newest_point_timestamp_seconds{l}")
        ),
        newest as f64
    );
    assert_eq!(
        sample(
            &text,
            &format!("mtunnel_replica_last_run_received_bytes{l}")
        ),
        sent2 as f64,
        "received here = sent by the source"
    );
    assert_eq!(
        sample(&text, &format!("mtunnel_replica_last_run_copied_bytes{l}")),
        copied2 as f64
    );
    assert!(
        sent2 < sent1 / 2,
        "run 2 is incremental: {sent2} vs {sent1}"
    );
    assert_eq!(
        sample(&text, &format!("mtunnel_replica_runs_failed_total{l}")),
        0.0
    );

    // A run slowed to 1 MiB/s, cut by kill -9 of the target.
    let target = target_arg(&dst, dst.port);
    let args = ["replicate", "110", &target, "--target-storage", "local"];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let slow = {
        let config = src.config.clone();
        tokio::spawn(async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"))
                .args(&args)
                .args(["--bwlimit", "1024", "--config"])
                .arg(&config)
                .output()
                .await
                .expect("running mtunnel replicate")
        })
    };
    let pid_file = dst.run.join("110-scsi0.replica.pid");
    assert!(
        common::eventually(Duration::from_secs(30), || pid_file.exists()).await,
        "the run never exported the working copy"
    );
    dst.restart();
    let cut = bounded(120, slow).await.unwrap();
    assert!(!cut.status.success(), "the cut run must fail");
    assert!(
        common::eventually(Duration::from_secs(10), || !pid_file.exists()).await,
        "the recovery left the run's NBD server"
    );
    let text = scrape(&dst).await;
    assert_eq!(
        sample(&text, &format!("mtunnel_replica_runs_failed_total{l}")),
        1.0
    );
    assert_eq!(sample(&text, &format!("mtunnel_replica_points{l}")), 2.0);

    // The next run completes (a hash sync, the last one was cut); the failure stays counted.
    let (copied3, sent3) = replicate(&src, &dst, "110").await;
    let text = scrape(&dst).await;
    promtool_check(&text);
    assert_eq!(
        sample(&text, &format!("mtunnel_replica_runs_failed_total{l}")),
        1.0
    );
    assert_eq!(sample(&text, &format!("mtunnel_replica_points{l}")), 3.0);
    assert_eq!(
        sample(
            &text,
            &format!("mtunnel_replica_last_run_received_bytes{l}")
        ),
        sent3 as f64
    );
    assert_eq!(
        sample(&text, &format!("mtunnel_replica_last_run_copied_bytes{l}")),
        copied3 as f64
    );

    mt_ok(&dst, &["replica", "promote", "110"]).await;
    let text = scrape(&dst).await;
    assert!(!text.contains("vmid=\"110\""), "{text}");
    mt_ok(&src, &["vm", "stop", "110"]).await;
}
