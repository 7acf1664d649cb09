//! Restore points of a replica's working copies. A qcow2 working copy keeps one internal
//! snapshot per point (`qemu-img snapshot`): a run writes only the active layer, so a cut
//! run never touches a point. A raw working copy has no snapshots: it keeps only its
//! latest state, and while a run writes into it the working copy IS the newest point
//! (docs/replicas.md says so). Every call here needs the image closed (no NBD server).

use std::path::Path;

use anyhow::{Context, bail};

/// What a working copy of `format` keeps per point.
pub fn keeps_points(format: &str) -> bool {
    format == "qcow2"
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

/// Makes point `name` of the working copy `file` (nothing for a raw one).
pub async fn create(format: &str, file: &Path, name: &str) -> anyhow::Result<()> {
    if keeps_points(format) {
        qemu_img_snapshot("-c", Some(name), file).await?;
    }
    Ok(())
}

/// Deletes point `name` (nothing for a raw one).
pub async fn delete(format: &str, file: &Path, name: &str) -> anyhow::Result<()> {
    if keeps_points(format) {
        qemu_img_snapshot("-d", Some(name), file).await?;
    }
    Ok(())
}

/// Makes the working copy the state of point `name` (a raw one holds only its latest point,
/// which must be the one asked for: the caller checks).
pub async fn apply(format: &str, file: &Path, name: &str) -> anyhow::Result<()> {
    if keeps_points(format) {
        qemu_img_snapshot("-a", Some(name), file).await?;
    }
    Ok(())
}

/// The internal snapshot names of a qcow2 working copy (empty for raw).
pub async fn names(format: &str, file: &Path) -> anyhow::Result<Vec<String>> {
    if !keeps_points(format) {
        return Ok(Vec::new());
    }
    let text = qemu_img_snapshot("-l", None, file).await?;
    // "ID  TAG  VM_SIZE  DATE  VM_CLOCK  ICOUNT" lines after two header lines.
    Ok(text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect())
}
