//! Replicas on the real path (docs/replicas.md): two `mtunnel serve` nodes on loopback,
//! a running OS-less VM under QEMU (TCG) with a 4 GiB qcow2 disk holding 64 MiB of
//! pseudo-random data. `mtunnel replicate` run 1 copies the whole disk into a replica on
//! the target; 8 MiB written through the running QEMU; run 2 copies only those (at most
//! 1 % of run 1's bytes). Each restore point is byte-identical to the source as it was at
//! its run (the VM paused for the comparison), and the first point stays intact after the
//! second run. The replica cannot start; `replica promote` turns it into a VM that
//! starts; `replica drop` leaves nothing.
//!
//! QEMU must be installed (`.ci/install-qemu.sh`, run by `scripts/test-all.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::proxy::FaultProxy;
use common::tcg_node as node;
use common::{
    LoopBtrfs, Options, TestServer, blob, mt, mt_ok, pid_of, qemu_io, qmp, target_arg,
    write_8m_live,
};
use serde_json::json;

/// `mtunnel replicate VMID ENDPOINT --target-storage local --keep 5` from `src` to `dst`;
/// returns (bytes copied, bytes sent through the tunnel, stdout) from its summary line.
async fn replicate(src: &TestServer, dst: &TestServer, vmid: u32) -> (u64, u64, String) {
    replicate_to(src, dst, vmid, "local").await
}

/// [`replicate`] onto target storage `storage`.
async fn replicate_to(
    src: &TestServer,
    dst: &TestServer,
    vmid: u32,
    storage: &str,
) -> (u64, u64, String) {
    let target = target_arg(dst, dst.port);
    let vmid = vmid.to_string();
    let out = mt_ok(
        src,
        &[
            "replicate",
            &vmid,
            &target,
            "--target-storage",
            storage,
            "--keep",
            "5",
        ],
    )
    .await;
    let number_before = |marker: &str| -> u64 {
        let at = out
            .find(marker)
            .unwrap_or_else(|| panic!("no '{marker}' in {out}"));
        let head = &out[..at];
        let start = head.rfind('(').expect("a '(' before the byte count") + 1;
        head[start..].trim().parse().expect("a byte count")
    };
    let copied = number_before(" bytes), ");
    let sent = number_before(" bytes); restore point");
    (copied, sent, out)
}

