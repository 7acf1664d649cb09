//! mtunnel: receive (and send) running virtual machines over an authenticated WebSocket
//! tunnel that speaks the Proxmox VE remote-migration protocol.
//!
//! Map of the crate, top to bottom: a module imports only modules listed below it, so no
//! two modules import each other, however indirectly (`tests/layers.rs` reads every
//! `crate::` path and checks this order).
//! - [`api`]: the HTTPS server and the `/api2/json` router, one router per path area
//!   (`api::routes::{cluster, nodes, access, tasks, storage, qemu}`); each endpoint is
//!   data — its parameters as a [`schema`] table, its path parameters, the privilege it
//!   needs and their order — run by one checked-request function that calls a typed
//!   handler; the PVE reply envelope; in a cluster, the forwarding of `/nodes/{other}/...`
//!   to that member (`api::proxy`); the status page; the metrics listener; no business
//!   logic.
//! - [`client`]: the source side: API client, tunnel client, migration (`client::migrate`: a
//!   `Migration` value with one method and one file per phase; `tuning` makes busy guests
//!   converge), replica runs (`client::replicate`).
//! - [`script`]: the Lua engine that runs `handlers/*.lua` and the host API `pve.*` (one
//!   file per table under `script/host/`); the spec runner and `script::scripted`, the
//!   Lua-answered backend for rehearsals and handler specs.
//! - [`node`]: the composition root: the services of one node, wired once at start
//!   (settings, tokens, tickets, tasks, VM configs, backends, the cluster and metrics, as
//!   one `Arc<Node>`, held whole only where a node is put together — `serve`, the spec
//!   runner's rehearsal — and by the API), and the narrow views it hands the
//!   layers below: [`node::Node::tunnel_services`], [`node::Node::command_host`] (the
//!   cluster's VMID registry behind [`command::VmidRegistry`]),
//!   [`node::Node::journal_services`], [`node::Node::recovery_services`].
//! - [`tunnel`]: live tunnels ([`tunnel::Tunnels`]: a node's open tunnels and the handler
//!   factory it was put together with): opening one (one atomic place under
//!   `max_tunnels`), the worker loop (the wire rules), the status page's view, recovery at
//!   start.
//! - [`command`]: the contract between the tunnel and what runs its commands: the handler
//!   trait, its outcome, the tunnel's sockets as a handler sees them, the factory type, and
//!   what a tunnel and its handler may use of the node (`command::Host`, the
//!   `VmidRegistry` trait).
//! - [`journal`]: the durable record of what a tunnel created, its validation, and the one
//!   way to free it (only what the config's origin proves is the tunnel's), with just the
//!   services freeing needs (`journal::Services`).
//! - [`replica`]: the target side of replicas: the record of a replica (source, disks,
//!   restore points, an unfinished run), the `qemu-nbd` servers a run writes through,
//!   restore points (internal qcow2 snapshots, read-only btrfs snapshots, reflink copies),
//!   `promote` and `drop`.
//! - [`cluster`]: cluster mode (`[cluster]`): the node's etcd lease and membership (member
//!   records signed with the cluster's secret), the cluster-wide VMID registry and its
//!   fencing commit, the data of the cluster views (over etcd's JSON gateway).
//! - [`qemu`]: QEMU processes, QMP, NBD exports; `qemu::cmdline` builds the command line one
//!   file per section (machine, CPU, memory, devices, drives, network).
//! - [`guest`]: VM configs in PVE format (`guest::config`: parse, write, property strings),
//!   the config store and per-VM locks.
//! - [`config`]: node settings (paths, listen address, storages, plain settings types such
//!   as [`config::Accel`] and [`config::LuaLimits`]) with embedded defaults.
//! - [`storage`]: storage definitions, the `dir` and `btrfs` plugins over `qemu-img`, import
//!   streams.
//! - [`net`]: connections: plain or TLS streams, fingerprint pinning, opening a tunnel
//!   WebSocket (`net::ws`), and the WebSocket ⇄ UNIX relay of every tunnel stream
//!   (`net::relay`: one entry point that moves a plain TCP connection's payload with
//!   splice(2) and copies any other through its own codec, both watched by the peer
//!   watchdog).
//! - [`task`]: UPIDs, task log files, task status and lists.
//! - [`auth`]: API tokens (hashed secrets), ACL privileges, tunnel tickets.
//! - [`schema`]: the one parameter schema language (API routes and handler `params`).
//! - [`metrics`]: the node's Prometheus metrics (one method per thing counted, bounded
//!   label values) and their exposition; any layer may count.
//! - [`ident`]: identifiers (VMID, config id and key, storage id, bridge id, node name).
//! - [`lifecycle`]: one way to stop `serve`: the shutdown signal its services watch.
//! - [`error`]: the API error type.
//! - [`util`]: file and clock helpers.
//!
//! The binary (`src/main.rs`) holds `mtunnel bench` (`src/bench/`: the benchmark suite —
//! data path, command latency, idle tunnels, live migration, an emulated WAN link, a busy
//! real guest — against baselines; it uses only this library's public API) and parses the command line with the clap types of `src/cli.rs`
//! (the initial token and `--role` resolution in `src/cli/token.rs`), puts a node together
//! (`src/cli/serve.rs`: the backends, the [`node::Node`], its [`tunnel::Tunnels`] with the
//! Lua handler factory) and dispatches to this library.

pub mod api;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod command;
pub mod config;
pub mod error;
pub mod guest;
pub mod ident;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod node;
pub mod qemu;
pub mod replica;
pub mod schema;
pub mod script;
pub mod storage;
pub mod task;
pub mod tunnel;
pub mod util;
