//! The counts of one campaign, fed with the entries of the event log. Pure: no broker.
//!
//! Events are at least once: a job's final outcome counts once, whatever duplicates
//! follow, and a deferral that comes after a job's final outcome (a redelivered duplicate)
//! does not make it pending again.

use std::collections::HashSet;
use std::fmt;

use sluice_shared::events::{CampaignSummary, DeliveryEvent, EventOutcome};

use crate::exit::Status;

/// How far along a campaign is: what `status --json` and `watch --json` print.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Counts {
    pub campaign: String,
    /// Jobs published, from the campaign's summaries; `None` when the log holds none (a
    /// campaign published by another service, or a `send` that lost its broker).
    pub published: Option<u64>,
    pub delivered: u64,
    /// Jobs waiting in a retry step now (their last event was a deferral).
    pub deferred: u64,
    pub bounced: u64,
    pub dead: u64,
    /// Jobs cancelled before they were sent (`sluice-producer cancel`).
    pub cancelled: u64,
    /// Jobs without a final outcome yet: published minus finished; `None` when the number
    /// published is unknown.
    pub pending: Option<u64>,
    /// Deferral events in all (a job deferred three times counts three).
    pub deferred_attempts: u64,
}

impl Counts {
    /// Success only when every finished job was delivered.
    pub fn status(&self) -> Status {
        if self.bounced + self.dead == 0 {
            Status::Success
        } else {
            Status::CampaignFailed
        }
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {}, bounced {}, dead {}, ",
            self.delivered, self.bounced, self.dead
        )?;
        if self.cancelled > 0 {
            write!(f, "cancelled {}, ", self.cancelled)?;
        }
        write!(f, "deferred attempts {}", self.deferred_attempts)
    }
}

/// Job ids already counted with a final outcome. Ids `<campaign>-<line>` (what `send`
/// makes) take one bit each; any other id is kept as text.
#[derive(Debug, Default)]
struct Finals {
    prefix: String,
    lines: Vec<u64>,
    others: HashSet<String>,
}

/// Lines beyond this are kept as text rather than in the bitmap (bounds the bitmap).
const MAX_BITMAP_LINE: u64 = 1 << 28;

impl Finals {
    fn new(campaign: &str) -> Finals {
        Finals {
            prefix: format!("{campaign}-"),
            ..Default::default()
        }
    }

    fn line_of(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.prefix)
            .filter(|digits| !digits.starts_with('0') && !digits.starts_with('+'))
            .and_then(|digits| digits.parse::<u64>().ok())
            .filter(|&line| line < MAX_BITMAP_LINE)
    }

    /// Whether `id` has a final outcome.
    fn contains(&self, id: &str) -> bool {
        match self.line_of(id) {
            Some(line) => self
                .lines
                .get((line / 64) as usize)
                .is_some_and(|word| word & (1 << (line % 64)) != 0),
            None => self.others.contains(id),
        }
    }

    /// True when `id` had no final outcome yet.
    fn insert(&mut self, id: &str) -> bool {
        match self.line_of(id) {
            Some(line) => {
                let (word, bit) = ((line / 64) as usize, line % 64);
                if word >= self.lines.len() {
                    self.lines.resize(word + 1, 0);
                }
                let fresh = self.lines[word] & (1 << bit) == 0;
                self.lines[word] |= 1 << bit;
                fresh
            }
            None => self.others.insert(id.to_string()),
        }
    }
}

/// The counts of one campaign as the log's entries come in.
#[derive(Debug)]
pub struct Tally {
    campaign: String,
    summary: Option<CampaignSummary>,
    delivered: u64,
    bounced: u64,
    dead: u64,
    cancelled: u64,
    deferred_attempts: u64,
    /// Jobs whose last event was a deferral.
    waiting: HashSet<String>,
    finals: Finals,
    /// Final outcomes stamped at or after this Unix time (the last minute's rate).
    recent_since: i64,
    recent: u64,
}

impl Tally {
    /// Nothing counted yet; final outcomes stamped from `recent_since` (Unix seconds) on
    /// count towards the recent rate.
    pub fn new(campaign: &str, recent_since: i64) -> Tally {
        Tally {
            campaign: campaign.to_string(),
            summary: None,
            delivered: 0,
            bounced: 0,
            dead: 0,
            cancelled: 0,
            deferred_attempts: 0,
            waiting: HashSet::new(),
            finals: Finals::new(campaign),
            recent_since,
            recent: 0,
        }
    }

