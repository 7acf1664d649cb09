//! The cutover of `mtunnel migrate` to a node that holds a current replica of the VM
//! (docs/replicas.md, "Cut over"), on the real path: two `mtunnel serve` nodes on
//! loopback, a running OS-less VM under QEMU (TCG) with a 4 GiB disk (btrfs: 1 GiB) holding 64 MiB of
//! pseudo-random data, replicated once; then 8 MiB written by the running QEMU and
//! `mtunnel migrate` (live, or `--final-sync`) to the replica's node. The migration sends
//! at most 1 % of the disk (the bytes its summary line reports: the replica run's bytes
//! through the tunnel plus the last delta's copied bytes), the target's disk is
//! byte-identical to the source's (stopped after the migration), the VM runs on the
//! target and the replica is gone from `replica list`, with its points. A migration that
//! fails mid-cutover (the target's QEMU killed) leaves the replica's newest point intact.
//!
//! QEMU must be installed (`.ci/install-qemu.sh`, run by `scripts/test-all.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::tcg_node as node;
use common::{LoopBtrfs, Options, TestServer, blob, mt, mt_ok, pid_of, qemu_io, qmp, target_arg};
use serde_json::json;

/// VM `vmid` on `src`: a qcow2 disk of `size` with 64 MiB of random data at 0, running.
async fn create_vm_with_data(src: &TestServer, vmid: u32, size: &str) -> PathBuf {
    let img = stopped_vm_with_data(src, vmid, size).await;
    mt_ok(src, &["vm", "start", &vmid.to_string()]).await;
    img
}

/// VM `vmid` on `src`: a qcow2 disk of `size` with 64 MiB of random data at 0, stopped.
async fn stopped_vm_with_data(src: &TestServer, vmid: u32, size: &str) -> PathBuf {
    let id = vmid.to_string();
    let disk = format!("local:{size}:qcow2");
    mt_ok(
        src,
        &["vm", "create", &id, "--memory", "128", "--disk", &disk],
    )
    .await;
    let img = src.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
    let data = src.base().join(format!("data{vmid}"));
    blob(&data, 64 << 20);
    qemu_io("qcow2", &format!("write -s {} 0 64M", data.display()), &img);
    std::fs::remove_file(&data).unwrap();
    img
}

/// One `mtunnel replicate` run onto target storage `storage`.
async fn replicate(src: &TestServer, dst: &TestServer, vmid: u32, storage: &str) -> String {
    let target = target_arg(dst, dst.port);
    let vmid = vmid.to_string();
    mt_ok(
        src,
        &["replicate", &vmid, &target, "--target-storage", storage],
    )
    .await
}

/// `mtunnel migrate VMID --target .. --target-storage STORAGE EXTRA..`.
async fn migrate(
    src: &TestServer,
    dst: &TestServer,
    vmid: u32,
    storage: &str,
    extra: &[&str],
) -> std::process::Output {
    let target = target_arg(dst, dst.port);
    let vmid = vmid.to_string();
    let mut args = vec![
        "migrate",
        &vmid,
        "--target",
        &target,
        "--target-storage",
        storage,
    ];
    args.extend_from_slice(extra);
    mt(src, &args).await
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

/// What a cutover's summary line says: (bytes of disks sent, downtime in ms).
fn cutover_figures(out: &std::process::Output) -> (u64, u64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        number_after(&stdout, "cut over to the replica: "),
        number_after(&stdout, "cutover downtime "),
    )
}

fn running(node: &TestServer, vmid: u32) -> bool {
    pid_of(node, vmid).is_some()
}

