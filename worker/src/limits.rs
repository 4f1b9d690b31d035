//! The effective limits of one relay, as the fleet learned them from its replies: the rate
//! (cut and climbing again, below `max_messages_per_second`) and the session limit (below
//! `max_connections`). Every worker holds the same state: a worker that cuts a limit tells
//! the others with a [`Change`] on the control stream (see [`crate::control`]), and each
//! applies the changes it reads. Recovery is a function of the time since the cut, so the
//! workers agree without talking again.

use std::sync::Mutex;
use std::time::Duration;

pub use sluice_shared::control::{now_ms, Change};

use crate::budget::{rate_share, RateShare};
use crate::metrics::Metrics;
use crate::pushback::{
    cut, recovered, sessions_recovered, CUT_AGAIN_WITHIN, CUT_SPACING, SESSION_CUT_SPACING,
};

fn since(at_ms: u64, now: u64) -> Duration {
    Duration::from_millis(now.saturating_sub(at_ms))
}

#[derive(Debug, Clone, Copy)]
struct RateCut {
    to: f64,
    at_ms: u64,
    hold_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct SessionCut {
    to: u32,
    at_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    rate: Option<RateCut>,
    sessions: Option<SessionCut>,
}

/// One relay's effective limits on this worker.
pub struct Limits {
    relay: String,
    max_rate: u32,
    max_sessions: u32,
    state: Mutex<State>,
    metrics: Metrics,
}

impl Limits {
    /// The limits of `relay` before any pushback: its configuration.
    pub fn new(relay: &str, max_rate: u32, max_sessions: u32, metrics: Metrics) -> Self {
        let limits = Self {
            relay: relay.to_string(),
            max_rate,
            max_sessions: max_sessions.max(1),
            state: Mutex::new(State::default()),
            metrics,
        };
        limits.share();
        limits
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("limits lock")
    }

    fn rate_at(&self, state: &State, now: u64) -> Option<f64> {
        if self.max_rate == 0 {
            return None;
        }
        Some(match state.rate {
            None => f64::from(self.max_rate),
            Some(c) => recovered(
                c.to,
                since(c.at_ms, now),
                Duration::from_millis(c.hold_ms),
                self.max_rate,
            ),
        })
    }

    fn sessions_at(&self, state: &State, now: u64) -> u32 {
        match state.sessions {
            None => self.max_sessions,
            Some(c) => sessions_recovered(c.to, since(c.at_ms, now), self.max_sessions),
        }
    }

    /// The fleet's rate for this relay now (`None`: no rate limit).
    pub fn rate(&self) -> Option<f64> {
        self.rate_at(&self.state(), now_ms())
    }

    /// The fleet's session limit for this relay now: slots `0..sessions()` may be used.
    pub fn sessions(&self) -> u32 {
        self.sessions_at(&self.state(), now_ms())
    }

    /// One slot's share of the effective rate over the effective sessions (and the gauges
    /// updated to them).
    pub fn share(&self) -> Option<RateShare> {
        let (rate, sessions) = {
            let state = self.state();
            let now = now_ms();
            (self.rate_at(&state, now), self.sessions_at(&state, now))
        };
        self.metrics
            .effective_limits(&self.relay, rate.unwrap_or(0.0), sessions);
        rate.and_then(|rate| rate_share(rate.floor().max(1.0) as u32, sessions))
    }

    /// The relay refused our rate: cut it, unless it was cut within [`CUT_SPACING`] (the
    /// refusals of what was sent before then). The change to tell the fleet, if any.
    pub fn cut_rate(&self, hold: Duration) -> Option<Change> {
        let mut state = self.state();
        let now = now_ms();
        let current = self.rate_at(&state, now)?;
        if state
            .rate
            .is_some_and(|c| since(c.at_ms, now) < CUT_SPACING)
        {
            return None;
        }
        let again = state
            .rate
            .is_some_and(|c| since(c.at_ms, now) < CUT_AGAIN_WITHIN);
        let to = cut(current, again);
        state.rate = Some(RateCut {
            to,
            at_ms: now,
            hold_ms: hold.as_millis() as u64,
        });
        drop(state);
        tracing::warn!(relay = %self.relay, from = current, to, ?hold, "the relay refuses our rate: the fleet's rate is cut");
        Some(Change::Rate {
            relay: self.relay.clone(),
            to,
            at_ms: now,
            hold_ms: hold.as_millis() as u64,
        })
    }

