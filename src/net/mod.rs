//! Connections every layer that talks to another host uses: [`stream`], one type for plain
//! TCP and TLS client connections, [`sockbuf`], socket buffers sized for long fat paths
//! (client sockets and the API listener), and
//! [`tls`], TLS toward a remote node pinned by certificate fingerprint (as PVE's clients
//! do) or verified against the system's CAs, [`ws`], opening a tunnel's WebSocket, and
//! [`relay`], the WebSocket ⇄ UNIX socket relay of every tunnel stream (one entry point
//! that splices a plain connection and copies any other). The source side
//! ([`crate::client`]), the cluster's etcd client ([`crate::cluster`]) and the API (its
//! forwarding to other members, its tunnel WebSockets: [`crate::api`]) all connect through
//! here; nothing here knows any of them.

pub mod relay;
pub mod sockbuf;
pub mod stream;
pub mod tls;
pub mod ws;

/// Why a connection could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// No connection, or the TLS handshake failed (a fingerprint mismatch reads
    /// `fingerprint 'AA:..' not verified, abort!`, as PVE's client says).
    #[error("{0}")]
    Connect(String),
    /// The connection could not be set up as asked (bad host name, bad fingerprint).
    #[error("{0}")]
    Request(String),
}