/// The migration's checks on both ends once it cut over: the disk bytes (at most 1 % of
/// the disk's `disk` bytes), the downtime
/// printed, the source stopped, the target's disk as the source's, the VM running there,
/// no replica left.
async fn assert_cut_over(
    out: &std::process::Output,
    (src, src_img): (&TestServer, &Path),
    (dst, dst_img, fmt, disk): (&TestServer, &Path, &str, u64),
    vmid: u32,
) {
    let (sent, downtime) = cutover_figures(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("cutover: {sent} bytes of disks sent, downtime {downtime} ms");
    assert!(
        sent * 100 <= disk,
        "{sent} bytes sent, more than 1 % of the {disk} bytes of the disk:\n{stderr}"
    );
    assert!(sent >= 8 << 20, "the 8 MiB written were sent:\n{stderr}");
    assert!(
        stderr.contains("cutover downtime: "),
        "the downtime is in the progress:\n{stderr}"
    );
    assert!(!running(src, vmid), "the source VM stopped");
    common::assert_same_guest_bytes(src_img, "qcow2", dst_img, fmt);
    let status = qmp(&dst.run, vmid, "query-status", json!({})).await;
    assert_eq!(status["status"], json!("running"), "{status}");
    let list = mt_ok(dst, &["replica", "list"]).await;
    assert!(!list.contains(&format!("{vmid} ")), "{list}");
    let conf = std::fs::read_to_string(dst.vm_config(vmid)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
    let record = dst.data.join("replicas").join(format!("{vmid}.json"));
    assert!(!record.exists(), "the replica's record is gone");
}

/// The internal snapshots of a qcow2 image (`qemu-img snapshot -l -U`).
fn snapshots(img: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(img)
        .output()
        .expect("qemu-img snapshot -l");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_to_the_replica_sends_only_what_changed() {
    let src = node("csrc1");
    let dst = node("cdst1");
    let img = create_vm_with_data(&src, 130, "4G").await;
    let replica = dst.images(130).join("vm-130-disk-0.qcow2");
    replicate(&src, &dst, 130, "local").await;
    common::write_8m_live(&src, 130).await;

    let out = migrate(&src, &dst, 130, "local", &["--online"]).await;
    assert_cut_over(&out, (&src, &img), (&dst, &replica, "qcow2", 4 << 30), 130).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the last delta copied"), "{stderr}");
    // The points went with the replica (internal snapshots deleted through the QEMU).
    assert!(
        !snapshots(&replica).contains(" r1"),
        "{}",
        snapshots(&replica)
    );
    mt_ok(&dst, &["vm", "stop", "130"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_sync_pauses_the_guest_and_sends_only_what_changed() {
    let src = node("csrc2");
    let dst = node("cdst2");
    let img = create_vm_with_data(&src, 131, "4G").await;
    let replica = dst.images(131).join("vm-131-disk-0.qcow2");
    replicate(&src, &dst, 131, "local").await;
    common::write_8m_live(&src, 131).await;

    let out = migrate(&src, &dst, 131, "local", &["--final-sync"]).await;
    assert_cut_over(&out, (&src, &img), (&dst, &replica, "qcow2", 4 << 30), 131).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("paused for the final sync"), "{stderr}");
    mt_ok(&dst, &["vm", "stop", "131"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_onto_btrfs_leaves_only_the_volume() {
    // A raw working copy takes its full size on btrfs (docs/replicas.md): 1 GiB.
    let fs = LoopBtrfs::with_size(2 << 30);
    let src = node("csrc3");
    let dst = TestServer::start_with(Options {
        node: Some("cdst3".into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{}", fs.storage_toml("bt")),
        ..Options::default()
    });
    let img = create_vm_with_data(&src, 132, "1G").await;
    replicate(&src, &dst, 132, "bt").await;
    common::write_8m_live(&src, 132).await;

    let out = migrate(&src, &dst, 132, "bt", &["--online"]).await;
    let working = fs.mnt.join("images/132/vm-132-disk-0/disk.raw");
    assert_cut_over(&out, (&src, &img), (&dst, &working, "raw", 1 << 30), 132).await;
    // The points' read-only snapshots are gone: only the VM's volume is left.
    assert_eq!(
        fs.subvolumes(),
        vec!["images/132/vm-132-disk-0".to_string()]
    );
    mt_ok(&dst, &["vm", "stop", "132"]).await;
    mt_ok(&dst, &["vm", "destroy", "132"]).await;
}

/// The target's QEMU killed as soon as it started for the migration: the migration fails,
/// the source VM runs on unlocked, and the replica keeps its newest point, byte-identical
/// to the source (nothing wrote since), listed `interrupted`; a second migration (whose
/// replica run is then a hash sync that finds nothing to send) cuts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cutover_keeps_the_replicas_newest_point() {
    let src = node("csrc4");
    let dst = node("cdst4");
    let img = create_vm_with_data(&src, 133, "256M").await;
    let replica = dst.images(133).join("vm-133-disk-0.qcow2");
    replicate(&src, &dst, 133, "local").await;
    common::write_8m_live(&src, 133).await;

    let killer = {
        let dst_run = dst.run.clone();
        tokio::spawn(async move {
            // Bounded: 120 s at most.
            for _ in 0..24_000 {
                if let Some(pid) = mtunnel::qemu::is_running(&dst_run, 133) {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        })
    };
    let out = migrate(&src, &dst, 133, "local", &["--online"]).await;
    assert!(killer.await.unwrap(), "the target's QEMU never started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("ERROR: migration failed"), "{stderr}");
    assert!(running(&src, 133), "the source VM runs on");
    let conf = std::fs::read_to_string(src.vm_config(133)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");

    // The replica: locked, listed interrupted, its newest point the source as it is.
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");
    let conf = std::fs::read_to_string(dst.vm_config(133)).unwrap();
    assert!(conf.contains("lock: replica"), "{conf}");
    assert!(!running(&dst, 133), "no QEMU left on the target");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.data.join("replicas/133.json")).unwrap())
            .unwrap();
    let newest = record["points"].as_array().unwrap().last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (now, point) = (src.base().join("now.raw"), dst.base().join("point.raw"));
    qmp(&src.run, 133, "stop", json!({})).await;
    export_raw(&img, None, &now);
    qmp(&src.run, 133, "cont", json!({})).await;
    export_raw(&replica, Some(&newest), &point);
    common::assert_same_guest_bytes(&now, "raw", &point, "raw");
    std::fs::remove_file(&now).unwrap();
    std::fs::remove_file(&point).unwrap();

    // The interrupted replica is continued by a hash sync: its working copy already holds
    // the disk, so next to nothing crosses the link again.
    let out = migrate(&src, &dst, 133, "local", &["--online"]).await;
    let (sent, _) = cutover_figures(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hash sync"), "{stderr}");
    assert!(
        !stderr.contains("full copy"),
        "a hash sync is no full copy:\n{stderr}"
    );
    assert!(
        sent < 1 << 20,
        "the interrupted replica was sent again: {sent} bytes"
    );
    common::assert_same_guest_bytes(&img, "qcow2", &replica, "qcow2");
    mt_ok(&dst, &["vm", "stop", "133"]).await;
}

/// The guest-visible bytes of `img` (qcow2; at point `snapshot` if given) as a raw file.
fn export_raw(img: &Path, snapshot: Option<&str>, to: &Path) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-O", "raw"]);
    if let Some(name) = snapshot {
        cmd.arg("-l").arg(format!("snapshot.name={name}"));
    }
    let out = cmd.arg(img).arg(to).output().expect("qemu-img convert");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// VM `vmid` on `src` with a 256 MiB qcow2 disk, its RAM holding 64 MiB of random data at
/// 16 MiB (a `loader` device: with `--bwlimit` its copy takes seconds) and a second QMP
/// monitor (the migration holds the first). Returns (disk image, RAM blob, monitor).
async fn create_vm_with_busy_ram(src: &TestServer, vmid: u32) -> (PathBuf, PathBuf, PathBuf) {
    let id = vmid.to_string();
    let disk = "local:256M:qcow2";
    mt_ok(
        src,
        &["vm", "create", &id, "--memory", "128", "--disk", disk],
    )
    .await;
    let img = src.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
    let ram = src.base().join(format!("ram{vmid}"));
    blob(&ram, 64 << 20);
    let loader = format!("loader,file={},addr=0x1000000,force-raw=on", ram.display());
    let monitor = src.base().join(format!("m{vmid}.qmp"));
    let qmp_arg = format!("unix:{},server=on,wait=off", monitor.display());
    let start = [
        "vm",
        "start",
        &id,
        "--qemu-arg",
        "-device",
        "--qemu-arg",
        &loader,
        "--qemu-arg",
        "-qmp",
        "--qemu-arg",
        &qmp_arg,
    ];
    mt_ok(src, &start).await;
    (img, ram, monitor)
}

/// A write made while the RAM moves (the replica run before it is over) goes with the
/// last delta, copied while the guest is stopped in `pre-switchover`: the guest's RAM
/// holds 64 MiB of random data (a `loader` device) and `--bwlimit` makes its copy take
/// seconds; a second QMP monitor writes 1 MiB as soon as `query-migrate` says `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_the_ram_moves_goes_with_the_last_delta() {
    let src = node("csrc5");
    let dst = node("cdst5");
    let (img, ram, monitor) = create_vm_with_busy_ram(&src, 134).await;
    replicate(&src, &dst, 134, "local").await;

    let writer = async {
        let mon = mtunnel::qemu::Qmp::connect(&monitor, Duration::from_secs(10))
            .await
            .expect("the second QMP monitor");
        let secs = Duration::from_secs(10);
        // Bounded: 60 s at most.
        for _ in 0..6000 {
            let st = mon.execute("query-migrate", json!({}), secs).await.unwrap();
            if st["status"] == json!("active") {
                let cmd = "qemu-io -d scsi0 \"write -P 0xa5 200M 1M\"";
                let wrote =
                    (mon.execute("human-monitor-command", json!({"command-line": cmd}), secs))
                        .await
                        .unwrap();
                assert_eq!(wrote, json!(""), "HMP qemu-io failed");
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    let (out, wrote) = tokio::join!(
        migrate(
            &src,
            &dst,
            134,
            "local",
            &["--online", "--bwlimit", "16384"]
        ),
        writer
    );
    assert!(wrote, "the RAM migration never was active");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let delta = number_after(&stdout, "last delta ");
    eprintln!("last delta: {delta} bytes");
    assert!(
        (1 << 20..2 << 20).contains(&delta),
        "the 1 MiB written went with the last delta:\n{stdout}\n{stderr}"
    );
    let replica = dst.images(134).join("vm-134-disk-0.qcow2");
    common::assert_same_guest_bytes(&img, "qcow2", &replica, "qcow2");
    let status = qmp(&dst.run, 134, "query-status", json!({})).await;
    assert_eq!(status["status"], json!("running"), "{status}");
    mt_ok(&dst, &["vm", "stop", "134"]).await;
    std::fs::remove_file(&ram).unwrap();
}

/// What an offline cutover's summary line says: (bytes of disks sent by the replica run,
/// bytes of hashes it received).
fn offline_figures(out: &std::process::Output) -> (u64, u64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("bytes of hashes received), no downtime (the VM was stopped)"),
        "{stdout}"
    );
    (
        number_after(&stdout, "cut over to the replica: "),
        number_after(&stdout, " bytes sent, "),
    )
}

/// An offline cutover's checks on both ends: the bytes sent plus the hashes at most 1 % of
/// the disk, the source stopped and locked 'migrate' (as after any offline migration), the
/// target's disk as the source's, its config unlocked, no replica left, and the VM starts
/// there.
async fn assert_cut_over_offline(
    out: &std::process::Output,
    (src, src_img): (&TestServer, &Path),
    (dst, dst_img, fmt, disk): (&TestServer, &Path, &str, u64),
    vmid: u32,
) {
    let (sent, hashes) = offline_figures(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("offline cutover: {sent} bytes of disks sent, {hashes} bytes of hashes received");
    assert!(
        (sent + hashes) * 100 <= disk,
        "{sent} bytes sent and {hashes} of hashes, more than 1 % of the {disk} bytes of the disk:\n{stderr}"
    );
    assert!(sent >= 8 << 20, "the 8 MiB written were sent:\n{stderr}");
    assert!(stderr.contains("hash sync ("), "{stderr}");
    assert!(!stderr.contains("full copy"), "{stderr}");
    assert!(!running(src, vmid), "the source VM stays stopped");
    let conf = std::fs::read_to_string(src.vm_config(vmid)).unwrap();
    assert!(conf.contains("lock: migrate"), "{conf}");
    common::assert_same_guest_bytes(src_img, "qcow2", dst_img, fmt);
    let list = mt_ok(dst, &["replica", "list"]).await;
    assert!(!list.contains(&format!("{vmid} ")), "{list}");
    let conf = std::fs::read_to_string(dst.vm_config(vmid)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
    let record = dst.data.join("replicas").join(format!("{vmid}.json"));
    assert!(!record.exists(), "the replica's record is gone");
    let id = vmid.to_string();
    mt_ok(dst, &["vm", "start", &id]).await;
    let status = qmp(&dst.run, vmid, "query-status", json!({})).await;
    assert_eq!(status["status"], json!("running"), "{status}");
    mt_ok(dst, &["vm", "stop", &id]).await;
}

/// A stopped VM, replicated once, then 8 MiB written into its image (qemu-io): `mtunnel
/// migrate` (offline) cuts over with one last replica run, a hash sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_cuts_over_offline_sending_only_what_changed() {
    let src = node("csrc8");
    let dst = node("cdst8");
    let img = stopped_vm_with_data(&src, 137, "4G").await;
    let replica = dst.images(137).join("vm-137-disk-0.qcow2");
    replicate(&src, &dst, 137, "local").await;
    qemu_io("qcow2", "write -P 0x5a 100M 8M", &img);

    let out = migrate(&src, &dst, 137, "local", &[]).await;
    assert_cut_over_offline(&out, (&src, &img), (&dst, &replica, "qcow2", 4 << 30), 137).await;
    // The points went with the replica (internal snapshots deleted with qemu-img).
    assert!(
        !snapshots(&replica).contains(" r1"),
        "{}",
        snapshots(&replica)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_cuts_over_offline_onto_btrfs() {
    let fs = LoopBtrfs::with_size(2 << 30);
    let src = node("csrc9");
    let dst = TestServer::start_with(Options {
        node: Some("cdst9".into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{}", fs.storage_toml("bt")),
        ..Options::default()
    });
    let img = stopped_vm_with_data(&src, 138, "1G").await;
    replicate(&src, &dst, 138, "bt").await;
    qemu_io("qcow2", "write -P 0x5a 100M 8M", &img);

    let out = migrate(&src, &dst, 138, "bt", &[]).await;
    let working = fs.mnt.join("images/138/vm-138-disk-0/disk.raw");
    assert_cut_over_offline(&out, (&src, &img), (&dst, &working, "raw", 1 << 30), 138).await;
    // The points' read-only snapshots are gone: only the VM's volume is left.
    assert_eq!(
        fs.subvolumes(),
        vec!["images/138/vm-138-disk-0".to_string()]
    );
    mt_ok(&dst, &["vm", "destroy", "138"]).await;
}

/// An offline cutover that fails after its replica run, before the switch (the target
/// cannot write the VM's firewall file: a directory stands in its place): the source VM
/// stays stopped and unlocked, the error says what to do, the replica keeps the point the
/// run made, byte-identical to the source. Once the obstacle is gone the same migration
/// cuts over, its run sending next to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offline_cutover_keeps_the_stopped_vm_and_the_replicas_point() {
    let src = node("csrc10");
    let dst = node("cdst10");
    let img = stopped_vm_with_data(&src, 139, "256M").await;
    let replica = dst.images(139).join("vm-139-disk-0.qcow2");
    std::fs::create_dir_all(src.data.join("firewall")).unwrap();
    std::fs::write(src.data.join("firewall/139.fw"), "[OPTIONS]\nenable: 0\n").unwrap();
    replicate(&src, &dst, 139, "local").await;
    qemu_io("qcow2", "write -P 0x5a 100M 8M", &img);
    let obstacle = dst.data.join("firewall/139.fw");
    std::fs::create_dir_all(&obstacle).unwrap();

    let out = migrate(&src, &dst, 139, "local", &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let at = stderr.find("restore point '").expect("the run's point") + "restore point '".len();
    let point = stderr[at..].split('\'').next().unwrap().to_string();
    let last = stderr.lines().last().unwrap_or_default();
    let hint = format!(
        "the offline cutover of VM 139 failed before the switch: VM 139 stays stopped and unlocked here, and the replica keeps its newest restore point '{point}' - migrate again (its replica run sends only what differs), or start the VM here"
    );
    assert!(last.contains(&hint), "{stderr}");
    assert!(!running(&src, 139), "the source VM stays stopped");
    let conf = std::fs::read_to_string(src.vm_config(139)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
    let conf = std::fs::read_to_string(dst.vm_config(139)).unwrap();
    assert!(conf.contains("lock: replica"), "{conf}");
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(&format!(" {point} ")), "{list}");
    let at_point = dst.base().join("point.raw");
    export_raw(&replica, Some(&point), &at_point);
    common::assert_same_guest_bytes(&img, "qcow2", &at_point, "raw");
    std::fs::remove_file(&at_point).unwrap();

    std::fs::remove_dir(&obstacle).unwrap();
    let out = migrate(&src, &dst, 139, "local", &[]).await;
    let (sent, _) = offline_figures(&out);
    assert!(sent < 1 << 20, "the replica was sent again: {sent} bytes");
    common::assert_same_guest_bytes(&img, "qcow2", &replica, "qcow2");
    let conf = std::fs::read_to_string(dst.vm_config(139)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
}

/// Refusals say what to do and change nothing: `--final-sync` to a target without a
/// replica, `--no-replica` to one that holds the VM's replica, a stopped VM with a disk
/// the replica does not hold (`unused0`). The replica keeps its points, the source VM
/// stays stopped, unlocked, its config as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_what_to_do_and_change_nothing() {
    let src = node("csrc6");
    let dst = node("cdst6");
    create_vm_with_data(&src, 135, "256M").await;
    let refused = |out: std::process::Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(migrate(&src, &dst, 135, "local", &["--final-sync"]).await);
    assert!(
        err.contains("--final-sync cuts over to a replica, and the target holds no replica of VM 135 ('mtunnel replicate' first, or migrate with --online)"),
        "{err}"
    );
    assert!(!dst.vm_config(135).exists());

    replicate(&src, &dst, 135, "local").await;
    let before = std::fs::read(dst.data.join("replicas/135.json")).unwrap();
    let err = refused(migrate(&src, &dst, 135, "local", &["--online", "--no-replica"]).await);
    assert!(
        err.contains("target VMID 135 holds a replica of this VM (--no-replica: drop it there first with 'mtunnel replica drop 135', or leave out --no-replica to cut over to it)"),
        "{err}"
    );
    mt_ok(&src, &["vm", "stop", "135"]).await;
    // A volume attached to nothing is not in the replica: an offline cutover is refused.
    let unused = src.images(135).join("vm-135-disk-1.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&unused)
        .arg("16M")
        .status()
        .expect("qemu-img create");
    assert!(made.success());
    let mut conf = std::fs::read_to_string(src.vm_config(135)).unwrap();
    conf.push_str("unused0: local:135/vm-135-disk-1.qcow2\n");
    std::fs::write(src.vm_config(135), &conf).unwrap();
    let err = refused(migrate(&src, &dst, 135, "local", &[]).await);
    assert!(
        err.contains("unused0: 'local:135/vm-135-disk-1.qcow2' is not replicated (a replica holds the VM's attached disks only): remove it, or migrate with --no-replica after dropping the replica on the target"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(src.vm_config(135)).unwrap(), conf);
    assert!(!running(&src, 135), "the source VM stays stopped");
    assert_eq!(
        std::fs::read(dst.data.join("replicas/135.json")).unwrap(),
        before,
        "the replica's record did not change"
    );
    let conf = std::fs::read_to_string(src.vm_config(135)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" idle "), "{list}");
}

/// `mtunnel migrate` killed (-9) once the target's QEMU started on the replica: the
/// target's tunnel ends without `quit`, its cleanup stops that QEMU (it never ran the
/// guest) and leaves the replica with its points (the first run's and the one the
/// migration made), listed `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_mid_cutover_leaves_the_replica_and_no_qemu() {
    let src = node("csrc7");
    let dst = node("cdst7");
    let (_, ram, _) = create_vm_with_busy_ram(&src, 136).await;
    replicate(&src, &dst, 136, "local").await;
    let points = |dst: &TestServer| {
        let path = dst.data.join("replicas/136.json");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        record["points"].clone()
    };
    let before = points(&dst);

    let target = target_arg(&dst, dst.port);
    let mut child = tokio::process::Command::new(common::BIN)
        .args([
            "migrate",
            "136",
            "--target",
            &target,
            "--target-storage",
            "local",
        ])
        .args(["--online", "--bwlimit", "16384", "--config"])
        .arg(&src.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("running mtunnel migrate");
    // Bounded: 60 s at most.
    let mut started = false;
    for _ in 0..6000 {
        if running(&dst, 136) {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(started, "the target's QEMU never started");
    // Bounded: 30 s at most.
    for _ in 0..300 {
        if !running(&dst, 136) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !running(&dst, 136),
        "the target's QEMU was stopped:\n{}",
        dst.log()
    );
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");
    // The run before the cutover added one; none went.
    let after = points(&dst);
    assert_eq!(after.as_array().map(Vec::len), Some(2), "{after}");
    assert_eq!(after[0], before[0], "the replica's points stayed");
    let conf = std::fs::read_to_string(dst.vm_config(136)).unwrap();
    assert!(conf.contains("lock: replica"), "{conf}");
    std::fs::remove_file(&ram).unwrap();
}