/// The newest point's name from a `replicate` summary line.
fn point_of(out: &str) -> String {
    let at = out.find("restore point '").expect("a restore point") + "restore point '".len();
    out[at..].split('\'').next().unwrap().to_string()
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

fn assert_same_raw(a: &Path, b: &Path) {
    common::assert_same_guest_bytes(a, "raw", b, "raw");
}

/// The source VM paused while `f` runs (nothing writes its disk then).
async fn paused<T>(src: &TestServer, vmid: u32, f: impl FnOnce() -> T) -> T {
    qmp(&src.run, vmid, "stop", json!({})).await;
    let out = f();
    qmp(&src.run, vmid, "cont", json!({})).await;
    out
}

fn files_of(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// VM `vmid` on `src` with one qcow2 disk of `size` holding 64 MiB of random data at 0.
async fn create_vm_with_data(src: &TestServer, vmid: u32, size: &str) -> PathBuf {
    create_vm_with_data_as(src, vmid, size, "qcow2").await
}

/// [`create_vm_with_data`] with a disk in `format`.
async fn create_vm_with_data_as(src: &TestServer, vmid: u32, size: &str, format: &str) -> PathBuf {
    let img = stopped_vm_with_data(src, vmid, (size, format), ("0", 64 << 20)).await;
    mt_ok(src, &["vm", "start", &vmid.to_string()]).await;
    img
}

/// `mtunnel replicate` of `vmid` onto `storage`, slowed to 4 MiB/s so that a test can cut
/// it half way, running in the background.
fn spawn_slow_replicate(
    src: &TestServer,
    dst: &TestServer,
    vmid: u32,
    storage: &str,
) -> tokio::task::JoinHandle<std::process::Output> {
    let target = target_arg(dst, dst.port);
    let vmid = vmid.to_string();
    let args: Vec<String> = [
        "replicate",
        &vmid,
        &target,
        "--target-storage",
        storage,
        "--bwlimit",
        "4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let src_config = src.config.clone();
    tokio::spawn(async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"))
            .args(&args)
            .arg("--config")
            .arg(&src_config)
            .output()
            .await
            .expect("running mtunnel replicate")
    })
}

/// `mtunnel replicate VMID TARGET --target-storage local EXTRA...` of `src`'s VM, running
/// in the background with its output piped (killed when the child is dropped): for tests
/// that act on a run while it goes on.
fn spawn_replicate(
    src: &TestServer,
    vmid: u32,
    target: &str,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"))
        .args([
            "replicate",
            &vmid.to_string(),
            target,
            "--target-storage",
            "local",
        ])
        .args(extra)
        .arg("--config")
        .arg(&src.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running mtunnel replicate")
}

/// VM `vmid` on `src`, not started, with one disk of `(size, format)` holding `len` bytes of
/// random data at offset `at` (qemu-io syntax, e.g. "16M"); the image's path.
async fn stopped_vm_with_data(
    src: &TestServer,
    vmid: u32,
    (size, format): (&str, &str),
    (at, len): (&str, usize),
) -> PathBuf {
    let id = vmid.to_string();
    let disk = format!("local:{size}:{format}");
    mt_ok(
        src,
        &["vm", "create", &id, "--memory", "128", "--disk", &disk],
    )
    .await;
    let img = src.images(vmid).join(format!("vm-{vmid}-disk-0.{format}"));
    let data = src.base().join(format!("data{vmid}"));
    blob(&data, len);
    qemu_io(
        format,
        &format!("write -s {} {at} {len}", data.display()),
        &img,
    );
    std::fs::remove_file(&data).unwrap();
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_copies_only_what_changed_and_points_stay_intact() {
    let src = node("src1");
    let dst = node("dst1");
    let img = create_vm_with_data(&src, 100, "4G").await;
    let replica = dst.images(100).join("vm-100-disk-0.qcow2");

    let (copied1, sent1, out1) = replicate(&src, &dst, 100).await;
    assert!(out1.contains("full copy"), "{out1}");
    let point1 = point_of(&out1);
    let at_run1 = src.base().join("run1.raw");
    paused(&src, 100, || export_raw(&img, None, &at_run1)).await;

    // 8 MiB written by the running QEMU, between the runs.
    write_8m_live(&src, 100).await;
    let (copied2, sent2, out2) = replicate(&src, &dst, 100).await;
    assert!(out2.contains("incremental"), "{out2}");
    let point2 = point_of(&out2);
    eprintln!(
        "run 1: copied {copied1} bytes, sent {sent1} bytes; \
         run 2: copied {copied2} bytes, sent {sent2} bytes"
    );
    assert!(copied1 >= 4 << 30, "run 1 copies the whole disk: {out1}");
    assert!(
        copied2 * 100 <= copied1,
        "run 2 copied {copied2} bytes, more than 1 % of run 1's {copied1}"
    );
    assert!(copied2 >= 8 << 20, "run 2 copies the 8 MiB written: {out2}");
    assert!(sent1 >= 64 << 20, "run 1 sends the 64 MiB of data: {out1}");
    assert!(
        sent2 < (9 << 20) && sent2 * 4 < sent1,
        "run 2 sent {sent2} bytes for 8 MiB written (run 1: {sent1})"
    );

    // Point 2 is the source as of run 2; point 1 is still the source as of run 1.
    let now = src.base().join("now.raw");
    let p2 = dst.base().join("p2.raw");
    let p1 = dst.base().join("p1.raw");
    paused(&src, 100, || export_raw(&img, None, &now)).await;
    export_raw(&replica, Some(&point2), &p2);
    export_raw(&replica, Some(&point1), &p1);
    assert_same_raw(&now, &p2);
    assert_same_raw(&at_run1, &p1);
    for f in [&now, &p2, &p1, &at_run1] {
        std::fs::remove_file(f).unwrap();
    }

    // The replica is listed, locked and cannot start.
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains("src1/100"), "{list}");
    assert!(list.contains(" idle "), "{list}");
    assert!(list.contains(&point2), "{list}");
    let conf = std::fs::read_to_string(dst.vm_config(100)).unwrap();
    assert!(conf.contains("lock: replica"), "{conf}");
    let start = mt(&dst, &["vm", "start", "100"]).await;
    assert!(!start.status.success());
    let err = String::from_utf8_lossy(&start.stderr);
    assert!(
        err.contains("VM 100 is a replica (lock 'replica') and cannot be started: promote one of its restore points first ('mtunnel replica promote 100')"),
        "{err}"
    );
    // No NBD server or socket of the runs is left on the target.
    assert_eq!(files_of(&dst.run, "100-"), Vec::<String>::new());

    // Promoted, it is a normal VM that starts.
    let promoted = mt_ok(&dst, &["replica", "promote", "100"]).await;
    assert!(
        promoted.contains(&format!("promoted restore point '{point2}'")),
        "{promoted}"
    );
    let conf = std::fs::read_to_string(dst.vm_config(100)).unwrap();
    assert!(!conf.contains("lock:"), "{conf}");
    mt_ok(&dst, &["vm", "start", "100"]).await;
    assert!(pid_of(&dst, 100).is_some());
    mt_ok(&dst, &["vm", "stop", "100"]).await;
    mt_ok(&src, &["vm", "stop", "100"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_leaves_nothing() {
    let src = node("src2");
    let dst = node("dst2");
    create_vm_with_data(&src, 101, "128M").await;
    let (_, _, out) = replicate(&src, &dst, 101).await;
    assert!(out.contains("full copy"), "{out}");
    assert!(dst.vm_config(101).exists());

    let dropped = mt_ok(&dst, &["replica", "drop", "101"]).await;
    assert!(
        dropped.contains("freed volume 'local:101/vm-101-disk-0.qcow2'"),
        "{dropped}"
    );
    assert!(dropped.contains("replica 101 dropped"), "{dropped}");
    assert!(!dst.vm_config(101).exists());
    assert_eq!(files_of(&dst.images(101), ""), Vec::<String>::new());
    assert_eq!(files_of(&dst.run, "101"), Vec::<String>::new());
    assert_eq!(
        files_of(&dst.data.join("replicas"), ""),
        Vec::<String>::new()
    );
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert_eq!(list.lines().count(), 1, "only the header: {list}");
    mt_ok(&src, &["vm", "stop", "101"]).await;
}

/// The bytes a failed `mtunnel replicate` says it copied toward the target (into the
/// tunnel's NBD connections) before failing.
fn sent_before_failure(stderr: &str) -> u64 {
    let marker = "replica run failed after copying ";
    let at = stderr
        .find(marker)
        .unwrap_or_else(|| panic!("no '{marker}' in {stderr}"));
    let rest = &stderr[at..];
    let open = rest.find('(').expect("a '(' before the byte count") + 1;
    let close = rest.find(" bytes)").expect("a byte count");
    rest[open..close].parse().expect("a byte count")
}

/// What a cut, interrupted or frozen run copied before it ended, and its stderr.
struct CutRun<'a> {
    copied: u64,
    stderr: &'a str,
}

/// The run after `cut` (64 MiB of data in `img`, a qcow2 working copy): a hash sync that
/// sends only the rest (both runs and the hashes ≤ 1.1 × one full copy), and its point is
/// byte-identical to the paused source.
async fn next_run_continues(
    src: &TestServer,
    dst: &TestServer,
    vmid: u32,
    img: &Path,
    cut: CutRun<'_>,
) {
    let (_, sent, out) = replicate(src, dst, vmid).await;
    let hashes = hash_bytes(&out);
    let copied = cut.copied;
    eprintln!("the cut run copied {copied} bytes; the next run sent {sent} + {hashes}");
    assert!(out.contains("hash sync ("), "{out}");
    assert!(
        copied >= 8 << 20,
        "the cut run got somewhere: {}",
        cut.stderr
    );
    let full = 64u64 << 20;
    assert!(
        (copied + sent + hashes) * 10 <= full * 11,
        "cut run {copied} + next run {sent} + hashes {hashes} bytes > 1.1 x {full}"
    );
    let now = src.base().join("now.raw");
    let p = dst.base().join("p.raw");
    paused(src, vmid, || export_raw(img, None, &now)).await;
    let replica = dst.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
    export_raw(&replica, Some(&point_of(&out)), &p);
    assert_same_raw(&now, &p);
    for f in [&now, &p] {
        std::fs::remove_file(f).unwrap();
    }
}

/// The bytes of hashes a hash sync's summary line says it received (0 for other runs).
fn hash_bytes(out: &str) -> u64 {
    let Some(end) = out.find(" bytes of hashes received") else {
        return 0;
    };
    let head = &out[..end];
    let start = head.rfind(' ').expect("a space before the count") + 1;
    head[start..].parse().expect("a byte count")
}

/// Where a cut-and-resume test keeps a replica's points: the raw bytes of point `p`.
type PointRaw<'a> = &'a dyn Fn(&str, &Path) -> PathBuf;

/// kill -9 of the target's `serve` about half way through a run of 32 MiB written since
/// run 1 (slowed to 4 MiB/s), restart, run again. The cut run freed only its NBD server
/// and sockets; the replica and point 1 are intact and listed `interrupted`; the next
/// run is a hash sync that sends only what the cut run had not: both runs together send
/// at most 1.1 × what an uncut run sends for the 32 MiB. The new point is the source.
async fn cut_then_resume(
    src: &TestServer,
    dst: &mut TestServer,
    vmid: u32,
    storage: &str,
    raw: PointRaw<'_>,
) {
    let img = src.images(vmid).join(format!("vm-{vmid}-disk-0.qcow2"));
    let (_, _, out1) = replicate_to(src, dst, vmid, storage).await;
    let point1 = point_of(&out1);
    let at_run1 = src.base().join("run1.raw");
    paused(src, vmid, || export_raw(&img, None, &at_run1)).await;

    let wrote = qmp(
        &src.run,
        vmid,
        "human-monitor-command",
        json!({"command-line": "qemu-io -d scsi0 \"write -P 0x77 64M 32M\""}),
    )
    .await;
    assert_eq!(wrote, json!(""), "HMP qemu-io failed");
    let slow = spawn_slow_replicate(src, dst, vmid, storage);
    let pid_file = dst.run.join(format!("{vmid}-scsi0.replica.pid"));
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || pid_file.exists()).await,
        "the run never exported the working copy"
    );
    // 32 MiB at 4 MiB/s take 8 s: cut at about half.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    dst.restart();
    let cut = common::bounded(120, slow).await.unwrap();
    assert!(!cut.status.success(), "the cut run must fail");
    let cut_err = String::from_utf8_lossy(&cut.stderr);
    eprintln!("the cut run: {cut_err}");
    let cut_sent = sent_before_failure(&cut_err);

    // Recovery freed the run's NBD server and sockets, and nothing else.
    let prefix = format!("{vmid}-");
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || files_of(
            &dst.run, &prefix
        )
        .is_empty())
        .await,
        "left in the run dir: {:?}",
        files_of(&dst.run, &prefix)
    );
    let conf = std::fs::read_to_string(dst.vm_config(vmid)).unwrap();
    assert!(conf.contains("lock: replica"), "{conf}");
    let p1 = raw(&point1, &dst.base().join("p1.raw"));
    assert_same_raw(&at_run1, &p1);
    let list = mt_ok(dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");

    // The next run sends what the cut one had not.
    let (_, sent, out3) = replicate_to(src, dst, vmid, storage).await;
    eprintln!("cut run sent {cut_sent} bytes, the resumed run {sent}: {out3}");
    assert!(out3.contains("hash sync ("), "{out3}");
    assert!(
        cut_sent >= 4 << 20,
        "the cut run got somewhere: {cut_sent} bytes"
    );
    let one_run = 32u64 << 20;
    let hashes = hash_bytes(&out3);
    assert!(
        (cut_sent + sent + hashes) * 10 <= one_run * 11,
        "cut run {cut_sent} + resumed run {sent} + hashes {hashes} bytes > 1.1 x {one_run}"
    );
    let now = src.base().join("now.raw");
    paused(src, vmid, || export_raw(&img, None, &now)).await;
    let p3 = raw(&point_of(&out3), &dst.base().join("p3.raw"));
    assert_same_raw(&now, &p3);
    let p1 = raw(&point1, &dst.base().join("p1.raw"));
    assert_same_raw(&at_run1, &p1);
    for f in [&now, &at_run1] {
        std::fs::remove_file(f).unwrap();
    }
    mt_ok(src, &["vm", "stop", &vmid.to_string()]).await;
}

/// A FIRST run (64 MiB of data on a 128 MiB disk, slowed to 4 MiB/s) cut by kill -9 of
/// the target about half way: the working copy stays (the replica is listed
/// `interrupted`, no point), and the next run is a hash sync that sends the rest: both
/// together send at most 1.1 x the 64 MiB an uncut full run sends at least. Its point is
/// the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_first_run_continues_where_it_stopped() {
    let src = node("src13");
    let mut dst = node("dst13");
    let img = create_vm_with_data(&src, 113, "128M").await;
    let slow = spawn_slow_replicate(&src, &dst, 113, "local");
    let pid_file = dst.run.join("113-scsi0.replica.pid");
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || pid_file.exists()).await,
        "the run never exported the working copy"
    );
    // The 64 MiB of data come first on the disk: at 4 MiB/s half of it takes 8 s.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    dst.restart();
    let cut = common::bounded(120, slow).await.unwrap();
    assert!(!cut.status.success(), "the cut run must fail");
    let cut_err = String::from_utf8_lossy(&cut.stderr);
    let cut_sent = sent_before_failure(&cut_err);
    assert!(
        cut_err.contains(
            "toward the target; the target keeps an interrupted replica (no restore point \
             yet) that the next run continues, or 'mtunnel replica drop 113' on the target frees: "
        ),
        "{cut_err}"
    );
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");

    let cut = CutRun {
        copied: cut_sent,
        stderr: &cut_err,
    };
    next_run_continues(&src, &dst, 113, &img, cut).await;
    mt_ok(&src, &["vm", "stop", "113"]).await;
}

