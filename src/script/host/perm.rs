//! `pve.perm`: privilege checks for the token that opened the tunnel.
//! Reference: `docs/handlers/perm.md`.

use mlua::{Lua, Table};

use super::{ctx, fail};

pub(super) fn perm_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "check",
        lua.create_function(|lua, (path, privilege): (String, String)| {
            let c = ctx(lua)?;
            c.host
                .require(&c.authid, &path, &privilege)
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "has",
        lua.create_function(|lua, (path, privilege): (String, String)| {
            let c = ctx(lua)?;
            Ok(c.host.allows(&c.authid, &path, &privilege))
        })?,
    )?;
    Ok(t)
}
