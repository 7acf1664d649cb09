//! Guests (VMs) on this node: the config store under `{data}/qemu-server/{vmid}.conf` and the
//! per-VM config lock. The lock is taken in-process (a tokio mutex per VMID) AND with
//! `flock` on `{data}/lock/lock-{vmid}.conf`, so a CLI on the same node cannot race the
//! server. The config text format itself lives in [`config`] (`parse.rs`, `write.rs`,
//! `props.rs` for property strings and drives); the backend trait VMs are started through
//! is [`hypervisor`].

pub mod config;
pub mod hypervisor;
pub mod store;

pub use config::VmConfig;
pub use hypervisor::{Hypervisor, IncomingStart, IncomingStarted};
pub use store::{ConfigStore, GuestError, VmLockGuard};
