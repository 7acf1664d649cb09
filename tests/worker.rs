//! The tunnel worker and its Lua sandbox, driven in-process: a real node on temporary
//! directories, `tunnel::open` as the API calls it, and a real UNIX connection to the
//! control socket. Asserts exact reply lines for the wire rules and every bad input, the
//! sandbox limits, and the cleanup of what a tunnel allocated.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::random_qcow2;
use mtunnel::auth::acl::{ALL_PRIVILEGES, Acl, AclEntry};
use mtunnel::config::{ConfigFile, NodeConfig, Overrides};
use mtunnel::node::Node;
use mtunnel::task::Upid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    node: Arc<Node>,
    /// The node's tunnel layer with the Lua handlers, as `serve` puts it together.
    tunnels: Arc<mtunnel::tunnel::Tunnels>,
}

fn env_with(file: ConfigFile) -> Env {
    let dir = tempfile::Builder::new()
        .prefix("mtw")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path().to_path_buf();
    let cfg = NodeConfig::from_parts(
        file,
        &Overrides {
            node: Some("pve1".into()),
            data_dir: Some(root.join("d")),
            run_dir: Some(root.join("r")),
            ..Default::default()
        },
    )
    .unwrap();
    let node = Node::open(cfg).unwrap();
    let tunnels = mtunnel::tunnel::Tunnels::new(
        node.tunnel_services(),
        std::sync::Arc::new(mtunnel::script::handler::lua_handler),
    );
    Env {
        _dir: dir,
        root,
        node,
        tunnels,
    }
}

fn env() -> Env {
    env_with(ConfigFile {
        bridges: Some(vec!["vmbr0".into()]),
        ..Default::default()
    })
}

fn token(env: &Env, authid: &str, privs: &[&str]) -> String {
    let acl = Acl {
        entries: vec![AclEntry {
            path: "/".into(),
            privs: privs.iter().map(|s| s.to_string()).collect(),
            propagate: true,
        }],
    };
    env.node.tokens.create(authid, acl, None).unwrap();
    authid.to_string()
}

struct Conn {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    /// The tunnel's task.
    upid: Upid,
}

impl Conn {
    async fn raw(&mut self, bytes: &[u8]) -> Value {
        self.write.write_all(bytes).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), self.read.read_line(&mut line))
            .await
            .expect("reply within 30 s")
            .unwrap();
        assert!(
            line.ends_with('\n'),
            "reply line must end in a newline: {line:?}"
        );
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, cmd: Value) -> Value {
        let mut bytes = serde_json::to_vec(&cmd).unwrap();
        bytes.push(b'\n');
        self.raw(&bytes).await
    }
}

async fn open(env: &Env, authid: &str, vmid: u32) -> Conn {
    let opened = mtunnel::tunnel::open(&env.tunnels, authid, vmid, &["local".into()], &[])
        .await
        .unwrap_or_else(|e| panic!("open tunnel: {e}"));
    let stream = UnixStream::connect(&opened.socket).await.unwrap();
    let (r, w) = stream.into_split();
    Conn {
        read: BufReader::new(r),
        write: w,
        upid: opened.upid,
    }
}

