//! Member identity. A member record (`members/{node}`, `nodes/{node}`) carries a signature
//! made with the cluster's shared secret (`[cluster] secret_file`), which whoever can write
//! etcd does not hold. A node forwards only to a record whose signature is valid for the
//! name under which it is stored, and never over plain `http://` while it serves TLS itself;
//! a starting node overwrites a record of its name that is not validly signed; a running
//! node checks its own record at every keepalive and writes it back when someone else
//! changed it ([`super::Cluster::recheck_own_record`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::MemberRecord;

/// Why a member record is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("it is not a member record")]
    Unreadable,
    #[error("it is stored under the name '{key}' but names node '{named}'")]
    OtherName { key: String, named: String },
    #[error("it carries no signature (written by something other than an mtunnel node)")]
    Unsigned,
    #[error(
        "its signature does not match: forged, or written by a node with another [cluster] \
         secret_file"
    )]
    BadSignature,
    #[error("its address {0} is plain http:// while this node serves https://")]
    PlainHttp(String),
}

/// What the signature covers: everything forwarding trusts, and the cluster's name (a
/// record copied from another cluster with the same secret does not verify).
fn signed_bytes(cluster: &str, r: &MemberRecord) -> Vec<u8> {
    serde_json::json!([
        "mtunnel-member-v1",
        cluster,
        r.node,
        r.api_url,
        r.fingerprint
    ])
    .to_string()
    .into_bytes()
}

fn mac(secret: &[u8], cluster: &str, r: &MemberRecord) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(&signed_bytes(cluster, r));
    mac
}

/// `r`'s signature under `secret` (base64).
pub fn sign(secret: &[u8], cluster: &str, r: &MemberRecord) -> String {
    B64.encode(mac(secret, cluster, r).finalize().into_bytes())
}

/// Parses and checks the record stored under `members/{key_node}` (or `nodes/`).
/// `local_tls`: this node serves https, so an http member is refused.
pub fn verify(
    secret: &[u8],
    cluster: &str,
    key_node: &str,
    local_tls: bool,
    value: &[u8],
) -> Result<MemberRecord, Untrusted> {
    let r: MemberRecord = serde_json::from_slice(value).map_err(|_| Untrusted::Unreadable)?;
    if r.node != key_node {
        return Err(Untrusted::OtherName {
            key: key_node.to_string(),
            named: r.node,
        });
    }
    if r.signature.is_empty() {
        return Err(Untrusted::Unsigned);
    }
    let given = B64
        .decode(r.signature.as_bytes())
        .map_err(|_| Untrusted::BadSignature)?;
    mac(secret, cluster, &r)
        .verify_slice(&given)
        .map_err(|_| Untrusted::BadSignature)?;
    if local_tls && !r.api_url.starts_with("https://") {
        return Err(Untrusted::PlainHttp(r.api_url));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, url: &str) -> MemberRecord {
        MemberRecord {
            node: node.into(),
            api_url: url.into(),
            fingerprint: "AA:BB".into(),
            version: "0.1.0".into(),
            signature: String::new(),
        }
    }

    fn stored(secret: &[u8], r: &MemberRecord) -> Vec<u8> {
        let mut r = r.clone();
        r.signature = sign(secret, "lab", &r);
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn only_a_record_signed_with_the_secret_for_its_own_name_is_trusted() {
        let secret = b"0123456789abcdef0123";
        let b = record("b", "https://10.0.0.2:8006");
        let good = stored(secret, &b);
        assert_eq!(
            verify(secret, "lab", "b", true, &good),
            Ok(b.clone()).map(|mut r| {
                r.signature = sign(secret, "lab", &b);
                r
            })
        );
        // Another secret, another cluster, another name, a changed address, no signature.
        assert_eq!(
            verify(b"another secret of 20b", "lab", "b", true, &good),
            Err(Untrusted::BadSignature)
        );
        assert_eq!(
            verify(secret, "lab2", "b", true, &good),
            Err(Untrusted::BadSignature)
        );
        assert_eq!(
            verify(secret, "lab", "evil", true, &good),
            Err(Untrusted::OtherName {
                key: "evil".into(),
                named: "b".into()
            })
        );
        let mut moved: MemberRecord = serde_json::from_slice(&good).unwrap();
        moved.api_url = "https://10.6.6.6:8006".into();
        let moved = serde_json::to_vec(&moved).unwrap();
        assert_eq!(
            verify(secret, "lab", "b", true, &moved),
            Err(Untrusted::BadSignature)
        );
        let unsigned = serde_json::to_vec(&b).unwrap();
        assert_eq!(
            verify(secret, "lab", "b", true, &unsigned),
            Err(Untrusted::Unsigned)
        );
        assert_eq!(
            verify(secret, "lab", "b", true, b"{}"),
            Err(Untrusted::Unreadable)
        );
        // Plain http: refused by a TLS node even when signed, accepted by a plain one.
        let plain = stored(secret, &record("b", "http://10.0.0.2:8006"));
        assert_eq!(
            verify(secret, "lab", "b", true, &plain),
            Err(Untrusted::PlainHttp("http://10.0.0.2:8006".into()))
        );
        assert!(verify(secret, "lab", "b", false, &plain).is_ok());
    }
}
