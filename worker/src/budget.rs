//! The fleet-wide relay budget: at most `max_connections` SMTP sessions and at most
//! `max_messages_per_second` accepted messages per second, for all workers together.
//!
//! # Design: slots are exclusive queues
//! A relay has `max_connections` *slots*. A worker holds slot `k` by declaring the
//! exclusive queue `<ns>.budget.<relay>.<k>` on its AMQP connection: RabbitMQ lets only one
//! connection own an exclusive queue (another declaration fails with `RESOURCE_LOCKED`)
//! and deletes it when that connection closes. A worker opens an SMTP session only while it
//! holds a slot, and closes the session before it gives the slot back (by deleting the
//! queue). So at every moment the relay sees at most `max_connections` sessions from the
//! fleet, whatever its size, with no service beyond RabbitMQ.
//!
//! A worker that dies loses its AMQP connection, so the broker frees its slots by itself:
//! at once when the process dies (the kernel closes the socket), within the AMQP heartbeat
//! (15 s by default) when the machine vanishes. Nothing is held unacknowledged, so
//! RabbitMQ's `consumer_timeout` never applies to the budget. If a worker's own AMQP
//! connection breaks, it drops every SMTP session at once, since its slots are gone.
//!
//! # Rate
//! Each slot carries an equal share of the rate: `k` messages per window `w` with
//! `k / w = max_messages_per_second / max_connections` and `w >= 1 s` (see [`rate_share`]).
//! A session never sends more than its share in any window, and a newly taken slot waits
//! one window before its first message (the previous holder may have used it just
//! before), so in every sliding one-second window the relay sees at most
//! `max_messages_per_second` messages. The price is rounding: 10/s over 3 slots gives
//! 3 per slot, 9/s in all.
//!
//! # Pushback
//! When the relay says the budget is too much (see [`crate::pushback`]), the fleet uses
//! only slots `0..usable` ([`Budget::try_acquire`]) and the shares follow the effective rate
//! over the effective sessions ([`Pacer::set_share`]); a lane holding a slot beyond the
//! usable ones gives it back after its current job.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use rand::seq::SliceRandom;
use sluice_shared::Topology;
use tokio::time::Instant;

use crate::broker::{within, BrokerError};
use crate::metrics::Metrics;

