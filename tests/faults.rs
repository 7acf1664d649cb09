//! The fault matrix of issue 8, "Nothing left behind, under every fault": for each phase
//! of a migration (disk allocated, disk import mid-stream, config written, target QEMU
//! started, drive-mirror running, RAM migration running, target resumed) and each fault
//! (TCP reset, a half-open peer that stops answering, SIGTERM to `serve`, `kill -9` of
//! `serve` and a restart on the same directories, the target QEMU killed, a full storage,
//! a failing `qemu-img`), the END STATE is asserted:
//!
//! * the target holds nothing the tunnel created (reserved config, volumes, sockets in the
//!   run dir, QEMU process, tunnel journal), its task log names what was freed and ends
//!   `TASK ERROR: ...`, and the same VMID can be opened (or migrated) again at once;
//! * once `resume` succeeded, the migrated VM keeps running with its config (`lock:
//!   migrate` until `mtunnel vm unlock`), whatever happens to the tunnel or to `serve`;
//! * a `mtunnel migrate` source ends with its VM running (or stopped, offline), unlocked,
//!   its config unchanged, and a retry of the same migration succeeds.
//!
//! Early phases are driven with raw tunnel commands over the control WebSocket, the live
//! ones with `mtunnel migrate --online` and real QEMU (TCG), as in `migration.rs`. Faults
//! on the wire are made by [`FaultProxy`], a TCP relay in front of the target that can
//! reset every connection (RST, no close frame) or freeze (keep the sockets open, forward
//! nothing). Every wait is a bounded poll; timeouts of the server come from its config
//! (`peer_timeout_secs`, `tunnel_accept_timeout_secs`).
//!
//! [`MATRIX`] lists one row per test (docs/faults.md shows it); `matrix_rows_have_tests` keeps
//! the table and the tests in step.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::ctl::Ctl;
use common::proxy::FaultProxy;
use common::{
    NODE, Options, TestServer, bounded, eventually, mt_ok, pct, pid_of, qemu_io, qmp, require_qemu,
    start_with_ram, target_arg,
};
use futures_util::SinkExt;
use mtunnel::net::ws::WsStream;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// One row per test: (fault, phase, the target ends with, the source ends with, test fn).
pub const MATRIX: &[(&str, &str, &str, &str, &str)] = &[
    (
        "TCP reset",
        "disk alloc running",
        "reply fails; the volume made after the cut + config freed, TASK ERROR",
        "raw tunnel (test client)",
        "reset_while_disk_alloc_runs",
    ),
    (
        "TCP reset",
        "disk alloc",
        "volume + config freed, TASK ERROR, VMID reusable",
        "raw tunnel (test client)",
        "reset_after_disk_alloc",
    ),
    (
        "half-open peer",
        "disk alloc",
        "dropped after peer_timeout_secs, volume + config freed, TASK ERROR",
        "raw tunnel (test client)",
        "half_open_peer_after_disk_alloc",
    ),
    (
        "serve SIGTERM",
        "disk alloc",
        "serve exits 0 after freeing volume + config, TASK ERROR",
        "raw tunnel (test client)",
        "sigterm_after_disk_alloc",
    ),
    (
        "failing qemu-img",
        "disk alloc",
        "'disk' fails, no partial volume, config freed on EOF, TASK ERROR",
        "raw tunnel (test client)",
        "failing_qemu_img_on_disk_alloc",
    ),
    (
        "TCP reset",
        "disk import mid-stream",
        "import aborted, partial volume + config freed, TASK ERROR",
        "raw tunnel (test client)",
        "reset_mid_disk_import",
    ),
    (
        "serve kill -9 + restart",
        "disk import mid-stream",
        "freed at start before accepting, TASK ERROR mentions the restart",
        "raw tunnel (test client)",
        "kill9_mid_disk_import_then_restart",
    ),
    (
        "storage full (tmpfs)",
        "disk import mid-stream",
        "import fails with ENOSPC, source quits with cleanup: partial volume + config freed",
        "stopped, unlocked, config unchanged; retry succeeds",
        "storage_full_during_offline_import",
    ),
    (
        "failing qemu-img",
        "disk import (check)",
        "source quits with cleanup: imported volume + config freed",
        "stopped, unlocked, config unchanged; retry succeeds",
        "failing_qemu_img_during_offline_import",
    ),
    (
        "half-open peer",
        "config",
        "dropped after peer_timeout_secs, volume + config freed, TASK ERROR",
        "raw tunnel (test client)",
        "half_open_peer_after_config",
    ),
    (
        "serve kill -9 + restart",
        "config",
        "freed at start before accepting, TASK ERROR mentions the restart",
        "raw tunnel (test client)",
        "kill9_after_config_then_restart",
    ),
    (
        "TCP reset",
        "start",
        "QEMU stopped, volume + config + sockets freed, TASK ERROR",
        "raw tunnel (test client)",
        "reset_after_start",
    ),
    (
        "serve SIGTERM",
        "start",
        "serve exits 0 after stopping QEMU and freeing all, TASK ERROR",
        "raw tunnel (test client)",
        "sigterm_after_start",
    ),
    (
        "serve kill -9 + restart",
        "start",
        "orphaned QEMU killed and all freed at start, TASK ERROR mentions the restart",
        "raw tunnel (test client)",
        "kill9_after_start_then_restart",
    ),
    (
        "target QEMU killed",
        "start",
        "'resume' fails; on EOF stale pid/sockets + volume + config freed, TASK ERROR",
        "raw tunnel (test client)",
        "target_qemu_killed_after_start",
    ),
    (
        "half-open peer",
        "drive-mirror",
        "dropped after peer_timeout_secs, QEMU stopped, all freed, TASK ERROR",
        "gives up after --stall-timeout without progress; running, unlocked, config unchanged; retry succeeds",
        "half_open_peer_during_drive_mirror",
    ),
    (
        "serve kill -9 + restart",
        "drive-mirror",
        "orphaned QEMU killed and all freed at start, TASK ERROR mentions the restart",
        "running, unlocked, config unchanged; retry succeeds",
        "kill9_during_drive_mirror_then_restart",
    ),
    (
        "TCP reset",
        "drive-mirror",
        "QEMU stopped, volume + config + sockets freed, TASK ERROR",
        "fails at once naming the broken WebSocket; running, unlocked, config unchanged; retry succeeds",
        "reset_during_drive_mirror",
    ),
    (
        "TCP reset",
        "RAM",
        "QEMU stopped, config + sockets freed, TASK ERROR",
        "fails at once naming the broken WebSocket; running, unlocked, config unchanged; retry succeeds",
        "reset_during_ram_migration",
    ),
    (
        "half-open peer",
        "RAM",
        "dropped after peer_timeout_secs, QEMU stopped, config + sockets freed, TASK ERROR",
        "gives up after --stall-timeout without progress; running, unlocked, config unchanged; retry succeeds",
        "half_open_peer_during_ram_migration",
    ),
    (
        "serve SIGTERM",
        "RAM",
        "serve exits 0 after stopping QEMU and freeing all, TASK ERROR",
        "running, unlocked, config unchanged; retry succeeds",
        "sigterm_during_ram_migration",
    ),
    (
        "target QEMU killed",
        "RAM",
        "source quits with cleanup: stale pid/sockets + config freed",
        "running, unlocked, config unchanged; retry succeeds",
        "target_qemu_killed_during_ram_migration",
    ),
    (
        "TCP reset",
        "after resume",
        "VM keeps running, config kept with lock migrate, log says so; vm unlock works",
        "paused after completed migration (test-driven QMP)",
        "reset_after_resume_keeps_vm",
    ),
    (
        "serve SIGTERM",
        "after resume",
        "serve exits 0, VM keeps running with lock migrate, log says so",
        "paused after completed migration (test-driven QMP)",
        "sigterm_after_resume_keeps_vm",
    ),
    (
        "serve kill -9 + restart",
        "after resume",
        "recovery keeps the VM running with lock migrate, TASK ERROR mentions the restart",
        "paused after completed migration (test-driven QMP)",
        "kill9_after_resume_keeps_vm_then_restart",
    ),
    (
        "an older tunnel's journal of the VMID + kill -9 + restart",
        "after resume",
        "the old journal touches nothing (the config is not its reservation); the VM keeps running",
        "paused after completed migration (test-driven QMP)",
        "old_journal_never_touches_a_later_resumed_vm",
    ),
    (
        "accept timeout",
        "opened, never connected",
        "reservation + control socket freed, TASK ERROR",
        "none",
        "accept_timeout_frees_reservation",
    ),
    (
        "serve kill -9, stays down",
        "config",
        "`mtunnel cleanup --dry-run` lists, `mtunnel cleanup` frees dead tunnel, orphan volume, stale socket",
        "raw tunnel (test client)",
        "cleanup_command_frees_dead_tunnel_while_down",
    ),
    (
        "operator",
        "leftover volumes",
        "`vm destroy --skiplock` frees the config and unreferenced volumes of the VMID",
        "none",
        "destroy_skiplock_frees_unreferenced_volumes",
    ),
];

