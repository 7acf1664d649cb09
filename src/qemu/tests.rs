//! Tests against real QEMU (software emulation, `accel=tcg`): start/stop and process
//! bookkeeping, RAM loaded with `-device loader` and read back with `pmemsave`, a local live
//! migration with drive-mirror into the target's NBD export, the guest-agent timeout of an
//! agent-less guest, and the failure paths that must leave no process behind.
//!
//! Every test runs in its own short directory under /tmp (UNIX socket paths < 108 bytes), is
//! bounded in time, and holds its VMs in [`VmGuard`]s so a failing assertion still kills them.
//! When QEMU is missing the tests FAIL (they never skip): run `.ci/install-qemu.sh` as root.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

const MIB: u64 = 1024 * 1024;
/// Where the loader puts the blob in guest RAM (16 MiB, as in the QEMU notes).
const BLOB_ADDR: u64 = 16 * MIB;

fn require_qemu() {
    for bin in ["qemu-system-x86_64", "qemu-img", "qemu-io"] {
        let ok = Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{bin} is not installed: run `sudo .ci/install-qemu.sh` (it installs qemu-system-x86 \
             matching the installed qemu-utils). These tests need real QEMU and never skip."
        );
    }
}

fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mtq")
        .tempdir_in("/tmp")
        .expect("creating a test directory under /tmp")
}

async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its {secs} s bound"),
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qcow2(path: &Path, size: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &path.to_string_lossy(), size],
    );
}

/// Deterministic incompressible bytes (xorshift64).
fn blob(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pids of processes whose command line mentions `dir` (what a test may have left behind).
fn processes_in(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// A small OS-less VM: TCG, 128 MiB, no VGA, one qcow2 disk on virtio-scsi, a NIC, an agent
/// channel.
fn small_spec(vmid: u32, run: &Path, disk: &Path) -> VmSpec {
    let mut spec = VmSpec::new(vmid, run)
        .option("memory", "128")
        .option("machine", "q35")
        .option("vga", "none")
        .option("scsihw", "virtio-scsi-pci")
        .option("scsi0", "local:vm-disk-0,size=100M")
        .option("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0")
        .option("agent", "1")
        .disk("scsi0", disk, DiskFormat::Qcow2);
    spec.accel = Accel::Tcg;
    spec
}

#[tokio::test]
async fn vm_starts_runs_and_quits_cleanly() {
    require_qemu();
    let dir = run_dir();
    let disk = dir.path().join("d.qcow2");
    qcow2(&disk, "64M");
    let blob_path = dir.path().join("blob.bin");
    let data = blob((8 * MIB) as usize);
    std::fs::write(&blob_path, &data).unwrap();
    let mut spec = small_spec(101, dir.path(), &disk);
    spec.extra_args = vec![
        "-device".into(),
        format!(
            "loader,file={},addr={BLOB_ADDR},force-raw=on",
            blob_path.display()
        ),
    ];

    bounded(60, async {
        let t = Instant::now();
        let vm = VmGuard::new(start_vm(&spec).await.unwrap());
        eprintln!("start to QMP ready: {:?}", t.elapsed());
        let pid = vm.pid();
        assert_eq!(is_running(dir.path(), 101), Some(pid));
        assert_eq!(is_running(dir.path(), 102), None);
        // Own session: survives the process (and terminal) that started it.
        assert_eq!(
            nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)))
                .unwrap()
                .as_raw(),
            pid
        );
        let st = vm.status().await.unwrap();
        assert_eq!((st.status.as_str(), st.running), ("running", true));
        let nodes = vm
            .execute(
                "query-named-block-nodes",
                Value::Null,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let names: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .collect();
        assert!(
            names.contains(&"drive-scsi0") && names.contains(&"file-scsi0"),
            "{names:?}"
        );
        let machine = vm.running_machine().await.unwrap();
        assert!(machine.starts_with("pc-q35-"), "{machine}");

        // RAM: the loader put the blob at 16 MiB; pmemsave reads it back.
        let out = dir.path().join("ram.bin");
        vm.pmemsave(BLOB_ADDR, data.len() as u64, &out)
            .await
            .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == data,
            "RAM differs from the loaded blob"
        );

        // A second start of the same VMID is refused.
        let err = start_vm(&spec).await.unwrap_err();
        assert!(err.to_string().contains("already running"), "{err}");

        let outcome = vm.stop(StopTimeouts::default()).await.unwrap();
        assert_eq!(outcome.method, StopMethod::Quit);
        assert_eq!(outcome.exit.and_then(|s| s.code()), Some(0));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still in /proc"
        );
        assert_eq!(is_running(dir.path(), 101), None);
        let again = vm.stop(StopTimeouts::default()).await.unwrap();
        assert_eq!(again.method, StopMethod::AlreadyStopped);
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}

