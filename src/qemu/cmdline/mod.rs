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

use crate::config::Accel;
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
mod tests {
    use super::*;

    fn base(run: &Path) -> VmSpec {
        let mut s = VmSpec::new(100, run);
        s.accel = Accel::Tcg;
        s
    }

    /// The value following each occurrence of `flag`.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn value<'a>(argv: &'a [String], flag: &str) -> &'a str {
        let v = values(argv, flag);
        assert_eq!(v.len(), 1, "{flag} once in {argv:?}");
        v[0]
    }

    fn device<'a>(argv: &'a [String], id: &str) -> &'a str {
        let want = format!(",id={id}");
        values(argv, "-device")
            .into_iter()
            .find(|d| d.contains(&format!("{want},")) || d.ends_with(&want))
            .unwrap_or_else(|| panic!("no device {id} in {argv:?}"))
    }

    #[test]
    fn defaults_follow_pve() {
        let argv = build_command(&base(Path::new("/r"))).unwrap();
        assert_eq!(value(&argv, "-name"), "vm100,debug-threads=on");
        assert_eq!(value(&argv, "-machine"), "type=pc");
        assert_eq!(value(&argv, "-accel"), "tcg");
        assert_eq!(value(&argv, "-cpu"), "qemu64");
        assert_eq!(value(&argv, "-m"), "512");
        assert_eq!(value(&argv, "-smp"), "1,sockets=1,cores=1,maxcpus=1");
        assert_eq!(value(&argv, "-pidfile"), "/r/100.pid");
        assert_eq!(
            value(&argv, "-chardev"),
            "socket,id=qmp,path=/r/100.qmp,server=on,wait=off"
        );
        assert_eq!(value(&argv, "-mon"), "chardev=qmp,mode=control");
        for f in ["-nodefaults", "-no-user-config"] {
            assert!(argv.iter().any(|a| a == f), "{f}");
        }
        assert_eq!(value(&argv, "-display"), "none");
        assert_eq!(device(&argv, "vga"), "VGA,id=vga,bus=pci.0,addr=0x2");
        assert_eq!(
            device(&argv, "balloon0"),
            "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,free-page-reporting=on"
        );
        assert!(!argv.iter().any(|a| a == "-incoming"));
    }

    #[test]
    fn typical_pve_config() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("vm-100-disk-0.qcow2");
        std::fs::write(&disk, b"").unwrap();
        let mut spec = base(Path::new("/run/qemu-server"))
            .option("name", "web1")
            .option("memory", "2048")
            .option("sockets", "2")
            .option("cores", "4")
            .option("cpu", "x86-64-v2-AES,flags=+pdpe1gb;-pcid")
            .option("machine", "pc-q35-9.2+pve0")
            .option("scsihw", "virtio-scsi-single")
            .option(
                "scsi0",
                "local:100/vm-100-disk-0.qcow2,discard=on,iothread=1,size=32G,ssd=1",
            )
            .option("ide2", "none,media=cdrom")
            .option("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1")
            .option("agent", "enabled=1,fstrim_cloned_disks=1")
            .option("serial0", "socket")
            .option("boot", "order=scsi0;ide2;net0")
            .option("vga", "none")
            .option("balloon", "0")
            .option("smbios1", "uuid=6f0e8f4e-0000-4000-8000-000000000001")
            .option("vmgenid", "3ab2f3e5-0000-4000-8000-000000000002")
            .option("meta", "creation-qemu=9.2.0,ctime=1700000000")
            .option("ostype", "l26")
            .disk("scsi0", &disk, DiskFormat::Qcow2);
        spec.incoming = Some("unix:/run/qemu-server/100.migrate".into());
        let argv = build_command(&spec).unwrap();

        assert_eq!(value(&argv, "-name"), "web1,debug-threads=on");
        assert_eq!(value(&argv, "-machine"), "type=pc-q35-9.2");
        assert_eq!(value(&argv, "-m"), "2048");
        assert_eq!(value(&argv, "-smp"), "8,sockets=2,cores=4,maxcpus=8");
        assert_eq!(
            value(&argv, "-cpu"),
            "qemu64,+aes,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3,+pdpe1gb,-pcid"
        );
        assert_eq!(
            value(&argv, "-smbios"),
            "type=1,uuid=6f0e8f4e-0000-4000-8000-000000000001"
        );
        // No VGA, no balloon: the first PCI slot goes to the agent's serial bus.
        assert!(!argv.iter().any(|a| a.contains("id=vga")));
        assert_eq!(
            device(&argv, "qga0"),
            "virtio-serial,id=qga0,bus=pcie.0,addr=0x2"
        );
        assert!(
            values(&argv, "-device")
                .contains(&"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
        );
        let chardevs = values(&argv, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=qga0,path=/run/qemu-server/100.qga,server=on,wait=off")
        );
        assert!(
            chardevs.contains(
                &"socket,id=serial0,path=/run/qemu-server/100.serial0,server=on,wait=off"
            )
        );
        assert_eq!(
            device(&argv, "virtioscsi0"),
            "virtio-scsi-pci,id=virtioscsi0,bus=pcie.0,addr=0x3,iothread=iothread-virtioscsi0"
        );
        assert!(values(&argv, "-object").contains(&"iothread,id=iothread-virtioscsi0"));
        let blockdevs = values(&argv, "-blockdev");
        assert_eq!(blockdevs.len(), 2, "{blockdevs:?}");
        assert!(blockdevs[0].starts_with(&format!(
            "driver=file,node-name=file-scsi0,filename={},cache.direct=on,",
            disk.display()
        )));
        assert!(blockdevs[0].ends_with(",discard=unmap"));
        assert_eq!(
            blockdevs[1],
            "driver=qcow2,node-name=drive-scsi0,file=file-scsi0,cache.direct=on,cache.no-flush=off,read-only=off,detect-zeroes=unmap,discard=unmap"
        );
        assert_eq!(
            device(&argv, "scsi0"),
            "scsi-hd,bus=virtioscsi0.0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,write-cache=on,rotation_rate=1,bootindex=100"
        );
        // q35: ide2 → AHCI port ide.1, unit 0; empty CD-ROM has no drive.
        assert_eq!(
            device(&argv, "ide2"),
            "ide-cd,bus=ide.1,unit=0,id=ide2,bootindex=101"
        );
        assert_eq!(value(&argv, "-netdev"), "hubport,id=net0,hubid=0");
        assert_eq!(
            device(&argv, "net0"),
            "virtio-net-pci,mac=BC:24:11:00:00:01,netdev=net0,id=net0,bus=pcie.0,addr=0x4,bootindex=102"
        );
        assert!(
            values(&argv, "-device").contains(&"vmgenid,guid=3ab2f3e5-0000-4000-8000-000000000002")
        );
        let n = argv.len();
        assert_eq!(
            &argv[n - 3..],
            ["-incoming", "unix:/run/qemu-server/100.migrate", "-S"]
        );
        // Deterministic: the same spec gives the same argv.
        assert_eq!(argv, build_command(&spec).unwrap());
    }

    #[test]
    fn controllers_and_buses() {
        let d = Path::new("/nonexistent/x.raw");
        let spec = base(Path::new("/r"))
            .option("scsi0", "local:a")
            .option("scsi8", "local:b,cache=unsafe")
            .option("sata1", "local:c,cache=writethrough")
            .option("ide1", "local:d,cache=directsync")
            .option("ide2", "local:iso/x.iso,media=cdrom")
            .option("virtio3", "local:e,iothread=1,aio=native,cache=none")
            .option("net1", "model=e1000,macaddr=02:00:00:00:00:02")
            .option("net0", "e1000=02:00:00:00:00:01")
            .option("boot", "cdn")
            .option("bootdisk", "virtio3")
            .disk("scsi0", d, DiskFormat::Raw)
            .disk("scsi8", d, DiskFormat::Raw)
            .disk("sata1", d, DiskFormat::Raw)
            .disk("ide1", d, DiskFormat::Raw)
            .disk("ide2", d, DiskFormat::Raw)
            .disk("virtio3", d, DiskFormat::Raw);
        let argv = build_command(&spec).unwrap();
        // lsi (PVE default): 7 devices per controller → scsi8 on the second one.
        assert_eq!(
            device(&argv, "scsihw0"),
            "lsi53c895a,id=scsihw0,bus=pci.0,addr=0x4"
        );
        assert_eq!(
            device(&argv, "scsihw1"),
            "lsi53c895a,id=scsihw1,bus=pci.0,addr=0x5"
        );
        assert!(
            device(&argv, "scsi8").starts_with("scsi-hd,bus=scsihw1.0,scsi-id=1,drive=drive-scsi8")
        );
        assert_eq!(
            device(&argv, "ahci0"),
            "ahci,id=ahci0,multifunction=on,bus=pci.0,addr=0x6"
        );
        assert_eq!(
            device(&argv, "sata1"),
            "ide-hd,bus=ahci0.1,drive=drive-sata1,id=sata1,write-cache=off"
        );
        // i440fx: ide1 → ide.0 unit 1
        assert!(device(&argv, "ide1").starts_with("ide-hd,bus=ide.0,unit=1,drive=drive-ide1"));
        assert_eq!(
            device(&argv, "ide2"),
            "ide-cd,bus=ide.1,unit=0,drive=drive-ide2,id=ide2,bootindex=101"
        );
        assert_eq!(
            device(&argv, "virtio3"),
            "virtio-blk-pci,drive=drive-virtio3,id=virtio3,bus=pci.0,addr=0x7,iothread=iothread-virtio3,write-cache=on,bootindex=100"
        );
        // NICs in index order, legacy 'n' boots them after the CD-ROM.
        assert!(device(&argv, "net0").starts_with(
            "e1000,mac=02:00:00:00:00:01,netdev=net0,id=net0,bus=pci.0,addr=0x8,bootindex=102"
        ));
        assert!(device(&argv, "net1").starts_with(
            "e1000,mac=02:00:00:00:00:02,netdev=net1,id=net1,bus=pci.0,addr=0x9,bootindex=103"
        ));
        let bd = values(&argv, "-blockdev");
        assert!(
            bd.iter()
                .any(|b| b.starts_with("driver=file,node-name=file-scsi8,")
                    && b.contains("cache.no-flush=on"))
        );
        assert!(bd.iter().any(
            |b| b.starts_with("driver=file,node-name=file-ide2,") && b.contains("read-only=on")
        ));
        assert!(
            bd.iter()
                .any(|b| b.starts_with("driver=file,node-name=file-virtio3,")
                    && b.contains("aio=native")
                    && b.contains("cache.direct=on"))
        );
    }

    #[test]
    fn kvm_cpu_and_machine_mapping() {
        let mut spec = base(Path::new("/r")).option("cpu", "host,hidden=1");
        assert_eq!(value(&build_command(&spec).unwrap(), "-cpu"), "max,kvm=off");
        spec.accel = Accel::Kvm;
        let argv = build_command(&spec).unwrap();
        assert_eq!(value(&argv, "-cpu"), "host,kvm=off");
        assert_eq!(value(&argv, "-accel"), "kvm");
        spec.options.remove("cpu");
        assert_eq!(value(&build_command(&spec).unwrap(), "-cpu"), "kvm64");
        // `kvm: 0` forces TCG.
        spec.options.insert("kvm".into(), "0".into());
        assert_eq!(value(&build_command(&spec).unwrap(), "-accel"), "tcg");

        spec.force_machine = Some("pc-i440fx-9.2+pve0".into());
        spec.force_cpu = Some("host,+kvm_pv_eoi".into());
        let argv = build_command(&spec).unwrap();
        assert_eq!(value(&argv, "-machine"), "type=pc-i440fx-9.2");
        assert_eq!(value(&argv, "-cpu"), "max,+kvm_pv_eoi");
        let spec = base(Path::new("/r")).option("machine", "type=q35");
        assert_eq!(
            value(&build_command(&spec).unwrap(), "-machine"),
            "type=q35"
        );
    }

    #[test]
    fn memory_forms_and_escaping() {
        let spec = base(Path::new("/r,x"))
            .option("memory", "current=1024")
            .option("name", "a,b");
        let argv = build_command(&spec).unwrap();
        assert_eq!(value(&argv, "-m"), "1024");
        assert_eq!(value(&argv, "-name"), "a,,b,debug-threads=on");
        assert_eq!(
            value(&argv, "-chardev"),
            "socket,id=qmp,path=/r,,x/100.qmp,server=on,wait=off"
        );
    }

    #[test]
    fn refusals_are_actionable() {
        let run = Path::new("/r");
        let err = |spec: VmSpec| build_command(&spec).unwrap_err().to_string();
        let e = err(base(run).option("scsi0", "local:vm-100-disk-0"));
        assert!(
            e.contains("drive 'scsi0'") && e.contains("no local path"),
            "{e}"
        );
        let e = err(base(run).option("hostpci0", "0000:01:00.0"));
        assert!(
            e.contains("'hostpci0'") && e.contains("not supported"),
            "{e}"
        );
        let e = err(base(run).option("net0", "virtio,bridge=vmbr0"));
        assert!(e.contains("no MAC address"), "{e}");
        let e = err(base(run).option("net0", "virtio=01:00:00:00:00:01"));
        assert!(e.contains("not a unicast MAC"), "{e}");
        let e = err(base(run).option("memory", "lots"));
        assert!(e.contains("'memory'"), "{e}");
        let e = err(base(run).option("machine", "microvm"));
        assert!(e.contains("only pc/i440fx and q35"), "{e}");
        let e = err(base(run).option("cpu", "kvm64,flags=+a b"));
        assert!(e.contains("bad flag"), "{e}");
        let e = err(base(run).option("bios", "ovmf"));
        assert!(e.contains("only seabios"), "{e}");
        let e = err(base(run).option("scsi0", "local:x,cache=bogus").disk(
            "scsi0",
            "/x",
            DiskFormat::Raw,
        ));
        assert!(e.contains("cache must be"), "{e}");
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        let e = err(base(&long));
        assert!(e.contains("shorter than 108 bytes"), "{e}");
        assert!("vmdk".parse::<DiskFormat>().is_err());
        // Drive-like keys that are not drives are ignored, not misparsed.
        assert!(build_command(&base(run).option("unused0", "local:x")).is_ok());
        assert!(build_command(&base(run).option("scsi031", "x")).is_ok());
    }

    /// Issue 9: the config parser read `serial="a,file=..."` as one quoted value while the
    /// command line split it at every comma ("duplicate property 'file'"). One parser now:
    /// the quoted value is the serial, and its check names the drive.
    #[test]
    fn quoted_values_read_as_the_config_parser_reads_them() {
        let spec = base(Path::new("/r"))
            .option("scsi0", r#"local:x,serial="a,file=/etc/shadow""#)
            .disk("scsi0", "/x", DiskFormat::Raw);
        assert_eq!(
            build_command(&spec).unwrap_err().to_string(),
            "config option 'scsi0': invalid value 'a,file=/etc/shadow': serial: up to 20 of \
             [A-Za-z0-9_- ]"
        );
        let spec = base(Path::new("/r"))
            .option("scsi0", r#"local:x,serial="ab 12""#)
            .disk("scsi0", "/x", DiskFormat::Raw);
        let argv = build_command(&spec).unwrap();
        assert!(device(&argv, "scsi0").contains(",serial=ab 12"), "{argv:?}");
    }

    /// Issue 9: `scsi0: volume=<path>` is a drive whose volume is `<path>` (PVE's alias), not
    /// a drive without a volume ("no volume").
    #[test]
    fn volume_alias_is_the_drive_file() {
        let spec = base(Path::new("/r"))
            .option(
                "scsi0",
                "volume=local:100/vm-100-disk-0.raw,cache=writeback",
            )
            .disk("scsi0", "/images/x.raw", DiskFormat::Raw);
        let argv = build_command(&spec).unwrap();
        assert!(
            values(&argv, "-blockdev")
                .iter()
                .any(|b| b.contains("filename=/images/x.raw")),
            "{argv:?}"
        );
        let e = build_command(&base(Path::new("/r")).option("scsi0", "volume=local:y"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("refers to 'local:y'"), "{e}");
    }

    /// Issue 9: what `start` refuses, `config` refuses at once with the same message.
    #[test]
    fn check_options_refuses_what_build_command_refuses() {
        let run = Path::new("/r");
        for (key, value) in [
            ("args", "-device foo"),
            ("hostpci0", "0000:01:00.0"),
            ("usb0", "host=1234:5678"),
            ("serial0", "/dev/ttyS0"),
            ("memory", "99999999"),
            ("net0", "virtio=01:00:00:00:00:01"),
            ("scsi0", "local:x,cache=bogus"),
            ("ide0", "cdrom,media=cdrom"),
            ("vga", "qxl"),
            ("cores", "0"),
        ] {
            let options = BTreeMap::from([(key.to_string(), value.to_string())]);
            let checked = check_options(&options).unwrap_err().to_string();
            let mut spec = base(run).option(key, value);
            spec.disks =
                BTreeMap::from([(key.to_string(), DiskSource::new("/x", DiskFormat::Raw))]);
            let started = build_command(&spec).unwrap_err().to_string();
            assert_eq!(checked, started, "{key}: {value}");
            assert!(checked.contains(&format!("'{key}'")), "{checked}");
        }
        assert_eq!(
            check_options(&BTreeMap::from([("memory".into(), "99999999".into())]))
                .unwrap_err()
                .to_string(),
            "config option 'memory': invalid value '99999999': want an integer 1..67108864"
        );
    }

    #[test]
    fn check_options_accepts_a_typical_config_without_disks_or_host() {
        let options: BTreeMap<String, String> = [
            ("name", "web1"),
            ("memory", "2048"),
            ("cores", "4"),
            ("cpu", "host"),
            ("machine", "pc-q35-9.2+pve0"),
            ("scsihw", "virtio-scsi-single"),
            // PVE's default cache=none is assumed to work: no file to ask yet
            (
                "scsi0",
                "local:100/vm-100-disk-0.raw,aio=native,iothread=1,size=32G",
            ),
            ("virtio1", "volume=local:100/vm-100-disk-1.raw,size=1G"),
            ("cdrom", "none,media=cdrom"),
            ("unused0", "local:100/vm-100-disk-2.raw"),
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
            ("serial0", "socket"),
            ("boot", "order=scsi0;net0"),
            ("lock", "migrate"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        check_options(&options).unwrap();
    }

    #[test]
    fn agent_option_forms() {
        let mut o = BTreeMap::new();
        assert!(!agent_enabled(&o));
        o.insert("agent".to_string(), "1".to_string());
        assert!(agent_enabled(&o));
        o.insert(
            "agent".to_string(),
            "enabled=0,fstrim_cloned_disks=1".to_string(),
        );
        assert!(!agent_enabled(&o));
        o.insert("agent".to_string(), "enabled=1,type=isa".to_string());
        assert!(agent_enabled(&o));
    }
}
