//! PROTOCOL.md §2.4, line by line, over the real path a PVE source uses: `POST .../mtunnel`,
//! the control WebSocket, a second WebSocket per disk-import stream (with a ticket fetched
//! over the control channel, as the tunnel client does), and a real QEMU (TCG) started for
//! an incoming migration. Each command is sent as the literal line a real source sends,
//! mixed encodings included (`"allow_rename":"1"`, `null` for absent options, `[null]`
//! storages), and every reply is compared in full.
//!
//! The online variant ends as a failed migration does (`nbdstop`, `stop`, `quit` with
//! cleanup) and checks that exactly what the tunnel created is gone; the offline variant
//! ends as a successful one (`unlock`, `quit` without cleanup) and checks the config text
//! and that the volumes are identical to the sources.
//!
//! QEMU must be installed (`.ci/install-qemu.sh`); a missing QEMU fails these tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::ctl::Ctl;
use common::{NODE, Options, TestServer, assert_identical, bounded, pct};
use futures_util::{SinkExt, StreamExt};
use mtunnel::net::ws::WsStream;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn require_qemu() {
    for tool in ["qemu-system-x86_64", "qemu-img", "qemu-io"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        assert!(
            found,
            "{tool} is not installed: run `bash .ci/install-qemu.sh` (scripts/test-all.sh does)"
        );
    }
}

fn server() -> TestServer {
    require_qemu();
    TestServer::start_with(Options {
        extra_toml: "qemu_accel = \"tcg\"\n".into(),
        ..Options::default()
    })
}

