//! What a relay's reply means: for the job (delivered, deferred, bounced) or for the relay
//! (it refuses *us* — the account, the sender, relaying, our address — not the recipient).
//! Pure functions, tested with tables.
//!
//! A relay-wide refusal must never turn a campaign into bounces at full speed: it is a
//! [`Outcome::RelayFault`], so the job goes back untouched and the relay is marked down
//! (its failover relay takes over). Three signs of one:
//! - any 5xx to MAIL FROM, and 530 (authentication required) anywhere;
//! - a 5.7.x policy reply whose text names the account, the sender, relaying, the client
//!   or its IP address, or a blocklist;
//! - the same 5xx at RCPT for [`RefusalStreak`]'s N different recipients in a row (those N
//!   bounce; the relay is down after them). Mailbox-level codes (5.1.x, 5.2.x) never count.

use std::collections::HashSet;
use std::time::Duration;

use crate::settle::Outcome;
use crate::smtp::{SendError, Stage};

/// Map a send result to an outcome.
pub fn classify(result: Result<(u16, String), SendError>) -> Outcome {
    match result {
        Ok((code, reply)) if (200..300).contains(&code) => Outcome::Delivered { code, reply },
        Ok((code, reply)) => classify_refusal(Stage::Content, code, reply),
        Err(SendError::Reply { stage, code, text }) => classify_refusal(stage, code, text),
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
        // Our own decision about this job, not the relay's reply: never a relay fault, and
        // not at RCPT, so it never counts towards a refusal streak.
        Err(SendError::Unsendable { code, text }) => Outcome::Bounced {
            code,
            reply: text,
            at_rcpt: false,
        },
    }
}

fn classify_refusal(stage: Stage, code: u16, reply: String) -> Outcome {
    if refuses_us(stage, code, &reply) {
        return Outcome::RelayFault {
            code: Some(code),
            reply,
        };
    }
    match code {
        500..=599 => Outcome::Bounced {
            code,
            reply,
            at_rcpt: stage == Stage::Rcpt,
        },
        _ => Outcome::Deferred {
            retry_after: retry_hint(&reply),
            code: Some(code),
            reply,
        },
    }
}

/// Words of a 5.7.x policy reply that show the refusal is about us, not the recipient.
const ABOUT_US: [&str; 9] = [
    "account",
    "sender",
    "relay",
    "client",
    "ip",
    "blocklist",
    "blacklist",
    "spamhaus",
    "authenticat",
];

/// True when a negative reply refuses the sender, the account or this client rather than
/// one recipient.
pub fn refuses_us(stage: Stage, code: u16, reply: &str) -> bool {
    if !(500..600).contains(&code) {
        return false;
    }
    if stage == Stage::Mail || code == 530 {
        return true;
    }
    let lower = reply.to_ascii_lowercase();
    let policy = enhanced_status(&lower).is_some_and(|status| status.starts_with("5.7."));
    policy
        && lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| {
                ABOUT_US.iter().any(|about| {
                    if *about == "ip" {
                        word == "ip"
                    } else {
                        word.starts_with(about)
                    }
                })
            })
}

/// The enhanced status code (RFC 3463) a reply text starts with, e.g. `5.7.1`.
fn enhanced_status(reply: &str) -> Option<&str> {
    let first = reply.split_whitespace().next()?;
    let parts: Vec<&str> = first.split('.').collect();
    let numeric = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    numeric.then_some(first)
}

/// Counts identical refusals at RCPT for different recipients in a row; at `limit` the
/// refusal is taken as the relay's, not the recipients'.
#[derive(Debug)]
pub struct RefusalStreak {
    limit: u32,
    key: Option<String>,
    recipients: HashSet<String>,
}

impl RefusalStreak {
    /// A streak that trips at `limit` recipients (0: never).
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            key: None,
            recipients: HashSet::new(),
        }
    }

    /// Record one attempt's outcome for `recipient`; true when this bounce completes a
    /// streak of `limit` identical refusals for different recipients.
    pub fn record(&mut self, outcome: &Outcome, recipient: &str) -> bool {
        let key = match outcome {
            Outcome::Bounced {
                code,
                reply,
                at_rcpt: true,
            } => {
                let status = enhanced_status(reply).unwrap_or("");
                if status.starts_with("5.1.") || status.starts_with("5.2.") {
                    None
                } else {
                    Some(format!("{code} {status}"))
                }
            }
            // Deferrals neither make nor break a streak, nor do jobs never attempted (held,
            // cancelled, expired, not yet due); anything else breaks it.
            Outcome::Deferred { .. }
            | Outcome::Paused
            | Outcome::Cancelled
            | Outcome::Expired
            | Outcome::NotYet { .. } => return false,
            _ => None,
        };
        let Some(key) = key else {
            self.key = None;
            self.recipients.clear();
            return false;
        };
        if self.key.as_deref() != Some(key.as_str()) {
            self.key = Some(key);
            self.recipients.clear();
        }
        self.recipients.insert(recipient.to_ascii_lowercase());
        if self.limit > 0 && self.recipients.len() >= self.limit as usize {
            self.key = None;
            self.recipients.clear();
            return true;
        }
        false
    }
}

