//! Live tunnels: opening one (`POST .../mtunnel`), the registry of sockets each tunnel may
//! hand out tickets for, the worker loop on the control socket ([`worker`]), the status
//! page's view of a tunnel ([`status`]) and recovery at start ([`recovery`]). The bytes of
//! a tunnel's sockets are relayed by [`crate::net::relay`].

pub mod recovery;
pub mod status;
pub mod worker;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::command::{self, HandlerFactory, Refusal};
use crate::error::{Error, Result};
use crate::guest::ConfigStore;
use crate::journal::{self, Created};
use crate::task::{TaskManager, Upid};
use crate::util::unix_now;

/// One open tunnel, from `POST .../mtunnel` until its worker ends.
pub struct Tunnel {
    pub vmid: u32,
    /// Who opened it; only this token may attach WebSockets to it.
    pub authid: String,
    /// This tunnel's UPID: tickets are bound to it, so a ticket minted for one tunnel of a
    /// VMID is refused by any later tunnel of that VMID (socket paths are reused).
    pub instance: String,
    pub control_socket: PathBuf,
    /// Sockets a `ticket` command may mint tickets for (migration, NBD, disk import).
    sockets: Mutex<BTreeSet<PathBuf>>,
    /// Set by the one WebSocket request that may connect to the control socket.
    control_claimed: AtomicBool,
    /// How the control WebSocket's relay ended, once it has: `Some(None)` cleanly,
    /// `Some(Some(error))` with that error (e.g. the peer timeout). The worker only sees
    /// its socket close; this is the reason it names in the task log.
    control_end: tokio::sync::watch::Sender<Option<Option<String>>>,
    /// What it does now: its last command and its streams' byte counts.
    pub activity: status::Activity,
}

impl Tunnel {
    /// Claims the control socket for one WebSocket; false if another request holds it.
    /// Connecting alone is no guard: the kernel queues connections the worker never
    /// accepts, so two concurrent upgrades could both get a 101.
    pub fn claim_control(&self) -> bool {
        self.control_claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Gives the claim back after an upgrade that failed before the worker got the
    /// connection.
    pub fn release_control(&self) {
        self.control_claimed.store(false, Ordering::Release);
    }

    /// Records how the control WebSocket's relay ended (`error` is `None` for a clean end).
    pub fn control_relay_ended(&self, error: Option<String>) {
        self.control_end.send_replace(Some(error));
    }

    /// Why the control connection broke, as its relay reports it; `None` for a clean end,
    /// no WebSocket, or no report within `wait`. The worker sees the socket close a moment
    /// before the relay's report arrives, hence the (short) wait.
    pub async fn control_end_reason(&self, wait: std::time::Duration) -> Option<String> {
        if !self.control_claimed.load(Ordering::Acquire) {
            return None;
        }
        let mut ended = self.control_end.subscribe();
        match tokio::time::timeout(wait, ended.wait_for(Option::is_some)).await {
            Ok(Ok(end)) => end.clone().flatten(),
            _ => None,
        }
    }

    /// Allows tickets (and WebSocket forwarding) for `path`.
    pub fn register_socket(&self, path: &Path) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf());
    }

    pub fn unregister_socket(&self, path: &Path) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
    }

    pub fn is_registered(&self, path: &Path) -> bool {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(path)
    }

    /// Whether the WebSocket endpoint may forward to `path` for this tunnel.
    pub fn may_forward_to(&self, path: &Path) -> bool {
        path == self.control_socket || self.is_registered(path)
    }
}

/// What the tunnel layer uses of its node: what its command handlers get too
/// ([`command::Host`]) and the task logs. Handed out by the composition
/// root (`node::Node::tunnel_services`).
#[derive(Clone)]
pub struct Services {
    pub host: command::Host,
    pub tasks: Arc<TaskManager>,
}

/// A node's tunnel layer, put together where the node is (`mtunnel serve`, a spec run, a
/// test): what it uses of the node, its open tunnels and the factory of their command handlers
/// (the Lua handlers, or a stand-in).
pub struct Tunnels {
    pub services: Services,
    pub registry: Registry,
    pub handlers: HandlerFactory,
}

impl Tunnels {
    pub fn new(services: Services, handlers: HandlerFactory) -> Arc<Self> {
        Arc::new(Tunnels {
            services,
            registry: Registry::default(),
            handlers,
        })
    }

