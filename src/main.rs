//! The `mtunnel` command line: `serve` (the target node), `token` (API tokens), and the
//! source-side and admin commands as they arrive. Parses flags, sets up logging, and
//! hands over to the library; errors are printed with their context chain.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use mtunnel::auth::acl::{self, Acl, AclEntry};
use mtunnel::config::{NodeConfig, Overrides};
use mtunnel::node::Node;

#[derive(Parser)]
#[command(
    name = "mtunnel",
    version,
    about = "Move running VMs between hosts through an authenticated WebSocket tunnel (Proxmox VE remote-migration compatible)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Speak the stdin/stdout language of Proxmox's `proxmox-websocket-tunnel` helper.
    Tunnel,
    /// Find and free what failed migrations left on this node: tunnels of a dead `serve`
    /// (their journals in {data}/tunnels: a started VM is stopped, volumes and the reserved
    /// config freed — never a VM that was resumed here), empty `lock: create`
    /// reservations, volumes of VMIDs that have no config, stale tunnel sockets. Configs
    /// locked `migrate`/`create` by no open tunnel are listed with what to run (`mtunnel vm
    /// unlock` or `mtunnel vm destroy --skiplock`), not changed. Safe while `serve` runs:
    /// what its open tunnels own is skipped.
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
    /// Measure the tunnel against baselines on this machine: bulk throughput and CPU per GiB
    /// (plain and TLS vs. a copy relay), command round trips (Lua vs. raw echo), idle
    /// tunnels (memory, setup time) and a QEMU live migration (tunnel vs. direct); with
    /// --wan the same across an emulated WAN link. Prints a table with the targets and
    /// writes JSON.
    Bench(BenchArgs),
    /// A plain tokio copy relay with 1 MiB buffers (the baseline process of `bench`).
    #[command(hide = true)]
    BenchRelay {
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        listen: mtunnel::bench::relay::Addr,
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        connect: mtunnel::bench::relay::Addr,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Tiny sizes that only prove every section works (16 MiB, 200 commands, 5 tunnels,
    /// a 128 MiB VM); explicit flags still win.
    #[arg(long)]
    quick: bool,
    /// Bytes per transfer and path, e.g. 512M, 2G [default: 1G].
    #[arg(long, value_parser = mtunnel::bench::parse_size)]
    size: Option<u64>,
    /// Transfers per path; the table shows medians [default: 3].
    #[arg(long)]
    repeat: Option<u32>,
    /// Round trips per command kind [default: 10000].
    #[arg(long)]
    commands: Option<u32>,
    /// Tunnels held open at once [default: 100].
    #[arg(long)]
    tunnels: Option<u32>,
    /// RAM of the migrated VM in MiB [default: 512].
    #[arg(long)]
    ram_mib: Option<u64>,
    /// MiB of data loaded into that RAM [default: 448].
    #[arg(long)]
    ram_data_mib: Option<u64>,
    /// Migrations per mode (direct, relay, tunnel) [default: 7].
    #[arg(long)]
    migrations: Option<u32>,
    /// Skip the QEMU live migration.
    #[arg(long)]
    no_qemu: bool,
    /// Run only these sections: throughput, latency, idle, migration (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(mtunnel::bench::SECTIONS))]
    only: Vec<String>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Keep the temporary directory with every process's log.
    #[arg(long)]
    keep: bool,
    /// Measure across an emulated WAN link RTT,RATE[,loss=P][,flowcap=RATE][,queue=BYTES]
    /// (e.g. 20ms,1gbit or 50ms,1gbit,loss=0.1% or 20ms,10gbit,flowcap=1gbit): plain TCP,
    /// the tunnel (plain and TLS) and a live migration (direct vs. `mtunnel migrate
    /// --online`) side by side. Repeat the flag or separate links with ';'. Needs root
    /// (network namespaces, TUN); skipped with a note otherwise. With --wan only the WAN
    /// section runs unless --only names others; defaults become --size 512M --repeat 2
    /// --migrations 2.
    #[arg(long, value_delimiter = ';', value_parser = clap::value_parser!(mtunnel::bench::wan::LinkSpec))]
    wan: Vec<mtunnel::bench::wan::LinkSpec>,
}

#[derive(Subcommand)]
enum VmCommand {
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
    /// Remove the lock from a VM config (as `qm unlock`), e.g. `migrate` left on a VM that
    /// was resumed here when the source vanished before it sent `unlock`. Refused while
    /// an open tunnel of this node works on the VM.
    Unlock {
        vmid: u32,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove a stopped VM with its disks: those its config references and any other
    /// volume owned by the VMID (as PVE's destroy with destroy-unreferenced-disks).
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
struct MigrateArgs {
    /// The VM to migrate.
    vmid: u32,
    /// host=ADDR[,port=8006],apitoken=PVEAPIToken=user@realm!id=SECRET,fingerprint=AA:BB:..
    #[arg(long)]
    target: mtunnel::client::endpoint::TargetEndpoint,
    /// Storage mapping: SOURCE:TARGET pairs and/or one default TARGET.
    #[arg(long)]
    target_storage: mtunnel::client::endpoint::IdMap,
    /// Bridge mapping: SOURCE:TARGET pairs and/or one default TARGET (1 = same names).
    #[arg(long, default_value = "1")]
    target_bridge: mtunnel::client::endpoint::IdMap,
    /// VMID on the target (default: the same).
    #[arg(long)]
    target_vmid: Option<u32>,
    /// Migrate a running VM live.
    #[arg(long)]
    online: bool,
    /// Bandwidth limit in KiB/s.
    #[arg(long)]
    bwlimit: Option<u64>,
    /// Delete the source VM after a successful migration.
    #[arg(long)]
    delete: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Subcommand)]
enum HandlersCommand {
    /// Load every handler (built-ins overridden by DIR) and validate its schema.
    Check {
        /// Handlers directory (default: the node's, {data}/handlers).
        dir: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Run the `*_spec.lua` files of DIR (or the built-in specs) against the handlers
    /// (built-ins overridden by DIR), each case on a fresh temporary node with the scripted
    /// backend.
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
struct NodeArgs {
    /// Optional TOML config file overriding the embedded defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (default: /var/lib/mtunnel for root, else ~/.local/share/mtunnel).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run directory for sockets (default: /run/qemu-server for root, else {data}/run).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Node name (default: the short host name).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Listen address; port 0 picks a free port (default 127.0.0.1:8006).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Storage and hypervisor backend: `real`, or `scripted:FILE.lua` (answers from a Lua
    /// script that can delay, fail or record calls; for tests and rehearsals).
    #[arg(long, default_value = "real", value_parser = parse_backend)]
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
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
enum TokenCommand {
    /// Create (or replace) a token and print its header value once.
    Create(TokenCreateArgs),
}

#[derive(Args)]
struct TokenCreateArgs {
    /// Token id: user@realm!name.
    authid: String,
    /// Privileges to grant, comma-separated (e.g. VM.Allocate,Sys.Incoming).
    #[arg(long, value_delimiter = ',', conflicts_with = "role")]
    privs: Vec<String>,
    /// A role to grant: Administrator, PVEMigrationTarget, PVEVMAdmin, PVEDatastoreUser, PVEAuditor, NoAccess.
    #[arg(long)]
    role: Option<String>,
    /// ACL path the privileges apply to (propagating to paths below).
    #[arg(long, default_value = "/")]
    path: String,
    #[command(flatten)]
    node: NodeArgs,
}

fn main() {
    // Installed (or symlinked) as `proxmox-websocket-tunnel`, we are that helper: a PVE source
    // runs it without arguments and speaks to it over stdin/stdout.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let cli = if invoked_as.as_deref() == Some("proxmox-websocket-tunnel") {
        Cli {
            command: Command::Tunnel,
        }
    } else {
        Cli::parse()
    };
    // Spec runs report through their own output; only problems go to the log by default.
    let default_level = match cli.command {
        Command::Handlers(HandlersCommand::Test { .. }) => "error",
        Command::Bench(_) | Command::BenchRelay { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTUNNEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => run_async(serve(args)),
        Command::Token(TokenCommand::Create(args)) => token_create(args),
        Command::Tunnel => run_async(mtunnel::client::tunnel::run_stdio()),
        Command::Vm(cmd) => run_async(vm_command(cmd)),
        Command::Cleanup { dry_run, node } => run_async(cleanup(node, dry_run)),
        Command::Migrate(args) => run_async(migrate(args)),
        Command::Handlers(HandlersCommand::Check { dir, node }) => handlers_check(dir, &node),
        Command::Handlers(HandlersCommand::Test { dir, filter }) => {
            run_async(handlers_test(dir, filter))
        }
        Command::Bench(args) => run_async(mtunnel::bench::run(bench_options(args))),
        Command::BenchRelay { listen, connect } => {
            run_async(mtunnel::bench::relay::run(listen, connect))
        }
    };
    if let Err(e) = result {
        eprintln!("mtunnel: error: {e:#}");
        std::process::exit(1);
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

fn load_config(args: &NodeArgs, listen: Option<SocketAddr>) -> anyhow::Result<NodeConfig> {
    NodeConfig::load(&Overrides {
        config_file: args.config.clone(),
        node: args.node.clone(),
        data_dir: args.data_dir.clone(),
        run_dir: args.run_dir.clone(),
        listen,
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.node, args.listen)?;
    let node = match &args.backend {
        Backend::Real => Node::open(cfg)?,
        Backend::Scripted(path) => {
            let backend = mtunnel::script::scripted::ScriptedBackend::load(path, &cfg)?;
            println!("backend: scripted ({})", path.display());
            Node::open_with(
                cfg,
                mtunnel::node::Backends {
                    storage: backend.clone(),
                    hypervisor: backend,
                },
            )?
        }
    };
    let initial = if node.tokens.is_empty() {
        let header = node.tokens.create(
            "root@pam!mtunnel",
            full_access(),
            Some("initial token".into()),
        )?;
        let path = node.cfg.priv_dir().join("initial-token");
        mtunnel::util::write_atomic(&path, format!("{header}\n").as_bytes(), 0o600)?;
        Some((header, path))
    } else {
        None
    };
    let _data_lock = mtunnel::node::lock_data_dir(&node.cfg)?;
    raise_fd_limit();
    for line in mtunnel::tunnel::recovery::recover_at_start(&node).await {
        println!("recovery: {line}");
    }
    let tls = mtunnel::api::tls::TlsIdentity::load_or_create(&node.cfg.data_dir, &node.cfg.node)?;
    let server = mtunnel::api::serve(node.clone(), tls).await?;
    println!("mtunnel serving node '{}'", node.cfg.node);
    println!("URL: {}", server.url());
    if server.tls {
        println!("fingerprint: {}", server.fingerprint);
    } else {
        println!(
            "TLS is off (tls = false): plain HTTP, tokens travel in clear; only behind a TLS-terminating proxy or on loopback"
        );
    }
    println!("data dir: {}", node.cfg.data_dir.display());
    if let Some((header, path)) = initial {
        println!(
            "initial API token (shown once, also stored in {}):",
            path.display()
        );
        println!("  {header}");
    }
    use std::io::Write;
    std::io::stdout().flush().ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, shutting down"),
        _ = terminate() => tracing::info!("terminated, shutting down"),
    }
    server.abort();
    let open = mtunnel::tunnel::shutdown(&node).await;
    if open > 0 {
        // Their journals stay: the next start frees what they created.
        tracing::warn!(
            "{open} tunnel(s) still cleaning up after {} s; exiting, the next start recovers them",
            node.cfg.shutdown_timeout.as_secs()
        );
    } else {
        tracing::info!("all tunnels closed, exiting");
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard one: every tunnel stream is a TCP socket
/// plus a UNIX socket, and an EMFILE in the middle of a migration helps nobody.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}

async fn cleanup(args: NodeArgs, dry_run: bool) -> anyhow::Result<()> {
    use mtunnel::tunnel::recovery;
    let node = Node::open(load_config(&args, None)?)?;
    let mut any = false;
    for r in recovery::recover_dead_tunnels(&node, dry_run, recovery::RecoveredBy::Cleanup).await {
        any = true;
        println!("tunnel {} (VM {}):", r.upid, r.vmid);
        for line in r.lines {
            println!("  {line}");
        }
    }
    let found = recovery::find_leftovers(&node).await;
    let verb = if dry_run { "would remove" } else { "removing" };
    for vmid in &found.empty_reservations {
        println!("{verb} empty reservation of VM {vmid} (config 'lock: create')");
    }
    for volid in &found.orphaned_volumes {
        println!("{verb} orphaned volume '{volid}' (its VM has no config)");
    }
    for path in &found.stale_sockets {
        println!("{verb} stale socket {}", path.display());
    }
    for (vmid, lock) in &found.locked_configs {
        println!(
            "VM {vmid} is locked '{lock}' by no open tunnel: if it is complete, \
             'mtunnel vm unlock {vmid}'; if not, 'mtunnel vm destroy {vmid} --skiplock'"
        );
    }
    any |= !(found.empty_reservations.is_empty()
        && found.orphaned_volumes.is_empty()
        && found.stale_sockets.is_empty()
        && found.locked_configs.is_empty());
    if !dry_run {
        for line in recovery::free_leftovers(&node, &found).await {
            println!("{line}");
        }
    }
    if !any {
        println!("nothing to clean up");
    }
    Ok(())
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn full_access() -> Acl {
    Acl {
        entries: vec![AclEntry {
            path: "/".into(),
            privs: acl::ALL_PRIVILEGES.iter().map(|p| p.to_string()).collect(),
            propagate: true,
        }],
    }
}

fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let cfg = load_config(&args.node, None)?;
    let privs: BTreeSet<String> = match (&args.role, args.privs.is_empty()) {
        (Some(role), _) => acl::role_privileges(role)
            .with_context(|| format!("unknown role '{role}'"))?
            .into_iter()
            .map(str::to_string)
            .collect(),
        (None, false) => args
            .privs
            .iter()
            .map(|p| {
                acl::known_privilege(p.trim())
                    .map(str::to_string)
                    .with_context(|| {
                        format!(
                            "unknown privilege '{p}' (known: {})",
                            acl::ALL_PRIVILEGES.join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?,
        (None, true) => BTreeSet::new(),
    };
    if privs.is_empty() {
        eprintln!("note: the token has no privileges; grant some with --role or --privs");
    }
    mtunnel::util::ensure_dir(&cfg.priv_dir(), 0o700)?;
    let store = mtunnel::auth::TokenStore::open(&cfg.priv_dir())?;
    let acl = Acl {
        entries: vec![AclEntry {
            path: args.path,
            privs,
            propagate: true,
        }],
    };
    let header = store.create(&args.authid, acl, None)?;
    println!("{header}");
    Ok(())
}

fn handlers_check(dir: Option<PathBuf>, node: &NodeArgs) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => load_config(node, None)?.handlers_dir,
    };
    let results = mtunnel::script::check_handlers(Some(&dir))?;
    let mut failed = 0;
    for (cmd, result) in &results {
        match result {
            Ok(desc) => println!("ok    {cmd}: {desc}"),
            Err(e) => {
                failed += 1;
                println!("FAIL  {cmd}: {e}");
            }
        }
    }
    println!("{} handlers, {failed} refused", results.len());
    if failed > 0 {
        anyhow::bail!("{failed} handler(s) refused");
    }
    Ok(())
}

async fn vm_command(cmd: VmCommand) -> anyhow::Result<()> {
    use mtunnel::client::vm::{CreateArgs, LocalVms};
    let node_args = match &cmd {
        VmCommand::Create { node, .. }
        | VmCommand::Start { node, .. }
        | VmCommand::Stop { node, .. }
        | VmCommand::Status { node, .. }
        | VmCommand::List { node }
        | VmCommand::Unlock { node, .. }
        | VmCommand::Destroy { node, .. } => node.clone(),
    };
    let vms = LocalVms::open(load_config(&node_args, None)?)?;
    match cmd {
        VmCommand::Create {
            vmid,
            name,
            memory,
            cores,
            disks,
            bridge,
            agent,
            ..
        } => {
            let args = CreateArgs {
                name,
                memory_mib: memory,
                cores,
                disks,
                bridge,
                agent,
            };
            let conf = vms.create(vmid, &args).await?;
            print!("{}", conf.write());
        }
        VmCommand::Start {
            vmid, qemu_args, ..
        } => {
            let pid = vms.start(vmid, &qemu_args).await?;
            println!("VM {vmid} started (pid {pid})");
        }
        VmCommand::Stop { vmid, .. } => {
            if vms.stop(vmid).await? {
                println!("VM {vmid} stopped");
            } else {
                println!("VM {vmid} was not running");
            }
        }
        VmCommand::Status { vmid, .. } => println!("status: {}", vms.status(vmid).await?),
        VmCommand::List { .. } => {
            println!("{:>10} {:<20} {:<10} LOCK", "VMID", "NAME", "STATUS");
            for (vmid, name, status, lock) in vms.list().await {
                println!("{vmid:>10} {name:<20} {status:<10} {lock}");
            }
        }
        VmCommand::Unlock { vmid, .. } => {
            let (journals, _) = mtunnel::script::journal::load_all(&vms.cfg.journal_dir());
            if let Some(open) = journals
                .iter()
                .find(|c| c.vmid == vmid && c.owner.is_alive())
            {
                anyhow::bail!(
                    "VM {vmid} is in use by the open tunnel {} - stop that task first",
                    open.upid
                );
            }
            match vms.unlock(vmid).await? {
                Some(lock) => println!("VM {vmid}: removed lock '{lock}'"),
                None => println!("VM {vmid} was not locked"),
            }
        }
        VmCommand::Destroy { vmid, skiplock, .. } => {
            for volid in vms.destroy(vmid, skiplock).await? {
                println!("freed {volid}");
            }
            println!("VM {vmid} destroyed");
        }
    }
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    use mtunnel::client::migrate::{MigrateOptions, SourceNode, migrate};
    use mtunnel::client::progress::{Progress, human};
    let vms = mtunnel::client::vm::LocalVms::open(load_config(&args.node, None)?)?;
    let src = SourceNode {
        cfg: vms.cfg,
        guests: vms.guests,
        storage: vms.storage,
    };
    let opts = MigrateOptions {
        vmid: args.vmid,
        target: args.target,
        storage_map: args.target_storage,
        bridge_map: args.target_bridge,
        target_vmid: args.target_vmid,
        online: args.online,
        bwlimit: args.bwlimit,
        delete: args.delete,
    };
    let progress = Progress::auto();
    let summary = migrate(&src, &opts, &progress).await?;
    let secs = summary.duration.as_secs_f64();
    let downtime = summary
        .downtime_ms
        .map(|d| format!(", downtime {d} ms"))
        .unwrap_or_default();
    let ram_phase = summary
        .ram_ms
        .map(|ms| format!(", RAM phase {ms} ms"))
        .unwrap_or_default();
    println!(
        "migration of VM {} to {}:{} (node '{}', VM {}) finished in {secs:.1} s: {} of disks, {} of RAM{downtime}{ram_phase}",
        opts.vmid,
        opts.target.host,
        opts.target.port,
        summary.target_node,
        summary.target_vmid,
        human(summary.disk_bytes),
        human(summary.ram_bytes),
    );
    Ok(())
}
async fn handlers_test(dir: Option<PathBuf>, filter: Option<String>) -> anyhow::Result<()> {
    let opts = mtunnel::script::spec::SpecOptions { dir, filter };
    let mut out = std::io::stdout();
    let summary = mtunnel::script::spec::run_specs(&opts, &mut out).await?;
    if summary.failed > 0 {
        anyhow::bail!("{} spec case(s) failed", summary.failed);
    }
    Ok(())
}

fn bench_options(a: BenchArgs) -> mtunnel::bench::Options {
    let d = if a.quick {
        mtunnel::bench::Options::quick()
    } else if !a.wan.is_empty() {
        mtunnel::bench::Options::wan()
    } else {
        mtunnel::bench::Options::full()
    };
    mtunnel::bench::Options {
        size: a.size.unwrap_or(d.size),
        repeat: a.repeat.unwrap_or(d.repeat).max(1),
        commands: a.commands.unwrap_or(d.commands).max(1),
        tunnels: a.tunnels.unwrap_or(d.tunnels).max(1),
        ram_mib: a.ram_mib.unwrap_or(d.ram_mib),
        ram_data_mib: a.ram_data_mib.unwrap_or(d.ram_data_mib),
        migrations: a.migrations.unwrap_or(d.migrations).max(1),
        no_qemu: a.no_qemu,
        only: a.only,
        json: a.json,
        keep: a.keep,
        quick: a.quick,
        wan: a.wan,
    }
}
