//! The calls Proxmox Datacenter Manager and `qm remote-migrate` make before a migration
//! (which node, which storages and bridges, a free VMID, the token's permissions, custom
//! CPU models), answered as PVE does with this node's data. PDM talks `/api2/extjs/` and
//! reads `success`; it asks for node `localhost` unless a target endpoint is chosen.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::AppState;
use super::reply::Data;
use super::request::ApiReq;
use super::request::Props;
use super::routes::{NO_PARAMS, finish, parse_vmid, path_param, text};
use crate::error::Error;
use crate::schema::{Prop, props};

type St = State<Arc<AppState>>;
type PathMap = Path<HashMap<String, String>>;

/// `GET /cluster/nextid[?vmid=N]`: the next free VMID as a string (as PVE's reply is);
/// with `vmid`, that VMID if free, else PVE's parameter error.
static NEXTID_PARAMS: LazyLock<Props> =
    LazyLock::new(|| props([("vmid", Prop::string().optional())]));

pub(super) async fn cluster_nextid(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    if let Some(cluster) = &st.node.cluster {
        let r = match req
            .params
            .only_declared(&NEXTID_PARAMS)
            .and_then(|_| req.params.checked(&NEXTID_PARAMS))
        {
            Ok(checked) => {
                super::cluster::nextid(&st.tunnels, cluster, text(&checked, "vmid")).await
            }
            Err(e) => Err(e),
        };
        return finish(&p, &req, r);
    }
    let r = (|| {
        req.params.only_declared(&NEXTID_PARAMS)?;
        match text(&req.params.checked(&NEXTID_PARAMS)?, "vmid") {
            Some(raw) => {
                let vmid = parse_vmid(&raw)?;
                if st.tunnels.taken(vmid) {
                    return Err(Error::param("vmid", format!("VM {vmid} already exists")));
                }
                Ok(Data::new(json!(vmid.to_string())))
            }
            None => st
                .tunnels
                .next_free_vmid(100)
                .map(|id| Data::new(json!(id.to_string())))
                .ok_or_else(|| Error::internal("unable to get any free VMID")),
        }
    })();
    finish(&p, &req, r)
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

static NETWORK_PARAMS: LazyLock<Props> =
    LazyLock::new(|| props([("type", Prop::string().one_of(&NETWORK_TYPES).optional())]));

/// `GET /nodes/{node}/network[?type=..]`: the node's bridges (Linux bridges, all local;
/// no SDN), for the filters that let bridges through; none for the other types.
pub(super) async fn network(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NETWORK_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        if let Some(kind) = text(&req.params.checked(&NETWORK_PARAMS)?, "type")
            && !matches!(
                kind.as_str(),
                "bridge" | "any_bridge" | "any_local_bridge" | "include_sdn"
            )
        {
            // This node has no other interface types to offer migrations.
            return Ok(Data::new(json!([])));
        }
        let list: Vec<Value> = st
            .node
            .cfg
            .bridges()
            .into_iter()
            .enumerate()
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
    })();
    finish(&p, &req, r)
}

/// `GET /access/permissions[?path=..][&userid=..]` for the calling token: `{path: {priv:
/// propagate}}` for `path`, or for every path its ACL names.
static PERMISSIONS_PARAMS: LazyLock<Props> = LazyLock::new(|| {
    props([
        ("path", Prop::string().optional()),
        ("userid", Prop::string().optional()),
    ])
});

/// The paths PVE always reports (when the user has anything there).
const TOP_LEVEL_PATHS: [&str; 8] = [
    "/",
    "/access",
    "/access/groups",
    "/nodes",
    "/pool",
    "/sdn",
    "/storage",
    "/vms",
];

pub(super) async fn permissions(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&PERMISSIONS_PARAMS)?;
        let params = req.params.checked(&PERMISSIONS_PARAMS)?;
        if let Some(user) = text(&params, "userid")
            && user != req.authid
        {
            st.node.require(&req.authid, "/access", "Sys.Audit")?;
            return Err(Error::param(
                "userid",
                format!("no such user or token '{user}' on this node"),
            ));
        }
        let acl = st.node.tokens.acl(&req.authid);
        let asked = text(&params, "path");
        let paths: Vec<String> = match &asked {
            Some(path) => vec![path.clone()],
            // As PVE's `get_effective_permissions`: the top-level paths and every path the
            // ACL names, each with what the token has there (inherited included).
            None => TOP_LEVEL_PATHS
                .iter()
                .map(|p| p.to_string())
                .chain(acl.paths())
                .collect(),
        };
        let mut out = Map::new();
        for path in paths {
            let privs: Map<String, Value> = acl
                .permissions_on(&path)
                .into_iter()
                .map(|(k, propagate)| (k, json!(u8::from(propagate))))
                .collect();
            // Without `path`, paths where the token has nothing are left out.
            if asked.is_some() || !privs.is_empty() {
                out.insert(path, Value::Object(privs));
            }
        }
        Ok(Data::new(Value::Object(out)))
    })();
    finish(&p, &req, r)
}

/// `GET /cluster/qemu/custom-cpu-models`: this node defines none.
pub(super) async fn custom_cpu_models(State(_st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = req
        .params
        .only_declared(&NO_PARAMS)
        .map(|_| Data::new(json!([])));
    finish(&p, &req, r)
}

/// `GET /cluster/qemu/custom-cpu-models/{name}`: none is defined, so a source migrating a
/// VM with a `custom-*` CPU learns that the model is missing here.
pub(super) async fn custom_cpu_model(State(_st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = req.params.only_declared(&NO_PARAMS).and_then(|_| {
        Err(Error::internal(format!(
            "CPU model '{}' does not exist",
            path_param(&p, "cputype")
        )))
    });
    finish(&p, &req, r)
}
