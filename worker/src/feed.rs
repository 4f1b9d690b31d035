//! A lane's deliveries: for each relay it serves, one channel, one consumer and one
//! [`Settler`] per class queue (`high`, `normal`, `low`), and the choice of which class's
//! job goes next.
//!
//! Delivery tags and `multiple` acks are per channel. With one consumer per channel, whose
//! deliveries the lane settles in the order they arrive, "everything up to the last settled
//! tag" is exactly what was settled. (Two queues on one channel interleave their tags, and
//! an ack with `multiple` would cover deliveries of the other queue still waiting.) Quorum
//! queues do not support a channel-wide (`global`) prefetch either, so each class queue
//! has its own channel and its own share of the lane's window (see [`class_windows`]).
//!
//! The feed holds at most one received job per queue at its head; the next job is the
//! head of a `high` queue whenever one is there, else `normal` or `low` as the relay's
//! [`Weighing`] says. A `high` job never waits behind jobs of the other classes the lane
//! has already received: only behind the send in progress.

use futures_util::future::select_all;
use futures_util::stream::{BoxStream, StreamExt};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use sluice_shared::priority::Weighing;
use sluice_shared::Priority;

use crate::broker::{within, BrokerError, BROKER_DEADLINE};
use crate::context::LaneContext;
use crate::settle::{Publisher, SettleError, Settler};

/// One consumed queue of a lane.
struct QueueFeed {
    relay: String,
    class: Priority,
    channel: Channel,
    tag: Option<ShortString>,
    settler: Settler,
    stream: BoxStream<'static, lapin::Result<Delivery>>,
    /// A received delivery not handed to the lane yet.
    head: Option<lapin::Result<Delivery>>,
    ended: bool,
}

/// A delivery and the index of the queue (in [`Feed`]) it came from.
pub type Tagged = (usize, lapin::Result<Delivery>);

/// The deliveries of a lane's queues, and their settlers.
pub struct Feed {
    queues: Vec<QueueFeed>,
    weighing: Weighing,
}

/// How a lane's window of `window` unacknowledged jobs is split between the class queues
/// of one relay: `[high, normal, low]`, each at least 1 (a queue with prefetch 0 would be
/// unlimited), so the total is `window`, or 3 when `window` is smaller. `high` gets one:
/// it is sent the moment it arrives. `low` gets about `low_share` of the rest.
pub fn class_windows(window: u16, low_share: f64) -> [u16; 3] {
    let rest = window.max(3) - 1;
    let low = ((f64::from(rest) * low_share).round() as u16).clamp(1, rest - 1);
    [1, rest - low, low]
}

impl Feed {
    /// Consume the class queues of `relays`, each on a channel of its own; together they
    /// hold at most `window` unacknowledged jobs (at least one per queue, see
    /// [`class_windows`]).
    pub async fn open(
        ctx: &LaneContext,
        publisher: &Publisher,
        relays: &[String],
        window: u16,
        low_share: f64,
    ) -> Result<Feed, BrokerError> {
        let share = (window / relays.len().max(1) as u16).max(1);
        let mut feed = Feed {
            queues: Vec::new(),
            weighing: Weighing::new(low_share),
        };
        for relay in relays {
            let windows = class_windows(share, low_share);
            for (class, prefetch) in Priority::ALL.into_iter().zip(windows) {
                if let Err(e) = feed.add(ctx, publisher, relay, class, prefetch).await {
                    feed.close().await;
                    return Err(e);
                }
            }
        }
        Ok(feed)
    }

