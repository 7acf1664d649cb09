//! The `mtunnel` command line as clap types: every subcommand with its flags and their
//! documentation (what `--help` prints), and the conversions of flags into the library's
//! settings ([`load_config`], [`load_serve_config`], [`bench_options`]). `main.rs`
//! dispatches; the glue of the commands that need more than one library call is in
//! [`serve`] (`serve`, `cleanup`), [`vm`], [`migrate`], [`replica`] (`replicate`,
//! `replica ...`) and [`token`] (`token create` and the initial token).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use mtunnel::config::{NodeConfig, Overrides};
use mtunnel::node::ServeRecord;

pub mod docs;
pub mod doctor;
pub mod migrate;
pub mod replica;
pub mod serve;
pub mod token;
pub mod vm;

#[derive(Parser)]
#[command(
    name = "mtunnel",
    version,
    about = "Move running VMs between hosts through an authenticated WebSocket tunnel (Proxmox VE remote-migration compatible)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the target node: HTTPS API, tunnels, tasks.
    Serve(ServeArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage VMs of this node (the source side of a migration).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Migrate a VM of this node to a remote target through the tunnel.
    Migrate(MigrateArgs),
    /// Send one run of a VM's replica (running or stopped) to a remote mtunnel node.
    ///
    /// The first run copies every disk; each later run only what changed since the last
    /// completed run (QEMU dirty bitmaps; a block-hash comparison where no bitmap can be
    /// trusted: after a cut run, a restarted QEMU, for a stopped VM). The target keeps restore points
    /// (docs/replicas.md); `mtunnel replica` manages them there.
    Replicate(ReplicateArgs),
    /// Manage the replicas this node holds (list, promote a point to a VM, drop).
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Speak the stdin/stdout language of Proxmox's `proxmox-websocket-tunnel` helper.
    Tunnel,
    /// Measure RTT and throughput to a target and say what limits a migration there.
    Doctor(DoctorArgs),
    /// Find and free what failed migrations left on this node.
    ///
    /// Tunnels of a dead `serve` (their journals in {data}/tunnels: a started VM is
    /// stopped, volumes and the reserved config freed — never a VM that was resumed here),
    /// empty `lock: create` reservations, volumes of VMIDs that have no config, stale tunnel sockets; journals
    /// that fail validation are set aside in {data}/tunnels/rejected, never acted on. Configs
    /// locked `migrate`/`create` by no open tunnel are listed with what to run (`mtunnel vm
    /// unlock` or `mtunnel vm destroy --skiplock`), not changed. Safe while `serve` runs:
    /// then only tunnels whose cleanup ended incomplete are retried (serve recovered the
    /// dead ones at its start), and reservations and open tunnels are left to it.
    Cleanup {
        /// Only list what would be freed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Check or test tunnel handler files.
    #[command(subcommand)]
    Handlers(HandlersCommand),
    /// Measure the tunnel against baselines on this machine.
    ///
    /// Bulk throughput and CPU per GiB (plain and TLS vs. a copy relay), command round trips (Lua vs. raw echo), idle
    /// tunnels (memory, setup time) and a QEMU live migration (tunnel vs. direct); with
    /// --wan the same across an emulated WAN link. Prints a table with the targets and
    /// writes JSON.
    Bench(BenchArgs),
    /// A plain tokio copy relay with 1 MiB buffers (the baseline process of `bench`).
    #[command(hide = true)]
    BenchRelay {
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        listen: crate::bench::relay::Addr,
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        connect: crate::bench::relay::Addr,
        /// Speak WebSocket (fastwebsockets) on the TCP side, as this end, one way.
        #[arg(long, value_enum)]
        ws: Option<crate::bench::relay::WsEnd>,
    },
    /// Write the man pages and shell completions into DIR (for the Debian package).
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory: man/man1, man/man5 and completions are made in it.
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct BenchArgs {
    /// Tiny sizes that only prove every section works (16 MiB, 200 commands, 5 tunnels,
    /// a 128 MiB VM); explicit flags still win.
    #[arg(long)]
    pub quick: bool,
    /// Bytes per transfer and path, e.g. 512M, 2G [default: 1G].
    #[arg(long, value_parser = crate::bench::parse_size)]
    pub size: Option<u64>,
    /// Transfers per path; the table shows medians [default: 3].
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Round trips per command kind [default: 10000].
    #[arg(long)]
    pub commands: Option<u32>,
    /// Tunnels held open at once [default: 100].
    #[arg(long)]
    pub tunnels: Option<u32>,
    /// RAM of the migrated VM in MiB [default: 512].
    #[arg(long)]
    pub ram_mib: Option<u64>,
    /// MiB of data loaded into that RAM [default: 448].
    #[arg(long)]
    pub ram_data_mib: Option<u64>,
    /// Migrations per mode (direct, relay, tunnel) [default: 7]; with --wan, 0 skips the
    /// RAM migrations; runs per row of --busy-guest (at least 1).
    #[arg(long)]
    pub migrations: Option<u32>,
    /// MiB of the disk moved across each --wan link, offline and online, --repeat times
    /// each, and of the disk replicated across it (a full and an incremental `mtunnel
    /// replicate` run) (0: none) [default: 1024].
    #[arg(long)]
    pub disk_mib: Option<u64>,
    /// `tcp_buffer_mib` of every mtunnel node of the WAN section (0: the kernel's
    /// autotuning) [default: the config default].
    #[arg(long)]
    pub tcp_buffer_mib: Option<u64>,
    /// `--ram-queue-mib` of every `mtunnel migrate` of the --wan and --busy-guest
    /// sections [default: its default].
    #[arg(long, value_name = "MIB")]
    pub ram_queue_mib: Option<u32>,
    /// Skip everything that runs QEMU (live migrations, disk moves, replicas, the busy guest).
    #[arg(long)]
    pub no_qemu: bool,
    /// Run only these sections: throughput, latency, idle, migration (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(crate::bench::SECTIONS))]
    pub only: Vec<String>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    pub json: PathBuf,
    /// Keep the temporary directory with every process's log.
    #[arg(long)]
    pub keep: bool,
    /// Measure across an emulated WAN link RTT,RATE[,loss=P][,flowcap=RATE][,queue=BYTES]
    /// (e.g. 20ms,1gbit or 50ms,1gbit,loss=0.1% or 20ms,10gbit,flowcap=1gbit): plain TCP,
    /// the tunnel (plain and TLS) and a live migration (direct vs. `mtunnel migrate
    /// --online`) side by side. Repeat the flag or separate links with ';'. Needs root
    /// (network namespaces, TUN); skipped with a note otherwise. With --wan only the WAN
    /// section runs unless --only names others; defaults become --size 512M --repeat 2
    /// --migrations 2.
    #[arg(long, value_delimiter = ';', value_parser = clap::value_parser!(crate::bench::wan::LinkSpec))]
    pub wan: Vec<crate::bench::wan::LinkSpec>,
    /// Live-migrate a busy real guest (a Debian kernel and busybox under TCG, dirtying
    /// memory) across an emulated link RTT,RATE[,...] as --wan takes it (e.g. 20ms,200mbit):
    /// QEMU's defaults, QEMU with PVE's tuning and `mtunnel migrate --online` side by side,
    /// converged or not, total time, downtime. Needs root, QEMU, `apt-get download` access
    /// to Debian's kernel, busybox-static and gcc (the guest is built once and cached);
    /// skipped with a note otherwise. Like --wan, it keeps the loopback sections from
    /// running unless --only names them; defaults become --migrations 2.
    #[arg(long, value_parser = clap::value_parser!(crate::bench::wan::LinkSpec))]
    pub busy_guest: Option<crate::bench::wan::LinkSpec>,
    /// The busy guest: RAM,WORKSET,RATE = MiB of RAM, MiB it keeps rewriting, MB/s it
    /// writes [default: 1024,256,40; with --quick 128,8,32].
    #[arg(long, value_parser = clap::value_parser!(crate::bench::busy::BusyShape))]
    pub busy_shape: Option<crate::bench::busy::BusyShape>,
    /// Seconds after which a busy-guest migration gives up (not converged) [default: 180;
    /// with --quick 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub busy_cap: Option<u64>,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM config with new disks.
    Create {
        vmid: u32,
        #[arg(long)]
        name: Option<String>,
        /// Memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u64,
        #[arg(long, default_value_t = 1)]
        cores: u32,
        /// A disk STORAGE:SIZE[:FORMAT], e.g. local:2G:qcow2 (repeatable; scsi0, scsi1, ...).
        #[arg(long = "disk")]
        disks: Vec<mtunnel::client::vm::DiskArg>,
        /// Add a virtio NIC on this bridge.
        #[arg(long)]
        bridge: Option<String>,
        /// Enable the guest agent channel.
        #[arg(long)]
        agent: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Start a VM (QEMU keeps running after this command returns).
    Start {
        vmid: u32,
        /// Extra QEMU argument, appended verbatim (repeatable; for experts and tests).
        #[arg(long = "qemu-arg", allow_hyphen_values = true)]
        qemu_args: Vec<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Stop a VM.
    Stop {
        vmid: u32,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show whether a VM runs.
    Status {
        vmid: u32,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List the VMs of this node.
    List {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove the lock from a VM config (as `qm unlock`).
    ///
    /// E.g. the lock `migrate` left on a VM that was resumed here when the source vanished
    /// before it sent `unlock`. Refused while an open tunnel of this node works on the VM.
    Unlock {
        vmid: u32,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove a stopped VM with its disks.
    ///
    /// The disks are those its config references and any other volume owned by the VMID
    /// (as PVE's destroy with destroy-unreferenced-disks).
    Destroy {
        vmid: u32,
        /// Destroy even if the config is locked (e.g. after a migration without --delete).
        #[arg(long)]
        skiplock: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args)]
pub struct ReplicateArgs {
    /// The VM to replicate (running, or stopped: its config lock is held for the run).
    pub vmid: u32,
    /// host=ADDR[,port=8006],apitoken=PVEAPIToken=user@realm!id=SECRET,fingerprint=AA:BB:..
    pub endpoint: mtunnel::client::endpoint::TargetEndpoint,
    /// Storage mapping: SOURCE:TARGET pairs and/or one default TARGET.
    #[arg(long)]
    pub target_storage: mtunnel::client::endpoint::IdMap,
    /// Restore points to keep on the target (the oldest beyond go); default: all.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Bandwidth limit in KiB/s (per disk).
    #[arg(long)]
    pub bwlimit: Option<u64>,
    /// Give up a run whose copy made no progress for SECS seconds (a frozen link is
    /// noticed nowhere else): the backup jobs' stall bound and the wait for each NBD
    /// request of a hash sync. The next run continues where the failed one stopped.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = mtunnel::client::replicate::DEFAULT_STALL_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub stall_timeout: u64,
    /// The member of the target's cluster to replicate to, through the node answering at
    /// the endpoint (default: that node). A replica lives on one node: later runs must
    /// name the same one.
    #[arg(long)]
    pub target_node: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// List the replicas of this node: source, status, restore points.
    List {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Turn a restore point (default: the newest) into a normal VM of this node.
    ///
    /// The working copies are set to the point, all points and the replica's record go,
    /// and the config loses its `replica` lock: `mtunnel vm start VMID` then starts it.
    Promote {
        vmid: u32,
        /// The point to promote (`mtunnel replica list` shows them).
        #[arg(long)]
        point: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove a replica: its working copies with every point, its config, its record.
    Drop {
        vmid: u32,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(Args)]
pub struct DoctorArgs {
    /// The target: host=ADDR[,port=8006],apitoken=PVEAPIToken=user@realm!id=SECRET,
    /// fingerprint=AA:BB:.. (as `migrate --target`).
    pub endpoint: mtunnel::client::endpoint::TargetEndpoint,
    /// Target storage of the throw-away volume the throughput test writes (and removes).
    #[arg(long, default_value = "local")]
    pub storage: String,
    /// Bytes pushed through the tunnel, e.g. 256M, 1G.
    #[arg(long, default_value = "256M", value_parser = crate::bench::parse_size)]
    pub size: u64,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM to migrate.
    pub vmid: u32,
    /// host=ADDR[,port=8006],apitoken=PVEAPIToken=user@realm!id=SECRET,fingerprint=AA:BB:..
    #[arg(long)]
    pub target: mtunnel::client::endpoint::TargetEndpoint,
    /// Storage mapping: SOURCE:TARGET pairs and/or one default TARGET.
    #[arg(long)]
    pub target_storage: mtunnel::client::endpoint::IdMap,
    /// Bridge mapping: SOURCE:TARGET pairs and/or one default TARGET (1 = same names).
    #[arg(long, default_value = "1")]
    pub target_bridge: mtunnel::client::endpoint::IdMap,
    /// VMID on the target (default: the same).
    #[arg(long)]
    pub target_vmid: Option<u32>,
    /// The node of the target's cluster to migrate to (default: the node answering at the
    /// endpoint); the endpoint's node forwards to it.
    #[arg(long)]
    pub target_node: Option<String>,
    /// Migrate a running VM live. When the target holds a current replica of the VM
    /// (`mtunnel replicate`), the migration cuts over to it: one replica run first, then
    /// only the blocks written since are copied, while the guest is stopped for the switch
    /// (QEMU's pause-before-switchover); the cutover downtime is printed.
    #[arg(long)]
    pub online: bool,
    /// Cut a running VM over to the target's replica of it with the guest paused from the
    /// last replica run until it runs on the target (for a QEMU without
    /// pause-before-switchover); the downtime is printed. Needs a replica on the target.
    #[arg(long, conflicts_with = "no_replica")]
    pub final_sync: bool,
    /// Do not cut over to a replica of the VM on the target: a target VMID that holds one
    /// is refused (drop the replica there first).
    #[arg(long)]
    pub no_replica: bool,
    /// Bandwidth limit in KiB/s.
    #[arg(long)]
    pub bwlimit: Option<u64>,
    /// Delete the source VM after a successful migration.
    #[arg(long)]
    pub delete: bool,
    /// Parallel streams for the RAM of a live migration (QEMU multifd, one WebSocket per
    /// channel), e.g. 4 on a path that caps each TCP flow. Default 1: the single stream of
    /// a PVE migration (multifd lengthens the guest's final pause). A target that does not
    /// announce multifd (a PVE node) always gets one stream.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: Option<u32>,
    /// Do not let QEMU throttle the guest's vCPUs when it dirties memory faster than the
    /// link sends it (auto-converge, on by default as in PVE).
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Percent auto-converge adds to the vCPU throttle (from 20 %) each time the guest
    /// still dirtied faster than the link sent (QEMU's `cpu-throttle-increment`; PVE
    /// leaves QEMU's 10, which takes a busy guest's migration about half as long again on
    /// a slow link: docs/performance.md).
    #[arg(long, value_name = "PCT", default_value_t = mtunnel::client::migrate::tuning::DEFAULT_THROTTLE_INCREMENT, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub throttle_increment: u8,
    /// Do not send re-dirtied pages as XBZRLE deltas (on by default as in PVE, with a cache
    /// of a tenth of the VM's RAM; always off with multifd).
    #[arg(long)]
    pub no_xbzrle: bool,
    /// Keep the downtime limit at 100 ms instead of doubling it whenever the remaining RAM
    /// grew in 6 samples (as PVE does).
    #[arg(long)]
    pub no_downtime_escalation: bool,
    /// Never raise the downtime limit past MS milliseconds (QEMU aims to keep the guest's
    /// pause at the switch below the limit); default: no bound, as PVE.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..))]
    pub max_downtime: Option<u64>,
    /// Give up a live migration whose RAM has not converged after SECS seconds: it is
    /// cancelled and the VM keeps running on the source (with --postcopy: only before the
    /// switch, after which the migration runs to its end).
    #[arg(long, value_name = "SECS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_ram_time: u64,
    /// Give up a live migration whose RAM or disk mirror made no progress for SECS
    /// seconds (a frozen link is noticed nowhere else); the VM keeps running on the
    /// source. A cut link (a broken WebSocket) fails the migration at once instead. Not
    /// for the RAM of a --postcopy migration: giving up after the switch would stop the
    /// guest (until the switch, --max-ram-time bounds it).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = mtunnel::client::migrate::DEFAULT_STALL_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub stall_timeout: u64,
    /// Compress the RAM's multifd channels (needs --streams 2 or more and a target that
    /// offers zstd): auto = zstd only when --bwlimit is at most 128 MiB/s, where fewer
    /// bytes beat its CPU cost (measured: docs/performance.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub compress: mtunnel::client::migrate::tuning::Compression,
    /// Switch the RAM migration to postcopy when precopy does not converge: after the
    /// first full pass, once the remaining RAM stopped shrinking for 3 s, the target
    /// commits the VM ('resume') and the guest moves to it at once, fetching the pages it
    /// still lacks from the source. Risk: from the switch until the RAM completes the
    /// guest's memory is split between both hosts: a cut link stops the guest (QEMU can
    /// resume such a migration by hand from postcopy-paused; mtunnel does not), and a
    /// crash of either host or QEMU loses the VM. One RAM stream only (QEMU 10.0 refuses
    /// postcopy with multifd).
    #[arg(long)]
    pub postcopy: bool,
    /// The most, in MiB, the queue behind QEMU may hold once a single RAM stream
    /// struggles (CPU throttle or a raised downtime limit): it then holds half the
    /// downtime limit at the link's rate, and QEMU switches over only when the RAM left
    /// fits the other half, so the guest's real pause stays within the limit
    /// (docs/performance.md). Until then it stays at the kernel's ~200 KiB, so an idle
    /// guest's switch leaves little queued. 0: never sized, QEMU connects to the tunnel
    /// itself and switches by its own estimate. Not with --streams 2 or more, nor with
    /// --postcopy (after the switch, faulted pages would wait behind the queue).
    #[arg(long, value_name = "MIB", default_value_t = mtunnel::client::migrate::tuning::DEFAULT_RAM_QUEUE_MIB, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub ram_queue_mib: u32,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Subcommand)]
pub enum HandlersCommand {
    /// Load every handler (built-ins overridden by DIR) and validate its schema.
    ///
    /// A DIR without *.lua files whose subdirectories hold them (a cookbook such as
    /// examples/handlers) is checked recipe by recipe.
    Check {
        /// Handlers directory (default: the node's, {data}/handlers).
        dir: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Run the handler specs (`*_spec.lua`) of DIR or the built-in ones.
    ///
    /// The specs run against the handlers (built-ins overridden by DIR), each case on a
    /// fresh temporary node with the scripted backend. A DIR without *.lua files whose
    /// subdirectories hold them (a cookbook such as examples/handlers) runs each recipe's
    /// specs against its own overrides.
    Test {
        /// Handlers directory with overrides and specs (default: built-ins only).
        dir: Option<PathBuf>,
        /// Only run cases whose "file: case" name contains this text.
        #[arg(long)]
        filter: Option<String>,
    },
}

/// Where the node keeps its state; shared by every command that touches a node.
#[derive(Args, Clone)]
pub struct NodeArgs {
    /// TOML config file overriding the embedded defaults (default: /etc/mtunnel/mtunnel.toml
    /// if it exists; commands other than `serve`: the file the data dir's `serve` read).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (default: /var/lib/mtunnel for root, else ~/.local/share/mtunnel).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run directory for sockets and pidfiles (default: /run/qemu-server for root, else
    /// {data}/run; commands other than `serve`: the one the data dir's `serve` uses).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Node name (default: the short host name).
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Listen address; port 0 picks a free port (default 127.0.0.1:8006).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Storage and hypervisor backend: `real`, or `scripted:FILE.lua` (answers from a Lua
    /// script that can delay, fail or record calls; for tests and rehearsals).
    #[arg(long, default_value = "real", value_parser = parse_backend)]
    pub backend: Backend,
}

#[derive(Clone)]
pub enum Backend {
    Real,
    Scripted(PathBuf),
}

fn parse_backend(arg: &str) -> Result<Backend, String> {
    Ok(match mtunnel::script::scripted::parse_backend_arg(arg)? {
        None => Backend::Real,
        Some(path) => Backend::Scripted(path),
    })
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create (or replace) a token and print its header value once.
    Create(TokenCreateArgs),
}

#[derive(Args)]
pub struct TokenCreateArgs {
    /// Token id: user@realm!name.
    pub authid: String,
    /// Privileges to grant, comma-separated (e.g. VM.Allocate,Sys.Incoming).
    #[arg(long, value_delimiter = ',', conflicts_with = "role")]
    pub privs: Vec<String>,
    /// A role to grant: Administrator, PVEMigrationTarget, PVEVMAdmin, PVEDatastoreUser, PVEAuditor, NoAccess.
    #[arg(long)]
    pub role: Option<String>,
    /// ACL path the privileges apply to (propagating to paths below).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Read the secret from the first line of stdin instead of making a random one: the
    /// same token on every node of a cluster (requests for another node are forwarded
    /// there and checked there).
    #[arg(long)]
    pub secret_stdin: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// The config file of the Debian package, read when no `--config` is given.
pub const PACKAGED_CONFIG: &str = "/etc/mtunnel/mtunnel.toml";

/// The config file a command reads: `--config`, else [`PACKAGED_CONFIG`] if it exists.
pub fn config_file(args: &NodeArgs) -> Option<PathBuf> {
    args.config
        .clone()
        .or_else(|| Some(PathBuf::from(PACKAGED_CONFIG)).filter(|p| p.is_file()))
}

fn overrides(args: &NodeArgs, file: Option<PathBuf>, listen: Option<SocketAddr>) -> Overrides {
    Overrides {
        config_file: file,
        node: args.node.clone(),
        data_dir: args.data_dir.clone(),
        run_dir: args.run_dir.clone(),
        listen,
    }
}

/// `serve`'s settings: flags over the config file ([`config_file`]) over the defaults.
pub fn load_serve_config(
    args: &NodeArgs,
    listen: Option<SocketAddr>,
) -> anyhow::Result<NodeConfig> {
    NodeConfig::load(&overrides(args, config_file(args), listen))
}

/// The settings of every other command: as `serve`'s, and then, unless given by a flag,
/// the config file and run dir that the data dir's `serve` recorded in `{data}/serve.lock`
/// (VMs it started keep running after it exits). So `mtunnel vm destroy VMID --data-dir D`
/// judges "running" by the pidfiles `serve` actually wrote.
pub fn load_config(args: &NodeArgs, listen: Option<SocketAddr>) -> anyhow::Result<NodeConfig> {
    let file = config_file(args);
    let cfg = NodeConfig::load(&overrides(args, file.clone(), listen))?;
    let Some(record) = ServeRecord::read(&cfg.data_dir) else {
        return Ok(cfg);
    };
    let mut cfg = match &record.config {
        Some(recorded) if args.config.is_none() && file.as_ref() != Some(recorded) => {
            if !recorded.is_file() {
                anyhow::bail!(
                    "the mtunnel serve (pid {}) of the data dir {} read the config file {}, \
                     which is gone: pass --config FILE (and --run-dir DIR)",
                    record.pid,
                    cfg.data_dir.display(),
                    recorded.display()
                );
            }
            let mut o = overrides(args, Some(recorded.clone()), listen);
            o.data_dir = Some(cfg.data_dir.clone());
            NodeConfig::load(&o)?
        }
        _ => cfg,
    };
    if args.run_dir.is_none() && record.run_dir != cfg.run_dir {
        eprintln!(
            "note: using the run dir {} of the mtunnel serve (pid {}) of the data dir {}, \
             not {} (--run-dir overrides)",
            record.run_dir.display(),
            record.pid,
            cfg.data_dir.display(),
            cfg.run_dir.display()
        );
        cfg.run_dir = record.run_dir;
    }
    Ok(cfg)
}

/// The config file [`load_config`] read for a node with data dir `data_dir`.
pub fn admin_config_file(args: &NodeArgs, data_dir: &std::path::Path) -> Option<PathBuf> {
    args.config
        .clone()
        .or_else(|| ServeRecord::read(data_dir).and_then(|r| r.config))
        .or_else(|| config_file(args))
}

pub fn bench_options(a: BenchArgs) -> crate::bench::Options {
    let d = if a.quick {
        crate::bench::Options::quick()
    } else if !a.wan.is_empty() || a.busy_guest.is_some() {
        crate::bench::Options::wan()
    } else {
        crate::bench::Options::full()
    };
    crate::bench::Options {
        size: a.size.unwrap_or(d.size),
        repeat: a.repeat.unwrap_or(d.repeat).max(1),
        commands: a.commands.unwrap_or(d.commands).max(1),
        tunnels: a.tunnels.unwrap_or(d.tunnels).max(1),
        ram_mib: a.ram_mib.unwrap_or(d.ram_mib),
        ram_data_mib: a.ram_data_mib.unwrap_or(d.ram_data_mib),
        // A WAN run may skip its RAM migrations (0); the loopback section needs one.
        migrations: a
            .migrations
            .unwrap_or(d.migrations)
            .max(u32::from(a.wan.is_empty())),
        disk_mib: a.disk_mib.unwrap_or(d.disk_mib),
        tcp_buffer_mib: a.tcp_buffer_mib,
        ram_queue_mib: a.ram_queue_mib,
        no_qemu: a.no_qemu,
        only: a.only,
        json: a.json,
        keep: a.keep,
        quick: a.quick,
        wan: a.wan,
        busy_guest: a.busy_guest,
        busy_shape: a.busy_shape.unwrap_or(d.busy_shape),
        busy_cap_s: a.busy_cap.unwrap_or(d.busy_cap_s),
    }
}
