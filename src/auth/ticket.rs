//! Tunnel tickets: `PVETUNNEL:<8 hex time>::<base64 HMAC-SHA256>` over
//! `PVETUNNEL:<time>:<authid>:<normalized path>:<tunnel instance>`, keyed by a per-node
//! secret kept in `{data}/priv/tunnel.key`. A ticket binds one token id to one socket path
//! of one tunnel instance (the worker's UPID) for a short window (20 s before to 40 s after
//! issue, as PVE); it is opaque to clients. The instance is there because socket paths are
//! per VMID and reused by the next tunnel of that VMID: without it an old ticket would open
//! the next tunnel's sockets.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::util::write_atomic;

const PREFIX: &str = "PVETUNNEL";
/// Oldest accepted age of a ticket, in seconds (exclusive).
pub const MAX_AGE: i64 = 40;
/// Largest accepted clock skew into the future, in seconds (exclusive).
pub const MIN_AGE: i64 = -20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("invalid ticket path")]
    InvalidPath,
    #[error("invalid PVETUNNEL ticket")]
    Invalid,
}

/// The node's ticket key.
#[derive(Clone)]
pub struct TicketKey {
    key: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

impl TicketKey {
    /// Loads `{priv_dir}/tunnel.key`, creating it (0600) with 32 random bytes if missing.
    pub fn load_or_create(priv_dir: &Path) -> anyhow::Result<Self> {
        let path = priv_dir.join("tunnel.key");
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                Ok(TicketKey { key })
            }
            Ok(_) => anyhow::bail!(
                "{} must hold exactly 32 bytes; remove it to create a new key",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                crate::util::ensure_dir(priv_dir, 0o700)?;
                write_atomic(&path, &key, 0o600)?;
                Ok(TicketKey { key })
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }

    pub fn from_bytes(key: [u8; 32]) -> Self {
        TicketKey { key }
    }

    // Neither an authid nor a normalized path holds ':', and the instance comes last, so
    // the joined message is unambiguous.
    fn mac(&self, time_hex: &str, authid: &str, path: &str, instance: &str) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(format!("{PREFIX}:{time_hex}:{authid}:{path}:{instance}").as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// Mints a ticket for `authid` on `/socket/<socket_path>` of the tunnel `instance` at
    /// Unix time `now`.
    pub fn assemble(
        &self,
        authid: &str,
        socket_path: &str,
        instance: &str,
        now: u64,
    ) -> Result<String, TicketError> {
        let path = normalize_path(&format!("/socket/{socket_path}"))?;
        let time_hex = format!("{:08X}", now);
        let sig = STANDARD.encode(self.mac(&time_hex, authid, &path, instance));
        Ok(format!("{PREFIX}:{time_hex}::{sig}"))
    }

    /// Verifies a ticket for `authid` on `/socket/<socket_path>` of the tunnel `instance`
    /// at Unix time `now`.
    pub fn verify(
        &self,
        ticket: &str,
        authid: &str,
        socket_path: &str,
        instance: &str,
        now: u64,
    ) -> Result<(), TicketError> {
        let path = normalize_path(&format!("/socket/{socket_path}"))?;
        let rest = ticket
            .strip_prefix("PVETUNNEL:")
            .ok_or(TicketError::Invalid)?;
        let (time_hex, sig) = rest.split_once("::").ok_or(TicketError::Invalid)?;
        if time_hex.len() != 8 || !time_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TicketError::Invalid);
        }
        let issued = i64::from_str_radix(time_hex, 16).map_err(|_| TicketError::Invalid)?;
        let age = now as i64 - issued;
        if age <= MIN_AGE || age >= MAX_AGE {
            return Err(TicketError::Invalid);
        }
        let given = STANDARD.decode(sig).map_err(|_| TicketError::Invalid)?;
        let expected = self.mac(time_hex, authid, &path, instance);
        if given.ct_eq(&expected).into() {
            Ok(())
        } else {
            Err(TicketError::Invalid)
        }
    }
}

/// PVE's `normalize_path`: collapse repeated `/`, drop a trailing `/`, ensure a leading
/// `/`, and allow only `[A-Za-z0-9._/-]`.
pub fn normalize_path(path: &str) -> Result<String, TicketError> {
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return Err(TicketError::InvalidPath);
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 0x699F_82D3;

    const I: &str = "UPID:n:1:2:3:qmtunnel:100:root@pam!t:";

    fn key() -> TicketKey {
        TicketKey::from_bytes([7u8; 32])
    }

    #[test]
    fn format_and_roundtrip() {
        let t = key()
            .assemble("root@pam!t", "/run/x/100.mtunnel", I, NOW)
            .unwrap();
        assert!(t.starts_with("PVETUNNEL:699F82D3::"), "{t}");
        key()
            .verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW + 5)
            .unwrap();
        // Normalization: the doubled slash from "/socket/" + "/run" is the same path.
        key()
            .verify(&t, "root@pam!t", "//run//x/100.mtunnel/", I, NOW)
            .unwrap();
    }

    #[test]
    fn rejects_other_user_path_key_and_age() {
        let t = key()
            .assemble("root@pam!t", "/run/x/100.mtunnel", I, NOW)
            .unwrap();
        let bad = |r: Result<(), TicketError>| assert_eq!(r, Err(TicketError::Invalid));
        bad(key().verify(&t, "root@pam!u", "/run/x/100.mtunnel", I, NOW));
        bad(key().verify(&t, "root@pam!t", "/run/x/101.mtunnel", I, NOW));
        bad(TicketKey::from_bytes([8; 32]).verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW));
        bad(key().verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW + 40));
        bad(key().verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW - 20));
        key()
            .verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW + 39)
            .unwrap();
        key()
            .verify(&t, "root@pam!t", "/run/x/100.mtunnel", I, NOW - 19)
            .unwrap();
        bad(key().verify(
            "PVETUNNEL:699F82D3::!!",
            "root@pam!t",
            "/run/x/100.mtunnel",
            I,
            NOW,
        ));
        bad(key().verify("garbage", "root@pam!t", "/run/x/100.mtunnel", I, NOW));
    }

    #[test]
    fn ticket_of_one_tunnel_instance_fails_on_the_next() {
        let t = key()
            .assemble("root@pam!t", "/run/x/100.mtunnel", I, NOW)
            .unwrap();
        let next = "UPID:n:1:2:4:qmtunnel:100:root@pam!t:";
        assert_eq!(
            key().verify(&t, "root@pam!t", "/run/x/100.mtunnel", next, NOW),
            Err(TicketError::Invalid)
        );
    }

    #[test]
    fn path_characters_are_restricted() {
        assert_eq!(
            normalize_path("/socket//run/a b"),
            Err(TicketError::InvalidPath)
        );
        assert_eq!(
            normalize_path("/socket/run/\u{e9}"),
            Err(TicketError::InvalidPath)
        );
        assert_eq!(
            normalize_path("/socket//run/q/1.mtunnel").unwrap(),
            "/socket/run/q/1.mtunnel"
        );
    }
}
