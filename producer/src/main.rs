//! `sluice-producer`: parse the command line, load the settings, run one command, exit with
//! a code scripts can rely on (see `--help`).

use std::process::ExitCode;

use clap::Parser as _;
use sluice_producer::cli::Cli;
use sluice_producer::exit;
use sluice_shared::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            // A bad configuration is a usage error, as in sluice-worker.
            eprintln!("error: {error}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let mut telemetry = sluice_shared::telemetry::init("sluice-producer");
    let code = exit::report(sluice_producer::run(cli.command, settings).await);
    // Flush the spans not yet exported before the process exits.
    telemetry.shutdown();
    code
}
