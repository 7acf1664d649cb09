//! The `/nodes` area, apart from a node's tasks, storage and VMs (their own files): the
//! node list, a node's network (its bridges, for Datacenter Manager and `qm
//! remote-migrate`), its certificate, and `mtunnel-status` (ours, for the status page).

use serde::Deserialize;
use serde_json::{Value, json};

use super::Areas;
use crate::api::endpoint::{self, Call, Endpoint, NoArgs, PathParam, is_owner};
use crate::api::reply::Data;
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::tunnel::status::TunnelStatus;

pub(super) fn routes() -> Areas {
    Areas::new()
        .route("/api2/{fmt}/nodes", endpoint::get(&NODES, nodes))
        .route(
            "/api2/{fmt}/nodes/{node}/network",
            endpoint::get(&NETWORK, network),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/certificates/info",
            endpoint::get(&CERTIFICATES, certificates),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/mtunnel-status",
            endpoint::get(&MTUNNEL_STATUS, mtunnel_status),
        )
}

/// An endpoint under `/nodes/{node}` without parameters, open to any token.
const NODE: Endpoint = Endpoint {
    path: &[PathParam::Node],
    ..Endpoint::PLAIN
};

/// `GET /nodes`: this node, or every node of the cluster.
static NODES: Endpoint = Endpoint::PLAIN;

async fn nodes(call: Call<NoArgs>) -> Result<Data, Error> {
    let st = &call.st;
    if let Some(cluster) = &st.node.cluster {
        return super::cluster::nodes_data(cluster.nodes().await);
    }
    Ok(Data::new(json!([{
        "node": st.node.cfg.node,
        "status": "online",
        "type": "node",
        "id": format!("node/{}", st.node.cfg.node),
        "ssl_fingerprint": st.tls.fingerprint,
    }])))
}

/// PVE's interface types (`PVE::API2::Network`), then its filters.
const NETWORK_TYPES: [&str; 14] = [
    "bridge",
    "bond",
    "eth",
    "alias",
    "vlan",
    "fabric",
    "OVSBridge",
    "OVSBond",
    "OVSPort",
    "OVSIntPort",
    "vnet",
    "any_bridge",
    "any_local_bridge",
    "include_sdn",
];

/// `GET /nodes/{node}/network[?type=..]`.
static NETWORK: Endpoint = Endpoint {
    params: || props([("type", Prop::string().one_of(&NETWORK_TYPES).optional())]),
    ..NODE
};

#[derive(Deserialize)]
struct NetworkArgs {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The node's bridges (Linux bridges, all local; no SDN), for the filters that let
/// bridges through; none for the other types.
async fn network(call: Call<NetworkArgs>) -> Result<Data, Error> {
    if let Some(kind) = &call.args.kind
        && !matches!(
            kind.as_str(),
            "bridge" | "any_bridge" | "any_local_bridge" | "include_sdn"
        )
    {
        // This node has no other interface types to offer migrations.
        return Ok(Data::new(json!([])));
    }
    let list: Vec<Value> = (call.st.node.cfg.bridges().into_iter().enumerate())
        .map(|(i, b)| {
            json!({
                "iface": b.name,
                "type": "bridge",
                "active": u8::from(b.active),
                "autostart": 1,
                "families": ["inet"],
                "method": "manual",
                "method6": "manual",
                "priority": i + 1,
            })
        })
        .collect();
    Ok(Data::new(Value::Array(list)))
}

/// `GET /nodes/{node}/certificates/info`.
static CERTIFICATES: Endpoint = NODE;

/// The served certificate, read as PVE reads its PEM.
async fn certificates(call: Call<NoArgs>) -> Result<Data, Error> {
    let tls = &call.st.tls;
    let info = &tls.info;
    Ok(Data::new(json!([{
        "filename": "pveproxy-ssl.pem",
        "fingerprint": tls.fingerprint,
        "pem": tls.cert_pem,
        "subject": info.subject,
        "issuer": info.issuer,
        "notbefore": info.notbefore,
        "notafter": info.notafter,
        "public-key-type": info.public_key_type,
        "public-key-bits": info.public_key_bits,
        "san": info.san,
    }])))
}

/// `GET /nodes/{node}/mtunnel-status`: this node's name and its open tunnels, each with
/// its last command and per-stream byte counts. As the task list: `Sys.Audit` on
/// `/nodes/{node}` sees every tunnel, others only the tunnels they opened.
static MTUNNEL_STATUS: Endpoint = NODE;

async fn mtunnel_status(call: Call<NoArgs>) -> Result<Data, Error> {
    let (st, authid) = (&call.st, call.authid());
    let node = &st.node.cfg.node;
    let audit = st
        .node
        .allows(authid, &format!("/nodes/{node}"), "Sys.Audit");
    let tunnels: Vec<Value> = (st.tunnels.registry.list().iter())
        .filter(|t| audit || is_owner(authid, &t.authid))
        .map(|t| TunnelStatus::of(t).to_json())
        .collect();
    Ok(Data::new(json!({"node": node, "tunnels": tunnels})))
}