    /// Whether `vmid` is taken here: it has a config (a tunnel's reservation is one) or
    /// an open tunnel.
    pub fn taken(&self, vmid: u32) -> bool {
        self.services.host.guests.exists(vmid) || self.registry.get(vmid).is_some()
    }

    /// The lowest VMID from `from` on that is not [`Tunnels::taken`]; PVE's
    /// `/cluster/nextid` on a single node.
    pub fn next_free_vmid(&self, from: u32) -> Option<u32> {
        let configs: BTreeSet<u32> = self.services.host.guests.list().into_iter().collect();
        (from.max(100)..=999_999_999)
            .take(1_000_000)
            .find(|id| !configs.contains(id) && self.registry.get(*id).is_none())
    }
}

/// The tunnels open on this node, by VMID, and the places under `max_tunnels`.
#[derive(Default)]
pub struct Registry {
    tunnels: Mutex<HashMap<u32, Arc<Tunnel>>>,
    /// Places taken: by tunnels being opened and by open ones, until their task ends.
    taken: Arc<AtomicUsize>,
}

/// One place under `max_tunnels`, taken by [`Registry::take_slot`] before `open` creates
/// anything; it frees the place when dropped: on any failure of `open`, or when the
/// tunnel's task ends.
pub struct Slot {
    taken: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registry {
    /// Takes a place if fewer than `max` are taken. Check and take are one atomic step:
    /// counting the registry instead let concurrent opens all pass the check before any
    /// of them was registered.
    pub fn take_slot(&self, max: usize) -> Option<Slot> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                taken: Arc::clone(&self.taken),
            })
    }

    pub fn get(&self, vmid: u32) -> Option<Arc<Tunnel>> {
        self.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vmid)
            .cloned()
    }

    /// The open tunnels, by VMID.
    pub fn list(&self) -> Vec<Arc<Tunnel>> {
        let mut out: Vec<Arc<Tunnel>> = (self.tunnels.lock().unwrap_or_else(|e| e.into_inner()))
            .values()
            .cloned()
            .collect();
        out.sort_by_key(|t| t.vmid);
        out
    }

    /// How many tunnels are open.
    pub fn len(&self) -> usize {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, tunnel: Arc<Tunnel>) {
        self.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tunnel.vmid, tunnel);
    }

    fn remove(&self, tunnel: &Arc<Tunnel>) {
        let mut map = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&tunnel.vmid)
            .is_some_and(|t| Arc::ptr_eq(t, tunnel))
        {
            map.remove(&tunnel.vmid);
        }
    }
}

/// Whether `authid` may attach a WebSocket to `socket` of VM `vmid`'s open tunnel with
/// `ticket`: the VM exists, it has a live tunnel, `authid` opened it, the ticket was minted
/// for `authid`, `socket` and this very tunnel (not an earlier one of the same VMID), and
/// the socket is the control socket or one the tunnel registered.
pub fn authorize_socket(
    tunnels: &Tunnels,
    authid: &str,
    vmid: u32,
    socket: &str,
    ticket: &str,
) -> Result<Arc<Tunnel>> {
    let denied = |e: crate::auth::ticket::TicketError| {
        Error::Unauthorized(format!("permission denied - {e}"))
    };
    crate::auth::ticket::normalize_path(&format!("/socket/{socket}")).map_err(denied)?;
    let svc = &tunnels.services;
    if !svc.host.guests.exists(vmid) {
        return Err(Error::internal(format!(
            "Configuration file 'nodes/{}/qemu-server/{vmid}.conf' does not exist",
            svc.host.cfg.node
        )));
    }
    let tunnel = tunnels
        .registry
        .get(vmid)
        .ok_or_else(|| Error::Forbidden(format!("no open tunnel for VM {vmid}")))?;
    if tunnel.authid != authid {
        return Err(Error::Forbidden(format!(
            "permission denied - the tunnel of VM {vmid} was opened by another user"
        )));
    }
    svc.host
        .tickets
        .verify(ticket, authid, socket, &tunnel.instance, unix_now())
        .map_err(denied)?;
    if !tunnel.may_forward_to(Path::new(socket)) {
        return Err(Error::Forbidden(format!(
            "socket '{socket}' is not a socket of an open tunnel of VM {vmid}"
        )));
    }
    Ok(tunnel)
}

