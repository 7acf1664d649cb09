//! Cluster mode (`[cluster]`): several `mtunnel serve` nodes share one VMID space, a
//! membership list and cluster views through etcd. This module owns the node's etcd lease
//! (granted at join, kept alive, granted anew when lost), its membership keys, the quorum
//! check and the background loop that keeps etcd in line with the node's local truth;
//! [`registry`] owns the VMID entries, [`views`] the data of the cluster API routes.
//!
//! Keys, all under `/mtunnel/{cluster}/`: `members/{node}` (a [`Member`], on the node's
//! lease: gone when the node dies), `nodes/{node}` (the same without a lease: every node that
//! ever joined, for "offline" in the views), `resources/{node}` (the node's VMs and their
//! status, on its lease), `vmids/{vmid}` (a [`registry::Entry`]).
//! Without `[cluster]` none of this exists and the node behaves as a single host.

pub mod etcd;
pub mod registry;
pub mod views;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, NodeConfig};
use etcd::Etcd;

/// A live member as registered in etcd: what another node needs to reach it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub node: String,
    /// `https://host:port` (no `/api2/json`).
    pub api_url: String,
    /// The SHA-256 fingerprint of its API certificate, as `mtunnel migrate` pins it.
    pub fingerprint: String,
}

/// The value of `members/{node}` and `nodes/{node}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRecord {
    pub node: String,
    pub api_url: String,
    pub fingerprint: String,
    /// The mtunnel version the member runs.
    pub version: String,
}

/// What the node itself knows, for the reconcile loop (configs are the truth).
#[derive(Debug, Clone, Default)]
pub struct LocalState {
    /// VMIDs with a config on this node.
    pub configs: BTreeSet<u32>,
    /// Of those, the ones whose QEMU runs.
    pub running: BTreeSet<u32>,
}

/// Reads [`LocalState`]; the node supplies it (the cluster layer sits beside the stores).
pub type LocalFn = Arc<dyn Fn() -> BoxFuture<'static, LocalState> + Send + Sync>;

/// How often a node makes etcd match its configs and publishes its VM list.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(3);

/// The upstream refusal when the cluster cannot decide, with the cause.
pub fn no_quorum(cause: impl std::fmt::Display) -> String {
    format!("cluster not ready - no quorum? ({cause})")
}

