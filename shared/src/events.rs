//! Delivery events: what other services (and `sluice-producer watch`) learn about each job.
//!
//! Published to the topic exchange `<namespace>.events` with routing key
//! `<outcome>.<campaign>`; the body is [`DeliveryEvent`] as JSON.

use serde::{Deserialize, Serialize};

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
    /// Invalid, or deferred on every retry step (final); the job is in the dead queue.
    Dead,
}

impl EventOutcome {
    /// The word used in routing keys and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Dead => "dead",
        }
    }

    /// True for the outcomes that end a job.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Deferred)
    }
}

/// The JSON body of an event.
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

impl DeliveryEvent {
    /// The routing key `<outcome>.<campaign>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.outcome.as_str(), self.campaign)
    }
}

/// The current UTC time as RFC 3339, as used in events and `x-sluice-*-attempt` headers.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of the current time")
}