/// Runs one tunnel command to completion without holding a runtime worker. A command
/// has long synchronous stretches (parsing and dropping a 16 MiB line, schema checks, Lua,
/// host checks) during which the worker's queued tasks, the API's included, would wait; on
/// the multi-thread runtime the thread first hands those to another worker
/// (`block_in_place`). A current-thread runtime (library tests) just awaits.
pub(crate) async fn off_runtime<F: std::future::Future>(fut: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| handle.block_on(fut))
    } else {
        fut.await
    }
}

/// What `POST .../mtunnel` returns.
pub struct Opened {
    pub upid: Upid,
    pub ticket: String,
    pub socket: PathBuf,
}

impl Opened {
    pub fn to_json(&self) -> Value {
        json!({
            "upid": self.upid.to_string(),
            "ticket": self.ticket,
            "socket": self.socket.display().to_string(),
        })
    }
}

/// What every tunnel open checks first, in PVE's order: the token's privileges, a free
/// slot under `max_tunnels` (held by the returned [`Slot`]), and space on each storage.
fn admit(tunnels: &Tunnels, authid: &str, vmid: u32, storages: &[String]) -> Result<Slot> {
    let svc = &tunnels.services;
    svc.host
        .require(authid, &format!("/vms/{vmid}"), "VM.Allocate")?;
    svc.host.require(authid, "/", "Sys.Incoming")?;
    let slot = tunnels
        .registry
        .take_slot(svc.host.cfg.max_tunnels)
        .ok_or_else(|| {
            Error::Unavailable(format!(
                "too many open tunnels on node '{}' (max_tunnels = {}) - try again later",
                svc.host.cfg.node, svc.host.cfg.max_tunnels
            ))
        })?;
    for storage in storages {
        svc.host.check_storage_for_images(authid, storage)?;
    }
    Ok(slot)
}

/// Opens a tunnel for `vmid`: checks privileges, storages and bridges, reserves the VMID
/// with an empty config locked `create`, binds the control socket, starts the worker task
/// and mints the ticket for the control socket. Nothing is left behind on failure.
pub async fn open(
    tunnels: &Arc<Tunnels>,
    authid: &str,
    vmid: u32,
    storages: &[String],
    bridges: &[String],
) -> Result<Opened> {
    let svc = &tunnels.services;
    let slot = admit(tunnels, authid, vmid, storages)?;
    for bridge in bridges {
        if !svc.host.cfg.bridge_exists(bridge) {
            return Err(Error::internal(format!(
                "bridge '{bridge}' does not exist on node '{}'",
                svc.host.cfg.node
            )));
        }
    }

    // Names this reservation in the config's origin and in the journal: recovery proves
    // with it that a config is the one this tunnel made.
    let reservation = format!("{:032x}", rand::random::<u128>());
    svc.host
        .guests
        .create_and_lock(vmid, "create", &reservation)
        .await
        .map_err(|e| Error::param("vmid", format!("unable to create empty VM config - {e}")))?;
    if let Some(registry) = &svc.host.vmid_registry
        && let Err(refusal) = registry.reserve_for_tunnel(vmid).await
    {
        remove_reserved_config(&svc.host.guests, vmid).await;
        return Err(match refusal {
            Refusal::Taken(e) => {
                Error::param("vmid", format!("unable to create empty VM config - {e}"))
            }
            Refusal::Unanswered(msg) => Error::internal(msg),
        });
    }

    let start = WorkerStart {
        reservation,
        ..WorkerStart::default()
    };
    match start_worker(tunnels, authid, vmid, start, slot).await {
        Ok(opened) => Ok(opened),
        Err(e) => {
            remove_reserved_config(&svc.host.guests, vmid).await;
            if let Some(registry) = &svc.host.vmid_registry {
                registry.finish(vmid, svc.host.guests.exists(vmid)).await;
            }
            Err(e)
        }
    }
}

/// How a tunnel's journal starts: a new VMID (reserved `create`), or an existing replica.
struct WorkerStart {
    /// The config's origin (see [`journal::Created::reservation`]).
    reservation: String,
    expected_lock: String,
    /// An existing replica: nothing of it is ever destroyed by this tunnel.
    committed: bool,
    replica: bool,
}

impl Default for WorkerStart {
    fn default() -> Self {
        WorkerStart {
            reservation: String::new(),
            expected_lock: "create".into(),
            committed: false,
            replica: false,
        }
    }
}

