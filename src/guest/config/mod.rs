//! VM configs in qemu-server's file format (`/etc/pve/qemu-server/<vmid>.conf`): parsing and
//! writing, faithful to upstream `PVE::QemuServer::parse_vm_config` / `write_vm_config`, plus
//! the small value helpers the tunnel handlers need (property strings, disk sizes, drive keys,
//! volume IDs, the percent-encoding of description comments).
//!
//! This module is text in, text out. It reads and writes no files, takes no locks, knows no
//! storage, and does not check values against the qemu-server schema: apart from the section
//! structure it only checks the `lock` and `vmid` values (and, when parsing strictly or
//! validating, that no value holds a control character; when parsing strictly, that no
//! drive lacks its volume and nothing in `[special:cloudinit]` or `cicustom` names a host
//! path). Which options a VM may have and
//! which values they take is the QEMU layer's business (`qemu::cmdline::check_options`).
//! [`parse_property_string`] / [`print_property_string`] are the one property-string syntax
//! of the crate: the QEMU command line, the tunnel handlers and the migration source all use
//! them. The config store and the per-VM lock live elsewhere in [`crate::guest`].
//!
//! Files: `parse.rs` reads the text (sections, options, description comments, the digest),
//! `write.rs` renders it and checks that a config built in memory can be rendered,
//! `props.rs` holds the property strings, sizes, drive keys and volume IDs. This file owns
//! the types, the errors and the value checks both directions share; every public item is
//! reachable as `crate::guest::config::<name>`.

use std::collections::BTreeMap;

use crate::ident::{is_config_id, is_option_key, is_vmid};

mod parse;
mod props;
mod write;

pub use parse::decode_text;
#[cfg(test)]
use parse::{parse_config, sha1_hex};
pub use props::{
    drive_volume, format_size, is_drive_key, parse_drive, parse_property_string, parse_size,
    parse_volume_id, print_property_string,
};
pub use write::encode_text;

/// Values accepted for the `lock` option (qemu-server's `pve-qm-lock` enum, plus mtunnel's
/// `replica`: a replica's config, docs/replicas.md; a PVE peer never sees one).
pub const LOCK_VALUES: &[&str] = &[
    "backup",
    "clone",
    "create",
    "migrate",
    "replica",
    "rollback",
    "snapshot",
    "snapshot-delete",
    "suspending",
    "suspended",
];

/// Names of the `[special:<name>]` sections qemu-server knows; any other is an unknown section.
pub const SPECIAL_SECTIONS: &[&str] = &["cloudinit", "fleecing"];

/// Keys that are never written as `key: value` lines (they are fields of the parsed config).
const RESERVED_KEYS: &[&str] = &[
    "digest",
    "description",
    "pending",
    "snapshots",
    "special-sections",
];

/// Why a config text or a value could not be parsed; every variant names the input at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A line that is neither blank, a comment, a section header nor a `key: value` option.
    #[error("line {line}: unable to parse config line '{text}'")]
    BadLine { line: usize, text: String },
    /// The same option twice in one section (`cdrom` counts as `ide2`).
    #[error("line {line}: duplicate key '{key}' in {section}")]
    DuplicateKey {
        line: usize,
        key: String,
        section: String,
    },
    /// The same section header twice.
    #[error("line {line}: duplicate section {section}")]
    DuplicateSection { line: usize, section: String },
    /// `delete:` outside the `[PENDING]` section.
    #[error("line {line}: property 'delete' is only allowed in [PENDING], found in {section}")]
    DeleteOutsidePending { line: usize, section: String },
    /// An option whose value is not allowed (`lock`, `vmid`) or whose key is reserved.
    #[error("line {line}: invalid value '{value}' for '{key}' - {reason}")]
    InvalidValue {
        line: usize,
        key: String,
        value: String,
        reason: String,
    },
    /// A section header that names no known section (only an error in strict parsing).
    #[error("line {line}: unknown section '[{name}]'")]
    UnknownSection { line: usize, name: String },
    /// A malformed property string such as a drive description.
    #[error("invalid property string '{input}' - {reason}")]
    PropertyString { input: String, reason: String },
    /// A key or value that [`print_property_string`] cannot print so that it reads back the
    /// same; the reason names the key (PVE's wording where PVE has one).
    #[error("{reason}")]
    Unprintable { key: String, reason: String },
    /// A config built in memory that [`VmConfig::write`] cannot represent faithfully.
    #[error("invalid config in {section} - {reason}")]
    Invalid { section: String, reason: String },
}

/// One snapshot section `[<name>]`: its description comments and its options
/// (typically `parent`, `snaptime`, `vmstate`, `runningmachine`, plus the VM options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub description: Option<String>,
    pub options: BTreeMap<String, String>,
}

impl Snapshot {
    /// The `parent` option: the snapshot this one was taken after.
    pub fn parent(&self) -> Option<&str> {
        self.options.get("parent").map(String::as_str)
    }
}