    async fn add(
        &mut self,
        ctx: &LaneContext,
        publisher: &Publisher,
        relay: &str,
        class: Priority,
        prefetch: u16,
    ) -> Result<(), BrokerError> {
        let channel = within(
            "opening a consumer channel",
            ctx.broker.consume.create_channel(),
        )
        .await?;
        let consumed = async {
            within(
                "setting the prefetch",
                channel.basic_qos(prefetch, BasicQosOptions::default()),
            )
            .await?;
            within(
                "starting a consumer",
                channel.basic_consume(
                    ctx.topology.class_queue(relay, class).into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
        }
        .await;
        let consumer = match consumed {
            Ok(consumer) => consumer,
            Err(e) => {
                let _ = tokio::time::timeout(BROKER_DEADLINE, channel.close(200, "".into())).await;
                return Err(e);
            }
        };
        let tag = consumer.tag();
        self.queues.push(QueueFeed {
            relay: relay.to_string(),
            class,
            channel,
            tag: Some(tag),
            settler: Settler::new(
                publisher.clone(),
                relay,
                class,
                ctx.topology.clone(),
                ctx.delays.clone(),
                ctx.metrics.clone(),
                // Two thirds of the class's window: the `normal` queue's 25 of a window
                // of 32 flush every 16 jobs, as one queue's 32 did before the classes.
                usize::from(prefetch) * 2 / 3,
            ),
            stream: consumer.boxed(),
            head: None,
            ended: false,
        });
        Ok(())
    }

    /// Move what the consumers already received to the queues' heads, without waiting.
    fn fill_heads(&mut self) {
        for queue in &mut self.queues {
            if queue.head.is_some() || queue.ended {
                continue;
            }
            match queue.stream.next().now_or_never() {
                Some(Some(delivery)) => queue.head = Some(delivery),
                Some(None) => queue.ended = true,
                None => {}
            }
        }
    }

    /// Take the head the classes' order says goes next: an error first, then `high`, then
    /// `normal` or `low` by weight.
    fn take_head(&mut self) -> Option<Tagged> {
        if let Some(index) = self
            .queues
            .iter()
            .position(|q| matches!(q.head, Some(Err(_))))
        {
            return Some((index, self.queues[index].head.take()?));
        }
        let waiting = |class: Priority| {
            self.queues
                .iter()
                .position(|q| q.class == class && q.head.is_some())
        };
        let [high, normal, low] = Priority::ALL.map(waiting);
        let class = self
            .weighing
            .choose(high.is_some(), normal.is_some(), low.is_some())?;
        let index = match class {
            Priority::High => high,
            Priority::Normal => normal,
            Priority::Low => low,
        }?;
        Some((index, self.queues[index].head.take()?))
    }

    /// The next delivery if one is already here (`Some(None)`: every stream ended).
    pub fn ready(&mut self) -> Option<Option<Tagged>> {
        self.fill_heads();
        if let Some(tagged) = self.take_head() {
            return Some(Some(tagged));
        }
        self.queues.iter().all(|q| q.ended).then_some(None)
    }

    /// Wait for the next delivery (`None`: every stream ended). Cancel-safe: a delivery
    /// received while waiting stays at its queue's head.
    pub async fn next(&mut self) -> Option<Tagged> {
        loop {
            if let Some(ready) = self.ready() {
                return ready;
            }
            let (indices, waits): (Vec<usize>, Vec<_>) = self
                .queues
                .iter_mut()
                .enumerate()
                .filter(|(_, q)| !q.ended && q.head.is_none())
                .map(|(index, q)| (index, q.stream.next()))
                .unzip();
            if waits.is_empty() {
                return None;
            }
            let (received, which, _) = select_all(waits).await;
            let queue = &mut self.queues[indices[which]];
            match received {
                Some(delivery) => queue.head = Some(delivery),
                None => queue.ended = true,
            }
        }
    }

    /// The relay whose queue the `index`-th consumer reads.
    pub fn relay(&self, index: usize) -> &str {
        &self.queues[index].relay
    }

    /// The class of the queue the `index`-th consumer reads.
    pub fn class(&self, index: usize) -> Priority {
        self.queues[index].class
    }

    /// The settler of the `index`-th queue.
    pub fn settler(&mut self, index: usize) -> &mut Settler {
        &mut self.queues[index].settler
    }

    /// Ack everything settled on every channel.
    pub async fn flush(&mut self) -> Result<(), SettleError> {
        for queue in &mut self.queues {
            queue.settler.flush().await?;
        }
        Ok(())
    }

    /// Stop the consumers. What they already received stays in their streams (and at
    /// their heads), which end after it.
    pub async fn cancel(&mut self) {
        for queue in &mut self.queues {
            if let Some(tag) = queue.tag.take() {
                let _ = within(
                    "cancelling a consumer",
                    queue
                        .channel
                        .basic_cancel(tag, BasicCancelOptions::default()),
                )
                .await;
            }
        }
    }

    /// Close the channels: anything received and not acknowledged goes back to its queue.
    /// Flush first, or settled deliveries come back too.
    pub async fn close(self) {
        for queue in self.queues {
            let _ = tokio::time::timeout(
                BROKER_DEADLINE,
                queue.channel.close(200, "lane done".into()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_split_between_the_classes() {
        let cases = [
            (1, 0.2, [1, 1, 1]),
            (3, 0.2, [1, 1, 1]),
            (4, 0.2, [1, 2, 1]),
            (11, 0.2, [1, 8, 2]),
            (32, 0.2, [1, 25, 6]),
            (32, 0.0, [1, 30, 1]),
            (32, 1.0, [1, 1, 30]),
        ];
        for (window, low_share, expected) in cases {
            let split = class_windows(window, low_share);
            assert_eq!(split, expected, "window {window}, low_share {low_share}");
            assert_eq!(split.iter().sum::<u16>(), window.max(3));
        }
    }
}
