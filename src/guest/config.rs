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

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha1::{Digest, Sha1};

use crate::ident::{is_config_id, is_option_key, is_vmid};

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

/// A recognised section header line.
enum Header<'a> {
    Pending,
    Special(String),
    Snapshot(&'a str),
    Unknown(&'a str),
}

impl VmConfig {
    /// Parses a config file, skipping unknown sections with a warning in the log.
    ///
    /// # Errors
    /// A line that matches nothing, a duplicate key or section, `delete:` outside
    /// `[PENDING]`, a reserved key, or a bad `lock` / `vmid` value; the error names the
    /// 1-based line number and the offending text.
    pub fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        parse_config(text, false)
    }

    /// Like [`VmConfig::parse`], but an unknown section is an error too, and so is a value
    /// with a control character (C0 such as CR or NUL, DEL, C1; shown escaped in the error).
    /// This is upstream's strict mode, used by the tunnel `config` command on the text sent
    /// by the source. Comment and `description:` text may hold anything: it is written
    /// percent-encoded.
    pub fn parse_strict(text: &str) -> Result<VmConfig, ConfigError> {
        parse_config(text, true)
    }

    /// Renders the config in qemu-server's layout: description comments, options sorted by
    /// key, then `[PENDING]` (if not empty), `[special:<name>]` sections and snapshots, each
    /// section after an empty line.
    ///
    /// Nothing is checked here; a config built in memory should pass [`VmConfig::validate`]
    /// first, otherwise the text may not parse back to the same config.
    pub fn write(&self) -> String {
        let mut out = String::new();
        write_section(
            &mut out,
            self.description.as_deref(),
            &self.options,
            WriteMode::Main,
        );
        if !self.pending.is_empty() {
            out.push_str("\n[PENDING]\n");
            let descr = self.pending.get("description").map(String::as_str);
            write_section(&mut out, descr, &self.pending, WriteMode::Pending);
        }
        for (name, options) in &self.special {
            let _ = write!(out, "\n[special:{name}]\n");
            let descr = options.get("description").map(String::as_str);
            write_section(&mut out, descr, options, WriteMode::Other);
        }
        for (name, snap) in &self.snapshots {
            let _ = write!(out, "\n[{name}]\n");
            write_section(
                &mut out,
                snap.description.as_deref(),
                &snap.options,
                WriteMode::Other,
            );
        }
        out
    }

    /// Checks that [`VmConfig::write`] can represent this config, so that parsing the written
    /// text gives the same config back.
    ///
    /// # Errors
    /// A key outside `[a-z][a-z_-]*\d*`, a reserved or un-normalised key (`cdrom`), an empty
    /// or multi-line value or one with surrounding whitespace or a control character (so no
    /// raw CR or NUL is ever written), `delete` outside pending, a bad
    /// `lock`/`vmid` value, a bad snapshot name or an unknown special section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_description(&Section::Main, self.description.as_deref())?;
        check_section(&Section::Main, &self.options)?;
        check_section(&Section::Pending, &self.pending)?;
        for (name, options) in &self.special {
            let section = Section::Special(name.clone());
            if !SPECIAL_SECTIONS.contains(&name.as_str()) {
                return Err(invalid(&section, "unknown special section".to_string()));
            }
            check_section(&section, options)?;
        }
        for (name, snap) in &self.snapshots {
            let section = Section::Snapshot(name.clone());
            if !is_config_id(name) || name.eq_ignore_ascii_case("pending") {
                return Err(invalid(
                    &section,
                    "snapshot names must match [a-z][a-z0-9_-]+ and not be 'pending'".to_string(),
                ));
            }
            check_description(&section, snap.description.as_deref())?;
            check_section(&section, &snap.options)?;
        }
        Ok(())
    }

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

