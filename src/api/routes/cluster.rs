//! The `/cluster` area: status, resources, the next free VMID and the custom CPU models.
//! In a cluster (`[cluster]`) the data comes from [`crate::cluster`] and this file only
//! shapes it as PVE does; without `[cluster]` the routes answer for the node alone.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Areas;
use crate::api::endpoint::{
    self, Access, Call, Endpoint, NoArgs, PathParam, parsed_opt, vmid_format,
};
use crate::api::reply::Data;
use crate::cluster::views::{NodeView, StatusView, VmView};
use crate::cluster::{Cluster, no_quorum};
use crate::error::Error;
use crate::node::Node;
use crate::schema::{Prop, props};
use crate::tunnel::Tunnels;

pub(super) fn routes() -> Areas {
    Areas::new()
        .route("/api2/{fmt}/cluster/status", endpoint::get(&STATUS, status))
        .route(
            "/api2/{fmt}/cluster/resources",
            endpoint::get(&RESOURCES, resources),
        )
        .route("/api2/{fmt}/cluster/nextid", endpoint::get(&NEXTID, nextid))
        .route(
            "/api2/{fmt}/cluster/qemu/custom-cpu-models",
            endpoint::get(&CPU_MODELS, cpu_models),
        )
        .route(
            "/api2/{fmt}/cluster/qemu/custom-cpu-models/{cputype}",
            endpoint::get(&CPU_MODEL, cpu_model),
        )
}

/// `GET /cluster/status`: needs `Sys.Audit` on `/`, as in PVE.
static STATUS: Endpoint = Endpoint {
    access: Access::All(&[("/", "Sys.Audit")]),
    ..Endpoint::PLAIN
};

async fn status(call: Call<NoArgs>) -> Result<Data, Error> {
    let node = &call.st.node;
    if let Some(cluster) = &node.cluster {
        let view = cluster.status().await;
        return Ok(status_data(node, cluster, &view));
    }
    // A standalone PVE node reports nodeid 0.
    Ok(Data::new(json!([{
        "type": "node",
        "id": format!("node/{}", node.cfg.node),
        "name": node.cfg.node,
        "nodeid": 0,
        "ip": node.cfg.listen.ip().to_string(),
        "local": 1,
        "online": 1,
        "level": "",
    }])))
}

