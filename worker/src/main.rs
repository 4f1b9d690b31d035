//! `sluice-worker`: thin wiring; everything else lives in the library part of the crate.

use std::process::ExitCode;

use clap::Parser;
use sluice_worker::cli::{Cli, Command};

/// Lanes spend their time waiting on sockets: one runtime thread drives all of them (beside
/// lapin's own I/O thread), and a fleet grows by running more workers, not more threads.
/// On the benchmark's 2-core machine a second runtime thread cost about 15% more CPU per job
/// (wake-ups handed between threads) and no throughput. `TOKIO_WORKER_THREADS` overrides it.
const DEFAULT_RUNTIME_THREADS: usize = 1;

fn main() -> ExitCode {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(DEFAULT_RUNTIME_THREADS);
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("sluice-worker: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    // Kept until `main` returns: dropping it flushes the spans not yet exported.
    let _telemetry = sluice_shared::telemetry::init("sluice-worker");
    if let Some(Command::Healthcheck { url }) = &cli.command {
        return match sluice_worker::health::check(url).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match sluice_shared::Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("sluice-worker: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::PrintConfig) = &cli.command {
        // Secrets print as "***" and URL passwords are masked (see shared::config).
        let json = serde_json::to_string_pretty(&settings).expect("settings serialize");
        println!("{json}");
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Check { relays }) = &cli.command {
        return match sluice_worker::check::run(&settings, relays).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("sluice-worker: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let shutdown = sluice_shared::shutdown::Shutdown::on_signals();
    match sluice_worker::run(settings, cli.relays, cli.listen, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
