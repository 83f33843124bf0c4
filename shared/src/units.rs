//! Config value types written the way people write them: `"500ms"`, `"30s"`, `"64MiB"`.
//!
//! Both deserialize from a string (and, for convenience, from a plain integer meaning
//! seconds or bytes), and errors say what was expected.

use std::fmt;
use std::str::FromStr;

/// A duration such as `"250ms"`, `"30s"`, `"5m"`, `"2h"` or `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

/// A value that could not be parsed, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {expected}")]
pub struct ParseUnitError {
    pub value: String,
    pub expected: &'static str,
}

const DURATION_EXPECTED: &str =
    "a duration: a whole number followed by ms, s, m, h or d (e.g. \"500ms\", \"30s\", \"5m\")";
const SIZE_EXPECTED: &str = "a size: a whole number of bytes, optionally followed by B, KB, MB, GB, KiB, MiB or GiB (e.g. \"64MiB\")";

/// Splits `"123abc"` into `(123, "abc")`, trimming spaces around both.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

impl FromStr for Duration {
    type Err = ParseUnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseUnitError {
            value: s.to_owned(),
            expected: DURATION_EXPECTED,
        };
        let (n, unit) = split_number(s).ok_or_else(err)?;
        let ms_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(err()),
        };
        let ms = n.checked_mul(ms_per_unit).ok_or_else(err)?;
        Ok(Self::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, per) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms.is_multiple_of(per) {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// A size in bytes such as `"512KiB"`, `"64MiB"`, `"1GB"` or `"1048576"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseUnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseUnitError {
            value: s.to_owned(),
            expected: SIZE_EXPECTED,
        };
        let (n, unit) = split_number(s).ok_or_else(err)?;
        let mult: u64 = match unit {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Self).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, per) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if b != 0 && b.is_multiple_of(per) {
                return write!(f, "{}{unit}", b / per);
            }
        }
        write!(f, "{b}B")
    }
}

/// Deserializes from a string, or from an integer (`secs` or bytes) for convenience.
macro_rules! serde_via_str {
    ($ty:ty, $from_int:expr, $what:literal) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<$ty, E> {
                        Ok($from_int(n))
                    }
                    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<$ty, E> {
                        u64::try_from(n)
                            .map($from_int)
                            .map_err(|_| E::custom(concat!("a negative number is not ", $what)))
                    }
                }
                d.deserialize_any(V)
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

serde_via_str!(Duration, Duration::from_secs, "a duration such as \"30s\"");
serde_via_str!(ByteSize, ByteSize, "a size such as \"64MiB\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("250ms".parse(), Ok(Duration::from_millis(250)));
        assert_eq!("30s".parse(), Ok(Duration::from_secs(30)));
        assert_eq!(" 5m ".parse(), Ok(Duration::from_secs(300)));
        assert_eq!("2h".parse(), Ok(Duration::from_secs(7200)));
        assert_eq!("7d".parse(), Ok(Duration::from_secs(7 * 86400)));
        for bad in [
            "",
            "s",
            "5",
            "5 parsecs",
            "-1s",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?}");
        }
        assert_eq!(Duration::from_secs(300).to_string(), "5m");
        assert_eq!(Duration::from_millis(1500).to_string(), "1500ms");
    }

    #[test]
    fn sizes() {
        assert_eq!("64MiB".parse(), Ok(ByteSize::mib(64)));
        assert_eq!("1KB".parse(), Ok(ByteSize(1000)));
        assert_eq!("1024".parse(), Ok(ByteSize(1024)));
        for bad in ["", "MiB", "1 TB", "1.5MiB", "-3"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize::kib(512).to_string(), "512KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[derive(serde::Deserialize, Debug)]
    struct Cfg {
        timeout: Duration,
        max: ByteSize,
    }

    #[test]
    fn from_toml_strings_and_integers() {
        let c: Cfg = toml::from_str("timeout = \"2m\"\nmax = \"8MiB\"").unwrap();
        assert_eq!(
            (c.timeout, c.max),
            (Duration::from_secs(120), ByteSize::mib(8))
        );
        let c: Cfg = toml::from_str("timeout = 5\nmax = 100").unwrap();
        assert_eq!((c.timeout, c.max), (Duration::from_secs(5), ByteSize(100)));
        let e = toml::from_str::<Cfg>("timeout = \"soon\"\nmax = 1").unwrap_err();
        assert!(e.to_string().contains("is not a duration"), "{e}");
    }
}