/// Kills a QEMU of `vmid` that a failed test left running (QEMU runs in its own session,
/// so it would outlive the server).
struct QemuGuard {
    run: PathBuf,
    vmid: u32,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(pid) = mtunnel::qemu::is_running(&self.run, self.vmid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image of `size` with 4 MiB of 0xab at its start.
fn qcow2_image(path: &Path, size: &str) {
    run("qemu-img", &["create", "-q", "-f", "qcow2", &s(path), size]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 0 4M", &s(path)],
    );
}

/// A raw image of `size` with 1 MiB of 0xcd at 1 MiB.
fn raw_image(path: &Path, size: &str) {
    run("qemu-img", &["create", "-q", "-f", "raw", &s(path), size]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xcd 1M 1M", &s(path)],
    );
}

fn virtual_size(path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", &s(path)])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

/// The URL the tunnel client opens for a forwarded connection: the `forward` URL
/// (`?socket=..&`) with `ticket=` appended.
fn forward_url(server: &TestServer, vmid: u32, socket: &str, ticket: &str) -> String {
    format!(
        "https://{}:{}/api2/json/nodes/{NODE}/qemu/{vmid}/mtunnelwebsocket?socket={}&ticket={}",
        server.host,
        server.port,
        pct(socket),
        pct(ticket)
    )
}

/// Gets a ticket for `socket` over the control channel and opens a WebSocket to it.
async fn open_forward(server: &TestServer, ctl: &mut Ctl, vmid: u32, socket: &str) -> WsStream {
    let reply = ctl
        .send_line(&json!({"path": socket, "cmd": "ticket"}).to_string())
        .await;
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply.as_object().unwrap().len(), 2, "{reply}");
    let ticket = reply["ticket"].as_str().unwrap();
    assert!(ticket.starts_with("PVETUNNEL:"), "{ticket}");
    mtunnel::net::ws::connect(
        &forward_url(server, vmid, socket, ticket),
        &[("Authorization".into(), server.root_token.clone())],
        &server.fingerprint,
    )
    .await
    .unwrap_or_else(|e| panic!("websocket to {socket}: {e}"))
}

/// Streams `header` (8 bytes LE) and the bytes of `file` into the storage socket over its
/// own WebSocket, closes it, and polls `query-disk-import` until the import is complete;
/// asserts the volid.
async fn stream_import(
    server: &TestServer,
    ctl: &mut Ctl,
    vmid: u32,
    socket: &str,
    file: &Path,
    expected_volid: &str,
) {
    let mut ws = open_forward(server, ctl, vmid, socket).await;
    let mut data = virtual_size(file).to_le_bytes().to_vec();
    data.extend_from_slice(&std::fs::read(file).unwrap());
    // pveproxy takes frames of at most 128 KiB; the tunnel client sends smaller ones.
    for chunk in data.chunks(64 * 1024) {
        ws.send(Message::binary(chunk.to_vec())).await.unwrap();
    }
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reply = ctl.send_line("{\"cmd\":\"query-disk-import\"}").await;
        if reply["status"] == "pending" {
            assert_eq!(reply["success"], true, "{reply}");
            assert!(
                std::time::Instant::now() < deadline,
                "import still pending: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(
            reply,
            json!({"status": "complete", "volid": expected_volid, "success": true})
        );
        break;
    }
}

/// QEMU's command line, one argument per entry.
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Names in the run directory that belong to `vmid` (QEMU logs aside).
fn run_files(server: &TestServer, vmid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&server.run)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&vmid.to_string()) && !n.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const VERSION: &str = r#"{"cmd":"version"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_transcript_then_failure_cleanup() {
    bounded(180, async {
        let server = server();
        let vmid = 567;
        let _guard = QemuGuard {
            run: server.run.clone(),
            vmid,
        };
        let work = tempfile::tempdir().unwrap();
        let src_qcow2 = work.path().join("src.qcow2");
        let src_raw = work.path().join("src.raw");
        qcow2_image(&src_qcow2, "8M");
        raw_image(&src_raw, "4M");

        // Things the tunnel did not create and must leave alone: another VM with a volume,
        // and a stray volume of this VMID.
        std::fs::write(server.vm_config(100), "memory: 64\n").unwrap();
        std::fs::create_dir_all(server.images(100)).unwrap();
        std::fs::write(server.images(100).join("vm-100-disk-0.raw"), b"other").unwrap();
        std::fs::create_dir_all(server.images(vmid)).unwrap();
        std::fs::write(server.images(vmid).join("vm-567-disk-9.raw"), b"stray").unwrap();

        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, server.port, &tunnel).await;
        let run = &server.run;
        let storage_socket = s(&run.join(format!("{vmid}.storage")));

        ctl.expect(VERSION, json!({"api": 2, "age": 0, "success": true}))
            .await;
        ctl.expect(
            r#"{"cmd":"bwlimit","operation":"migration","storages":["local"],"bwlimit":null}"#,
            json!({"bwlimit": null, "success": true}),
        )
        .await;

        // An offline volume (say an EFI disk) in qcow2, exactly as observed in the wild.
        ctl.expect(
            r#"{"migration_snapshot":0,"volname":"vm-567-disk-0.qcow2","cmd":"disk-import","allow_rename":"1","storage":"local","export_formats":"qcow2+size","with_snapshots":1,"format":"qcow2"}"#,
            json!({"socket": storage_socket, "format": "qcow2+size", "success": true}),
        )
        .await;
        stream_import(
            &server,
            &mut ctl,
            vmid,
            &storage_socket,
            &src_qcow2,
            "local:567/vm-567-disk-0.qcow2",
        )
        .await;
        // And a raw one, with other encodings of the booleans.
        ctl.expect(
            r#"{"cmd":"disk-import","volname":"vm-567-disk-1.raw","format":"raw","export_formats":"raw+size","storage":"local","allow_rename":1,"with_snapshots":0,"migration_snapshot":null}"#,
            json!({"socket": storage_socket, "format": "raw+size", "success": true}),
        )
        .await;
        stream_import(
            &server,
            &mut ctl,
            vmid,
            &storage_socket,
            &src_raw,
            "local:567/vm-567-disk-1.raw",
        )
        .await;
        let imported = server.images(vmid);
        assert_identical(&src_qcow2, &imported.join("vm-567-disk-0.qcow2"));
        assert_identical(&src_raw, &imported.join("vm-567-disk-1.raw"));
        assert!(
            !run.join(format!("{vmid}.storage")).exists(),
            "storage socket left after the import"
        );

        // The live disk.
        let drivestr = "local:567/vm-567-disk-2.raw,format=raw,iothread=1,size=32M";
        let volid = "local:567/vm-567-disk-2.raw";
        ctl.expect(
            r#"{"cmd":"disk","format":"raw","storage":"local","drive":{"interface":"scsi","index":1,"size":33554432,"iothread":1}}"#,
            json!({"drivestr": drivestr, "volid": volid, "success": true}),
        )
        .await;
        assert_eq!(
            std::fs::metadata(imported.join("vm-567-disk-2.raw"))
                .unwrap()
                .len(),
            32 << 20
        );

        let conf = format!(
            "boot: order=scsi1\ncores: 1\nlock: migrate\nmemory: 64\nname: transcript\n\
             net0: virtio=BC:24:11:00:05:67,bridge=vmbr0\nscsi1: {drivestr}\n\
             scsihw: virtio-scsi-single\nunused0: local:567/vm-567-disk-0.qcow2\n\
             unused1: local:567/vm-567-disk-1.raw\n"
        );
        ctl.expect(
            &json!({"cmd": "config", "conf": conf, "firewall-config": null}).to_string(),
            json!({"success": true}),
        )
        .await;
        let written = std::fs::read_to_string(server.vm_config(vmid)).unwrap();
        assert!(
            written.lines().any(|l| l == "lock: migrate"),
            "{written}"
        );
        assert!(
            !server.data.join("firewall").join("567.fw").exists(),
            "no firewall file for a null firewall-config"
        );

        let start = json!({
            "cmd": "start",
            "start_params": {"statefile": "unix", "forcemachine": null, "forcecpu": null, "skiplock": 1},
            "migrate_opts": {
                "spice_ticket": null,
                "type": "websocket",
                "network": null,
                "storagemap": {"default": "local"},
                "migratedfrom": "src1",
                "nbd_proto_version": 1,
                "nbd": {"scsi1": {"drivestr": drivestr, "volid": volid, "success": true}},
                "remote_node": NODE,
            },
        });
        let migrate_socket = s(&run.join("567.migrate"));
        let nbd_socket = s(&run.join("567_nbd.migrate"));
        ctl.expect(
            &start.to_string(),
            json!({
                "migrate": {
                    "proto": "unix",
                    "addr": migrate_socket,
                    "uri": format!("unix:{migrate_socket}"),
                    "unix_sockets": [nbd_socket],
                },
                "drives": {"scsi1": {
                    "drivestr": drivestr,
                    "volid": volid,
                    "nbd_uri": format!("nbd:unix:{nbd_socket}:exportname=drive-scsi1"),
                }},
                "success": true,
            }),
        )
        .await;
        let pid = mtunnel::qemu::is_running(run, vmid).expect("target QEMU runs");
        // Paused, waiting for the RAM (the server holds the QMP connection, so this is
        // read from the command line).
        let args = cmdline(pid);
        let incoming = args.iter().position(|a| a == "-incoming");
        assert_eq!(
            incoming.map(|i| args[i + 1].as_str()),
            Some(format!("unix:{migrate_socket}").as_str()),
            "{args:?}"
        );
        assert!(args.iter().any(|a| a == "-S"), "{args:?}");

        // The tunnel client's ticket when drive-mirror connects: the forwarded WebSocket
        // reaches QEMU's NBD server, which greets first.
        let mut nbd = open_forward(&server, &mut ctl, vmid, &nbd_socket).await;
        let mut greeting = Vec::new();
        while greeting.len() < 8 {
            match tokio::time::timeout(Duration::from_secs(10), nbd.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => greeting.extend_from_slice(&data),
                other => panic!("no NBD greeting: {other:?}"),
            }
        }
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        nbd.close(None).await.unwrap();

        ctl.expect(
            r#"{"cmd":"bwlimit","operation":"migration","storages":[null],"bwlimit":null}"#,
            json!({"bwlimit": null, "success": true}),
        )
        .await;
        // The migration socket may have tickets too; others may not.
        let reply = ctl
            .send_line(&json!({"path": migrate_socket, "cmd": "ticket"}).to_string())
            .await;
        assert!(
            reply["ticket"].as_str().unwrap().starts_with("PVETUNNEL:"),
            "{reply}"
        );
        let unknown = s(&run.join("999.migrate"));
        ctl.expect(
            &json!({"path": unknown, "cmd": "ticket"}).to_string(),
            json!({"success": false, "msg": format!(
                "failed to handle 'ticket' command - Not allowed to generate ticket for unknown socket '{unknown}'"
            )}),
        )
        .await;

        // No RAM arrives: the source gives up as after a failed phase 2.
        ctl.expect(r#"{"cmd":"nbdstop"}"#, json!({"success": true}))
            .await;
        ctl.expect(r#"{"cmd":"stop"}"#, json!({"success": true}))
            .await;
        assert!(
            mtunnel::qemu::is_running(run, vmid).is_none(),
            "QEMU still runs after stop"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU process {pid} still exists after stop"
        );
        ctl.expect(r#"{"cmd":"quit","cleanup":1}"#, json!({"success": true}))
            .await;
        ctl.expect(
            VERSION,
            json!({"success": false, "msg": "tunnel is in exit-mode, processing 'version' cmd not possible"}),
        )
        .await;
        ctl.close().await;
        let status = server.wait_stopped(&tunnel.upid, 30).await;
        assert_eq!(status["exitstatus"], "OK", "{status}");
        assert_eq!(
            server.task_log(&tunnel.upid).await.last().map(String::as_str),
            Some("TASK OK")
        );

        assert!(!server.vm_config(vmid).exists(), "config left behind");
        assert_eq!(dir_names(&imported), ["vm-567-disk-9.raw"], "volumes left behind");
        assert_eq!(run_files(&server, vmid), Vec::<String>::new(), "sockets left behind");
        // Nothing else touched.
        assert_eq!(
            std::fs::read_to_string(server.vm_config(100)).unwrap(),
            "memory: 64\n"
        );
        assert_eq!(
            std::fs::read(server.images(100).join("vm-100-disk-0.raw")).unwrap(),
            b"other"
        );
        assert_eq!(
            std::fs::read(imported.join("vm-567-disk-9.raw")).unwrap(),
            b"stray"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_transcript_imports_and_unlocks() {
    bounded(120, async {
        let server = server();
        let vmid = 567;
        let work = tempfile::tempdir().unwrap();
        let src_qcow2 = work.path().join("src.qcow2");
        let src_raw = work.path().join("src.raw");
        qcow2_image(&src_qcow2, "8M");
        raw_image(&src_raw, "4M");

        let tunnel = server.open_tunnel(vmid).await;
        let mut ctl = Ctl::open(&server, server.port, &tunnel).await;
        let storage_socket = s(&server.run.join(format!("{vmid}.storage")));

        ctl.expect(VERSION, json!({"api": 2, "age": 0, "success": true}))
            .await;
        ctl.expect(
            r#"{"bwlimit":null,"storages":["local"],"operation":"migration","cmd":"bwlimit"}"#,
            json!({"bwlimit": null, "success": true}),
        )
        .await;
        ctl.expect(
            r#"{"migration_snapshot":0,"volname":"vm-567-disk-0.qcow2","cmd":"disk-import","allow_rename":"1","storage":"local","export_formats":"qcow2+size","with_snapshots":1,"format":"qcow2"}"#,
            json!({"socket": storage_socket, "format": "qcow2+size", "success": true}),
        )
        .await;
        stream_import(
            &server,
            &mut ctl,
            vmid,
            &storage_socket,
            &src_qcow2,
            "local:567/vm-567-disk-0.qcow2",
        )
        .await;
        ctl.expect(
            r#"{"bwlimit":null,"storages":["local"],"operation":"migration","cmd":"bwlimit"}"#,
            json!({"bwlimit": null, "success": true}),
        )
        .await;
        ctl.expect(
            r#"{"with_snapshots":0,"allow_rename":1,"storage":"local","cmd":"disk-import","export_formats":"raw+size","format":"raw","volname":"vm-567-disk-1.raw","migration_snapshot":null}"#,
            json!({"socket": storage_socket, "format": "raw+size", "success": true}),
        )
        .await;
        stream_import(
            &server,
            &mut ctl,
            vmid,
            &storage_socket,
            &src_raw,
            "local:567/vm-567-disk-1.raw",
        )
        .await;

        let body = "boot: order=scsi0\ncores: 1\nmemory: 64\nname: offline\n\
                    net0: virtio=BC:24:11:00:05:68,bridge=vmbr0\n\
                    scsi0: local:567/vm-567-disk-0.qcow2,format=qcow2,iothread=1,size=8M\n\
                    scsi1: local:567/vm-567-disk-1.raw,format=raw,size=4M\n\
                    scsihw: virtio-scsi-single\n";
        let sent = format!("lock: migrate\n{body}");
        ctl.expect(
            &json!({"conf": sent, "cmd": "config", "firewall-config": null}).to_string(),
            json!({"success": true}),
        )
        .await;
        ctl.expect(r#"{"cmd":"unlock"}"#, json!({"success": true}))
            .await;
        ctl.expect(r#"{"cmd":"quit","cleanup":0}"#, json!({"success": true}))
            .await;
        ctl.close().await;
        let status = server.wait_stopped(&tunnel.upid, 30).await;
        assert_eq!(status["exitstatus"], "OK", "{status}");
        let log = server.task_log(&tunnel.upid).await;
        assert_eq!(log.last().map(String::as_str), Some("TASK OK"), "{log:?}");
        assert!(log.iter().any(|l| l == "mtunnel exited"), "{log:?}");

        assert_eq!(
            std::fs::read_to_string(server.vm_config(vmid)).unwrap(),
            body
        );
        let images = server.images(vmid);
        assert_eq!(
            dir_names(&images),
            ["vm-567-disk-0.qcow2", "vm-567-disk-1.raw"]
        );
        assert_identical(&src_qcow2, &images.join("vm-567-disk-0.qcow2"));
        assert_identical(&src_raw, &images.join("vm-567-disk-1.raw"));
        // qcow2+size carries the file byte for byte; raw+size the disk contents.
        assert_eq!(
            std::fs::read(images.join("vm-567-disk-0.qcow2")).unwrap(),
            std::fs::read(&src_qcow2).unwrap()
        );
        assert_eq!(
            std::fs::read(images.join("vm-567-disk-1.raw")).unwrap(),
            std::fs::read(&src_raw).unwrap()
        );
        assert_eq!(run_files(&server, vmid), Vec::<String>::new());
        assert!(mtunnel::qemu::is_running(&server.run, vmid).is_none());
    })
    .await
}
