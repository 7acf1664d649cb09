//! Cluster mode against a real etcd (three members on loopback) and real `mtunnel serve`
//! nodes: one VMID across the cluster (a race has one winner, `vm create`/`destroy` and
//! closed tunnels register and release), a `kill -9`ed node's reservations expire after
//! its lease TTL, one etcd member lost or hung (SIGSTOP, in each place of `endpoints`)
//! changes nothing, two lost refuse new tunnels with upstream's quorum message until they
//! return, a node name is held by one running node, the cluster views from any node, and
//! one address for the fleet (a live migration through one node onto another; callers
//! must authenticate on the forwarding node before etcd is asked, forwarded WebSockets take
//! a connection slot and close when idle); a replica one node holds, listed alike by every
//! node, and a live cutover to it through another node.

mod common;

use std::time::{Duration, Instant};

use common::ctl::Ctl;
use common::etcd::EtcdCluster;
use common::{Options, TestServer, bounded, mt};
use mtunnel::client::ApiError;
use serde_json::{Value, json};

/// Lease TTL of the test nodes (`lease_ttl_secs`), and the bound on one etcd call.
const TTL: u64 = 3;
const ETCD_TIMEOUT: u64 = 3;

fn node(etcd: &EtcdCluster, name: &str) -> TestServer {
    TestServer::start_with(Options {
        node: Some(name.to_string()),
        extra_tables: etcd.cluster_toml("lab", TTL, ETCD_TIMEOUT),
        ..Options::default()
    })
}

async fn open(server: &TestServer, vmid: u32) -> Result<Value, ApiError> {
    server
        .client()
        .post(&format!("/nodes/localhost/qemu/{vmid}/mtunnel"), &[])
        .await
}

