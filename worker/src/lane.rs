//! Lanes: the worker's units of concurrency. A lane's life: wait for work, take a budget
//! slot, open a session, consume, give everything back. A lane holds at most one slot, one
//! SMTP session and one window of unacknowledged jobs at a time.
//!
//! A lane waits until one of its queues has work, takes a fleet-wide budget slot, opens a
//! session, and only then starts consuming (see [`crate::feed`]): [`PROBE_JOBS`] jobs at
//! prefetch 1 to time the relay, then with a prefetch of [`lane_window`] (1 for a slow
//! relay, up to [`MAX_LANE_WINDOW`] for a fast one), and never more than
//! [`crate::memory::WINDOW_BYTES`] of the largest body seen: the job being sent, the next
//! ones ready behind it, and the settled ones whose batched ack has not gone out yet. So a
//! worker never holds more unacknowledged jobs than its sessions may have in flight, nor
//! more than a few MiB of waiting bodies per lane, and a crash redelivers at most a window.
//! A body bigger than the window's share narrows it (consumers cancelled, what they
//! received delivered and acked, new channels at the smaller prefetch). Each job then goes
//! through [`crate::step`]. The queues are the class queues (`high`, `normal`, `low`) of each
//! relay the lane serves; the window is split between them, at least one job each (see
//! [`crate::feed::class_windows`]), and a waiting `high` job is always sent next.
//!
//! When its queues stay empty for [`IDLE_RELEASE`], or the relay fails, or the broker
//! blocks publishing, or shutdown is asked for, it acks what it settled, cancels its
//! consumers, closes the session and gives the slot back.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use rand::Rng;
use sluice_shared::shutdown::Shutdown;
use sluice_shared::Priority;
use tokio::time::Instant;

use crate::broker::{within, BrokerError};
use crate::budget::{RateShare, Slot};
pub use crate::context::LaneContext;
use crate::feed::Feed;
use crate::memory::window_for_bytes;
use crate::relay::Relay;
use crate::settle::{Publisher, SettleError};
use crate::step::{deliver_one, Next, Sender};

/// A lane gives its slot back after its queues have been empty this long.
pub const IDLE_RELEASE: Duration = Duration::from_secs(2);

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
/// rate share, between 1 and [`MAX_LANE_WINDOW`]. A relay taking a second per message gets
/// 1; `smtp-sink` gets 32.
pub fn lane_window(share: Option<RateShare>, per_message: Duration) -> u16 {
    let by_time = WINDOW_WORK.as_secs_f64() / per_message.as_secs_f64().max(1e-6);
    let by_rate = share.map_or(f64::INFINITY, |share| {
        f64::from(share.messages) / share.window.as_secs_f64().max(1e-3)
    });
    (by_time.min(by_rate).floor() as u16).clamp(1, MAX_LANE_WINDOW)
}

/// Run one lane of `relay` until shutdown. An error means the broker connection failed
/// (or a broker operation missed its deadline): the supervisor replaces the lane, or
/// reconnects when the connection is gone.
pub async fn run_lane(ctx: Arc<LaneContext>, relay: Arc<Relay>) -> anyhow::Result<()> {
    let mut probe: Option<Channel> = None;
    // Since when this lane has seen work waiting without a slot to send it.
    let mut wanting_since: Option<Instant> = None;
    while !ctx.shutdown.is_triggered() {
        if ctx.broker.is_blocked() {
            let mut blocked = ctx.broker.blocked_changes();
            tokio::select! {
                _ = ctx.shutdown.wait() => {}
                _ = blocked.wait_for(|blocked| !*blocked) => {}
            }
            continue;
        }
        if let Some(until) = relay.health.down_until() {
            if ctx.relays.served_by(&relay).is_empty() {
                // Down with nothing to serve: wait for the cool-off to end, then probe.
                pause(&ctx.shutdown, until - Instant::now()).await;
                continue;
            }
        }
        let queues = ctx.relays.served_by(&relay);
        if queues.is_empty() || !has_work(&ctx, &mut probe, &queues).await? {
            wanting_since = None;
            pause(&ctx.shutdown, jitter(Duration::from_millis(400))).await;
            continue;
        }
        let wanting = *wanting_since.get_or_insert_with(Instant::now);
        let usable = relay.limits.sessions();
        let Some(slot) = relay.budget.try_acquire(usable).await? else {
            pause(&ctx.shutdown, jitter(Duration::from_millis(400))).await;
            continue;
        };
        wanting_since = None;
        let waited = wanting.elapsed().as_secs_f64();
        ctx.metrics.slot_wait_seconds(relay.name(), waited);
        let served = serve(&ctx, &relay, &slot, queues).await;
        if matches!(served, Ok(false)) {
            // No session (the relay refused one, or is down): a lane that asked again at
            // once would only add to the refusals. The slot is kept through the pause: a
            // worker that has not yet read this one's cut of the session limit from the
            // control stream would otherwise take the slot and be refused in turn.
            pause(&ctx.shutdown, jitter(Duration::from_secs(1))).await;
        }
        relay.budget.release(slot).await;
        served?;
    }
    Ok(())
}

