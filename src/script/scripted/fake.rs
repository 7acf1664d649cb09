//! The scripted backend's in-memory fake: volumes in a table, VMs as a set of running
//! VMIDs, errors worded like the real backends. It is what every function a script does not
//! override does; it knows nothing of Lua.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::guest::hypervisor::{HvResult, IncomingStarted};
use crate::storage::{
    ImageFormat, ImportRequest, StorageDef, StorageError, StorageResult, VolumeId, image_file_name,
};

/// Highest disk number the fake hands out per VM and storage.
const MAX_DISKS: u32 = 1024;

#[derive(Debug, Clone)]
pub(super) struct FakeVolume {
    pub(super) format: String,
    /// Virtual size in bytes.
    pub(super) size: u64,
}

#[derive(Default)]
pub(super) struct FakeState {
    pub(super) volumes: BTreeMap<String, FakeVolume>,
    pub(super) running: BTreeSet<u32>,
}

/// What the default `import` needs besides the request.
pub(super) struct ImportData {
    /// The `*+size` header, `None` if the stream ended before 8 bytes.
    pub(super) size: Option<u64>,
    /// Payload bytes after the header.
    pub(super) received: u64,
}

/// Volumes in a table, VMs as a set of running VMIDs; errors worded like the real backends.
pub(super) struct Fake {
    pub(super) storages: BTreeMap<String, StorageDef>,
    pub(super) run_dir: PathBuf,
    pub(super) state: Mutex<FakeState>,
}

impl Fake {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lookup(&self, id: &str) -> StorageResult<&StorageDef> {
        crate::storage::lookup_def(&self.storages, id)
    }

    pub(super) fn usable(&self, id: &str) -> StorageResult<&StorageDef> {
        crate::storage::usable_def(&self.storages, id)
    }

    pub(super) fn resolve(&self, volid: &str) -> StorageResult<(VolumeId, PathBuf)> {
        let vol = VolumeId::parse(volid)?;
        let def = self.lookup(&vol.storage)?;
        let path = def
            .path
            .join("images")
            .join(vol.vmid.to_string())
            .join(&vol.name);
        Ok((vol, path))
    }

    pub(super) fn not_found(&self, volid: &str) -> StorageError {
        match self.resolve(volid) {
            Ok((_, path)) => StorageError::NotFound {
                volid: volid.to_string(),
                path,
            },
            Err(e) => e,
        }
    }

    pub(super) fn free_name(
        &self,
        state: &FakeState,
        storage: &str,
        vmid: u32,
        fmt: ImageFormat,
    ) -> StorageResult<String> {
        let prefix = format!("{storage}:{vmid}/");
        let used: BTreeSet<u32> = state
            .volumes
            .keys()
            .filter_map(|v| v.strip_prefix(&prefix))
            .filter_map(|name| {
                let rest = name
                    .strip_prefix(&format!("vm-{vmid}-disk-"))
                    .or_else(|| name.strip_prefix(&format!("base-{vmid}-disk-")))?;
                rest.split('.').next()?.parse().ok()
            })
            .collect();
        (0..MAX_DISKS)
            .find(|n| !used.contains(n))
            .map(|n| format!("vm-{vmid}-disk-{n}.{fmt}"))
            .ok_or_else(|| StorageError::NoFreeName {
                vmid,
                storage: storage.to_string(),
            })
    }

    pub(super) fn alloc(
        &self,
        storage: &str,
        vmid: u32,
        format: &str,
        name: Option<&str>,
        size_kib: u64,
    ) -> StorageResult<String> {
        let def = self.usable(storage)?;
        let fmt = ImageFormat::parse(format, def.kind)?;
        let mut state = self.state();
        let name = match name {
            Some(name) => {
                let name = crate::storage::alloc_file_name(name, vmid, fmt)?;
                let volid = format!("{storage}:{vmid}/{name}");
                if state.volumes.contains_key(&volid) {
                    return Err(StorageError::Exists {
                        path: self.resolve(&volid)?.1,
                    });
                }
                name
            }
            None => self.free_name(&state, storage, vmid, fmt)?,
        };
        let volid = format!("{storage}:{vmid}/{name}");
        state.volumes.insert(
            volid.clone(),
            FakeVolume {
                format: fmt.as_str().to_string(),
                size: size_kib.saturating_mul(1024),
            },
        );
        Ok(volid)
    }