async fn stop_task(server: &TestServer, upid: &str) {
    let path = format!(
        "/nodes/localhost/tasks/{}",
        mtunnel::client::http::encode_segment(upid)
    );
    server.client().delete(&path, &[]).await.unwrap();
    let status = format!("{path}/status");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = server.client().get(&status, &[]).await.unwrap();
        if s["status"] == "stopped" {
            return;
        }
        assert!(Instant::now() < deadline, "task {upid} did not stop: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The 400 of a VMID another node has.
fn assert_exists_on(err: &ApiError, vmid: u32, owner: &str) {
    match err {
        ApiError::Http { status, errors, .. } => {
            assert_eq!(*status, 400, "{err}");
            assert_eq!(
                Value::Object(errors.clone()),
                json!({"vmid": format!("unable to create empty VM config - VM {vmid} already exists on node '{owner}'")})
            );
        }
        other => panic!("expected a 400, got {other}"),
    }
}

/// The 500 of a node whose etcd has no quorum.
fn assert_no_quorum(err: &ApiError) {
    match err {
        ApiError::Http {
            status, message, ..
        } => {
            assert_eq!(*status, 500, "{err}");
            assert!(
                message.starts_with("cluster not ready - no quorum? (etcd "),
                "{message}"
            );
        }
        other => panic!("expected a 500, got {other}"),
    }
}

/// Retries `open` on `server` until it succeeds: at most `secs` seconds, every 250 ms.
async fn open_eventually(server: &TestServer, vmid: u32, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match open(server, vmid).await {
            Ok(v) => return v,
            Err(e) => assert!(
                Instant::now() < deadline,
                "VM {vmid} still refused after {secs} s: {e}\nlog:\n{}",
                server.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vmid_across_the_cluster_and_views_from_any_node() {
    bounded(180, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        let n3 = node(&etcd, "n3");

        // Two sources race for VMID 100 on two nodes: exactly one wins.
        let (a, b) = tokio::join!(open(&n1, 100), open(&n2, 100));
        let (winner, loser_err, winner_name) = match (a, b) {
            (Ok(v), Err(e)) => (v, e, "n1"),
            (Err(e), Ok(v)) => (v, e, "n2"),
            other => panic!("expected exactly one winner, got {other:?}"),
        };
        assert_exists_on(&loser_err, 100, winner_name);
        // A third node, and `vm create` on it, are refused too; nextid skips it.
        assert_exists_on(&open(&n3, 100).await.unwrap_err(), 100, winner_name);
        let out = mt(&n3, &["vm", "create", "100", "--memory", "64"]).await;
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim_end(),
            format!("mtunnel: error: VM 100 already exists on node '{winner_name}'")
        );
        assert!(!n3.vm_config(100).exists(), "a refused create leaves no config");
        let next = n3.client().get("/cluster/nextid", &[]).await.unwrap();
        assert_eq!(next, json!("101"));

        // `vm create` registers the VMID for good; `vm destroy` releases it.
        common::mt_ok(&n3, &["vm", "create", "101", "--memory", "64"]).await;
        assert_exists_on(&open(&n1, 101).await.unwrap_err(), 101, "n3");
        assert_eq!(
            n1.client().get("/cluster/nextid", &[]).await.unwrap(),
            json!("102")
        );
        let err = n1
            .client()
            .get("/cluster/nextid", &[("vmid", "101")])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("VM 101 already exists"), "{err}");

        // Views from a node that holds none of the VMs.
        let status = n2.client().get("/cluster/status", &[]).await.unwrap();
        let want_nodes: Vec<Value> = ["n1", "n2", "n3"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"type": "node", "id": format!("node/{n}"), "name": n, "nodeid": i + 1,
                       "ip": "127.0.0.1", "local": u8::from(*n == "n2"), "online": 1, "level": ""})
            })
            .collect();
        let mut want = vec![json!({"type": "cluster", "id": "cluster", "name": "lab",
                                   "nodes": 3, "quorate": 1, "version": 1})];
        want.extend(want_nodes);
        assert_eq!(status, Value::Array(want));
        println!("/cluster/status from n2: {status}");
        // A VM's status comes from its node's published record (written by its reconcile
        // loop every few seconds): "unknown" until then.
        let want = json!([
            {"id": "qemu/100", "vmid": 100, "type": "qemu", "node": winner_name, "status": "stopped"},
            {"id": "qemu/101", "vmid": 101, "type": "qemu", "node": "n3", "status": "stopped"},
        ]);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let vms = n2
                .client()
                .get("/cluster/resources", &[("type", "vm")])
                .await
                .unwrap();
            if vms == want {
                break;
            }
            assert!(Instant::now() < deadline, "{vms} != {want}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let all = n2.client().get("/cluster/resources", &[]).await.unwrap();
        println!("/cluster/resources from n2: {all}");
        let nodes = n1.client().get("/nodes", &[]).await.unwrap();
        assert_eq!(nodes.as_array().map(Vec::len), Some(3));
        assert_eq!(nodes[2]["ssl_fingerprint"], json!(n3.fingerprint));

        // Destroyed: usable elsewhere.
        common::mt_ok(&n3, &["vm", "destroy", "101"]).await;
        open(&n1, 101).await.unwrap();

        // The winner's tunnel ends without a VM: the VMID is free for the loser.
        let winner_node = if winner_name == "n1" { &n1 } else { &n2 };
        let loser_node = if winner_name == "n1" { &n2 } else { &n1 };
        stop_task(winner_node, winner["upid"].as_str().unwrap()).await;
        assert!(!winner_node.vm_config(100).exists());
        open(loser_node, 100).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_of_a_killed_node_expire_after_the_lease_ttl() {
    bounded(120, async {
        let etcd = EtcdCluster::start(3);
        let mut n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        open(&n1, 300).await.unwrap();
        assert_exists_on(&open(&n2, 300).await.unwrap_err(), 300, "n1");
        n1.kill();
        // After the TTL (plus a keepalive period and etcd's own lease check) it is free.
        open_eventually(&n2, 300, 6 * TTL + 10).await;
        let status = n2.client().get("/cluster/status", &[]).await.unwrap();
        assert_eq!(status[1]["name"], "n1");
        assert_eq!(status[1]["online"], 0);
        assert_eq!(status[2]["online"], 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_loss_one_is_fine_two_refuse_until_they_return() {
    bounded(180, async {
        let mut etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");

        etcd.kill(0);
        // If it was the leader, the other two elect a new one first.
        etcd.wait_healthy(&[1, 2]);
        let running = open(&n1, 400).await.unwrap();
        assert_exists_on(&open(&n2, 400).await.unwrap_err(), 400, "n1");

        etcd.kill(1);
        assert_no_quorum(&open(&n1, 401).await.unwrap_err());
        assert!(
            !n1.vm_config(401).exists(),
            "a refused tunnel leaves no config"
        );
        let status = n1.client().get("/cluster/status", &[]).await.unwrap();
        assert_eq!(status[0]["quorate"], 0);
        // The running tunnel still cleans up, in bounded time.
        stop_task(&n1, running["upid"].as_str().unwrap()).await;
        assert!(!n1.vm_config(400).exists());

        etcd.restart(0);
        etcd.restart(1);
        etcd.wait_healthy(&[0, 1, 2]);
        open_eventually(&n1, 401, 30).await;
        // The release that failed during the outage is repaired by the reconcile loop.
        open_eventually(&n2, 400, 30).await;
        let status = n2.client().get("/cluster/status", &[]).await.unwrap();
        assert_eq!(status[0]["quorate"], 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_migration_registers_the_vmid_for_good_and_the_source_releases_it() {
    common::require_qemu();
    bounded(180, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let mut n2 = node(&etcd, "n2");
        let n3 = node(&etcd, "n3");
        common::mt_ok(
            &n1,
            &[
                "vm",
                "create",
                "500",
                "--memory",
                "64",
                "--disk",
                "local:4M:raw",
            ],
        )
        .await;
        // Within one cluster the source keeps its VMID until it deletes it: the target
        // takes another one.
        let target = common::target_arg(&n2, n2.port);
        let out = mt(
            &n1,
            &[
                "migrate",
                "500",
                "--target",
                &target,
                "--target-storage",
                "local",
            ],
        )
        .await;
        assert!(!out.status.success());
        // (The source asks `/cluster/nextid?vmid=500` first, which is cluster-wide.)
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().last(),
            Some("mtunnel: error: target VMID 500 is already in use on the target")
        );
        common::mt_ok(
            &n1,
            &[
                "migrate",
                "500",
                "--target",
                &target,
                "--target-storage",
                "local",
                "--target-vmid",
                "501",
                "--delete",
            ],
        )
        .await;
        assert!(n2.vm_config(501).exists());
        // The source released 500; 501 belongs to n2, and stays so after n2 dies (the
        // entry is no longer on its lease).
        open(&n3, 500).await.unwrap();
        assert_exists_on(&open(&n3, 501).await.unwrap_err(), 501, "n2");
        n2.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = n3.client().get("/cluster/status", &[]).await.unwrap();
            if status[2]["online"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "n2 still online: {status}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_exists_on(&open(&n3, 501).await.unwrap_err(), 501, "n2");
        let vms = n3
            .client()
            .get("/cluster/resources", &[("type", "vm")])
            .await
            .unwrap();
        assert_eq!(
            vms,
            json!([
                {"id": "qemu/500", "vmid": 500, "type": "qemu", "node": "n3", "status": "stopped"},
                {"id": "qemu/501", "vmid": 501, "type": "qemu", "node": "n2", "status": "unknown"},
            ])
        );
    })
    .await;
}

/// Polls `/cluster/status` on `server` until `node` has `online == want` (at most 30 s).
async fn wait_online(server: &TestServer, node: &str, want: u8) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.client().get("/cluster/status", &[]).await.unwrap();
        let found = status
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == node))
            .map(|e| e["online"] == want);
        if found == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} not online={want}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_longer_than_its_lease_registers_again() {
    use nix::sys::signal::Signal;
    bounded(120, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        open(&n1, 700).await.unwrap();
        // Frozen, n1 sends no keepalive: etcd expires its lease and what hangs on it.
        n1.signal(Signal::SIGSTOP);
        wait_online(&n2, "n1", 0).await;
        n1.signal(Signal::SIGCONT);
        // Back, it gets a new lease, registers and puts its open tunnel's VMID back.
        wait_online(&n2, "n1", 1).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vms = n2
                .client()
                .get("/cluster/resources", &[("type", "vm")])
                .await
                .unwrap();
            if vms == json!([{"id": "qemu/700", "vmid": 700, "type": "qemu", "node": "n1", "status": "stopped"}])
            {
                break;
            }
            assert!(Instant::now() < deadline, "700 not re-reserved: {vms}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_exists_on(&open(&n2, 700).await.unwrap_err(), 700, "n1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    bounded(60, async {
        let etcd = EtcdCluster::start_tls();
        let tls = format!("ca_file = \"{}\"\n", etcd.file("ca.pem").display());
        let with_cert = format!(
            "{tls}cert_file = \"{}\"\nkey_file = \"{}\"\n",
            etcd.file("client.pem").display(),
            etcd.file("client.key").display()
        );
        let table = etcd.cluster_toml("sec", TTL, 5);
        let n1 = TestServer::start_with(Options {
            node: Some("n1".into()),
            extra_tables: format!("{table}{with_cert}"),
            ..Options::default()
        });
        open_eventually(&n1, 100, 20).await;
        let status = n1.client().get("/cluster/status", &[]).await.unwrap();
        assert_eq!(status[0]["quorate"], 1);
        assert_eq!(status[1]["name"], "n1");
        // Without the client certificate etcd refuses the connection: no quorum, and why.
        let n2 = TestServer::start_with(Options {
            node: Some("n2".into()),
            extra_tables: format!("{table}{tls}"),
            ..Options::default()
        });
        let err = open(&n2, 101).await.unwrap_err();
        let ApiError::Http { message, .. } = &err else {
            panic!("expected an HTTP error, got {err}");
        };
        assert!(
            message.starts_with("cluster not ready - no quorum? (this node holds no etcd lease: "),
            "{message}"
        );
        assert!(message.to_lowercase().contains("certificate"), "{message}");
    })
    .await;
}

/// Creates `authid` with `role` on each node with one secret (`token create
/// --secret-stdin`); returns the header value, valid on all of them.
async fn same_token_on(nodes: &[&TestServer], authid: &str, role: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let secret = "5f0c1b9e-8d2a-4c3b-9e7f-0a1b2c3d4e5f";
    let mut headers = Vec::new();
    for n in nodes {
        let mut child = tokio::process::Command::new(common::BIN)
            .args(["token", "create", authid, "--role", role, "--secret-stdin"])
            .arg("--config")
            .arg(&n.config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{secret}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        headers.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert!(headers.iter().all(|h| h == &headers[0]), "{headers:?}");
    assert_eq!(headers[0], format!("PVEAPIToken={authid}={secret}"));
    headers.remove(0)
}

/// One address for the fleet: a live migration sent to n2's address with `--target-node
/// n3` lands on n3 (POST, control WebSocket, NBD and RAM streams all forwarded by n2,
/// pinned to n3's registered fingerprint); n2 keeps nothing. A node that is not a member
/// is refused before anything starts, and a request for it answered with PVE's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_through_one_node_lands_on_the_named_one() {
    common::require_qemu();
    bounded(240, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        let n3 = node(&etcd, "n3");
        let token = same_token_on(&[&n2, &n3], "fleet@pve!mig", "Administrator").await;
        common::mt_ok(
            &n1,
            &[
                "vm",
                "create",
                "510",
                "--memory",
                "64",
                "--disk",
                "local:8M:raw",
            ],
        )
        .await;
        let disk = n1
            .data
            .parent()
            .unwrap()
            .join("s/local/images/510/vm-510-disk-0.raw");
        common::qemu_io("raw", "write -P 0x5a 1M 3M", &disk);
        common::mt_ok(&n1, &["vm", "start", "510"]).await;
        let via_n2 = format!(
            "host=127.0.0.1,port={},apitoken={token},fingerprint={}",
            n2.port, n2.fingerprint
        );
        let args = |node: &'static str| {
            vec![
                "migrate".to_string(),
                "510".into(),
                "--online".into(),
                "--target".into(),
                via_n2.clone(),
                "--target-storage".into(),
                "local".into(),
                "--target-vmid".into(),
                "511".into(),
                "--target-node".into(),
                node.into(),
            ]
        };
        let refused = mt(
            &n1,
            &args("n9").iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        assert!(!refused.status.success());
        assert_eq!(
            String::from_utf8_lossy(&refused.stderr).lines().last(),
            Some(
                "mtunnel: error: target node 'n9' is not a member of the target's cluster \
                 (members: n1, n2, n3)"
            )
        );
        let err = mtunnel::client::ApiClient::new(
            "127.0.0.1",
            n2.port,
            token.clone(),
            n2.fingerprint.clone(),
        )
        .unwrap()
        .get("/nodes/n9/storage", &[])
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("unable to get IP for node 'n9' - node offline?"),
            "{err}"
        );

        let out = common::mt_ok(
            &n1,
            &args("n3").iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        assert!(out.contains("(node 'n3', VM 511)"), "{out}");
        let st = common::qmp(&n3.run, 511, "query-status", Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        assert!(!n2.vm_config(511).exists(), "n2 must keep nothing");
        assert!(common::pid_of(&n2, 511).is_none());
        // The disk arrived (the source QEMU has quit; compare what it left).
        let landed = n3
            .data
            .parent()
            .unwrap()
            .join("s/local/images/511/vm-511-disk-0.raw");
        let same = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "raw"])
            .arg(&disk)
            .arg(&landed)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&same.stdout).trim(),
            "Images are identical.",
            "{}",
            String::from_utf8_lossy(&same.stderr)
        );
        // n3 owns 511 for good, seen from any node.
        assert_exists_on(&open(&n2, 511).await.unwrap_err(), 511, "n3");
        common::mt_ok(&n3, &["vm", "stop", "511"]).await;
    })
    .await;
}

/// The live member keys and their leases, as etcd member `via` has them.
fn members(etcd: &EtcdCluster, via: usize) -> Vec<(String, i64)> {
    etcd.range(via, "/mtunnel/lab/members/")
        .into_iter()
        .map(|(key, _, lease)| (key, lease))
        .collect()
}

/// The lease of the entry of `vmid`, as etcd member `via` has it (None: no entry).
fn vmid_lease(etcd: &EtcdCluster, via: usize, vmid: u32) -> Option<i64> {
    let key = format!("/mtunnel/lab/vmids/{vmid}");
    etcd.range(via, &key)
        .into_iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, _, lease)| lease)
}

/// Waits (at most 30 s) until both nodes are members and the reservations of VMs 600 (n1)
/// and 601 (n2) are on their leases, as etcd member `via` has it; returns the leases.
async fn registered(etcd: &EtcdCluster, via: usize) -> Vec<(String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = members(etcd, via);
        let on = |vmid, i: usize| now.get(i).map(|m| m.1) == vmid_lease(etcd, via, vmid);
        if now.len() == 2 && on(600, 0) && on(601, 1) {
            return now;
        }
        assert!(Instant::now() < deadline, "not registered: {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A hung etcd member (SIGSTOP: it accepts connections and answers nothing) changes
/// nothing, first, second or third in `endpoints`: tunnels open and reserve on both nodes,
/// both nodes keep their membership on the same leases (none expires) and the reservations
/// of open tunnels stay, over two lease TTLs per hung member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_member_changes_nothing_whichever_its_place() {
    bounded(180, async {
        let etcd = EtcdCluster::start(3);
        // The bound on one etcd call covers a leader election (the hung member may lead).
        let node = |name: &str| {
            TestServer::start_with(Options {
                node: Some(name.to_string()),
                extra_tables: etcd.cluster_toml("lab", TTL, 5),
                ..Options::default()
            })
        };
        let (n1, n2) = (node("n1"), node("n2"));
        open_eventually(&n1, 600, 20).await;
        open_eventually(&n2, 601, 20).await;
        for frozen in 0..3usize {
            let healthy = (frozen + 1) % 3;
            let leases = registered(&etcd, healthy).await;
            let guard = etcd.freeze(frozen);
            let since = Instant::now();
            for step in 0..4u32 {
                let vmid = 610 + 10 * frozen as u32 + step;
                let (here, there, name) = if step % 2 == 0 {
                    (&n1, &n2, "n1")
                } else {
                    (&n2, &n1, "n2")
                };
                if let Err(e) = open(here, vmid).await {
                    panic!(
                        "etcd member {frozen} hung: opening VM {vmid} on {name}: {e}\nlog:\n{}\n{}",
                        here.log(),
                        etcd.logs()
                    );
                }
                assert_exists_on(&open(there, vmid).await.unwrap_err(), vmid, name);
            }
            // Hung for two lease TTLs: leases kept alive only through it would expire.
            let until = since + Duration::from_secs(2 * TTL);
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
            assert_eq!(members(&etcd, healthy), leases, "etcd member {frozen} hung");
            assert_eq!(registered(&etcd, healthy).await, leases);
            assert_exists_on(&open(&n2, 600).await.unwrap_err(), 600, "n1");
            assert_exists_on(&open(&n1, 601).await.unwrap_err(), 601, "n2");
            drop(guard);
            etcd.wait_healthy(&[0, 1, 2]);
            // A leader resumed after more than the TTL may revoke every lease on its own
            // stale clock (etcd issue 15247, in Debian's 3.4.23): the nodes then register
            // anew at their next keepalive. Let that pass before the next member hangs.
            tokio::time::sleep(Duration::from_secs(TTL)).await;
        }
    })
    .await;
}

/// `serve` with `server`'s config in directories of its own (data, run, storages) as node
/// `name`; stderr piped, killed on drop. The directory goes with the returned guard.
fn serve_twin(server: &TestServer, name: &str) -> (tempfile::TempDir, tokio::process::Child) {
    let twin = tempfile::Builder::new()
        .prefix("mt")
        .tempdir_in("/tmp")
        .unwrap();
    for sub in ["local", "off", "isos"] {
        std::fs::create_dir_all(twin.path().join("s").join(sub)).unwrap();
    }
    let config = std::fs::read_to_string(&server.config)
        .unwrap()
        .replace(
            &server.base().display().to_string(),
            &twin.path().display().to_string(),
        )
        .replacen(
            "node = \"",
            &format!("node = \"{name}\"\n# was: node = \""),
            1,
        );
    let path = twin.path().join("mtunnel.toml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(common::BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .arg("--run-dir")
        .arg(twin.path().join("r"))
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (twin, child)
}

/// What a `serve` whose name `node` is held by the node at `url` says last.
fn held_by(node: &str, url: &str) -> String {
    format!(
        "mtunnel: error: node name '{node}' is held by a running mtunnel at {url}; give this \
         node another name (--node, or node = \"...\" in the config file)"
    )
}

/// A second serve with a name a running node holds (its own data dir) refuses to start,
/// names the holder's address and changes nothing in etcd; the node itself, killed with
/// `kill -9` and started again while its old lease still lives, waits that lease out and
/// registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_node_name_is_refused_and_a_restart_after_kill_registers() {
    bounded(120, async {
        let etcd = EtcdCluster::start(3);
        let mut n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        open_eventually(&n1, 800, 20).await;
        let before = (
            etcd.range(0, "/mtunnel/lab/members/"),
            etcd.range(0, "/mtunnel/lab/vmids/"),
        );

        let (_twin, serve) = serve_twin(&n1, "n1");
        let out = tokio::time::timeout(Duration::from_secs(3 * TTL + 15), serve.wait_with_output())
            .await
            .expect("a second serve named n1 did not exit")
            .unwrap();
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().last(),
            Some(held_by("n1", &format!("https://127.0.0.1:{}", n1.port)).as_str())
        );
        let after = (
            etcd.range(0, "/mtunnel/lab/members/"),
            etcd.range(0, "/mtunnel/lab/vmids/"),
        );
        assert_eq!(after, before, "the refused serve changed etcd");
        assert_exists_on(&open(&n2, 800).await.unwrap_err(), 800, "n1");

        // Two start with one new name at once: one wins, the other names the winner.
        let (_ta, a) = serve_twin(&n1, "n3");
        let (_tb, b) = serve_twin(&n1, "n3");
        let (a, b) = (a.wait_with_output(), b.wait_with_output());
        let first = tokio::time::timeout(Duration::from_secs(3 * TTL + 15), async {
            tokio::select! {
                out = a => out,
                out = b => out,
            }
        })
        .await
        .expect("neither serve named n3 exited")
        .unwrap();
        assert!(!first.status.success());
        let winner = etcd.range(0, "/mtunnel/lab/members/n3");
        let url = winner[0].1["api_url"].as_str().unwrap().to_string();
        assert_eq!(
            String::from_utf8_lossy(&first.stderr).lines().last(),
            Some(held_by("n3", &url).as_str())
        );

        // kill -9 and start again: the old lease still holds the name until its TTL.
        let lease_of_n1 = || {
            members(&etcd, 0)
                .into_iter()
                .find(|(key, _)| key.ends_with("/n1"))
                .map(|(_, lease)| lease)
        };
        let old = lease_of_n1();
        assert!(old.is_some());
        n1.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = lease_of_n1();
            if now.is_some() && now != old {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n1 not registered again\n{}",
                n1.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            n1.log()
                .contains("node name 'n1' is registered on another etcd lease"),
            "{}",
            n1.log()
        );
        // Its key is written a moment before the node counts itself registered.
        open_eventually(&n1, 801, 10).await;
        // The killed run's reservation went with its lease.
        open_eventually(&n2, 800, 20).await;
    })
    .await;
}

/// The answer a probe of `/nodes/{node}/storage` through `via` gets with `token` (none if
/// empty), and how long it took.
async fn probe(via: &TestServer, node: &str, token: &str) -> (String, Duration) {
    let started = Instant::now();
    let err = via
        .client_with(token)
        .get(&format!("/nodes/{node}/storage"), &[])
        .await
        .expect_err("a probe without a valid token must fail");
    (format!("{err:?}"), started.elapsed())
}

/// Issue 18 item 5: forwarding asks etcd only for callers this node authenticated. A
/// missing, malformed, unknown or wrong token gets the local 401 after the auth failure
/// delay, the same for a live member and for a name that is none, and no etcd read (a
/// flood of such probes leaves etcd's Range count at its background rate). An
/// authenticated caller is still forwarded, and learns a missing name with PVE's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_probes_learn_nothing_and_read_nothing_from_etcd() {
    bounded(60, async {
        let etcd = EtcdCluster::start(3);
        let delay = Duration::from_millis(300);
        let n1 = TestServer::start_with(Options {
            node: Some("n1".into()),
            auth_delay_ms: Some(delay.as_millis() as u64),
            extra_tables: etcd.cluster_toml("lab", TTL, ETCD_TIMEOUT),
            ..Options::default()
        });
        let n2 = node(&etcd, "n2");
        let token = same_token_on(&[&n1, &n2], "fleet@pve!probe", "PVEAuditor").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = n1.client_with(&token).get("/nodes/n2/storage", &[]).await {
            assert!(Instant::now() < deadline, "n2 not reachable via n1: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = etcd.range_requests();
        let wrong_secret = format!("{}x", token);
        for bad in [
            "",
            "PVEAPIToken=garbage",
            "PVEAPIToken=nobody@pve!x=0123456789abcdef0123",
            wrong_secret.as_str(),
        ] {
            let (member, took_member) = probe(&n1, "n2", bad).await;
            let (missing, took_missing) = probe(&n1, "zzz", bad).await;
            assert_eq!(member, missing, "token {bad:?}");
            assert!(member.contains("status: 401"), "{member}");
            assert!(member.contains("authentication failure - "), "{member}");
            assert!(
                took_member >= delay && took_missing >= delay,
                "token {bad:?}"
            );
        }
        let flood = (0..60).map(|i| {
            let node = if i % 2 == 0 { "n2" } else { "zzz" };
            probe(&n1, node, "PVEAPIToken=nobody@pve!x=0123456789abcdef0123")
        });
        futures_util::future::join_all(flood).await;
        let reads = etcd.range_requests() - before;
        // 68 probes; the nodes' own background reads over these seconds are far fewer.
        assert!(reads < 30, "{reads} etcd range reads during the probes");

        let missing = n1
            .client_with(&token)
            .get("/nodes/zzz/storage", &[])
            .await
            .unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("unable to get IP for node 'zzz' - node offline?"),
            "{missing}"
        );
    })
    .await;
}

/// The control WebSocket of `tunnel` (open on `owner`) through `via`'s address.
async fn connect_via(
    via: &TestServer,
    owner: &str,
    tunnel: &common::Tunnel,
    token: &str,
) -> Result<mtunnel::net::ws::WsStream, ApiError> {
    let url = format!(
        "wss://127.0.0.1:{}/api2/json/nodes/{owner}/qemu/{}/mtunnelwebsocket?ticket={}&socket={}",
        via.port,
        tunnel.vmid,
        common::pct(&tunnel.ticket),
        common::pct(&tunnel.socket)
    );
    let headers = [("Authorization".to_string(), token.to_string())];
    let ws = mtunnel::net::ws::connect(&url, &headers, &via.fingerprint).await;
    ws.map_err(ApiError::from)
}

/// Issue 18 item 6: a WebSocket upgrade n1 would forward to n2 takes one of n1's
/// `max_connections` slots like any request (over the cap: n1's 503, nothing reaches n2),
/// and a forwarded WebSocket that carries no bytes either way for n1's
/// `peer_timeout_secs` is closed on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_websockets_count_against_the_cap_and_close_when_idle() {
    use futures_util::StreamExt;
    bounded(60, async {
        let etcd = EtcdCluster::start(3);
        let n1 = TestServer::start_with(Options {
            node: Some("n1".into()),
            extra_toml: "max_connections = 2\npeer_timeout_secs = 1\n".into(),
            extra_tables: etcd.cluster_toml("lab", TTL, ETCD_TIMEOUT),
            ..Options::default()
        });
        let n2 = node(&etcd, "n2");
        let token = same_token_on(&[&n1, &n2], "fleet@pve!ws", "Administrator").await;
        // Opened on n2 itself: no earlier connection of this test holds (and later frees)
        // one of n1's slots while the holders below take them.
        let data = n2
            .client_with(&token)
            .post("/nodes/n2/qemu/620/mtunnel", &[])
            .await
            .unwrap();
        let tunnel = common::Tunnel::from_reply(620, &data);

        // Both slots held (accepted, no TLS handshake yet): the upgrade is refused by n1.
        let holders: Vec<_> = (0..2)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", n1.port)).unwrap())
            .collect();
        match connect_via(&n1, "n2", &tunnel, &token).await {
            Err(ApiError::Http {
                status, message, ..
            }) => {
                assert_eq!(status, 503);
                assert_eq!(
                    message,
                    "too many connections (max_connections = 2) - try again later\n"
                );
            }
            Err(e) => panic!("expected n1's 503, got {e}"),
            Ok(_) => panic!("a forwarded upgrade over the cap got through"),
        }
        drop(holders);

        // With slots free it is forwarded; silent, it is closed after peer_timeout_secs.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ws = loop {
            match connect_via(&n1, "n2", &tunnel, &token).await {
                Ok(ws) => break ws,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ended = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(msg)) if msg.is_close() => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "an idle forwarded WebSocket stayed open");
        assert!(
            n1.log().contains("no bytes either way for 1 s"),
            "{}",
            n1.log()
        );
    })
    .await;
}

/// How far a hand-driven tunnel of the fencing test got before its node was paused.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Reached {
    /// A disk allocated (an import or a mirror under way).
    Disk,
    /// The config written, locked `migrate` (offline: `unlock` comes next).
    Config,
    /// The target QEMU started, waiting for the RAM (online: `resume` comes next).
    Started,
    /// Unlocked: the migration was committed.
    Committed,
}

/// Drives a tunnel of `vmid` on `server` through its commands up to `reached`.
async fn drive(server: &TestServer, vmid: u32, reached: Reached) -> Ctl {
    let tunnel = common::Tunnel::from_reply(vmid, &open(server, vmid).await.unwrap());
    let mut ctl = Ctl::open(server, server.port, &tunnel).await;
    ctl.ok(json!({"cmd": "version"})).await;
    let disk = ctl
        .ok(json!({"cmd": "disk", "format": "raw", "storage": "local",
                    "drive": {"interface": "scsi", "index": 0, "size": 4 << 20}}))
        .await;
    if reached == Reached::Disk {
        return ctl;
    }
    let drivestr = disk["drivestr"].as_str().unwrap().to_string();
    let conf =
        format!("lock: migrate\nmemory: 64\nscsi0: {drivestr}\nscsihw: virtio-scsi-single\n");
    ctl.ok(json!({"cmd": "config", "conf": conf, "firewall-config": null}))
        .await;
    match reached {
        Reached::Started => {
            ctl.ok(json!({
                "cmd": "start",
                "start_params": {"statefile": "unix", "forcemachine": null, "forcecpu": null, "skiplock": 1},
                "migrate_opts": {
                    "spice_ticket": null, "type": "websocket", "network": null,
                    "storagemap": {"default": "local"}, "migratedfrom": "src1",
                    "nbd_proto_version": 1, "remote_node": "n3",
                    "nbd": {"scsi0": {"drivestr": drivestr, "volid": disk["volid"], "success": true}},
                },
            }))
            .await;
            assert!(common::pid_of(server, vmid).is_some(), "target QEMU runs");
        }
        Reached::Committed => {
            ctl.ok(json!({"cmd": "unlock"})).await;
        }
        _ => {}
    }
    ctl
}

/// The refusal of a fenced tunnel's `cmd`: another node took `vmid` meanwhile.
fn assert_fenced(reply: &Value, cmd: &str, vmid: u32) {
    let taken = format!(
        "VM {vmid} belongs to node 'n1' now: this node's reservation lapsed with its etcd \
         lease (the node was paused or cut off from etcd longer than the lease TTL)"
    );
    let msg = reply["msg"].as_str().unwrap_or_default();
    let expected = match cmd {
        "resume" => vec![format!(
            "failed to handle 'resume' command - VM {vmid} was not resumed: {taken}"
        )],
        // Refused at once (the node already knew) or at the commit (it learnt there).
        "unlock" => vec![
            format!("failed to handle 'unlock' command - {taken}"),
            format!("failed to handle 'unlock' command - VM {vmid} was not unlocked: {taken}"),
        ],
        _ => vec![format!("failed to handle '{cmd}' command - {taken}")],
    };
    assert!(
        reply["success"] == false && expected.iter().any(|e| e == msg),
        "{cmd} of VM {vmid}: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_never_commits_a_vmid_another_node_took() {
    use nix::sys::signal::Signal;
    common::require_qemu();
    bounded(180, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n3 = node(&etcd, "n3");
        let phases = [
            (801, Reached::Disk, "config"),
            (802, Reached::Config, "unlock"),
            (803, Reached::Started, "resume"),
        ];
        let mut ctls = Vec::new();
        for (vmid, reached, _) in phases {
            ctls.push(drive(&n3, vmid, reached).await);
        }
        let mut committed = drive(&n3, 804, Reached::Committed).await;
        // Paused past its lease TTL, n3's reservations lapse and n1 takes the VMIDs; the
        // one n3 committed has no lease to lapse.
        n3.signal(Signal::SIGSTOP);
        for (vmid, _, _) in phases {
            open_eventually(&n1, vmid, 30).await;
        }
        assert_exists_on(&open(&n1, 804).await.unwrap_err(), 804, "n3");
        n3.signal(Signal::SIGCONT);
        // Back, n3's tunnels take no step that would make a second owner: the commit
        // points at once (they race n3 learning of its lapsed lease), ...
        for ((vmid, _, cmd), ctl) in phases.iter().zip(ctls.iter_mut()).skip(1) {
            let reply = ctl.send(&json!({"cmd": cmd})).await;
            assert_fenced(&reply, cmd, *vmid);
        }
        // ... and once n3 knows, any command but `quit`.
        let lost = "re-reserving VMID after a new lease: node 'n1' took VM 801";
        assert!(
            common::eventually(Duration::from_secs(10), || n3.log().contains(lost)).await,
            "n3 never noticed: {}",
            n3.log()
        );
        let conf = "lock: migrate\nmemory: 64\n";
        let reply = ctls[0]
            .send(&json!({"cmd": "config", "conf": conf, "firewall-config": null}))
            .await;
        assert_fenced(&reply, "config", 801);
        for ctl in &mut ctls {
            ctl.ok(json!({"cmd": "quit", "cleanup": 1})).await;
        }
        for (vmid, _, _) in phases {
            assert!(
                common::eventually(Duration::from_secs(10), || !n3.vm_config(vmid).exists()).await,
                "n3 kept the config of VM {vmid}"
            );
            assert!(
                common::pid_of(&n3, vmid).is_none(),
                "QEMU of {vmid} runs on"
            );
            assert_exists_on(&open(&n3, vmid).await.unwrap_err(), vmid, "n1");
        }
        committed.ok(json!({"cmd": "quit", "cleanup": 0})).await;
        assert!(n3.vm_config(804).exists());
        // Each VMID has one owner, as every node sees it.
        let expect = json!([
            {"id": "qemu/801", "vmid": 801, "type": "qemu", "node": "n1", "status": "stopped"},
            {"id": "qemu/802", "vmid": 802, "type": "qemu", "node": "n1", "status": "stopped"},
            {"id": "qemu/803", "vmid": 803, "type": "qemu", "node": "n1", "status": "stopped"},
            {"id": "qemu/804", "vmid": 804, "type": "qemu", "node": "n3", "status": "stopped"},
        ]);
        for server in [&n1, &n3] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let vms = server
                    .client()
                    .get("/cluster/resources", &[("type", "vm")])
                    .await
                    .unwrap();
                if vms == expect {
                    break;
                }
                assert!(Instant::now() < deadline, "two owners? {vms}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    })
    .await;
}

/// Whether a `mtunnel migrate` run on `src` reports RAM sent (its progress, in the
/// `cli*.err` files `mt` writes; the source QEMU's QMP socket is the migration's).
fn ram_moving(src: &TestServer) -> bool {
    let Ok(dir) = std::fs::read_dir(src.base()) else {
        return false;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".err"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .any(|text| {
            text.lines().any(|l| {
                l.contains(" RAM: ") && l.contains(", remaining ") && !l.contains(" RAM: 0 B of")
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_onto_a_paused_node_leaves_the_source_running() {
    use nix::sys::signal::Signal;
    common::require_qemu();
    bounded(180, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n3 = node(&etcd, "n3");
        let src = TestServer::start();
        common::mt_ok(&src, &["vm", "create", "810", "--memory", "128"]).await;
        // 24 MiB of random RAM at 2 MiB/s: the RAM still moves while n3 is paused.
        let blob = src.data.parent().unwrap().join("blob810");
        common::blob(&blob, 24 << 20);
        let loader = format!(
            "--qemu-arg=loader,file={},addr=16777216,force-raw=on",
            blob.display()
        );
        common::mt_ok(&src, &["vm", "start", "810", "--qemu-arg=-device", &loader]).await;
        let conf_before = std::fs::read_to_string(src.vm_config(810)).unwrap();
        let target = common::target_arg(&n3, n3.port);
        let args = [
            "migrate",
            "810",
            "--online",
            "--target",
            &target,
            "--target-storage",
            "local",
            "--bwlimit",
            "2048",
        ];
        let pause_n3 = async {
            let moving = common::eventually(Duration::from_secs(60), || ram_moving(&src));
            assert!(moving.await, "the RAM migration never started");
            n3.signal(Signal::SIGSTOP);
            open_eventually(&n1, 810, 30).await;
            n3.signal(Signal::SIGCONT);
        };
        let (out, ()) = tokio::join!(mt(&src, &args), pause_n3);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        // Refused at `resume`, after the RAM moved and paused the source VM; the source
        // knows the target runs nothing, so its own VM runs on.
        assert!(
            stderr.contains(
                "failed to handle 'resume' command - VM 810 was not resumed: VM 810 belongs \
                 to node 'n1' now: this node's reservation lapsed"
            ),
            "{stderr}"
        );
        assert!(stderr.contains("source VM 810 runs on"), "{stderr}");
        let st = common::qmp(&src.run, 810, "query-status", Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        assert_eq!(
            std::fs::read_to_string(src.vm_config(810)).unwrap(),
            conf_before
        );
        assert!(
            common::eventually(Duration::from_secs(10), || !n3.vm_config(810).exists()).await,
            "n3 kept the config"
        );
        assert!(common::pid_of(&n3, 810).is_none(), "n3's QEMU runs on");
        assert_exists_on(&open(&n3, 810).await.unwrap_err(), 810, "n1");
        common::mt_ok(&src, &["vm", "stop", "810"]).await;
    })
    .await;
}

/// A member record as anyone who can write etcd could store it: `secret` signs it (empty:
/// unsigned).
fn forged_record(node: &str, api_url: &str, fingerprint: &str, secret: &[u8]) -> Vec<u8> {
    use mtunnel::cluster::{MemberRecord, identity};
    let mut r = MemberRecord {
        node: node.into(),
        api_url: api_url.into(),
        fingerprint: fingerprint.into(),
        version: "0.0.0".into(),
        signature: String::new(),
    };
    if !secret.is_empty() {
        r.signature = identity::sign(secret, "lab", &r);
    }
    serde_json::to_vec(&r).unwrap()
}

/// A listener that counts the connections it gets (where forged records point).
async fn trap() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(tcp);
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_member_records_are_refused_and_a_nodes_own_is_repaired() {
    bounded(120, async {
        let etcd = EtcdCluster::start(3);
        let n1 = node(&etcd, "n1");
        let n2 = node(&etcd, "n2");
        let token = same_token_on(&[&n1, &n2], "fleet@pve!f", "Administrator").await;
        let api =
            mtunnel::client::ApiClient::new("127.0.0.1", n1.port, token, n1.fingerprint.clone())
                .unwrap();
        let (port, hits) = trap().await;
        let at_trap = format!("https://127.0.0.1:{port}");
        let secret = std::fs::read_to_string(etcd.member_secret()).unwrap();
        let secret = secret.trim().as_bytes();
        let key = |name: &str| format!("/mtunnel/lab/members/{name}");
        // Names no node has, on a lease the writer keeps (as a live member's would be):
        // unsigned, signed with another secret, signed but plain http; and a validly
        // signed copy on no lease (a replayed old record).
        let fp = &n2.fingerprint;
        let lease = etcd.grant_lease(0, 600);
        let forge = |name: &str, value: Vec<u8>| etcd.put_on_lease(0, &key(name), &value, lease);
        forge("evil", forged_record("evil", &at_trap, fp, b""));
        let other = b"another cluster's secret 0123";
        forge("other", forged_record("other", &at_trap, fp, other));
        let plain = format!("http://127.0.0.1:{port}");
        forge("plain", forged_record("plain", &plain, fp, secret));
        let replay = forged_record("replay", &at_trap, fp, secret);
        etcd.put(0, &key("replay"), &replay);
        for name in ["evil", "other", "plain", "replay"] {
            let err = api
                .get(&format!("/nodes/{name}/storage"), &[])
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!(
                    "unable to get IP for node '{name}' - node offline?"
                )),
                "{name}: {err}"
            );
        }
        let ignoring = |name: &str, why: &str| {
            format!("ignoring the member record /mtunnel/lab/members/{name}: {why}")
        };
        let log = n1.log();
        for line in [
            ignoring("evil", "it carries no signature"),
            ignoring("other", "its signature does not match"),
            ignoring(
                "plain",
                &format!("its address {plain} is plain http:// while this node serves https://"),
            ),
            ignoring(
                "replay",
                "it is on no lease (not written by a running mtunnel)",
            ),
        ] {
            assert!(log.contains(&line), "no '{line}' in\n{log}");
        }
        let status = api.get("/cluster/status", &[]).await.unwrap();
        let names: Vec<&str> = status
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        assert_eq!(names, ["lab", "n1", "n2"], "{status}");

        // n2's own record overwritten: forwarding never follows it, n2 writes it back.
        let original = etcd.range(0, &key("n2"));
        assert_eq!(original.len(), 1, "{original:?}");
        etcd.put(0, &key("n2"), &forged_record("n2", &at_trap, fp, b""));
        let deadline = Instant::now() + Duration::from_secs(15);
        while etcd.range(0, &key("n2")) != original {
            let _ = api.get("/nodes/n2/storage", &[]).await;
            assert!(Instant::now() < deadline, "n2 did not repair its record");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let repaired = format!(
            "the member record of this node was changed by someone else (it gave {at_trap} \
             on lease 0); writing it back"
        );
        assert!(n2.log().contains(&repaired), "{}", n2.log());
        // (n1 may still have the forged record's refusal cached for a second.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = api.get("/nodes/n2/storage", &[]).await {
            assert!(
                Instant::now() < deadline,
                "n2 unreachable after the repair: {e}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A starting node overwrites an unsigned record of its name (on a live lease
        // that is not its own) instead of waiting for that lease.
        forge("n3", forged_record("n3", &at_trap, fp, b""));
        let n3 = node(&etcd, "n3");
        let n3_url = format!("https://127.0.0.1:{}", n3.port);
        let took_over = common::eventually(Duration::from_secs(10), || {
            etcd.range(0, &key("n3"))
                .first()
                .is_some_and(|(_, v, lease)| v["api_url"] == n3_url.as_str() && *lease != 0)
        });
        assert!(took_over.await, "{:?}", etcd.range(0, &key("n3")));
        assert!(
            n3.log()
                .contains(&ignoring("n3", "it carries no signature")),
            "{}",
            n3.log()
        );
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a forged record was followed"
        );
    })
    .await;
}

/// A member of the cluster whose VMs run under TCG (as the replica tests' nodes).
fn tcg_member(etcd: &EtcdCluster, name: &str) -> TestServer {
    common::require_qemu();
    TestServer::start_with(Options {
        node: Some(name.to_string()),
        extra_toml: "qemu_accel = \"tcg\"\n".into(),
        extra_tables: etcd.cluster_toml("lab", TTL, ETCD_TIMEOUT),
        ..Options::default()
    })
}

/// `server`'s `GET /cluster/resources?type=vm`.
async fn vm_entries(server: &TestServer) -> Value {
    server
        .client()
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .expect("GET /cluster/resources")
}

/// Polls `server`'s VM entries until they are `want`: at most 15 s, every 250 ms (a node
/// publishes what changed within its reconcile period, 3 s).
async fn wait_vm_entries(server: &TestServer, want: &Value) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let vms = vm_entries(server).await;
        if &vms == want {
            return;
        }
        assert!(Instant::now() < deadline, "{vms} != {want}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The replica record of `vmid` on `node` (`{data}/replicas/<vmid>.json`).
fn replica_record(node: &TestServer, vmid: u32) -> Value {
    let path = node.data.join("replicas").join(format!("{vmid}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// A replica made on one node (`mtunnel replicate` straight to it, from a node outside the
/// cluster) is listed by another member's `/cluster/resources` exactly as its own node
/// lists it: status `replica`, its lock, run state, source, points and newest point (from
/// the record); after `replica drop` no node lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_one_node_is_listed_alike_by_every_node_until_dropped() {
    common::require_qemu();
    bounded(180, async {
        let etcd = EtcdCluster::start(1);
        let a = node(&etcd, "ra");
        let b = node(&etcd, "rb");
        let src = common::tcg_node("rsrc");
        let disk = "local:64M:qcow2";
        common::mt_ok(
            &src,
            &["vm", "create", "530", "--memory", "64", "--disk", disk],
        )
        .await;
        let img = src.images(530).join("vm-530-disk-0.qcow2");
        common::qemu_io("qcow2", "write -P 0x5a 0 1M", &img);
        let target = common::target_arg(&b, b.port);
        let args = ["replicate", "530", &target, "--target-storage", "local"];
        common::mt_ok(&src, &args).await;

        let point = &replica_record(&b, 530)["points"][0];
        let want = json!([{"id": "qemu/530", "vmid": 530, "type": "qemu", "node": "rb",
                           "status": "replica", "lock": "replica", "replica-state": "idle",
                           "replica-source": "rsrc/530", "replica-points": 1,
                           "replica-newest": point["name"],
                           "replica-newest-time": point["time"]}]);
        assert_eq!(vm_entries(&b).await, want, "rb's own listing");
        wait_vm_entries(&a, &want).await;
        println!("/cluster/resources from ra: {}", vm_entries(&a).await);

        common::mt_ok(&b, &["replica", "drop", "530"]).await;
        assert_eq!(vm_entries(&b).await, json!([]));
        wait_vm_entries(&a, &json!([])).await;
    })
    .await;
}

/// `mtunnel replicate --target-node` through one member's address: the replica is made on
/// the named member (its `replica list`; the first member holds nothing and lists it
/// through `/cluster/resources`), a second run through the same address sends only the
/// 64 KiB written meanwhile, and a run to any other node (the one answering, or another
/// `--target-node`) is refused, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_with_target_node_through_one_address_lands_on_that_member() {
    common::require_qemu();
    bounded(180, async {
        let etcd = EtcdCluster::start(1);
        let a = node(&etcd, "ta");
        let b = node(&etcd, "tb");
        let src = common::tcg_node("tsrc");
        let token = same_token_on(&[&a, &b], "fleet@pve!repl", "Administrator").await;
        let disk = "local:64M:qcow2";
        common::mt_ok(
            &src,
            &["vm", "create", "550", "--memory", "64", "--disk", disk],
        )
        .await;
        let img = src.images(550).join("vm-550-disk-0.qcow2");
        common::qemu_io("qcow2", "write -P 0x5a 0 1M", &img);
        let via_a = format!(
            "host=127.0.0.1,port={},apitoken={token},fingerprint={}",
            a.port, a.fingerprint
        );
        let run = ["replicate", "550", &via_a, "--target-storage", "local"];
        let to_b = [&run[..], &["--target-node", "tb"]].concat();
        let first = common::mt_ok(&src, &to_b).await;
        assert!(first.contains("(node 'tb')"), "{first}");
        let listed = common::mt_ok(&b, &["replica", "list"]).await;
        assert!(
            listed.lines().any(|l| l.contains(" 550 tsrc/550 ")),
            "{listed}"
        );
        let listed = common::mt_ok(&a, &["replica", "list"]).await;
        assert_eq!(listed.lines().count(), 1, "ta holds no replica: {listed}");
        assert!(!a.vm_config(550).exists(), "ta must keep nothing");
        let point = &replica_record(&b, 550)["points"][0];
        let want = json!([{"id": "qemu/550", "vmid": 550, "type": "qemu", "node": "tb",
                           "status": "replica", "lock": "replica", "replica-state": "idle",
                           "replica-source": "tsrc/550", "replica-points": 1,
                           "replica-newest": point["name"],
                           "replica-newest-time": point["time"]}]);
        wait_vm_entries(&a, &want).await;

        common::qemu_io("qcow2", "write -P 0x6b 8M 64k", &img);
        let second = common::mt_ok(&src, &to_b).await;
        println!("{second}");
        assert!(second.contains("(node 'tb')"), "{second}");
        assert_eq!(number_after(&second, "copied ("), 64 << 10, "{second}");
        let points = || replica_record(&b, 550)["points"].as_array().map(Vec::len);
        assert_eq!(points(), Some(2));

        let refused = mt(&src, &run).await;
        assert!(!refused.status.success());
        assert_eq!(
            String::from_utf8_lossy(&refused.stderr).lines().last(),
            Some(
                "mtunnel: error: VM 550's replica is on node 'tb' of the target's cluster, not \
                 on 'ta': a replica lives on one node - replicate with --target-node tb (or \
                 drop it there with 'mtunnel replica drop 550' on 'tb' to start anew on 'ta'); \
                 nothing was replicated"
            )
        );
        let refused = mt(&src, &[&run[..], &["--target-node", "nowhere"]].concat()).await;
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            err.contains("target node 'nowhere' is not a member of the target's cluster"),
            "{err}"
        );
        assert_eq!(points(), Some(2));
        assert!(!a.vm_config(550).exists(), "ta must keep nothing");
        common::mt_ok(&b, &["replica", "drop", "550"]).await;
    })
    .await;
}

/// The number right after `marker` in `out`.
fn number_after(out: &str, marker: &str) -> u64 {
    let at = out
        .find(marker)
        .unwrap_or_else(|| panic!("no '{marker}' in {out}"))
        + marker.len();
    let digits: String = out[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a number")
}

/// A live migration sent to one member's address finds the replica another member holds
/// (the cluster's `/cluster/resources`) and, without `--target-node`, lands on that member
/// and cuts over to it: the replica run and the migration go through the first member,
/// and only what changed since the replica's run is sent (at most 1 % of the 4 GiB disk,
/// at least the 8 MiB written); then every member lists it as that member's running VM.
/// `--target-node` naming another member is refused first, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_cutover_through_one_node_lands_on_the_replica_and_sends_only_what_changed() {
    common::require_qemu();
    bounded(300, async {
        let etcd = EtcdCluster::start(1);
        let a = tcg_member(&etcd, "ca");
        let b = tcg_member(&etcd, "cb");
        let src = common::tcg_node("csrc");
        let token = same_token_on(&[&a, &b], "fleet@pve!cut", "Administrator").await;
        let disk = "local:4G:qcow2";
        common::mt_ok(
            &src,
            &["vm", "create", "540", "--memory", "128", "--disk", disk],
        )
        .await;
        let img = src.images(540).join("vm-540-disk-0.qcow2");
        let data = src.base().join("data540");
        common::blob(&data, 16 << 20);
        common::qemu_io("qcow2", &format!("write -s {} 0 16M", data.display()), &img);
        std::fs::remove_file(&data).unwrap();
        common::mt_ok(&src, &["vm", "start", "540"]).await;
        let target = common::target_arg(&b, b.port);
        let args = ["replicate", "540", &target, "--target-storage", "local"];
        common::mt_ok(&src, &args).await;
        let hmp = json!({"command-line": "qemu-io -d scsi0 \"write -P 0x5a 100M 8M\""});
        let wrote = common::qmp(&src.run, 540, "human-monitor-command", hmp).await;
        assert_eq!(wrote, json!(""), "HMP qemu-io failed");
        // ca lists the replica once cb published it.
        let deadline = Instant::now() + Duration::from_secs(15);
        while vm_entries(&a).await[0]["status"] != "replica" {
            assert!(Instant::now() < deadline, "{}", vm_entries(&a).await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        let via_a = format!(
            "host=127.0.0.1,port={},apitoken={token},fingerprint={}",
            a.port, a.fingerprint
        );
        let migrate = ["migrate", "540", "--online", "--target", &via_a];
        let migrate = [&migrate[..], &["--target-storage", "local"]].concat();
        let refused = mt(&src, &[&migrate[..], &["--target-node", "ca"]].concat()).await;
        assert_eq!(
            String::from_utf8_lossy(&refused.stderr).lines().last(),
            Some(
                "mtunnel: error: target VMID 540 holds a replica of this VM on node 'cb', not \
                 on 'ca': migrate with --target-node cb to cut over to it"
            )
        );
        assert_eq!(
            replica_record(&b, 540)["points"].as_array().map(Vec::len),
            Some(1)
        );

        let out = mt(&src, &migrate).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        println!("{stdout}");
        assert!(stdout.contains("(node 'cb', VM 540)"), "{stdout}");
        let sent = number_after(&stdout, "cut over to the replica: ");
        assert!(
            sent * 100 <= 4 << 30,
            "{sent} bytes sent: more than 1 %\n{stderr}"
        );
        assert!(sent >= 8 << 20, "the 8 MiB written were sent:\n{stderr}");
        let st = common::qmp(&b.run, 540, "query-status", Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        assert!(!a.vm_config(540).exists(), "ca must keep nothing");
        assert!(
            !b.data.join("replicas/540.json").exists(),
            "the replica is gone"
        );
        let landed = b.images(540).join("vm-540-disk-0.qcow2");
        common::assert_same_guest_bytes(&img, "qcow2", &landed, "qcow2");
        // Every member lists it as cb's running VM now, no replica fields left.
        let want = json!([{"id": "qemu/540", "vmid": 540, "type": "qemu", "node": "cb",
                           "status": "running"}]);
        wait_vm_entries(&a, &want).await;
        assert_eq!(vm_entries(&b).await, want);
        common::mt_ok(&b, &["vm", "stop", "540"]).await;
    })
    .await;
}