fn parse_config(text: &str, strict: bool) -> Result<VmConfig, ConfigError> {
    let mut conf = VmConfig {
        digest: sha1_hex(text.as_bytes()),
        ..VmConfig::default()
    };
    let mut section = Section::Main;
    let mut descr: Option<String> = None;
    let mut seen_pending = false;

    for (index, line) in text.split('\n').enumerate() {
        let lineno = index + 1;
        if line.chars().all(is_perl_space) {
            continue;
        }

        if let Some(header) = parse_header(line) {
            finish_description(&mut conf, &section, descr.take());
            section = match header {
                Header::Pending => {
                    if seen_pending {
                        return Err(ConfigError::DuplicateSection {
                            line: lineno,
                            section: "[PENDING]".to_string(),
                        });
                    }
                    seen_pending = true;
                    Section::Pending
                }
                Header::Special(name) => {
                    if conf.special.contains_key(&name) {
                        return Err(ConfigError::DuplicateSection {
                            line: lineno,
                            section: format!("[special:{name}]"),
                        });
                    }
                    conf.special.insert(name.clone(), BTreeMap::new());
                    Section::Special(name)
                }
                Header::Snapshot(name) => {
                    if conf.snapshots.contains_key(name) {
                        return Err(ConfigError::DuplicateSection {
                            line: lineno,
                            section: format!("[{name}]"),
                        });
                    }
                    conf.snapshots.insert(name.to_string(), Snapshot::default());
                    Section::Snapshot(name.to_string())
                }
                Header::Unknown(name) => {
                    if strict {
                        return Err(ConfigError::UnknownSection {
                            line: lineno,
                            name: name.to_string(),
                        });
                    }
                    tracing::warn!(line = lineno, section = name, "skipping unknown section");
                    Section::Skipped
                }
            };
            continue;
        }

        if section == Section::Skipped {
            continue;
        }

        if let Some(comment) = line.strip_prefix('#') {
            let d = descr.get_or_insert_with(String::new);
            d.push_str(&decode_text(comment));
            d.push('\n');
            continue;
        }

        let Some((key, value)) = split_option_line(line) else {
            return Err(ConfigError::BadLine {
                line: lineno,
                text: line.to_string(),
            });
        };

        if key == "description" {
            // upstream appends the decoded value without a line break
            descr
                .get_or_insert_with(String::new)
                .push_str(&decode_text(value));
            continue;
        }
        if key == "delete" && section != Section::Pending {
            return Err(ConfigError::DeleteOutsidePending {
                line: lineno,
                section: section.label(),
            });
        }
        let bad_value = |reason: String| ConfigError::InvalidValue {
            line: lineno,
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        if RESERVED_KEYS.contains(&key) {
            return Err(bad_value("reserved key, not a config option".to_string()));
        }
        if strict && let Some(c) = control_char(value) {
            // a raw CR or NUL must never reach the file; the value is shown escaped
            return Err(ConfigError::InvalidValue {
                line: lineno,
                key: key.to_string(),
                value: value.escape_debug().to_string(),
                reason: control_char_reason(c),
            });
        }
        if !matches!(section, Section::Special(_)) {
            check_value(key, value).map_err(bad_value)?;
        }
        if key == "snapstate" && section == Section::Main {
            // upstream drops a left-over snapshot state of the main section
            continue;
        }
        let key = if key == "cdrom" { "ide2" } else { key };

        let map = section_options(&mut conf, &section);
        if map.contains_key(key) {
            return Err(ConfigError::DuplicateKey {
                line: lineno,
                key: key.to_string(),
                section: section.label(),
            });
        }
        map.insert(key.to_string(), value.to_string());
    }
    finish_description(&mut conf, &section, descr);
    Ok(conf)
}

/// The option map of `section`; the section entry was created when its header was read.
fn section_options<'a>(
    conf: &'a mut VmConfig,
    section: &Section,
) -> &'a mut BTreeMap<String, String> {
    match section {
        Section::Main | Section::Skipped => &mut conf.options,
        Section::Pending => &mut conf.pending,
        Section::Special(name) => conf.special.entry(name.clone()).or_default(),
        Section::Snapshot(name) => &mut conf.snapshots.entry(name.clone()).or_default().options,
    }
}

