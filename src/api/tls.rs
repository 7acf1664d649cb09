//! The node's TLS identity: a self-signed certificate generated on first start and kept in
//! the data dir (`{data}/pveproxy-ssl.pem`, key in `{data}/priv/pveproxy-ssl.key`, 0600),
//! its PVE-style SHA-256 fingerprint, and the rustls server configuration. An admin may
//! replace the PEM with a CA-signed certificate followed by its intermediates: the whole
//! chain is served, so clients that trust only the root CA can verify it.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::util::{fingerprint_sha256, write_atomic};

pub struct TlsIdentity {
    pub cert_pem: String,
    /// The leaf (first) certificate of the PEM: the one fingerprinted and described.
    pub cert_der: CertificateDer<'static>,
    /// Every certificate of the PEM in file order, leaf first: what the server sends.
    pub chain: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
    pub fingerprint: String,
    /// What `GET /nodes/{node}/certificates/info` reports, read from the leaf.
    pub info: CertInfo,
}

/// The fields PVE's `certificates/info` reports for a certificate, in PVE's forms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// OpenSSL's one-line form, as PVE reports it: `/CN=pve1/O=Example`.
    pub subject: String,
    pub issuer: String,
    /// Unix seconds.
    pub notbefore: i64,
    pub notafter: i64,
    /// OpenSSL's short name of the key algorithm: `rsaEncryption`, `id-ecPublicKey`,
    /// `ED25519`.
    #[serde(rename = "public-key-type")]
    pub public_key_type: String,
    #[serde(rename = "public-key-bits")]
    pub public_key_bits: usize,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub san: Vec<String>,
}