/// A wait named in a temporary-failure reply: "try again in 120 seconds", "retry in 2
/// minutes", "in 1 hour". The first number followed by a time unit wins. The reply is the
/// relay's to write: a number too large for a u64, or whose seconds would be, saturates
/// (the ladder's last step), never wraps around to a short wait.
pub fn retry_hint(reply: &str) -> Option<Duration> {
    let lower = reply.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for pair in words.windows(2) {
        if !pair[0].bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // All digits: the only way to fail is to be too large.
        let n = pair[0].parse::<u64>().unwrap_or(u64::MAX);
        let unit = match pair[1] {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            _ => continue,
        };
        return Some(Duration::from_secs(n.saturating_mul(unit)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(stage: Stage, code: u16, text: &str) -> Result<(u16, String), SendError> {
        Err(SendError::Reply {
            stage,
            code,
            text: text.into(),
        })
    }

    fn kind(outcome: &Outcome) -> &'static str {
        match outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Bounced { .. } => "bounced",
            Outcome::Invalid { .. } => "invalid",
            Outcome::RelayFault { .. } => "relay fault",
            Outcome::NotAttempted { .. } => "not attempted",
            Outcome::PushedBack { .. } => "pushed back",
            other => other.error_type().unwrap_or("steered"),
        }
    }

    #[test]
    fn replies_map_to_outcomes() {
        use Stage::*;
        let cases = [
            (Ok((250, "ok".into())), "delivered"),
            (reply(Rcpt, 451, "4.7.1 greylisted"), "deferred"),
            (reply(Mail, 421, "4.7.0 busy"), "deferred"),
            (reply(Rcpt, 550, "5.1.1 no such user"), "bounced"),
            (reply(Content, 554, "5.6.0 rejected"), "bounced"),
            (
                reply(Rcpt, 550, "5.7.1 <a@b.c>: Recipient address rejected: Access denied"),
                "bounced",
            ),
            (reply(Content, 550, "5.7.1 message content rejected"), "bounced"),
            // Refusals of us, not of the recipient.
            (reply(Mail, 554, "5.7.1 Account suspended"), "relay fault"),
            (reply(Mail, 550, "5.1.0 Sender address rejected"), "relay fault"),
            (reply(Mail, 535, "5.7.8 authentication failed"), "relay fault"),
            (reply(Rcpt, 554, "5.7.1 <a@b.c>: Relay access denied"), "relay fault"),
            (reply(Rcpt, 550, "5.7.1 Relaying denied"), "relay fault"),
            (
                reply(
                    Rcpt,
                    554,
                    "5.7.1 Service unavailable; Client host [127.0.0.9] blocked using zen.spamhaus.org",
                ),
                "relay fault",
            ),
            (
                reply(Content, 550, "5.7.606 Access denied, banned sending IP [127.0.0.9]"),
                "relay fault",
            ),
            (reply(Rcpt, 550, "5.7.1 Your account is disabled"), "relay fault"),
            (reply(Data, 530, "5.7.0 Authentication required"), "relay fault"),
            (Err(SendError::Timeout(Duration::from_secs(1))), "deferred"),
            (Err(SendError::Connection("reset".into())), "deferred"),
            (
                Err(SendError::Unsendable {
                    code: 553,
                    text: "5.6.7 <zoë@example.org>: the local part is not ASCII".into(),
                }),
                "bounced",
            ),
        ];
        for (result, expected) in cases {
            let text = format!("{result:?}");
            assert_eq!(kind(&classify(result)), expected, "{text}");
        }
    }

    #[test]
    fn the_same_refusal_for_n_recipients_in_a_row_is_the_relays() {
        let bounce = |text: &str| Outcome::Bounced {
            code: 550,
            reply: text.into(),
            at_rcpt: true,
        };
        let denied = bounce("5.4.1 Recipient address rejected: Access denied");
        let unknown = bounce("5.1.1 no such user");
        let delivered = Outcome::Delivered {
            code: 250,
            reply: "ok".into(),
        };
        let mut streak = RefusalStreak::new(3);
        assert!(!streak.record(&denied, "a@x"));
        assert!(!streak.record(&denied, "a@x"), "the same recipient twice");
        assert!(!streak.record(&denied, "b@x"));
        assert!(streak.record(&denied, "c@x"), "three recipients in a row");
        // A success breaks a streak; mailbox codes never make one.
        assert!(!streak.record(&denied, "d@x"));
        assert!(!streak.record(&denied, "e@x"));
        assert!(!streak.record(&delivered, "f@x"));
        assert!(!streak.record(&denied, "g@x"));
        for who in ["h@x", "i@x", "j@x", "k@x"] {
            assert!(!streak.record(&unknown, who));
        }
        let mut off = RefusalStreak::new(0);
        for who in ["a@x", "b@x", "c@x", "d@x"] {
            assert!(!off.record(&denied, who));
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
            // Absurd waits saturate: the ladder's last step, never a short one.
            ("try again in 18446744073709551615 hours", Some(u64::MAX)),
            // 2^64 / 3600 + 1 hours: the seconds wrap a u64 to a small number.
            ("try again in 5124095576030432 hours", Some(u64::MAX)),
            (
                "retry in 99999999999999999999999999 seconds",
                Some(u64::MAX),
            ),
            ("try again in 18446744073709551615 s", Some(u64::MAX)),
        ];
        for (reply, secs) in cases {
            assert_eq!(retry_hint(reply), secs.map(Duration::from_secs), "{reply}");
        }
    }
}
