//! HTTPS on the relay's own port (`[tls]`): rustls with ring, HTTP/1.1, optional client
//! certificates as the gateway's identity, and the certificate reloaded without a
//! restart.
//!
//! * [`Tls`] holds the server configuration in use. It is built from the PEM files at
//!   start (a missing or mismatched file is a configuration error), and built again when
//!   the files change — checked every `reload_check` and at once on SIGHUP. A change that
//!   does not load (a renewal that wrote the certificate but not yet the key) keeps the
//!   previous configuration and is logged and counted; the next change is tried again.
//!   Connections already open keep the certificate they started with.
//! * [`TlsListener`] accepts TCP connections and runs each handshake in a task of its own,
//!   with a timeout, so one slow or silent client delays nobody. Only finished handshakes
//!   reach the HTTP server, each with its [`Peer`]: the address and, when the client
//!   presented a certificate the client CA signed, its subject's common name.
//! * [`PlainListener`] is the same without TLS, so both serve through one code path.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use pigeon_shared::x509;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::metrics::Metrics;

pub mod config;

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// A certificate that expires within this long is warned about at every load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// Checked `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
    /// PEM: the CA(s) whose client certificates identify gateways.
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a client certificate (only with `client_ca`).
    pub client_auth_required: bool,
    pub reload_check: Duration,
    pub handshake_timeout: Duration,
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key} ({path}): {problem}")]
    File {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("tls.cert and tls.key do not belong together: {0}")]
    Mismatch(String),
}

fn file_error(key: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        key,
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// A client certificate that the client CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's common name: the gateway id it claims.
    pub common_name: Option<String>,
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Only over TLS with `client_ca`, when the client presented a certificate.
    pub client: Option<Arc<ClientCert>>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, PlainListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Size, modification time and inode of each file, to notice a change cheaply (a
/// certbot renewal replaces the symlinks' targets; `metadata` follows them).
type Stamp = Vec<Option<(u64, Option<SystemTime>, u64)>>;

fn stamp(s: &TlsSettings) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok(), m.ino()))
        })
        .collect()
}

/// What one load of the files gave.
struct Loaded {
    config: Arc<ServerConfig>,
    summary: x509::CertSummary,
}

/// Builds the server configuration from the files.
fn load(s: &TlsSettings) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("cert", &s.cert)?;
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| {
        file_error(
            "key",
            &s.key,
            format!("cannot read a PEM private key (PKCS#8, RSA or EC): {e}"),
        )
    })?;
    let summary = x509::summarize(&chain[0])
        .map_err(|e| file_error("cert", &s.cert, format!("the first certificate is {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("client_ca", path)? {
                roots.add(c).map_err(|e| {
                    file_error("client_ca", path, format!("is not a usable CA: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if s.client_auth_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| file_error("client_ca", path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch(format!(
            "the key in {} is not the one of the certificate in {}",
            s.key.display(),
            s.cert.display()
        )),
        e => file_error("key", &s.key, format!("cannot be used: {e}")),
    })?;
    // The relay speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        summary,
    })
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path, format!("cannot be read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            path,
            "holds no certificate (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The TLS configuration in use, and what is needed to reload it.
pub struct Tls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    stamp: Mutex<Stamp>,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn open(settings: TlsSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let before = stamp(&settings);
        let loaded = load(&settings)?;
        report(&settings, &loaded.summary, &metrics, "Serving HTTPS");
        Ok(Arc::new(Self {
            current: RwLock::new(loaded.config),
            stamp: Mutex::new(before),
            settings,
            metrics,
        }))
    }

    /// Only checks that the files load (for `check-config`).
    pub fn check(settings: &TlsSettings) -> Result<x509::CertSummary, TlsError> {
        load(settings).map(|l| l.summary)
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        TlsAcceptor::from(config)
    }

    /// Loads the files again if they changed since the last attempt. True if the
    /// configuration in use was replaced.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.settings);
        {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return false;
            }
            *last = now;
        }
        match load(&self.settings) {
            Ok(loaded) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.config;
                self.metrics.tls_reloads.fetch_add(1, Relaxed);
                report(
                    &self.settings,
                    &loaded.summary,
                    &self.metrics,
                    "Reloaded the TLS certificate; new connections use it",
                );
                true
            }
            Err(e) => {
                self.metrics.tls_reload_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "The TLS files changed but cannot be loaded; still serving the previous certificate. Fix them (the next change is tried again), or restart to see the error at start.");
                false
            }
        }
    }

    /// Checks the files every `reload_check`, and at once on SIGHUP (`systemctl reload`).
    pub fn spawn_reloader(self: Arc<Self>) -> JoinHandle<()> {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(self.settings.reload_check);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => true,
                };
                if forced {
                    tracing::info!("SIGHUP: checking the TLS files.");
                    // A reload by signal loads again even if the files look the same.
                    self.stamp.lock().unwrap_or_else(|e| e.into_inner()).clear();
                }
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            }
        })
    }
}

/// Logs the certificate now served and sets the expiry gauge.
fn report(s: &TlsSettings, c: &x509::CertSummary, metrics: &Metrics, what: &str) {
    metrics
        .tls_cert_not_after
        .store(u64::try_from(c.not_after).unwrap_or(0), Relaxed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = c.not_after - now;
    let until = chrono::DateTime::from_timestamp(c.not_after, 0)
        .map_or_else(|| c.not_after.to_string(), |t| t.to_rfc3339());
    let subject = c.common_name.as_deref().unwrap_or("(no common name)");
    if left <= 0 {
        tracing::error!(cert = %s.cert.display(), subject, not_after = %until, "{what}: the certificate HAS EXPIRED; clients will refuse it. Renew it (the relay picks up the new files without a restart).");
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(cert = %s.cert.display(), subject, not_after = %until, days_left = left / 86_400, "{what}: the certificate expires soon; renew it (the relay picks up the new files without a restart).");
    } else {
        tracing::info!(cert = %s.cert.display(), subject, not_after = %until, client_certificates = s.client_ca.is_some(), "{what}.");
    }
}

/// Accepts connections and hands over those whose TLS handshake finished.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    accepting: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: Arc<Tls>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, tls, tx));
        Ok(Self {
            local,
            ready,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<Tls>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, Peer)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let timeout = tls.settings.handshake_timeout;
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.acceptor();
        let (ready, metrics) = (ready.clone(), tls.metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let client = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|der| {
                            Arc::new(ClientCert {
                                common_name: x509::summarize(der).ok().and_then(|s| s.common_name),
                            })
                        });
                    let _ = ready.send((stream, Peer { addr, client })).await;
                }
                Ok(Err(e)) => {
                    metrics.tls_handshake_errors.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %addr, error = %e, "A TLS handshake failed.");
                }
                Err(_) => {
                    metrics.tls_handshake_errors.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %addr, "A TLS handshake timed out.");
                }
            }
        });
    }
}

/// As axum does for its own listener: errors such as EMFILE are logged and retried
/// after a pause, so the relay does not spin.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "Cannot accept a connection; trying again in 1 s.");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            client: None,
        })
    }
}

/// Plain HTTP connections, with TCP_NODELAY (small exchanges on kept-alive connections).
pub struct PlainListener(pub TcpListener);

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    return (tcp, Peer { addr, client: None });
                }
                Err(e) => accept_error(e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            client: None,
        })
    }
}
