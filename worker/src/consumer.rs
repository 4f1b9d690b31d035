//! Lanes: the worker's units of concurrency. A lane holds at most one budget slot, one SMTP
//! session and one window of unacknowledged jobs at a time.
//!
//! A lane waits until one of its queues has work, takes a fleet-wide budget slot, opens a
//! session, and only then starts consuming: [`PROBE_JOBS`] jobs at prefetch 1 to time the
//! relay, then with a prefetch of [`lane_window`] (1 for a slow relay, up to
//! [`MAX_LANE_WINDOW`] for a fast one): the job being sent, the next ones ready behind it,
//! and the settled ones whose batched ack has not gone out yet (see [`crate::outcome`]).
//! So a worker never holds more unacknowledged jobs than its sessions may have in flight,
//! and a crash redelivers at most that many.
//! When its queues stay empty for [`IDLE_RELEASE`], or the relay fails, or shutdown is asked
//! for, it acks what it settled, cancels its consumer, closes the session and gives the
//! slot back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{select_all, SelectAll, StreamExt};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use rand::Rng;
use sluice_shared::shutdown::Shutdown;
use sluice_shared::{Job, Topology};
use tokio::time::Instant;

use crate::budget::{Pacer, RateShare, Slot};
use crate::deliver::{self, Outcome};
use crate::metrics::Metrics;
use crate::outcome::{AttemptInfo, Settler};
use crate::relay::{Relay, Relays};
use crate::smtp::SmtpSession;
use crate::tracing_spans::{DeliverAttributes, DeliverSpan};

/// A lane gives its slot back after its queues have been empty this long.
pub const IDLE_RELEASE: Duration = Duration::from_secs(2);

/// Pause between taking a slot and opening its session.
const SLOT_SETTLE: Duration = Duration::from_millis(100);

/// The most unacknowledged jobs a lane holds (see [`lane_window`]).
pub const MAX_LANE_WINDOW: u16 = 32;

/// A lane's window holds about this much of its relay's work: enough to keep a fast relay's
/// session busy between broker round trips, little enough that the last jobs of a campaign
/// are not stuck behind one session while others sit idle.
const WINDOW_WORK: Duration = Duration::from_millis(100);

/// Jobs a lane sends at prefetch 1 to time its relay before it widens its window.
const PROBE_JOBS: usize = 8;

/// How often a busy lane checks whether the relays it serves changed (failover).
const RECHECK: Duration = Duration::from_millis(500);

/// A lane's prefetch once it has timed its relay: about [`WINDOW_WORK`] of messages at
/// `per_message` (the SMTP transaction's time), and no more than about one second of its
/// rate share, between 1 and [`MAX_LANE_WINDOW`]. A relay taking a second per message gets 1; `smtp-sink` gets 32.
pub fn lane_window(share: Option<RateShare>, per_message: Duration) -> u16 {
    let by_time = WINDOW_WORK.as_secs_f64() / per_message.as_secs_f64().max(1e-6);
    let by_rate = share.map_or(f64::INFINITY, |share| {
        f64::from(share.messages) / share.window.as_secs_f64().max(1e-3)
    });
    (by_time.min(by_rate).floor() as u16).clamp(1, MAX_LANE_WINDOW)
}

