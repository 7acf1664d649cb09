//! The endpoint table: each endpoint checks its parameters and privileges and calls the
//! layer that does the work.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{Method, Uri};
use axum::response::Response;
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::AppState;
use super::reply::{Data, Format, render};
use super::request::{ApiReq, Props};
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::task::Upid;

type St = State<Arc<AppState>>;
type PathMap = Path<HashMap<String, String>>;

pub fn router(state: Arc<AppState>) -> Router {
    use super::status_page as page;
    Router::new()
        .route("/", get(page::index))
        .route(page::APP_JS_PATH, get(page::app_js))
        .route(page::STYLE_CSS_PATH, get(page::style_css))
        .route(
            "/api2/{fmt}/nodes/{node}/mtunnel-status",
            get(page::mtunnel_status),
        )
        .route("/api2/{fmt}/version", get(version))
        .route("/api2/{fmt}/cluster/status", get(cluster_status))
        .route("/api2/{fmt}/cluster/resources", get(cluster_resources))
        .route("/api2/{fmt}/nodes", get(nodes))
        .route(
            "/api2/{fmt}/cluster/nextid",
            get(super::pdm::cluster_nextid),
        )
        .route(
            "/api2/{fmt}/cluster/qemu/custom-cpu-models",
            get(super::pdm::custom_cpu_models),
        )
        .route(
            "/api2/{fmt}/cluster/qemu/custom-cpu-models/{cputype}",
            get(super::pdm::custom_cpu_model),
        )
        .route(
            "/api2/{fmt}/access/permissions",
            get(super::pdm::permissions),
        )
        .route("/api2/{fmt}/nodes/{node}/network", get(super::pdm::network))
        .route(
            "/api2/{fmt}/nodes/{node}/certificates/info",
            get(certificates_info),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/storage",
            get(super::storage::storage_list),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/storage/{storage}/status",
            get(super::storage::storage_status),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/tasks",
            get(super::task_list::task_list),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/tasks/{upid}",
            get(task_index).delete(task_stop),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/tasks/{upid}/status",
            get(task_status),
        )
        .route("/api2/{fmt}/nodes/{node}/tasks/{upid}/log", get(task_log))
        .route(
            "/api2/{fmt}/nodes/{node}/qemu/{vmid}/mtunnel",
            axum::routing::post(mtunnel),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/qemu/{vmid}/mtunnelwebsocket",
            get(super::websocket::mtunnelwebsocket),
        )
        .fallback(not_implemented)
        // A known path with a method it lacks is PVE's 501 as well, not axum's bare 405.
        .method_not_allowed_fallback(not_implemented)
        .layer(axum::middleware::map_response_with_state(
            Arc::clone(&state),
            count_denied,
        ))
        // In a cluster, `/nodes/{other}/...` is answered by `other` (pveproxy's proxying);
        // outermost, so that what the other node answers is counted there, not here.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            super::proxy::route_to_owner,
        ))
        .with_state(state)
}

/// Counts every 403 in the metrics, whichever check refused (privilege, tunnel owner):
/// one place instead of one call per `require`.
async fn count_denied(State(st): St, response: Response) -> Response {
    if response.status() == axum::http::StatusCode::FORBIDDEN {
        (st.node.metrics).auth_failure(crate::metrics::AuthFailure::PermissionDenied);
    }
    response
}

async fn not_implemented(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let rest = path
        .strip_prefix("/api2/json")
        .or_else(|| path.strip_prefix("/api2/extjs"));
    let msg = match rest {
        Some(rest) => format!("Method '{method} {rest}' not implemented"),
        None => format!("no such API format or path '{path}'"),
    };
    render(Format::from_path(path), Err(Error::NotImplemented(msg)))
}

/// Checks the `{fmt}` segment, runs the endpoint, renders in the request's format.
pub(super) fn finish(
    p: &HashMap<String, String>,
    req: &ApiReq,
    result: Result<Data, Error>,
) -> Response {
    match p.get("fmt").map(String::as_str) {
        Some("json") | Some("extjs") => render(req.format, result),
        other => render(
            Format::Json,
            Err(Error::NotImplemented(format!(
                "unknown API format '{}'",
                other.unwrap_or("")
            ))),
        ),
    }
}

