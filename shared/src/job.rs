//! The job wire format: one JSON message per recipient, and the checks every job must pass.
//!
//! Services other than the producer publish these directly, so the format is a contract
//! (`shared/job.schema.json` describes it). Parsing is strict: an unknown field is an error,
//! never silently ignored, and a header value with CR or LF is rejected, never cleaned up.

use std::collections::BTreeMap;
use std::str::FromStr;

use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};

use crate::priority::Priority;

/// One email to one recipient, as it travels through RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Unique id; also the AMQP `message_id` and the root of the email's Message-ID.
    pub id: String,
    /// Campaign the job belongs to (events use `default` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// The From header: `addr@example.com` or `Name <addr@example.com>`.
    pub from: String,
    /// Envelope sender (bounce address); `from`'s address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    /// The recipient: `addr@example.com` or `Name <addr@example.com>`.
    pub to: String,
    /// Subject, already rendered.
    pub subject: String,
    /// Plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Extra headers such as `List-Unsubscribe`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The job's class; when given it must agree with the routing key the job was
    /// published with (`<relay>`, `<relay>.high`, `<relay>.low`), else the job is invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Not sent before this moment (RFC 3339): until then the job waits in its relay's
    /// retry queues without spending an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Not sent after this moment (RFC 3339): a job still unsent then ends in its relay's
    /// dead queue, reason `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

/// Why a job cannot be sent; it is set aside (dead, reason `invalid`), never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    #[error("job is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("job is not valid UTF-8")]
    NotUtf8,
    #[error("job is not valid JSON for the job schema: {0}")]
    Malformed(String),
    #[error("field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("header {name:?}: {problem}")]
    Header { name: String, problem: String },
}

/// Headers sluice writes itself; a job may not set them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
];

/// Longest job id, so that Message-IDs stay within line limits.
const MAX_ID_LEN: usize = 200;

