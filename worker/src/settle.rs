//! The one place where an attempt's [`Outcome`] becomes broker actions: ack, copy to a
//! retry step or the dead queue, requeue, event. Nothing else in the worker acks or nacks.
//!
//! | outcome | action | event |
//! |---|---|---|
//! | delivered | ack | `delivered` |
//! | deferred | copy to retry step *k* (or dead, `retries exhausted`), confirmed, then ack | `deferred` (`dead`) |
//! | bounced | copy to the dead queue (`bounced`), confirmed, then ack | `bounced` |
//! | invalid | copy to the dead queue (`invalid`), confirmed, then ack | `dead` |
//! | relay fault, not attempted, pushed back | nack with requeue: back to its queue untouched | none |
//! | campaign paused | copy to the campaign's hold queue, confirmed, then ack | none |
//! | campaign cancelled | ack | `cancelled` |
//! | past its `not_after` | copy to the dead queue (`expired`), confirmed, then ack | `dead` |
//! | before its `not_before` | copy to a retry step (no attempt spent), confirmed, then ack | none |
//!
//! Rule: a delivery is acknowledged only after the job exists somewhere else for sure —
//! accepted by the relay, or its copy confirmed by the broker. There is no moment in which
//! a job exists nowhere; a crash in between gives a duplicate, never a loss. A copy's ack
//! goes out at once, so a job never lives both as the original and as its copy longer than
//! one round trip. Nothing waits for its retry while held unacknowledged.
//!
//! Acks are batched: a settled delivery's ack waits until the batch is full, [`ACK_LINGER`]
//! has passed, a copy was made, or the lane flushes (no further delivery ready, idle,
//! stop). A flush publishes the batch's events (one message per outcome and campaign, a
//! JSON array each), waits for the broker's confirms, and only then sends one `basic.ack`
//! with `multiple`: an event is never the only record of a job that is acknowledged, and a
//! crash between the confirm and the ack gives a duplicate event, never a missing one. A
//! [`Settler`] serves one channel with one consumer, and the lane settles that channel's
//! deliveries in the order they came, so everything up to the last settled tag is settled.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel};
use sluice_shared::events::{self, now_rfc3339, DeliveryEvent, EventOutcome};
use sluice_shared::headers;
use sluice_shared::{trace_context, Priority, Topology};
use tokio::sync::watch;

use crate::broker::{within, Broker, BrokerError, BROKER_DEADLINE};
use crate::metrics::Metrics;
use crate::tracing_spans::{event_trace_id, DeliverSpan};

/// How one attempt ended. Exactly one broker action follows from each (see [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx after DATA: the relay took responsibility for the message.
    Delivered { code: u16, reply: String },
    /// 4xx, a dropped connection or a timeout: try again later.
    Deferred {
        code: Option<u16>,
        reply: String,
        /// A wait the relay asked for in its reply ("try again in 120 seconds").
        retry_after: Option<Duration>,
    },
    /// 5xx for this recipient: permanent, kept in the dead queue for a replay.
    Bounced {
        code: u16,
        reply: String,
        /// The refusal came at RCPT (what a refusal streak counts).
        at_rcpt: bool,
    },
    /// The job itself is unusable: set aside, never retried.
    Invalid { reason: String },
    /// The relay refused us, not the job (the account, the sender, relaying, our address):
    /// the job goes back untouched and the relay is marked down.
    RelayFault { code: Option<u16>, reply: String },
    /// No attempt was made (no SMTP session, or the broker blocks publishing): the job
    /// goes back untouched.
    NotAttempted { why: String },
    /// The relay pushed back (too fast, too many sessions, suspended, the session ended
    /// with too many errors; see [`crate::pushback`]): the job goes back untouched, no
    /// attempt of its retry ladder spent, no event (`sluice_relay_throttled_total` counts it).
    PushedBack { code: Option<u16>, reply: String },
    /// Not attempted: an operator paused the job's campaign. It waits in the campaign's
    /// hold queue until resumed.
    Paused,
    /// Not attempted: an operator cancelled the job's campaign. It ends `cancelled`.
    Cancelled,
    /// Not attempted: the job's `not_after` has passed. It ends dead, `expired`.
    Expired,
    /// Not attempted: the job's `not_before` is `wait` away. It waits in a retry step
    /// without spending an attempt.
    NotYet { wait: Duration },
}