pub(super) fn path_param<'a>(p: &'a HashMap<String, String>, key: &str) -> &'a str {
    p.get(key).map(String::as_str).unwrap_or("")
}

/// A VMID path parameter: 100..=999999999 as PVE's `pve-vmid`.
pub(super) fn parse_vmid(raw: &str) -> Result<u32, Error> {
    crate::ident::parse_vmid(raw).ok_or_else(|| {
        Error::param(
            "vmid",
            "invalid format - value does not look like a valid VM ID",
        )
    })
}

/// Routes without parameters besides the path (version, cluster status, nodes, task
/// index, status and stop).
pub(super) static NO_PARAMS: LazyLock<Props> = LazyLock::new(Props::new);

async fn version(State(_st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = req.params.only_declared(&NO_PARAMS).map(|_| {
        Data::new(json!({
            "version": "9.0.0",
            "release": "9.0",
            "repoid": "mtunnel",
            "mtunnel": env!("CARGO_PKG_VERSION"),
        }))
    });
    finish(&p, &req, r)
}

/// `GET /cluster/status`: needs `Sys.Audit` on `/`, as in PVE.
async fn cluster_status(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let allowed = req
        .params
        .only_declared(&NO_PARAMS)
        .and_then(|_| st.node.require(&req.authid, "/", "Sys.Audit"));
    if let Err(e) = allowed {
        return finish(&p, &req, Err(e));
    }
    if let Some(cluster) = &st.node.cluster {
        let view = cluster.status().await;
        let r = Ok(super::cluster::status(&st.node, cluster, &view));
        return finish(&p, &req, r);
    }
    // A standalone PVE node reports nodeid 0.
    let data = Data::new(json!([{
            "type": "node",
            "id": format!("node/{}", st.node.cfg.node),
            "name": st.node.cfg.node,
            "nodeid": 0,
            "ip": st.node.cfg.listen.ip().to_string(),
            "local": 1,
            "online": 1,
            "level": "",
    }]));
    finish(&p, &req, Ok(data))
}

async fn nodes(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    if let Some(cluster) = &st.node.cluster {
        let view = cluster.nodes().await;
        let r = req
            .params
            .only_declared(&NO_PARAMS)
            .and_then(|_| super::cluster::nodes(view));
        return finish(&p, &req, r);
    }
    let r = req.params.only_declared(&NO_PARAMS).map(|_| {
        Data::new(json!([{
            "node": st.node.cfg.node,
            "status": "online",
            "type": "node",
            "id": format!("node/{}", st.node.cfg.node),
            "ssl_fingerprint": st.tls.fingerprint,
        }]))
    });
    finish(&p, &req, r)
}

async fn cluster_resources(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    // As PVE: a VM is `running` while its QEMU process runs, else `stopped`. Asked before
    // the listing (the closure below is synchronous); only VMs the token may see are shown.
    let mut running = std::collections::BTreeSet::new();
    for vmid in st.node.guests.list() {
        if st.node.hypervisor.is_running(vmid).await {
            running.insert(vmid);
        }
    }
    let cluster = match &st.node.cluster {
        Some(c) => Some(super::cluster::resources_data(&st.node, c).await),
        None => None,
    };
    let r = (|| {
        req.params.only_declared(&RESOURCES_PARAMS)?;
        let kind = text(&req.params.checked(&RESOURCES_PARAMS)?, "type");
        if let Some(k) = &kind
            && !["vm", "storage", "node", "sdn", "pool"].contains(&k.as_str())
        {
            return Err(Error::param(
                "type",
                format!(
                    "value '{k}' does not have a value in the enumeration 'vm, storage, node, sdn, pool'"
                ),
            ));
        }
        let node = &st.node;
        let mut out = Vec::new();
        if let Some(data) = &cluster {
            let data = data.as_ref().map_err(Error::internal)?;
            if kind.as_deref().is_none_or(|k| k == "vm") {
                out.extend(super::cluster::vm_resources(node, &req.authid, data));
            }
        } else if kind.as_deref().is_none_or(|k| k == "vm") {
            for vmid in node.guests.list() {
                let path = format!("/vms/{vmid}");
                if !(node.allows(&req.authid, &path, "VM.Audit")
                    || node.allows(&req.authid, &path, "VM.Allocate"))
                {
                    continue;
                }
                out.push(json!({
                    "id": format!("qemu/{vmid}"),
                    "vmid": vmid,
                    "type": "qemu",
                    "node": node.cfg.node,
                    "status": if running.contains(&vmid) { "running" } else { "stopped" },
                }));
            }
        }
        if kind.as_deref().is_none_or(|k| k == "storage") {
            for id in node.storage.storage_ids() {
                if node.allows(&req.authid, &format!("/storage/{id}"), "Datastore.Audit")
                    || node.allows(
                        &req.authid,
                        &format!("/storage/{id}"),
                        "Datastore.AllocateSpace",
                    )
                {
                    out.push(json!({
                        "id": format!("storage/{}/{id}", node.cfg.node),
                        "storage": id,
                        "type": "storage",
                        "node": node.cfg.node,
                        "status": "available",
                    }));
                }
            }
        }
        if let Some(data) = &cluster {
            let data = data.as_ref().map_err(Error::internal)?;
            if kind.as_deref().is_none_or(|k| k == "node") {
                out.extend(super::cluster::node_resources(data));
            }
        } else if kind.as_deref().is_none_or(|k| k == "node") {
            out.push(json!({"id": format!("node/{}", node.cfg.node), "type": "node", "node": node.cfg.node, "status": "online"}));
        }
        Ok(Data::new(Value::Array(out)))
    })();
    finish(&p, &req, r)
}

static RESOURCES_PARAMS: LazyLock<Props> =
    LazyLock::new(|| props([("type", Prop::string().optional())]));

async fn certificates_info(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NO_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        // Read from the served certificate when it was loaded, as PVE reads its PEM.
        let info = &st.tls.info;
        Ok(Data::new(json!([{
            "filename": "pveproxy-ssl.pem",
            "fingerprint": st.tls.fingerprint,
            "pem": st.tls.cert_pem,
            "subject": info.subject,
            "issuer": info.issuer,
            "notbefore": info.notbefore,
            "notafter": info.notafter,
            "public-key-type": info.public_key_type,
            "public-key-bits": info.public_key_bits,
            "san": info.san,
        }])))
    })();
    finish(&p, &req, r)
}