    /// One of the campaign's summaries, in log order.
    ///
    /// - A plain `send`'s summary (a first send, or a second one with `--force`) adds its
    ///   jobs to what earlier summaries counted.
    /// - A continued send's summary (`send --start-line`, [`CampaignSummary::start_line`])
    ///   counts the campaign's jobs across its runs: the rows before its start line (which
    ///   the interrupted run published) plus its own. It replaces the count, so that a
    ///   run interrupted by the broker's loss, which wrote no summary, still gets its jobs
    ///   counted once.
    /// - An interrupted send's summary ([`CampaignSummary::confirmed_through_line`]) counts
    ///   what it published, and the campaign stays incomplete until a later summary of a
    ///   run that ended.
    pub fn on_summary(&mut self, summary: CampaignSummary) {
        match &mut self.summary {
            Some(known) => {
                known.published = if summary.start_line.is_some() {
                    summary.published
                } else {
                    known.published + summary.published
                };
                known.start_line = summary.start_line;
                known.confirmed_through_line = summary.confirmed_through_line;
            }
            None => self.summary = Some(summary),
        }
    }

    /// One delivery event.
    pub fn on_event(&mut self, event: &DeliveryEvent) {
        if event.outcome == EventOutcome::Deferred {
            self.deferred_attempts += 1;
            if !self.finals.contains(&event.id) {
                self.waiting.insert(event.id.clone());
            }
            return;
        }
        if !self.finals.insert(&event.id) {
            return;
        }
        self.waiting.remove(&event.id);
        match event.outcome {
            EventOutcome::Delivered => self.delivered += 1,
            EventOutcome::Bounced => self.bounced += 1,
            EventOutcome::Dead => self.dead += 1,
            EventOutcome::Cancelled => self.cancelled += 1,
            EventOutcome::Deferred => unreachable!("handled above"),
        }
        let at =
            time::OffsetDateTime::parse(&event.at, &time::format_description::well_known::Rfc3339);
        if at.is_ok_and(|at| at.unix_timestamp() >= self.recent_since) {
            self.recent += 1;
        }
    }

    /// Whether the log held anything of this campaign.
    pub fn seen(&self) -> bool {
        self.summary.is_some() || self.finished_jobs() > 0 || self.deferred_attempts > 0
    }

    /// The summary `send` wrote, if the log holds one.
    pub fn summary(&self) -> Option<&CampaignSummary> {
        self.summary.as_ref()
    }

    /// Jobs with a final outcome.
    pub fn finished_jobs(&self) -> u64 {
        self.delivered + self.bounced + self.dead + self.cancelled
    }

    /// Final outcomes stamped since `recent_since`.
    pub fn recent(&self) -> u64 {
        self.recent
    }

    /// True once the number of jobs is known and every job has a final outcome.
    pub fn is_complete(&self) -> bool {
        self.summary.as_ref().is_some_and(|summary| {
            summary.confirmed_through_line.is_none() && self.finished_jobs() >= summary.published
        })
    }

    /// The counts as they stand.
    pub fn counts(&self) -> Counts {
        let published = self.summary.as_ref().map(|summary| summary.published);
        Counts {
            campaign: self.campaign.clone(),
            published,
            delivered: self.delivered,
            deferred: self.waiting.len() as u64,
            bounced: self.bounced,
            dead: self.dead,
            cancelled: self.cancelled,
            pending: published.map(|published| published.saturating_sub(self.finished_jobs())),
            deferred_attempts: self.deferred_attempts,
        }
    }

