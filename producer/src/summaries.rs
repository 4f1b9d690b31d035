//! Campaign summaries in the event log: `send` writes one per run, and refuses a campaign
//! id that already has one (safe re-send).
//!
//! A campaign was sent before when the event log holds a summary of it (what `send` writes
//! after its last confirm, or when a stop signal interrupts it); events alone do not count
//! (other services publish jobs without summaries). `--force` sends it again from the first
//! row; `--start-line` continues it (see [`crate::checkpoint`]). The log is read from its
//! oldest entry, before anything is published.

use anyhow::Context as _;
use lapin::BasicProperties;
use sluice_shared::events::SUMMARY_KIND;
use sluice_shared::Topology;

use crate::publish::{Outgoing, Publisher, PERSISTENT};
use sluice_shared::events::CampaignSummary;
use sluice_shared::Settings;

use crate::log::{Entry, LogReader, Since};

/// What the event log says about earlier sends of one campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EarlierSends {
    /// The latest summary of the campaign.
    pub last: Option<CampaignSummary>,
    /// When the first of them started publishing (what a continued send's summary keeps).
    pub first_started_at: Option<String>,
}

impl EarlierSends {
    /// Take in one of the campaign's summaries, in log order.
    pub fn add(&mut self, summary: CampaignSummary) {
        if self.first_started_at.is_none() {
            self.first_started_at = Some(summary.started_at.clone());
        }
        self.last = Some(summary);
    }
}

/// `send` met a campaign id that already has a summary (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AlreadySent(pub String);

/// Read the whole event log for `campaign`'s summaries.
pub async fn earlier_sends(settings: &Settings, campaign: &str) -> anyhow::Result<EarlierSends> {
    let mut reader = LogReader::open(settings, campaign, Since::Beginning).await?;
    let mut earlier = EarlierSends::default();
    let result = loop {
        match reader.next().await {
            Ok(Entry::Summary(summary)) => earlier.add(summary),
            Ok(Entry::Events(_)) => {}
            Ok(Entry::CaughtUp) => break Ok(earlier),
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    result
}

/// Write the campaign's summary into the event log, where `watch` and `status` learn how
/// many jobs make the campaign complete (see [`crate::tally::Tally::on_summary`]).
pub async fn write(
    publisher: &mut Publisher,
    topology: &Topology,
    summary: &CampaignSummary,
) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_type(SUMMARY_KIND.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(summary.to_headers());
    publisher
        .publish(Outgoing {
            tag: 0,
            id: format!("the summary of campaign {}", summary.campaign),
            exchange: "".into(),
            routing_key: topology.events_log().into(),
            properties,
            body: Vec::new(),
        })
        .await
        .context("cannot publish the campaign summary")?;
    publisher
        .flush()
        .await
        .context("cannot publish the campaign summary")?;
    Ok(())
}

/// Whether `send` may go on: a campaign without a summary may always be sent; one with a
/// summary only with `--force` (again from the first row) or `--start-line` (continued).
pub fn check(
    campaign: &str,
    earlier: &EarlierSends,
    force: bool,
    start_line: Option<u64>,
) -> Result<(), AlreadySent> {
    let Some(last) = &earlier.last else {
        return Ok(());
    };
    if force || start_line.is_some() {
        return Ok(());
    }
    let published = last.published;
    let started = &last.started_at;
    Err(AlreadySent(match last.confirmed_through_line {
        Some(line) => format!(
            "campaign {campaign} was already sent and interrupted (the event log has its \
             summary: {published} jobs published from {started}, confirmed through line \
             {line}); nothing was published: continue it with --start-line {}, or pass \
             --force to send it again from the first row",
            line + 1
        ),
        None => format!(
            "campaign {campaign} was already sent (the event log has its summary: \
             {published} jobs published from {started}); nothing was published: pass --force \
             to send it again, or --start-line N to continue an interrupted send from line N"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(confirmed_through_line: Option<u64>) -> CampaignSummary {
        CampaignSummary {
            campaign: "spring".into(),
            published: 3,
            relay: "primary".into(),
            started_at: "2026-11-28T11:00:00Z".into(),
            start_line: None,
            confirmed_through_line,
        }
    }

    #[test]
    fn only_a_summary_refuses_and_force_or_start_line_override_it() {
        let never = EarlierSends::default();
        assert!(check("spring", &never, false, None).is_ok());

        let mut sent = EarlierSends::default();
        sent.add(summary(None));
        let refused = check("spring", &sent, false, None).unwrap_err().0;
        assert!(
            refused.contains("campaign spring was already sent"),
            "{refused}"
        );
        assert!(refused.contains("--force"), "{refused}");
        assert!(check("spring", &sent, true, None).is_ok());
        assert!(check("spring", &sent, false, Some(5)).is_ok());

        let mut interrupted = EarlierSends::default();
        interrupted.add(summary(Some(4)));
        let refused = check("spring", &interrupted, false, None).unwrap_err().0;
        assert!(refused.contains("--start-line 5"), "{refused}");
    }

    #[test]
    fn the_first_start_is_kept_and_the_last_summary_wins() {
        let mut earlier = EarlierSends::default();
        earlier.add(summary(Some(4)));
        earlier.add(CampaignSummary {
            started_at: "2026-11-28T12:00:00Z".into(),
            ..summary(None)
        });
        assert_eq!(
            earlier.first_started_at.as_deref(),
            Some("2026-11-28T11:00:00Z")
        );
        assert_eq!(earlier.last.unwrap().confirmed_through_line, None);
    }
}
