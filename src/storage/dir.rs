//! The real volume backend: [`NodeStorage`] serves the node's storages through the plugin
//! of each storage's kind ([`super::plugin`]). The `dir` plugin lives here: it keeps images
//! as files in `{path}/images/{vmid}/` and drives `qemu-img` ([`super::image`]) for creating
//! and inspecting them. The `btrfs` plugin ([`super::btrfs`]) reuses the helpers here
//! (name reservation, stream receiving).
//!
//! File names are reserved with `O_CREAT|O_EXCL` before anything is written, so two
//! concurrent allocations never pick the same name, and every partly created file is
//! removed again on error (or when the operation's future is dropped).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::fs;
use tokio::io::AsyncRead;

use super::image::{
    check_qcow2_complete, check_untrusted_image, info_str, info_virtual_size, qemu_img,
    qemu_img_info,
};
use super::import::{copy_sparse, read_size_header};
use super::plugin::{self, AllocRequest, Plugin};
use super::{
    ImageFormat, ImportRequest, Storage, StorageDef, StorageError, StorageKind, StorageResult,
    VolumeId, alloc_file_name, image_file_name,
};

/// PVE's limit on `vm-{vmid}-disk-N` numbers per guest and storage.
pub(super) const MAX_DISKS_PER_GUEST: u32 = 1024;

/// Mode of the `images` and `images/{vmid}` directories.
const IMAGE_DIR_MODE: u32 = 0o750;

/// Mode of new image files.
pub(super) const IMAGE_FILE_MODE: u32 = 0o640;

/// The node's storages (`dir` and `btrfs`).
#[derive(Debug, Clone)]
pub struct NodeStorage {
    storages: BTreeMap<String, StorageDef>,
}

impl NodeStorage {
    /// Serves `storages`. Relative storage paths are made absolute (against the current
    /// directory) so image paths never look like a `protocol:` to QEMU.
    pub fn new(storages: BTreeMap<String, StorageDef>) -> Self {
        let storages = storages
            .into_iter()
            .map(|(id, mut def)| {
                if def.path.is_relative()
                    && let Ok(abs) = std::path::absolute(&def.path)
                {
                    def.path = abs;
                }
                (id, def)
            })
            .collect();
        NodeStorage { storages }
    }

    fn lookup(&self, id: &str) -> StorageResult<&StorageDef> {
        super::lookup_def(&self.storages, id)
    }

    fn usable(&self, id: &str) -> StorageResult<&StorageDef> {
        super::usable_def(&self.storages, id)
    }

    /// Resolves a volid to its parsed form and file path.
    fn resolve(&self, volid: &str) -> StorageResult<(VolumeId, PathBuf)> {
        let vol = VolumeId::parse(volid)?;
        let def = self.lookup(&vol.storage)?;
        let path = plugin::of(def.kind).volume_file(def, &vol)?;
        Ok((vol, path))
    }

    async fn alloc_impl(
        &self,
        storage: &str,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> StorageResult<String> {
        let def = self.usable(storage)?;
        let req = AllocRequest {
            storage,
            def,
            vmid,
            format,
            name,
            size_kib,
        };
        plugin::of(def.kind).alloc(req).await
    }

    async fn free_impl(&self, volid: &str) -> StorageResult<()> {
        let (vol, path) = self.resolve(volid)?;
        let def = self.lookup(&vol.storage)?;
        plugin::of(def.kind).free(def, &vol, path).await?;
        remove_if_empty(&image_dir(def, vol.vmid));
        Ok(())
    }

    /// `qemu-img info` of an existing volume, opened in the format its name says.
    async fn volume_info(&self, volid: &str) -> StorageResult<(PathBuf, Value)> {
        let (vol, path) = self.resolve(volid)?;
        // Only a definite "no such file" is NotFound; other errors surface from qemu-img.
        if matches!(fs::try_exists(&path).await, Ok(false)) {
            return Err(StorageError::NotFound {
                volid: volid.to_string(),
                path,
            });
        }
        // -U: the volume may be in use by a running QEMU; we only read metadata.
        let info = qemu_img_info(&path, vol.format(), true).await?;
        Ok((path, info))
    }

    async fn import_impl(
        &self,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> StorageResult<String> {
        let def = self.usable(&req.storage)?;
        plugin::of(def.kind).import(def, req, reader).await
    }
}

/// The `dir` kind: a volume is an image file in `{path}/images/{vmid}/`.
pub(super) struct DirPlugin;

impl Plugin for DirPlugin {
    fn volume_file(&self, def: &StorageDef, vol: &VolumeId) -> StorageResult<PathBuf> {
        Ok(image_dir(def, vol.vmid).join(&vol.name))
    }

    fn alloc<'a>(&'a self, r: AllocRequest<'a>) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(dir_alloc(r))
    }

    fn free<'a>(
        &'a self,
        _def: &'a StorageDef,
        vol: &'a VolumeId,
        path: PathBuf,
    ) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            match fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound {
                    volid: vol.to_string(),
                    path,
                }),
                Err(e) => Err(StorageError::io(
                    format!("removing volume '{vol}' ('{}')", path.display()),
                    e,
                )),
            }
        })
    }

    fn import<'a>(
        &'a self,
        def: &'a StorageDef,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(dir_import(def, req, reader))
    }

    fn listed_name(&self, name: String, _is_dir: bool) -> Option<String> {
        Some(name)
    }
}

