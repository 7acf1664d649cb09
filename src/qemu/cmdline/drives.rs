//! The drives section of the command line: every `ide`/`sata`/`scsi`/`virtio` option (and
//! `cdrom`) parsed into a [`Drive`], its `-blockdev` pair (`file-<key>` under the format
//! node `drive-<key>`, see the parent module) and its `-device`. The controllers the drives
//! sit on are the devices section's; this one only addresses them.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::devices::ScsiHw;
use super::machine::Chipset;
use super::{
    CmdlineError, DiskSource, HostProbe, Layout, VmSpec, esc, esc_path, invalid, is_word,
    parse_bool, prop_error, push, vmconf,
};

/// `-blockdev` and `-device` arguments of every drive, in bus and index order.
pub(super) fn args(
    drives: &[Drive],
    scsi: &ScsiHw,
    layout: &mut Layout,
) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    for d in drives {
        if let Some(src) = &d.source {
            a.extend(blockdev_args(d, src)?);
        }
        let extra = device_props(d)?;
        let dev = device(d, scsi, layout)?;
        push(
            &mut a,
            &[
                "-device",
                &format!("{dev}{extra}{}", layout.bootindex(&d.key)),
            ],
        );
    }
    Ok(a)
}

/// The device properties that do not depend on the bus: write cache, rotation rate, serial.
fn device_props(d: &Drive) -> Result<String, CmdlineError> {
    let (_, _, wce) = cache_mode(d)?;
    let mut extra = String::new();
    if !d.cdrom {
        extra.push_str(&format!(",write-cache={}", if wce { "on" } else { "off" }));
        if drive_flag(d, "ssd")? && d.bus != Bus::Virtio {
            extra.push_str(",rotation_rate=1");
        }
    }
    if let Some(serial) = d.props.get("serial") {
        if serial.len() > 20 || !is_word(serial, "-_ ") {
            return Err(invalid(
                &d.key,
                serial,
                "serial: up to 20 of [A-Za-z0-9_- ]",
            ));
        }
        extra.push_str(&format!(",serial={}", esc(serial)));
    }
    Ok(extra)
}

