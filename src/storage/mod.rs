//! Storage definitions and the volume layer: which storages a node has, what they may hold,
//! the [`Storage`] backend trait every layer above talks to, volume ids and image names with
//! PVE's rules, and the [`StorageError`] type. The real backend ([`NodeStorage`], `dir`
//! storages over `qemu-img`) is in [`dir`]; it hands `btrfs` storages (one subvolume per
//! disk) to [`btrfs`]. The `raw+size` / `qcow2+size` stream reader is in [`import`].
//!
//! This module knows nothing of tunnels or HTTP; callers pass a VMID and get volids back.

pub mod btrfs;
pub mod dir;
pub mod image;
pub mod import;
mod plugin;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

pub use dir::NodeStorage;

/// One storage of this node, as written in the `[storage.<id>]` table of the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageDef {
    #[serde(rename = "type")]
    pub kind: StorageKind,
    /// Base directory of the storage; images live in `{path}/images/{vmid}/` (for `btrfs`,
    /// each in a subvolume of its own there).
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
    /// PVE's `btrfs` layout: `{path}/images/{vmid}/vm-{vmid}-disk-N/disk.raw`, one
    /// subvolume per disk, raw images only.
    Btrfs,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Dir => "dir",
            StorageKind::Btrfs => "btrfs",
        }
    }

    /// The format an image arriving as `incoming` is stored in: a `btrfs` storage keeps
    /// raw files only, so a qcow2 image is converted to raw on import.
    pub fn stored_format(self, incoming: ImageFormat) -> ImageFormat {
        match self {
            StorageKind::Dir => incoming,
            StorageKind::Btrfs => ImageFormat::Raw,
        }
    }

    /// Image formats this kind of storage keeps (default first).
    pub fn formats(self) -> &'static [&'static str] {
        match self {
            StorageKind::Dir => &["raw", "qcow2"],
            StorageKind::Btrfs => &["raw"],
        }
    }
}

impl StorageDef {
    pub fn holds_images(&self) -> bool {
        self.content.iter().any(|c| c == "images")
    }
}

/// The definition of storage `id`, or the error naming it.
pub fn lookup_def<'a>(
    storages: &'a BTreeMap<String, StorageDef>,
    id: &str,
) -> StorageResult<&'a StorageDef> {
    storages
        .get(id)
        .ok_or_else(|| StorageError::UnknownStorage(id.to_string()))
}

/// A storage new images may be put on: exists, enabled, holds `images`.
pub fn usable_def<'a>(
    storages: &'a BTreeMap<String, StorageDef>,
    id: &str,
) -> StorageResult<&'a StorageDef> {
    check_usable(id, storages.get(id))
}

/// [`usable_def`] for a definition already looked up (`None`: no such storage).
pub fn check_usable<'a>(id: &str, def: Option<&'a StorageDef>) -> StorageResult<&'a StorageDef> {
    let def = def.ok_or_else(|| StorageError::UnknownStorage(id.to_string()))?;
    if def.disable {
        return Err(StorageError::Disabled(id.to_string()));
    }
    if !def.holds_images() {
        return Err(StorageError::NoImages(id.to_string()));
    }
    Ok(def)
}

pub use crate::ident::is_storage_id as is_valid_storage_id;

pub use crate::ident::split_id_list;