impl Job {
    /// Parse and validate a job body as received from the broker.
    pub fn from_bytes(body: &[u8], max_bytes: usize) -> Result<Job, InvalidJob> {
        if body.len() > max_bytes {
            return Err(InvalidJob::TooLarge {
                size: body.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(body).map_err(|_| InvalidJob::NotUtf8)?;
        let job: Job =
            serde_json::from_str(text).map_err(|e| InvalidJob::Malformed(e.to_string()))?;
        job.validate()?;
        Ok(job)
    }

    /// The JSON body to publish.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job always serializes")
    }

    /// Every check a job must pass before it is sent.
    pub fn validate(&self) -> Result<(), InvalidJob> {
        let field = |field: &'static str, problem: &str| InvalidJob::Field {
            field,
            problem: problem.to_string(),
        };
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
            return Err(field("id", "must be 1 to 200 characters"));
        }
        if !self
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(field(
                "id",
                "may contain only ASCII letters, digits, '-', '_' and '.'",
            ));
        }
        if let Some(campaign) = &self.campaign {
            if !is_campaign_name(campaign) {
                return Err(field(
                    "campaign",
                    "must be 1 to 200 ASCII letters, digits, '-' or '_'",
                ));
            }
        }
        self.from_mailbox()?;
        self.to_mailbox()?;
        self.envelope_sender()?;
        if has_line_break(&self.subject) {
            return Err(field("subject", "contains CR or LF"));
        }
        if self.text.is_none() && self.html.is_none() {
            return Err(field("text", "a job needs text and/or html"));
        }
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        for (name, value) in [
            ("not_before", &self.not_before),
            ("not_after", &self.not_after),
        ] {
            if let Some(value) = value {
                parse_moment(value).map_err(|problem| field(name, &problem))?;
            }
        }
        Ok(())
    }

    /// When the job may be sent at the earliest (`not_before`), in Unix milliseconds.
    pub fn not_before_ms(&self) -> Option<u64> {
        self.not_before
            .as_deref()
            .and_then(|v| parse_moment(v).ok())
    }

    /// When the job must be sent at the latest (`not_after`), in Unix milliseconds.
    pub fn not_after_ms(&self) -> Option<u64> {
        self.not_after.as_deref().and_then(|v| parse_moment(v).ok())
    }

    /// The From mailbox.
    pub fn from_mailbox(&self) -> Result<Mailbox, InvalidJob> {
        parse_mailbox("from", &self.from)
    }

    /// The To mailbox.
    pub fn to_mailbox(&self) -> Result<Mailbox, InvalidJob> {
        parse_mailbox("to", &self.to)
    }

    /// The envelope sender: `return_path` when given, else the From address.
    pub fn envelope_sender(&self) -> Result<lettre::Address, InvalidJob> {
        match &self.return_path {
            Some(rp) => Ok(parse_mailbox("return_path", rp)?.email),
            None => Ok(self.from_mailbox()?.email),
        }
    }

    /// Whether the job may travel in `class`'s queue: its `priority`, when given, must be
    /// that class.
    pub fn check_class(&self, class: Priority) -> Result<(), InvalidJob> {
        match self.priority {
            Some(priority) if priority != class => Err(InvalidJob::Field {
                field: "priority",
                problem: format!(
                    "is {priority} but the job was published with the {class} routing key"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The campaign name used in event routing keys.
    pub fn campaign_or_default(&self) -> &str {
        self.campaign
            .as_deref()
            .unwrap_or(crate::events::DEFAULT_CAMPAIGN)
    }
}

/// An RFC 3339 moment as Unix milliseconds (before 1970 counts as 0).
pub fn parse_moment(value: &str) -> Result<u64, String> {
    let at = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{value:?} is not an RFC 3339 time such as 2026-12-24T18:00:00Z ({e})")
        })?;
    Ok(u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
}

fn parse_mailbox(field: &'static str, value: &str) -> Result<Mailbox, InvalidJob> {
    if has_line_break(value) {
        return Err(InvalidJob::Field {
            field,
            problem: "contains CR or LF".into(),
        });
    }
    Mailbox::from_str(value.trim()).map_err(|e| InvalidJob::Field {
        field,
        problem: format!("{value:?} is not a valid address ({e})"),
    })
}

/// True when a value would break out of its header line.
pub fn has_line_break(value: &str) -> bool {
    value.contains(['\r', '\n'])
}

/// Whether `name` is a valid campaign: 1 to 200 ASCII letters, digits, '-' or '_' (it is
/// the last word of event routing keys, so it holds no '.', '*' or '#').
pub fn is_campaign_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// A header a job (or a campaign template) may set: a valid field name, not one sluice
/// writes itself, and a value on one line.
pub fn check_header(name: &str, value: &str) -> Result<(), InvalidJob> {
    let problem = |p: &str| InvalidJob::Header {
        name: name.to_string(),
        problem: p.to_string(),
    };
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(problem("is not a valid header name"));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(problem("is set by sluice and cannot be overridden"));
    }
    if has_line_break(value) {
        return Err(problem("value contains CR or LF"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> serde_json::Value {
        serde_json::json!({
            "id": "job-1", "campaign": "spring", "from": "News <news@example.com>",
            "to": "ann@example.org", "subject": "Hello", "text": "Hi",
            "headers": {"List-Unsubscribe": "<mailto:u@example.com>"}
        })
    }

    fn parse(value: &serde_json::Value) -> Result<Job, InvalidJob> {
        Job::from_bytes(value.to_string().as_bytes(), 1 << 20)
    }

    #[test]
    fn accepts_a_good_job_and_round_trips() {
        let job = parse(&good()).unwrap();
        assert_eq!(job.to, "ann@example.org");
        assert_eq!(Job::from_bytes(&job.to_bytes(), 1 << 20).unwrap(), job);
    }

    #[test]
    fn rejects_what_must_never_be_sent() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("to", serde_json::json!("not-an-address")),
            (
                "subject",
                serde_json::json!("Hi\r\nBcc: victim@example.com"),
            ),
            ("headers", serde_json::json!({"X-A": "a\nb"})),
            ("headers", serde_json::json!({"Bcc": "x@example.com"})),
            ("headers", serde_json::json!({"Bad Name": "x"})),
            ("id", serde_json::json!("has space")),
            ("unknown", serde_json::json!(1)),
            ("priority", serde_json::json!("urgent")),
        ];
        for (key, value) in cases {
            let mut job = good();
            job[key] = value.clone();
            assert!(parse(&job).is_err(), "{key} = {value} was accepted");
        }
        let mut no_body = good();
        no_body.as_object_mut().unwrap().remove("text");
        assert!(parse(&no_body).is_err());
        let mut no_to = good();
        no_to.as_object_mut().unwrap().remove("to");
        assert!(matches!(parse(&no_to), Err(InvalidJob::Malformed(_))));
        let mut high = good();
        high["priority"] = serde_json::json!("high");
        let high = parse(&high).unwrap();
        assert!(high.check_class(Priority::High).is_ok());
        assert!(high.check_class(Priority::Normal).is_err());
        assert!(parse(&good()).unwrap().check_class(Priority::Low).is_ok());
        assert_eq!(Job::from_bytes(b"\xff\xfe", 100), Err(InvalidJob::NotUtf8));
        assert!(matches!(
            Job::from_bytes(&[b' '; 101], 100),
            Err(InvalidJob::TooLarge { .. })
        ));
    }
}
