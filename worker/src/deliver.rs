//! One delivery attempt: a job becomes a MIME message, goes to the relay, and the reply
//! becomes an [`Outcome`]. The classification is a pure function, tested with a table.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{MultiPart, SinglePart};
use lettre::Message;
use sluice_shared::job::{InvalidJob, Job};

use crate::smtp::{SendError, SmtpSession};

/// How one attempt ended. Exactly one broker action follows from each (see `outcome.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx after DATA: the relay took responsibility for the message.
    Delivered { code: u16, reply: String },
    /// 4xx, a dropped connection or a timeout: try again later.
    Deferred {
        code: Option<u16>,
        reply: String,
        /// A wait the relay asked for in its reply ("try again in 120 seconds").
        retry_after: Option<Duration>,
    },
    /// 5xx: permanent, never retried.
    Bounced { code: u16, reply: String },
    /// The job itself is unusable: set aside, never retried.
    Invalid { reason: String },
}

impl Outcome {
    /// The SMTP code, when the relay answered.
    pub fn smtp_code(&self) -> Option<u16> {
        match self {
            Self::Delivered { code, .. } | Self::Bounced { code, .. } => Some(*code),
            Self::Deferred { code, .. } => *code,
            Self::Invalid { .. } => None,
        }
    }

    /// The reply text (or the error, or why the job is invalid).
    pub fn reply(&self) -> &str {
        match self {
            Self::Delivered { reply, .. }
            | Self::Bounced { reply, .. }
            | Self::Deferred { reply, .. } => reply,
            Self::Invalid { reason } => reason,
        }
    }
}

/// A job turned into what SMTP needs: the envelope and the formatted message, built once.
pub struct PreparedMessage {
    pub envelope: Envelope,
    pub bytes: Vec<u8>,
}

/// The Message-ID of a job: derived from the job id alone, so a redelivered job is
/// recognisably the same message at the recipient.
pub fn message_id(job: &Job) -> String {
    let domain = job
        .from_mailbox()
        .map(|m| m.email.domain().to_string())
        .unwrap_or_else(|_| "sluice.invalid".into());
    format!("<{}@{}>", job.id, domain)
}

/// Build the MIME message for a validated job.
pub fn prepare(job: &Job) -> Result<PreparedMessage, InvalidJob> {
    let from = job.from_mailbox()?;
    let to = job.to_mailbox()?;
    let sender = job.envelope_sender()?;
    let mut builder = Message::builder()
        .from(from)
        .to(to.clone())
        .subject(job.subject.clone())
        .message_id(Some(message_id(job)))
        .date_now();
    for (name, value) in &job.headers {
        let name = HeaderName::new_from_ascii(name.clone()).map_err(|_| InvalidJob::Header {
            name: name.clone(),
            problem: "is not a valid header name".into(),
        })?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    let envelope = Envelope::new(Some(sender), vec![to.email]).map_err(|e| InvalidJob::Field {
        field: "to",
        problem: e.to_string(),
    })?;
    let built = match (&job.text, &job.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.clone())),
        (None, None) => {
            return Err(InvalidJob::Field {
                field: "text",
                problem: "a job needs text and/or html".into(),
            })
        }
    };
    let message = built.map_err(|e| InvalidJob::Malformed(e.to_string()))?;
    Ok(PreparedMessage {
        envelope,
        bytes: message.formatted(),
    })
}

/// Send a prepared message through an open session and classify the result.
pub async fn attempt(session: &mut SmtpSession, message: &PreparedMessage) -> Outcome {
    classify(
        session
            .send(&message.envelope, &message.bytes)
            .await
            .map(|r| {
                let code = r.code().to_string().parse().unwrap_or(250);
                (code, r.message().collect::<Vec<_>>().join(" "))
            }),
    )
}

/// Replies to a transaction that blame the session rather than the message: 530
/// (authentication required) means our settings for the relay are wrong, so the relay is
/// treated as down instead of bouncing every job.
pub fn relay_fault(relay: &str, outcome: &Outcome) -> Option<crate::smtp::OpenError> {
    match outcome {
        Outcome::Bounced { code: 530, reply } => Some(crate::smtp::OpenError::AuthRejected {
            relay: relay.to_string(),
            reason: format!("530 {reply}"),
        }),
        _ => None,
    }
}

/// Map a send result to an outcome: 2xx delivered, 4xx / connection / timeout deferred,
/// 5xx bounced.
pub fn classify(result: Result<(u16, String), SendError>) -> Outcome {
    match result {
        Ok((code, reply)) if (200..300).contains(&code) => Outcome::Delivered { code, reply },
        Ok((code, reply)) | Err(SendError::Reply { code, text: reply }) => match code {
            500..=599 => Outcome::Bounced { code, reply },
            _ => Outcome::Deferred {
                retry_after: retry_hint(&reply),
                code: Some(code),
                reply,
            },
        },
        Err(SendError::Timeout(after)) => Outcome::Deferred {
            code: None,
            reply: format!("no reply within {after:?}"),
            retry_after: None,
        },
        Err(SendError::Connection(reason)) => Outcome::Deferred {
            code: None,
            reply: reason,
            retry_after: None,
        },
    }
}

/// A wait named in a temporary-failure reply: "try again in 120 seconds", "retry in 2
/// minutes", "in 1 hour". The first number followed by a time unit wins.
pub fn retry_hint(reply: &str) -> Option<Duration> {
    let lower = reply.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for pair in words.windows(2) {
        let Ok(n) = pair[0].parse::<u64>() else {
            continue;
        };
        let unit = match pair[1] {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            _ => continue,
        };
        return Some(Duration::from_secs(n * unit));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_map_to_outcomes() {
        let cases = [
            (Ok((250, "ok".into())), "delivered"),
            (
                Err(SendError::Reply {
                    code: 451,
                    text: "greylisted".into(),
                }),
                "deferred",
            ),
            (
                Err(SendError::Reply {
                    code: 421,
                    text: "busy".into(),
                }),
                "deferred",
            ),
            (
                Err(SendError::Reply {
                    code: 550,
                    text: "no such user".into(),
                }),
                "bounced",
            ),
            (
                Err(SendError::Reply {
                    code: 554,
                    text: "rejected".into(),
                }),
                "bounced",
            ),
            (Err(SendError::Timeout(Duration::from_secs(1))), "deferred"),
            (Err(SendError::Connection("reset".into())), "deferred"),
        ];
        for (result, expected) in cases {
            let got = match classify(result) {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Deferred { .. } => "deferred",
                Outcome::Bounced { .. } => "bounced",
                Outcome::Invalid { .. } => "invalid",
            };
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn waits_named_in_replies_are_understood() {
        let cases = [
            ("4.7.1 try again in 120 seconds", Some(120)),
            ("Greylisted, retry in 2 minutes", Some(120)),
            ("please wait 1 hour", Some(3600)),
            ("4.2.0 mailbox busy", None),
            ("451 4.7.1 come back later", None),
        ];
        for (reply, secs) in cases {
            assert_eq!(retry_hint(reply), secs.map(Duration::from_secs), "{reply}");
        }
    }

    #[test]
    fn message_id_is_derived_from_the_job_id() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "c1-2", "from": "News <news@example.com>", "to": "a@example.org",
            "subject": "Hi", "text": "Hello"
        }))
        .unwrap();
        assert_eq!(message_id(&job), "<c1-2@example.com>");
        let prepared = prepare(&job).unwrap();
        let text = String::from_utf8(prepared.bytes).unwrap();
        assert!(text.contains("Message-ID: <c1-2@example.com>"), "{text}");
    }
}
