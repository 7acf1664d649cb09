//! The target side of a replica run as the source sees it: the tunnel opened with
//! `replica=1`, the `version` and `mtunnel-features` checks (a target that does not offer
//! `replica` is refused before anything is made there), the commands, and one forward per
//! exported working copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Disk, ReplicateOptions, local_socket};
use crate::client::http::{ApiClient, encode_segment};
use crate::client::migrate::{TUNNEL_VERSION, pinned_fingerprint};
use crate::client::progress::Progress;
use crate::client::tunnel::{Control, Endpoint, Forward, forward};

/// How long one command may take on the target (a point of a big qcow2 takes a while).
const CMD_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) struct Remote {
    api: ApiClient,
    control: Control,
    pub(super) node: String,
    base_url: String,
    forwards: Vec<Forward>,
    /// The target answers `replica-hashes` (`mtunnel-features` `replica_hashes`): a
    /// hash sync is possible.
    pub(super) hashes: bool,
    /// Its `replica-hashes` takes `runs` (`mtunnel-features` `replica_hash_runs`):
    /// repeated hashes come as a count.
    pub(super) hash_runs: bool,
}

impl Remote {
    /// Opens the tunnel for `opts.vmid` on the target and checks that it offers replicas.
    /// Refused before anything is made when the VM's replica is on another node of the
    /// target's cluster than the one the run goes to (`source_node`: this node's name).
    pub(super) async fn open(
        opts: &ReplicateOptions,
        source_node: &str,
        disks: &[Disk],
        progress: &Progress,
    ) -> anyhow::Result<Remote> {
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
        // `--target-node`, or else the node answering.
        let node = (api.target_node(opts.target_node.as_deref()).await)
            .map_err(|e| anyhow::anyhow!("{e:#}: nothing was replicated"))?;
        check_replica_node(&api, (source_node, opts.vmid), &node).await?;
        let mut storages: Vec<String> = disks.iter().map(|d| d.target_storage.clone()).collect();
        storages.sort();
        storages.dedup();
        let storages = storages.join(",");
        let params = [("storages", storages.as_str()), ("replica", "1")];
        let opened = crate::client::migrate::open_tunnel(
            &api,
            &opts.target,
            &node,
            opts.vmid,
            &params,
            "the replica tunnel",
        )
        .await?;
        progress.log(format!("remote: started tunnel worker '{}'", opened.upid));
        let (base_url, control) = (opened.base_url, opened.control);
        let mut remote = Remote {
            api,
            control,
            node,
            base_url,
            forwards: Vec::new(),
            hashes: false,
            hash_runs: false,
        };
        match remote.check_features().await {
            Ok((hashes, runs)) => (remote.hashes, remote.hash_runs) = (hashes, runs),
            Err(e) => {
                remote.quit(true).await;
                return Err(e);
            }
        }
        Ok(remote)
    }

    /// Checks `version` and that the target offers replicas; returns whether it offers
    /// `replica-hashes`, and its `runs` (older mtunnel targets do not).
    async fn check_features(&self) -> anyhow::Result<(bool, bool)> {
        let version = self.cmd(json!({"cmd": "version"})).await?;
        let api = version.get("api").and_then(Value::as_u64).unwrap_or(0);
        if api < TUNNEL_VERSION {
            bail!("Remote tunnel endpoint too old, upgrade required");
        }
        let features = self
            .control
            .request(&json!({"cmd": "mtunnel-features"}), Duration::from_secs(10))
            .await?;
        if features.get("replica").and_then(Value::as_u64) != Some(1) {
            bail!(
                "the target does not offer replicas (its 'mtunnel-features' has no 'replica'): \
                 it is no mtunnel node, or an older one - upgrade it"
            );
        }
        let offers = |key: &str| features.get(key).and_then(Value::as_u64) == Some(1);
        Ok((offers("replica_hashes"), offers("replica_hash_runs")))
    }

    /// One command; a failure reply is an error with the target's message.
    pub(super) async fn cmd(&self, cmd: Value) -> anyhow::Result<Value> {
        Ok(self.control.command(&cmd, CMD_TIMEOUT).await?)
    }