/// Waits (at most 10 s) until the tunnel task `upid` has ended; returns its log lines.
async fn task_ended(env: &Env, upid: &Upid) -> Vec<String> {
    for _ in 0..500 {
        if !env.node.tasks.is_running(upid) {
            let (lines, _) = env.node.tasks.read_log(upid, 0, 1000).expect("task log");
            return lines.into_iter().map(|(_, l)| l).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("tunnel task {upid} still running after 10 s");
}

fn err(msg: &str) -> Value {
    json!({"success": false, "msg": msg})
}

fn conf_path(env: &Env, vmid: u32) -> PathBuf {
    env.root.join(format!("d/qemu-server/{vmid}.conf"))
}

fn image(env: &Env, vmid: u32, name: &str) -> PathBuf {
    env.root.join(format!("d/images/{vmid}/{name}"))
}

async fn wait_gone(path: &Path) {
    for _ in 0..200 {
        if !path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} still exists", path.display());
}

#[tokio::test]
async fn wire_rules_and_malformed_input() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 100).await;
    assert_eq!(
        c.send(json!({"cmd": "version"})).await,
        json!({"api": 2, "age": 0, "success": true})
    );
    assert_eq!(
        c.raw(b"not json\n").await,
        err("failed to parse command - expected ident at line 1 column 2")
    );
    assert_eq!(
        c.raw(b"[1,2]\n").await,
        err("failed to parse command - not a JSON object")
    );
    let garbage = c.raw(b"\xff\xfe\x00\x01garbage\n").await;
    assert!(
        garbage["msg"]
            .as_str()
            .unwrap()
            .starts_with("failed to parse command - "),
        "{garbage}"
    );
    assert_eq!(c.send(json!({"foo": 1})).await, err("'cmd' missing"));
    assert_eq!(c.send(json!({"cmd": 5})).await, err("'cmd' missing"));
    assert_eq!(
        c.send(json!({"cmd": "nope"})).await,
        err("unknown command 'nope' given")
    );
    // Two commands in one write, one command split over two writes: still one reply each.
    c.write
        .write_all(b"{\"cmd\":\"version\"}\n{\"cmd\":\"vers")
        .await
        .unwrap();
    assert_eq!(c.raw(b"ion\"}\n").await["api"], json!(2));
    let mut line = String::new();
    c.read.read_line(&mut line).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["api"],
        json!(2)
    );

    // A 100 MiB line is refused with one reply, and the tunnel keeps serving.
    let mut huge = vec![b'x'; 100 << 20];
    huge.push(b'\n');
    assert_eq!(
        c.raw(&huge).await,
        err("failed to parse command - line too long (limit 16777216 bytes)")
    );
    assert_eq!(
        c.send(json!({"cmd": "version"})).await["success"],
        json!(true)
    );

    // Wrong types, unknown keys, missing keys: PVE's parameter errors.
    assert_eq!(
        c.send(json!({"cmd": "disk", "storage": "local", "format": "raw", "drive": {"interface": "scsi", "index": 0, "size": "abc"}})).await,
        err("failed to handle 'disk' command - 400 Parameter verification failed.\ndrive.size: type check ('integer') failed - got 'abc'\n")
    );
    assert_eq!(
        c.send(json!({"cmd": "bwlimit", "storages": ["local"], "bogus": 1}))
            .await,
        err(
            "failed to handle 'bwlimit' command - 400 Parameter verification failed.\nbogus: property is not defined in schema and the schema does not allow additional properties\n"
        )
    );
    assert_eq!(
        c.send(json!({"cmd": "ticket"})).await,
        err(
            "failed to handle 'ticket' command - 400 Parameter verification failed.\npath: property is missing and it is not optional\n"
        )
    );
    assert_eq!(
        c.send(json!({"cmd": "quit", "cleanup": ""})).await,
        err(
            "failed to handle 'quit' command - 400 Parameter verification failed.\ncleanup: type check ('boolean') failed - got ''\n"
        )
    );
    // Out of order: no config yet.
    assert_eq!(
        c.send(json!({"cmd": "start", "start_params": {"statefile": "unix"}, "migrate_opts": {"type": "websocket", "migratedfrom": "src1"}})).await,
        err("failed to handle 'start' command - VM config not received yet: send 'config' before 'start'")
    );
    assert_eq!(
        c.send(json!({"cmd": "ticket", "path": "/etc/passwd"}))
            .await,
        err(
            "failed to handle 'ticket' command - Not allowed to generate ticket for unknown socket '/etc/passwd'"
        )
    );
    assert_eq!(
        c.send(json!({"cmd": "query-disk-import"})).await,
        err("failed to handle 'query-disk-import' command - no disk import running")
    );
    // Nothing was created by any of this.
    assert_eq!(
        std::fs::read_to_string(conf_path(&env, 100)).unwrap(),
        "lock: create\n"
    );
    assert!(!env.root.join("d/images/100").exists());

    assert_eq!(
        c.send(json!({"cmd": "quit", "cleanup": 1})).await,
        json!({"success": true})
    );
    assert_eq!(
        c.send(json!({"cmd": "version"})).await,
        err("tunnel is in exit-mode, processing 'version' cmd not possible")
    );
    drop(c);
    wait_gone(&conf_path(&env, 100)).await;
}

