//! What the relay's answers mean, for both lanes: one reading of an HTTP answer
//! ([`Reply`]) and one kind of failure ([`Failure`]) that the [`RetryPolicy`] counts.
//!
//! [`RetryPolicy`]: super::retry::RetryPolicy

use std::time::Duration;

use pigeon_shared::wire;
use reqwest::{StatusCode, header};

/// Who has to act on a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The relay could not be reached, or the connection broke.
    Network,
    /// The relay answered, with an error (5xx, 429) or an answer that makes no sense.
    /// Counted against `relay.max_attempts`.
    Relay,
    /// The relay refuses the gateway (401, 403, 415): a person has to fix the config.
    Operator,
}

/// An attempt that failed and is tried again: why, who has to act, and when the relay
/// asked to be tried again (`Retry-After`).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) reason: String,
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    /// The relay was not reached, or the connection broke: tried again without counting.
    pub(crate) fn network(reason: String) -> Failure {
        Failure {
            kind: FailureKind::Network,
            reason,
            retry_after: None,
        }
    }

    /// The relay answered something unusable: counted against `relay.max_attempts`.
    pub(crate) fn relay(reason: String) -> Failure {
        Failure {
            kind: FailureKind::Relay,
            reason,
            retry_after: None,
        }
    }
}

/// The relay's answer to one request, read to the end.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    retry_after: Option<Duration>,
    pub(crate) text: String,
}

impl Reply {
    pub(crate) async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        Reply {
            status,
            retry_after,
            text,
        }
    }

    /// The sentence of an error answer (`wire::ErrorBody`), or the start of the text.
    pub(crate) fn message(&self) -> String {
        error_message(&self.text)
    }

    /// The failure an answer is that the endpoint gives no meaning of its own: 401 and
    /// 403 (check the token) and 415 are the operator's to fix; anything else is the
    /// relay's, tried again when its `Retry-After` says.
    pub(crate) fn failure(&self) -> Failure {
        let status = self.status;
        match status.as_u16() {
            401 | 403 => Failure {
                kind: FailureKind::Operator,
                reason: format!("HTTP {status}: {} (check relay.token)", self.message()),
                retry_after: None,
            },
            415 => Failure {
                kind: FailureKind::Operator,
                reason: format!("HTTP {status}: {}", self.message()),
                retry_after: None,
            },
            _ => Failure {
                kind: FailureKind::Relay,
                reason: format!("HTTP {status}: {}", self.message()),
                retry_after: self.retry_after,
            },
        }
    }
}

/// The relay's `Retry-After` (whole seconds), if it sent one.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The sentence of an error answer (`wire::ErrorBody`), or the start of whatever it was.
fn error_message(text: &str) -> String {
    serde_json::from_str::<wire::ErrorBody>(text)
        .map(|b| b.error)
        .unwrap_or_else(|_| text.chars().take(300).collect())
}

/// The error and its causes in one line ("error sending request: connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    if let Some(hint) = tls_hint(&s) {
        s.push_str(" (");
        s.push_str(hint);
        s.push(')');
    }
    s
}

/// What to do about a relay certificate the gateway refused, from rustls's words.
fn tls_hint(error: &str) -> Option<&'static str> {
    if !error.contains("invalid peer certificate") {
        return None;
    }
    Some(if error.contains("UnknownIssuer") {
        "the relay's certificate is not signed by a CA this gateway trusts: set relay.ca_file to the CA that signed it"
    } else if error.contains("Expired") {
        "the relay's certificate has expired: its operator must renew it"
    } else if error.contains("NotValidForName") {
        "the relay's certificate is not for the host in relay.url"
    } else {
        "the gateway does not accept the relay's certificate"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, text: &str) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: Some(Duration::from_secs(7)),
            text: text.into(),
        }
    }

    #[test]
    fn answers_without_a_meaning_of_their_own_are_the_operators_or_the_relays() {
        let denied = reply(401, r#"{"error":"bad token"}"#).failure();
        assert_eq!(denied.kind, FailureKind::Operator);
        assert_eq!(
            denied.reason,
            "HTTP 401 Unauthorized: bad token (check relay.token)"
        );
        assert_eq!(denied.retry_after, None);
        assert_eq!(reply(403, "").failure().kind, FailureKind::Operator);
        let media = reply(415, "not json").failure();
        assert_eq!(media.kind, FailureKind::Operator);
        assert_eq!(media.reason, "HTTP 415 Unsupported Media Type: not json");
        let busy = reply(503, r#"{"error":"full"}"#).failure();
        assert_eq!(busy.kind, FailureKind::Relay);
        assert_eq!(busy.reason, "HTTP 503 Service Unavailable: full");
        assert_eq!(busy.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn refused_relay_certificates_say_what_to_do() {
        let e = |kind: &str| format!("client error (Connect): invalid peer certificate: {kind}");
        assert!(
            tls_hint(&e("UnknownIssuer"))
                .unwrap()
                .contains("relay.ca_file")
        );
        assert!(tls_hint(&e("Expired")).unwrap().contains("renew"));
        assert!(
            tls_hint(&e("NotValidForName"))
                .unwrap()
                .contains("relay.url")
        );
        assert!(tls_hint(&e("BadSignature")).is_some());
        assert_eq!(tls_hint("connection refused"), None);
    }
}