// ---- servers and the CLI ----

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.exists())
    })
}

/// A node with real QEMU (TCG); `extra` is more top-level TOML.
fn node(name: &str, extra: &str) -> TestServer {
    require_qemu();
    TestServer::start_with(Options {
        node: Some(name.into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{extra}"),
        ..Options::default()
    })
}

/// The target of the tests (node name [`NODE`], which the raw tunnel URLs use).
fn target(extra: &str) -> TestServer {
    node(NODE, extra)
}

/// What a half-open test puts into the target's config.
const SHORT_PEER_TIMEOUT: &str = "peer_timeout_secs = 2\n";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs `mtunnel ARGS --config CONFIG` with output in files under `dir` (so a hanging
/// command still shows what it did); at most 120 s.
async fn mt_at(config: PathBuf, dir: PathBuf, args: Vec<String>) -> Output {
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let out_path = dir.join(format!("cmd{seq}.out"));
    let err_path = dir.join(format!("cmd{seq}.err"));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"));
    cmd.args(&args).arg("--config").arg(&config);
    cmd.env("MTUNNEL_LOG", "info");
    cmd.stdout(std::fs::File::create(&out_path).unwrap());
    cmd.stderr(std::fs::File::create(&err_path).unwrap());
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().expect("running mtunnel");
    let status = match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(status) => status.expect("waiting for mtunnel"),
        Err(_) => {
            let _ = child.kill().await;
            panic!(
                "mtunnel {args:?} did not finish within 120 s\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default(),
            );
        }
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

async fn create_vm(src: &TestServer, vmid: u32, memory: u32, disks: &[&str]) {
    let vmid_s = vmid.to_string();
    let memory_s = memory.to_string();
    let mut args = vec!["vm", "create", &vmid_s, "--memory", &memory_s];
    for d in disks {
        args.push("--disk");
        args.push(d);
    }
    mt_ok(src, &args).await;
}

fn kill_pid(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
}

// ---- raw tunnel commands ----

/// Gets a ticket for `socket` and opens a WebSocket to it through `port`.
async fn open_forward(
    server: &TestServer,
    port: u16,
    ctl: &mut Ctl,
    vmid: u32,
    socket: &str,
) -> WsStream {
    let reply = ctl.ok(json!({"cmd": "ticket", "path": socket})).await;
    let ticket = reply["ticket"].as_str().unwrap();
    let url = format!(
        "wss://127.0.0.1:{port}/api2/json/nodes/{NODE}/qemu/{vmid}/mtunnelwebsocket?socket={}&ticket={}",
        pct(socket),
        pct(ticket)
    );
    mtunnel::net::ws::connect(
        &url,
        &[("Authorization".into(), server.root_token.clone())],
        &server.fingerprint,
    )
    .await
    .unwrap_or_else(|e| panic!("websocket to {socket}: {e}"))
}

/// How far a raw tunnel is driven before the fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// `disk` done: a 4 MiB raw volume allocated.
    Disk,
    /// `config` done as well: the config is the VM's, locked `migrate`.
    Config,
    /// `start` done as well: the target QEMU runs, waiting for RAM, NBD server up.
    Start,
}

/// What the tunnel created on the target (what cleanup must free and name in the log).
#[derive(Debug, Default)]
struct Created {
    /// Volume file names under `images/{vmid}/`.
    volumes: Vec<String>,
    /// A target QEMU was started.
    qemu: bool,
}

fn disk_name(vmid: u32) -> String {
    format!("vm-{vmid}-disk-0.raw")
}

async fn drive_to(server: &TestServer, ctl: &mut Ctl, vmid: u32, phase: Phase) -> Created {
    ctl.ok(json!({"cmd": "version"})).await;
    let disk = ctl
        .ok(json!({"cmd": "disk", "format": "raw", "storage": "local",
                    "drive": {"interface": "scsi", "index": 0, "size": 4 << 20}}))
        .await;
    let drivestr = disk["drivestr"].as_str().unwrap().to_string();
    let volid = disk["volid"].as_str().unwrap().to_string();
    assert_eq!(volid, format!("local:{vmid}/{}", disk_name(vmid)));
    assert!(server.images(vmid).join(disk_name(vmid)).exists());
    let mut created = Created {
        volumes: vec![disk_name(vmid)],
        qemu: false,
    };
    if phase == Phase::Disk {
        return created;
    }
    let conf =
        format!("lock: migrate\nmemory: 64\nscsi0: {drivestr}\nscsihw: virtio-scsi-single\n");
    ctl.ok(json!({"cmd": "config", "conf": conf, "firewall-config": null}))
        .await;
    let written = std::fs::read_to_string(server.vm_config(vmid)).unwrap();
    assert!(written.lines().any(|l| l == "lock: migrate"), "{written}");
    if phase == Phase::Config {
        return created;
    }
    ctl.ok(json!({
        "cmd": "start",
        "start_params": {"statefile": "unix", "forcemachine": null, "forcecpu": null, "skiplock": 1},
        "migrate_opts": {
            "spice_ticket": null, "type": "websocket", "network": null,
            "storagemap": {"default": "local"}, "migratedfrom": "src1", "nbd_proto_version": 1,
            "nbd": {"scsi0": {"drivestr": drivestr, "volid": volid, "success": true}},
            "remote_node": NODE,
        },
    }))
    .await;
    assert!(pid_of(server, vmid).is_some(), "target QEMU runs");
    assert!(server.run.join(format!("{vmid}_nbd.migrate")).exists());
    created.qemu = true;
    created
}

// ---- end-state checks ----

/// Everything of `vmid` left on `node`: config, volumes in any storage, files in the run
/// dir (the QEMU log too: it goes with the QEMU a cleanup stopped), a running QEMU, a
/// tunnel journal, a firewall file. Empty when clean. `extra_storages` are storage paths
/// outside `{base}/s`.
fn leftovers(node: &TestServer, vmid: u32, extra_storages: &[&Path]) -> Vec<String> {
    let mut left = Vec::new();
    if node.vm_config(vmid).exists() {
        left.push(format!(
            "config: {:?}",
            std::fs::read_to_string(node.vm_config(vmid)).unwrap_or_default()
        ));
    }
    let mut storages: Vec<PathBuf> = std::fs::read_dir(node.base().join("s"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    storages.push(node.data.clone());
    storages.extend(extra_storages.iter().map(|p| p.to_path_buf()));
    for storage in storages {
        let dir = storage.join("images").join(vmid.to_string());
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                left.push(format!("volume: {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(&node.run) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours =
                name.starts_with(&format!("{vmid}.")) || name.starts_with(&format!("{vmid}_"));
            if ours {
                left.push(format!("run file: {name}"));
            }
        }
    }
    if let Some(pid) = pid_of(node, vmid) {
        left.push(format!("QEMU pid {pid}"));
    }
    if let Ok(rd) = std::fs::read_dir(node.data.join("tunnels")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(&vmid.to_string()) {
                left.push(format!("journal: {name}"));
            }
        }
    }
    if node.data.join(format!("firewall/{vmid}.fw")).exists() {
        left.push("firewall file".into());
    }
    left
}

/// Polls until nothing of `vmid` is left (at most `secs`).
async fn wait_clean(node: &TestServer, vmid: u32, extra: &[&Path], secs: u64) {
    let clean = eventually(Duration::from_secs(secs), || {
        leftovers(node, vmid, extra).is_empty()
    })
    .await;
    assert!(
        clean,
        "target not clean after {secs} s: {:?}\n--- server log ---\n{}",
        leftovers(node, vmid, extra),
        node.log()
    );
}

/// Asserts nothing of `vmid` is left, right now.
fn assert_clean_now(node: &TestServer, vmid: u32, extra: &[&Path], when: &str) {
    let left = leftovers(node, vmid, extra);
    assert!(
        left.is_empty(),
        "{when}: target not clean: {left:?}\n--- server log ---\n{}",
        node.log()
    );
}

/// The task log names what was freed and ends `TASK ERROR:`.
fn assert_log_freed(log: &[String], vmid: u32, created: &Created) {
    let text = log.join("\n");
    for vol in &created.volumes {
        assert!(
            log.iter()
                .any(|l| l.contains(vol.as_str()) && !l.starts_with("received command")),
            "the task log must name the freed volume {vol}:\n{text}"
        );
    }
    let freed_config = log.iter().any(|l| {
        let l = l.to_lowercase();
        l.contains("config")
            && ["remov", "free", "delet", "destroy"]
                .iter()
                .any(|w| l.contains(w))
    });
    assert!(
        freed_config,
        "the task log must say the config of VM {vmid} was removed:\n{text}"
    );
    if created.qemu {
        assert!(
            log.iter().any(|l| {
                let l = l.to_lowercase();
                l.contains("stop") || l.contains("kill")
            }),
            "the task log must say the target QEMU was stopped:\n{text}"
        );
    }
}

/// The log names what was freed and ends `TASK ERROR: ...` (the tunnel was cut short).
fn assert_log_ends_in_error(log: &[String], vmid: u32, created: &Created) {
    assert_log_freed(log, vmid, created);
    let last = log.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with("TASK ERROR:"),
        "the task log must end 'TASK ERROR: ...', ends '{last}':\n{}",
        log.join("\n")
    );
}

/// A task's log through the API (server running).
async fn api_log(server: &TestServer, upid: &str) -> Vec<String> {
    server.task_log(upid).await
}

/// A task's log read from disk (server down).
fn disk_log(server: &TestServer, upid: &str) -> Vec<String> {
    server
        .task_log_file(upid)
        .unwrap_or_else(|| panic!("no task log for {upid}"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits up to `secs` for the task to stop; returns its exit status and its log.
async fn ended(server: &TestServer, upid: &str, secs: u64) -> (String, Vec<String>) {
    let status = server.wait_stopped(upid, secs).await;
    let exit = status["exitstatus"].as_str().unwrap_or("").to_string();
    (exit, api_log(server, upid).await)
}

/// The exit status is an error of the task's own: not OK, not warnings, and not PVE's
/// "unexpected status" (which means nobody ended the log).
fn assert_failed_status(upid: &str, exit: &str, log: &[String]) {
    assert!(
        exit != "OK" && !exit.starts_with("WARNINGS") && !exit.starts_with("unexpected status"),
        "task {upid} must end with an error of its own, got exitstatus '{exit}':\n{}",
        log.join("\n")
    );
}

/// The task stopped with an error of its own; returns the exit status.
async fn assert_task_failed(server: &TestServer, upid: &str, secs: u64) -> String {
    let (exit, log) = ended(server, upid, secs).await;
    assert_failed_status(upid, &exit, &log);
    exit
}

/// After the source's `quit cleanup=1` (it saw the failure first): the log names what
/// was freed; the task itself did what it was asked, so it ends OK or with warnings, as
/// upstream's does.
async fn assert_tunnel_freed_by_quit(
    server: &TestServer,
    upid: &str,
    vmid: u32,
    created: &Created,
    secs: u64,
) -> Vec<String> {
    let (exit, log) = ended(server, upid, secs).await;
    assert_log_freed(&log, vmid, created);
    assert!(
        exit == "OK" || exit.starts_with("WARNINGS"),
        "task {upid} ended by quit must end OK or with warnings, got '{exit}':\n{}",
        log.join("\n")
    );
    log
}

/// The tunnel's task stopped, its log names what was freed, ends `TASK ERROR:`, and the
/// exit status is that error. Returns the log.
async fn assert_tunnel_freed(
    server: &TestServer,
    upid: &str,
    vmid: u32,
    created: &Created,
    secs: u64,
) -> Vec<String> {
    let (exit, log) = ended(server, upid, secs).await;
    assert_log_freed(&log, vmid, created);
    assert_failed_status(upid, &exit, &log);
    log
}

/// Right after a restart (one request answered): nothing of the dead tunnel is left, its
/// task is stopped, and its exit status and last log line mention the restart.
async fn assert_recovered(server: &TestServer, upid: &str, vmid: u32, created: &Created) {
    let _ = server
        .client()
        .get(&format!("/nodes/{NODE}/tasks/{upid}/status"), &[])
        .await;
    assert_clean_now(server, vmid, &[], "right after the restart");
    let (exit, log) = ended(server, upid, 5).await;
    assert_log_freed(&log, vmid, created);
    assert_restart_named(upid, &exit, &log);
}

/// The exit status and the last log line of a tunnel that died with serve name the restart.
fn assert_restart_named(upid: &str, exit: &str, log: &[String]) {
    assert_failed_status(upid, exit, log);
    assert!(
        exit.to_lowercase().contains("restart"),
        "exitstatus of a tunnel that died with serve must mention the restart: '{exit}'"
    );
    let last = log.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("TASK ERROR:") && last.to_lowercase().contains("restart"),
        "last log line must be 'TASK ERROR: ...restart...', is '{last}'"
    );
}

/// `POST .../mtunnel` for `vmid` succeeds at once (no retry).
async fn assert_reopens(server: &TestServer, vmid: u32) {
    let reply = server
        .client()
        .post(&format!("/nodes/{NODE}/qemu/{vmid}/mtunnel"), &[])
        .await;
    assert!(
        reply.is_ok(),
        "VMID {vmid} must be usable again at once: {:?}",
        reply.err()
    );
}

/// Issue 17: the task log of a tunnel whose peer fell silent names the peer timeout (it
/// said only "control connection lost"), in the cleanup line and the `TASK ERROR:` line.
fn assert_peer_timeout_named(log: &[String]) {
    let reason = "peer sent nothing for 2 s (peer_timeout_secs)";
    let lost =
        format!("control connection lost before the migration finished ({reason}): cleaning up");
    assert!(
        log.contains(&lost),
        "the task log must say '{lost}':\n{}",
        log.join("\n")
    );
    assert_eq!(
        log.last().map(String::as_str),
        Some(format!("TASK ERROR: mtunnel exited unexpectedly: {reason}").as_str())
    );
}

/// SIGTERM to serve; it must exit with status 0 within 60 s.
async fn sigterm_and_wait(server: &mut TestServer) {
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(60).await;
    let Some(status) = status else {
        panic!(
            "serve did not exit within 60 s of SIGTERM\n--- server log ---\n{}",
            server.log()
        );
    };
    assert_eq!(
        status.code(),
        Some(0),
        "serve must exit 0 after SIGTERM, got {status}\n--- server log ---\n{}",
        server.log()
    );
}

/// The only tunnel task of `vmid` on `node`.
fn only_upid(node: &TestServer, vmid: u32) -> String {
    let upids = node.tunnel_upids(vmid);
    assert_eq!(
        upids.len(),
        1,
        "expected one tunnel task of {vmid}: {upids:?}"
    );
    upids[0].clone()
}

// ---- raw tunnel cases ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Reset,
    HalfOpen,
    Sigterm,
    Kill9,
}

/// Drives a raw tunnel to `phase`, applies `fault`, and checks the end state.
async fn raw_case(fault: Fault, phase: Phase, vmid: u32) {
    let extra = if fault == Fault::HalfOpen {
        SHORT_PEER_TIMEOUT
    } else {
        ""
    };
    let mut server = target(extra);
    let proxy = FaultProxy::start(server.port).await;
    let tunnel = server.open_tunnel(vmid).await;
    let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
    let created = drive_to(&server, &mut ctl, vmid, phase).await;
    if fault == Fault::HalfOpen {
        // A live peer that is merely idle (it answers pings) is kept well past
        // peer_timeout_secs (2).
        ctl.idle(Duration::from_secs(5)).await;
        ctl.ok(json!({"cmd": "version"})).await;
    }
    end_raw_case(&mut server, &proxy, fault, vmid, &tunnel.upid, &created).await;
    drop(ctl);
}

async fn end_raw_case(
    server: &mut TestServer,
    proxy: &FaultProxy,
    fault: Fault,
    vmid: u32,
    upid: &str,
    created: &Created,
) {
    match fault {
        Fault::Reset => {
            proxy.reset();
            wait_clean(server, vmid, &[], 30).await;
            assert_tunnel_freed(server, upid, vmid, created, 30).await;
        }
        Fault::HalfOpen => {
            proxy.freeze();
            // peer_timeout_secs = 2: the server must notice well within 30 s.
            wait_clean(server, vmid, &[], 30).await;
            let log = assert_tunnel_freed(server, upid, vmid, created, 30).await;
            assert_peer_timeout_named(&log);
            proxy.reset();
        }
        Fault::Sigterm => {
            sigterm_and_wait(server).await;
            assert_clean_now(server, vmid, &[], "after SIGTERM");
            assert_log_ends_in_error(&disk_log(server, upid), vmid, created);
            server.restart();
            assert_task_failed(server, upid, 5).await;
        }
        Fault::Kill9 => {
            server.restart();
            // Recovery runs before serve accepts connections: one request in, it is done.
            assert_recovered(server, upid, vmid, created).await;
        }
    }
    assert_reopens(server, vmid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_disk_alloc() {
    bounded(90, raw_case(Fault::Reset, Phase::Disk, 301)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_after_disk_alloc() {
    bounded(90, raw_case(Fault::HalfOpen, Phase::Disk, 302)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_disk_alloc() {
    bounded(120, raw_case(Fault::Sigterm, Phase::Disk, 303)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_after_config() {
    bounded(90, raw_case(Fault::HalfOpen, Phase::Config, 307)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_config_then_restart() {
    bounded(90, raw_case(Fault::Kill9, Phase::Config, 308)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_start() {
    bounded(120, raw_case(Fault::Reset, Phase::Start, 313)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_start() {
    bounded(120, raw_case(Fault::Sigterm, Phase::Start, 310)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_start_then_restart() {
    bounded(120, raw_case(Fault::Kill9, Phase::Start, 311)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_after_start() {
    bounded(120, async {
        let vmid = 312;
        let mut server = target("");
        let proxy = FaultProxy::start(server.port).await;
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
        let created = drive_to(&server, &mut ctl, vmid, Phase::Start).await;
        kill_pid(pid_of(&server, vmid).unwrap());
        assert!(
            eventually(Duration::from_secs(10), || pid_of(&server, vmid).is_none()).await,
            "QEMU did not die"
        );
        let reply = ctl.send(&json!({"cmd": "resume"})).await;
        assert_eq!(reply["success"], false, "resume of a dead VM: {reply}");
        // The source gives up without `quit`: the connection just ends.
        end_raw_case(
            &mut server,
            &proxy,
            Fault::Reset,
            vmid,
            &tunnel.upid,
            &created,
        )
        .await;
    })
    .await
}

/// A fake `qemu-img` first on the server's PATH: fails while `flag` exists, else runs the
/// real one.
fn fake_qemu_img(dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let real = which("qemu-img").expect("qemu-img installed");
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let flag = dir.join("qemu-img-fails");
    std::fs::write(&flag, b"").unwrap();
    let script = format!(
        "#!/bin/sh\nif [ -e '{flag}' ]; then echo 'qemu-img: injected failure' >&2; exit 1; fi\nexec '{real}' \"$@\"\n",
        flag = flag.display(),
        real = real.display()
    );
    let path = bin.join("qemu-img");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env_path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (flag, vec![("PATH".into(), env_path)])
}

/// A `qemu-img` that takes `secs` before it runs the real one: a command still running
/// when the connection is cut.
fn slow_qemu_img(dir: &Path, secs: u32) -> Vec<(String, String)> {
    let real = which("qemu-img").expect("qemu-img installed");
    let bin = dir.join("slowbin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("qemu-img");
    let script = format!(
        "#!/bin/sh\nsleep {secs}\nexec '{}' \"$@\"\n",
        real.display()
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env_path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    vec![("PATH".into(), env_path)]
}

/// The connection is reset while `disk` still runs: the reply cannot be written, and the
/// volume the command created after the cut is freed with the reserved config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_while_disk_alloc_runs() {
    bounded(90, async {
        let vmid = 300;
        require_qemu();
        let work = tempfile::Builder::new()
            .prefix("mts")
            .tempdir_in("/tmp")
            .unwrap();
        let server = TestServer::start_with(Options {
            extra_toml: "qemu_accel = \"tcg\"\n".into(),
            env: slow_qemu_img(work.path(), 2),
            ..Options::default()
        });
        let proxy = FaultProxy::start(server.port).await;
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
        let line = json!({"cmd": "disk", "format": "raw", "storage": "local",
                          "drive": {"interface": "scsi", "index": 0, "size": 1048576}});
        ctl.ws
            .send(Message::binary(format!("{line}\n").into_bytes()))
            .await
            .unwrap();
        let upid = tunnel.upid.clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                disk_log(&server, &upid)
                    .iter()
                    .any(|l| l == "received command 'disk'")
            })
            .await,
            "the disk command never arrived"
        );
        proxy.reset();
        drop(ctl);
        wait_clean(&server, vmid, &[], 30).await;
        let created = Created {
            volumes: vec![disk_name(vmid)],
            qemu: false,
        };
        let log = assert_tunnel_freed(&server, &upid, vmid, &created, 30).await;
        assert!(
            log.iter().any(|l| l.starts_with("control connection lost")),
            "{log:?}"
        );
        assert_reopens(&server, vmid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_qemu_img_on_disk_alloc() {
    bounded(90, async {
        let vmid = 304;
        let work = tempfile::Builder::new()
            .prefix("mtq")
            .tempdir_in("/tmp")
            .unwrap();
        let (flag, env) = fake_qemu_img(work.path());
        require_qemu();
        let mut server = TestServer::start_with(Options {
            extra_toml: "qemu_accel = \"tcg\"\n".into(),
            env,
            ..Options::default()
        });
        let proxy = FaultProxy::start(server.port).await;
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
        ctl.ok(json!({"cmd": "version"})).await;
        let reply = ctl
            .send(
                &json!({"cmd": "disk", "format": "qcow2", "storage": "local",
                          "drive": {"interface": "scsi", "index": 0, "size": 4 << 20}}),
            )
            .await;
        assert_eq!(reply["success"], false, "{reply}");
        let msg = reply["msg"].as_str().unwrap_or("");
        assert!(msg.contains("injected failure"), "{msg}");
        // No partial volume right after the failed command.
        let vols: Vec<_> = std::fs::read_dir(server.images(vmid))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(vols.is_empty(), "failed alloc left {vols:?}");
        std::fs::remove_file(&flag).unwrap();
        end_raw_case(
            &mut server,
            &proxy,
            Fault::Reset,
            vmid,
            &tunnel.upid,
            &Created::default(),
        )
        .await;
    })
    .await
}

/// Starts a raw import of a 16 MiB raw disk, streams 6 MiB of data and leaves the stream
/// open; returns once the target volume holds at least 2 MiB.
async fn import_mid_stream(server: &TestServer, port: u16, ctl: &mut Ctl, vmid: u32) -> WsStream {
    ctl.ok(json!({"cmd": "version"})).await;
    let name = disk_name(vmid);
    let reply = ctl
        .ok(
            json!({"cmd": "disk-import", "volname": name, "format": "raw",
                    "export_formats": "raw+size", "storage": "local", "allow_rename": 1,
                    "with_snapshots": 0, "migration_snapshot": null}),
        )
        .await;
    let socket = reply["socket"].as_str().unwrap().to_string();
    let mut ws = open_forward(server, port, ctl, vmid, &socket).await;
    let mut data = (16u64 << 20).to_le_bytes().to_vec();
    data.extend(std::iter::repeat_n(0x77u8, 6 << 20));
    for chunk in data.chunks(64 * 1024) {
        ws.send(Message::binary(chunk.to_vec())).await.unwrap();
    }
    let vol = server.images(vmid).join(&name);
    let written = eventually(Duration::from_secs(30), || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&vol).is_ok_and(|m| m.blocks() * 512 >= 2 << 20)
    })
    .await;
    assert!(written, "the import wrote nothing into {}", vol.display());
    let status = ctl.ok(json!({"cmd": "query-disk-import"})).await;
    assert_eq!(status["status"], "pending", "{status}");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_disk_import() {
    bounded(90, async {
        let vmid = 305;
        let mut server = target("");
        let proxy = FaultProxy::start(server.port).await;
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
        let stream = import_mid_stream(&server, proxy.port, &mut ctl, vmid).await;
        let created = Created {
            volumes: vec![disk_name(vmid)],
            qemu: false,
        };
        end_raw_case(
            &mut server,
            &proxy,
            Fault::Reset,
            vmid,
            &tunnel.upid,
            &created,
        )
        .await;
        drop(stream);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_disk_import_then_restart() {
    bounded(90, async {
        let vmid = 306;
        let mut server = target("");
        let proxy = FaultProxy::start(server.port).await;
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, proxy.port, &tunnel).await;
        let stream = import_mid_stream(&server, proxy.port, &mut ctl, vmid).await;
        let created = Created {
            volumes: vec![disk_name(vmid)],
            qemu: false,
        };
        end_raw_case(
            &mut server,
            &proxy,
            Fault::Kill9,
            vmid,
            &tunnel.upid,
            &created,
        )
        .await;
        drop(stream);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_timeout_frees_reservation() {
    bounded(60, async {
        let vmid = 340;
        let server = TestServer::start_with(Options {
            accept_timeout_secs: Some(1),
            ..Options::default()
        });
        let tunnel = server.open_tunnel(vmid).await;
        assert!(server.vm_config(vmid).exists());
        wait_clean(&server, vmid, &[], 30).await;
        assert_tunnel_freed(&server, &tunnel.upid, vmid, &Created::default(), 30).await;
        assert_reopens(&server, vmid).await;
    })
    .await
}

// ---- `mtunnel migrate` cases ----

/// The source's VM config before the migration, to compare with afterwards.
fn conf_of(node: &TestServer, vmid: u32) -> String {
    std::fs::read_to_string(node.vm_config(vmid)).unwrap()
}

async fn assert_source_running_unlocked(src: &TestServer, vmid: u32, conf_before: &str) {
    assert!(pid_of(src, vmid).is_some(), "source VM must still run");
    let st = qmp(&src.run, vmid, "query-status", Value::Null).await;
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(
        conf_of(src, vmid),
        conf_before,
        "source config must be unchanged (and unlocked)"
    );
}

fn assert_source_stopped_unlocked(src: &TestServer, vmid: u32, conf_before: &str) {
    assert!(
        pid_of(src, vmid).is_none(),
        "offline source VM must not run"
    );
    assert_eq!(
        conf_of(src, vmid),
        conf_before,
        "source config must be unchanged (and unlocked)"
    );
}

/// Starts `mtunnel migrate VMID --target (via port) --target-storage STORAGE EXTRA..`.
fn spawn_migrate(
    src: &TestServer,
    dst: &TestServer,
    port: u16,
    vmid: u32,
    storage: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<Output> {
    let mut args: Vec<String> = vec![
        "migrate".into(),
        vmid.to_string(),
        "--target".into(),
        target_arg(dst, port),
        "--target-storage".into(),
        storage.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::spawn(mt_at(src.config.clone(), src.base().to_path_buf(), args))
}

/// Waits for a migration that must fail; returns its stderr.
async fn migration_failed(run: tokio::task::JoinHandle<Output>) -> String {
    let out = run.await.expect("migrate task");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "migration must fail:\n{err}");
    assert!(err.contains("migration failed"), "{err}");
    err
}

/// Waits (at most 60 s: well below a `--stall-timeout 600`) for a migration that must
/// fail after a fault on its link; returns its stderr.
async fn failed_at_once(run: tokio::task::JoinHandle<Output>) -> String {
    let ended = eventually(Duration::from_secs(60), || run.is_finished()).await;
    assert!(
        ended,
        "the migration still runs 60 s after the fault on its link and the target's cleanup"
    );
    migration_failed(run).await
}

/// The same migration again, directly and unthrottled, succeeds; the target VM runs.
async fn retry_succeeds(src: &TestServer, dst: &TestServer, vmid: u32, online: bool) {
    let target = target_arg(dst, dst.port);
    let vmid_s = vmid.to_string();
    let mut args = vec![
        "migrate",
        &vmid_s,
        "--target",
        &target,
        "--target-storage",
        "local",
    ];
    if online {
        args.push("--online");
    }
    mt_ok(src, &args).await;
    let conf = conf_of(dst, vmid);
    assert!(!conf.contains("lock:"), "{conf}");
    if online {
        assert!(
            pid_of(dst, vmid).is_some(),
            "migrated VM runs on the target"
        );
        mt_ok(dst, &["vm", "stop", &vmid_s]).await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LivePhase {
    /// A 64 MiB qcow2 disk mirrored at 4 MiB/s.
    Mirror,
    /// 48 MiB of RAM data migrated at 8 MiB/s (no disks).
    Ram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LiveFault {
    Reset,
    HalfOpen,
    Sigterm,
    Kill9,
    QemuKilled,
}

async fn live_case(fault: LiveFault, phase: LivePhase, vmid: u32) {
    let src = node("src1", "");
    let extra = if fault == LiveFault::HalfOpen {
        SHORT_PEER_TIMEOUT
    } else {
        ""
    };
    let mut dst = target(extra);
    let (mut args, created) = match phase {
        LivePhase::Mirror => {
            create_vm(&src, vmid, 128, &["local:64M:qcow2"]).await;
            let img = src.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
            qemu_io("qcow2", "write -P 0x44 0 64M", &img);
            start_with_ram(&src, vmid, 1).await;
            (
                vec!["--online", "--bwlimit", "4096"],
                Created {
                    volumes: vec![format!("vm-{vmid}-disk-0.qcow2")],
                    qemu: true,
                },
            )
        }
        LivePhase::Ram => {
            create_vm(&src, vmid, 128, &[]).await;
            start_with_ram(&src, vmid, 48).await;
            (
                vec!["--online", "--bwlimit", "8192"],
                Created {
                    volumes: Vec::new(),
                    qemu: true,
                },
            )
        }
    };
    match fault {
        // Far beyond this test's bound: only the broken WebSocket itself may end the run.
        LiveFault::Reset => args.extend(["--stall-timeout", "600"]),
        // A frozen link is noticed by the source only through the stall bound.
        LiveFault::HalfOpen => args.extend(["--stall-timeout", "5"]),
        _ => {}
    }
    let conf_before = conf_of(&src, vmid);
    let proxy = FaultProxy::start(dst.port).await;
    let run = spawn_migrate(&src, &dst, proxy.port, vmid, "local", &args);

    // Wait until the phase is under way: its socket exists and data flows through.
    // With a short peer timeout, more than two of them pass first: a healthy migration
    // (its control connection idle during the mirror) must not be dropped.
    let mirror_bytes = if fault == LiveFault::HalfOpen {
        24u64
    } else {
        2
    };
    let (sock, min_bytes) = match phase {
        LivePhase::Mirror => (
            dst.run.join(format!("{vmid}_nbd.migrate")),
            mirror_bytes << 20,
        ),
        LivePhase::Ram => (dst.run.join(format!("{vmid}.migrate")), 4u64 << 20),
    };
    let target_img = dst.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
    let under_way = eventually(Duration::from_secs(60), || {
        sock.exists()
            && proxy.bytes() >= min_bytes
            && (phase == LivePhase::Ram
                || std::fs::metadata(&target_img).is_ok_and(|m| m.len() >= 2 << 20))
    })
    .await;
    assert!(
        under_way,
        "{phase:?} never got under way ({} bytes through the proxy)\n{}",
        proxy.bytes(),
        dst.log()
    );
    let upid = only_upid(&dst, vmid);
    assert!(!run.is_finished(), "migration ended before the fault");
    let status = dst
        .client()
        .get(&format!("/nodes/{NODE}/tasks/{upid}/status"), &[])
        .await
        .unwrap();
    assert_eq!(status["status"], "running", "tunnel ended before the fault");

    match fault {
        LiveFault::Reset => {
            proxy.reset();
            wait_clean(&dst, vmid, &[], 30).await;
            assert_tunnel_freed(&dst, &upid, vmid, &created, 30).await;
        }
        LiveFault::HalfOpen => {
            proxy.freeze();
            wait_clean(&dst, vmid, &[], 30).await;
            assert_tunnel_freed(&dst, &upid, vmid, &created, 30).await;
        }
        LiveFault::Sigterm => {
            sigterm_and_wait(&mut dst).await;
            assert_clean_now(&dst, vmid, &[], "after SIGTERM");
            assert_log_ends_in_error(&disk_log(&dst, &upid), vmid, &created);
        }
        LiveFault::Kill9 => {
            dst.restart();
            assert_recovered(&dst, &upid, vmid, &created).await;
        }
        LiveFault::QemuKilled => {
            kill_pid(pid_of(&dst, vmid).expect("target QEMU runs"));
            wait_clean(&dst, vmid, &[], 30).await;
            assert_tunnel_freed_by_quit(&dst, &upid, vmid, &created, 30).await;
        }
    }
    if fault == LiveFault::HalfOpen {
        // The link stays frozen: nothing but the stall bound can end the run.
        let err = failed_at_once(run).await;
        assert!(err.contains("made no progress for 5 s"), "{err}");
        proxy.reset();
    } else if fault == LiveFault::Reset {
        let err = failed_at_once(run).await;
        let stream = match phase {
            LivePhase::Mirror => "disk stream",
            LivePhase::Ram => "RAM stream",
        };
        let named = format!(
            "the {stream}'s WebSocket to 127.0.0.1:{} broke: ",
            proxy.port
        );
        assert!(err.contains(&named), "expected '{named}...':\n{err}");
        assert!(!err.contains("no progress"), "{err}");
    } else {
        migration_failed(run).await;
    }
    assert_source_running_unlocked(&src, vmid, &conf_before).await;
    if fault == LiveFault::Sigterm {
        dst.restart();
        assert_task_failed(&dst, &upid, 5).await;
    }
    drop(proxy);
    retry_succeeds(&src, &dst, vmid, true).await;
    mt_ok(&src, &["vm", "stop", &vmid.to_string()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_during_drive_mirror() {
    bounded(180, live_case(LiveFault::HalfOpen, LivePhase::Mirror, 322)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_drive_mirror_then_restart() {
    bounded(180, live_case(LiveFault::Kill9, LivePhase::Mirror, 323)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_drive_mirror() {
    bounded(180, live_case(LiveFault::Reset, LivePhase::Mirror, 327)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_ram_migration() {
    bounded(180, live_case(LiveFault::Reset, LivePhase::Ram, 324)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_during_ram_migration() {
    bounded(180, live_case(LiveFault::HalfOpen, LivePhase::Ram, 328)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_ram_migration() {
    bounded(180, live_case(LiveFault::Sigterm, LivePhase::Ram, 325)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_qemu_killed_during_ram_migration() {
    bounded(180, live_case(LiveFault::QemuKilled, LivePhase::Ram, 326)).await
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("mtfull")
            .tempdir_in("/tmp")
            .unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_full_during_offline_import() {
    bounded(150, async {
        let vmid = 320;
        let small = Tmpfs::mount(8);
        let src = node("src1", "");
        require_qemu();
        // The storage table goes last: top-level keys after it would land inside it.
        let dst = TestServer::start_with(Options {
            auth_delay_ms: None,
            extra_toml: format!(
                "qemu_accel = \"tcg\"\n\n[storage.small]\ntype = \"dir\"\npath = \"{}\"\ncontent = [\"images\"]\n",
                small.path().display()
            ),
            ..Options::default()
        });
        create_vm(&src, vmid, 64, &["local:16M:raw"]).await;
        let img = src.images(vmid).join(disk_name(vmid));
        qemu_io("raw", "write -P 0x5a 0 16M", &img);
        let conf_before = conf_of(&src, vmid);
        let run = spawn_migrate(&src, &dst, dst.port, vmid, "small", &[]);
        let err = migration_failed(run).await;
        let upid = only_upid(&dst, vmid);
        wait_clean(&dst, vmid, &[small.path()], 30).await;
        let (exit, log) = ended(&dst, &upid, 30).await;
        assert!(
            log.iter().any(|l| l.contains("No space left on device"))
                || err.contains("No space left on device"),
            "ENOSPC must be reported (task log or source):\n{}\n{err}",
            log.join("\n")
        );
        let created = Created {
            volumes: vec![disk_name(vmid)],
            qemu: false,
        };
        assert_log_freed(&log, vmid, &created);
        assert!(exit == "OK" || exit.starts_with("WARNINGS"), "{exit}");
        // Nothing of the partial import stays on the small storage.
        let used = nix::sys::statvfs::statvfs(small.path()).unwrap();
        assert!(
            used.blocks() - used.blocks_free() < 64,
            "tmpfs still holds {} blocks",
            used.blocks() - used.blocks_free()
        );
        assert_source_stopped_unlocked(&src, vmid, &conf_before);
        retry_succeeds(&src, &dst, vmid, false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_qemu_img_during_offline_import() {
    bounded(150, async {
        let vmid = 321;
        let work = tempfile::Builder::new()
            .prefix("mtq")
            .tempdir_in("/tmp")
            .unwrap();
        let (flag, env) = fake_qemu_img(work.path());
        let src = node("src1", "");
        let dst = TestServer::start_with(Options {
            extra_toml: "qemu_accel = \"tcg\"\n".into(),
            env,
            ..Options::default()
        });
        create_vm(&src, vmid, 64, &["local:8M:raw"]).await;
        let img = src.images(vmid).join(disk_name(vmid));
        qemu_io("raw", "write -P 0x6b 0 2M", &img);
        let conf_before = conf_of(&src, vmid);
        let run = spawn_migrate(&src, &dst, dst.port, vmid, "local", &[]);
        migration_failed(run).await;
        let upid = only_upid(&dst, vmid);
        wait_clean(&dst, vmid, &[], 30).await;
        let created = Created {
            volumes: vec![disk_name(vmid)],
            qemu: false,
        };
        assert_tunnel_freed_by_quit(&dst, &upid, vmid, &created, 30).await;
        assert_source_stopped_unlocked(&src, vmid, &conf_before);
        std::fs::remove_file(&flag).unwrap();
        retry_succeeds(&src, &dst, vmid, false).await;
    })
    .await
}

// ---- after resume: the migrated VM stays ----

/// Migrates a small running VM with raw tunnel commands through `proxy`, moving the RAM
/// straight from the source QEMU to the target's migration socket (QMP on the source, as
/// the source's tunnel would), then `resume`. Returns the control channel.
async fn migrate_and_resume(src: &TestServer, dst: &TestServer, port: u16, vmid: u32) -> Ctl {
    create_vm(src, vmid, 64, &[]).await;
    mt_ok(src, &["vm", "start", &vmid.to_string()]).await;
    let machine = qmp(
        &src.run,
        vmid,
        "qom-get",
        json!({"path": "/machine", "property": "type"}),
    )
    .await;
    let machine = machine
        .as_str()
        .and_then(|t| t.strip_suffix("-machine"))
        .unwrap()
        .to_string();
    let mut conf = conf_of(src, vmid);
    conf.push_str("lock: migrate\n");

    let tunnel = dst.open_tunnel(vmid).await;
    let mut ctl = Ctl::open(dst, port, &tunnel).await;
    ctl.ok(json!({"cmd": "version"})).await;
    ctl.ok(json!({"cmd": "config", "conf": conf, "firewall-config": null}))
        .await;
    let started = ctl
        .ok(json!({
            "cmd": "start",
            "start_params": {"statefile": "unix", "forcemachine": machine, "forcecpu": null, "skiplock": 1},
            "migrate_opts": {
                "spice_ticket": null, "type": "websocket", "network": null, "storagemap": {},
                "migratedfrom": "src1", "nbd_proto_version": 1, "remote_node": NODE,
            },
        }))
        .await;
    let uri = started["migrate"]["uri"].as_str().unwrap().to_string();
    qmp(&src.run, vmid, "migrate", json!({"uri": uri})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = qmp(&src.run, vmid, "query-migrate", Value::Null).await;
        match st["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("RAM migration failed: {st}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "RAM migration not done: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctl.ok(json!({"cmd": "resume"})).await;
    assert!(pid_of(dst, vmid).is_some());
    assert!(conf_of(dst, vmid).lines().any(|l| l == "lock: migrate"));
    ctl
}

/// The migrated VM runs, its config is kept with `lock: migrate`, and the log says the
/// VM was left running (and never that it was stopped or its config removed).
fn assert_vm_kept(dst: &TestServer, vmid: u32, log: &[String], when: &str) {
    let text = log.join("\n");
    assert!(
        pid_of(dst, vmid).is_some(),
        "{when}: the resumed VM must keep running:\n{text}\n{}",
        dst.log()
    );
    let conf = conf_of(dst, vmid);
    assert!(
        conf.lines().any(|l| l == "lock: migrate"),
        "{when}: config must be kept with lock migrate:\n{conf}"
    );
    assert!(
        log.last().is_some_and(|l| l.starts_with("TASK ERROR:")),
        "{when}: the task log must end 'TASK ERROR: ...':\n{text}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("stopped VM") || l.contains("removed config")),
        "{when}: nothing may be stopped or removed after resume:\n{text}"
    );
    let vm = vmid.to_string();
    assert!(
        log.iter()
            .any(|l| l.contains(&vm) && l.to_lowercase().contains("running")),
        "{when}: the task log must say VM {vmid} was left running:\n{text}"
    );
}

/// After the fault: unlock with the admin command, stop and destroy the VM, and the VMID
/// can be opened again.
async fn unlock_and_reuse(dst: &TestServer, vmid: u32) {
    let vmid_s = vmid.to_string();
    mt_ok(dst, &["vm", "unlock", &vmid_s]).await;
    let conf = conf_of(dst, vmid);
    assert!(!conf.contains("lock:"), "vm unlock left: {conf}");
    assert!(
        pid_of(dst, vmid).is_some(),
        "vm unlock must not stop the VM"
    );
    mt_ok(dst, &["vm", "stop", &vmid_s]).await;
    mt_ok(dst, &["vm", "destroy", &vmid_s]).await;
    let left = leftovers(dst, vmid, &[]);
    assert!(
        left.is_empty(),
        "after vm unlock, vm stop and vm destroy of VM {vmid}, left: {left:?}"
    );
    assert_reopens(dst, vmid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_after_resume_keeps_vm() {
    bounded(120, async {
        let vmid = 330;
        let src = node("src1", "");
        let dst = target("");
        let proxy = FaultProxy::start(dst.port).await;
        let ctl = migrate_and_resume(&src, &dst, proxy.port, vmid).await;
        let upid = only_upid(&dst, vmid);
        proxy.reset();
        let (exit, log) = ended(&dst, &upid, 30).await;
        assert_vm_kept(&dst, vmid, &log, "after a reset");
        assert_failed_status(&upid, &exit, &log);
        drop(ctl);
        unlock_and_reuse(&dst, vmid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_resume_keeps_vm() {
    bounded(120, async {
        let vmid = 331;
        let src = node("src1", "");
        let mut dst = target("");
        let proxy = FaultProxy::start(dst.port).await;
        let ctl = migrate_and_resume(&src, &dst, proxy.port, vmid).await;
        let upid = only_upid(&dst, vmid);
        sigterm_and_wait(&mut dst).await;
        assert_vm_kept(&dst, vmid, &disk_log(&dst, &upid), "after SIGTERM");
        let st = qmp(&dst.run, vmid, "query-status", Value::Null).await;
        assert_eq!(st["status"], "running", "{st}");
        drop(ctl);
        dst.restart();
        assert_task_failed(&dst, &upid, 5).await;
        assert!(pid_of(&dst, vmid).is_some(), "restart must not stop the VM");
        unlock_and_reuse(&dst, vmid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_resume_keeps_vm_then_restart() {
    bounded(120, async {
        let vmid = 332;
        let src = node("src1", "");
        let mut dst = target("");
        let proxy = FaultProxy::start(dst.port).await;
        let ctl = migrate_and_resume(&src, &dst, proxy.port, vmid).await;
        let upid = only_upid(&dst, vmid);
        dst.restart();
        let (exit, log) = ended(&dst, &upid, 5).await;
        assert_vm_kept(&dst, vmid, &log, "after kill -9 and restart");
        assert_restart_named(&upid, &exit, &log);
        drop(ctl);
        unlock_and_reuse(&dst, vmid).await;
    })
    .await
}

/// Issue 17 (2): the journal of an earlier tunnel of the same VMID (here as a restored
/// data dir or an abandoned cleanup leaves it: T1 reserved, wrote the config and started
/// QEMU) must not stop, free or remove the VM a later tunnel (T2) migrated in and
/// resumed. Recovery judged ownership by the lock name, which every migration shares;
/// now the config must carry T1's own reservation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_journal_never_touches_a_later_resumed_vm() {
    bounded(150, async {
        let vmid = 333;
        let src = node("src1", "");
        let mut dst = target("");
        let proxy = FaultProxy::start(dst.port).await;
        let t1 = dst.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&dst, proxy.port, &t1).await;
        let created = drive_to(&dst, &mut ctl, vmid, Phase::Start).await;
        let journal = dst.data.join(format!("tunnels/{}.json", t1.upid));
        let mut old: Value = serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap();
        assert_eq!(old["expected_lock"], "migrate", "{old}");
        proxy.reset();
        assert_tunnel_freed(&dst, &t1.upid, vmid, &created, 30).await;
        drop(ctl);

        let ctl = migrate_and_resume(&src, &dst, dst.port, vmid).await;
        let t2 = dst
            .tunnel_upids(vmid)
            .into_iter()
            .find(|u| *u != t1.upid)
            .unwrap();
        dst.kill();
        old["abandoned"] = json!(true);
        std::fs::write(&journal, serde_json::to_vec(&old).unwrap()).unwrap();
        dst.restart();
        // Recovery ran before serve answers: T2's task ends, T1's journal is gone.
        let (_, log) = ended(&dst, &t2, 10).await;
        assert_vm_kept(&dst, vmid, &log, "after an old journal was recovered");
        assert!(!journal.exists(), "T1's journal must not run again");
        let start_log = dst.log();
        assert!(
            start_log.contains(&format!(
                "cleanup: the config of VM {vmid} was reserved anew (by another tunnel) - \
                 leaving that VM, its config, its volumes and its sockets alone"
            )),
            "{start_log}"
        );
        drop(ctl);
        unlock_and_reuse(&dst, vmid).await;
    })
    .await
}

// ---- admin commands ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_command_frees_dead_tunnel_while_down() {
    bounded(90, async {
        let vmid = 341;
        let mut server = target("");
        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, server.port, &tunnel).await;
        drive_to(&server, &mut ctl, vmid, Phase::Config).await;
        // Other leftovers: an orphaned volume without config, a stale socket; and a VM
        // with its config and volume that must stay.
        let orphan = server.images(342).join("vm-342-disk-0.raw");
        std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
        std::fs::write(&orphan, vec![1u8; 4096]).unwrap();
        let stale = server.run.join("343.migrate");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let kept = server.images(344).join("vm-344-disk-0.raw");
        std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
        std::fs::write(&kept, vec![2u8; 4096]).unwrap();
        let kept_conf = "memory: 64\nscsi0: local:344/vm-344-disk-0.raw,format=raw,size=4K\n";
        std::fs::write(server.vm_config(344), kept_conf).unwrap();

        // One connection per control socket: its path goes once the source is connected.
        assert!(!server.run.join(format!("{vmid}.mtunnel")).exists());
        server.kill();
        drop(ctl);
        let listed = mt_ok(&server, &["cleanup", "--dry-run"]).await;
        for what in [disk_name(vmid).as_str(), "vm-342-disk-0.raw", "343.migrate"] {
            assert!(
                listed.contains(what),
                "--dry-run must list {what}:\n{listed}"
            );
        }
        assert!(!listed.contains("vm-344-disk-0.raw"), "{listed}");
        assert!(orphan.exists() && stale.exists() && server.vm_config(vmid).exists());
        assert!(server.images(vmid).join(disk_name(vmid)).exists());

        let freed = mt_ok(&server, &["cleanup"]).await;
        assert!(freed.contains(&disk_name(vmid)), "{freed}");
        assert_clean_now(&server, vmid, &[], "after mtunnel cleanup");
        assert!(!orphan.exists(), "orphaned volume left");
        assert!(!stale.exists(), "stale socket left");
        assert!(kept.exists(), "a referenced volume was removed");
        assert_eq!(
            std::fs::read_to_string(server.vm_config(344)).unwrap(),
            kept_conf
        );
        let dead_log = server.task_log_file(&tunnel.upid).unwrap();
        assert!(
            dead_log
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("TASK ERROR:")),
            "cleanup must end the dead tunnel's task log:\n{dead_log}"
        );
        server.restart();
        assert_task_failed(&server, &tunnel.upid, 5).await;
        assert_reopens(&server, vmid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_skiplock_frees_unreferenced_volumes() {
    bounded(60, async {
        let vmid = 345;
        let server = target("");
        let dir = server.images(vmid);
        std::fs::create_dir_all(&dir).unwrap();
        for n in 0..2 {
            std::fs::write(dir.join(format!("vm-{vmid}-disk-{n}.raw")), vec![3u8; 4096]).unwrap();
        }
        std::fs::write(
            server.vm_config(vmid),
            format!("lock: migrate\nmemory: 64\nscsi0: local:{vmid}/vm-{vmid}-disk-0.raw,format=raw,size=4K\n"),
        )
        .unwrap();
        mt_ok(&server, &["vm", "destroy", &vmid.to_string(), "--skiplock"]).await;
        assert_clean_now(&server, vmid, &[], "after vm destroy --skiplock");
        assert_reopens(&server, vmid).await;
    })
    .await
}

// ---- the table ----

#[test]
fn matrix_rows_have_tests() {
    let source = include_str!("faults.rs");
    let mut names = std::collections::BTreeSet::new();
    for (fault, phase, target, src, test) in MATRIX {
        assert!(
            !fault.is_empty() && !phase.is_empty() && !target.is_empty() && !src.is_empty(),
            "row of {test} has an empty column"
        );
        assert!(
            source.contains(&format!("async fn {test}()")),
            "MATRIX row ({fault}, {phase}) names test '{test}', which does not exist"
        );
        assert!(names.insert(*test), "test '{test}' has two rows");
    }
    // And every test of this file has its row.
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.starts_with("#[tokio::test") {
            continue;
        }
        let Some(next) = lines.peek() else { break };
        let name = next
            .trim_start_matches("async fn ")
            .split('(')
            .next()
            .unwrap_or("");
        assert!(names.contains(name), "test '{name}' has no MATRIX row");
    }
}

/// The fault matrix of docs/faults.md is [`MATRIX`]. After changing the matrix, run
/// `MTUNNEL_BLESS=1 cargo nextest run docs_show_the_fault_matrix` to rewrite it.
#[test]
fn docs_show_the_fault_matrix() {
    const START: &str = "<!-- fault-matrix:start -->\n";
    const END: &str = "<!-- fault-matrix:end -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/faults.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let mut table = String::from(
        "| fault | phase | the target ends with | the source ends with | test |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for (fault, phase, target, src, test) in MATRIX {
        table.push_str(&format!(
            "| {fault} | {phase} | {target} | {src} | `{test}` |\n"
        ));
    }
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("docs/faults.md lacks the fault-matrix markers");
    };
    let current = &readme[a + START.len()..b];
    if current != table {
        if std::env::var_os("MTUNNEL_BLESS").is_some() {
            let updated = format!("{}{table}{}", &readme[..a + START.len()], &readme[b..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "docs/faults.md's fault matrix differs from MATRIX in tests/faults.rs; run \
                 MTUNNEL_BLESS=1 cargo nextest run docs_show_the_fault_matrix\n\
                 expected:\n{table}"
            );
        }
    }
}