/// Stores the comment block collected for `section` (trailing whitespace removed, as
/// upstream). An empty block is kept only in `[PENDING]`, where it means "clear the
/// description".
fn finish_description(conf: &mut VmConfig, section: &Section, descr: Option<String>) {
    let Some(descr) = descr else { return };
    let descr = descr.trim_end_matches(is_perl_space).to_string();
    match section {
        Section::Main if !descr.is_empty() => conf.description = Some(descr),
        Section::Pending => {
            conf.pending.insert("description".to_string(), descr);
        }
        Section::Special(name) if !descr.is_empty() => {
            conf.special
                .entry(name.clone())
                .or_default()
                .insert("description".to_string(), descr);
        }
        Section::Snapshot(name) if !descr.is_empty() => {
            conf.snapshots.entry(name.clone()).or_default().description = Some(descr);
        }
        _ => {}
    }
}

/// Recognises `[PENDING]`, `[special:<name>]`, `[<snapshot>]` and any other `[...]` line
/// (trailing whitespace allowed, as upstream's `\]\s*$`).
fn parse_header(line: &str) -> Option<Header<'_>> {
    let inner = line
        .trim_end_matches(is_perl_space)
        .strip_prefix('[')?
        .strip_suffix(']')?;
    if inner.contains(']') {
        return None;
    }
    if inner.eq_ignore_ascii_case("PENDING") {
        return Some(Header::Pending);
    }
    if let Some(prefix) = inner.get(..8)
        && prefix.eq_ignore_ascii_case("special:")
    {
        let name = inner[8..].to_ascii_lowercase();
        if SPECIAL_SECTIONS.contains(&name.as_str()) {
            return Some(Header::Special(name));
        }
        return Some(Header::Unknown(inner));
    }
    if is_config_id(inner) {
        return Some(Header::Snapshot(inner));
    }
    Some(Header::Unknown(inner))
}

