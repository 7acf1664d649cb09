//! `mtunnel migrate`: moves a VM of this node to a remote PVE-compatible target through the
//! tunnel, in the phases of Proxmox's `QemuMigrate` (PROTOCOL.md §5.2) and with its cleanup
//! done right (§5.4): prepare (API checks, `mtunnel`, control connection, `version`),
//! phase 1 (`bwlimit`, `disk-import` of offline volumes, `disk` for live ones, `config`),
//! phase 2 for a running VM (`start`, forwards, drive-mirror, RAM migration), phase 3
//! (`nbdstop`, `resume`, stop the source, `unlock`, `quit`). On failure the source VM keeps
//! running, loses its `migrate` lock, and the target is told to clean up; a failing remote
//! `stop` never skips that remote cleanup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::endpoint::{IdMap, TargetEndpoint};
use super::http::{ApiClient, encode_segment};
use super::progress::{Progress, human};
use super::tunnel::{Control, Endpoint, Forward, forward};
use crate::config::NodeConfig;
use crate::guest::config::{self as vmconf, VmConfig};
use crate::guest::{ConfigStore, store::DEFAULT_LOCK_TIMEOUT};
use crate::qemu::{self, MigrationParams, VmHandle};
use crate::storage::Storage;

/// How long a disk mirror may make no progress before the migration gives up.
const MIRROR_STALL: Duration = Duration::from_secs(60);

/// The protocol version we speak (`WS_TUNNEL_VERSION` upstream).
pub const TUNNEL_VERSION: u64 = 2;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub vmid: u32,
    pub target: TargetEndpoint,
    pub storage_map: IdMap,
    pub bridge_map: IdMap,
    pub target_vmid: Option<u32>,
    pub online: bool,
    /// KiB/s; `None` = no user limit.
    pub bwlimit: Option<u64>,
    pub delete: bool,
}

/// The source node's services.
pub struct SourceNode {
    pub cfg: NodeConfig,
    pub guests: ConfigStore,
    pub storage: Arc<dyn Storage>,
}

/// What a finished migration reports.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub duration: Duration,
    pub disk_bytes: u64,
    pub ram_bytes: u64,
    pub downtime_ms: Option<u64>,
    /// QEMU's `total-time` of the RAM migration (from `migrate` to `completed`).
    pub ram_ms: Option<u64>,
    pub target_vmid: u32,
    pub target_node: String,
}

/// One volume of the VM and how it moves.
#[derive(Debug, Clone)]
struct Volume {
    key: String,
    volid: String,
    path: PathBuf,
    format: String,
    size: u64,
    target_storage: String,
    live: bool,
}

/// The remote side while a migration runs.
struct Remote {
    api: ApiClient,
    control: Control,
    node: String,
    tvmid: u32,
    base_url: String,
    forwards: Vec<Forward>,
    /// `resume` was sent: the target VM may run as the only live copy from here on.
    resume_sent: bool,
}

impl Remote {
    fn endpoint(&self, url: String) -> Endpoint {
        Endpoint {
            url,
            headers: vec![("Authorization".into(), self.api.token_header().to_string())],
            fingerprint: Some(self.api.fingerprint().to_string()),
        }
    }

    async fn cmd(&self, cmd: Value, secs: u64) -> anyhow::Result<Value> {
        Ok(self
            .control
            .command(&cmd, Duration::from_secs(secs))
            .await?)
    }

    /// Forwards local `local` to the remote socket `remote`.
    fn forward(&mut self, local: &Path, remote: &str) -> anyhow::Result<()> {
        let url = format!(
            "{}/mtunnelwebsocket?socket={}&",
            self.base_url,
            encode_segment(remote)
        );
        let f = forward(&self.control, self.endpoint(url), local, remote.to_string())?;
        self.forwards.push(f);
        Ok(())
    }
}