/// `POST /nodes/{node}/qemu/{vmid}/mtunnel`.
static MTUNNEL_PARAMS: LazyLock<Props> = LazyLock::new(|| {
    props([
        (
            "storages",
            Prop::string().format("pve-storage-id-list").optional(),
        ),
        (
            "bridges",
            Prop::string().format("pve-bridge-id-list").optional(),
        ),
        // mtunnel's extension (docs/replicas.md): a replica run, which may reopen a replica.
        ("replica", Prop::boolean().optional()),
    ])
});

async fn mtunnel(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = async {
        req.params.only_declared(&MTUNNEL_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let vmid = parse_vmid(path_param(&p, "vmid"))?;
        let params = req.params.checked(&MTUNNEL_PARAMS)?;
        let storages = id_list(&params, "storages");
        let bridges = id_list(&params, "bridges");
        let opened = if flag(&params, "replica") {
            crate::tunnel::open_replica(&st.tunnels, &req.authid, vmid, &storages).await?
        } else {
            crate::tunnel::open(&st.tunnels, &req.authid, vmid, &storages, &bridges).await?
        };
        Ok(Data::new(opened.to_json()))
    }
    .await;
    finish(&p, &req, r)
}

/// The ids of a checked `pve-storage-id-list` / `pve-bridge-id-list` parameter, each once.
fn id_list(params: &Map<String, Value>, key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let list = params.get(key).and_then(Value::as_str).unwrap_or("");
    for id in crate::ident::split_id_list(list) {
        if !out.iter().any(|o| o == id) {
            out.push(id.to_string());
        }
    }
    out
}

fn parse_upid(raw: &str) -> Result<Upid, Error> {
    raw.parse::<Upid>()
        .map_err(|_| Error::param("upid", format!("unable to parse worker upid '{raw}'")))
}

/// A token owns its own tasks; a user owns its own and its tokens' tasks.
fn is_task_owner(authid: &str, upid: &Upid) -> bool {
    super::status_page::is_owner(authid, &upid.user)
}

/// PVE's task visibility: the owner (a user also sees its tokens' tasks), or `Sys.Audit`
/// (`Sys.Modify` to stop) on `/nodes/{node}`.
fn check_task_access(
    st: &AppState,
    req: &ApiReq,
    upid: &Upid,
    privilege: &str,
) -> Result<(), Error> {
    if is_task_owner(&req.authid, upid) {
        return Ok(());
    }
    st.node.require(
        &req.authid,
        &format!("/nodes/{}", st.node.cfg.node),
        privilege,
    )
}

/// PVE's answer for a well-formed UPID without a task log.
fn task_not_found(_upid: &str) -> Error {
    Error::param("upid", "no such task")
}

async fn task_index(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NO_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let upid = parse_upid(path_param(&p, "upid"))?;
        check_task_access(&st, &req, &upid, "Sys.Audit")?;
        st.node
            .tasks
            .status(&upid)
            .ok_or_else(|| task_not_found(path_param(&p, "upid")))?;
        Ok(Data::new(json!([{"name": "log"}, {"name": "status"}])))
    })();
    finish(&p, &req, r)
}