/// What every lane of a worker shares.
pub struct LaneContext {
    pub connection: Arc<Connection>,
    pub topology: Topology,
    pub relays: Arc<Relays>,
    pub delays: Arc<[Duration]>,
    pub max_message_bytes: usize,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

/// Run one lane of `relay` until shutdown. An error means the AMQP connection is broken:
/// the worker reconnects and starts its lanes again.
pub async fn run_lane(ctx: Arc<LaneContext>, relay: Arc<Relay>) -> anyhow::Result<()> {
    let mut probe: Option<Channel> = None;
    while !ctx.shutdown.is_triggered() {
        if let Some(until) = relay.health.down_until() {
            if ctx.relays.served_by(&relay).is_empty() {
                // Down with nothing to serve: wait for the cool-off to end, then probe.
                pause(&ctx.shutdown, until - Instant::now()).await;
                continue;
            }
        }
        let queues = ctx.relays.served_by(&relay);
        if queues.is_empty() || !has_work(&ctx, &mut probe, &queues).await? {
            pause(&ctx.shutdown, jitter(Duration::from_millis(400))).await;
            continue;
        }
        let Some(slot) = relay.budget.try_acquire().await? else {
            pause(&ctx.shutdown, jitter(Duration::from_millis(400))).await;
            continue;
        };
        let served = serve(&ctx, &relay, &slot, queues).await;
        relay.budget.release(slot).await;
        served?;
    }
    Ok(())
}

/// Hold `slot`: open a session and deliver jobs from `queues` until idle, failure or stop.
async fn serve(
    ctx: &LaneContext,
    relay: &Relay,
    _slot: &Slot,
    queues: Vec<String>,
) -> anyhow::Result<()> {
    let mut pacer = Pacer::new(relay.rate_share);
    // The slot's previous holder may have died a moment ago: give the relay time to see
    // its sessions close before this one opens.
    tokio::time::sleep(SLOT_SETTLE).await;
    let mut session = match open_session(ctx, relay).await {
        Some(session) => Some(session),
        None => return Ok(()),
    };

    let mut tags = Vec::new();
    let opened = async {
        let channel = open_channel(ctx).await?;
        let deliveries = consume(&channel, ctx, &queues, 1, &mut tags).await?;
        Ok::<_, lapin::Error>((channel, deliveries))
    }
    .await;
    let (mut channel, mut deliveries) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            if let Some(session) = session.take() {
                close_session(ctx, relay, session).await;
            }
            return Err(e.into());
        }
    };
    let mut lane = Lane {
        ctx,
        relay,
        queues: &queues,
        settler: settler_on(ctx, &channel, 1),
        session: &mut session,
        pacer: &mut pacer,
        sending: Duration::ZERO,
        last_delivery: Instant::now(),
        last_recheck: Instant::now(),
    };

    // Time the relay at prefetch 1 first, then widen the window if it is fast: on a channel
    // of its own, opened once the first one's deliveries are all settled (the batched,
    // `multiple` acks rely on a channel's deliveries being settled in order).
    let mut end = lane.deliver_from(&mut deliveries, Some(PROBE_JOBS)).await;
    if matches!(end, LaneEnd::Probed) {
        let per_message = lane.sending / PROBE_JOBS as u32;
        let window = lane_window(relay.rate_share, per_message);
        tracing::debug!(relay = relay.name(), ?per_message, window, "relay timed");
        if window > 1 {
            cancel(&channel, &mut tags).await;
            end = lane.deliver_from(&mut deliveries, None).await;
            if matches!(end, LaneEnd::StreamEnded) {
                end = match widen(ctx, &queues, &mut lane.settler, window, &mut tags).await {
                    Ok((wider, wider_deliveries)) => {
                        let _ = channel.close(200, "lane window widened".into()).await;
                        channel = wider;
                        deliveries = wider_deliveries;
                        lane.deliver_from(&mut deliveries, None).await
                    }
                    Err(e) => LaneEnd::Stop(Err(e)),
                };
            }
        } else {
            end = lane.deliver_from(&mut deliveries, None).await;
        }
    }
    let result = match end {
        LaneEnd::Stop(result) => result,
        LaneEnd::StreamEnded | LaneEnd::Probed => Ok(()),
    };

    // Ack what is settled, then stop taking jobs; closing the channel hands back anything
    // prefetched.
    let flushed = lane.settler.flush().await;
    cancel(&channel, &mut tags).await;
    let _ = channel.close(200, "lane idle".into()).await;
    if let Some(session) = session.take() {
        close_session(ctx, relay, session).await;
    }
    result.and(flushed.map_err(Into::into))
}

