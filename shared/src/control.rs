//! The control stream's messages (`<ns>.control`) and the steering state they add up to.
//!
//! Two kinds of message travel on the stream. Workers publish what a relay told them (a
//! rate cut, a session limit, a busy server: see the worker's `limits` and `pushback`);
//! operators publish their commands through `sluice-producer` (pause, resume or cancel a
//! campaign; suspend or resume a relay). Every worker reads the stream from its first
//! entry and follows it, so a worker started after a command knows it. The stream keeps
//! its entries as long as the event log keeps events: a cancelled campaign is forgotten
//! when its events are.
//!
//! [`Steering`] is what the operators' commands add up to, the same for every reader: the
//! worker checks each job against it, and the producer reads it for `relay status` and
//! `campaigns`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One entry of the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A relay refused our rate: the fleet's rate was cut to `to` per second at `at_ms`
    /// (Unix milliseconds); it recovers after `hold_ms`.
    Rate {
        relay: String,
        to: f64,
        at_ms: u64,
        hold_ms: u64,
    },
    /// A relay refused a session: the fleet's session limit was cut to `to` at `at_ms`.
    Sessions { relay: String, to: u32, at_ms: u64 },
    /// The relay is down until `until_ms` (a busy server, or a `suspend` reply rule).
    Down {
        relay: String,
        until_ms: u64,
        at_ms: u64,
        reason: String,
    },
    /// An operator paused a campaign: no transaction starts for it, its jobs are held.
    Pause { campaign: String, at_ms: u64 },
    /// An operator resumed a paused campaign.
    Resume { campaign: String, at_ms: u64 },
    /// An operator cancelled a campaign: its remaining jobs end `cancelled`.
    Cancel { campaign: String, at_ms: u64 },
    /// An operator suspended a relay until `until_ms`: no transaction starts on it.
    Suspend {
        relay: String,
        until_ms: u64,
        at_ms: u64,
        reason: String,
    },
    /// An operator ended a relay's suspension (and any cool-off) before its time.
    Unsuspend { relay: String, at_ms: u64 },
    /// Written by a reader to know where "now" is in the stream; changes nothing.
    Marker { id: String },
}

impl Change {
    /// The relay the change is about, if it is about one.
    pub fn relay(&self) -> Option<&str> {
        match self {
            Self::Rate { relay, .. }
            | Self::Sessions { relay, .. }
            | Self::Down { relay, .. }
            | Self::Suspend { relay, .. }
            | Self::Unsuspend { relay, .. } => Some(relay),
            _ => None,
        }
    }

    /// The JSON body of the stream entry.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a change always serializes")
    }
}

/// Now, in Unix milliseconds (the clock changes are stamped with).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where an operator's commands left a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CampaignState {
    /// Paused at `since_ms`: its jobs go to its hold queue until it is resumed.
    Paused { since_ms: u64 },
    /// Cancelled at `since_ms`: its jobs end `cancelled`, for good.
    Cancelled { since_ms: u64 },
}

impl CampaignState {
    /// The state's name, as `campaigns` and `status` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Paused { .. } => "paused",
            Self::Cancelled { .. } => "cancelled",
        }
    }
}

/// An operator's suspension of a relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suspension {
    pub until_ms: u64,
    pub at_ms: u64,
    pub reason: String,
}

/// What the operators' commands on the control stream add up to. Small: one entry per
/// paused or cancelled campaign and per suspended relay; a resumed campaign or relay
/// leaves no entry, and a cancelled campaign's entry goes with the stream's retention.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Steering {
    campaigns: BTreeMap<String, CampaignState>,
    relays: BTreeMap<String, Suspension>,
}