#[tokio::test]
async fn storage_permission_and_bad_volnames() {
    let env = env();
    // May accept VMs but not place disks on `local`.
    let limited = token(&env, "mig@pve!nodisk", &["VM.Allocate", "Sys.Incoming"]);
    let opened = mtunnel::tunnel::open(&env.tunnels, &limited, 101, &["local".into()], &[]).await;
    assert_eq!(
        opened.err().unwrap().to_string(),
        "Permission check failed (/storage/local, Datastore.AllocateSpace)"
    );
    assert!(
        !conf_path(&env, 101).exists(),
        "a refused tunnel leaves no config"
    );
    let opened = mtunnel::tunnel::open(&env.tunnels, &limited, 101, &[], &[])
        .await
        .unwrap();
    let stream = UnixStream::connect(&opened.socket).await.unwrap();
    let (r, w) = stream.into_split();
    let mut c = Conn {
        read: BufReader::new(r),
        write: w,
        upid: opened.upid,
    };
    assert_eq!(
        c.send(json!({"cmd": "disk", "storage": "local", "format": "raw", "drive": {"interface": "scsi", "index": 0, "size": 1048576}})).await,
        err("failed to handle 'disk' command - Permission check failed (/storage/local, Datastore.AllocateSpace)")
    );

    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 102).await;
    let long = format!("vm-102-{}", "a".repeat(293));
    let refused = [
        ("../../etc/passwd", "'../../etc/passwd' - path components are not allowed".to_string()),
        ("/etc/passwd", "'/etc/passwd' - path components are not allowed".into()),
        ("vm-102-disk-0/../x", "'vm-102-disk-0/../x' - path components are not allowed".into()),
        (
            "vm-102-disk-0\0.raw",
            "'vm-102-disk-0\\0.raw' - character '\\0' not allowed (use letters, digits, '-', '_' and '.')".into(),
        ),
        (
            long.as_str(),
            format!("'vm-102-{}...' - longer than 200 characters", "a".repeat(57)),
        ),
        ("vm-999-disk-0.raw", "'vm-999-disk-0.raw' - should be 'vm-102-*'".into()),
    ];
    let storage_socket = env.root.join("r/102.storage");
    for (volname, reason) in refused {
        let r = c
            .send(json!({"cmd": "disk-import", "volname": volname, "format": "raw", "export_formats": "raw+size", "storage": "local", "allow_rename": 0}))
            .await;
        assert_eq!(
            r,
            err(&format!(
                "failed to handle 'disk-import' command - illegal name {reason}"
            )),
            "{volname:?}"
        );
        assert!(
            !storage_socket.exists(),
            "{volname:?}: no socket is created"
        );
    }
    // Nothing is pending: the next, valid import starts and completes.
    assert_eq!(
        c.send(json!({"cmd": "query-disk-import"})).await,
        err("failed to handle 'query-disk-import' command - no disk import running")
    );
    assert_eq!(
        import(&mut c, "vm-102-disk-0.raw", "raw", 512, &[5u8; 512]).await,
        json!({"success": true, "status": "complete", "volid": "local:102/vm-102-disk-0.raw"})
    );
    assert_eq!(
        files_in(&env.root.join("d/images/102")),
        ["vm-102-disk-0.raw"]
    );
}