/// [`cut_then_resume`] onto `dir`: qcow2 working copy, points are internal snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_mid_run_resumes_where_it_stopped_on_dir() {
    let src = node("src3");
    let mut dst = node("dst3");
    create_vm_with_data(&src, 102, "256M").await;
    let replica = dst.images(102).join("vm-102-disk-0.qcow2");
    let raw = |p: &str, to: &Path| {
        let _ = std::fs::remove_file(to);
        export_raw(&replica, Some(p), to);
        to.to_path_buf()
    };
    cut_then_resume(&src, &mut dst, 102, "local", &raw).await;
}

/// [`cut_then_resume`] onto `btrfs`: raw working copy, points are read-only snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_mid_run_resumes_where_it_stopped_on_btrfs() {
    let fs = LoopBtrfs::new();
    let src = node("src3b");
    let mut dst = TestServer::start_with(Options {
        node: Some("dst3b".into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{}", fs.storage_toml("bt")),
        ..Options::default()
    });
    create_vm_with_data(&src, 112, "256M").await;
    let mnt = fs.mnt.clone();
    let raw =
        move |p: &str, _: &Path| mnt.join(format!("replica-points/112/vm-112-disk-0@{p}/disk.raw"));
    cut_then_resume(&src, &mut dst, 112, "bt", &raw).await;
}

/// `btrfs property get -ts PATH ro`: whether a subvolume is read-only.
fn read_only(path: &Path) -> bool {
    let out = Command::new("btrfs")
        .args(["property", "get", "-ts"])
        .arg(path)
        .arg("ro")
        .output()
        .expect("btrfs property get");
    String::from_utf8_lossy(&out.stdout).trim() == "ro=true"
}

/// On a `btrfs` storage the working copy is a raw image in its own subvolume and each point
/// a read-only snapshot of it: run 2 copies the 8 MiB written, both points hold the source
/// as of their run, `promote --point` of the older point brings that state back (and the
/// VM starts), and `drop` of another replica leaves no subvolume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_points_are_read_only_snapshots() {
    let fs = LoopBtrfs::new();
    let src = node("src4");
    let dst = TestServer::start_with(Options {
        node: Some("dst4".into()),
        extra_toml: format!("qemu_accel = \"tcg\"\n{}", fs.storage_toml("bt")),
        ..Options::default()
    });
    let img = create_vm_with_data(&src, 103, "256M").await;
    let (_, _, out1) = replicate_to(&src, &dst, 103, "bt").await;
    assert!(out1.contains("full copy"), "{out1}");
    let point1 = point_of(&out1);
    let at_run1 = src.base().join("run1.raw");
    paused(&src, 103, || export_raw(&img, None, &at_run1)).await;
    write_8m_live(&src, 103).await;
    let (copied2, sent2, out2) = replicate_to(&src, &dst, 103, "bt").await;
    assert!(out2.contains("incremental"), "{out2}");
    assert!((8 << 20..9 << 20).contains(&copied2), "{out2}");
    assert!((8 << 20..9 << 20).contains(&sent2), "{out2}");
    let point2 = point_of(&out2);

    let snap = |p: &str| fs.mnt.join(format!("replica-points/103/vm-103-disk-0@{p}"));
    assert!(read_only(&snap(&point1)) && read_only(&snap(&point2)));
    let now = src.base().join("now.raw");
    paused(&src, 103, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &snap(&point2).join("disk.raw"));
    assert_same_raw(&at_run1, &snap(&point1).join("disk.raw"));

    // The older point promoted: the VM is the source as of run 1, and starts.
    let promoted = mt_ok(&dst, &["replica", "promote", "103", "--point", &point1]).await;
    assert!(promoted.contains(&format!("'{point1}'")), "{promoted}");
    let working = fs.mnt.join("images/103/vm-103-disk-0/disk.raw");
    assert_same_raw(&at_run1, &working);
    assert!(!read_only(&fs.mnt.join("images/103/vm-103-disk-0")));
    assert_eq!(
        fs.subvolumes(),
        vec!["images/103/vm-103-disk-0".to_string()]
    );
    mt_ok(&dst, &["vm", "start", "103"]).await;
    mt_ok(&dst, &["vm", "stop", "103"]).await;
    mt_ok(&dst, &["vm", "destroy", "103"]).await;
    mt_ok(&src, &["vm", "stop", "103"]).await;
    std::fs::remove_file(&at_run1).unwrap();
    std::fs::remove_file(&now).unwrap();

    // Another replica with two points, dropped: no subvolume, no points directory.
    create_vm_with_data(&src, 104, "128M").await;
    replicate_to(&src, &dst, 104, "bt").await;
    replicate_to(&src, &dst, 104, "bt").await;
    assert_eq!(fs.subvolumes().len(), 3, "{:?}", fs.subvolumes());
    mt_ok(&dst, &["replica", "drop", "104"]).await;
    assert_eq!(fs.subvolumes(), Vec::<String>::new());
    assert_eq!(
        files_of(&fs.mnt.join("replica-points"), ""),
        Vec::<String>::new()
    );
    assert!(!dst.vm_config(104).exists());
    mt_ok(&src, &["vm", "stop", "104"]).await;
}

