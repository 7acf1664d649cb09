//! Preparing a migration: the local checks (the VM exists, is not locked, has no snapshots,
//! runs only if `--online`), the plan (volumes and their target storages, bridges), the
//! target's checks over its API (node name, free VMID or a replica of the VM, storages),
//! for a cutover to that replica one replica run (`cutover.rs`), opening the tunnel
//! (`mtunnel`, control connection) and the `version` command. Nothing is locked or changed
//! on the source yet (`--final-sync` has paused the guest: a failure here resumes it).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::cutover::Cutover;
use super::remote::Remote;
use super::{MigrateOptions, Migration, Plan, SourceNode, Summary, Volume, unique};
use crate::client::endpoint::{IdMap, TargetEndpoint};
use crate::client::http::ApiClient;
use crate::client::progress::Progress;
use crate::guest::config::{self as vmconf, VmConfig};
use crate::qemu;

impl<'a> Migration<'a> {
    /// Checks the VM and the target and opens the tunnel. A failed `version` check asks the
    /// target to clean up before it returns.
    pub(super) async fn prepare(
        src: &'a SourceNode,
        opts: &'a MigrateOptions,
        progress: &'a Progress,
    ) -> anyhow::Result<Migration<'a>> {
        let plan = plan(src, opts, progress).await?;
        let (mut remote, cutover) = open_tunnel(src, opts, &plan, progress).await?;
        if let Err(e) = check_remote(&mut remote, cutover.is_some()).await {
            remote.request_cleanup(progress).await;
            if let Some(c) = &cutover {
                c.resume_source(src, opts.vmid, progress).await;
                return Err(c.failed(e, src, opts.vmid));
            }
            return Err(e);
        }
        let summary = Summary {
            target_vmid: remote.tvmid,
            target_node: remote.node.clone(),
            ..Summary::default()
        };
        Ok(Migration {
            src,
            opts,
            progress,
            plan: Arc::new(plan),
            remote,
            summary,
            cutover,
        })
    }
}

/// `version` (and `mtunnel-features`); a cutover needs a target that offers it.
async fn check_remote(remote: &mut Remote, cutover: bool) -> anyhow::Result<()> {
    remote.check_version().await?;
    if cutover && !remote.cutover_offered {
        bail!(
            "the target does not offer the cutover to a replica (its 'mtunnel-features' has \
             no 'cutover'): upgrade mtunnel there"
        );
    }
    Ok(())
}

/// The local checks, first: nothing remote happens for a VM that cannot move.
async fn plan(
    src: &SourceNode,
    opts: &MigrateOptions,
    progress: &Progress,
) -> anyhow::Result<Plan> {
    let vmid = opts.vmid;
    let tvmid = opts.target_vmid.unwrap_or(vmid);
    if opts.storage_map.identity {
        bail!("remote migration requires explicit storage mapping!");
    }
    let (_, conf) = src.unlocked_config(vmid)?;
    if !conf.snapshots.is_empty() {
        bail!("remote migration with snapshots not supported yet");
    }
    let running = qemu::process::is_running(&src.cfg.run_dir, vmid).is_some();
    if running && !opts.online && !opts.final_sync {
        bail!("VM {vmid} is running - use --online to migrate it live");
    }
    if opts.final_sync && !running {
        bail!("--final-sync cuts a running VM over to its replica: VM {vmid} is not running");
    }
    let volumes = plan_volumes(src, &conf, opts, running).await?;
    if opts.tuning.postcopy
        && let Some(v) = volumes.iter().find(|v| v.live)
    {
        // After the switch the guest writes on the target while the source's mirror of
        // the same disk may still copy; nothing proves it has nothing left by then.
        bail!(
            "--postcopy with local disks is not supported: {} ({}) would be mirrored while the guest already runs on the target - move the disks first, or migrate without --postcopy",
            v.key,
            v.volid
        );
    }
    let bridges = plan_bridges(&conf, &opts.bridge_map)?;
    progress.log(format!(
        "migrating VM {vmid} ({}) to {}:{} as VM {tvmid}: {} volume(s)",
        if running { "online" } else { "offline" },
        opts.target.host,
        opts.target.port,
        volumes.len()
    ));
    Ok(Plan {
        conf,
        volumes,
        bridges,
        running,
    })
}

