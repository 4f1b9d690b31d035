//! One delivery attempt: a job becomes a MIME message, goes to the relay, and the reply
//! becomes an [`Outcome`] (see [`crate::classify`]).

use lettre::address::Envelope;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{MultiPart, SinglePart};
use lettre::Message;
use sluice_shared::job::{InvalidJob, Job};

use crate::classify::classify;
use crate::line_endings::to_crlf_in_place;
use crate::settle::Outcome;
use crate::smtp::SmtpSession;

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

/// Build the MIME message for a validated job. The job's text and html are moved into the
/// message, not copied (a big job's body is the worker's biggest allocation), after their
/// line endings are made CRLF in one linear pass (see [`crate::line_endings`]); the job
/// keeps its other fields for the events.
pub fn prepare(job: &mut Job) -> Result<PreparedMessage, InvalidJob> {
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
    let mut text = job.text.take();
    let mut html = job.html.take();
    for body in [&mut text, &mut html].into_iter().flatten() {
        to_crlf_in_place(body);
    }
    let built = match (text, html) {
        (Some(text), Some(html)) => {
            builder.multipart(MultiPart::alternative_plain_html(text, html))
        }
        (Some(text), None) => builder.singlepart(SinglePart::plain(text)),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_derived_from_the_job_id() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": "c1-2", "from": "News <news@example.com>", "to": "a@example.org",
            "subject": "Hi", "text": "Hello"
        }))
        .unwrap();
        assert_eq!(message_id(&job), "<c1-2@example.com>");
        let prepared = prepare(&mut job).unwrap();
        let text = String::from_utf8(prepared.bytes).unwrap();
        assert!(text.contains("Message-ID: <c1-2@example.com>"), "{text}");
    }

    /// An 8 MiB text of `"a\n"`: four million bare LFs. Prepared in linear time it takes a
    /// second or two, even unoptimised; inserting one CR at a time (what lettre's
    /// `Body::new` does with raw text) shifts the rest of the text once per line, about
    /// 4M x 4 MiB = 10^13 bytes moved, tens of minutes. The bound, 60 s, is some thirty
    /// times either side; the work runs on a thread of its own so the test can give up on it.
    #[test]
    fn a_body_of_four_million_bare_line_feeds_is_prepared_in_linear_time() {
        const BOUND: std::time::Duration = std::time::Duration::from_secs(60);
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": "lf-1", "from": "news@example.com", "to": "a@example.org",
            "subject": "Hi", "text": "a\n".repeat(4 * 1024 * 1024)
        }))
        .unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(prepare(&mut job).map(|prepared| prepared.bytes));
        });
        let bytes = finished
            .recv_timeout(BOUND)
            .unwrap_or_else(|_| panic!("preparing the job took more than {BOUND:?}"))
            .unwrap();
        let lines = bytes.windows(3).filter(|w| w == b"a\r\n").count();
        assert_eq!(lines, 4 * 1024 * 1024, "every line is there, ending CRLF");
        let bare = crate::line_endings::crlf_line_endings(&bytes);
        assert!(
            matches!(bare, std::borrow::Cow::Borrowed(_)),
            "no bare CR or LF left"
        );
    }
}