    pub(super) fn free(&self, volid: &str) -> StorageResult<()> {
        self.resolve(volid)?;
        match self.state().volumes.remove(volid) {
            Some(_) => Ok(()),
            None => Err(self.not_found(volid)),
        }
    }

    pub(super) fn volume(&self, volid: &str) -> StorageResult<FakeVolume> {
        self.resolve(volid)?;
        let found = self.state().volumes.get(volid).cloned();
        found.ok_or_else(|| self.not_found(volid))
    }

    pub(super) fn import_formats(&self, storage: &str, format: &str) -> StorageResult<Vec<String>> {
        let def = self.usable(storage)?;
        let fmt = ImageFormat::parse(format, def.kind)?;
        Ok(vec![fmt.stream_format().to_string()])
    }

    pub(super) fn import(&self, req: &ImportRequest, data: &ImportData) -> StorageResult<String> {
        let def = self.usable(&req.storage)?;
        let fmt = ImageFormat::parse(&req.format, def.kind)?;
        if req.stream_format != fmt.stream_format() {
            return Err(StorageError::NoMatchingFormat {
                storage: req.storage.clone(),
            });
        }
        let name = image_file_name(&req.volname, req.vmid, fmt)?;
        let size = data.size.ok_or(StorageError::MissingSizeHeader)?;
        let mut state = self.state();
        let mut volid = format!("{}:{}/{name}", req.storage, req.vmid);
        if state.volumes.contains_key(&volid) {
            if !req.allow_rename {
                return Err(StorageError::Exists {
                    path: self.resolve(&volid)?.1,
                });
            }
            let name = self.free_name(&state, &req.storage, req.vmid, fmt)?;
            volid = format!("{}:{}/{name}", req.storage, req.vmid);
        }
        if fmt == ImageFormat::Raw && data.received != size {
            let path = self.resolve(&volid)?.1;
            return Err(if data.received < size {
                StorageError::ShortStream {
                    path,
                    got: data.received,
                    expected: size,
                }
            } else {
                StorageError::LongStream {
                    path,
                    expected: size,
                }
            });
        }
        state.volumes.insert(
            volid.clone(),
            FakeVolume {
                format: fmt.as_str().to_string(),
                size,
            },
        );
        Ok(volid)
    }

    pub(super) fn start_incoming(
        &self,
        vmid: u32,
        nbd: &BTreeMap<String, String>,
    ) -> HvResult<IncomingStarted> {
        let mut state = self.state();
        if state.running.contains(&vmid) {
            anyhow::bail!("VM {vmid} already running");
        }
        let migrate_socket = self.run_dir.join(format!("{vmid}.migrate"));
        let (nbd_socket, nbd_uris) = if nbd.is_empty() {
            (None, BTreeMap::new())
        } else {
            let socket = self.run_dir.join(format!("{vmid}_nbd.migrate"));
            let uris = nbd
                .keys()
                .map(|key| {
                    (
                        key.clone(),
                        format!("nbd:unix:{}:exportname=drive-{key}", socket.display()),
                    )
                })
                .collect();
            (Some(socket), uris)
        };
        state.running.insert(vmid);
        Ok(IncomingStarted {
            migrate_socket,
            nbd_socket,
            nbd_uris,
        })
    }

    pub(super) fn require_running(&self, vmid: u32) -> HvResult<()> {
        if self.state().running.contains(&vmid) {
            Ok(())
        } else {
            anyhow::bail!("VM {vmid} not running")
        }
    }

    pub(super) fn stop(&self, vmid: u32) {
        self.state().running.remove(&vmid);
    }

    pub(super) fn is_running(&self, vmid: u32) -> bool {
        self.state().running.contains(&vmid)
    }
}

/// Reads a `*+size` stream: the header (if complete), then the payload to EOF, keeping at
/// most `capture` bytes of it.
pub(super) async fn read_stream(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    capture: usize,
) -> StorageResult<(ImportData, Vec<u8>)> {
    let io_err = |e| StorageError::io("reading the import stream", e);
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < header.len() {
        let n = reader.read(&mut header[got..]).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < header.len() {
        return Ok((
            ImportData {
                size: None,
                received: 0,
            },
            Vec::new(),
        ));
    }
    let mut kept = Vec::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        received += n as u64;
        let room = capture.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    Ok((
        ImportData {
            size: Some(u64::from_le_bytes(header)),
            received,
        },
        kept,
    ))
}
