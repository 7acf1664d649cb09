//! `pve.tunnel`: tickets for registered sockets, the expected lock, commit, cleanup, and
//! node facts a handler needs (bridges, socket dir, the clock). Reference:
//! `docs/handlers/tunnel.md`.

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
            c.host
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
            c.prove_reservation("committed").await?;
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
            Ok(c.host.cfg.bridge_exists(&bridge))
        })?,
    )?;
    t.set(
        "socket_dir",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            Ok(c.host.cfg.run_dir.display().to_string())
        })?,
    )?;
    t.set(
        "now",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            let unix = c
                .host
                .hypervisor
                .now()
                .map_err(|e| fail(format!("reading the clock: {e:#}")))?;
            now_table(lua, unix)
        })?,
    )?;
    Ok(t)
}

/// `pve.tunnel.now()`: the time in UTC, split into fields (the sandbox has no `os.date`
/// and the node no time-zone rules a handler could rely on).
fn now_table(lua: &Lua, unix: i64) -> mlua::Result<Table> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, min, sec) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let t = lua.create_table()?;
    t.set("unix", unix)?;
    t.set("year", year)?;
    t.set("month", month)?;
    t.set("day", day)?;
    t.set("hour", hour)?;
    t.set("min", min)?;
    t.set("sec", sec)?;
    // ISO 8601 weekday: 1970-01-01 was a Thursday (4)
    t.set("wday", (days + 3).rem_euclid(7) + 1)?;
    t.set(
        "iso",
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}Z"),
    )?;
    Ok(t)
}

/// Year, month, day of a day count since 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Refuses to commit while the config is still the empty one `open` reserved (`lock:
/// create`): a committed tunnel keeps its config for good, and that one holds no VM, so
/// the VMID would stay taken by nothing.
fn refuse_reservation(c: &HostCtx) -> mlua::Result<()> {
    let text = c
        .host
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

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn days_map_to_gregorian_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_875), (2024, 6, 1));
    }
}
