//! Runs Lua handlers as the tunnel's [`CommandHandler`] ([`lua_handler`] is the node's
//! default handler factory): looks the command up, validates
//! its parameters against the handler's schema, takes the VM's config lock and checks the
//! expected lock (for handlers with `lock = true`), calls `run(ctx, params)` within the
//! instruction budget, and turns the result or the error into the reply. When the control
//! connection is lost before the migration committed, it frees what the tunnel created.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use mlua::{LuaSerdeExt, RegistryKey, Table, Value as LuaValue};
use serde_json::{Map, Value};

use super::host::{self, HostCtx, Session, config_to_json};
use super::{ScriptVm, clean_error, schema};
use crate::command::{CommandHandler, HandlerSetup, Outcome};
use crate::guest::VmConfig;
use crate::guest::store::DEFAULT_LOCK_TIMEOUT;

pub struct LuaCommandHandler {
    vm: ScriptVm,
    ctx: Arc<HostCtx>,
    state: RegistryKey,
    /// `ctx:exit()`, made once per tunnel.
    exit_fn: RegistryKey,
}

impl LuaCommandHandler {
    /// Wires a loaded VM to a tunnel; the config starts out expecting lock `create`.
    pub fn new(vm: ScriptVm, ctx: HostCtx) -> anyhow::Result<Self> {
        let ctx = Arc::new(ctx);
        let mut session = ctx.session();
        // A replica run reopens a replica: its journal expects `replica` from the start.
        session
            .created
            .expected_lock
            .get_or_insert_with(|| "create".into());
        drop(session);
        vm.lua.set_app_data(Arc::clone(&ctx));
        let lua_err = |e: mlua::Error| anyhow::anyhow!("creating tunnel state: {e}");
        let state = vm
            .lua
            .create_table()
            .and_then(|t| vm.lua.create_registry_value(t))
            .map_err(lua_err)?;
        let exit_fn = vm
            .lua
            .create_function(|lua, _self: LuaValue| {
                if let Some(c) = lua.app_data_ref::<Arc<HostCtx>>() {
                    c.session().exit = true;
                }
                Ok(())
            })
            .and_then(|f| vm.lua.create_registry_value(f))
            .map_err(lua_err)?;
        Ok(LuaCommandHandler {
            vm,
            ctx,
            state,
            exit_fn,
        })
    }

    async fn run(&mut self, cmd: &str, params: Map<String, Value>) -> Outcome {
        let Some(handler) = self.vm.handlers.get(cmd) else {
            return Outcome::err(format!("unknown command '{cmd}' given"));
        };
        if let Some(refusal) = self.fenced(cmd) {
            return Outcome::err(refusal);
        }
        let handler = match handler {
            Ok(h) => h,
            Err(load_error) => return Outcome::err(format!("handler not loaded: {load_error}")),
        };
        let params = match &handler.params {
            None => Value::Object(Map::new()),
            Some(props) => match schema::validate_object("", props, false, &params) {
                Ok(v) => v,
                Err(errors) => return Outcome::err(schema::format_errors(&errors)),
            },
        };
        let conf = if handler.lock {
            let guard = match self
                .ctx
                .host
                .guests
                .lock(self.ctx.vmid, DEFAULT_LOCK_TIMEOUT)
                .await
            {
                Ok(g) => g,
                Err(e) => return Outcome::err(e.to_string()),
            };
            let conf = match self
                .ctx
                .host
                .guests
                .read_text(self.ctx.vmid)
                .map(|t| VmConfig::parse(&t))
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Outcome::err(e.to_string()),
                Err(e) => return Outcome::err(e.to_string()),
            };
            let expected = self.ctx.session().created.expected_lock.clone();
            if let Some(lock) = expected
                && conf.options.get("lock") != Some(&lock)
            {
                return Outcome::err("Encountered wrong lock - aborting mtunnel command handling.");
            }
            *self.ctx.guard.lock().unwrap_or_else(|e| e.into_inner()) = Some(guard);
            Some(conf)
        } else {
            None
        };
        let result = self.call(cmd, conf.as_ref(), &params).await;
        self.ctx
            .guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let exit = std::mem::take(&mut self.ctx.session().exit);
        Outcome {
            reply: result,
            exit,
        }
    }

    /// A tunnel whose VMID another node took while this node's lease had lapsed does
    /// nothing more but tear down (`stop`, `quit`), so the source learns at its next
    /// command.
    fn fenced(&self, cmd: &str) -> Option<String> {
        let registry = self.ctx.host.vmid_registry.as_ref()?;
        if matches!(cmd, "quit" | "stop") || self.ctx.session().created.committed {
            return None;
        }
        let vmid = self.ctx.vmid;
        let taken = registry.lost(vmid)?;
        // `resume` says so in the words the commit uses: the source reads them to know
        // that its own VM may run on.
        Some(if cmd == "resume" {
            format!("VM {vmid} was not resumed: {taken}")
        } else {
            taken
        })
    }

    async fn call(
        &self,
        cmd: &str,
        conf: Option<&VmConfig>,
        params: &Value,
    ) -> Result<Map<String, Value>, String> {
        let lua = &self.vm.lua;
        let handler = match self.vm.handlers.get(cmd) {
            Some(Ok(h)) => h,
            _ => return Err(format!("unknown command '{cmd}' given")),
        };
        let build = || -> mlua::Result<(Table, LuaValue)> {
            let ctx = lua.create_table()?;
            ctx.set("vmid", self.ctx.vmid)?;
            ctx.set("cmd", cmd)?;
            ctx.set("authid", self.ctx.authid.as_str())?;
            ctx.set("node", self.ctx.host.cfg.node.as_str())?;
            if let Some(conf) = conf {
                ctx.set("conf", lua.to_value(&config_to_json(conf))?)?;
            }
            ctx.set("state", lua.registry_value::<Table>(&self.state)?)?;
            ctx.set("exit", lua.registry_value::<mlua::Function>(&self.exit_fn)?)?;
            Ok((ctx, lua.to_value(params)?))
        };
        let (ctx, params) = build().map_err(|e| clean_error(&e))?;
        if let Some(b) = lua.app_data_ref::<super::Budget>() {
            b.reset(self.vm.limits.instructions);
        }
        let value: LuaValue = handler
            .run
            .call_async((ctx, params))
            .await
            .map_err(|e| clean_error(&e))?;
        match value {
            LuaValue::Nil => Ok(Map::new()),
            LuaValue::Table(_) => match lua.from_value::<Value>(value) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(Value::Array(a)) if a.is_empty() => Ok(Map::new()),
                Ok(_) => Err(format!(
                    "handler '{cmd}' returned a list, expected a table of reply fields"
                )),
                Err(e) => Err(format!(
                    "handler '{cmd}' returned a value that is not JSON: {e}"
                )),
            },
            _ => Err(format!("handler '{cmd}' must return a table or nil")),
        }
    }
}

