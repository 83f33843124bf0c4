//! The `pigeon-relay` binary: parse the command line, set up logging, load and check the
//! configuration, and call [`pigeon_relay::run`] until SIGTERM or SIGINT.
//!
//! Exit codes: 0 after a clean shutdown, 64 for a bad command line or configuration,
//! 1 when the relay cannot start (port in use, data dir unwritable) or fails.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pigeon_relay::config::{DEFAULT_CONFIG, RelayConfig};
use tracing_subscriber::field::MakeExt;

/// sysexits.h EX_USAGE: the command line or the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "pigeon-relay",
    version,
    about = "Receives CloudEvents from pigeon gateways and stores them durably, exactly once."
)]
struct Cli {
    /// Configuration file (TOML). Without it the relay runs on the built-in defaults.
    #[arg(long, short, value_name = "PATH", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the default).
    Run,
    /// Load and validate the configuration, then exit.
    CheckConfig,
    /// Print the default configuration, with comments.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::PrintDefaultConfig = command {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    init_tracing();

    let raw = match &cli.config {
        Some(path) => match RelayConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pigeon-relay: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => {
            tracing::warn!("No --config given; running on the built-in defaults.");
            RelayConfig::default()
        }
    };
    let config = match raw.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeon-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // A data dir the service cannot use is a configuration problem: exit 64, so that
    // systemd does not restart a relay that cannot work until someone fixes it.
    if let Err(e) = pigeon_shared::dirs::check_writable_dir("data_dir", &config.data_dir) {
        eprintln!("pigeon-relay: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }

    match command {
        Command::CheckConfig => {
            let https = match &config.tls {
                None => String::new(),
                Some(t) => match pigeon_relay::tls::Tls::check(t) {
                    Ok(c) => format!(
                        ", HTTPS with {} (CN {}, valid until {}){}",
                        t.cert.display(),
                        c.common_name.as_deref().unwrap_or("none"),
                        chrono::DateTime::from_timestamp(c.not_after, 0)
                            .map_or_else(|| c.not_after.to_string(), |d| d.to_rfc3339()),
                        if t.client_ca.is_some() {
                            ", client certificates"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => {
                        eprintln!("pigeon-relay: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
            };
            println!(
                "The configuration is valid: listen {}, data_dir {}, {} gateway(s){https}.",
                config.listen,
                config.data_dir.display(),
                config.gateways.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run | Command::PrintDefaultConfig => run(config),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIGEON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .fmt_fields(tracing_subscriber::fmt::format::debug_fn(log_field).delimited(" "))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// One field of a log line, with control characters escaped: a header value, an event's
/// id or an S3 key, or an error message holding one, stays on its line, even where it is
/// logged with `%` (issue 24).
fn log_field(
    w: &mut tracing_subscriber::fmt::format::Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    pigeon_shared::escape::log_field(w, field.name(), value)
}

fn run(config: pigeon_relay::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pigeon-relay: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %config.listen, error = %e, "Cannot listen on the configured address.");
                eprintln!("pigeon-relay: cannot listen on {}: {e}", config.listen);
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        match pigeon_relay::run(config, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            // Unreadable or mismatched certificate files: the operator's to fix, so
            // systemd does not restart (RestartPreventExitStatus=64).
            Err(e @ pigeon_relay::RelayError::Tls(_)) => {
                tracing::error!(error = %e, "The relay cannot start.");
                eprintln!("pigeon-relay: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                tracing::error!(error = %e, "The relay failed.");
                eprintln!("pigeon-relay: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM; only SIGINT will stop the relay.");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => tracing::info!("Received SIGTERM."),
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => tracing::info!("Received SIGINT."),
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for SIGINT; stopping.");
            }
        },
    }
}
