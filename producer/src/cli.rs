//! The command line: names and meanings here are relied on by users and scripts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit codes, shown at the end of every `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0   success (send: the broker confirmed every job; watch: every job was delivered)
  1   runtime error (broker, file, or send of a --campaign the event log has a summary
      of without --force or --start-line); the message says what failed
  2   usage error (bad or missing arguments, or a bad configuration)
  3   the campaign finished, but some jobs bounced or are dead (watch, send --wait)
  4   watch --timeout passed before every job had a final outcome (the counts so far
      are printed)
  65  invalid input (rows, columns or templates); the problems are listed as
      'line N: ...' on stderr and nothing was published
  130 send stopped by SIGINT while publishing, 143 by SIGTERM: it stops reading, waits up
      to 30 s for the confirms of what it published and says 'confirmed through line N'
      (every row up to line N of the file is in the queue, nothing after it; continue
      with send --start-line N+1; a signal before publishing starts leaves nothing
      published). A send that loses the broker for good says the same and exits 1";

/// Send bulk email through sluice: turn a campaign into jobs on RabbitMQ, follow it, and
/// manage the jobs that could not be delivered.
#[derive(Debug, Parser)]
#[command(name = "sluice-producer", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Configuration file (TOML). Without it: $SLUICE_CONFIG, else built-in defaults;
    /// SLUICE__SECTION__KEY environment variables override either
    /// (e.g. SLUICE__AMQP__NAMESPACE=staging).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish one job per recipient row; nothing is published unless every row is valid.
    #[command(after_help = EXIT_CODES)]
    Send(SendArgs),
    /// Follow a campaign in the event log until every job has a final outcome, then print
    /// its counts. Reads only: any number of watchers, at any time within the log's
    /// retention, for campaigns published by other services too.
    #[command(after_help = EXIT_CODES)]
    Watch(WatchArgs),
    /// Print a campaign's counts so far, its rate over the last minute and the time left,
    /// without waiting (exit 0 whatever the counts; 1 for a campaign the event log has
    /// never seen).
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// How many jobs wait in each class queue (high, normal, low) of each relay. `relay
    /// status` adds the age of each class's oldest job, as the workers saw it.
    Queues(QueuesArgs),
    /// Inspect, replay or purge the jobs that ended in a dead-letter queue.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Pause a campaign fleet-wide: within 3 s no worker starts another SMTP transaction for
    /// it; its jobs are set aside in its hold queue (<ns>.hold.<campaign>) until `resume`.
    /// Other campaigns on the same relays keep their rate.
    #[command(after_help = EXIT_CODES)]
    Pause(CampaignArgs),
    /// Resume a paused campaign: its held jobs go back to their relays' queues (each copy
    /// confirmed before it leaves the hold queue) and sending continues.
    #[command(after_help = EXIT_CODES)]
    Resume(CampaignArgs),
    /// Cancel a campaign: its remaining jobs (queued, held, waiting in retry steps) end with
    /// outcome `cancelled`, never delivered, one final event each. Jobs already handed to a
    /// relay are not recalled.
    #[command(after_help = EXIT_CODES)]
    Cancel(CancelArgs),
    /// Every campaign in the event log with its state (sending, paused, cancelled,
    /// finished) and counts.
    #[command(after_help = EXIT_CODES)]
    Campaigns(CampaignsArgs),
    /// Suspend or resume a relay fleet-wide, or show every relay's state.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Recreate the queues an older sluice declared differently (classic retry and dead
    /// queues, jobs queues without at-least-once dead-lettering), keeping every message.
    #[command(long_about = MIGRATE_ABOUT, after_help = EXIT_CODES)]
    MigrateQueues(MigrateArgs),
}

/// `pause` and `resume`: one campaign.
#[derive(Debug, Args)]
pub struct CampaignArgs {
    /// The campaign id (it must be in the event log: a summary or an event).
    #[arg(long, value_name = "ID", value_parser = parse_campaign)]
    pub campaign: String,
}

/// `cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The campaign id (it must be in the event log: a summary or an event).
    #[arg(long, value_name = "ID", value_parser = parse_campaign)]
    pub campaign: String,

    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// `campaigns`.
#[derive(Debug, Args)]
pub struct CampaignsArgs {
    /// One JSON object per line: state and the fields of `status --json` (without the
    /// rate).
    #[arg(long)]
    pub json: bool,
}

