//! The `pigeon-gateway` binary; everything lives in the library (see `cli`).

fn main() -> std::process::ExitCode {
    pigeon_gateway::cli::main()
}
