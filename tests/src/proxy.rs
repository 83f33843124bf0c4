//! A fault-injecting TCP proxy in front of a real server.
//!
//! It forwards both ways, and on request *holds* what the client sends (buffers it
//! instead of forwarding) or cuts every connection, discarding what it held. In front of
//! mosquitto this makes a gateway's PUBACKs disappear after the gateway committed the
//! messages — the window a crash must not turn into duplicates.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy from a free loopback port to 127.0.0.1:`target`; stops when dropped.
pub struct Proxy {
    port: u16,
    hold: watch::Sender<bool>,
    refuse: Arc<std::sync::atomic::AtomicBool>,
    counters: Arc<Counters>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

/// Bytes forwarded from clients to the server, and a one-shot cut.
#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    /// When `up` reaches this, the connection that reached it is cut (once); 0: never.
    cut_at: AtomicU64,
    cuts: AtomicU64,
    /// When `up` passes this, the byte at this position is flipped (once); 0: never.
    flip_at: AtomicU64,
    flips: AtomicU64,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (hold, hold_rx) = watch::channel(false);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let counters: Arc<Counters> = Arc::default();
        let refuse: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let accept = {
            let conns = conns.clone();
            let counters = counters.clone();
            let refuse = refuse.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if refuse.load(Relaxed) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    let task =
                        tokio::spawn(pipe(client, server, hold_rx.clone(), counters.clone()));
                    conns.lock().expect("proxy lock").push(task);
                }
            })
        };
        Proxy {
            port,
            hold,
            refuse,
            counters,
            conns,
            accept,
        }
    }

    /// Bytes forwarded from clients to the server so far.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Relaxed)
    }

    /// Cuts the connection that carries client bytes past `total` forwarded in all (as
    /// counted by [`Proxy::bytes_up`]), once: the bytes up to the cut reach the server,
    /// the rest of that connection's are lost. Connections made later are not affected.
    pub fn cut_once_at(&self, total: u64) {
        self.counters.cut_at.store(total.max(1), Relaxed);
    }

    /// Flips the bits of the client byte at position `total` of everything forwarded (as
    /// counted by [`Proxy::bytes_up`]), once: damage on the way that TCP's checksum
    /// missed, or a bad NIC.
    pub fn corrupt_once_at(&self, total: u64) {
        self.counters.flip_at.store(total.max(1), Relaxed);
    }

    /// How many bytes [`Proxy::corrupt_once_at`] flipped.
    pub fn flips(&self) -> u64 {
        self.counters.flips.load(Relaxed)
    }

    /// How many connections were cut by [`Proxy::cut_once_at`].
    pub fn cuts(&self) -> u64 {
        self.counters.cuts.load(Relaxed)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// While `on`, bytes from clients are kept in the proxy instead of reaching the server.
    /// Turning it off forwards what was kept.
    pub fn hold_client_bytes(&self, on: bool) {
        self.hold.send_replace(on);
    }

    /// While `on`, the server is unreachable: open connections are cut and new ones closed
    /// at once (as a server that is down, or a network partition).
    pub fn set_down(&self, on: bool) {
        self.refuse.store(on, Relaxed);
        if on {
            self.cut_all();
        }
    }

    /// Drops every open connection, and with it whatever was held.
    pub fn cut_all(&self) {
        for task in self.conns.lock().expect("proxy lock").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    mut hold: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    };
    let up = async move {
        let mut held = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                r = cr.read(&mut buf) => {
                    let mut n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                    let before = counters.up.fetch_add(n as u64, Relaxed);
                    let cut_at = counters.cut_at.load(Relaxed);
                    let cut = cut_at > 0 && before + n as u64 >= cut_at
                        && counters.cut_at.compare_exchange(cut_at, 0, Relaxed, Relaxed).is_ok();
                    if cut {
                        // Forward up to the mark, then drop both sides.
                        let whole = n;
                        n = (cut_at.saturating_sub(before)) as usize;
                        counters.up.fetch_sub((whole - n) as u64, Relaxed);
                        let _ = sw.write_all(&buf[..n]).await;
                        counters.cuts.fetch_add(1, Relaxed);
                        return;
                    }
                    let flip_at = counters.flip_at.load(Relaxed);
                    if flip_at > 0 && before < flip_at && before + n as u64 >= flip_at
                        && counters.flip_at.compare_exchange(flip_at, 0, Relaxed, Relaxed).is_ok()
                    {
                        buf[(flip_at - 1 - before) as usize] ^= 0xFF;
                        counters.flips.fetch_add(1, Relaxed);
                    }
                    if *hold.borrow() {
                        held.extend_from_slice(&buf[..n]);
                    } else if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                changed = hold.changed() => {
                    if changed.is_err() { return; }
                    if !*hold.borrow() && !held.is_empty() {
                        if sw.write_all(&held).await.is_err() { return; }
                        held.clear();
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
