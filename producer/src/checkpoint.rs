//! How far an interrupted `send` got: the stop signals it heeds, and the line of the file
//! through which every row is done (published and confirmed, or skipped).
//!
//! `send` publishes rows in file order through a pipelined confirm window, and the
//! publisher settles confirms in publishing order: the rows confirmed are always the first
//! ones published. So "every row up to line N is done" is the line before the oldest
//! unconfirmed row, or, when none is outstanding, the last row handled. Rows skipped
//! (invalid, duplicates under `--dedupe`, before `--start-line`) count as done: a
//! continued send skips them again. `send --start-line N+1` then continues the campaign.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use sluice_shared::events::CampaignSummary;
use sluice_shared::Topology;

use crate::exit::{Interrupted, StopSignal};
use crate::publish::{PublishError, Publisher};
use crate::summaries;

/// How long a stop signal waits for the confirms of what was published before it.
pub const CONFIRM_GRACE: Duration = Duration::from_secs(30);

/// The first SIGINT or SIGTERM received, once listening started; until then the signals
/// keep their default action (the process ends).
#[derive(Debug, Clone)]
pub struct Stop {
    sender: Arc<watch::Sender<Option<StopSignal>>>,
    receiver: watch::Receiver<Option<StopSignal>>,
}

impl Stop {
    /// Start listening for SIGINT and SIGTERM (needs a Tokio runtime).
    pub fn on_signals() -> Stop {
        let (sender, receiver) = watch::channel(None);
        let stop = Stop {
            sender: Arc::new(sender),
            receiver,
        };
        let listener = stop.clone();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::spawn(async move {
                let signal = tokio::select! {
                    _ = term.recv() => StopSignal::Terminate,
                    _ = int.recv() => StopSignal::Interrupt,
                };
                tracing::info!(signal = signal.name(), "stop signal received");
                listener.trigger(signal);
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            listener.trigger(StopSignal::Interrupt);
        });
        stop
    }

    /// Record `signal` as if it had been received (the first one counts).
    pub fn trigger(&self, signal: StopSignal) {
        self.sender.send_if_modified(|received| {
            let first = received.is_none();
            if first {
                *received = Some(signal);
            }
            first
        });
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<StopSignal> {
        *self.receiver.borrow()
    }

    /// Resolves with the signal once one is received.
    pub async fn wait(&self) -> StopSignal {
        let mut receiver = self.receiver.clone();
        let received = receiver.wait_for(Option::is_some).await.map(|r| *r);
        match received {
            Ok(Some(signal)) => signal,
            // The sender lives as long as any clone of `self`: never reached.
            _ => std::future::pending().await,
        }
    }
}

/// The rows of one `send` as they are handled, in file order, and the line through which
/// all of them are done.
#[derive(Debug)]
pub struct Checkpoint {
    /// The last line handled (published or skipped); 1 (the header) before the first row.
    last_handled: u64,
    /// Lines of the published rows not yet known to be confirmed, oldest first.
    unconfirmed: VecDeque<u64>,
    /// Rows published so far.
    published: u64,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            last_handled: 1,
            unconfirmed: VecDeque::new(),
            published: 0,
        }
    }
}

impl Checkpoint {
    /// A row (starting on `line`) that is not published: it is done as it is.
    pub fn skipped(&mut self, line: u64) {
        self.last_handled = line;
    }

    /// A row (starting on `line`) handed to the publisher.
    pub fn published(&mut self, line: u64) {
        self.last_handled = line;
        self.unconfirmed.push_back(line);
        self.published += 1;
    }

    /// Take note that the publisher has confirmed `confirmed` of the rows published (it
    /// confirms in publishing order).
    pub fn confirmed(&mut self, confirmed: u64) {
        let outstanding = self.published.saturating_sub(confirmed) as usize;
        while self.unconfirmed.len() > outstanding {
            self.unconfirmed.pop_front();
        }
    }

    /// The highest line such that every row up to it is done.
    pub fn through_line(&self) -> u64 {
        match self.unconfirmed.front() {
            Some(&oldest) => oldest - 1,
            None => self.last_handled,
        }
    }

    /// Whether rows were published whose confirms never came: they may or may not be in
    /// the queue.
    pub fn has_unconfirmed(&self) -> bool {
        !self.unconfirmed.is_empty()
    }
}

/// What ended publishing before the end of the file.
#[derive(Debug)]
pub enum Stopped {
    /// A stop signal: nothing more is published, what was is confirmed.
    Signal(StopSignal),
    /// The publisher gave up: the broker stayed out of reach, or refused a job.
    Publishing(PublishError),
}

impl Stopped {
    /// What `--json` says in `interrupted`.
    pub fn what(&self) -> &'static str {
        match self {
            Stopped::Signal(signal) => signal.name(),
            Stopped::Publishing(PublishError::Unreachable(_)) => "broker lost",
            Stopped::Publishing(_) => "broker refused a job",
        }
    }
}

