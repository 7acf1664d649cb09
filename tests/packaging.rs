//! The service unit and the Debian package metadata: `systemd-analyze verify` accepts the
//! unit without a single warning (with `ExecStart` pointed at the binary under test), and
//! `mtunnel serve` speaks systemd's notify protocol as `Type=notify` needs — READY=1 once
//! it listens, STOPPING=1 on SIGTERM — over a real `NOTIFY_SOCKET` datagram socket.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

const UNIT: &str = include_str!("../packaging/mtunnel.service");

#[test]
fn service_unit_verifies_without_warnings() {
    let dir = tempfile::Builder::new()
        .prefix("mtu")
        .tempdir_in("/tmp")
        .unwrap();
    assert!(UNIT.contains("ExecStart=/usr/bin/mtunnel serve"), "{UNIT}");
    let unit = UNIT.replace("/usr/bin/mtunnel", BIN);
    let path = dir.path().join("mtunnel.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze failed: {stderr}");
    assert!(
        !stderr.contains("mtunnel.service"),
        "systemd-analyze warns about the unit:\n{stderr}"
    );
    // What the unit promises to operators.
    for line in [
        "Type=notify",
        "KillMode=process",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "unit lacks {line}");
    }
}

#[test]
fn package_metadata_names_existing_files() {
    let manifest = include_str!("../Cargo.toml");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("Cargo.toml has [package.metadata.deb]");
    for needed in [
        "maintainer-scripts = \"packaging/\"",
        "unit-name = \"mtunnel\"",
        "\"etc/mtunnel/mtunnel.toml\"",
    ] {
        assert!(deb.contains(needed), "deb metadata lacks {needed}");
    }
    for file in [
        "packaging/mtunnel.service",
        "packaging/mtunnel.toml",
        "packaging/postinst",
        "packaging/postrm",
        "handlers/README.md",
        "README.md",
    ] {
        assert!(root.join(file).is_file(), "{file} is missing");
    }
    let config = std::fs::read_to_string(root.join("packaging/mtunnel.toml")).unwrap();
    let parsed: toml::Table = toml::from_str(&config).expect("default config is TOML");
    // Only the metrics listener is set (it is off when absent); the rest documents defaults.
    assert_eq!(
        parsed.into_iter().collect::<Vec<_>>(),
        [(
            "metrics_listen".to_string(),
            toml::Value::String("127.0.0.1:9710".into())
        )],
        "the default config sets only metrics_listen"
    );
}

/// The `[package.metadata.deb]` table of Cargo.toml.
fn deb_metadata() -> &'static str {
    include_str!("../Cargo.toml")
        .split("[package.metadata.deb]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("Cargo.toml has [package.metadata.deb]")
}

#[test]
fn package_ships_the_sysctl_snippet() {
    let asset = "[\"packaging/sysctl.conf\", \"usr/lib/sysctl.d/60-mtunnel.conf\", \"644\"]";
    assert!(deb_metadata().contains(asset), "deb assets lack {asset}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/sysctl.conf")).unwrap();
    let mut set = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("sysctl lines are KEY = VALUE");
        let (key, value) = (key.trim(), value.trim());
        // A key this kernel knows (sysctl.d ignores unknown ones silently).
        let proc = format!("/proc/sys/{}", key.replace('.', "/"));
        assert!(Path::new(&proc).exists(), "{key}: no {proc}");
        let max: u64 = value.split_whitespace().last().unwrap().parse().unwrap();
        assert!(max >= 32 << 20, "{key} = {value}: below 32 MiB");
        set.push(key.to_string());
    }
    assert_eq!(
        set,
        [
            "net.core.rmem_max",
            "net.core.wmem_max",
            "net.ipv4.tcp_rmem",
            "net.ipv4.tcp_wmem"
        ]
    );
    // fq and BBR are offered, commented out.
    for line in [
        "#net.core.default_qdisc = fq",
        "#net.ipv4.tcp_congestion_control = bbr",
    ] {
        assert!(text.lines().any(|l| l == line), "snippet lacks {line}");
    }
    let postinst = std::fs::read_to_string(root.join("packaging/postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysctl 60-mtunnel.conf"),
        "postinst does not apply the snippet"
    );
}

#[test]
fn serve_notifies_systemd_ready_and_stopping() {
    let dir = tempfile::Builder::new()
        .prefix("mtn")
        .tempdir_in("/tmp")
        .unwrap();
    let notify = dir.path().join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{d}/d\"\nrun_dir = \"{d}/r\"\nnode = \"n1\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = socket.recv(&mut buf).expect("STOPPING=1 within 30 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