/// This node's handle on the cluster.
pub struct Cluster {
    cfg: ClusterConfig,
    node: String,
    etcd: Etcd,
    /// The node's lease (0: none yet, or lost).
    lease: Mutex<i64>,
    /// The lease is new: membership and open reservations still have to be put on it.
    unregistered: Mutex<bool>,
    /// Set by [`Cluster::leave`]: no lease is granted any more, the loop ends.
    left: std::sync::atomic::AtomicBool,
    /// Why the last lease grant or keepalive failed (for the refusal while without lease).
    last_error: Mutex<String>,
    /// This node's registration, once joined.
    me: Mutex<Option<MemberRecord>>,
    /// VMIDs of this node's open tunnels: their entries stay reserved on the lease.
    held: Mutex<BTreeSet<u32>>,
    /// The `resources/{node}` value last written (rewritten only when it changes).
    published: Mutex<Option<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// The cluster of `cfg` (`None` without `[cluster]`). Opens no connection.
    pub fn new(cfg: &NodeConfig) -> anyhow::Result<Option<Arc<Cluster>>> {
        let Some(cluster) = &cfg.cluster else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Cluster {
            etcd: Etcd::new(cluster).context("[cluster] endpoints")?,
            cfg: cluster.clone(),
            node: cfg.node.clone(),
            lease: Mutex::new(0),
            unregistered: Mutex::new(true),
            last_error: Mutex::new("not joined yet".into()),
            left: std::sync::atomic::AtomicBool::new(false),
            me: Mutex::new(None),
            held: Mutex::new(BTreeSet::new()),
            published: Mutex::new(None),
        })))
    }

    pub fn local_node(&self) -> &str {
        &self.node
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    fn key(&self, rest: &str) -> String {
        format!("/mtunnel/{}/{rest}", self.cfg.name)
    }

    /// The member `node` as registered (None if not a live member). Errors when etcd is not
    /// reachable.
    pub async fn member(&self, node: &str) -> anyhow::Result<Option<Member>> {
        let kv = self.etcd.get(&self.key(&format!("members/{node}"))).await?;
        Ok(kv
            .and_then(|kv| serde_json::from_slice::<MemberRecord>(&kv.value).ok())
            .map(|r| Member {
                node: r.node,
                api_url: r.api_url,
                fingerprint: r.fingerprint,
            }))
    }

    /// The current lease, or the no-quorum error when the node holds none.
    fn lease(&self) -> Result<i64, String> {
        match *locked(&self.lease) {
            0 => Err(no_quorum(format!(
                "this node holds no etcd lease: {}",
                locked(&self.last_error)
            ))),
            id => Ok(id),
        }
    }

    /// Registers this node (`api_url`, certificate `fingerprint`): grants the lease and
    /// writes the membership keys. A failure is returned, and the background loop retries.
    pub async fn join(&self, api_url: &str, fingerprint: &str) -> anyhow::Result<()> {
        let api_url = self
            .cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| api_url.trim_end_matches("/api2/json").to_string());
        *locked(&self.me) = Some(MemberRecord {
            node: self.node.clone(),
            api_url,
            fingerprint: fingerprint.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        });
        *locked(&self.unregistered) = true;
        let result = self.ensure_lease().await;
        if let Err(e) = &result {
            *locked(&self.last_error) = format!("{e:#}");
        }
        result
    }

    /// Grants a lease when the node holds none, then (re)writes everything that hangs on
    /// it: membership, and the reservations of open tunnels (they vanished with a lost
    /// lease). What failed is tried again on the next call.
    async fn ensure_lease(&self) -> anyhow::Result<()> {
        if self.left.load(std::sync::atomic::Ordering::Acquire) {
            anyhow::bail!("this node left the cluster (shutting down)");
        }
        if *locked(&self.lease) == 0 {
            let id = self.etcd.lease_grant(self.cfg.lease_ttl).await?;
            *locked(&self.lease) = id;
            *locked(&self.published) = None;
            *locked(&self.unregistered) = true;
            tracing::info!(
                lease = id,
                "cluster '{}': etcd lease granted",
                self.cfg.name
            );
        }
        if !*locked(&self.unregistered) {
            return Ok(());
        }
        self.register().await?;
        let lease = *locked(&self.lease);
        let held: Vec<u32> = locked(&self.held).iter().copied().collect();
        for vmid in held {
            if let Err(e) = self.rehold(vmid, lease).await {
                tracing::error!(vmid, "re-reserving VMID after a new lease: {e:#}");
            }
        }
        *locked(&self.unregistered) = false;
        Ok(())
    }

    /// Writes `members/{node}` (on the lease) and `nodes/{node}` (permanent).
    async fn register(&self) -> anyhow::Result<()> {
        let Some(me) = locked(&self.me).clone() else {
            return Ok(());
        };
        let lease = *locked(&self.lease);
        let value = serde_json::to_vec(&me)?;
        self.etcd
            .txn(
                vec![],
                vec![
                    etcd::op::put(&self.key(&format!("members/{}", me.node)), &value, lease),
                    etcd::op::put(&self.key(&format!("nodes/{}", me.node)), &value, 0),
                ],
                vec![],
            )
            .await
            .context("registering the membership")?;
        Ok(())
    }

    /// Refreshes the lease; a lease etcd no longer knows is replaced.
    async fn keepalive(&self) -> anyhow::Result<()> {
        let id = *locked(&self.lease);
        if id != 0 && self.etcd.lease_keepalive(id).await? <= 0 {
            tracing::warn!(
                lease = id,
                "cluster '{}': the etcd lease expired (etcd out of reach longer than {} s); \
                 granting a new one and registering again",
                self.cfg.name,
                self.cfg.lease_ttl.as_secs()
            );
            let mut lease = locked(&self.lease);
            if *lease == id {
                *lease = 0;
            }
        }
        self.ensure_lease().await
    }

    /// Whether etcd has quorum now (a linearizable read within the timeout).
    pub async fn quorate(&self) -> anyhow::Result<()> {
        self.etcd.quorate().await
    }

    /// Starts the background loops: lease keepalive every third of the TTL, and, apart so
    /// that a slow reconcile never delays a keepalive, a reconcile against `local` every
    /// 3 s (at once first).
    pub fn spawn(self: &Arc<Self>, local: LocalFn) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let tick = (me.cfg.lease_ttl / 3).max(Duration::from_millis(500));
            while !me.left.load(std::sync::atomic::Ordering::Acquire) {
                if let Err(e) = me.keepalive().await {
                    tracing::warn!("cluster '{}': lease keepalive: {e:#}", me.cfg.name);
                    *locked(&me.last_error) = format!("{e:#}");
                }
                tokio::time::sleep(tick).await;
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while !me.left.load(std::sync::atomic::Ordering::Acquire) {
                let state = local().await;
                if let Err(e) = me.reconcile(&state).await {
                    tracing::warn!("cluster '{}': reconcile: {e:#}", me.cfg.name);
                }
                tokio::time::sleep(RECONCILE_EVERY).await;
            }
        });
    }

    /// Leaves the cluster at shutdown: revokes the lease (membership and reservations go at
    /// once instead of after the TTL).
    pub async fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::Release);
        let id = std::mem::take(&mut *locked(&self.lease));
        if id != 0
            && let Err(e) = self.etcd.lease_revoke(id).await
        {
            tracing::warn!("revoking the etcd lease: {e:#}");
        }
    }
}
