//! API tokens: `user@realm!name` ids with random secrets stored only as salted SHA-256
//! hashes in `{data}/priv/tokens.json` (mode 0600), each with its own ACL.
//!
//! The parsed file is shared as an `Arc` snapshot, so a privilege check costs a map lookup.
//! The file is stat'ed at most once per [`RECHECK`] and re-read only when its modification
//! time, size or inode changed, so `mtunnel token create` takes effect on a running server
//! without a restart. A failed authentication re-checks at once: a token created a moment
//! ago works on its first use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ident::is_token_id as is_valid_token_id;

use super::acl::Acl;
use crate::util::{unix_now, write_atomic};

/// Why a request could not be authenticated. Every variant maps to HTTP 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no authentication credentials given")]
    Missing,
    #[error("invalid API token format")]
    Malformed,
    #[error("invalid token value")]
    Invalid,
    #[error("token '{0}' is disabled or expired")]
    Disabled(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TokenFile {
    #[serde(default)]
    tokens: BTreeMap<String, TokenRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    /// `sha256$<salt hex>$<digest hex>`.
    secret_hash: String,
    #[serde(default)]
    acl: Acl,
    #[serde(default = "enabled")]
    enable: bool,
    /// Unix time after which the token is refused; 0 = never.
    #[serde(default)]
    expire: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
}

fn enabled() -> bool {
    true
}

/// How often the token file is stat'ed at most (besides after a failed authentication).
pub const RECHECK: Duration = Duration::from_secs(1);

/// What identifies one version of the token file (`write_atomic` renames, so the inode
/// changes on every write even within one mtime tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

struct Cached {
    stamp: Option<Stamp>,
    checked: Option<Instant>,
    file: Arc<TokenFile>,
}

/// The node's tokens, backed by a JSON file.
pub struct TokenStore {
    path: PathBuf,
    cache: RwLock<Cached>,
}

impl TokenStore {
    /// Opens the store at `{priv_dir}/tokens.json` (a missing file is an empty store).
    pub fn open(priv_dir: &Path) -> anyhow::Result<Self> {
        let store = TokenStore {
            path: priv_dir.join("tokens.json"),
            cache: RwLock::new(Cached {
                stamp: None,
                checked: None,
                file: Arc::new(TokenFile::default()),
            }),
        };
        store.refresh()?;
        Ok(store)
    }

    fn stamp(&self) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).ok().map(|m| Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        })
    }

    /// Re-reads the file if it changed since the last read.
    fn refresh(&self) -> anyhow::Result<()> {
        let stamp = self.stamp();
        {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            cache.checked = Some(Instant::now());
            if cache.stamp == stamp && stamp.is_some() {
                return Ok(());
            }
        }
        let file = match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing token file {}", self.path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        cache.stamp = stamp;
        cache.file = Arc::new(file);
        Ok(())
    }

    /// The current tokens; stats the file only if the last check is [`RECHECK`] old.
    fn snapshot(&self) -> Arc<TokenFile> {
        {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if cache.checked.is_some_and(|t| t.elapsed() < RECHECK) {
                return Arc::clone(&cache.file);
            }
        }
        self.fresh_snapshot()
    }

    /// The current tokens, re-checking the file now.
    fn fresh_snapshot(&self) -> Arc<TokenFile> {
        if let Err(e) = self.refresh() {
            tracing::warn!("keeping previous tokens: {e:#}");
        }
        Arc::clone(&self.cache.read().unwrap_or_else(|e| e.into_inner()).file)
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot().tokens.is_empty()
    }

    /// Authenticates an `Authorization` header value; returns the token id.
    pub fn authenticate(&self, header: Option<&str>) -> Result<String, AuthError> {
        let (authid, secret) = parse_authorization(header.ok_or(AuthError::Missing)?)?;
        match check_token(&self.snapshot(), &authid, &secret) {
            // The token may have been created or changed within the last RECHECK.
            Err(_) => check_token(&self.fresh_snapshot(), &authid, &secret),
            ok => ok,
        }
    }

    /// The ACL of an authenticated token (empty if the token vanished meanwhile).
    pub fn acl(&self, authid: &str) -> Acl {
        self.snapshot()
            .tokens
            .get(authid)
            .map(|r| r.acl.clone())
            .unwrap_or_default()
    }

    /// Whether `authid` holds `privilege` on `path` (false for an unknown token); no copy
    /// of the ACL is made.
    pub fn allows(&self, authid: &str, path: &str, privilege: &str) -> bool {
        self.snapshot()
            .tokens
            .get(authid)
            .is_some_and(|r| r.acl.allows(path, privilege))
    }

    /// Creates (or replaces) a token and returns the full header value
    /// `PVEAPIToken=<authid>=<secret>`; the secret itself is not stored.
    pub fn create(
        &self,
        authid: &str,
        acl: Acl,
        comment: Option<String>,
    ) -> anyhow::Result<String> {
        self.create_with_secret(authid, acl, comment, &random_uuid())
    }

    /// Like [`TokenStore::create`] with a given secret: the same token on every node of a
    /// cluster, so that a request forwarded to the node that owns a VM is accepted there.
    pub fn create_with_secret(
        &self,
        authid: &str,
        acl: Acl,
        comment: Option<String>,
        secret: &str,
    ) -> anyhow::Result<String> {
        if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!(
                "invalid token secret: at least 16 printable characters without spaces (e.g. a UUID)"
            );
        }
        if !is_valid_token_id(authid) {
            anyhow::bail!(
                "invalid token id '{authid}': expected user@realm!name (name: a letter, then letters, digits, '.', '-', '_')"
            );
        }
        // Fresh, so that a token created elsewhere a moment ago is not lost.
        let mut file = (*self.fresh_snapshot()).clone();
        file.tokens.insert(
            authid.to_string(),
            TokenRecord {
                secret_hash: hash_secret(secret),
                acl,
                enable: true,
                expire: 0,
                comment,
            },
        );
        let text = serde_json::to_vec_pretty(&file).context("encoding token file")?;
        if let Some(dir) = self.path.parent() {
            crate::util::ensure_dir(dir, 0o700)?;
        }
        write_atomic(&self.path, &text, 0o600)?;
        self.refresh()?;
        Ok(format!("PVEAPIToken={authid}={secret}"))
    }
}

