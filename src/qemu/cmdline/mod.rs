//! The QEMU command line of a VM: [`VmSpec`] (a VM config's key/values in PVE format plus the
//! resolved disk paths and where the VM's sockets live) and [`build_command`], which turns it
//! into the argument list for `qemu-system-x86_64`.
//!
//! This module is pure apart from two read-only probes of the host (is `/dev/kvm` usable for
//! [`Accel::Auto`], does a disk's file system take `O_DIRECT` for the default `cache=none`);
//! [`check_options`], the same checks for the tunnel's `config` command, makes neither.
//! Property strings are read with [`crate::guest::config`]'s parser, the crate's only one.
//! The same spec always yields the same devices, ids and PCI addresses, so a VM started from a
//! config on one host accepts the migration state of the same config started on another.
//!
//! One file per section of the command line, called in argument order by one orchestrating
//! function (`build`): `machine` (identity, monitor, machine type, accelerator),
//! `cpu` (topology and model), `memory` (`-m`, balloon), `devices` (display, guest agent,
//! serial ports, SCSI/AHCI controllers, iothreads, vmgenid), `drives` (`-blockdev` and drive
//! devices) and `network` (NICs). This file owns the spec types, the errors, the shared
//! helpers, the refusal of hardware we cannot reproduce, the boot order and the PCI slots.
//!
//! Layout choices (documented here once, relied on by the rest of `qemu/`):
//! - every PCI device sits on the root bus (`pci.0` for i440fx, `pcie.0` for q35) at an address
//!   handed out in a fixed order (VGA, balloon, guest-agent serial bus, SCSI controllers, AHCI
//!   controllers, virtio disks by index, NICs by index) starting at slot 2. The ids follow PVE
//!   (`scsihw0`, `virtioscsi3`, `ahci0`, `balloon0`, `qga0`, `net0`, `scsi0` ...), the slot
//!   numbers do not: PVE's bridge layout (and its `+pve` machine versions) is not reproduced,
//!   so live migration is between mtunnel-started QEMUs, not from a PVE QEMU process.
//! - disks use `-blockdev`: a `file` node `file-<key>` under a format node `drive-<key>`; the
//!   format node is what `drive-mirror` (device `drive-<key>`) and `block-export-add`
//!   (node-name `drive-<key>`, NBD export name `drive-<key>`) address.
//! - NICs keep their model and MAC but get a `hubport` netdev (an unconnected hub): it needs no
//!   root, no bridge, and, unlike `-netdev user`, adds no `slirp` section to the migration
//!   stream, so the stream stays acceptable to a QEMU that uses a tap backend. The guest sees a
//!   NIC whose packets go nowhere. Attaching to the config's `bridge` is future work.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::guest::config as vmconf;

mod cpu;
mod devices;
mod drives;
mod machine;
mod memory;
mod network;

use drives::Drive;
use machine::Chipset;
use network::Nic;

/// Which accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    Kvm,
    /// Software emulation. What tests use: an idle TCG guest costs ~0.4 % of a core.
    Tcg,
    /// KVM when `/dev/kvm` can be opened read-write, else TCG. The config option `kvm: 0`
    /// forces TCG in any case.
    #[default]
    Auto,
}

impl Accel {
    /// Resolves `Auto` on this host.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let usable = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if usable { Accel::Kvm } else { Accel::Tcg }
            }
            other => other,
        }
    }
}

/// Image format of a resolved disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = CmdlineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(CmdlineError::UnsupportedFormat(other.to_string())),
        }
    }
}

/// A drive's volume resolved by the storage layer to a local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    pub path: PathBuf,
    pub format: DiskFormat,
}

