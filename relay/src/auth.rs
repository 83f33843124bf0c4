//! Bearer-token authentication: which gateway is sending.
//!
//! Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with
//! every configured digest in constant time, so neither the comparison nor the position of
//! the matching gateway in the config leaks through timing.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use pigeon_shared::ce::GatewayId;
use sha2::{Digest, Sha256};

/// The SHA-256 digest of a bearer token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; 32]);

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but there is no reason to print them either.
        f.write_str("TokenDigest(..)")
    }
}

impl TokenDigest {
    pub fn of_token(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses 64 hexadecimal digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// Equality that takes the same time wherever the digests differ.
    fn ct_eq(&self, other: &Self) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// One configured gateway and the digest of its token.
#[derive(Debug, Clone)]
pub struct Credential {
    pub gateway: GatewayId,
    pub digest: TokenDigest,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    Malformed,
    #[error("the bearer token is not valid")]
    Invalid,
}

impl AuthError {
    /// The `WWW-Authenticate` challenge (RFC 6750) to answer with.
    pub fn challenge(&self) -> &'static str {
        match self {
            AuthError::Missing => "Bearer realm=\"pigeon-relay\"",
            AuthError::Malformed => "Bearer realm=\"pigeon-relay\", error=\"invalid_request\"",
            AuthError::Invalid => "Bearer realm=\"pigeon-relay\", error=\"invalid_token\"",
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A configured gateway, by its token.
    Gateway(GatewayId),
    /// No token, and `allow_unauthenticated = true`: each event's `source` names its gateway.
    Anonymous,
}

/// Checks bearer tokens against the configured gateways.
#[derive(Debug, Clone)]
pub struct Authenticator {
    credentials: Vec<Credential>,
    allow_unauthenticated: bool,
}

impl Authenticator {
    pub fn new(credentials: Vec<Credential>, allow_unauthenticated: bool) -> Self {
        Self {
            credentials,
            allow_unauthenticated,
        }
    }

    /// Authenticates a request by its headers.
    ///
    /// A request that presents a token must present a valid one, even when
    /// unauthenticated requests are allowed.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return if self.allow_unauthenticated {
                Ok(Principal::Anonymous)
            } else {
                Err(AuthError::Missing)
            };
        };
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        self.gateway_for_token(token)
            .map(Principal::Gateway)
            .ok_or(AuthError::Invalid)
    }

    /// The gateway whose token this is. Looks at every credential whatever matches.
    fn gateway_for_token(&self, token: &str) -> Option<GatewayId> {
        let presented = TokenDigest::of_token(token);
        let mut found = None;
        for c in &self.credentials {
            if c.digest.ct_eq(&presented) {
                found = Some(&c.gateway);
            }
        }
        found.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth(allow: bool) -> Authenticator {
        Authenticator::new(
            vec![
                Credential {
                    gateway: GatewayId::new("pi-1").unwrap(),
                    digest: TokenDigest::of_token("secret-1"),
                },
                Credential {
                    gateway: GatewayId::new("pi-2").unwrap(),
                    digest: TokenDigest::from_hex(
                        // sha256("secret-2")
                        "f4b6bb6548129dacf11c1a9c4dffffefd4aa6b21fcf4e9754cc03b731cbe7c25",
                    )
                    .unwrap(),
                },
            ],
            allow,
        )
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn tokens_map_to_their_gateway() {
        let a = auth(false);
        assert_eq!(
            a.authenticate(&headers(Some("Bearer secret-1"))),
            Ok(Principal::Gateway(GatewayId::new("pi-1").unwrap()))
        );
        assert_eq!(
            a.authenticate(&headers(Some("bearer   secret-1 "))),
            Ok(Principal::Gateway(GatewayId::new("pi-1").unwrap()))
        );
        // pi-2 is configured by token_sha256.
        assert_eq!(
            a.authenticate(&headers(Some("Bearer secret-2"))),
            Ok(Principal::Gateway(GatewayId::new("pi-2").unwrap()))
        );
    }

    #[test]
    fn token_sha256_matches_the_token() {
        let digest = TokenDigest::of_token("secret-2");
        let hex: String = digest.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(TokenDigest::from_hex(&hex), Some(digest));
        assert_eq!(TokenDigest::from_hex(&hex.to_uppercase()), Some(digest));
        assert_eq!(TokenDigest::from_hex(&hex[1..]), None);
        assert_eq!(TokenDigest::from_hex(&format!("{}g", &hex[1..])), None);
    }

    #[test]
    fn missing_wrong_and_malformed_tokens() {
        let a = auth(false);
        assert_eq!(a.authenticate(&headers(None)), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(&headers(Some("Bearer nope"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.authenticate(&headers(Some("Basic c2VjcmV0LTE="))),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&headers(Some("Bearer "))),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&headers(Some("secret-1"))),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn anonymous_only_when_allowed_and_no_token_given() {
        assert_eq!(
            auth(true).authenticate(&headers(None)),
            Ok(Principal::Anonymous)
        );
        assert_eq!(
            auth(true).authenticate(&headers(Some("Bearer nope"))),
            Err(AuthError::Invalid)
        );
    }
}