/// A parsed qemu-server VM config.
///
/// `description` is the decoded comment block of the main section (never `Some("")` after
/// parsing). In `pending` and in the `special` sections a description is kept under the key
/// `description`, as upstream does: a pending description change is a pending option like
/// any other. `pending` may hold `delete` (a comma list of options to remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmConfig {
    pub description: Option<String>,
    pub options: BTreeMap<String, String>,
    pub pending: BTreeMap<String, String>,
    pub special: BTreeMap<String, BTreeMap<String, String>>,
    pub snapshots: BTreeMap<String, Snapshot>,
    /// SHA-1 hex of the text this config was parsed from (empty for configs built in memory).
    pub digest: String,
}

impl VmConfig {
    /// `(key, volid)` of every drive option (`scsi0`, `unused1`, ...) in the main section
    /// whose volume is a storage volume `<storage>:<name>`; paths, `none` and `cdrom` are
    /// left out. Sorted by key (string order).
    pub fn volids(&self) -> Vec<(String, String)> {
        self.options
            .iter()
            .filter(|(key, _)| is_drive_key(key))
            .filter_map(|(key, value)| {
                let volid = drive_volume(value)?;
                parse_volume_id(&volid)?;
                Some((key.clone(), volid))
            })
            .collect()
    }
}

/// The section a line belongs to while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Section {
    Main,
    Pending,
    Special(String),
    Snapshot(String),
    /// Inside an unknown section: every line up to the next header is ignored.
    Skipped,
}

impl Section {
    fn label(&self) -> String {
        match self {
            Section::Main => "main section".to_string(),
            Section::Pending => "[PENDING]".to_string(),
            Section::Special(name) => format!("[special:{name}]"),
            Section::Snapshot(name) => format!("snapshot [{name}]"),
            Section::Skipped => "skipped section".to_string(),
        }
    }
}

/// The only value checks done here: `lock` is one of [`LOCK_VALUES`], `vmid` a valid VMID.
fn check_value(key: &str, value: &str) -> Result<(), String> {
    match key {
        "lock" if !LOCK_VALUES.contains(&value) => {
            Err(format!("value must be one of: {}", LOCK_VALUES.join(", ")))
        }
        "vmid" if !is_vmid(value) => {
            Err("value must be a VM ID between 100 and 999999999".to_string())
        }
        _ => Ok(()),
    }
}

/// Strict parsing's refusals of values that would point the VM at nothing or at the host:
/// a drive without a volume (`unused0: ,,,`), a drive in `[special:cloudinit]` (upstream
/// records cloud-init options there, never drives), and a `cicustom` snippet given as a
/// host path (upstream takes volume IDs only). A drive value that is not a property string
/// at all is left to whoever reads the drive.
fn check_strict(section: &Section, key: &str, value: &str) -> Result<(), String> {
    let is_drive = is_drive_key(key) || key == "cdrom";
    if is_drive && matches!(section, Section::Special(_)) {
        return Err(format!(
            "a drive in {} (it records cloud-init options, not drives)",
            section.label()
        ));
    }
    if is_drive
        && let Ok(props) = parse_drive(value)
        && !props
            .iter()
            .any(|(k, v)| k == "file" && !v.trim().is_empty())
    {
        return Err("the drive names no volume".to_string());
    }
    if key == "cicustom" {
        let parts = parse_property_string(value, None).map_err(|e| e.to_string())?;
        if let Some((kind, volume)) = parts.iter().find(|(_, v)| parse_volume_id(v).is_none()) {
            return Err(format!(
                "{kind}: '{volume}' is not a volume ID (<storage>:<volume>); cicustom \
                 names snippets by volume ID, never by host path"
            ));
        }
    }
    Ok(())
}

/// The first control character (C0, DEL or C1) in `value`, if any.
fn control_char(value: &str) -> Option<char> {
    value.chars().find(|c| c.is_control())
}

fn control_char_reason(c: char) -> String {
    format!(
        "contains the control character U+{:04X}; values must be printable text",
        u32::from(c)
    )
}

fn invalid(section: &Section, reason: String) -> ConfigError {
    ConfigError::Invalid {
        section: section.label(),
        reason,
    }
}

