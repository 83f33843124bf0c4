//! A stand-in for systemd's side of `sd_notify(3)`: a Unix datagram socket the test binds
//! and passes to a binary as `NOTIFY_SOCKET`, collecting what the binary says.

use std::time::Duration;

use tokio::net::UnixDatagram;

/// A bound notification socket and every message received on it so far.
pub struct NotifySocket {
    socket: UnixDatagram,
    env: String,
    messages: Vec<String>,
}

impl NotifySocket {
    /// A socket file at `path` (systemd's usual `/run/systemd/notify` kind).
    pub fn bind_path(path: &std::path::Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", path.display()));
        NotifySocket {
            socket,
            env: path.display().to_string(),
            messages: Vec::new(),
        }
    }

    /// A socket in Linux's abstract namespace, passed as `@name`.
    pub fn bind_abstract(name: &str) -> NotifySocket {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract socket address");
        let std_socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)
            .unwrap_or_else(|e| panic!("cannot bind @{name}: {e}"));
        std_socket.set_nonblocking(true).expect("set_nonblocking");
        NotifySocket {
            socket: UnixDatagram::from_std(std_socket).expect("tokio socket"),
            env: format!("@{name}"),
            messages: Vec::new(),
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn env_value(&self) -> &str {
        &self.env
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> &[String] {
        &self.messages
    }

    /// How many received messages contain the assignment `line` (e.g. `WATCHDOG=1`).
    pub fn count(&self, line: &str) -> usize {
        self.messages
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }

    /// Receives until `count(line) >= n`; panics after `timeout`, listing what came.
    pub async fn wait_for(&mut self, line: &str, n: usize, timeout: Duration) {
        let start = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        while self.count(line) < n {
            let left = timeout.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
                Ok(Ok(len)) => self
                    .messages
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned()),
                Ok(Err(e)) => panic!("receiving on the notify socket failed: {e}"),
                Err(_) => panic!(
                    "timed out after {:.1} s waiting for {n} × {line:?} on {}; received: {:#?}",
                    start.elapsed().as_secs_f64(),
                    self.env,
                    self.messages
                ),
            }
        }
    }
}
