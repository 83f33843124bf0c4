//! The command line: `pigeon-gateway [--config PATH] [run|check-config|print-default-config]`.
//!
//! Exit codes: 0 success, 64 bad configuration (the message names the key), 1 failure
//! while starting or running.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG};

/// Exit code for a configuration that cannot be used (EX_CONFIG would be 78; 64 is
/// EX_USAGE, which is what systemd units and scripts here check for).
pub const EXIT_BAD_CONFIG: u8 = 64;

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
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match load(&cli.config) {
            Ok(_) => {
                println!("{}: OK", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(msg) => {
                eprintln!("pigeon-gateway: {msg}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run => {
            limit_malloc_arenas();
            init_tracing();
            let (config, token) = match load(&cli.config) {
                Ok(c) => c,
                Err(msg) => {
                    tracing::error!("{msg}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
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
            match rt.block_on(crate::run(config, token, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("pigeon-gateway failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Loads and validates the configuration and reads the relay token.
fn load(path: &std::path::Path) -> Result<(Config, Option<String>), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let token = config
        .relay_token()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, token))
}

/// glibc gives every thread that allocates its own malloc arena, and freed memory in
/// them is rarely returned; on a 1 GB Pi two arenas are plenty for a handful of threads
/// and keep the resident size flat.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called before other threads exist.
    // A fixed mmap threshold: buffers of 64 KiB and more (upload batches, read chunks)
    // go straight back to the kernel when freed, instead of glibc raising the threshold
    // after the first one and keeping their pages in the heap for good.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIGEON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
