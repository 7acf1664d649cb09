//! `pve.json`: `null`, `array`, `encode`, `decode`, so `{}`/`[]`/`null` round-trip as a
//! handler means them. Reference: `docs/handlers/json.md`.

use mlua::{Lua, LuaSerdeExt, Table, Value as LuaValue};
use serde_json::Value;

use super::{fail, from_lua, to_lua};

/// `pve.json` (also the spec runner's `json`): `null`, `array`, `encode`, `decode`.
pub(crate) fn json_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("null", lua.null())?;
    t.set(
        "array",
        lua.create_function(|lua, t: Option<Table>| {
            let t = match t {
                Some(t) => t,
                None => lua.create_table()?,
            };
            t.set_metatable(Some(lua.array_metatable()))?;
            Ok(t)
        })?,
    )?;
    t.set(
        "encode",
        lua.create_function(|lua, v: LuaValue| {
            let v = from_lua(lua, v)?;
            serde_json::to_string(&v).map_err(|e| fail(format!("json encode: {e}")))
        })?,
    )?;
    t.set(
        "decode",
        lua.create_function(|lua, s: String| {
            let v: Value =
                serde_json::from_str(&s).map_err(|e| fail(format!("json decode: {e}")))?;
            to_lua(lua, &v)
        })?,
    )?;
    Ok(t)
}
