//! `sluice-worker`: thin wiring; everything else lives in the library part of the crate.

use std::process::ExitCode;

use clap::Parser;
use sluice_worker::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
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