/// Everything that can go wrong in the volume layer. Messages name the volid, path or
/// storage involved and carry `qemu-img`'s own stderr, so an operator can act on them.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage '{0}' does not exist")]
    UnknownStorage(String),
    #[error("storage '{0}' is disabled")]
    Disabled(String),
    #[error("storage '{0}' does not support content type 'images'")]
    NoImages(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("unable to parse volume ID '{volid}' - {reason}")]
    InvalidVolid { volid: String, reason: String },
    /// `reason` is e.g. `should be 'vm-100-*'` (PVE's wording).
    #[error("illegal name '{name}' - {reason}")]
    IllegalName { name: String, reason: String },
    #[error("unsupported format '{format}' for storage type {kind}")]
    UnsupportedFormat { format: String, kind: &'static str },
    #[error("no matching import/export format found for storage '{storage}'")]
    NoMatchingFormat { storage: String },
    #[error("disk image '{}' already exists", path.display())]
    Exists { path: PathBuf },
    #[error("unable to allocate an image name for VM {vmid} in storage '{storage}'")]
    NoFreeName { vmid: u32, storage: String },
    #[error("volume '{volid}' does not exist: no file '{}'", path.display())]
    NotFound { volid: String, path: PathBuf },
    #[error("btrfs subvolume {op} '{}' failed ({status}): {stderr}", path.display())]
    Btrfs {
        op: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("qemu-img {op} '{}' failed ({status}): {stderr}", path.display())]
    QemuImg {
        op: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("cannot use qemu-img info output for '{}': {reason}", path.display())]
    QemuImgOutput { path: PathBuf, reason: String },
    #[error("import stream ended before its 8-byte size header")]
    MissingSizeHeader,
    #[error(
        "import stream for '{}' ended early: got {got} of {expected} bytes",
        path.display()
    )]
    ShortStream {
        path: PathBuf,
        got: u64,
        expected: u64,
    },
    #[error(
        "import stream for '{}' is longer than its announced size of {expected} bytes",
        path.display()
    )]
    LongStream { path: PathBuf, expected: u64 },
    /// A qcow2 image whose clusters reach past the end of the received file.
    #[error(
        "import stream for '{}' ended early: got {got} bytes, the qcow2 image needs at least {needed}",
        path.display()
    )]
    IncompleteImage {
        path: PathBuf,
        got: u64,
        needed: u64,
    },
    /// `qemu-img check` found corruption (e.g. clusters past the end of a truncated
    /// file) or could not check the image; `line` is its first error line.
    #[error("image check failed: {line} (qemu-img check of '{}': {summary})", path.display())]
    ImageCheck {
        path: PathBuf,
        line: String,
        summary: String,
    },
    #[error("backing file in image '{}' is not allowed", path.display())]
    BackingFile { path: PathBuf },
    #[error("external data file in image '{}' is not allowed", path.display())]
    DataFile { path: PathBuf },
    #[error("image '{}' is not a valid {expected} image: {reason}", path.display())]
    WrongFormat {
        path: PathBuf,
        expected: String,
        reason: String,
    },
    /// A failure reported by a backend implemented outside this module (e.g. the scripted
    /// backend of `mtunnel serve --backend scripted:..`); the text is shown as is.
    #[error("{0}")]
    Backend(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// Image formats this crate can allocate and import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// Parses a format name; anything else is "unsupported for storage type `kind`".
    pub fn parse(format: &str, kind: StorageKind) -> StorageResult<Self> {
        match format {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(StorageError::UnsupportedFormat {
                format: format.to_string(),
                kind: kind.as_str(),
            }),
        }
    }

    /// The format name, which is also the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The one stream format a `dir` storage imports for this image format.
    pub fn stream_format(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw+size",
            ImageFormat::Qcow2 => "qcow2+size",
        }
    }

    /// The format of an image file name from its extension (`.raw`, `.qcow2`).
    pub fn from_name(name: &str) -> Option<Self> {
        let (_, ext) = name.rsplit_once('.')?;
        match ext {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Image-file extensions stripped from a requested import name before `.{format}` is added.
const KNOWN_EXTENSIONS: &[&str] = &["raw", "qcow2", "vmdk", "subvol"];

/// Longest accepted image file name (with extension); file systems allow 255 bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 200;

/// Checks an image name (with or without extension) against PVE's rules for `vmid`:
/// it starts with `vm-{vmid}-` or `base-{vmid}-` followed by at least one character, and
/// only uses `[A-Za-z0-9_.-]` without `..` — so it can never leave the VM's directory and
/// needs no quoting on a QEMU command line. The most specific reason is reported first
/// (length, path components, characters, then the owner VMID).
pub fn check_image_name(name: &str, vmid: u32) -> StorageResult<()> {
    let illegal = |reason: String| StorageError::IllegalName {
        name: shown_name(name),
        reason,
    };
    if name.len() > MAX_IMAGE_NAME_LEN {
        return Err(illegal(format!(
            "longer than {MAX_IMAGE_NAME_LEN} characters"
        )));
    }
    if name.contains('/') {
        return Err(illegal("path components are not allowed".to_string()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(illegal(format!(
            "character {bad:?} not allowed (use letters, digits, '-', '_' and '.')"
        )));
    }
    if name.contains("..") {
        return Err(illegal("'..' is not allowed".to_string()));
    }
    let vm_prefix = format!("vm-{vmid}-");
    let base_prefix = format!("base-{vmid}-");
    match name
        .strip_prefix(&vm_prefix)
        .or_else(|| name.strip_prefix(&base_prefix))
    {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(illegal(format!("should be 'vm-{vmid}-*'"))),
    }
}

/// A name as shown in messages: control characters escaped and at most 64 characters, so
/// a hostile name cannot break a log line or bloat a reply.
fn shown_name(name: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = name.chars().take(SHOWN).collect::<String>();
    if out.chars().any(char::is_control) {
        out = out.escape_debug().to_string();
    }
    if name.chars().count() > SHOWN {
        out.push_str("...");
    }
    out
}

/// The file name for an explicit `alloc` name: a `.raw`/`.qcow2` extension must match the
/// format (as PVE demands); without one, `.{format}` is appended.
pub fn alloc_file_name(name: &str, vmid: u32, fmt: ImageFormat) -> StorageResult<String> {
    check_image_name(name, vmid)?;
    match ImageFormat::from_name(name) {
        Some(ext) if ext != fmt => Err(StorageError::IllegalName {
            name: name.to_string(),
            reason: format!("wrong extension for format ('{ext}' != '{fmt}')"),
        }),
        Some(_) => Ok(name.to_string()),
        None => image_file_name(name, vmid, fmt),
    }
}

/// The file name a requested volume name gets in `format`: a known image extension is
/// stripped (`vm-567-disk-0.qcow2` → `vm-567-disk-0`), `.{format}` appended, and the
/// result checked with [`check_image_name`].
pub fn image_file_name(requested: &str, vmid: u32, format: ImageFormat) -> StorageResult<String> {
    // The requested name first, so errors name what the caller sent.
    check_image_name(requested, vmid)?;
    let stem = match requested.rsplit_once('.') {
        Some((stem, ext)) if KNOWN_EXTENSIONS.contains(&ext) => stem,
        _ => requested,
    };
    check_image_name(stem, vmid)?;
    let name = format!("{stem}.{format}");
    check_image_name(&name, vmid)?;
    Ok(name)
}

/// A parsed volume id `<storage>:<vmid>/<name>.<raw|qcow2>` of a `dir` or `btrfs` storage.
///
/// Parsing is strict: a valid storage id, a VMID without leading zeros, and a name that
/// passes [`check_image_name`] for that same VMID and has a supported extension. So a volid
/// that parses always maps to a file inside `{path}/images/{vmid}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeId {
    pub storage: String,
    pub vmid: u32,
    /// File name inside the VM's image directory, with extension.
    pub name: String,
}

impl VolumeId {
    pub fn parse(volid: &str) -> StorageResult<Self> {
        let bad = |reason: &str| StorageError::InvalidVolid {
            volid: volid.to_string(),
            reason: reason.to_string(),
        };
        let (storage, volname) = volid
            .split_once(':')
            .ok_or_else(|| bad("expected '<storage>:<vmid>/<name>'"))?;
        if !is_valid_storage_id(storage) {
            return Err(bad("invalid storage id"));
        }
        let (vmid_str, name) = volname
            .split_once('/')
            .ok_or_else(|| bad("expected '<vmid>/<name>' after the storage id"))?;
        let vmid = parse_vmid(vmid_str).ok_or_else(|| bad("invalid VMID directory"))?;
        if name.contains('/') {
            return Err(bad("'/' is not allowed in the image name"));
        }
        check_image_name(name, vmid).map_err(|e| bad(&e.to_string()))?;
        if ImageFormat::from_name(name).is_none() {
            return Err(bad("image name must end in '.raw' or '.qcow2'"));
        }
        Ok(VolumeId {
            storage: storage.to_string(),
            vmid,
            name: name.to_string(),
        })
    }

    /// The image format implied by the name's extension.
    pub fn format(&self) -> ImageFormat {
        // `parse` guarantees a known extension; raw is the (unreachable) fallback.
        ImageFormat::from_name(&self.name).unwrap_or(ImageFormat::Raw)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.storage, self.vmid, self.name)
    }
}

/// A VMID as used in paths: decimal digits, no sign, no leading zero, at most 9 digits.
fn parse_vmid(s: &str) -> Option<u32> {
    let ok = !s.is_empty()
        && s.len() <= 9
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0');
    if ok { s.parse().ok() } else { None }
}

/// One stream import (the `disk-import` command): where to, and what the stream holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRequest {
    pub storage: String,
    pub vmid: u32,
    /// Preferred name, e.g. `vm-567-disk-0.qcow2` or `vm-567-disk-0`.
    pub volname: String,
    /// Target image format (`raw` or `qcow2`).
    pub format: String,
    /// Stream format chosen with [`import::choose_stream_format`] (`raw+size`, `qcow2+size`).
    /// A `btrfs` storage converts a `qcow2+size` stream into a raw volume.
    pub stream_format: String,
    /// Pick the next free `vm-{vmid}-disk-N` if `volname` is taken.
    pub allow_rename: bool,
}

/// Bytes of a storage, as `storage_info` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub avail: u64,
}

