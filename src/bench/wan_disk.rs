//! The disk part of `mtunnel bench --wan LINK`: a VM with one raw disk full of
//! incompressible bytes (no zero blocks for NBD or `qemu-img` to skip) moved across the
//! link by `mtunnel migrate` from side A to a TLS `mtunnel serve` on side B,
//! - offline (VM stopped: `disk-import` of a `raw+size` stream through the tunnel) and
//! - online (`--online`: QEMU `drive-mirror` into the target's NBD export through the
//!   tunnel; a small idle RAM follows),
//!
//! alternating, each run a fresh VM. The figure is the disk phase `mtunnel migrate` reports
//! (`disk phase N ms`: imports, or mirrors until ready), judged against the line rate.
//! The data file is written once per link; every VM, source and target, is destroyed after
//! its run (their disks go with them).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::migration::{mt, mt_in, number_after};
use super::nodes::{Placement, ServeNode};
use super::procs::QemuSweeper;
use super::{median, slowest};

/// One move of the disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRun {
    /// `offline` or `online`.
    pub mode: String,
    pub disk_ms: f64,
    /// The whole `mtunnel migrate` command.
    pub total_s: f64,
}

/// Every move of one link, with medians and the slowest run of each mode.
#[derive(Debug, Clone, Serialize)]
pub struct DiskMoves {
    pub disk_bytes: u64,
    pub runs: Vec<DiskRun>,
}

impl DiskMoves {
    fn disk_ms(&self, mode: &str) -> impl Iterator<Item = f64> + Clone + '_ {
        let mode = mode.to_string();
        self.runs
            .iter()
            .filter(move |r| r.mode == mode)
            .map(|r| r.disk_ms)
    }

    /// Median disk-phase rate of `mode` in MB/s (10^6 bytes).
    pub fn median_mb_s(&self, mode: &str) -> f64 {
        self.disk_bytes as f64 / 1e3 / median(self.disk_ms(mode))
    }

    /// The slowest run's rate of `mode` in MB/s.
    pub fn slowest_mb_s(&self, mode: &str) -> f64 {
        self.disk_bytes as f64 / 1e3 / slowest(self.disk_ms(mode))
    }
}

/// What a disk run needs.
struct Setup {
    src_config: PathBuf,
    target: ServeNode,
    place: Placement,
    data: PathBuf,
    disk_mib: u64,
}

/// Writes `mib` MiB of xorshift bytes to `path`, 4 MiB at a time.
pub(super) fn random_file(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut chunk = vec![0u8; 4 << 20];
    for _ in 0..mib.div_ceil(4) {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    let f = f.into_inner().context("flushing the disk data")?;
    f.set_len(mib << 20)?;
    Ok(())
}

/// Moves the disk across the link `repeat` times each way, or says why it cannot.
pub async fn run(
    base: &Path,
    place: &Placement,
    disk_mib: u64,
    repeat: u32,
    log: &dyn Fn(&str),
) -> anyhow::Result<DiskMoves> {
    super::migration::qemu_version().map_err(anyhow::Error::msg)?;
    let dir = base.join("disk");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("disk.data");
    random_file(&data, disk_mib)?;
    let tcg = super::accel_toml(mtunnel::qemu::Accel::Auto.resolve());
    let src_dir = dir.join("src");
    let (src_config, target) = place.source_and_target(&dir, tcg).await?;
    let mut sweeper = QemuSweeper::default();
    sweeper.watch(&src_dir.join("r"));
    sweeper.watch(&target.run);
    let s = Setup {
        src_config,
        target,
        place: place.clone(),
        data,
        disk_mib,
    };
    let mut runs = Vec::new();
    for k in 0..repeat {
        for online in [false, true] {
            let vmid = 300 + 2 * k + u32::from(online);
            let r = move_once(&s, vmid, online).await?;
            log(&format!(
                "  round {}/{repeat} disk {:<7} {} MiB in {:.1} s ({:.1} MB/s), migrate {:.1} s",
                k + 1,
                r.mode,
                disk_mib,
                r.disk_ms / 1e3,
                (disk_mib << 20) as f64 / 1e3 / r.disk_ms,
                r.total_s
            ));
            runs.push(r);
        }
    }
    sweeper.sweep();
    Ok(DiskMoves {
        disk_bytes: disk_mib << 20,
        runs,
    })
}

/// A fresh VM with the data on its disk, migrated; both VMs destroyed afterwards.
async fn move_once(s: &Setup, vmid: u32, online: bool) -> anyhow::Result<DiskRun> {
    let id = vmid.to_string();
    let ns = s.place.client.as_deref();
    let disk = format!("local:{}M", s.disk_mib);
    mt(
        &s.src_config,
        &["vm", "create", &id, "--memory", "64", "--disk", &disk],
    )
    .await?;
    let volume = find_volume(&s.src_config, vmid)?;
    std::fs::copy(&s.data, &volume).with_context(|| format!("filling {}", volume.display()))?;
    if online {
        mt_in(ns, &s.src_config, &["vm", "start", &id]).await?;
    }
    let target = s.target.target_endpoint();
    let target_id = (vmid + 100).to_string();
    let mut args = vec![
        "migrate",
        &id,
        "--target",
        &target,
        "--target-storage",
        "local",
        "--target-vmid",
        &target_id,
    ];
    if online {
        args.push("--online");
    }
    let t0 = std::time::Instant::now();
    let result = mt_in(ns, &s.src_config, &args).await;
    let total_s = t0.elapsed().as_secs_f64();
    for (config, vm) in [(&s.target.config, &target_id), (&s.src_config, &id)] {
        let _ = mt(config, &["vm", "stop", vm]).await;
        let _ = mt(config, &["vm", "destroy", vm, "--skiplock"]).await;
    }
    let (out, _) = result?;
    let disk_ms = number_after(&out, "disk phase ")
        .with_context(|| format!("no 'disk phase' in the migrate output: {out}"))?;
    Ok(DiskRun {
        mode: if online { "online" } else { "offline" }.into(),
        disk_ms,
        total_s,
    })
}

/// The file of the VM's one disk in the source's `local` storage.
pub(super) fn find_volume(config: &Path, vmid: u32) -> anyhow::Result<PathBuf> {
    let dir = config
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("st/images/{vmid}"));
    std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "raw"))
        .with_context(|| format!("no raw disk of VM {vmid} in {}", dir.display()))
}