/// A channel in confirm mode, for a lane's consumers and the copies it publishes.
async fn open_channel(ctx: &LaneContext) -> lapin::Result<Channel> {
    let channel = ctx.connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Ack what the narrow window settled, then consume on a fresh channel with prefetch
/// `window`; `settler` moves to that channel, acking half the window at a time so the broker
/// refills it while the rest is sent.
async fn widen(
    ctx: &LaneContext,
    queues: &[String],
    settler: &mut Settler,
    window: u16,
    tags: &mut Vec<lapin::types::ShortString>,
) -> anyhow::Result<(Channel, SelectAll<Consumer>)> {
    settler.flush().await?;
    let channel = open_channel(ctx).await?;
    let deliveries = consume(&channel, ctx, queues, window, tags).await?;
    *settler = settler_on(ctx, &channel, usize::from(window / 2));
    Ok((channel, deliveries))
}

fn settler_on(ctx: &LaneContext, channel: &Channel, ack_batch: usize) -> Settler {
    Settler::new(
        channel.clone(),
        ctx.topology.clone(),
        ctx.delays.clone(),
        ctx.metrics.clone(),
        ack_batch,
    )
}

/// Start consuming `queues` with prefetch `window`; their consumer tags go into `tags`.
async fn consume(
    channel: &Channel,
    ctx: &LaneContext,
    queues: &[String],
    window: u16,
    tags: &mut Vec<lapin::types::ShortString>,
) -> lapin::Result<SelectAll<Consumer>> {
    // Per consumer: applies to the consumers started after it.
    channel
        .basic_qos(window, BasicQosOptions::default())
        .await?;
    let mut consumers = Vec::new();
    for queue_relay in queues {
        let consumer = channel
            .basic_consume(
                ctx.topology.jobs_queue(queue_relay).into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(consumer.tag());
        consumers.push(consumer);
    }
    Ok(select_all(consumers))
}

/// Cancel the consumers in `tags`. What they already received stays in their streams,
/// which end after it.
async fn cancel(channel: &Channel, tags: &mut Vec<lapin::types::ShortString>) {
    for tag in tags.drain(..) {
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
    }
}

/// Why [`Lane::deliver_from`] returned.
enum LaneEnd {
    /// Idle, stop asked, relays changed, relay failed (`Ok`), or the connection broke.
    Stop(anyhow::Result<()>),
    /// The consumers were cancelled and everything they received is settled.
    StreamEnded,
    /// The number of deliveries asked for is done.
    Probed,
}

/// One lane's state while it holds a slot and a session.
struct Lane<'a> {
    ctx: &'a LaneContext,
    relay: &'a Relay,
    queues: &'a [String],
    settler: Settler,
    session: &'a mut Option<SmtpSession>,
    pacer: &'a mut Pacer,
    /// Time spent in SMTP transactions (what the window is sized by).
    sending: Duration,
    last_delivery: Instant,
    last_recheck: Instant,
}

impl Lane<'_> {
    /// Deliver what `deliveries` brings, up to `limit` deliveries when given.
    async fn deliver_from(
        &mut self,
        deliveries: &mut SelectAll<Consumer>,
        limit: Option<usize>,
    ) -> LaneEnd {
        let ctx = self.ctx;
        let mut recheck = tokio::time::interval(RECHECK);
        let mut done = 0;
        loop {
            if limit.is_some_and(|limit| done >= limit) {
                return LaneEnd::Probed;
            }
            if ctx.shutdown.is_triggered() {
                return LaneEnd::Stop(Ok(()));
            }
            if self.last_recheck.elapsed() >= RECHECK {
                self.last_recheck = Instant::now();
                if ctx.relays.served_by(self.relay) != self.queues {
                    return LaneEnd::Stop(Ok(()));
                }
            }
            // Take the next delivery if it is already here; otherwise ack what is settled
            // before waiting, so a quiet lane never sits on finished jobs.
            let next = match deliveries.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Err(e) = self.settler.flush().await {
                        return LaneEnd::Stop(Err(e.into()));
                    }
                    tokio::select! {
                        biased;
                        _ = ctx.shutdown.wait() => return LaneEnd::Stop(Ok(())),
                        _ = recheck.tick() => {
                            if self.last_delivery.elapsed() >= IDLE_RELEASE {
                                return LaneEnd::Stop(Ok(()));
                            }
                            continue;
                        }
                        next = deliveries.next() => next,
                    }
                }
            };
            let delivery = match next {
                None => return LaneEnd::StreamEnded,
                Some(Err(e)) => return LaneEnd::Stop(Err(e.into())),
                Some(Ok(delivery)) => delivery,
            };
            self.last_delivery = Instant::now();
            done += 1;
            let delivered = deliver_one(
                ctx,
                self.relay,
                &mut self.settler,
                self.session,
                self.pacer,
                &mut self.sending,
                delivery,
            )
            .await;
            match delivered {
                Ok(true) => {}
                Ok(false) => return LaneEnd::Stop(Ok(())),
                Err(e) => return LaneEnd::Stop(Err(e)),
            }
        }
    }
}

