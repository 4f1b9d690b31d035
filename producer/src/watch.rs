//! `watch` (and `send --wait`): follow a campaign in the event log until every job has a
//! final outcome, then print its counts.
//!
//! `watch` only reads the log: any number can follow the same campaign at once, or long
//! after it ended, and the campaign may have been published by another service (its jobs
//! carry its id). It knows how many jobs make the campaign complete from the summary `send`
//! writes; a campaign without one is followed until `--timeout`.

use std::time::Duration;

use sluice_shared::Settings;

use crate::cli::WatchArgs;
use crate::exit::{Interrupted, Status};
use crate::log::{unknown_campaign, Entry, LogReader, Since};
use crate::progress::Progress;
use crate::tally::{Counts, Tally};

/// Run `watch`.
pub async fn run(settings: &Settings, args: WatchArgs) -> anyhow::Result<Status> {
    let since = match args.since {
        Some(ago) => Since::Ago(ago),
        None => Since::Beginning,
    };
    let followed = follow(settings, &args.campaign, since, args.timeout).await?;
    let counts = followed.counts();
    if args.json {
        println!(
            "{}",
            serde_json::to_string(counts).expect("counts serialize")
        );
    } else {
        println!("{counts}");
    }
    Ok(followed.status())
}

/// How following a campaign ended.
#[derive(Debug)]
pub enum Followed {
    /// Every job has a final outcome.
    Complete(Counts),
    /// The timeout passed first: the counts so far.
    TimedOut(Counts),
}

impl Followed {
    /// The counts at the end.
    pub fn counts(&self) -> &Counts {
        match self {
            Followed::Complete(counts) | Followed::TimedOut(counts) => counts,
        }
    }

    /// Exit 0 when all were delivered, 3 with bounces or dead jobs, 4 on a timeout.
    pub fn status(&self) -> Status {
        match self {
            Followed::Complete(counts) => counts.status(),
            Followed::TimedOut(_) => Status::Incomplete,
        }
    }
}

/// Follow `campaign` from `since` until every job has a final outcome or `timeout` passes.
/// A campaign the log has never seen (no summary, no event) is an error.
pub async fn follow(
    settings: &Settings,
    campaign: &str,
    since: Since<'_>,
    timeout: Option<Duration>,
) -> anyhow::Result<Followed> {
    let stop = crate::checkpoint::Stop::on_signals();
    let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
    let mut reader = LogReader::open(settings, campaign, since).await?;
    let mut tally = Tally::new(campaign, i64::MAX);
    let mut progress = Progress::new("finished", None);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ended = loop {
        if tally.is_complete() {
            break Ok(Followed::Complete(tally.counts()));
        }
        let timed_out = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            signal = stop.wait() => {
                break Err(Interrupted {
                    signal,
                    message: format!(
                        "interrupted ({}); nothing was changed, run watch again to follow on",
                        tally.counts()
                    ),
                }
                .into());
            }
            _ = timed_out => break Ok(Followed::TimedOut(tally.counts())),
            _ = tick.tick() => progress.maybe_print_line(),
            entry = reader.next() => match entry {
                Err(e) => break Err(e.context("lost the event log while watching")),
                Ok(Entry::CaughtUp) => {
                    if !tally.seen() {
                        break Err(unknown_campaign(campaign));
                    }
                }
                Ok(Entry::Summary(summary)) => {
                    tally.on_summary(summary);
                    if let Some(summary) = tally.summary() {
                        progress.set_total(summary.published);
                    }
                }
                Ok(Entry::Events(batch)) => {
                    for event in &batch {
                        tally.on_event(event);
                    }
                    progress.set_detail(tally.detail());
                    progress.set(tally.finished_jobs());
                }
            },
        }
    };
    progress.finish();
    reader.close().await;
    ended
}
