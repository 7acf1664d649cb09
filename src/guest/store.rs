//! The VM config store and per-VM locks (see the parent module).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::OwnedMutexGuard;

use crate::util::{ensure_dir, write_atomic};

/// How long a caller waits for a VM's config lock (PVE uses 10 s for most operations).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("VM {vmid} already exists on node '{node}'")]
    Exists { vmid: u32, node: String },
    #[error("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")]
    Missing { vmid: u32, node: String },
    #[error("can't lock file '{path}' - got timeout")]
    LockTimeout { path: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:#}")]
    Other(anyhow::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}

/// Holds a VM's config lock until dropped.
pub struct VmLockGuard {
    _inproc: OwnedMutexGuard<()>,
    _flock: Flock<File>,
    pub vmid: u32,
}

/// VM configs of this node.
pub struct ConfigStore {
    node: String,
    dir: PathBuf,
    lock_dir: PathBuf,
    locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
}

impl ConfigStore {
    pub fn new(node: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let dir = data_dir.join("qemu-server");
        let lock_dir = data_dir.join("lock");
        ensure_dir(&dir, 0o755)?;
        ensure_dir(&lock_dir, 0o755)?;
        Ok(ConfigStore {
            node: node.to_string(),
            dir,
            lock_dir,
            locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn config_path(&self, vmid: u32) -> PathBuf {
        self.dir.join(format!("{vmid}.conf"))
    }

    /// Takes the VM's config lock, waiting at most `timeout`.
    pub async fn lock(&self, vmid: u32, timeout: Duration) -> Result<VmLockGuard, GuestError> {
        let path = self.lock_dir.join(format!("lock-{vmid}.conf"));
        let timed_out = || GuestError::LockTimeout {
            path: path.display().to_string(),
        };
        let deadline = Instant::now() + timeout;
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(locks.entry(vmid).or_default())
        };
        let inproc = tokio::time::timeout(timeout, mutex.lock_owned())
            .await
            .map_err(|_| timed_out())?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening lock file {}", path.display())))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => {
                    return Ok(VmLockGuard {
                        _inproc: inproc,
                        _flock: flock,
                        vmid,
                    });
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        return Err(timed_out());
                    }
                    file = f;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((_, errno)) => {
                    return Err(GuestError::Io {
                        context: format!("locking {}", path.display()),
                        source: errno.into(),
                    });
                }
            }
        }
    }

    pub fn exists(&self, vmid: u32) -> bool {
        self.config_path(vmid).exists()
    }

    /// Creates the empty config `lock: <lock>` for a new VMID under its lock; fails if the
    /// VMID is in use (PVE's `create_and_lock_config`).
    pub async fn create_and_lock(&self, vmid: u32, lock: &str) -> Result<(), GuestError> {
        let _guard = self.lock(vmid, Duration::from_secs(5)).await?;
        if self.exists(vmid) {
            return Err(GuestError::Exists {
                vmid,
                node: self.node.clone(),
            });
        }
        self.write_text_locked(&_guard, &format!("lock: {lock}\n"))
    }

    /// Reads a config's raw text (caller should hold the lock for read-modify-write).
    pub fn read_text(&self, vmid: u32) -> Result<String, GuestError> {
        match std::fs::read_to_string(self.config_path(vmid)) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(GuestError::Missing {
                vmid,
                node: self.node.clone(),
            }),
            Err(e) => Err(io(format!("reading config of VM {vmid}"))(e)),
        }
    }

    /// Writes a config atomically; the guard proves the caller holds the VM's lock.
    pub fn write_text_locked(&self, guard: &VmLockGuard, text: &str) -> Result<(), GuestError> {
        write_atomic(&self.config_path(guard.vmid), text.as_bytes(), 0o640)
            .map_err(GuestError::Other)
    }

    /// Removes a config; the guard proves the caller holds the VM's lock.
    pub fn remove_locked(&self, guard: &VmLockGuard) -> Result<(), GuestError> {
        match std::fs::remove_file(self.config_path(guard.vmid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing config of VM {}", guard.vmid))(e)),
        }
    }

    /// VMIDs that have a config on this node, sorted.
    pub fn list(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name();
                        let name = name.to_str()?;
                        name.strip_suffix(".conf")?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_is_exclusive_and_lock_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::new("n1", dir.path()).unwrap();
        store.create_and_lock(100, "create").await.unwrap();
        assert_eq!(store.read_text(100).unwrap(), "lock: create\n");
        let err = store.create_and_lock(100, "create").await.unwrap_err();
        assert_eq!(err.to_string(), "VM 100 already exists on node 'n1'");
        let held = store.lock(100, DEFAULT_LOCK_TIMEOUT).await.unwrap();
        let err = store
            .lock(100, Duration::from_millis(50))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, GuestError::LockTimeout { .. }), "{err}");
        // Another opener of the lock file (as a CLI process would be) is also kept out.
        let other = OpenOptions::new()
            .write(true)
            .open(dir.path().join("lock/lock-100.conf"))
            .unwrap();
        assert!(Flock::lock(other, FlockArg::LockExclusiveNonblock).is_err());
        store.remove_locked(&held).unwrap();
        drop(held);
        assert!(!store.exists(100));
        assert_eq!(store.list(), Vec::<u32>::new());
    }
}
