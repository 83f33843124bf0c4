//! What a tenant's name may be (its own module: the sections' configs check tenants
//! without depending on the whole configuration).

/// Tenants name topics and object prefixes: 1 to 64 of `a-z 0-9 - _`, starting with a
/// letter or digit.
pub fn check_tenant(t: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && t.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "({t:?}) must be 1 to 64 of a-z 0-9 - _, starting with a letter or digit (it names Kafka topics and object prefixes)"
        ))
    }
}
