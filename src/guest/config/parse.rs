//! Reading a config's text: section headers, option lines, description comments (decoded
//! with [`decode_text`]) and the digest, in upstream's lenient or strict mode. Nothing is
//! written or validated beyond what parsing itself refuses.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sha1::{Digest, Sha1};

use super::{
    ConfigError, RESERVED_KEYS, SPECIAL_SECTIONS, Section, Snapshot, VmConfig, check_strict,
    check_value, control_char, control_char_reason, is_config_id, is_option_key, is_perl_space,
};

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
    /// with a control character (C0 such as CR or NUL, DEL, C1; shown escaped in the error),
    /// a drive without a volume, a drive in `[special:cloudinit]` and a `cicustom` part
    /// that is a host path rather than a volume ID.
    /// This is upstream's strict mode, used by the tunnel `config` command on the text sent
    /// by the source. Comment and `description:` text may hold anything: it is written
    /// percent-encoded.
    pub fn parse_strict(text: &str) -> Result<VmConfig, ConfigError> {
        parse_config(text, true)
    }
}

/// A recognised section header line.
enum Header<'a> {
    Pending,
    Special(String),
    Snapshot(&'a str),
    Unknown(&'a str),
}

pub(super) fn parse_config(text: &str, strict: bool) -> Result<VmConfig, ConfigError> {
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
            section = open_section(&mut conf, header, lineno, strict, &mut seen_pending)?;
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
        store_option(&mut conf, &section, (key, value), lineno, strict)?;
    }
    finish_description(&mut conf, &section, descr);
    Ok(conf)
}

/// The section a header line opens (its entry created); a section seen before is an error,
/// and so is an unknown one when parsing strictly (else it is skipped with a warning).
fn open_section(
    conf: &mut VmConfig,
    header: Header<'_>,
    lineno: usize,
    strict: bool,
    seen_pending: &mut bool,
) -> Result<Section, ConfigError> {
    Ok(match header {
        Header::Pending => {
            if *seen_pending {
                return Err(ConfigError::DuplicateSection {
                    line: lineno,
                    section: "[PENDING]".to_string(),
                });
            }
            *seen_pending = true;
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
    })
}

/// Checks one `key: value` line (not `description`, which the caller collects) and stores it
/// in `section`'s options.
fn store_option(
    conf: &mut VmConfig,
    section: &Section,
    (key, value): (&str, &str),
    lineno: usize,
    strict: bool,
) -> Result<(), ConfigError> {
    if key == "delete" && *section != Section::Pending {
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
    if strict {
        check_strict(section, key, value).map_err(bad_value)?;
    }
    if key == "snapstate" && *section == Section::Main {
        // upstream drops a left-over snapshot state of the main section
        return Ok(());
    }
    let key = if key == "cdrom" { "ide2" } else { key };

    let map = section_options(conf, section);
    if map.contains_key(key) {
        return Err(ConfigError::DuplicateKey {
            line: lineno,
            key: key.to_string(),
            section: section.label(),
        });
    }
    map.insert(key.to_string(), value.to_string());
    Ok(())
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

pub(super) fn sha1_hex(data: &[u8]) -> String {
    let mut hex = String::with_capacity(40);
    for byte in Sha1::digest(data) {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
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