/// Runs a whole migration.
pub async fn migrate(
    src: &SourceNode,
    opts: &MigrateOptions,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let vmid = opts.vmid;
    let tvmid = opts.target_vmid.unwrap_or(vmid);
    if opts.storage_map.identity {
        bail!("remote migration requires explicit storage mapping!");
    }

    // Local checks first: nothing remote happens for a VM that cannot move.
    let text = src
        .guests
        .read_text(vmid)
        .map_err(|_| anyhow::anyhow!("VM {vmid} does not exist on this node"))?;
    let conf = VmConfig::parse(&text).with_context(|| format!("parsing config of VM {vmid}"))?;
    if let Some(lock) = conf.options.get("lock") {
        bail!("VM {vmid} is locked ({lock})");
    }
    if !conf.snapshots.is_empty() {
        bail!("remote migration with snapshots not supported yet");
    }
    let running = qemu::process::is_running(&src.cfg.run_dir, vmid).is_some();
    if running && !opts.online {
        bail!("VM {vmid} is running - use --online to migrate it live");
    }
    let volumes = plan_volumes(src, &conf, opts, running).await?;
    let bridges = plan_bridges(&conf, &opts.bridge_map)?;
    progress.log(format!(
        "migrating VM {vmid} ({}) to {}:{} as VM {tvmid}: {} volume(s)",
        if running { "online" } else { "offline" },
        opts.target.host,
        opts.target.port,
        volumes.len()
    ));

    let fingerprint = match opts.target.fingerprint.clone() {
        Some(f) => f,
        None => pinned_fingerprint(&opts.target).await?,
    };
    let api = ApiClient::new(
        opts.target.host.clone(),
        opts.target.port,
        opts.target.apitoken.clone(),
        fingerprint,
    )?;

    // prepare: target checks, tunnel, version.
    let node = target_node(&api).await?;
    check_target(&api, tvmid, &volumes).await?;
    let storages: Vec<String> = unique(volumes.iter().map(|v| v.target_storage.clone()));
    let bridge_ids: Vec<String> = unique(bridges.values().cloned());
    let opened = api
        .post(
            &format!("/nodes/{node}/qemu/{tvmid}/mtunnel"),
            &[
                ("storages", &storages.join(",")),
                ("bridges", &bridge_ids.join(",")),
            ],
        )
        .await
        .context("opening the tunnel on the target")?;
    let get = |k: &str| opened.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(upid), Some(ticket), Some(socket)) = (get("upid"), get("ticket"), get("socket"))
    else {
        bail!("target's mtunnel reply lacks upid/ticket/socket: {opened}");
    };
    progress.log(format!("remote: started tunnel worker '{upid}'"));
    let base_url = format!(
        "https://{}:{}/api2/json/nodes/{}/qemu/{tvmid}",
        url_host(&opts.target.host),
        opts.target.port,
        node
    );
    let control_url = format!(
        "{base_url}/mtunnelwebsocket?ticket={}&socket={}",
        encode_segment(&ticket),
        encode_segment(&socket)
    );
    let endpoint = Endpoint {
        url: control_url,
        headers: vec![("Authorization".into(), api.token_header().to_string())],
        fingerprint: Some(api.fingerprint().to_string()),
    };
    let control = Control::connect(&endpoint)
        .await
        .context("connecting the tunnel")?;
    let mut remote = Remote {
        api,
        control,
        node: node.clone(),
        tvmid,
        base_url,
        forwards: Vec::new(),
        resume_sent: false,
    };
    if let Err(e) = check_version(&remote).await {
        abort_remote(&remote, progress).await;
        return Err(e);
    }

    // phase 1 and on: the source VM is locked `migrate`.
    set_source_lock(src, vmid, Some("migrate")).await?;
    let mut summary = Summary {
        target_vmid: tvmid,
        target_node: node,
        ..Summary::default()
    };
    let result = run_phases(
        src,
        opts,
        &conf,
        &volumes,
        &bridges,
        running,
        &mut remote,
        progress,
        &mut summary,
    )
    .await;
    match result {
        Ok(()) => {
            summary.duration = started.elapsed();
            Ok(summary)
        }
        Err(e) if remote.resume_sent => {
            // The target may already run the VM: unlocking (and so allowing a start of)
            // the source copy could run it twice.
            progress.log(format!(
                "ERROR: migration failed after 'resume' was sent: {e:#} - VM {tvmid} may be \
                 running on the target; the source VM {vmid} stays locked 'migrate'. Check \
                 the target, then remove the lock where the VM should live ('mtunnel vm \
                 unlock')."
            ));
            remote.control.clone().close();
            Err(e)
        }
        Err(e) => {
            progress.log(format!("ERROR: migration failed: {e:#}"));
            if let Err(le) = set_source_lock(src, vmid, None).await {
                progress.log(format!("WARN: removing the source lock failed: {le:#}"));
            }
            abort_remote(&remote, progress).await;
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_phases(
    src: &SourceNode,
    opts: &MigrateOptions,
    conf: &VmConfig,
    volumes: &[Volume],
    bridges: &BTreeMap<String, String>,
    running: bool,
    remote: &mut Remote,
    progress: &Progress,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let vmid = opts.vmid;
    let tvmid = remote.tvmid;
    // phase 1: limits, offline volumes, live volumes, config.
    let mut limits: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for v in volumes {
        let reply = remote
            .cmd(
                json!({"cmd": "bwlimit", "operation": "migration", "storages": [v.target_storage], "bwlimit": opts.bwlimit}),
                10,
            )
            .await?;
        let remote_limit = reply.get("bwlimit").and_then(as_u64);
        limits.insert(v.volid.clone(), min_limit(opts.bwlimit, remote_limit));
    }
    let mut new_drives: BTreeMap<String, String> = BTreeMap::new();
    let mut nbd: serde_json::Map<String, Value> = serde_json::Map::new();
    for v in volumes.iter().filter(|v| !v.live) {
        let new_volid = import_volume(
            src,
            remote,
            v,
            tvmid,
            limits.get(&v.volid).copied().flatten(),
            progress,
        )
        .await?;
        summary.disk_bytes += v.size;
        new_drives.insert(
            v.key.clone(),
            replace_volume(&conf.options[&v.key], &new_volid)?,
        );
    }
    for v in volumes.iter().filter(|v| v.live) {
        let drive = drive_object(&v.key, &conf.options[&v.key], v.size)?;
        let reply = remote
            .cmd(json!({"cmd": "disk", "format": v.format, "storage": v.target_storage, "drive": drive}), 600)
            .await?;
        let drivestr = reply
            .get("drivestr")
            .and_then(Value::as_str)
            .context("disk reply without drivestr")?
            .to_string();
        progress.log(format!(
            "{}: allocated {} on the target",
            v.key, reply["volid"]
        ));
        new_drives.insert(v.key.clone(), drivestr);
        nbd.insert(v.key.clone(), reply);
    }
    let mut target_conf = conf.clone();
    target_conf.digest.clear();
    target_conf.options.insert("lock".into(), "migrate".into());
    for (key, value) in &new_drives {
        target_conf.options.insert(key.clone(), value.clone());
    }
    for (key, bridge) in bridges {
        let value = target_conf.options[key].clone();
        target_conf
            .options
            .insert(key.clone(), replace_prop(&value, "bridge", bridge)?);
    }
    let firewall = std::fs::read_to_string(src.cfg.firewall_dir().join(format!("{vmid}.fw"))).ok();
    remote
        .cmd(
            json!({"cmd": "config", "conf": target_conf.write(), "firewall-config": firewall}),
            120,
        )
        .await?;
    progress.log("config sent to the target");

    if running {
        live_phase(src, opts, volumes, nbd, remote, progress, summary).await?;
    }

    // phase 3
    if running {
        if volumes.iter().any(|v| v.live) {
            remote.cmd(json!({"cmd": "nbdstop"}), 30).await?;
        }
        remote.resume_sent = true;
        remote.cmd(json!({"cmd": "resume"}), 30).await?;
        progress.log(format!("VM {tvmid} resumed on the target"));
        if volumes.iter().any(|v| v.live) && fstrim_cloned_disks(conf) {
            // As upstream: mirrored disks are fully allocated; let the guest trim them.
            if let Err(e) = remote.cmd(json!({"cmd": "fstrim"}), 600).await {
                progress.log(format!("WARN: fstrim on the target failed: {e:#}"));
            }
        }
        let vm = VmHandle::attach(&src.cfg.run_dir, vmid)?;
        if let Err(e) = vm.stop(qemu::process::StopTimeouts::default()).await {
            progress.log(format!("WARN: stopping the source VM failed: {e}"));
        }
    }
    remote.cmd(json!({"cmd": "unlock"}), 10).await?;
    if let Err(e) = remote.cmd(json!({"cmd": "quit", "cleanup": 0}), 30).await {
        progress.log(format!("WARN: quit failed: {e:#}"));
    }
    remote.forwards.clear();
    remote.control.clone().close();
    if opts.delete {
        destroy_source(src, vmid, volumes, progress).await?;
    } else {
        progress.log(format!(
            "source VM {vmid} stays, stopped and locked 'migrate' (use --delete to remove it)"
        ));
    }
    Ok(())
}

async fn live_phase(
    src: &SourceNode,
    opts: &MigrateOptions,
    volumes: &[Volume],
    nbd: serde_json::Map<String, Value>,
    remote: &mut Remote,
    progress: &Progress,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let vmid = opts.vmid;
    let tvmid = remote.tvmid;
    let vm =
        VmHandle::attach(&src.cfg.run_dir, vmid).context("attaching to the running source VM")?;
    let machine = vm.running_machine().await?;
    let reply = remote
        .cmd(
            json!({
                "cmd": "start",
                "start_params": {"statefile": "unix", "forcemachine": machine, "forcecpu": null, "skiplock": 1},
                "migrate_opts": {
                    "spice_ticket": null, "type": "websocket", "network": null, "storagemap": {},
                    "migratedfrom": src.cfg.node, "nbd_proto_version": 1, "nbd": nbd,
                    "remote_node": remote.node,
                },
            }),
            60,
        )
        .await?;
    let started = check_start_reply(&reply, tvmid, volumes.iter().filter(|v| v.live).count())?;

    let result = async {
        // Local sockets: the remote paths with the target VMID replaced by ours.
        let local_migrate = src.cfg.run_dir.join(format!("{vmid}.migrate"));
        remote.forward(&local_migrate, &started.migrate_addr)?;
        let mut local_nbd = BTreeMap::new();
        for sock in &started.unix_sockets {
            let name = Path::new(sock)
                .file_name()
                .and_then(|n| n.to_str())
                .context("socket without file name")?
                .replacen(&tvmid.to_string(), &vmid.to_string(), 1);
            let local = src.cfg.run_dir.join(name);
            remote.forward(&local, sock)?;
            local_nbd.insert(sock.clone(), local);
        }

        // Disks: mirror to the target's NBD exports.
        let mut jobs = Vec::new();
        for v in volumes.iter().filter(|v| v.live) {
            let uri = started
                .nbd_uris
                .get(&v.key)
                .with_context(|| format!("start reply has no NBD URI for {}", v.key))?;
            let mut local_uri = uri.clone();
            for (remote_sock, local) in &local_nbd {
                local_uri = local_uri.replace(remote_sock.as_str(), &local.display().to_string());
            }
            let speed = opts.bwlimit.map(|k| k * 1024);
            let job = vm.drive_mirror(&v.key, &local_uri, speed).await?;
            jobs.push((job, v));
        }
        for (job, v) in &jobs {
            wait_mirror(&vm, job, &v.key, progress).await.with_context(|| {
                format!("mirroring {} to the target failed (target VM or tunnel gone?)", v.key)
            })?;
            vm.mirror_write_blocking(job).await?;
            summary.disk_bytes += v.size;
        }

        // RAM.
        let remote_limit = remote
            .cmd(json!({"cmd": "bwlimit", "operation": "migration", "storages": [null], "bwlimit": opts.bwlimit}), 10)
            .await?
            .get("bwlimit")
            .and_then(as_u64);
        let limit = min_limit(opts.bwlimit, remote_limit);
        vm.migrate_set_parameters(&MigrationParams {
            max_bandwidth: Some(limit.map(|k| k * 1024).unwrap_or(16 << 30)),
            downtime_limit: Some(100),
            ..MigrationParams::default()
        })
        .await?;
        vm.migrate(&format!("unix:{}", local_migrate.display())).await?;
        let bar = progress.bar("RAM", 0);
        let done = vm
            .wait_migration(qemu::MigrationWait::default(), |p| bar.set(p.transferred, p.total.max(p.transferred)))
            .await?;
        bar.finish(&format!("{} transferred", human(done.transferred)));
        summary.ram_bytes = done.transferred;
        summary.ram_ms = Some(done.total_time_ms).filter(|&ms| ms > 0);
        summary.downtime_ms = vm
            .execute("query-migrate", Value::Null, Duration::from_secs(10))
            .await
            .ok()
            .and_then(|v| v.get("downtime").and_then(Value::as_u64));
        for (job, _) in &jobs {
            vm.block_job_cancel(job, Duration::from_secs(60)).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;

    if let Err(e) = result {
        // Phase 2 cleanup: stop the migration, keep the source VM running.
        let _ = vm.migrate_cancel().await;
        if let Ok(st) = vm.status().await
            && !st.running
        {
            let _ = vm.resume().await;
        }
        for v in volumes.iter().filter(|v| v.live) {
            let _ = vm
                .block_job_cancel(&format!("mirror-{}", v.key), Duration::from_secs(10))
                .await;
        }
        if let Err(se) = remote.cmd(json!({"cmd": "stop"}), 10).await {
            progress.log(format!("WARN: remote stop failed: {se:#}"));
        }
        return Err(e);
    }
    Ok(())
}

async fn wait_mirror(
    vm: &VmHandle,
    job: &str,
    key: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    let bar = progress.bar(key, 0);
    // A frozen tunnel times out nowhere else: give up when the mirror makes no progress.
    let watch = async {
        let mut last = (0u64, Instant::now());
        loop {
            if let Ok(jobs) = vm
                .execute("query-block-jobs", Value::Null, Duration::from_secs(10))
                .await
                && let Some(j) = jobs
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["device"] == json!(job)))
            {
                let offset = j["offset"].as_u64().unwrap_or(0);
                bar.set(offset, j["len"].as_u64().unwrap_or(0));
                if offset != last.0 {
                    last = (offset, Instant::now());
                }
            }
            if last.1.elapsed() > MIRROR_STALL {
                return Err(anyhow::anyhow!(
                    "mirror of {key} made no progress for {} s",
                    MIRROR_STALL.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        r = vm.wait_block_job_ready(job, Duration::from_secs(24 * 3600)) => r?,
        r = watch => r?,
    }
    bar.finish("mirrored (ready)");
    Ok(())
}

struct StartReply {
    migrate_addr: String,
    unix_sockets: Vec<String>,
    nbd_uris: BTreeMap<String, String>,
}

/// The source's safety checks on the `start` reply (upstream rejects anything else).
fn check_start_reply(reply: &Value, tvmid: u32, live_disks: usize) -> anyhow::Result<StartReply> {
    let safe = |p: &str| {
        !p.contains("..")
            && p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    };
    let m = &reply["migrate"];
    if m["proto"] != json!("unix") {
        bail!(
            "target offers migration protocol {} - only 'unix' is supported",
            m["proto"]
        );
    }
    let addr = m["addr"]
        .as_str()
        .context("start reply without migrate.addr")?;
    let expected = format!("/{tvmid}.migrate");
    if !safe(addr) || !addr.ends_with(&expected) {
        bail!("unexpected migration socket '{addr}' in the target's start reply");
    }
    let dir = &addr[..addr.len() - expected.len()];
    let mut unix_sockets = Vec::new();
    if let Some(list) = m.get("unix_sockets").and_then(Value::as_array) {
        for s in list {
            let s = s.as_str().context("non-string socket in start reply")?;
            if !safe(s) || !s.starts_with(&format!("{dir}/")) || !s.ends_with(".migrate") {
                bail!("unexpected socket '{s}' in the target's start reply");
            }
            unix_sockets.push(s.to_string());
        }
    }
    let mut nbd_uris = BTreeMap::new();
    if let Some(drives) = reply.get("drives").and_then(Value::as_object) {
        for (key, d) in drives {
            let uri = d["nbd_uri"].as_str().context("drive without nbd_uri")?;
            if !uri.contains(&format!("{dir}/{tvmid}_")) || uri.contains("..") {
                bail!("unexpected NBD URI '{uri}' in the target's start reply");
            }
            nbd_uris.insert(key.clone(), uri.to_string());
        }
    }
    if nbd_uris.len() != live_disks {
        bail!(
            "target exports {} drive(s), expected {live_disks}",
            nbd_uris.len()
        );
    }
    Ok(StartReply {
        migrate_addr: addr.to_string(),
        unix_sockets,
        nbd_uris,
    })
}

/// Streams one volume as `raw+size`/`qcow2+size` into the target's import socket.
async fn import_volume(
    src: &SourceNode,
    remote: &mut Remote,
    v: &Volume,
    tvmid: u32,
    limit_kib: Option<u64>,
    progress: &Progress,
) -> anyhow::Result<String> {
    let name = Path::new(&v.path)
        .file_name()
        .and_then(|n| n.to_str())
        .context("volume path without file name")?
        .replace(
            &format!("-{}-", src_vmid_of(&v.volid)?),
            &format!("-{tvmid}-"),
        );
    let stream_format = format!("{}+size", v.format);
    let reply = remote
        .cmd(
            json!({
                "cmd": "disk-import", "volname": name, "format": v.format, "export_formats": stream_format,
                "storage": v.target_storage, "with_snapshots": v.format == "qcow2", "allow_rename": 1,
                "migration_snapshot": 0,
            }),
            600,
        )
        .await?;
    let remote_socket = reply["socket"]
        .as_str()
        .context("disk-import reply without socket")?
        .to_string();
    let local = src
        .cfg
        .run_dir
        .join(format!("{}.storage", src_vmid_of(&v.volid)?));
    if !remote.forwards.iter().any(|f| f.local == local) {
        remote.forward(&local, &remote_socket)?;
    }
    let payload_len = tokio::fs::metadata(&v.path).await?.len();
    let total = if v.format == "raw" {
        v.size
    } else {
        payload_len
    };
    let bar = progress.bar(&v.key, total);
    let mut sock = tokio::net::UnixStream::connect(&local)
        .await
        .with_context(|| {
            format!(
                "connecting the forwarded storage socket {}",
                local.display()
            )
        })?;
    sock.write_all(&v.size.to_le_bytes()).await?;
    let mut file = tokio::fs::File::open(&v.path).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    let start = Instant::now();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if let Err(e) = sock.write_all(&buf[..n]).await {
            // The target may have stopped reading for a reason of its own (disk full, a
            // failing qemu-img): its import status names it better than a broken pipe.
            return Err(match import_failure(remote).await {
                Some(msg) => anyhow::anyhow!("disk import of {} failed: {msg}", v.volid),
                None => anyhow::Error::new(e).context("writing the disk stream (tunnel cut?)"),
            });
        }
        sent += n as u64;
        bar.set(sent, total);
        if let Some(kib) = limit_kib.filter(|k| *k > 0) {
            // Keep the average rate at the limit.
            let due = Duration::from_secs_f64(sent as f64 / (kib as f64 * 1024.0));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    sock.shutdown().await?;
    // The target replies only once it has read the stream; keep our end open until then.
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(600), sock.read(&mut sink)).await;
    loop {
        let status = remote.cmd(json!({"cmd": "query-disk-import"}), 10).await?;
        match status["status"].as_str() {
            Some("pending") => tokio::time::sleep(Duration::from_millis(200)).await,
            Some("complete") => {
                let volid = status["volid"]
                    .as_str()
                    .context("complete without volid")?
                    .to_string();
                bar.finish(&format!("imported as {volid}"));
                return Ok(volid);
            }
            _ => bail!(
                "disk import of {} failed: {}",
                v.volid,
                status["msg"].as_str().unwrap_or("unknown error")
            ),
        }
    }
}

/// The target's reason for a failed import, if it reports one within a few seconds.
async fn import_failure(remote: &mut Remote) -> Option<String> {
    for _ in 0..25 {
        let status = remote
            .cmd(json!({"cmd": "query-disk-import"}), 10)
            .await
            .ok()?;
        match status["status"].as_str() {
            Some("pending") => tokio::time::sleep(Duration::from_millis(200)).await,
            Some("error") => return status["msg"].as_str().map(str::to_string),
            _ => return None,
        }
    }
    None
}

/// The `agent` option asks for `fstrim_cloned_disks` (PVE: `agent: 1,fstrim_cloned_disks=1`).
fn fstrim_cloned_disks(conf: &VmConfig) -> bool {
    conf.options
        .get("agent")
        .and_then(|a| vmconf::parse_property_string(a, Some("enabled")).ok())
        .is_some_and(|props| {
            props.iter().any(|(k, v)| {
                k == "fstrim_cloned_disks" && crate::util::lenient_bool(&json!(v)) == Some(true)
            })
        })
}

fn src_vmid_of(volid: &str) -> anyhow::Result<String> {
    let (_, name) = volid.split_once(':').context("volid without storage")?;
    Ok(name.split('/').next().unwrap_or("").to_string())
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

/// The `drive` object of a `disk` command: the drive's properties without `file`/`format`,
/// plus `interface`, `index` and `size` in bytes.
fn drive_object(key: &str, value: &str, size: u64) -> anyhow::Result<Value> {
    let mut drive = serde_json::Map::new();
    for (k, v) in vmconf::parse_property_string(value, Some("file"))? {
        if k == "file" || k == "format" || k == "size" {
            continue;
        }
        drive.insert(k, Value::String(v));
    }
    let split = key
        .find(|c: char| c.is_ascii_digit())
        .context("drive key without index")?;
    drive.insert("interface".into(), json!(&key[..split]));
    drive.insert("index".into(), json!(key[split..].parse::<u32>()?));
    drive.insert("size".into(), json!(size));
    Ok(Value::Object(drive))
}

fn replace_volume(value: &str, volid: &str) -> anyhow::Result<String> {
    let mut props = vmconf::parse_property_string(value, Some("file"))?;
    for (key, val) in props.iter_mut() {
        match key.as_str() {
            "file" => *val = volid.to_string(),
            // The target may store another format (btrfs keeps raw only).
            "format" => {
                if let Some((_, ext)) = volid.rsplit_once('.') {
                    *val = ext.to_string();
                }
            }
            _ => {}
        }
    }
    if !props.iter().any(|(k, _)| k == "file") {
        props.push(("file".to_string(), volid.to_string()));
    }
    Ok(vmconf::print_property_string(&props, Some("file"))?)
}

fn replace_prop(value: &str, key: &str, new: &str) -> anyhow::Result<String> {
    let default_key = if key == "file" { Some("file") } else { None };
    let mut props = vmconf::parse_property_string(value, default_key)?;
    match props.iter_mut().find(|(k, _)| k == key) {
        Some(p) => p.1 = new.to_string(),
        None => props.push((key.to_string(), new.to_string())),
    }
    if default_key.is_some() {
        Ok(vmconf::print_property_string(&props, default_key)?)
    } else {
        // Keep the original order of NIC options (model=MAC first); each pair goes through
        // the one printer so that a value it cannot print is refused, not mangled.
        let parts = props
            .iter()
            .map(|pair| vmconf::print_property_string(std::slice::from_ref(pair), None))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(parts.join(","))
    }
}

/// Without `fingerprint=`, PVE trusts the target by its CA-signed certificate and pins the
/// certificate the target reports for the tunnel; so do we.
async fn pinned_fingerprint(target: &TargetEndpoint) -> anyhow::Result<String> {
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

async fn target_node(api: &ApiClient) -> anyhow::Result<String> {
    let status = api
        .get("/cluster/status", &[])
        .await
        .context("querying the target's cluster status")?;
    status
        .as_array()
        .and_then(|a| {
            a.iter().find(|e| {
                e["type"] == json!("node")
                    && e.get("local").and_then(crate::util::lenient_bool) == Some(true)
            })
        })
        .and_then(|e| e["name"].as_str())
        .map(str::to_string)
        .context("target's /cluster/status has no local node entry")
}

/// The CLI's pre-checks: the target VMID is unused and the mapped storages hold images.
async fn check_target(api: &ApiClient, tvmid: u32, volumes: &[Volume]) -> anyhow::Result<()> {
    let vms = api
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .context("listing the target's VMs")?;
    if vms
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["vmid"].as_u64() == Some(tvmid as u64)))
    {
        bail!("target VMID {tvmid} is already in use on the target");
    }
    let storages = api
        .get("/nodes/localhost/storage", &[("enabled", "1")])
        .await
        .context("listing the target's storages")?;
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
    Ok(())
}

async fn check_version(remote: &Remote) -> anyhow::Result<()> {
    let reply = remote.cmd(json!({"cmd": "version"}), 10).await?;
    let api = reply
        .get("api")
        .and_then(as_u64)
        .context("version reply without api")?;
    let age = reply.get("age").and_then(as_u64).unwrap_or(0);
    if TUNNEL_VERSION < api.saturating_sub(age) {
        bail!("Remote tunnel endpoint not compatible, upgrade required");
    }
    if TUNNEL_VERSION > api {
        bail!("Remote tunnel endpoint too old, upgrade required");
    }
    Ok(())
}

/// Tells the target to destroy what this migration created, then closes the tunnel.
async fn abort_remote(remote: &Remote, progress: &Progress) {
    match remote.cmd(json!({"cmd": "quit", "cleanup": 1}), 30).await {
        Ok(_) => progress.log("target cleaned up"),
        Err(e) => progress.log(format!(
            "WARN: remote cleanup request failed ({e:#}); the target cleans up when the tunnel closes"
        )),
    }
    remote.control.clone().close();
}

async fn set_source_lock(src: &SourceNode, vmid: u32, lock: Option<&str>) -> anyhow::Result<()> {
    let guard = src.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
    let mut conf = VmConfig::parse(&src.guests.read_text(vmid)?)?;
    match lock {
        Some(l) => {
            if let Some(existing) = conf.options.get("lock") {
                bail!("VM {vmid} is locked ({existing})");
            }
            conf.options.insert("lock".into(), l.into());
        }
        None => {
            conf.options.remove("lock");
        }
    }
    src.guests.write_text_locked(&guard, &conf.write())?;
    Ok(())
}

async fn destroy_source(
    src: &SourceNode,
    vmid: u32,
    volumes: &[Volume],
    progress: &Progress,
) -> anyhow::Result<()> {
    let guard = src.guests.lock(vmid, DEFAULT_LOCK_TIMEOUT).await?;
    for v in volumes {
        match src.storage.free(&v.volid).await {
            Ok(()) => progress.log(format!("deleted source volume {}", v.volid)),
            Err(e) => progress.log(format!("WARN: deleting {} failed: {e}", v.volid)),
        }
    }
    src.guests.remove_locked(&guard)?;
    progress.log(format!("deleted source VM {vmid}"));
    Ok(())
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().map(|f| f as u64))
        .or_else(|| {
            v.as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .map(|f| f as u64)
        })
}

fn min_limit(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a.filter(|x| *x > 0), b.filter(|x| *x > 0)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (x, y) => x.or(y),
    }
}

fn unique(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(addr: &str, socks: &[&str], uri: &str) -> Value {
        json!({"success": true, "migrate": {"proto": "unix", "addr": addr, "uri": format!("unix:{addr}"), "unix_sockets": socks},
               "drives": {"scsi0": {"nbd_uri": uri}}})
    }

    #[test]
    fn start_reply_safety_checks() {
        let ok = reply(
            "/run/qemu-server/567.migrate",
            &["/run/qemu-server/567_nbd.migrate"],
            "nbd:unix:/run/qemu-server/567_nbd.migrate:exportname=drive-scsi0",
        );
        assert!(check_start_reply(&ok, 567, 1).is_ok());
        for bad in [
            reply(
                "/run/qemu-server/568.migrate",
                &[],
                "nbd:unix:/run/qemu-server/567_nbd.migrate:exportname=drive-scsi0",
            ),
            reply(
                "/run/qemu-server/../567.migrate",
                &[],
                "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
            ),
            reply(
                "/run/qemu server/567.migrate",
                &[],
                "nbd:unix:/run/qemu server/567_nbd.migrate:x",
            ),
            reply(
                "/run/qemu-server/567.migrate",
                &["/etc/567_nbd.migrate"],
                "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
            ),
            reply(
                "/run/qemu-server/567.migrate",
                &["/run/qemu-server/../x.migrate"],
                "nbd:unix:/run/qemu-server/567_nbd.migrate:x",
            ),
            reply(
                "/run/qemu-server/567.migrate",
                &[],
                "nbd:unix:/tmp/567_nbd.migrate:x",
            ),
        ] {
            assert!(check_start_reply(&bad, 567, 1).is_err(), "{bad}");
        }
        assert!(
            check_start_reply(&ok, 567, 2).is_err(),
            "drive count must match"
        );
    }

    #[test]
    fn drive_rewrites() {
        assert_eq!(
            replace_volume(
                "local:100/vm-100-disk-0.qcow2,discard=on,size=1G",
                "fast:200/vm-200-disk-0.qcow2"
            )
            .unwrap(),
            "fast:200/vm-200-disk-0.qcow2,discard=on,size=1G"
        );
        assert_eq!(
            replace_volume(
                "local:100/vm-100-disk-0.qcow2,format=qcow2,size=1G",
                "bt:200/vm-200-disk-0.raw"
            )
            .unwrap(),
            "bt:200/vm-200-disk-0.raw,format=raw,size=1G"
        );
        assert_eq!(
            replace_prop(
                "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1",
                "bridge",
                "vmbr9"
            )
            .unwrap(),
            "virtio=BC:24:11:00:00:01,bridge=vmbr9,firewall=1"
        );
        // a quoted comma cannot be printed back as PVE reads it: refused, not mangled
        let e = replace_prop(r#"virtio=BC:24:11:00:00:01,tag="1,2""#, "bridge", "vmbr9");
        assert_eq!(
            e.unwrap_err().to_string(),
            "illegal value with commas for tag"
        );
        assert_eq!(
            drive_object(
                "scsi1",
                "local:100/vm-100-disk-1.raw,iothread=1,size=64M,format=raw",
                67108864
            )
            .unwrap(),
            json!({"interface": "scsi", "index": 1, "iothread": "1", "size": 67108864})
        );
        assert_eq!(min_limit(Some(100), None), Some(100));
        assert_eq!(min_limit(Some(100), Some(50)), Some(50));
        assert_eq!(min_limit(None, Some(0)), None);
        let mut conf = VmConfig::default();
        assert!(!fstrim_cloned_disks(&conf));
        conf.options
            .insert("agent".into(), "1,fstrim_cloned_disks=1".into());
        assert!(fstrim_cloned_disks(&conf));
        conf.options
            .insert("agent".into(), "enabled=1,fstrim_cloned_disks=0".into());
        assert!(!fstrim_cloned_disks(&conf));
    }
}