/// The volume backend. Held as `Arc<dyn Storage>`; the real implementation is
/// [`NodeStorage`], a scripted one answers from Lua. All names and ids are plain strings so
/// any implementation can produce them; volids look like `local:100/vm-100-disk-0.qcow2`.
pub trait Storage: Send + Sync {
    /// Ids of all configured storages, sorted.
    fn storage_ids(&self) -> Vec<String>;

    /// The definition of storage `id`, if it exists.
    fn def(&self, id: &str) -> Option<&StorageDef>;

    /// Size and free space of enabled storage `id` (activating it, in PVE's words);
    /// `None` when unknown. By default what `statvfs` reports for its path: right for
    /// every storage kept in a local file system (`dir`, `btrfs`).
    fn space(&self, id: &str) -> Option<Space> {
        let def = self.def(id)?;
        let s = nix::sys::statvfs::statvfs(&def.path).ok()?;
        let frag = s.fragment_size();
        Some(Space {
            total: s.blocks() * frag,
            avail: s.blocks_available() * frag,
        })
    }

    /// Allocates an empty image of `size_kib` KiB in `format` (`raw`/`qcow2`) for `vmid`
    /// and returns its volid. Without `name` the lowest free `vm-{vmid}-disk-N` is used.
    fn alloc<'a>(
        &'a self,
        storage: &'a str,
        vmid: u32,
        format: &'a str,
        name: Option<&'a str>,
        size_kib: u64,
    ) -> BoxFuture<'a, StorageResult<String>>;

    /// Removes a volume; a missing file is an error.
    fn free<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>>;

    /// The local file of a volume (the file need not exist).
    fn path(&self, volid: &str) -> StorageResult<PathBuf>;

    /// The image format of an existing volume (`raw`/`qcow2`), as `qemu-img` opens it.
    fn volume_format<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<String>>;

    /// The virtual size of an existing volume in bytes.
    fn volume_size<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<u64>>;

    /// Stream formats `storage` can import for an image of `format`, in preference order.
    fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>>;

    /// Reads one `*+size` stream from `reader` into a new volume and returns its volid.
    /// Nothing is left behind on error.
    fn import<'a>(
        &'a self,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>>;

    /// Checks a `disk-import` request before anything is created for it (no socket, no
    /// file): the storage takes images, the stream format is one it imports for `format`,
    /// and the volume name is valid for `req.vmid` (see [`image_file_name`]). Returns the
    /// volid the import will create unless that name is taken by then.
    fn check_import(&self, req: &ImportRequest) -> StorageResult<String> {
        let def = check_usable(&req.storage, self.def(&req.storage))?;
        let fmt = ImageFormat::parse(&req.format, def.kind)?;
        let importable = self.import_formats(&req.storage, &req.format)?;
        if !importable.contains(&req.stream_format) {
            return Err(StorageError::NoMatchingFormat {
                storage: req.storage.clone(),
            });
        }
        let name = image_file_name(&req.volname, req.vmid, def.kind.stored_format(fmt))?;
        // The volid must parse the way every later command will parse it.
        let volid = VolumeId::parse(&format!("{}:{}/{name}", req.storage, req.vmid))?;
        Ok(volid.to_string())
    }

    /// Checks an image received from elsewhere before it is used: no backing file, no
    /// external data file, and really in the format its name says.
    fn check_untrusted<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>>;

    /// Volids of every image of `vmid`, by storage, for the storages that are reachable
    /// now (a `dir` storage whose path is missing — not mounted — is left out, so its
    /// volumes are neither counted nor freed). A listing that fails midway is an error,
    /// never a partial list. Backends that cannot list volumes say so with an error.
    fn volumes_by_storage(
        &self,
        vmid: u32,
    ) -> BoxFuture<'_, StorageResult<BTreeMap<String, Vec<String>>>> {
        let _ = vmid;
        Box::pin(async {
            Err(StorageError::Unsupported(
                "this storage backend cannot list volumes".into(),
            ))
        })
    }

    /// [`Storage::volumes_by_storage`] as one sorted list: what `vm destroy` and cleanup
    /// free.
    fn volumes_of(&self, vmid: u32) -> BoxFuture<'_, StorageResult<Vec<String>>> {
        Box::pin(async move {
            let mut all: Vec<String> = self
                .volumes_by_storage(vmid)
                .await?
                .into_values()
                .flatten()
                .collect();
            all.sort();
            Ok(all)
        })
    }

    /// VMIDs that have at least one image on some storage, sorted.
    fn vmids_with_volumes(&self) -> BoxFuture<'_, StorageResult<Vec<u32>>> {
        Box::pin(async {
            Err(StorageError::Unsupported(
                "this storage backend cannot list volumes".into(),
            ))
        })
    }

    /// Effective bandwidth limit in KiB/s for `operation` on `storages` (`None` entries
    /// are skipped), combined with the user's override; `None` means unlimited. See
    /// [`bwlimit_from_defs`].
    fn bwlimit(
        &self,
        operation: &str,
        storages: &[Option<String>],
        override_kib: Option<u64>,
    ) -> Option<u64> {
        bwlimit_from_defs(|id| self.def(id), operation, storages, override_kib)
    }
}

