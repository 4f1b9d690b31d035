//! The sluice producer: turns a campaign into jobs on RabbitMQ, follows it, and tends the
//! dead-letter queues.
//!
//! # Layout
//! - [`cli`]: the command line (clap), the contract with users and scripts.
//! - [`rows`]: the recipients CSV, record by record, in bounded memory.
//! - [`campaign`]: CSV rows + templates → validated jobs.
//! - [`send`]: `send`: validate every row, then publish.
//! - [`validate`]: the first pass of `send`, on every core.
//! - [`duplicates`]: recipients listed twice in one file (`send --dedupe`).
//! - [`summaries`]: campaign summaries in the event log: written by `send`, and a campaign
//!   sent before refused unless `--force` or `--start-line`.
//! - [`checkpoint`]: how far an interrupted `send` got (`confirmed through line N`), and
//!   the stop signals it heeds.
//! - [`publish`]: confirmed, pipelined publishing that survives a lost connection.
//! - [`log`]: reading one campaign's entries in the event log (a stream).
//! - [`tally`]: a campaign's counts from those entries.
//! - [`watch`]: `watch` (and `send --wait`): follow a campaign until every job has ended.
//! - [`status`]: `status`: a campaign's counts, rate and time left, at once.
//! - [`queues`]: `queues`: the jobs waiting in each class queue of each relay.
//! - [`dead`]: `dead list | replay | purge`.
//! - [`migrate`]: `migrate-queues`: recreate the queues an older sluice declared differently.
//! - [`transfer`]: moving messages between queues, each copy confirmed before its original
//!   is removed.
//! - [`relays`]: which relay a command acts on.
//! - [`prompt`]: asking before destroying.
//! - [`progress`]: a progress bar on a terminal, plain lines otherwise.
//! - [`exit`]: outcomes and errors → exit codes.

pub mod campaign;
pub mod checkpoint;
pub mod cli;
pub mod dead;
pub mod duplicates;
pub mod exit;
pub mod log;
pub mod migrate;
pub mod progress;
pub mod prompt;
pub mod publish;
pub mod queues;
pub mod relays;
pub mod rows;
pub mod send;
pub mod status;
pub mod summaries;
pub mod tally;
pub mod transfer;
pub mod validate;
pub mod watch;

use sluice_shared::Settings;

use crate::cli::{Command, DeadCommand};
use crate::exit::Status;

/// Run one command with loaded settings.
pub async fn run(command: Command, settings: Settings) -> anyhow::Result<Status> {
    match command {
        Command::Send(args) => send::run(&settings, args).await,
        Command::Watch(args) => watch::run(&settings, args).await,
        Command::Status(args) => status::run(&settings, args).await,
        Command::Queues(args) => queues::run(&settings, args).await,
        Command::Dead(DeadCommand::List(args)) => dead::list(&settings, args).await,
        Command::Dead(DeadCommand::Replay(args)) => dead::replay(&settings, args).await,
        Command::Dead(DeadCommand::Purge(args)) => dead::purge(&settings, args).await,
        Command::MigrateQueues(args) => migrate::run(&settings, args).await,
    }
}
