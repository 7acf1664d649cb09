//! Identifiers every layer checks, each defined once as PVE's JSON-schema formats define
//! it: VMIDs (`pve-vmid`), configuration ids (`pve-configid`: snapshot names), VM config
//! option keys, storage ids (`pve-storage-id`), bridge ids (`pve-bridge-id`), node names
//! (`pve-node`) and API token ids (`pve-tokenid`). Pure functions over strings; the
//! callers choose the error text.

/// `pve-vmid`: `^[1-9][0-9]{2,8}$`, i.e. 100..=999999999.
pub fn is_vmid(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=9).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit)
}

/// A VMID given as text, if it is one (see [`is_vmid`]).
pub fn parse_vmid(s: &str) -> Option<u32> {
    if is_vmid(s) { s.parse().ok() } else { None }
}

/// `pve-configid`: `^[a-z][a-z0-9_-]+$`, case-insensitive (snapshot names).
pub fn is_config_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphabetic()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// A VM config option key: `[a-z][a-z_\-]*\d*` (`memory`, `net0`, `vmstate`, ...).
pub fn is_option_key(key: &str) -> bool {
    let Some((first, rest)) = key.as_bytes().split_first() else {
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

/// `pve-storage-id`: `^[a-z][a-z0-9\-_.]*[a-z0-9]$`.
pub fn is_storage_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(c))
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
}

/// `pve-bridge-id`: `^[-_.\w\d]+$` (at most 64 characters).
pub fn is_bridge_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Splits a `pve-storage-id-list` / `pve-bridge-id-list` (separators `,`, `;`, whitespace).
pub fn split_id_list(list: &str) -> Vec<&str> {
    // NUL: how proxmox-client (PDM) joins list values in a query.
    list.split(|c: char| c == ',' || c == ';' || c == '\0' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `pve-node`: `^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$`, at most 63 characters.
pub fn is_node_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// `pve-tokenid`: `user@realm!tokenname`.
pub fn is_token_id(authid: &str) -> bool {
    let Some((userid, name)) = authid.split_once('!') else {
        return false;
    };
    let Some((user, realm)) = userid.rsplit_once('@') else {
        return false;
    };
    let ident = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    !user.is_empty()
        && user.len() <= 60
        && !user
            .chars()
            .any(|c| c.is_whitespace() || ":/@!".contains(c))
        && ident(realm)
        && ident(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmids() {
        assert_eq!(parse_vmid("100"), Some(100));
        assert_eq!(parse_vmid("999999999"), Some(999_999_999));
        for bad in ["", "99", "0100", "1000000000", "1e3", "+100", " 100"] {
            assert!(!is_vmid(bad), "{bad}");
        }
    }

    #[test]
    fn config_ids_and_keys() {
        assert!(is_config_id("Snap_1-a"));
        assert!(!is_config_id("a") && !is_config_id("1a") && !is_config_id("a.b"));
        assert!(is_option_key("net0") && is_option_key("scsihw") && is_option_key("a-b_c12"));
        assert!(!is_option_key("Net0") && !is_option_key("net0a") && !is_option_key(""));
    }

    #[test]
    fn storage_bridge_node() {
        assert!(is_storage_id("local-lvm") && !is_storage_id("l") && !is_storage_id("a-"));
        assert!(is_bridge_id("vmbr0.10") && !is_bridge_id("vmbr 0"));
        assert!(is_node_name("pve-1") && !is_node_name("-pve") && !is_node_name("a.b"));
    }
}
