//! One plugin per storage kind: where a volume's file lives, and how a volume is
//! allocated, freed, imported into and listed. [`super::NodeStorage`] picks the plugin by
//! the storage's kind ([`of`]); everything else (volids, image directories, locking of
//! names, the untrusted-image checks) is shared and knows no kind.

use std::path::PathBuf;

use futures_util::future::BoxFuture;
use tokio::io::AsyncRead;

use super::{ImportRequest, StorageDef, StorageKind, StorageResult, VolumeId};

/// What an allocation asks for (`Storage::alloc`'s arguments, the storage resolved).
pub(super) struct AllocRequest<'a> {
    pub storage: &'a str,
    pub def: &'a StorageDef,
    pub vmid: u32,
    pub format: &'a str,
    pub name: Option<&'a str>,
    pub size_kib: u64,
}

/// The kind-specific half of a storage.
pub(super) trait Plugin: Sync {
    /// The file QEMU opens for `vol` (which names a volume of `def`).
    fn volume_file(&self, def: &StorageDef, vol: &VolumeId) -> StorageResult<PathBuf>;

    /// Creates an empty volume; its volid.
    fn alloc<'a>(&'a self, req: AllocRequest<'a>) -> BoxFuture<'a, StorageResult<String>>;

    /// Removes `vol`, whose file is `path`.
    fn free<'a>(
        &'a self,
        def: &'a StorageDef,
        vol: &'a VolumeId,
        path: PathBuf,
    ) -> BoxFuture<'a, StorageResult<()>>;

    /// Receives an import stream into a new volume of `def`; its volid.
    fn import<'a>(
        &'a self,
        def: &'a StorageDef,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>>;

    /// The volume name an entry `name` of an image directory stands for (`is_dir`: the
    /// entry is a directory), or `None` if it is no volume.
    fn listed_name(&self, name: String, is_dir: bool) -> Option<String>;
}

/// The plugin of storages of `kind`.
pub(super) fn of(kind: StorageKind) -> &'static dyn Plugin {
    match kind {
        StorageKind::Dir => &super::dir::DirPlugin,
        StorageKind::Btrfs => &super::btrfs::BtrfsPlugin,
    }
}