/// Perl's `\s` on bytes: space, `\t`, `\n`, vertical tab, form feed, `\r`.
fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// parse(write(c)) == c, apart from the digest of the written text.
    fn assert_round_trip(conf: &VmConfig) {
        let text = conf.write();
        let mut back = VmConfig::parse(&text).unwrap();
        assert_eq!(back.digest, sha1_hex(text.as_bytes()));
        back.digest = conf.digest.clone();
        assert_eq!(&back, conf, "written text:\n{text}");
    }

    const PROTOCOL_EXAMPLE: &str = "\
#my VM
boot: order=scsi0;net0
cores: 2
lock: migrate
memory: 4096
meta: creation-qemu=9.2.0,ctime=1700000000
name: web1
net0: virtio=BC:24:11:00:00:01,bridge=vmbr1
scsi0: local-lvm:vm-567-disk-0,discard=on,format=raw,size=32G
scsihw: virtio-scsi-single
smbios1: uuid=6f0e...
vmgenid: 3ab2f3e5-...
";

    #[test]
    fn protocol_example_parses_and_writes_back_identically() {
        let conf = VmConfig::parse(PROTOCOL_EXAMPLE).unwrap();
        assert_eq!(conf.description.as_deref(), Some("my VM"));
        assert_eq!(conf.options.len(), 11);
        assert_eq!(conf.options["lock"], "migrate");
        assert_eq!(conf.options["boot"], "order=scsi0;net0");
        assert_eq!(conf.options["meta"], "creation-qemu=9.2.0,ctime=1700000000");
        assert!(conf.pending.is_empty() && conf.special.is_empty() && conf.snapshots.is_empty());
        assert_eq!(conf.digest.len(), 40);
        assert_eq!(
            conf.volids(),
            vec![("scsi0".to_string(), "local-lvm:vm-567-disk-0".to_string())]
        );
        assert_eq!(conf.write(), PROTOCOL_EXAMPLE);
        conf.validate().unwrap();
    }

    #[test]
    fn digest_is_sha1_of_the_raw_text() {
        // printf 'cores: 2\nmemory: 2048\nname: digest-test\n' | sha1sum
        let conf = VmConfig::parse("cores: 2\nmemory: 2048\nname: digest-test\n").unwrap();
        assert_eq!(conf.digest, "683af2206944b64422c698b489cbe4dd8c4c4b4e");
        // printf '' | sha1sum
        let empty = VmConfig::parse("").unwrap();
        assert_eq!(empty.digest, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(empty.write(), "");
    }

    #[test]
    fn description_encoding_follows_upstream() {
        assert_eq!(encode_text("café: 100% sure"), "caf%C3%A9%3A 100% sure");
        assert_eq!(encode_text("tab\there"), "tab%09here");
        assert_eq!(encode_text("del\x7f~"), "del%7F~");
        // a `%` that would decode as an escape is itself escaped
        assert_eq!(encode_text("50%3A and 7%"), "50%253A and 7%");
        assert_eq!(decode_text("caf%C3%A9%3A 100% sure"), "café: 100% sure");
        assert_eq!(decode_text("50%253A %zz %4"), "50%3A %zz %4");
        assert_eq!(decode_text("bad %FF byte"), "bad \u{fffd} byte");
        assert_eq!(decode_text("lower %c3%a9"), "lower é");
    }

    #[test]
    fn description_with_percent_colon_and_utf8_round_trips() {
        let conf = VmConfig {
            description: Some("Grüße: 100% sicher\n\n日本語 %41 line\n  indented: yes".into()),
            options: map(&[("memory", "512")]),
            ..VmConfig::default()
        };
        let text = conf.write();
        assert_eq!(
            text,
            "#Gr%C3%BC%C3%9Fe%3A 100% sicher\n#\n#%E6%97%A5%E6%9C%AC%E8%AA%9E %2541 line\n\
             #  indented%3A yes\nmemory: 512\n"
        );
        assert_round_trip(&conf);
    }

    #[test]
    fn description_line_and_trailing_whitespace() {
        let conf = VmConfig::parse("description: a%3Ab  \n#second\n#   \ncores: 1\n").unwrap();
        // upstream appends a `description:` value without a line break
        assert_eq!(conf.description.as_deref(), Some("a:bsecond"));
        let conf = VmConfig::parse("#\n#  \ncores: 1\n").unwrap();
        assert_eq!(conf.description, None);
        let conf = VmConfig::parse("#\n#first\ncores: 1\n#after options\n").unwrap();
        assert_eq!(conf.description.as_deref(), Some("\nfirst\nafter options"));
        assert_round_trip(&conf);
    }

    #[test]
    fn pending_with_delete_and_description() {
        let text = "\
cores: 2
memory: 2048
net1: virtio=BC:24:11:00:00:02,bridge=vmbr0

[PENDING]
#new text
cores: 4
delete: net1,serial0
";
        let conf = VmConfig::parse(text).unwrap();
        assert_eq!(
            conf.pending,
            map(&[
                ("cores", "4"),
                ("delete", "net1,serial0"),
                ("description", "new text"),
            ])
        );
        assert_eq!(conf.description, None);
        assert_eq!(conf.write(), text);
        assert_round_trip(&conf);

        // an empty pending description means "clear it" and survives a round trip
        let conf = VmConfig::parse("cores: 1\n\n[PENDING]\n#\n").unwrap();
        assert_eq!(conf.pending, map(&[("description", "")]));
        assert_eq!(conf.write(), "cores: 1\n\n[PENDING]\n#\n");

        let err = VmConfig::parse("cores: 1\ndelete: net0\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::DeleteOutsidePending {
                line: 2,
                section: "main section".into()
            }
        );
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn special_cloudinit_section() {
        let text = "\
ide2: local-lvm:vm-100-cloudinit,media=cdrom
ipconfig0: ip=dhcp

[special:cloudinit]
ipconfig0: ip=10.0.0.5/24,gw=10.0.0.1
name: vm100
";
        let conf = VmConfig::parse(text).unwrap();
        assert_eq!(
            conf.special["cloudinit"],
            map(&[
                ("ipconfig0", "ip=10.0.0.5/24,gw=10.0.0.1"),
                ("name", "vm100")
            ])
        );
        assert_eq!(conf.write(), text);
        assert_round_trip(&conf);
        conf.validate().unwrap();

        // values in special sections are not checked
        let conf = VmConfig::parse("[special:cloudinit]\nlock: whatever\n").unwrap();
        assert_eq!(conf.special["cloudinit"]["lock"], "whatever");
    }

    #[test]
    fn two_snapshots_with_parent() {
        let text = "\
#current state
cores: 4
memory: 4096
parent: second
scsi0: local:100/vm-100-disk-0.qcow2,size=32G

[first]
#before upgrade
#  (clean)
cores: 2
memory: 2048
scsi0: local:100/vm-100-disk-0.qcow2,size=32G
snaptime: 1700000000

[second]
cores: 4
memory: 4096
parent: first
runningmachine: pc-q35-9.2+pve0
scsi0: local:100/vm-100-disk-0.qcow2,size=32G
snaptime: 1700001000
vmstate: local:100/vm-100-state-second.raw
";
        let conf = VmConfig::parse(text).unwrap();
        assert_eq!(conf.description.as_deref(), Some("current state"));
        assert_eq!(conf.options["parent"], "second");
        assert_eq!(conf.snapshots.len(), 2);
        let first = &conf.snapshots["first"];
        assert_eq!(
            first.description.as_deref(),
            Some("before upgrade\n  (clean)")
        );
        assert_eq!(first.parent(), None);
        assert_eq!(first.options["memory"], "2048");
        let second = &conf.snapshots["second"];
        assert_eq!(second.parent(), Some("first"));
        assert_eq!(second.description, None);
        assert_eq!(conf.write(), text);
        assert_round_trip(&conf);
    }

    #[test]
    fn comments_after_options_belong_to_their_section() {
        let text = "cores: 1\n#main\n[snap1]\ncores: 1\n#snap text\n[special:cloudinit]\n#ci\n";
        let conf = VmConfig::parse(text).unwrap();
        assert_eq!(conf.description.as_deref(), Some("main"));
        assert_eq!(
            conf.snapshots["snap1"].description.as_deref(),
            Some("snap text")
        );
        assert_eq!(conf.special["cloudinit"]["description"], "ci");
        assert_round_trip(&conf);
    }

    #[test]
    fn full_config_round_trips_in_write_order() {
        let mut conf = VmConfig {
            description: Some("multi\nline: description".into()),
            options: map(&[
                ("scsi0", "local-lvm:vm-100-disk-0,size=8G"),
                ("args", "-cpu host,+kvm_pv_eoi"),
                ("lock", "create"),
                ("vmid", "100"),
                ("parent", "s1"),
            ]),
            pending: map(&[("memory", "1024"), ("delete", "args")]),
            ..VmConfig::default()
        };
        conf.special
            .insert("fleecing".into(), map(&[("fleecing-images", "local:x")]));
        conf.special.insert("cloudinit".into(), BTreeMap::new());
        conf.snapshots.insert(
            "s1".into(),
            Snapshot {
                description: Some("snap".into()),
                options: map(&[("snaptime", "1"), ("snapstate", "prepare")]),
            },
        );
        conf.snapshots.insert("a-0".into(), Snapshot::default());
        conf.validate().unwrap();
        assert_eq!(
            conf.write(),
            "\
#multi
#line%3A description
args: -cpu host,+kvm_pv_eoi
lock: create
parent: s1
scsi0: local-lvm:vm-100-disk-0,size=8G
vmid: 100

[PENDING]
delete: args
memory: 1024

[special:cloudinit]

[special:fleecing]
fleecing-images: local:x

[a-0]

[s1]
#snap
snapstate: prepare
snaptime: 1
"
        );
        assert_round_trip(&conf);
    }

    #[test]
    fn cdrom_is_ide2_and_main_snapstate_is_dropped() {
        let conf =
            VmConfig::parse("cdrom: local:iso/x.iso,media=cdrom\nsnapstate: delete\n").unwrap();
        assert_eq!(
            conf.options,
            map(&[("ide2", "local:iso/x.iso,media=cdrom")])
        );
        let err = VmConfig::parse("ide2: none,media=cdrom\ncdrom: cdrom\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::DuplicateKey {
                line: 2,
                key: "ide2".into(),
                section: "main section".into()
            }
        );
    }

    #[test]
    fn bad_lines_name_line_and_text() {
        for (text, line, bad) in [
            ("cores: 1\n\nthis is junk\n", 3, "this is junk"),
            (" cores: 1\n", 1, " cores: 1"),
            ("cores:\n", 1, "cores:"),
            ("cores:   \n", 1, "cores:   "),
            ("Cores: 1\n", 1, "Cores: 1"),
            ("net0x: 1\n", 1, "net0x: 1"),
            ("[open\n", 1, "[open"),
            ("memory: 1\n[a]b]\n", 2, "[a]b]"),
        ] {
            let err = VmConfig::parse(text).unwrap_err();
            assert_eq!(
                err,
                ConfigError::BadLine {
                    line,
                    text: bad.to_string()
                },
                "{text:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("line {line}")) && msg.contains(bad),
                "{msg}"
            );
        }
        // no space after the colon and trailing blanks are fine
        let conf = VmConfig::parse("cores:2 \t\r\nname:  a b  \n").unwrap();
        assert_eq!(conf.options, map(&[("cores", "2"), ("name", "a b")]));
    }

    #[test]
    fn invalid_values_and_reserved_keys() {
        let err = VmConfig::parse("lock: bogus\n").unwrap_err();
        assert!(matches!(err, ConfigError::InvalidValue { line: 1, ref key, .. } if key == "lock"));
        assert!(err.to_string().contains("snapshot-delete"), "{err}");
        for lock in LOCK_VALUES {
            VmConfig::parse(&format!("lock: {lock}\n")).unwrap();
        }
        for vmid in ["99", "0100", "1000000000", "abc"] {
            let err = VmConfig::parse(&format!("vmid: {vmid}\n")).unwrap_err();
            assert!(matches!(err, ConfigError::InvalidValue { .. }), "{vmid}");
        }
        VmConfig::parse("vmid: 999999999\n").unwrap();
        let err = VmConfig::parse("cores: 1\ndigest: abc\n").unwrap_err();
        assert!(
            matches!(err, ConfigError::InvalidValue { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn duplicate_keys_and_sections() {
        let err = VmConfig::parse("memory: 1\ncores: 1\nmemory: 2\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::DuplicateKey {
                line: 3,
                key: "memory".into(),
                section: "main section".into()
            }
        );
        let err = VmConfig::parse("[s1]\ncores: 1\ncores: 2\n").unwrap_err();
        assert!(err.to_string().contains("snapshot [s1]"), "{err}");
        let err = VmConfig::parse("[s1]\n[s1]\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::DuplicateSection {
                line: 2,
                section: "[s1]".into()
            }
        );
        let err = VmConfig::parse("[PENDING]\n[pending]\n").unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateSection { line: 2, .. }));
        let err = VmConfig::parse("[special:cloudinit]\n[special:cloudinit]\n").unwrap_err();
        assert!(matches!(err, ConfigError::DuplicateSection { line: 2, .. }));
        // the same key in different sections is fine
        VmConfig::parse("cores: 1\n[PENDING]\ncores: 2\n[s1]\ncores: 3\n").unwrap();
    }

    #[test]
    fn unknown_sections_are_skipped_or_rejected_in_strict_mode() {
        let text = "\
cores: 1

[special:foo]
anything goes here: !!
#not a description

[1bad]
junk

[x]
more junk

[s1]
cores: 2
";
        let conf = VmConfig::parse(text).unwrap();
        assert_eq!(conf.options, map(&[("cores", "1")]));
        assert!(conf.special.is_empty());
        assert_eq!(conf.snapshots.len(), 1);
        assert_eq!(conf.snapshots["s1"].options, map(&[("cores", "2")]));
        assert_eq!(conf.description, None);

        let err = VmConfig::parse_strict(text).unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownSection {
                line: 3,
                name: "special:foo".into()
            }
        );
        VmConfig::parse_strict(PROTOCOL_EXAMPLE).unwrap();
    }

    #[test]
    fn validate_rejects_what_write_cannot_represent() {
        let base = VmConfig::parse(PROTOCOL_EXAMPLE).unwrap();
        let mut conf = base.clone();
        conf.options.insert("name".into(), "two\nlines".into());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.options.insert("Name".into(), "x".into());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.options.insert("cdrom".into(), "none".into());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.options.insert("delete".into(), "net0".into());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.snapshots.insert("pending".into(), Snapshot::default());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.special.insert("foo".into(), BTreeMap::new());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.description = Some("ends in a line break\n".into());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.description = Some(String::new());
        assert!(conf.validate().is_err());
        let mut conf = base.clone();
        conf.pending.insert("description".into(), String::new());
        conf.validate().unwrap();
        let mut conf = base;
        conf.options.insert("lock".into(), "bogus".into());
        let err = conf.validate().unwrap_err();
        assert!(err.to_string().contains("lock"), "{err}");
    }

    #[test]
    fn property_string_parse() {
        assert_eq!(
            parse_property_string(
                "local:100/vm-100-disk-0.qcow2,format=qcow2,size=32G",
                Some("file")
            )
            .unwrap(),
            props(&[
                ("file", "local:100/vm-100-disk-0.qcow2"),
                ("format", "qcow2"),
                ("size", "32G"),
            ])
        );
        // order is kept, `=` after the first belongs to the value, blank parts are skipped
        assert_eq!(
            parse_property_string("b=1,,a=x=y, ,file=/dev/sdb,", Some("file")).unwrap(),
            props(&[("b", "1"), ("a", "x=y"), ("file", "/dev/sdb")])
        );
        assert_eq!(
            parse_property_string(r#"name="a,b",x=1,"c=d, \"e\" \\ \n""#, Some("file")).unwrap(),
            props(&[("name", "a,b"), ("x", "1"), ("file", "c=d, \"e\" \\ \n")])
        );
        assert_eq!(
            parse_property_string(r#"v=a"b"#, None).unwrap(),
            props(&[("v", "a\"b")])
        );
        assert_eq!(parse_property_string("", None).unwrap(), props(&[]));
        assert_eq!(
            parse_property_string("k=", None).unwrap(),
            props(&[("k", "")])
        );
        for (input, default) in [
            ("a=1,a=2", None),
            ("vol,file=x", Some("file")),
            ("vol1,vol2", Some("file")),
            ("novalue", None),
            ("=x", None),
            (r#"k="open"#, None),
            (r#"k="x"y"#, None),
            (r#"k="bad \t escape""#, None),
        ] {
            let err = parse_property_string(input, default).unwrap_err();
            assert!(
                matches!(&err, ConfigError::PropertyString { input: i, .. } if i == input),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn property_string_print() {
        let drive = props(&[
            ("size", "32G"),
            ("file", "local-lvm:vm-567-disk-0"),
            ("iothread", "1"),
            ("format", "raw"),
            ("discard", "on"),
        ]);
        assert_eq!(
            print_property_string(&drive, Some("file")).unwrap(),
            "local-lvm:vm-567-disk-0,discard=on,format=raw,iothread=1,size=32G"
        );
        assert_eq!(
            print_property_string(&drive, None).unwrap(),
            "discard=on,file=local-lvm:vm-567-disk-0,format=raw,iothread=1,size=32G"
        );
        // what reads back unchanged is printed as is, `"` inside a value included
        let fine = props(&[("file", "/dev/disk/by-id/x y"), ("m", "mid\"quote=1")]);
        let printed = print_property_string(&fine, Some("file")).unwrap();
        assert_eq!(printed, r#"/dev/disk/by-id/x y,m=mid"quote=1"#);
        assert_eq!(parse_property_string(&printed, Some("file")).unwrap(), fine);
    }

    /// Issue 9: a drive key `x,file` from the `disk` command came out as `x,file=/some/path`,
    /// a second `file` for whoever parses the drive string; printing must refuse instead.
    #[test]
    fn property_string_print_refuses_what_would_read_back_differently() {
        let key_msg = "property keys are made of letters, digits, '_', '-' and '.'";
        for (pairs, default, msg) in [
            (vec![("x,file", "/some/path")], Some("file"), format!("invalid key 'x,file' - {key_msg}")),
            (vec![("a=b", "1")], None, format!("invalid key 'a=b' - {key_msg}")),
            (vec![("", "1")], None, format!("invalid key '' - {key_msg}")),
            (vec![("\"k", "1")], None, format!("invalid key '\\\"k' - {key_msg}")),
            (vec![("a b", "1")], None, format!("invalid key 'a b' - {key_msg}")),
            (vec![("name", "x,y")], None, "illegal value with commas for name".to_string()),
            (vec![("file", "a,b")], Some("file"), "illegal value with commas for file".to_string()),
            (vec![("file", "a=b")], Some("file"), "illegal value with '=' for file (it would read back as a key)".to_string()),
            (vec![("q", "\"quoted\"")], None, "illegal value for q - a value must not start with '\"'".to_string()),
            (vec![("e", "")], None, "illegal empty value for e".to_string()),
            (vec![("file", " ")], Some("file"), "illegal empty value for file".to_string()),
            (vec![("n", "a\rb")], None, "illegal value for n - contains the control character U+000D; values must be printable text".to_string()),
            (vec![("n", "a\0b")], None, "illegal value for n - contains the control character U+0000; values must be printable text".to_string()),
            (vec![("n", "a"), ("n", "b")], None, "duplicate key 'n'".to_string()),
            (vec![("file", "a"), ("file", "b")], Some("file"), "duplicate key 'file'".to_string()),
        ] {
            let err = print_property_string(&props(&pairs), default).unwrap_err();
            assert!(matches!(err, ConfigError::Unprintable { .. }), "{pairs:?}");
            assert_eq!(err.to_string(), msg, "{pairs:?}");
        }
    }

    /// Issue 9: `volume=` is PVE's alias of `file=`; every reader of a drive must see it.
    #[test]
    fn drive_volume_alias_is_file() {
        assert_eq!(
            parse_drive("volume=/some/path,size=1G").unwrap(),
            props(&[("file", "/some/path"), ("size", "1G")])
        );
        assert_eq!(
            drive_volume("volume=/some/path").as_deref(),
            Some("/some/path")
        );
        assert_eq!(drive_volume("media=cdrom,volume=none"), None);
        for input in ["volume=a,file=b", "file=b,volume=a", "a,volume=b"] {
            let err = parse_drive(input).unwrap_err();
            assert!(
                err.to_string()
                    .contains("duplicate key 'file' ('volume' is an alias of 'file')"),
                "{input}: {err}"
            );
        }
        let conf = VmConfig::parse("scsi0: volume=local:100/vm-100-disk-0.raw\n").unwrap();
        assert_eq!(
            conf.volids(),
            props(&[("scsi0", "local:100/vm-100-disk-0.raw")])
        );
    }

    /// Issue 9: a raw CR or NUL in a value reached the config file.
    #[test]
    fn control_characters_are_refused_in_strict_parsing_and_validation() {
        for (text, shown, code) in [
            ("name: a\rb\n", "a\\rb", "000D"),
            ("cores: 1\nname: a\0b\n", "a\\0b", "0000"),
            (
                "[special:cloudinit]\nipconfig0: ip=dhcp\x1b\n",
                "ip=dhcp\\u{1b}",
                "001B",
            ),
            ("name: a\tb\n", "a\\tb", "0009"),
            ("name: a\u{85}b\n", "a\\u{85}b", "0085"),
        ] {
            let err = VmConfig::parse_strict(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidValue { value, .. } if value == shown),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("U+{code}")), "{err}");
            // lenient parsing (of a file already on disk) still reads it
            VmConfig::parse(text).unwrap();
        }
        // a CR before the line break is trailing whitespace; an encoded description may
        // hold anything
        let conf = VmConfig::parse_strict("#a%0Db\r\nname: x\r\ndescription: c\rd\n").unwrap();
        assert_eq!(conf.options, map(&[("name", "x")]));
        conf.validate().unwrap();
        assert_round_trip(&conf);

        let mut conf = VmConfig::default();
        conf.options.insert("name".into(), "a\rb".into());
        let err = conf.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid config in main section - value of 'name' contains the control character \
             U+000D; values must be printable text"
        );
        conf.options.insert("name".into(), "a\0b".into());
        assert!(conf.validate().is_err());
    }

    /// Issue 17: `unused0: ,,,` (a drive without a volume) and a `[special:cloudinit]`
    /// section holding a host path were accepted by strict parsing and stored.
    #[test]
    fn strict_parsing_refuses_empty_drives_and_host_paths() {
        for (text, line, key, value, reason) in [
            (
                "cores: 1\nunused0: ,,,\n",
                2,
                "unused0",
                ",,,",
                "the drive names no volume",
            ),
            (
                "scsi0: size=1G\n",
                1,
                "scsi0",
                "size=1G",
                "the drive names no volume",
            ),
            (
                "ide2: file=,media=cdrom\n",
                1,
                "ide2",
                "file=,media=cdrom",
                "the drive names no volume",
            ),
            (
                "[PENDING]\nvirtio1: volume= \n",
                2,
                "virtio1",
                "volume=",
                "the drive names no volume",
            ),
            (
                "[special:cloudinit]\nscsi0: /dev/sda\n",
                2,
                "scsi0",
                "/dev/sda",
                "a drive in [special:cloudinit] (it records cloud-init options, not drives)",
            ),
            (
                "[special:cloudinit]\ncicustom: user=/etc/shadow\n",
                2,
                "cicustom",
                "user=/etc/shadow",
                "user: '/etc/shadow' is not a volume ID (<storage>:<volume>); cicustom names \
                 snippets by volume ID, never by host path",
            ),
            (
                "cicustom: meta=local:snippets/m.yaml,vendor=../../etc/passwd\n",
                1,
                "cicustom",
                "meta=local:snippets/m.yaml,vendor=../../etc/passwd",
                "vendor: '../../etc/passwd' is not a volume ID (<storage>:<volume>); cicustom \
                 names snippets by volume ID, never by host path",
            ),
        ] {
            let err = VmConfig::parse_strict(text).unwrap_err();
            assert_eq!(
                err,
                ConfigError::InvalidValue {
                    line,
                    key: key.into(),
                    value: value.into(),
                    reason: reason.into()
                },
                "{text:?}"
            );
            assert_eq!(
                err.to_string(),
                format!("line {line}: invalid value '{value}' for '{key}' - {reason}")
            );
            // a file already on disk still reads
            VmConfig::parse(text).unwrap();
        }
        // What a PVE source sends for a VM with cloud-init passes: the recorded old values
        // of changed cloud-init options, snippets by volume ID, drives with their volumes.
        let conf = VmConfig::parse_strict(
            "\
cicustom: user=local:snippets/user.yaml
ide2: local:100/vm-100-cloudinit.qcow2,media=cdrom
ipconfig0: ip=10.0.0.6/24,gw=10.0.0.1
scsi0: local:100/vm-100-disk-0.raw,size=4G
unused0: local:100/vm-100-disk-1.raw
virtio0: none,media=cdrom

[special:cloudinit]
added: ciuser
cicustom: user=local:snippets/old.yaml,network=nfs.store:snippets/net.yaml
ipconfig0: ip=dhcp
name: vm100
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
",
        )
        .unwrap();
        assert_eq!(conf.special["cloudinit"]["ipconfig0"], "ip=dhcp");
    }

    #[test]
    fn size_parse() {
        let cases = [
            ("32G", Some(32 << 30)),
            ("512M", Some(512 << 20)),
            ("1T", Some(1 << 40)),
            ("4096K", Some(4096 << 10)),
            ("100", Some(100)),
            ("0", Some(0)),
            ("1.5G", Some(3 << 29)),
            ("0.1K", Some(102)),
            ("2.25", Some(2)),
            ("16777215T", Some(16_777_215 << 40)),
            ("18446744073709551615", Some(u64::MAX)),
            ("16777216T", None),
            ("18446744073709551616", None),
            ("", None),
            ("G", None),
            (".5G", None),
            ("1.G", None),
            ("32g", None),
            ("32GB", None),
            ("-1", None),
            (" 1", None),
            ("1P", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_size(input), expected, "{input:?}");
        }
    }

    #[test]
    fn size_format() {
        let cases = [
            (0, "0T"),
            (1, "1"),
            (1023, "1023"),
            (1024, "1K"),
            (1536, "1536"),
            (1025 << 10, "1025K"),
            (512 << 20, "512M"),
            (32 << 30, "32G"),
            (1 << 40, "1T"),
            (1536 << 30, "1536G"),
            (u64::MAX, "18446744073709551615"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(format_size(bytes), expected, "{bytes}");
            assert_eq!(parse_size(expected), Some(bytes));
        }
    }

    #[test]
    fn drive_keys() {
        for key in [
            "ide0",
            "ide3",
            "sata0",
            "sata5",
            "scsi0",
            "scsi10",
            "scsi30",
            "virtio0",
            "virtio15",
            "efidisk0",
            "tpmstate0",
            "unused0",
            "unused255",
        ] {
            assert!(is_drive_key(key), "{key}");
        }
        for key in [
            "ide4",
            "sata6",
            "scsi31",
            "virtio16",
            "unused256",
            "efidisk1",
            "tpmstate1",
            "scsi01",
            "scsi",
            "net0",
            "ide",
            "scsi-1",
            "scsihw",
            "ide2a",
        ] {
            assert!(!is_drive_key(key), "{key}");
        }
    }

    #[test]
    fn drive_volumes_and_volids() {
        assert_eq!(
            drive_volume("local-lvm:vm-100-disk-0,size=4G").as_deref(),
            Some("local-lvm:vm-100-disk-0")
        );
        assert_eq!(
            drive_volume("media=cdrom,file=local:iso/x.iso").as_deref(),
            Some("local:iso/x.iso")
        );
        assert_eq!(drive_volume("none,media=cdrom"), None);
        assert_eq!(drive_volume("cdrom,media=cdrom"), None);
        assert_eq!(drive_volume("/dev/sdb").as_deref(), Some("/dev/sdb"));
        assert_eq!(drive_volume("size=4G"), None);

        assert_eq!(
            parse_volume_id("local-lvm:vm-1-disk-0"),
            Some(("local-lvm", "vm-1-disk-0"))
        );
        assert_eq!(parse_volume_id("/dev/sdb"), None);
        assert_eq!(parse_volume_id("a:x"), None);
        assert_eq!(parse_volume_id("local-:x"), None);
        assert_eq!(parse_volume_id("local:"), None);

        let conf = VmConfig::parse(
            "\
efidisk0: local:100/vm-100-disk-1.raw,efitype=4m,size=528K
ide2: none,media=cdrom
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
sata0: /dev/disk/by-id/ata-XYZ,size=1T
scsi1: file=nfs.store:100/vm-100-disk-2.qcow2,format=qcow2
scsi0: local-lvm:vm-100-disk-0,size=32G
unused0: local-lvm:vm-100-disk-3
virtio0: cdrom,media=cdrom
",
        )
        .unwrap();
        assert_eq!(
            conf.volids(),
            props(&[
                ("efidisk0", "local:100/vm-100-disk-1.raw"),
                ("scsi0", "local-lvm:vm-100-disk-0"),
                ("scsi1", "nfs.store:100/vm-100-disk-2.qcow2"),
                ("unused0", "local-lvm:vm-100-disk-3"),
            ])
        );
    }
}

#[cfg(test)]
mod prop_tests;