/// `relay ...`: the relays, fleet-wide.
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// No worker starts a transaction on the relay until DURATION has passed or it is
    /// resumed (within 3 s, fleet-wide); its failover relay takes its jobs if it has one,
    /// as when it is down, else they wait in its queues without spending attempts.
    #[command(after_help = EXIT_CODES)]
    Suspend(RelaySuspendArgs),
    /// End a relay's suspension (and any cool-off the fleet was told of) now.
    #[command(after_help = EXIT_CODES)]
    Resume(RelayResumeArgs),
    /// Each configured relay: up, down or suspended (until when, why), throttled to what
    /// rate, budget slots in use, jobs queued per class and the age of each class's oldest
    /// job (as the workers last saw its head, in the last 15 s), retrying and dead.
    #[command(after_help = EXIT_CODES)]
    Status(RelayStatusArgs),
}

/// `relay suspend`.
#[derive(Debug, Args)]
pub struct RelaySuspendArgs {
    /// The relay (a `[relays.NAME]` of the configuration).
    #[arg(value_name = "NAME")]
    pub name: String,

    /// How long, e.g. `30m`, `2h`.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Duration,

    /// Why, for `relay status` and the workers' logs.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// `relay resume`.
#[derive(Debug, Args)]
pub struct RelayResumeArgs {
    /// The relay (a `[relays.NAME]` of the configuration).
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `relay status`.
#[derive(Debug, Args)]
pub struct RelayStatusArgs {
    /// One JSON object per relay and line: relay, state, until, reason, throttled_to,
    /// throttled_at, session_limit, max_connections, max_messages_per_second,
    /// slots_in_use, queued_high, queued_normal, queued_low, oldest_high_age_s,
    /// oldest_normal_age_s, oldest_low_age_s (null: empty, or no worker took from it
    /// lately), retrying, dead, failover.
    #[arg(long)]
    pub json: bool,
}

/// The long help of `migrate-queues`: what it does and what to do when it is interrupted.
const MIGRATE_ABOUT: &str = "\
Recreate the queues an older sluice declared differently (classic retry and dead queues, jobs
queues without at-least-once dead-lettering), keeping every message.

Stop every worker first (and anything else that publishes to or consumes from the namespace):
a queue is deleted and declared again while this runs.

For each queue of the namespace that does not match what this version declares, it moves the
messages, in order, with their properties and headers, to the temporary quorum queue
<queue>.migrating (each copy confirmed by the broker before its original is removed), deletes
the old queue, declares the new one and moves the messages back the same way, then deletes
the temporary queue. Queues that already match are left alone. A message waiting in a retry
step starts its delay again.

If it is interrupted (Ctrl-C, a lost connection, a crash) at any point, nothing is lost: run it
again with the same options and it completes the work, including queues left half-way (at
most one message per queue may then exist twice).";

/// `send`: a campaign from a recipients file and templates.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Recipients CSV (UTF-8, comma separated) with a header row. It needs an `email`
    /// column; every column is a template variable, e.g. {{ name }}. The file is read twice
    /// (validate, then publish), so it must be a regular file. Limits: 1 MiB per field,
    /// 2 MiB per record (all its fields), 10 MiB rendered per row; a row over one is
    /// reported as 'line N: ...'. Whatever the file, send stays under about 200 MiB of memory,
    /// plus about 26 bytes per row for finding duplicate addresses (see --dedupe).
    #[arg(long, value_name = "FILE.csv")]
    pub recipients: PathBuf,

    /// The From header: `news@example.com` or `Example News <news@example.com>`.
    #[arg(long, value_name = "ADDR")]
    pub from: String,

    /// Subject template, e.g. "Hello {{ name }}" (rendered as written, no escaping).
    #[arg(long, value_name = "TEMPLATE")]
    pub subject: String,

    /// Plain-text body template file (rendered as written, no escaping).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,

    /// HTML body template file; variables inserted into it are HTML-escaped.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Extra header, as "Name: TEMPLATE" (repeatable), e.g.
    /// --header "List-Unsubscribe: <https://example.com/u/{{ token }}>".
    /// Rendered values must stay on one line.
    #[arg(long = "header", value_name = "NAME: TEMPLATE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,

    /// Relay whose queue takes the jobs. Defaults to the only configured relay; required
    /// when several are configured; `primary` when none is.
    #[arg(long, value_name = "NAME")]
    pub relay: Option<String>,