impl Outcome {
    /// The SMTP code, when the relay answered.
    pub fn smtp_code(&self) -> Option<u16> {
        match self {
            Self::Delivered { code, .. } | Self::Bounced { code, .. } => Some(*code),
            Self::Deferred { code, .. }
            | Self::RelayFault { code, .. }
            | Self::PushedBack { code, .. } => *code,
            Self::Invalid { .. }
            | Self::NotAttempted { .. }
            | Self::Paused
            | Self::Cancelled
            | Self::Expired
            | Self::NotYet { .. } => None,
        }
    }

    /// The `error.type` of an attempt that did not deliver (`None` for delivered): the
    /// outcome's name, as in the metrics.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            Self::Delivered { .. } => None,
            Self::Deferred { .. } => Some("deferred"),
            Self::Bounced { .. } => Some("bounced"),
            Self::Invalid { .. } => Some("invalid"),
            Self::RelayFault { .. } => Some("relay_fault"),
            Self::PushedBack { .. } => Some("pushed_back"),
            Self::NotAttempted { .. } => Some("not_attempted"),
            Self::Paused => Some("paused"),
            Self::Cancelled => Some("cancelled"),
            Self::Expired => Some("expired"),
            Self::NotYet { .. } => Some("not_yet"),
        }
    }

    /// The reply text (or the error, or why the job is invalid or was not attempted).
    pub fn reply(&self) -> &str {
        match self {
            Self::Delivered { reply, .. }
            | Self::Bounced { reply, .. }
            | Self::Deferred { reply, .. }
            | Self::RelayFault { reply, .. }
            | Self::PushedBack { reply, .. } => reply,
            Self::Invalid { reason } => reason,
            Self::NotAttempted { why } => why,
            Self::Paused => "its campaign is paused",
            Self::Cancelled => "its campaign was cancelled",
            Self::Expired => "its not_after has passed",
            Self::NotYet { .. } => "its not_before has not come yet",
        }
    }
}

/// What the broker must do with a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delivered: the job is finished.
    Finish,
    /// Wait in retry step `step` (1-based) for `delay`, then try again.
    Retry { step: usize, delay: Duration },
    /// Set aside in the dead queue, with `x-sluice-reason: reason`.
    SetAside { reason: &'static str },
    /// Back to its queue untouched.
    Requeue,
    /// Set aside in its campaign's hold queue until the campaign is resumed.
    Hold,
    /// Ended by its campaign's cancellation: acknowledged, never sent.
    Cancel,
    /// Wait in retry step `step` for `delay` without spending an attempt.
    Wait { step: usize, delay: Duration },
}

/// Reason header of a bounced job's copy in the dead queue.
pub const BOUNCED: &str = "bounced";

/// Reason header of an expired job's copy in the dead queue.
pub const EXPIRED: &str = "expired";

/// Header that records the last retry step used, so the ladder only moves forward.
const STEP: &str = "x-sluice-step";