/// Hold `slot`: open a session and deliver jobs from `queues` until idle, failure or stop.
/// The session is closed before this returns, on every path. False when no session opened.
async fn serve(
    ctx: &LaneContext,
    relay: &Relay,
    slot: &Slot,
    queues: Vec<String>,
) -> anyhow::Result<bool> {
    let mut lane = Lane {
        sender: Sender::new(ctx, relay, slot.index()),
        queues: &queues,
        last_delivery: Instant::now(),
        last_recheck: Instant::now(),
        draining: false,
        parked: None,
        window: 1,
        largest_body: 0,
        narrowing: false,
    };
    if !lane.sender.open_session().await {
        return Ok(false);
    }
    let publisher = match Publisher::open(&ctx.broker).await {
        Ok(publisher) => publisher,
        Err(e) => {
            lane.sender.close_session().await;
            return Err(e.into());
        }
    };
    let result = lane.consume(&publisher).await;
    lane.sender.close_session().await;
    // Closing the publishing channel waits for the broker, which may be blocking us: the
    // slot must not wait for it, nor for the flush of a feed the block parked.
    let parked = lane.parked.take();
    let (broker, shutdown) = (ctx.broker.clone(), ctx.shutdown.clone());
    tokio::spawn(async move {
        if let Some(mut feed) = parked {
            let mut blocked = broker.blocked_changes();
            let unblocked = async move { blocked.wait_for(|blocked| !*blocked).await.is_ok() };
            let unblocked = tokio::select! {
                _ = shutdown.wait() => false,
                unblocked = unblocked => unblocked,
            };
            if unblocked {
                if let Err(e) = feed.flush().await {
                    tracing::warn!(error = %e, "could not settle jobs after the broker unblocked; they will be delivered again");
                }
            }
            feed.close().await;
        }
        publisher.close().await
    });
    result.map(|()| true)
}

/// Why [`Lane::deliver_from`] returned.
enum LaneEnd {
    /// Idle, stop asked, relay failed, broker blocked (`Ok`), or an error.
    Stop(anyhow::Result<()>),
    /// The queues this lane should serve changed (a failover began or ended).
    Changed,
    /// The consumers were cancelled and everything they received is settled.
    StreamEnded,
    /// The number of deliveries asked for is done.
    Probed,
    /// A body arrived bigger than the window's byte share (see [`crate::memory`]).
    Narrow,
}

/// One lane's state while it holds a slot.
struct Lane<'a> {
    sender: Sender<'a>,
    queues: &'a [String],
    last_delivery: Instant,
    last_recheck: Instant,
    /// Consumers cancelled: deliver what was received, whatever changed meanwhile.
    draining: bool,
    /// Settled deliveries the broker's block kept from being flushed, on their channels.
    parked: Option<Feed>,
    /// The prefetch of the feed being consumed.
    window: u16,
    /// The largest job body this lane has received while holding its slot.
    largest_body: usize,
    /// Consumers cancelled to change the window: deliver what was received first.
    narrowing: bool,
}

