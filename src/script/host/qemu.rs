//! `pve.qemu`: config checks, the incoming VM (start, resume, stop, NBD, fstrim). A start
//! and a resume are recorded before they happen. Reference: `docs/handlers/qemu.md`.

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::{Value, json};

use super::config::string_map;
use super::{HostCtx, ctx, fail, from_lua, to_lua};
use crate::guest::{IncomingStart, VmConfig};

pub(super) fn qemu_table(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    add_start_fns(lua, &t)?;
    add_lifecycle_fns(lua, &t)?;
    Ok(t)
}

/// `check_config`, `multifd_max` and `start_incoming`.
fn add_start_fns(lua: &Lua, t: &Table) -> mlua::Result<()> {
    t.set(
        "check_config",
        lua.create_function(|lua, options: LuaValue| {
            let options = string_map(Some(&from_lua(lua, options)?), "options")?;
            crate::qemu::cmdline::check_options(&options).map_err(|e| fail(e.to_string()))
        })?,
    )?;
    t.set(
        "multifd_max",
        lua.create_function(|lua, ()| Ok(ctx(lua)?.host.cfg.multifd_channels_max))?,
    )?;
    t.set(
        "start_incoming",
        lua.create_async_function(|lua, opts: LuaValue| async move {
            let c = ctx(&lua)?;
            c.ensure_open()?;
            let opts = from_lua(&lua, opts)?;
            let text = c
                .host
                .guests
                .read_text(c.vmid)
                .map_err(|e| fail(e.to_string()))?;
            let config = VmConfig::parse(&text).map_err(|e| fail(e.to_string()))?;
            let req = incoming_request(c.vmid, config, &opts, c.host.cfg.multifd_channels_max)?;
            let ram = ram_words(&req);
            c.record(|r| r.vm_started = true).await?;
            let started = c
                .host
                .hypervisor
                .start_incoming(req.clone())
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
            c.tunnel.register_socket(&started.migrate_socket);
            if let Some(nbd) = &started.nbd_socket {
                c.tunnel.register_socket(nbd);
            }
            c.info(&format!(
                "VM {} started, waiting for migration on {}{ram}",
                c.vmid,
                started.migrate_socket.display(),
            ));
            let mut reply = json!({
                "migrate_socket": started.migrate_socket.display().to_string(),
                "nbd_uris": started.nbd_uris,
            });
            if let Some(n) = req.multifd {
                reply["multifd"] = json!(n);
            }
            if let Some(comp) = &req.compression {
                reply["compression"] = json!(comp);
            }
            if req.postcopy {
                reply["postcopy"] = json!(true);
            }
            if let Some(nbd) = &started.nbd_socket {
                reply["nbd_socket"] = json!(nbd.display().to_string());
            }
            to_lua(&lua, &reply)
        })?,
    )?;
    Ok(())
}

/// The compressions `start_incoming` accepts (`compression`), as `mtunnel-features`
/// offers them: QEMU's `multifd-compression` values worth their CPU (zlib is far too slow).
pub const COMPRESSIONS: &[&str] = &["zstd"];

/// `start_incoming`'s options checked and turned into the hypervisor's request: more
/// multifd channels than `max`, an unknown compression, a compression without multifd or
/// postcopy with multifd (QEMU 10.0 refuses it) are errors, before anything starts.
fn incoming_request(
    vmid: u32,
    config: VmConfig,
    opts: &Value,
    max: u32,
) -> mlua::Result<IncomingStart> {
    let multifd = opts
        .get("multifd")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    if let Some(n) = multifd
        && n > max
    {
        return Err(fail(format!(
            "{n} multifd channels asked, this node allows at most {max} (multifd_channels_max)"
        )));
    }
    let compression = match opts.get("compression") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if COMPRESSIONS.contains(&c.as_str()) => Some(c.clone()),
        Some(other) => {
            return Err(fail(format!(
                "unknown compression {other}: this node offers {}",
                COMPRESSIONS.join(", ")
            )));
        }
    };
    if compression.is_some() && multifd.is_none() {
        return Err(fail("compression needs multifd channels"));
    }
    let postcopy = opts.get("postcopy").and_then(Value::as_bool) == Some(true);
    if postcopy && multifd.is_some() {
        return Err(fail(
            "postcopy cannot be combined with multifd channels (QEMU 10.0 refuses it)",
        ));
    }
    Ok(IncomingStart {
        vmid,
        config,
        machine: opts
            .get("machine")
            .and_then(Value::as_str)
            .map(str::to_string),
        cpu: opts.get("cpu").and_then(Value::as_str).map(str::to_string),
        nbd: string_map(opts.get("nbd"), "nbd")?,
        multifd,
        compression,
        postcopy,
    })
}

