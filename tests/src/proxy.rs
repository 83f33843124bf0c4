//! A fault-injecting TCP proxy in front of a real server.
//!
//! It forwards both ways, and on request *holds* what the client sends (buffers it
//! instead of forwarding) or cuts every connection, discarding what it held. In front of
//! mosquitto this makes a gateway's PUBACKs disappear after the gateway committed the
//! messages — the window a crash must not turn into duplicates.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy from a free loopback port to 127.0.0.1:`target`; stops when dropped.
pub struct Proxy {
    port: u16,
    hold: watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (hold, hold_rx) = watch::channel(false);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    let task = tokio::spawn(pipe(client, server, hold_rx.clone()));
                    conns.lock().expect("proxy lock").push(task);
                }
            })
        };
        Proxy {
            port,
            hold,
            conns,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// While `on`, bytes from clients are kept in the proxy instead of reaching the server.
    /// Turning it off forwards what was kept.
    pub fn hold_client_bytes(&self, on: bool) {
        self.hold.send_replace(on);
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

async fn pipe(client: TcpStream, server: TcpStream, mut hold: watch::Receiver<bool>) {
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
                    let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
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
