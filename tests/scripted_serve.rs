//! `mtunnel serve --backend scripted:FILE.lua` as a test harness uses it: the real server,
//! a tunnel opened over HTTPS and driven over its WebSocket, storage and QEMU answered by
//! the script (which rehearses a full disk on the second allocation). A broken script stops
//! the server at start with the file and line.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Options, TestServer, bounded};
use futures_util::{SinkExt, StreamExt};
use mtunnel::net::ws::WsStream;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Sends one command line and reads its one reply line.
async fn send(ws: &mut WsStream, cmd: Value) -> Value {
    let mut line = serde_json::to_vec(&cmd).unwrap();
    line.push(b'\n');
    ws.send(Message::binary(line)).await.unwrap();
    let mut pending = Vec::new();
    loop {
        if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            return serde_json::from_slice(&pending[..pos]).unwrap();
        }
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => pending.extend_from_slice(&data),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

const SCRIPT: &str = r#"
-- rehearsal: the second allocation finds the storage full; QEMU "starts" instantly
return {
  storage = {
    alloc = function(storage, vmid, format, name, size_kib)
      backend.log("alloc " .. storage .. " " .. size_kib .. " KiB")
      if backend.calls["storage.alloc"] >= 2 then
        backend.fail("rehearsal: storage '" .. storage .. "' is full")
      end
      return backend.default.storage.alloc(storage, vmid, format, name, size_kib)
    end,
  },
  hypervisor = {
    start_incoming = function(req)
      backend.sleep(20)
      return backend.default.hypervisor.start_incoming(req)
    end,
  },
}
"#;

#[tokio::test]
async fn a_scripted_backend_answers_storage_and_qemu_calls() {
    bounded(60, async {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("rehearse.lua");
        std::fs::write(&script, SCRIPT).unwrap();
        let server = TestServer::start_with(Options {
            serve_args: vec![
                "--backend".into(),
                format!("scripted:{}", script.display()),
            ],
            ..Options::default()
        });
        assert!(
            server
                .stdout
                .iter()
                .any(|l| l == &format!("backend: scripted ({})", script.display())),
            "{:?}",
            server.stdout
        );
        let tunnel = server.open_tunnel(100).await;
        let mut ws = server.connect(&tunnel).await;
        let disk = |index: u32| {
            json!({"cmd": "disk", "format": "raw", "storage": "local",
                   "drive": {"interface": "scsi", "index": index, "size": 1 << 30}})
        };
        let d0 = send(&mut ws, disk(0)).await;
        assert_eq!(
            d0,
            json!({"success": true, "volid": "local:100/vm-100-disk-0.raw",
                   "drivestr": "local:100/vm-100-disk-0.raw,format=raw,size=1G"})
        );
        assert_eq!(
            send(&mut ws, disk(1)).await,
            json!({"success": false,
                   "msg": "failed to handle 'disk' command - rehearsal: storage 'local' is full"})
        );
        // nothing real was created
        assert!(!server.data.join("images").exists());
        assert_eq!(
            send(
                &mut ws,
                json!({"cmd": "config", "conf": format!("scsi0: {}\n", d0["drivestr"].as_str().unwrap())})
            )
            .await,
            json!({"success": true})
        );
        let started = send(
            &mut ws,
            json!({"cmd": "start", "start_params": {"statefile": "unix"},
                   "migrate_opts": {"migratedfrom": "src", "type": "websocket",
                                    "nbd": {"scsi0": {"volid": d0["volid"], "drivestr": d0["drivestr"], "success": true}}}}),
        )
        .await;
        let run = server.run.display().to_string();
        assert_eq!(
            started,
            json!({"success": true,
                   "migrate": {"proto": "unix", "addr": format!("{run}/100.migrate"),
                               "uri": format!("unix:{run}/100.migrate"),
                               "unix_sockets": [format!("{run}/100_nbd.migrate")]},
                   "drives": {"scsi0": {"volid": d0["volid"], "drivestr": d0["drivestr"],
                                        "nbd_uri": format!("nbd:unix:{run}/100_nbd.migrate:exportname=drive-scsi0")}}})
        );
        assert_eq!(
            send(&mut ws, json!({"cmd": "resume"})).await,
            json!({"success": true})
        );
        assert_eq!(
            send(&mut ws, json!({"cmd": "quit", "cleanup": 1})).await,
            json!({"success": true})
        );
        ws.close(None).await.unwrap();
        let status = server.wait_stopped(&tunnel.upid, 20).await;
        // After resume the target VM may be the only live copy: `quit cleanup=1` keeps it.
        assert_eq!(status["exitstatus"], "WARNINGS: 1", "{status}");
        assert!(server.vm_config(100).exists());
        let log = server.task_log(&tunnel.upid).await;
        assert!(
            log.iter().any(|l| l
                == "WARN: VM 100 was resumed on this node and may be the only live copy: \
                    leaving it running with its volumes and its config (lock kept until 'unlock')"),
            "{log:?}"
        );
    })
    .await;
}

#[test]
fn a_broken_backend_script_stops_the_server_at_start() {
    let dir = tempfile::Builder::new()
        .prefix("mts")
        .tempdir_in("/tmp")
        .unwrap();
    let script = dir.path().join("broken.lua");
    std::fs::write(
        &script,
        "return {\n  storage = {\n    alloc = function( end,\n  },\n}\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--backend")
        .arg(format!("scripted:{}", script.display()))
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--run-dir")
        .arg(dir.path().join("r"))
        .args(["--node", "testnode", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with a broken backend script");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "mtunnel: error: backend script {}:3: ",
            script.display()
        )),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("URL:"),
        "the server must not have started"
    );
}
