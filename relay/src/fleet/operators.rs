//! Operators: who may read the fleet view. Each has a bearer token of its own
//! (`[[operators]]`), kept as a SHA-256 digest and compared in constant time like a
//! gateway's; a gateway's token is never one (the config refuses an operator token equal
//! to a gateway's, and only operators' digests are compared here).

use std::collections::HashSet;

use axum::http::HeaderMap;

use crate::auth::{AuthError, TokenDigest, bearer};

/// One configured operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorCredential {
    pub name: String,
    pub digest: TokenDigest,
    /// `None`: every tenant.
    pub tenants: Option<HashSet<String>>,
}

/// An authenticated operator.
#[derive(Debug, Clone, Copy)]
pub struct Operator<'a> {
    pub name: &'a str,
    tenants: Option<&'a HashSet<String>>,
}

impl Operator<'_> {
    /// Whether this operator may see gateways of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenants.is_none_or(|t| t.contains(tenant))
    }
}

/// Why a request to the fleet view is not an operator's (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OperatorAuthError {
    #[error(
        "the fleet view is off: no [[operators]] are configured in the relay's config (see docs/fleet.md)"
    )]
    NotConfigured,
    #[error(
        "missing bearer token: send Authorization: Bearer <token> with an operator token ([[operators]] in the relay's config)"
    )]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    Malformed,
    #[error("the request has more than one Authorization header; send exactly one")]
    Repeated,
    #[error(
        "the bearer token is not an operator token: the fleet view takes the tokens of [[operators]], never a gateway's"
    )]
    Invalid,
}

impl OperatorAuthError {
    /// The `WWW-Authenticate` challenge (RFC 6750).
    pub fn challenge(&self) -> &'static str {
        match self {
            OperatorAuthError::NotConfigured | OperatorAuthError::Missing => {
                "Bearer realm=\"pigeon-relay operators\""
            }
            OperatorAuthError::Malformed | OperatorAuthError::Repeated => {
                "Bearer realm=\"pigeon-relay operators\", error=\"invalid_request\""
            }
            OperatorAuthError::Invalid => {
                "Bearer realm=\"pigeon-relay operators\", error=\"invalid_token\""
            }
        }
    }
}

/// The configured operators.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    credentials: Vec<OperatorCredential>,
}

impl Operators {
    pub fn new(credentials: Vec<OperatorCredential>) -> Self {
        Self { credentials }
    }

    /// The operator whose bearer token the request carries. The presented token is
    /// hashed and compared with every operator's digest, whichever matches.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Operator<'_>, OperatorAuthError> {
        if self.credentials.is_empty() {
            return Err(OperatorAuthError::NotConfigured);
        }
        let token = bearer(headers)
            .map_err(|e| match e {
                AuthError::Repeated => OperatorAuthError::Repeated,
                _ => OperatorAuthError::Malformed,
            })?
            .ok_or(OperatorAuthError::Missing)?;
        let presented = TokenDigest::of_token(token);
        let mut found = None;
        for c in &self.credentials {
            if c.digest.ct_eq(&presented) {
                found = Some(c);
            }
        }
        found
            .map(|c| Operator {
                name: &c.name,
                tenants: c.tenants.as_ref(),
            })
            .ok_or(OperatorAuthError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use axum::http::header::AUTHORIZATION;

    fn ops() -> Operators {
        Operators::new(vec![
            OperatorCredential {
                name: "all".into(),
                digest: TokenDigest::of_token("operator-all-0123"),
                tenants: None,
            },
            OperatorCredential {
                name: "acme".into(),
                digest: TokenDigest::of_token("operator-acme-0123"),
                tenants: Some(HashSet::from(["acme".to_owned()])),
            },
        ])
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn tokens_name_their_operator_and_its_tenants() {
        let o = ops();
        let all = o
            .authenticate(&headers(&["Bearer operator-all-0123"]))
            .unwrap();
        assert_eq!(all.name, "all");
        assert!(all.sees("acme") && all.sees("default"));
        let acme = o
            .authenticate(&headers(&["bearer operator-acme-0123"]))
            .unwrap();
        assert_eq!(acme.name, "acme");
        assert!(acme.sees("acme") && !acme.sees("default"));
    }

    #[test]
    fn refusals() {
        let o = ops();
        let err = |h: &[&str]| o.authenticate(&headers(h)).unwrap_err();
        assert_eq!(err(&[]), OperatorAuthError::Missing);
        assert_eq!(err(&["Bearer nope"]), OperatorAuthError::Invalid);
        assert_eq!(err(&["Basic b3A6cHc="]), OperatorAuthError::Malformed);
        assert_eq!(
            err(&["Bearer operator-all-0123", "Bearer operator-all-0123"]),
            OperatorAuthError::Repeated
        );
        assert!(
            OperatorAuthError::Invalid
                .challenge()
                .contains("invalid_token")
        );
        assert_eq!(
            Operators::default()
                .authenticate(&headers(&["Bearer operator-all-0123"]))
                .unwrap_err(),
            OperatorAuthError::NotConfigured
        );
    }
}
