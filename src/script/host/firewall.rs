//! `pve.firewall`: writing and removing the VM's firewall file (recorded, so cleanup
//! removes it). Reference: `docs/handlers/firewall.md`.

use std::path::PathBuf;

use mlua::{Lua, Table};

use super::{HostCtx, ctx, fail};

fn firewall_path(c: &HostCtx) -> PathBuf {
    c.host.cfg.firewall_dir().join(format!("{}.fw", c.vmid))
}

pub(super) fn firewall_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "write",
        lua.create_async_function(|lua, text: String| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            c.record(|r| r.firewall_written = true).await?;
            crate::util::ensure_dir(&c.host.cfg.firewall_dir(), 0o755)
                .map_err(|e| fail(format!("{e:#}")))?;
            crate::util::write_atomic(&firewall_path(&c), text.as_bytes(), 0o640)
                .map_err(|e| fail(format!("{e:#}")))?;
            Ok(())
        })?,
    )?;
    t.set(
        "remove",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            match std::fs::remove_file(firewall_path(&c)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail(format!("removing firewall file: {e}"))),
            }
            c.record(|r| r.firewall_written = false).await
        })?,
    )?;
    Ok(t)
}
