//! One relay as the worker runs it: its SMTP client, its share of the fleet budget, its
//! effective limits and reply rules (when it pushes back), and its circuit state (up, or
//! marked down for a cool-off after a relay fault or a suspension).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::{rate_share, Budget, RateShare};
use crate::classify::RefusalStreak;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pushback::ReplyRules;
use crate::settle::Outcome;
use crate::smtp::RelayClient;

/// Everything the worker's lanes need to deliver through one relay.
pub struct Relay {
    pub client: Arc<RelayClient>,
    pub budget: Budget,
    pub rate_share: Option<RateShare>,
    pub health: RelayHealth,
    /// The fleet's rate and session limit after the relay's pushback.
    pub limits: Limits,
    /// Which replies are pushback, and what the fleet does about each.
    pub rules: Arc<ReplyRules>,
    /// False when this relay runs only as another's failover target (`--relay` left it
    /// out): its lanes then serve only the queues of down relays that fail over to it.
    pub serves_own_queue: bool,
}

impl Relay {
    /// Assemble a relay from its client and budget.
    pub fn new(
        client: Arc<RelayClient>,
        budget: Budget,
        rules: Arc<ReplyRules>,
        metrics: Metrics,
        serves_own_queue: bool,
    ) -> Self {
        let settings = client.settings();
        let share = rate_share(settings.max_messages_per_second, settings.max_connections);
        // Its going down moves its jobs only if its lanes serve them (see `served_by`).
        let failover = settings.failover.clone().filter(|_| serves_own_queue);
        let limits = Limits::new(
            client.name(),
            settings.max_messages_per_second,
            settings.max_connections,
            metrics.clone(),
        );
        let health = RelayHealth::new(
            client.name(),
            failover,
            settings.down_cooloff,
            settings.refusals_before_down,
            metrics,
        );
        Self {
            client,
            budget,
            rate_share: share,
            health,
            limits,
            rules,
            serves_own_queue,
        }
    }

    /// The relay's name (also its jobs' routing key).
    pub fn name(&self) -> &str {
        self.client.name()
    }
}

/// Circuit state of a relay, as this worker has seen it.
pub struct RelayHealth {
    relay: String,
    /// Where this relay's jobs go while it is down.
    failover: Option<String>,
    cooloff: Duration,
    down_until: Mutex<Option<Instant>>,
    streak: Mutex<RefusalStreak>,
    metrics: Metrics,
}

impl RelayHealth {
    fn new(
        relay: &str,
        failover: Option<String>,
        cooloff: Duration,
        refusals_before_down: u32,
        metrics: Metrics,
    ) -> Self {
        if let Some(to) = &failover {
            metrics.failover_configured(relay, to);
        }
        Self {
            relay: relay.to_string(),
            failover,
            cooloff,
            down_until: Mutex::new(None),
            streak: Mutex::new(RefusalStreak::new(refusals_before_down)),
            metrics,
        }
    }

    /// True while the relay is in its cool-off. Once it ends, the next session attempt is
    /// the probe: it either marks the relay up or down again.
    pub fn is_down(&self) -> bool {
        matches!(*self.down_until.lock().expect("health lock"), Some(until) if until > Instant::now())
    }

    /// When the current cool-off ends, if the relay is down.
    pub fn down_until(&self) -> Option<Instant> {
        let until = *self.down_until.lock().expect("health lock");
        until.filter(|u| *u > Instant::now())
    }

    /// The relay failed us (no session, or it refuses the account or the sender): it is
    /// down for the cool-off.
    pub fn mark_down(&self, error: &dyn std::fmt::Display) {
        self.mark_down_for(error, self.cooloff);
    }

    /// The relay is down for `cooloff` (a suspension, or what another worker saw). A
    /// shorter one never shortens the cool-off in force.
    pub fn mark_down_for(&self, error: &dyn std::fmt::Display, cooloff: Duration) {
        let mut down = self.down_until.lock().expect("health lock");
        let was_up = down.is_none();
        let until = Instant::now() + cooloff;
        *down = Some(down.map_or(until, |d| d.max(until)));
        drop(down);
        if was_up {
            tracing::warn!(relay = %self.relay, %error, ?cooloff, "relay marked down");
            self.metrics.relay_up(&self.relay, false);
            self.metrics.relay_down(&self.relay);
            if let Some(to) = &self.failover {
                self.metrics.failover(&self.relay, to);
            }
        } else {
            tracing::debug!(relay = %self.relay, %error, "relay still down");
        }
    }

    /// An operator ended the relay's suspension: it is up at once, whatever cool-off was in
    /// force (the next session is the probe).
    pub fn resume(&self) {
        if self
            .down_until
            .lock()
            .expect("health lock")
            .take()
            .is_some()
        {
            tracing::info!(relay = %self.relay, "relay resumed by an operator");
            self.metrics.relay_up(&self.relay, true);
        }
    }

    /// A session opened: the relay is up, once its cool-off is over. A session that a lane
    /// opened just as another marked the relay down (or during a suspension, whose relay
    /// takes sessions but refuses mail) does not end the cool-off early.
    pub fn mark_up(&self) {
        let mut down = self.down_until.lock().expect("health lock");
        if down.is_some_and(|until| until > Instant::now()) {
            return;
        }
        if down.take().is_some() {
            drop(down);
            tracing::info!(relay = %self.relay, "relay answers again");
            self.metrics.relay_up(&self.relay, true);
        }
    }

    /// Count an attempt's outcome towards a refusal streak (see [`RefusalStreak`]); true
    /// when it completed one, and the relay is now down.
    pub fn record_refusal(&self, outcome: &Outcome, recipient: &str) -> bool {
        let tripped = self
            .streak
            .lock()
            .expect("streak lock")
            .record(outcome, recipient);
        if tripped {
            self.mark_down(&format!(
                "the same refusal for several recipients in a row: {} {}",
                outcome.smtp_code().unwrap_or(0),
                outcome.reply()
            ));
        }
        tripped
    }
}

/// The relays of one worker, by name, with who fails over to whom.
pub struct Relays {
    pub all: Vec<Arc<Relay>>,
}

impl Relays {
    /// Find a relay by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Relay>> {
        self.all.iter().find(|r| r.name() == name)
    }

    /// The queues (by relay name) whose jobs `relay`'s lanes should take now: its own,
    /// unless it is down, plus those of down relays that fail over to it.
    pub fn served_by(&self, relay: &Relay) -> Vec<String> {
        let mut names = Vec::new();
        if relay.serves_own_queue && !relay.health.is_down() {
            names.push(relay.name().to_string());
        }
        for other in &self.all {
            let fails_over_here = other.client.settings().failover.as_deref() == Some(relay.name());
            if fails_over_here && other.serves_own_queue && other.health.is_down() {
                names.push(other.name().to_string());
            }
        }
        names
    }
}
