//! The host API handlers call: one read-only global `pve` with sub-tables `log`, `json`,
//! `config`, `storage`, `qemu`, `firewall`, `tunnel`, `perm`, `replica` and the functions
//! `fail` and `builtin`.
//! Functions raise on failure with a message fit for the reply. Everything a tunnel
//! creates through them (volumes, imports, a started VM, a firewall file) is recorded in
//! the tunnel's [`Session`] so [`cleanup`] can free exactly that and nothing else.
//! Reference: `handlers/README.md`.
//!
//! One file per `pve.*` table, matching `docs/handlers/*.md`: `log`, `json`, `config`,
//! `storage`, `qemu`, `firewall`, `tunnel`, `perm`. This file owns the tunnel's
//! [`HostCtx`] and [`Session`], the journal discipline ([`HostCtx::record`], the refusal
//! to create after release) and the cleanup entry points ([`end_import`], [`cleanup`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use mlua::{Lua, LuaSerdeExt, Table, Value as LuaValue};
use serde_json::Value;

use super::HandlerFailure;
use crate::command::TunnelSockets;
use crate::guest::VmLockGuard;
use crate::journal::{self, Created};
use crate::metrics::{import_failure, import_failure_reason};
use crate::task::TaskLog;

mod config;
mod firewall;
mod json;
mod log;
mod perm;
mod qemu;
mod replica;
mod storage;
mod tunnel;

pub use config::{config_from_json, config_to_json};
pub(crate) use json::json_table;

/// What a tunnel has done so far, for cleanup and for the wire rules.
#[derive(Default)]
pub struct Session {
    /// What this tunnel created, mirrored durably to its journal by [`HostCtx::record`].
    pub created: Created,
    pub exit: bool,
    pub import: Option<ImportJob>,
}

/// A running `disk-import`.
pub struct ImportJob {
    /// The volume name asked for (the partial file an abort removes).
    pub volname: String,
    pub socket: PathBuf,
    pub task: tokio::task::JoinHandle<Result<String, String>>,
    pub received: Arc<AtomicU64>,
}

/// Per-tunnel context, stored as app data of the tunnel's Lua VM.
pub struct HostCtx {
    /// What the handler may use of its node.
    pub host: crate::command::Host,
    pub tunnel: Arc<dyn TunnelSockets>,
    pub log: TaskLog,
    pub vmid: u32,
    pub authid: String,
    pub session: Mutex<Session>,
    /// The VM lock while a locked handler runs.
    pub guard: Mutex<Option<VmLockGuard>>,
}

impl HostCtx {
    pub fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the record of what this tunnel created and writes it to the journal
    /// (fsync'd) before the command that changed it replies. Memory follows the disk: if
    /// the write fails, the change is not made and the command fails.
    pub async fn record(&self, change: impl FnOnce(&mut Created)) -> mlua::Result<()> {
        let mut next = self.session().created.clone();
        change(&mut next);
        journal::store_async(self.host.cfg.journal_dir(), next.clone())
            .await
            .map_err(|e| fail(format!("cannot write the tunnel journal: {e:#}")))?;
        self.session().created = next;
        Ok(())
    }

    /// Fails once the tunnel freed what it created (`pve.tunnel.cleanup()`): the VMID may
    /// already belong to the next tunnel, so nothing may be created in its name.
    fn ensure_open(&self) -> mlua::Result<()> {
        if self.session().created.released {
            return Err(fail(format!(
                "the tunnel of VM {} was cleaned up; it cannot create anything any more",
                self.vmid
            )));
        }
        Ok(())
    }

    fn info(&self, msg: &str) {
        tracing::info!(vmid = self.vmid, "{msg}");
        self.log.log(msg);
    }

    fn warn(&self, msg: &str) {
        tracing::warn!(vmid = self.vmid, "{msg}");
        self.log.warn(msg);
    }
}

impl HostCtx {
    /// Fencing before the point of no return (`what`: "resumed", "unlocked", "committed"):
    /// in a cluster the VMID's registry entry becomes this node's for good, or the step is
    /// refused (another node took the VMID while this node's lease had lapsed, or etcd
    /// cannot confirm). A single node has nobody to prove it to.
    async fn prove_reservation(&self, what: &str) -> mlua::Result<()> {
        let Some(registry) = &self.host.vmid_registry else {
            return Ok(());
        };
        if self.session().created.committed {
            return Ok(());
        }
        registry.commit(self.vmid).await.map_err(|e| {
            let msg = format!("VM {} was not {what}: {e}", self.vmid);
            tracing::error!(vmid = self.vmid, "fenced: {msg}");
            fail(msg)
        })
    }
}

