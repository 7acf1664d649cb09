//! The cluster routes' replies when the node is in a cluster (`[cluster]`): the data comes
//! from [`crate::cluster`]; this file only shapes it as PVE does. Without `[cluster]` the
//! routes answer for the node alone, as before.

use serde_json::{Value, json};

use super::reply::Data;
use crate::cluster::views::{NodeView, StatusView, VmView};
use crate::cluster::{Cluster, no_quorum};
use crate::error::Error;
use crate::node::Node;
use crate::tunnel::Tunnels;

/// The host of an `https://host:port` URL (PVE's `ip` of a node).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => authority.to_string(),
    }
}

/// `GET /cluster/status`: the cluster entry (with `quorate`), then every node that ever
/// joined (`online` from its lease, `local` for this one). With etcd out of reach: this
/// node alone and `quorate: 0`.
pub(super) fn status(node: &Node, cluster: &Cluster, view: &StatusView) -> Data {
    let me = cluster.local_node();
    let mut out = vec![json!({
        "type": "cluster",
        "id": "cluster",
        "name": cluster.name(),
        "nodes": view.nodes.len().max(1),
        "quorate": u8::from(view.quorate),
        "version": 1,
    })];
    let entry = |name: &str, nodeid: usize, ip: String, online: bool| {
        json!({
            "type": "node",
            "id": format!("node/{name}"),
            "name": name,
            "nodeid": nodeid,
            "ip": ip,
            "local": u8::from(name == me),
            "online": u8::from(online),
            "level": "",
        })
    };
    if view.nodes.is_empty() {
        out.push(entry(me, 1, node.cfg.listen.ip().to_string(), true));
    }
    for n in &view.nodes {
        out.push(entry(
            &n.record.node,
            n.nodeid,
            host_of(&n.record.api_url),
            n.online,
        ));
    }
    Data::new(Value::Array(out))
}

/// `GET /nodes`: every node of the cluster.
pub(super) fn nodes(view: anyhow::Result<Vec<NodeView>>) -> Result<Data, Error> {
    let nodes = view.map_err(|e| Error::internal(no_quorum(format!("{e:#}"))))?;
    Ok(Data::new(Value::Array(
        nodes
            .iter()
            .map(|n| {
                json!({
                    "node": n.record.node,
                    "status": if n.online { "online" } else { "offline" },
                    "type": "node",
                    "id": format!("node/{}", n.record.node),
                    "ssl_fingerprint": n.record.fingerprint,
                })
            })
            .collect(),
    )))
}

/// What `/cluster/resources` shows of the cluster: its VMs and nodes.
pub(super) struct Resources {
    vms: Vec<VmView>,
    nodes: Vec<NodeView>,
}

pub(super) async fn resources_data(node: &Node, cluster: &Cluster) -> Result<Resources, String> {
    let local = node.local_state().await;
    let got = async { anyhow::Ok((cluster.vms(&local).await?, cluster.nodes().await?)) }.await;
    got.map(|(vms, nodes)| Resources { vms, nodes })
        .map_err(|e| no_quorum(format!("{e:#}")))
}

/// The `type: qemu` entries the token may see (`VM.Audit` or `VM.Allocate` on the VM).
pub(super) fn vm_resources(node: &Node, authid: &str, data: &Resources) -> Vec<Value> {
    data.vms
        .iter()
        .filter(|vm| {
            let path = format!("/vms/{}", vm.vmid);
            node.allows(authid, &path, "VM.Audit") || node.allows(authid, &path, "VM.Allocate")
        })
        .map(|vm| {
            json!({
                "id": format!("qemu/{}", vm.vmid),
                "vmid": vm.vmid,
                "type": "qemu",
                "node": vm.node,
                "status": vm.status,
            })
        })
        .collect()
}

/// The `type: node` entries.
pub(super) fn node_resources(data: &Resources) -> Vec<Value> {
    data.nodes
        .iter()
        .map(|n| {
            json!({
                "id": format!("node/{}", n.record.node),
                "type": "node",
                "node": n.record.node,
                "status": if n.online { "online" } else { "offline" },
            })
        })
        .collect()
}

/// `GET /cluster/nextid[?vmid=N]` across the cluster.
pub(super) async fn nextid(
    tunnels: &Tunnels,
    cluster: &Cluster,
    vmid: Option<String>,
) -> Result<Data, Error> {
    let quorum = |e: anyhow::Error| Error::internal(no_quorum(format!("{e:#}")));
    let taken_here = |id: u32| tunnels.taken(id);
    match vmid {
        Some(raw) => {
            let vmid = super::routes::parse_vmid(&raw)?;
            if taken_here(vmid) || cluster.owner(vmid).await.map_err(quorum)?.is_some() {
                return Err(Error::param("vmid", format!("VM {vmid} already exists")));
            }
            Ok(Data::new(json!(vmid.to_string())))
        }
        None => cluster
            .next_free_vmid(100, &taken_here)
            .await
            .map_err(quorum)?
            .map(|id| Data::new(json!(id.to_string())))
            .ok_or_else(|| Error::internal("unable to get any free VMID")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_url() {
        assert_eq!(super::host_of("https://127.0.0.1:8006"), "127.0.0.1");
        assert_eq!(super::host_of("https://[::1]:8006/"), "::1");
    }
}