    /// The relay refused a session: one fewer, unless cut within [`SESSION_CUT_SPACING`].
    pub fn cut_sessions(&self) -> Option<Change> {
        let mut state = self.state();
        let now = now_ms();
        if state
            .sessions
            .is_some_and(|c| since(c.at_ms, now) < SESSION_CUT_SPACING)
        {
            return None;
        }
        let current = self.sessions_at(&state, now);
        let to = current.saturating_sub(1).max(1);
        state.sessions = Some(SessionCut { to, at_ms: now });
        drop(state);
        tracing::warn!(relay = %self.relay, from = current, to, "the relay refuses a session: the fleet's session limit is cut");
        Some(Change::Sessions {
            relay: self.relay.clone(),
            to,
            at_ms: now,
        })
    }

    /// Follow a change another worker (or this one) told the fleet: a newer cut replaces
    /// the one in force. True when it changed anything.
    pub fn apply(&self, change: &Change) -> bool {
        let mut state = self.state();
        let applied = match *change {
            Change::Rate {
                to, at_ms, hold_ms, ..
            } => {
                let newer = state.rate.is_none_or(|c| at_ms > c.at_ms);
                if newer && self.max_rate > 0 {
                    state.rate = Some(RateCut { to, at_ms, hold_ms });
                }
                newer
            }
            Change::Sessions { to, at_ms, .. } => {
                let newer = state.sessions.is_none_or(|c| at_ms > c.at_ms);
                if newer {
                    state.sessions = Some(SessionCut {
                        to: to.clamp(1, self.max_sessions),
                        at_ms,
                    });
                }
                newer
            }
            _ => false,
        };
        drop(state);
        if applied {
            let (rate, sessions) = (self.rate(), self.sessions());
            tracing::info!(relay = %self.relay, ?rate, sessions, "following the fleet's limits for the relay");
            self.share();
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_spaced_and_the_newest_change_wins() {
        let limits = Limits::new("primary", 400, 6, Metrics::new());
        let change = limits.cut_rate(Duration::ZERO).expect("a first cut");
        assert!(limits.cut_rate(Duration::ZERO).is_none(), "too soon after");
        let rate = limits.rate().expect("limited");
        assert!((339.0..=341.0).contains(&rate), "{rate}");
        // Another worker: the same change applies once.
        let other = Limits::new("primary", 400, 6, Metrics::new());
        assert!(other.apply(&change));
        assert!(!other.apply(&change));
        assert!((other.rate().expect("limited") - rate).abs() < 1.0);
        assert_eq!(other.share().map(|s| s.messages), Some(340 / 6));

        let cut = limits.cut_sessions().expect("a first cut");
        assert_eq!(limits.sessions(), 5);
        assert!(limits.cut_sessions().is_none(), "too soon after");
        assert!(other.apply(&cut));
        assert_eq!(other.sessions(), 5);
        let old = Change::Sessions {
            relay: "primary".into(),
            to: 1,
            at_ms: 1,
        };
        assert!(
            !other.apply(&old),
            "an older change never replaces a newer one"
        );
        let wire = serde_json::to_string(&cut).expect("json");
        assert_eq!(serde_json::from_str::<Change>(&wire).expect("json"), cut);
    }

    #[test]
    fn no_rate_limit_means_nothing_to_cut() {
        let limits = Limits::new("primary", 0, 4, Metrics::new());
        assert_eq!(limits.rate(), None);
        assert!(limits.cut_rate(Duration::ZERO).is_none());
        assert_eq!(limits.share(), None);
    }
}
