//! `[fleet]` and `[[operators]]`, checked into [`FleetSettings`] and the operators'
//! [`OperatorCredential`]s.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use pigeon_shared::ce::GatewayId;
use pigeon_shared::units::Duration;
use serde::Deserialize;

use crate::auth::{Credential, TokenDigest};
use crate::config::error::{ConfigError, invalid};
use crate::config::tenant::check_tenant;

use super::operators::OperatorCredential;

/// `[fleet]`: the fleet view's silence rule and the per-gateway metrics' cap.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The heartbeat interval assumed for a gateway until two of its heartbeats tell.
    pub heartbeat_interval: Duration,
    /// Gateways with series of their own on `/metrics`; the rest are summed under
    /// `gateway="_other"`.
    pub max_gateway_series: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            // pigeon-gateway's own default `health.interval`.
            heartbeat_interval: Duration::from_secs(60),
            max_gateway_series: 1000,
        }
    }
}

/// Checked `[fleet]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSettings {
    pub heartbeat_interval: std::time::Duration,
    pub max_gateway_series: usize,
}

/// The most per-gateway series `fleet.max_gateway_series` may ask for.
pub const MAX_GATEWAY_SERIES: usize = 100_000;

impl FleetConfig {
    pub fn validate(&self) -> Result<FleetSettings, ConfigError> {
        let i = self.heartbeat_interval.get();
        // pigeon-gateway's `health.interval` takes 1s to 1d.
        if i < std::time::Duration::from_secs(1) || i > std::time::Duration::from_secs(86_400) {
            return Err(invalid(
                "fleet.heartbeat_interval",
                "must be between 1s and 1d (the range of pigeon-gateway's health.interval)",
            ));
        }
        if self.max_gateway_series > MAX_GATEWAY_SERIES {
            return Err(invalid(
                "fleet.max_gateway_series",
                format!(
                    "must be at most {MAX_GATEWAY_SERIES} (each gateway adds four series to every scrape)"
                ),
            ));
        }
        Ok(FleetSettings {
            heartbeat_interval: i,
            max_gateway_series: self.max_gateway_series,
        })
    }
}

/// `[[operators]]`: who may read the fleet view, with a credential of their own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// For the log: which operator asked.
    pub name: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// A file holding the token (its trailing line break ignored), read at start.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The tenants whose gateways this operator sees; absent: every tenant.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
}

/// Checks `[[operators]]`: names unique, exactly one credential each, tokens that a
/// header can carry, unique, and never a gateway's; tenants well-formed.
pub fn check_operators(
    configured: &[OperatorConfig],
    gateways: &[Credential],
    tenants: &HashMap<GatewayId, String>,
) -> Result<Vec<OperatorCredential>, ConfigError> {
    let gateway_digests: HashMap<TokenDigest, &GatewayId> = gateways
        .iter()
        .filter_map(|c| c.digest.map(|d| (d, &c.gateway)))
        .collect();
    let known_tenants: HashSet<&str> = tenants.values().map(String::as_str).collect();
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    let mut out = Vec::with_capacity(configured.len());
    for (i, o) in configured.iter().enumerate() {
        let key = |field: &str| format!("operators[{i}].{field}");
        check_name(&o.name).map_err(|p| invalid(key("name"), p))?;
        if !names.insert(o.name.as_str()) {
            return Err(invalid(
                key("name"),
                format!("{:?} is configured more than once", o.name),
            ));
        }
        let (digest, which) = operator_digest(o, &key)?;
        if let Some(gw) = gateway_digests.get(&digest) {
            return Err(invalid(
                key(which),
                format!(
                    "is gateway {gw}'s token: an operator needs a token of its own, which no gateway holds"
                ),
            ));
        }
        if !digests.insert(digest) {
            return Err(invalid(
                key(which),
                "is the same as another operator's: give each operator its own",
            ));
        }
        let scope = match &o.tenants {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    key("tenants"),
                    "is empty: leave it out for every tenant, or name at least one",
                ));
            }
            Some(list) => {
                for t in list {
                    check_tenant(t).map_err(|p| invalid(key("tenants"), p))?;
                    if !known_tenants.contains(t.as_str()) {
                        tracing::warn!(
                            operator = ?o.name,
                            tenant = ?t,
                            "An operator's tenant is not the tenant of any configured gateway."
                        );
                    }
                }
                Some(list.iter().cloned().collect())
            }
        };
        out.push(OperatorCredential {
            name: o.name.clone(),
            digest,
            tenants: scope,
        });
    }
    Ok(out)
}

/// Operator names: 1 to 64 of `A-Z a-z 0-9 . _ - @`, as they go into the log.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "({:?}) must be 1 to 64 of A-Z a-z 0-9 . _ - @",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// The digest of the one credential an operator has, and the key it came from.
fn operator_digest(
    o: &OperatorConfig,
    key: &impl Fn(&str) -> String,
) -> Result<(TokenDigest, &'static str), ConfigError> {
    match (&o.token, &o.token_sha256, &o.token_file) {
        (Some(t), None, None) => Ok((token_digest(t, &key("token"), &o.name)?, "token")),
        (None, Some(hex), None) => TokenDigest::from_hex(hex)
            .map(|d| (d, "token_sha256"))
            .ok_or_else(|| {
                invalid(
                    key("token_sha256"),
                    "must be 64 hexadecimal digits (a SHA-256 digest)",
                )
            }),
        (None, None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    key("token_file"),
                    format!("cannot be read ({}): {e}", path.display()),
                )
            })?;
            let token = text.strip_suffix('\n').unwrap_or(&text);
            let token = token.strip_suffix('\r').unwrap_or(token);
            Ok((
                token_digest(token, &key("token_file"), &o.name)?,
                "token_file",
            ))
        }
        (None, None, None) => Err(invalid(
            key("token"),
            "is missing: give the operator exactly one of token, token_sha256 and token_file",
        )),
        _ => Err(invalid(
            key("token"),
            "and token_sha256 / token_file: give exactly one of them",
        )),
    }
}

