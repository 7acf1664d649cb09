//! The `/nodes/{node}/qemu/{vmid}` area: `POST .../mtunnel` opens a tunnel
//! ([`crate::tunnel::open`]); `GET .../mtunnelwebsocket?socket=&ticket=` has
//! [`crate::tunnel::authorize_socket`] check the request (VM, live tunnel owned by this
//! token, ticket of that tunnel instance, socket of that tunnel), claims the control socket
//! for exactly one WebSocket, connects the UNIX socket, and only then answers 101 and
//! starts forwarding. Lenient like pveproxy: no `Connection: Upgrade` needed, subprotocols
//! echoed if asked.

use std::path::PathBuf;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodFilter;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::Areas;
use crate::api::endpoint::{self, Access, Call, Endpoint, PathParam, Precedence, Reply};
use crate::api::reply::Data;
use crate::error::Error;
use crate::metrics::AuthFailure;
use crate::net::relay::{self, RelayOpts, Role, Upgraded};
use crate::schema::{Prop, props};
use crate::tunnel::Tunnel;

pub(super) fn routes() -> Areas {
    Areas::new()
        .route(
            "/api2/{fmt}/nodes/{node}/qemu/{vmid}/mtunnel",
            endpoint::route(MethodFilter::POST, &MTUNNEL, mtunnel),
        )
        .route(
            "/api2/{fmt}/nodes/{node}/qemu/{vmid}/mtunnelwebsocket",
            endpoint::get(&WEBSOCKET, websocket),
        )
}

/// `POST /nodes/{node}/qemu/{vmid}/mtunnel`: PVE's privileges, checked after the
/// parameters as this endpoint always answered (and again by the tunnel layer, which
/// trusts no caller).
static MTUNNEL: Endpoint = Endpoint {
    params: || {
        props([
            (
                "storages",
                Prop::string().format("pve-storage-id-list").optional(),
            ),
            (
                "bridges",
                Prop::string().format("pve-bridge-id-list").optional(),
            ),
            // mtunnel's extension (docs/replicas.md): a replica run, which may reopen a
            // replica.
            ("replica", Prop::boolean().optional()),
        ])
    },
    path: &[PathParam::Node, PathParam::Vmid],
    access: Access::All(&[("/vms/{vmid}", "VM.Allocate"), ("/", "Sys.Incoming")]),
    precedence: Precedence::ParamsFirst,
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct MtunnelArgs {
    vmid: u32,
    storages: Option<String>,
    bridges: Option<String>,
    #[serde(default)]
    replica: bool,
}

async fn mtunnel(call: Call<MtunnelArgs>) -> Result<Data, Error> {
    let args = &call.args;
    let (storages, bridges) = (id_list(&args.storages), id_list(&args.bridges));
    let tunnels = &call.st.tunnels;
    if args.replica && !bridges.is_empty() {
        // A replica keeps the source's config as it is; nothing would check these.
        return Err(Error::param(
            "bridges",
            "not used with replica=1 (a replica keeps the source's NICs; 'vm start' checks their bridges once it is promoted)",
        ));
    }
    let opened = if args.replica {
        crate::tunnel::open_replica(tunnels, call.authid(), args.vmid, &storages).await?
    } else {
        crate::tunnel::open(tunnels, call.authid(), args.vmid, &storages, &bridges).await?
    };
    Ok(Data::new(opened.to_json()))
}

/// The ids of a checked `pve-storage-id-list` / `pve-bridge-id-list` parameter, each once.
fn id_list(list: &Option<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in crate::ident::split_id_list(list.as_deref().unwrap_or("")) {
        if !out.iter().any(|o| o == id) {
            out.push(id.to_string());
        }
    }
    out
}

/// `GET /nodes/{node}/qemu/{vmid}/mtunnelwebsocket`: the tunnel's ticket decides.
static WEBSOCKET: Endpoint = Endpoint {
    params: || props([("socket", Prop::string()), ("ticket", Prop::string())]),
    path: &[PathParam::Node, PathParam::Vmid],
    ..Endpoint::PLAIN
};

#[derive(Deserialize)]
struct WebsocketArgs {
    vmid: u32,
    socket: String,
    ticket: String,
}

async fn websocket(mut call: Call<WebsocketArgs>) -> Result<Reply, Error> {
    let st = Arc::clone(&call.st);
    let (socket, key, tunnel) = match check(&call) {
        Ok(ok) => ok,
        Err(e) => {
            if matches!(e, Error::Unauthorized(_)) {
                st.node.metrics.auth_failure(AuthFailure::BadTicket);
                tokio::time::sleep(st.node.cfg.auth_failure_delay).await;
            }
            return Err(e);
        }
    };
    let Some(key) = key else {
        let socket = socket.display().to_string();
        return Ok(Data::new(json!({ "socket": socket })).into());
    };
    // Before connecting: the worker accepts only one connection, which a refused upgrade
    // (HTTP/1.0, say) must not use up.
    let Some(on_upgrade) = call.req.upgrade.take() else {
        return Err(Error::BadRequest("connection cannot be upgraded".into()));
    };
    let unix = connect(&tunnel, &socket).await?;
    let stream = crate::metrics::Stream::of_socket(&socket, &tunnel.control_socket);
    let counters = st.node.metrics.byte_counters(stream);
    // Counted per tunnel too (the status page), open from before the 101 until the relay ends.
    let (counters, connection) = tunnel.activity.connect(&socket, stream, counters);
    let relay = Relay {
        vmid: call.args.vmid,
        socket,
        tunnel,
        unix,
        opts: RelayOpts {
            peer_timeout: Some(st.node.cfg.peer_timeout),
            counters,
        },
        _connection: connection,
    };
    tokio::spawn(relay.run(on_upgrade));
    Ok(switching_protocols(&key, &call.req.headers).into())
}

/// All checks before an upgrade; returns the socket, the client key (for upgrades) and
/// the tunnel the socket belongs to.
fn check(call: &Call<WebsocketArgs>) -> Result<(PathBuf, Option<String>, Arc<Tunnel>), Error> {
    let headers = &call.req.headers;
    let wants_upgrade = (headers.get(header::UPGRADE))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = if wants_upgrade {
        let version = (headers.get(header::SEC_WEBSOCKET_VERSION)).and_then(|v| v.to_str().ok());
        if version != Some("13") {
            return Err(Error::BadRequest("unsupported websocket-version".into()));
        }
        let key = (headers.get(header::SEC_WEBSOCKET_KEY))
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::BadRequest("missing Sec-WebSocket-Key".into()))?;
        Some(key.to_string())
    } else {
        None
    };
    let args = &call.args;
    let tunnel = crate::tunnel::authorize_socket(
        &call.st.tunnels,
        call.authid(),
        args.vmid,
        &args.socket,
        &args.ticket,
    )?;
    Ok((PathBuf::from(&args.socket), key, tunnel))
}

