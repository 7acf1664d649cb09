//! The target side of replicas (docs/replicas.md): a replica of a VM is a config locked
//! `replica`, its volumes (the working copies a run writes into) and restore points. This
//! module owns the replica's record (`{data}/replicas/{vmid}.json`: where it comes from,
//! its disks, its points, an unfinished run), the NBD servers that export the working
//! copies to a run (`qemu-nbd`, one per disk, `{run}/{vmid}-{key}.replica`), and the
//! points themselves (`points.rs`: internal qcow2 snapshots, read-only btrfs snapshots,
//! reflink copies of raw images where the file system shares blocks). It knows nothing of
//! tunnels: the `pve.replica` host functions, the journal and `mtunnel replica ...` call it
//! with the node's paths and storage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub mod hashes;
pub mod manage;
mod nbd;
pub mod nbd_client;
pub mod points;

pub use nbd::{nbd_socket, pid_path, run_alive, start_nbd, stop_one, stop_servers};

/// The lock every replica's config carries: `vm start` refuses it.
pub const LOCK: &str = "replica";

/// Where a replica comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub node: String,
    pub vmid: u32,
}

/// One replicated disk: its working copy on this node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disk {
    pub volid: String,
    pub format: String,
    /// Virtual size in bytes (the source's, exactly: a backup job needs equal sizes).
    pub size: u64,
}

/// A completed run's restore point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Point {
    pub name: String,
    /// Unix seconds when the run completed.
    pub time: u64,
    /// Bytes the run copied into the working copies (the block jobs' progress).
    #[serde(default)]
    pub bytes: u64,
    /// Whether the run sent only what changed since the previous point.
    #[serde(default)]
    pub incremental: bool,
    /// Payload bytes this node received through the run's NBD WebSockets (measured here).
    #[serde(default)]
    pub received: u64,
}

/// A run that started and has not completed (its working copies may be half written).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    pub upid: String,
    pub started: u64,
    /// Whether this run is counted in [`Replica::failed_runs`] (its tunnel was freed).
    #[serde(default)]
    pub counted: bool,
}

/// The record of one replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub vmid: u32,
    /// Random, made with the replica: names the source's dirty bitmap, so a bitmap of an
    /// older (dropped) replica of the same VM is never taken for this one's.
    pub id: String,
    pub source: Source,
    /// Drive key → working copy.
    pub disks: BTreeMap<String, Disk>,
    /// Oldest first.
    pub points: Vec<Point>,
    #[serde(default)]
    pub run: Option<Run>,
    /// Runs that began (`replica-export`, or a hash sync's first `replica-hashes`) and
    /// never completed: counted when their tunnel is freed ([`run_failed`]), or else when
    /// the next run begins.
    #[serde(default)]
    pub failed_runs: u64,
}

impl Replica {
    /// Whether the working copies hold exactly the newest point plus writes a source's
    /// bitmap still covers: the last run completed, so an incremental run may follow.
    pub fn incremental_ok(&self) -> bool {
        self.run.is_none() && !self.points.is_empty()
    }

    /// `idle` (points, no run), `running`/`interrupted` (a run started and did not
    /// complete), `empty` (no point yet): the status `replica list` shows.
    pub fn status(&self, run_alive: bool) -> &'static str {
        match (&self.run, self.points.is_empty()) {
            (Some(_), _) if run_alive => "running",
            (Some(_), _) => "interrupted",
            (None, true) => "empty",
            (None, false) => "idle",
        }
    }
}

/// The fields a replica adds to its `/cluster/resources` entry (which stays a valid PVE
/// `qemu` entry): `status` `replica` in place of `stopped`, `lock` as PVE lists a locked
/// guest's, and `replica-*` keys that PVE's clients ignore: the run state
/// ([`Replica::status`]), the source, the number of points and the newest one with its
/// unix time (absent without a point).
pub fn resource_fields(r: &Replica, run_alive: bool) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let mut m = serde_json::Map::new();
    m.insert("status".into(), json!("replica"));
    m.insert("lock".into(), json!(LOCK));
    m.insert("replica-state".into(), json!(r.status(run_alive)));
    let source = format!("{}/{}", r.source.node, r.source.vmid);
    m.insert("replica-source".into(), json!(source));
    m.insert("replica-points".into(), json!(r.points.len()));
    if let Some(p) = r.points.last() {
        m.insert("replica-newest".into(), json!(p.name));
        m.insert("replica-newest-time".into(), json!(p.time));
    }
    m
}

