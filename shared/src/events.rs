//! Delivery events: what other services (and `sluice-producer watch`/`status`) learn about
//! each job.
//!
//! A worker publishes the events of one flush to the topic exchange `<namespace>.events` as
//! batches: one message per outcome and campaign, routing key `<outcome>.<campaign>`, body a
//! JSON array of [`DeliveryEvent`] (`shared/event.schema.json`), header
//! [`FORMAT_HEADER`]` = `[`FORMAT_VERSION`]. The exchange feeds the event log, a stream every
//! reader can replay (see [`crate::amqp::topology`]); the producer writes each campaign's
//! summary into the same log ([`CampaignSummary`]).

use serde::{Deserialize, Serialize};

/// Header that marks an event message's format; absent on the first format (one event,
/// one message), which sluice no longer publishes.
pub const FORMAT_HEADER: &str = "x-sluice-events";
/// The format this version publishes: a JSON array of events per message.
pub const FORMAT_VERSION: i64 = 2;
/// AMQP `type` of an event batch.
pub const BATCH_KIND: &str = "delivery-events";
/// AMQP `type` of a campaign summary in the event log.
pub const SUMMARY_KIND: &str = "campaign-summary";
/// AMQP `type` of the marker a reader of the log writes to know where "now" is.
pub const MARKER_KIND: &str = "log-marker";
/// The campaign of a job that names none.
pub const DEFAULT_CAMPAIGN: &str = "default";

/// What happened to one delivery attempt, or to the job in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOutcome {
    /// The relay accepted the message (final).
    Delivered,
    /// A temporary failure; the job waits in a retry queue (not final).
    Deferred,
    /// The relay refused the recipient permanently (final).
    Bounced,
    /// Invalid, expired, or deferred on every retry step (final); the job is in the dead
    /// queue.
    Dead,
    /// Its campaign was cancelled before the job was sent (final); the job is gone.
    Cancelled,
}

impl EventOutcome {
    /// The word used in routing keys and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }

