//! AMQP message headers sluice reads and writes, so that their names are spelled once.

use lapin::types::{AMQPValue, FieldTable};

/// Attempt number of the delivery that comes next (1 for a fresh job).
pub const ATTEMPT: &str = "x-sluice-attempt";
/// Why a job is dead: `invalid`, `retries exhausted`, `bounced`...
pub const REASON: &str = "x-sluice-reason";
/// Last SMTP reply code, when there was one.
pub const SMTP_CODE: &str = "x-sluice-smtp-code";
/// Last SMTP reply text (or the connection error), when there was one.
pub const SMTP_REPLY: &str = "x-sluice-smtp-reply";
/// How many delivery attempts were made.
pub const ATTEMPTS: &str = "x-sluice-attempts";
/// When the first attempt was made (RFC 3339).
pub const FIRST_ATTEMPT: &str = "x-sluice-first-attempt";
/// When the last attempt was made (RFC 3339).
pub const LAST_ATTEMPT: &str = "x-sluice-last-attempt";
/// The relay whose queue the job came from.
pub const RELAY: &str = "x-sluice-relay";
/// The job's campaign, set by the producer on every job (and so on its copies), so that
/// even a job whose body cannot be read has its event under its real campaign.
pub const CAMPAIGN: &str = "x-sluice-campaign";
/// The job's class (`high`, `normal`, `low`), set on its retry and dead copies so that a
/// replay publishes it with its class's routing key.
pub const PRIORITY: &str = "x-sluice-priority";
/// When `resume` sent a held job back (Unix milliseconds): a worker that has not yet read
/// the resume does not hold it again.
pub const RESUMED_AT: &str = "x-sluice-resumed-at";

/// Read a header as text, whatever string type the publisher used.
pub fn get_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => integer(other).map(|n| n.to_string()),
    }
}

/// Read a header as an integer, whatever integer (or string) type the publisher used.
pub fn get_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    let value = headers?.inner().get(name)?;
    integer(value).or_else(|| match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    })
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => *n as i64,
        AMQPValue::ShortShortUInt(n) => *n as i64,
        AMQPValue::ShortInt(n) => *n as i64,
        AMQPValue::ShortUInt(n) => *n as i64,
        AMQPValue::LongInt(n) => *n as i64,
        AMQPValue::LongUInt(n) => *n as i64,
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => *n as i64,
        _ => return None,
    })
}

/// Set a text header.
pub fn set_str(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(name.into(), AMQPValue::LongString(value.into()));
}

/// Set an integer header.
pub fn set_int(headers: &mut FieldTable, name: &str, value: i64) {
    headers.insert(name.into(), AMQPValue::LongLongInt(value));
}