/// Reserves the lowest free `vm-{vmid}-disk-N.{fmt}` in `dir`; returns name and file.
async fn reserve_free_name(
    storage: &str,
    dir: &Path,
    vmid: u32,
    fmt: ImageFormat,
) -> StorageResult<(String, fs::File)> {
    let used = used_disk_numbers(dir, vmid).await?;
    for n in (0..MAX_DISKS_PER_GUEST).filter(|n| !used.contains(n)) {
        let name = format!("vm-{vmid}-disk-{n}.{fmt}");
        match reserve(&dir.join(&name)).await {
            Ok(file) => return Ok((name, file)),
            // Lost a race with a concurrent allocation, or a non-image file is there.
            Err(StorageError::Exists { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::NoFreeName {
        vmid,
        storage: storage.to_string(),
    })
}

async fn dir_alloc(r: AllocRequest<'_>) -> StorageResult<String> {
    let (storage, def, vmid) = (r.storage, r.def, r.vmid);
    let fmt = ImageFormat::parse(r.format, def.kind)?;
    let name = r.name.map(|n| alloc_file_name(n, vmid, fmt)).transpose()?;
    let dir = image_dir(def, vmid);
    let (name, file) = in_image_dir(&dir, || async {
        match &name {
            Some(name) => Ok((name.clone(), reserve(&dir.join(name)).await?)),
            None => reserve_free_name(storage, &dir, vmid, fmt).await,
        }
    })
    .await?;
    drop(file);
    let path = dir.join(&name);
    let guard = RemoveOnDrop::new(path.clone());
    let size = format!("{}K", r.size_kib);
    qemu_img(
        "create",
        &[
            OsStr::new("create"),
            OsStr::new("-f"),
            OsStr::new(fmt.as_str()),
            path.as_os_str(),
            OsStr::new(&size),
        ],
        &path,
    )
    .await?;
    guard.disarm();
    Ok(format!("{storage}:{vmid}/{name}"))
}

async fn dir_import(
    def: &StorageDef,
    req: ImportRequest,
    mut reader: Box<dyn AsyncRead + Send + Unpin>,
) -> StorageResult<String> {
    let fmt = ImageFormat::parse(&req.format, def.kind)?;
    if req.stream_format != fmt.stream_format() {
        return Err(StorageError::NoMatchingFormat {
            storage: req.storage.clone(),
        });
    }
    let name = image_file_name(&req.volname, req.vmid, fmt)?;
    let size = read_size_header(&mut reader).await?;

    let dir = image_dir(def, req.vmid);
    let (name, file) = in_image_dir(&dir, || async {
        match reserve(&dir.join(&name)).await {
            Ok(file) => Ok((name.clone(), file)),
            Err(StorageError::Exists { path }) if req.allow_rename => {
                tracing::info!(
                    "disk image '{}' already exists - importing with a different name",
                    path.display()
                );
                reserve_free_name(&req.storage, &dir, req.vmid, fmt).await
            }
            Err(e) => Err(e),
        }
    })
    .await?;
    let path = dir.join(&name);
    let guard = RemoveOnDrop::new(path.clone());
    receive(&mut *reader, file, &path, fmt, size).await?;
    guard.disarm();
    Ok(format!("{}:{}/{}", req.storage, req.vmid, name))
}

/// Receives the payload of a `*+size` stream (after its size header, `size`) into `file`,
/// a freshly reserved image at `path`, and verifies it as an untrusted `fmt` image: a raw
/// payload must be exactly `size` bytes; a qcow2 one must be complete and consistent. The
/// caller removes the file on error.
pub(super) async fn receive(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    file: fs::File,
    path: &Path,
    fmt: ImageFormat,
    size: u64,
) -> StorageResult<()> {
    let exact_len = match fmt {
        ImageFormat::Raw => {
            file.set_len(size).await.map_err(|e| {
                StorageError::io(
                    format!("allocating {size} bytes for '{}'", path.display()),
                    e,
                )
            })?;
            Some(size)
        }
        // The payload is the image file itself; its length is not the virtual size.
        ImageFormat::Qcow2 => None,
    };
    let file = file.into_std().await;
    let received = copy_sparse(reader, file, path, exact_len).await?;
    // The untrusted checks come first: they refuse references to other files before
    // `qemu-img check` opens the image.
    check_untrusted_image(path, fmt).await?;
    if fmt == ImageFormat::Qcow2 {
        // A qcow2 stream has no length of its own: an image cut short only shows as
        // metadata pointing past the end of the file.
        check_qcow2_complete(path, received).await?;
    }
    Ok(())
}

impl Storage for NodeStorage {
    fn storage_ids(&self) -> Vec<String> {
        self.storages.keys().cloned().collect()
    }

    fn def(&self, id: &str) -> Option<&StorageDef> {
        self.storages.get(id)
    }

    fn alloc<'a>(
        &'a self,
        storage: &'a str,
        vmid: u32,
        format: &'a str,
        name: Option<&'a str>,
        size_kib: u64,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(self.alloc_impl(storage, vmid, format, name, size_kib))
    }

    fn free<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(self.free_impl(volid))
    }

    fn path(&self, volid: &str) -> StorageResult<PathBuf> {
        self.resolve(volid).map(|(_, path)| path)
    }

    fn volume_format<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(async move {
            let (path, info) = self.volume_info(volid).await?;
            info_str(&info, "format", &path).map(str::to_string)
        })
    }

    fn volume_size<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<u64>> {
        Box::pin(async move {
            let (path, info) = self.volume_info(volid).await?;
            info_virtual_size(&info, &path)
        })
    }

    fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>> {
        let def = self.usable(storage)?;
        let fmt = ImageFormat::parse(format, def.kind)?;
        Ok(vec![fmt.stream_format().to_string()])
    }

    fn import<'a>(
        &'a self,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> BoxFuture<'a, StorageResult<String>> {
        Box::pin(self.import_impl(req, reader))
    }

    fn vmids_with_volumes(&self) -> BoxFuture<'_, StorageResult<Vec<u32>>> {
        Box::pin(async move {
            let mut out = BTreeSet::new();
            for def in self.storages.values() {
                let dir = def.path.join("images");
                let Ok(mut entries) = fs::read_dir(&dir).await else {
                    continue;
                };
                while let Ok(Some(entry)) = entries.next_entry().await {
                    if let Some(vmid) = entry.file_name().to_str().and_then(|n| n.parse().ok())
                        && self.volumes_of(vmid).await.is_ok_and(|v| !v.is_empty())
                    {
                        out.insert(vmid);
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
    }

    fn volumes_by_storage(
        &self,
        vmid: u32,
    ) -> BoxFuture<'_, StorageResult<BTreeMap<String, Vec<String>>>> {
        Box::pin(async move {
            let mut out = BTreeMap::new();
            for (id, def) in &self.storages {
                if !def.path.is_dir() {
                    continue; // not mounted: neither counted nor freed
                }
                let dir = image_dir(def, vmid);
                let ctx = || format!("listing image directory '{}'", dir.display());
                let mut vols = Vec::new();
                match fs::read_dir(&dir).await {
                    Ok(mut entries) => {
                        while let Some(entry) = entries
                            .next_entry()
                            .await
                            .map_err(|e| StorageError::io(ctx(), e))?
                        {
                            let Some(name) = listed_name(def.kind, &entry).await else {
                                continue;
                            };
                            let volid = format!("{id}:{vmid}/{name}");
                            // Only names this storage would hand out (no temporary files).
                            if VolumeId::parse(&volid).is_ok() {
                                vols.push(volid);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::io(ctx(), e)),
                }
                vols.sort();
                out.insert(id.clone(), vols);
            }
            Ok(out)
        })
    }

    fn check_untrusted<'a>(&'a self, volid: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async move {
            let (vol, path) = self.resolve(volid)?;
            check_untrusted_image(&path, vol.format()).await
        })
    }
}

/// The volume name an entry of an image directory stands for, as the storage's plugin
/// says: a `dir` storage's file name as is; for `btrfs`, a subvolume's name with `.raw`
/// added.
async fn listed_name(kind: StorageKind, entry: &fs::DirEntry) -> Option<String> {
    let name = entry.file_name().to_str()?.to_string();
    let is_dir = entry.file_type().await.is_ok_and(|t| t.is_dir());
    plugin::of(kind).listed_name(name, is_dir)
}

/// `{path}/images/{vmid}` of a storage.
pub(super) fn image_dir(def: &StorageDef, vmid: u32) -> PathBuf {
    def.path.join("images").join(vmid.to_string())
}

pub(super) async fn ensure_image_dir(dir: &Path) -> StorageResult<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(IMAGE_DIR_MODE);
    builder
        .create(dir)
        .await
        .map_err(|e| StorageError::io(format!("creating image directory '{}'", dir.display()), e))
}

/// Runs `reserve` (which creates a file in `dir`) after creating `dir`. A concurrent free
/// of the VM's last volume may remove `dir` as empty in between ([`remove_if_empty`]):
/// then both steps run again, a few times at most.
async fn in_image_dir<T, F, Fut>(dir: &Path, mut reserve: F) -> StorageResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StorageResult<T>>,
{
    let mut attempts = 0;
    loop {
        ensure_image_dir(dir).await?;
        match reserve().await {
            Err(StorageError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && attempts < 3 && !dir.exists() =>
            {
                attempts += 1;
            }
            other => return other,
        }
    }
}

/// Removes `{path}/images/{vmid}` once its last volume is gone (a VM's image dir goes with
/// its volumes); a directory that still holds anything stays.
pub(super) fn remove_if_empty(dir: &Path) {
    match std::fs::remove_dir(dir) {
        Ok(()) => tracing::debug!("removed empty image directory '{}'", dir.display()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) => {}
        Err(e) => tracing::warn!("removing empty image directory '{}': {e}", dir.display()),
    }
}

/// Creates `path` exclusively (an existing file is [`StorageError::Exists`]).
pub(super) async fn reserve(path: &Path) -> StorageResult<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(IMAGE_FILE_MODE)
        .open(path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StorageError::Exists {
                path: path.to_path_buf(),
            },
            _ => StorageError::io(format!("creating disk image '{}'", path.display()), e),
        })
}

/// Numbers N taken by `vm-{vmid}-disk-N*` or `base-{vmid}-disk-N*` in `dir`, whatever the
/// extension (PVE counts raw, qcow2, vmdk and subvol names alike).
pub(super) async fn used_disk_numbers(dir: &Path, vmid: u32) -> StorageResult<BTreeSet<u32>> {
    let mut used = BTreeSet::new();
    let ctx = || format!("listing image directory '{}'", dir.display());
    let mut entries = fs::read_dir(dir)
        .await
        .map_err(|e| StorageError::io(ctx(), e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| StorageError::io(ctx(), e))?
    {
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| disk_number(n, vmid))
        {
            used.insert(n);
        }
    }
    Ok(used)
}

fn disk_number(name: &str, vmid: u32) -> Option<u32> {
    let rest = name
        .strip_prefix(&format!("vm-{vmid}-disk-"))
        .or_else(|| name.strip_prefix(&format!("base-{vmid}-disk-")))?;
    let digits = rest.split('.').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes a file when dropped, unless disarmed: cleans up after errors and cancellation.
struct RemoveOnDrop {
    path: Option<PathBuf>,
}

impl RemoveOnDrop {
    fn new(path: PathBuf) -> Self {
        RemoveOnDrop { path: Some(path) }
    }

    fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else {
            return;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!("could not remove partial image '{}': {e}", path.display());
                return;
            }
        }
        // The partial image may have been the VM's only file: its directory goes too.
        if let Some(dir) = path.parent() {
            remove_if_empty(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::*;
    use super::*;
    use crate::storage::StorageKind;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    const MIB: u64 = 1024 * 1024;

    fn node(dir: &Path) -> Arc<dyn Storage> {
        let mut storages = BTreeMap::new();
        storages.insert(
            "local".to_string(),
            StorageDef {
                kind: StorageKind::Dir,
                path: dir.to_path_buf(),
                content: vec!["images".to_string()],
                disable: false,
                bwlimit: BTreeMap::from([("migration".to_string(), 1000)]),
            },
        );
        storages.insert(
            "off".to_string(),
            StorageDef {
                kind: StorageKind::Dir,
                path: dir.join("off"),
                content: vec!["images".to_string()],
                disable: true,
                bwlimit: BTreeMap::new(),
            },
        );
        Arc::new(NodeStorage::new(storages))
    }

    fn run(cmd: &str, args: &[&str]) {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// A `*+size` stream: header with `size`, then the bytes of `payload`.
    async fn stream(size: u64, payload: &Path) -> Box<dyn AsyncRead + Send + Unpin> {
        let header = std::io::Cursor::new(size.to_le_bytes().to_vec());
        let file = fs::File::open(payload).await.unwrap();
        Box::new(header.chain(file))
    }

    fn req(volname: &str, format: &str, stream_format: &str, allow_rename: bool) -> ImportRequest {
        ImportRequest {
            storage: "local".to_string(),
            vmid: 100,
            volname: volname.to_string(),
            format: format.to_string(),
            stream_format: stream_format.to_string(),
            allow_rename,
        }
    }

    #[tokio::test]
    async fn image_dir_goes_with_the_last_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let images = tmp.path().join("images/200");
        let a = st.alloc("local", 200, "raw", None, 4).await.unwrap();
        let b = st.alloc("local", 200, "qcow2", None, 64).await.unwrap();
        st.free(&a).await.unwrap();
        assert!(images.is_dir(), "one volume left");
        st.free(&b).await.unwrap();
        assert!(!images.exists(), "the empty image dir stays");
        // The next allocation makes it again.
        st.alloc("local", 200, "raw", None, 4).await.unwrap();
        assert!(images.is_dir());
    }

    #[tokio::test]
    async fn alloc_naming_sequence_and_free() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let images = tmp.path().join("images/100");

        let v0 = st.alloc("local", 100, "raw", None, 1024).await.unwrap();
        assert_eq!(v0, "local:100/vm-100-disk-0.raw");
        let v1 = st.alloc("local", 100, "qcow2", None, 2048).await.unwrap();
        assert_eq!(v1, "local:100/vm-100-disk-1.qcow2");
        let v2 = st.alloc("local", 100, "raw", None, 4).await.unwrap();
        assert_eq!(v2, "local:100/vm-100-disk-2.raw");
        assert_eq!(
            std::fs::metadata(&images).unwrap().permissions().mode() & 0o777,
            0o750
        );

        let file = images.join("vm-100-disk-1.qcow2");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(st.volume_format(&v0).await.unwrap(), "raw");
        assert_eq!(st.volume_format(&v1).await.unwrap(), "qcow2");
        assert_eq!(st.volume_size(&v0).await.unwrap(), MIB);
        assert_eq!(st.volume_size(&v1).await.unwrap(), 2 * MIB);
        assert_eq!(st.path(&v1).unwrap(), images.join("vm-100-disk-1.qcow2"));
        st.check_untrusted(&v1).await.unwrap();

        // A freed number is reused, whatever the format; other VMs count separately.
        st.free(&v0).await.unwrap();
        assert_eq!(
            st.alloc("local", 100, "qcow2", None, 64).await.unwrap(),
            "local:100/vm-100-disk-0.qcow2"
        );
        assert_eq!(
            st.alloc("local", 101, "raw", None, 64).await.unwrap(),
            "local:101/vm-101-disk-0.raw"
        );
        assert_eq!(
            files_in(&images),
            [
                "vm-100-disk-0.qcow2",
                "vm-100-disk-1.qcow2",
                "vm-100-disk-2.raw"
            ]
        );

        // Freeing twice names the missing file.
        let err = st.free(&v0).await.unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }));
        assert!(err.to_string().contains("vm-100-disk-0.raw"), "{err}");
        assert!(st.volume_size(&v0).await.is_err());
    }

    #[tokio::test]
    async fn alloc_with_names() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        assert_eq!(
            st.alloc("local", 100, "qcow2", Some("vm-100-cloudinit"), 4096)
                .await
                .unwrap(),
            "local:100/vm-100-cloudinit.qcow2"
        );
        assert_eq!(
            st.alloc("local", 100, "raw", Some("vm-100-disk-7.raw"), 64)
                .await
                .unwrap(),
            "local:100/vm-100-disk-7.raw"
        );
        let err = st
            .alloc("local", 100, "qcow2", Some("vm-100-cloudinit.qcow2"), 64)
            .await
            .unwrap_err();
        let path = tmp.path().join("images/100/vm-100-cloudinit.qcow2");
        assert_eq!(
            err.to_string(),
            format!("disk image '{}' already exists", path.display())
        );
        // The existing image was not touched.
        assert_eq!(
            st.volume_size("local:100/vm-100-cloudinit.qcow2")
                .await
                .unwrap(),
            4 * MIB
        );

        let err = st
            .alloc("local", 100, "raw", Some("vm-101-disk-0"), 64)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-101-disk-0' - should be 'vm-100-*'"
        );
        for bad in [
            "../vm-100-x",
            "vm-100-a/../../b",
            "/etc/vm-100-x",
            "vm-100-a..b",
        ] {
            assert!(
                matches!(
                    st.alloc("local", 100, "raw", Some(bad), 64).await,
                    Err(StorageError::IllegalName { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            st.alloc("local", 100, "qcow2", Some("vm-100-x.raw"), 64)
                .await,
            Err(StorageError::IllegalName { .. })
        ));
        assert_eq!(
            st.alloc("local", 100, "vmdk", None, 64)
                .await
                .unwrap_err()
                .to_string(),
            "unsupported format 'vmdk' for storage type dir"
        );
        assert!(matches!(
            st.alloc("nope", 100, "raw", None, 64).await,
            Err(StorageError::UnknownStorage(_))
        ));
        assert!(matches!(
            st.alloc("off", 100, "raw", None, 64).await,
            Err(StorageError::Disabled(_))
        ));
        // Numbering skips names taken by an explicit alloc.
        assert_eq!(
            st.alloc("local", 100, "raw", None, 64).await.unwrap(),
            "local:100/vm-100-disk-0.raw"
        );
    }

    #[tokio::test]
    async fn bad_volids_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        for bad in [
            "local:100/../../etc/passwd",
            "local:100/vm-100-disk-0.raw/..",
            "local:../100/vm-100-disk-0.raw",
            "local:/etc/vm-100-disk-0.raw",
            "local:100//vm-100-disk-0.raw",
            "local:100/vm-100-disk-0",
            "local:100/vm-999-disk-0.raw",
            "vm-100-disk-0.raw",
            "/var/lib/vz/images/100/vm-100-disk-0.raw",
        ] {
            let err = st.path(bad).unwrap_err();
            assert!(
                matches!(err, StorageError::InvalidVolid { .. }),
                "{bad}: {err}"
            );
            assert!(st.free(bad).await.is_err(), "{bad}");
        }
        assert_eq!(
            st.path("other:100/vm-100-disk-0.raw")
                .unwrap_err()
                .to_string(),
            "storage 'other' does not exist"
        );
    }

    #[tokio::test]
    async fn import_raw_is_identical_and_sparse() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let src = tmp.path().join("src.raw");
        let size = 64 * MIB;
        {
            let mut data = vec![0u8; size as usize];
            data[..4096].fill(0x11);
            data[(10 * MIB) as usize..(10 * MIB + 300_000) as usize].fill(0x22);
            data[(size - 1) as usize] = 0x33;
            std::fs::write(&src, &data).unwrap();
        }
        let volid = st
            .import(
                req("vm-100-disk-0.qcow2", "raw", "raw+size", true),
                stream(size, &src).await,
            )
            .await
            .unwrap();
        assert_eq!(volid, "local:100/vm-100-disk-0.raw");
        let dst = st.path(&volid).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
            ],
        );
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), size);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < 4 * MIB,
            "{allocated} bytes allocated for a mostly-zero image"
        );
        assert_eq!(st.volume_size(&volid).await.unwrap(), size);
    }

    #[tokio::test]
    async fn import_qcow2_is_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let src = tmp.path().join("src.qcow2");
        let s = src.to_str().unwrap();
        run("qemu-img", &["create", "-q", "-f", "qcow2", s, "8M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 1M", s]);
        let volid = st
            .import(
                req("vm-100-disk-3.qcow2", "qcow2", "qcow2+size", false),
                stream(8 * MIB, &src).await,
            )
            .await
            .unwrap();
        assert_eq!(volid, "local:100/vm-100-disk-3.qcow2");
        let dst = st.path(&volid).unwrap();
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                s,
                dst.to_str().unwrap(),
            ],
        );
        assert_eq!(st.volume_format(&volid).await.unwrap(), "qcow2");
        assert_eq!(st.volume_size(&volid).await.unwrap(), 8 * MIB);
        st.check_untrusted(&volid).await.unwrap();
    }

    #[tokio::test]
    async fn truncated_or_overlong_raw_stream_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let images = tmp.path().join("images/100");
        let src = tmp.path().join("src.raw");
        std::fs::write(&src, vec![0x42u8; MIB as usize]).unwrap();

        let err = st
            .import(
                req("vm-100-disk-0", "raw", "raw+size", false),
                stream(64 * MIB, &src).await,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::ShortStream { got, expected, .. } if got == MIB && expected == 64 * MIB),
            "{err}"
        );
        assert!(files_in(&images).is_empty());

        let err = st
            .import(
                req("vm-100-disk-0", "raw", "raw+size", false),
                stream(MIB / 2, &src).await,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::LongStream { .. }), "{err}");
        assert!(files_in(&images).is_empty());

        let header_only: Box<dyn AsyncRead + Send + Unpin> =
            Box::new(std::io::Cursor::new(vec![0u8; 5]));
        let err = st
            .import(req("vm-100-disk-0", "raw", "raw+size", false), header_only)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::MissingSizeHeader), "{err}");
        assert!(files_in(&images).is_empty());
    }

    /// A stream of the first `len` bytes of `payload` with a `size` header.
    async fn stream_prefix(
        size: u64,
        payload: &Path,
        len: u64,
    ) -> Box<dyn AsyncRead + Send + Unpin> {
        let header = std::io::Cursor::new(size.to_le_bytes().to_vec());
        let file = fs::File::open(payload).await.unwrap();
        Box::new(header.chain(file.take(len)))
    }

    /// A 4 MiB qcow2 image full of random data, plus a snapshot when `snapshot`.
    fn random_qcow2(dir: &Path, snapshot: bool) -> PathBuf {
        let raw = dir.join("random.raw");
        let data: Vec<u8> = (0..4 * MIB as usize)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes()[0])
            .collect();
        std::fs::write(&raw, data).unwrap();
        let img = dir.join("random.qcow2");
        let (r, q) = (raw.to_str().unwrap(), img.to_str().unwrap());
        run(
            "qemu-img",
            &["convert", "-q", "-f", "raw", "-O", "qcow2", r, q],
        );
        if snapshot {
            run("qemu-img", &["snapshot", "-c", "s1", q]);
            run("qemu-io", &["-f", "qcow2", "-c", "write -P 0xcd 1M 64k", q]);
        }
        img
    }

    #[tokio::test]
    async fn truncated_qcow2_stream_is_an_error_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let src = random_qcow2(tmp.path(), false);
        let len = std::fs::metadata(&src).unwrap().len();
        let dst = tmp.path().join("images/100/vm-100-disk-0.qcow2");
        // Cut in the data, at a cluster boundary right after the metadata, and inside the
        // last data cluster: qemu-img check alone misses the last two.
        for cut in [len / 2, 3 * 65536, len - 100] {
            let err = st
                .import(
                    req("vm-100-disk-0", "qcow2", "qcow2+size", false),
                    stream_prefix(4 * MIB, &src, cut).await,
                )
                .await
                .unwrap_err();
            assert!(
                matches!(err, StorageError::IncompleteImage { got, .. } if got == cut),
                "cut at {cut}: {err}"
            );
            assert!(
                err.to_string().starts_with(&format!(
                    "import stream for '{}' ended early: got {cut} bytes, the qcow2 image needs at least ",
                    dst.display()
                )),
                "{err}"
            );
            assert!(files_in(&tmp.path().join("images/100")).is_empty());
        }
    }

    #[tokio::test]
    async fn complete_qcow2_with_snapshot_and_short_last_cluster_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        // A snapshot table ends the file in the middle of a cluster.
        let src = random_qcow2(tmp.path(), true);
        let volid = st
            .import(
                req("vm-100-disk-0", "qcow2", "qcow2+size", false),
                stream(4 * MIB, &src).await,
            )
            .await
            .unwrap();
        let dst = st.path(&volid).unwrap();
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
    }

    #[tokio::test]
    async fn corrupt_qcow2_fails_the_image_check() {
        let tmp = tempfile::tempdir().unwrap();
        let src = random_qcow2(tmp.path(), false);
        // Point the first L2 entry at the refcount table cluster: a refcount mismatch.
        let mut bytes = std::fs::read(&src).unwrap();
        let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
            as usize;
        bytes[l2..l2 + 8].copy_from_slice(&0x8000_0000_0001_0000u64.to_be_bytes());
        std::fs::write(&src, &bytes).unwrap();
        let err = check_qcow2_complete(&src, bytes.len() as u64)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::ImageCheck { .. }), "{err}");
        assert!(
            err.to_string().starts_with("image check failed: ERROR"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn qcow2_with_backing_file_is_rejected_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let base = tmp.path().join("base.qcow2");
        let overlay = tmp.path().join("overlay.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"],
        );
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "qcow2",
                overlay.to_str().unwrap(),
            ],
        );
        let err = st
            .import(
                req("vm-100-disk-0", "qcow2", "qcow2+size", false),
                stream(MIB, &overlay).await,
            )
            .await
            .unwrap_err();
        let path = tmp.path().join("images/100/vm-100-disk-0.qcow2");
        assert_eq!(
            err.to_string(),
            format!("backing file in image '{}' is not allowed", path.display())
        );
        assert!(files_in(&tmp.path().join("images/100")).is_empty());

        // The qemu-img info layer alone catches it too.
        let info = qemu_img_info(&overlay, ImageFormat::Qcow2, false)
            .await
            .unwrap();
        assert!(matches!(
            check_info(&info, ImageFormat::Qcow2, &overlay),
            Err(StorageError::BackingFile { .. })
        ));
    }

    #[tokio::test]
    async fn qcow2_with_data_file_is_rejected_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let img = tmp.path().join("ext.qcow2");
        let data = tmp.path().join("ext.data");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={}", data.display()),
                img.to_str().unwrap(),
                "1M",
            ],
        );
        let err = st
            .import(
                req("vm-100-disk-0", "qcow2", "qcow2+size", false),
                stream(MIB, &img).await,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::DataFile { .. }), "{err}");
        assert!(
            err.to_string().starts_with("external data file in image"),
            "{err}"
        );
        assert!(files_in(&tmp.path().join("images/100")).is_empty());

        let info = qemu_img_info(&img, ImageFormat::Qcow2, false)
            .await
            .unwrap();
        assert!(matches!(
            check_info(&info, ImageFormat::Qcow2, &img),
            Err(StorageError::DataFile { .. })
        ));
    }

    #[tokio::test]
    async fn fake_qcow2_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let src = tmp.path().join("src.raw");
        std::fs::write(&src, vec![0x42u8; MIB as usize]).unwrap();
        let err = st
            .import(
                req("vm-100-disk-0", "qcow2", "qcow2+size", false),
                stream(MIB, &src).await,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::WrongFormat { .. }), "{err}");
        assert!(files_in(&tmp.path().join("images/100")).is_empty());

        // And a raw check on a qcow2 file: qemu-img opens it as raw, as asked.
        let q = tmp.path().join("q.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"],
        );
        check_untrusted_image(&q, ImageFormat::Raw).await.unwrap();
    }

    #[tokio::test]
    async fn existing_name_and_allow_rename() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let src = tmp.path().join("src.raw");
        std::fs::write(&src, vec![0x42u8; 64 * 1024]).unwrap();
        let r = |rename| req("vm-100-disk-0.raw", "raw", "raw+size", rename);

        let v = st
            .import(r(false), stream(64 * 1024, &src).await)
            .await
            .unwrap();
        assert_eq!(v, "local:100/vm-100-disk-0.raw");
        let err = st
            .import(r(false), stream(64 * 1024, &src).await)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        // The first import survived the refused second one.
        assert_eq!(
            std::fs::read(st.path(&v).unwrap()).unwrap(),
            std::fs::read(&src).unwrap()
        );

        let v2 = st
            .import(r(true), stream(64 * 1024, &src).await)
            .await
            .unwrap();
        assert_eq!(v2, "local:100/vm-100-disk-1.raw");
        // A failed renamed import leaves nothing either.
        let err = st
            .import(r(true), stream(MIB, &src).await)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::ShortStream { .. }), "{err}");
        assert_eq!(
            files_in(&tmp.path().join("images/100")),
            ["vm-100-disk-0.raw", "vm-100-disk-1.raw"]
        );
    }

    #[tokio::test]
    async fn import_format_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        let empty = || -> Box<dyn AsyncRead + Send + Unpin> { Box::new(tokio::io::empty()) };

        let err = st
            .import(req("vm-100-disk-0", "qcow2", "raw+size", false), empty())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no matching import/export format found for storage 'local'"
        );
        let err = st
            .import(req("vm-100-disk-0", "raw", "zfs", false), empty())
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NoMatchingFormat { .. }));
        let err = st
            .import(req("vm-100-disk-0", "vmdk", "vmdk+size", false), empty())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported format 'vmdk' for storage type dir"
        );
        let err = st
            .import(req("vm-567-disk-0", "raw", "raw+size", false), empty())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal name 'vm-567-disk-0' - should be 'vm-100-*'"
        );

        use crate::storage::import::choose_stream_format;
        assert_eq!(
            choose_stream_format(&*st, "local", "qcow2", "zfs,qcow2+size,raw+size").unwrap(),
            "qcow2+size"
        );
        assert_eq!(
            choose_stream_format(&*st, "local", "raw", "raw+size").unwrap(),
            "raw+size"
        );
        assert!(matches!(
            choose_stream_format(&*st, "local", "raw", "zfs,qcow2+size"),
            Err(StorageError::NoMatchingFormat { .. })
        ));
        assert!(matches!(
            choose_stream_format(&*st, "off", "raw", "raw+size"),
            Err(StorageError::Disabled(_))
        ));
    }

    #[test]
    fn trait_bwlimit_uses_defs() {
        let tmp = tempfile::tempdir().unwrap();
        let st = node(tmp.path());
        assert_eq!(st.storage_ids(), ["local", "off"]);
        assert!(st.def("local").is_some());
        assert_eq!(
            st.bwlimit("migration", &[Some("local".into())], None),
            Some(1000)
        );
        assert_eq!(
            st.bwlimit("migration", &[Some("local".into())], Some(10)),
            Some(10)
        );
        assert_eq!(st.bwlimit("restore", &[Some("local".into())], None), None);
        assert_eq!(st.bwlimit("migration", &[None], None), None);
    }

    #[test]
    fn qcow2_header_checks() {
        let p = Path::new("/x");
        assert!(matches!(
            check_qcow2_header(&[0u8; 104], p),
            Err(StorageError::WrongFormat { .. })
        ));
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[7] = 3;
        check_qcow2_header(&h, p).unwrap();
        h[15] = 0x70;
        assert!(matches!(
            check_qcow2_header(&h, p),
            Err(StorageError::BackingFile { .. })
        ));
        h[15] = 0;
        h[79] = 4;
        assert!(matches!(
            check_qcow2_header(&h, p),
            Err(StorageError::DataFile { .. })
        ));
        assert!(matches!(
            check_qcow2_header(&h[..50], p),
            Err(StorageError::WrongFormat { .. })
        ));
    }
}
