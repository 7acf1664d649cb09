//! Writing a config as text in qemu-server's layout (description comments encoded with
//! [`encode_text`]) and [`VmConfig::validate`], the check that a config built in memory
//! reads back unchanged once written.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{
    ConfigError, RESERVED_KEYS, SPECIAL_SECTIONS, Section, VmConfig, check_value, control_char,
    control_char_reason, invalid, is_config_id, is_option_key, is_perl_space,
};

impl VmConfig {
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
