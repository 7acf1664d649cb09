//! Storage definitions and the volume layer: which storages a node has, what they may hold,
//! and (in [`dir`]) how volumes are allocated, freed, resolved and imported with `qemu-img`.
//!
//! This module knows nothing of tunnels or HTTP; callers pass a VMID and get volids back.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One storage of this node, as written in the `[storage.<id>]` table of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDef {
    #[serde(rename = "type")]
    pub kind: StorageKind,
    /// Base directory of a `dir` storage; images live in `{path}/images/{vmid}/`.
    pub path: PathBuf,
    /// Content types, e.g. `["images"]`.
    #[serde(default = "default_content")]
    pub content: Vec<String>,
    #[serde(default)]
    pub disable: bool,
    /// Per-operation bandwidth limits in KiB/s (PVE's `bwlimit` option).
    #[serde(default)]
    pub bwlimit: BTreeMap<String, u64>,
}

fn default_content() -> Vec<String> {
    vec!["images".to_string()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Dir,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Dir => "dir",
        }
    }
}

impl StorageDef {
    pub fn holds_images(&self) -> bool {
        self.content.iter().any(|c| c == "images")
    }
}

/// PVE storage ids: `^[a-z][a-z0-9\-_.]*[a-z0-9]$`.
pub fn is_valid_storage_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(c))
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
}

/// Splits a `pve-storage-id-list` / `pve-bridge-id-list` (separators `,`, `;`, whitespace).
pub fn split_id_list(list: &str) -> Vec<&str> {
    list.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}
