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

/// Holds a VM's config lock until dropped. A lock file whose VM has no config (any more)
/// is removed on drop, while still locked: 1000 tunnels must not leave 1000 lock files.
/// Lockers therefore check after `flock` that the path still names the file they locked
/// ([`ConfigStore::lock`]), else an unlinked file would lock nobody out.
pub struct VmLockGuard {
    _inproc: OwnedMutexGuard<()>,
    /// Released after `drop` removed the file, when the fields drop.
    _flock: Flock<File>,
    lock_path: PathBuf,
    config_path: PathBuf,
    pub vmid: u32,
}

impl Drop for VmLockGuard {
    fn drop(&mut self) {
        if self.config_path.exists() {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.lock_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(
                vmid = self.vmid,
                "removing lock file {}: {e}",
                self.lock_path.display()
            );
        }
    }
}

/// Opens (creating) the lock file at `path` and takes its `flock`, polling until
/// `deadline`.
async fn flock_until(path: &Path, deadline: Instant) -> Result<Flock<File>, GuestError> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(format!("opening lock file {}", path.display())))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => return Ok(flock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                if Instant::now() >= deadline {
                    return Err(GuestError::LockTimeout {
                        path: path.display().to_string(),
                    });
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

/// Whether `path` still names the file `file` is open on (not unlinked or replaced).
fn is_current(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
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
        loop {
            let flock = flock_until(&path, deadline).await?;
            // The holder before us may have removed the file (its VM had no config):
            // then our lock is on an unlinked file and locks nobody out. Start over.
            if is_current(&flock, &path) {
                return Ok(VmLockGuard {
                    _inproc: inproc,
                    _flock: flock,
                    lock_path: path,
                    config_path: self.config_path(vmid),
                    vmid,
                });
            }
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
        }
    }

    pub fn exists(&self, vmid: u32) -> bool {
        self.config_path(vmid).exists()
    }

    /// Creates the empty config `lock: <lock>` for a new VMID under its lock; fails if the
    /// VMID is in use (PVE's `create_and_lock_config`). `origin` names this reservation
    /// (see [`ConfigStore::origin`]).
    pub async fn create_and_lock(
        &self,
        vmid: u32,
        lock: &str,
        origin: &str,
    ) -> Result<(), GuestError> {
        let guard = self.lock(vmid, Duration::from_secs(5)).await?;
        if self.exists(vmid) {
            return Err(GuestError::Exists {
                vmid,
                node: self.node.clone(),
            });
        }
        // The origin first: a config never exists with a stale origin of an older one.
        write_atomic(&self.origin_path(vmid), origin.as_bytes(), 0o600)
            .map_err(GuestError::Other)?;
        self.write_text_locked(&guard, &format!("lock: {lock}\n"))
    }

    fn origin_path(&self, vmid: u32) -> PathBuf {
        self.dir.join(format!("{vmid}.origin"))
    }

    /// Who reserved the VMID's current config: the id its creator gave
    /// [`ConfigStore::create_and_lock`] (a tunnel's reservation id), kept beside the config
    /// (`{vmid}.origin`) until the config is removed or its creator's claim ends
    /// ([`ConfigStore::clear_origin_locked`]). A tunnel's journal holds the same id, so
    /// recovery can prove a config is the one that tunnel made, not a later one of the
    /// same VMID. `None`: no config, or nobody's claim.
    pub fn origin(&self, vmid: u32) -> Option<String> {
        if !self.exists(vmid) {
            return None;
        }
        let text = std::fs::read_to_string(self.origin_path(vmid)).ok()?;
        let origin = text.trim();
        (!origin.is_empty()).then(|| origin.to_string())
    }

    /// Ends the creator's claim on the config (the migration was committed, or an operator
    /// unlocked the VM): from now on no tunnel journal can prove the config is its own.
    pub fn clear_origin_locked(&self, guard: &VmLockGuard) -> Result<(), GuestError> {
        match std::fs::remove_file(self.origin_path(guard.vmid)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing origin of VM {}", guard.vmid))(e)),
        }
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

    /// Writes a config atomically; the guard proves the caller holds the VM's lock. A
    /// config written without a lock ends its creator's claim on it (its origin): the
    /// migration that made it was committed, or an operator unlocked it.
    pub fn write_text_locked(&self, guard: &VmLockGuard, text: &str) -> Result<(), GuestError> {
        write_atomic(&self.config_path(guard.vmid), text.as_bytes(), 0o640)
            .map_err(GuestError::Other)?;
        let locked = text
            .lines()
            .take_while(|l| !l.starts_with('['))
            .any(|l| l.starts_with("lock:"));
        if locked {
            Ok(())
        } else {
            self.clear_origin_locked(guard)
        }
    }

    /// Removes a config (and its origin); the guard proves the caller holds the VM's lock.
    pub fn remove_locked(&self, guard: &VmLockGuard) -> Result<(), GuestError> {
        match std::fs::remove_file(self.config_path(guard.vmid)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing config of VM {}", guard.vmid))(e)),
        }
        self.clear_origin_locked(guard)
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
        store.create_and_lock(100, "create", "t1").await.unwrap();
        assert_eq!(store.read_text(100).unwrap(), "lock: create\n");
        assert_eq!(store.origin(100).as_deref(), Some("t1"));
        let err = store
            .create_and_lock(100, "create", "t2")
            .await
            .unwrap_err();
        assert_eq!(store.origin(100).as_deref(), Some("t1"));
        assert_eq!(err.to_string(), "VM 100 already exists on node 'n1'");
        let held = store.lock(100, DEFAULT_LOCK_TIMEOUT).await.unwrap();
        // A locked config keeps its origin; one written without a lock ends the claim.
        store
            .write_text_locked(&held, "lock: migrate\nmemory: 64\n")
            .unwrap();
        assert_eq!(store.origin(100).as_deref(), Some("t1"));
        store.write_text_locked(&held, "memory: 64\n").unwrap();
        assert_eq!(store.origin(100), None);
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
        assert!(!dir.path().join("qemu-server/100.origin").exists());
        assert_eq!(store.list(), Vec::<u32>::new());
    }

    fn fds_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|rd| {
                rd.flatten()
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
                    .count()
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn lock_file_goes_with_the_config_and_still_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let lock_file = dir.path().join("lock/lock-100.conf");
        let store = ConfigStore::new("n1", dir.path()).unwrap();
        // No config: the lock file does not outlive the lock.
        drop(store.lock(100, DEFAULT_LOCK_TIMEOUT).await.unwrap());
        assert!(!lock_file.exists());
        // With a config it stays (removing it would gain nothing).
        store.create_and_lock(100, "create", "t1").await.unwrap();
        assert!(lock_file.exists());

        // The unlink race: B (another process: its own store) opened the file and waits
        // while A holds it; A removes the config, then drops (unlinking the file). B must
        // lock the new file, or C would get in beside B.
        let a = store.lock(100, DEFAULT_LOCK_TIMEOUT).await.unwrap();
        let store_b = ConfigStore::new("n1", dir.path()).unwrap();
        let b = tokio::spawn(async move {
            let guard = store_b.lock(100, Duration::from_secs(5)).await.unwrap();
            (store_b, guard)
        });
        let waiting = async {
            while fds_on(&lock_file) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("B opens the lock file");
        store.remove_locked(&a).unwrap();
        drop(a);
        let (_store_b, b_guard) = b.await.unwrap();
        let store_c = ConfigStore::new("n1", dir.path()).unwrap();
        let c = store_c.lock(100, Duration::from_millis(200)).await;
        assert!(
            matches!(c, Err(GuestError::LockTimeout { .. })),
            "C got in beside B"
        );
        drop(b_guard);
        assert!(!lock_file.exists());
        drop(store_c.lock(100, DEFAULT_LOCK_TIMEOUT).await.unwrap());
    }
}
