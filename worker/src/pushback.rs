//! When the relay pushes back: which replies mean "slower", "fewer sessions", "not now" or
//! "this session is finished", and the arithmetic of the rate (a cut, then a cubic climb).
//! Pure functions, tested with tables; [`crate::limits`] holds the state and
//! [`crate::control`] shares it.
//!
//! A relay's own rules (`[[relays.NAME.rules]]`) are tried first, then the built-ins
//! ([`BUILTINS`]) unless `rules_builtin = false`. A rule reads "code enhanced-code text"
//! (e.g. `454 4.7.0 Throttling failure: Maximum sending rate exceeded`). The built-ins
//! read only 4xx replies: a 5xx is about the job unless a rule of the relay says otherwise.

use std::time::Duration;

use anyhow::Context;
use regex_automata::meta::Regex;
use regex_automata::util::syntax;
use sluice_shared::config::{RelaySettings, RuleAction};

/// When the reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// At the greeting or EHLO: no job is involved.
    Opening,
    /// At MAIL, RCPT, DATA or after the content.
    Transaction,
}

/// What a reply makes the fleet do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Too fast: the fleet's rate for the relay is cut (see [`cut`] and [`recovered`]); the
    /// cut holds `hold` before it climbs. The job goes back untouched.
    Throttle { hold: Duration },
    /// Too many sessions: one fewer, fleet-wide. The job goes back untouched.
    TooManyConnections,
    /// Not now: the relay is down fleet-wide for `hold` (`None`: its `down_cooloff`), its
    /// failover takes over. The job goes back untouched.
    Suspend { hold: Option<Duration> },
    /// The relay ends the session (`421 ... too many errors`): a fault of the session, not
    /// of the job, which goes back untouched.
    SessionFault,
    /// An ordinary deferral of the job (a rule's `defer`).
    Defer,
    /// A permanent refusal of the job (a rule's `bounce`).
    Bounce,
}

impl Pushback {
    /// The `reason` label of `sluice_relay_throttled_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Throttle { .. } => "rate",
            Self::TooManyConnections => "connections",
            Self::Suspend { .. } => "suspended",
            Self::SessionFault => "session_fault",
            Self::Defer => "defer",
            Self::Bounce => "bounce",
        }
    }
}

/// One built-in rule: a pattern over the lower-cased 4xx reply, what it means at the
/// greeting and inside a transaction, and the provider reply it came from.
pub struct Builtin {
    pub pattern: &'static str,
    pub opening: Pushback,
    pub transaction: Pushback,
    pub from: &'static str,
}

const THROTTLE: Pushback = Pushback::Throttle {
    hold: Duration::ZERO,
};
const DOWN: Pushback = Pushback::Suspend { hold: None };

/// The built-in rules, first match wins. A reply that names greylisting is never one of
/// them: greylisting is about one recipient, and its retry ladder handles it.
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        pattern: r"too many errors",
        opening: Pushback::SessionFault,
        transaction: Pushback::SessionFault,
        from: "Postfix smtpd_hard_error_limit: `421 4.7.0 mx.example.com Error: too many errors`",
    },
    Builtin {
        pattern: r"too many (concurrent )?(smtp )?connections",
        opening: Pushback::TooManyConnections,
        transaction: Pushback::TooManyConnections,
        from: "Postfix smtpd_client_connection_count_limit: `421 4.7.0 mx.example.com Error: too many connections from 10.0.0.5`; many relays: `421 4.7.0 Too many concurrent SMTP connections`",
    },
    Builtin {
        pattern: r"throttl",
        opening: THROTTLE,
        transaction: THROTTLE,
        from: "Amazon SES: `454 Throttling failure: Maximum sending rate exceeded`",
    },
    Builtin {
        pattern: r"rate limit|rate exceeded|unusual rate",
        opening: THROTTLE,
        transaction: THROTTLE,
        from: "Gmail: `421 4.7.28 ... unusual rate of unsolicited mail`; `421 4.7.0 Rate limit exceeded`",
    },
    Builtin {
        pattern: r"too much mail from|too many recipients from",
        opening: THROTTLE,
        transaction: THROTTLE,
        from: "Postfix smtpd_client_message_rate_limit / smtpd_client_recipient_rate_limit: `450 4.7.1 Error: too much mail from 10.0.0.5`, `450 4.7.1 Error: too many recipients from 10.0.0.5`",
    },
    Builtin {
        pattern: r"server busy|insufficient system resources",
        opening: DOWN,
        transaction: THROTTLE,
        from: "Microsoft 365: `421 4.7.500 Server busy. Please try again later`; many relays: `452 4.3.1 Insufficient system resources`",
    },
    Builtin {
        pattern: r"try again later",
        opening: DOWN,
        transaction: THROTTLE,
        from: "Gmail: `421 4.7.0 Try again later, closing connection`",
    },
];

