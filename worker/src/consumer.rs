//! Lanes: the worker's units of concurrency. A lane holds at most one budget slot, one SMTP
//! session and one window of unacknowledged jobs at a time.
//!
//! A lane waits until one of its queues has work, takes a fleet-wide budget slot, opens a
//! session, and only then starts consuming, with a prefetch of [`lane_window`]: the job
//! being sent, the next ones ready behind it, and the settled ones whose batched ack has
//! not gone out yet (see [`crate::outcome`]). So a worker never holds more unacknowledged
//! jobs than its sessions may have in flight, and a crash redelivers at most that many.
//! When its queues stay empty for [`IDLE_RELEASE`], or the relay fails, or shutdown is asked
//! for, it acks what it settled, cancels its consumer, closes the session and gives the
//! slot back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{select_all, StreamExt};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
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

/// How often a busy lane checks whether the relays it serves changed (failover).
const RECHECK: Duration = Duration::from_millis(500);

/// A lane's prefetch: [`MAX_LANE_WINDOW`] when the relay has no rate limit, otherwise
/// about one second of the slot's rate share (at least 1), so that a slow lane does not
/// sit on jobs another worker could send.
pub fn lane_window(share: Option<RateShare>) -> u16 {
    match share {
        None => MAX_LANE_WINDOW,
        Some(share) => {
            let per_second = f64::from(share.messages) / share.window.as_secs_f64().max(1e-3);
            (per_second.ceil() as u16).clamp(1, MAX_LANE_WINDOW)
        }
    }
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

    let window = lane_window(relay.rate_share);
    let channel = ctx.connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(window, BasicQosOptions::default())
        .await?;
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for queue_relay in &queues {
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
    let mut deliveries = select_all(consumers);
    // Half the window acked at a time, so the broker refills it while the rest is sent.
    let mut settler = Settler::new(
        channel.clone(),
        ctx.topology.clone(),
        ctx.delays.clone(),
        ctx.metrics.clone(),
        usize::from(window / 2),
    );
    let mut recheck = tokio::time::interval(RECHECK);
    let mut last_delivery = Instant::now();
    let mut last_recheck = Instant::now();

    let result: anyhow::Result<()> = loop {
        if ctx.shutdown.is_triggered() {
            break Ok(());
        }
        if last_recheck.elapsed() >= RECHECK {
            last_recheck = Instant::now();
            if ctx.relays.served_by(relay) != queues {
                break Ok(());
            }
        }
        // Take the next delivery if it is already here; otherwise ack what is settled
        // before waiting, so a quiet lane never sits on finished jobs.
        let next = match deliveries.next().now_or_never() {
            Some(next) => next,
            None => {
                if let Err(e) = settler.flush().await {
                    break Err(e.into());
                }
                tokio::select! {
                    biased;
                    _ = ctx.shutdown.wait() => break Ok(()),
                    _ = recheck.tick() => {
                        if last_delivery.elapsed() >= IDLE_RELEASE {
                            break Ok(());
                        }
                        continue;
                    }
                    next = deliveries.next() => next,
                }
            }
        };
        let Some(delivery) = next else { break Ok(()) };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) => break Err(e.into()),
        };
        last_delivery = Instant::now();
        match deliver_one(ctx, relay, &mut settler, &mut session, &mut pacer, delivery).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };

    // Ack what is settled, then stop taking jobs; closing the channel hands back anything
    // prefetched.
    let flushed = settler.flush().await;
    for tag in tags {
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
    }
    let _ = channel.close(200, "lane idle".into()).await;
    if let Some(session) = session.take() {
        close_session(ctx, relay, session).await;
    }
    result.and(flushed.map_err(Into::into))
}

/// Deliver one job and settle it. `Ok(false)` asks the lane to give up its slot (the relay
/// failed when a new session was needed).
async fn deliver_one(
    ctx: &LaneContext,
    relay: &Relay,
    settler: &mut Settler,
    session: &mut Option<SmtpSession>,
    pacer: &mut Pacer,
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
            ctx.metrics
                .send_seconds(relay.name(), started.elapsed().as_secs_f64());
            if !live.is_usable() {
                // lettre closes a session after any negative reply or broken connection.
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
