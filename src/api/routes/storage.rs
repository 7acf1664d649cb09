//! The storage views PVE's clients and Datacenter Manager read: `GET /nodes/{node}/storage`
//! (PVE's `PVE::API2::Storage::Status::index`) and `GET /nodes/{node}/storage/{id}/status`
//! (`read_status`), shaped as `PVE::Storage::storage_info` shapes them: a disabled storage
//! is never activated (`enabled 0, active 0`, sizes 0); a content filter drops disabled
//! storages; a storage asked for by name that the filters leave out is `No such storage.`

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Areas;
use crate::api::AppState;
use crate::api::endpoint::{self, Access, Call, Endpoint, PathParam};
use crate::api::reply::Data;
use crate::error::Error;
use crate::schema::{Prop, props};
use crate::storage::{Space, StorageDef};

pub(super) fn routes() -> Areas {
    Areas::new()
        .route(
            "/api2/{fmt}/nodes/{node}/storage",
            endpoint::get(&LIST, list),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/storage/{storage}/status",
            endpoint::get(&STATUS, status),
        )
}

/// The privileges either of which lets a token see a storage (PVE's `check_any`).
const SEE_STORAGE: [&str; 2] = ["Datastore.Audit", "Datastore.AllocateSpace"];

/// `GET /nodes/{node}/storage`; `target` is accepted and ignored (one node). Every token
/// may list; it sees the storages it may see.
static LIST: Endpoint = Endpoint {
    params: || {
        props([
            ("enabled", Prop::boolean().optional()),
            ("content", Prop::string().optional()),
            ("storage", Prop::string().optional()),
            ("format", Prop::boolean().optional()),
            ("target", Prop::any().optional()),
        ])
    },
    path: &[PathParam::Node],
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct ListArgs {
    #[serde(default)]
    enabled: bool,
    content: Option<String>,
    storage: Option<String>,
    #[serde(default)]
    format: bool,
}

async fn list(call: Call<ListArgs>) -> Result<Data, Error> {
    let (st, args) = (&call.st, &call.args);
    let info = storage_info(st, args.content.as_deref(), args.format);
    let only = args.storage.as_deref();
    if let Some(id) = only
        && !info.contains_key(id)
    {
        return Err(Error::param("storage", "No such storage."));
    }
    let mut out = Vec::new();
    for (id, mut entry) in info {
        let path = format!("/storage/{id}");
        if !SEE_STORAGE
            .iter()
            .any(|p| st.node.allows(call.authid(), &path, p))
            || only.is_some_and(|s| s != id)
            || (args.enabled && entry["enabled"] == 0)
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
}

/// `GET /nodes/{node}/storage/{storage}/status`.
static STATUS: Endpoint = Endpoint {
    path: &[PathParam::Node, PathParam::Text("storage")],
    access: Access::Any("/storage/{storage}", &SEE_STORAGE),
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct StatusArgs {
    storage: String,
}

async fn status(call: Call<StatusArgs>) -> Result<Data, Error> {
    let mut info = storage_info(&call.st, None, false);
    info.remove(&call.args.storage)
        .map(Data::new)
        .ok_or_else(|| Error::param("storage", "No such storage."))
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
