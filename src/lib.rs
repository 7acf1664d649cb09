//! mtunnel: receive (and send) running virtual machines over an authenticated WebSocket
//! tunnel that speaks the Proxmox VE remote-migration protocol.
//!
//! Map of the crate, top to bottom (dependencies point downward):
//! - [`api`]: the HTTPS server and the `/api2/json` router; parameter parsing and the PVE
//!   reply envelope, no business logic.
//! - [`auth`]: API tokens (hashed secrets), ACL privileges, tunnel tickets.
//! - [`task`]: UPIDs, task log files, task status and lists.
//! - [`tunnel`]: live tunnels: opening one, the worker loop, the WebSocket ⇄ UNIX forwarder.
//! - [`script`]: the Lua engine that runs `handlers/*.lua`.
//! - [`guest`]: VM configs in PVE format, the config store and per-VM locks.
//! - [`storage`]: storage definitions, the `dir` plugin over `qemu-img`, import streams.
//! - [`qemu`]: QEMU processes, QMP, NBD exports.
//! - [`client`]: the source side: API client, tunnel client, migration.
//! - [`config`]: node settings (paths, listen address, storages) with embedded defaults.
//! - [`bench`]: `mtunnel bench`, the benchmark suite (data path, command latency, idle
//!   tunnels, live migration) against baselines, and a WAN emulator (`bench::wan`) for
//!   measuring across an emulated link.

pub mod api;
pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod guest;
pub mod node;
pub mod qemu;
pub mod script;
pub mod storage;
pub mod task;
pub mod tunnel;
pub mod util;