/// The drive's device and its place on its bus (a PCI slot for virtio, a controller port
/// otherwise).
fn device(d: &Drive, scsi: &ScsiHw, layout: &mut Layout) -> Result<String, CmdlineError> {
    let kind = if d.cdrom { "cd" } else { "hd" };
    let drive_ref = match &d.source {
        Some(_) => format!(",drive=drive-{}", d.key),
        None => String::new(),
    };
    Ok(match d.bus {
        Bus::Scsi => {
            let (bus, target) = scsi.address(d.index);
            format!("scsi-{kind},bus={bus},{target}{drive_ref},id={}", d.key)
        }
        Bus::Virtio => {
            let mut s = format!(
                "virtio-blk-pci{drive_ref},id={},{}",
                d.key,
                layout.pci.addr()?
            );
            if drive_flag(d, "iothread")? {
                layout.iothreads.push(format!("iothread-{}", d.key));
                s.push_str(&format!(",iothread=iothread-{}", d.key));
            }
            s
        }
        Bus::Sata => format!("ide-{kind},bus=ahci0.{}{drive_ref},id={}", d.index, d.key),
        Bus::Ide => {
            // q35's AHCI ports take unit 0 only; PVE maps odd indices two ports up.
            let (ctrl, unit) = match layout.chipset {
                Chipset::I440fx => (d.index / 2, d.index % 2),
                Chipset::Q35 => (d.index / 2 + 2 * (d.index % 2), 0),
            };
            format!(
                "ide-{kind},bus=ide.{ctrl},unit={unit}{drive_ref},id={}",
                d.key
            )
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Bus {
    Ide,
    Sata,
    Scsi,
    Virtio,
}

impl Bus {
    fn parse(key: &str) -> Option<(Bus, u32)> {
        let split = key.find(|c: char| c.is_ascii_digit())?;
        let (name, idx) = key.split_at(split);
        let n: u32 = idx.parse().ok()?;
        if n.to_string() != idx {
            return None; // leading zeros or signs: not a drive key
        }
        let idx = n;
        let (bus, max) = match name {
            "ide" => (Bus::Ide, 3),
            "sata" => (Bus::Sata, 5),
            "scsi" => (Bus::Scsi, 30),
            "virtio" => (Bus::Virtio, 15),
            _ => return None,
        };
        (idx <= max).then_some((bus, idx))
    }
}

/// One drive option, parsed.
#[derive(Debug)]
pub(super) struct Drive {
    pub(super) key: String,
    pub(super) bus: Bus,
    pub(super) index: u32,
    pub(super) cdrom: bool,
    /// `None` for an empty CD-ROM (`none,media=cdrom`).
    pub(super) source: Option<DiskSource>,
    /// The file takes `O_DIRECT`, so PVE's default `cache=none` is possible (only asked
    /// when the drive sets no `cache`).
    pub(super) direct_io: bool,
    pub(super) props: BTreeMap<String, String>,
}

/// Every drive option (`cdrom` read as `ide2`), in bus and index order.
pub(super) fn parse(spec: &VmSpec, probe: HostProbe) -> Result<Vec<Drive>, CmdlineError> {
    let mut drives = Vec::new();
    for (key, value) in &spec.options {
        let key = if key == "cdrom" { "ide2" } else { key.as_str() };
        let Some((bus, index)) = Bus::parse(key) else {
            continue;
        };
        if key == "ide2" && spec.options.contains_key("cdrom") && spec.options.contains_key("ide2")
        {
            return Err(invalid("cdrom", value, "both 'cdrom' and 'ide2' are set"));
        }
        // `volume=` is PVE's alias of `file=`: both name the disk
        let props: BTreeMap<String, String> = vmconf::parse_drive(value)
            .map(|p| p.into_iter().collect())
            .map_err(|e| prop_error(key, value, e))?;
        let volume = props
            .get("file")
            .cloned()
            .ok_or_else(|| invalid(key, value, "no volume"))?;
        let cdrom = match props.get("media").map(String::as_str) {
            None | Some("disk") => false,
            Some("cdrom") => true,
            Some(m) => return Err(invalid(key, value, format!("unknown media '{m}'"))),
        };
        if volume == "cdrom" {
            return Err(CmdlineError::Unsupported {
                key: key.to_string(),
                why: "host CD-ROM passthrough".into(),
            });
        }
        let source = if volume == "none" {
            if !cdrom {
                return Err(invalid(
                    key,
                    value,
                    "volume 'none' is only valid with media=cdrom",
                ));
            }
            None
        } else {
            match spec.disks.get(key) {
                Some(s) => Some(s.clone()),
                None => {
                    return Err(CmdlineError::UnresolvedDisk {
                        key: key.to_string(),
                        volume,
                    });
                }
            }
        };
        if cdrom && bus == Bus::Virtio {
            return Err(invalid(key, value, "virtio drives cannot be CD-ROMs"));
        }
        let default_cache = !cdrom && !props.contains_key("cache");
        let direct_io = match (&source, probe) {
            (Some(s), HostProbe::Files) if default_cache => supports_o_direct(&s.path),
            (Some(_), HostProbe::Nothing) => true,
            _ => false,
        };
        drives.push(Drive {
            key: key.to_string(),
            bus,
            index,
            cdrom,
            source,
            direct_io,
            props,
        });
    }
    drives.sort_by_key(|a| (a.bus, a.index));
    Ok(drives)
}

/// Host-side cache settings: (cache.direct, cache.no-flush, device write-cache).
fn cache_mode(d: &Drive) -> Result<(bool, bool, bool), CmdlineError> {
    let mode = match d.props.get("cache") {
        Some(m) => m.clone(),
        // PVE's default for disks is cache=none (O_DIRECT); fall back to writeback where the
        // file system refuses O_DIRECT (tmpfs), which keeps the guest-visible write cache on.
        None if d.cdrom || !d.direct_io => "writeback".to_string(),
        None => "none".to_string(),
    };
    Ok(match mode.as_str() {
        "none" => (true, false, true),
        "writeback" => (false, false, true),
        "writethrough" => (false, false, false),
        "directsync" => (true, false, false),
        "unsafe" => (false, true, true),
        other => {
            return Err(invalid(
                &d.key,
                other,
                "cache must be none|writeback|writethrough|directsync|unsafe",
            ));
        }
    })
}

fn supports_o_direct(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .is_ok()
}

pub(super) fn drive_flag(d: &Drive, name: &str) -> Result<bool, CmdlineError> {
    match d.props.get(name) {
        None => Ok(false),
        Some(v) => {
            parse_bool(v).ok_or_else(|| invalid(&d.key, v, format!("{name} must be 0 or 1")))
        }
    }
}

/// `-blockdev` arguments for a drive with a source.
fn blockdev_args(d: &Drive, src: &DiskSource) -> Result<Vec<String>, CmdlineError> {
    let (direct, no_flush, _) = cache_mode(d)?;
    let readonly = d.cdrom || drive_flag(d, "ro")?;
    let discard = match d.props.get("discard").map(String::as_str) {
        None | Some("ignore") => false,
        Some("on") => true,
        Some(o) => return Err(invalid(&d.key, o, "discard must be on or ignore")),
    };
    let detect_zeroes = match d.props.get("detect_zeroes").map(|v| parse_bool(v)) {
        None | Some(Some(true)) => {
            if discard {
                "unmap"
            } else {
                "on"
            }
        }
        Some(Some(false)) => "off",
        Some(None) => return Err(invalid(&d.key, "detect_zeroes", "must be 0 or 1")),
    };
    let aio = match d.props.get("aio").map(String::as_str) {
        None => None,
        Some(a @ ("threads" | "io_uring")) => Some(a),
        Some("native") if direct => Some("native"),
        Some("native") => {
            return Err(invalid(
                &d.key,
                "aio=native",
                "needs cache=none or directsync",
            ));
        }
        Some(o) => return Err(invalid(&d.key, o, "aio must be threads|io_uring|native")),
    };
    let onoff = |b: bool| if b { "on" } else { "off" };
    let mut file = format!(
        "driver=file,node-name=file-{key},filename={path},cache.direct={direct},cache.no-flush={nf},read-only={ro}",
        key = d.key,
        path = esc_path(&src.path),
        direct = onoff(direct),
        nf = onoff(no_flush),
        ro = onoff(readonly),
    );
    if discard {
        file.push_str(",discard=unmap");
    }
    if let Some(aio) = aio {
        file.push_str(&format!(",aio={aio}"));
    }
    let mut fmt = format!(
        "driver={fmt},node-name=drive-{key},file=file-{key},cache.direct={direct},cache.no-flush={nf},read-only={ro},detect-zeroes={dz}",
        fmt = src.format.as_str(),
        key = d.key,
        direct = onoff(direct),
        nf = onoff(no_flush),
        ro = onoff(readonly),
        dz = detect_zeroes,
    );
    if discard {
        fmt.push_str(",discard=unmap");
    }
    Ok(vec!["-blockdev".into(), file, "-blockdev".into(), fmt])
}