    /// Class of the jobs: high (always sent first), normal, or low (gets the relay's
    /// low_share of sends while normal jobs also wait). Published with the routing key
    /// <relay>.high, <relay> or <relay>.low, and the job's "priority" field set to match.
    #[arg(long, value_name = "LEVEL", default_value = "normal", value_parser = parse_priority)]
    pub priority: sluice_shared::Priority,

    /// Campaign id (letters, digits, '-', '_'); job ids are <campaign>-<line>.
    /// Default: generated from the time, e.g. c20261128T112233Z3f9a.
    #[arg(long, value_name = "ID", value_parser = parse_campaign)]
    pub campaign: Option<String>,

    /// Do not send before this moment (RFC 3339, e.g. 2026-12-24T18:00:00Z): the jobs wait
    /// in the relay's retry queues until then, without spending an attempt.
    #[arg(long, value_name = "TIME", value_parser = parse_moment)]
    pub not_before: Option<String>,

    /// Do not send after this moment (RFC 3339): jobs still unsent then end in the relay's
    /// dead queue with reason `expired` (one `dead` event each).
    #[arg(long, value_name = "TIME", value_parser = parse_moment)]
    pub not_after: Option<String>,

    /// Envelope sender (bounce address) when it is not the From address.
    #[arg(long, value_name = "ADDR")]
    pub return_path: Option<String>,

    /// Publish the valid rows even if some are invalid (those are still listed on stderr).
    #[arg(long)]
    pub skip_invalid: bool,

    /// Print one JSON object with the counts instead of text:
    /// {"published": N, "skipped": M, "duplicates": D, "campaign": "..."}; an interrupted
    /// send adds "interrupted" (SIGINT, SIGTERM or "broker lost") and
    /// "confirmed_through_line".
    #[arg(long)]
    pub json: bool,

    /// Send a campaign id again although the event log holds its summary (it was sent
    /// before): every row is published again, with the same job ids. Without it, such a
    /// send is refused (exit 1) before anything is published.
    #[arg(long)]
    pub force: bool,

    /// Continue an interrupted send of the same --campaign and file: rows on lines before
    /// LINE are not published (the interrupted run did that), the rest are. An interrupted
    /// send prints 'confirmed through line N': pass N+1. An earlier summary of the campaign
    /// does not refuse a continued send; its own summary counts the jobs of both runs.
    #[arg(long, value_name = "LINE", value_parser = clap::value_parser!(u64).range(2..))]
    pub start_line: Option<u64>,

    /// Send one job per address: a row whose email (trimmed, case ignored) an earlier row
    /// has is skipped. Without it such rows are sent too; either way each is reported as
    /// 'line N: duplicate of line M (address)'. Finding them keeps about 26 bytes per row
    /// in memory (26 MiB for a million rows).
    #[arg(long)]
    pub dedupe: bool,

    /// After publishing, follow the campaign like `watch` (same output and exit codes).
    #[arg(long)]
    pub wait: bool,
}

/// `watch`: follow one campaign.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The campaign id `send` printed (or was given, or a job's `campaign` field).
    #[arg(long, value_name = "ID", value_parser = parse_campaign)]
    pub campaign: String,

    /// Print the counts as one JSON object (the fields of `status --json`).
    #[arg(long)]
    pub json: bool,

    /// Give up after this long (e.g. `30s`, `10m`): print the counts so far and exit 4.
    /// Without it, a campaign without a summary (published by another service) is
    /// followed until interrupted.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Read the event log from this long ago (e.g. `2h`) instead of from its oldest entry:
    /// faster on a long log, for a campaign known to be younger.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
}

/// `status`: one campaign's counts so far.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The campaign id.
    #[arg(long, value_name = "ID", value_parser = parse_campaign)]
    pub campaign: String,

    /// Print one JSON object: state (sending, paused, cancelled, finished), campaign,
    /// published (null when unknown), delivered, deferred
    /// (jobs waiting in a retry step now), bounced, dead, cancelled, pending (null when
    /// unknown), deferred_attempts, rate_per_second (last minute), eta_seconds.
    #[arg(long)]
    pub json: bool,

    /// Read the event log from this long ago (e.g. `2h`) instead of from its oldest entry.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
}

/// `queues`: the depth of every class queue.
#[derive(Debug, Args)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub relays: RelayChoice,

    /// One JSON object per line: relay, class, queue, ready (null when not declared yet).
    #[arg(long)]
    pub json: bool,
}

