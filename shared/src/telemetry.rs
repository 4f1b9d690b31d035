//! Logs through `tracing`: readable on a terminal, JSON lines with `SLUICE_LOG_FORMAT=json`,
//! level from `RUST_LOG` (default `info`).
//!
//! Dependencies that log protocol traffic (lettre's SMTP transcript carries `AUTH` lines)
//! are capped at `info` whatever `RUST_LOG` says, so secrets never reach the output.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Targets whose debug output may carry credentials or message content.
const QUIET_TARGETS: &[&str] = &["lettre", "lapin", "amq_protocol"];

/// Install the global subscriber. Logs go to stderr, so stdout stays for results.
pub fn init(service: &str) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for target in QUIET_TARGETS {
        filter = filter.add_directive(format!("{target}=warn").parse().expect("directive"));
    }
    let json = std::env::var("SLUICE_LOG_FORMAT")
        .map(|v| v.eq_ignore_ascii_case("json"))
        .unwrap_or(false);
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "logging initialised");
    }
}