/// Connects the tunnel's UNIX socket. The worker accepts one control connection; a second
/// connect would still succeed (the kernel queues it) and get a 101 for a socket nobody
/// serves, so the control socket is claimed first.
async fn connect(tunnel: &Tunnel, socket: &PathBuf) -> Result<UnixStream, Error> {
    let is_control = *socket == tunnel.control_socket;
    if is_control && !tunnel.claim_control() {
        return Err(Error::internal(format!(
            "unable to connect to socket '{}' - the control socket of VM {} is already connected",
            socket.display(),
            tunnel.vmid
        )));
    }
    UnixStream::connect(socket).await.map_err(|e| {
        if is_control {
            tunnel.release_control();
        }
        Error::internal(format!(
            "unable to connect to socket '{}' - {e}",
            socket.display()
        ))
    })
}

/// The 101 that completes the handshake.
fn switching_protocols(key: &str, request: &HeaderMap) -> Response {
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(proto) = request.get(header::SEC_WEBSOCKET_PROTOCOL) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, proto.clone());
    }
    response
}

/// One WebSocket's relay to its connected UNIX socket, run once the upgrade completes.
struct Relay {
    vmid: u32,
    socket: PathBuf,
    tunnel: Arc<Tunnel>,
    unix: UnixStream,
    opts: RelayOpts,
    /// The connection as the status page counts it.
    _connection: crate::tunnel::status::Connection,
}

impl Relay {
    async fn run(self, on_upgrade: OnUpgrade) {
        let Relay {
            vmid,
            socket,
            tunnel,
            unix,
            opts,
            _connection,
        } = self;
        let is_control = socket == tunnel.control_socket;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(vmid, "websocket upgrade failed: {e}");
                if is_control {
                    tunnel.control_relay_ended(Some(format!("websocket upgrade failed: {e}")));
                }
                return;
            }
        };
        // A plain-TCP WebSocket (`tls = false`) hands its TCP stream and the bytes hyper
        // read past the handshake to the relay, which then splices it.
        let (ws, leftover) = match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
            Ok(plain) => (
                Upgraded::Plain(plain.io.into_inner()),
                plain.read_buf.to_vec(),
            ),
            Err(upgraded) => (Upgraded::Other(TokioIo::new(upgraded)), Vec::new()),
        };
        let relayed = relay::relay(ws, leftover, Role::Server, unix, opts).await;
        if is_control {
            // Before anything else: the worker waits for this to name why it lost the source.
            tunnel.control_relay_ended(relayed.as_ref().err().map(|e| e.to_string()));
        }
        match relayed {
            Ok(stats) => tracing::debug!(
                vmid,
                socket = %socket.display(),
                to_socket = stats.to_socket,
                from_socket = stats.from_socket,
                "websocket forward finished"
            ),
            Err(e) => {
                tracing::info!(vmid, socket = %socket.display(), "websocket forward ended: {e}")
            }
        }
    }
}