/// Refusals end with a clear message and change nothing: a target VMID that holds a VM which is no replica, and a replica asked to
/// take runs of another source's VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_change_nothing() {
    let src = node("src5");
    let dst = node("dst5");
    mt_ok(
        &src,
        &[
            "vm",
            "create",
            "105",
            "--memory",
            "128",
            "--disk",
            "local:64M:qcow2",
        ],
    )
    .await;
    let target = target_arg(&dst, dst.port);
    let args = ["replicate", "105", &target, "--target-storage", "local"];
    mt_ok(&dst, &["vm", "create", "105", "--memory", "64"]).await;
    let before = std::fs::read_to_string(dst.vm_config(105)).unwrap();
    mt_ok(&src, &["vm", "start", "105"]).await;
    let taken = mt(&src, &args).await;
    assert!(!taken.status.success());
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(
        err.contains("VM 105 exists on node 'dst5' and is not a replica (lock 'replica')"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dst.vm_config(105)).unwrap(), before);
    assert_eq!(files_of(&dst.run, "105"), Vec::<String>::new());
    mt_ok(&src, &["vm", "stop", "105"]).await;

    // A replica refuses runs of another source's VM of the same VMID.
    let other = node("src5b");
    create_vm_with_data(&src, 106, "128M").await;
    create_vm_with_data(&other, 106, "128M").await;
    replicate(&src, &dst, 106).await;
    let conf = std::fs::read_to_string(dst.vm_config(106)).unwrap();
    let foreign = mt(
        &other,
        &["replicate", "106", &target, "--target-storage", "local"],
    )
    .await;
    assert!(!foreign.status.success());
    let err = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        err.contains("VM 106 here is the replica of VM 106 on 'src5', not of VM 106 on 'src5b'"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dst.vm_config(106)).unwrap(), conf);
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" idle "), "{list}");
    assert_eq!(files_of(&dst.run, "106"), Vec::<String>::new());
    mt_ok(&src, &["vm", "stop", "106"]).await;
    mt_ok(&other, &["vm", "stop", "106"]).await;
}

/// A raw working copy on a `dir` storage keeps a reflink copy per point where its file
/// system shares blocks (here a `dir` storage on a loop btrfs): both points hold the
/// source as of their run, and `promote --point` of the older one brings it back. Where
/// the file system cannot (ext4 here), the image keeps only its newest point, and
/// promoting an older one is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_dir_points_are_reflink_copies_where_the_fs_shares_blocks() {
    let fs = LoopBtrfs::new();
    let rd = fs.mnt.join("rd");
    std::fs::create_dir(&rd).unwrap();
    let src = node("src7");
    let dst = TestServer::start_with(Options {
        node: Some("dst7".into()),
        extra_toml: format!(
            "qemu_accel = \"tcg\"\nstorage.rd = {{ type = \"dir\", path = \"{}\", content = [\"images\"] }}\n",
            rd.display()
        ),
        ..Options::default()
    });
    let img = create_vm_with_data_as(&src, 107, "256M", "raw").await;
    let (_, _, out1) = replicate_to(&src, &dst, 107, "rd").await;
    let point1 = point_of(&out1);
    let at_run1 = src.base().join("run1.raw");
    paused(&src, 107, || export_raw(&img, None, &at_run1)).await;
    write_8m_live(&src, 107).await;
    let (_, _, out2) = replicate_to(&src, &dst, 107, "rd").await;
    assert!(out2.contains("incremental"), "{out2}");
    let point2 = point_of(&out2);
    let copy = |p: &str| rd.join(format!("replica-points/107/vm-107-disk-0.raw@{p}"));
    let now = src.base().join("now.raw");
    paused(&src, 107, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &copy(&point2));
    assert_same_raw(&at_run1, &copy(&point1));

    mt_ok(&dst, &["replica", "promote", "107", "--point", &point1]).await;
    assert_same_raw(&at_run1, &rd.join("images/107/vm-107-disk-0.raw"));
    assert_eq!(
        files_of(&rd.join("replica-points"), ""),
        Vec::<String>::new()
    );
    mt_ok(&dst, &["vm", "start", "107"]).await;
    mt_ok(&dst, &["vm", "stop", "107"]).await;
    mt_ok(&dst, &["vm", "destroy", "107"]).await;
    mt_ok(&src, &["vm", "stop", "107"]).await;

    // ext4 (the node's `local`): no reflink, only the newest point.
    let img = create_vm_with_data_as(&src, 108, "128M", "raw").await;
    let (_, _, out1) = replicate(&src, &dst, 108).await;
    let (_, _, out2) = replicate(&src, &dst, 108).await;
    let (point1, point2) = (point_of(&out1), point_of(&out2));
    assert_eq!(
        files_of(&dst.base().join("s/local/replica-points"), ""),
        Vec::<String>::new()
    );
    let refused = mt(&dst, &["replica", "promote", "108", "--point", &point1]).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!(
            "local:108/vm-108-disk-0.raw: a raw working copy without reflink points keeps only its newest point ({point2}), not '{point1}'"
        )),
        "{err}"
    );
    paused(&src, 108, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &dst.images(108).join("vm-108-disk-0.raw"));
    mt_ok(&dst, &["replica", "drop", "108"]).await;
    mt_ok(&src, &["vm", "stop", "108"]).await;
    for f in [&now, &at_run1] {
        std::fs::remove_file(f).unwrap();
    }
}

/// A node like [`node`] whose `serve` also exposes `/metrics` (on a free loopback port).
fn node_with_metrics(name: &str) -> TestServer {
    common::require_qemu();
    TestServer::start_with(Options {
        node: Some(name.into()),
        extra_toml: "qemu_accel = \"tcg\"\nmetrics_listen = \"127.0.0.1:0\"\n".into(),
        ..Options::default()
    })
}

