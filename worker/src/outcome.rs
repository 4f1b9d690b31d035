//! The one place where an attempt's [`Outcome`] becomes broker actions.
//!
//! Rule: a delivery is acknowledged only after the job exists somewhere else for sure —
//! accepted by the relay, or its copy in a retry or dead queue confirmed by the broker.
//! There is no moment in which a job exists nowhere; a crash in between gives a duplicate,
//! never a loss. Nothing waits for its retry while held unacknowledged: the wait happens in
//! a retry queue, whose messages expire back into the jobs exchange.
//!
//! Acks are batched: a settled delivery's ack waits until [`ACK_BATCH`] have gathered,
//! [`ACK_LINGER`] has passed, or the lane flushes (no further delivery ready, idle, stop);
//! then one `basic.ack` with `multiple` covers them all. A lane settles its deliveries in the order they came, so
//! everything up to the last settled tag is settled. A crash before the flush redelivers
//! those jobs: duplicates bounded by the lane's prefetch, never a loss.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::Acker;
use lapin::{BasicProperties, Channel};
use sluice_shared::events::{now_rfc3339, DeliveryEvent, EventOutcome};
use sluice_shared::headers;
use sluice_shared::{trace_context, Topology};

use crate::deliver::Outcome;
use crate::metrics::Metrics;
use crate::tracing_spans::{event_trace_id, DeliverSpan};

/// What the broker must do with a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delivered or bounced: the job is finished.
    Finish,
    /// Wait in retry step `step` (1-based) for `delay`, then try again.
    Retry { step: usize, delay: Duration },
    /// Set aside in the dead queue.
    Dead { reason: &'static str },
}

/// Header that records the last retry step used, so the ladder only moves forward.
const STEP: &str = "x-sluice-step";

/// Decide the action for an outcome, given the last retry step this job used (0 = none)
/// and the ladder. A relay's named wait picks the first step at least that long.
pub fn decide(outcome: &Outcome, last_step: usize, delays: &[Duration]) -> Action {
    match outcome {
        Outcome::Delivered { .. } | Outcome::Bounced { .. } => Action::Finish,
        Outcome::Invalid { .. } => Action::Dead { reason: "invalid" },
        Outcome::Deferred { retry_after, .. } => {
            let mut step = last_step + 1;
            if step > delays.len() {
                return Action::Dead {
                    reason: "retries exhausted",
                };
            }
            if let Some(wait) = retry_after {
                while step < delays.len() && delays[step - 1] < *wait {
                    step += 1;
                }
            }
            Action::Retry {
                step,
                delay: delays[step - 1],
            }
        }
    }
}

/// What is known about the attempt beyond its outcome.
pub struct AttemptInfo<'a> {
    /// The relay whose queue the job came from (its retry ladder and dead queue).
    pub source_relay: &'a str,
    /// The relay the attempt went through (differs from the source during failover).
    pub via_relay: &'a str,
    pub job_id: &'a str,
    pub campaign: &'a str,
    pub to: &'a str,
    /// The attempt's span: its trace id goes into the event.
    pub span: &'a DeliverSpan,
}

/// Why a delivery could not be settled; it stays unacknowledged and comes back.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the job's copy for queue {queue}")]
    Refused { queue: String },
}

/// At most this many settled deliveries wait for their (one, `multiple`) ack.
pub const ACK_BATCH: usize = 16;

/// Nor does a settled delivery wait longer than this for its ack (a rate-limited lane
/// settles slowly): it bounds what a crash repeats on a slow lane.
pub const ACK_LINGER: Duration = Duration::from_millis(100);

/// Carries out [`Action`]s on the lane's channel (in confirm mode).
pub struct Settler {
    channel: Channel,
    topology: Topology,
    delays: Arc<[Duration]>,
    metrics: Metrics,
    /// The last settled delivery whose ack has not been sent, and how many wait with it.
    unacked: Option<Acker>,
    waiting: usize,
    /// When the oldest delivery still waiting for its ack was settled.
    waiting_since: Option<std::time::Instant>,
    batch: usize,
}