#[tokio::test]
async fn pve_style_configs_start_on_pc_and_q35() {
    require_qemu();
    let dir = run_dir();
    let raw = dir.path().join("r.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &raw.to_string_lossy(), "16M"],
    );
    let q = dir.path().join("q.qcow2");
    qcow2(&q, "16M");
    let v = dir.path().join("v.qcow2");
    qcow2(&v, "16M");
    bounded(60, async {
        for (vmid, machine, scsihw) in [
            (110, "pc-i440fx-9.2+pve0", "lsi"),
            (111, "q35", "virtio-scsi-single"),
        ] {
            let mut spec = VmSpec::new(vmid, dir.path())
                .option("name", "complex")
                .option("machine", machine)
                .option("memory", "96")
                .option("sockets", "1")
                .option("cores", "2")
                .option("cpu", "x86-64-v2-AES")
                .option("scsihw", scsihw)
                .option("scsi0", "local:q,iothread=1,discard=on,ssd=1")
                .option("sata0", "local:r,cache=writeback")
                .option("virtio1", "local:v,iothread=1")
                .option("ide2", "none,media=cdrom")
                .option("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0")
                .option("net1", "e1000=BC:24:11:00:00:02,bridge=vmbr0")
                .option("agent", "1")
                .option("serial0", "socket")
                .option("boot", "order=scsi0;ide2;net0")
                .option("smbios1", "uuid=6f0e8f4e-0000-4000-8000-000000000001")
                .option("vmgenid", "3ab2f3e5-0000-4000-8000-000000000002")
                .disk("scsi0", &q, DiskFormat::Qcow2)
                .disk("sata0", &raw, DiskFormat::Raw)
                .disk("virtio1", &v, DiskFormat::Qcow2);
            spec.accel = Accel::Tcg;
            let vm = VmGuard::new(
                start_vm(&spec)
                    .await
                    .unwrap_or_else(|e| panic!("{machine}: {e}")),
            );
            assert!(vm.status().await.unwrap().running, "{machine}");
            assert!(dir.path().join(format!("{vmid}.serial0")).exists());
            let m = vm.running_machine().await.unwrap();
            let want = if machine == "q35" {
                "pc-q35-"
            } else {
                "pc-i440fx-9.2"
            };
            assert!(m.starts_with(want), "{m}");
            vm.stop(StopTimeouts::default()).await.unwrap();
        }
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}

#[tokio::test]
async fn live_migration_with_drive_mirror_over_unix_sockets() {
    require_qemu();
    let dir = run_dir();
    let disk_a = dir.path().join("a.qcow2");
    let disk_b = dir.path().join("b.qcow2");
    qcow2(&disk_a, "100M");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 50M",
            &disk_a.to_string_lossy(),
        ],
    );
    qcow2(&disk_b, "100M");
    let blob_path = dir.path().join("blob.bin");
    let data = blob((32 * MIB) as usize);
    std::fs::write(&blob_path, &data).unwrap();

    // Source A: same config as B plus the loader (which has no migration state).
    let mut spec_a = small_spec(120, &dir.path().join("a"), &disk_a);
    spec_a.extra_args = vec![
        "-device".into(),
        format!(
            "loader,file={},addr={BLOB_ADDR},force-raw=on",
            blob_path.display()
        ),
    ];
    let spec_b = small_spec(120, &dir.path().join("b"), &disk_b);

    bounded(90, async {
        let t0 = Instant::now();
        let a = VmGuard::new(start_vm(&spec_a).await.unwrap());
        let incoming = start_incoming(&spec_b, &["scsi0"], &StartOptions::default())
            .await
            .unwrap();
        let b = VmGuard::new(incoming.vm);
        assert_eq!(b.status().await.unwrap().status, "inmigrate");
        let uri = &incoming.nbd_uris["scsi0"];
        assert_eq!(
            uri,
            &format!(
                "nbd:unix:{}/b/120_nbd.migrate:exportname=drive-scsi0",
                dir.path().display()
            )
        );
        assert_eq!(
            incoming.migrate_uri,
            format!("unix:{}/b/120.migrate", dir.path().display())
        );

        // Disks first: mirror to B's export until READY, then active mode.
        let t = Instant::now();
        let job = a.drive_mirror("scsi0", uri, None).await.unwrap();
        a.wait_block_job_ready(&job, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            a.mirror_write_blocking(&job).await.unwrap(),
            "QEMU 10 has block-job-change"
        );
        eprintln!("mirror READY after {:?}", t.elapsed());

        // RAM.
        let t = Instant::now();
        a.set_migration_capabilities(&[("events", true)])
            .await
            .unwrap();
        a.migrate_set_parameters(&MigrationParams {
            max_bandwidth: Some(16 << 30),
            downtime_limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap();
        a.migrate(&incoming.migrate_uri).await.unwrap();
        let mut samples = 0;
        let done = a
            .wait_migration(
                MigrationWait {
                    stall: Duration::from_secs(20),
                    ..Default::default()
                },
                |_| samples += 1,
            )
            .await
            .unwrap();
        eprintln!(
            "RAM migrated in {:?}: {} bytes, {samples} samples",
            t.elapsed(),
            done.transferred
        );
        assert!(done.transferred >= data.len() as u64, "{done:?}");
        // `completed` shows before QEMU's cleanup moves the run state on from
        // `finish-migrate`; wait_migration polls fast after STOP and may see it in between.
        let mut status = String::new();
        for _ in 0..100 {
            status = a.status().await.unwrap().status;
            if status != "finish-migrate" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, "postmigrate");
        a.block_job_cancel(&job, Duration::from_secs(30))
            .await
            .unwrap();
        let jobs = a
            .execute("query-jobs", Value::Null, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(jobs, serde_json::json!([]), "mirror job dismissed");

        // Target: stop NBD, resume, check.
        b.nbd_server_stop().await.unwrap();
        b.resume().await.unwrap();
        let st = b.status().await.unwrap();
        assert_eq!((st.status.as_str(), st.running), ("running", true));
        let ram_b = dir.path().join("ram_b.bin");
        b.pmemsave(BLOB_ADDR, data.len() as u64, &ram_b)
            .await
            .unwrap();
        assert!(std::fs::read(&ram_b).unwrap() == data, "target RAM differs");
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                "-U",
                &disk_a.to_string_lossy(),
                &disk_b.to_string_lossy(),
            ],
        );
        assert!(cmp.contains("Images are identical"), "{cmp}");
        eprintln!("whole scenario: {:?}", t0.elapsed());

        a.stop(StopTimeouts::default()).await.unwrap();
        b.stop(StopTimeouts::default()).await.unwrap();
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}

#[tokio::test]
async fn failed_and_stalled_migrations_leave_the_source_running() {
    require_qemu();
    let dir = run_dir();
    let disk = dir.path().join("d.qcow2");
    qcow2(&disk, "16M");
    bounded(60, async {
        let a = VmGuard::new(start_vm(&small_spec(125, dir.path(), &disk)).await.unwrap());
        let nobody = dir.path().join("nobody.migrate");
        // QEMU answers {} even though nobody listens; only query-migrate shows the failure.
        a.migrate(&format!("unix:{}", nobody.display()))
            .await
            .unwrap();
        let err = a
            .wait_migration(MigrationWait::default(), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, QemuError::Migration { .. }), "{err}");
        assert!(a.status().await.unwrap().running);

        // A frozen link (accepted, never read): no progress → stalled → migrate_cancel.
        let frozen = dir.path().join("frozen.migrate");
        let listener = tokio::net::UnixListener::bind(&frozen).unwrap();
        let holder = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(conn);
        });
        a.migrate(&format!("unix:{}", frozen.display()))
            .await
            .unwrap();
        let err = a
            .wait_migration(
                MigrationWait {
                    poll: Duration::from_millis(100),
                    stall: Duration::from_secs(1),
                    ..Default::default()
                },
                |_| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(err, QemuError::MigrationStalled { .. }), "{err}");
        a.migrate_cancel().await.unwrap();
        let err = a
            .wait_migration(MigrationWait::default(), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&err, QemuError::Migration { status, .. } if status == "cancelled"),
            "{err}"
        );
        assert!(a.status().await.unwrap().running);
        holder.abort();
        a.stop(StopTimeouts::default()).await.unwrap();
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}

#[tokio::test]
async fn agent_ping_times_out_without_agent_in_guest() {
    require_qemu();
    let dir = run_dir();
    let disk = dir.path().join("d.qcow2");
    qcow2(&disk, "16M");
    bounded(60, async {
        let vm = VmGuard::new(start_vm(&small_spec(130, dir.path(), &disk)).await.unwrap());
        let t = Instant::now();
        let err = vm.agent().ping().await.unwrap_err();
        let took = t.elapsed();
        assert!(matches!(err, AgentError::NoAgent { .. }), "{err}");
        assert!(err.to_string().contains("qemu-guest-agent"), "{err}");
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
            "default ping timeout is 3 s, took {took:?}"
        );
        let t = Instant::now();
        let err = vm
            .agent()
            .with_ping_timeout(Duration::from_millis(300))
            .fstrim(agent::FSTRIM_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::NoAgent { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // The VM is unaffected.
        assert!(vm.status().await.unwrap().running);
        vm.stop(StopTimeouts::default()).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn kill_and_guard_leave_no_process() {
    require_qemu();
    let dir = run_dir();
    let disk = dir.path().join("d.qcow2");
    qcow2(&disk, "16M");
    bounded(60, async {
        // Explicit SIGKILL: exit status says so, /proc entry gone once reaped.
        let vm = start_vm(&small_spec(140, dir.path(), &disk)).await.unwrap();
        let pid = vm.pid();
        vm.kill_now();
        assert!(vm.wait_exit(Duration::from_secs(5)).await);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(vm.exit_status().and_then(|s| s.signal()), Some(9));
        assert!(!vm.is_running());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        // The stale pidfile does not make it "running".
        assert_eq!(is_running(dir.path(), 140), None);

        // The guard kills on drop (what a panicking test relies on).
        let guard = VmGuard::new(start_vm(&small_spec(141, dir.path(), &disk)).await.unwrap());
        let pid = guard.pid();
        drop(guard);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived the guard"
        );
        assert_eq!(is_running(dir.path(), 141), None);
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}

#[tokio::test]
async fn start_failures_say_why_and_leave_nothing() {
    require_qemu();
    let dir = run_dir();
    let disk = dir.path().join("d.qcow2");
    qcow2(&disk, "16M");
    bounded(60, async {
        // QEMU refuses a missing disk: its own message is in the error.
        let missing: PathBuf = dir.path().join("missing.qcow2");
        let err = start_vm(&small_spec(150, dir.path(), &missing))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exited during startup") && err.contains("missing.qcow2"),
            "{err}"
        );
        assert_eq!(is_running(dir.path(), 150), None);

        // Exporting a drive that does not exist: the incoming VM is stopped again.
        let err = start_incoming(
            &small_spec(151, dir.path(), &disk),
            &["scsi7"],
            &StartOptions::default(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("block-export-add"), "{err}");
        assert_eq!(is_running(dir.path(), 151), None);

        // No emulator binary: the hint names the install script.
        let opts = StartOptions {
            binary: dir.path().join("no-such-qemu"),
            ..Default::default()
        };
        let err = VmHandle::start(&small_spec(152, dir.path(), &disk), &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(".ci/install-qemu.sh"), "{err}");
    })
    .await;
    assert_eq!(processes_in(dir.path()), Vec::<i32>::new());
}
