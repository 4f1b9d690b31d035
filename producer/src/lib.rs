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
//! - [`control`]: the control stream: write an operator's command, read what it adds up to.
//! - [`steer`]: `pause`, `resume`, `cancel`, `relay suspend`, `relay resume`.
//! - [`campaigns`]: `campaigns`, and the one place a campaign's state is named.
//! - [`relay_status`]: `relay status`.
//! - [`dead`]: `dead list | replay | purge`.
//! - [`migrate`]: `migrate-queues`: recreate the queues an older sluice declared differently.
//! - [`transfer`]: moving messages between queues, each copy confirmed before its original
//!   is removed.
//! - [`relays`]: which relay a command acts on.
//! - [`prompt`]: asking before destroying.
//! - [`progress`]: a progress bar on a terminal, plain lines otherwise.
//! - [`exit`]: outcomes and errors → exit codes.

pub mod campaign;
pub mod campaigns;
pub mod checkpoint;
pub mod cli;
pub mod control;
pub mod dead;
pub mod duplicates;
pub mod exit;
pub mod log;
pub mod migrate;
pub mod progress;
pub mod prompt;
pub mod publish;
pub mod queues;
pub mod relay_status;
pub mod relays;
pub mod rows;
pub mod send;
pub mod status;
pub mod steer;
pub mod summaries;
pub mod tally;
pub mod transfer;
pub mod validate;
pub mod watch;

use sluice_shared::Settings;

use crate::cli::{Command, DeadCommand, RelayCommand};
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
        Command::Pause(args) => steer::pause(&settings, args).await,
        Command::Resume(args) => steer::resume(&settings, args).await,
        Command::Cancel(args) => steer::cancel(&settings, args).await,
        Command::Campaigns(args) => campaigns::run(&settings, args).await,
        Command::Relay(RelayCommand::Suspend(args)) => steer::suspend(&settings, args).await,
        Command::Relay(RelayCommand::Resume(args)) => steer::resume_relay(&settings, args).await,
        Command::Relay(RelayCommand::Status(args)) => relay_status::run(&settings, args).await,
        Command::MigrateQueues(args) => migrate::run(&settings, args).await,
    }
}