    /// The counts on one line, for a progress bar.
    pub fn detail(&self) -> String {
        format!(
            "delivered {}, deferred {}, bounced {}, dead {}, cancelled {}",
            self.delivered,
            self.waiting.len(),
            self.bounced,
            self.dead,
            self.cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, outcome: EventOutcome) -> DeliveryEvent {
        DeliveryEvent {
            id: id.into(),
            campaign: "c1".into(),
            to: "a@example.org".into(),
            relay: "primary".into(),
            outcome,
            attempt: 1,
            smtp_code: None,
            smtp_reply: None,
            at: "2026-11-28T11:22:33Z".into(),
            trace_id: None,
        }
    }

    fn summary(published: u64) -> CampaignSummary {
        CampaignSummary {
            campaign: "c1".into(),
            published,
            relay: "primary".into(),
            started_at: "2026-11-28T11:00:00Z".into(),
            start_line: None,
            confirmed_through_line: None,
        }
    }

    #[test]
    fn a_continued_campaign_expects_the_total_of_its_runs() {
        use EventOutcome::Delivered;
        // Interrupted after lines 2..=4 (3 jobs), continued from line 5 (2 more jobs).
        let mut tally = Tally::new("c1", i64::MAX);
        tally.on_summary(CampaignSummary {
            confirmed_through_line: Some(4),
            ..summary(3)
        });
        for line in 2..=4 {
            tally.on_event(&event(&format!("c1-{line}"), Delivered));
        }
        assert!(
            !tally.is_complete(),
            "an interrupted run does not end the campaign"
        );
        assert_eq!(tally.counts().published, Some(3));
        tally.on_summary(CampaignSummary {
            start_line: Some(5),
            ..summary(5)
        });
        assert_eq!(tally.counts().published, Some(5), "the total, not 3 + 5");
        tally.on_event(&event("c1-5", Delivered));
        assert!(!tally.is_complete());
        tally.on_event(&event("c1-6", Delivered));
        assert!(tally.is_complete());

        // Interrupted by the broker's loss (no summary), then continued: the same total.
        let mut tally = Tally::new("c1", i64::MAX);
        tally.on_summary(CampaignSummary {
            start_line: Some(5),
            ..summary(5)
        });
        for line in 2..=6 {
            assert!(!tally.is_complete());
            tally.on_event(&event(&format!("c1-{line}"), Delivered));
        }
        assert!(tally.is_complete());

        // A second plain send (--force) adds its jobs.
        let mut tally = Tally::new("c1", i64::MAX);
        tally.on_summary(summary(2));
        tally.on_summary(summary(3));
        assert_eq!(tally.counts().published, Some(5));
    }

    #[test]
    fn counts_each_jobs_final_outcome_once() {
        use EventOutcome::*;
        let mut tally = Tally::new("c1", i64::MAX);
        let events = [
            ("c1-2", Deferred),
            ("c1-2", Deferred),
            ("c1-2", Delivered),
            ("c1-2", Delivered), // redelivered job, same outcome again
            ("c1-2", Deferred),  // a duplicate's deferral after the final outcome
            ("c1-3", Bounced),
            ("odd-id", Dead),
            ("odd-id", Dead),
            ("c1-5", Deferred),
        ];
        for (id, outcome) in events {
            tally.on_event(&event(id, outcome));
        }
        assert!(!tally.is_complete(), "total not known yet");
        let counts = tally.counts();
        assert_eq!((counts.published, counts.pending), (None, None));
        assert_eq!(counts.deferred, 1, "only c1-5 waits in a retry step");
        tally.on_summary(summary(5));
        assert!(!tally.is_complete());
        tally.on_event(&event("c1-70000", Delivered));
        tally.on_event(&event("c1-5", Delivered));
        assert!(tally.is_complete());
        let counts = tally.counts();
        assert_eq!(
            counts.to_string(),
            "delivered 3, bounced 1, dead 1, deferred attempts 4"
        );
        assert_eq!((counts.published, counts.pending), (Some(5), Some(0)));
        assert_eq!(counts.deferred, 0);
        assert_eq!(counts.status(), Status::CampaignFailed);
    }

    #[test]
    fn an_empty_campaign_is_complete_at_once_and_successful() {
        let mut tally = Tally::new("c1", 0);
        assert!(!tally.seen());
        tally.on_summary(summary(0));
        assert!(tally.seen() && tally.is_complete());
        assert_eq!(tally.counts().status(), Status::Success);
    }

    #[test]
    fn the_recent_rate_counts_final_outcomes_stamped_since_the_cutoff() {
        let cutoff = time::OffsetDateTime::parse(
            "2026-11-28T11:22:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp();
        let mut tally = Tally::new("c1", cutoff);
        let mut old = event("c1-2", EventOutcome::Delivered);
        old.at = "2026-11-28T11:21:59Z".into();
        tally.on_event(&old);
        tally.on_event(&event("c1-3", EventOutcome::Delivered));
        tally.on_event(&event("c1-4", EventOutcome::Deferred));
        assert_eq!(tally.recent(), 1);
    }

    #[test]
    fn line_ids_and_other_ids_are_told_apart() {
        let mut finals = Finals::new("c1");
        for (id, fresh) in [
            ("c1-2", true),
            ("c1-2", false),
            ("c1-02", true), // not what send makes: kept as text
            ("c1-02", false),
            ("c1-x", true),
            ("c10-2", true),
            ("c1-99999999999", true),
            ("c1-99999999999", false),
        ] {
            assert_eq!(finals.insert(id), fresh, "{id}");
            assert!(finals.contains(id));
        }
        assert!(!finals.contains("c1-3"));
    }
}
