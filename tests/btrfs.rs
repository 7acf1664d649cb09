//! Migrations from a `dir` storage into a `btrfs` storage (issue 11, item 4) between two
//! real `mtunnel serve` nodes, with real QEMU (TCG) and a real btrfs: a loop-mounted image
//! made with `mkfs.btrfs` ([`common::LoopBtrfs`]) is the target's storage `bt`.
//!
//! A VM with a qcow2 disk moves offline (`disk-import`: the `qcow2+size` stream is
//! converted to raw) and online (`disk` + NBD: the disk is allocated raw); the guest-visible
//! bytes of source and target are compared with `qemu-img compare`. A migration cut during
//! the import leaves no subvolume behind. Needs root, QEMU and btrfs-progs
//! (`scripts/test-all.sh` installs both).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{LoopBtrfs, Options, TestServer, assert_same_guest_bytes, mt_ok, qemu_io, target_arg};

/// A node with QEMU on TCG, plus the btrfs storage `bt` on `fs` when given.
fn node(name: &str, fs: Option<&LoopBtrfs>) -> TestServer {
    let mut extra_toml = "qemu_accel = \"tcg\"\n".to_string();
    if let Some(fs) = fs {
        extra_toml.push_str(&fs.storage_toml("bt"));
    }
    TestServer::start_with(Options {
        node: Some(name.into()),
        extra_toml,
        ..Options::default()
    })
}

/// A disk of `vmid` on the node's `local` dir storage.
fn local_image(node: &TestServer, vmid: u32, name: &str) -> PathBuf {
    node.base()
        .join(format!("s/local/images/{vmid}"))
        .join(name)
}

/// The file of btrfs volume `vm-{vmid}-disk-{n}` (PVE's layout).
fn btrfs_image(fs: &LoopBtrfs, vmid: u32, n: u32) -> PathBuf {
    fs.mnt
        .join(format!("images/{vmid}/vm-{vmid}-disk-{n}/disk.raw"))
}

/// Creates VM `vmid` with one qcow2 disk of `size_mib` on `local`, `data_mib` of it
/// written with a pattern; returns the disk's path.
async fn qcow2_vm(src: &TestServer, vmid: u32, size_mib: u32, data_mib: u32) -> PathBuf {
    let disk = format!("local:{size_mib}M:qcow2");
    let vmid_s = vmid.to_string();
    mt_ok(
        src,
        &[
            "vm", "create", &vmid_s, "--memory", "128", "--bridge", "vmbr0", "--disk", &disk,
        ],
    )
    .await;
    let path = local_image(src, vmid, &format!("vm-{vmid}-disk-0.qcow2"));
    qemu_io("qcow2", &format!("write -P 0x5c 1M {data_mib}M"), &path);
    path
}

fn migrate_args<'a>(vmid: &'a str, target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "migrate",
        vmid,
        "--target",
        target,
        "--target-storage",
        "bt",
    ];
    args.extend_from_slice(extra);
    args
}

async fn wait_exit(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_qcow2_lands_as_raw_on_btrfs() {
    let fs = LoopBtrfs::new();
    let src = node("src1", None);
    let dst = node("dst1", Some(&fs));
    let qcow2 = qcow2_vm(&src, 110, 32, 8).await;
    // An explicit `format=qcow2` must follow the volume to raw.
    let conf = std::fs::read_to_string(src.vm_config(110)).unwrap();
    let conf = conf.replace(".qcow2,", ".qcow2,format=qcow2,");
    std::fs::write(src.vm_config(110), conf).unwrap();
    let target = target_arg(&dst, dst.port);
    mt_ok(&src, &migrate_args("110", &target, &[])).await;

    let conf = std::fs::read_to_string(dst.vm_config(110)).unwrap();
    assert!(
        conf.contains("bt:110/vm-110-disk-0.raw,format=raw,iothread=1,size=32M"),
        "{conf}"
    );
    let raw = btrfs_image(&fs, 110, 0);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 32 << 20);
    assert_same_guest_bytes(&qcow2, "qcow2", &raw, "raw");
    // Only disk.raw is left in the subvolume: the received qcow2 was removed.
    let left: Vec<_> = std::fs::read_dir(raw.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["disk.raw"]);
    assert_eq!(fs.subvolumes(), vec!["images/110/vm-110-disk-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_qcow2_lands_as_raw_on_btrfs() {
    let fs = LoopBtrfs::new();
    let src = node("src1", None);
    let dst = node("dst1", Some(&fs));
    let qcow2 = qcow2_vm(&src, 111, 32, 8).await;
    mt_ok(&src, &["vm", "start", "111"]).await;
    let src_pid = mtunnel::qemu::is_running(&src.run, 111).expect("source VM runs");
    let target = target_arg(&dst, dst.port);
    mt_ok(&src, &migrate_args("111", &target, &["--online"])).await;

    assert!(
        mtunnel::qemu::is_running(&dst.run, 111).is_some(),
        "target VM runs"
    );
    let conf = std::fs::read_to_string(dst.vm_config(111)).unwrap();
    assert!(
        conf.contains("bt:111/vm-111-disk-0.raw,format=raw"),
        "{conf}"
    );
    // The source stopped after the hand-over: nothing writes its disk any more.
    wait_exit(src_pid).await;
    assert_same_guest_bytes(&qcow2, "qcow2", &btrfs_image(&fs, 111, 0), "raw");
    mt_ok(&dst, &["vm", "stop", "111"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_during_import_leaves_no_subvolume() {
    let fs = LoopBtrfs::new();
    let src = node("src1", None);
    let dst = node("dst1", Some(&fs));
    qcow2_vm(&src, 112, 64, 40).await;
    let target = target_arg(&dst, dst.port);
    // 8 MiB/s: the ~40 MiB qcow2 takes ~5 s; the source dies in the middle.
    let args = migrate_args("112", &target, &["--bwlimit", "8192"]);
    let mut cmd = tokio::process::Command::new(common::BIN);
    cmd.args(&args)
        .arg("--config")
        .arg(&src.config)
        .env("MTUNNEL_LOG", "warn")
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("running mtunnel migrate");
    let subvol = fs.mnt.join("images/112/vm-112-disk-0");
    let appeared = common::eventually(Duration::from_secs(60), || subvol.exists()).await;
    assert!(appeared, "the import never created its subvolume");
    // The import is under way once 4 MiB of the stream landed in the subvolume.
    let landed = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(&subvol).map_or(0, |rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum::<u64>()
        })
    };
    let under_way = common::eventually(Duration::from_secs(60), || landed() >= 4 << 20).await;
    assert!(under_way, "the import moved {} bytes", landed());
    assert!(
        landed() < 32 << 20,
        "the import (~40 MiB) is about done: {} bytes",
        landed()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "migrate ended before the cut"
    );
    child.kill().await.expect("killing mtunnel migrate");

    let gone = common::eventually(Duration::from_secs(30), || {
        fs.subvolumes().is_empty() && !dst.vm_config(112).exists()
    })
    .await;
    assert!(
        gone,
        "left behind: subvolumes {:?}, config {}\n{}",
        fs.subvolumes(),
        dst.vm_config(112).exists(),
        dst.log()
    );
}
