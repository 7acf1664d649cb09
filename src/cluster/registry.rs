//! The cluster-wide VMID registry: `vmids/{vmid}` holds which node has the VMID and whether
//! it is only reserved by an open tunnel (on the node's lease, so it vanishes when the node
//! dies) or present for good (no lease). Reserving is one etcd transaction ("create if
//! absent"); every later change compares the revision it read, so two nodes never
//! overwrite each other. [`Cluster::reconcile`] makes etcd match this node's configs.

use serde::{Deserialize, Serialize};

use super::etcd::{Kv, op};
use super::{Cluster, LocalState, locked, no_quorum};

/// The state of a VMID entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Held by an open tunnel of `node`, on its lease.
    Reserved,
    /// A VM config exists on `node`.
    Present,
}

/// The value of `vmids/{vmid}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: String,
    pub state: State,
}

/// Why a VMID could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Upstream's wording, naming the node that has it.
    #[error("VM {vmid} already exists on node '{node}'")]
    Exists { vmid: u32, node: String },
    /// etcd did not answer (or has no quorum): the message says so and why.
    #[error("{0}")]
    NoQuorum(String),
}

/// Why a tunnel may not pass its point of no return ([`Cluster::commit`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fenced {
    #[error(
        "VM {vmid} belongs to node '{node}' now: this node's reservation lapsed with its etcd \
         lease (the node was paused or cut off from etcd longer than the lease TTL)"
    )]
    Taken { vmid: u32, node: String },
    #[error("this node cannot prove its reservation of VM {vmid}: {cause}")]
    Unproven { vmid: u32, cause: String },
}

/// The longest [`Cluster::commit`] takes.
const COMMIT_BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// What one [`Cluster::claim_present`] found.
enum Present {
    /// The entry is present for this node now.
    Made,
    /// It changed between read and write: try again.
    Changed,
    /// Another node holds it.
    Owner(String),
}

/// How a reservation is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// For an open tunnel: on the node's lease until [`Cluster::finish`].
    Tunnel,
    /// For a VM created for good (`mtunnel vm create`).
    Present,
}

fn entry_of(kv: &Kv) -> Option<Entry> {
    serde_json::from_slice(&kv.value).ok()
}

impl Cluster {
    pub(super) fn vmid_key(&self, vmid: u32) -> String {
        self.key(&format!("vmids/{vmid}"))
    }

    fn value(&self, state: State) -> Vec<u8> {
        serde_json::to_vec(&Entry {
            node: self.node.clone(),
            state,
        })
        .unwrap_or_default()
    }

    /// Reserves `vmid` for this node in one transaction: created if absent; an entry this
    /// node already owns (e.g. written by a reconcile) is taken over; another node's entry
    /// refuses with upstream's text.
    pub async fn reserve(&self, vmid: u32, hold: Hold) -> Result<(), ReserveError> {
        let (state, lease) = match hold {
            Hold::Tunnel => (
                State::Reserved,
                self.lease().map_err(ReserveError::NoQuorum)?,
            ),
            Hold::Present => (State::Present, 0),
        };
        if hold == Hold::Tunnel {
            locked(&self.held).insert(vmid);
            locked(&self.lost).remove(&vmid);
            locked(&self.committed).remove(&vmid);
        }
        let result = self.reserve_txn(vmid, state, lease).await;
        if result.is_err() && hold == Hold::Tunnel {
            locked(&self.held).remove(&vmid);
        }
        result
    }

    pub(super) async fn reserve_txn(
        &self,
        vmid: u32,
        state: State,
        lease: i64,
    ) -> Result<(), ReserveError> {
        let key = self.vmid_key(vmid);
        let value = self.value(state);
        let quorum = |e: anyhow::Error| ReserveError::NoQuorum(no_quorum(format!("{e:#}")));
        let reply = self
            .etcd
            .txn(
                vec![op::absent(&key)],
                vec![op::put(&key, &value, lease)],
                vec![op::get(&key)],
            )
            .await
            .map_err(quorum)?;
        if reply.succeeded {
            return Ok(());
        }
        let Some(kv) = super::first_kv(&reply) else {
            // Deleted between compare and read: one retry settles it.
            return Box::pin(self.reserve_txn(vmid, state, lease)).await;
        };
        let owner = entry_of(&kv).map(|e| e.node).unwrap_or_default();
        if owner != self.node {
            return Err(ReserveError::Exists { vmid, node: owner });
        }
        let reply = self
            .etcd
            .txn(
                vec![op::unchanged(&key, kv.mod_revision)],
                vec![op::put(&key, &value, lease)],
                vec![],
            )
            .await
            .map_err(quorum)?;
        if reply.succeeded {
            Ok(())
        } else {
            Err(ReserveError::NoQuorum(no_quorum(format!(
                "the entry of VM {vmid} changed while it was being reserved - try again"
            ))))
        }
    }

