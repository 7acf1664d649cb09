//! `pve.log`: `info`, `warn`, `debug` into the tunnel's task log and the server log; also
//! where `print` goes. Reference: `docs/handlers/log.md`.

use std::sync::Arc;

use mlua::{Lua, Table};

use super::HostCtx;

pub(super) fn log_line(lua: &Lua, level: &str, msg: &str) {
    match lua.app_data_ref::<Arc<HostCtx>>() {
        Some(c) if level == "warn" => c.warn(msg),
        Some(c) if level == "debug" => tracing::debug!(vmid = c.vmid, "{msg}"),
        Some(c) => c.info(msg),
        None => tracing::info!("lua: {msg}"),
    }
}

pub(super) fn log_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for level in ["info", "warn", "debug"] {
        t.set(
            level,
            lua.create_function(move |lua, msg: String| {
                log_line(lua, level, &msg);
                Ok(())
            })?,
        )?;
    }
    Ok(t)
}