/// One relay's reply rules, compiled.
pub struct ReplyRules {
    own: Vec<(Regex, Pushback)>,
    builtin: Option<Vec<(Regex, &'static Builtin)>>,
}

fn compile(pattern: &str) -> Result<Regex, Box<regex_automata::meta::BuildError>> {
    Regex::builder()
        .syntax(syntax::Config::new().case_insensitive(true))
        .build(pattern)
        .map_err(Box::new)
}

impl ReplyRules {
    /// Compile `relay`'s rules; a pattern that is not a regular expression is an error
    /// naming the relay and the pattern.
    pub fn new(relay: &str, settings: &RelaySettings) -> anyhow::Result<Self> {
        let mut own = Vec::new();
        for rule in &settings.rules {
            let regex = compile(&rule.pattern).with_context(|| {
                format!(
                    "relays.{relay}.rules: match = {:?} is not a valid regular expression",
                    rule.pattern
                )
            })?;
            let action = match rule.action {
                RuleAction::Throttle => Pushback::Throttle {
                    hold: rule.hold.unwrap_or_default(),
                },
                RuleAction::LimitConnections => Pushback::TooManyConnections,
                RuleAction::Suspend => Pushback::Suspend { hold: rule.hold },
                RuleAction::Defer => Pushback::Defer,
                RuleAction::Bounce => Pushback::Bounce,
            };
            own.push((regex, action));
        }
        let builtin = settings.rules_builtin.then(|| {
            BUILTINS
                .iter()
                .map(|b| (compile(b.pattern).expect("built-in rules compile"), b))
                .collect()
        });
        Ok(Self { own, builtin })
    }

