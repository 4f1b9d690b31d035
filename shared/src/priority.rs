//! Priority classes: `high`, `normal`, `low`. A job's class travels in its routing key on
//! `<ns>.jobs` (`<relay>`, `<relay>.high`, `<relay>.low`), since RabbitMQ routes on keys,
//! and each class of a relay has a quorum queue of its own (3.10 quorum queues have no
//! priorities). `normal` keeps the bare relay name, so publishers that know nothing of
//! classes keep working.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The class of a job. A relay's lanes take `high` whenever one waits; `normal` and `low`
/// share the rest by weight (`[relays.NAME] low_share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Every class, in the order a lane prefers them.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// `high`, `normal` or `low`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// What follows the relay name in routing keys and queue names: `""` for `normal`.
    pub fn suffix(self) -> &'static str {
        match self {
            Priority::High => ".high",
            Priority::Normal => "",
            Priority::Low => ".low",
        }
    }

    /// The routing key on `<ns>.jobs` of `relay`'s jobs of this class.
    pub fn routing_key(self, relay: &str) -> String {
        format!("{relay}{}", self.suffix())
    }

    /// The class a routing key on `<ns>.jobs` names (a relay name holds no '.').
    /// `None` for a suffix that is no class.
    pub fn of_routing_key(key: &str) -> Option<Priority> {
        match key.split_once('.') {
            None => Some(Priority::Normal),
            Some((_, "high")) => Some(Priority::High),
            Some((_, "low")) => Some(Priority::Low),
            Some(_) => None,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!("{other:?} is not a priority (high, normal or low)")),
        }
    }
}

/// How a lane chooses between `normal` and `low` while both wait: `low` gets `low_share`
/// of those sends, spread out (a credit that grows by `low_share` per choice).
#[derive(Debug, Clone)]
pub struct Weighing {
    low_share: f64,
    credit: f64,
}

impl Weighing {
    /// A weighing that gives `low` `low_share` (0..=1) of the sends while both wait.
    pub fn new(low_share: f64) -> Self {
        Self {
            low_share: low_share.clamp(0.0, 1.0),
            credit: 0.0,
        }
    }

    /// The class of the next send, given which classes have a job ready. `high` whenever
    /// one is ready; a lone `normal` or `low` is taken as it is.
    pub fn choose(&mut self, high: bool, normal: bool, low: bool) -> Option<Priority> {
        match (high, normal, low) {
            (true, _, _) => Some(Priority::High),
            (false, true, true) => {
                self.credit += self.low_share;
                if self.credit >= 1.0 {
                    self.credit -= 1.0;
                    Some(Priority::Low)
                } else {
                    Some(Priority::Normal)
                }
            }
            (false, true, false) => Some(Priority::Normal),
            (false, false, true) => Some(Priority::Low),
            (false, false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_classes_round_trip() {
        for class in Priority::ALL {
            let key = class.routing_key("primary");
            assert_eq!(Priority::of_routing_key(&key), Some(class), "{key}");
            assert_eq!(class.as_str().parse::<Priority>(), Ok(class));
        }
        assert_eq!(Priority::High.routing_key("primary"), "primary.high");
        assert_eq!(Priority::Normal.routing_key("primary"), "primary");
        assert_eq!(Priority::of_routing_key("primary.urgent"), None);
        assert!("urgent".parse::<Priority>().is_err());
    }

    #[test]
    fn high_always_first_and_low_gets_its_share() {
        let cases = [(0.2, 200), (0.0, 0), (0.5, 500), (1.0, 1000)];
        for (share, expected_low) in cases {
            let mut w = Weighing::new(share);
            assert_eq!(w.choose(true, true, true), Some(Priority::High));
            let mut w = Weighing::new(share);
            let low = (0..1000)
                .filter(|_| w.choose(false, true, true) == Some(Priority::Low))
                .count();
            assert!(low.abs_diff(expected_low) <= 1, "low_share {share}: {low}");
        }
        let mut w = Weighing::new(0.0);
        assert_eq!(w.choose(false, false, true), Some(Priority::Low));
        assert_eq!(w.choose(false, false, false), None);
    }
}
