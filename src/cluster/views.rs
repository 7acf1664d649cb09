//! The data behind the cluster API routes (`/cluster/status`, `/cluster/resources`,
//! `/cluster/nextid`, `/nodes`) when the node is in a cluster, read from etcd; and the
//! node's own `resources/{node}` record (its VMs, their status and its replicas' fields)
//! that feeds the resources view of the other members. The routes only shape these into
//! replies.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::registry::State;
use super::{Cluster, LocalState, MemberRecord, ReplicaFields, locked};

/// One node of the cluster as the views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub record: MemberRecord,
    /// Its membership key (on its lease) exists.
    pub online: bool,
    /// 1-based position in name order (PVE's `nodeid`).
    pub nodeid: usize,
}

/// The cluster as `/cluster/status` shows it.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub nodes: Vec<NodeView>,
    /// etcd answered a linearizable read (quorum) within the timeout.
    pub quorate: bool,
}

/// A VM of the cluster as `/cluster/resources` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    pub vmid: u32,
    pub node: String,
    /// `running`, `stopped`, or `unknown` (its node is offline or has not published yet).
    pub status: String,
    /// A replica's `/cluster/resources` fields, as its node lists them (`status` `replica`
    /// among them).
    pub replica: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The value of `resources/{node}`: small (a few dozen bytes a VM, a few hundred a
/// replica), and rewritten only when it changes (a VM starts or stops, a replica run
/// begins or commits, a replica is promoted, dropped or cut over to).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// VMID → `running`/`stopped`.
    pub vms: BTreeMap<u32, String>,
    /// VMID → a replica's `/cluster/resources` fields (absent from older nodes' records:
    /// their replicas show as plain VMs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: ReplicaFields,
}

impl Published {
    pub fn of(local: &LocalState) -> Self {
        Published {
            vms: local
                .configs
                .iter()
                .map(|id| {
                    let status = if local.running.contains(id) {
                        "running"
                    } else {
                        "stopped"
                    };
                    (*id, status.to_string())
                })
                .collect(),
            replicas: local
                .replicas
                .iter()
                .filter(|(id, _)| local.configs.contains(id))
                .map(|(id, fields)| (*id, fields.clone()))
                .collect(),
        }
    }
}

