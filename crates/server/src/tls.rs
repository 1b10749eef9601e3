//! AMQPS: AMQP over TLS on its own port (5671 by default), with rustls
//! (TLS 1.2 and 1.3 only; the `ring` provider). Certificates and keys come
//! from PEM files; client certificates are verified against `ca_file` when
//! `verify_peer` is on, and required with `fail_if_no_peer_cert`, as in
//! RabbitMQ's `ssl_options`. A verified client certificate's subject common
//! name is the user the EXTERNAL mechanism logs in as.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |e: rustls::pki_types::pem::Error| TlsError::Pem { path: path.into(), reason: e.to_string() };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The acceptor for the AMQPS listeners.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| TlsError::Pem { path: config.key_file.clone(), reason: e.to_string() })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if config.verify_peer {
        let Some(ca_file) = &config.ca_file else {
            return Err(TlsError::Config("verify_peer needs ca_file".into()));
        };
        let mut roots = RootCertStore::empty();
        for ca in certificates(ca_file)? {
            roots.add(ca).map_err(|e| TlsError::Config(format!("{}: {e}", ca_file.display())))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if config.fail_if_no_peer_cert { verifier } else { verifier.allow_unauthenticated() };
        builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(e.to_string()))?)
    } else {
        builder.with_no_client_auth()
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The subject common name of a verified client certificate.
pub fn peer_common_name(certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certificates?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}