    /// A tunnel of `vmid` ended: its entry becomes permanent when the VM stays here
    /// (`kept`), else it is deleted. Failures are logged; the reconcile loop repairs them.
    pub async fn finish(&self, vmid: u32, kept: bool) {
        locked(&self.held).remove(&vmid);
        locked(&self.lost).remove(&vmid);
        locked(&self.committed).remove(&vmid);
        let result = if kept {
            self.set_present(vmid).await
        } else {
            self.release(vmid).await
        };
        if let Err(e) = result {
            tracing::warn!(
                vmid,
                kept,
                "updating the cluster VMID entry (reconcile retries): {e:#}"
            );
        }
    }

    /// Marks `vmid` present for this node (without a lease), unless another node owns it.
    pub async fn set_present(&self, vmid: u32) -> anyhow::Result<()> {
        for _ in 0..3 {
            match self.claim_present(vmid).await? {
                Present::Made => return Ok(()),
                Present::Changed => continue,
                Present::Owner(node) => anyhow::bail!(
                    "VM {vmid} has a config on node '{}' but the cluster registry gives it \
                     to node '{node}': resolve by hand (destroy or renumber one of them)",
                    self.node
                ),
            }
        }
        anyhow::bail!("the entry of VM {vmid} kept changing meanwhile")
    }

    /// Fencing: the point of no return of a tunnel (`resume`, the config written without
    /// its lock). Turns this node's entry of `vmid` into a permanent one in one
    /// compare-and-set, which succeeds only while no other node holds the VMID: after it,
    /// no lease can lapse under the VM. A node whose reservation lapsed (its lease expired
    /// while it was paused or cut off) and whose VMID another node took meanwhile gets
    /// [`Fenced::Taken`] and must not go on; without etcd's answer, [`Fenced::Unproven`].
    pub async fn commit(&self, vmid: u32) -> Result<(), Fenced> {
        let unproven = |cause: String| Fenced::Unproven { vmid, cause };
        if let Some(held) = locked(&self.name_held).clone() {
            return Err(unproven(held.to_string()));
        }
        if let Some(node) = locked(&self.lost).get(&vmid).cloned() {
            return Err(Fenced::Taken { vmid, node });
        }
        // Bounded well below the source's 30 s wait for `resume`: a refusal it can read
        // beats a timeout that leaves it guessing.
        let deadline = tokio::time::Instant::now() + COMMIT_BOUND;
        for _ in 0..3 {
            let claimed = tokio::time::timeout_at(deadline, self.claim_present(vmid)).await;
            let Ok(claimed) = claimed else {
                return Err(unproven(no_quorum(format!(
                    "etcd did not settle the commit within {} s",
                    COMMIT_BOUND.as_secs()
                ))));
            };
            match claimed {
                Ok(Present::Made) => {
                    // Still held (reconcile leaves it alone until `finish`), but never put
                    // back on a lease by a re-reservation.
                    locked(&self.committed).insert(vmid);
                    return Ok(());
                }
                Ok(Present::Changed) => continue,
                Ok(Present::Owner(node)) => {
                    locked(&self.lost).insert(vmid, node.clone());
                    return Err(Fenced::Taken { vmid, node });
                }
                Err(e) => return Err(unproven(no_quorum(format!("{e:#}")))),
            }
        }
        Err(unproven(format!(
            "the registry entry of VM {vmid} kept changing"
        )))
    }

    /// The node `vmid`'s reservation was lost to, when this node found (re-reserving it on
    /// a new lease, or at a commit) that another node holds it now.
    pub fn lost_to(&self, vmid: u32) -> Option<String> {
        locked(&self.lost).get(&vmid).cloned()
    }

