//! The devices section of the command line: the display adapter, the guest agent's serial
//! channel, serial ports, the SCSI and AHCI controllers the drives sit on, the VM generation
//! id and the iothreads devices asked for. Drives and NICs are their own sections.

use std::collections::{BTreeMap, BTreeSet};

use super::drives::{Bus, Drive, drive_flag};
use super::{
    CmdlineError, Layout, VmPaths, VmSpec, check_socket_path, esc_path, invalid, is_uuid,
    parse_bool, positive, props, push,
};

/// The display adapter (PVE default `std`); `none`/`serialN` mean none.
pub(super) fn vga(spec: &VmSpec, layout: &mut Layout) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    let vga = match spec.options.get("vga") {
        Some(v) => props("vga", v, "type")?,
        None => BTreeMap::new(),
    };
    let vga_type = vga.get("type").map(String::as_str).unwrap_or("std");
    let vga_dev = match vga_type {
        "std" => Some("VGA"),
        "cirrus" => Some("cirrus-vga"),
        "vmware" => Some("vmware-svga"),
        "virtio" => Some("virtio-vga"),
        "none" | "serial0" | "serial1" | "serial2" | "serial3" => None,
        other => {
            return Err(CmdlineError::Unsupported {
                key: "vga".into(),
                why: format!("display type '{other}'"),
            });
        }
    };
    if let Some(dev) = vga_dev {
        let mut s = format!("{dev},id=vga,{}", layout.pci.addr()?);
        if let Some(mem) = vga.get("memory") {
            let mb = positive("vga", mem, 512)?;
            if dev == "VGA" {
                s.push_str(&format!(",vgamem_mb={mb}"));
            }
        }
        push(&mut a, &["-device", &s]);
    }
    Ok(a)
}

/// The guest agent's socket and serial channel when `agent` enables it.
pub(super) fn agent(
    spec: &VmSpec,
    paths: &VmPaths,
    layout: &mut Layout,
) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    let Some(v) = spec.options.get("agent") else {
        return Ok(a);
    };
    let props = props("agent", v, "enabled")?;
    let enabled = props
        .get("enabled")
        .map(|e| parse_bool(e).ok_or_else(|| invalid("agent", v, "enabled must be 0 or 1")))
        .transpose()?
        .unwrap_or(false);
    if !enabled {
        return Ok(a);
    }
    push(
        &mut a,
        &[
            "-chardev",
            &format!(
                "socket,id=qga0,path={},server=on,wait=off",
                esc_path(&paths.qga)
            ),
        ],
    );
    match props.get("type").map(String::as_str) {
        None | Some("virtio") => push(
            &mut a,
            &[
                "-device",
                &format!("virtio-serial,id=qga0,{}", layout.pci.addr()?),
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ],
        ),
        Some("isa") => push(&mut a, &["-device", "isa-serial,chardev=qga0"]),
        Some(t) => return Err(invalid("agent", v, format!("unknown type '{t}'"))),
    }
    Ok(a)
}

/// Serial ports: only `socket` (as PVE: a UNIX socket in the run directory).
pub(super) fn serial_ports(spec: &VmSpec) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    for i in 0..4 {
        let key = format!("serial{i}");
        if let Some(v) = spec.options.get(&key) {
            if v != "socket" {
                return Err(CmdlineError::Unsupported {
                    key,
                    why: format!("serial device '{v}' (only 'socket')"),
                });
            }
            let path = spec.run_dir.join(format!("{}.serial{i}", spec.vmid));
            check_socket_path(&path)?;
            push(
                &mut a,
                &[
                    "-chardev",
                    &format!(
                        "socket,id=serial{i},path={},server=on,wait=off",
                        esc_path(&path)
                    ),
                    "-device",
                    &format!("isa-serial,chardev=serial{i}"),
                ],
            );
        }
    }
    Ok(a)
}

/// The SCSI controller model (`scsihw`, PVE default `lsi`) and how drives address it.
pub(super) struct ScsiHw {
    dev: &'static str,
    /// Drives per controller.
    maxdev: u32,
    /// `virtio-scsi-single`: one controller per drive.
    single: bool,
}

