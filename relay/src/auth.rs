//! Authentication: which gateway is sending, by its bearer token or by the client
//! certificate of its TLS connection (subject CN = gateway id, signed by `tls.client_ca`).
//!
//! Tokens are kept only as SHA-256 digests. A presented token is hashed and compared with
//! every configured digest in constant time, so neither the comparison nor the position of
//! the matching gateway in the config leaks through timing.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use pigeon_shared::ce::GatewayId;
use sha2::{Digest, Sha256};

use crate::tls::ClientCert;

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
    pub(crate) fn ct_eq(&self, other: &Self) -> bool {
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
    /// `None`: the gateway has no token; only its client certificate identifies it.
    pub digest: Option<TokenDigest>,
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    Malformed,
    #[error("the request has more than one Authorization header; send exactly one")]
    Repeated,
    #[error("the bearer token is not valid")]
    Invalid,
    #[error(
        "the client certificate names no gateway: its subject has no common name (CN = the gateway id)"
    )]
    CertificateWithoutName,
    #[error("the client certificate's common name {0:?} is not a configured gateway")]
    UnknownCertificate(String),
    #[error("the bearer token is not the one of gateway {0}, whose client certificate this is")]
    Mismatch(GatewayId),
}

impl AuthError {
    /// 401 for a missing or bad token (the client can present another), 403 for a
    /// client certificate the relay does not accept as any gateway.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing
            | AuthError::Malformed
            | AuthError::Repeated
            | AuthError::Invalid => 401,
            AuthError::CertificateWithoutName
            | AuthError::UnknownCertificate(_)
            | AuthError::Mismatch(_) => 403,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750) to answer a 401 with.
    pub fn challenge(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => Some("Bearer realm=\"pigeon-relay\""),
            AuthError::Malformed | AuthError::Repeated => {
                Some("Bearer realm=\"pigeon-relay\", error=\"invalid_request\"")
            }
            AuthError::Invalid => Some("Bearer realm=\"pigeon-relay\", error=\"invalid_token\""),
            _ => None,
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A configured gateway, by its token or its client certificate.
    Gateway(GatewayId),
    /// No token, and `allow_unauthenticated = true`: each event's `source` names its gateway.
    Anonymous,
}

/// Checks bearer tokens and client certificates against the configured gateways.
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

    /// Authenticates a request by its headers and the connection's client certificate.
    ///
    /// A certificate (verified by the TLS handshake against `tls.client_ca`) identifies
    /// the gateway its common name names; a token sent beside it must be that gateway's.
    /// Without a certificate, the token decides. A request that presents a token must
    /// present a valid one, even when unauthenticated requests are allowed.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        client: Option<&ClientCert>,
    ) -> Result<Principal, AuthError> {
        let by_cert = client
            .map(|c| self.gateway_for_certificate(c))
            .transpose()?;
        let token = bearer(headers)?;
        match (by_cert, token) {
            (Some(gw), None) => Ok(Principal::Gateway(gw)),
            (Some(gw), Some(t)) => match self.gateway_for_token(t) {
                Some(by_token) if by_token == gw => Ok(Principal::Gateway(gw)),
                _ => Err(AuthError::Mismatch(gw)),
            },
            (None, Some(t)) => self
                .gateway_for_token(t)
                .map(Principal::Gateway)
                .ok_or(AuthError::Invalid),
            (None, None) if self.allow_unauthenticated => Ok(Principal::Anonymous),
            (None, None) => Err(AuthError::Missing),
        }
    }

    fn gateway_for_certificate(&self, c: &ClientCert) -> Result<GatewayId, AuthError> {
        let cn = c
            .common_name
            .as_deref()
            .ok_or(AuthError::CertificateWithoutName)?;
        self.credentials
            .iter()
            .find(|cred| cred.gateway.as_str() == cn)
            .map(|cred| cred.gateway.clone())
            .ok_or_else(|| AuthError::UnknownCertificate(cn.to_owned()))
    }

    /// The gateway whose token this is. Looks at every credential whatever matches.
    fn gateway_for_token(&self, token: &str) -> Option<GatewayId> {
        let presented = TokenDigest::of_token(token);
        let mut found = None;
        for c in &self.credentials {
            if c.digest.is_some_and(|d| d.ct_eq(&presented)) {
                found = Some(&c.gateway);
            }
        }
        found.cloned()
    }
}

