//! The command line:
//! `pigeon-gateway [--config PATH] [run|check-config|print-default-config|status [--json]|
//! dead-letter list|retry|purge|rules test [--input FILE]]`.
//!
//! Exit codes: 0 success, 64 bad configuration (the message names the key) or arguments
//! (for `rules test`, also a bad input line), 1 failure while starting or running.
//! `status`: 0 running, 3 not running, 4 unknown.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, DEFAULT_CONFIG};
use crate::dead_letter_cli::DeadLetterCommand;
use crate::exit;
use crate::report::{RunState, StatusReport};
use crate::rules_cli::RulesCommand;
use crate::stats::{LastErrorLayer, LastErrorSlot};

#[derive(Debug, Parser)]
#[command(
    name = "pigeon-gateway",
    version,
    about = "Edge gateway: MQTT readings and camera files into a durable outbox, uploaded to pigeon-relay."
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "/etc/pigeon/gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration file and exit: 0 if it is usable, 64 if not.
    CheckConfig,
    /// Print a commented default configuration.
    PrintDefaultConfig,
    /// Say what the gateway is doing: running or not, connected, how much is waiting and
    /// since when, the last upload, counts per subscription, dead letters, disk space, the
    /// last error. Asks the running gateway's HTTP endpoint; when nothing answers, reads
    /// the outbox. Exit code 0: running, 3: not running, 4: unknown.
    Status {
        /// Print the report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The events the relay rejected for good: list them, send them again once the cause
    /// is fixed, or delete them. Works while the gateway runs.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// The edge rules: `rules test` runs the config's [[rules]] over sample readings and
    /// prints the events they derive, before the rules are deployed.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad arguments are EX_USAGE like a bad config.
            return if e.use_stderr() {
                ExitCode::from(exit::BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match load(&cli.config) {
            Ok((config, _)) => {
                println!("{}: OK", cli.config.display());
                report_reachability(&config);
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("pigeon-gateway: {msg}");
                ExitCode::from(exit::BAD_CONFIG)
            }
        },
        Command::Status { json } => status(&cli.config, json),
        Command::DeadLetter { command } => crate::dead_letter_cli::run(&cli.config, command),
        Command::Rules { command } => crate::rules_cli::run(&cli.config, command),
        Command::Run => {
            limit_malloc_arenas();
            let last_error = Arc::new(LastErrorSlot::default());
            init_tracing(last_error.clone());
            let (config, token) = match load(&cli.config) {
                Ok(c) => c,
                Err(msg) => {
                    tracing::error!("{msg}");
                    return ExitCode::from(exit::BAD_CONFIG);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot start the async runtime.");
                    return ExitCode::FAILURE;
                }
            };
            let code = match rt.block_on(crate::run(config, token, last_error, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("pigeon-gateway failed: {e:#}");
                    ExitCode::FAILURE
                }
            };
            // A blocking call stuck in the disk must not hold the exit.
            rt.shutdown_timeout(Duration::from_secs(1));
            code
        }
    }
}

/// Loads and validates the configuration and reads the relay token.
fn load(path: &std::path::Path) -> Result<(Config, Option<String>), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let token = config
        .relay_token()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // A directory the service cannot use is exit 64 (bad config), not 1: systemd then
    // does not restart a gateway that cannot work until someone fixes it.
    pigeon_shared::dirs::check_writable_dir("gateway.data_dir", &config.gateway.data_dir)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(files) = &config.files {
        check_files(files, &config).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Unreadable or mismatched certificate files, likewise.
    crate::uplink::tls::client_config(&config.relay)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, token))
}

/// The directories `[files]` names must be usable before the gateway starts: a typo in a
/// watched path is exit 64 naming it, not a gateway that silently watches nothing.
fn check_files(files: &crate::sources::files::FilesConfig, config: &Config) -> Result<(), String> {
    pigeon_shared::dirs::check_writable_dir("files.spool_dir", &config.spool_dir())?;
    for w in &files.watch {
        match std::fs::metadata(&w.path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "files.watch.path: {} (watch {:?}) is not a directory",
                    w.path.display(),
                    w.name
                ));
            }
            Err(e) => {
                return Err(format!(
                    "files.watch.path: {} (watch {:?}): {e}",
                    w.path.display(),
                    w.name
                ));
            }
        }
        // The gateway must be able to look into it; moving a file out needs write access
        // to the directory the file is in, which is told per file at pickup.
        if let Err(e) = std::fs::read_dir(&w.path) {
            return Err(format!(
                "files.watch.path: {} (watch {:?}) cannot be read: {e}",
                w.path.display(),
                w.name
            ));
        }
        if let Some(to) = &w.move_to {
            pigeon_shared::dirs::check_writable_dir("files.watch.move_to", to)
                .map_err(|e| format!("{e} (watch {:?})", w.name))?;
        }
    }
    Ok(())
}