fn token_digest(token: &str, key: &str, name: &str) -> Result<TokenDigest, ConfigError> {
    pigeon_shared::wire::check_bearer_token(token).map_err(|e| invalid(key, e))?;
    if token.len() < 16 {
        tracing::warn!(
            operator = ?name,
            length = token.len(),
            "The operator's token is shorter than 16 characters; use a long random secret."
        );
    }
    Ok(TokenDigest::of_token(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::refused_key;

    #[test]
    fn fleet_defaults_and_limits() {
        let f = FleetConfig::default().validate().unwrap();
        assert_eq!(f.heartbeat_interval, std::time::Duration::from_secs(60));
        assert_eq!(f.max_gateway_series, 1000);
        let f: FleetConfig =
            toml::from_str("heartbeat_interval = \"10s\"\nmax_gateway_series = 0\n").unwrap();
        assert_eq!(f.validate().unwrap().max_gateway_series, 0);
        for bad in [
            "heartbeat_interval = \"500ms\"",
            "heartbeat_interval = \"2d\"",
        ] {
            assert_eq!(
                refused_key(bad, FleetConfig::validate),
                "fleet.heartbeat_interval"
            );
        }
        assert_eq!(
            refused_key("max_gateway_series = 100001", FleetConfig::validate),
            "fleet.max_gateway_series"
        );
        assert!(toml::from_str::<FleetConfig>("max_series = 3").is_err());
    }

    fn gateways() -> (Vec<Credential>, HashMap<GatewayId, String>) {
        let gw = GatewayId::new("pi-1").unwrap();
        (
            vec![Credential {
                gateway: gw.clone(),
                digest: Some(TokenDigest::of_token("gateway-secret-0123")),
            }],
            HashMap::from([(gw, "acme".to_owned())]),
        )
    }

    fn operators(toml_text: &str) -> Result<Vec<OperatorCredential>, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            operators: Vec<OperatorConfig>,
        }
        let f: File = toml::from_str(toml_text).unwrap();
        let (g, t) = gateways();
        check_operators(&f.operators, &g, &t)
    }

    fn refused(toml_text: &str) -> String {
        match operators(toml_text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn operators_with_each_kind_of_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("noc.token");
        std::fs::write(&file, "file-secret-0123456789\n").unwrap();
        let ops = operators(&format!(
            r#"
            [[operators]]
            name = "ops"
            token = "operator-secret-0123"
            [[operators]]
            name = "acme-noc"
            token_sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
            tenants = ["acme"]
            [[operators]]
            name = "noc@example.com"
            token_file = {:?}
            "#,
            file.display().to_string()
        ))
        .unwrap();
        assert_eq!(ops[0].digest, TokenDigest::of_token("operator-secret-0123"));
        assert_eq!(ops[0].tenants, None);
        assert_eq!(ops[1].digest, TokenDigest::of_token("test"));
        assert_eq!(ops[1].tenants, Some(HashSet::from(["acme".to_owned()])));
        // The file's line break is not part of the token.
        assert_eq!(
            ops[2].digest,
            TokenDigest::of_token("file-secret-0123456789")
        );
    }

    #[test]
    fn operator_mistakes_name_the_key() {
        let op = |body: &str| format!("[[operators]]\nname = \"ops\"\n{body}\n");
        assert_eq!(refused(&op("")), "operators[0].token");
        assert_eq!(
            refused(&op(
                "token = \"a-secret-0123456789\"\ntoken_sha256 = \"00\""
            )),
            "operators[0].token"
        );
        assert_eq!(
            refused(&op("token_sha256 = \"abc\"")),
            "operators[0].token_sha256"
        );
        assert_eq!(
            refused(&op("token = \"with space 0123456789\"")),
            "operators[0].token"
        );
        assert_eq!(
            refused(&op("token_file = \"/nonexistent/pigeon/token\"")),
            "operators[0].token_file"
        );
        assert_eq!(
            refused(&op("token = \"a-secret-0123456789\"\ntenants = []")),
            "operators[0].tenants"
        );
        assert_eq!(
            refused(&op("token = \"a-secret-0123456789\"\ntenants = [\"Acme\"]")),
            "operators[0].tenants"
        );
        assert_eq!(
            refused("[[operators]]\nname = \"a b\"\ntoken = \"a-secret-0123456789\"\n"),
            "operators[0].name"
        );
        let two = op("token = \"a-secret-0123456789\"")
            + "[[operators]]\nname = \"ops\"\ntoken = \"b-secret-0123456789\"\n";
        assert_eq!(refused(&two), "operators[1].name");
        let same = op("token = \"a-secret-0123456789\"")
            + "[[operators]]\nname = \"ops2\"\ntoken = \"a-secret-0123456789\"\n";
        assert_eq!(refused(&same), "operators[1].token");
    }

    #[test]
    fn a_gateway_token_is_never_an_operator_token() {
        let e = operators("[[operators]]\nname = \"ops\"\ntoken = \"gateway-secret-0123\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("operators[0].token") && e.contains("gateway pi-1's token"),
            "{e}"
        );
        // Nor by its digest.
        use sha2::Digest as _;
        let hex: String = sha2::Sha256::digest(b"gateway-secret-0123")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            refused(&format!(
                "[[operators]]\nname = \"ops\"\ntoken_sha256 = \"{hex}\"\n"
            )),
            "operators[0].token_sha256"
        );
    }
}