/// An interrupted `send` after [`wind_down`]: what stopped it and what it left behind.
#[derive(Debug)]
pub struct WoundDown {
    stopped: Stopped,
    /// Jobs this run published, each confirmed (the summary is not one).
    published: u64,
    /// Why some confirms never came, when they did not.
    unconfirmed: Option<String>,
    /// Whether the event log got the interrupted run's summary.
    summary_written: bool,
}

/// After a stop signal: wait (at most [`CONFIRM_GRACE`]) for the confirms of everything
/// published, so that the checkpoint is the last row handled and nothing after it exists;
/// then write the run's summary, marked interrupted ([`CampaignSummary::published`] is
/// `before_start` plus the jobs this run had confirmed). After the publisher gave up there
/// is nobody to wait for and no log to write to.
pub async fn wind_down(
    stopped: Stopped,
    publisher: &mut Publisher,
    topology: &Topology,
    checkpoint: &mut Checkpoint,
    (summary, before_start): (&mut CampaignSummary, u64),
) -> WoundDown {
    if matches!(stopped, Stopped::Publishing(_)) {
        return WoundDown {
            stopped,
            published: publisher.confirmed(),
            unconfirmed: None,
            summary_written: false,
        };
    }
    let unconfirmed = match tokio::time::timeout(CONFIRM_GRACE, publisher.flush()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some(format!("no confirm within {CONFIRM_GRACE:?}")),
    };
    checkpoint.confirmed(publisher.confirmed());
    // Counted before the summary goes through the same publisher.
    let published = publisher.confirmed();
    summary.published = before_start + published;
    summary.confirmed_through_line = Some(checkpoint.through_line());
    let summary_written = unconfirmed.is_none()
        && matches!(
            tokio::time::timeout(
                CONFIRM_GRACE,
                summaries::write(publisher, topology, summary)
            )
            .await,
            Ok(Ok(()))
        );
    WoundDown {
        stopped,
        published,
        unconfirmed,
        summary_written,
    }
}

impl WoundDown {
    /// What `--json` says in `interrupted`.
    pub fn what(&self) -> &'static str {
        self.stopped.what()
    }

    /// Jobs this run published, each confirmed.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// The error that ends the `send`: where to continue, and what the queue holds (of the
    /// `valid` rows of the file).
    pub fn into_error(self, checkpoint: &Checkpoint, valid: u64) -> anyhow::Error {
        let published = self.published;
        let through = checkpoint.through_line();
        let after = if checkpoint.has_unconfirmed() {
            format!(
                "rows after line {through} were published without a confirm{} and may be \
                 in the queue too",
                self.unconfirmed
                    .map(|why| format!(" ({why})"))
                    .unwrap_or_default()
            )
        } else {
            format!("nothing after line {through} was published")
        };
        let summary = if self.summary_written {
            "the event log has the interrupted run's summary"
        } else {
            "no campaign summary was written"
        };
        let progress = format!(
            "confirmed through line {through}: published {published} of {valid} jobs, each \
             confirmed by the broker; {after}; {summary}; continue with --start-line {}",
            through + 1
        );
        match self.stopped {
            Stopped::Signal(signal) => Interrupted {
                signal,
                message: format!("interrupted by {}: {progress}", signal.name()),
            }
            .into(),
            Stopped::Publishing(error) => {
                anyhow::Error::new(error).context(format!("publishing stopped, {progress}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_through_which_every_row_is_done() {
        let mut checkpoint = Checkpoint::default();
        assert_eq!(checkpoint.through_line(), 1, "nothing handled: the header");
        checkpoint.published(2);
        checkpoint.skipped(3); // invalid
        checkpoint.published(4);
        checkpoint.published(7); // a record spanning lines 5 and 6, then a blank line...
        assert_eq!(checkpoint.through_line(), 1, "line 2 is not confirmed yet");
        checkpoint.confirmed(1);
        assert_eq!(
            checkpoint.through_line(),
            3,
            "line 4 waits: the skipped 3 is done"
        );
        checkpoint.confirmed(2);
        assert_eq!(checkpoint.through_line(), 6);
        assert!(checkpoint.has_unconfirmed());
        checkpoint.confirmed(3);
        assert_eq!(checkpoint.through_line(), 7);
        assert!(!checkpoint.has_unconfirmed());
        checkpoint.skipped(8);
        checkpoint.skipped(9);
        assert_eq!(
            checkpoint.through_line(),
            9,
            "skipped rows at the end are done too"
        );
        checkpoint.published(10);
        assert_eq!(checkpoint.through_line(), 9);
    }

    #[test]
    fn the_first_signal_counts() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let stop = Stop::on_signals();
            assert_eq!(stop.received(), None);
            stop.trigger(StopSignal::Terminate);
            stop.trigger(StopSignal::Interrupt);
            assert_eq!(stop.received(), Some(StopSignal::Terminate));
            assert_eq!(stop.wait().await, StopSignal::Terminate);
        });
    }
}
