//! Cluster mode (`[cluster]`): several `mtunnel serve` nodes share one VMID space, a
//! membership list and cluster views through etcd. This module owns the node's etcd lease
//! (granted at join, kept alive, granted anew when lost), its membership keys, the quorum
//! check and the background loop that keeps etcd in line with the node's local truth;
//! [`registry`] owns the VMID entries, [`views`] the data of the cluster API routes.
//!
//! Keys, all under `/mtunnel/{cluster}/`: `members/{node}` (a [`Member`], on the node's
//! lease: gone when the node dies), `nodes/{node}` (the same without a lease: every node that
//! ever joined, for "offline" in the views; a node name is held by one live lease: see
//! [`NameHeld`]), `resources/{node}` (the node's VMs, their status and its replicas'
//! fields, on its lease), `vmids/{vmid}` (a [`registry::Entry`]).
//! Without `[cluster]` none of this exists and the node behaves as a single host.

mod cache;
pub mod etcd;
pub mod identity;
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
    /// [`identity::sign`] of the record with the cluster's secret (empty: unsigned).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

/// What the node itself knows, for the reconcile loop (configs are the truth).
#[derive(Debug, Clone, Default)]
pub struct LocalState {
    /// VMIDs with a config on this node.
    pub configs: BTreeSet<u32>,
    /// Of those, the ones whose QEMU runs.
    pub running: BTreeSet<u32>,
    /// Of those, the replicas (docs/replicas.md): their `/cluster/resources` fields
    /// ([`crate::replica::listed`]), published for the other members.
    pub replicas: ReplicaFields,
}

/// VMID → the fields a replica's `/cluster/resources` entry carries.
pub type ReplicaFields =
    std::collections::BTreeMap<u32, serde_json::Map<String, serde_json::Value>>;

/// Reads [`LocalState`]; the node supplies it (the cluster layer sits beside the stores).
pub type LocalFn = Arc<dyn Fn() -> BoxFuture<'static, LocalState> + Send + Sync>;

/// How often a node makes etcd match its configs and publishes its VM list.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(3);

/// How often the lease is kept alive: a third of its TTL, so that one lost keepalive (or
/// one try on a hung etcd member) never lets it expire.
pub fn keepalive_every(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_millis(500))
}

/// How long after a lease's TTL ran out etcd may still show its keys (it checks expiry
/// every 500 ms, then revokes through raft).
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

/// How often a starting node looks whether the lease holding its name has expired.
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// The node's name is registered by another running mtunnel (`members/{node}` lives on a
/// lease that is not ours and is kept alive).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "node name '{node}' is held by a running mtunnel at {api_url}; give this node another \
     name (--node, or node = \"...\" in the config file)"
)]
pub struct NameHeld {
    pub node: String,
    pub api_url: String,
}

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
    /// Set by [`Cluster::leave`]: no lease is granted any more, the loops end.
    leaving: tokio::sync::watch::Sender<bool>,
    /// The keepalive and reconcile loops ([`Cluster::spawn`]); [`Cluster::leave`] waits
    /// for them to end before it revokes the lease.
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Why the last lease grant or keepalive failed (for the refusal while without lease).
    last_error: Mutex<String>,
    /// Another running mtunnel holds this node's name: no tunnels, no reconcile.
    name_held: Mutex<Option<NameHeld>>,
    /// This node's registration, once joined.
    me: Mutex<Option<MemberRecord>>,
    /// VMIDs of this node's open tunnels: their entries stay reserved on the lease.
    held: Mutex<BTreeSet<u32>>,
    /// Of those, the ones another node took while this node's lease had lapsed, and that
    /// node: their tunnels are fenced ([`registry::Cluster::commit`]).
    lost: Mutex<std::collections::BTreeMap<u32, String>>,
    /// Of those, the ones whose tunnel passed its commit: their entries are permanent and
    /// must never be put back on a lease.
    committed: Mutex<BTreeSet<u32>>,
    /// This node serves https: a member record with a plain `http://` URL is refused.
    local_tls: bool,
    /// The `resources/{node}` value last written (rewritten only when it changes).
    published: Mutex<Option<String>>,
    /// Recent [`Cluster::member`] lookups (forwarding asks once per name and second).
    members: cache::MemberCache,
}

/// What one attempt to write the membership key found.
enum Claim {
    /// Written: the name is ours.
    Won,
    /// The key changed between compare and write: try again.
    Changed,
    /// On another lease: another mtunnel (or a killed previous run) holds the name.
    Held(etcd::Kv),
}

