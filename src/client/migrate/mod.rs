//! `mtunnel migrate`: moves a VM of this node to a remote PVE-compatible target through the
//! tunnel, in the phases of Proxmox's `QemuMigrate` (PROTOCOL.md §5.2) and with its cleanup
//! done right (§5.4): prepare (API checks, `mtunnel`, control connection, `version`),
//! phase 1 (`bwlimit`, `disk-import` of offline volumes, `disk` for live ones, `config`),
//! phase 2 for a running VM (`start`, forwards, drive-mirror, RAM migration), phase 3
//! (`nbdstop`, `resume`, stop the source, `unlock`, `quit`). On failure the source VM keeps
//! running, loses its `migrate` lock, and the target is told to clean up; a failing remote
//! `stop` never skips that remote cleanup.
//!
//! A migration is a `Migration` value (the source node, the options, the plan, the remote
//! side, the progress display and the summary) with one method per phase, each in its own
//! file: `prepare` (`prepare.rs`), `phase1` (`phase1.rs`), `phase2_live`
//! (`phase2.rs`, its RAM part in `ram.rs`, the switch of a struggling RAM stream in
//! `switchover.rs`), `phase3_finish` (`phase3.rs`) and `abort`
//! (`abort.rs`); `remote.rs` holds the control connection and its forwards, `tuning.rs`
//! what makes a busy guest's RAM converge, `postcopy.rs` the switch to postcopy,
//! `cutover.rs` a migration onto the target's replica of the VM. This file owns the public types, the order of
//! the phases and the source VM's lock. Nothing here touches the target's files: every
//! change on the target goes through a tunnel command.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::endpoint::{IdMap, TargetEndpoint};
use super::progress::Progress;
use crate::config::NodeConfig;
use crate::guest::config::VmConfig;
use crate::guest::{ConfigStore, store::DEFAULT_LOCK_TIMEOUT};
use crate::storage::Storage;

mod abort;
mod cutover;
mod phase1;
mod phase2;
mod phase3;
mod postcopy;
mod prepare;
mod ram;
mod remote;
mod switchover;
pub mod tuning;

pub use cutover::Figures as CutoverFigures;
pub(crate) use prepare::pinned_fingerprint;
use remote::Remote;

/// How long a RAM migration or disk mirror may make no progress before the migration
/// gives up, unless `--stall-timeout` says otherwise.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a disk mirror job may take to end after a forced cancel (a failed migration's
/// own, or one an earlier migration left) before the migration gives up on it.
const STALE_JOB_TIMEOUT: Duration = Duration::from_secs(10);

/// Multifd channels when the user asked for no number: one. On the emulated WAN links of
/// `mtunnel bench --wan` 4 streams gained only where one flow is capped or lossy, and they
/// lengthened the guest's pause from the source's `STOP` to the target's `RESUME` (~0.1 s
/// more than one stream on a 50 ms link; docs/performance.md, "Fewer round trips, parallel
/// streams"): a VM's pause is not traded for speed unless asked (`--streams N`).
pub const DEFAULT_STREAMS: u32 = 1;

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
    /// The target cluster's node to land on; `None`: the node answering at the endpoint.
    pub target_node: Option<String>,
    pub online: bool,
    /// KiB/s; `None` = no user limit.
    pub bwlimit: Option<u64>,
    pub delete: bool,
    /// RAM streams (multifd channels); `None` = [`DEFAULT_STREAMS`] if the target supports
    /// multifd. One stream whenever the target does not announce multifd.
    pub streams: Option<u32>,
    /// How a live migration's RAM is made to converge (auto-converge, XBZRLE, downtime
    /// escalation) and when it gives up.
    pub tuning: tuning::RamTuning,
    /// Give up when the RAM migration or a disk mirror made no progress for this long (a
    /// frozen link times out nowhere else).
    pub stall_timeout: Duration,
    /// Cut over to the target's replica of the running VM with the guest paused from the
    /// last replica run until it runs on the target (`--final-sync`), instead of a live
    /// last delta.
    pub final_sync: bool,
    /// Never cut over to a replica the target holds (`--no-replica`): a target VMID that
    /// is a replica is then refused as any used VMID.
    pub no_replica: bool,
}

/// The source node's services.
pub struct SourceNode {
    pub cfg: NodeConfig,
    pub guests: ConfigStore,
    pub storage: Arc<dyn Storage>,
    /// The source's cluster registry: a VM migrated away releases its VMID there.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl SourceNode {
    /// VM `vmid`'s config, text and parsed, refused while it carries a lock (a migration
    /// or a replica run starts only from an unlocked VM).
    pub(crate) fn unlocked_config(&self, vmid: u32) -> anyhow::Result<(String, VmConfig)> {
        let text = self
            .guests
            .read_text(vmid)
            .map_err(|_| anyhow::anyhow!("VM {vmid} does not exist on this node"))?;
        let conf =
            VmConfig::parse(&text).with_context(|| format!("parsing config of VM {vmid}"))?;
        if let Some(lock) = conf.options.get("lock") {
            bail!("VM {vmid} is locked ({lock})");
        }
        Ok((text, conf))
    }
}

