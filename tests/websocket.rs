//! The tunnel WebSocket (`GET .../mtunnelwebsocket`) of the real binary, as the Proxmox
//! tunnel client and pveproxy's rules shape it: the control channel, lenient handshakes
//! (no `Connection: Upgrade`, subprotocols echoed), hand-built frames (all-zero masks, split
//! and joined lines, text frames, frames over 128 KiB, pings), close → EOF for the worker,
//! every refused ticket or socket (exact status and message), a stalled client next to a
//! working one, the largest command line, and what `GET /nodes/{node}/mtunnel-status`
//! counts of a tunnel's streams. No latency is asserted here: `mtunnel bench` measures it.
//!
//! The relay's byte-exactness over >1 GiB (hashed on both ends) is tested in-process at the
//! library level, where both ends are under the test's control; the data sockets (imports,
//! NBD, migration) are exercised over HTTP in `transcript.rs`, `tunnel_cli.rs` and
//! `migration.rs`; here only a `qcow2+size` import cut off halfway (clean close and dropped
//! connection), which must end as an error.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    NODE, Options, TestServer, Tunnel, bounded, mint_tunnel_ticket, now, pct, random_qcow2,
};
use futures_util::{SinkExt, StreamExt};
use mtunnel::client::ApiError;
use mtunnel::net::ws::WsStream;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const VERSION_CMD: &[u8] = b"{\"cmd\":\"version\"}\n";

fn version_reply() -> Value {
    json!({"api": 2, "age": 0, "success": true})
}

/// Reads binary messages until a full line is buffered; returns it without the newline.
/// Lines may be cut anywhere by the server; `pending` keeps what follows the line.
async fn ws_line<S>(ws: &mut WebSocketStream<S>, pending: &mut Vec<u8>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            return String::from_utf8(line[..pos].to_vec()).unwrap();
        }
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => pending.extend_from_slice(&data),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

async fn ws_json<S>(ws: &mut WebSocketStream<S>, pending: &mut Vec<u8>) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let line = ws_line(ws, pending).await;
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply '{line}' is not JSON: {e}"))
}

/// Sends a command line and returns the reply.
async fn roundtrip(ws: &mut WsStream, line: &[u8]) -> Value {
    ws.send(Message::binary(line.to_vec())).await.unwrap();
    ws_json(ws, &mut Vec::new()).await
}

#[tokio::test]
async fn control_channel_version_and_error_lines() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        assert_eq!(
            roundtrip(&mut ws, b"{\"cmd\":\"bogus\"}\n").await,
            json!({"success": false, "msg": "unknown command 'bogus' given"})
        );
        assert_eq!(
            roundtrip(&mut ws, b"{\"foo\":1}\n").await,
            json!({"success": false, "msg": "'cmd' missing"})
        );
        let garbled = roundtrip(&mut ws, b"nope\n").await;
        assert_eq!(garbled["success"], false);
        assert!(
            garbled["msg"]
                .as_str()
                .unwrap()
                .starts_with("failed to parse command - "),
            "{garbled}"
        );
        // Text frames carry bytes just like binary ones.
        ws.send(Message::text("{\"cmd\":\"version\"}\n"))
            .await
            .unwrap();
        assert_eq!(ws_json(&mut ws, &mut Vec::new()).await, version_reply());
        // The task is running while the tunnel is connected.
        let status = server
            .client()
            .get(&format!("/nodes/{NODE}/tasks/{}/status", t.upid), &[])
            .await
            .unwrap();
        assert_eq!(status["status"], "running");
    })
    .await
}

// ---- hand-made handshakes and frames ----

/// The head of an HTTP response: status line and headers (names lower-cased).
#[derive(Debug)]
struct Head {
    status_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Writes an upgrade request with exactly `headers` (plus Host) and reads the response
/// head byte by byte, so nothing after it is consumed.
async fn raw_upgrade<S>(stream: &mut S, host: &str, target: &str, headers: &[String]) -> Head
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.trim_end().split("\r\n");
    let status_line = lines.next().unwrap().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Head {
        status_line,
        headers,
    }
}

/// The upgrade headers `proxmox-websocket-tunnel` sends: no `Connection`, no subprotocol.
fn tunnel_client_headers(token: &str) -> Vec<String> {
    vec![
        format!("Authorization: {token}"),
        "Upgrade: websocket".into(),
        "Sec-WebSocket-Version: 13".into(),
        format!("Sec-WebSocket-Key: {KEY}"),
    ]
}

fn ws_target(t: &Tunnel) -> String {
    format!(
        "/api2/json/nodes/{NODE}/qemu/{}/mtunnelwebsocket?ticket={}&socket={}",
        t.vmid,
        pct(&t.ticket),
        pct(&t.socket)
    )
}

async fn tls_to(server: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = mtunnel::net::tls::client_config(Some(&server.fingerprint)).unwrap();
    mtunnel::net::tls::connect(&server.host, server.port, &config)
        .await
        .unwrap()
}

/// One client frame, FIN set, masked with `mask` (`None`: unmasked).
fn frame(opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// The zero-mask binary frame the Rust tunnel client writes.
fn zero_mask(payload: &[u8]) -> Vec<u8> {
    frame(0x2, Some([0; 4]), payload)
}

/// Reads one server frame: (first byte, payload). Server frames must be unmasked.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (h[0], payload)
}

/// Reads data frames (each must be a FIN binary frame, 0x82) until `n` lines are complete.
async fn read_lines<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<Value> {
    let mut buf = Vec::new();
    while buf.iter().filter(|&&b| b == b'\n').count() < n {
        let (first, payload) = read_frame(s).await;
        assert_eq!(first, 0x82, "data must come as FIN binary frames");
        buf.extend_from_slice(&payload);
    }
    let text = String::from_utf8(buf).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n, "{text}");
    lines
}