impl DiskSource {
    pub fn new(path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        DiskSource {
            path: path.into(),
            format,
        }
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vmid: u32,
    /// `-name`; when `None`, the config's `name` option, else `vm<vmid>` (as PVE).
    pub name: Option<String>,
    /// The VM config's options in PVE format (`memory`, `scsi0`, `net0`, ...).
    pub options: BTreeMap<String, String>,
    /// Drive key (`scsi0`, `ide2`, ...) → resolved file. Every drive option whose volume is not
    /// `none` must have an entry.
    pub disks: BTreeMap<String, DiskSource>,
    /// Directory of the VM's sockets, pidfile and log (`{run}` in the design).
    pub run_dir: PathBuf,
    pub accel: Accel,
    /// `-incoming URI -S` when set (e.g. `unix:{run}/{vmid}.migrate`).
    pub incoming: Option<String>,
    /// The migration source's machine (`start_params.forcemachine`), overrides `machine`.
    pub force_machine: Option<String>,
    /// The migration source's `-cpu` argument (`start_params.forcecpu`), overrides `cpu`.
    pub force_cpu: Option<String>,
    /// Appended verbatim (tests: `-device loader,...`). Never filled from a config.
    pub extra_args: Vec<String>,
}

impl VmSpec {
    pub fn new(vmid: u32, run_dir: impl Into<PathBuf>) -> Self {
        VmSpec {
            vmid,
            name: None,
            options: BTreeMap::new(),
            disks: BTreeMap::new(),
            run_dir: run_dir.into(),
            accel: Accel::Auto,
            incoming: None,
            force_machine: None,
            force_cpu: None,
            extra_args: Vec::new(),
        }
    }

    /// Sets a config option (builder style, for callers and tests).
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a resolved disk (builder style).
    pub fn disk(mut self, key: &str, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.disks
            .insert(key.to_string(), DiskSource::new(path, format));
        self
    }

    pub fn paths(&self) -> VmPaths {
        VmPaths::new(&self.run_dir, self.vmid)
    }

    /// Whether the config enables the guest agent (`agent: 1` / `agent: enabled=1,...`).
    pub fn agent_enabled(&self) -> bool {
        agent_enabled(&self.options)
    }
}

/// Whether a config's `agent` option enables the guest agent.
pub fn agent_enabled(options: &BTreeMap<String, String>) -> bool {
    let Some(v) = options.get("agent") else {
        return false;
    };
    let Ok(props) = props("agent", v, "enabled") else {
        return false;
    };
    props
        .get("enabled")
        .is_some_and(|e| parse_bool(e) == Some(true))
}

/// The files of one VM under the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub qmp: PathBuf,
    pub qga: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    pub serial0: PathBuf,
    /// Incoming RAM migration socket, `{run}/{vmid}.migrate`.
    pub migrate: PathBuf,
    /// NBD server socket for incoming disks, `{run}/{vmid}_nbd.migrate`.
    pub nbd: PathBuf,
}

impl VmPaths {
    pub fn new(run_dir: &Path, vmid: u32) -> Self {
        let f = |suffix: &str| run_dir.join(format!("{vmid}{suffix}"));
        VmPaths {
            qmp: f(".qmp"),
            qga: f(".qga"),
            pid: f(".pid"),
            log: f(".log"),
            serial0: f(".serial0"),
            migrate: f(".migrate"),
            nbd: f("_nbd.migrate"),
        }
    }
}

/// Why a config cannot be turned into a command line. Messages name the config option.
#[derive(Debug, Error)]
pub enum CmdlineError {
    #[error("config option '{key}': invalid value '{value}': {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
    #[error(
        "config option '{key}' is not supported by mtunnel's QEMU layer ({why}); remove it from the VM config before migrating"
    )]
    Unsupported { key: String, why: String },
    #[error(
        "drive '{key}' refers to '{volume}' but no local path was resolved for it; the storage layer must resolve every volume before the VM is started"
    )]
    UnresolvedDisk { key: String, volume: String },
    #[error("disk format '{0}' is not supported (only raw and qcow2)")]
    UnsupportedFormat(String),
    #[error(
        "socket path {path} is {len} bytes long; UNIX socket paths must be shorter than 108 bytes: use a shorter run directory"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error(
        "too many PCI devices for mtunnel's single-bus layout (at most 29: VGA, balloon, agent, controllers, virtio disks and NICs together)"
    )]
    OutOfPciSlots,
}