/// Deliver one job and settle it. `Ok(false)` asks the lane to give up its slot (the relay
/// failed when a new session was needed).
async fn deliver_one(
    ctx: &LaneContext,
    relay: &Relay,
    settler: &mut Settler,
    session: &mut Option<SmtpSession>,
    pacer: &mut Pacer,
    sending: &mut Duration,
    delivery: Delivery,
) -> anyhow::Result<bool> {
    let source_relay = ctx
        .relays
        .get(delivery.routing_key.as_str())
        .map(|r| r.name().to_string())
        .unwrap_or_else(|| relay.name().to_string());
    ctx.metrics.received(&source_relay);
    let job = Job::from_bytes(&delivery.data, ctx.max_message_bytes);
    let prepared = job
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|job| deliver::prepare(job).map_err(|e| e.to_string()));
    let fallback_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_else(|| format!("unknown-{}", delivery.delivery_tag));
    let incoming = delivery.properties.headers().as_ref();
    // Builds nothing (the closure is not even called) when tracing is off.
    let span = DeliverSpan::start(incoming, || DeliverAttributes {
        queue: ctx.topology.jobs_queue(&source_relay).into(),
        message_id: job
            .as_ref()
            .map_or(fallback_id.as_str(), |job| job.id.as_str()),
        routing_key: delivery.routing_key.as_str(),
        relay: relay.name(),
        campaign: job
            .as_ref()
            .map_or("default", |job| job.campaign_or_default()),
        attempt: sluice_shared::headers::get_int(incoming, sluice_shared::headers::ATTEMPT)
            .unwrap_or(1)
            .max(1),
    });
    let relay_settings = relay.client.settings();

    let outcome = match prepared {
        Err(reason) => {
            tracing::warn!(job.id = %fallback_id, relay = %source_relay, %reason, "invalid job set aside");
            Outcome::Invalid { reason }
        }
        Ok(message) => {
            let max_per_session = relay.client.settings().max_messages_per_connection;
            let reusable = session
                .as_ref()
                .is_some_and(|s| s.is_usable() && s.sent() < max_per_session);
            if !reusable {
                if let Some(old) = session.take() {
                    close_session(ctx, relay, old).await;
                }
                let connect = span.child(
                    "smtp.connect",
                    relay.name(),
                    &relay_settings.host,
                    relay_settings.port,
                );
                let opened = open_session(ctx, relay).await;
                connect.end(None, opened.is_some(), "cannot open an SMTP session");
                match opened {
                    Some(new) => *session = Some(new),
                    None => {
                        // Not attempted: the job goes back to its queue untouched.
                        span.requeued("no SMTP session to the relay; requeued untouched");
                        delivery
                            .nack(BasicNackOptions {
                                requeue: true,
                                ..Default::default()
                            })
                            .await?;
                        return Ok(false);
                    }
                }
            }
            let live = session.as_mut().expect("a session is open");
            pacer.wait_turn().await;
            let send = span.child(
                "smtp.send",
                relay.name(),
                &relay_settings.host,
                relay_settings.port,
            );
            let started = std::time::Instant::now();
            let outcome = deliver::attempt(live, &message).await;
            send.end(
                outcome.smtp_code(),
                matches!(outcome, Outcome::Delivered { .. }),
                outcome.reply(),
            );
            let took = started.elapsed();
            *sending += took;
            ctx.metrics.send_seconds(relay.name(), took.as_secs_f64());
            if !live.is_usable() {
                // A timeout or a broken connection (or, on lettre's own path, any negative
                // reply) leaves the session unusable.
                if let Some(dead) = session.take() {
                    drop(dead);
                    ctx.metrics.sessions_open(relay.name()).dec();
                }
            }
            if let Some(fault) = deliver::relay_fault(relay.name(), &outcome) {
                // "Authentication required" is about our settings for the relay, not about
                // this job: mark the relay down and put the job back untouched.
                relay.health.mark_down(&fault);
                span.requeued("the relay refused us, not the job; requeued untouched");
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
                return Ok(false);
            }
            outcome
        }
    };

    let (job_id, campaign, to) = match &job {
        Ok(job) => (job.id.as_str(), job.campaign_or_default(), job.to.as_str()),
        Err(_) => (fallback_id.as_str(), "default", ""),
    };
    match &outcome {
        Outcome::Delivered { .. } => {
            tracing::debug!(job.id = job_id, relay = relay.name(), "delivered")
        }
        Outcome::Invalid { .. } => {}
        other => tracing::info!(
            job.id = job_id,
            relay = relay.name(),
            code = other.smtp_code(),
            reply = other.reply(),
            "not delivered"
        ),
    }
    let info = AttemptInfo {
        source_relay: &source_relay,
        via_relay: relay.name(),
        job_id,
        campaign,
        to,
        span: &span,
    };
    let settled = settler.settle(&delivery, &info, &outcome).await;
    match &settled {
        Ok(()) => span.finish(&outcome),
        Err(e) => span.failed(e),
    }
    settled.with_context(|| format!("settling job {job_id}"))?;
    Ok(true)
}