    /// What a negative reply (`code`, `text`) at `moment` makes the fleet do, if anything
    /// beyond the job's own outcome.
    pub fn classify(&self, moment: Moment, code: u16, text: &str) -> Option<Pushback> {
        if code < 400 {
            return None;
        }
        let line = format!("{code} {text}");
        if let Some((_, action)) = self.own.iter().find(|(regex, _)| regex.is_match(&line)) {
            return Some(*action);
        }
        let builtin = self.builtin.as_ref()?;
        if code >= 500 || line.to_ascii_lowercase().contains("greylist") {
            return None;
        }
        let (_, rule) = builtin.iter().find(|(regex, _)| regex.is_match(&line))?;
        Some(match moment {
            Moment::Opening => rule.opening,
            Moment::Transaction => rule.transaction,
        })
    }
}

/// The multiplicative decrease: a throttled rate becomes this fraction of itself. Gentler
/// than TCP's half, which would average about 0.75 R against a relay allowing R per second.
pub const CUT: f64 = 0.85;

/// A cut that follows the previous one within [`CUT_AGAIN_WITHIN`] goes this deep: the last
/// one was not enough (a fleet configured for 400/s meets a relay that allows 25/s), so
/// the fleet comes down in seconds, not in tens of seconds of refusals.
pub const DEEP_CUT: f64 = 0.7;

/// See [`DEEP_CUT`].
pub const CUT_AGAIN_WITHIN: Duration = Duration::from_millis(1500);

/// Two cuts are at least this far apart: the replies to what was sent before a cut took
/// effect must not cut again.
pub const CUT_SPACING: Duration = Duration::from_millis(500);

/// The lowest rate a cut leaves, in messages per second.
pub const FLOOR: f64 = 1.0;

/// After a cut the rate levels off at this fraction of the rate the relay refused: just
/// under it, where a relay that counts in whole seconds (Postfix's anvil) refuses nothing.
pub const PLATEAU: f64 = 0.95;

/// How long after a cut (and its hold) the rate reaches its plateau.
pub const TO_PLATEAU: Duration = Duration::from_secs(4);

/// The rate after a cut from `rate`; `again` when the previous cut was within
/// [`CUT_AGAIN_WITHIN`].
pub fn cut(rate: f64, again: bool) -> f64 {
    (rate * if again { DEEP_CUT } else { CUT }).max(FLOOR)
}

/// The rate `elapsed` after a cut to `cut_to` held for `hold`, up to `max_per_second`: a
/// cubic in time, as TCP CUBIC grows its window. It climbs quickly from the cut, levels off
/// at [`PLATEAU`] of the rate the relay refused (`cut_to / CUT`), reached after
/// [`TO_PLATEAU`] and held within 2% for four seconds, then climbs faster and faster, so
/// a relay that now allows more is found quickly. From 0.85 R: 0.95 R after 4 s, 1.05 R
/// after 8 s, 1.75 R after 12 s. Only the cut's result travels on the control stream, so the
/// refused rate is taken as `cut_to / CUT`; after a [`DEEP_CUT`] the plateau is lower (about
/// 0.78 of the refused rate), which is where a descent wants to pause anyway. (A straight
/// additive increase back at R in 2 s presses the relay every cycle; one slow enough to
/// spare it takes minutes to find a raised limit.)
pub fn recovered(cut_to: f64, elapsed: Duration, hold: Duration, max_per_second: u32) -> f64 {
    let plateau = cut_to / CUT * PLATEAU;
    let k = TO_PLATEAU.as_secs_f64();
    let x = (elapsed.saturating_sub(hold).as_secs_f64() - k) / k;
    (plateau + (plateau - cut_to) * x.powi(3)).min(f64::from(max_per_second))
}

/// The fleet tries one more session at most this often after a too-many-connections reply.
pub const SESSION_PROBE: Duration = Duration::from_secs(10);

/// Two session-limit cuts are at least this far apart: the sessions refused together were
/// all opened under the old limit.
pub const SESSION_CUT_SPACING: Duration = Duration::from_secs(1);

/// The session limit `elapsed` after it was cut to `cut_to`: one more every
/// [`SESSION_PROBE`], up to `max_connections`.
pub fn sessions_recovered(cut_to: u32, elapsed: Duration, max_connections: u32) -> u32 {
    let more = (elapsed.as_secs_f64() / SESSION_PROBE.as_secs_f64()).floor() as u32;
    cut_to.saturating_add(more).min(max_connections).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_shared::config::ReplyRule;

    fn rules(own: &[(&str, RuleAction, Option<u64>)], builtin: bool) -> ReplyRules {
        let settings = RelaySettings {
            rules: own
                .iter()
                .map(|(pattern, action, hold)| ReplyRule {
                    pattern: pattern.to_string(),
                    action: *action,
                    hold: hold.map(Duration::from_secs),
                })
                .collect(),
            rules_builtin: builtin,
            ..RelaySettings::default()
        };
        ReplyRules::new("primary", &settings).expect("rules compile")
    }

    #[test]
    fn every_quoted_provider_reply_is_recognised() {
        use Moment::*;
        let rules = rules(&[], true);
        let conn = Some(Pushback::TooManyConnections);
        let cases = [
            (Transaction, 454, "Throttling failure: Maximum sending rate exceeded", Some(THROTTLE)),
            (Opening, 421, "4.7.500 Server busy. Please try again later", Some(DOWN)),
            (Transaction, 421, "4.7.500 Server busy. Please try again later", Some(THROTTLE)),
            (Opening, 421, "4.7.0 Try again later, closing connection", Some(DOWN)),
            (Transaction, 421, "4.7.0 Try again later, closing connection", Some(THROTTLE)),
            (Transaction, 421, "4.7.28 [10.0.0.5] Our system has detected an unusual rate of unsolicited mail originating from your IP address.", Some(THROTTLE)),
            (Transaction, 450, "4.7.1 Error: too much mail from 10.0.0.5", Some(THROTTLE)),
            (Transaction, 450, "4.7.1 Error: too many recipients from 192.0.2.77", Some(THROTTLE)),
            (Opening, 421, "4.7.0 mx.example.com Error: too many connections from 10.0.0.5", conn),
            (Opening, 421, "4.7.0 smtp.other.org Error: too many connections from 127.0.0.1", conn),
            (Opening, 421, "4.7.0 Too many concurrent SMTP connections", conn),
            (Transaction, 452, "4.3.1 Insufficient system resources", Some(THROTTLE)),
            (Opening, 452, "4.3.1 Insufficient system resources", Some(DOWN)),
            (Transaction, 421, "4.7.0 mx.example.com Error: too many errors", Some(Pushback::SessionFault)),
            // Not the relay's load: the job's own outcome stands.
            (Transaction, 451, "4.7.1 greylisted, try again later", None),
            (Transaction, 450, "4.2.0 mailbox busy", None),
            (Transaction, 421, "4.7.0 busy", None),
            (Transaction, 550, "5.7.1 rate limit exceeded", None),
            (Transaction, 550, "5.1.1 no such user", None),
        ];
        for (moment, code, text, expected) in cases {
            assert_eq!(
                rules.classify(moment, code, text),
                expected,
                "{moment:?} {code} {text}"
            );
        }
    }

    #[test]
    fn a_relays_own_rules_come_first_and_the_built_ins_can_be_turned_off() {
        let own = [
            (r"5\.7\.1 .*daily quota", RuleAction::Suspend, Some(3600)),
            (r"throttling", RuleAction::Defer, None),
        ];
        let with = rules(&own, true);
        assert_eq!(
            with.classify(Moment::Transaction, 550, "5.7.1 Daily quota exceeded"),
            Some(Pushback::Suspend {
                hold: Some(Duration::from_secs(3600))
            })
        );
        assert_eq!(
            with.classify(Moment::Transaction, 454, "Throttling failure"),
            Some(Pushback::Defer)
        );
        let without = rules(&[], false);
        assert_eq!(
            without.classify(
                Moment::Transaction,
                454,
                "Throttling failure: Maximum sending rate exceeded"
            ),
            None
        );
        let bad = RelaySettings {
            rules: vec![ReplyRule {
                pattern: "(".into(),
                action: RuleAction::Bounce,
                hold: None,
            }],
            ..RelaySettings::default()
        };
        let error = ReplyRules::new("primary", &bad)
            .err()
            .expect("a bad pattern");
        assert!(
            format!("{error:#}").contains("relays.primary.rules"),
            "{error:#}"
        );
    }

    /// The fleet against a relay that accepts at most `allowed` per second: one step a
    /// second, a cut whenever the rate tried is above what the relay allows.
    fn settle(allowed: f64, max: u32, seconds: usize) -> Vec<f64> {
        let (mut base, mut since) = (f64::from(max), 0usize);
        let mut accepted = Vec::new();
        for t in 0..seconds {
            let rate = if since == 0 && base == f64::from(max) {
                base
            } else {
                recovered(
                    base,
                    Duration::from_secs((t - since) as u64),
                    Duration::ZERO,
                    max,
                )
            };
            if rate > allowed {
                // Two cuts a second at most (CUT_SPACING).
                base = cut(cut(rate, false), true);
                since = t;
                accepted.push(allowed);
            } else {
                accepted.push(rate);
            }
        }
        accepted
    }

    #[test]
    fn aimd_settles_between_seven_tenths_and_all_of_the_allowed_rate() {
        for (allowed, max) in [
            (100.0, 400),
            (50.0, 400),
            (300.0, 400),
            (10.0, 400),
            (100.0, 100),
        ] {
            let accepted = settle(allowed, max, 120);
            let late = &accepted[30..];
            let mean = late.iter().sum::<f64>() / late.len() as f64;
            assert!(
                mean >= 0.7 * allowed && mean <= allowed,
                "{allowed}/s allowed, {max}/s configured: {mean:.1}/s"
            );
        }
        assert_eq!(cut(1.0, false), FLOOR);
        assert_eq!(cut(100.0, true), 70.0);
        let after = |secs: u64| recovered(85.0, Duration::from_secs(secs), Duration::ZERO, 400);
        for (secs, rate) in [(0, 85.0), (4, 95.0), (8, 105.0), (12, 175.0)] {
            assert!(
                (after(secs) - rate).abs() < 1e-9,
                "{secs} s: {}",
                after(secs)
            );
        }
        // Level just under the refused rate: within 2% of its plateau from 2 s to 6 s.
        assert!((2..=6).all(|secs| (after(secs) - 95.0).abs() <= 1.9));
        assert_eq!(after(60), 400.0);
        assert_eq!(
            recovered(100.0, Duration::from_secs(5), Duration::from_secs(10), 400),
            100.0
        );
        assert_eq!(sessions_recovered(2, Duration::from_secs(9), 6), 2);
        assert_eq!(sessions_recovered(2, Duration::from_secs(25), 6), 4);
        assert_eq!(sessions_recovered(2, Duration::from_secs(600), 6), 6);
    }
}
