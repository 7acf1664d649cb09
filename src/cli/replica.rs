//! `mtunnel replicate` (the source: one run, its summary line) and `mtunnel replica
//! list|promote|drop` (the target: the node's replicas, through `mtunnel::replica`, under
//! each VM's config lock and never while an open tunnel works on the VM).

use super::vm::{refuse_if_tunnel_open, retire_journals};
use super::{ReplicaCommand, ReplicateArgs, load_config};
use mtunnel::guest::store::DEFAULT_LOCK_TIMEOUT;
use mtunnel::replica::manage::Parts;

/// `mtunnel replicate`: one run; prints its summary.
pub async fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    use mtunnel::client::migrate::SourceNode;
    use mtunnel::client::progress::Progress;
    use mtunnel::client::replicate::{ReplicateOptions, replicate_until, termination_signals};
    let vms = mtunnel::client::vm::LocalVms::open(load_config(&args.node, None)?)?;
    mtunnel::net::sockbuf::set_tcp_buffer(vms.cfg.tcp_buffer);
    let src = SourceNode {
        cfg: vms.cfg,
        guests: vms.guests,
        storage: vms.storage,
        cluster: vms.cluster,
    };
    let opts = ReplicateOptions {
        vmid: args.vmid,
        target: args.endpoint,
        target_node: args.target_node,
        storage_map: args.target_storage,
        keep: args.keep,
        bwlimit: args.bwlimit,
    };
    let progress = Progress::auto();
    // SIGTERM (systemd stopping the unit) or SIGINT (Ctrl-C): the run cleans up and fails.
    let stop = termination_signals()?;
    let stall = std::time::Duration::from_secs(args.stall_timeout);
    let summary = replicate_until(&src, &opts, stall, &progress, stop).await?;
    println!("{}", summary.line(&opts));
    Ok(())
}

/// `mtunnel replica ...` on the node that holds the replicas.
pub async fn run(cmd: ReplicaCommand) -> anyhow::Result<()> {
    let node_args = match &cmd {
        ReplicaCommand::List { node }
        | ReplicaCommand::Promote { node, .. }
        | ReplicaCommand::Drop { node, .. } => node.clone(),
    };
    let vms = mtunnel::client::vm::LocalVms::open(load_config(&node_args, None)?)?;
    let parts = Parts {
        cfg: &vms.cfg,
        guests: &vms.guests,
        storage: &*vms.storage,
    };
    match cmd {
        ReplicaCommand::List { .. } => list(&vms.cfg)?,
        ReplicaCommand::Promote { vmid, point, .. } => {
            // Under the lock: a tunnel that opens holds it until it is registered.
            let guard = vms.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            let done = parts.promote(&guard, point.as_deref()).await?;
            drop(guard);
            retire_journals(&vms.cfg, vmid, "an operator promoted the replica");
            println!(
                "VM {vmid}: promoted restore point '{}'; the replica is now a normal VM \
                 ('mtunnel vm start {vmid}')",
                done.point
            );
            for left in &done.leftovers {
                eprintln!("WARN: not deleted, remove it by hand: {left}");
            }
        }
        ReplicaCommand::Drop { vmid, .. } => {
            let guard = vms.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
            refuse_if_tunnel_open(&vms.cfg, vmid)?;
            for line in parts.drop_replica(&guard).await? {
                println!("{line}");
            }
            drop(guard);
            if let Some(cluster) = &vms.cluster {
                mtunnel::client::vm::release_logged(cluster, vmid).await;
            }
            retire_journals(&vms.cfg, vmid, "an operator dropped the replica");
            println!("replica {vmid} dropped");
        }
    }
    Ok(())
}

fn list(cfg: &mtunnel::config::NodeConfig) -> anyhow::Result<()> {
    let (replicas, bad) = mtunnel::replica::list(&cfg.data_dir);
    println!(
        "{:>6} {:<20} {:<12} {:>6} {:<12} {:<20} DISKS",
        "VMID", "SOURCE", "STATUS", "POINTS", "NEWEST", "NEWEST AT (UTC)"
    );
    for r in &replicas {
        let alive = mtunnel::replica::run_alive(&cfg.run_dir, r.vmid);
        let newest = r.points.last();
        let disks: Vec<String> = r
            .disks
            .iter()
            .map(|(k, d)| format!("{k}={}", d.volid))
            .collect();
        println!(
            "{:>6} {:<20} {:<12} {:>6} {:<12} {:<20} {}",
            r.vmid,
            format!("{}/{}", r.source.node, r.source.vmid),
            r.status(alive),
            r.points.len(),
            newest.map_or("-", |p| p.name.as_str()),
            newest.map_or_else(|| "-".to_string(), |p| utc(p.time)),
            disks.join(" ")
        );
    }
    for line in bad {
        eprintln!("warning: {line}");
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time.
fn utc(t: u64) -> String {
    let days = i64::try_from(t / 86_400).unwrap_or(0);
    let secs = t % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