async fn open_session(ctx: &LaneContext, relay: &Relay) -> Option<SmtpSession> {
    match relay.client.open().await {
        Ok(session) => {
            relay.health.mark_up();
            ctx.metrics.sessions_open(relay.name()).inc();
            Some(session)
        }
        Err(error) => {
            relay.health.mark_down(&error);
            None
        }
    }
}

async fn close_session(ctx: &LaneContext, relay: &Relay, session: SmtpSession) {
    let was_usable = session.is_usable();
    session.close().await;
    if was_usable {
        ctx.metrics.sessions_open(relay.name()).dec();
    }
}

/// True when any of the relays' jobs queues holds ready messages.
async fn has_work(
    ctx: &LaneContext,
    probe: &mut Option<Channel>,
    relays: &[String],
) -> anyhow::Result<bool> {
    for relay in relays {
        if probe.as_ref().is_none_or(|c| !c.status().connected()) {
            *probe = Some(ctx.connection.create_channel().await?);
        }
        let channel = probe.as_ref().expect("probe channel");
        let declared = channel
            .queue_declare(
                ctx.topology.jobs_queue(relay).into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) if queue.message_count() > 0 => return Ok(true),
            Ok(_) => {}
            Err(e) if !ctx.connection.status().connected() => return Err(e.into()),
            Err(_) => *probe = None,
        }
    }
    Ok(false)
}

async fn pause(shutdown: &Shutdown, duration: Duration) {
    tokio::select! {
        _ = shutdown.wait() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

/// `base` plus or minus 25%, so that a fleet's lanes do not poll in step.
fn jitter(base: Duration) -> Duration {
    let factor = rand::rng().random_range(0.75..1.25);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::rate_share;

    #[test]
    fn the_window_holds_a_tenth_of_a_second_of_work_within_the_rate_share() {
        let ms = Duration::from_millis;
        let cases = [
            (None, ms(1500), 1),                     // a slow relay: one job at a time
            (None, ms(50), 2),                       // a typical remote relay
            (None, ms(3), 32),                       // smtp-sink on loopback: 33, capped
            (None, Duration::ZERO, MAX_LANE_WINDOW), // never more than the cap
            (rate_share(200, 4), ms(1), 32),         // 50/s per slot
            (rate_share(20, 4), ms(1), 5),           // 5/s per slot: a second of it
            (rate_share(1, 4), ms(1), 1),            // one message every 4 s
        ];
        for (share, per_message, expected) in cases {
            assert_eq!(
                lane_window(share, per_message),
                expected,
                "{share:?} at {per_message:?} per message"
            );
        }
    }
}