fn files_in(dir: &Path) -> Vec<String> {
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

async fn import(c: &mut Conn, volname: &str, format: &str, header: u64, payload: &[u8]) -> Value {
    let stream_format = format!("{format}+size");
    let r = c
        .send(json!({"cmd": "disk-import", "volname": volname, "format": format, "export_formats": stream_format, "storage": "local", "allow_rename": "1", "with_snapshots": 1, "migration_snapshot": 0}))
        .await;
    assert_eq!(r["success"], json!(true), "{r}");
    let mut s = UnixStream::connect(r["socket"].as_str().unwrap())
        .await
        .unwrap();
    s.write_all(&header.to_le_bytes()).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    for _ in 0..250 {
        let status = c.send(json!({"cmd": "query-disk-import"})).await;
        if status["status"] != json!("pending") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("import did not finish");
}

#[tokio::test]
async fn imports_one_at_a_time_and_truncated_stream_fails() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 103).await;
    let r = c
        .send(json!({"cmd": "disk-import", "volname": "vm-103-disk-0", "format": "raw", "export_formats": "raw+size", "storage": "local"}))
        .await;
    assert_eq!(r["success"], json!(true));
    assert_eq!(
        c.send(json!({"cmd": "disk-import", "volname": "vm-103-disk-1", "format": "raw", "export_formats": "raw+size", "storage": "local"})).await,
        err("failed to handle 'disk-import' command - disk import already running")
    );
    // Truncated: the header promises 1 MiB, 1000 bytes arrive.
    let mut s = UnixStream::connect(r["socket"].as_str().unwrap())
        .await
        .unwrap();
    s.write_all(&(1u64 << 20).to_le_bytes()).await.unwrap();
    s.write_all(&[7u8; 1000]).await.unwrap();
    drop(s);
    let mut status = json!(null);
    for _ in 0..250 {
        status = c.send(json!({"cmd": "query-disk-import"})).await;
        if status["status"] != json!("pending") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status["status"], json!("error"), "{status}");
    assert!(
        !image(&env, 103, "vm-103-disk-0.raw").exists(),
        "partial image removed"
    );
    // Format mismatch between what the source offers and what the storage imports.
    assert_eq!(
        c.send(json!({"cmd": "disk-import", "volname": "vm-103-disk-1", "format": "qcow2", "export_formats": "raw+size", "storage": "local"})).await,
        err("failed to handle 'disk-import' command - no matching import/export format found for storage 'local'")
    );
}