/// The target's checks over its API (a replica of the VM there makes this migration a
/// cutover, brought up to date first), then `mtunnel` and the control connection.
async fn open_tunnel(
    src: &SourceNode,
    opts: &MigrateOptions,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(Remote, Option<Cutover>)> {
    let tvmid = opts.target_vmid.unwrap_or(opts.vmid);
    let fingerprint = match opts.target.fingerprint.clone() {
        Some(f) => f,
        None => pinned_fingerprint(&opts.target).await?,
    };
    let api = ApiClient::new(
        opts.target.host.clone(),
        opts.target.port,
        opts.target.apitoken.clone(),
        fingerprint,
    )?
    .keep_alive();

    let (node, cutover) = check_target_side(&api, src, opts, plan, progress).await?;
    let storages: Vec<String> = unique(plan.volumes.iter().map(|v| v.target_storage.clone()));
    let bridge_ids: Vec<String> = unique(plan.bridges.values().cloned());
    let mut params = vec![
        ("storages", storages.join(",")),
        ("bridges", bridge_ids.join(",")),
    ];
    if cutover.is_some() {
        // The replica's VMID is reopened, not reserved (docs/replicas.md).
        params.push(("replica", "1".to_string()));
    }
    let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let opened = match open_retrying(&api, opts, &node, tvmid, &params).await {
        Ok(opened) => opened,
        Err(e) => {
            if let Some(c) = &cutover {
                c.resume_source(src, opts.vmid, progress).await;
                return Err(c.failed(e, src, opts.vmid));
            }
            return Err(e);
        }
    };
    progress.log(format!("remote: started tunnel worker '{}'", opened.upid));
    let (base_url, control) = (opened.base_url, opened.control);
    let remote = Remote {
        api,
        control,
        node,
        tvmid,
        base_url,
        forwards: Vec::new(),
        resume_sent: false,
        ram_done: false,
        multifd_max: None,
        zstd_offered: false,
        postcopy_offered: false,
        resumed_early: false,
        postcopy: false,
        cutover_offered: false,
    };
    Ok((remote, cutover))
}

/// The target's node and checks; a replica of the VM there makes this migration a
/// cutover, brought up to date here (`Cutover::prepare`).
async fn check_target_side(
    api: &ApiClient,
    src: &SourceNode,
    opts: &MigrateOptions,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<(String, Option<Cutover>)> {
    let tvmid = opts.target_vmid.unwrap_or(opts.vmid);
    // Independent GETs, each on its own connection: in parallel they cost the round trips
    // of one (TCP, TLS, request) instead of three times that. Errors are judged in the
    // old order, so a failure reads as before.
    let asked = opts.target_node.as_deref();
    let ours = ReplicaOf {
        node: &src.cfg.node,
        vmid: opts.vmid,
        no_replica: opts.no_replica,
    };
    let (node, checked) = tokio::join!(
        api.target_node(asked),
        check_target(
            api,
            tvmid,
            asked.unwrap_or("localhost"),
            &plan.volumes,
            &ours
        )
    );
    let mut node = node?;
    let replica_on = checked?;
    // In a cluster the replica may be on another member than the one answering: without
    // --target-node the migration goes to the replica's node (through the one answering).
    if let Some(on) = &replica_on {
        match asked {
            Some(asked) if asked != on => bail!(
                "target VMID {tvmid} holds a replica of this VM on node '{on}', not on \
                 '{asked}': migrate with --target-node {on} to cut over to it"
            ),
            _ => node = on.clone(),
        }
    }
    let replica_here = replica_on.is_some();
    if opts.final_sync && !replica_here {
        bail!(
            "--final-sync cuts over to a replica, and the target holds no replica of VM {} \
             ('mtunnel replicate' first, or migrate with --online)",
            opts.vmid
        );
    }
    let cutover = match replica_here {
        true => Some(Cutover::prepare(src, opts, plan, &node, progress).await?),
        false => None,
    };
    Ok((node, cutover))
}

/// `super::open_tunnel`; while the replica run just before it still ends on the target
/// (its tunnel is open until its worker ended), the open is tried again, at most 10 s.
async fn open_retrying(
    api: &ApiClient,
    opts: &MigrateOptions,
    node: &str,
    tvmid: u32,
    params: &[(&str, &str)],
) -> anyhow::Result<super::OpenedTunnel> {
    let mut tries = 0;
    loop {
        let opened = super::open_tunnel(api, &opts.target, node, tvmid, params, "the tunnel").await;
        match opened {
            Err(e) if tries < 40 && format!("{e:#}").contains("one replica run at a time") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// The source VM, as a replica on the target names it (`replica-source`).
struct ReplicaOf<'a> {
    node: &'a str,
    vmid: u32,
    no_replica: bool,
}

/// Whether the target VMID's entry in the target's `/cluster/resources` is a replica of
/// this source VM that the migration may cut over to (then the node holding it); any
/// other used VMID is refused.
fn judge_used_vmid(entry: &Value, tvmid: u32, ours: &ReplicaOf) -> anyhow::Result<Option<String>> {
    if entry["status"] != json!("replica") {
        bail!("target VMID {tvmid} is already in use on the target");
    }
    let source = entry["replica-source"].as_str().unwrap_or("?");
    let expected = format!("{}/{}", ours.node, ours.vmid);
    if source != expected {
        bail!(
            "target VMID {tvmid} is in use on the target by a replica of VM {source}, not of \
             VM {} on '{}'",
            ours.vmid,
            ours.node
        );
    }
    if ours.no_replica {
        bail!(
            "target VMID {tvmid} holds a replica of this VM (--no-replica: drop it there \
             first with 'mtunnel replica drop {tvmid}', or leave out --no-replica to cut over \
             to it)"
        );
    }
    let node = entry["node"].as_str();
    node.map(|n| Some(n.to_string())).with_context(|| {
        format!("the target's /cluster/resources entry of VM {tvmid} names no node: {entry}")
    })
}

async fn plan_volumes(
    src: &SourceNode,
    conf: &VmConfig,
    opts: &MigrateOptions,
    running: bool,
) -> anyhow::Result<Vec<Volume>> {
    let mut out = Vec::new();
    for (key, value) in &conf.options {
        if !vmconf::is_drive_key(key) {
            continue;
        }
        let props: BTreeMap<String, String> = vmconf::parse_property_string(value, Some("file"))?
            .into_iter()
            .collect();
        let Some(volid) = vmconf::drive_volume(value) else {
            continue;
        };
        if props.get("media").is_some_and(|m| m == "cdrom") {
            bail!("{key}: a CD-ROM with media '{volid}' cannot be migrated - eject it first");
        }
        let (storage, _) = vmconf::parse_volume_id(&volid).with_context(|| {
            format!(
                "{key}: '{volid}' is not a storage volume (passthrough disks cannot be migrated)"
            )
        })?;
        let target_storage = opts.storage_map.map(storage).with_context(|| {
            format!("{key}: no target storage mapped for storage '{storage}' (--target-storage)")
        })?;
        let path = src.storage.path(&volid)?;
        let format = src.storage.volume_format(&volid).await?;
        let size = src.storage.volume_size(&volid).await?;
        out.push(Volume {
            key: key.clone(),
            volid,
            path,
            format,
            size,
            target_storage,
            live: running && !key.starts_with("unused"),
        });
    }
    Ok(out)
}

fn plan_bridges(conf: &VmConfig, map: &IdMap) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (key, value) in &conf.options {
        if !(key.starts_with("net") && key[3..].bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let props: BTreeMap<String, String> = vmconf::parse_property_string(value, None)?
            .into_iter()
            .collect();
        if let Some(bridge) = props.get("bridge") {
            let target = map.map(bridge).with_context(|| {
                format!("{key}: no target bridge mapped for '{bridge}' (--target-bridge)")
            })?;
            out.insert(key.clone(), target);
        }
    }
    Ok(out)
}

/// Without `fingerprint=`, PVE trusts the target by its CA-signed certificate and pins the
/// certificate the target reports for the tunnel; so do we.
pub(crate) async fn pinned_fingerprint(target: &TargetEndpoint) -> anyhow::Result<String> {
    let api =
        ApiClient::with_ca_verification(target.host.clone(), target.port, target.apitoken.clone())?;
    let certs = api
        .get("/nodes/localhost/certificates/info", &[])
        .await
        .with_context(|| {
            format!(
                "the certificate of {}:{} could not be verified with the system's root CAs; \
                 pass fingerprint=AA:BB:.. in --target (printed by `mtunnel serve`, or \
                 GET /nodes/localhost/certificates/info)",
                target.host, target.port
            )
        })?;
    let find = |name: &str| {
        certs.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["filename"] == json!(name))
                .and_then(|c| c["fingerprint"].as_str())
                .map(str::to_string)
        })
    };
    find("pveproxy-ssl.pem")
        .or_else(|| find("pve-ssl.pem"))
        .context("the target reports no pveproxy-ssl.pem or pve-ssl.pem certificate")
}

/// The CLI's pre-checks: the target VMID is unused (or a replica of this VM: then the
/// node holding it) and the mapped storages hold images.
async fn check_target(
    api: &ApiClient,
    tvmid: u32,
    node: &str,
    volumes: &[Volume],
    ours: &ReplicaOf<'_>,
) -> anyhow::Result<Option<String>> {
    let storage_path = format!("/nodes/{node}/storage");
    let (vms, storages) = tokio::join!(
        api.get("/cluster/resources", &[("type", "vm")]),
        api.get(&storage_path, &[("enabled", "1")])
    );
    let vms = vms.context("listing the target's VMs")?;
    let used =
        (vms.as_array()).and_then(|a| a.iter().find(|v| v["vmid"].as_u64() == Some(tvmid as u64)));
    let replica = match used {
        Some(entry) => judge_used_vmid(entry, tvmid, ours)?,
        None => None,
    };
    let storages = storages.context("listing the target's storages")?;
    for v in volumes {
        let ok = storages.as_array().is_some_and(|a| {
            a.iter().any(|s| {
                s["storage"] == json!(v.target_storage)
                    && s["content"]
                        .as_str()
                        .is_some_and(|c| c.split(',').any(|c| c == "images"))
            })
        });
        if !ok {
            bail!(
                "target storage '{}' does not exist, cannot hold VM images, or the token may not use it",
                v.target_storage
            );
        }
    }
    Ok(replica)
}