/// Opens a tunnel for a replica run (`replica=1`, docs/replicas.md): a VMID without a
/// config is reserved as for a migration ([`open`]); a VMID that holds a replica (config
/// locked `replica`, with the origin its first run reserved it under) is reopened: the
/// journal then expects `replica` and counts the replica as committed (a failed run frees
/// its NBD servers and sockets, never a completed point or a working copy).
pub async fn open_replica(
    tunnels: &Arc<Tunnels>,
    authid: &str,
    vmid: u32,
    storages: &[String],
) -> Result<Opened> {
    let svc = &tunnels.services;
    if !svc.host.guests.exists(vmid) {
        return open(tunnels, authid, vmid, storages, &[]).await;
    }
    let slot = admit(tunnels, authid, vmid, storages)?;
    let not_replica = || {
        Error::param(
            "vmid",
            format!(
                "VM {vmid} exists on node '{}' and is not a replica (lock 'replica')",
                svc.host.cfg.node
            ),
        )
    };
    let guard = svc
        .host
        .guests
        .lock(vmid, crate::guest::store::DEFAULT_LOCK_TIMEOUT)
        .await
        .map_err(|e| Error::internal(e.to_string()))?;
    let text = svc.host.guests.read_text(vmid).map_err(|_| not_replica())?;
    let conf = crate::guest::VmConfig::parse(&text).map_err(|_| not_replica())?;
    if conf.options.get("lock").map(String::as_str) != Some("replica") {
        return Err(not_replica());
    }
    if tunnels.registry.get(vmid).is_some() {
        return Err(Error::param(
            "vmid",
            format!("a tunnel of VM {vmid} is open: one replica run at a time"),
        ));
    }
    let reservation = svc.host.guests.origin(vmid).ok_or_else(not_replica)?;
    let start = WorkerStart {
        reservation,
        expected_lock: "replica".into(),
        // What the replica holds was there before this tunnel: never destroyed by it.
        committed: true,
        replica: true,
    };
    // The config lock is held until the tunnel is registered: a second `replica=1` open
    // of the VMID waits for it, then finds the tunnel and is refused.
    let opened = start_worker(tunnels, authid, vmid, start, slot).await;
    drop(guard);
    opened
}

