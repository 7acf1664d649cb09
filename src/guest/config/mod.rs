//! VM configs in qemu-server's file format (`/etc/pve/qemu-server/<vmid>.conf`): parsing and
//! writing, faithful to upstream `PVE::QemuServer::parse_vm_config` / `write_vm_config`, plus
//! the small value helpers the tunnel handlers need (property strings, disk sizes, drive keys,
//! volume IDs, the percent-encoding of description comments).
//!
//! This module is text in, text out. It reads and writes no files, takes no locks, knows no
//! storage, and does not check values against the qemu-server schema: apart from the section
//! structure it only checks the `lock` and `vmid` values (and, when parsing strictly or
//! validating, that no value holds a control character). Which options a VM may have and
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

/// Values accepted for the `lock` option (qemu-server's `pve-qm-lock` enum).
pub const LOCK_VALUES: &[&str] = &[
    "backup",
    "clone",
    "create",
    "migrate",
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

/// `[a-z][a-z_\-]*\d*`
fn is_option_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let Some((first, rest)) = bytes.split_first() else {
        return false;
    };
    if !first.is_ascii_lowercase() {
        return false;
    }
    let letters = rest
        .iter()
        .take_while(|b| b.is_ascii_lowercase() || **b == b'_' || **b == b'-')
        .count();
    rest[letters..].iter().all(u8::is_ascii_digit)
}

/// PVE's configuration ID (`[a-z][a-z0-9_\-]+`, case-insensitive), used for snapshot names.
fn is_config_id(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphabetic()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
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

/// `^[1-9][0-9]{2,8}$` (pve-common's `pve-vmid` format).
fn is_vmid(value: &str) -> bool {
    let bytes = value.as_bytes();
    (3..=9).contains(&bytes.len()) && bytes[0] != b'0' && bytes.iter().all(u8::is_ascii_digit)
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
mod tests;

#[cfg(test)]
mod prop_tests;
