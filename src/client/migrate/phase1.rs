//! Phase 1 of a migration: the bandwidth limits, the offline volumes streamed into the
//! target's `disk-import` sockets, the live disks allocated with `disk` (their NBD exports
//! come with `start` in phase 2), and the VM config sent with `config`, rewritten for the
//! new volumes and bridges. A cutover sends `replica-cutover` instead (`cutover.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::remote::Remote;
use super::{Migration, Plan, Volume, as_u64, min_limit};
use crate::client::progress::Bar;
use crate::guest::config as vmconf;

impl Migration<'_> {
    /// Phase 1. Returns the `disk` replies of the live disks, by drive key: the `nbd` of the
    /// `start` command.
    pub(super) async fn phase1(&mut self) -> anyhow::Result<Map<String, Value>> {
        if self.cutover.is_some() {
            return self.take_over_replica().await;
        }
        let plan = self.plan.clone();
        let limits = self.storage_limits(&plan).await?;
        let mut new_drives: BTreeMap<String, String> = BTreeMap::new();
        let imports = std::time::Instant::now();
        for v in plan.volumes.iter().filter(|v| !v.live) {
            let new_volid = self
                .import_volume(v, limits.get(&v.volid).copied().flatten())
                .await?;
            self.summary.disk_bytes += v.size;
            new_drives.insert(
                v.key.clone(),
                replace_volume(&plan.conf.options[&v.key], &new_volid)?,
            );
        }
        if plan.volumes.iter().any(|v| !v.live) {
            self.summary.add_disk_time(imports.elapsed());
        }
        let mut nbd: Map<String, Value> = Map::new();
        for v in plan.volumes.iter().filter(|v| v.live) {
            let drive = drive_object(&v.key, &plan.conf.options[&v.key], v.size)?;
            let reply = self
                .remote
                .cmd(json!({"cmd": "disk", "format": v.format, "storage": v.target_storage, "drive": drive}), 600)
                .await?;
            let drivestr = reply
                .get("drivestr")
                .and_then(Value::as_str)
                .context("disk reply without drivestr")?
                .to_string();
            self.progress.log(format!(
                "{}: allocated {} on the target",
                v.key, reply["volid"]
            ));
            new_drives.insert(v.key.clone(), drivestr);
            nbd.insert(v.key.clone(), reply);
        }
        self.send_config(&plan, &new_drives).await?;
        Ok(nbd)
    }

    /// The bandwidth limit of each volume: the lower of ours and its target storage's.
    async fn storage_limits(&self, plan: &Plan) -> anyhow::Result<BTreeMap<String, Option<u64>>> {
        let mut limits: BTreeMap<String, Option<u64>> = BTreeMap::new();
        for v in &plan.volumes {
            let reply = self
                .remote
                .cmd(
                    json!({"cmd": "bwlimit", "operation": "migration", "storages": [v.target_storage], "bwlimit": self.opts.bwlimit}),
                    10,
                )
                .await?;
            let remote_limit = reply.get("bwlimit").and_then(as_u64);
            limits.insert(v.volid.clone(), min_limit(self.opts.bwlimit, remote_limit));
        }
        Ok(limits)
    }

    /// `config`: the source config with the new drives and bridges, locked `migrate`, and
    /// the VM's firewall file.
    async fn send_config(
        &self,
        plan: &Plan,
        new_drives: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let vmid = self.opts.vmid;
        let mut target_conf = mapped_config(plan)?;
        target_conf.options.insert("lock".into(), "migrate".into());
        for (key, value) in new_drives {
            target_conf.options.insert(key.clone(), value.clone());
        }
        let firewall =
            std::fs::read_to_string(self.src.cfg.firewall_dir().join(format!("{vmid}.fw"))).ok();
        self.remote
            .cmd(
                json!({"cmd": "config", "conf": target_conf.write(), "firewall-config": firewall}),
                120,
            )
            .await?;
        self.progress.log("config sent to the target");
        Ok(())
    }

    /// Streams one volume as `raw+size`/`qcow2+size` into the target's import socket.
    async fn import_volume(
        &mut self,
        v: &Volume,
        limit_kib: Option<u64>,
    ) -> anyhow::Result<String> {
        let tvmid = self.remote.tvmid;
        let name = Path::new(&v.path)
            .file_name()
            .and_then(|n| n.to_str())
            .context("volume path without file name")?
            .replace(
                &format!("-{}-", src_vmid_of(&v.volid)?),
                &format!("-{tvmid}-"),
            );
        let stream_format = format!("{}+size", v.format);
        let reply = self
            .remote
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
        let local = self
            .src
            .cfg
            .run_dir
            .join(format!("{}.storage", src_vmid_of(&v.volid)?));
        if !self.remote.forwards.iter().any(|f| f.local == local) {
            self.remote.forward(&local, &remote_socket, 0)?;
        }
        let payload_len = tokio::fs::metadata(&v.path).await?.len();
        let total = if v.format == "raw" {
            v.size
        } else {
            payload_len
        };
        let bar = self.progress.bar(&v.key, total);
        send_stream(&self.remote, &local, v, total, limit_kib, &bar).await?;
        wait_import(&self.remote, v, &bar).await
    }
}

/// Writes the stream (size, then the file) into the forwarded socket at the average rate
/// `limit_kib`, and keeps the socket open until the target has read it.
async fn send_stream(
    remote: &Remote,
    local: &Path,
    v: &Volume,
    total: u64,
    limit_kib: Option<u64>,
    bar: &Bar<'_>,
) -> anyhow::Result<()> {
    let mut sock = tokio::net::UnixStream::connect(local)
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
    Ok(())
}

/// Polls `query-disk-import` until the import completes; returns the new volume id.
async fn wait_import(remote: &Remote, v: &Volume, bar: &Bar<'_>) -> anyhow::Result<String> {
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
async fn import_failure(remote: &Remote) -> Option<String> {
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

fn src_vmid_of(volid: &str) -> anyhow::Result<String> {
    let (_, name) = volid.split_once(':').context("volid without storage")?;
    Ok(name.split('/').next().unwrap_or("").to_string())
}

/// The source's config with the target's bridges (no digest).
pub(super) fn mapped_config(plan: &Plan) -> anyhow::Result<vmconf::VmConfig> {
    let mut conf = plan.conf.clone();
    conf.digest.clear();
    for (key, bridge) in &plan.bridges {
        let value = conf.options[key].clone();
        conf.options
            .insert(key.clone(), replace_prop(&value, "bridge", bridge)?);
    }
    Ok(conf)
}

/// The `drive` object of a `disk` command: the drive's properties without `file`/`format`,
/// plus `interface`, `index` and `size` in bytes.
pub(super) fn drive_object(key: &str, value: &str, size: u64) -> anyhow::Result<Value> {
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

pub(super) fn replace_volume(value: &str, volid: &str) -> anyhow::Result<String> {
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

pub(super) fn replace_prop(value: &str, key: &str, new: &str) -> anyhow::Result<String> {
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
