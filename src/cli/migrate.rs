//! `mtunnel migrate`: the flags turned into `MigrateOptions`, the migration run with a
//! progress display, and its one-line summary.

use super::{MigrateArgs, load_config};

/// Flag combinations QEMU cannot do, refused before anything happens.
fn check_ram_flags(opts: &mtunnel::client::migrate::MigrateOptions) -> anyhow::Result<()> {
    use mtunnel::client::migrate::tuning::Compression;
    let streams = opts.streams.unwrap_or(1);
    if opts.tuning.postcopy && streams > 1 {
        anyhow::bail!(
            "--postcopy cannot be combined with --streams {streams}: QEMU 10.0 refuses postcopy with multifd"
        );
    }
    if opts.tuning.compress == Compression::Zstd && streams < 2 {
        anyhow::bail!(
            "--compress zstd needs multifd: add --streams 2 or more (QEMU compresses only multifd channels)"
        );
    }
    if !opts.online && (opts.tuning.postcopy || opts.tuning.compress == Compression::Zstd) {
        anyhow::bail!(
            "--postcopy and --compress zstd apply to the RAM of --online migrations only"
        );
    }
    Ok(())
}

/// `mtunnel migrate`: runs `mtunnel::client::migrate` and prints its summary.
pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    use mtunnel::client::migrate::tuning::RamTuning;
    use mtunnel::client::migrate::{MigrateOptions, SourceNode, migrate};
    use mtunnel::client::progress::{Progress, human};
    let vms = mtunnel::client::vm::LocalVms::open(load_config(&args.node, None)?)?;
    mtunnel::net::sockbuf::set_tcp_buffer(vms.cfg.tcp_buffer);
    let src = SourceNode {
        cfg: vms.cfg,
        guests: vms.guests,
        storage: vms.storage,
        cluster: vms.cluster,
    };
    let opts = MigrateOptions {
        vmid: args.vmid,
        target: args.target,
        storage_map: args.target_storage,
        bridge_map: args.target_bridge,
        target_vmid: args.target_vmid,
        target_node: args.target_node,
        online: args.online,
        bwlimit: args.bwlimit,
        delete: args.delete,
        streams: args.streams,
        tuning: RamTuning {
            auto_converge: !args.no_auto_converge,
            throttle_increment: args.throttle_increment,
            xbzrle: !args.no_xbzrle,
            escalate_downtime: !args.no_downtime_escalation,
            max_downtime_ms: args.max_downtime,
            max_ram_time: std::time::Duration::from_secs(args.max_ram_time),
            compress: args.compress,
            postcopy: args.postcopy,
            ram_queue_mib: args.ram_queue_mib,
        },
        stall_timeout: std::time::Duration::from_secs(args.stall_timeout),
        final_sync: args.final_sync,
        no_replica: args.no_replica,
    };
    check_ram_flags(&opts)?;
    let progress = Progress::auto();
    let summary = migrate(&src, &opts, &progress).await?;
    let secs = summary.duration.as_secs_f64();
    let downtime = match (summary.downtime_ms, summary.handover_ms) {
        (Some(d), Some(h)) => format!(", downtime {d} ms + {h} ms until the target ran the guest"),
        (Some(d), None) => format!(", downtime {d} ms"),
        _ => String::new(),
    };
    let disk_phase = summary
        .disk_ms
        .map(|ms| format!(" (disk phase {ms} ms)"))
        .unwrap_or_default();
    let ram_phase = summary
        .ram_ms
        .map(|ms| format!(", RAM phase {ms} ms"))
        .unwrap_or_default();
    let cutover = (summary.cutover.as_ref())
        .map(mtunnel::client::migrate::CutoverFigures::summary)
        .unwrap_or_default();
    println!(
        "migration of VM {} to {}:{} (node '{}', VM {}) finished in {secs:.1} s: {} of disks{disk_phase}, {} of RAM{downtime}{ram_phase}{cutover}",
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
