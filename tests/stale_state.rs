//! Issue 17, "nothing stalls, and nothing old destroys something new", seen from the
//! operator's side, each with a real `mtunnel serve` on loopback:
//!
//! * `mtunnel cleanup` (and `--dry-run`) works while `serve` runs and leaves the open
//!   tunnel's reservation alone;
//! * `mtunnel vm destroy --skiplock` given only `--data-dir` finds the run dir of the
//!   data dir's `serve` (recorded in `{data}/serve.lock`) and refuses a VM whose QEMU runs
//!   there, also when its pidfile is gone (its QMP socket answers);
//! * a source VM carrying `mirror-*` block jobs of an earlier, failed migration (one
//!   concluded with an I/O error, one still running) migrates at the first retry;
//! * many tunnels that reserve a VMID and a disk and are then freed leave no lock files
//!   and no empty image directories.
//!
//! QEMU must be installed (`.ci/install-qemu.sh`) for the tests that start VMs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::tcg_node as qemu_node;
use common::{
    BIN, Options, TestServer, bounded, eventually, migrate_online, mt, mt_ok, pid_of, qemu_io, qmp,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn local_images(node: &TestServer) -> PathBuf {
    node.base().join("s/local/images")
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `mtunnel <args>` with no `--config` and no `--run-dir`: what an operator types.
async fn bare(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env("MTUNNEL_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    bounded(60, cmd.output()).await.expect("running mtunnel")
}

/// SIGKILLs a process when dropped (a VM whose pidfile a test moved away).
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

// ---- item 4: cleanup next to a running serve ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_while_serve_runs() {
    let server = TestServer::start();
    // An open tunnel: its reservation (`lock: create`) must survive the cleanup.
    let tunnel = server.open_tunnel(200).await;
    assert_eq!(
        std::fs::read_to_string(server.vm_config(200)).unwrap(),
        "lock: create\n"
    );
    // A volume of a VMID without a config: a leftover cleanup may free while serve runs.
    let orphan_dir = local_images(&server).join("300");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    std::fs::write(orphan_dir.join("vm-300-disk-0.raw"), b"x").unwrap();
    let busy = format!(
        "another mtunnel process (pid {}) holds the data dir {}: only tunnels it gave up on \
         are recovered here",
        server.pid(),
        server.data.display()
    );
    let volid = "'local:300/vm-300-disk-0.raw'";

    let out = mt(&server, &["cleanup", "--dry-run"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        lines(&out),
        [
            busy.clone(),
            format!("would remove orphaned volume {volid} (its VM has no config)"),
        ]
    );
    assert!(orphan_dir.join("vm-300-disk-0.raw").exists());

    let out = mt(&server, &["cleanup"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        lines(&out),
        [
            busy,
            format!("removing orphaned volume {volid} (its VM has no config)"),
            format!("freed orphaned volume {volid}"),
        ]
    );
    assert!(!orphan_dir.join("vm-300-disk-0.raw").exists());
    // The open tunnel and serve are untouched.
    assert_eq!(
        std::fs::read_to_string(server.vm_config(200)).unwrap(),
        "lock: create\n"
    );
    assert!(server.socket(200).exists(), "the tunnel's socket stays");
    let status = server
        .client()
        .get(
            &format!("/nodes/{}/tasks/{}/status", common::NODE, tunnel.upid),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status["status"], "running", "{status}");
}

// ---- item 5: run-dir discovery for admin commands ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_destroy_without_run_dir_refuses_a_running_vm() {
    let node = qemu_node("rd5");
    // serve was told its run dir on the command line only (as `--run-dir`), not in the
    // config file: only the data dir's record knows it.
    let toml = std::fs::read_to_string(&node.config).unwrap();
    let stripped: String = toml
        .lines()
        .filter(|l| !l.starts_with("run_dir"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&node.config, stripped).unwrap();
    let run = node.run.display().to_string();
    mt_ok(
        &node,
        &[
            "vm",
            "create",
            "150",
            "--memory",
            "64",
            "--disk",
            "local:16M:qcow2",
            "--run-dir",
            &run,
        ],
    )
    .await;
    mt_ok(&node, &["vm", "start", "150", "--run-dir", &run]).await;
    let pid = pid_of(&node, 150).expect("VM 150 runs");
    let _kill = KillOnDrop(pid);
    // As a migrated VM waiting for `vm unlock`.
    let conf_path = node.vm_config(150);
    let mut conf = std::fs::read_to_string(&conf_path).unwrap();
    conf.push_str("lock: migrate\n");
    std::fs::write(&conf_path, &conf).unwrap();
    let disk = local_images(&node).join("150/vm-150-disk-0.qcow2");
    assert!(disk.exists());
    let data = node.data.display().to_string();
    let destroy = ["vm", "destroy", "150", "--skiplock", "--data-dir", &data];

    let out = bare(&destroy).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "note: using the run dir {run} of the mtunnel serve (pid {}) of the data dir {data}",
            node.pid()
        )),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("mtunnel: error: VM 150 is running - stop it first\n"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), conf);
    assert!(disk.exists());

    // Without its pidfile the VM still runs: its QMP socket answers.
    let pidfile = node.run.join("150.pid");
    let moved = node.run.join("150.pid.moved");
    std::fs::rename(&pidfile, &moved).unwrap();
    let out = bare(&destroy).await;
    std::fs::rename(&moved, &pidfile).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.ends_with("mtunnel: error: VM 150 is running - stop it first\n"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), conf);
    assert!(disk.exists());
    assert_eq!(pid_of(&node, 150), Some(pid), "the VM still runs");
    mt_ok(&node, &["vm", "stop", "150", "--run-dir", &run]).await;
}

