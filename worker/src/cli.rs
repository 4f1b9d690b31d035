//! Command-line arguments of `sluice-worker`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Consume sluice jobs from RabbitMQ and hand them to SMTP relays, within each relay's
/// fleet-wide budget of connections and messages per second.
#[derive(Debug, Parser)]
#[command(name = "sluice-worker", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// TOML config file (default: $SLUICE_CONFIG; else built-in defaults + SLUICE__... variables).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Only consume this relay's queue (repeatable; default: every configured relay).
    #[arg(long = "relay", value_name = "NAME")]
    pub relays: Vec<String>,

    /// Serve /healthz, /readyz and /metrics on this address, e.g. 0.0.0.0:9090
    /// (overrides worker.listen; default: off).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Extra commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when a running worker's health endpoint answers (for container HEALTHCHECKs).
    Healthcheck {
        /// The URL to check.
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Print the effective configuration (file + environment + defaults) as JSON, with
    /// secrets masked, and exit; a bad key or value fails as it would at start.
    PrintConfig,
    /// Try the configuration against the real broker and relays, one line per check:
    /// every broker URL, every queue the worker would declare (absent is fine, another
    /// type or other arguments is not), and one SMTP session per relay within its budget
    /// (greeting, EHLO, STARTTLS and certificate, AUTH). Declares nothing, sends nothing.
    /// Exit 0 when every check passed, 1 otherwise.
    Check {
        /// Only check this relay (repeatable; default: every configured relay).
        #[arg(long = "relay", value_name = "NAME")]
        relays: Vec<String>,
    },
}

const AFTER_HELP: &str = "\
Configuration keys can all be set by environment variables, SLUICE__SECTION__KEY:
  SLUICE__AMQP__URL, SLUICE__AMQP__NAMESPACE, SLUICE__RELAYS__PRIMARY__HOST, ...
Logs go to stderr; SLUICE_LOG_FORMAT=json for JSON lines, RUST_LOG for the level.
SIGTERM or SIGINT: stop taking jobs, finish those in flight (worker.shutdown_grace), exit 0.
Exit codes (the same kinds as sluice-producer):
  0   stopped on request; check: every check passed
  1   runtime error (the message says what failed); check: a check failed
  2   usage error or a bad configuration";
