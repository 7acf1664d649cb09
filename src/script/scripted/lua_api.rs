//! The scripted backend's Lua API: the `backend` global a script sees (`fail`, `sleep`,
//! `log`, `calls`, `state`, `volumes`, `null`, `default.<area>.<fn>`), the fake's defaults
//! wrapped as Lua functions, the reading of a script's override tables, and the conversions
//! of hypervisor requests and replies between Rust and Lua.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mlua::{Function, Lua, LuaSerdeExt, Table, Value as LuaValue};

use super::fake::{Fake, ImportData};
use super::{HYPERVISOR_FNS, STORAGE_FNS, backend_sleep, clean_error, failure};
use crate::guest::hypervisor::IncomingStarted;
use crate::storage::{ImportRequest, StorageError};

pub(super) fn parse_overrides(value: &LuaValue) -> Result<BTreeMap<String, Function>, String> {
    let mut out = BTreeMap::new();
    let table = match value {
        LuaValue::Nil => return Ok(out),
        LuaValue::Table(t) => t,
        other => {
            return Err(format!(
                "must return a table {{storage = {{...}}, hypervisor = {{...}}}}, got {}",
                other.type_name()
            ));
        }
    };
    for pair in table.pairs::<LuaValue, LuaValue>() {
        let (key, value) = pair.map_err(|e| clean_error(&e))?;
        let area = match &key {
            LuaValue::String(s) => s.to_string_lossy(),
            other => return Err(format!("unexpected key of type {}", other.type_name())),
        };
        let known: &[&str] = match area.as_str() {
            "storage" => STORAGE_FNS,
            "hypervisor" => HYPERVISOR_FNS,
            _ => {
                return Err(format!(
                    "unknown key '{area}' (expected 'storage' and/or 'hypervisor')"
                ));
            }
        };
        let fns = match value {
            LuaValue::Table(t) => t,
            LuaValue::Nil => continue,
            other => {
                return Err(format!(
                    "'{area}' must be a table, got {}",
                    other.type_name()
                ));
            }
        };
        for pair in fns.pairs::<LuaValue, LuaValue>() {
            let (name, f) = pair.map_err(|e| clean_error(&e))?;
            let name = match &name {
                LuaValue::String(s) => s.to_string_lossy(),
                other => {
                    return Err(format!(
                        "'{area}': unexpected key of type {}",
                        other.type_name()
                    ));
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(format!(
                    "unknown function '{area}.{name}' (known: {})",
                    known.join(", ")
                ));
            }
            match f {
                LuaValue::Function(f) => {
                    out.insert(format!("{area}.{name}"), f);
                }
                other => {
                    return Err(format!(
                        "'{area}.{name}' must be a function, got {}",
                        other.type_name()
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The global `backend` table.
pub(super) fn helpers(lua: &Lua, fake: &Arc<Fake>, calls: &Table) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "fail",
        lua.create_function(|_, msg: LuaValue| -> mlua::Result<()> {
            Err(failure(match msg {
                LuaValue::String(s) => s.to_string_lossy(),
                other => other.to_string().unwrap_or_else(|_| "error".into()),
            }))
        })?,
    )?;
    t.set(
        "sleep",
        lua.create_async_function(|_, ms: u64| async move {
            backend_sleep(ms).await;
            Ok(())
        })?,
    )?;
    t.set(
        "log",
        lua.create_function(|_, msg: LuaValue| {
            let text = msg.to_string().unwrap_or_else(|_| "?".into());
            tracing::info!(target: "mtunnel::backend", "{text}");
            Ok(())
        })?,
    )?;
    t.set("calls", calls.clone())?;
    t.set("state", lua.create_table()?)?;
    t.set("null", lua.null())?;
    let f = Arc::clone(fake);
    t.set(
        "volumes",
        lua.create_function(move |lua, ()| {
            let list = lua.create_sequence_from(f.state().volumes.keys().cloned())?;
            list.set_metatable(Some(lua.array_metatable()))?;
            Ok(list)
        })?,
    )?;
    let default = lua.create_table()?;
    default.set("storage", default_storage(lua, fake)?)?;
    default.set("hypervisor", default_hypervisor(lua, fake)?)?;
    t.set("default", default)?;
    Ok(t)
}

fn serr(e: StorageError) -> mlua::Error {
    failure(e.to_string())
}

fn herr(e: anyhow::Error) -> mlua::Error {
    failure(format!("{e:#}"))
}

fn default_storage(lua: &Lua, fake: &Arc<Fake>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let f = Arc::clone(fake);
    t.set(
        "alloc",
        lua.create_function(
            move |_,
                  (storage, vmid, format, name, size_kib): (
                String,
                u32,
                String,
                Option<String>,
                u64,
            )| {
                f.alloc(&storage, vmid, &format, name.as_deref(), size_kib)
                    .map_err(serr)
            },
        )?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "free",
        lua.create_function(move |_, volid: String| f.free(&volid).map_err(serr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "path",
        lua.create_function(move |_, volid: String| {
            f.resolve(&volid)
                .map(|(_, p)| p.display().to_string())
                .map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "volume_size",
        lua.create_function(move |_, volid: String| {
            f.volume(&volid).map(|v| v.size).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "volume_format",
        lua.create_function(move |_, volid: String| {
            f.volume(&volid).map(|v| v.format).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "import",
        lua.create_function(move |_, (req, _data): (Table, LuaValue)| {
            let get = |k: &str| -> mlua::Result<String> {
                req.get::<Option<String>>(k)?
                    .ok_or_else(|| failure(format!("import: req.{k} missing")))
            };
            let request = ImportRequest {
                storage: get("storage")?,
                vmid: req.get("vmid")?,
                volname: get("volname")?,
                format: get("format")?,
                stream_format: get("stream_format")?,
                allow_rename: req.get::<Option<bool>>("allow_rename")?.unwrap_or(false),
            };
            let data = ImportData {
                size: req.get("size")?,
                received: req.get::<Option<u64>>("received")?.unwrap_or(0),
            };
            f.import(&request, &data).map_err(serr)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "import_formats",
        lua.create_function(move |lua, (storage, format): (String, String)| {
            let list = f.import_formats(&storage, &format).map_err(serr)?;
            lua.create_sequence_from(list)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "check_untrusted",
        lua.create_function(move |_, volid: String| f.volume(&volid).map(drop).map_err(serr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "bwlimit",
        lua.create_function(
            move |_,
                  (operation, storages, override_kib): (
                String,
                Option<Vec<String>>,
                Option<u64>,
            )| {
                let storages: Vec<Option<String>> =
                    storages.unwrap_or_default().into_iter().map(Some).collect();
                Ok(crate::storage::bwlimit_from_defs(
                    |id| f.storages.get(id),
                    &operation,
                    &storages,
                    override_kib,
                ))
            },
        )?,
    )?;
    Ok(t)
}

fn default_hypervisor(lua: &Lua, fake: &Arc<Fake>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let f = Arc::clone(fake);
    t.set(
        "start_incoming",
        lua.create_function(move |lua, req: Table| {
            let vmid: u32 = req.get("vmid")?;
            let mut nbd = BTreeMap::new();
            if let Some(t) = req.get::<Option<Table>>("nbd")? {
                for pair in t.pairs::<String, String>() {
                    let (k, v) = pair?;
                    nbd.insert(k, v);
                }
            }
            let started = f.start_incoming(vmid, &nbd).map_err(herr)?;
            started_to_lua(lua, &started)
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "resume",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "stop",
        lua.create_function(move |_, vmid: u32| {
            f.stop(vmid);
            Ok(())
        })?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "nbd_stop",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "is_running",
        lua.create_function(move |_, vmid: u32| Ok(f.is_running(vmid)))?,
    )?;
    let f = Arc::clone(fake);
    t.set(
        "fstrim",
        lua.create_function(move |_, vmid: u32| f.require_running(vmid).map_err(herr))?,
    )?;
    t.set(
        "now",
        lua.create_function(|_, ()| Ok(crate::guest::hypervisor::system_clock()))?,
    )?;
    Ok(t)
}

pub(super) fn started_to_lua(lua: &Lua, s: &IncomingStarted) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("migrate_socket", s.migrate_socket.display().to_string())?;
    t.set(
        "nbd_socket",
        s.nbd_socket.as_ref().map(|p| p.display().to_string()),
    )?;
    let uris = lua.create_table()?;
    for (k, v) in &s.nbd_uris {
        uris.set(k.as_str(), v.as_str())?;
    }
    t.set("nbd_uris", uris)?;
    Ok(t)
}

pub(super) fn started_from_lua(v: LuaValue) -> Result<IncomingStarted, String> {
    let LuaValue::Table(t) = v else {
        return Err(format!(
            "hypervisor.start_incoming must return a table {{migrate_socket, nbd_socket, nbd_uris}}, got {}",
            v.type_name()
        ));
    };
    let bad = |e: mlua::Error| format!("hypervisor.start_incoming returned {}", clean_error(&e));
    let migrate_socket: String = t
        .get::<Option<String>>("migrate_socket")
        .map_err(bad)?
        .ok_or("hypervisor.start_incoming must return a 'migrate_socket'")?;
    let nbd_socket: Option<String> = t.get("nbd_socket").map_err(bad)?;
    let mut nbd_uris = BTreeMap::new();
    if let Some(uris) = t.get::<Option<Table>>("nbd_uris").map_err(bad)? {
        for pair in uris.pairs::<String, String>() {
            let (k, v) = pair.map_err(bad)?;
            nbd_uris.insert(k, v);
        }
    }
    Ok(IncomingStarted {
        migrate_socket: PathBuf::from(migrate_socket),
        nbd_socket: nbd_socket.map(PathBuf::from),
        nbd_uris,
    })
}

pub(super) fn expect_string(key: &str, v: LuaValue) -> Result<String, String> {
    match v {
        LuaValue::String(s) => Ok(s.to_string_lossy()),
        other => Err(format!(
            "{key} must return a string, got {}",
            other.type_name()
        )),
    }
}

pub(super) fn expect_u64(key: &str, v: LuaValue) -> Result<u64, String> {
    match v {
        LuaValue::Integer(n) if n >= 0 => Ok(n as u64),
        LuaValue::Number(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as u64),
        other => Err(format!(
            "{key} must return a non-negative integer, got {}",
            other
                .to_string()
                .unwrap_or_else(|_| other.type_name().to_string())
        )),
    }
}