async fn task_status(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NO_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let upid = parse_upid(path_param(&p, "upid"))?;
        check_task_access(&st, &req, &upid, "Sys.Audit")?;
        let status = st
            .node
            .tasks
            .status(&upid)
            .ok_or_else(|| task_not_found(path_param(&p, "upid")))?;
        Ok(Data::new(status.to_json()))
    })();
    finish(&p, &req, r)
}

/// `GET /nodes/{node}/tasks/{upid}/log`.
static TASK_LOG_PARAMS: LazyLock<Props> = LazyLock::new(|| {
    props([
        ("start", Prop::integer().minimum(0).optional()),
        ("limit", Prop::integer().minimum(0).optional()),
        ("download", Prop::boolean().optional()),
    ])
});

async fn task_log(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&TASK_LOG_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let upid = parse_upid(path_param(&p, "upid"))?;
        check_task_access(&st, &req, &upid, "Sys.Audit")?;
        let params = req.params.checked(&TASK_LOG_PARAMS)?;
        let start = count(&params, "start").unwrap_or(0);
        let limit = count(&params, "limit").unwrap_or(50);
        let download = flag(&params, "download");
        let limit = if download { usize::MAX } else { limit };
        let (lines, total) = st
            .node
            .tasks
            .read_log(&upid, start, limit)
            .ok_or_else(|| task_not_found(path_param(&p, "upid")))?;
        let data: Vec<Value> = lines
            .into_iter()
            .map(|(n, t)| json!({"n": n + 1, "t": t}))
            .collect();
        Ok(Data::new(Value::Array(data)).with("total", json!(total)))
    })();
    finish(&p, &req, r)
}

/// A checked `integer` parameter with `minimum` 0.
fn count(params: &Map<String, Value>, key: &str) -> Option<usize> {
    params.get(key).and_then(Value::as_u64).map(|n| n as usize)
}

/// A checked `boolean` parameter, false when absent.
pub(super) fn flag(params: &Map<String, Value>, key: &str) -> bool {
    params.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// A checked `string` parameter.
pub(super) fn text(params: &Map<String, Value>, key: &str) -> Option<String> {
    params.get(key).and_then(Value::as_str).map(str::to_string)
}

async fn task_stop(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NO_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let upid = parse_upid(path_param(&p, "upid"))?;
        check_task_access(&st, &req, &upid, "Sys.Modify")?;
        st.node
            .tasks
            .status(&upid)
            .ok_or_else(|| task_not_found(path_param(&p, "upid")))?;
        st.node.tasks.request_stop(&upid);
        Ok(Data::new(Value::Null))
    })();
    finish(&p, &req, r)
}
