//! `pve.tunnel`: tickets for registered sockets, the expected lock, commit, cleanup, and
//! node facts a handler needs (bridges, socket dir). Reference: `docs/handlers/tunnel.md`.

use mlua::{Lua, Table};

use super::{HostCtx, cleanup, ctx, fail};
use crate::guest::config::VmConfig;
use crate::util::unix_now;

pub(super) fn tunnel_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "ticket",
        lua.create_function(|lua, path: String| {
            let c = ctx(lua)?;
            if !c.tunnel.is_registered(std::path::Path::new(&path)) {
                return Err(fail(format!(
                    "Not allowed to generate ticket for unknown socket '{path}'"
                )));
            }
            c.node
                .tickets
                .assemble(&c.authid, &path, c.tunnel.instance(), unix_now())
                .map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "expect_lock",
        lua.create_async_function(|lua, lock: Option<String>| async move {
            let c = ctx(&lua)?;
            c.record(|r| r.expected_lock = lock).await
        })?,
    )?;
    t.set(
        "commit",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            refuse_reservation(&c)?;
            c.record(|r| r.committed = true).await
        })?,
    )?;
    t.set(
        "cleanup",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            cleanup(&c).await;
            Ok(())
        })?,
    )?;
    t.set(
        "bridge_exists",
        lua.create_function(|lua, bridge: String| {
            let c = ctx(lua)?;
            Ok(c.node.cfg.bridge_exists(&bridge))
        })?,
    )?;
    t.set(
        "socket_dir",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            Ok(c.node.cfg.run_dir.display().to_string())
        })?,
    )?;
    Ok(t)
}

/// Refuses to commit while the config is still the empty one `open` reserved (`lock:
/// create`): a committed tunnel keeps its config for good, and that one holds no VM, so
/// the VMID would stay taken by nothing.
fn refuse_reservation(c: &HostCtx) -> mlua::Result<()> {
    let text = c
        .node
        .guests
        .read_text(c.vmid)
        .map_err(|e| fail(format!("cannot commit the migration of VM {}: {e}", c.vmid)))?;
    let conf = VmConfig::parse(&text).map_err(|e| fail(e.to_string()))?;
    if conf.options.get("lock").map(String::as_str) == Some("create") {
        return Err(fail(format!(
            "cannot commit the migration of VM {}: its config is still the empty one \
             reserved for the tunnel (lock 'create'); 'config' must come first",
            c.vmid
        )));
    }
    Ok(())
}