pub fn fail(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::external(HandlerFailure(msg.into()))
}

fn ctx(lua: &Lua) -> mlua::Result<Arc<HostCtx>> {
    lua.app_data_ref::<Arc<HostCtx>>()
        .map(|c| Arc::clone(&c))
        .ok_or_else(|| fail("host functions are only available inside a tunnel"))
}

fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    lua.to_value(v)
}

fn from_lua(lua: &Lua, v: LuaValue) -> mlua::Result<Value> {
    lua.from_value(v)
}

/// Wraps `table` in a proxy that refuses writes.
fn readonly(lua: &Lua, table: Table) -> mlua::Result<Table> {
    let proxy = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", table)?;
    meta.set(
        "__newindex",
        lua.create_function(
            |_, (_t, k, _v): (LuaValue, LuaValue, LuaValue)| -> mlua::Result<()> {
                Err(fail(format!(
                    "pve is read-only (tried to set '{}')",
                    k.to_string().unwrap_or_default()
                )))
            },
        )?,
    )?;
    meta.set("__metatable", false)?;
    proxy.set_metatable(Some(meta))?;
    Ok(proxy)
}

/// `pve.builtin(cmd)`: the table the built-in handler file of `cmd` returns, loaded afresh
/// into this Lua state, so an override can wrap the built-in (`base.run(ctx, p)`) instead
/// of carrying a copy of its code that drifts from the version it runs on.
fn builtin(lua: &Lua, cmd: String) -> mlua::Result<LuaValue> {
    let Some((_, code)) = super::BUILTIN_HANDLERS.iter().find(|(c, _)| *c == cmd) else {
        let names: Vec<&str> = super::BUILTIN_HANDLERS.iter().map(|(c, _)| *c).collect();
        return Err(fail(format!(
            "pve.builtin: there is no built-in handler '{cmd}' (built-ins: {})",
            names.join(", ")
        )));
    };
    lua.load(*code)
        .set_name(format!("@built-in:{cmd}.lua"))
        .set_mode(mlua::chunk::ChunkMode::Text)
        .eval()
}

/// Installs the global `pve` and `print`.
pub fn register(lua: &Lua) -> anyhow::Result<()> {
    register_inner(lua).map_err(|e| anyhow::anyhow!("registering the pve host API: {e}"))
}

fn register_inner(lua: &Lua) -> mlua::Result<()> {
    let pve = lua.create_table()?;
    pve.set("log", readonly(lua, log::log_table(lua)?)?)?;
    pve.set("json", readonly(lua, json::json_table(lua)?)?)?;
    pve.set("config", readonly(lua, config::config_table(lua)?)?)?;
    pve.set("storage", readonly(lua, storage::storage_table(lua)?)?)?;
    pve.set("qemu", readonly(lua, qemu::qemu_table(lua)?)?)?;
    pve.set("firewall", readonly(lua, firewall::firewall_table(lua)?)?)?;
    pve.set("tunnel", readonly(lua, tunnel::tunnel_table(lua)?)?)?;
    pve.set("perm", readonly(lua, perm::perm_table(lua)?)?)?;
    pve.set("replica", readonly(lua, replica::replica_table(lua)?)?)?;
    pve.set(
        "fail",
        lua.create_function(|_, msg: LuaValue| -> mlua::Result<()> {
            Err(fail(match msg {
                LuaValue::String(s) => s.to_string_lossy(),
                other => other.to_string().unwrap_or_else(|_| "error".into()),
            }))
        })?,
    )?;
    pve.set("builtin", lua.create_function(builtin)?)?;
    lua.globals().set("pve", readonly(lua, pve)?)?;
    lua.globals().set(
        "print",
        lua.create_function(|lua, args: mlua::Variadic<LuaValue>| {
            let text = args
                .iter()
                .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                .collect::<Vec<_>>()
                .join("\t");
            log::log_line(lua, "info", &text);
            Ok(())
        })?,
    )?;
    Ok(())
}

