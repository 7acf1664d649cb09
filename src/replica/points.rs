//! Restore points of a replica's working copies, by where the working copy lives:
//! - a qcow2 image (on `dir`): one internal snapshot per point (`qemu-img snapshot`); a run
//!   writes only the active layer, so a cut run never touches a point;
//! - a raw image in a btrfs subvolume (`btrfs` storage): one read-only snapshot of the
//!   subvolume per point, in `{storage}/replica-points/{vmid}/<subvolume>@<point>` (outside
//!   the image directory, so no volume listing ever takes a point for a volume);
//! - a raw image on `dir`: a reflink copy per point (`cp --reflink=always`) in
//!   `{storage}/replica-points/{vmid}/<file>@<point>` where the file system shares blocks
//!   (btrfs, XFS); elsewhere nothing — the image keeps only its latest state, and while a
//!   run writes into it the working copy IS the newest point (docs/replicas.md says so).
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
    /// The image, and the directory of its reflink copies.
    Raw {
        file: PathBuf,
        points: PathBuf,
    },
}

impl Copy {
    /// Whether point `name` exists apart from the working copy (always for qcow2 and
    /// btrfs; for a raw image where its reflink copy was made).
    pub fn has_point(&self, name: &str) -> bool {
        match self {
            Copy::Raw { file, points } => {
                Self::snapshot_path(file, points, name).is_ok_and(|p| p.exists())
            }
            _ => true,
        }
    }

    fn snapshot_path(subvol: &Path, points: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let base = subvol
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no name", subvol.display()))?;
        Ok(points.join(format!("{base}@{name}")))
    }

    /// Makes point `name`. Returns false when a raw image's file system cannot share
    /// blocks: then only the working copy holds the point (until the next run).
    pub async fn create(&self, name: &str) -> anyhow::Result<bool> {
        match self {
            Copy::Qcow2(file) => qemu_img_snapshot("-c", Some(name), file)
                .await
                .map(|_| true),
            Copy::Btrfs { subvol, points } => {
                crate::util::ensure_dir(points, 0o700)?;
                let snap = Self::snapshot_path(subvol, points, name)?;
                btrfs(&["subvolume", "snapshot", "-r"], &[subvol, &snap]).await?;
                Ok(true)
            }
            Copy::Raw { file, points } => {
                crate::util::ensure_dir(points, 0o700)?;
                let point = Self::snapshot_path(file, points, name)?;
                if let Err(e) = reflink(file, &point).await {
                    let _ = std::fs::remove_file(&point);
                    let _ = std::fs::remove_dir(points);
                    tracing::info!("no reflink point of {}: {e:#}", file.display());
                    return Ok(false);
                }
                Ok(true)
            }
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
            Copy::Raw { file, points } => {
                let point = Self::snapshot_path(file, points, name)?;
                match std::fs::remove_file(&point) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", point.display()));
                    }
                }
                let _ = std::fs::remove_dir(points);
                Ok(())
            }
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
            Copy::Raw { file, points } => {
                let point = Self::snapshot_path(file, points, name)?;
                if point.exists() {
                    reflink(&point, file).await?;
                }
                Ok(())
            }
        }
    }
}

/// `cp --reflink=always FROM TO`: a copy sharing every block (fails where the file
/// system cannot share them).
async fn reflink(from: &Path, to: &Path) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(from)
        .arg(to)
        .output()
        .await
        .context("running cp")?;
    if !out.status.success() {
        bail!(
            "cp --reflink=always {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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