/// `GET /cluster/resources[?type=..]`: the VMs and storages the token may see, and the nodes.
static RESOURCES: Endpoint = Endpoint {
    params: || {
        let kinds = ["vm", "storage", "node", "sdn", "pool"];
        props([("type", Prop::string().one_of(&kinds).optional())])
    },
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct ResourcesArgs {
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn resources(call: Call<ResourcesArgs>) -> Result<Data, Error> {
    let (node, authid) = (&call.st.node, call.authid());
    let wants = |k: &str| call.args.kind.as_deref().is_none_or(|kind| kind == k);
    let cluster = match &node.cluster {
        Some(c) => Some(resources_data(node, c).await.map_err(Error::internal)?),
        None => None,
    };
    let mut out = Vec::new();
    if wants("vm") {
        match &cluster {
            Some(data) => out.extend(vm_resources(node, authid, data)),
            None => out.extend(local_vm_resources(node, authid).await),
        }
    }
    if wants("storage") {
        out.extend(storage_resources(node, authid));
    }
    if wants("node") {
        match &cluster {
            Some(data) => out.extend(node_resources(data)),
            None => {
                let name = &node.cfg.node;
                out.push(json!({
                    "id": format!("node/{name}"),
                    "type": "node",
                    "node": name,
                    "status": "online",
                }));
            }
        }
    }
    Ok(Data::new(Value::Array(out)))
}

/// This node's VMs the token may see (`VM.Audit` or `VM.Allocate`); as PVE, a VM is
/// `running` while its QEMU process runs, else `stopped`. A replica (docs/replicas.md) is
/// `replica`, with its lock and `replica-*` fields ([`crate::replica::listed`]).
async fn local_vm_resources(node: &Node, authid: &str) -> Vec<Value> {
    let mut running = BTreeSet::new();
    let vmids = node.guests.list();
    for &vmid in &vmids {
        if node.hypervisor.is_running(vmid).await {
            running.insert(vmid);
        }
    }
    let replicas = crate::replica::listed(&node.cfg.data_dir, &node.cfg.run_dir, &node.guests);
    vmids
        .into_iter()
        .filter(|vmid| may_see_vm(node, authid, *vmid))
        .map(|vmid| {
            let status = if running.contains(&vmid) {
                "running"
            } else {
                "stopped"
            };
            vm_entry(vmid, &node.cfg.node, status, replicas.get(&vmid))
        })
        .collect()
}

/// One `type: qemu` entry; a replica's fields replace its `status` and add its own.
fn vm_entry(vmid: u32, node: &str, status: &str, replica: Option<&Map<String, Value>>) -> Value {
    let mut entry = json!({
        "id": format!("qemu/{vmid}"),
        "vmid": vmid,
        "type": "qemu",
        "node": node,
        "status": status,
    });
    if let (Some(fields), Some(obj)) = (replica, entry.as_object_mut()) {
        obj.extend(fields.clone());
    }
    entry
}

fn may_see_vm(node: &Node, authid: &str, vmid: u32) -> bool {
    let path = format!("/vms/{vmid}");
    node.allows(authid, &path, "VM.Audit") || node.allows(authid, &path, "VM.Allocate")
}

/// The storages the token may see (`Datastore.Audit` or `Datastore.AllocateSpace`).
fn storage_resources(node: &Node, authid: &str) -> Vec<Value> {
    let may_see = |id: &str| {
        let path = format!("/storage/{id}");
        node.allows(authid, &path, "Datastore.Audit")
            || node.allows(authid, &path, "Datastore.AllocateSpace")
    };
    node.storage
        .storage_ids()
        .into_iter()
        .filter(|id| may_see(id))
        .map(|id| {
            json!({
                "id": format!("storage/{}/{id}", node.cfg.node),
                "storage": id,
                "type": "storage",
                "node": node.cfg.node,
                "status": "available",
            })
        })
        .collect()
}

/// `GET /cluster/nextid[?vmid=N]`: the next free VMID as a string (as PVE's reply is);
/// with `vmid`, that VMID if free, else PVE's parameter error.
static NEXTID: Endpoint = Endpoint {
    params: || props([("vmid", Prop::string().optional())]),
    formats: &[("vmid", vmid_format)],
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct NextidArgs {
    #[serde(default, deserialize_with = "parsed_opt")]
    vmid: Option<u32>,
}

async fn nextid(call: Call<NextidArgs>) -> Result<Data, Error> {
    let tunnels = &call.st.tunnels;
    if let Some(cluster) = &call.st.node.cluster {
        return cluster_nextid(tunnels, cluster, call.args.vmid).await;
    }
    match call.args.vmid {
        Some(vmid) if tunnels.taken(vmid) => {
            Err(Error::param("vmid", format!("VM {vmid} already exists")))
        }
        Some(vmid) => Ok(Data::new(json!(vmid.to_string()))),
        None => tunnels
            .next_free_vmid(100)
            .map(|id| Data::new(json!(id.to_string())))
            .ok_or_else(|| Error::internal("unable to get any free VMID")),
    }
}

/// `GET /cluster/qemu/custom-cpu-models`: this node defines none.
static CPU_MODELS: Endpoint = Endpoint::PLAIN;

async fn cpu_models(_call: Call<NoArgs>) -> Result<Data, Error> {
    Ok(Data::new(json!([])))
}

/// `GET /cluster/qemu/custom-cpu-models/{cputype}`: none is defined, so a source migrating
/// a VM with a `custom-*` CPU learns that the model is missing here.
static CPU_MODEL: Endpoint = Endpoint {
    path: &[PathParam::Text("cputype")],
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct CpuModelArgs {
    cputype: String,
}

async fn cpu_model(call: Call<CpuModelArgs>) -> Result<Data, Error> {
    let name = &call.args.cputype;
    Err(Error::internal(format!(
        "CPU model '{name}' does not exist"
    )))
}

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

/// `GET /cluster/status` in a cluster: the cluster entry (with `quorate`), then every node
/// that ever joined (`online` from its lease, `local` for this one). With etcd out of
/// reach: this node alone and `quorate: 0`.
fn status_data(node: &Node, cluster: &Cluster, view: &StatusView) -> Data {
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
pub(super) fn nodes_data(view: anyhow::Result<Vec<NodeView>>) -> Result<Data, Error> {
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
struct Resources {
    vms: Vec<VmView>,
    nodes: Vec<NodeView>,
}

async fn resources_data(node: &Node, cluster: &Cluster) -> Result<Resources, String> {
    let local = node.local_state().await;
    let got = async { anyhow::Ok((cluster.vms(&local).await?, cluster.nodes().await?)) }.await;
    got.map(|(vms, nodes)| Resources { vms, nodes })
        .map_err(|e| no_quorum(format!("{e:#}")))
}

/// The `type: qemu` entries the token may see (`VM.Audit` or `VM.Allocate` on the VM); a
/// replica on any node with the fields its node lists it with.
fn vm_resources(node: &Node, authid: &str, data: &Resources) -> Vec<Value> {
    data.vms
        .iter()
        .filter(|vm| may_see_vm(node, authid, vm.vmid))
        .map(|vm| vm_entry(vm.vmid, &vm.node, &vm.status, vm.replica.as_ref()))
        .collect()
}

/// The `type: node` entries.
fn node_resources(data: &Resources) -> Vec<Value> {
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
async fn cluster_nextid(
    tunnels: &Tunnels,
    cluster: &Cluster,
    vmid: Option<u32>,
) -> Result<Data, Error> {
    let quorum = |e: anyhow::Error| Error::internal(no_quorum(format!("{e:#}")));
    let taken_here = |id: u32| tunnels.taken(id);
    match vmid {
        Some(vmid) => {
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