/// Splits `^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$` into key and value.
fn split_option_line(line: &str) -> Option<(&str, &str)> {
    let (key, rest) = line.split_once(':')?;
    if !is_option_key(key) {
        return None;
    }
    let value = rest.trim_matches(is_perl_space);
    if value.is_empty() {
        return None;
    }
    Some((key, value))
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

fn invalid(section: &Section, reason: String) -> ConfigError {
    ConfigError::Invalid {
        section: section.label(),
        reason,
    }
}

/// A description reads back unchanged unless it ends in whitespace (the parser trims it) or
/// is empty outside `[PENDING]` (not written at all).
fn check_description(section: &Section, descr: Option<&str>) -> Result<(), ConfigError> {
    let Some(descr) = descr else { return Ok(()) };
    if descr.trim_end_matches(is_perl_space).len() != descr.len() {
        return Err(invalid(
            section,
            "the description must not end in whitespace".to_string(),
        ));
    }
    if descr.is_empty() && *section != Section::Pending {
        return Err(invalid(
            section,
            "an empty description is not written; use None".to_string(),
        ));
    }
    Ok(())
}

fn check_section(section: &Section, options: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (key, value) in options {
        let description_here =
            key == "description" && matches!(section, Section::Pending | Section::Special(_));
        if description_here {
            check_description(section, Some(value))?;
            continue;
        }
        if !is_option_key(key) {
            return Err(invalid(
                section,
                format!("key '{key}' does not match [a-z][a-z_-]*[0-9]*"),
            ));
        }
        if RESERVED_KEYS.contains(&key.as_str()) {
            return Err(invalid(
                section,
                format!("key '{key}' is reserved, not a config option"),
            ));
        }
        if key == "cdrom" {
            return Err(invalid(
                section,
                "use 'ide2' instead of 'cdrom'".to_string(),
            ));
        }
        if key == "delete" && *section != Section::Pending {
            return Err(invalid(
                section,
                "property 'delete' is only allowed in [PENDING]".to_string(),
            ));
        }
        if value.is_empty()
            || value.contains('\n')
            || value.trim_matches(is_perl_space).len() != value.len()
        {
            return Err(invalid(
                section,
                format!(
                    "value of '{key}' must be one non-empty line without surrounding whitespace"
                ),
            ));
        }
        if let Some(c) = control_char(value) {
            return Err(invalid(
                section,
                format!("value of '{key}' {}", control_char_reason(c)),
            ));
        }
        if !matches!(section, Section::Special(_)) {
            check_value(key, value)
                .map_err(|reason| invalid(section, format!("'{key}': {reason}")))?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    Main,
    Pending,
    Other,
}

fn write_section(
    out: &mut String,
    description: Option<&str>,
    options: &BTreeMap<String, String>,
    mode: WriteMode,
) {
    if let Some(descr) = description {
        if descr.is_empty() {
            if mode == WriteMode::Pending {
                out.push_str("#\n");
            }
        } else {
            let mut lines: Vec<&str> = descr.split('\n').collect();
            while lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop();
            }
            for line in lines {
                out.push('#');
                out.push_str(&encode_text(line));
                out.push('\n');
            }
        }
    }
    for (key, value) in options {
        if RESERVED_KEYS.contains(&key.as_str()) {
            continue;
        }
        if mode == WriteMode::Main && key == "snapstate" {
            continue;
        }
        let _ = writeln!(out, "{key}: {value}");
    }
}

/// Perl's `\s` on bytes: space, `\t`, `\n`, vertical tab, form feed, `\r`.
fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn sha1_hex(data: &[u8]) -> String {
    let mut hex = String::with_capacity(40);
    for byte in Sha1::digest(data) {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Percent-encodes one description line for a `#` comment (PVE::Tools::encode_text).
///
/// The UTF-8 bytes outside `0x20..=0x7e` (control characters and everything non-ASCII) and
/// `:` become `%XX` (upper-case hex). Upstream leaves `%` alone, which makes `%` followed by
/// two hex digits decode to a different text; this encoder writes such a `%` as `%25`, which
/// upstream's decoder reads back correctly. Every other `%` stays as upstream writes it.
pub fn encode_text(line: &str) -> String {
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for (i, &byte) in bytes.iter().enumerate() {
        let safe = matches!(byte, 0x20..=0x39 | 0x3b..=0x7e);
        let ambiguous_percent = byte == b'%'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if safe && !ambiguous_percent {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Decodes a `#` comment line (PVE::Tools::decode_text): every `%XX` becomes its byte, other
/// `%` stay, and the bytes are read as UTF-8 (invalid sequences become U+FFFD).
pub fn decode_text(data: &str) -> String {
    let bytes = data.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex_value(*b)),
                bytes.get(i + 2).and_then(|b| hex_value(*b)),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Splits a property string into `(key, value)` pairs in input order.
///
/// Parts are separated by `,`; a part without `=` is the value of `default_key` (e.g. `file`
/// for drives). Blank parts are skipped, as upstream. A value (or a key-less part) starting
/// with `"` is a quoted string that may contain `,` and `=`, with escapes `\"`, `\\`, `\n`
/// (the quoting of Proxmox's Rust property strings; PVE's Perl never writes quotes).
///
/// # Errors
/// A duplicate key (the default key given twice counts), a key-less value without a default
/// key, an empty key, an unterminated quote or text after a closing quote.
pub fn parse_property_string(
    s: &str,
    default_key: Option<&str>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let fail = |reason: String| ConfigError::PropertyString {
        input: s.to_string(),
        reason,
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let part_end = rest.find(',').unwrap_or(rest.len());
        let part = &rest[..part_end];
        let (key, value) = match part.find('=').filter(|_| !part.starts_with('"')) {
            Some(eq) => {
                let key = &part[..eq];
                if key.is_empty() {
                    return Err(fail(format!("missing key before '=' in '{part}'")));
                }
                let after = &rest[eq + 1..];
                if after.starts_with('"') {
                    rest = after;
                    (Some(key), take_quoted(&mut rest).map_err(&fail)?)
                } else {
                    rest = rest.get(part_end + 1..).unwrap_or("");
                    (Some(key), part[eq + 1..].to_string())
                }
            }
            None if part.starts_with('"') => (None, take_quoted(&mut rest).map_err(&fail)?),
            None => {
                rest = rest.get(part_end + 1..).unwrap_or("");
                if part.chars().all(is_perl_space) {
                    continue;
                }
                (None, part.to_string())
            }
        };
        let key = match key {
            Some(key) => key,
            None => default_key.ok_or_else(|| {
                fail(format!(
                    "value '{value}' has no key and this property has no default key"
                ))
            })?,
        };
        if out.iter().any(|(k, _)| k == key) {
            return Err(fail(format!("duplicate key '{key}'")));
        }
        out.push((key.to_string(), value));
    }
    Ok(out)
}

/// Reads a quoted string at the start of `rest` and moves `rest` past it and the following
/// `,`.
fn take_quoted(rest: &mut &str) -> Result<String, String> {
    let mut value = String::new();
    let mut chars = rest.char_indices().skip(1);
    let end = loop {
        match chars.next() {
            None => return Err("unterminated quoted string".to_string()),
            Some((i, '"')) => break i + 1,
            Some((_, '\\')) => match chars.next() {
                Some((_, '"')) => value.push('"'),
                Some((_, '\\')) => value.push('\\'),
                Some((_, 'n')) => value.push('\n'),
                Some((_, c)) => return Err(format!("unsupported escape sequence '\\{c}'")),
                None => return Err("unterminated quoted string".to_string()),
            },
            Some((_, c)) => value.push(c),
        }
    };
    let after = &rest[end..];
    *rest = if after.is_empty() {
        after
    } else if let Some(next) = after.strip_prefix(',') {
        next
    } else {
        return Err(format!("unexpected text after quoted string: '{after}'"));
    };
    Ok(value)
}

/// Prints `(key, value)` pairs as a property string the way PVE's `print_drive` does: the
/// value of `default_key` first without `key=`, then the other pairs sorted by key.
///
/// Like PVE's `print_property_string`, nothing is quoted: a pair that would not read back
/// unchanged through [`parse_property_string`] (and through PVE's Perl parser, which knows no
/// quotes) is refused instead.
///
/// # Errors
/// [`ConfigError::Unprintable`] for a key that is empty or holds anything but ASCII letters,
/// digits, `_`, `-`, `.` (`invalid key '<key>'`); a value with a comma (PVE's `illegal value
/// with commas for <key>`); an empty or blank value, one with a control character, one
/// starting with `"`, or a key-less value with `=`.
pub fn print_property_string(
    props: &[(String, String)],
    default_key: Option<&str>,
) -> Result<String, ConfigError> {
    let mut parts = Vec::with_capacity(props.len());
    if let Some(default_key) = default_key
        && let Some((_, value)) = props.iter().find(|(k, _)| k == default_key)
    {
        check_printable(default_key, value, true)?;
        parts.push(value.clone());
    }
    let mut rest: Vec<&(String, String)> = props
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != default_key)
        .collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    let default_twice =
        default_key.is_some_and(|d| props.iter().filter(|(k, _)| k == d).count() > 1);
    let twice = rest.windows(2).find(|w| w[0].0 == w[1].0).map(|w| &w[0].0);
    if let Some(key) = twice
        .map(String::as_str)
        .or(default_key.filter(|_| default_twice))
    {
        return Err(ConfigError::Unprintable {
            key: key.to_string(),
            reason: format!("duplicate key '{key}'"),
        });
    }
    for (key, value) in rest {
        check_printable(key, value, false)?;
        parts.push(format!("{key}={value}"));
    }
    Ok(parts.join(","))
}

/// Whether `key=value` (or a key-less `value`) reads back as exactly this pair.
fn check_printable(key: &str, value: &str, keyless: bool) -> Result<(), ConfigError> {
    let refuse = |reason: String| {
        Err(ConfigError::Unprintable {
            key: key.to_string(),
            reason,
        })
    };
    let key_ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !key_ok {
        return refuse(format!(
            "invalid key '{}' - property keys are made of letters, digits, '_', '-' and '.'",
            key.escape_debug()
        ));
    }
    if value.contains(',') {
        return refuse(format!("illegal value with commas for {key}"));
    }
    if value.chars().all(is_perl_space) {
        return refuse(format!("illegal empty value for {key}"));
    }
    if let Some(c) = control_char(value) {
        return refuse(format!(
            "illegal value for {key} - {}",
            control_char_reason(c)
        ));
    }
    if value.starts_with('"') {
        return refuse(format!(
            "illegal value for {key} - a value must not start with '\"'"
        ));
    }
    if keyless && value.contains('=') {
        return refuse(format!(
            "illegal value with '=' for {key} (it would read back as a key)"
        ));
    }
    Ok(())
}

/// Bytes of a PVE disk size: digits with an optional fraction and an optional unit `K`, `M`,
/// `G`, `T` (powers of 1024), e.g. `32G`, `1.5G`, `4096K`, `100` (bytes). A fraction is
/// truncated to whole bytes, as upstream's `int()`. `None` for anything else or on overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let (number, shift) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut bytes: u128 = 0;
    for digit in int_part.bytes() {
        bytes = bytes
            .checked_mul(10)?
            .checked_add(u128::from(digit - b'0'))?;
        if bytes > u128::from(u64::MAX) {
            return None;
        }
    }
    let mut bytes = bytes << shift;
    if let Some(frac) = frac_part {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // 26 decimal places keep numerator * 2^40 inside u128; more cannot change the result
        // by a byte for any size anyone writes.
        let mut numerator: u128 = 0;
        let mut denominator: u128 = 1;
        for digit in frac.bytes().take(26) {
            numerator = numerator * 10 + u128::from(digit - b'0');
            denominator *= 10;
        }
        bytes += (numerator << shift) / denominator;
    }
    u64::try_from(bytes).ok()
}

/// Renders bytes as PVE does (`PVE::JSONSchema::format_size`): with the largest of `T`, `G`,
/// `M`, `K` that divides the size exactly, else as plain bytes. Like upstream, `0` is `0T`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Whether `key` names a disk drive option: `ide0`-`ide3`, `sata0`-`sata5`, `scsi0`-`scsi30`,
/// `virtio0`-`virtio15`, `efidisk0`, `tpmstate0`, or `unused0`-`unused255`.
pub fn is_drive_key(key: &str) -> bool {
    const INDEXED: [(&str, u32); 5] = [
        ("ide", 3),
        ("sata", 5),
        ("scsi", 30),
        ("virtio", 15),
        ("unused", 255),
    ];
    if key == "efidisk0" || key == "tpmstate0" {
        return true;
    }
    INDEXED.iter().any(|(prefix, max)| {
        key.strip_prefix(prefix).is_some_and(|index| {
            !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && (index == "0" || !index.starts_with('0'))
                && index.parse::<u32>().is_ok_and(|n| n <= *max)
        })
    })
}

/// Parses a drive value (`scsi0`, `ide2`, `unused0`, ...): a property string whose key-less
/// element is `file`, with PVE's alias `volume=` read as `file=` (as qemu-server's drive
/// schema does), so that every check on `file` sees the volume however it was written.
///
/// # Errors
/// Those of [`parse_property_string`]; `volume` together with `file` (or a key-less volume)
/// is a duplicate key `file`.
pub fn parse_drive(value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut props = parse_property_string(value, Some("file"))?;
    if let Some(i) = props.iter().position(|(k, _)| k == "volume") {
        if props.iter().any(|(k, _)| k == "file") {
            return Err(ConfigError::PropertyString {
                input: value.to_string(),
                reason: "duplicate key 'file' ('volume' is an alias of 'file')".to_string(),
            });
        }
        props[i].0 = "file".to_string();
    }
    Ok(props)
}

/// The volume of a drive value: its `file` (the first, key-less element of the property
/// string, `file=` or `volume=`). `None` for `none` and `cdrom` (no medium, host drive), for
/// an empty or malformed value.
pub fn drive_volume(value: &str) -> Option<String> {
    let props = parse_drive(value).ok()?;
    let (_, file) = props.into_iter().find(|(k, _)| k == "file")?;
    match file.as_str() {
        "" | "none" | "cdrom" => None,
        _ => Some(file),
    }
}

/// Splits a volume ID `<storage>:<volname>` into its parts (`PVE::Storage::parse_volume_id`:
/// the storage ID matches `[a-z][a-z0-9._-]*[a-z0-9]`, case-insensitive). `None` for paths
/// and anything else.
pub fn parse_volume_id(volid: &str) -> Option<(&str, &str)> {
    let (storage, name) = volid.split_once(':')?;
    let bytes = storage.as_bytes();
    let valid_storage = bytes.len() >= 2
        && bytes[0].is_ascii_alphabetic()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (valid_storage && !name.is_empty()).then_some((storage, name))
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