// ---- item 7: stale mirror jobs on the source ----

/// `qemu-nbd` serving a fresh qcow2 image on a UNIX socket; killed when dropped.
struct NbdServer {
    child: Child,
    socket: PathBuf,
}

impl NbdServer {
    async fn start(dir: &Path, size: &str) -> Self {
        let image = dir.join("nbd.qcow2");
        let socket = dir.join("nbd.sock");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(size)
            .status()
            .unwrap();
        assert!(status.success());
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "--format=qcow2", "--export-name=x"])
            .arg(format!("--socket={}", socket.display()))
            .arg(&image)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu-nbd");
        let up = eventually(Duration::from_secs(10), || socket.exists()).await;
        assert!(up, "qemu-nbd made no socket");
        NbdServer { child, socket }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The entry of job `id` in `query-jobs` of VM `vmid`.
async fn job(run: &Path, vmid: u32, id: &str) -> Option<Value> {
    let jobs = qmp(run, vmid, "query-jobs", Value::Null).await;
    jobs.as_array()?.iter().find(|j| j["id"] == id).cloned()
}

/// Polls (every 100 ms, at most `secs`) until job `id` is in `status`; returns it.
async fn wait_job(run: &Path, vmid: u32, id: &str, status: &str, secs: u64) -> Value {
    for _ in 0..secs * 10 {
        if let Some(j) = job(run, vmid, id).await
            && j["status"] == status
        {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "job {id} not {status} after {secs} s: {:?}",
        job(run, vmid, id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_succeeds_despite_mirror_jobs_of_an_earlier_attempt() {
    let src = qemu_node("src7");
    let dst = qemu_node("dst7");
    mt_ok(
        &src,
        &[
            "vm",
            "create",
            "107",
            "--memory",
            "64",
            "--disk",
            "local:32M:qcow2",
            "--disk",
            "local:16M:qcow2",
        ],
    )
    .await;
    qemu_io(
        "qcow2",
        "write -P 0xab 0 8M",
        &local_images(&src).join("107/vm-107-disk-0.qcow2"),
    );
    mt_ok(&src, &["vm", "start", "107"]).await;

    // scsi0: a mirror whose NBD target dies mid-copy (as a frozen link that broke at
    // last) concludes with an I/O error and waits to be dismissed (auto-dismiss off, as
    // a migration's mirror). QEMU takes ~15 s to give up on the dead target.
    let nbd = NbdServer::start(src.base(), "32M").await;
    qmp(
        &src.run,
        107,
        "drive-mirror",
        json!({"job-id": "mirror-scsi0", "device": "drive-scsi0",
               "target": format!("nbd:unix:{}:exportname=x", nbd.socket.display()),
               "format": "nbd", "mode": "existing", "sync": "full", "speed": 1 << 20,
               "auto-dismiss": false}),
    )
    .await;
    wait_job(&src.run, 107, "mirror-scsi0", "running", 10).await;
    drop(nbd);
    let concluded = wait_job(&src.run, 107, "mirror-scsi0", "concluded", 90).await;
    assert!(concluded["error"].is_string(), "{concluded}");
    // scsi1: a mirror still running (READY) to a file nobody cancelled.
    qmp(
        &src.run,
        107,
        "drive-mirror",
        json!({"job-id": "mirror-scsi1", "device": "drive-scsi1",
               "target": src.base().join("stale.raw").display().to_string(),
               "format": "raw", "mode": "absolute-paths", "sync": "full",
               "auto-dismiss": false}),
    )
    .await;
    wait_job(&src.run, 107, "mirror-scsi1", "ready", 30).await;

    let out = migrate_online(&src, &dst, 107).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}\n{stderr}");
    assert!(
        stderr
            .contains("ended block job(s) mirror-scsi0, mirror-scsi1 left by an earlier migration"),
        "{stderr}"
    );
    let st = qmp(&dst.run, 107, "query-status", Value::Null).await;
    assert_eq!(st["status"], "running", "{st}");
    mt_ok(&dst, &["vm", "stop", "107"]).await;
}

// ---- item 12: many tunnels leave nothing behind ----

/// Sends one command line on a tunnel's control WebSocket and reads the reply line.
async fn command(ws: &mut mtunnel::net::ws::WsStream, cmd: Value) -> Value {
    ws.send(Message::binary(format!("{cmd}\n").into_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            return serde_json::from_slice(&buf[..pos]).unwrap();
        }
        match bounded(30, ws.next()).await {
            Some(Ok(Message::Binary(data))) => buf.extend_from_slice(&data),
            Some(Ok(Message::Text(text))) => buf.extend_from_slice(text.as_bytes()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("no reply to {cmd}: {other:?}"),
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_freed_tunnels_leave_no_lock_files_or_image_dirs() {
    let server = TestServer::start();
    for i in 0..20 {
        let vmid = 500 + i;
        let tunnel = server.open_tunnel(vmid).await;
        let url = server.ws_url(vmid, &tunnel.socket, &tunnel.ticket);
        let mut ws = mtunnel::net::ws::connect(
            &url,
            &[("Authorization".into(), server.root_token.clone())],
            &server.fingerprint,
        )
        .await
        .unwrap();
        let reply = command(
            &mut ws,
            json!({"cmd": "disk", "format": "raw", "storage": "local",
                   "drive": {"interface": "scsi", "index": 0, "size": 1 << 20}}),
        )
        .await;
        assert_eq!(reply["success"], true, "{reply}");
        assert!(local_images(&server).join(vmid.to_string()).is_dir());
        // Gone without `quit`: the tunnel frees its volume and reservation.
        drop(ws);
        let status = server.wait_stopped(&tunnel.upid, 30).await;
        assert_ne!(status["exitstatus"], "OK", "{status}");
    }
    let clean = eventually(Duration::from_secs(10), || {
        entries(&server.data.join("qemu-server")).is_empty()
            && entries(&server.data.join("lock")).is_empty()
            && entries(&local_images(&server)).is_empty()
    })
    .await;
    assert!(
        clean,
        "left: configs {:?}, lock files {:?}, image dirs {:?}",
        entries(&server.data.join("qemu-server")),
        entries(&server.data.join("lock")),
        entries(&local_images(&server))
    );
}

// ---- items 2, 3, 11: journals and sockets that are not what they seem ----

/// A journal as a tunnel of VM `vmid` writes it, with `extra` merged in; its owner is a
/// process of another boot (dead).
fn journal(vmid: u32, upid: &str, extra: Value) -> Value {
    let mut j = json!({
        "vmid": vmid, "upid": upid,
        "owner": {"pid": 1, "pstart": 1, "boot_id": "another-boot"},
        "reservation": "0123456789abcdef0123456789abcdef",
        "preexisting": {}, "volumes": [], "import_running": false, "vm_started": false,
        "resume_requested": false, "committed": false, "firewall_written": false,
        "expected_lock": "migrate", "sockets": [],
    });
    for (k, v) in extra.as_object().unwrap() {
        j[k] = v.clone();
    }
    j
}

fn tunnel_upid(node: &str, vmid: u32, start: u32) -> String {
    format!("UPID:{node}:00000001:00000001:{start:08X}:qmtunnel:{vmid}:root@pam:")
}

fn plant(dir: &Path, file: &str, j: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_vec(j).unwrap()).unwrap();
    path
}

fn json_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Issue 17 (3): journals that name a socket outside the run dir, a UPID that walks out
/// of `tunnels/`, no expected lock, or another file name than their UPID are set aside
/// (`tunnels/rejected/`), never acted on, and not read again at the next start; a
/// well-formed journal whose reservation is not the config's leaves that VM alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_journals_are_set_aside_and_never_acted_on() {
    bounded(120, async {
        let mut node = qemu_node("cj1");
        let create = [
            "vm",
            "create",
            "160",
            "--memory",
            "64",
            "--disk",
            "local:16M:qcow2",
        ];
        mt_ok(&node, &create).await;
        mt_ok(&node, &["vm", "start", "160"]).await;
        let pid = pid_of(&node, 160).expect("VM 160 runs");
        let _kill = KillOnDrop(pid);
        // Locked as every migrated VM waiting for `vm unlock` is.
        let mut conf = std::fs::read_to_string(node.vm_config(160)).unwrap();
        conf.push_str("lock: migrate\n");
        std::fs::write(node.vm_config(160), &conf).unwrap();
        let disk = local_images(&node).join("160/vm-160-disk-0.qcow2");
        node.kill();

        let dir = node.data.join("tunnels");
        let outside = node.base().join("outside.sock");
        std::fs::write(&outside, "keep").unwrap();
        let walked_to = node.base().join("victim.json");
        std::fs::write(&walked_to, "keep").unwrap();
        let no_lock = tunnel_upid("cj1", 160, 1);
        let all_of_it = json!({"vm_started": true, "expected_lock": null,
                               "volumes": ["local:160/vm-160-disk-0.qcow2"]});
        plant(
            &dir,
            &format!("{no_lock}.json"),
            &journal(160, &no_lock, all_of_it),
        );
        let foreign = tunnel_upid("cj1", 160, 2);
        let same_lock = json!({"vm_started": true, "volumes": ["local:160/vm-160-disk-0.qcow2"]});
        plant(
            &dir,
            &format!("{foreign}.json"),
            &journal(160, &foreign, same_lock),
        );
        let sock = tunnel_upid("cj1", 161, 3);
        let sockets = json!({"sockets": [outside]});
        plant(&dir, &format!("{sock}.json"), &journal(161, &sock, sockets));
        plant(&dir, "x.json", &journal(162, "../../victim", json!({})));
        let renamed = tunnel_upid("cj1", 163, 4);
        let other_name = format!("{}.json", tunnel_upid("cj1", 163, 5));
        plant(&dir, &other_name, &journal(163, &renamed, json!({})));

        node.restart();
        // Recovery runs before serve answers.
        node.client().get("/version", &[]).await.unwrap();
        assert_eq!(pid_of(&node, 160), Some(pid), "VM 160 must keep running");
        assert_eq!(std::fs::read_to_string(node.vm_config(160)).unwrap(), conf);
        assert!(disk.exists(), "VM 160's disk must stay");
        assert!(
            outside.exists() && walked_to.exists(),
            "files outside were removed"
        );
        assert_eq!(
            json_files(&dir),
            Vec::<String>::new(),
            "journals left to run again"
        );
        let rejected = json_files(&dir.join("rejected"));
        assert_eq!(rejected.len(), 4, "{rejected:?}");
        let log = node.log();
        for why in [
            "it expects the lock None, not 'create', 'migrate' or 'replica'".to_string(),
            format!(
                "socket {} is not a tunnel socket of VM 161",
                outside.display()
            ),
            "'../../victim' is not a UPID".to_string(),
            format!("its file name does not match its UPID '{renamed}'"),
            "cleanup: the config of VM 160 is not one this tunnel reserved (no reservation of \
             it is on record) - leaving that VM, its config, its volumes and its sockets alone"
                .to_string(),
        ] {
            assert!(
                log.contains(&why),
                "serve's log does not say {why:?}:\n{log}"
            );
        }
        // Set aside means not read again.
        node.restart();
        node.client().get("/version", &[]).await.unwrap();
        assert_eq!(json_files(&dir.join("rejected")).len(), 4);
        assert_eq!(pid_of(&node, 160), Some(pid));
    })
    .await
}

/// Issue 17 (2): `vm unlock` and `vm destroy` retire what older tunnels of the VMID left
/// in their journals (an abandoned one is removed; one of a dead process is marked
/// released, so recovery only ends its task log), and say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_unlock_and_destroy_retire_older_journals() {
    bounded(60, async {
        let node = TestServer::start_with(Options {
            node: Some("rj1".into()),
            ..Options::default()
        });
        mt_ok(&node, &["vm", "create", "170", "--memory", "64"]).await;
        let dir = node.data.join("tunnels");
        let abandoned = tunnel_upid("rj1", 170, 1);
        let path = plant(
            &dir,
            &format!("{abandoned}.json"),
            &journal(170, &abandoned, json!({"abandoned": true})),
        );
        let out = mt_ok(&node, &["vm", "unlock", "170"]).await;
        assert_eq!(
            out,
            format!(
                "VM 170 was not locked\nretired the journal of tunnel {abandoned} (an operator \
                 unlocked the VM)\n"
            )
        );
        assert!(!path.exists());
        let dead = tunnel_upid("rj1", 170, 2);
        let path = plant(
            &dir,
            &format!("{dead}.json"),
            &journal(170, &dead, json!({})),
        );
        let out = mt_ok(&node, &["vm", "destroy", "170"]).await;
        assert!(
            out.ends_with(&format!(
                "VM 170 destroyed\nretired the journal of tunnel {dead} (an operator destroyed \
                 the VM)\n"
            )),
            "{out}"
        );
        let kept: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept["released"], true, "{kept}");
    })
    .await
}

/// Issue 17 (11): start-up recovery removes a `{vmid}.migrate` socket only when nothing
/// listens on it (connecting is refused), not whenever our own QEMU is not running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_keeps_a_socket_something_listens_on() {
    bounded(60, async {
        let mut node = TestServer::start_with(Options {
            node: Some("sk1".into()),
            ..Options::default()
        });
        node.kill();
        let live = node.run.join("344.migrate");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let stale = node.run.join("345.migrate");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        node.restart();
        node.client().get("/version", &[]).await.unwrap();
        assert!(live.exists(), "a socket something listens on was removed");
        assert!(!stale.exists(), "a socket nothing listens on stayed");
    })
    .await
}