/// The [`resource_fields`] of each replica this node lists as one, by VMID: a record whose
/// VM config carries the [`LOCK`] (one without it is a promoted or half-made replica: the
/// config decides what the VM is). The node's own `/cluster/resources` and, in a cluster,
/// what it publishes for the other members both come from here, so they match.
pub fn listed(
    data_dir: &Path,
    run_dir: &Path,
    guests: &crate::guest::ConfigStore,
) -> BTreeMap<u32, serde_json::Map<String, serde_json::Value>> {
    let (replicas, bad) = list(data_dir);
    for e in bad {
        tracing::warn!("listing replicas for /cluster/resources: {e}");
    }
    replicas
        .iter()
        .filter(|r| locked_replica(guests, r.vmid))
        .map(|r| (r.vmid, resource_fields(r, run_alive(run_dir, r.vmid))))
        .collect()
}

/// Whether VM `vmid`'s config carries the [`LOCK`].
fn locked_replica(guests: &crate::guest::ConfigStore, vmid: u32) -> bool {
    let conf = guests.read_text(vmid).ok();
    let conf = conf.and_then(|t| crate::guest::VmConfig::parse(&t).ok());
    conf.is_some_and(|c| c.options.get("lock").map(String::as_str) == Some(LOCK))
}

/// The tunnel `upid` was freed: if it ran the replica's unfinished run, that run failed
/// and is counted (once) in `failed_runs`; the run stays recorded (`interrupted`).
pub fn run_failed(data_dir: &Path, vmid: u32, upid: &str) -> anyhow::Result<()> {
    let Some(mut r) = load(data_dir, vmid)? else {
        return Ok(());
    };
    match &mut r.run {
        Some(run) if run.upid == upid && !run.counted => run.counted = true,
        _ => return Ok(()),
    }
    r.failed_runs += 1;
    store(data_dir, &r)
}

/// `{data}/replicas`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("replicas")
}

fn record_path(data_dir: &Path, vmid: u32) -> PathBuf {
    dir(data_dir).join(format!("{vmid}.json"))
}

/// The replica of `vmid`, if this node holds one.
pub fn load(data_dir: &Path, vmid: u32) -> anyhow::Result<Option<Replica>> {
    let path = record_path(data_dir, vmid);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let r: Replica = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing the replica record {}", path.display()))?;
    if r.vmid != vmid {
        bail!("{} names VM {}, not {vmid}", path.display(), r.vmid);
    }
    Ok(Some(r))
}

/// Writes the record durably (atomic rename, fsync'd).
pub fn store(data_dir: &Path, r: &Replica) -> anyhow::Result<()> {
    crate::util::ensure_dir(&dir(data_dir), 0o700)?;
    let text = serde_json::to_vec_pretty(r)?;
    crate::util::write_atomic(&record_path(data_dir, r.vmid), &text, 0o600)
}

/// Removes the record (a missing one is fine).
pub fn remove(data_dir: &Path, vmid: u32) -> anyhow::Result<()> {
    match std::fs::remove_file(record_path(data_dir, vmid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("removing the replica record"),
    }
}

/// What the metrics show of each replica recorded under `data_dir` (a record that does not
/// read is logged and left out).
pub fn figures(data_dir: &Path) -> Vec<crate::metrics::ReplicaFigures> {
    let (replicas, bad) = list(data_dir);
    for e in bad {
        tracing::warn!("replica metrics: {e}");
    }
    replicas
        .iter()
        .map(|r| {
            let newest = r.points.last();
            crate::metrics::ReplicaFigures {
                vmid: r.vmid,
                points: r.points.len() as u64,
                newest_point_time: newest.map(|p| p.time),
                last_run_received: newest.map(|p| p.received),
                last_run_copied: newest.map(|p| p.bytes),
                failed_runs: r.failed_runs,
            }
        })
        .collect()
}

/// Every replica record of the node, by VMID; records that do not read are reported.
pub fn list(data_dir: &Path) -> (Vec<Replica>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else {
        return (out, bad);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(vmid) = name
            .strip_suffix(".json")
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        match load(data_dir, vmid) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {}
            Err(e) => bad.push(format!("{e:#}")),
        }
    }
    out.sort_by_key(|r| r.vmid);
    (out, bad)
}

