//! The data behind the cluster API routes (`/cluster/status`, `/cluster/resources`,
//! `/cluster/nextid`, `/nodes`) when the node is in a cluster, read from etcd; and the
//! node's own `resources/{node}` record (its VMs and their status) that feeds the
//! resources view of the other members. The routes only shape these into replies.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::registry::State;
use super::{Cluster, LocalState, MemberRecord, locked};

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
}

/// The value of `resources/{node}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// VMID → `running`/`stopped`.
    pub vms: BTreeMap<u32, String>,
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
        let mut out: BTreeMap<u32, VmView> = BTreeMap::new();
        for (vmid, entry, _) in entries {
            if entry.node == self.node && !local.configs.contains(&vmid) {
                continue;
            }
            let status = if entry.node == self.node {
                Published::of(local).vms.get(&vmid).cloned()
            } else if entry.state == State::Reserved {
                Some("stopped".to_string())
            } else {
                published
                    .get(&entry.node)
                    .and_then(|p| p.vms.get(&vmid).cloned())
            };
            out.insert(
                vmid,
                VmView {
                    vmid,
                    node: entry.node,
                    status: status.unwrap_or_else(|| "unknown".into()),
                },
            );
        }
        // Local configs the registry has not caught up with yet are shown too.
        for vmid in &local.configs {
            out.entry(*vmid).or_insert_with(|| VmView {
                vmid: *vmid,
                node: self.node.clone(),
                status: Published::of(local).vms[vmid].clone(),
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
        let local = LocalState {
            configs: [100, 101].into(),
            running: [101].into(),
        };
        assert_eq!(
            serde_json::to_string(&Published::of(&local)).unwrap(),
            r#"{"vms":{"100":"stopped","101":"running"}}"#
        );
    }
}
