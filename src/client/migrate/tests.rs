//! Unit tests of the migration's pure parts: the `start` reply checks and the config rewrites.

use super::phase1::{drive_object, replace_prop, replace_volume};
use super::phase2::check_start_reply;
use super::phase3::fstrim_cloned_disks;
use super::*;
use serde_json::json;

fn reply(addr: &str, socks: &[&str], uri: &str) -> Value {
    json!({"success": true, "migrate": {"proto": "unix", "addr": addr, "uri": format!("unix:{addr}"), "unix_sockets": socks},
           "drives": {"scsi0": {"nbd_uri": uri}}})
}

#[test]
fn start_reply_safety_checks() {
    let ok = reply(
        "/run/qemu-server/567.migrate",
        &["/run/qemu-server/567_nbd.migrate"],
        "nbd:unix:/run/qemu-server/567_nbd.migrate:exportname=drive-scsi0",
    );
    assert!(check_start_reply(&ok, 567, 1).is_ok());
    for bad in [
        reply(
            "/run/qemu-server/568.migrate",
            &[],
            "nbd:unix:/run/qemu-server/567_nbd.migrate:exportname=drive-scsi0",
        ),
        reply(
            "/run/qemu-server/../567.migrate",
            &[],
            "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
        ),
        reply(
            "/run/qemu server/567.migrate",
            &[],
            "nbd:unix:/run/qemu server/567_nbd.migrate:x",
        ),
        reply(
            "/run/qemu-server/567.migrate",
            &["/etc/567_nbd.migrate"],
            "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
        ),
        reply(
            "/run/qemu-server/567.migrate",
            &["/run/qemu-server/../x.migrate"],
            "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
        ),
        reply(
            "/run/qemu-server/567.migrate",
            &[],
            "nbd:unix:/tmp/567_nbd.migrate:x",
        ),
    ] {
        assert!(check_start_reply(&bad, 567, 1).is_err(), "{bad}");
    }
    assert!(
        check_start_reply(&ok, 567, 2).is_err(),
        "drive count must match"
    );
}

#[test]
fn drive_rewrites() {
    assert_eq!(
        replace_volume(
            "local:100/vm-100-disk-0.qcow2,discard=on,size=1G",
            "fast:200/vm-200-disk-0.qcow2"
        )
        .unwrap(),
        "fast:200/vm-200-disk-0.qcow2,discard=on,size=1G"
    );
    assert_eq!(
        replace_prop(
            "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1",
            "bridge",
            "vmbr9"
        )
        .unwrap(),
        "virtio=BC:24:11:00:00:01,bridge=vmbr9,firewall=1"
    );
    // a quoted comma cannot be printed back as PVE reads it: refused, not mangled
    let e = replace_prop(r#"virtio=BC:24:11:00:00:01,tag="1,2""#, "bridge", "vmbr9");
    assert_eq!(
        e.unwrap_err().to_string(),
        "illegal value with commas for tag"
    );
    assert_eq!(
        drive_object(
            "scsi1",
            "local:100/vm-100-disk-1.raw,iothread=1,size=64M,format=raw",
            67108864
        )
        .unwrap(),
        json!({"interface": "scsi", "index": 1, "iothread": "1", "size": 67108864})
    );
    assert_eq!(min_limit(Some(100), None), Some(100));
    assert_eq!(min_limit(Some(100), Some(50)), Some(50));
    assert_eq!(min_limit(None, Some(0)), None);
    let mut conf = VmConfig::default();
    assert!(!fstrim_cloned_disks(&conf));
    conf.options
        .insert("agent".into(), "1,fstrim_cloned_disks=1".into());
    assert!(fstrim_cloned_disks(&conf));
    conf.options
        .insert("agent".into(), "enabled=1,fstrim_cloned_disks=0".into());
    assert!(!fstrim_cloned_disks(&conf));
}