/// The target's record of replica `vmid` (`{data}/replicas/<vmid>.json`).
fn record(dst: &TestServer, vmid: u32) -> serde_json::Value {
    let path = dst.data.join("replicas").join(format!("{vmid}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The replica's entry in the target's `/cluster/resources?type=vm`.
async fn resources(dst: &TestServer) -> serde_json::Value {
    dst.client()
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .expect("GET /cluster/resources")
}

/// `/cluster/resources` lists a replica as `replica` with its run state and newest point,
/// a PVE `qemu` entry otherwise; once promoted it is a plain `stopped` VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_show_in_resources() {
    let src = node("src9");
    let dst = node_with_metrics("dst9");
    create_vm_with_data(&src, 109, "128M").await;
    let (_, _, out1) = replicate(&src, &dst, 109).await;
    let point1 = point_of(&out1);
    let time1 = record(&dst, 109)["points"][0]["time"].as_u64().unwrap();
    assert_eq!(
        resources(&dst).await,
        json!([{"id": "qemu/109", "vmid": 109, "type": "qemu", "node": "dst9",
                "status": "replica", "lock": "replica", "replica-state": "idle",
                "replica-source": "src9/109", "replica-points": 1,
                "replica-newest": point1, "replica-newest-time": time1}])
    );

    mt_ok(&dst, &["replica", "promote", "109"]).await;
    assert_eq!(
        resources(&dst).await,
        json!([{"id": "qemu/109", "vmid": 109, "type": "qemu", "node": "dst9",
                "status": "stopped"}])
    );
    mt_ok(&src, &["vm", "stop", "109"]).await;
}

/// The source's QEMU restarted (a raw disk: its bitmap lived in QEMU's memory only): the
/// next run cannot be incremental and is a hash sync that sends only the 8 MiB written
/// since (at most 1 % of the 4 GiB disk, hashes included); its point is the source; the
/// run after it is incremental again (the hash sync left a bitmap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_source_qemu_gets_a_hash_sync_of_the_changes_only() {
    let src = node("src10");
    let dst = node("dst10");
    let img = create_vm_with_data_as(&src, 110, "4G", "raw").await;
    let (_, sent1, out1) = replicate(&src, &dst, 110).await;
    assert!(out1.contains("full copy"), "{out1}");

    mt_ok(&src, &["vm", "stop", "110"]).await;
    mt_ok(&src, &["vm", "start", "110"]).await;
    write_8m_live(&src, 110).await;
    let target = target_arg(&dst, dst.port);
    let run2 = mt(
        &src,
        &["replicate", "110", &target, "--target-storage", "local"],
    )
    .await;
    let err2 = String::from_utf8_lossy(&run2.stderr);
    let out2 = String::from_utf8_lossy(&run2.stdout);
    assert!(run2.status.success(), "{out2}\n{err2}");
    assert!(
        err2.contains("no usable dirty bitmap 'mtunnel-replica-") && err2.contains("(QEMU restarted since the last run?): hash sync (only the blocks whose hashes differ from the target's are sent)"),
        "{err2}"
    );
    assert!(
        out2.contains("hash sync (4.0 GiB compared, 8.0 MiB differed, "),
        "{out2}"
    );
    let sent2 = out2
        .split(" sent through the tunnel (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("the bytes sent");
    let hashes = hash_bytes(&out2);
    eprintln!("run 1 sent {sent1} bytes; run 2 (hash sync) {sent2} bytes and {hashes} of hashes");
    assert!(sent2 >= 8 << 20, "{out2}");
    // 1152 blocks hold data; the 64384 zero ones come as runs (one hash each, ~2.3 MB).
    assert!(
        hashes < 128 << 10,
        "{hashes} bytes of hashes for 72 MiB of data on a 4 GiB disk"
    );
    assert!(
        (sent2 + hashes) * 100 <= 4 << 30,
        "the hash sync sent {sent2} + {hashes} bytes, more than 1 % of the disk"
    );
    let now = src.base().join("now.raw");
    paused(&src, 110, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &dst.images(110).join("vm-110-disk-0.raw"));
    std::fs::remove_file(&now).unwrap();

    let (_, sent3, out3) = replicate(&src, &dst, 110).await;
    assert!(out3.contains("incremental"), "{out3}");
    assert!(sent3 < 1 << 20, "{out3}");
    mt_ok(&src, &["vm", "stop", "110"]).await;
}

/// A stopped VM is replicated from its image (qemu-nbd, the VM's config lock held for the
/// run): the first run copies its data, the second (a hash sync) sends next to nothing,
/// its zero blocks' hashes coming as runs, each point is the disk; a target without hash
/// runs is asked for every hash; the VM starts afterwards (the lock is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_is_replicated_and_a_second_run_sends_nothing() {
    let src = node("src11");
    let dst = node("dst11");
    let img = stopped_vm_with_data(&src, 111, ("256M", "qcow2"), ("16M", 32 << 20)).await;
    let replica = dst.images(111).join("vm-111-disk-0.qcow2");
    let source_raw = src.base().join("src.raw");
    export_raw(&img, None, &source_raw);

    let (_, sent1, out1) = replicate(&src, &dst, 111).await;
    assert!(out1.contains("full copy"), "{out1}");
    assert!((32 << 20..33 << 20).contains(&sent1), "{out1}");
    let p1 = dst.base().join("p1.raw");
    export_raw(&replica, Some(&point_of(&out1)), &p1);
    assert_same_raw(&source_raw, &p1);

    let (_, sent2, out2) = replicate(&src, &dst, 111).await;
    assert!(
        out2.contains("hash sync (256.0 MiB compared, 0 B differed, "),
        "{out2}"
    );
    assert!(
        sent2 < 4096,
        "a second run of a stopped VM sent {sent2} bytes: {out2}"
    );
    // 512 blocks hold data, the other 3584 are zeroes: they come as runs.
    let hashes2 = hash_bytes(&out2);
    assert!(hashes2 < 32 << 10, "{hashes2} bytes of hashes: {out2}");
    let p2 = dst.base().join("p2.raw");
    export_raw(&replica, Some(&point_of(&out2)), &p2);
    assert_same_raw(&source_raw, &p2);

    // A target without `replica_hash_runs` (an older mtunnel) is asked for every hash.
    offer_replica_hashes_without_runs(&dst);
    let (_, _, out3) = replicate(&src, &dst, 111).await;
    assert!(
        out3.contains("hash sync (256.0 MiB compared, 0 B differed, "),
        "{out3}"
    );
    let hashes3 = hash_bytes(&out3);
    assert!(hashes3 > 4096 * 32, "{hashes3} bytes of hashes: {out3}");
    assert_eq!(files_of(&src.run, "111"), Vec::<String>::new());
    mt_ok(&src, &["vm", "start", "111"]).await;
    mt_ok(&src, &["vm", "stop", "111"]).await;
    for f in [&source_raw, &p1, &p2] {
        std::fs::remove_file(f).unwrap();
    }
}

/// `mtunnel replicate` of `vmid` to `dst` killed (-9) as soon as its hash sync reads the
/// source (its read-only NBD socket `{vmid}.<tag>.replica-read` appears; bounded: 60 s).
async fn kill_during_compare(src: &TestServer, dst: &TestServer, vmid: u32) {
    let target = target_arg(dst, dst.port);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtunnel"))
        .args(["replicate", &vmid.to_string(), &target])
        .args(["--target-storage", "local", "--config"])
        .arg(&src.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("running mtunnel replicate");
    // Reading: the NBD server's socket exists and a client is connected to it, which the
    // run does only after QEMU added its exports (the socket alone appears before them).
    let reading = || {
        let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        files_of(&src.run, &format!("{vmid}."))
            .iter()
            .filter(|f| f.ends_with(".replica-read"))
            .any(|f| {
                let path = src.run.join(f);
                let path = path.to_string_lossy();
                unix.lines().filter(|l| l.ends_with(path.as_ref())).count() >= 2
            })
    };
    let found = common::eventually(std::time::Duration::from_secs(60), reading).await;
    child.kill().await.expect("kill -9 of mtunnel replicate");
    assert!(
        found,
        "the run never read the source: {:?}",
        files_of(&src.run, "")
    );
}

/// A hash sync that dies while it compares (kill -9 of `mtunnel replicate`, after it
/// added its fresh bitmap) must not leave a replica the next run takes as current: the
/// 8 MiB written before that bitmap would never be sent. QEMU restarted after run 1 (raw
/// disk: bitmap lost), 8 MiB written, run 2 killed in its compare, 8 MiB more written:
/// run 3 is a hash sync (not incremental) and its point is the paused source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_sync_killed_while_comparing_is_not_followed_by_an_incremental_run() {
    let src = node("src14");
    let dst = node("dst14");
    let img = create_vm_with_data_as(&src, 114, "1G", "raw").await;
    let (_, _, out1) = replicate(&src, &dst, 114).await;
    assert!(out1.contains("full copy"), "{out1}");
    mt_ok(&src, &["vm", "stop", "114"]).await;
    mt_ok(&src, &["vm", "start", "114"]).await;
    let write =
        |pattern: &str, at: &str| format!("qemu-io -d scsi0 \"write -P {pattern} {at} 8M\"");
    let wrote = qmp(
        &src.run,
        114,
        "human-monitor-command",
        json!({"command-line": write("0x5a", "100M")}),
    )
    .await;
    assert_eq!(wrote, json!(""), "HMP qemu-io failed");

    kill_during_compare(&src, &dst, 114).await;
    // The target's status once the killed tunnel is cleaned up (asserted at the end: the
    // points' bytes are what matters most).
    let mut list = String::new();
    for _ in 0..50 {
        list = mt_ok(&dst, &["replica", "list"]).await;
        if list.contains(" interrupted ") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let wrote = qmp(
        &src.run,
        114,
        "human-monitor-command",
        json!({"command-line": write("0x6b", "300M")}),
    )
    .await;
    assert_eq!(wrote, json!(""), "HMP qemu-io failed");

    let (_, _, out3) = replicate(&src, &dst, 114).await;
    assert!(out3.contains("hash sync ("), "{out3}");
    let now = src.base().join("now.raw");
    paused(&src, 114, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &dst.images(114).join("vm-114-disk-0.raw"));
    std::fs::remove_file(&now).unwrap();
    mt_ok(&src, &["vm", "stop", "114"]).await;
    assert!(list.contains(" interrupted "), "{list}");
}

/// Makes `dst` reply to `mtunnel-features` as a target whose `replica-hashes` has no
/// `runs` (an override of the built-in handler).
fn offer_replica_hashes_without_runs(dst: &TestServer) {
    let handlers = dst.data.join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::write(
        handlers.join("mtunnel-features.lua"),
        r#"return {
  description = "mtunnel's extensions, as a target from before replica_hash_runs offers them.",
  params = false,
  lock = false,
  run = function(ctx, p)
    return { multifd = 1, postcopy = true, replica = 1, replica_hashes = 1, cutover = 1 }
  end,
}
"#,
    )
    .unwrap();
}

/// Makes `dst` reply to `mtunnel-features` as a target from before `replica-hashes` (an
/// override of the built-in handler).
fn offer_no_replica_hashes(dst: &TestServer) {
    let handlers = dst.data.join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::write(
        handlers.join("mtunnel-features.lua"),
        r#"return {
  description = "mtunnel's extensions, as a target from before replica-hashes offers them.",
  params = false,
  lock = false,
  run = function(ctx, p)
    return { multifd = 1, postcopy = true, replica = 1, cutover = 1 }
  end,
}
"#,
    )
    .unwrap();
}

