//! The node's TLS identity: a self-signed certificate generated on first start and kept in
//! the data dir (`{data}/pveproxy-ssl.pem`, key in `{data}/priv/pveproxy-ssl.key`, 0600),
//! its PVE-style SHA-256 fingerprint, and the rustls server configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::util::{fingerprint_sha256, write_atomic};

pub struct TlsIdentity {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
    pub fingerprint: String,
}

impl TlsIdentity {
    /// Loads the certificate, or creates one for `localhost` and `node` if none exists.
    pub fn load_or_create(data_dir: &Path, node: &str) -> anyhow::Result<Self> {
        let cert_path = data_dir.join("pveproxy-ssl.pem");
        let key_path = data_dir.join("priv").join("pveproxy-ssl.key");
        if !cert_path.exists() || !key_path.exists() {
            let names = vec![
                "localhost".to_string(),
                node.to_string(),
                "127.0.0.1".to_string(),
            ];
            let generated =
                rcgen::generate_simple_self_signed(names).context("generating TLS certificate")?;
            crate::util::ensure_dir(&data_dir.join("priv"), 0o700)?;
            write_atomic(
                &key_path,
                generated.signing_key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_atomic(&cert_path, generated.cert.pem().as_bytes(), 0o644)?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("parsing certificate {}", cert_path.display()))?;
        let key_der = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("parsing private key {}", key_path.display()))?;
        let fingerprint = fingerprint_sha256(&cert_der);
        Ok(TlsIdentity {
            cert_pem,
            cert_der,
            key_der,
            fingerprint,
        })
    }

    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = crate::util::tls_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], self.key_der.clone_key())
            .context("loading the TLS certificate and key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
