//! The status page at `/` in real headless Chromium (Debian's `chromium`, installed by
//! `scripts/test-all.sh`; missing, the test fails and says so) while a real online
//! migration (TCG, an OS-less VM with 96 MiB of RAM data at 4 MiB/s) runs into a real
//! `mtunnel serve` over TLS with a self-signed certificate. What the page shows is
//! checked against what the API answers around it: node name, the tunnel's VMID, task and
//! streams, byte counts between the API's before and after, the task's log, "standalone".
//! Without a token, and with a wrong one, the page asks for one and the API answers 401.
//! The screenshot is saved in `target/status-page/screenshot.png`. A second test shows
//! a cluster's name, quorum and members (two nodes on a real one-member etcd).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{TestServer, blob, bounded, mt, mt_ok, pct, target_arg, tcg_node};
use serde_json::Value;

const VMID: u32 = 150;

/// Where the screenshot goes (kept after the test).
fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page")
}

/// Fails (with the install hint) unless `chromium` is on PATH.
fn require_chromium() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromium"))
                .find(|c| c.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed: run scripts/test-all.sh (it installs Debian's \
                 chromium) or `apt-get install chromium`"
            )
        })
}

/// One headless Chromium run against `url`: its `--dump-dom` output once the page's
/// fetches ran (1.5 s of virtual time: one refresh), and with `screenshot`, a PNG there.
/// Killed after 60 s, or when the test ends early.
async fn chromium(url: &str, screenshot: Option<&Path>) -> String {
    let binary = require_chromium();
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--ignore-certificate-errors",
        "--virtual-time-budget=1500",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    if let Some(png) = screenshot {
        cmd.arg(format!("--screenshot={}", png.display()));
    }
    cmd.arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Its own process group: a timeout or a failed assertion ends its helpers too.
    cmd.process_group(0);
    let child = cmd.spawn().expect("starting chromium");
    let mut group = ProcessGroup(child.id());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium did not finish within 60 s")
        .expect("waiting for chromium");
    group.0 = None;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// Kills a Chromium run's process group when dropped before the run ended.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The page's URL on `server` with `fragment`.
fn page_url(server: &TestServer, fragment: &str) -> String {
    format!("https://{}:{}/{fragment}", server.host, server.port)
}

/// The first capture of `re` in `dom`.
#[track_caller]
fn capture(dom: &str, re: &str) -> String {
    let re = regex_lite::Regex::new(re).unwrap();
    match re.captures(dom) {
        Some(c) => c[1].to_string(),
        None => panic!("no match for {re} in the page:\n{dom}"),
    }
}

/// Every capture of `re` in `dom`.
fn captures(dom: &str, re: &str) -> Vec<String> {
    let re = regex_lite::Regex::new(re).unwrap();
    re.captures_iter(dom).map(|c| c[1].to_string()).collect()
}

/// The text of an HTML text node as Chromium serializes it.
fn unescape(html: &str) -> String {
    html.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

async fn tunnel_status(dst: &TestServer) -> Value {
    let path = format!("/nodes/{NODE_DST}/mtunnel-status");
    dst.client().get(&path, &[]).await.unwrap()
}

const NODE_DST: &str = "dst";

/// The whole log of task `upid` of `dst`, as lines.
async fn task_log(dst: &TestServer, upid: &str) -> Vec<String> {
    let path = format!("/nodes/{NODE_DST}/tasks/{upid}/log");
    let data = (dst.client())
        .get(&path, &[("start", "0"), ("limit", "1000")])
        .await
        .unwrap();
    let lines = data.as_array().expect("log lines");
    lines
        .iter()
        .map(|l| l["t"].as_str().unwrap().to_string())
        .collect()
}

/// The status once VM [`VMID`]'s RAM stream carried 12 MiB (3 s at the bandwidth limit,
/// so that the page's first rates, averages since the stream opened, say something; the
/// RAM takes about 24 s: time enough for the page while it runs), at most 60 s.
async fn wait_for_ram_stream(dst: &TestServer) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = tunnel_status(dst).await;
        let ram_bytes = status["tunnels"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["vmid"] == VMID))
            .and_then(|t| t["streams"].as_array().cloned())
            .and_then(|s| s.into_iter().find(|s| s["stream"] == "ram"))
            .and_then(|s| s["netin"].as_u64())
            .unwrap_or(0);
        if ram_bytes >= 12 << 20 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no RAM stream within 60 s: {status}\n{}",
            dst.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An OS-less VM on `src` holding 96 MiB of random data in RAM, started.
async fn start_vm(src: &TestServer) {
    let vmid = VMID.to_string();
    mt_ok(
        src,
        &[
            "vm", "create", &vmid, "--memory", "256", "--bridge", "vmbr0",
        ],
    )
    .await;
    let blob_path = src.base().join("ram.blob");
    blob(&blob_path, 96 << 20);
    let loader = format!(
        "--qemu-arg=loader,file={},addr=16777216,force-raw=on",
        blob_path.display()
    );
    mt_ok(src, &["vm", "start", &vmid, "--qemu-arg=-device", &loader]).await;
}

fn ram_netin(status: &Value) -> u64 {
    let tunnel = status["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["vmid"] == VMID))
        .expect("the tunnel is listed");
    tunnel["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["stream"] == "ram"))
        .and_then(|s| s["netin"].as_u64())
        .expect("a RAM stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_a_running_migration_in_chromium() {
    require_chromium();
    bounded(300, async {
        let src = tcg_node("src");
        let dst = tcg_node(NODE_DST);
        start_vm(&src).await;
        let target = target_arg(&dst, dst.port);
        let args = [
            "migrate".to_string(),
            VMID.to_string(),
            "--target".into(),
            target,
            "--target-storage".into(),
            "local".into(),
            "--online".into(),
            "--bwlimit".into(),
            "4096".into(),
        ];
        let migration = {
            let src_args = args.clone();
            let src = &src;
            async move {
                let refs: Vec<&str> = src_args.iter().map(String::as_str).collect();
                mt(src, &refs).await
            }
        };
        let checks = async {
            let before = wait_for_ram_stream(&dst).await;
            page_during_migration(&dst, &before).await;
        };
        let (out, ()) = tokio::join!(migration, checks);
        assert!(
            out.status.success(),
            "the migration failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        page_without_a_valid_token(&dst).await;
    })
    .await
}

/// The page with the root token (and the tunnel's task log opened) against the API.
async fn page_during_migration(dst: &TestServer, before: &Value) {
    let tunnel = before["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["vmid"] == VMID))
        .unwrap()
        .clone();
    let upid = tunnel["upid"].as_str().unwrap().to_string();
    std::fs::create_dir_all(output_dir()).unwrap();
    let png = output_dir().join("screenshot.png");
    let _ = std::fs::remove_file(&png);
    let fragment = format!("#token={}&task={}", pct(&dst.root_token), pct(&upid));
    let dom = chromium(&page_url(dst, &fragment), Some(&png)).await;
    let after = tunnel_status(dst).await;
    let log = task_log(dst, &upid).await;

    // The node, the tunnel (VMID, task, owner) and its streams, as the API lists them.
    assert_eq!(capture(&dom, r#"<span id="node">([^<]*)</span>"#), NODE_DST);
    assert_eq!(
        capture(&dom, r#"<td rowspan="\d+" class="vmid">(\d+)</td>"#),
        VMID.to_string()
    );
    assert_eq!(capture(&dom, r#"class="upid">([^<]*)</td>"#), upid);
    assert_eq!(
        capture(&dom, r#"<td rowspan="\d+" class="user">([^<]*)</td>"#),
        tunnel["user"].as_str().unwrap()
    );
    let api_streams: Vec<String> = tunnel["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(api_streams, ["control", "ram"]);
    let shown = captures(
        &dom,
        &format!(r#"<tr data-vmid="{VMID}" data-stream="(\w+)">"#),
    );
    assert_eq!(shown, api_streams);
    // Counters only grow: what the page showed lies between the API's before and after.
    let ram_shown: u64 = capture(
        &dom,
        r#"data-stream="ram">.*?<td class="netin" data-bytes="(\d+)">"#,
    )
    .parse()
    .unwrap();
    assert!(
        (ram_netin(before)..=ram_netin(&after)).contains(&ram_shown),
        "page {ram_shown}, API before {before}, after {after}"
    );

    // The running task with its log, as far as it had got.
    let task_row = format!(
        r#"<tr class="task open" data-upid="{}""#,
        regex_escape(&upid)
    );
    assert_eq!(captures(&dom, &format!("({task_row})")).len(), 1, "{dom}");
    let status = capture(
        &dom,
        &format!(r#"{task_row}[^>]*>(?:<td[^>]*>[^<]*</td>)*?<td class="status">([^<]*)</td>"#),
    );
    assert_eq!(status, "RUNNING");
    let shown_log = unescape(&capture(
        &dom,
        &format!(
            r#"data-log="{}"><td colspan="6"><pre>([^<]*)</pre>"#,
            regex_escape(&upid)
        ),
    ));
    let shown_lines: Vec<&str> = shown_log.lines().collect();
    assert!(shown_lines.len() >= 2, "{shown_log}");
    assert_eq!(shown_lines, log[..shown_lines.len()], "page log vs API log");
    assert_eq!(shown_lines[0], "mtunnel started");

    assert_eq!(
        capture(&dom, r#"<p id="cluster">([^<]*)</p>"#),
        "standalone"
    );
    assert!(dom.contains(r#"<form id="login" hidden="">"#), "{dom}");
    let secret = dst.root_token.rsplit('=').next().unwrap();
    assert!(!dom.contains(secret), "the token is in the page");

    let png_bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(png_bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
}

/// Without a token the page asks for one (and the API refuses to answer); with a wrong
/// one it says what the API said.
async fn page_without_a_valid_token(dst: &TestServer) {
    let dom = chromium(&page_url(dst, ""), None).await;
    assert!(dom.contains(r#"<form id="login">"#), "{dom}");
    assert!(dom.contains(r#"<main id="status" hidden="">"#), "{dom}");
    assert_eq!(capture(&dom, r#"<span id="node">([^<]*)</span>"#), "");
    assert_eq!(
        capture(&dom, r#"<p id="login-error" class="error">([^<]*)</p>"#),
        ""
    );
    let anonymous = dst.client_with("");
    let path = format!("/api2/json/nodes/{NODE_DST}/mtunnel-status");
    let r = anonymous
        .raw(hyper::Method::GET, &path, &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.reason.as_str()),
        (
            401,
            "authentication failure - no authentication credentials given"
        )
    );

    let wrong = pct("PVEAPIToken=root@pam!mtunnel=wrong");
    let dom = chromium(&page_url(dst, &format!("#token={wrong}")), None).await;
    assert!(dom.contains(r#"<form id="login">"#), "{dom}");
    assert_eq!(
        capture(&dom, r#"<p id="login-error" class="error">([^<]*)</p>"#),
        "The API refused the token: authentication failure - invalid token value"
    );
}

/// `s` as a literal in a regex.
fn regex_escape(s: &str) -> String {
    regex_lite::escape(s)
}

/// With `[cluster]` the page shows the cluster's name, quorum and members as
/// `/cluster/status` answers them (two nodes on one etcd member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_cluster_members_and_quorum() {
    require_chromium();
    bounded(120, async {
        let etcd = common::etcd::EtcdCluster::start(1);
        let member = |name: &str| {
            TestServer::start_with(common::Options {
                node: Some(name.into()),
                extra_tables: etcd.cluster_toml("lab", 3, 3),
                ..common::Options::default()
            })
        };
        let (n1, _n2) = (member("n1"), member("n2"));
        let status = wait_for_members(&n1, 2).await;
        let fragment = format!("#token={}", pct(&n1.root_token));
        let dom = chromium(&page_url(&n1, &fragment), None).await;
        let after = n1.client().get("/cluster/status", &[]).await.unwrap();
        assert_eq!(after, status, "the cluster changed while the page looked");

        assert_eq!(capture(&dom, r#"<span id="node">([^<]*)</span>"#), "n1");
        assert_eq!(
            capture(&dom, r#"<p id="cluster">([^<]*)</p>"#),
            "cluster lab: quorate, 2 nodes"
        );
        assert!(dom.contains(r#"<table id="members">"#), "{dom}");
        let rows: Vec<String> = status
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "node")
            .map(|n| {
                let name = n["name"].as_str().unwrap();
                let shown = if n["local"] == 1 {
                    format!("{name} (this node)")
                } else {
                    name.to_string()
                };
                format!(
                    r#"<tr data-node="{name}" class="online"><td>{shown}</td><td>{}</td><td>{}</td><td>online</td></tr>"#,
                    n["nodeid"], n["ip"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(rows.len(), 2);
        let shown = capture(&dom, r#"(?s)<table id="members">.*?<tbody>(.*?)</tbody>"#);
        assert_eq!(shown, rows.concat());
    })
    .await
}

/// `/cluster/status` of `node` once it lists `n` members, all online (at most 30 s).
async fn wait_for_members(node: &TestServer, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = node.client().get("/cluster/status", &[]).await;
        if let Ok(status) = &status {
            let online = status
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|e| e["type"] == "node" && e["online"] == 1)
                        .count()
                })
                .unwrap_or(0);
            if online == n {
                return status.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "not {n} members online within 30 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
