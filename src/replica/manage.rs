//! What happens to a replica as a whole: a run begins (its NBD servers start) and
//! completes (servers stopped, a point made, the oldest pruned); `promote` turns a point
//! into a normal VM; a migration cuts over to it (`begin_cutover`, `take_over`); `drop`
//! frees everything. Callers hold the VM's config lock (a tunnel
//! handler runs under it; the CLI takes it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::nbd_client::NbdClient;
use super::points::Copy;
use super::{Disk, Point, Replica, Run, nbd};
use crate::config::NodeConfig;
use crate::guest::config::VmConfig;
use crate::guest::{ConfigStore, VmLockGuard};
use crate::storage::Storage;

/// The node's parts a replica needs.
pub struct Parts<'a> {
    pub cfg: &'a NodeConfig,
    pub guests: &'a ConfigStore,
    pub storage: &'a dyn Storage,
}

/// How long one NBD request of `replica-hashes` may take.
const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// A range of a disk, in blocks of `block` bytes (`replica-hashes`).
#[derive(Debug, Clone, Copy)]
pub struct HashRange {
    pub offset: u64,
    pub length: u64,
    pub block: u64,
}

/// One exported working copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Export {
    pub socket: PathBuf,
    pub export: String,
    pub size: u64,
}

/// What `promote` did.
pub struct Promoted {
    /// The point the VM now runs from.
    pub point: String,
    /// Points that could not be deleted after the promote (`<volid> point '<name>': <error>`).
    pub leftovers: Vec<String>,
}

/// What a run moved: the source's count of bytes its jobs copied, and what this node
/// received through the run's NBD WebSockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunBytes {
    pub copied: u64,
    pub received: u64,
}

/// What a completed run made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Completed {
    pub point: String,
    pub pruned: Vec<String>,
    pub points: Vec<String>,
}

