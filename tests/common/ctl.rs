//! A tunnel's control channel driven by hand in tests: one command line out, one reply
//! line back, over a real WebSocket (to the server itself or through a fault proxy).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mtunnel::net::ws::WsStream;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{TestServer, Tunnel, pct};

/// The control channel of a tunnel, reached through `port` (a fault proxy or the
/// server itself): one line out, one reply line back.
pub struct Ctl {
    pub ws: WsStream,
    pending: Vec<u8>,
}

/// `localhost`: the node that answers, in a cluster too (a node name would be forwarded).
pub fn ws_url_via(port: u16, vmid: u32, socket: &str, ticket: &str) -> String {
    format!(
        "wss://127.0.0.1:{port}/api2/json/nodes/localhost/qemu/{vmid}/mtunnelwebsocket?ticket={}&socket={}",
        pct(ticket),
        pct(socket)
    )
}

impl Ctl {
    pub async fn open(server: &TestServer, port: u16, tunnel: &Tunnel) -> Ctl {
        let url = ws_url_via(port, tunnel.vmid, &tunnel.socket, &tunnel.ticket);
        let ws = mtunnel::net::ws::connect(
            &url,
            &[("Authorization".into(), server.root_token.clone())],
            &server.fingerprint,
        )
        .await
        .unwrap_or_else(|e| panic!("control websocket: {e}"));
        Ctl {
            ws,
            pending: Vec::new(),
        }
    }

    /// Sends `cmd` as one line and returns the parsed reply.
    pub async fn send(&mut self, cmd: &Value) -> Value {
        self.send_line(&cmd.to_string()).await
    }

    /// Sends `line` exactly as given (plus the newline) and returns the parsed reply.
    pub async fn send_line(&mut self, line: &str) -> Value {
        self.ws
            .send(Message::binary(format!("{line}\n").into_bytes()))
            .await
            .unwrap_or_else(|e| panic!("sending {line}: {e}"));
        let reply = loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                break String::from_utf8(line[..pos].to_vec()).unwrap();
            }
            match tokio::time::timeout(Duration::from_secs(60), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => self.pending.extend_from_slice(&data),
                Ok(Some(Ok(Message::Text(text)))) => {
                    self.pending.extend_from_slice(text.as_bytes())
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("no reply to {line}: {other:?}"),
            }
        };
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply '{reply}' is not JSON: {e}"))
    }

    /// Sends `line` and asserts the reply is exactly `expected`.
    pub async fn expect(&mut self, line: &str, expected: Value) {
        let reply = self.send_line(line).await;
        assert_eq!(reply, expected, "reply to {line}");
    }

    /// Closes the WebSocket and waits for the server's side to end.
    pub async fn close(mut self) {
        self.ws.close(None).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Reads (and so answers pings) for `dur`; nothing but pings may arrive, and the
    /// connection must stay open.
    pub async fn idle(&mut self, dur: Duration) {
        let deadline = tokio::time::Instant::now() + dur;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("idle control connection got {other:?}"),
            }
        }
    }

    pub async fn ok(&mut self, cmd: Value) -> Value {
        let reply = self.send(&cmd).await;
        assert_eq!(reply["success"], true, "{cmd} -> {reply}");
        reply
    }
}