/// The key of a transaction's first `response_range` (the failure branch's `get`).
fn first_kv(reply: &etcd::TxnReply) -> Option<etcd::Kv> {
    reply
        .responses
        .first()
        .and_then(|r| r.get("response_range"))
        .map(etcd::kvs_of)
        .and_then(|kvs| kvs.into_iter().next())
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
            name_held: Mutex::new(None),
            leaving: tokio::sync::watch::Sender::new(false),
            loops: Mutex::new(Vec::new()),
            me: Mutex::new(None),
            held: Mutex::new(BTreeSet::new()),
            lost: Mutex::new(Default::default()),
            committed: Mutex::new(BTreeSet::new()),
            local_tls: cfg.tls,
            published: Mutex::new(None),
            members: cache::MemberCache::new(cache::MEMBER_CACHE_TTL),
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
    /// reachable. Answers (failures too) are reused for a second (`cache::MEMBER_CACHE_TTL`).
    pub async fn member(&self, node: &str) -> anyhow::Result<Option<Member>> {
        self.members
            .get_or_fetch(node, || self.member_uncached(node))
            .await
    }

    async fn member_uncached(&self, node: &str) -> anyhow::Result<Option<Member>> {
        let Some(kv) = self.etcd.get(&self.key(&format!("members/{node}"))).await? else {
            return Ok(None);
        };
        Ok(self.trusted(&kv).map(|r| Member {
            node: r.node,
            api_url: r.api_url,
            fingerprint: r.fingerprint,
        }))
    }

    /// The member record in `kv` (a `members/` or `nodes/` key) if it passes
    /// [`identity::verify`]; else `None`, and the log says why.
    pub(super) fn trusted(&self, kv: &etcd::Kv) -> Option<MemberRecord> {
        let name = kv.key.rsplit('/').next().unwrap_or_default();
        // A live member's record hangs on its lease: one without (a copy of an old record
        // written back by hand) is not a live member.
        if kv.key.starts_with(&self.key("members/")) && kv.lease == 0 {
            tracing::warn!(
                key = %kv.key,
                "cluster '{}': ignoring the member record {}: it is on no lease (not \
                 written by a running mtunnel)",
                self.cfg.name,
                kv.key
            );
            return None;
        }
        let secret = &self.cfg.member_secret.0;
        match identity::verify(secret, &self.cfg.name, name, self.local_tls, &kv.value) {
            Ok(r) => Some(r),
            Err(why) => {
                tracing::warn!(
                    key = %kv.key,
                    "cluster '{}': ignoring the member record {}: {why}",
                    self.cfg.name,
                    kv.key
                );
                None
            }
        }
    }

    /// The current lease, or the no-quorum error when the node holds none, is not
    /// registered on it (yet), or another running mtunnel holds its name.
    fn lease(&self) -> Result<i64, String> {
        if let Some(held) = locked(&self.name_held).clone() {
            return Err(no_quorum(held));
        }
        let why = || locked(&self.last_error).clone();
        match *locked(&self.lease) {
            0 => Err(no_quorum(format!(
                "this node holds no etcd lease: {}",
                why()
            ))),
            _ if *locked(&self.unregistered) => Err(no_quorum(format!(
                "this node is not registered in the cluster yet: {}",
                why()
            ))),
            id => Ok(id),
        }
    }

    /// Registers this node (`api_url`, certificate `fingerprint`): grants the lease and
    /// writes the membership keys. A failure is returned, and the background loop retries;
    /// a name another running mtunnel holds is a [`NameHeld`] error (after giving a lease
    /// left by a killed previous run of this node its TTL to expire).
    pub async fn join(&self, api_url: &str, fingerprint: &str) -> anyhow::Result<()> {
        let api_url = self
            .cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| api_url.trim_end_matches("/api2/json").to_string());
        let mut me = MemberRecord {
            node: self.node.clone(),
            api_url,
            fingerprint: fingerprint.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            signature: String::new(),
        };
        me.signature = identity::sign(&self.cfg.member_secret.0, &self.cfg.name, &me);
        *locked(&self.me) = Some(me);
        *locked(&self.unregistered) = true;
        let result = self.ensure_lease(true).await;
        if let Err(e) = &result {
            *locked(&self.last_error) = format!("{e:#}");
        }
        result
    }

    /// Grants a lease when the node holds none, then (re)writes everything that hangs on
    /// it: membership, and the reservations of open tunnels (they vanished with a lost
    /// lease). What failed is tried again on the next call. `wait`: see [`Cluster::register`].
    async fn ensure_lease(&self, wait: bool) -> anyhow::Result<()> {
        if *self.leaving.borrow() {
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
        self.register(wait).await?;
        let lease = *locked(&self.lease);
        let committed = locked(&self.committed).clone();
        let held: Vec<u32> = locked(&self.held)
            .iter()
            .copied()
            .filter(|v| !committed.contains(v))
            .collect();
        for vmid in held {
            match self
                .reserve_txn(vmid, registry::State::Reserved, lease)
                .await
            {
                Ok(()) => {}
                Err(registry::ReserveError::Exists { node, .. }) => {
                    tracing::error!(
                        vmid,
                        "re-reserving VMID after a new lease: node '{node}' took VM {vmid} \
                         while this node's lease had lapsed; its tunnel here is fenced (it \
                         fails before resume or commit and cleans up)"
                    );
                    locked(&self.lost).insert(vmid, node);
                }
                // Absent or ours stays ours: the commit proves it again.
                Err(e) => tracing::warn!(vmid, "re-reserving VMID after a new lease: {e}"),
            }
        }
        *locked(&self.unregistered) = false;
        Ok(())
    }

    /// Writes `members/{node}` (on the lease) and `nodes/{node}` (permanent). The member
    /// key is created only if absent, in one transaction (of two nodes starting with one
    /// name, one wins), or rewritten when it is on our lease already. On another lease it
    /// belongs to another mtunnel: [`NameHeld`] at once, or with `wait` (at start) once that
    /// lease outlived its TTL left: a previous run of this node killed without leaving
    /// holds it until then, a running one keeps it alive.
    async fn register(&self, wait: bool) -> anyhow::Result<()> {
        let Some(me) = locked(&self.me).clone() else {
            return Ok(());
        };
        let lease = *locked(&self.lease);
        let value = serde_json::to_vec(&me)?;
        let key = self.key(&format!("members/{}", me.node));
        let puts = vec![
            etcd::op::put(&key, &value, lease),
            etcd::op::put(&self.key(&format!("nodes/{}", me.node)), &value, 0),
        ];
        let mut give_up: Option<tokio::time::Instant> = None;
        // Bounds the retries when the key changes between two transactions.
        let mut changes = 0;
        while changes < 5 {
            let kv = match self.claim(&key, &puts, lease).await? {
                Claim::Won => {
                    *locked(&self.name_held) = None;
                    return Ok(());
                }
                Claim::Changed => {
                    changes += 1;
                    continue;
                }
                Claim::Held(kv) => kv,
            };
            let held = NameHeld {
                node: me.node.clone(),
                api_url: serde_json::from_slice::<MemberRecord>(&kv.value)
                    .map(|r| r.api_url)
                    .unwrap_or_else(|_| "an address its record does not give".into()),
            };
            if wait && give_up.is_none() {
                give_up = Some(self.expiry_of(kv.lease, &held).await);
            }
            match give_up {
                Some(until) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                _ => {
                    *locked(&self.name_held) = Some(held.clone());
                    return Err(held.into());
                }
            }
        }
        anyhow::bail!("registering the membership: {key} kept changing meanwhile")
    }

    /// One attempt to write the membership `puts` with `key` on `lease`: created if absent,
    /// rewritten if already on `lease` (or not validly signed) and unchanged since read.
    async fn claim(
        &self,
        key: &str,
        puts: &[serde_json::Value],
        lease: i64,
    ) -> anyhow::Result<Claim> {
        let context = "registering the membership";
        let reply = self
            .etcd
            .txn(
                vec![etcd::op::absent(key)],
                puts.to_vec(),
                vec![etcd::op::get(key)],
            )
            .await
            .context(context)?;
        if reply.succeeded {
            return Ok(Claim::Won);
        }
        let Some(kv) = first_kv(&reply) else {
            return Ok(Claim::Changed);
        };
        // A record no node of this cluster signed holds nothing: it is overwritten.
        if kv.lease != lease && self.trusted(&kv).is_some() {
            return Ok(Claim::Held(kv));
        }
        let compare = vec![etcd::op::unchanged(key, kv.mod_revision)];
        let reply = self
            .etcd
            .txn(compare, puts.to_vec(), vec![])
            .await
            .context(context)?;
        Ok(if reply.succeeded {
            Claim::Won
        } else {
            Claim::Changed
        })
    }

    /// When the other lease holding our name (`lease`) expires unless it is kept alive.
    async fn expiry_of(&self, lease: i64, held: &NameHeld) -> tokio::time::Instant {
        let ttl = self.cfg.lease_ttl.as_secs() as i64;
        let left = match self.etcd.lease_time_to_live(lease).await {
            Ok(left) => left.clamp(0, 3600),
            Err(_) => ttl,
        };
        let why = format!(
            "node name '{}' is registered on another etcd lease (at {}): a previous run of \
             this node that was killed, or another running mtunnel; waiting up to {} s for \
             that lease to expire",
            held.node,
            held.api_url,
            left as u64 + EXPIRY_SLACK.as_secs()
        );
        tracing::warn!(lease, "cluster '{}': {why}", self.cfg.name);
        *locked(&self.last_error) = why;
        tokio::time::Instant::now() + Duration::from_secs(left as u64) + EXPIRY_SLACK
    }

    /// Checks this node's own `members/{node}` record and writes it back (on this node's
    /// lease) when someone else changed or removed it: a forged record is repaired within
    /// one keepalive interval.
    async fn recheck_own_record(&self) -> anyhow::Result<()> {
        if *locked(&self.unregistered) {
            return Ok(());
        }
        let (Some(me), lease) = (locked(&self.me).clone(), *locked(&self.lease)) else {
            return Ok(());
        };
        let key = self.key(&format!("members/{}", me.node));
        let value = serde_json::to_vec(&me)?;
        let compare = match self.etcd.get(&key).await? {
            Some(kv) if kv.value == value && kv.lease == lease => return Ok(()),
            Some(kv) if kv.lease != 0 && self.trusted(&kv).is_some() => {
                // Signed with the secret and on a live lease that is not ours: another
                // running mtunnel with this name. Overwriting each other would only
                // flap forwarding; this node stops taking tunnels instead.
                let held = NameHeld {
                    node: me.node.clone(),
                    api_url: serde_json::from_slice::<MemberRecord>(&kv.value)
                        .map(|r| r.api_url)
                        .unwrap_or_default(),
                };
                tracing::error!("cluster '{}': {held}", self.cfg.name);
                *locked(&self.name_held) = Some(held);
                *locked(&self.unregistered) = true;
                return Ok(());
            }
            Some(kv) => {
                let found = serde_json::from_slice::<MemberRecord>(&kv.value)
                    .map(|r| r.api_url)
                    .unwrap_or_else(|_| "an unreadable record".into());
                tracing::error!(
                    "cluster '{}': the member record of this node was changed by someone \
                     else (it gave {found} on lease {}); writing it back. Whoever can write \
                     etcd can do this: see docs/cluster.md, \"Securing etcd\"",
                    self.cfg.name,
                    kv.lease
                );
                etcd::op::unchanged(&key, kv.mod_revision)
            }
            None => {
                tracing::error!(
                    "cluster '{}': the member record of this node was removed by someone \
                     else; writing it back",
                    self.cfg.name
                );
                etcd::op::absent(&key)
            }
        };
        self.etcd
            .txn(
                vec![compare],
                vec![etcd::op::put(&key, &value, lease)],
                vec![],
            )
            .await
            .context("writing this node's member record back")?;
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
        self.ensure_lease(false).await?;
        self.recheck_own_record().await
    }

    /// Whether etcd has quorum now (a linearizable read within the timeout).
    pub async fn quorate(&self) -> anyhow::Result<()> {
        self.etcd.quorate().await
    }

    /// Starts the background loops: lease keepalive every third of the TTL (counted from
    /// the start of the last one, so a slow keepalive does not stretch the gap), and, apart
    /// so that a slow reconcile never delays a keepalive, a reconcile against `local`
    /// every 3 s (at once first).
    pub fn spawn(self: &Arc<Self>, local: LocalFn) {
        let me = Arc::clone(self);
        let mut leaving = self.leaving.subscribe();
        let keepalive = tokio::spawn(async move {
            let tick = keepalive_every(me.cfg.lease_ttl);
            loop {
                let next = tokio::time::Instant::now() + tick;
                if let Err(e) = me.keepalive().await {
                    tracing::warn!("cluster '{}': lease keepalive: {e:#}", me.cfg.name);
                    *locked(&me.last_error) = format!("{e:#}");
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = leaving.wait_for(|l| *l) => break,
                }
            }
        });
        let me = Arc::clone(self);
        let mut leaving = self.leaving.subscribe();
        let reconcile = tokio::spawn(async move {
            loop {
                let state = local().await;
                if let Err(e) = me.reconcile(&state).await {
                    tracing::warn!("cluster '{}': reconcile: {e:#}", me.cfg.name);
                }
                tokio::select! {
                    _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                    _ = leaving.wait_for(|l| *l) => break,
                }
            }
        });
        locked(&self.loops).extend([keepalive, reconcile]);
    }

    /// Leaves the cluster at shutdown: revokes the lease (membership and reservations go at
    /// once instead of after the TTL).
    pub async fn leave(&self) {
        self.leaving.send_replace(true);
        // A keepalive under way ends first: none may grant a lease after the revoke.
        let loops = std::mem::take(&mut *locked(&self.loops));
        // Bounded: a reconcile against a slow etcd makes several calls of up to
        // `timeout` each; past the bound the loops are stopped where they are.
        for mut handle in loops {
            let bound = self.cfg.timeout * 2;
            if tokio::time::timeout(bound, &mut handle).await.is_err() {
                handle.abort();
            }
        }
        let id = std::mem::take(&mut *locked(&self.lease));
        if id != 0
            && let Err(e) = self.etcd.lease_revoke(id).await
        {
            tracing::warn!("revoking the etcd lease: {e:#}");
        }
    }
}
