//! mtunnel: receive (and send) running virtual machines over an authenticated WebSocket
//! tunnel that speaks the Proxmox VE remote-migration protocol.
//!
//! Map of the crate, top to bottom (each layer imports only the layers below it):
//! - [`api`]: the HTTPS server and the `/api2/json` router; each route declares its
//!   parameters as a [`schema`] table next to it; the PVE reply envelope; in a cluster, the
//!   forwarding of `/nodes/{other}/...` to that member (`api::proxy`); the storage views
//!   as PVE shapes them (`api::storage`); the metrics listener; no business logic.
//! - [`tunnel`]: live tunnels: opening one (one atomic place under `max_tunnels`), the
//!   worker loop (the wire rules), the WebSocket ⇄ UNIX forwarder (copying; `tunnel::splice`
//!   moves a plain connection's payload with splice(2); both watched by `tunnel::watch`, the
//!   peer watchdog), recovery at start (untrusted journals set aside). It runs commands through
//!   [`command::CommandHandler`]s built by the factory the [`node`] holds.
//! - [`command`]: the contract between the tunnel and what runs its commands: the handler
//!   trait, its outcome, the tunnel's sockets as a handler sees them, the factory type.
//! - [`script`]: the Lua engine that runs `handlers/*.lua` (the node's default handler
//!   factory) and the host API `pve.*`, one file per table under `script/host/`.
//! - [`journal`]: the durable record of what a tunnel created, its validation, and the one
//!   way to free it (only what the config's origin proves is the tunnel's).
//! - [`auth`]: API tokens (hashed secrets), ACL privileges, tunnel tickets.
//! - [`task`]: UPIDs, task log files, task status and lists.
//! - [`guest`]: VM configs in PVE format (`guest::config`: parse, write, property strings),
//!   the config store and per-VM locks.
//! - [`storage`]: storage definitions, the `dir` and `btrfs` plugins over `qemu-img`, import
//!   streams.
//! - [`qemu`]: QEMU processes, QMP, NBD exports; `qemu::cmdline` builds the command line one
//!   file per section (machine, CPU, memory, devices, drives, network).
//! - [`client`]: the source side: API client, tunnel client, migration (`client::migrate`: a
//!   `Migration` value with one method and one file per phase; `tuning` makes busy guests
//!   converge).
//! - [`bench`](mod@bench): `mtunnel bench`, the benchmark suite (data path, command
//!   latency, idle tunnels, live migration, an emulated WAN link: `bench::wan`) against
//!   baselines.
//!
//! Beside the layers:
//! - [`node`]: where the layers are wired: settings, stores, backends, open tunnels and the
//!   handler factory of one node, as one `Arc<Node>` every layer receives.
//! - [`cluster`]: cluster mode (`[cluster]`): the node's etcd lease and membership, the
//!   cluster-wide VMID registry, the data of the cluster views (over etcd's JSON gateway).
//! - [`metrics`]: the node's Prometheus metrics (one method per thing counted, bounded
//!   label values) and their exposition; any layer may count.
//! - [`config`]: node settings (paths, listen address, storages, plain settings types such
//!   as [`config::Accel`] and [`config::LuaLimits`]) with embedded defaults.
//! - [`schema`]: the one parameter schema language (API routes and handler `params`).
//! - [`ident`]: identifiers (VMID, config id and key, storage id, bridge id, node name).
//! - [`error`]: the API error type; [`util`]: file and clock helpers.
//!
//! The binary (`src/main.rs`) parses the command line with the clap types of `src/cli.rs`
//! (the initial token and `--role` resolution in `src/cli/token.rs`) and dispatches to this
//! library; `script::scripted` is the Lua-answered backend for rehearsals and handler specs.

pub mod api;
pub mod auth;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod command;
pub mod config;
pub mod error;
pub mod guest;
pub mod ident;
pub mod journal;
pub mod metrics;
pub mod node;
pub mod qemu;
pub mod schema;
pub mod script;
pub mod sockbuf;
pub mod storage;
pub mod task;
pub mod tunnel;
pub mod util;