/// `dead ...`: the dead-letter queues.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead jobs (id, recipient, reason, last SMTP reply, attempts) without removing
    /// or reordering them: every message of the queue is taken and put back at its tail
    /// (confirmed before its original is removed), so the whole queue is read even with
    /// --limit; an interrupted listing may leave one job twice in the queue.
    #[command(after_help = EXIT_CODES)]
    List(DeadListArgs),
    /// Publish dead jobs back to their relay's queue with a fresh attempt count; a job leaves
    /// the dead queue only once the broker confirmed its copy. A job id met twice is sent
    /// once; the jobs not selected stay in place, in order.
    #[command(after_help = EXIT_CODES)]
    Replay(DeadReplayArgs),
    /// Delete the dead jobs of the relay(s): all of them, or those matching --reason and
    /// --campaign (the others stay in place, in order).
    #[command(after_help = EXIT_CODES)]
    Purge(DeadPurgeArgs),
}

/// `migrate-queues`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Only this relay's queues (repeatable). Default: every configured relay (`primary`
    /// when none is configured).
    #[arg(long = "relay", value_name = "NAME")]
    pub relays: Vec<String>,

    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// Which dead jobs, by why they died and by campaign; without either, all of them.
#[derive(Debug, Args, Clone, Default)]
pub struct DeadFilter {
    /// Only jobs dead for this reason (header x-sluice-reason), e.g. invalid,
    /// "retries exhausted", bounced.
    #[arg(long, value_name = "REASON")]
    pub reason: Option<String>,

    /// Only jobs of this campaign (the job's `campaign`; a job without one is `default`).
    #[arg(long, value_name = "ID")]
    pub campaign: Option<String>,
}

/// Which relays' dead queues.
#[derive(Debug, Args)]
pub struct RelayChoice {
    /// Only this relay's dead queue. Default: every configured relay (`primary` when none
    /// is configured).
    #[arg(long, value_name = "NAME")]
    pub relay: Option<String>,
}

/// `dead list`.
#[derive(Debug, Args)]
pub struct DeadListArgs {
    #[command(flatten)]
    pub relays: RelayChoice,

    #[command(flatten)]
    pub filter: DeadFilter,

    /// Show at most this many jobs per relay.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,

    /// One JSON object per line: id, to, campaign, relay, reason, smtp_code, smtp_reply,
    /// attempts.
    #[arg(long)]
    pub json: bool,
}

/// `dead replay`.
#[derive(Debug, Args)]
pub struct DeadReplayArgs {
    #[command(flatten)]
    pub relays: RelayChoice,

    #[command(flatten)]
    pub filter: DeadFilter,

    /// Replay only the job with this id (repeatable). Default: every dead job.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
}

/// `dead purge`.
#[derive(Debug, Args)]
pub struct DeadPurgeArgs {
    #[command(flatten)]
    pub relays: RelayChoice,

    #[command(flatten)]
    pub filter: DeadFilter,

    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
}

/// `Name: TEMPLATE` → (name, template); the name must be one a job may set.
fn parse_header(spec: &str) -> Result<(String, String), String> {
    let (name, value) = spec
        .split_once(':')
        .ok_or_else(|| format!("{spec:?}: expected \"Name: TEMPLATE\""))?;
    let name = name.trim();
    sluice_shared::job::check_header(name, "").map_err(|e| e.to_string())?;
    Ok((name.to_string(), value.trim_start().to_string()))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 30s, 10m, 2h)"))
}

fn parse_campaign(id: &str) -> Result<String, String> {
    crate::campaign::check_campaign_id(id)?;
    Ok(id.to_string())
}

fn parse_moment(value: &str) -> Result<String, String> {
    sluice_shared::job::parse_moment(value)?;
    Ok(value.to_string())
}

fn parse_priority(value: &str) -> Result<sluice_shared::Priority, String> {
    value.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_goes_before_or_after_the_subcommand() {
        for args in [
            &[
                "sluice-producer",
                "--config",
                "a.toml",
                "watch",
                "--campaign",
                "c1",
            ][..],
            &[
                "sluice-producer",
                "watch",
                "--campaign",
                "c1",
                "--config",
                "a.toml",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("a.toml")));
        }
    }

    #[test]
    fn headers_are_checked_when_parsed() {
        assert_eq!(
            parse_header("List-Unsubscribe: <mailto:u@example.com?s={{ id }}>").unwrap(),
            (
                "List-Unsubscribe".to_string(),
                "<mailto:u@example.com?s={{ id }}>".to_string()
            )
        );
        for bad in ["no colon", "Bcc: x@example.com", "Bad Name: x", ": x"] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
    }
}