/// Ends a running disk import: a finished one's volume is recorded as this tunnel's, an
/// unfinished one is aborted (its partial volume removed), and its socket goes.
pub async fn end_import(c: &Arc<HostCtx>) {
    let import = c.session().import.take();
    if let Some(job) = import {
        if job.task.is_finished() {
            // Finished but not yet collected by `query-disk-import`: its volume is ours too.
            match job.task.await {
                Ok(Ok(volid)) => {
                    // Never checked (`query-disk-import` does that): not counted completed.
                    c.host.metrics.import_failed(import_failure::ABORTED);
                    c.session().created.volumes.push(volid)
                }
                Ok(Err(msg)) => {
                    c.host.metrics.import_failed(import_failure_reason(&msg));
                    c.info(&format!("cleanup: the disk import had failed: {msg}"))
                }
                Err(e) => {
                    c.host.metrics.import_failed(import_failure::STREAM_ERROR);
                    c.info(&format!("cleanup: the disk import task had failed: {e}"))
                }
            }
        } else {
            c.host.metrics.import_failed(import_failure::ABORTED);
            job.task.abort();
            let _ = job.task.await;
            c.info(&format!(
                "cleanup: aborted the running import of '{}' and removed its partial volume",
                job.volname
            ));
        }
        c.tunnel.unregister_socket(&job.socket);
        let _ = std::fs::remove_file(&job.socket);
    }
}

/// Frees what this tunnel created (see [`journal::free_created`], the one path every
/// tunnel end and crash recovery take): first ends a running import, so its partial
/// volume is gone or complete, then frees by the record. After a successful free the
/// record is empty, so a second call (e.g. `quit cleanup=1`, then EOF) frees nothing.
pub async fn cleanup(c: &Arc<HostCtx>) -> journal::Freed {
    end_import(c).await;
    // Another tunnel may hold the VMID by now (an operator destroyed the VM and a new
    // migration reserved it): `free_created` then proves the config is not ours.
    let created = c.session().created.clone();
    // A locked handler that calls cleanup keeps its lock: borrow the guard, put it back.
    let guard = c.guard.lock().unwrap_or_else(|e| e.into_inner()).take();
    let freed = journal::free_created(&c.host.journal(), &created, guard.as_ref(), &c.log).await;
    *c.guard.lock().unwrap_or_else(|e| e.into_inner()) = guard;
    if freed.failed {
        c.warn(&format!(
            "cleanup of VM {} is incomplete; the tunnel's journal stays: 'mtunnel cleanup' \
             (once this tunnel has ended) or the next start of mtunnel serve retries it",
            c.vmid
        ));
        return freed;
    }
    // Freed, or kept for good (a resumed VM, another lock): either way nothing may be
    // freed in this tunnel's name again — the VMID may already belong to the next tunnel.
    if let Err(e) = c.record(|r| r.released = true).await {
        // Memory must say it even if the journal cannot: this tunnel frees nothing again.
        c.warn(&format!("{e}"));
        c.session().created.released = true;
    }
    freed
}

#[cfg(test)]
mod tests {
    use crate::script::{HandlerSource, Limits, ScriptVm};

    fn load(cmd: &str, code: &str) -> Result<String, String> {
        let src = HandlerSource {
            cmd: cmd.into(),
            origin: format!("test:{cmd}.lua"),
            code: code.into(),
        };
        let vm = ScriptVm::new(Limits::default(), &[src]).expect("Lua state");
        match vm.handlers.into_values().next().expect("one handler") {
            Ok(h) => Ok(h.description),
            Err(e) => Err(e),
        }
    }

    #[test]
    fn an_override_wraps_the_builtin_it_replaces() {
        let wrapped = load(
            "bwlimit",
            r#"local base = pve.builtin("bwlimit")
               return { description = base.description .. " (site)", params = base.params,
                        lock = base.lock, run = function(ctx, p) return base.run(ctx, p) end }"#,
        );
        assert_eq!(
            wrapped.as_deref(),
            Ok("Effective bandwidth limit in KiB/s for an operation on target storages. (site)")
        );
    }

    #[test]
    fn an_unknown_builtin_is_named_with_the_ones_there_are() {
        let err = load("x", r#"return pve.builtin("nope")"#).unwrap_err();
        assert!(
            err.starts_with("pve.builtin: there is no built-in handler 'nope' (built-ins: bwlimit, config, disk, disk-import,"),
            "{err}"
        );
    }

    #[test]
    fn format_writes_the_text_parse_reads() {
        let text = "#a note\n#second line\ncores: 2\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n\n[special:cloudinit]\nname: old\n";
        let got = load(
            "x",
            &format!(
                "local t = pve.config.format(pve.config.parse({text:?}))\n\
                 return {{ description = t, params = false, run = function() end }}"
            ),
        );
        assert_eq!(got.as_deref(), Ok(text));
    }
}