/// Starts a `qcow2+size` import and streams the first `len` bytes of `src`, then closes
/// the connection: with a shutdown of the write side (`clean`) or by just dropping it.
async fn stream_qcow2_prefix(
    c: &mut Conn,
    volname: &str,
    src: &Path,
    len: usize,
    clean: bool,
) -> Value {
    let r = c
        .send(json!({"cmd": "disk-import", "volname": volname, "format": "qcow2", "export_formats": "qcow2+size", "storage": "local", "allow_rename": 0, "with_snapshots": 1}))
        .await;
    assert_eq!(r["success"], json!(true), "{r}");
    let bytes = std::fs::read(src).unwrap();
    let mut s = UnixStream::connect(r["socket"].as_str().unwrap())
        .await
        .unwrap();
    s.write_all(&(64u64 << 20).to_le_bytes()).await.unwrap();
    s.write_all(&bytes[..len]).await.unwrap();
    if clean {
        s.shutdown().await.unwrap();
    }
    drop(s);
    for _ in 0..1500 {
        let status = c.send(json!({"cmd": "query-disk-import"})).await;
        if status["status"] != json!("pending") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("import did not finish");
}

#[tokio::test]
async fn truncated_qcow2_import_is_an_error_and_leaves_nothing() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let src = random_qcow2(&env.root);
    let len = std::fs::metadata(&src).unwrap().len() as usize;
    let mut c = open(&env, &root, 112).await;
    let dst = image(&env, 112, "vm-112-disk-0.qcow2");
    for clean in [true, false] {
        let status = stream_qcow2_prefix(&mut c, "vm-112-disk-0.qcow2", &src, len / 2, clean).await;
        assert_eq!(
            status,
            json!({"success": true, "status": "error", "msg": format!(
                "import stream for '{}' ended early: got {} bytes, the qcow2 image needs at least {len}",
                dst.display(),
                len / 2
            )}),
            "clean close: {clean}"
        );
        assert_eq!(
            files_in(&env.root.join("d/images/112")),
            Vec::<String>::new()
        );
    }
    // The whole image arrives intact.
    let status = stream_qcow2_prefix(&mut c, "vm-112-disk-0.qcow2", &src, len, true).await;
    assert_eq!(
        status,
        json!({"success": true, "status": "complete", "volid": "local:112/vm-112-disk-0.qcow2"})
    );
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn lost_connection_frees_exactly_what_the_tunnel_created() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    // Another VM with a volume that must survive.
    std::fs::write(
        conf_path(&env, 200),
        "memory: 128\nscsi0: local:200/vm-200-disk-0.raw\n",
    )
    .unwrap();
    std::fs::create_dir_all(env.root.join("d/images/200")).unwrap();
    std::fs::write(image(&env, 200, "vm-200-disk-0.raw"), b"keep").unwrap();

    let mut c = open(&env, &root, 104).await;
    let disk = c
        .send(json!({"cmd": "disk", "storage": "local", "format": "qcow2", "drive": {"interface": "scsi", "index": 0, "size": 1048576, "discard": "on"}}))
        .await;
    assert_eq!(
        disk,
        json!({"success": true, "volid": "local:104/vm-104-disk-0.qcow2", "drivestr": "local:104/vm-104-disk-0.qcow2,discard=on,format=qcow2,size=1M"})
    );
    let done = import(&mut c, "vm-104-disk-1.raw", "raw", 4096, &[9u8; 4096]).await;
    assert_eq!(
        done,
        json!({"success": true, "status": "complete", "volid": "local:104/vm-104-disk-1.raw"})
    );
    // The config may not point at volumes this tunnel did not create.
    assert_eq!(
        c.send(
            json!({"cmd": "config", "conf": "memory: 128\nscsi1: local:200/vm-200-disk-0.raw\n"})
        )
        .await,
        err(
            "failed to handle 'config' command - scsi1: volume 'local:200/vm-200-disk-0.raw' was not created by this migration"
        )
    );
    let conf = "#migrated\nboot: order=scsi0\nlock: migrate\nmemory: 128\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nscsi0: local:104/vm-104-disk-0.qcow2,discard=on,format=qcow2,size=1M\nscsi1: local:104/vm-104-disk-1.raw,size=4K\nvmgenid: 3ab2f3e5-0000-0000-0000-000000000000\n\n[snap1]\nmemory: 64\n";
    assert_eq!(
        c.send(json!({"cmd": "config", "conf": conf, "firewall-config": "[OPTIONS]\nenable: 1\n"}))
            .await,
        json!({"success": true})
    );
    let written = std::fs::read_to_string(conf_path(&env, 104)).unwrap();
    assert_eq!(
        written,
        "#migrated\nboot: order=scsi0\nlock: migrate\nmemory: 128\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nscsi0: local:104/vm-104-disk-0.qcow2,discard=on,format=qcow2,size=1M\nscsi1: local:104/vm-104-disk-1.raw,size=4K\nvmgenid: 3ab2f3e5-0000-0000-0000-000000000000\n"
    );
    assert!(env.root.join("d/firewall/104.fw").exists());
    // Connection lost without quit: everything of VM 104 goes, VM 200 stays.
    drop(c);
    wait_gone(&conf_path(&env, 104)).await;
    assert!(!image(&env, 104, "vm-104-disk-0.qcow2").exists());
    assert!(!image(&env, 104, "vm-104-disk-1.raw").exists());
    assert!(!env.root.join("d/firewall/104.fw").exists());
    assert_eq!(
        std::fs::read(image(&env, 200, "vm-200-disk-0.raw")).unwrap(),
        b"keep"
    );
    assert!(conf_path(&env, 200).exists());
    wait_gone(&env.root.join("r/104.mtunnel")).await;
    assert!(!env.root.join("r/104.storage").exists());
}

#[tokio::test]
async fn offline_migration_keeps_its_result_after_unlock() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 105).await;
    let done = import(&mut c, "vm-105-disk-0.raw", "raw", 8192, &[3u8; 8192]).await;
    let volid = done["volid"].as_str().unwrap().to_string();
    let conf = format!("lock: migrate\nmemory: 128\nscsi0: {volid},size=8K\n");
    assert_eq!(
        c.send(json!({"cmd": "config", "conf": conf})).await,
        json!({"success": true})
    );
    // Now the config carries `migrate`; a command expecting it passes, unlock removes it.
    assert_eq!(
        c.send(json!({"cmd": "unlock"})).await,
        json!({"success": true})
    );
    assert_eq!(
        std::fs::read_to_string(conf_path(&env, 105)).unwrap(),
        format!("memory: 128\nscsi0: {volid},size=8K\n")
    );
    // Lost connection after unlock: the tunnel ends (its cleanup has run) and the
    // migrated VM is kept.
    let upid = c.upid.clone();
    drop(c);
    let log = task_ended(&env, &upid).await;
    assert_eq!(
        log[log.len() - 2..],
        [
            "received command 'unlock'",
            "TASK ERROR: mtunnel exited unexpectedly"
        ],
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("cleanup")),
        "nothing may be cleaned up after unlock: {log:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(conf_path(&env, 105)).unwrap(),
        format!("memory: 128\nscsi0: {volid},size=8K\n")
    );
    assert_eq!(
        std::fs::read(image(&env, 105, "vm-105-disk-0.raw")).unwrap(),
        [3u8; 8192]
    );
}