/// Binds the control socket, writes the journal (under `start.reservation`, the config's
/// origin) and starts the tunnel's task, which holds `slot` until it ends; older journals
/// of the VMID are retired first.
async fn start_worker(
    tunnels: &Arc<Tunnels>,
    authid: &str,
    vmid: u32,
    start: WorkerStart,
    slot: Slot,
) -> Result<Opened> {
    let svc = &tunnels.services;
    let socket = svc.host.cfg.tunnel_socket(vmid);
    let socket_str = socket
        .to_str()
        .ok_or_else(|| Error::internal("run directory is not valid UTF-8"))?
        .to_string();
    // Checked before anything is created; the ticket itself needs the UPID.
    crate::auth::ticket::normalize_path(&format!("/socket/{socket_str}"))
        .map_err(|e| Error::internal(format!("{e} '{socket_str}'")))?;
    crate::util::ensure_dir(&svc.host.cfg.run_dir, 0o755)?;

    // Volumes of this VMID made from now on are the tunnel's (the VMID is reserved). A
    // storage that cannot be listed makes that unknowable: refuse rather than guess.
    let preexisting = match svc.host.storage.volumes_by_storage(vmid).await {
        Ok(by_storage) => by_storage,
        // A backend that cannot list at all (scripted): only recorded volumes are freed.
        Err(crate::storage::StorageError::Unsupported(_)) => Default::default(),
        Err(e) => {
            return Err(Error::internal(format!(
                "cannot list the existing volumes of VM {vmid}: {e} - refusing the tunnel, \
                 as a failed migration could not tell its volumes from older ones"
            )));
        }
    };
    let log = svc.tasks.create("qmtunnel", &vmid.to_string(), authid)?;
    // The VMID had no config until this tunnel reserved it: what older journals of it
    // describe is over, and must never be taken for this tunnel's.
    let why = format!("VM {vmid} was reserved anew by tunnel {}", log.upid());
    for line in journal::retire(
        &svc.host.cfg.journal_dir(),
        &svc.host.cfg.run_dir,
        vmid,
        &why,
    ) {
        log.log(&line);
    }
    let created = Created {
        vmid,
        upid: log.upid().to_string(),
        owner: journal::Owner::current(),
        preexisting,
        reservation: start.reservation,
        expected_lock: Some(start.expected_lock),
        committed: start.committed,
        replica: start.replica,
        sockets: vec![socket.clone()],
        ..Created::default()
    };
    let bound = journal::store_async(svc.host.cfg.journal_dir(), created.clone())
        .await
        .map_err(|e| Error::internal(format!("cannot write the tunnel journal: {e:#}")))
        .and_then(|()| bind_control_socket(&socket));
    let listener = match bound {
        Ok(b) => b,
        Err(e) => {
            journal::remove(&svc.host.cfg.journal_dir(), &created.upid);
            let msg = e.to_string();
            svc.tasks
                .spawn(log, move |_, _| async move { Err(anyhow::anyhow!(msg)) });
            return Err(e);
        }
    };
    let instance = log.upid().to_string();
    let ticket = match svc
        .host
        .tickets
        .assemble(authid, &socket_str, &instance, unix_now())
    {
        Ok(ticket) => ticket,
        Err(e) => {
            let msg = format!("{e} '{socket_str}'");
            let _ = std::fs::remove_file(&socket);
            journal::remove(&svc.host.cfg.journal_dir(), &created.upid);
            let err = msg.clone();
            svc.tasks
                .spawn(log, move |_, _| async move { Err(anyhow::anyhow!(err)) });
            return Err(Error::internal(msg));
        }
    };
    log.log("mtunnel started");
    let tunnel = Arc::new(Tunnel {
        vmid,
        authid: authid.to_string(),
        instance,
        control_socket: socket.clone(),
        sockets: Mutex::new(BTreeSet::new()),
        control_claimed: AtomicBool::new(false),
        control_end: tokio::sync::watch::Sender::new(None),
        activity: status::Activity::default(),
    });
    tunnels.registry.insert(Arc::clone(&tunnel));
    svc.host.metrics.tunnel_opened();
    let layer = Arc::clone(tunnels);
    let upid = svc.tasks.spawn(log, move |log, stop| async move {
        let upid = created.upid.clone();
        let result = worker::run(&layer, &tunnel, listener, &log, created, stop).await;
        layer.registry.remove(&tunnel);
        let svc = &layer.services;
        // The VMID stays registered for good if the VM stayed (migration completed, or a
        // cleanup left it), else its entry goes.
        if let Some(registry) = &svc.host.vmid_registry {
            registry.finish(vmid, svc.host.guests.exists(vmid)).await;
        }
        svc.host.metrics.tunnel_closed();
        // The journal goes once nothing is left to free: freed, or kept for good. After
        // an incomplete cleanup it stays for the recovery at the next start.
        let dir = svc.host.cfg.journal_dir();
        match journal::load(&dir, &upid) {
            Some(c) if !c.released && !c.committed => {
                let abandoned = Created {
                    abandoned: true,
                    ..c
                };
                if let Err(e) = journal::store_async(dir, abandoned).await {
                    tracing::warn!(upid, "marking the journal abandoned: {e:#}");
                }
            }
            _ => journal::remove(&dir, &upid),
        }
        // Freed last: the next tunnel starts after this one is completely gone.
        drop(slot);
        result
    });
    Ok(Opened {
        upid,
        ticket,
        socket,
    })
}

/// Binds the control socket (replacing a stale file).
fn bind_control_socket(socket: &Path) -> Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| Error::internal(format!("unable to bind {}: {e}", socket.display())))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    Ok(listener)
}

/// Graceful shutdown: asks every open tunnel to stop (each runs its cleanup after the
/// command it is running) and waits up to `shutdown_timeout` for all to end. Returns how
/// many are still open then; their journals let the next start finish the job.
pub async fn shutdown(svc: &Services) -> usize {
    let asked = svc.tasks.request_stop_all();
    if asked > 0 {
        tracing::info!("asked {asked} task(s) to stop; waiting for their cleanup");
    }
    // Tasks, not the registry: a task is done once its log has its final line.
    svc.tasks.wait_idle(svc.host.cfg.shutdown_timeout).await
}

/// Removes the empty config `open` created, if it still is that empty reserved config.
pub(crate) async fn remove_reserved_config(guests: &ConfigStore, vmid: u32) -> bool {
    let Ok(guard) = guests
        .lock(vmid, crate::guest::store::DEFAULT_LOCK_TIMEOUT)
        .await
    else {
        return false;
    };
    match guests.read_text(vmid) {
        Ok(text) if text.trim() == "lock: create" => guests.remove_locked(&guard).is_ok(),
        _ => false,
    }
}
