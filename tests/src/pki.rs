//! Certificates for the TLS tests, made by the real `openssl` command: CAs, a server
//! certificate for 127.0.0.1, and client certificates whose subject CN names a gateway.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority under `dir`.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    pub files: CertFiles,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

impl TestCa {
    /// A new P-256 CA named `name`, its files in `dir/<name>.{crt,key}`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("create the pki dir");
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/O=Pigeon tests/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            s(&files.key),
            "-out",
            s(&files.cert),
        ]);
        TestCa {
            dir: dir.to_owned(),
            files,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> CertFiles {
        self.issue(
            name,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        )
    }

    /// A client certificate with subject CN `cn`.
    pub fn client(&self, cn: &str) -> CertFiles {
        self.issue(
            cn,
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        )
    }

    fn issue(&self, name: &str, extensions: &str) -> CertFiles {
        let base = self.dir.join(format!(
            "{}-{name}",
            self.files.cert.file_stem().unwrap().to_str().unwrap()
        ));
        let files = CertFiles {
            cert: base.with_extension("crt"),
            key: base.with_extension("key"),
        };
        let csr = base.with_extension("csr");
        let ext = base.with_extension("ext");
        std::fs::write(&ext, extensions).expect("write the extensions");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/O=Pigeon tests/CN={name}"),
            "-keyout",
            s(&files.key),
            "-out",
            s(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.files.cert),
            "-CAkey",
            s(&self.files.key),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            s(&ext),
            "-out",
            s(&files.cert),
        ]);
        files
    }
}

/// Replaces `dest` with `src`'s bytes the way a renewal tool does: a new file renamed
/// over the old one.
pub fn replace_file(src: &Path, dest: &Path) {
    let tmp = dest.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy");
    std::fs::rename(&tmp, dest).expect("rename");
}