#[tokio::test]
async fn handshake_without_connection_upgrade_and_raw_frames() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut tls = tls_to(&server).await;
        let host = format!("{}:{}", server.host, server.port);
        let head = raw_upgrade(
            &mut tls,
            &host,
            &ws_target(&t),
            &tunnel_client_headers(&server.root_token),
        )
        .await;
        assert_eq!(head.status_line, "HTTP/1.1 101 Switching Protocols");
        assert_eq!(head.header("upgrade"), Some("websocket"));
        assert_eq!(head.header("connection"), Some("upgrade"));
        assert_eq!(head.header("sec-websocket-accept"), Some(ACCEPT));
        assert_eq!(head.header("sec-websocket-protocol"), None);

        // 82 92 00 00 00 00 {"cmd":"version"}\n — as captured from the Rust tunnel client.
        let f = zero_mask(VERSION_CMD);
        assert_eq!(&f[..6], &[0x82, 0x92, 0, 0, 0, 0]);
        tls.write_all(&f).await.unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);

        // One line cut across two frames.
        tls.write_all(&zero_mask(b"{\"cmd\":\"ver")).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tls.write_all(&zero_mask(b"sion\"}\n")).await.unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);

        // Two lines in one frame: two replies, in order.
        let two = [VERSION_CMD, b"{\"cmd\":\"nope\"}\n"].concat();
        tls.write_all(&zero_mask(&two)).await.unwrap();
        assert_eq!(
            read_lines(&mut tls, 2).await,
            [
                version_reply(),
                json!({"success": false, "msg": "unknown command 'nope' given"})
            ]
        );

        // A text frame with a random mask, and an unmasked frame (lenient, not PVE's rule).
        tls.write_all(&frame(0x1, Some([0x12, 0x34, 0x56, 0x78]), VERSION_CMD))
            .await
            .unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);
        tls.write_all(&frame(0x2, None, VERSION_CMD)).await.unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);

        // One frame over 128 KiB (pveproxy would drop the connection; we must not).
        let pad = "x".repeat(200 * 1024);
        let big = format!("{{\"cmd\":\"version\",\"pad\":\"{pad}\"}}\n");
        let f = zero_mask(big.as_bytes());
        assert_eq!(f[1], 0x80 | 127);
        tls.write_all(&f).await.unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);

        // Ping → pong with the same payload.
        tls.write_all(&frame(0x9, Some([0; 4]), b"are you there"))
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let (first, payload) = read_frame(&mut tls).await;
        assert_eq!((first, payload.as_slice()), (0x8A, &b"are you there"[..]));

        // The same stream, now driven by tungstenite as a client.
        let mut ws = WebSocketStream::from_raw_socket(tls, Role::Client, None).await;
        assert_eq!(
            roundtrip_generic(&mut ws, VERSION_CMD).await,
            version_reply()
        );
        ws.close(None).await.unwrap();
        let status = server.wait_stopped(&t.upid, 10).await;
        assert_eq!(status["exitstatus"], "mtunnel exited unexpectedly");
    })
    .await
}

async fn roundtrip_generic<S>(ws: &mut WebSocketStream<S>, line: &[u8]) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::binary(line.to_vec())).await.unwrap();
    ws_json(ws, &mut Vec::new()).await
}

#[tokio::test]
async fn subprotocol_is_echoed() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut tls = tls_to(&server).await;
        let mut headers = tunnel_client_headers(&server.root_token);
        headers.push("Connection: keep-alive, Upgrade".into());
        headers.push("Sec-WebSocket-Protocol: binary".into());
        let host = format!("{}:{}", server.host, server.port);
        let head = raw_upgrade(&mut tls, &host, &ws_target(&t), &headers).await;
        assert_eq!(head.status_line, "HTTP/1.1 101 Switching Protocols");
        assert_eq!(head.header("sec-websocket-protocol"), Some("binary"));
        assert_eq!(head.header("sec-websocket-accept"), Some(ACCEPT));
        tls.write_all(&zero_mask(VERSION_CMD)).await.unwrap();
        assert_eq!(read_lines(&mut tls, 1).await, [version_reply()]);
    })
    .await
}

#[tokio::test]
async fn close_ends_worker_with_eof() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        ws.close(None).await.unwrap();
        // The server answers the close with its own (code 1000), then the stream ends;
        // the worker sees EOF and ends.
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert_eq!(frame.code, CloseCode::Normal, "{frame:?}");
            }
            other => panic!("expected the server's close frame, got {other:?}"),
        }
        let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        let status = server.wait_stopped(&t.upid, 10).await;
        assert_eq!(status["exitstatus"], "mtunnel exited unexpectedly");
        assert_eq!(
            server.task_log(&t.upid).await,
            [
                "mtunnel started",
                "received command 'version'",
                "control connection lost before the migration finished: cleaning up",
                "cleanup: removed config of VM 100",
                "TASK ERROR: mtunnel exited unexpectedly"
            ]
        );
        assert!(
            !server.vm_config(100).exists(),
            "reserved config left after the control connection ended"
        );
    })
    .await
}

#[tokio::test]
async fn control_socket_takes_one_connection() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        let err = server.connect_as(&t, &server.root_token).await.unwrap_err();
        let taken = already_connected(&t);
        // What the error displays (a tunnel client's log line) carries the message too.
        assert_eq!(
            err.to_string().trim_end(),
            format!("500 {taken}"),
            "{err:?}"
        );
        assert_refused(Err(err), 500, &taken);
        // The first connection is unaffected.
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
    })
    .await
}

#[tokio::test]
async fn refused_upgrade_leaves_control_socket_unused() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        // HTTP/1.0 cannot upgrade; the refusal must not use up the worker's one connection.
        let mut tls = tls_to(&server).await;
        let host = format!("{}:{}", server.host, server.port);
        let mut req = format!("GET {} HTTP/1.0\r\nHost: {host}\r\n", ws_target(&t));
        for h in tunnel_client_headers(&server.root_token) {
            req.push_str(&h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("HTTP/1.0 400 connection cannot be upgraded\r\n"),
            "{reply}"
        );
        let status = server
            .client()
            .get(&format!("/nodes/{NODE}/tasks/{}/status", t.upid), &[])
            .await
            .unwrap();
        assert_eq!(status["status"], "running", "{status}");
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
    })
    .await
}