impl CertInfo {
    /// Reads the fields from a DER certificate.
    ///
    /// # Errors
    /// When the certificate does not parse as X.509.
    pub fn from_der(der: &[u8]) -> anyhow::Result<CertInfo> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
        let oneline = |name: &X509Name<'_>| -> String {
            let registry = x509_parser::objects::oid_registry();
            name.iter_rdn()
                .flat_map(|rdn| rdn.iter())
                .map(|attr| {
                    let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    let value = attr.as_str().map(str::to_string).unwrap_or_else(|_| {
                        // Not a string type: OpenSSL prints the bytes as hex escapes.
                        attr.as_slice()
                            .iter()
                            .map(|b| format!("\\x{b:02X}"))
                            .collect()
                    });
                    format!("/{key}={value}")
                })
                .collect()
        };
        let spki = cert.public_key();
        let oid = spki.algorithm.algorithm.to_id_string();
        let public_key_type = match oid.as_str() {
            "1.2.840.113549.1.1.1" => "rsaEncryption".to_string(),
            "1.2.840.10045.2.1" => "id-ecPublicKey".to_string(),
            "1.3.101.112" => "ED25519".to_string(),
            "1.3.101.113" => "ED448".to_string(),
            _ => oid,
        };
        let public_key_bits = match public_key_type.as_str() {
            "ED25519" => 256,
            "ED448" => 456,
            _ => spki.parsed().map(|k| k.key_size()).unwrap_or(0),
        };
        let mut san = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(n) => san.push(n.to_string()),
                    GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => san.push(
                            std::net::Ipv4Addr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
                                .to_string(),
                        ),
                        16 => {
                            let mut a = [0u8; 16];
                            a.copy_from_slice(bytes);
                            san.push(std::net::Ipv6Addr::from(a).to_string());
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            subject: oneline(cert.subject()),
            issuer: oneline(cert.issuer()),
            notbefore: cert.validity().not_before.timestamp(),
            notafter: cert.validity().not_after.timestamp(),
            public_key_type,
            public_key_bits,
            san,
        })
    }
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
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing certificates in {}", cert_path.display()))?;
        let cert_der = chain.first().cloned().with_context(|| {
            format!(
                "no certificate (BEGIN CERTIFICATE) in {}",
                cert_path.display()
            )
        })?;
        let key_der = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("parsing private key {}", key_path.display()))?;
        let fingerprint = fingerprint_sha256(&cert_der);
        let info = CertInfo::from_der(&cert_der)
            .with_context(|| format!("reading certificate {}", cert_path.display()))?;
        Ok(TlsIdentity {
            cert_pem,
            cert_der,
            chain,
            key_der,
            fingerprint,
            info,
        })
    }

    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = crate::util::tls_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key_der.clone_key())
            .context("loading the TLS certificate and key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn params(cn: &str, names: &[&str], ca: bool) -> CertificateParams {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "mtunnel tests");
        p.distinguished_name.push(DnType::CommonName, cn);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p
    }

    /// A root CA, an intermediate signed by it and a leaf for `localhost` signed by the
    /// intermediate: (root DER, leaf PEM, intermediate PEM, leaf key PEM).
    fn ca_chain() -> (CertificateDer<'static>, String, String, String) {
        let root = CertifiedIssuer::self_signed(
            params("mtunnel test root", &[], true),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            params("mtunnel test intermediate", &[], true),
            KeyPair::generate().unwrap(),
            &root,
        )
        .unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params("localhost", &["localhost", "127.0.0.1"], false)
            .signed_by(&leaf_key, &intermediate)
            .unwrap();
        (
            root.der().clone(),
            leaf.pem(),
            intermediate.pem(),
            leaf_key.serialize_pem(),
        )
    }

    fn install(data: &Path, cert_pem: &str, key_pem: &str) {
        std::fs::create_dir_all(data.join("priv")).unwrap();
        std::fs::write(data.join("pveproxy-ssl.pem"), cert_pem).unwrap();
        std::fs::write(data.join("priv/pveproxy-ssl.key"), key_pem).unwrap();
    }

    /// Handshake between the identity's server config and a client that trusts only `root`.
    async fn handshake(
        identity: &TlsIdentity,
        root: CertificateDer<'static>,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let client = crate::net::tls::roots_client_config(roots).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config().unwrap());
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            tls.write_all(b"hi").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let result = async {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, c)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(buf, b"hi");
            Ok(())
        }
        .await;
        let _ = server.await;
        result
    }

    #[tokio::test]
    async fn a_ca_signed_certificate_is_served_with_its_intermediates() {
        let dir = tempfile::tempdir().unwrap();
        let (root, leaf_pem, intermediate_pem, key_pem) = ca_chain();
        install(
            dir.path(),
            &format!("{leaf_pem}{intermediate_pem}"),
            &key_pem,
        );
        let identity = TlsIdentity::load_or_create(dir.path(), "node1").unwrap();
        assert_eq!(identity.chain.len(), 2);
        assert_eq!(identity.cert_der, identity.chain[0]);
        handshake(&identity, root.clone()).await.unwrap();

        // What certificates/info reports comes from the leaf.
        assert_eq!(identity.info.subject, "/O=mtunnel tests/CN=localhost");
        assert_eq!(
            identity.info.issuer,
            "/O=mtunnel tests/CN=mtunnel test intermediate"
        );
        assert_eq!(identity.info.public_key_type, "id-ecPublicKey");
        assert_eq!(identity.info.public_key_bits, 256);
        assert_eq!(identity.info.san, ["localhost", "127.0.0.1"]);
        assert!(identity.info.notbefore < identity.info.notafter);

        // Without the intermediate in the PEM, a client that trusts only the root cannot
        // build the chain: serving every certificate of the file is what makes it work.
        let dir = tempfile::tempdir().unwrap();
        install(dir.path(), &leaf_pem, &key_pem);
        let leaf_only = TlsIdentity::load_or_create(dir.path(), "node1").unwrap();
        let err = handshake(&leaf_only, root).await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn the_generated_certificate_is_described_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let identity = TlsIdentity::load_or_create(dir.path(), "node1").unwrap();
        assert_eq!(identity.chain.len(), 1);
        let info = &identity.info;
        assert_eq!(info.subject, "/CN=rcgen self signed cert");
        assert_eq!(info.issuer, info.subject);
        assert_eq!(info.public_key_type, "id-ecPublicKey");
        assert_eq!(info.san, ["localhost", "node1", "127.0.0.1"]);
    }

    #[test]
    fn a_pem_without_certificate_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap().serialize_pem();
        install(dir.path(), "not a certificate\n", &key);
        let err = TlsIdentity::load_or_create(dir.path(), "node1")
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            err.starts_with("no certificate (BEGIN CERTIFICATE) in "),
            "{err}"
        );
    }
}