impl Cluster {
    /// Every node that ever joined, with `online` from the live membership keys.
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeView>> {
        let known = self.records("nodes/").await?;
        let live: BTreeMap<String, MemberRecord> = self
            .records("members/")
            .await?
            .into_iter()
            .map(|r| (r.node.clone(), r))
            .collect();
        let mut names: BTreeSet<String> = known.iter().map(|r| r.node.clone()).collect();
        names.extend(live.keys().cloned());
        let known: BTreeMap<String, MemberRecord> =
            known.into_iter().map(|r| (r.node.clone(), r)).collect();
        Ok(names
            .into_iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let online = live.contains_key(&name);
                let record = live.get(&name).or_else(|| known.get(&name))?.clone();
                Some(NodeView {
                    record,
                    online,
                    nodeid: i + 1,
                })
            })
            .collect())
    }

    async fn records(&self, dir: &str) -> anyhow::Result<Vec<MemberRecord>> {
        Ok(self
            .etcd
            .range(&self.key(dir), true)
            .await?
            .iter()
            .filter_map(|kv| self.trusted(kv))
            .collect())
    }

    /// Members and quorum. An etcd that does not answer gives `quorate: false` and no nodes
    /// (the route then shows this node alone).
    pub async fn status(&self) -> StatusView {
        match self.nodes().await {
            Ok(nodes) => StatusView {
                quorate: self.quorate().await.is_ok(),
                nodes,
            },
            Err(e) => {
                tracing::warn!("cluster status: {e:#}");
                StatusView {
                    nodes: Vec::new(),
                    quorate: false,
                }
            }
        }
    }

    /// Every VM in the registry with its node and status; VMs of this node come from
    /// `local` (live), the others from what their node published.
    pub async fn vms(&self, local: &LocalState) -> anyhow::Result<Vec<VmView>> {
        let entries = self.entries().await?;
        let prefix = self.key("resources/");
        let published: BTreeMap<String, Published> = self
            .etcd
            .range(&prefix, true)
            .await?
            .iter()
            .filter_map(|kv| {
                let node = kv.key.strip_prefix(&prefix)?.to_string();
                Some((node, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect();
        let mine = Published::of(local);
        let mut out: BTreeMap<u32, VmView> = BTreeMap::new();
        for (vmid, entry, _) in entries {
            if entry.node == self.node && !local.configs.contains(&vmid) {
                continue;
            }
            let from = if entry.node == self.node {
                Some(&mine)
            } else {
                published.get(&entry.node)
            };
            let replica = from.and_then(|p| p.replicas.get(&vmid)).cloned();
            // A reserved VMID of another node (a tunnel under way) is `stopped` as in PVE,
            // whatever its node published; a replica's run holds its VMID so too, and is
            // listed as its node lists it.
            let status = if entry.node != self.node && entry.state == State::Reserved {
                Some("stopped".to_string())
            } else {
                from.and_then(|p| p.vms.get(&vmid).cloned())
            };
            out.insert(
                vmid,
                VmView {
                    vmid,
                    node: entry.node,
                    status: status.unwrap_or_else(|| "unknown".into()),
                    replica,
                },
            );
        }
        // Local configs the registry has not caught up with yet are shown too.
        for vmid in &local.configs {
            out.entry(*vmid).or_insert_with(|| VmView {
                vmid: *vmid,
                node: self.node.clone(),
                status: mine.vms[vmid].clone(),
                replica: mine.replicas.get(vmid).cloned(),
            });
        }
        Ok(out.into_values().collect())
    }

    /// The lowest VMID from `from` on that no node has and `taken_here` does not hold.
    pub async fn next_free_vmid(
        &self,
        from: u32,
        taken_here: &(dyn Fn(u32) -> bool + Sync),
    ) -> anyhow::Result<Option<u32>> {
        let taken: BTreeSet<u32> = self.entries().await?.into_iter().map(|e| e.0).collect();
        Ok((from.max(100)..=999_999_999)
            .take(1_000_000)
            .find(|id| !taken.contains(id) && !taken_here(*id)))
    }

    /// The node owning `vmid` in the registry, if any.
    pub async fn owner(&self, vmid: u32) -> anyhow::Result<Option<String>> {
        Ok(self
            .etcd
            .get(&self.vmid_key(vmid))
            .await?
            .and_then(|kv| serde_json::from_slice::<super::registry::Entry>(&kv.value).ok())
            .map(|e| e.node))
    }

    /// Writes `resources/{node}` (on the lease) when it changed.
    pub(super) async fn publish(&self, local: &LocalState) -> anyhow::Result<()> {
        let lease = *locked(&self.lease);
        if lease == 0 {
            return Ok(());
        }
        let text = serde_json::to_string(&Published::of(local))?;
        if locked(&self.published).as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        self.etcd
            .put(
                &self.key(&format!("resources/{}", self.node)),
                text.as_bytes(),
                lease,
            )
            .await?;
        *locked(&self.published) = Some(text);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_shape() {
        let mut local = LocalState {
            configs: [100, 101].into(),
            running: [101].into(),
            replicas: Default::default(),
        };
        assert_eq!(
            serde_json::to_string(&Published::of(&local)).unwrap(),
            r#"{"vms":{"100":"stopped","101":"running"}}"#
        );
        // A replica's fields go along; a record without its config does not.
        let fields = serde_json::json!({"status": "replica", "replica-points": 1});
        let fields = fields.as_object().cloned().unwrap_or_default();
        local.replicas = [(100, fields.clone()), (102, fields)].into();
        assert_eq!(
            serde_json::to_string(&Published::of(&local)).unwrap(),
            r#"{"vms":{"100":"stopped","101":"running"},"replicas":{"100":{"replica-points":1,"status":"replica"}}}"#
        );
        let old: Published = serde_json::from_str(r#"{"vms":{"100":"stopped"}}"#).unwrap();
        assert!(old.replicas.is_empty());
    }
}
