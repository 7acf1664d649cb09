//! `btrfs` storages, laid out as PVE's `BTRFSPlugin` does: every disk is a raw file
//! `disk.raw` in a subvolume of its own, `{path}/images/{vmid}/vm-{vmid}-disk-N/`, and its
//! volid is `{storage}:{vmid}/vm-{vmid}-disk-N.raw`. Subvolumes are made and removed with
//! `btrfs subvolume create|delete` (btrfs-progs).
//!
//! Only raw images are stored, as upstream. Where upstream refuses a qcow2 source ("no
//! matching import/export format"), we convert: a `qcow2+size` stream is received into a
//! temporary file inside the new subvolume, verified like a `dir` import, and turned into
//! `disk.raw` with `qemu-img convert -O raw`. Every error, and a dropped operation, deletes
//! the new subvolume again, so nothing is left behind.
//!
//! Name reservation, stream receiving and the image checks are shared with [`super::dir`]
//! (whose [`NodeStorage`](super::NodeStorage) dispatches here); this module only knows the
//! layout and the subvolume commands, and must not touch `dir` storages.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use tokio::fs;
use tokio::io::AsyncRead;
use tokio::process::Command;

use super::dir::{
    IMAGE_FILE_MODE, MAX_DISKS_PER_GUEST, ensure_image_dir, image_dir, receive, reserve,
    used_disk_numbers,
};
use super::image::qemu_img;
use super::import::read_size_header;
use super::{
    ImageFormat, ImportRequest, StorageDef, StorageError, StorageKind, StorageResult, VolumeId,
    alloc_file_name, image_file_name,
};

/// The image file inside a volume's subvolume (PVE's name).
pub const DISK_FILE: &str = "disk.raw";

/// Where a `qcow2+size` stream is received before its conversion, inside the subvolume.
const IMPORT_TMP: &str = "import.qcow2.tmp";

/// The subvolume name of a volume name: `vm-100-disk-0.raw` → `vm-100-disk-0`.
fn subvol_name(volume_name: &str) -> &str {
    volume_name.strip_suffix(".raw").unwrap_or(volume_name)
}

/// The subvolume of a volume.
fn subvol_path(def: &StorageDef, vol: &VolumeId) -> PathBuf {
    image_dir(def, vol.vmid).join(subvol_name(&vol.name))
}

fn unsupported(fmt: ImageFormat) -> StorageError {
    StorageError::UnsupportedFormat {
        format: fmt.as_str().to_string(),
        kind: StorageKind::Btrfs.as_str(),
    }
}

/// The image file of a volume, `{subvolume}/disk.raw`; a `.qcow2` volid is refused.
pub(super) fn volume_file(def: &StorageDef, vol: &VolumeId) -> StorageResult<PathBuf> {
    match vol.format() {
        ImageFormat::Raw => Ok(subvol_path(def, vol).join(DISK_FILE)),
        other => Err(unsupported(other)),
    }
}

/// The volume name an entry of `images/{vmid}/` stands for: directories (subvolumes) only,
/// with `.raw` added. The caller still checks the name with [`VolumeId::parse`].
pub(super) fn listed_name(name: &str, is_dir: bool) -> Option<String> {
    is_dir.then(|| format!("{name}.raw"))
}

/// Allocates an empty raw volume of `size_kib` KiB: a new subvolume holding a sparse
/// `disk.raw`. Any other format is "unsupported format '..' for storage type btrfs".
pub(super) async fn alloc(
    storage: &str,
    def: &StorageDef,
    vmid: u32,
    format: &str,
    name: Option<&str>,
    size_kib: u64,
) -> StorageResult<String> {
    let fmt = ImageFormat::parse(format, StorageKind::Btrfs)?;
    if fmt != ImageFormat::Raw {
        return Err(unsupported(fmt));
    }
    let name = name.map(|n| alloc_file_name(n, vmid, fmt)).transpose()?;
    let dir = image_dir(def, vmid);
    ensure_image_dir(&dir).await?;
    let (name, subvol) = match name {
        Some(name) => {
            let subvol = NewSubvolume::create(&dir.join(subvol_name(&name))).await?;
            (name, subvol)
        }
        None => create_free(storage, &dir, vmid).await?,
    };
    let disk = subvol.path().join(DISK_FILE);
    let bytes = size_kib
        .checked_mul(1024)
        .ok_or_else(|| StorageError::Unsupported(format!("size of {size_kib} KiB too large")))?;
    let file = reserve(&disk).await?;
    file.set_len(bytes).await.map_err(|e| {
        StorageError::io(
            format!("allocating {bytes} bytes for '{}'", disk.display()),
            e,
        )
    })?;
    subvol.keep();
    Ok(format!("{storage}:{vmid}/{name}"))
}

