//! Property strings (`key=value,...`, the crate's one parser and printer) and the value
//! helpers built on them: disk sizes, drive keys, a drive's volume, volume IDs.

use super::{ConfigError, control_char, control_char_reason, is_perl_space};

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
