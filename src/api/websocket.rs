//! `GET .../mtunnelwebsocket?socket=&ticket=`: has [`crate::tunnel::authorize_socket`]
//! check the request (VM, live tunnel owned by this token, ticket of that tunnel instance,
//! socket of that tunnel), claims the control socket for exactly one WebSocket, connects the
//! UNIX socket, and only then answers 101 and starts forwarding.
//! Lenient like pveproxy: no `Connection: Upgrade` needed, subprotocols echoed if asked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::AppState;
use super::reply::Data;
use super::request::{ApiReq, Props};
use super::routes::{finish, parse_vmid, path_param};
use crate::error::Error;
use crate::metrics::AuthFailure;
use crate::schema::{Prop, props};
use crate::tunnel::{Tunnel, forward};

pub(super) async fn mtunnelwebsocket(
    State(st): State<Arc<AppState>>,
    Path(p): Path<HashMap<String, String>>,
    mut req: ApiReq,
) -> Response {
    let wants_upgrade = req
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let checked = check(&st, &p, &req, wants_upgrade).await;
    let (socket, key, tunnel) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            if matches!(e, Error::Unauthorized(_)) {
                st.node.metrics.auth_failure(AuthFailure::BadTicket);
                tokio::time::sleep(st.node.cfg.auth_failure_delay).await;
            }
            return finish(&p, &req, Err(e));
        }
    };
    let Some(key) = key else {
        return finish(
            &p,
            &req,
            Ok(Data::new(json!({"socket": socket.display().to_string()}))),
        );
    };
    // Before connecting: the worker accepts only one connection, which a refused upgrade
    // (HTTP/1.0, say) must not use up.
    let Some(on_upgrade) = req.upgrade.take() else {
        return finish(
            &p,
            &req,
            Err(Error::BadRequest("connection cannot be upgraded".into())),
        );
    };
    // The worker accepts one control connection; a second connect would still succeed
    // (the kernel queues it) and get a 101 for a socket nobody serves.
    let is_control = socket == tunnel.control_socket;
    if is_control && !tunnel.claim_control() {
        let err = Error::internal(format!(
            "unable to connect to socket '{}' - the control socket of VM {} is already connected",
            socket.display(),
            tunnel.vmid
        ));
        return finish(&p, &req, Err(err));
    }
    let unix = match UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e) => {
            if is_control {
                tunnel.release_control();
            }
            let err = Error::internal(format!(
                "unable to connect to socket '{}' - {e}",
                socket.display()
            ));
            return finish(&p, &req, Err(err));
        }
    };
    let vmid = path_param(&p, "vmid").to_string();
    let stream = crate::metrics::Stream::of_socket(&socket, &tunnel.control_socket);
    let counters = st.node.metrics.byte_counters(stream);
    // Counted per tunnel too (the status page), open until the relay ends.
    let (counters, connection) = tunnel.activity.connect(&socket, stream, counters);
    let opts = forward::RelayOpts {
        peer_timeout: Some(st.node.cfg.peer_timeout),
        counters,
    };
    tokio::spawn(async move {
        let _connection = connection;
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
        // A plain-TCP WebSocket (`tls = false`) moves its payload with splice(2).
        let role = forward::Role::Server;
        let relayed = match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
            Ok(plain) => {
                let tcp = plain.io.into_inner();
                let leftover = plain.read_buf.to_vec();
                crate::tunnel::splice::relay_spliced(tcp, leftover, role, unix, opts).await
            }
            Err(upgraded) => {
                let (read, write) = unix.into_split();
                let io = TokioIo::new(upgraded);
                forward::relay_with(io, Vec::new(), role, read, write, opts).await
            }
        };
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
    });

    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(proto) = req.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, proto.clone());
    }
    response
}

/// `GET /nodes/{node}/qemu/{vmid}/mtunnelwebsocket`.
static PARAMS: LazyLock<Props> =
    LazyLock::new(|| props([("socket", Prop::string()), ("ticket", Prop::string())]));

/// All checks before an upgrade; returns the socket, the client key (for upgrades) and
/// the tunnel the socket belongs to.
async fn check(
    st: &AppState,
    p: &HashMap<String, String>,
    req: &ApiReq,
    wants_upgrade: bool,
) -> Result<(PathBuf, Option<String>, Arc<Tunnel>), Error> {
    req.params.only_declared(&PARAMS)?;
    st.node.check_node(path_param(p, "node"))?;
    let vmid = parse_vmid(path_param(p, "vmid"))?;
    let params = req.params.checked(&PARAMS)?;
    let text = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (socket, ticket) = (text("socket"), text("ticket"));
    let key = if wants_upgrade {
        let version = req
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .and_then(|v| v.to_str().ok());
        if version != Some("13") {
            return Err(Error::BadRequest("unsupported websocket-version".into()));
        }
        let key = req
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::BadRequest("missing Sec-WebSocket-Key".into()))?;
        Some(key.to_string())
    } else {
        None
    };
    let tunnel = crate::tunnel::authorize_socket(&st.tunnels, &req.authid, vmid, &socket, &ticket)?;
    Ok((PathBuf::from(socket), key, tunnel))
}