/// A target from before `replica-hashes` (its `mtunnel-features` without
/// `replica_hashes`, as an older mtunnel replies): a run that would be a hash sync (a
/// stopped VM's second run) copies every block instead and says so; its point is the
/// source, also where the source's disk became zeroes since the first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_replica_hashes_gets_a_full_copy() {
    let src = node("src15");
    let dst = node("dst15");
    let img = stopped_vm_with_data(&src, 115, ("64M", "qcow2"), ("8M", 16 << 20)).await;
    let (_, _, out1) = replicate(&src, &dst, 115).await;
    assert!(out1.contains("full copy"), "{out1}");

    offer_no_replica_hashes(&dst);
    qemu_io("qcow2", "write -P 0x33 40M 4M", &img);
    qemu_io("qcow2", "write -z 8M 2M", &img);
    let target = target_arg(&dst, dst.port);
    let run2 = mt(
        &src,
        &["replicate", "115", &target, "--target-storage", "local"],
    )
    .await;
    let err2 = String::from_utf8_lossy(&run2.stderr);
    let out2 = String::from_utf8_lossy(&run2.stdout);
    assert!(run2.status.success(), "{out2}\n{err2}");
    assert!(
        err2.contains(
            "the target (node 'dst15') does not offer 'replica-hashes' (an older mtunnel): a \
             full copy instead of the hash sync - upgrade it to send only what differs"
        ),
        "{err2}"
    );
    assert!(out2.contains("full copy"), "{out2}");
    let source_raw = src.base().join("src.raw");
    export_raw(&img, None, &source_raw);
    let p2 = dst.base().join("p2.raw");
    let replica = dst.images(115).join("vm-115-disk-0.qcow2");
    export_raw(&replica, Some(&point_of(&out2)), &p2);
    assert_same_raw(&source_raw, &p2);
    for f in [&source_raw, &p2] {
        std::fs::remove_file(f).unwrap();
    }
}

/// A hash sync killed while it compares leaves the source QEMU's read-only NBD server and
/// exports behind; the next run of the replica removes them whatever kind of run it is
/// (here a full copy: the target no longer offers `replica-hashes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_run_removes_a_killed_hash_syncs_nbd_server() {
    let src = node("src16");
    let dst = node("dst16");
    create_vm_with_data_as(&src, 116, "1G", "raw").await;
    let (_, _, out1) = replicate(&src, &dst, 116).await;
    assert!(out1.contains("full copy"), "{out1}");
    mt_ok(&src, &["vm", "stop", "116"]).await;
    mt_ok(&src, &["vm", "start", "116"]).await;
    kill_during_compare(&src, &dst, 116).await;
    let reads = || {
        files_of(&src.run, "116.")
            .into_iter()
            .filter(|f| f.ends_with(".replica-read"))
            .collect::<Vec<_>>()
    };
    assert_eq!(reads().len(), 1, "{:?}", files_of(&src.run, ""));
    let exports = qmp(&src.run, 116, "query-block-exports", json!({})).await;
    assert_ne!(exports, json!([]), "the killed run's exports");

    offer_no_replica_hashes(&dst);
    let (_, _, out2) = replicate(&src, &dst, 116).await;
    assert!(out2.contains("full copy"), "{out2}");
    assert_eq!(reads(), Vec::<String>::new());
    let exports = qmp(&src.run, 116, "query-block-exports", json!({})).await;
    assert_eq!(exports, json!([]), "exports left in the source QEMU");
    mt_ok(&src, &["vm", "stop", "116"]).await;
}

/// The bytes an interrupted `mtunnel replicate` says it copied toward the target.
fn copied_before_interrupt(stderr: &str) -> u64 {
    let marker = "interrupted (SIGTERM) after copying ";
    let at = stderr
        .find(marker)
        .unwrap_or_else(|| panic!("no '{marker}' in {stderr}"));
    let rest = &stderr[at..];
    let open = rest.find('(').map(|i| i + 1).expect("'(SIGTERM'");
    let rest = &rest[open..];
    let open = rest.find('(').expect("a '(' before the byte count") + 1;
    let close = rest.find(" bytes)").expect("a byte count");
    rest[open..close].parse().expect("a byte count")
}

