//! The uplink's TLS when `relay.ca_file` or `relay.client_cert` is set: rustls (ring)
//! trusting the given CA instead of the system's, and presenting the gateway's client
//! certificate. Without either, reqwest's own setup (the system's CA certificates) is
//! used unchanged.

use std::path::Path;
use std::sync::Arc;

use pigeon_shared::x509;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::RelayConfig;

/// A client certificate within this many days of its end is warned about at start.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// The rustls configuration for the relay connection, or `None` for reqwest's default.
/// An error names the key and file at fault.
pub(crate) fn client_config(r: &RelayConfig) -> Result<Option<ClientConfig>, String> {
    if r.ca_file.is_none() && r.client_cert.is_none() {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let builder = match &r.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("relay.ca_file", path)? {
                roots.add(c).map_err(|e| {
                    format!(
                        "relay.ca_file: {} holds a certificate that is not a usable CA: {e}",
                        path.display()
                    )
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| {
                format!(
                    "cannot load the system's CA certificates ({e}); install ca-certificates or set relay.ca_file"
                )
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    let mut config = match (&r.client_cert, &r.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("relay.client_cert", cert)?;
            match x509::summarize(&chain[0]) {
                Ok(s) => warn_if_expiring(cert, &s),
                Err(e) => return Err(format!("relay.client_cert: {}: {e}", cert.display())),
            }
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                format!(
                    "relay.client_key: cannot read a PEM private key from {}: {e}",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "relay.client_key: {} is not the key of the certificate in {}",
                        key.display(),
                        cert.display()
                    ),
                    e => format!("relay.client_key: {} cannot be used: {e}", key.display()),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(config))
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn warn_if_expiring(path: &Path, s: &x509::CertSummary) {
    let now = chrono::Utc::now().timestamp();
    let days = (s.not_after - now).div_euclid(86_400);
    let until = chrono::DateTime::from_timestamp(s.not_after, 0)
        .map_or_else(|| s.not_after.to_string(), |t| t.to_rfc3339());
    if s.not_after <= now {
        tracing::error!(cert = %path.display(), not_after = %until, "relay.client_cert HAS EXPIRED: the relay will refuse it. Install a renewed certificate and restart the gateway.");
    } else if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(cert = %path.display(), not_after = %until, days_left = days, "relay.client_cert expires soon: install a renewed certificate and restart the gateway.");
    } else {
        tracing::info!(cert = %path.display(), subject = s.common_name.as_deref().unwrap_or("(no common name)"), not_after = %until, "Presenting a client certificate to the relay.");
    }
}