impl Settler {
    /// A settler publishing on `channel`, which must be in confirm mode, and acking in
    /// batches of up to `batch` (at most [`ACK_BATCH`]; 1 acks every delivery at once).
    pub fn new(
        channel: Channel,
        topology: Topology,
        delays: Arc<[Duration]>,
        metrics: Metrics,
        batch: usize,
    ) -> Self {
        Self {
            channel,
            topology,
            delays,
            metrics,
            unacked: None,
            waiting: 0,
            waiting_since: None,
            batch: batch.clamp(1, ACK_BATCH),
        }
    }

    /// Publish what the outcome requires, then acknowledge the delivery (in a batch: see
    /// [`Settler::flush`]). An error leaves the delivery unacknowledged: the broker gives
    /// it to a worker again.
    pub async fn settle(
        &mut self,
        delivery: &Delivery,
        info: &AttemptInfo<'_>,
        outcome: &Outcome,
    ) -> Result<(), SettleError> {
        let incoming = delivery.properties.headers().as_ref();
        let attempt = headers::get_int(incoming, headers::ATTEMPT)
            .unwrap_or(1)
            .max(1);
        let last_step = headers::get_int(incoming, STEP).unwrap_or(0).max(0) as usize;
        let now = now_rfc3339();
        let first_attempt =
            headers::get_str(incoming, headers::FIRST_ATTEMPT).unwrap_or_else(|| now.clone());

        let mut carried = carried_headers(incoming);
        headers::set_str(&mut carried, headers::FIRST_ATTEMPT, &first_attempt);
        headers::set_str(&mut carried, headers::LAST_ATTEMPT, &now);
        headers::set_str(&mut carried, headers::RELAY, info.source_relay);
        headers::set_str(&mut carried, headers::SMTP_REPLY, outcome.reply());
        if let Some(code) = outcome.smtp_code() {
            headers::set_int(&mut carried, headers::SMTP_CODE, code.into());
        }
        // The incoming `traceparent` (the publisher's span) is carried as is, so every
        // attempt is a sibling under it. A job that came without one gets this attempt's,
        // so that its later attempts still join this trace.
        if !carried.contains_key(trace_context::TRACEPARENT) {
            if let Some(cx) = info.span.context() {
                trace_context::inject(cx, &mut carried);
            }
        }

        let action = decide(outcome, last_step, &self.delays);
        let event = match &action {
            Action::Finish => match outcome {
                Outcome::Delivered { .. } => EventOutcome::Delivered,
                _ => EventOutcome::Bounced,
            },
            Action::Retry { step, delay } => {
                headers::set_int(&mut carried, headers::ATTEMPT, attempt + 1);
                headers::set_int(&mut carried, STEP, *step as i64);
                let queue = self.topology.retry_queue(info.source_relay, *step);
                let expiration = delay.as_millis().to_string();
                self.publish_confirmed(delivery, &queue, carried, Some(expiration))
                    .await?;
                EventOutcome::Deferred
            }
            Action::Dead { reason } => {
                headers::set_str(&mut carried, headers::REASON, reason);
                headers::set_int(&mut carried, headers::ATTEMPTS, attempt);
                let queue = self.topology.dead_queue(info.source_relay);
                self.publish_confirmed(delivery, &queue, carried, None)
                    .await?;
                EventOutcome::Dead
            }
        };
        match event {
            EventOutcome::Delivered => self.metrics.delivered(info.via_relay),
            EventOutcome::Deferred => self.metrics.deferred(info.via_relay),
            EventOutcome::Bounced => self.metrics.bounced(info.via_relay),
            EventOutcome::Dead => self.metrics.dead(info.via_relay),
        }
        info.span.record_outcome(event);
        let trace_id = event_trace_id(info.span, incoming);
        self.publish_event(info, event, attempt, outcome, now, trace_id)
            .await?;
        self.unacked = Some(delivery.acker.clone());
        self.waiting += 1;
        let since = *self
            .waiting_since
            .get_or_insert_with(std::time::Instant::now);
        if self.waiting >= self.batch || since.elapsed() >= ACK_LINGER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Acknowledge every settled delivery not acknowledged yet, with one `multiple` ack.
    pub async fn flush(&mut self) -> Result<(), SettleError> {
        if let Some(acker) = self.unacked.take() {
            self.waiting = 0;
            self.waiting_since = None;
            acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        Ok(())
    }

    /// Publish a copy of the delivery straight into `queue` and wait for the broker's
    /// confirm. A Nack or an unroutable message is an error: the original stays unacked.
    async fn publish_confirmed(
        &self,
        delivery: &Delivery,
        queue: &str,
        headers: FieldTable,
        expiration: Option<String>,
    ) -> Result<(), SettleError> {
        let mut properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(expiration) = expiration {
            properties = properties.with_expiration(expiration.into());
        }
        let confirmation = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        let refused = match &confirmation {
            lapin::Confirmation::Ack(returned) => returned.is_some(),
            lapin::Confirmation::Nack(_) => true,
            lapin::Confirmation::NotRequested => false,
        };
        if refused {
            return Err(SettleError::Refused {
                queue: queue.to_string(),
            });
        }
        Ok(())
    }

    async fn publish_event(
        &self,
        info: &AttemptInfo<'_>,
        outcome: EventOutcome,
        attempt: i64,
        result: &Outcome,
        at: String,
        trace_id: Option<String>,
    ) -> lapin::Result<()> {
        let event = DeliveryEvent {
            id: info.job_id.to_string(),
            campaign: info.campaign.to_string(),
            to: info.to.to_string(),
            relay: info.via_relay.to_string(),
            outcome,
            attempt: attempt as u32,
            smtp_code: result.smtp_code(),
            smtp_reply: Some(result.reply().to_string()),
            at,
            trace_id,
        };
        let body = serde_json::to_vec(&event).expect("events serialize");
        // Events are informational: published on the confirm channel but not awaited, so
        // the hot path does not pay a round trip for them.
        let _confirm = self
            .channel
            .basic_publish(
                self.topology.events_exchange().into(),
                event.routing_key().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(info.job_id.into()),
            )
            .await?;
        Ok(())
    }
}

/// The incoming headers worth keeping on a retry or dead copy: everything but the
/// broker's own `x-death` history.
fn carried_headers(incoming: Option<&FieldTable>) -> FieldTable {
    let mut carried = FieldTable::default();
    if let Some(incoming) = incoming {
        for (key, value) in incoming.inner() {
            if key.as_str() != "x-death" {
                carried.insert(key.clone(), value.clone());
            }
        }
    }
    carried
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deferred(retry_after: Option<u64>) -> Outcome {
        Outcome::Deferred {
            code: Some(451),
            reply: "later".into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn the_ladder_moves_forward_and_ends_in_the_dead_queue() {
        let ladder: Vec<Duration> = [30, 120, 600, 3600]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        let retry = |step: usize| Action::Retry {
            step,
            delay: ladder[step - 1],
        };
        let cases = [
            (deferred(None), 0, retry(1)),
            (deferred(None), 1, retry(2)),
            (deferred(None), 3, retry(4)),
            (
                deferred(None),
                4,
                Action::Dead {
                    reason: "retries exhausted",
                },
            ),
            (deferred(Some(120)), 0, retry(2)),
            (deferred(Some(100)), 0, retry(2)),
            (deferred(Some(99999)), 0, retry(4)),
            (deferred(Some(10)), 2, retry(3)),
            (
                Outcome::Invalid { reason: "x".into() },
                0,
                Action::Dead { reason: "invalid" },
            ),
            (
                Outcome::Bounced {
                    code: 550,
                    reply: "no".into(),
                },
                0,
                Action::Finish,
            ),
            (
                Outcome::Delivered {
                    code: 250,
                    reply: "ok".into(),
                },
                2,
                Action::Finish,
            ),
        ];
        for (outcome, last_step, expected) in cases {
            assert_eq!(
                decide(&outcome, last_step, &ladder),
                expected,
                "{outcome:?} after step {last_step}"
            );
        }
        assert_eq!(
            decide(&deferred(None), 0, &[]),
            Action::Dead {
                reason: "retries exhausted"
            }
        );
    }
}