/// Creates the subvolume of the lowest free `vm-{vmid}-disk-N` in `dir`.
async fn create_free(
    storage: &str,
    dir: &Path,
    vmid: u32,
) -> StorageResult<(String, NewSubvolume)> {
    let used = used_disk_numbers(dir, vmid).await?;
    for n in (0..MAX_DISKS_PER_GUEST).filter(|n| !used.contains(n)) {
        let name = format!("vm-{vmid}-disk-{n}.raw");
        match NewSubvolume::create(&dir.join(subvol_name(&name))).await {
            Ok(subvol) => return Ok((name, subvol)),
            // Lost a race with a concurrent allocation, or something else is there.
            Err(StorageError::Exists { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::NoFreeName {
        vmid,
        storage: storage.to_string(),
    })
}

/// Removes a volume: deletes its subvolume (a missing one is [`StorageError::NotFound`]).
pub(super) async fn free(def: &StorageDef, vol: &VolumeId) -> StorageResult<()> {
    let path = subvol_path(def, vol);
    match fs::symlink_metadata(&path).await {
        Ok(_) => subvolume("delete", &path).await,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NotFound {
            volid: vol.to_string(),
            path,
        }),
        Err(e) => Err(StorageError::io(
            format!("removing volume '{vol}' ('{}')", path.display()),
            e,
        )),
    }
}

/// Imports one `raw+size` or `qcow2+size` stream into a new raw volume (a qcow2 image is
/// received, verified and converted). Nothing is left behind on error.
pub(super) async fn import(
    def: &StorageDef,
    req: ImportRequest,
    mut reader: Box<dyn AsyncRead + Send + Unpin>,
) -> StorageResult<String> {
    let fmt = ImageFormat::parse(&req.format, StorageKind::Btrfs)?;
    if req.stream_format != fmt.stream_format() {
        return Err(StorageError::NoMatchingFormat {
            storage: req.storage.clone(),
        });
    }
    let name = image_file_name(&req.volname, req.vmid, ImageFormat::Raw)?;
    let size = read_size_header(&mut reader).await?;

    let dir = image_dir(def, req.vmid);
    ensure_image_dir(&dir).await?;
    let (name, subvol) = match NewSubvolume::create(&dir.join(subvol_name(&name))).await {
        Ok(subvol) => (name, subvol),
        Err(StorageError::Exists { path }) if req.allow_rename => {
            tracing::info!(
                "disk image '{}' already exists - importing with a different name",
                path.display()
            );
            create_free(&req.storage, &dir, req.vmid).await?
        }
        Err(e) => return Err(e),
    };
    let disk = subvol.path().join(DISK_FILE);
    match fmt {
        ImageFormat::Raw => {
            let file = reserve(&disk).await?;
            receive(&mut *reader, file, &disk, fmt, size).await?;
        }
        ImageFormat::Qcow2 => receive_converted(&mut *reader, subvol.path(), &disk, size).await?,
    }
    subvol.keep();
    Ok(format!("{}:{}/{}", req.storage, req.vmid, name))
}

/// Receives a qcow2 payload into a temporary file in `subvol`, verifies it as an untrusted
/// qcow2 image, converts it into the raw `disk` and removes the temporary file.
async fn receive_converted(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    subvol: &Path,
    disk: &Path,
    size: u64,
) -> StorageResult<()> {
    let tmp = subvol.join(IMPORT_TMP);
    let file = reserve(&tmp).await?;
    receive(reader, file, &tmp, ImageFormat::Qcow2, size).await?;
    tracing::info!(
        "converting received qcow2 image to raw '{}' (btrfs stores raw only)",
        disk.display()
    );
    qemu_img(
        "convert",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            tmp.as_os_str(),
            disk.as_os_str(),
        ],
        disk,
    )
    .await?;
    fs::set_permissions(disk, std::fs::Permissions::from_mode(IMAGE_FILE_MODE))
        .await
        .map_err(|e| StorageError::io(format!("setting the mode of '{}'", disk.display()), e))?;
    fs::remove_file(&tmp)
        .await
        .map_err(|e| StorageError::io(format!("removing '{}'", tmp.display()), e))?;
    match fs::metadata(disk).await {
        Ok(meta) if meta.len() != size => tracing::warn!(
            "'{}': converted image has {} bytes, the stream announced {size}",
            disk.display(),
            meta.len()
        ),
        _ => {}
    }
    Ok(())
}

/// A subvolume this operation created: deleted again when dropped (after an error or when
/// the operation's future is dropped), unless [`NewSubvolume::keep`] was called.
struct NewSubvolume {
    path: PathBuf,
    keep: bool,
}

impl NewSubvolume {
    /// Creates the subvolume `path`; an existing entry there is [`StorageError::Exists`].
    async fn create(path: &Path) -> StorageResult<Self> {
        let exists = || StorageError::Exists {
            path: path.to_path_buf(),
        };
        if fs::symlink_metadata(path).await.is_ok() {
            return Err(exists());
        }
        // Armed before `btrfs subvolume create` runs: a future dropped while it runs (a cut
        // connection) kills it, and whatever it created by then goes with the guard.
        let guard = NewSubvolume {
            path: path.to_path_buf(),
            keep: false,
        };
        match subvolume("create", path).await {
            Ok(()) => Ok(guard),
            // Lost a race: someone else created it in between; theirs stays.
            Err(_) if fs::symlink_metadata(path).await.is_ok() => {
                guard.keep();
                Err(exists())
            }
            Err(e) => {
                guard.keep();
                Err(e)
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for NewSubvolume {
    fn drop(&mut self) {
        // Nothing there: a create killed before it made the subvolume.
        if self.keep || std::fs::symlink_metadata(&self.path).is_err() {
            return;
        }
        let out = std::process::Command::new("btrfs")
            .args(["subvolume", "delete", "--"])
            .arg(&self.path)
            .stdin(Stdio::null())
            .output();
        if let Err(e) = check_output("delete", &self.path, out) {
            tracing::warn!("could not remove partial volume: {e}");
        }
    }
}

/// Runs `btrfs subvolume <op> -- <path>`.
async fn subvolume(op: &'static str, path: &Path) -> StorageResult<()> {
    let out = Command::new("btrfs")
        .args(["subvolume", op, "--"])
        .arg(path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    check_output(op, path, out)
}

/// A failed `btrfs subvolume` run as an error carrying its stderr (or, when `btrfs` cannot
/// be run at all, the hint to install btrfs-progs).
fn check_output(op: &'static str, path: &Path, out: io::Result<Output>) -> StorageResult<()> {
    let out = out.map_err(|e| {
        StorageError::io(
            format!(
                "running 'btrfs subvolume {op}' for '{}' (is btrfs-progs installed?)",
                path.display()
            ),
            e,
        )
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(StorageError::Btrfs {
        op,
        path: path.to_path_buf(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The `btrfs` kind: a volume is a subvolume holding `disk.raw`.
pub(super) struct BtrfsPlugin;

impl super::plugin::Plugin for BtrfsPlugin {
    fn volume_file(&self, def: &StorageDef, vol: &VolumeId) -> StorageResult<PathBuf> {
        volume_file(def, vol)
    }

    fn alloc<'a>(
        &'a self,
        r: super::plugin::AllocRequest<'a>,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<String>> {
        Box::pin(alloc(
            r.storage, r.def, r.vmid, r.format, r.name, r.size_kib,
        ))
    }

    fn free<'a>(
        &'a self,
        def: &'a StorageDef,
        vol: &'a VolumeId,
        _path: PathBuf,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<()>> {
        Box::pin(free(def, vol))
    }

    fn import<'a>(
        &'a self,
        def: &'a StorageDef,
        req: ImportRequest,
        reader: Box<dyn AsyncRead + Send + Unpin>,
    ) -> futures_util::future::BoxFuture<'a, StorageResult<String>> {
        Box::pin(import(def, req, reader))
    }

    fn listed_name(&self, name: String, is_dir: bool) -> Option<String> {
        listed_name(&name, is_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{NodeStorage, Storage};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    const MIB: u64 = 1024 * 1024;

    fn run(cmd: &str, args: &[&std::ffi::OsStr]) {
        let out = std::process::Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e} (apt-get install btrfs-progs qemu-utils)"));
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A 512 MiB btrfs made with `mkfs.btrfs` on a sparse file and loop-mounted; unmounted
    /// and removed on drop (also when a test panics).
    struct LoopBtrfs {
        dir: tempfile::TempDir,
        mnt: PathBuf,
    }

    impl LoopBtrfs {
        fn new() -> Self {
            let dir = tempfile::Builder::new()
                .prefix("btrfs")
                .tempdir_in("/tmp")
                .unwrap();
            let img = dir.path().join("fs.img");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(512 * MIB)
                .unwrap();
            run("mkfs.btrfs", &["-q".as_ref(), img.as_os_str()]);
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            run(
                "mount",
                &[
                    "-o".as_ref(),
                    "loop".as_ref(),
                    img.as_os_str(),
                    mnt.as_os_str(),
                ],
            );
            LoopBtrfs { dir, mnt }
        }
    }

    impl Drop for LoopBtrfs {
        fn drop(&mut self) {
            let ok = std::process::Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mnt)
                    .status();
            }
        }
    }

    fn node(fs: &LoopBtrfs) -> Arc<dyn Storage> {
        let def = |kind, path: PathBuf| StorageDef {
            kind,
            path,
            content: vec!["images".to_string()],
            disable: false,
            bwlimit: BTreeMap::new(),
        };
        let local = fs.dir.path().join("local");
        std::fs::create_dir(&local).unwrap();
        Arc::new(NodeStorage::new(BTreeMap::from([
            ("bt".to_string(), def(StorageKind::Btrfs, fs.mnt.clone())),
            ("local".to_string(), def(StorageKind::Dir, local)),
        ])))
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn is_subvolume(path: &Path) -> bool {
        std::process::Command::new("btrfs")
            .args(["subvolume", "show"])
            .arg(path)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn req(volname: &str, format: &str, allow_rename: bool) -> ImportRequest {
        ImportRequest {
            storage: "bt".to_string(),
            vmid: 100,
            volname: volname.to_string(),
            format: format.to_string(),
            stream_format: format!("{format}+size"),
            allow_rename,
        }
    }

    /// A `*+size` stream of the first `len` bytes of `payload` with a `size` header.
    async fn stream(size: u64, payload: &Path, len: u64) -> Box<dyn AsyncRead + Send + Unpin> {
        let header = std::io::Cursor::new(size.to_le_bytes().to_vec());
        let file = fs::File::open(payload).await.unwrap();
        Box::new(header.chain(file.take(len)))
    }

    /// A 4 MiB raw image of pseudo-random data and the same data as qcow2.
    fn images(dir: &Path) -> (PathBuf, PathBuf) {
        let raw = dir.join("src.raw");
        let data: Vec<u8> = (0..4 * MIB as usize)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes()[0])
            .collect();
        std::fs::write(&raw, data).unwrap();
        let qcow2 = dir.join("src.qcow2");
        let args = ["convert", "-q", "-f", "raw", "-O", "qcow2"];
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        argv.extend([raw.as_os_str(), qcow2.as_os_str()]);
        run("qemu-img", &argv);
        (raw, qcow2)
    }

    #[tokio::test]
    async fn alloc_list_free_follow_pve_layout() {
        let fs = LoopBtrfs::new();
        let st = node(&fs);
        let images = fs.mnt.join("images/100");

        let v0 = st.alloc("bt", 100, "raw", None, 1024).await.unwrap();
        assert_eq!(v0, "bt:100/vm-100-disk-0.raw");
        let v1 = st
            .alloc("bt", 100, "raw", Some("vm-100-disk-5"), 2048)
            .await
            .unwrap();
        assert_eq!(v1, "bt:100/vm-100-disk-5.raw");
        let v2 = st.alloc("bt", 100, "raw", None, 4).await.unwrap();
        assert_eq!(v2, "bt:100/vm-100-disk-1.raw");
        assert!(is_subvolume(&images.join("vm-100-disk-0")));
        let file = images.join("vm-100-disk-5/disk.raw");
        assert_eq!(st.path(&v1).unwrap(), file);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * MIB);
        assert_eq!(st.volume_format(&v1).await.unwrap(), "raw");
        assert_eq!(st.volume_size(&v1).await.unwrap(), 2 * MIB);
        st.check_untrusted(&v1).await.unwrap();

        // qcow2 is refused with upstream's words, for alloc and for volids.
        let err = st.alloc("bt", 100, "qcow2", None, 1024).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported format 'qcow2' for storage type btrfs"
        );
        let err = st.path("bt:100/vm-100-disk-0.qcow2").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported format 'qcow2' for storage type btrfs"
        );
        let err = st
            .alloc("bt", 100, "raw", Some("vm-100-disk-0"), 4)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");

        // Listing (cleanup's view) sees the btrfs volumes next to dir ones.
        let local = st.alloc("local", 100, "qcow2", None, 64).await.unwrap();
        let by = st.volumes_by_storage(100).await.unwrap();
        assert_eq!(by["bt"], vec![v0.clone(), v2.clone(), v1.clone()]);
        assert_eq!(by["local"], vec![local.clone()]);
        assert_eq!(st.vmids_with_volumes().await.unwrap(), vec![100]);

        for v in [&v0, &v1, &v2, &local] {
            st.free(v).await.unwrap();
        }
        assert!(entries(&images).is_empty(), "{:?}", entries(&images));
        let err = st.free(&v0).await.unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
        assert!(st.volumes_of(100).await.unwrap().is_empty());
        assert!(st.vmids_with_volumes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn raw_and_qcow2_streams_land_as_identical_raw() {
        let fs = LoopBtrfs::new();
        let st = node(&fs);
        let (raw, qcow2) = images(fs.dir.path());
        let size = 4 * MIB;

        let predicted = st
            .check_import(&req("vm-100-disk-0.qcow2", "qcow2", false))
            .unwrap();
        assert_eq!(predicted, "bt:100/vm-100-disk-0.raw");
        assert_eq!(
            st.import_formats("bt", "qcow2").unwrap(),
            vec!["qcow2+size".to_string()]
        );

        let v0 = st
            .import(req("vm-100-disk-0.qcow2", "qcow2", false), {
                stream(size, &qcow2, u64::MAX).await
            })
            .await
            .unwrap();
        assert_eq!(v0, predicted);
        let v1 = st
            .import(req("vm-100-disk-0.raw", "raw", true), {
                stream(size, &raw, u64::MAX).await
            })
            .await
            .unwrap();
        assert_eq!(v1, "bt:100/vm-100-disk-1.raw");
        for v in [&v0, &v1] {
            let path = st.path(v).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&raw).unwrap());
            assert_eq!(entries(path.parent().unwrap()), vec!["disk.raw"]);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, IMAGE_FILE_MODE, "{v}");
            st.check_untrusted(v).await.unwrap();
        }
    }

    #[tokio::test]
    async fn failed_imports_leave_no_subvolume() {
        let fs = LoopBtrfs::new();
        let st = node(&fs);
        let (raw, qcow2) = images(fs.dir.path());
        let images = fs.mnt.join("images/100");
        let qlen = std::fs::metadata(&qcow2).unwrap().len();

        // A raw stream cut short; a qcow2 stream cut short.
        let err = st
            .import(req("vm-100-disk-0", "raw", false), {
                stream(4 * MIB, &raw, MIB).await
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::ShortStream { .. }), "{err}");
        assert!(entries(&images).is_empty(), "{:?}", entries(&images));
        let err = st
            .import(req("vm-100-disk-0", "qcow2", false), {
                stream(4 * MIB, &qcow2, qlen / 2).await
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::IncompleteImage { .. })
                || matches!(err, StorageError::ImageCheck { .. }),
            "{err}"
        );
        assert!(entries(&images).is_empty(), "{:?}", entries(&images));

        // A qcow2 that refers to a backing file is refused before conversion.
        let overlay = fs.dir.path().join("overlay.qcow2");
        let args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"];
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        argv.extend([qcow2.as_os_str(), overlay.as_os_str()]);
        run("qemu-img", &argv);
        let err = st
            .import(req("vm-100-disk-0", "qcow2", false), {
                stream(4 * MIB, &overlay, u64::MAX).await
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::BackingFile { .. }), "{err}");
        assert!(entries(&images).is_empty(), "{:?}", entries(&images));

        // A dropped import (a cut connection) removes its subvolume too: the import runs
        // until its subvolume exists (the stream stays open), then its future is dropped.
        let subvol = images.join("vm-100-disk-0");
        let (tx, rx) = tokio::io::duplex(64 * 1024);
        let import = st.import(req("vm-100-disk-0", "raw", false), Box::new(rx));
        let feed = async {
            use tokio::io::AsyncWriteExt;
            let mut tx = tx;
            tx.write_all(&(4 * MIB).to_le_bytes()).await.unwrap();
            tx.write_all(&[7u8; 8192]).await.unwrap();
            wait_for_subvolume(&subvol).await;
            tx
        };
        let tx = tokio::select! {
            r = import => panic!("import ended early: {r:?}"),
            tx = feed => tx,
        };
        assert!(
            !subvol.exists(),
            "the dropped import left {}",
            subvol.display()
        );
        assert!(entries(&images).is_empty(), "{:?}", entries(&images));
        drop(tx);
    }

    /// Waits (at most 30 s, polling) until `path` is a btrfs subvolume.
    async fn wait_for_subvolume(path: &Path) {
        for _ in 0..1500 {
            if is_subvolume(path) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the import never created its subvolume {}", path.display());
    }
}