fn invalid(key: &str, value: &str, why: impl Into<String>) -> CmdlineError {
    CmdlineError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// A property-string option as a map, read by the crate's one parser
/// ([`vmconf::parse_property_string`]) so that the config check, the tunnel handlers and the
/// command line agree on every value; a parse error names the option.
fn props(
    key: &str,
    value: &str,
    default_key: &str,
) -> Result<BTreeMap<String, String>, CmdlineError> {
    vmconf::parse_property_string(value, Some(default_key))
        .map(|p| p.into_iter().collect())
        .map_err(|e| prop_error(key, value, e))
}

fn prop_error(key: &str, value: &str, e: vmconf::ConfigError) -> CmdlineError {
    match e {
        vmconf::ConfigError::PropertyString { reason, .. } => invalid(key, value, reason),
        other => invalid(key, value, other.to_string()),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Escapes a value for a QEMU `key=value,...` option string (commas are doubled).
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn esc_path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

fn is_word(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

fn check_socket_path(p: &Path) -> Result<(), CmdlineError> {
    let len = p.as_os_str().len();
    if len >= 108 {
        return Err(CmdlineError::SocketPathTooLong {
            path: p.to_path_buf(),
            len,
        });
    }
    Ok(())
}

fn positive(key: &str, value: &str, max: u64) -> Result<u64, CmdlineError> {
    match value.parse::<u64>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(invalid(key, value, format!("want an integer 1..{max}"))),
    }
}

/// Whether building a command line may look at the host's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostProbe {
    /// `start`: ask each disk's file system whether it takes `O_DIRECT`.
    Files,
    /// [`check_options`]: there are no files; assume PVE's default `cache=none` works.
    Nothing,
}

/// Options whose hardware we cannot reproduce: refusing is better than starting a VM that
/// differs from its config.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("hostpci", "PCI passthrough"),
    ("usb", "USB passthrough"),
    ("efidisk", "UEFI variables disk"),
    ("tpmstate", "TPM state"),
    ("virtiofs", "virtiofs shares"),
    ("rng", "virtio-rng"),
    ("audio", "audio devices"),
    ("ivshmem", "ivshmem"),
    ("args", "raw QEMU arguments"),
    ("numa", "NUMA topology"),
    ("hugepages", "hugepages"),
    ("parallel", "parallel ports"),
];

fn check_unsupported(options: &BTreeMap<String, String>) -> Result<(), CmdlineError> {
    for (key, value) in options {
        let stem = key.trim_end_matches(|c: char| c.is_ascii_digit());
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == stem) {
            // `numa: 0` and `hugepages` absent are the defaults; only an enabled value matters.
            if stem == "numa" && value.trim() == "0" {
                continue;
            }
            return Err(CmdlineError::Unsupported {
                key: key.clone(),
                why: (*why).to_string(),
            });
        }
    }
    if let Some(bios) = options.get("bios")
        && bios != "seabios"
    {
        return Err(CmdlineError::Unsupported {
            key: "bios".into(),
            why: format!("bios '{bios}' (only seabios)"),
        });
    }
    Ok(())
}

/// Hands out PCI slots on the root bus in call order.
struct Pci {
    bus: &'static str,
    next: u32,
}

impl Pci {
    fn addr(&mut self) -> Result<String, CmdlineError> {
        if self.next > 0x1e {
            return Err(CmdlineError::OutOfPciSlots);
        }
        let s = format!("bus={},addr={:#x}", self.bus, self.next);
        self.next += 1;
        Ok(s)
    }
}

