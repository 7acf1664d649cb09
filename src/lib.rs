//! mtunnel: receive (and send) running virtual machines over an authenticated WebSocket
//! tunnel that speaks the Proxmox VE remote-migration protocol.
//!
//! Map of the crate, top to bottom (dependencies point downward):
//! - [`api`]: the HTTPS server and the `/api2/json` router; parameter parsing and the PVE
//!   reply envelope, no business logic.
//! - [`auth`]: API tokens (hashed secrets), ACL privileges, tunnel tickets.
//! - [`task`]: UPIDs, task log files, task status and lists.
//! - [`tunnel`]: live tunnels: opening one, the worker loop, the WebSocket ⇄ UNIX forwarder.
//! - [`script`]: the Lua engine that runs `handlers/*.lua`; `script::scripted` is the Lua-
//!   answered test backend (its fake, its Lua API and its backend impls in one folder).
//! - [`guest`]: VM configs in PVE format (`guest::config`: parse, write, property strings),
//!   the config store and per-VM locks.
//! - [`storage`]: storage definitions, the `dir` plugin over `qemu-img`, import streams.
//! - [`qemu`]: QEMU processes, QMP, NBD exports; `qemu::cmdline` builds the command line one
//!   file per section (machine, CPU, memory, devices, drives, network).
//! - [`client`]: the source side: API client, tunnel client, migration (`client::migrate`: a
//!   `Migration` value with one method and one file per phase).
//! - [`config`]: node settings (paths, listen address, storages) with embedded defaults.
//! - [`bench`](mod@bench): `mtunnel bench`, the benchmark suite (data path, command
//!   latency, idle tunnels, live migration) against baselines.
//!
//! The binary (`src/main.rs`) parses the command line with the clap types of `src/cli.rs`
//! (the initial token and `--role` resolution in `src/cli/token.rs`) and dispatches to this
//! library.

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
