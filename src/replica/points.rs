//! Restore points of a replica's working copies, by where the working copy lives:
//! - a qcow2 image (on `dir`): one internal snapshot per point (`qemu-img snapshot`); a run
//!   writes only the active layer, so a cut run never touches a point;
//! - a raw image in a btrfs subvolume (`btrfs` storage): one read-only snapshot of the
//!   subvolume per point, in `{storage}/replica-points/{vmid}/<subvolume>@<point>` (outside
//!   the image directory, so no volume listing ever takes a point for a volume);
//! - a raw image on `dir`: nothing — it keeps only its latest state, and while a run
//!   writes into it the working copy IS the newest point (docs/replicas.md says so).
//!
//! Every call here needs the image closed (no NBD server).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A working copy as far as its points are concerned.
#[derive(Debug, Clone)]
pub enum Copy {
    Qcow2(PathBuf),
    /// The subvolume holding `disk.raw`, and the directory of its point snapshots.
    Btrfs {
        subvol: PathBuf,
        points: PathBuf,
    },
    Raw(PathBuf),
}

impl Copy {
    /// Whether the working copy keeps points of its own (not only its newest state).
    pub fn keeps_points(&self) -> bool {
        !matches!(self, Copy::Raw(_))
    }

    fn snapshot_path(subvol: &Path, points: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let base = subvol
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("subvolume {} has no name", subvol.display()))?;
        Ok(points.join(format!("{base}@{name}")))
    }

    /// Makes point `name`.
    pub async fn create(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Copy::Qcow2(file) => qemu_img_snapshot("-c", Some(name), file).await.map(drop),
            Copy::Btrfs { subvol, points } => {
                crate::util::ensure_dir(points, 0o700)?;
                let snap = Self::snapshot_path(subvol, points, name)?;
                btrfs(&["subvolume", "snapshot", "-r"], &[subvol, &snap]).await
            }
            Copy::Raw(_) => Ok(()),
        }
    }

    /// Deletes point `name` (a missing btrfs snapshot is fine).
    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Copy::Qcow2(file) => qemu_img_snapshot("-d", Some(name), file).await.map(drop),
            Copy::Btrfs { subvol, points } => {
                let snap = Self::snapshot_path(subvol, points, name)?;
                if snap.exists() {
                    btrfs(&["subvolume", "delete"], &[&snap]).await?;
                }
                // The per-VM directory goes with its last point.
                let _ = std::fs::remove_dir(points);
                Ok(())
            }
            Copy::Raw(_) => Ok(()),
        }
    }

    /// Makes the working copy the state of point `name` (a raw one holds only its newest
    /// point, which must be the one asked for: the caller checks).
    pub async fn apply(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Copy::Qcow2(file) => qemu_img_snapshot("-a", Some(name), file).await.map(drop),
            Copy::Btrfs { subvol, points } => {
                let snap = Self::snapshot_path(subvol, points, name)?;
                if !snap.exists() {
                    bail!("point snapshot {} is missing", snap.display());
                }
                btrfs(&["subvolume", "delete"], &[subvol]).await?;
                btrfs(&["subvolume", "snapshot"], &[&snap, subvol]).await
            }
            Copy::Raw(_) => Ok(()),
        }
    }
}

async fn btrfs(args: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("btrfs")
        .args(args)
        .args(paths)
        .output()
        .await
        .context("running btrfs (install btrfs-progs)")?;
    if !out.status.success() {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "btrfs {} {}: {}",
            args.join(" "),
            shown.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn qemu_img_snapshot(flag: &str, name: Option<&str>, file: &Path) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.arg("snapshot").arg(flag);
    if let Some(name) = name {
        cmd.arg(name);
    }
    let out = cmd
        .arg(file)
        .output()
        .await
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img snapshot {flag} {} {}: {}",
            name.unwrap_or(""),
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