/// Nothing of a failed or interrupted run of VM `vmid` is left in the source QEMU (no
/// block job, NBD export or NBD client node) or in its run dir (no forward socket).
async fn assert_source_left_nothing(src: &TestServer, vmid: u32) {
    assert_eq!(
        qmp(&src.run, vmid, "query-jobs", json!({})).await,
        json!([])
    );
    let exports = qmp(&src.run, vmid, "query-block-exports", json!({})).await;
    assert_eq!(exports, json!([]), "exports left in the source QEMU");
    let nodes = qmp(&src.run, vmid, "query-named-block-nodes", json!({})).await;
    let ours: Vec<&serde_json::Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["node-name"]
                .as_str()
                .unwrap_or("")
                .starts_with("replica-")
        })
        .collect();
    assert!(ours.is_empty(), "NBD client nodes left: {ours:?}");
    let left: Vec<String> = files_of(&src.run, &vmid.to_string())
        .into_iter()
        .filter(|f| f.contains("replica"))
        .collect();
    assert!(left.is_empty(), "left in the source's run dir: {left:?}");
}

/// SIGTERM (as `systemctl stop` sends it) to a FIRST run of a running VM (64 MiB of data on
/// a 128 MiB disk, slowed to 4 MiB/s) about half way: the process exits 1 with one line
/// that says the run was interrupted and the next run continues it; the source QEMU has no
/// block job, NBD export or NBD client node of the run left, the run dir no forward
/// socket; the target ended the run as cut (its NBD server and sockets gone, the replica
/// `interrupted`, one failed run counted). The next run is a hash sync that sends the
/// rest: both together at most 1.1 x the 64 MiB of data; its point is the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_cleans_up_and_the_next_run_continues_it() {
    let src = node("src17");
    let dst = node("dst17");
    let img = create_vm_with_data(&src, 117, "128M").await;
    let target = target_arg(&dst, dst.port);
    let child = spawn_replicate(&src, 117, &target, &["--bwlimit", "4096"]);
    let pid_file = dst.run.join("117-scsi0.replica.pid");
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || pid_file.exists()).await,
        "the run never exported the working copy"
    );
    // The 64 MiB of data come first on the disk: at 4 MiB/s half of it takes 8 s.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("a pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let cut = common::bounded(60, child.wait_with_output()).await.unwrap();
    let cut_err = String::from_utf8_lossy(&cut.stderr);
    eprintln!("the interrupted run: {cut_err}");
    assert_eq!(cut.status.code(), Some(1), "{cut_err}");
    assert!(cut.stdout.is_empty(), "no summary line");
    let line = "mtunnel: error: replica run of VM 117 interrupted (SIGTERM) after copying ";
    let said: Vec<&str> = cut_err
        .lines()
        .filter(|l| l.contains("interrupted"))
        .collect();
    assert_eq!(said.len(), 1, "{cut_err}");
    assert!(said[0].starts_with(line), "{cut_err}");
    assert!(
        said[0].ends_with(
            " toward the target; stopped cleanly (its jobs and exports removed from the \
             source, the target's run ended as cut): the next run continues it, sending only \
             what the target has not acknowledged"
        ),
        "{cut_err}"
    );
    assert!(!cut_err.contains("replica run failed"), "{cut_err}");
    let cut_copied = copied_before_interrupt(&cut_err);

    // Nothing of the run is left in the source QEMU or its run dir.
    assert_source_left_nothing(&src, 117).await;

    // The target ended the run as cut.
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || files_of(
            &dst.run, "117-"
        )
        .is_empty())
        .await,
        "left in the target's run dir: {:?}",
        files_of(&dst.run, "117-")
    );
    assert_eq!(record(&dst, 117)["failed_runs"], json!(1));
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");

    let cut = CutRun {
        copied: cut_copied,
        stderr: &cut_err,
    };
    next_run_continues(&src, &dst, 117, &img, cut).await;
    mt_ok(&src, &["vm", "stop", "117"]).await;
}

/// `--bwlimit` paces a hash sync's own writes: a stopped VM's second run (a hash sync) of
/// 2 MiB written since the first, at 512 KiB/s, says it kept 8 writes (of 64 KiB) in
/// flight, paced to the limit, and that they had to wait (a writer faster than the limit
/// waits at least once); its point is the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwlimit_paces_a_hash_syncs_writes() {
    let src = node("src18");
    let dst = node("dst18");
    let img = stopped_vm_with_data(&src, 118, ("64M", "qcow2"), ("8M", 4 << 20)).await;
    let (_, _, out1) = replicate(&src, &dst, 118).await;
    assert!(out1.contains("full copy"), "{out1}");
    qemu_io("qcow2", "write -P 0x3c 20M 2M", &img);

    let target = target_arg(&dst, dst.port);
    let run2 = mt(
        &src,
        &[
            "replicate",
            "118",
            &target,
            "--target-storage",
            "local",
            "--bwlimit",
            "512",
        ],
    )
    .await;
    let err2 = String::from_utf8_lossy(&run2.stderr);
    let out2 = String::from_utf8_lossy(&run2.stdout);
    assert!(run2.status.success(), "{out2}\n{err2}");
    eprintln!("the paced run: {err2}");
    assert!(
        out2.contains("hash sync (64.0 MiB compared, 2.0 MiB differed, "),
        "{out2}"
    );
    let marker = "hash sync: 64.0 MiB compared, 2.0 MiB differed and were written (up to 8 \
                  writes in flight), paced to --bwlimit 512 KiB/s (the writes waited ";
    let at = err2
        .find(marker)
        .unwrap_or_else(|| panic!("no '{marker}' in {err2}"))
        + marker.len();
    let pauses: u64 = err2[at..]
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count of pauses in {err2}"));
    assert!(pauses >= 1, "{err2}");
    let source_raw = src.base().join("src.raw");
    export_raw(&img, None, &source_raw);
    let p2 = dst.base().join("p2.raw");
    let replica = dst.images(118).join("vm-118-disk-0.qcow2");
    export_raw(&replica, Some(&point_of(&out2)), &p2);
    assert_same_raw(&source_raw, &p2);
    for f in [&source_raw, &p2] {
        std::fs::remove_file(f).unwrap();
    }
}

/// A later run refreshes the replica's config from the source's: memory and description
/// changed on the source between runs are on the target after the next run, which stays a
/// replica (`lock: replica`) on the same working copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_run_refreshes_the_replicas_config() {
    let src = node("src19");
    let dst = node("dst19");
    stopped_vm_with_data(&src, 119, ("64M", "qcow2"), ("0", 1 << 20)).await;
    replicate(&src, &dst, 119).await;
    let conf1 = std::fs::read_to_string(dst.vm_config(119)).unwrap();
    assert!(conf1.contains("memory: 128\n"), "{conf1}");
    let drive = |conf: &str| -> String {
        conf.lines()
            .find(|l| l.starts_with("scsi0: "))
            .unwrap_or_else(|| panic!("no scsi0 in {conf}"))
            .to_string()
    };

    let path = src.vm_config(119);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("memory: 128\n"), "{text}");
    let changed = format!(
        "#moved to rack 7\n{}",
        text.replace("memory: 128\n", "memory: 384\n")
    );
    std::fs::write(&path, changed).unwrap();
    let (_, _, out2) = replicate(&src, &dst, 119).await;
    assert!(out2.contains("hash sync ("), "{out2}");

    let conf2 = std::fs::read_to_string(dst.vm_config(119)).unwrap();
    assert!(conf2.contains("memory: 384\n"), "{conf2}");
    assert!(conf2.starts_with("#moved to rack 7\n"), "{conf2}");
    assert!(conf2.contains("lock: replica\n"), "{conf2}");
    assert_eq!(drive(&conf2), drive(&conf1));
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" idle "), "{list}");
}

