//! `pve.config`: the VM config as Lua sees it ([`config_to_json`] and back), reading and
//! (under the config lock) writing it, and the property-string helpers of
//! [`crate::guest::config`]. Reference: `docs/handlers/config.md`.

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::{Map, Value, json};

use super::{ctx, fail, from_lua, to_lua};
use crate::guest::config::{self, VmConfig};

/// A VM config as Lua sees it.
pub fn config_to_json(c: &VmConfig) -> Value {
    let snapshots: Map<String, Value> = c
        .snapshots
        .iter()
        .map(|(name, s)| {
            (
                name.clone(),
                json!({"description": s.description, "options": s.options}),
            )
        })
        .collect();
    json!({
        "description": c.description,
        "options": c.options,
        "pending": c.pending,
        "special": c.special,
        "snapshots": snapshots,
        "digest": c.digest,
    })
}

pub(super) fn string_map(
    v: Option<&Value>,
    what: &str,
) -> mlua::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => (if *b { "1" } else { "0" }).to_string(),
                    Value::Null => continue,
                    _ => return Err(fail(format!("{what}.{k}: must be a string"))),
                };
                out.insert(k.clone(), s);
            }
        }
        // An empty Lua table serializes as an empty array.
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => return Err(fail(format!("{what} must be a table of strings"))),
    }
    Ok(out)
}

/// The inverse of [`config_to_json`] (snapshots are not written back by handlers).
pub fn config_from_json(v: &Value) -> mlua::Result<VmConfig> {
    let mut c = VmConfig {
        options: string_map(v.get("options"), "options")?,
        pending: string_map(v.get("pending"), "pending")?,
        ..VmConfig::default()
    };
    c.description = v
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(Value::Object(special)) = v.get("special") {
        for (name, opts) in special {
            c.special
                .insert(name.clone(), string_map(Some(opts), "special")?);
        }
    }
    c.validate()
        .map_err(|e| fail(format!("invalid config: {e}")))?;
    Ok(c)
}

fn props_to_lua(lua: &Lua, props: Vec<(String, String)>) -> mlua::Result<LuaValue> {
    let map: Map<String, Value> = props
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    to_lua(lua, &Value::Object(map))
}

pub(super) fn config_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "load",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            let text = c
                .host
                .guests
                .read_text(c.vmid)
                .map_err(|e| fail(e.to_string()))?;
            let conf = VmConfig::parse(&text).map_err(|e| fail(e.to_string()))?;
            to_lua(lua, &config_to_json(&conf))
        })?,
    )?;
    t.set(
        "parse",
        lua.create_function(|lua, text: String| {
            let conf = VmConfig::parse_strict(&text).map_err(|e| fail(e.to_string()))?;
            to_lua(lua, &config_to_json(&conf))
        })?,
    )?;
    t.set(
        "write",
        lua.create_async_function(|lua, conf: LuaValue| async move {
            let c = ctx(&lua)?;
            let conf = config_from_json(&from_lua(&lua, conf)?)?;
            let no_lock =
                || fail("pve.config.write needs the config lock (handler has lock = false)");
            if c.guard.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                return Err(no_lock());
            }
            if !conf.options.contains_key("lock") {
                // Written without its lock, the config is this node's VM for good.
                c.prove_reservation("unlocked").await?;
            }
            let guard = c.guard.lock().unwrap_or_else(|e| e.into_inner());
            let Some(guard) = guard.as_ref() else {
                return Err(no_lock());
            };
            c.host
                .guests
                .write_text_locked(guard, &conf.write())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "format",
        lua.create_function(|lua, conf: LuaValue| {
            let conf = config_from_json(&from_lua(lua, conf)?)?;
            Ok(conf.write())
        })?,
    )?;
    t.set(
        "parse_drive",
        lua.create_function(|lua, value: String| {
            let props = config::parse_drive(&value).map_err(|e| fail(e.to_string()))?;
            props_to_lua(lua, props)
        })?,
    )?;
    t.set(
        "parse_property_string",
        lua.create_function(|lua, (value, default_key): (String, Option<String>)| {
            let props = config::parse_property_string(&value, default_key.as_deref())
                .map_err(|e| fail(e.to_string()))?;
            props_to_lua(lua, props)
        })?,
    )?;
    t.set(
        "print_drive",
        lua.create_function(|lua, props: LuaValue| {
            let v = from_lua(lua, props)?;
            let map = string_map(Some(&v), "drive")?;
            config::print_property_string(&map.into_iter().collect::<Vec<_>>(), Some("file"))
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "parse_size",
        lua.create_function(|_, s: String| Ok(config::parse_size(&s)))?,
    )?;
    t.set(
        "format_size",
        lua.create_function(|_, n: u64| Ok(config::format_size(n)))?,
    )?;
    t.set(
        "is_drive_key",
        lua.create_function(|_, k: String| Ok(config::is_drive_key(&k)))?,
    )?;
    Ok(t)
}
