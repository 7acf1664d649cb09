//! The replica part of `mtunnel bench --wan LINK` (issue 20): a running OS-less VM on side
//! A whose raw disk of `--disk-mib` is full of incompressible bytes, replicated across the
//! link by `mtunnel replicate` to a TLS `mtunnel serve` on side B — one full run, then
//! [`written`] bytes written by the running QEMU (HMP `qemu-io`), then one incremental run.
//! The figures are what each run's summary line says: its seconds, bytes copied and bytes
//! sent through the tunnel; the full run's rate is judged against the line rate.
//! The VM is destroyed and the replica dropped afterwards; the data file goes once the
//! disk holds it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use super::migration::{mt, mt_in, number_after};
use super::nodes::{Placement, ServeNode};
use super::procs::QemuSweeper;
use super::wan_disk::{find_volume, random_file};

/// The source VM (the replica keeps its VMID on the target).
const VMID: u32 = 500;

/// One `mtunnel replicate` run as its summary line reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRun {
    /// `full`, `incremental` or `hash sync`.
    pub kind: String,
    /// The run's time from its summary line (`completed in S s`, 0.1 s resolution).
    pub run_s: f64,
    /// The whole `mtunnel replicate` command.
    pub command_s: f64,
    pub copied_bytes: u64,
    /// Bytes through the tunnel's NBD connections.
    pub sent_bytes: u64,
}

/// The full and the incremental run of one link.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaRuns {
    pub disk_bytes: u64,
    /// Bytes the guest's QEMU wrote between the runs.
    pub written_bytes: u64,
    pub full: ReplicaRun,
    pub incremental: ReplicaRun,
}

/// Bytes written between the runs: 8 MiB, at most a quarter of a small disk.
pub fn written(disk_mib: u64) -> u64 {
    (8 << 20).min((disk_mib << 20) / 4)
}

/// Replicates the VM's disk across the link twice, or says why it cannot.
pub async fn run(
    base: &Path,
    place: &Placement,
    disk_mib: u64,
    log: &dyn Fn(&str),
) -> anyhow::Result<ReplicaRuns> {
    super::migration::qemu_version().map_err(anyhow::Error::msg)?;
    let dir = base.join("replica");
    let tcg = super::accel_toml(mtunnel::qemu::Accel::Auto.resolve());
    let src_dir = dir.join("src");
    let (src_config, target) = place.source_and_target(&dir, tcg).await?;
    let mut sweeper = QemuSweeper::default();
    sweeper.watch(&src_dir.join("r"));
    let id = VMID.to_string();
    let result = replicate_twice(&src_config, &target, place, disk_mib, log).await;
    let _ = mt(&src_config, &["vm", "stop", &id]).await;
    let _ = mt(&src_config, &["vm", "destroy", &id, "--skiplock"]).await;
    let _ = mt(&target.config, &["replica", "drop", &id]).await;
    sweeper.sweep();
    result
}

/// Creates and starts the VM with its data, then the full run, the write, the
/// incremental run.
async fn replicate_twice(
    src_config: &Path,
    target: &ServeNode,
    place: &Placement,
    disk_mib: u64,
    log: &dyn Fn(&str),
) -> anyhow::Result<ReplicaRuns> {
    let id = VMID.to_string();
    let ns = place.client.as_deref();
    let disk = format!("local:{disk_mib}M");
    mt(
        src_config,
        &["vm", "create", &id, "--memory", "64", "--disk", &disk],
    )
    .await?;
    let volume = find_volume(src_config, VMID)?;
    random_file(&volume, disk_mib)?;
    mt_in(ns, src_config, &["vm", "start", &id]).await?;
    let endpoint = target.target_endpoint();
    let args = ["replicate", &id, &endpoint, "--target-storage", "local"];
    let full = replicate_once(ns, src_config, &args).await?;
    log(&format!("  replica full run: {}", describe(&full)));
    let written = written(disk_mib);
    let run_dir = src_config.parent().unwrap_or(Path::new(".")).join("r");
    write_in_guest(&run_dir, (disk_mib << 20) / 4, written).await?;
    let incremental = replicate_once(ns, src_config, &args).await?;
    log(&format!(
        "  replica incremental run after {} MiB written: {}",
        written >> 20,
        describe(&incremental)
    ));
    Ok(ReplicaRuns {
        disk_bytes: disk_mib << 20,
        written_bytes: written,
        full,
        incremental,
    })
}

fn describe(r: &ReplicaRun) -> String {
    format!(
        "{}, {:.1} s, {} bytes copied, {} bytes sent",
        r.kind, r.run_s, r.copied_bytes, r.sent_bytes
    )
}

/// One `mtunnel replicate` in side A, its summary line read.
async fn replicate_once(
    ns: Option<&super::wan::Netns>,
    config: &Path,
    args: &[&str],
) -> anyhow::Result<ReplicaRun> {
    let t0 = std::time::Instant::now();
    let (out, _) = mt_in(ns, config, args).await?;
    let command_s = t0.elapsed().as_secs_f64();
    parse_summary(&out, command_s)
}

/// The figures of `replicate`'s summary line (docs/replicas.md, "Use it").
fn parse_summary(out: &str, command_s: f64) -> anyhow::Result<ReplicaRun> {
    let field = |key: &str| {
        number_after(out, key).with_context(|| format!("no '{key}' in the replicate output: {out}"))
    };
    let kind = ["full", "incremental", "hash sync"]
        .into_iter()
        .find(|k| out.contains(&format!(": {k}")))
        .with_context(|| format!("no run kind in the replicate output: {out}"))?;
    Ok(ReplicaRun {
        kind: kind.into(),
        run_s: field("completed in ")?,
        command_s,
        copied_bytes: field("copied (")? as u64,
        sent_bytes: field("sent through the tunnel (")? as u64,
    })
}

/// Writes `len` bytes of 0x5a at `offset` through the running QEMU of [`VMID`] (HMP
/// `qemu-io`, as a guest's writes: they land in the replica's dirty bitmap).
async fn write_in_guest(run_dir: &Path, offset: u64, len: u64) -> anyhow::Result<()> {
    let socket = run_dir.join(format!("{VMID}.qmp"));
    let qmp = mtunnel::qemu::Qmp::connect(&socket, Duration::from_secs(10))
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let line = format!("qemu-io -d scsi0 \"write -P 0x5a {offset} {len}\"");
    let answer = qmp
        .execute(
            "human-monitor-command",
            json!({ "command-line": line }),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("QMP human-monitor-command '{line}'"))?;
    // HMP answers an error as text; success is silent.
    if answer != json!("") {
        bail!("'{line}' failed: {answer}");
    }
    Ok(())
}