    /// One compare-and-set making `vmid` present for this node (no lease): from an absent
    /// entry or one of this node's, as read.
    async fn claim_present(&self, vmid: u32) -> anyhow::Result<Present> {
        let key = self.vmid_key(vmid);
        let value = self.value(State::Present);
        let compare = match self.etcd.get(&key).await? {
            None => op::absent(&key),
            Some(kv) => match entry_of(&kv) {
                Some(e) if e.node != self.node => return Ok(Present::Owner(e.node)),
                Some(e) if e.state == State::Present && kv.lease == 0 => {
                    return Ok(Present::Made);
                }
                _ => op::unchanged(&key, kv.mod_revision),
            },
        };
        let reply = self
            .etcd
            .txn(vec![compare], vec![op::put(&key, &value, 0)], vec![])
            .await?;
        Ok(if reply.succeeded {
            Present::Made
        } else {
            Present::Changed
        })
    }

    /// Deletes `vmid`'s entry if this node owns it.
    pub async fn release(&self, vmid: u32) -> anyhow::Result<()> {
        let key = self.vmid_key(vmid);
        if let Some(kv) = self.etcd.get(&key).await?
            && entry_of(&kv).is_some_and(|e| e.node == self.node)
        {
            self.etcd
                .txn(
                    vec![op::unchanged(&key, kv.mod_revision)],
                    vec![op::delete(&key)],
                    vec![],
                )
                .await?;
        }
        Ok(())
    }

    /// Every VMID entry: (vmid, entry, its key's lease).
    pub async fn entries(&self) -> anyhow::Result<Vec<(u32, Entry, i64)>> {
        let prefix = self.key("vmids/");
        Ok(self
            .etcd
            .range(&prefix, true)
            .await?
            .iter()
            .filter_map(|kv| {
                let vmid = kv.key.strip_prefix(&prefix)?.parse().ok()?;
                Some((vmid, entry_of(kv)?, kv.lease))
            })
            .collect())
    }

    /// Makes etcd match this node's truth: its entries without a config (and no open
    /// tunnel) go, its configs without an entry become present; a reserved entry whose
    /// tunnel is gone but whose config stayed becomes present. Never touches local VMs; a
    /// config whose VMID another node owns is logged. Also publishes the node's VM list.
    /// Does nothing while this node is not registered: its name may belong to another
    /// running node, whose entries are not ours to release.
    pub async fn reconcile(&self, local: &LocalState) -> anyhow::Result<()> {
        if *locked(&self.unregistered) {
            return Ok(());
        }
        let prefix = self.key("vmids/");
        let kvs = self.etcd.range(&prefix, true).await?;
        let held = locked(&self.held).clone();
        let mut seen = std::collections::BTreeSet::new();
        for kv in &kvs {
            let (Some(vmid), Some(entry)) = (
                kv.key
                    .strip_prefix(&prefix)
                    .and_then(|v| v.parse::<u32>().ok()),
                entry_of(kv),
            ) else {
                continue;
            };
            seen.insert(vmid);
            if entry.node != self.node {
                if local.configs.contains(&vmid) {
                    tracing::error!(
                        vmid,
                        "VM {vmid} has a config on node '{}' but the cluster registry gives it \
                         to node '{}': resolve by hand",
                        self.node,
                        entry.node
                    );
                }
                continue;
            }
            if held.contains(&vmid) {
                continue;
            }
            if !local.configs.contains(&vmid) {
                tracing::info!(
                    vmid,
                    "reconcile: releasing VMID with no config on this node"
                );
                self.etcd
                    .txn(
                        vec![op::unchanged(&kv.key, kv.mod_revision)],
                        vec![op::delete(&kv.key)],
                        vec![],
                    )
                    .await?;
            } else if entry.state != State::Present || kv.lease != 0 {
                self.set_present(vmid).await?;
            }
        }
        for vmid in local.configs.difference(&seen) {
            if held.contains(vmid) {
                continue;
            }
            tracing::info!(vmid = *vmid, "reconcile: registering local VM");
            if let Err(e) = self.set_present(*vmid).await {
                tracing::warn!(vmid = *vmid, "reconcile: {e:#}");
            }
        }
        self.publish(local).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_json_shape() {
        let e = Entry {
            node: "n1".into(),
            state: State::Reserved,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"node":"n1","state":"reserved"}"#
        );
        let p: Entry = serde_json::from_str(r#"{"node":"n2","state":"present"}"#).unwrap();
        assert_eq!(p.state, State::Present);
        assert_eq!(
            ReserveError::Exists {
                vmid: 100,
                node: "n2".into()
            }
            .to_string(),
            "VM 100 already exists on node 'n2'"
        );
        assert_eq!(
            no_quorum("etcd down"),
            "cluster not ready - no quorum? (etcd down)"
        );
    }
}