impl Lane<'_> {
    /// Consume the lane's queues: time the relay at prefetch 1, then widen the window if
    /// the relay is fast and the bodies small (see [`crate::memory`]), and narrow it again
    /// when a bigger body arrives.
    async fn consume(&mut self, publisher: &Publisher) -> anyhow::Result<()> {
        let relay = self.sender.relay;
        let low_share = relay.client.settings().low_share;
        let mut feed = Feed::open(self.sender.ctx, publisher, self.queues, 1, low_share).await?;
        let mut end = self.deliver_from(&mut feed, Some(PROBE_JOBS)).await;
        if matches!(end, LaneEnd::Probed) {
            let per_message = self.sender.sending / PROBE_JOBS as u32;
            let by_time = lane_window(relay.rate_share, per_message);
            let window = by_time.min(window_for_bytes(self.largest_body));
            tracing::debug!(
                relay = relay.name(),
                ?per_message,
                largest_body = self.largest_body,
                window,
                "relay timed"
            );
            end = self.resize(&mut feed, publisher, window).await;
        }
        while matches!(end, LaneEnd::Narrow) {
            let window = self.window.min(window_for_bytes(self.largest_body));
            tracing::debug!(
                relay = relay.name(),
                largest_body = self.largest_body,
                window,
                "bigger bodies: narrower window"
            );
            end = self.resize(&mut feed, publisher, window).await;
        }
        if matches!(end, LaneEnd::Changed) {
            // Send what was already received before giving the slot back: returned jobs
            // count towards a quorum queue's delivery limit (RabbitMQ 4 sets one).
            feed.cancel().await;
            self.draining = true;
            end = self.deliver_from(&mut feed, None).await;
        }
        let result = match end {
            LaneEnd::Stop(result) => result,
            LaneEnd::StreamEnded | LaneEnd::Probed | LaneEnd::Changed | LaneEnd::Narrow => Ok(()),
        };
        // Ack what is settled, then stop taking jobs; closing the channels hands back
        // anything prefetched.
        let flushed = feed.flush().await;
        feed.cancel().await;
        if let Err(SettleError::Broker(BrokerError::Blocked { .. })) = flushed {
            // Jobs the relay accepted wait for their events, which the broker does not take
            // now: keep them unacknowledged on their open channel, not sent again.
            self.parked = Some(feed);
            return result;
        }
        feed.close().await;
        result.and(flushed.map_err(Into::into))
    }

    /// Go on consuming with a window of `window`. A different window needs channels of
    /// their own, opened once the current ones' deliveries are all settled (the batched,
    /// `multiple` acks rely on a channel's deliveries being settled in order): stop the
    /// consumers, deliver what they already received, ack it, then reopen.
    async fn resize(&mut self, feed: &mut Feed, publisher: &Publisher, window: u16) -> LaneEnd {
        if window == self.window {
            return self.deliver_from(feed, None).await;
        }
        feed.cancel().await;
        self.narrowing = true;
        let end = self.deliver_from(feed, None).await;
        self.narrowing = false;
        if !matches!(end, LaneEnd::StreamEnded) {
            return end;
        }
        if let Err(e) = feed.flush().await {
            return LaneEnd::Stop(Err(e.into()));
        }
        let low_share = self.sender.relay.client.settings().low_share;
        match Feed::open(self.sender.ctx, publisher, self.queues, window, low_share).await {
            Ok(resized) => {
                std::mem::replace(feed, resized).close().await;
                self.window = window;
                self.deliver_from(feed, None).await
            }
            Err(e) => LaneEnd::Stop(Err(e.into())),
        }
    }

    /// Deliver what `feed` brings, up to `limit` deliveries when given.
    async fn deliver_from(&mut self, feed: &mut Feed, limit: Option<usize>) -> LaneEnd {
        let ctx = self.sender.ctx;
        let mut recheck = tokio::time::interval(RECHECK);
        let mut blocked = ctx.broker.blocked_changes();
        let mut done = 0;
        loop {
            if limit.is_some_and(|limit| done >= limit) {
                return LaneEnd::Probed;
            }
            if ctx.shutdown.is_triggered() || ctx.broker.is_blocked() {
                return LaneEnd::Stop(Ok(()));
            }
            if !self.draining && self.last_recheck.elapsed() >= RECHECK {
                self.last_recheck = Instant::now();
                if ctx.relays.served_by(self.sender.relay) != self.queues {
                    return LaneEnd::Changed;
                }
            }
            // Take the next delivery if it is already here; otherwise ack what is settled
            // before waiting, so a quiet lane never sits on finished jobs.
            let next = match feed.ready() {
                Some(next) => next,
                None => {
                    match feed.flush().await {
                        Ok(()) => {}
                        // Parked by `consume`, flushed once the broker unblocks.
                        Err(SettleError::Broker(BrokerError::Blocked { .. })) => {
                            return LaneEnd::Stop(Ok(()))
                        }
                        Err(e) => return LaneEnd::Stop(Err(e.into())),
                    }
                    tokio::select! {
                        biased;
                        _ = ctx.shutdown.wait() => return LaneEnd::Stop(Ok(())),
                        _ = blocked.wait_for(|blocked| *blocked) => return LaneEnd::Stop(Ok(())),
                        _ = recheck.tick() => {
                            if self.last_delivery.elapsed() >= IDLE_RELEASE {
                                return LaneEnd::Stop(Ok(()));
                            }
                            continue;
                        }
                        next = feed.next() => next,
                    }
                }
            };
            let (index, delivery) = match next {
                None => return LaneEnd::StreamEnded,
                Some((_, Err(e))) => return LaneEnd::Stop(Err(e.into())),
                Some((index, Ok(delivery))) => (index, delivery),
            };
            self.last_delivery = Instant::now();
            self.largest_body = self.largest_body.max(delivery.data.len());
            done += 1;
            match deliver_one(&mut self.sender, feed, index, delivery).await {
                Ok(Next::Continue) => {}
                Ok(Next::GiveUpSlot) => return LaneEnd::Stop(Ok(())),
                Err(e) => return LaneEnd::Stop(Err(e)),
            }
            if limit.is_none()
                && !self.draining
                && !self.narrowing
                && window_for_bytes(self.largest_body) < self.window
            {
                return LaneEnd::Narrow;
            }
        }
    }
}

/// True when any class queue of the relays holds ready messages.
async fn has_work(
    ctx: &LaneContext,
    probe: &mut Option<Channel>,
    relays: &[String],
) -> anyhow::Result<bool> {
    let queues = relays
        .iter()
        .flat_map(|relay| Priority::ALL.map(|class| ctx.topology.class_queue(relay, class)));
    for queue in queues {
        if probe.as_ref().is_none_or(|c| !c.status().connected()) {
            *probe = Some(
                within(
                    "opening a probe channel",
                    ctx.broker.consume.create_channel(),
                )
                .await?,
            );
        }
        let channel = probe.as_ref().expect("probe channel");
        let declared = within(
            "looking at a jobs queue",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        match declared {
            Ok(queue) if queue.message_count() > 0 => return Ok(true),
            Ok(_) => {}
            Err(e) if !ctx.broker.consume.status().connected() => return Err(e.into()),
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
