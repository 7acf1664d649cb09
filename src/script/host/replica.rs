//! `pve.replica`: the replica of the tunnel's VM (docs/replicas.md) — its record, the
//! start of a run (NBD servers over the working copies, their sockets registered for
//! tickets), the block hashes of a working copy (a hash sync) and its completion (a
//! restore point). The work is in [`crate::replica`]; a
//! tunnel that touches a replica is marked in its journal (`replica`), so its NBD
//! servers are stopped whenever it is freed. Reference: `docs/handlers/replica.md`.

use std::collections::BTreeMap;

use mlua::{Lua, LuaSerdeExt, Table, Value as LuaValue};
use serde_json::Value;

use super::{HostCtx, ctx, fail, from_lua, to_lua};
use crate::replica::{self, Disk, Replica, Source, manage::Parts};

fn parts(c: &HostCtx) -> Parts<'_> {
    Parts {
        cfg: &c.host.cfg,
        guests: &c.host.guests,
        storage: &*c.host.storage,
    }
}

fn err(e: anyhow::Error) -> mlua::Error {
    fail(format!("{e:#}"))
}

pub(super) fn replica_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "get",
        lua.create_function(|lua, ()| {
            let c = ctx(lua)?;
            match replica::load(&c.host.cfg.data_dir, c.vmid).map_err(err)? {
                Some(r) => lua.to_value(&r),
                None => Ok(LuaValue::Nil),
            }
        })?,
    )?;
    t.set("create", lua.create_async_function(create)?)?;
    t.set("hashes", lua.create_async_function(hashes)?)?;
    t.set(
        "export",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            c.record(|r| r.replica = true).await?;
            let exports = parts(&c)
                .begin_run(c.vmid, c.tunnel.instance())
                .await
                .map_err(err)?;
            for e in exports.values() {
                c.tunnel.register_socket(&e.socket);
            }
            c.info(&format!(
                "replica run started: {} NBD export(s) of the working copies",
                exports.len()
            ));
            lua.to_value(&exports)
        })?,
    )?;
    t.set(
        "complete",
        lua.create_async_function(|lua, opts: LuaValue| async move {
            let c = ctx(&lua)?;
            let opts = from_lua(&lua, opts)?;
            let keep = opts
                .get("keep")
                .and_then(Value::as_u64)
                .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
            let copied = opts.get("bytes").and_then(Value::as_u64).unwrap_or(0);
            let incremental = opts.get("incremental").and_then(Value::as_bool) == Some(true);
            let record = replica::load(&c.host.cfg.data_dir, c.vmid).map_err(err)?;
            let parts = parts(&c);
            // Counted once the servers ended: every byte of the run has been relayed.
            parts.wait_servers(c.vmid).await.map_err(err)?;
            let received = record
                .iter()
                .flat_map(|r| r.disks.keys())
                .map(|key| {
                    let socket = replica::nbd_socket(&c.host.cfg.run_dir, c.vmid, key);
                    c.tunnel.inbound_bytes(&socket)
                })
                .sum();
            let bytes = replica::manage::RunBytes { copied, received };
            let done = parts
                .complete_run(c.vmid, keep, bytes, incremental)
                .await
                .map_err(err)?;
            for key in record.iter().flat_map(|r| r.disks.keys()) {
                let socket = replica::nbd_socket(&c.host.cfg.run_dir, c.vmid, key);
                c.tunnel.unregister_socket(&socket);
            }
            c.info(&format!(
                "replica run completed: restore point '{}'{}",
                done.point,
                if done.pruned.is_empty() {
                    String::new()
                } else {
                    format!(", pruned {}", done.pruned.join(", "))
                }
            ));
            to_lua(
                &lua,
                &serde_json::to_value(&done).map_err(|e| fail(e.to_string()))?,
            )
        })?,
    )?;
    t.set(
        "begin_cutover",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            c.record(|r| r.replica = true).await?;
            let r = parts(&c)
                .begin_cutover(c.vmid, c.tunnel.instance())
                .map_err(err)?;
            c.info(&format!(
                "migration cuts over to the replica of VM {} (restore points kept until it commits)",
                c.vmid
            ));
            lua.to_value(&r)
        })?,
    )?;
    t.set(
        "take_over",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            let leftovers = parts(&c).take_over(c.vmid).await.map_err(err)?;
            for l in &leftovers {
                c.warn(&format!("not deleted, remove it by hand: {l}"));
            }
            c.info(&format!(
                "the replica of VM {} is the migrated VM now: its record and restore points are gone",
                c.vmid
            ));
            Ok(leftovers.len())
        })?,
    )?;
    Ok(t)
}

/// `pve.replica.create{source_node, source_vmid, disks = {key = {volid, format, size}}}`:
/// the record of a new replica (its config is the handler's to write).
async fn create(lua: Lua, opts: LuaValue) -> mlua::Result<LuaValue> {
    let c = ctx(&lua)?;
    c.ensure_open()?;
    let opts = from_lua(&lua, opts)?;
    // Only a tunnel that reserved the VMID anew (lock `create`) makes a replica: a record
    // left by an older replica of the VMID (whose config is gone) is stale.
    let reopened = {
        let session = c.session();
        session.created.committed && session.created.expected_lock.as_deref() == Some(replica::LOCK)
    };
    if reopened {
        return Err(fail(format!("VM {} already is a replica", c.vmid)));
    }
    if let Ok(Some(old)) = replica::load(&c.host.cfg.data_dir, c.vmid) {
        c.warn(&format!(
            "replacing the stale replica record of VM {} (replica id {}, no config)",
            c.vmid, old.id
        ));
    }
    let node = opts
        .get("source_node")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("source_node missing"))?;
    let vmid = opts
        .get("source_vmid")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| fail("source_vmid missing"))?;
    let disks: BTreeMap<String, Disk> =
        serde_json::from_value(opts.get("disks").cloned().unwrap_or(Value::Null))
            .map_err(|e| fail(format!("disks: {e}")))?;
    for disk in disks.values() {
        if !c.session().created.volumes.contains(&disk.volid) {
            return Err(fail(format!(
                "volume '{}' was not created by this tunnel",
                disk.volid
            )));
        }
    }
    let r = Replica {
        vmid: c.vmid,
        id: replica::new_id(),
        source: Source {
            node: node.to_string(),
            vmid,
        },
        disks,
        points: Vec::new(),
        run: None,
        failed_runs: 0,
    };
    c.record(|j| j.replica = true).await?;
    replica::store(&c.host.cfg.data_dir, &r).map_err(err)?;
    lua.to_value(&r)
}

/// `pve.replica.hashes{disk, offset, length, block}`: the block hashes of a range of a
/// working copy (read through a read-only `qemu-nbd`, so the tunnel is marked `replica`
/// first: its cleanup stops that server too).
async fn hashes(lua: Lua, opts: LuaValue) -> mlua::Result<LuaValue> {
    let c = ctx(&lua)?;
    c.ensure_open()?;
    let opts = from_lua(&lua, opts)?;
    let number = |name: &str| {
        opts.get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| fail(format!("{name} missing (a whole number of bytes)")))
    };
    let key = opts
        .get("disk")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("disk missing"))?;
    let range = replica::manage::HashRange {
        offset: number("offset")?,
        length: number("length")?,
        block: number("block")?,
    };
    c.record(|r| r.replica = true).await?;
    let hashes = parts(&c)
        .hashes((c.vmid, c.tunnel.instance()), key, range)
        .await
        .map_err(err)?;
    to_lua(&lua, &serde_json::json!(hashes))
}