/// Issue 17: `unlock` before `config` removed the `create` reservation and committed the
/// tunnel: an empty config stayed for good and the VMID was wedged. Now it is refused, the
/// reservation stays, the lost connection frees it, and the VMID opens again.
#[tokio::test]
async fn unlock_before_config_keeps_the_reservation_for_cleanup() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 111).await;
    assert_eq!(
        c.send(json!({"cmd": "unlock"})).await,
        err(
            "failed to handle 'unlock' command - found lock 'create' trying to remove 'migrate' \
             lock - the VM config was not sent yet ('config' comes first)"
        )
    );
    assert_eq!(
        std::fs::read_to_string(conf_path(&env, 111)).unwrap(),
        "lock: create\n"
    );
    drop(c);
    wait_gone(&conf_path(&env, 111)).await;
    let mut again = open(&env, &root, 111).await;
    assert_eq!(
        again.send(json!({"cmd": "version"})).await,
        json!({"api": 2, "age": 0, "success": true})
    );
}

/// A handler that commits while the config is still the reservation is refused by the
/// host: nothing would be migrated, yet the empty config would be kept for good.
#[tokio::test]
async fn commit_of_the_reserved_config_is_refused() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    write_handler(
        &env,
        "commit-now",
        "return { description = 'x', params = false, run = function() pve.tunnel.commit() end }",
    );
    let mut c = open(&env, &root, 112).await;
    assert_eq!(
        c.send(json!({"cmd": "commit-now"})).await,
        err(
            "failed to handle 'commit-now' command - cannot commit the migration of VM 112: \
             its config is still the empty one reserved for the tunnel (lock 'create'); \
             'config' must come first"
        )
    );
    drop(c);
    wait_gone(&conf_path(&env, 112)).await;
}

#[tokio::test]
async fn wrong_lock_is_refused() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 106).await;
    // Someone else changed the lock behind the tunnel's back.
    std::fs::write(conf_path(&env, 106), "lock: backup\n").unwrap();
    assert_eq!(
        c.send(json!({"cmd": "config", "conf": "memory: 128\n"}))
            .await,
        err(
            "failed to handle 'config' command - Encountered wrong lock - aborting mtunnel command handling."
        )
    );
    assert_eq!(
        std::fs::read_to_string(conf_path(&env, 106)).unwrap(),
        "lock: backup\n"
    );
}

fn write_handler(env: &Env, name: &str, code: &str) {
    let dir = env.root.join("d/handlers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.lua")), code).unwrap();
}