/// What a finished migration reports.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub duration: Duration,
    pub disk_bytes: u64,
    /// Time spent moving disks: the offline imports, then the live mirrors until every
    /// one is ready (`None` when the VM has no disk).
    pub disk_ms: Option<u64>,
    pub ram_bytes: u64,
    pub downtime_ms: Option<u64>,
    /// From the RAM's completion on the source to the target's `resume` reply (it answers
    /// once its QEMU runs the guest): the part of the guest's pause that QEMU's `downtime`
    /// leaves out (the stream still on its way, the block jobs' end, `nbdstop`). `None`
    /// when the target was resumed before the switch to postcopy, or not resumed.
    pub handover_ms: Option<u64>,
    /// When the RAM migration completed on the source.
    pub ram_completed: Option<Instant>,
    /// QEMU's `total-time` of the RAM migration (from `migrate` to `completed`).
    pub ram_ms: Option<u64>,
    pub target_vmid: u32,
    pub target_node: String,
    /// The migration cut over to the target's replica of the VM (docs/replicas.md).
    pub cutover: Option<CutoverFigures>,
}

impl Summary {
    fn add_disk_time(&mut self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.disk_ms = Some(self.disk_ms.unwrap_or(0).saturating_add(ms));
    }
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

/// What the local checks decided: the VM's config, its volumes and how each moves, the
/// bridge of each NIC on the target, and whether the VM runs (and so moves live).
struct Plan {
    conf: VmConfig,
    volumes: Vec<Volume>,
    /// NIC key → target bridge.
    bridges: BTreeMap<String, String>,
    running: bool,
}

/// One migration under way: what it moves, where to, and what it has done so far.
struct Migration<'a> {
    src: &'a SourceNode,
    opts: &'a MigrateOptions,
    progress: &'a Progress,
    /// Shared so that a phase can walk the volumes while it changes the migration.
    plan: Arc<Plan>,
    remote: Remote,
    summary: Summary,
    /// Set when the target holds a current replica of the VM that this migration takes
    /// over (`cutover.rs`).
    cutover: Option<cutover::Cutover>,
}

/// Runs a whole migration.
pub async fn migrate(
    src: &SourceNode,
    opts: &MigrateOptions,
    progress: &Progress,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut m = Migration::prepare(src, opts, progress).await?;

    // phase 1 and on: the source VM is locked `migrate`.
    set_source_lock(src, opts.vmid, Some("migrate")).await?;
    match m.run_phases().await {
        Ok(()) => {
            m.summary.duration = started.elapsed();
            m.summary.cutover = m.cutover.map(|c| c.figures);
            Ok(m.summary)
        }
        Err(e) => Err(m.abort(e).await),
    }
}

impl Migration<'_> {
    /// Phases 1 to 3; phase 2 only for a running VM.
    async fn run_phases(&mut self) -> anyhow::Result<()> {
        let nbd = self.phase1().await?;
        if self.plan.running {
            self.phase2_live(nbd).await?;
        }
        self.phase3_finish().await
    }
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

/// A tunnel opened on the target: its task, the URL of its VM
/// (`https://host:port/api2/json/nodes/{node}/qemu/{vmid}`) and its control channel.
pub(crate) struct OpenedTunnel {
    pub upid: String,
    pub base_url: String,
    pub control: crate::client::tunnel::Control,
}

/// `POST .../qemu/{vmid}/mtunnel` with `params` on `node` of `target`, then the control
/// WebSocket with the ticket of the reply. `what` names the tunnel in errors.
pub(crate) async fn open_tunnel(
    api: &crate::client::http::ApiClient,
    target: &TargetEndpoint,
    node: &str,
    vmid: u32,
    params: &[(&str, &str)],
    what: &str,
) -> anyhow::Result<OpenedTunnel> {
    use crate::client::http::encode_segment;
    let opened = api
        .post(&format!("/nodes/{node}/qemu/{vmid}/mtunnel"), params)
        .await
        .with_context(|| format!("opening {what} on the target"))?;
    let get = |k: &str| opened.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(upid), Some(ticket), Some(socket)) = (get("upid"), get("ticket"), get("socket"))
    else {
        bail!("target's mtunnel reply lacks upid/ticket/socket: {opened}");
    };
    let base_url = format!(
        "https://{}:{}/api2/json/nodes/{node}/qemu/{vmid}",
        url_host(&target.host),
        target.port,
    );
    let endpoint = crate::client::tunnel::Endpoint {
        url: format!(
            "{base_url}/mtunnelwebsocket?ticket={}&socket={}",
            encode_segment(&ticket),
            encode_segment(&socket)
        ),
        headers: vec![("Authorization".into(), api.token_header().to_string())],
        fingerprint: Some(api.fingerprint().to_string()),
    };
    let control = crate::client::tunnel::Control::connect(&endpoint)
        .await
        .context("connecting the tunnel")?;
    Ok(OpenedTunnel {
        upid,
        base_url,
        control,
    })
}

pub(crate) fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::phase1::{drive_object, replace_prop, replace_volume};
    use super::phase2::check_start_reply;
    use super::phase3::fstrim_cloned_disks;
    use super::*;
    use serde_json::json;

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