/// The bearer token of the `Authorization` header, if there is one.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    // Which one would count is a guess a proxy in front may guess differently.
    if all.next().is_some() {
        return Err(AuthError::Repeated);
    }
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Some(token))
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
                    digest: Some(TokenDigest::of_token("secret-1")),
                },
                Credential {
                    gateway: GatewayId::new("pi-2").unwrap(),
                    digest: TokenDigest::from_hex(
                        // sha256("secret-2")
                        "f4b6bb6548129dacf11c1a9c4dffffefd4aa6b21fcf4e9754cc03b731cbe7c25",
                    ),
                },
                Credential {
                    gateway: GatewayId::new("pi-cert").unwrap(),
                    digest: None,
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
            a.authenticate(&headers(Some("Bearer secret-1")), None),
            Ok(Principal::Gateway(GatewayId::new("pi-1").unwrap()))
        );
        assert_eq!(
            a.authenticate(&headers(Some("bearer   secret-1 ")), None),
            Ok(Principal::Gateway(GatewayId::new("pi-1").unwrap()))
        );
        // pi-2 is configured by token_sha256.
        assert_eq!(
            a.authenticate(&headers(Some("Bearer secret-2")), None),
            Ok(Principal::Gateway(GatewayId::new("pi-2").unwrap()))
        );
    }

    /// Issue 24.4: two Authorization headers are refused, not resolved by taking the
    /// first (a proxy in front might have checked the other).
    #[test]
    fn issue_24_two_authorization_headers_are_refused() {
        let a = auth(true);
        let mut h = headers(Some("Bearer secret-1"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer secret-2"));
        let e = a.authenticate(&h, None).unwrap_err();
        assert_eq!(e, AuthError::Repeated);
        assert_eq!(e.status(), 401);
        assert!(e.challenge().unwrap().contains("invalid_request"));
        // Also when both are the same valid token.
        let mut h = headers(Some("Bearer secret-1"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer secret-1"));
        assert_eq!(a.authenticate(&h, None), Err(AuthError::Repeated));
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
        assert_eq!(
            a.authenticate(&headers(None), None),
            Err(AuthError::Missing)
        );
        assert_eq!(
            a.authenticate(&headers(Some("Bearer nope")), None),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            a.authenticate(&headers(Some("Basic c2VjcmV0LTE=")), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&headers(Some("Bearer ")), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&headers(Some("secret-1")), None),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn anonymous_only_when_allowed_and_no_token_given() {
        assert_eq!(
            auth(true).authenticate(&headers(None), None),
            Ok(Principal::Anonymous)
        );
        assert_eq!(
            auth(true).authenticate(&headers(Some("Bearer nope")), None),
            Err(AuthError::Invalid)
        );
    }

    fn cert(cn: Option<&str>) -> ClientCert {
        ClientCert {
            common_name: cn.map(str::to_owned),
        }
    }

    #[test]
    fn a_client_certificate_names_its_gateway() {
        let a = auth(false);
        let gw = |s: &str| Principal::Gateway(GatewayId::new(s).unwrap());
        let c = cert(Some("pi-cert"));
        assert_eq!(a.authenticate(&headers(None), Some(&c)), Ok(gw("pi-cert")));
        // A gateway with a token may also come with its certificate, and the token.
        let c1 = cert(Some("pi-1"));
        assert_eq!(a.authenticate(&headers(None), Some(&c1)), Ok(gw("pi-1")));
        assert_eq!(
            a.authenticate(&headers(Some("Bearer secret-1")), Some(&c1)),
            Ok(gw("pi-1"))
        );
    }

    #[test]
    fn a_certificate_and_a_token_must_agree() {
        let a = auth(true);
        let c1 = cert(Some("pi-1"));
        assert_eq!(
            a.authenticate(&headers(Some("Bearer secret-2")), Some(&c1)),
            Err(AuthError::Mismatch(GatewayId::new("pi-1").unwrap()))
        );
        assert_eq!(
            a.authenticate(&headers(Some("Bearer nope")), Some(&c1)),
            Err(AuthError::Mismatch(GatewayId::new("pi-1").unwrap()))
        );
        // A token cannot claim a certificate-only gateway either.
        assert_eq!(
            a.authenticate(
                &headers(Some("Bearer secret-1")),
                Some(&cert(Some("pi-cert")))
            ),
            Err(AuthError::Mismatch(GatewayId::new("pi-cert").unwrap()))
        );
    }

    #[test]
    fn certificates_of_no_configured_gateway_are_refused() {
        // Even with unauthenticated ingest allowed: a certificate claims an identity.
        let a = auth(true);
        let e = a
            .authenticate(&headers(None), Some(&cert(Some("pi-9"))))
            .unwrap_err();
        assert_eq!(e, AuthError::UnknownCertificate("pi-9".into()));
        assert_eq!((e.status(), e.challenge()), (403, None));
        assert_eq!(
            a.authenticate(&headers(None), Some(&cert(None))),
            Err(AuthError::CertificateWithoutName)
        );
        assert_eq!(AuthError::Invalid.status(), 401);
    }
}