#[tokio::test]
async fn sandbox_limits_turn_runaway_handlers_into_errors() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    write_handler(
        &env,
        "spin",
        "return { description = 'loop', params = false, lock = false, run = function() while true do end end }",
    );
    write_handler(
        &env,
        "spin-pcall",
        "return { description = 'loop', params = false, lock = false, run = function() while true do pcall(function() while true do end end) end end }",
    );
    write_handler(
        &env,
        "hog",
        "return { description = 'mem', params = false, lock = false, run = function() local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end end }",
    );
    write_handler(
        &env,
        "escape",
        "return { description = 'try', params = { what = { type = 'string' } }, lock = false, run = function(ctx, p) local f = load or require or dofile or (io and io.open) or (os and os.execute); if f then return { escaped = true } end; pve.fail(p.what .. ': not available') end }",
    );
    write_handler(
        &env,
        "waits-in-pcall",
        "return { description = 'x', params = false, lock = false, run = function() local ok, v = pcall(pve.storage.alloc, 'local', 'raw', 1024); return { ok = ok, v = tostring(v), co = type(coroutine), rs = type(rawset) } end }",
    );
    write_handler(
        &env,
        "broken",
        "return { description = 'x', run = function( end }",
    );
    write_handler(
        &env,
        "ro",
        "return { description = 'x', params = false, lock = false, run = function() pve.storage = nil end }",
    );
    let mut c = open(&env, &root, 107).await;
    let r = c.send(json!({"cmd": "spin"})).await;
    assert_eq!(
        r,
        err(
            "failed to handle 'spin' command - handler exceeded its instruction limit (runaway loop?)"
        )
    );
    let r = c.send(json!({"cmd": "spin-pcall"})).await;
    assert_eq!(
        r,
        err(
            "failed to handle 'spin-pcall' command - handler exceeded its instruction limit (runaway loop?)"
        )
    );
    let r = c.send(json!({"cmd": "hog"})).await;
    assert_eq!(
        r,
        err(
            "failed to handle 'hog' command - handler ran out of memory (Lua memory limit reached)"
        )
    );
    let r = c.send(json!({"cmd": "escape", "what": "io"})).await;
    assert_eq!(
        r,
        err("failed to handle 'escape' command - io: not available")
    );
    // A host function that waits (qemu-img) works inside pcall; no coroutine, no rawset.
    assert_eq!(
        c.send(json!({"cmd": "waits-in-pcall"})).await,
        json!({"success": true, "ok": true, "v": "local:107/vm-107-disk-0.raw", "co": "nil", "rs": "nil"})
    );
    let r = c.send(json!({"cmd": "broken"})).await;
    let msg = r["msg"].as_str().unwrap();
    assert!(
        msg.starts_with("failed to handle 'broken' command - handler not loaded: "),
        "{msg}"
    );
    assert!(
        msg.contains("broken.lua:1:"),
        "the error names file and line: {msg}"
    );
    let r = c.send(json!({"cmd": "ro"})).await;
    assert!(
        r["msg"].as_str().unwrap().contains("pve is read-only"),
        "{r}"
    );
    // After all of that the tunnel still serves.
    assert_eq!(
        c.send(json!({"cmd": "version"})).await,
        json!({"api": 2, "age": 0, "success": true})
    );
}

#[tokio::test]
async fn edited_handler_takes_effect_for_the_next_tunnel_only() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut first = open(&env, &root, 108).await;
    // An admin forces qcow2 for every NBD disk.
    let builtin = include_str!("../handlers/disk.lua");
    let edited = builtin.replace("local format = p.format", "local format = 'qcow2'");
    assert_ne!(builtin, edited);
    write_handler(&env, "disk", &edited);
    let disk = json!({"cmd": "disk", "storage": "local", "format": "raw", "drive": {"interface": "scsi", "index": 0, "size": 1048576}});
    assert_eq!(
        first.send(disk.clone()).await["volid"],
        json!("local:108/vm-108-disk-0.raw")
    );
    let mut second = open(&env, &root, 109).await;
    assert_eq!(
        second.send(disk).await["volid"],
        json!("local:109/vm-109-disk-0.qcow2")
    );
}