impl ScsiHw {
    pub(super) fn from_spec(spec: &VmSpec) -> Result<ScsiHw, CmdlineError> {
        let scsihw = spec
            .options
            .get("scsihw")
            .map(String::as_str)
            .unwrap_or("lsi");
        let (dev, maxdev) = match scsihw {
            "lsi" => ("lsi53c895a", 7),
            "lsi53c810" => ("lsi53c810", 7),
            "megasas" => ("megasas", 256),
            "pvscsi" => ("pvscsi", 256),
            "virtio-scsi-pci" | "virtio-scsi-single" => ("virtio-scsi-pci", 256),
            other => return Err(invalid("scsihw", other, "unknown SCSI controller")),
        };
        Ok(ScsiHw {
            dev,
            maxdev,
            single: scsihw == "virtio-scsi-single",
        })
    }

    /// The bus and target properties of SCSI drive `index`.
    pub(super) fn address(&self, index: u32) -> (String, String) {
        let maxdev = self.maxdev;
        if self.single {
            (
                format!("virtioscsi{index}.0"),
                "scsi-id=0,lun=0".to_string(),
            )
        } else if matches!(self.dev, "virtio-scsi-pci" | "megasas") {
            // As PVE: LUN addressing except on lsi*/pvscsi, which use target ids.
            (
                format!("scsihw{}.0", index / maxdev),
                format!("channel=0,scsi-id=0,lun={}", index % maxdev),
            )
        } else {
            (
                format!("scsihw{}.0", index / maxdev),
                format!("scsi-id={}", index % maxdev),
            )
        }
    }
}

/// The SCSI controllers the drives need, then one AHCI controller for SATA (6 ports each;
/// sata0..5 → ahci0).
pub(super) fn controllers(
    drives: &[Drive],
    scsi: &ScsiHw,
    layout: &mut Layout,
) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    let scsi_drives: Vec<&Drive> = drives.iter().filter(|d| d.bus == Bus::Scsi).collect();
    let mut controllers = BTreeSet::new();
    for d in &scsi_drives {
        controllers.insert(if scsi.single {
            d.index
        } else {
            d.index / scsi.maxdev
        });
    }
    for c in &controllers {
        let id = if scsi.single {
            format!("virtioscsi{c}")
        } else {
            format!("scsihw{c}")
        };
        let mut s = format!("{},id={id},{}", scsi.dev, layout.pci.addr()?);
        if scsi.single {
            let d = scsi_drives.iter().find(|d| d.index == *c);
            if let Some(d) = d
                && drive_flag(d, "iothread")?
            {
                layout.iothreads.push(format!("iothread-{id}"));
                s.push_str(&format!(",iothread=iothread-{id}"));
            }
        }
        push(&mut a, &["-device", &s]);
    }
    if drives.iter().any(|d| d.bus == Bus::Sata) {
        push(
            &mut a,
            &[
                "-device",
                &format!("ahci,id=ahci0,multifunction=on,{}", layout.pci.addr()?),
            ],
        );
    }
    Ok(a)
}

/// One `-object iothread` per iothread the controllers and drives asked for.
pub(super) fn iothreads(layout: &Layout) -> Vec<String> {
    let mut a = Vec::new();
    for t in &layout.iothreads {
        push(&mut a, &["-object", &format!("iothread,id={t}")]);
    }
    a
}

/// The VM generation id device (`vmgenid: <uuid>`; `0` and `1` add none).
pub(super) fn vmgenid(spec: &VmSpec) -> Result<Vec<String>, CmdlineError> {
    let mut a = Vec::new();
    if let Some(genid) = spec.options.get("vmgenid")
        && genid != "0"
    {
        if !is_uuid(genid) && genid != "1" {
            return Err(invalid("vmgenid", genid, "want a UUID"));
        }
        if genid != "1" {
            push(&mut a, &["-device", &format!("vmgenid,guid={genid}")]);
        }
    }
    Ok(a)
}