/// The minimum of the override and, for each listed storage, its `bwlimit` entry for
/// `operation` (falling back to the `default` entry). A limit of 0 means "no limit" (as in
/// PVE) and is ignored, as are unknown storages and `None` entries. No datacenter default
/// and no privilege bypass here: the caller handles those.
pub fn bwlimit_from_defs<'d>(
    def: impl Fn(&str) -> Option<&'d StorageDef>,
    operation: &str,
    storages: &[Option<String>],
    override_kib: Option<u64>,
) -> Option<u64> {
    let limits = storages.iter().flatten().filter_map(|id| {
        let def = def(id)?;
        def.bwlimit
            .get(operation)
            .or_else(|| def.bwlimit.get("default"))
            .copied()
    });
    std::iter::once(override_kib)
        .flatten()
        .chain(limits)
        .filter(|&l| l > 0)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def_with(limits: &[(&str, u64)]) -> StorageDef {
        StorageDef {
            kind: StorageKind::Dir,
            path: PathBuf::from("/nonexistent"),
            content: default_content(),
            disable: false,
            bwlimit: limits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn volid_parsing_is_strict() {
        let v = VolumeId::parse("local:100/vm-100-disk-0.qcow2").unwrap();
        assert_eq!(v.storage, "local");
        assert_eq!(v.vmid, 100);
        assert_eq!(v.name, "vm-100-disk-0.qcow2");
        assert_eq!(v.format(), ImageFormat::Qcow2);
        assert_eq!(v.to_string(), "local:100/vm-100-disk-0.qcow2");
        assert!(VolumeId::parse("local:100/base-100-disk-0.raw").is_ok());

        for bad in [
            "",
            "local",
            "local:",
            "local:vm-100-disk-0.raw",
            "local:100/",
            "local:100/../100/vm-100-disk-0.raw",
            "local:100/vm-100-disk-0/../../x.raw",
            "local:100//etc/passwd",
            "local:/etc/passwd",
            "local:100/vm-100-..raw",
            "local:100/vm-100-disk..0.raw",
            "local:..:100/vm-100-disk-0.raw",
            "Local:100/vm-100-disk-0.raw",
            "local:0100/vm-100-disk-0.raw",
            "local:+100/vm-100-disk-0.raw",
            "local:100/vm-101-disk-0.raw",
            "local:100/vm-100-disk-0",
            "local:100/vm-100-disk-0.vmdk",
            "local:100/vm-100-disk 0.raw",
            "local:100/vm-100-disk,0.raw",
            "local:100/vm-100-.raw\n",
        ] {
            let err = VolumeId::parse(bad).expect_err(bad);
            assert!(
                err.to_string().starts_with("unable to parse volume ID"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn image_names_follow_pve_rules() {
        assert_eq!(
            image_file_name("vm-567-disk-0.qcow2", 567, ImageFormat::Raw).unwrap(),
            "vm-567-disk-0.raw"
        );
        assert_eq!(
            image_file_name("vm-567-disk-0", 567, ImageFormat::Qcow2).unwrap(),
            "vm-567-disk-0.qcow2"
        );
        assert_eq!(
            image_file_name("vm-567-state-snap.1", 567, ImageFormat::Raw).unwrap(),
            "vm-567-state-snap.1.raw"
        );
        let err = image_file_name("vm-100-disk-0", 567, ImageFormat::Raw).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-100-disk-0' - should be 'vm-567-*'"
        );
        for bad in [
            "vm-567-",
            "vm-567",
            "../vm-567-x",
            "vm-567-a/b",
            "vm-567-a..b",
        ] {
            assert!(
                image_file_name(bad, 567, ImageFormat::Raw).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn bwlimit_math() {
        let mut defs = BTreeMap::new();
        defs.insert(
            "a".to_string(),
            def_with(&[("migration", 100), ("default", 500)]),
        );
        defs.insert("b".to_string(), def_with(&[("default", 300)]));
        defs.insert("c".to_string(), def_with(&[]));
        defs.insert("z".to_string(), def_with(&[("migration", 0)]));
        let get = |id: &str| defs.get(id);
        let s = |ids: &[Option<&str>]| -> Vec<Option<String>> {
            ids.iter().map(|i| i.map(str::to_string)).collect()
        };

        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("a")]), None),
            Some(100)
        );
        assert_eq!(
            bwlimit_from_defs(get, "restore", &s(&[Some("a")]), None),
            Some(500)
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("b")]), None),
            Some(300)
        );
        assert_eq!(
            bwlimit_from_defs(get, "restore", &s(&[Some("a"), Some("b")]), None),
            Some(300)
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("a"), Some("b")]), Some(50)),
            Some(50)
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("b")]), Some(1000)),
            Some(300)
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("c")]), None),
            None
        );
        assert_eq!(bwlimit_from_defs(get, "migration", &s(&[None]), None), None);
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[None]), Some(70)),
            Some(70)
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("z")]), None),
            None
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("c")]), Some(0)),
            None
        );
        assert_eq!(
            bwlimit_from_defs(get, "migration", &s(&[Some("nope")]), None),
            None
        );
        assert_eq!(bwlimit_from_defs(get, "migration", &[], None), None);
    }
}
