//! TLS toward a remote node with certificate-fingerprint pinning, as PVE's clients do with a
//! `target-endpoint` `fingerprint=`: the connection is trusted if and only if the server's
//! leaf certificate has the given SHA-256 fingerprint. Names, chains and validity dates are
//! not checked (a PVE node's certificate is self-signed); the handshake signatures are, with
//! the ring provider's algorithms, so the peer must hold the certificate's private key.
//!
//! Without a fingerprint, [`ca_client_config`] verifies the usual way: a chain to a root CA
//! of the platform's trust store (`/etc/ssl/certs` and friends, via rustls-native-certs) and
//! the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::NetError;
use crate::util::fingerprint_sha256;

/// The handshake saw a certificate other than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("fingerprint '{seen}' not verified, abort!")]
pub struct FingerprintMismatch {
    /// The fingerprint of the certificate the server presented.
    pub seen: String,
}

/// Brings a fingerprint into PVE's form `AA:BB:..` (32 upper-case pairs). Accepts any case,
/// with or without colons; `None` if it is not 32 bytes of hex.
pub fn normalize_fingerprint(fingerprint: &str) -> Option<String> {
    let hex: String = fingerprint.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let upper = hex.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).map(|i| &upper[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// Accepts exactly the leaf certificate with the pinned SHA-256 fingerprint.
#[derive(Debug)]
pub struct FingerprintVerifier {
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl FingerprintVerifier {
    /// `fingerprint` in any form [`normalize_fingerprint`] accepts.
    pub fn new(fingerprint: &str, provider: Arc<CryptoProvider>) -> Result<Self, NetError> {
        let expected = normalize_fingerprint(fingerprint).ok_or_else(|| {
            NetError::Request(format!(
                "invalid fingerprint '{fingerprint}': expected 32 hex pairs (SHA-256)"
            ))
        })?;
        Ok(FingerprintVerifier { expected, provider })
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint_sha256(end_entity);
        if seen == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    FingerprintMismatch { seen },
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration (ring provider, HTTP/1.1 via ALPN) that trusts exactly
/// the certificate with `fingerprint`.
///
/// # Errors
/// `None` (or an empty string) fails with "no fingerprint given": trusting system CAs is a
/// later addition. A malformed fingerprint fails too.
pub fn client_config(fingerprint: Option<&str>) -> Result<Arc<ClientConfig>, NetError> {
    let fingerprint = fingerprint
        .filter(|f| !f.trim().is_empty())
        .ok_or_else(|| NetError::Request("no fingerprint given".into()))?;
    let provider = crate::util::tls_provider();
    let verifier = FingerprintVerifier::new(fingerprint, Arc::clone(&provider))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Request(format!("TLS protocol versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration that verifies the server the usual way: a certificate
/// chain to one of the system's root CAs and the host name. What PVE's API client does for
/// a target endpoint without `fingerprint=`.
///
/// The roots are those of the platform trust store ([`system_roots`]); only if it holds none
/// (a minimal container without `ca-certificates`) the Mozilla roots compiled into the
/// binary (webpki-roots) are used instead, with a warning.
///
/// # Errors
/// Only if the provider offers no safe protocol version.
pub fn ca_client_config() -> Result<Arc<ClientConfig>, NetError> {
    roots_client_config(system_roots())
}

/// The root CAs of the platform's trust store, or webpki-roots if it yields none.
pub fn system_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("reading the system's root certificates: {e}");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!("{ignored} system root certificate(s) could not be parsed");
    }
    if added == 0 {
        tracing::warn!(
            "the system trust store has no root certificates (install ca-certificates?): \
             using the Mozilla roots built into mtunnel"
        );
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// A verifying client configuration (the crate's TLS provider, HTTP/1.1 via ALPN) that
/// trusts `roots`.
///
/// # Errors
/// Only if the provider offers no safe protocol version.
pub fn roots_client_config(roots: rustls::RootCertStore) -> Result<Arc<ClientConfig>, NetError> {
    let mut config = ClientConfig::builder_with_provider(crate::util::tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Request(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TCP connection to `host:port` and runs the TLS handshake with `config`.
///
/// # Errors
/// [`NetError::Connect`], with PVE's wording when the fingerprint does not match.
pub async fn connect(
    host: &str,
    port: u16,
    config: &Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, NetError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(bare.to_string())
        .map_err(|e| NetError::Request(format!("invalid host name '{host}': {e}")))?;
    let tcp = crate::net::sockbuf::connect(bare, port)
        .await
        .map_err(|e| NetError::Connect(format!("unable to connect to {host}:{port} - {e}")))?;
    super::stream::tune(&tcp);
    TlsConnector::from(Arc::clone(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| NetError::Connect(handshake_error_text(host, port, &e)))
}

/// The fingerprint message alone when that was the cause, else the TLS error with context.
fn handshake_error_text(host: &str, port: u16, e: &std::io::Error) -> String {
    let mismatch = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<FingerprintMismatch>()
            }
            _ => None,
        });
    match mismatch {
        Some(m) => m.to_string(),
        None => format!("TLS handshake with {host}:{port} failed - {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        let fp = "aa:BB:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99";
        let want = fp.to_ascii_uppercase();
        assert_eq!(normalize_fingerprint(fp).unwrap(), want);
        assert_eq!(normalize_fingerprint(&fp.replace(':', "")).unwrap(), want);
        assert!(normalize_fingerprint("AA:BB").is_none());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn system_roots_are_the_platform_store_when_it_has_any() {
        let native = rustls_native_certs::load_native_certs().certs;
        let mut parsable = rustls::RootCertStore::empty();
        parsable.add_parsable_certificates(native);
        let roots = system_roots();
        if parsable.is_empty() {
            assert_eq!(roots.len(), webpki_roots::TLS_SERVER_ROOTS.len());
        } else {
            assert_eq!(roots.len(), parsable.len());
        }
        assert!(ca_client_config().is_ok());
    }

    #[test]
    fn no_fingerprint_is_refused_for_now() {
        let err = client_config(None).unwrap_err();
        assert_eq!(err.to_string(), "no fingerprint given");
        assert!(client_config(Some("")).is_err());
    }
}