/// For `check-config`: whether the relay and the MQTT broker answer right now. Not an
/// error either way — the gateway buffers until the relay is back — but the person
/// setting it up wants to know before starting it.
fn report_reachability(config: &Config) {
    let mut targets = Vec::new();
    match reqwest::Url::parse(&config.relay.url) {
        Ok(u) => {
            if let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) {
                targets.push(("relay", config.relay.url.clone(), host.to_owned(), port));
            }
        }
        Err(_) => return,
    }
    if let Some(m) = &config.mqtt {
        let addr = format!("{}:{}", m.host, m.port);
        targets.push(("MQTT broker", addr, m.host.clone(), m.port));
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    for (what, shown, host, port) in targets {
        let probe = async {
            tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
        };
        match rt.block_on(probe) {
            Ok(Ok(_)) => println!("{what} {shown}: reachable"),
            Ok(Err(e)) => println!(
                "warning: {what} {shown}: not reachable now ({e}); the gateway keeps retrying once started"
            ),
            Err(_) => println!(
                "warning: {what} {shown}: no answer within 3 s; the gateway keeps retrying once started"
            ),
        }
    }
}

/// glibc gives every thread that allocates its own malloc arena, and freed memory in
/// them is rarely returned; on a 1 GB Pi two arenas are plenty for a handful of threads
/// and keep the resident size flat.
fn limit_malloc_arenas() {
    // A fixed mmap threshold: buffers of 64 KiB and more (upload batches, read chunks)
    // go straight back to the kernel when freed, instead of glibc raising the threshold
    // after the first one and keeping their pages in the heap for good.
    pigeon_shared::sys::tune_malloc(2, 64 * 1024, 256 * 1024);
}

fn init_tracing(last_error: Arc<LastErrorSlot>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIGEON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .fmt_fields(tracing_subscriber::fmt::format::debug_fn(log_field).delimited(" "))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(LastErrorLayer::new(last_error))
        .init();
}

/// One field of a log line, with control characters escaped: a camera's file name or an
/// error message holding one stays on its line, even where it is logged with `%`
/// (issue 24).
fn log_field(
    w: &mut tracing_subscriber::fmt::format::Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    pigeon_shared::escape::log_field(w, field.name(), value)
}

/// `pigeon-gateway status [--json]`.
fn status(path: &std::path::Path, json: bool) -> ExitCode {
    // Only the configuration: the token file may be unreadable to whoever asks.
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeon-gateway: {e}");
            return ExitCode::from(exit::BAD_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pigeon-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(ask(&config));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("pigeon-gateway: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", crate::report::render_text(&report));
    }
    match report.state {
        RunState::Running => ExitCode::SUCCESS,
        RunState::Stopped => ExitCode::from(exit::NOT_RUNNING),
        RunState::Unknown => ExitCode::from(exit::STATE_UNKNOWN),
    }
}

/// The running gateway's report from its HTTP endpoint, or one read from the outbox.
async fn ask(config: &Config) -> StatusReport {
    let offline = |state, detail: String| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || StatusReport::from_outbox(&config, state, detail))
                .await
                .unwrap_or_else(|e| panic!("reading the outbox panicked: {e}"))
        }
    };
    if !config.http.enabled {
        return offline(
            RunState::Unknown,
            "[http] is disabled, so the gateway cannot be asked; the numbers are read from the outbox".into(),
        )
        .await;
    }
    let mut addr = match config.http.listen_addr() {
        Ok(a) => a,
        Err(e) => return offline(RunState::Unknown, format!("http.listen: {e}")).await,
    };
    // A gateway listening on every address is asked on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/status");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => return offline(RunState::Unknown, format!("cannot ask {url}: {e}")).await,
    };
    let answer = match client.get(&url).send().await {
        Ok(resp) if resp.status().is_success() => resp.bytes().await,
        Ok(resp) => {
            let detail = format!("{url} answered HTTP {}", resp.status());
            return offline(RunState::Unknown, detail).await;
        }
        Err(e) if e.is_connect() => {
            return offline(RunState::Stopped, format!("nothing answers at {url}")).await;
        }
        Err(e) if e.is_timeout() => {
            let detail = format!("{url} did not answer within 3 s; the gateway may be hung");
            return offline(RunState::Unknown, detail).await;
        }
        Err(e) => return offline(RunState::Unknown, format!("cannot ask {url}: {e}")).await,
    };
    match answer.map(|b| serde_json::from_slice::<StatusReport>(&b)) {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            let detail = format!("{url} answered with something that is not a status: {e}");
            offline(RunState::Unknown, detail).await
        }
        Err(e) => offline(RunState::Unknown, format!("reading {url} failed: {e}")).await,
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