#[tokio::test]
async fn plain_get_without_upgrade_returns_socket() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let client = server.client();
        let path = format!("/nodes/{NODE}/qemu/100/mtunnelwebsocket");
        let data = client
            .get(&path, &[("socket", &t.socket), ("ticket", &t.ticket)])
            .await
            .unwrap();
        assert_eq!(data, json!({"socket": t.socket}));
        // proxmoxer-style query: socket first, ticket percent-encoded.
        let r = client
            .raw(
                hyper::Method::GET,
                &format!(
                    "/api2/json{path}?socket={}&ticket={}",
                    pct(&t.socket),
                    pct(&t.ticket)
                ),
                &[],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"data": {"socket": t.socket}}))
        );
        // Parameters are checked without an upgrade too.
        let err = client
            .get(&path, &[("socket", &t.socket)])
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(400));
        assert_eq!(
            err.field_error("ticket"),
            Some("property is missing and it is not optional")
        );
        let err = client
            .get(
                &path,
                &[
                    ("socket", &t.socket),
                    ("ticket", "PVETUNNEL:00000000::AAAA"),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(
            (err.status(), err.reason()),
            (
                Some(401),
                Some("permission denied - invalid PVETUNNEL ticket")
            )
        );
    })
    .await
}

/// What a second connection to the control socket of `t` (VM 100) is refused with.
fn already_connected(t: &Tunnel) -> String {
    format!(
        "unable to connect to socket '{}' - the control socket of VM {} is already connected",
        t.socket, t.vmid
    )
}

