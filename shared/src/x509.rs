//! The two things Pigeon reads out of an X.509 certificate: the subject's common name
//! (a gateway's identity when it authenticates with a client certificate) and the end of
//! its validity (for the expiry metrics and warnings).
//!
//! Not a validator: rustls checks signatures, chains and dates. This only walks the DER
//! of a certificate rustls already accepted (or one about to be served), so a malformed
//! one is an error naming what is wrong, never a panic.
//!
//! ```text
//! Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
//!                               issuer, validity, subject, ... }
//! Validity     ::= SEQUENCE { notBefore Time, notAfter Time }
//! Name         ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
//! ```

/// What Pigeon needs from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject's first common name (OID 2.5.4.3), if it has one.
    pub common_name: Option<String>,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a readable X.509 certificate: {0}")]
pub struct X509Error(&'static str);

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION_TAG: u8 = 0xa0;
/// 2.5.4.3, id-at-commonName, as DER content bytes.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// Reads the subject's common name and `notAfter` of a DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary, X509Error> {
    let (cert, _) = expect(der, SEQUENCE, "the certificate is not a DER SEQUENCE")?;
    let (tbs, _) = expect(cert, SEQUENCE, "tbsCertificate is missing")?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION_TAG) {
        rest = tlv(rest)?.2;
    }
    let (_, rest) = expect(rest, INTEGER, "serialNumber is missing")?;
    let (_, rest) = expect(rest, SEQUENCE, "the signature algorithm is missing")?;
    let (_, rest) = expect(rest, SEQUENCE, "the issuer is missing")?;
    let (validity, rest) = expect(rest, SEQUENCE, "the validity is missing")?;
    let (subject, _) = expect(rest, SEQUENCE, "the subject is missing")?;
    let (_, _, after) = tlv(validity)?;
    let (tag, not_after, _) = tlv(after)?;
    let not_after = time(tag, not_after)?;
    Ok(CertSummary {
        common_name: common_name(subject)?,
        not_after,
    })
}

fn common_name(mut name: &[u8]) -> Result<Option<String>, X509Error> {
    while !name.is_empty() {
        let (mut set, rest) = expect(name, SET, "a subject RDN is not a SET")?;
        name = rest;
        while !set.is_empty() {
            let (atv, rest) = expect(set, SEQUENCE, "a subject attribute is not a SEQUENCE")?;
            set = rest;
            let (oid, value) = expect(atv, OID, "a subject attribute has no type")?;
            if oid == COMMON_NAME {
                let (_, text, _) = tlv(value)?;
                // UTF8String, PrintableString, IA5String: ASCII or UTF-8 either way.
                return std::str::from_utf8(text)
                    .map(|s| Some(s.to_owned()))
                    .map_err(|_| X509Error("the subject's common name is not UTF-8"));
            }
        }
    }
    Ok(None)
}

/// One tag-length-value: (tag, content, what follows).
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), X509Error> {
    const TRUNCATED: X509Error = X509Error("a DER element is truncated");
    let (&tag, rest) = input.split_first().ok_or(TRUNCATED)?;
    let (&first, rest) = rest.split_first().ok_or(TRUNCATED)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(X509Error("a DER length is invalid"));
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(TRUNCATED);
    }
    let (content, rest) = rest.split_at(len);
    Ok((tag, content, rest))
}

fn expect<'a>(
    input: &'a [u8],
    want: u8,
    missing: &'static str,
) -> Result<(&'a [u8], &'a [u8]), X509Error> {
    match tlv(input) {
        Ok((tag, content, rest)) if tag == want => Ok((content, rest)),
        _ => Err(X509Error(missing)),
    }
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049, RFC 5280) or GeneralizedTime
/// `YYYYMMDDHHMMSSZ`, to Unix seconds.
fn time(tag: u8, text: &[u8]) -> Result<i64, X509Error> {
    const BAD: X509Error = X509Error("notAfter is not a UTC time");
    let digits = |s: &[u8]| -> Result<i64, X509Error> {
        s.iter().try_fold(0i64, |acc, &b| {
            b.is_ascii_digit()
                .then(|| acc * 10 + i64::from(b - b'0'))
                .ok_or(BAD)
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return Err(BAD),
    };
    if rest[10] != b'Z' {
        return Err(BAD);
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (h, m, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return Err(BAD);
    }
    Ok(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650
    ///  -subj "/O=Pigeon tests/CN=pi-kitchen"`, notAfter 2036-11-29 11:29:36 UTC.
    const CERT_B64: &str = "\
MIIBrTCCAVOgAwIBAgIUAtqU5GeaWUPhAqDw0NYWTXhFCmIwCgYIKoZIzj0EAwIw\
LDEVMBMGA1UECgwMUGlnZW9uIHRlc3RzMRMwEQYDVQQDDApwaS1raXRjaGVuMB4X\
DTI2MTIwMjExMjkzNloXDTM2MTEyOTExMjkzNlowLDEVMBMGA1UECgwMUGlnZW9u\
IHRlc3RzMRMwEQYDVQQDDApwaS1raXRjaGVuMFkwEwYHKoZIzj0CAQYIKoZIzj0D\
AQcDQgAEmsJsgJziIqpDWjZFALg3bO5Ui3p33OLc+/MZj98vN0apoWRb3EfUYwPU\
D7e/a59cUM6adSa8zpTT8IJy1zm7g6NTMFEwHQYDVR0OBBYEFPjHobj7FCLO7e3f\
kayb+4DQthAsMB8GA1UdIwQYMBaAFPjHobj7FCLO7e3fkayb+4DQthAsMA8GA1Ud\
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAM54uxUmyoZQXAcjL+pOzJYA\
OiD6Q8beD2zopKV9lSa4AiAr/fZvgiBFV6KOXDEttflTYgeFlioUXJ61hj/QBMI4\
7A==";

    fn cert() -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(CERT_B64)
            .unwrap()
    }

    #[test]
    fn reads_the_common_name_and_not_after() {
        let s = summarize(&cert()).unwrap();
        assert_eq!(s.common_name.as_deref(), Some("pi-kitchen"));
        // date -u -d '2036-11-29 11:29:36' +%s
        assert_eq!(s.not_after, 2_111_570_976);
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let der = cert();
        for n in 0..der.len() {
            assert!(summarize(&der[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(summarize(b"-----BEGIN CERTIFICATE-----").is_err());
        assert!(summarize(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn times_both_forms() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Ok(0));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Ok(2_524_607_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20500101000000Z"),
            Ok(2_524_608_000)
        );
        assert_eq!(
            time(GENERALIZED_TIME, b"20240229120000Z"),
            Ok(1_709_208_000)
        );
        assert!(time(UTC_TIME, b"701301000000Z").is_err());
        assert!(time(UTC_TIME, b"700101000000+").is_err());
        assert!(time(UTC_TIME, b"7001010000Z").is_err());
    }
}