#[tokio::test]
async fn accept_timeout_removes_the_reserved_config() {
    let env = env_with(ConfigFile {
        tunnel_accept_timeout_secs: Some(1),
        ..Default::default()
    });
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let opened = mtunnel::tunnel::open(&env.tunnels, &root, 110, &[], &[])
        .await
        .unwrap();
    assert!(conf_path(&env, 110).exists());
    wait_gone(&conf_path(&env, 110)).await;
    for _ in 0..100 {
        if !env.node.tasks.is_running(&opened.upid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = env.node.tasks.status(&opened.upid).unwrap();
    assert_eq!(status.exit.unwrap().as_text(), "Exiting mtunnel");
}

#[tokio::test]
async fn lua_limits_come_from_the_config() {
    let env = env_with(ConfigFile {
        lua_instruction_limit: Some(1_000_000),
        ..Default::default()
    });
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    // ~2 M instructions: fine with the default budget, too many for this node's.
    write_handler(
        &env,
        "count",
        "return { description = 'n', params = false, lock = false, run = function() local n = 0 for i = 1, 500000 do n = n + i end return { n = n } end }",
    );
    let mut c = open(&env, &root, 111).await;
    assert_eq!(
        c.send(json!({"cmd": "count"})).await,
        err(
            "failed to handle 'count' command - handler exceeded its instruction limit (runaway loop?)"
        )
    );
    let roomy = env_with(ConfigFile::default());
    let root = token(&roomy, "root@pam!t", ALL_PRIVILEGES);
    write_handler(
        &roomy,
        "count",
        "return { description = 'n', params = false, lock = false, run = function() local n = 0 for i = 1, 500000 do n = n + i end return { n = n } end }",
    );
    let mut c = open(&roomy, &root, 111).await;
    assert_eq!(
        c.send(json!({"cmd": "count"})).await,
        json!({"success": true, "n": 125000250000i64})
    );
}

/// Issue 9, item 5: one property-string syntax everywhere. `disk` refuses a drive key that
/// would put a second `file` into its drive string; `config` refuses at once, with `start`'s
/// message, what `start` would refuse, and writes nothing.
#[tokio::test]
async fn config_and_disk_refuse_what_start_would_refuse() {
    let env = env();
    let root = token(&env, "root@pam!t", ALL_PRIVILEGES);
    let mut c = open(&env, &root, 120).await;
    let drive = |extra: Value| {
        let mut d = json!({"interface": "scsi", "index": 0, "size": 1048576});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"cmd": "disk", "format": "raw", "storage": "local", "drive": d})
    };
    assert_eq!(
        c.send(drive(json!({"x,file": "/some/path"}))).await,
        err(
            "failed to handle 'disk' command - invalid key 'x,file' - property keys are made of letters, digits, '_', '-' and '.'"
        )
    );
    let disk = c.send(drive(json!({}))).await;
    let drivestr = disk["drivestr"].as_str().unwrap().to_string();

    let unsupported = "is not supported by mtunnel's QEMU layer";
    let hint = "remove it from the VM config before migrating";
    let cases = [
        (
            format!("scsi0: {drivestr},serial=\"a,file=/etc/shadow\"\n"),
            "config option 'scsi0': invalid value 'a,file=/etc/shadow': serial: up to 20 of [A-Za-z0-9_- ]".to_string(),
        ),
        (
            "scsi0: volume=/some/path\n".to_string(),
            "scsi0: volume '/some/path' was not created by this migration".to_string(),
        ),
        (
            "cores: 1\nname: a\rb\n".to_string(),
            "line 2: invalid value 'a\\rb' for 'name' - contains the control character U+000D; values must be printable text".to_string(),
        ),
        (
            "name: a\0b\n".to_string(),
            "line 1: invalid value 'a\\0b' for 'name' - contains the control character U+0000; values must be printable text".to_string(),
        ),
        (
            "args: -device foo\n".to_string(),
            format!("config option 'args' {unsupported} (raw QEMU arguments); {hint}"),
        ),
        (
            "hostpci0: 0000:01:00.0\n".to_string(),
            format!("config option 'hostpci0' {unsupported} (PCI passthrough); {hint}"),
        ),
        (
            "usb0: host=1234:5678\n".to_string(),
            format!("config option 'usb0' {unsupported} (USB passthrough); {hint}"),
        ),
        (
            "serial0: /dev/ttyS0\n".to_string(),
            format!(
                "config option 'serial0' {unsupported} (serial device '/dev/ttyS0' (only 'socket')); {hint}"
            ),
        ),
        (
            "memory: 99999999\n".to_string(),
            "config option 'memory': invalid value '99999999': want an integer 1..67108864"
                .to_string(),
        ),
    ];
    for (conf, msg) in cases {
        assert_eq!(
            c.send(json!({"cmd": "config", "conf": conf})).await,
            err(&format!("failed to handle 'config' command - {msg}")),
            "{conf:?}"
        );
        assert_eq!(
            std::fs::read_to_string(conf_path(&env, 120)).unwrap(),
            "lock: create\n",
            "{conf:?}"
        );
    }
    let conf = format!("memory: 128\nscsi0: {drivestr}\nserial0: socket\n");
    assert_eq!(
        c.send(json!({"cmd": "config", "conf": conf})).await,
        json!({"success": true})
    );
}