impl Parts<'_> {
    fn file(&self, volid: &str) -> anyhow::Result<PathBuf> {
        self.storage
            .path(volid)
            .with_context(|| format!("resolving the working copy '{volid}'"))
    }

    /// Where disk `d`'s working copy keeps its points.
    fn copy(&self, vmid: u32, d: &Disk) -> anyhow::Result<Copy> {
        let file = self.file(&d.volid)?;
        let storage = d.volid.split_once(':').map_or("", |(s, _)| s);
        let def = self
            .storage
            .def(storage)
            .with_context(|| format!("storage '{storage}' does not exist"))?;
        let points = def.path.join("replica-points").join(vmid.to_string());
        Ok(match def.kind {
            crate::storage::StorageKind::Btrfs => Copy::Btrfs {
                subvol: file
                    .parent()
                    .with_context(|| format!("'{}' is in no subvolume", d.volid))?
                    .to_path_buf(),
                points,
            },
            _ if d.format == "qcow2" => Copy::Qcow2(file),
            _ => Copy::Raw { file, points },
        })
    }

    fn load(&self, vmid: u32) -> anyhow::Result<Replica> {
        super::load(&self.cfg.data_dir, vmid)?
            .with_context(|| format!("VM {vmid} is no replica on node '{}'", self.cfg.node))
    }

    /// Records run `upid` of `r` as begun (once; a run of another task that never
    /// completed is counted as failed). From here the replica is `interrupted` until the
    /// run completes: its next run cannot be incremental.
    fn record_run(&self, r: &mut Replica, upid: &str) -> anyhow::Result<()> {
        match &r.run {
            Some(run) if run.upid == upid => return Ok(()),
            // The previous run began and never completed (one tunnel per VM at a time)
            // and its tunnel's cleanup did not count it.
            Some(run) if !run.counted => r.failed_runs += 1,
            _ => {}
        }
        r.run = Some(Run {
            upid: upid.to_string(),
            started: crate::util::unix_now(),
            counted: false,
        });
        super::store(&self.cfg.data_dir, r)
    }

    /// Starts a run of task `upid`: recorded as unfinished first (a crash from here on
    /// leaves an "interrupted" replica whose next run is a hash sync), then one NBD
    /// server per disk. On failure the servers started are stopped again.
    pub async fn begin_run(
        &self,
        vmid: u32,
        upid: &str,
    ) -> anyhow::Result<BTreeMap<String, Export>> {
        let mut r = self.load(vmid)?;
        self.record_run(&mut r, upid)?;
        let mut out = BTreeMap::new();
        for (key, disk) in &r.disks {
            let file = self.file(&disk.volid)?;
            let started = nbd::start_nbd(
                &self.cfg.run_dir,
                vmid,
                key,
                (&file, &disk.format),
                nbd::Access::Write,
            )
            .await;
            match started {
                Ok(socket) => {
                    let export = Export {
                        socket,
                        export: format!("drive-{key}"),
                        size: disk.size,
                    };
                    out.insert(key.clone(), export);
                }
                Err(e) => {
                    nbd::stop_servers(&self.cfg.run_dir, vmid).await;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// The block hashes of `range` of disk `key`'s working copy (`replica-hashes`), read
    /// through a read-only `qemu-nbd` on the disk's run socket (so the cleanup of a run
    /// finds it too), which is gone again afterwards. Refused while a run exports the
    /// working copies: what they hold then changes under the reader. The first hashes
    /// of task `upid` record its run as begun: a hash sync asks them before the source
    /// adds its fresh bitmap, and that bitmap misses every write before it, so a run
    /// that dies before its point must not leave the replica looking current.
    pub async fn hashes(
        &self,
        (vmid, upid): (u32, &str),
        key: &str,
        range: HashRange,
    ) -> anyhow::Result<Vec<String>> {
        let mut r = self.load(vmid)?;
        let disk = r.disks.get(key).cloned().with_context(|| {
            let keys: Vec<&str> = r.disks.keys().map(String::as_str).collect();
            format!(
                "replica {vmid} has no disk '{key}' (disks: {})",
                keys.join(", ")
            )
        })?;
        let HashRange {
            offset,
            length,
            block,
        } = range;
        super::hashes::check_range(disk.size, offset, length, block)
            .with_context(|| format!("{key}: bad range"))?;
        if nbd::run_alive(&self.cfg.run_dir, vmid) {
            bail!(
                "a replica run of VM {vmid} exports its working copies (or reads them): hashes \
                 are read only before 'replica-export' and while no other read runs"
            );
        }
        self.record_run(&mut r, upid)?;
        let file = self.file(&disk.volid)?;
        let image = (file.as_path(), disk.format.as_str());
        let socket = nbd::start_nbd(&self.cfg.run_dir, vmid, key, image, nbd::Access::Read)
            .await
            .with_context(|| format!("exporting {} read-only", disk.volid))?;
        let hashed = async {
            let export = format!("drive-{key}");
            let mut c = NbdClient::connect(&socket, &export, NBD_TIMEOUT).await?;
            let h = super::hashes::of_range(&mut c, offset, length, block).await?;
            c.disconnect().await?;
            anyhow::Ok(h)
        }
        .await;
        nbd::wait_exit(&socket, Duration::from_secs(10)).await;
        hashed.with_context(|| format!("reading {} for its block hashes", disk.volid))
    }

    /// Waits (at most 10 s each) for the run's NBD servers to end: the source
    /// disconnected, so every byte it sent has been relayed.
    pub async fn wait_servers(&self, vmid: u32) -> anyhow::Result<()> {
        let r = self.load(vmid)?;
        // A server that is still up had no client that finished (the source never
        // connected, or is still writing): what it holds is no point.
        let mut unfinished = Vec::new();
        for key in r.disks.keys() {
            let socket = nbd::nbd_socket(&self.cfg.run_dir, vmid, key);
            if !nbd::wait_exit(&socket, Duration::from_secs(10)).await {
                unfinished.push(key.as_str());
            }
        }
        if !unfinished.is_empty() {
            bail!(
                "replica run of VM {vmid}: no client finished writing {} (the source never connected, or had not disconnected within 10 s): no restore point was made and the run stays interrupted",
                unfinished.join(", ")
            );
        }
        Ok(())
    }

    /// Completes the running run: waits for the NBD servers to end (the source
    /// disconnected), makes point `name`-d after now on every disk, prunes the oldest to
    /// `keep`, and records it all.
    pub async fn complete_run(
        &self,
        vmid: u32,
        keep: Option<usize>,
        bytes: RunBytes,
        incremental: bool,
    ) -> anyhow::Result<Completed> {
        let mut r = self.load(vmid)?;
        if r.run.is_none() {
            bail!("no replica run of VM {vmid} is under way (send 'replica-export' first)");
        }
        self.wait_servers(vmid).await?;
        let name = super::point_name(&r.points, crate::util::unix_now());
        for disk in r.disks.values() {
            if !self.copy(vmid, disk)?.create(&name).await? {
                tracing::info!(
                    vmid,
                    "{}: no reflink on its file system: point '{name}' is the working copy only",
                    disk.volid
                );
            }
        }
        r.points.push(Point {
            name: name.clone(),
            time: crate::util::unix_now(),
            bytes: bytes.copied,
            incremental,
            received: bytes.received,
        });
        r.run = None;
        // The new point is on record before any old one goes: a failure while pruning
        // leaves extra points, never a record that names a deleted one.
        super::store(&self.cfg.data_dir, &r)?;
        let pruned = self.prune(&mut r, keep).await?;
        Ok(Completed {
            point: name,
            pruned,
            points: r.points.iter().map(|p| p.name.clone()).collect(),
        })
    }

    /// Drops the oldest points beyond `keep` (at least the newest stays). A raw working
    /// copy holds only its newest state: older points of it are names only.
    async fn prune(&self, r: &mut Replica, keep: Option<usize>) -> anyhow::Result<Vec<String>> {
        let keep = keep.unwrap_or(usize::MAX).max(1);
        let mut pruned = Vec::new();
        while r.points.len() > keep {
            // Off the record first: a point the record names is always whole on every disk.
            let old = r.points.remove(0);
            super::store(&self.cfg.data_dir, r)?;
            for disk in r.disks.values() {
                self.copy(r.vmid, disk)?.delete(&old.name).await?;
            }
            pruned.push(old.name);
        }
        Ok(pruned)
    }

    /// Turns point `point` (default: the newest) into a normal VM: the working copies are
    /// set to it, the config loses its lock, the record goes, then every point is deleted
    /// (one that cannot be is named in [`Promoted::leftovers`]).
    pub async fn promote(
        &self,
        guard: &VmLockGuard,
        point: Option<&str>,
    ) -> anyhow::Result<Promoted> {
        let vmid = guard.vmid;
        let r = self.load(vmid)?;
        let conf = self.locked_conf(vmid)?;
        let newest = r.points.last().with_context(|| {
            format!("replica {vmid} has no restore point yet: nothing to promote")
        })?;
        let name = point.unwrap_or(&newest.name).to_string();
        if !r.points.iter().any(|p| p.name == name) {
            let names: Vec<&str> = r.points.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "replica {vmid} has no point '{name}' (points: {})",
                names.join(", ")
            );
        }
        if nbd::run_alive(&self.cfg.run_dir, vmid) {
            bail!("a replica run of VM {vmid} is under way: promote once it ended");
        }
        let copies = r
            .disks
            .values()
            .map(|d| Ok((d, self.copy(vmid, d)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (disk, copy) in &copies {
            if copy.has_point(&name) {
                continue;
            }
            if name != newest.name {
                bail!(
                    "{}: a raw working copy without reflink points keeps only its newest \
                     point ({}), not '{name}'",
                    disk.volid,
                    newest.name
                );
            }
            if r.run.is_some() {
                bail!(
                    "replica {vmid} has an interrupted run and {} keeps no copy of point \
                     '{name}': run 'mtunnel replicate' again from the source, or drop it",
                    disk.volid
                );
            }
        }
        // Every disk is set to the point before any point goes: a failure part-way leaves
        // the replica as it was (locked, every point kept), so promote can run again.
        for (_, copy) in &copies {
            copy.apply(&name).await?;
        }
        let mut conf = conf;
        conf.options.remove("lock");
        self.guests.write_text_locked(guard, &conf.write())?;
        super::remove(&self.cfg.data_dir, vmid)?;
        // The VM is promoted now; a point that cannot be deleted is a leftover to name.
        let mut leftovers = Vec::new();
        for (disk, copy) in &copies {
            for old in &r.points {
                if let Err(e) = copy.delete(&old.name).await {
                    leftovers.push(format!("{} point '{}': {e:#}", disk.volid, old.name));
                }
            }
        }
        Ok(Promoted {
            point: name,
            leftovers,
        })
    }

    /// A migration of the replica's source VM takes the replica over (docs/replicas.md,
    /// "Cut over"): refused unless its last run completed (a point, no unfinished run).
    /// The migration is recorded as the replica's run of task `upid`: one that fails
    /// leaves the replica `interrupted` (its points intact; the next run is a hash sync).
    pub fn begin_cutover(&self, vmid: u32, upid: &str) -> anyhow::Result<Replica> {
        let mut r = self.load(vmid)?;
        if !r.incremental_ok() {
            bail!(
                "the replica of VM {vmid} is not current (status '{}'): run 'mtunnel replicate' \
                 to it first, or migrate with --no-replica after 'mtunnel replica drop {vmid}'",
                r.status(nbd::run_alive(&self.cfg.run_dir, vmid))
            );
        }
        r.run = Some(Run {
            upid: upid.to_string(),
            started: crate::util::unix_now(),
            // Not a run of `mtunnel replicate`: a failed migration is no failed run.
            counted: true,
        });
        super::store(&self.cfg.data_dir, &r)?;
        Ok(r)
    }

    /// The migration that cut over to the replica committed: the working copies are the
    /// VM's volumes now. The record goes, then every point (a qcow2 image's internal
    /// snapshots through the running QEMU when it runs). Returns what could not be
    /// deleted (`<volid> point '<name>': <error>`).
    pub async fn take_over(&self, vmid: u32) -> anyhow::Result<Vec<String>> {
        let r = self.load(vmid)?;
        super::remove(&self.cfg.data_dir, vmid)?;
        let vm = crate::qemu::VmHandle::attach(&self.cfg.run_dir, vmid).ok();
        let mut leftovers = Vec::new();
        for (key, disk) in &r.disks {
            let copy = self.copy(vmid, disk)?;
            for p in &r.points {
                let deleted = match (&copy, &vm) {
                    // qemu-img must not write an image a running QEMU has open.
                    (Copy::Qcow2(_), Some(vm)) => delete_internal(vm, key, &p.name).await,
                    _ => copy.delete(&p.name).await,
                };
                if let Err(e) = deleted {
                    leftovers.push(format!("{} point '{}': {e:#}", disk.volid, p.name));
                }
            }
        }
        Ok(leftovers)
    }

    /// Frees the replica: NBD servers, working copies (with their points), config, record.
    pub async fn drop_replica(&self, guard: &VmLockGuard) -> anyhow::Result<Vec<String>> {
        let vmid = guard.vmid;
        let r = self.load(vmid)?;
        self.locked_conf(vmid)?;
        let mut lines = nbd::stop_servers(&self.cfg.run_dir, vmid).await;
        for disk in r.disks.values() {
            // Points kept apart from the volume (btrfs snapshots, reflink copies) go first.
            let copy = self.copy(vmid, disk)?;
            if !matches!(copy, Copy::Qcow2(_)) {
                for p in &r.points {
                    copy.delete(&p.name).await?;
                }
            }
            match self.storage.free(&disk.volid).await {
                Ok(()) => lines.push(format!("freed volume '{}'", disk.volid)),
                Err(crate::storage::StorageError::NotFound { .. }) => {}
                Err(e) => return Err(e).with_context(|| format!("freeing '{}'", disk.volid)),
            }
        }
        self.guests.remove_locked(guard)?;
        lines.push(format!("removed config of VM {vmid}"));
        super::remove(&self.cfg.data_dir, vmid)?;
        Ok(lines)
    }

    /// The config of replica `vmid`, which must carry the `replica` lock.
    fn locked_conf(&self, vmid: u32) -> anyhow::Result<VmConfig> {
        let conf = VmConfig::parse(&self.guests.read_text(vmid)?)?;
        match conf.options.get("lock").map(String::as_str) {
            Some(super::LOCK) => Ok(conf),
            other => bail!(
                "VM {vmid} is not locked 'replica' (lock: {}) - refusing to touch it",
                other.unwrap_or("none")
            ),
        }
    }
}

/// Deletes internal snapshot `name` of drive `key` of the running `vm` (QMP
/// `blockdev-snapshot-delete-internal-sync` on its node `drive-<key>`).
async fn delete_internal(vm: &crate::qemu::VmHandle, key: &str, name: &str) -> anyhow::Result<()> {
    let args = serde_json::json!({"device": format!("drive-{key}"), "name": name});
    vm.execute(
        "blockdev-snapshot-delete-internal-sync",
        args,
        Duration::from_secs(120),
    )
    .await
    .with_context(|| format!("deleting internal snapshot '{name}' of drive-{key} (QMP)"))?;
    Ok(())
}