/// Expects the upgrade to be refused with `status` and body message `msg`.
#[track_caller]
fn assert_refused(result: Result<WsStream, ApiError>, status: u16, msg: &str) {
    match result {
        Ok(_) => panic!("upgrade accepted, expected {status} {msg}"),
        Err(ApiError::Http {
            status: s, message, ..
        }) => assert_eq!((s, message.as_str()), (status, format!("{msg}\n").as_str())),
        Err(other) => panic!("expected {status} {msg}, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_tickets_and_sockets_are_refused() {
    bounded(90, async {
        let mut server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let t2 = server.open_tunnel(101).await;
        let other = server.create_token("mig@pve!other", &["--role", "PVEMigrationTarget"]);
        let root = server.root_token.clone();
        let try_ws = |vmid: u32, socket: String, ticket: String, token: String| {
            let url = server.ws_url(vmid, &socket, &ticket);
            let fp = server.fingerprint.clone();
            async move {
                let auth = [("Authorization".into(), token)];
                mtunnel::net::ws::connect(&url, &auth, &fp)
                    .await
                    .map_err(ApiError::from)
            }
        };
        const INVALID: &str = "permission denied - invalid PVETUNNEL ticket";
        const ROOT: &str = "root@pam!mtunnel";

        // A hand-minted fresh ticket is accepted (so the minting below is right) ...
        let fresh = mint_tunnel_ticket(&server.data, ROOT, &t2.socket, &t2.upid, now());
        let mut ws = try_ws(101, t2.socket.clone(), fresh, root.clone())
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        drop(ws);

        // ... an expired one (41 s old) or one from too far in the future is not.
        // (+25 s, not +20: the server's clock may already be a second further.)
        for time in [now() - 41, now() + 25] {
            let old = mint_tunnel_ticket(&server.data, ROOT, &t.socket, &t.upid, time);
            assert_refused(
                try_ws(100, t.socket.clone(), old, root.clone()).await,
                401,
                INVALID,
            );
        }
        // Forged signature.
        let forged = format!("{}AAAA", &t.ticket[..t.ticket.len() - 4]);
        assert_refused(
            try_ws(100, t.socket.clone(), forged, root.clone()).await,
            401,
            INVALID,
        );
        // Garbage.
        assert_refused(
            try_ws(100, t.socket.clone(), "garbage".into(), root.clone()).await,
            401,
            INVALID,
        );
        // The ticket of another token: that token did not open the tunnel.
        assert_refused(
            try_ws(100, t.socket.clone(), t.ticket.clone(), other.clone()).await,
            403,
            "permission denied - the tunnel of VM 100 was opened by another user",
        );
        // A ticket for another socket path.
        assert_refused(
            try_ws(100, t.socket.clone(), t2.ticket.clone(), root.clone()).await,
            401,
            INVALID,
        );
        // `..` in the socket: another path for the ticket ...
        let dotdot = format!("{}/../r/100.mtunnel", server.run.display());
        assert_refused(
            try_ws(100, dotdot.clone(), t.ticket.clone(), root.clone()).await,
            401,
            INVALID,
        );
        // ... and with a valid ticket for exactly that path, still not this tunnel's socket.
        let for_dotdot = mint_tunnel_ticket(&server.data, ROOT, &dotdot, &t.upid, now());
        assert_refused(
            try_ws(100, dotdot.clone(), for_dotdot, root.clone()).await,
            403,
            &format!("socket '{dotdot}' is not a socket of an open tunnel of VM 100"),
        );
        // A space in the socket path.
        let spaced = format!("{}/1 00.mtunnel", server.run.display());
        assert_refused(
            try_ws(100, spaced, t.ticket.clone(), root.clone()).await,
            401,
            "permission denied - invalid ticket path",
        );
        // A valid ticket for a socket that is not one of this tunnel's.
        let migrate = format!("{}/100.migrate", server.run.display());
        let ticket = mint_tunnel_ticket(&server.data, ROOT, &migrate, &t.upid, now());
        assert_refused(
            try_ws(100, migrate.clone(), ticket, root.clone()).await,
            403,
            &format!("socket '{migrate}' is not a socket of an open tunnel of VM 100"),
        );
        // Another tunnel's socket under this VMID.
        let ticket = mint_tunnel_ticket(&server.data, ROOT, &t2.socket, &t.upid, now());
        assert_refused(
            try_ws(100, t2.socket.clone(), ticket, root.clone()).await,
            403,
            &format!(
                "socket '{}' is not a socket of an open tunnel of VM 100",
                t2.socket
            ),
        );
        // A VMID without config.
        let s = format!("{}/555.mtunnel", server.run.display());
        let ticket = mint_tunnel_ticket(&server.data, ROOT, &s, &t.upid, now());
        assert_refused(
            try_ws(555, s, ticket, root.clone()).await,
            500,
            &format!("Configuration file 'nodes/{NODE}/qemu-server/555.conf' does not exist"),
        );
        // A bad token never gets to the ticket check.
        assert_refused(
            try_ws(
                100,
                t.socket.clone(),
                t.ticket.clone(),
                "PVEAPIToken=x@pam!y=z".into(),
            )
            .await,
            401,
            "authentication failure - invalid token value",
        );

        // Raw: an unsupported WebSocket version.
        let mut tls = tls_to(&server).await;
        let host = format!("{}:{}", server.host, server.port);
        let mut headers = tunnel_client_headers(&root);
        headers[2] = "Sec-WebSocket-Version: 8".into();
        let head = raw_upgrade(&mut tls, &host, &ws_target(&t), &headers).await;
        assert_eq!(
            head.status_line,
            "HTTP/1.1 400 unsupported websocket-version"
        );

        // After all that, the real ticket still works and the server still serves.
        assert!(server.is_running());
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        server.client().get("/version", &[]).await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_does_not_stall_other_tunnels() {
    bounded(240, async {
        let server = TestServer::start();
        let slow_t = server.open_tunnel(100).await;
        let fast_t = server.open_tunnel(101).await;

        // The slow client: a tiny receive buffer, and it never reads.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock
            .connect(format!("{}:{}", server.host, server.port).parse().unwrap())
            .await
            .unwrap();
        let config = mtunnel::net::tls::client_config(Some(&server.fingerprint)).unwrap();
        let mut slow = tokio_rustls::TlsConnector::from(config)
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let host = format!("{}:{}", server.host, server.port);
        let head = raw_upgrade(
            &mut slow,
            &host,
            &ws_target(&slow_t),
            &tunnel_client_headers(&server.root_token),
        )
        .await;
        assert_eq!(head.status_line, "HTTP/1.1 101 Switching Protocols");
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let writer = tokio::spawn(async move {
            let burst = zero_mask(&VERSION_CMD.repeat(60 * 1024 / VERSION_CMD.len()));
            // Up to 480 MiB of commands; the backend's replies back up long before that (the
            // server's receive buffer alone holds up to `tcp_buffer_mib`, 64 MiB by default).
            for _ in 0..8192 {
                if slow.write_all(&burst).await.is_err() {
                    break;
                }
                counter.fetch_add(burst.len() as u64, Ordering::Relaxed);
            }
            slow
        });

        // The slow tunnel is stuck when the server took no command of it while the other
        // tunnel made 50 round trips and the API answered. Until then the server works
        // through the commands it buffered (megabytes) and its replies fill the buffers
        // towards the client: each round is tried again, and every round checks that the
        // other tunnel and the API answer.
        let mut fast = server.connect(&fast_t).await;
        let mut stuck_at = None;
        for _ in 0..2000 {
            let before = commands_of(&server, 100).await;
            for _ in 0..50 {
                assert_eq!(roundtrip(&mut fast, VERSION_CMD).await, version_reply());
            }
            let v = server.client().get("/version", &[]).await.unwrap();
            assert_eq!(v["repoid"], "mtunnel", "{v}");
            if commands_of(&server, 100).await == before {
                stuck_at = Some(before);
                break;
            }
        }
        let stuck_at = stuck_at.expect("the slow tunnel never stopped taking commands");
        assert!(
            !writer.is_finished(),
            "the slow client wrote all its commands: nothing backed up"
        );
        let last = sent.load(Ordering::Relaxed);
        writer.abort();
        eprintln!("slow tunnel stuck after {stuck_at} commands, {last} bytes of them sent");
    })
    .await
}

// ---- the forwarder at library level: >1 GiB, hashed on both ends ----

/// xorshift64: fast pseudo-random bytes, 8 at a time.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// A TLS WebSocket server in this process whose connections are forwarded by
/// `mtunnel::net::relay::relay` to `unix_path`. Returns its port and fingerprint.
async fn forwarding_server(unix_path: std::path::PathBuf) -> (u16, String) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let fingerprint = mtunnel::util::fingerprint_sha256(&der);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![der], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let unix_path = unix_path.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                // A minimal server handshake, then the server's relay on the raw stream.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    tls.read_exact(&mut byte).await.unwrap();
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap();
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                    key.trim().as_bytes(),
                );
                tls.write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
                let unix = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
                let _ = mtunnel::net::relay::relay(
                    mtunnel::net::relay::Upgraded::Other(tls),
                    Vec::new(),
                    mtunnel::net::relay::Role::Server,
                    unix,
                    mtunnel::net::relay::RelayOpts::default(),
                )
                .await;
            });
        }
    });
    (port, fingerprint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_moves_over_1gib_intact() {
    const UP: u64 = 1100 << 20; // 1.1 GiB, WebSocket → UNIX
    const DOWN: u64 = 256 << 20; // 256 MiB, UNIX → WebSocket
    const MSG: usize = 64 * 1024;
    bounded(240, async {
        let dir = tempfile::Builder::new().prefix("mt").tempdir_in("/tmp").unwrap();
        let unix_path = dir.path().join("far.sock");
        let far = tokio::net::UnixListener::bind(&unix_path).unwrap();
        let (port, fingerprint) = forwarding_server(unix_path).await;
        let url = format!("wss://127.0.0.1:{port}/");

        // Up: the far side hashes whatever arrives until EOF (the client's Close).
        let started = Instant::now();
        let far_up = tokio::spawn(async move {
            let (mut s, _) = far.accept().await.unwrap();
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                let got = s.read(&mut buf).await.unwrap();
                if got == 0 {
                    break;
                }
                n += got as u64;
                hash.update(&buf[..got]);
            }
            (n, hash.finalize(), far, s)
        });
        let mut ws = mtunnel::net::ws::connect(&url, &[], &fingerprint)
            .await
            .unwrap();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut buf = vec![0u8; MSG];
        while sent < UP {
            let len = MSG.min((UP - sent) as usize);
            rng.fill(&mut buf[..len]);
            hash.update(&buf[..len]);
            ws.feed(Message::binary(buf[..len].to_vec())).await.unwrap();
            sent += len as u64;
        }
        ws.flush().await.unwrap();
        ws.close(None).await.unwrap();
        let (n, far_hash, far, far_stream) = far_up.await.unwrap();
        assert_eq!(n, UP);
        assert_eq!(far_hash, hash.finalize(), "bytes changed on the way up");
        drop(far_stream); // lets the forwarder finish
        let up_time = started.elapsed();

        // Down: the far side writes 256 MiB and closes; the client hashes the messages.
        let started = Instant::now();
        let far_down = tokio::spawn(async move {
            let (mut s, _) = far.accept().await.unwrap();
            let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut left = DOWN;
            while left > 0 {
                let len = buf.len().min(left as usize);
                rng.fill(&mut buf[..len]);
                hash.update(&buf[..len]);
                s.write_all(&buf[..len]).await.unwrap();
                left -= len as u64;
            }
            s.shutdown().await.unwrap();
            hash.finalize()
        });
        let mut ws = mtunnel::net::ws::connect(&url, &[], &fingerprint)
            .await
            .unwrap();
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut largest = 0;
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Binary(data) => {
                    largest = largest.max(data.len());
                    got += data.len() as u64;
                    hash.update(&data);
                }
                Message::Close(_) => break,
                other => panic!("unexpected message {other:?}"),
            }
        }
        assert_eq!(got, DOWN);
        assert_eq!(hash.finalize(), far_down.await.unwrap(), "bytes changed on the way down");
        assert!(largest <= mtunnel::net::relay::CHUNK, "message of {largest} bytes");
        let down_time = started.elapsed();
        eprintln!(
            "forwarder: up {} MiB in {up_time:?} ({:.0} MiB/s), down {} MiB in {down_time:?} ({:.0} MiB/s)",
            UP >> 20,
            (UP >> 20) as f64 / up_time.as_secs_f64(),
            DOWN >> 20,
            (DOWN >> 20) as f64 / down_time.as_secs_f64(),
        );
    })
    .await
}

