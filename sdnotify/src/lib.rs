//! pigeon-sdnotify: the service side of systemd's notification protocol
//! (`sd_notify(3)`), for both `pigeon-gateway` and `pigeon-relay`, in std only.
//!
//! Under a unit with `Type=notify`, systemd passes the path of a Unix datagram socket in
//! `NOTIFY_SOCKET` (a filesystem path, or `@name` for Linux's abstract namespace) and,
//! with `WatchdogSec=`, the watchdog period in `WATCHDOG_USEC` (and the process it is
//! meant for in `WATCHDOG_PID`). A service sends newline-separated `KEY=value`
//! assignments as one datagram each time:
//!
//! * `READY=1` once it is ready (systemd holds `systemctl start` and the units ordered
//!   after it until then);
//! * `WATCHDOG=1` more often than `WATCHDOG_USEC` while it is healthy (systemd kills and
//!   restarts it otherwise);
//! * `STATUS=…` a one-line summary that `systemctl status` shows;
//! * `STOPPING=1` when it begins to shut down.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or a unit that is not `Type=notify`)
//! [`Notifier`] does nothing. The binaries decide *when* to send; this crate only says it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// One assignment of a notification message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// `READY=1`: startup finished.
    Ready,
    /// `STOPPING=1`: shutdown began.
    Stopping,
    /// `WATCHDOG=1`: still healthy.
    Watchdog,
    /// `STATUS=…`: a one-line human summary (line breaks become spaces).
    Status(&'a str),
}

/// The datagram for `states`: one `KEY=value` line each, in order.
pub fn format(states: &[State<'_>]) -> String {
    let mut msg = String::new();
    for s in states {
        match s {
            State::Ready => msg.push_str("READY=1\n"),
            State::Stopping => msg.push_str("STOPPING=1\n"),
            State::Watchdog => msg.push_str("WATCHDOG=1\n"),
            State::Status(text) => {
                msg.push_str("STATUS=");
                // A line break would end the assignment and start a bogus one.
                msg.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
                msg.push('\n');
            }
        }
    }
    msg
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A socket file.
    Path(std::path::PathBuf),
    /// A name in Linux's abstract socket namespace (written `@name`).
    Abstract(Vec<u8>),
}

impl Target {
    /// Reads a `NOTIFY_SOCKET` value. `None` for anything else (empty, relative, or a
    /// `vsock:` address, which Pigeon does not need), like `sd_notify` ignores it.
    pub fn parse(value: &OsStr) -> Option<Target> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = value.as_bytes();
        match bytes.first()? {
            b'@' if bytes.len() > 1 => Some(Target::Abstract(bytes[1..].to_vec())),
            b'/' => Some(Target::Path(value.into())),
            _ => None,
        }
    }

    fn address(&self) -> io::Result<SocketAddr> {
        match self {
            Target::Path(p) => SocketAddr::from_pathname(p),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Target::Abstract(name) => {
                #[cfg(target_os = "android")]
                use std::os::android::net::SocketAddrExt;
                #[cfg(target_os = "linux")]
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            Target::Abstract(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract sockets exist only on Linux",
            )),
        }
    }
}

/// Sends notifications to the service manager, or nothing when there is none.
///
/// Cheap to share (`&self` everywhere); each message is one `sendto` on an unbound
/// datagram socket opened once.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`; a disabled one if it is unset or unusable.
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET")
            .as_deref()
            .and_then(Target::parse)
        {
            Some(t) => Notifier::to(&t).unwrap_or(Notifier::disabled()),
            None => Notifier::disabled(),
        }
    }

    /// A notifier that sends to `target`.
    pub fn to(target: &Target) -> io::Result<Notifier> {
        let addr = target.address()?;
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier {
            socket: Some((socket, addr)),
        })
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { socket: None }
    }

    /// Whether there is a service manager to tell.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `states` as one message. Does nothing (successfully) when disabled.
    pub fn notify(&self, states: &[State<'_>]) -> io::Result<()> {
        if self.socket.is_none() {
            return Ok(());
        }
        self.send(&format(states))
    }
}

/// What a periodic health check sends: `WATCHDOG=1` (when the watchdog is on) and the
/// status line while healthy; only `STATUS=UNHEALTHY: <why>` when not, so the watchdog
/// fires and `systemctl status` says why.
pub fn health_report(health: &Result<(), String>, watchdog: bool, status: &str) -> String {
    match (health, watchdog) {
        (Ok(()), true) => format(&[State::Watchdog, State::Status(status)]),
        (Ok(()), false) => format(&[State::Status(status)]),
        (Err(why), _) => format(&[State::Status(&std::format!("UNHEALTHY: {why}"))]),
    }
}

impl Notifier {
    /// Sends an already formatted message (see [`health_report`]).
    pub fn send(&self, msg: &str) -> io::Result<()> {
        let Some((socket, addr)) = &self.socket else {
            return Ok(());
        };
        let sent = socket.send_to_addr(msg.as_bytes(), addr)?;
        if sent == msg.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the notification was cut short",
            ))
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// advises. `None` when there is no watchdog, or it is meant for another process
/// (`$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_newline_separated_assignments() {
        assert_eq!(format(&[State::Ready]), "READY=1\n");
        assert_eq!(
            format(&[
                State::Watchdog,
                State::Status("12 waiting, relay reachable")
            ]),
            "WATCHDOG=1\nSTATUS=12 waiting, relay reachable\n"
        );
        assert_eq!(
            format(&[State::Stopping, State::Status("a\nREADY=1\r\tb")]),
            "STOPPING=1\nSTATUS=a READY=1  b\n",
            "a status cannot smuggle in another assignment"
        );
        assert_eq!(format(&[]), "");
    }

    #[test]
    fn health_reports() {
        let ok = Ok(());
        assert_eq!(
            health_report(&ok, true, "fine"),
            "WATCHDOG=1\nSTATUS=fine\n"
        );
        assert_eq!(health_report(&ok, false, "fine"), "STATUS=fine\n");
        let bad = Err("the writer is stuck".to_owned());
        assert_eq!(
            health_report(&bad, true, "fine"),
            "STATUS=UNHEALTHY: the writer is stuck\n",
            "no watchdog ping while unhealthy"
        );
    }

    #[test]
    fn notify_socket_values() {
        assert_eq!(
            Target::parse(OsStr::new("/run/systemd/notify")),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            Target::parse(OsStr::new("@pigeon/notify")),
            Some(Target::Abstract(b"pigeon/notify".to_vec()))
        );
        for ignored in ["", "@", "relative/path", "vsock:2:1234"] {
            assert_eq!(Target::parse(OsStr::new(ignored)), None, "{ignored:?}");
        }
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_process() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(interval_from(Some("30000000"), None, 7), half);
        assert_eq!(interval_from(Some("30000000"), Some("7"), 7), half);
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
        assert_eq!(interval_from(None, None, 7), None);
    }

    #[test]
    fn sends_to_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(&Target::Path(path)).unwrap();
        assert!(n.is_enabled());
        n.notify(&[State::Ready, State::Status("up")]).unwrap();
        let mut buf = [0u8; 128];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("pigeon-sdnotify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let target = Target::parse(OsStr::new(&format!("@{name}"))).unwrap();
        Notifier::to(&target)
            .unwrap()
            .notify(&[State::Watchdog])
            .unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn disabled_sends_nothing_and_succeeds() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.notify(&[State::Ready]).unwrap();
    }
}