    /// Forwards each exported working copy to a local socket; returns them by drive key.
    pub(super) fn forward_exports(
        &mut self,
        run_dir: &Path,
        vmid: u32,
        tag: &str,
        disks: &[Disk],
        exported: &Value,
    ) -> anyhow::Result<BTreeMap<String, (PathBuf, String)>> {
        let mut out = BTreeMap::new();
        for d in disks {
            let e = &exported["drives"][&d.key];
            let (Some(socket), Some(export)) = (e["socket"].as_str(), e["export"].as_str()) else {
                bail!(
                    "replica-export reply has no export for {}: {exported}",
                    d.key
                );
            };
            if e["size"].as_u64() != Some(d.size) {
                bail!(
                    "{}: the target's working copy has {} bytes, the disk {}",
                    d.key,
                    e["size"],
                    d.size
                );
            }
            let local = local_socket(run_dir, vmid, tag, &d.key);
            let url = format!(
                "{}/mtunnelwebsocket?socket={}&",
                self.base_url,
                encode_segment(socket)
            );
            let endpoint = Endpoint {
                url,
                headers: vec![("Authorization".into(), self.api.token_header().to_string())],
                fingerprint: Some(self.api.fingerprint().to_string()),
            };
            let f = forward(&self.control, endpoint, &local, socket.to_string(), 0)?;
            self.forwards.push(f);
            out.insert(d.key.clone(), (local, export.to_string()));
        }
        Ok(out)
    }

    /// Closes every connection the forwards carry (their local ends): after a failed
    /// run, so that the source QEMU's NBD requests stuck on a frozen link fail and its
    /// jobs can end.
    pub(super) fn cut_forwards(&self) {
        for f in &self.forwards {
            f.cut();
        }
    }

    /// Bytes sent through the forwards, once every forwarded connection ended (at most
    /// 10 s after the NBD clients disconnected).
    pub(super) async fn sent_bytes(&self) -> u64 {
        for _ in 0..200 {
            let open = self.forwards.iter().any(|f| {
                f.stats.finished.load(Ordering::SeqCst) < f.stats.accepted.load(Ordering::SeqCst)
            });
            if !open {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.forwards
            .iter()
            .map(|f| f.stats.sent.load(Ordering::SeqCst))
            .sum()
    }

    /// Ends the tunnel: `quit` (with `cleanup` after a failure) and the connection.
    pub(super) async fn quit(&mut self, cleanup: bool) {
        self.quit_within(cleanup, Duration::from_secs(60)).await;
    }

    /// [`Self::quit`] that waits at most `timeout` for the reply (the target answers it
    /// after the command it is busy with).
    pub(super) async fn quit_within(&mut self, cleanup: bool, timeout: Duration) {
        self.forwards.clear();
        let quit = json!({"cmd": "quit", "cleanup": u8::from(cleanup)});
        if let Err(e) = self.control.command(&quit, timeout).await {
            tracing::warn!("quit on the target failed: {e}");
        }
    }
}

/// A replica lives on one node: refuses a run to `node` when the target's
/// `/cluster/resources` lists this VM's replica (`replica-source` `NODE/VMID`) on another
/// member. Other uses of the VMID are judged by the target as before.
async fn check_replica_node(
    api: &ApiClient,
    (source_node, vmid): (&str, u32),
    node: &str,
) -> anyhow::Result<()> {
    let resources = api
        .get("/cluster/resources", &[("type", "vm")])
        .await
        .context("querying the target's /cluster/resources")?;
    let source = format!("{source_node}/{vmid}");
    let on = resources.as_array().and_then(|a| {
        a.iter().find_map(|e| {
            let ours = e["vmid"] == json!(vmid)
                && e["status"] == json!("replica")
                && e["replica-source"] == json!(source);
            ours.then(|| e["node"].as_str()).flatten()
        })
    });
    match on {
        Some(on) if on != node => bail!(
            "VM {vmid}'s replica is on node '{on}' of the target's cluster, not on '{node}': a \
             replica lives on one node - replicate with --target-node {on} (or drop it there \
             with 'mtunnel replica drop {vmid}' on '{on}' to start anew on '{node}'); nothing \
             was replicated"
        ),
        _ => Ok(()),
    }
}