#[tokio::test]
async fn tls_off_serves_plain_http_and_ws() {
    bounded(60, async {
        let server = TestServer::start_with(Options {
            extra_toml: "tls = false\n".into(),
            ..Options::default()
        });
        assert!(
            server.url.starts_with("http://127.0.0.1:") && server.url.ends_with("/api2/json"),
            "{}",
            server.url
        );
        assert!(
            !server.stdout.iter().any(|l| l.starts_with("fingerprint:")),
            "{:?}",
            server.stdout
        );
        let api =
            mtunnel::client::ApiClient::plain("127.0.0.1", server.port, server.root_token.clone());
        assert!(!api.is_tls());
        let v = api.get("/version", &[]).await.unwrap();
        assert_eq!(v["repoid"], "mtunnel");
        let data = api
            .post(&format!("/nodes/{}/qemu/100/mtunnel", NODE), &[])
            .await
            .unwrap();
        let t = Tunnel::from_reply(100, &data);
        let headers = [("Authorization".to_string(), server.root_token.clone())];
        // Both spellings of a plain URL work, and need no fingerprint.
        let url = server
            .ws_url(100, &t.socket, &t.ticket)
            .replace("wss://", "ws://");
        let mut ws = mtunnel::net::ws::connect_opt(&url, &headers, None)
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        // TLS against the plain listener fails cleanly instead of hanging.
        let https = url.replace("ws://", "wss://");
        let fp = "AA:".repeat(31) + "AA";
        let err = mtunnel::net::ws::connect_opt(&https, &headers, Some(&fp))
            .await
            .map_err(ApiError::from)
            .unwrap_err();
        assert!(matches!(err, ApiError::Connect(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "TLS handshake with 127.0.0.1:{} failed - received corrupt message of type \
                 InvalidContentType",
                server.port
            )
        );
        // The control socket accepts one connection only (the first is still open): the
        // second is refused with the server's answer, over HTTP.
        let http = url.replace("ws://", "http://");
        assert_refused(
            (mtunnel::net::ws::connect_opt(&http, &headers, None).await).map_err(ApiError::from),
            500,
            &already_connected(&t),
        );
        ws.close(None).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn qcow2_import_cut_off_over_the_websocket_is_an_error() {
    bounded(120, async {
        let server = TestServer::start();
        let tmp = tempfile::tempdir().unwrap();
        let src = random_qcow2(tmp.path());
        let bytes = std::fs::read(&src).unwrap();
        let half = bytes.len() / 2;
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        let images = server.data.parent().unwrap().join("s/local/images/100");
        // A clean WebSocket close and a connection just dropped both end the stream.
        for clean in [true, false] {
            let cmd = json!({"cmd": "disk-import", "volname": "vm-100-disk-0.qcow2", "format": "qcow2", "export_formats": "qcow2+size", "storage": "local", "with_snapshots": 1});
            let r = roundtrip(&mut ws, format!("{cmd}\n").as_bytes()).await;
            let socket = r["socket"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
            let cmd = json!({"cmd": "ticket", "path": socket});
            let ticket = roundtrip(&mut ws, format!("{cmd}\n").as_bytes()).await;
            let url = server.ws_url(100, &socket, ticket["ticket"].as_str().unwrap());
            let auth = [("Authorization".to_string(), server.root_token.clone())];
            let mut data = mtunnel::net::ws::connect(&url, &auth, &server.fingerprint)
                .await
                .unwrap();
            data.send(Message::binary((64u64 << 20).to_le_bytes().to_vec()))
                .await
                .unwrap();
            for chunk in bytes[..half].chunks(1 << 20) {
                data.send(Message::binary(chunk.to_vec())).await.unwrap();
            }
            if clean {
                data.close(None).await.unwrap();
                while let Some(Ok(_)) = data.next().await {}
            }
            drop(data);
            let mut status = Value::Null;
            for _ in 0..1000 {
                status = roundtrip(&mut ws, b"{\"cmd\":\"query-disk-import\"}\n").await;
                if status["status"] != "pending" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                status,
                json!({"success": true, "status": "error", "msg": format!(
                    "import stream for '{}' ended early: got {half} bytes, the qcow2 image needs at least {}",
                    images.join("vm-100-disk-0.qcow2").display(),
                    bytes.len()
                )}),
                "clean close: {clean}"
            );
            let left = std::fs::read_dir(&images).map(|d| d.count()).unwrap_or(0);
            assert_eq!(left, 0, "the partial image is removed");
        }
    })
    .await
}

// ---- tunnel ownership, ticket instances, one control connection ----

const OWNED_BY_OTHER: &str = "permission denied - the tunnel of VM 600 was opened by another user";
const INVALID_TICKET: &str = "permission denied - invalid PVETUNNEL ticket";

/// A WebSocket to `socket` of VM `vmid` with `ticket`, authenticated with `token`.
async fn ws_with(
    server: &TestServer,
    vmid: u32,
    socket: &str,
    ticket: &str,
    token: &str,
) -> Result<WsStream, ApiError> {
    let url = server.ws_url(vmid, socket, ticket);
    let headers = [("Authorization".to_string(), token.to_string())];
    let ws = mtunnel::net::ws::connect(&url, &headers, &server.fingerprint).await;
    ws.map_err(ApiError::from)
}

/// `POST .../mtunnel` for VM 600 with `token`.
async fn open_600_as(server: &TestServer, token: &str) -> Tunnel {
    let data = server
        .client_with(token)
        .post(&format!("/nodes/{NODE}/qemu/600/mtunnel"), &[])
        .await
        .unwrap();
    Tunnel::from_reply(600, &data)
}

const IMPORT_600: &[u8] = b"{\"cmd\":\"disk-import\",\"volname\":\"vm-600-disk-0.raw\",\"format\":\"raw\",\"export_formats\":\"raw+size\",\"storage\":\"local\",\"with_snapshots\":0,\"allow_rename\":1}\n";

/// Starts an import on the tunnel and returns its socket and a fresh ticket for it.
async fn import_socket_and_ticket(ws: &mut WsStream) -> (String, String) {
    let import = roundtrip(ws, IMPORT_600).await;
    assert_eq!(import["success"], true, "{import}");
    let socket = import["socket"].as_str().unwrap().to_string();
    let line = format!("{}\n", json!({"cmd": "ticket", "path": socket}));
    let reply = roundtrip(ws, line.as_bytes()).await;
    let ticket = reply["ticket"]
        .as_str()
        .unwrap_or_else(|| panic!("no ticket: {reply}"))
        .to_string();
    (socket, ticket)
}

/// Quits with cleanup and waits for the task to end.
async fn quit_and_wait(server: &TestServer, mut ws: WsStream, t: &Tunnel) {
    assert_eq!(
        roundtrip(&mut ws, b"{\"cmd\":\"quit\",\"cleanup\":1}\n").await,
        json!({"success": true})
    );
    ws.close(None).await.unwrap();
    let status = server.wait_stopped(&t.upid, 20).await;
    assert_eq!(
        status["exitstatus"],
        "OK",
        "{status} {:?}",
        server.task_log(&t.upid).await
    );
}

#[tokio::test]
async fn old_tickets_do_not_open_a_later_tunnel_of_the_vmid() {
    bounded(120, async {
        let server = TestServer::start();
        let alice = server.create_token("alice@pve!mig", &["--role", "PVEMigrationTarget"]);
        let bob = server.create_token("bob@pve!mig", &["--role", "PVEMigrationTarget"]);

        // Alice: a tunnel, an import socket with its ticket, then quit with cleanup.
        let a1 = open_600_as(&server, &alice).await;
        let mut ws = server.connect_as(&a1, &alice).await.unwrap();
        let (storage, storage_ticket) = import_socket_and_ticket(&mut ws).await;
        quit_and_wait(&server, ws, &a1).await;

        // Bob opens VM 600: the same socket paths, now his. Within the tickets' 40 s,
        // Alice's old tickets open neither his control socket nor his import.
        let b = open_600_as(&server, &bob).await;
        assert_eq!(b.socket, a1.socket);
        assert_refused(
            ws_with(&server, 600, &a1.socket, &a1.ticket, &alice).await,
            403,
            OWNED_BY_OTHER,
        );
        let mut bws = server.connect_as(&b, &bob).await.unwrap();
        let (b_storage, _) = import_socket_and_ticket(&mut bws).await;
        assert_eq!(b_storage, storage);
        assert_refused(
            ws_with(&server, 600, &storage, &storage_ticket, &alice).await,
            403,
            OWNED_BY_OTHER,
        );
        // Nor do they work with Bob's token (they were minted for Alice).
        assert_refused(
            ws_with(&server, 600, &storage, &storage_ticket, &bob).await,
            401,
            INVALID_TICKET,
        );
        quit_and_wait(&server, bws, &b).await;

        // Alice again: her tickets of the first tunnel are refused by her second one.
        let a2 = open_600_as(&server, &alice).await;
        assert_refused(
            ws_with(&server, 600, &a2.socket, &a1.ticket, &alice).await,
            401,
            INVALID_TICKET,
        );
        let mut ws = server.connect_as(&a2, &alice).await.unwrap();
        let (_, fresh) = import_socket_and_ticket(&mut ws).await;
        assert_refused(
            ws_with(&server, 600, &storage, &storage_ticket, &alice).await,
            401,
            INVALID_TICKET,
        );
        // The second tunnel's own ticket still opens its import socket.
        let data = ws_with(&server, 600, &storage, &fresh, &alice).await;
        assert!(data.is_ok(), "{:?}", data.err());
        drop(data);
        quit_and_wait(&server, ws, &a2).await;
        // A VM without an open tunnel: a clear 403.
        assert!(!server.vm_config(600).exists());
        std::fs::write(server.vm_config(600), "lock: create\n").unwrap();
        assert_refused(
            ws_with(&server, 600, &a2.socket, &a2.ticket, &alice).await,
            403,
            "no open tunnel for VM 600",
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upgrades_get_exactly_one_control_connection() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let attempts = (0..10).map(|_| server.connect_as(&t, &server.root_token));
        let results = futures_util::future::join_all(attempts).await;
        let taken = already_connected(&t);
        let mut winners = Vec::new();
        for result in results {
            match result {
                Ok(ws) => winners.push(ws),
                Err(e) => assert_refused(Err(e), 500, &taken),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one upgrade may win");
        assert_eq!(
            roundtrip(&mut winners[0], VERSION_CMD).await,
            version_reply()
        );
    })
    .await
}

#[tokio::test]
async fn failed_control_connect_releases_the_claim() {
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        // With the socket file moved away the connect fails; the claim must not stick.
        let moved = server.run.join("moved.sock");
        std::fs::rename(&t.socket, &moved).unwrap();
        for _ in 0..2 {
            match server.connect_as(&t, &server.root_token).await {
                Ok(_) => panic!("connected to a missing socket"),
                Err(ApiError::Http {
                    status, message, ..
                }) => {
                    assert_eq!(status, 500);
                    assert_eq!(
                        message,
                        format!(
                            "unable to connect to socket '{}' - No such file or directory (os error 2)\n",
                            t.socket
                        )
                    );
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        std::fs::rename(&moved, &t.socket).unwrap();
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
    })
    .await
}

/// The largest list a line can carry: 1.5 million storages, 13.5 MB (it once held the
/// runtime for seconds). Each is refused with the schema's words and the tunnel and the
/// API keep answering. How fast the API answers meanwhile is a figure for the bench, not
/// a bound for a test on a shared machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_bwlimit_line_is_refused_and_the_tunnel_keeps_answering() {
    bounded(180, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        let mut line = String::from("{\"cmd\":\"bwlimit\",\"storages\":[");
        line.push_str(&vec!["\"local\""; 1_500_000].join(","));
        line.push_str("]}\n");
        for _ in 0..3 {
            for chunk in line.as_bytes().chunks(1 << 20) {
                ws.send(Message::binary(chunk.to_vec())).await.unwrap();
            }
            assert_eq!(
                ws_json(&mut ws, &mut Vec::new()).await,
                json!({"success": false, "msg": "failed to handle 'bwlimit' command - 400 Parameter verification failed.\nstorages: array may contain at most 1024 items, got 1500000\n"})
            );
        }
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        let v = server.client().get("/version", &[]).await.unwrap();
        assert_eq!(v["repoid"], "mtunnel", "{v}");
    })
    .await
}

/// Issue 17 (9): a peer that floods pings and then stops reading fills our pong queue and
/// blocks our writes; that must count against `peer_timeout_secs` like silence does (it
/// did not: the tunnel stayed open for ever). Over TLS (copying relay) and plain TCP
/// (splice relay).
async fn peer_that_stops_reading_is_dropped(tls: bool) {
    let server = TestServer::start_with(Options {
        extra_toml: format!("peer_timeout_secs = 2\ntls = {tls}\n"),
        ..Options::default()
    });
    let vmid = if tls { 141 } else { 142 };
    let t = server.open_tunnel(vmid).await;
    let host = format!("{}:{}", server.host, server.port);
    let mut stream: Box<dyn AsyncStream> = if tls {
        Box::new(tls_to(&server).await)
    } else {
        Box::new(
            tokio::net::TcpStream::connect((server.host.as_str(), server.port))
                .await
                .unwrap(),
        )
    };
    let head = raw_upgrade(
        &mut stream,
        &host,
        &ws_target(&t),
        &tunnel_client_headers(&server.root_token),
    )
    .await;
    assert_eq!(head.status_line, "HTTP/1.1 101 Switching Protocols");
    // Pings with the largest payload, never reading a pong: our writes block once the
    // server's pongs filled the pipe back to us, and stay blocked until the server drops
    // the connection (a write error) or its task ends; no stall of ours is taken as proof.
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| frame(0x9, Some([0; 4]), &[b'p'; 125]))
        .collect();
    let pinging = async {
        for _ in 0..20_000 {
            stream.write_all(&batch).await?;
            stream.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let taken = tokio::select! {
        r = pinging => r,
        _ = server.wait_stopped(&t.upid, 60) => Err(std::io::Error::other("the task ended")),
    };
    assert!(
        taken.is_err(),
        "the server kept taking pings without us reading a pong"
    );
    let status = server.wait_stopped(&t.upid, 30).await;
    assert_ne!(status["exitstatus"], "OK", "{status}");
    let task_log = server.task_log(&t.upid).await;
    assert_eq!(
        task_log.last().map(String::as_str),
        Some(
            "TASK ERROR: mtunnel exited unexpectedly: peer took nothing for 2 s (peer_timeout_secs)"
        ),
        "{task_log:#?}"
    );
    drop(stream);
}

trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_stops_reading_is_dropped_over_tls() {
    bounded(90, peer_that_stops_reading_is_dropped(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_stops_reading_is_dropped_over_plain_tcp() {
    bounded(90, peer_that_stops_reading_is_dropped(false)).await;
}

// ---- GET /nodes/{node}/mtunnel-status (what the status page shows of open tunnels) ----

#[tokio::test]
async fn mtunnel_status_counts_each_tunnels_streams() {
    bounded(60, async {
        let server = TestServer::start();
        let alice = server.create_token("alice@pve!a", &["--privs", "VM.Allocate,Sys.Incoming"]);
        let path = format!("/nodes/{NODE}/mtunnel-status");
        let root_t = server.open_tunnel(100).await;
        let alice_t = open_as(&server, &alice, 200).await;
        let (before, started) = (now(), Instant::now());
        let mut ws = server.connect(&root_t).await;
        ws.send(Message::binary(VERSION_CMD.to_vec()))
            .await
            .unwrap();
        let reply = ws_line(&mut ws, &mut Vec::new()).await;
        let status = server.client().get(&path, &[]).await.unwrap();
        let root_entry = &status["tunnels"][0];
        let uptime = root_entry["streams"][0]["uptime"].as_f64().unwrap();
        assert!(uptime <= started.elapsed().as_secs_f64(), "{status}");
        let commandtime = root_entry["commandtime"].as_u64().unwrap();
        assert!((before..=now()).contains(&commandtime), "{status}");
        let alice_entry = json!({
            "vmid": 200, "upid": alice_t.upid, "user": "alice@pve!a", "connected": 0,
            "commands": 0, "streams": [],
        });
        // Sys.Audit on /nodes/{node}: every tunnel, by VMID; bytes are WebSocket payload.
        assert_eq!(
            status,
            json!({"node": NODE, "tunnels": [
                {
                    "vmid": 100, "upid": root_t.upid, "user": "root@pam!mtunnel",
                    "connected": 1, "command": "version", "commandtime": commandtime,
                    "commands": 1,
                    "streams": [{
                        "stream": "control", "socket": root_t.socket, "open": 1,
                        "netin": VERSION_CMD.len(), "netout": reply.len() + 1,
                        "uptime": uptime,
                    }],
                },
                alice_entry,
            ]})
        );
        // Without it, a token sees the tunnels it opened.
        let mine = server.client_with(&alice).get(&path, &[]).await.unwrap();
        assert_eq!(mine, json!({"node": NODE, "tunnels": [alice_entry]}));
        // Without a token: 401, as every API route.
        let err = server.client_with("").get(&path, &[]).await.unwrap_err();
        match err {
            ApiError::Http { status, reason, .. } => assert_eq!(
                (status, reason.as_str()),
                (
                    401,
                    "authentication failure - no authentication credentials given"
                )
            ),
            other => panic!("expected 401, got {other:?}"),
        }
        // A tunnel whose task ended is not listed any more.
        drop(ws);
        server.wait_stopped(&root_t.upid, 20).await;
        let after = server.client().get(&path, &[]).await.unwrap();
        assert_eq!(after, json!({"node": NODE, "tunnels": [alice_entry]}));
    })
    .await
}

/// How many commands the tunnel of `vmid` has taken, as `mtunnel-status` counts them.
async fn commands_of(server: &TestServer, vmid: u32) -> u64 {
    let status = server
        .client()
        .get(&format!("/nodes/{NODE}/mtunnel-status"), &[])
        .await
        .unwrap();
    status["tunnels"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["vmid"] == vmid))
        .and_then(|t| t["commands"].as_u64())
        .unwrap_or_else(|| panic!("no tunnel of VM {vmid} in {status}"))
}

/// `POST .../mtunnel` for `vmid` with `token`.
async fn open_as(server: &TestServer, token: &str, vmid: u32) -> Tunnel {
    let data = server
        .client_with(token)
        .post(&format!("/nodes/{NODE}/qemu/{vmid}/mtunnel"), &[])
        .await
        .unwrap();
    Tunnel::from_reply(vmid, &data)
}

/// Both ends of a real tunnel connection keep at most `NOTSENT_LOWAT` bytes unsent in their
/// socket (the client's, from `net::stream`, and the one `serve` accepted): a bulk stream
/// then waits in the sending program, not in a kernel buffer it cannot see, and nothing
/// stands queued behind a migration's last pages. The server's socket is read from the
/// running `serve` with `pidfd_getfd` (root only: skipped otherwise).
#[tokio::test]
async fn tunnel_sockets_cap_unsent_bytes_on_both_ends() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: reading serve's socket needs root (pidfd_getfd)");
        return;
    }
    bounded(60, async {
        let server = TestServer::start();
        let t = server.open_tunnel(100).await;
        let mut ws = server.connect(&t).await;
        assert_eq!(roundtrip(&mut ws, VERSION_CMD).await, version_reply());
        let mtunnel::net::stream::Stream::Tls(tls) = ws.get_ref() else {
            panic!("the test server speaks TLS")
        };
        let tcp = tls.get_ref().0;
        let lowat = mtunnel::net::stream::NOTSENT_LOWAT;
        let client = socket2::SockRef::from(tcp);
        assert_eq!(client.tcp_notsent_lowat().unwrap(), lowat, "client side");
        let local = tcp.local_addr().unwrap();
        let accepted = serve_socket_to(server.pid(), local)
            .unwrap_or_else(|| panic!("no socket of serve is connected to {local}"));
        let accepted = socket2::SockRef::from(&accepted);
        assert_eq!(
            accepted.tcp_notsent_lowat().unwrap(),
            lowat,
            "the socket serve accepted"
        );
        assert!(accepted.tcp_nodelay().unwrap());
    })
    .await
}

/// A duplicate of the socket of process `pid` whose peer is `peer` (`pidfd_getfd(2)`).
fn serve_socket_to(pid: u32, peer: std::net::SocketAddr) -> Option<std::os::fd::OwnedFd> {
    use nix::libc;
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain system calls; each returned fd is new and owned here at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    for entry in fds.flatten().take(4096) {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        use std::os::fd::AsRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
        if fd < 0 {
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let theirs = socket2::SockRef::from(&fd)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        if theirs == Some(peer) {
            return Some(fd);
        }
    }
    None
}
