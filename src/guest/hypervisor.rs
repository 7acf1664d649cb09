//! The hypervisor backend as tunnel handlers see it: start a VM as the target of an incoming
//! migration (with NBD exports for its disks), resume, stop, stop the NBD server, trim.
//! The real implementation drives QEMU ([`crate::qemu`]); a scripted one answers from Lua.

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures_util::future::BoxFuture;

use super::VmConfig;

/// What `start` asks for.
#[derive(Debug, Clone)]
pub struct IncomingStart {
    pub vmid: u32,
    pub config: VmConfig,
    /// `forcemachine` of the source (e.g. `pc-q35-9.2+pve0`).
    pub machine: Option<String>,
    /// `forcecpu` of the source (a `-cpu` argument).
    pub cpu: Option<String>,
    /// Drives to export over NBD: drive key (`scsi0`) → target volid.
    pub nbd: BTreeMap<String, String>,
    /// Multifd channels of the RAM migration (`None`: one stream, as PVE).
    pub multifd: Option<u32>,
    /// `zstd`: the multifd channels carry compressed pages (`None`: uncompressed).
    pub compression: Option<String>,
    /// The source may switch the RAM migration to postcopy (`postcopy-ram`).
    pub postcopy: bool,
}

/// Where the incoming VM listens.
#[derive(Debug, Clone)]
pub struct IncomingStarted {
    /// `{run}/{vmid}.migrate`
    pub migrate_socket: PathBuf,
    /// `{run}/{vmid}_nbd.migrate` when drives are exported.
    pub nbd_socket: Option<PathBuf>,
    /// Drive key → `nbd:unix:<socket>:exportname=drive-<key>`.
    pub nbd_uris: BTreeMap<String, String>,
}

pub type HvResult<T> = anyhow::Result<T>;

pub trait Hypervisor: Send + Sync {
    /// Starts the VM paused, waiting for an incoming migration on a UNIX socket.
    fn start_incoming(&self, req: IncomingStart) -> BoxFuture<'_, HvResult<IncomingStarted>>;
    /// Continues a paused VM (or wakes a suspended one).
    fn resume(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>>;
    /// Hard-stops the VM; stopping a VM that does not run is not an error.
    fn stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>>;
    /// Stops the VM's NBD server.
    fn nbd_stop(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>>;
    fn is_running(&self, vmid: u32) -> BoxFuture<'_, bool>;
    /// Asks the guest agent to trim file systems (probing it first with a short timeout).
    fn fstrim(&self, vmid: u32) -> BoxFuture<'_, HvResult<()>>;
    /// The node's wall clock, seconds since the Unix epoch (`pve.tunnel.now`). Real
    /// backends read the system clock; a scripted one may fix it so specs can assert
    /// time-dependent replies exactly.
    fn now(&self) -> HvResult<i64> {
        Ok(system_clock())
    }
}

/// The system clock in seconds since the Unix epoch (0 if it is before 1970).
pub fn system_clock() -> i64 {
    i64::try_from(crate::util::unix_now()).unwrap_or(i64::MAX)
}