    /// The outcome a routing key's first word names.
    pub fn from_word(word: &str) -> Option<Self> {
        Some(match word {
            "delivered" => Self::Delivered,
            "deferred" => Self::Deferred,
            "bounced" => Self::Bounced,
            "dead" => Self::Dead,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// True for the outcomes that end a job.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Deferred)
    }
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryEvent {
    /// The job id.
    pub id: String,
    /// The job's campaign, `default` when it had none.
    pub campaign: String,
    /// The recipient, as the job named it (empty when the job could not be parsed).
    pub to: String,
    /// The relay the attempt went through.
    pub relay: String,
    /// What happened.
    pub outcome: EventOutcome,
    /// Which attempt this was (1-based).
    pub attempt: u32,
    /// The SMTP reply code, when the relay answered.
    pub smtp_code: Option<u16>,
    /// The SMTP reply text, or the connection error, or why the job is invalid.
    pub smtp_reply: Option<String>,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
    /// The W3C trace id of the job's trace, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// The routing key of events with this outcome and campaign: `<outcome>.<campaign>`.
pub fn routing_key(outcome: EventOutcome, campaign: &str) -> String {
    format!("{}.{campaign}", outcome.as_str())
}

/// The outcome and campaign a routing key names, if it is an event's.
pub fn parse_routing_key(key: &str) -> Option<(EventOutcome, &str)> {
    let (word, campaign) = key.split_once('.')?;
    Some((EventOutcome::from_word(word)?, campaign))
}

/// Read an event message's body: a batch, or (from an older worker) one event.
pub fn parse_batch(body: &[u8]) -> Result<Vec<DeliveryEvent>, serde_json::Error> {
    match serde_json::from_slice::<Vec<DeliveryEvent>>(body) {
        Ok(batch) => Ok(batch),
        Err(batch_error) => serde_json::from_slice::<DeliveryEvent>(body)
            .map(|event| vec![event])
            .map_err(|_| batch_error),
    }
}

/// What `send` writes into the event log after a campaign's last job (headers of a
/// [`SUMMARY_KIND`] message with an empty body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignSummary {
    pub campaign: String,
    /// How many jobs were published (each confirmed by the broker); after a continued send
    /// (see `start_line`), how many the campaign's runs published together.
    pub published: u64,
    /// The relay they were published for.
    pub relay: String,
    /// When publishing started (RFC 3339).
    pub started_at: String,
    /// Set by a `send --start-line L` that continued an interrupted send: the lines before
    /// `L` were published by the earlier run, and `published` is the campaign's total
    /// across both runs (so this summary replaces the earlier ones rather than adding to
    /// them).
    pub start_line: Option<u64>,
    /// Set by a `send` that a stop signal interrupted: every row up to this line of the
    /// file is confirmed and nothing after it was published; `published` counts those jobs
    /// and the campaign is not complete until a `send --start-line <line + 1>` continues it.
    pub confirmed_through_line: Option<u64>,
}

/// Header names of a [`CampaignSummary`].
pub mod summary_headers {
    /// The number of jobs published.
    pub const PUBLISHED: &str = "x-sluice-expected";
    /// When publishing started.
    pub const STARTED_AT: &str = "x-sluice-started-at";
    /// The line a continued send started at (absent on a send from the first row).
    pub const START_LINE: &str = "x-sluice-start-line";
    /// The line through which an interrupted send confirmed every row (absent when the
    /// send ran to its end).
    pub const CONFIRMED_THROUGH_LINE: &str = "x-sluice-confirmed-through-line";
}

impl CampaignSummary {
    /// The summary as message headers.
    pub fn to_headers(&self) -> lapin::types::FieldTable {
        use crate::headers::{set_int, set_str, CAMPAIGN, RELAY};
        let mut table = lapin::types::FieldTable::default();
        set_str(&mut table, CAMPAIGN, &self.campaign);
        set_int(
            &mut table,
            summary_headers::PUBLISHED,
            i64::try_from(self.published).unwrap_or(i64::MAX),
        );
        set_str(&mut table, RELAY, &self.relay);
        set_str(&mut table, summary_headers::STARTED_AT, &self.started_at);
        for (name, line) in [
            (summary_headers::START_LINE, self.start_line),
            (
                summary_headers::CONFIRMED_THROUGH_LINE,
                self.confirmed_through_line,
            ),
        ] {
            if let Some(line) = line {
                set_int(&mut table, name, i64::try_from(line).unwrap_or(i64::MAX));
            }
        }
        table
    }

    /// Read a summary from its message's headers; `None` when it names no campaign.
    pub fn from_headers(headers: Option<&lapin::types::FieldTable>) -> Option<Self> {
        use crate::headers::{get_int, get_str, CAMPAIGN, RELAY};
        Some(Self {
            campaign: get_str(headers, CAMPAIGN)?,
            published: get_int(headers, summary_headers::PUBLISHED)
                .unwrap_or(0)
                .max(0) as u64,
            relay: get_str(headers, RELAY).unwrap_or_default(),
            started_at: get_str(headers, summary_headers::STARTED_AT).unwrap_or_default(),
            start_line: get_int(headers, summary_headers::START_LINE).map(|l| l.max(0) as u64),
            confirmed_through_line: get_int(headers, summary_headers::CONFIRMED_THROUGH_LINE)
                .map(|l| l.max(0) as u64),
        })
    }
}

/// The current UTC time as RFC 3339, as used in events and `x-sluice-*-attempt` headers.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of the current time")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_round_trip() {
        for outcome in [
            EventOutcome::Delivered,
            EventOutcome::Deferred,
            EventOutcome::Bounced,
            EventOutcome::Dead,
            EventOutcome::Cancelled,
        ] {
            let key = routing_key(outcome, "spring-sale");
            assert_eq!(parse_routing_key(&key), Some((outcome, "spring-sale")));
        }
        assert_eq!(parse_routing_key("sluice.events.log"), None);
        assert_eq!(parse_routing_key("delivered"), None);
    }

    #[test]
    fn a_batch_or_a_single_event_parses() {
        let one = r#"{"id":"c-2","campaign":"c","to":"a@example.org","relay":"r",
            "outcome":"delivered","attempt":1,"smtp_code":250,"smtp_reply":"ok",
            "at":"2026-12-04T10:00:00Z"}"#;
        assert_eq!(parse_batch(one.as_bytes()).unwrap().len(), 1);
        let two = format!("[{one},{one}]");
        assert_eq!(parse_batch(two.as_bytes()).unwrap().len(), 2);
        assert!(parse_batch(b"[{\"id\":1}]").is_err());
    }

    #[test]
    fn a_summary_round_trips_through_headers() {
        let summary = CampaignSummary {
            campaign: "c1".into(),
            published: 1_000_000,
            relay: "primary".into(),
            started_at: "2026-12-04T10:00:00Z".into(),
            start_line: None,
            confirmed_through_line: None,
        };
        assert_eq!(
            CampaignSummary::from_headers(Some(&summary.to_headers())),
            Some(summary.clone())
        );
        let resumed = CampaignSummary {
            start_line: Some(5002),
            confirmed_through_line: Some(9000),
            ..summary
        };
        assert_eq!(
            CampaignSummary::from_headers(Some(&resumed.to_headers())),
            Some(resumed)
        );
        assert_eq!(CampaignSummary::from_headers(None), None);
    }
}