impl CommandHandler for LuaCommandHandler {
    fn knows(&self, cmd: &str) -> bool {
        self.vm.handlers.contains_key(cmd)
    }

    fn handle<'a>(
        &'a mut self,
        cmd: &'a str,
        params: Map<String, Value>,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(cmd, params))
    }

    fn finish(&mut self, end: &str) -> BoxFuture<'_, ()> {
        let end = end.to_string();
        Box::pin(async move {
            let created = self.ctx.session().created.clone();
            if created.released {
                return;
            }
            // A replica's tunnel is committed from the start, yet a cutover's incoming QEMU
            // that never resumed still goes, and a run this tunnel began and never completed
            // (it ended without `quit`: its source gone, a frozen link) is ended as cut: its
            // NBD servers stopped, the run counted as failed (`free_created` keeps the
            // replica itself and its points).
            let cutover = created.replica && created.vm_started && !created.resume_requested;
            let cut_run = created.replica
                && !created.resume_requested
                && replica_run_open(&self.ctx, &created.upid);
            if !created.committed || cutover || cut_run {
                self.ctx.log.log(format!("{end}: cleaning up"));
                host::cleanup(&self.ctx).await;
                return;
            }
            // Past the point of no return: the VM stays whatever happens; only what
            // served the transfer goes.
            // The control socket went at accept, the import socket goes with the import.
            host::end_import(&self.ctx).await;
            if let Some(lock) = &created.expected_lock {
                tracing::debug!(vmid = self.ctx.vmid, "tunnel ended: {end}");
                self.ctx.log.warn(format!(
                    "tunnel ended after VM {} was resumed on this node: it keeps running \
                     and keeps lock '{lock}' until 'unlock' (mtunnel vm unlock {})",
                    self.ctx.vmid, self.ctx.vmid
                ));
            }
        })
    }
}

/// Whether the replica's record holds a run that tunnel `upid` began and did not complete.
fn replica_run_open(ctx: &HostCtx, upid: &str) -> bool {
    match crate::replica::load(&ctx.host.cfg.data_dir, ctx.vmid) {
        Ok(Some(r)) => r.run.is_some_and(|run| run.upid == upid),
        Ok(None) => false,
        Err(e) => {
            // Unreadable: end it as cut (stopping NBD servers loses nothing committed).
            tracing::warn!(vmid = ctx.vmid, "reading the replica record: {e:#}");
            true
        }
    }
}

/// The node's default [`crate::command::HandlerFactory`]: loads the handler files fresh
/// (an edit takes effect for the next tunnel) and wires them to the tunnel.
pub fn lua_handler(setup: HandlerSetup) -> anyhow::Result<Box<dyn CommandHandler>> {
    let (sources, problems) = super::handler_sources(Some(&setup.host.cfg.handlers_dir));
    for problem in problems {
        setup.log.warn(format!("handler file skipped: {problem}"));
    }
    let vm = ScriptVm::new(setup.host.cfg.lua_limits, &sources)?;
    for (cmd, handler) in &vm.handlers {
        if let Err(e) = handler {
            setup.log.warn(format!("handler '{cmd}' refused: {e}"));
        }
    }
    Ok(Box::new(LuaCommandHandler::new(vm, host_ctx(setup))?))
}

/// A fresh host context for a tunnel whose journal starts as `setup.created`.
pub fn host_ctx(setup: HandlerSetup) -> HostCtx {
    HostCtx {
        vmid: setup.tunnel.vmid(),
        authid: setup.tunnel.authid().to_string(),
        host: setup.host,
        tunnel: setup.tunnel,
        log: setup.log,
        session: Mutex::new(Session {
            created: setup.created,
            ..Session::default()
        }),
        guard: Mutex::new(None),
    }
}
