//! How a configuration is refused: every problem names its key.

use std::path::PathBuf;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

/// A key whose value cannot be used, and why.
pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// In tests: the key a section's check refuses the section's TOML for.
#[cfg(test)]
pub fn refused_key<C: serde::de::DeserializeOwned, S: std::fmt::Debug>(
    toml: &str,
    validate: impl FnOnce(&C) -> Result<S, ConfigError>,
) -> String {
    let section: C = toml::from_str(toml).unwrap();
    match validate(&section) {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an invalid key, got {other:?}"),
    }
}
