//! `[tls]`: HTTPS on `listen`, optionally with client certificates, checked into
//! [`TlsSettings`].

use std::path::PathBuf;

use pigeon_shared::units::Duration;
use serde::Deserialize;

use super::TlsSettings;
use crate::config::error::{ConfigError, invalid};

/// `[tls]`: HTTPS on `listen`, optionally with client certificates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub reload_check: Duration,
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            client_auth: ClientAuth::Optional,
            reload_check: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// `tls.client_auth`: whether a connection must present a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A certificate identifies its gateway; without one, a bearer token does.
    Optional,
    /// No certificate, no connection.
    Required,
}

impl TlsConfig {
    pub fn validate(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => {
                if self.client_ca.is_some() {
                    return Err(invalid(
                        "tls.client_ca",
                        "needs tls.cert and tls.key: client certificates are only asked for over HTTPS",
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key",
                    "is missing: tls.cert needs its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert",
                    "is missing: tls.key needs its certificate",
                ));
            }
            (Some(c), Some(k)) => (c, k),
        };
        if self.client_auth == ClientAuth::Required && self.client_ca.is_none() {
            return Err(invalid(
                "tls.client_auth",
                "= \"required\" needs tls.client_ca, the CA that signs the gateways' certificates",
            ));
        }
        if self.reload_check.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("tls.reload_check", "must be at least 1s"));
        }
        if self.handshake_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("tls.handshake_timeout", "must be at least 1s"));
        }
        Ok(Some(TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.client_ca.clone(),
            client_auth_required: self.client_auth == ClientAuth::Required,
            reload_check: self.reload_check.get(),
            handshake_timeout: self.handshake_timeout.get(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::refused_key;

    fn parse(toml: &str) -> TlsConfig {
        toml::from_str(toml).unwrap()
    }

    fn invalid_key(toml: &str) -> String {
        refused_key(toml, TlsConfig::validate)
    }

    #[test]
    fn tls_needs_both_files_and_client_auth_needs_a_ca() {
        assert_eq!(invalid_key("cert = \"c.pem\"\n"), "tls.key");
        assert_eq!(invalid_key("key = \"k.pem\"\n"), "tls.cert");
        assert_eq!(invalid_key("client_ca = \"ca.pem\"\n"), "tls.client_ca");
        let both = "cert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert_eq!(
            invalid_key(&format!("{both}client_auth = \"required\"\n")),
            "tls.client_auth"
        );
        assert_eq!(
            invalid_key(&format!("{both}reload_check = \"100ms\"\n")),
            "tls.reload_check"
        );
        assert!(
            toml::from_str::<TlsConfig>(&format!("{both}client_auth = \"sometimes\"\n")).is_err()
        );
        let t = parse(both).validate().unwrap().unwrap();
        assert_eq!((t.client_ca, t.client_auth_required), (None, false));
        assert!(TlsConfig::default().validate().unwrap().is_none());
    }
}
