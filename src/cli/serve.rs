//! `mtunnel serve` and `mtunnel cleanup`: the target node's process (backends, data-dir
//! lock, initial token, recovery of dead tunnels, the API server and the metrics listener,
//! graceful shutdown) and the
//! recovery of what dead tunnels left from the command line. The server itself is
//! `mtunnel::api`, the recovery `mtunnel::tunnel::recovery`.

use super::{Backend, NodeArgs, ServeArgs, load_config, load_serve_config};
use mtunnel::node::Node;

/// `mtunnel serve`: opens the node, creates the initial token on first start, recovers
/// what dead tunnels left, serves until SIGINT/SIGTERM, then closes the tunnels.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = load_serve_config(&args.node, args.listen)?;
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
    let config_file = super::config_file(&args.node);
    let _data_lock = mtunnel::node::lock_data_dir(&node.cfg, config_file.as_deref())?;
    let initial = super::token::bootstrap_initial(&node)?;
    raise_fd_limit();
    for line in mtunnel::tunnel::recovery::recover_at_start(&node.recovery_services()).await {
        println!("recovery: {line}");
    }
    let tls = mtunnel::api::tls::TlsIdentity::load_or_create(&node.cfg.data_dir, &node.cfg.node)?;
    // The composition root: the node's tunnels run the Lua handlers.
    let tunnels = mtunnel::tunnel::Tunnels::new(
        node.tunnel_services(),
        std::sync::Arc::new(mtunnel::script::handler::lua_handler),
    );
    // One way to stop: the listeners watch `shutdown`; tunnels are stopped through their
    // tasks, the cluster membership last.
    let shutdown = mtunnel::lifecycle::Shutdown::new();
    let server = mtunnel::api::serve(node.clone(), tunnels, tls, shutdown.watch()).await?;
    println!("mtunnel serving node '{}'", node.cfg.node);
    println!("URL: {}", server.url());
    if server.tls {
        println!("fingerprint: {}", server.fingerprint);
    } else {
        println!(
            "TLS is off (tls = false): plain HTTP, tokens travel in clear; only behind a TLS-terminating proxy or on loopback"
        );
    }
    if let Some(addr) = node.cfg.metrics_listen {
        let m = mtunnel::api::metrics::serve(node.metrics.clone(), addr, shutdown.watch()).await?;
        println!("metrics: {}", m.url());
    }
    println!("data dir: {}", node.cfg.data_dir.display());
    if let Some(cluster) = &node.cluster {
        if let Err(e) = node.join_cluster(&server.url(), &server.fingerprint).await {
            shutdown.stopped(LISTENERS_STOP).await;
            return Err(e);
        }
        println!(
            "cluster: '{}' via etcd {}",
            cluster.name(),
            cluster.config().endpoints.join(",")
        );
    }
    if let Some((header, path)) = initial {
        println!(
            "initial API token (shown once, also stored in {}):",
            path.display()
        );
        println!("  {header}");
    }
    use std::io::Write;
    std::io::stdout().flush().ok();
    // Handlers first: a SIGTERM right after READY must reach the graceful path.
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    // Type=notify: ready once recovered and listening (no-op outside systemd).
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tokio::select! {
        _ = int.recv() => tracing::info!("interrupted, shutting down"),
        _ = term.recv() => tracing::info!("terminated, shutting down"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if !shutdown.stopped(LISTENERS_STOP).await {
        tracing::warn!(
            "a listener did not stop within {} s",
            LISTENERS_STOP.as_secs()
        );
    }
    let open = mtunnel::tunnel::shutdown(&node.tunnel_services()).await;
    if open > 0 {
        // Their journals stay: the next start frees what they created. Their tasks end
        // with the runtime (main gives it a moment), as a crash would end them.
        tracing::warn!(
            "{open} tunnel(s) still cleaning up after {} s; exiting, the next start recovers them",
            node.cfg.shutdown_timeout.as_secs()
        );
    } else {
        tracing::info!("all tunnels closed, exiting");
        // Nothing of ours is reserved any more: leave now rather than after the lease TTL.
        if let Some(cluster) = &node.cluster {
            cluster.leave().await;
        }
    }
    Ok(())
}

/// How long the listeners get to stop accepting (they stop at their next poll).
const LISTENERS_STOP: std::time::Duration = std::time::Duration::from_secs(5);

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

/// `mtunnel cleanup [--dry-run]`: frees what dead tunnels left (all of them when no `serve`
/// holds the data dir, else only those it gave up on) and the leftovers no tunnel owns.
pub async fn cleanup(args: NodeArgs, dry_run: bool) -> anyhow::Result<()> {
    use mtunnel::tunnel::recovery;
    let node = Node::open(load_config(&args, None)?)?;
    let mut any = false;
    // Holding the data dir's lock, no serve runs: every journal is a dead tunnel's. While
    // serve runs, it recovered them at its start, and a fresh `lock: create` may be a
    // tunnel being opened: leave both to it.
    let config_file = super::admin_config_file(&args, &node.cfg.data_dir);
    let lock = match mtunnel::node::lock_data_dir(&node.cfg, config_file.as_deref()) {
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
    let svc = node.recovery_services();
    for line in recovery::set_aside_untrusted(&svc, dry_run) {
        any = true;
        println!("{line}");
    }
    for r in recovery::recover_dead_tunnels(&svc, which, dry_run, by).await {
        any = true;
        println!("tunnel {} (VM {}):", r.upid, r.vmid);
        for line in r.lines {
            println!("  {line}");
        }
    }
    let mut found = recovery::find_leftovers(&svc).await;
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
        for line in recovery::free_leftovers(&svc, &found).await {
            println!("{line}");
        }
    }
    if !any {
        println!("nothing to clean up");
    }
    Ok(())
}