/// A new point's name: `r<unix seconds>`, made unique against `points`.
pub fn point_name(points: &[Point], now: u64) -> String {
    let mut t = now;
    loop {
        let name = format!("r{t}");
        if !points.iter().any(|p| p.name == name) {
            return name;
        }
        t += 1;
    }
}

/// A random replica id (16 hex digits).
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(points: &[&str], run: bool) -> Replica {
        Replica {
            vmid: 100,
            id: "0123456789abcdef".into(),
            source: Source {
                node: "src1".into(),
                vmid: 100,
            },
            disks: BTreeMap::new(),
            points: points
                .iter()
                .map(|n| Point {
                    name: n.to_string(),
                    time: 1,
                    bytes: 0,
                    incremental: false,
                    received: 0,
                })
                .collect(),
            run: run.then(|| Run {
                upid: "UPID:x".into(),
                started: 1,
                counted: false,
            }),
            failed_runs: 0,
        }
    }

    #[test]
    fn an_incremental_run_needs_a_completed_last_run() {
        assert!(replica(&["r1"], false).incremental_ok());
        assert!(!replica(&["r1"], true).incremental_ok());
        assert!(!replica(&[], false).incremental_ok());
        assert_eq!(replica(&["r1"], false).status(false), "idle");
        assert_eq!(replica(&["r1"], true).status(true), "running");
        assert_eq!(replica(&["r1"], true).status(false), "interrupted");
        assert_eq!(replica(&[], false).status(false), "empty");
    }

    #[test]
    fn a_failed_run_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        run_failed(dir.path(), 100, "UPID:x").unwrap();
        store(dir.path(), &replica(&["r1"], true)).unwrap();
        run_failed(dir.path(), 100, "UPID:other").unwrap();
        assert_eq!(load(dir.path(), 100).unwrap().unwrap().failed_runs, 0);
        run_failed(dir.path(), 100, "UPID:x").unwrap();
        run_failed(dir.path(), 100, "UPID:x").unwrap();
        let r = load(dir.path(), 100).unwrap().unwrap();
        assert_eq!((r.failed_runs, r.status(false)), (1, "interrupted"));
    }

    #[test]
    fn point_names_are_unique() {
        let r = replica(&["r10", "r11"], false);
        assert_eq!(point_name(&r.points, 10), "r12");
        assert_eq!(point_name(&r.points, 9), "r9");
    }

    #[test]
    fn records_round_trip_and_name_their_vm() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), 100).unwrap(), None);
        let r = replica(&["r1"], true);
        store(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path(), 100).unwrap(), Some(r.clone()));
        assert_eq!(list(dir.path()).0, vec![r]);
        std::fs::copy(record_path(dir.path(), 100), record_path(dir.path(), 101)).unwrap();
        let err = load(dir.path(), 101).unwrap_err().to_string();
        assert!(err.ends_with("names VM 100, not 101"), "{err}");
        remove(dir.path(), 100).unwrap();
        remove(dir.path(), 100).unwrap();
        assert_eq!(load(dir.path(), 100).unwrap(), None);
    }

    #[test]
    fn figures_come_from_the_records_newest_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = replica(&["r10", "r20"], true);
        r.points[1].time = 20;
        r.points[1].bytes = 8 << 20;
        r.points[1].received = 8389037;
        r.failed_runs = 3;
        store(dir.path(), &r).unwrap();
        std::fs::write(dir.path().join("replicas/101.json"), "{").unwrap();
        assert_eq!(
            figures(dir.path()),
            [crate::metrics::ReplicaFigures {
                vmid: 100,
                points: 2,
                newest_point_time: Some(20),
                last_run_received: Some(8389037),
                last_run_copied: Some(8 << 20),
                failed_runs: 3,
            }]
        );
    }
}
