//! The `mtunnel` binary: parses the command line ([`cli`]), sets up logging and dispatches
//! each subcommand to the library; the commands that need a few steps of glue (`serve`,
//! `cleanup`, `vm`, `migrate`, `handlers`) are the small functions below. Errors are
//! printed with their context chain.

mod cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use cli::{
    Backend, Cli, Command, HandlersCommand, MigrateArgs, NodeArgs, ServeArgs, TokenCommand,
    VmCommand, bench_options, load_config,
};
use mtunnel::node::Node;

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
        Command::Token(TokenCommand::Create(args)) => cli::token::create(args),
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
    // Before anything else changes the data dir: one serve per data dir.
    let _data_lock = mtunnel::node::lock_data_dir(&node.cfg)?;
    let initial = cli::token::bootstrap_initial(&node)?;
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
        // Their journals stay: the next start frees what they created. Exit now rather
        // than tear the runtime down under commands that still run.
        tracing::warn!(
            "{open} tunnel(s) still cleaning up after {} s; exiting, the next start recovers them",
            node.cfg.shutdown_timeout.as_secs()
        );
        std::process::exit(0);
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
    // Holding the data dir's lock, no serve runs: every journal is a dead tunnel's. While
    // serve runs, it recovered them at its start, and a fresh `lock: create` may be a
    // tunnel being opened: leave both to it.
    let lock = match mtunnel::node::lock_data_dir(&node.cfg) {
        Ok(lock) => Some(lock),
        Err(e) if e.downcast_ref::<mtunnel::node::DataDirBusy>().is_some() => {
            println!("{e:#}: only tunnels it gave up on are recovered here");
            None
        }
        Err(e) => return Err(e),
    };
    let which = match lock {
        Some(_) => recovery::Orphans::All,
        None => recovery::Orphans::Abandoned,
    };
    let by = recovery::RecoveredBy::Cleanup;
    for r in recovery::recover_dead_tunnels(&node, which, dry_run, by).await {
        any = true;
        println!("tunnel {} (VM {}):", r.upid, r.vmid);
        for line in r.lines {
            println!("  {line}");
        }
    }
    let mut found = recovery::find_leftovers(&node).await;
    if lock.is_none() {
        found.empty_reservations.clear();
    }
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
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            match vms.unlock(vmid).await? {
                Some(lock) => println!("VM {vmid}: removed lock '{lock}'"),
                None => println!("VM {vmid} was not locked"),
            }
        }
        VmCommand::Destroy { vmid, skiplock, .. } => {
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            for volid in vms.destroy(vmid, skiplock).await? {
                println!("freed {volid}");
            }
            println!("VM {vmid} destroyed");
        }
    }
    Ok(())
}

/// An open tunnel of a running serve works on `vmid`: an operator's change would race it.
fn refuse_if_tunnel_open(cfg: &mtunnel::config::NodeConfig, vmid: u32) -> anyhow::Result<()> {
    let (journals, _) = mtunnel::script::journal::load_all(&cfg.journal_dir());
    if let Some(open) = journals
        .iter()
        .find(|c| c.vmid == vmid && !c.released && !c.abandoned && c.owner.is_alive())
    {
        anyhow::bail!(
            "VM {vmid} is in use by the open tunnel {} - stop that task first \
             (DELETE /nodes/{}/tasks/<upid>, or stop mtunnel serve)",
            open.upid,
            cfg.node
        );
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