/// The budget of one relay as seen from this worker: which slots it holds.
pub struct Budget {
    connection: Arc<Connection>,
    topology: Topology,
    relay: String,
    max_connections: u32,
    held: Mutex<HashSet<u32>>,
    /// Only one lane of this worker probes the broker for a free slot at a time: with many
    /// workers, every refused declaration costs the broker a channel error.
    acquiring: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

/// A slot this worker holds; give it back with [`Budget::release`].
#[derive(Debug)]
pub struct Slot {
    index: u32,
}

impl Slot {
    /// The slot's number: slots at or above the effective session limit are given back.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Budget {
    /// The budget of `relay`, claimed over `connection`.
    pub fn new(
        connection: Arc<Connection>,
        topology: Topology,
        relay: &str,
        max_connections: u32,
        metrics: Metrics,
    ) -> Self {
        Self {
            connection,
            topology,
            relay: relay.to_string(),
            max_connections,
            held: Mutex::new(HashSet::new()),
            acquiring: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// Try every slot below `usable` (the effective session limit) this worker does not
    /// hold, in random order; the first free one is ours. `Ok(None)` when every usable slot
    /// is taken by the fleet.
    pub async fn try_acquire(&self, usable: u32) -> Result<Option<Slot>, BrokerError> {
        let Ok(_probing) = self.acquiring.try_lock() else {
            return Ok(None); // another lane of this worker is already asking
        };
        let mut candidates: Vec<u32> = {
            let held = self.held.lock().expect("budget lock");
            (0..self.max_connections.min(usable))
                .filter(|k| !held.contains(k))
                .collect()
        };
        candidates.shuffle(&mut rand::rng());
        for index in candidates {
            // Reserve locally first: slots are owned per connection, so two tasks of this
            // worker must never both "win" the same slot.
            if !self.held.lock().expect("budget lock").insert(index) {
                continue;
            }
            // A failed exclusive declaration closes the channel, so each try gets its own.
            let channel =
                match within("opening a budget channel", self.connection.create_channel()).await {
                    Ok(channel) => channel,
                    Err(e) => {
                        self.held.lock().expect("budget lock").remove(&index);
                        return Err(e);
                    }
                };
            let declared = within(
                "claiming a budget slot",
                channel.queue_declare(
                    self.topology.budget_slot_queue(&self.relay, index).into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            match declared {
                Ok(_) => {
                    let _ = within(
                        "closing a budget channel",
                        channel.close(200, "slot taken".into()),
                    )
                    .await;
                    self.metrics.slots_held(&self.relay).inc();
                    return Ok(Some(Slot { index }));
                }
                Err(e) => {
                    self.held.lock().expect("budget lock").remove(&index);
                    // A protocol error (RESOURCE_LOCKED: another worker holds the slot)
                    // closes only this channel: try the next slot. Anything else is the
                    // connection itself failing (or the broker not answering in time).
                    let refused = matches!(
                        &e,
                        BrokerError::Amqp { source, .. }
                            if matches!(source.kind(), lapin::ErrorKind::ProtocolError(_))
                    );
                    if !refused || !self.connection.status().connected() {
                        return Err(e);
                    }
                }
            }
        }
        Ok(None)
    }

    /// Give a slot back. Call only after the slot's SMTP session is closed.
    pub async fn release(&self, slot: Slot) {
        let queue = self.topology.budget_slot_queue(&self.relay, slot.index);
        if let Ok(channel) =
            within("opening a budget channel", self.connection.create_channel()).await
        {
            let _ = within(
                "giving back a budget slot",
                channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
            )
            .await;
            let _ = within(
                "closing a budget channel",
                channel.close(200, "slot released".into()),
            )
            .await;
        }
        // Even if the delete failed, the slot is gone with our connection: nothing leaks.
        self.held.lock().expect("budget lock").remove(&slot.index);
        self.metrics.slots_held(&self.relay).dec();
    }

    /// How many slots this worker holds now.
    pub fn held(&self) -> usize {
        self.held.lock().expect("budget lock").len()
    }
}

/// One slot's share of the relay's rate: at most `messages` in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateShare {
    pub messages: u32,
    pub window: Duration,
}

/// Split `max_per_second` over `slots` so that the shares add up to at most the whole
/// in any one-second window. `None` when there is no rate limit.
pub fn rate_share(max_per_second: u32, slots: u32) -> Option<RateShare> {
    if max_per_second == 0 {
        return None;
    }
    let slots = slots.max(1);
    if max_per_second >= slots {
        Some(RateShare {
            messages: max_per_second / slots,
            window: Duration::from_secs(1),
        })
    } else {
        // Fewer messages than slots: each slot gets one message per `slots / max` seconds.
        Some(RateShare {
            messages: 1,
            window: Duration::from_secs_f64(f64::from(slots) / f64::from(max_per_second)),
        })
    }
}

/// Paces the sends of one slot to its [`RateShare`]: a sliding window, and sends at least
/// `window / messages` apart.
pub struct Pacer {
    share: Option<RateShare>,
    sent: VecDeque<Instant>,
}

/// Margin added to every wait, so that the relay's clock and ours never disagree on
/// which window a message fell in.
const CLOCK_MARGIN: Duration = Duration::from_millis(10);

impl Pacer {
    /// A pacer for a slot taken just now: when rate-limited, its first message waits one
    /// window, since the slot's previous holder may have used its share just before.
    pub fn new(share: Option<RateShare>) -> Self {
        let mut sent = VecDeque::new();
        if let Some(share) = share {
            let now = Instant::now();
            sent.extend(std::iter::repeat_n(now, share.messages as usize));
        }
        Self { share, sent }
    }

    /// Follow a new share (the relay's effective rate or sessions changed): a smaller one
    /// applies from the next message on, to the messages already in the window.
    pub fn set_share(&mut self, share: Option<RateShare>) {
        self.share = share;
    }

    /// Wait until one more message fits in the window, then count it as sent.
    pub async fn wait_turn(&mut self) {
        let Some(share) = self.share else {
            return;
        };
        // `while`: after a cut the window may hold more than the new share.
        while self.sent.len() >= share.messages as usize {
            let oldest = self.sent.pop_front().expect("window is full");
            tokio::time::sleep_until(oldest + share.window + CLOCK_MARGIN).await;
        }
        // Evenly spaced, never in bursts: a job that arrives (a `high` one) waits at most
        // one interval for its turn, not the rest of a window a burst used up.
        if let Some(&last) = self.sent.back() {
            tokio::time::sleep_until(last + share.window / share.messages.max(1)).await;
        }
        self.sent.push_back(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_never_add_up_to_more_than_the_budget() {
        let cases = [
            (0, 4, None),
            (200, 4, Some((50, 1.0))),
            (10, 3, Some((3, 1.0))),
            (2, 4, Some((1, 2.0))),
            (1, 1, Some((1, 1.0))),
        ];
        for (rate, slots, expected) in cases {
            let got = rate_share(rate, slots).map(|s| (s.messages, s.window.as_secs_f64()));
            assert_eq!(got, expected, "{rate}/s over {slots} slots");
            if let Some((messages, window)) = got {
                assert!(f64::from(messages * slots) / window <= f64::from(rate));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pacer_keeps_its_share_in_every_window() {
        let share = rate_share(200, 4);
        let mut pacer = Pacer::new(share);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..200 {
            pacer.wait_turn().await;
            times.push(Instant::now());
        }
        // The first message waits a full window (the slot may have just changed hands).
        assert!(times[0] - start >= Duration::from_secs(1));
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| **u - *t < Duration::from_secs(1))
                .count();
            assert!(in_window <= 50, "{in_window} messages in one window");
        }
        // Evenly spaced: never two sends closer than window / messages.
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(20), "{pair:?}");
        }
    }
}