fn check_token(file: &TokenFile, authid: &str, secret: &str) -> Result<String, AuthError> {
    let record = file.tokens.get(authid).ok_or(AuthError::Invalid)?;
    if !verify_secret(&record.secret_hash, secret) {
        return Err(AuthError::Invalid);
    }
    let now = unix_now();
    if !record.enable || (record.expire != 0 && record.expire <= now) {
        return Err(AuthError::Disabled(authid.to_string()));
    }
    Ok(authid.to_string())
}

/// Extracts `(authid, secret)` from a header value as pveproxy does:
/// `(?:^|\s)PVEAPIToken(?:=| )([^;]*)`, URI-unescaped, split at the first `=`.
pub fn parse_authorization(header: &str) -> Result<(String, String), AuthError> {
    let mut rest = None;
    for (idx, _) in header.match_indices("PVEAPIToken") {
        let at_word_start = idx == 0
            || header[..idx]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace);
        let after = &header[idx + "PVEAPIToken".len()..];
        if at_word_start && (after.starts_with('=') || after.starts_with(' ')) {
            rest = Some(&after[1..]);
            break;
        }
    }
    let rest = rest.ok_or(AuthError::Missing)?;
    let value = rest.split(';').next().unwrap_or("").trim();
    let value = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| AuthError::Malformed)?;
    let (authid, secret) = value.split_once('=').ok_or(AuthError::Malformed)?;
    if !is_valid_token_id(authid) || secret.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok((authid.to_string(), secret.to_string()))
}

/// The user part of a token id (`root@pam` of `root@pam!mig`).
pub fn token_user(authid: &str) -> &str {
    authid.split_once('!').map(|(u, _)| u).unwrap_or(authid)
}

fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = hex(&salt);
    let digest = Sha256::digest(format!("{salt}{secret}").as_bytes());
    format!("sha256${salt}${}", hex(&digest))
}

fn verify_secret(stored: &str, secret: &str) -> bool {
    let mut parts = stored.splitn(3, '$');
    let (Some("sha256"), Some(salt), Some(expected)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let digest = hex(&Sha256::digest(format!("{salt}{secret}").as_bytes()));
    digest.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// A random UUID v4 string, the form PVE uses for token secrets.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms() {
        let ok = |h: &str| parse_authorization(h).map(|(a, s)| format!("{a}|{s}"));
        assert_eq!(
            ok("PVEAPIToken=root@pam!mig=abc").unwrap(),
            "root@pam!mig|abc"
        );
        assert_eq!(
            ok("PVEAPIToken root@pam!mig=abc").unwrap(),
            "root@pam!mig|abc"
        );
        assert_eq!(
            ok("PVEAPIToken=root%40pam!mig=a%3Db").unwrap(),
            "root@pam!mig|a=b"
        );
        assert_eq!(ok("Bearer x"), Err(AuthError::Missing));
        assert_eq!(ok("XPVEAPIToken=root@pam!mig=abc"), Err(AuthError::Missing));
        assert_eq!(ok("PVEAPIToken=root@pam=abc"), Err(AuthError::Malformed));
        assert_eq!(ok("PVEAPIToken=root@pam!mig="), Err(AuthError::Malformed));
    }

    #[test]
    fn checks_share_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        store.create("root@pam!t", Acl::default(), None).unwrap();
        let (a, b) = (store.snapshot(), store.snapshot());
        assert!(
            Arc::ptr_eq(&a, &b),
            "a privilege check copied the token file"
        );
    }

    #[test]
    fn changes_by_another_process_are_seen() {
        use crate::auth::AclEntry;
        let dir = tempfile::tempdir().unwrap();
        let server = TokenStore::open(dir.path()).unwrap();
        // `mtunnel token create` is another process with its own store.
        let cli = TokenStore::open(dir.path()).unwrap();
        assert!(!server.allows("root@pam!a", "/", "Sys.Audit"));
        let acl = Acl {
            entries: vec![AclEntry {
                path: "/".into(),
                privs: ["Sys.Audit".to_string()].into(),
                propagate: true,
            }],
        };
        let header = cli.create("root@pam!a", acl, None).unwrap();
        // Usable at once (a failed check re-reads), not only after RECHECK.
        assert_eq!(server.authenticate(Some(&header)).unwrap(), "root@pam!a");
        assert!(server.allows("root@pam!a", "/", "Sys.Audit"));
        let header = cli.create("root@pam!a", Acl::default(), None).unwrap();
        assert_eq!(server.authenticate(Some(&header)).unwrap(), "root@pam!a");
        assert!(!server.allows("root@pam!a", "/", "Sys.Audit"));
    }

    #[test]
    fn create_then_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let header = store.create("root@pam!t", Acl::default(), None).unwrap();
        assert_eq!(store.authenticate(Some(&header)).unwrap(), "root@pam!t");
        let forged = format!("{}x", header);
        assert_eq!(store.authenticate(Some(&forged)), Err(AuthError::Invalid));
        let text = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        let secret = header.rsplit('=').next().unwrap();
        assert!(!text.contains(secret), "secret stored in clear");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tokens.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
