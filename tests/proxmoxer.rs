//! proxmoxer (the Python PVE client) against the real binary: runs
//! `tests/proxmoxer_test.py` with the Python from `MTUNNEL_TEST_PYTHON` (default
//! `.venv/bin/python` in the crate root). A Python without proxmoxer fails the test with
//! the command that sets the venv up.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{NODE, TestServer};

const SETUP: &str = "python3 -m venv .venv && .venv/bin/pip install proxmoxer requests";

fn python() -> PathBuf {
    match std::env::var_os("MTUNNEL_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    }
}

/// Runs `cmd` with a time bound; returns (exit success, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; set it up with: {SETUP}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            // Time is up: end the script (and only it) so the wait below returns.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    waiter.join().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn proxmoxer_drives_the_api() {
    let python = python();
    let mut probe = Command::new(&python);
    probe.args(["-c", "import proxmoxer, requests"]);
    let (ok, _, err) = run_bounded(probe, Duration::from_secs(30));
    assert!(
        ok,
        "{} cannot import proxmoxer/requests; create the venv in the crate root with: {SETUP}\n{}",
        python.display(),
        err.trim()
    );

    let server = TestServer::start();
    let secret = server.root_token.rsplit('=').next().unwrap().to_string();
    let mut cmd = Command::new(&python);
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/proxmoxer_test.py"))
        .args([&server.host, &server.port.to_string(), NODE, &secret]);
    let (ok, out, err) = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        ok,
        "proxmoxer_test.py failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert_eq!(out.trim_end().lines().last(), Some("OK"), "stdout:\n{out}");
}
