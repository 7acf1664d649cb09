//! The storage views PVE's clients and Datacenter Manager read: `GET /nodes/{node}/storage`
//! (PVE's `PVE::API2::Storage::Status::index`) and `GET /nodes/{node}/storage/{id}/status`
//! (`read_status`), shaped as `PVE::Storage::storage_info` shapes them: a disabled storage
//! is never activated (`enabled 0, active 0`, sizes 0); a content filter drops disabled
//! storages; a storage asked for by name that the filters leave out is `No such storage.`

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::AppState;
use super::reply::Data;
use super::request::{ApiReq, Props};
use super::routes::{NO_PARAMS, finish, flag, path_param, text};
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::storage::{Space, StorageDef};

type St = State<Arc<AppState>>;
type PathMap = Path<HashMap<String, String>>;

/// The privileges either of which lets a token see a storage (PVE's `check_any`).
const SEE_STORAGE: [&str; 2] = ["Datastore.Audit", "Datastore.AllocateSpace"];

/// `GET /nodes/{node}/storage`; `target` is accepted and ignored (one node).
static STORAGE_LIST_PARAMS: LazyLock<Props> = LazyLock::new(|| {
    props([
        ("enabled", Prop::boolean().optional()),
        ("content", Prop::string().optional()),
        ("storage", Prop::string().optional()),
        ("format", Prop::boolean().optional()),
        ("target", Prop::any().optional()),
    ])
});

pub(super) async fn storage_list(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&STORAGE_LIST_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let params = req.params.checked(&STORAGE_LIST_PARAMS)?;
        let content = text(&params, "content");
        let info = storage_info(&st, content.as_deref(), flag(&params, "format"));
        let only = text(&params, "storage");
        if let Some(id) = &only
            && !info.contains_key(id)
        {
            return Err(Error::param("storage", "No such storage."));
        }
        let enabled_only = flag(&params, "enabled");
        let mut out = Vec::new();
        for (id, mut entry) in info {
            let path = format!("/storage/{id}");
            if !SEE_STORAGE
                .iter()
                .any(|p| st.node.allows(&req.authid, &path, p))
                || only.as_deref().is_some_and(|s| s != id)
                || (enabled_only && entry["enabled"] == 0)
            {
                continue;
            }
            let (total, used) = (entry["total"].as_u64(), entry["used"].as_u64());
            if let (Some(total @ 1..), Some(used)) = (total, used) {
                entry["used_fraction"] = json!(used as f64 / total as f64);
            }
            entry["storage"] = json!(id);
            out.push(entry);
        }
        Ok(Data::new(Value::Array(out)))
    })();
    finish(&p, &req, r)
}

/// `GET /nodes/{node}/storage/{storage}/status`.
pub(super) async fn storage_status(State(st): St, Path(p): PathMap, req: ApiReq) -> Response {
    let r = (|| {
        req.params.only_declared(&NO_PARAMS)?;
        st.node.check_node(path_param(&p, "node"))?;
        let id = path_param(&p, "storage");
        let path = format!("/storage/{id}");
        if !SEE_STORAGE
            .iter()
            .any(|p| st.node.allows(&req.authid, &path, p))
        {
            return Err(Error::permission(&path, &SEE_STORAGE.join("|")));
        }
        let mut info = storage_info(&st, None, false);
        info.remove(id)
            .map(Data::new)
            .ok_or_else(|| Error::param("storage", "No such storage."))
    })();
    finish(&p, &req, r)
}

/// Every storage of the node holding one of `content`'s types (all, without it), as
/// `PVE::Storage::storage_info` reports it; with `formats`, the image formats of each
/// enabled one.
fn storage_info(st: &AppState, content: Option<&str>, formats: bool) -> Map<String, Value> {
    let wanted = content.map(crate::storage::split_id_list);
    let mut out = Map::new();
    let storage = &st.node.storage;
    for id in storage.storage_ids() {
        let Some(def) = storage.def(&id) else {
            continue;
        };
        if let Some(wanted) = &wanted
            && (def.disable || !wanted.iter().any(|c| def.content.iter().any(|d| d == c)))
        {
            continue;
        }
        let space = (!def.disable).then(|| storage.space(&id)).flatten();
        out.insert(id.clone(), status_of(def, space, formats));
    }
    out
}

fn status_of(def: &StorageDef, space: Option<Space>, formats: bool) -> Value {
    let mut entry = json!({
        "type": def.kind.as_str(),
        "content": def.content.join(","),
        "enabled": u8::from(!def.disable),
        "active": 0,
        "shared": 0,
        "total": 0,
        "avail": 0,
        "used": 0,
    });
    // A disabled storage is never activated, so its sizes are not known.
    if def.disable {
        return entry;
    }
    if formats {
        let supported = def.kind.formats();
        let flags: Map<String, Value> = supported
            .iter()
            .map(|f| (f.to_string(), json!(1)))
            .collect();
        entry["formats"] = json!({"default": "raw", "supported": supported});
        entry["format"] = json!([flags, "raw"]);
    }
    if let Some(Space { total, avail }) = space {
        entry["active"] = json!(1);
        entry["total"] = json!(total);
        entry["avail"] = json!(avail);
        entry["used"] = json!(total.saturating_sub(avail));
    }
    entry
}