/// How the RAM comes, for the task log: ` with 4 multifd channels, zstd`, `, postcopy
/// allowed`, or nothing.
fn ram_words(req: &IncomingStart) -> String {
    let mut words = String::new();
    if let Some(n) = req.multifd {
        words.push_str(&format!(" with {n} multifd channels"));
    }
    if let Some(c) = &req.compression {
        words.push_str(&format!(", {c} compressed"));
    }
    if req.postcopy {
        words.push_str(", postcopy allowed");
    }
    words
}

/// The words for a failed resume. A QEMU that is gone (its incoming stream was cut before
/// it loaded) runs nothing here: the record forgets the request, so the session's cleanup
/// frees what the migration created, and the source reads "was not resumed" and runs its
/// own copy on. A QEMU still there may yet start the guest: then nothing is decided here.
async fn resume_failed(c: &HostCtx, e: anyhow::Error) -> String {
    if c.host.hypervisor.is_running(c.vmid).await {
        let msg = format!("{e:#}");
        c.warn(&format!("resume: {msg}"));
        return msg;
    }
    let msg = match c.record(|r| r.resume_requested = false).await {
        Ok(()) => format!(
            "VM {} was not resumed: its QEMU exited before it had loaded the migration: {e:#}",
            c.vmid
        ),
        Err(re) => format!("{e:#} (and the record could not be updated: {re})"),
    };
    c.warn(&format!("resume: {msg}"));
    msg
}

/// `resume`, `stop`, `nbd_stop`, `fstrim`, `is_running`: the incoming VM after its start.
fn add_lifecycle_fns(lua: &Lua, t: &Table) -> mlua::Result<()> {
    macro_rules! vm_op {
        ($name:literal, $method:ident) => {
            t.set(
                $name,
                lua.create_async_function(|lua, ()| async move {
                    let c = ctx(&lua)?;
                    c.host
                        .hypervisor
                        .$method(c.vmid)
                        .await
                        .map_err(|e| fail(format!("{e:#}")))
                })?,
            )?;
        };
    }
    t.set(
        "resume",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            c.prove_reservation("resumed").await?;
            // Recorded first: if this process dies during `cont`, the VM may already run
            // as the only live copy, and recovery must leave it alone. Refused, QEMU was
            // not asked: said in the words the source reads as "runs nothing here".
            c.record(|r| r.resume_requested = true)
                .await
                .map_err(|e| fail(format!("VM {} was not resumed: {e}", c.vmid)))?;
            if let Err(e) = c.host.hypervisor.resume(c.vmid).await {
                return Err(fail(resume_failed(&c, e).await));
            }
            c.record(|r| r.committed = true).await
        })?,
    )?;
    t.set(
        "stop",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            if c.session().created.resume_requested {
                return Err(fail(format!(
                    "VM {} was resumed on this node and may be the only live copy - not \
                     stopping it",
                    c.vmid
                )));
            }
            c.host
                .hypervisor
                .stop(c.vmid)
                .await
                .map_err(|e| fail(format!("{e:#}")))
        })?,
    )?;
    vm_op!("nbd_stop", nbd_stop);
    vm_op!("fstrim", fstrim);
    t.set(
        "is_running",
        lua.create_async_function(|lua, ()| async move {
            let c = ctx(&lua)?;
            Ok(c.host.hypervisor.is_running(c.vmid).await)
        })?,
    )?;
    Ok(())
}