/// Decide the action for an outcome, given the last retry step this job used (0 = none)
/// and the ladder. A relay's named wait picks the first step at least that long.
pub fn decide(outcome: &Outcome, last_step: usize, delays: &[Duration]) -> Action {
    match outcome {
        Outcome::Delivered { .. } => Action::Finish,
        Outcome::Bounced { .. } => Action::SetAside { reason: BOUNCED },
        Outcome::Invalid { .. } => Action::SetAside { reason: "invalid" },
        Outcome::RelayFault { .. } | Outcome::NotAttempted { .. } | Outcome::PushedBack { .. } => {
            Action::Requeue
        }
        Outcome::Paused => Action::Hold,
        Outcome::Cancelled => Action::Cancel,
        Outcome::Expired => Action::SetAside { reason: EXPIRED },
        Outcome::NotYet { wait } => wait_step(*wait, delays),
        Outcome::Deferred { retry_after, .. } => {
            let mut step = last_step.saturating_add(1);
            if step > delays.len() {
                return Action::SetAside {
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

/// Where a job waits `wait` for its `not_before`: the longest retry step no longer than the
/// wait, for that step's delay, so that every message of a step expires after the same
/// delay and none holds back the others (a queue expires messages at its head only); a wait
/// shorter than the first step waits exactly, in the first step. A job due later comes back
/// and waits again. Without a retry ladder it goes back to its queue.
fn wait_step(wait: Duration, delays: &[Duration]) -> Action {
    let Some(first) = delays.first() else {
        return Action::Requeue;
    };
    if wait < *first {
        return Action::Wait {
            step: 1,
            delay: wait.max(Duration::from_millis(1)),
        };
    }
    let (index, delay) = delays
        .iter()
        .enumerate()
        .filter(|(_, delay)| **delay <= wait)
        .max_by_key(|(_, delay)| **delay)
        .expect("the first step is no longer than the wait");
    Action::Wait {
        step: index + 1,
        delay: *delay,
    }
}

/// A job's attempt number as its headers give it, and what follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AttemptNumbers {
    /// This attempt (1 for the first; a missing or absurd header counts as 1).
    this: i64,
    /// The number its retry copy carries.
    next: i64,
    /// This attempt as a delivery event reports it.
    reported: u32,
}

/// Read `x-sluice-attempt`. The header comes from the broker, so anyone who can publish
/// can set it: the arithmetic saturates, never wraps or panics.
fn attempt_numbers(incoming: Option<&FieldTable>) -> AttemptNumbers {
    let this = headers::get_int(incoming, headers::ATTEMPT)
        .unwrap_or(1)
        .max(1);
    AttemptNumbers {
        this,
        next: this.saturating_add(1),
        reported: u32::try_from(this).unwrap_or(u32::MAX),
    }
}

/// The event an action reports, if any.
fn event_of(action: &Action) -> Option<EventOutcome> {
    match action {
        Action::Finish => Some(EventOutcome::Delivered),
        Action::Retry { .. } => Some(EventOutcome::Deferred),
        Action::SetAside { reason } if *reason == BOUNCED => Some(EventOutcome::Bounced),
        Action::SetAside { .. } => Some(EventOutcome::Dead),
        Action::Cancel => Some(EventOutcome::Cancelled),
        Action::Requeue | Action::Hold | Action::Wait { .. } => None,
    }
}

/// What is known about the attempt beyond its outcome.
pub struct AttemptInfo<'a> {
    /// The relay the attempt went through (differs from the queue's during failover).
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
    Broker(#[from] BrokerError),
    #[error("the broker refused the job's copy for queue {queue}")]
    Refused { queue: String },
}

/// At most this many settled deliveries wait for their (one, `multiple`) ack.
pub const ACK_BATCH: usize = 16;

/// The most jobs one SMTP session can send twice when its worker dies or loses the broker:
/// the settled deliveries whose batched ack had not gone out (a lane's batches add up to at
/// most [`ACK_BATCH`], whatever queues it consumes), plus the one being sent.
pub const MAX_REPEATED_PER_SESSION: usize = ACK_BATCH + 1;

/// Nor does a settled delivery wait longer than this for its ack (a rate-limited lane
/// settles slowly): it bounds what a crash repeats on a slow lane.
pub const ACK_LINGER: Duration = Duration::from_millis(100);

/// A lane's channel on the publishing connection, in confirm mode: copies and events.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    blocked: watch::Receiver<bool>,
}

impl Publisher {
    /// Open a confirm-mode channel on the worker's publishing connection.
    pub async fn open(broker: &Broker) -> Result<Self, BrokerError> {
        let channel = within(
            "opening a publishing channel",
            broker.publish.create_channel(),
        )
        .await?;
        within(
            "enabling publisher confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Self {
            channel,
            blocked: broker.blocked_changes(),
        })
    }

    /// Close the channel (best effort).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(BROKER_DEADLINE, self.channel.close(200, "lane done".into()))
            .await;
    }

    /// Publish a copy of the delivery straight into `queue` and wait for the broker's
    /// confirm. A Nack, an unroutable message, a deadline or a block is an error: the
    /// original stays unacknowledged. While the broker blocks publishing nothing is
    /// published at all, so that no copy lives beside an original that comes back.
    async fn copy(
        &self,
        delivery: &Delivery,
        queue: &str,
        headers: FieldTable,
        expiration: Option<String>,
    ) -> Result<(), SettleError> {
        const WHAT: &str = "copying a job";
        if *self.blocked.borrow() {
            return Err(BrokerError::Blocked { what: WHAT }.into());
        }
        let mut properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(expiration) = expiration {
            properties = properties.with_expiration(expiration.into());
        }
        let published = async {
            self.channel
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
                .await
        };
        let mut blocked = self.blocked.clone();
        let confirmation = tokio::select! {
            confirmation = within(WHAT, published) => confirmation?,
            _ = blocked.wait_for(|blocked| *blocked) => {
                return Err(BrokerError::Blocked { what: WHAT }.into());
            }
        };
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

    /// Publish the events of one flush, one message per outcome and campaign, and wait
    /// for the broker's confirms of all of them. An error means some may be missing: the
    /// deliveries they report must stay unacknowledged.
    async fn events(&self, events: &[DeliveryEvent], exchange: &str) -> Result<(), SettleError> {
        const WHAT: &str = "publishing delivery events";
        if *self.blocked.borrow() {
            return Err(BrokerError::Blocked { what: WHAT }.into());
        }
        let mut format = FieldTable::default();
        headers::set_int(&mut format, events::FORMAT_HEADER, events::FORMAT_VERSION);
        let published = async {
            let mut confirms = Vec::new();
            for (outcome, campaign, batch) in batches(events) {
                let body = serde_json::to_vec(&batch).expect("events serialize");
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_type(events::BATCH_KIND.into())
                    .with_delivery_mode(2)
                    .with_headers(format.clone());
                let confirm = self
                    .channel
                    .basic_publish(
                        exchange.into(),
                        events::routing_key(outcome, campaign).into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await?;
                confirms.push(confirm);
            }
            let mut refused = false;
            for confirm in confirms {
                refused |= confirm.await?.is_nack();
            }
            Ok::<_, lapin::Error>(refused)
        };
        let mut blocked = self.blocked.clone();
        let refused = tokio::select! {
            refused = within(WHAT, published) => refused?,
            _ = blocked.wait_for(|blocked| *blocked) => {
                return Err(BrokerError::Blocked { what: WHAT }.into());
            }
        };
        if refused {
            return Err(SettleError::Refused {
                queue: exchange.to_string(),
            });
        }
        Ok(())
    }
}

/// Group a flush's events by outcome and campaign, in the order each group first appears.
fn batches(events: &[DeliveryEvent]) -> Vec<(EventOutcome, &str, Vec<&DeliveryEvent>)> {
    let mut groups: Vec<(EventOutcome, &str, Vec<&DeliveryEvent>)> = Vec::new();
    for event in events {
        match groups
            .iter_mut()
            .find(|(outcome, campaign, _)| *outcome == event.outcome && *campaign == event.campaign)
        {
            Some((_, _, batch)) => batch.push(event),
            None => groups.push((event.outcome, &event.campaign, vec![event])),
        }
    }
    groups
}

/// Carries out [`Action`]s for the deliveries of one consumer channel.
pub struct Settler {
    publisher: Publisher,
    /// The relay whose queue the channel consumes (its retry ladder and dead queue).
    relay: String,
    /// The class of that queue: retries go to its ladder, copies record it.
    class: Priority,
    topology: Topology,
    delays: Arc<[Duration]>,
    metrics: Metrics,
    /// The last settled delivery whose ack has not been sent, and how many wait with it.
    unacked: Option<Acker>,
    /// The events of those deliveries, published (and confirmed) before their ack.
    events: Vec<DeliveryEvent>,
    waiting: usize,
    /// When the oldest delivery still waiting for its ack was settled.
    waiting_since: Option<std::time::Instant>,
    batch: usize,
    /// Hold queues this settler declared (one per paused campaign it met).
    holds_declared: std::collections::HashSet<String>,
}

impl Settler {
    /// A settler for the deliveries of `relay`'s `class` queue on one channel, acking in
    /// batches of up to `batch` (at most [`ACK_BATCH`]; 1 acks every delivery at once).
    pub fn new(
        publisher: Publisher,
        relay: &str,
        class: Priority,
        topology: Topology,
        delays: Arc<[Duration]>,
        metrics: Metrics,
        batch: usize,
    ) -> Self {
        Self {
            publisher,
            relay: relay.to_string(),
            class,
            topology,
            delays,
            metrics,
            unacked: None,
            events: Vec::with_capacity(batch.clamp(1, ACK_BATCH)),
            waiting: 0,
            waiting_since: None,
            batch: batch.clamp(1, ACK_BATCH),
            holds_declared: std::collections::HashSet::new(),
        }
    }

    /// Carry out what the outcome requires and return the action taken. An error leaves
    /// the delivery unacknowledged: the broker gives it to a worker again.
    pub async fn settle(
        &mut self,
        delivery: &Delivery,
        info: &AttemptInfo<'_>,
        outcome: &Outcome,
    ) -> Result<Action, SettleError> {
        let incoming = delivery.properties.headers().as_ref();
        let last_step = headers::get_int(incoming, STEP)
            .and_then(|step| usize::try_from(step).ok())
            .unwrap_or(0);
        let action = decide(outcome, last_step, &self.delays);
        if action == Action::Requeue {
            within(
                "requeueing a job",
                delivery.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                }),
            )
            .await?;
            return Ok(action);
        }

        let attempt = attempt_numbers(incoming);
        let now = now_rfc3339();
        let copied = match &action {
            Action::Retry { step, delay } => {
                let mut carried = self.carried_headers(incoming, info, outcome, &now);
                headers::set_int(&mut carried, headers::ATTEMPT, attempt.next);
                headers::set_int(&mut carried, STEP, *step as i64);
                self.wait_in_step(delivery, *step, *delay, carried).await?;
                true
            }
            Action::SetAside { reason } => {
                let mut carried = self.carried_headers(incoming, info, outcome, &now);
                headers::set_str(&mut carried, headers::REASON, reason);
                headers::set_int(&mut carried, headers::ATTEMPTS, attempt.this);
                let queue = self.topology.dead_queue(&self.relay);
                self.publisher.copy(delivery, &queue, carried, None).await?;
                true
            }
            Action::Wait { step, delay } => {
                // Not an attempt: the attempt and step headers stay as they were.
                let carried = self.where_from(incoming);
                self.wait_in_step(delivery, *step, *delay, carried).await?;
                true
            }
            Action::Hold => {
                self.hold(delivery, info.campaign, self.where_from(incoming))
                    .await?;
                self.metrics.held(info.via_relay);
                true
            }
            Action::Finish | Action::Cancel | Action::Requeue => false,
        };

        let Some(event) = event_of(&action) else {
            // Held or waiting: not an attempt, no event; the copy is acked at once.
            self.unacked = Some(delivery.acker.clone());
            self.waiting += 1;
            self.waiting_since
                .get_or_insert_with(std::time::Instant::now);
            self.flush().await?;
            return Ok(action);
        };
        match event {
            EventOutcome::Delivered => self.metrics.delivered(info.via_relay),
            EventOutcome::Deferred => self.metrics.deferred(info.via_relay),
            EventOutcome::Bounced => self.metrics.bounced(info.via_relay),
            EventOutcome::Dead => self.metrics.dead(info.via_relay),
            EventOutcome::Cancelled => self.metrics.cancelled(info.via_relay),
        }
        info.span.record_outcome(event);
        let delivery_event = DeliveryEvent {
            id: info.job_id.to_string(),
            campaign: info.campaign.to_string(),
            to: info.to.to_string(),
            relay: info.via_relay.to_string(),
            outcome: event,
            attempt: attempt.reported,
            smtp_code: outcome.smtp_code(),
            smtp_reply: Some(outcome.reply().to_string()),
            at: now,
            trace_id: event_trace_id(info.span, incoming),
        };
        self.events.push(delivery_event);
        self.unacked = Some(delivery.acker.clone());
        self.waiting += 1;
        let since = *self
            .waiting_since
            .get_or_insert_with(std::time::Instant::now);
        // A copy is acked at once: the job must not live as both original and copy.
        if copied || self.waiting >= self.batch || since.elapsed() >= ACK_LINGER {
            self.flush().await?;
        }
        Ok(action)
    }

    /// Publish the events of every settled delivery not acknowledged yet, wait for their
    /// confirms, then acknowledge those deliveries with one `multiple` ack. On an error
    /// nothing is forgotten: a later flush publishes the events again (a duplicate event
    /// at most, never a missing one) before it acks.
    pub async fn flush(&mut self) -> Result<(), SettleError> {
        if self.unacked.is_none() {
            return Ok(());
        }
        if !self.events.is_empty() {
            self.publisher
                .events(&self.events, &self.topology.events_exchange())
                .await?;
            self.events.clear();
        }
        if let Some(acker) = self.unacked.take() {
            self.waiting = 0;
            self.waiting_since = None;
            within(
                "acknowledging settled jobs",
                acker.ack(BasicAckOptions { multiple: true }),
            )
            .await?;
        }
        Ok(())
    }

    /// Copy the delivery into retry step `step` of its class, to come back after `delay`.
    async fn wait_in_step(
        &self,
        delivery: &Delivery,
        step: usize,
        delay: Duration,
        carried: FieldTable,
    ) -> Result<(), SettleError> {
        let queue = self
            .topology
            .class_retry_queue(&self.relay, self.class, step);
        let expiration = delay.as_millis().to_string();
        self.publisher
            .copy(delivery, &queue, carried, Some(expiration))
            .await
    }

    /// Copy a job of a paused campaign into the campaign's hold queue, declared the first
    /// time (and again if an operator's `resume` deleted it meanwhile).
    async fn hold(
        &mut self,
        delivery: &Delivery,
        campaign: &str,
        carried: FieldTable,
    ) -> Result<(), SettleError> {
        let spec = self.topology.hold_queue_spec(campaign);
        for _ in 0..2 {
            if !self.holds_declared.contains(&spec.name) {
                within(
                    "declaring a hold queue",
                    self.publisher.channel.queue_declare(
                        spec.name.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        spec.arguments.clone(),
                    ),
                )
                .await?;
                self.holds_declared.insert(spec.name.clone());
            }
            match self
                .publisher
                .copy(delivery, &spec.name, carried.clone(), None)
                .await
            {
                Err(SettleError::Refused { .. }) => {
                    self.holds_declared.remove(&spec.name);
                }
                copied => return copied,
            }
        }
        Err(SettleError::Refused { queue: spec.name })
    }

    /// The headers of a held or waiting job: the incoming ones but `x-death`, plus the
    /// relay and class whose queue it came from (where `resume` sends it back).
    fn where_from(&self, incoming: Option<&FieldTable>) -> FieldTable {
        let mut carried = FieldTable::default();
        if let Some(incoming) = incoming {
            for (key, value) in incoming.inner() {
                if key.as_str() != "x-death" {
                    carried.insert(key.clone(), value.clone());
                }
            }
        }
        headers::set_str(&mut carried, headers::RELAY, &self.relay);
        headers::set_str(&mut carried, headers::PRIORITY, self.class.as_str());
        carried
    }

    /// The headers of a retry or dead copy: the incoming ones but the broker's own
    /// `x-death` history, plus what this attempt adds.
    fn carried_headers(
        &self,
        incoming: Option<&FieldTable>,
        info: &AttemptInfo<'_>,
        outcome: &Outcome,
        now: &str,
    ) -> FieldTable {
        let mut carried = FieldTable::default();
        if let Some(incoming) = incoming {
            for (key, value) in incoming.inner() {
                if key.as_str() != "x-death" {
                    carried.insert(key.clone(), value.clone());
                }
            }
        }
        let first_attempt =
            headers::get_str(incoming, headers::FIRST_ATTEMPT).unwrap_or_else(|| now.to_string());
        headers::set_str(&mut carried, headers::FIRST_ATTEMPT, &first_attempt);
        headers::set_str(&mut carried, headers::LAST_ATTEMPT, now);
        headers::set_str(&mut carried, headers::RELAY, &self.relay);
        headers::set_str(&mut carried, headers::PRIORITY, self.class.as_str());
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
        carried
    }
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
    fn every_outcome_has_one_action() {
        let ladder: Vec<Duration> = [30, 120, 600, 3600]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        let retry = |step: usize| Action::Retry {
            step,
            delay: ladder[step - 1],
        };
        let exhausted = Action::SetAside {
            reason: "retries exhausted",
        };
        let cases = [
            (deferred(None), 0, retry(1)),
            (deferred(None), 1, retry(2)),
            (deferred(None), 3, retry(4)),
            (deferred(None), 4, exhausted.clone()),
            (deferred(Some(120)), 0, retry(2)),
            (deferred(Some(100)), 0, retry(2)),
            (deferred(Some(99999)), 0, retry(4)),
            (deferred(Some(10)), 2, retry(3)),
            (
                Outcome::Invalid { reason: "x".into() },
                0,
                Action::SetAside { reason: "invalid" },
            ),
            (
                Outcome::Bounced {
                    code: 550,
                    reply: "no".into(),
                    at_rcpt: true,
                },
                0,
                Action::SetAside { reason: BOUNCED },
            ),
            (
                Outcome::Delivered {
                    code: 250,
                    reply: "ok".into(),
                },
                2,
                Action::Finish,
            ),
            (
                Outcome::RelayFault {
                    code: Some(554),
                    reply: "5.7.1 Account suspended".into(),
                },
                1,
                Action::Requeue,
            ),
            (
                Outcome::NotAttempted {
                    why: "no session".into(),
                },
                0,
                Action::Requeue,
            ),
        ];
        for (outcome, last_step, expected) in cases {
            assert_eq!(
                decide(&outcome, last_step, &ladder),
                expected,
                "{outcome:?} after step {last_step}"
            );
        }
        assert_eq!(decide(&deferred(None), 0, &[]), exhausted);
        // A forged or corrupt step header never wraps around to an early step.
        assert_eq!(decide(&deferred(None), usize::MAX, &ladder), exhausted);
        assert_eq!(
            decide(
                &Outcome::Deferred {
                    code: Some(451),
                    reply: "later".into(),
                    retry_after: Some(Duration::MAX),
                },
                0,
                &ladder
            ),
            retry(4)
        );
    }

    #[test]
    fn attempt_numbers_saturate_whatever_the_header_says() {
        let with = |value: Option<i64>| {
            let mut table = FieldTable::default();
            if let Some(value) = value {
                headers::set_int(&mut table, headers::ATTEMPT, value);
            }
            attempt_numbers(Some(&table))
        };
        let cases = [
            (None, (1, 2, 1)),
            (Some(1), (1, 2, 1)),
            (Some(3), (3, 4, 3)),
            (Some(0), (1, 2, 1)),
            (Some(-5), (1, 2, 1)),
            (Some(i64::MIN), (1, 2, 1)),
            (Some(i64::MAX), (i64::MAX, i64::MAX, u32::MAX)),
            (
                Some(i64::from(u32::MAX) + 1),
                (1 << 32, (1 << 32) + 1, u32::MAX),
            ),
        ];
        for (header, expected) in cases {
            let numbers = with(header);
            assert_eq!(
                (numbers.this, numbers.next, numbers.reported),
                expected,
                "{header:?}"
            );
        }
        assert_eq!(attempt_numbers(None).this, 1);
    }

    #[test]
    fn steered_jobs_are_not_attempts() {
        let ladder: Vec<Duration> = [30, 120, 600, 3600]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        assert_eq!(decide(&Outcome::Paused, 2, &ladder), Action::Hold);
        assert_eq!(decide(&Outcome::Cancelled, 2, &ladder), Action::Cancel);
        assert_eq!(
            decide(&Outcome::Expired, 0, &ladder),
            Action::SetAside { reason: EXPIRED }
        );
        let wait = |secs: u64| {
            decide(
                &Outcome::NotYet {
                    wait: Duration::from_secs(secs),
                },
                3,
                &ladder,
            )
        };
        // The longest step no longer than the wait, for its whole delay: every message of a
        // step expires after the same delay. A short wait waits exactly, in the first step.
        let cases = [
            (5, 1, 5),
            (30, 1, 30),
            (119, 1, 30),
            (120, 2, 120),
            (7200, 4, 3600),
        ];
        for (secs, step, delay) in cases {
            assert_eq!(
                wait(secs),
                Action::Wait {
                    step,
                    delay: Duration::from_secs(delay)
                },
                "a wait of {secs} s"
            );
        }
        assert_eq!(
            decide(
                &Outcome::NotYet {
                    wait: Duration::from_secs(5)
                },
                0,
                &[]
            ),
            Action::Requeue
        );
        assert_eq!(event_of(&Action::Hold), None);
        assert_eq!(
            event_of(&Action::Wait {
                step: 1,
                delay: Duration::ZERO
            }),
            None
        );
        assert_eq!(event_of(&Action::Cancel), Some(EventOutcome::Cancelled));
    }

    #[test]
    fn only_a_requeue_goes_without_an_event() {
        assert_eq!(event_of(&Action::Finish), Some(EventOutcome::Delivered));
        assert_eq!(
            event_of(&Action::SetAside { reason: BOUNCED }),
            Some(EventOutcome::Bounced)
        );
        assert_eq!(
            event_of(&Action::SetAside { reason: "invalid" }),
            Some(EventOutcome::Dead)
        );
        assert_eq!(event_of(&Action::Requeue), None);
    }
}