/// Boot order: device key → bootindex (100, 101, ... as PVE).
fn boot_order(
    spec: &VmSpec,
    drives: &[Drive],
    nets: &[Nic],
) -> Result<BTreeMap<String, u32>, CmdlineError> {
    let mut order = Vec::new();
    if let Some(boot) = spec.options.get("boot") {
        if boot.contains('=') || boot.contains(';') {
            let props = props("boot", boot, "legacy")?;
            if let Some(list) = props.get("order") {
                for dev in list.split(';').filter(|d| !d.is_empty()) {
                    order.push(dev.to_string());
                }
            }
        } else {
            // Legacy letters: c = `bootdisk`, d = CD-ROMs, n = NICs.
            for c in boot.chars() {
                match c {
                    'c' => order.extend(spec.options.get("bootdisk").cloned()),
                    'd' => order.extend(drives.iter().filter(|d| d.cdrom).map(|d| d.key.clone())),
                    'n' => order.extend(nets.iter().map(|n| n.key.clone())),
                    'a' => {}
                    _ => return Err(invalid("boot", boot, "legacy boot letters are a, c, d, n")),
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut next = 100;
    for dev in order {
        if let std::collections::btree_map::Entry::Vacant(e) = out.entry(dev) {
            e.insert(next);
            next += 1;
        }
    }
    Ok(out)
}

/// Builds the arguments (without the program name) for `qemu-system-x86_64`.
pub fn build_command(spec: &VmSpec) -> Result<Vec<String>, CmdlineError> {
    build(spec, HostProbe::Files)
}

/// Runs every check [`build_command`] makes on a VM config's options, with the same error
/// (and so the same message), without a host: volumes are not resolved and no file is
/// looked at. The tunnel's `config` command calls it so that it refuses at once what `start`
/// would refuse, as upstream's strict config parsing does, instead of storing a config no
/// VM can be started from.
///
/// It builds a throw-away command line for a placeholder VM, because a second list of the
/// same rules would sooner or later disagree with the first. Not covered: what depends on
/// the node (socket path lengths) or on `start`'s parameters (`forcemachine`, `forcecpu`).
///
/// # Errors
/// The [`CmdlineError`] `start` would give for these options.
pub fn check_options(options: &BTreeMap<String, String>) -> Result<(), CmdlineError> {
    let mut spec = VmSpec::new(100, "/run/mtunnel-check");
    spec.accel = Accel::Tcg;
    spec.options = options.clone();
    for key in options.keys() {
        let key = if key == "cdrom" { "ide2" } else { key.as_str() };
        spec.disks.insert(
            key.to_string(),
            DiskSource::new("/nonexistent", DiskFormat::Raw),
        );
    }
    build(&spec, HostProbe::Nothing).map(|_| ())
}

/// The command line, section by section. The order of the sections is the order of the
/// arguments, of the PCI slots handed out and of the checks (the first refusal wins).
fn build(spec: &VmSpec, probe: HostProbe) -> Result<Vec<String>, CmdlineError> {
    check_unsupported(&spec.options)?;
    let paths = spec.paths();
    for p in [
        &paths.qmp,
        &paths.qga,
        &paths.serial0,
        &paths.migrate,
        &paths.nbd,
    ] {
        check_socket_path(p)?;
    }
    let accel = machine::accel(spec);
    let (machine_type, chipset) = machine::machine(spec)?;

    let mut a = machine::args(spec, &paths, &machine_type, accel)?;
    a.extend(cpu::args(spec, accel)?);
    a.extend(memory::args(spec)?);

    let drives = drives::parse(spec, probe)?;
    let nets = network::parse(spec)?;
    let mut layout = Layout::new(chipset, boot_order(spec, &drives, &nets)?);
    a.extend(devices::vga(spec, &mut layout)?);
    a.extend(memory::balloon(spec, &mut layout)?);
    a.extend(devices::agent(spec, &paths, &mut layout)?);
    a.extend(devices::serial_ports(spec)?);
    let scsi = devices::ScsiHw::from_spec(spec)?;
    a.extend(devices::controllers(&drives, &scsi, &mut layout)?);
    a.extend(drives::args(&drives, &scsi, &mut layout)?);
    a.extend(devices::iothreads(&layout));
    a.extend(network::args(&nets, &mut layout)?);
    a.extend(devices::vmgenid(spec)?);

    if let Some(uri) = &spec.incoming {
        if !is_word(uri, ":/._-,=") {
            return Err(invalid(
                "incoming",
                uri,
                "unexpected characters in migration URI",
            ));
        }
        push(&mut a, &["-incoming", uri, "-S"]);
    }
    a.extend(spec.extra_args.iter().cloned());
    Ok(a)
}

/// What the device sections share, filled in call order: the chipset, the PCI slots handed
/// out so far, the boot order, and the iothreads devices asked for (emitted after the
/// drives).
struct Layout {
    chipset: Chipset,
    pci: Pci,
    boot: BTreeMap<String, u32>,
    iothreads: Vec<String>,
}

impl Layout {
    fn new(chipset: Chipset, boot: BTreeMap<String, u32>) -> Layout {
        let bus = if chipset == Chipset::Q35 {
            "pcie.0"
        } else {
            "pci.0"
        };
        Layout {
            chipset,
            pci: Pci { bus, next: 2 },
            boot,
            iothreads: Vec::new(),
        }
    }

    /// `,bootindex=N` for a device in the boot order, else nothing.
    fn bootindex(&self, key: &str) -> String {
        self.boot
            .get(key)
            .map(|i| format!(",bootindex={i}"))
            .unwrap_or_default()
    }
}

fn push(a: &mut Vec<String>, args: &[&str]) {
    a.extend(args.iter().map(|s| s.to_string()));
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests;