/// SIGINT (Ctrl-C) while a hash sync of a running VM compares (QEMU restarted after run 1,
/// raw disk: bitmap lost; 8 MiB written since): the run exits 1 saying it was interrupted;
/// the source QEMU has none of the hash sync's things left — its read-only NBD server
/// (socket) and exports, its fresh dirty bitmap (which misses the writes before it), a
/// job — and the next run is a hash sync whose point is the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_a_hash_sync_removes_its_nbd_server_and_bitmap() {
    let src = node("src20");
    let dst = node("dst20");
    let img = create_vm_with_data_as(&src, 120, "1G", "raw").await;
    let (_, _, out1) = replicate(&src, &dst, 120).await;
    assert!(out1.contains("full copy"), "{out1}");
    mt_ok(&src, &["vm", "stop", "120"]).await;
    mt_ok(&src, &["vm", "start", "120"]).await;
    write_8m_live(&src, 120).await;

    let target = target_arg(&dst, dst.port);
    let child = spawn_replicate(&src, 120, &target, &[]);
    let reads = || {
        files_of(&src.run, "120.")
            .into_iter()
            .filter(|f| f.ends_with(".replica-read"))
            .collect::<Vec<_>>()
    };
    let reading =
        common::eventually(std::time::Duration::from_secs(60), || !reads().is_empty()).await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("a pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let cut = common::bounded(60, child.wait_with_output()).await.unwrap();
    let cut_err = String::from_utf8_lossy(&cut.stderr);
    eprintln!("the interrupted run: {cut_err}");
    assert!(reading, "the run never read the source: {cut_err}");
    assert_eq!(cut.status.code(), Some(1), "{cut_err}");
    assert!(
        cut_err
            .contains("mtunnel: error: replica run of VM 120 interrupted (SIGINT) after copying "),
        "{cut_err}"
    );

    assert_eq!(reads(), Vec::<String>::new());
    let exports = qmp(&src.run, 120, "query-block-exports", json!({})).await;
    assert_eq!(exports, json!([]), "exports left in the source QEMU");
    assert_eq!(qmp(&src.run, 120, "query-jobs", json!({})).await, json!([]));
    let blocks = qmp(&src.run, 120, "query-block", json!({})).await;
    let bitmaps: Vec<&serde_json::Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| {
            b["inserted"]["dirty-bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect();
    assert!(bitmaps.is_empty(), "bitmaps left: {bitmaps:?}");

    let (_, _, out3) = replicate(&src, &dst, 120).await;
    assert!(out3.contains("hash sync ("), "{out3}");
    let now = src.base().join("now.raw");
    paused(&src, 120, || export_raw(&img, None, &now)).await;
    assert_same_raw(&now, &dst.images(120).join("vm-120-disk-0.raw"));
    std::fs::remove_file(&now).unwrap();
    mt_ok(&src, &["vm", "stop", "120"]).await;
}

/// A FIRST run (64 MiB of data on a 128 MiB disk, slowed to 4 MiB/s) through a
/// [`FaultProxy`] whose link freezes about a quarter of the way (nothing more passes,
/// nothing is closed): with `--stall-timeout 5` the run fails well within this test's
/// bound, with the stall message that names the flag and says the next run continues;
/// the source QEMU has nothing of the run left; the target (peer_timeout_secs 2) ended
/// its side (the tunnel task failed, the working copy kept as a cut run: `interrupted`, its
/// NBD server and sockets gone). The next run, straight to the target, is a hash sync that
/// sends the rest: both together at most 1.1 x the 64 MiB of data; its point is the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_link_fails_the_run_within_the_stall_timeout_and_the_next_continues_it() {
    let src = node("src21");
    common::require_qemu();
    let dst = TestServer::start_with(Options {
        node: Some("dst21".into()),
        extra_toml: "qemu_accel = \"tcg\"\npeer_timeout_secs = 2\n".into(),
        ..Options::default()
    });
    let img = create_vm_with_data(&src, 121, "128M").await;
    let proxy = FaultProxy::start(dst.port).await;
    let target = target_arg(&dst, proxy.port);
    let child = spawn_replicate(
        &src,
        121,
        &target,
        &["--bwlimit", "4096", "--stall-timeout", "5"],
    );
    // Under way: the working copy is exported and 16 MiB went through the proxy (of the
    // 64 MiB of data, which come first on the disk).
    let pid_file = dst.run.join("121-scsi0.replica.pid");
    let under_way = common::eventually(std::time::Duration::from_secs(60), || {
        pid_file.exists() && proxy.bytes() >= 16 << 20
    })
    .await;
    assert!(
        under_way,
        "the run never got under way ({} bytes through the proxy)",
        proxy.bytes()
    );
    let upid = dst.tunnel_upids(121).pop().expect("the run's tunnel task");
    proxy.freeze();
    // A 60 s stall bound (the default) could not end the run within this bound.
    let cut = common::bounded(45, child.wait_with_output()).await.unwrap();
    let cut_err = String::from_utf8_lossy(&cut.stderr);
    eprintln!("the frozen run: {cut_err}");
    assert_eq!(cut.status.code(), Some(1), "{cut_err}");
    assert!(cut.stdout.is_empty(), "no summary line");
    let stalled = "the backup jobs made no progress for 5 s (--stall-timeout): the link to the \
                   target is probably frozen; the next run continues it, sending only what the \
                   target has not acknowledged";
    let error = cut_err
        .lines()
        .find(|l| l.starts_with("mtunnel: error: "))
        .unwrap_or_else(|| panic!("no error line: {cut_err}"));
    assert_eq!(error, format!("mtunnel: error: {stalled}"), "{cut_err}");
    assert!(
        cut_err.contains(&format!(
            "toward the target; the target keeps an interrupted replica (no restore point \
             yet) that the next run continues, or 'mtunnel replica drop 121' on the target \
             frees: {stalled}"
        )),
        "{cut_err}"
    );
    let cut_copied = sent_before_failure(&cut_err);
    assert_source_left_nothing(&src, 121).await;

    // The target ended its side: the task failed, the working copy is kept as a cut run.
    let path = format!("/nodes/dst21/tasks/{upid}/status");
    let mut status = json!({});
    for _ in 0..300 {
        status = dst.client().get(&path, &[]).await.unwrap();
        if status["status"] == json!("stopped") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status["status"], json!("stopped"), "{status}");
    let exit = status["exitstatus"].as_str().unwrap_or("");
    assert!(
        exit != "OK" && !exit.starts_with("WARNINGS") && !exit.is_empty(),
        "the tunnel task must fail: '{exit}'"
    );
    assert!(
        common::eventually(std::time::Duration::from_secs(10), || files_of(
            &dst.run, "121-"
        )
        .is_empty())
        .await,
        "left in the target's run dir: {:?}\n{:?}",
        files_of(&dst.run, "121-"),
        dst.task_log_file(&upid)
    );
    let list = mt_ok(&dst, &["replica", "list"]).await;
    assert!(list.contains(" interrupted "), "{list}");
    assert_eq!(record(&dst, 121)["failed_runs"], json!(1));
    drop(proxy);

    let cut = CutRun {
        copied: cut_copied,
        stderr: &cut_err,
    };
    next_run_continues(&src, &dst, 121, &img, cut).await;
    mt_ok(&src, &["vm", "stop", "121"]).await;
}