impl Steering {
    /// Follow one entry of the stream (in stream order). True when it changed anything.
    pub fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Pause { campaign, at_ms } => match self.campaigns.get(campaign) {
                Some(CampaignState::Cancelled { .. }) => false,
                _ => {
                    let paused = CampaignState::Paused { since_ms: *at_ms };
                    self.campaigns.insert(campaign.clone(), paused) != Some(paused)
                }
            },
            Change::Resume { campaign, .. } => {
                if matches!(
                    self.campaigns.get(campaign),
                    Some(CampaignState::Paused { .. })
                ) {
                    self.campaigns.remove(campaign);
                    true
                } else {
                    false
                }
            }
            Change::Cancel { campaign, at_ms } => match self.campaigns.get(campaign) {
                Some(CampaignState::Cancelled { .. }) => false,
                _ => {
                    let cancelled = CampaignState::Cancelled { since_ms: *at_ms };
                    self.campaigns.insert(campaign.clone(), cancelled);
                    true
                }
            },
            Change::Suspend {
                relay,
                until_ms,
                at_ms,
                reason,
            } => {
                let suspension = Suspension {
                    until_ms: *until_ms,
                    at_ms: *at_ms,
                    reason: reason.clone(),
                };
                self.relays.insert(relay.clone(), suspension);
                true
            }
            Change::Unsuspend { relay, .. } => self.relays.remove(relay).is_some(),
            _ => false,
        }
    }

    /// Where the operators left `campaign` (`None`: running as published).
    pub fn campaign(&self, campaign: &str) -> Option<CampaignState> {
        self.campaigns.get(campaign).copied()
    }

    /// Every paused or cancelled campaign.
    pub fn campaigns(&self) -> impl Iterator<Item = (&str, CampaignState)> {
        self.campaigns
            .iter()
            .map(|(name, state)| (name.as_str(), *state))
    }

    /// The suspension of `relay` in force at `now_ms`, if any.
    pub fn suspension(&self, relay: &str, now_ms: u64) -> Option<&Suspension> {
        self.relays.get(relay).filter(|s| s.until_ms > now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(campaign: &str, at_ms: u64) -> Change {
        Change::Pause {
            campaign: campaign.into(),
            at_ms,
        }
    }

    #[test]
    fn commands_add_up_in_stream_order() {
        let mut steering = Steering::default();
        assert!(steering.apply(&pause("spring", 10)));
        assert!(
            !steering.apply(&pause("spring", 10)),
            "the same entry twice"
        );
        assert_eq!(
            steering.campaign("spring"),
            Some(CampaignState::Paused { since_ms: 10 })
        );
        assert!(steering.apply(&Change::Resume {
            campaign: "spring".into(),
            at_ms: 20
        }));
        assert_eq!(steering.campaign("spring"), None);
        assert!(steering.apply(&Change::Cancel {
            campaign: "spring".into(),
            at_ms: 30
        }));
        assert!(!steering.apply(&pause("spring", 40)), "cancelled is final");
        assert!(!steering.apply(&Change::Resume {
            campaign: "spring".into(),
            at_ms: 50
        }));
        assert_eq!(
            steering.campaign("spring").map(CampaignState::name),
            Some("cancelled")
        );
    }

    #[test]
    fn a_suspension_ends_with_its_time_or_a_resume() {
        let mut steering = Steering::default();
        steering.apply(&Change::Suspend {
            relay: "primary".into(),
            until_ms: 1_000,
            at_ms: 0,
            reason: "provider asked".into(),
        });
        assert!(steering.suspension("primary", 999).is_some());
        assert!(steering.suspension("primary", 1_000).is_none());
        assert!(steering.apply(&Change::Unsuspend {
            relay: "primary".into(),
            at_ms: 5
        }));
        assert!(steering.suspension("primary", 10).is_none());
    }

    #[test]
    fn the_wire_format_names_its_kind() {
        let change = pause("spring", 7);
        let wire = String::from_utf8(change.to_bytes()).unwrap();
        assert_eq!(wire, r#"{"kind":"pause","campaign":"spring","at_ms":7}"#);
        assert_eq!(serde_json::from_str::<Change>(&wire).unwrap(), change);
    }
}
