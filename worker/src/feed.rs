//! A lane's deliveries: one channel, one consumer and one [`Settler`] per consumed queue.
//!
//! Delivery tags and `multiple` acks are per channel. With one consumer per channel, whose
//! deliveries the lane settles in the order they arrive, "everything up to the last settled
//! tag" is exactly what was settled. (Two queues on one channel interleave their tags, and
//! an ack with `multiple` would cover deliveries of the other queue still waiting.)
//!
//! The lane's window is split between its queues, so a lane never holds more
//! unacknowledged jobs than its window, whatever it consumes.

use futures_util::stream::{select_all, BoxStream, SelectAll, StreamExt};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;

use crate::broker::{within, BrokerError, BROKER_DEADLINE};
use crate::context::LaneContext;
use crate::settle::{Publisher, SettleError, Settler};

/// One consumed queue of a lane.
struct QueueFeed {
    relay: String,
    channel: Channel,
    tag: Option<ShortString>,
    settler: Settler,
}

/// A delivery and the index of the queue (in [`Feed`]) it came from.
pub type Tagged = (usize, lapin::Result<Delivery>);

/// The deliveries of a lane's queues, and their settlers.
pub struct Feed {
    queues: Vec<QueueFeed>,
    deliveries: SelectAll<BoxStream<'static, Tagged>>,
}

impl Feed {
    /// Consume `relays`' jobs queues, each on a channel of its own with a share of
    /// `window` (at least 1) as prefetch.
    pub async fn open(
        ctx: &LaneContext,
        publisher: &Publisher,
        relays: &[String],
        window: u16,
    ) -> Result<Feed, BrokerError> {
        let share = (window / relays.len().max(1) as u16).max(1);
        let mut feed = Feed {
            queues: Vec::new(),
            deliveries: select_all(Vec::new()),
        };
        for relay in relays {
            if let Err(e) = feed.add(ctx, publisher, relay, share).await {
                feed.close().await;
                return Err(e);
            }
        }
        Ok(feed)
    }

    async fn add(
        &mut self,
        ctx: &LaneContext,
        publisher: &Publisher,
        relay: &str,
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
                    ctx.topology.jobs_queue(relay).into(),
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
        let index = self.queues.len();
        let tag = consumer.tag();
        self.deliveries
            .push(consumer.map(move |delivery| (index, delivery)).boxed());
        self.queues.push(QueueFeed {
            relay: relay.to_string(),
            channel,
            tag: Some(tag),
            settler: Settler::new(
                publisher.clone(),
                relay,
                ctx.topology.clone(),
                ctx.delays.clone(),
                ctx.metrics.clone(),
                usize::from(prefetch / 2),
            ),
        });
        Ok(())
    }

    /// The next delivery if one is already here (`Some(None)`: every stream ended).
    pub fn ready(&mut self) -> Option<Option<Tagged>> {
        self.deliveries.next().now_or_never()
    }

    /// Wait for the next delivery (`None`: every stream ended).
    pub async fn next(&mut self) -> Option<Tagged> {
        self.deliveries.next().await
    }

    /// The relay whose queue the `index`-th consumer reads.
    pub fn relay(&self, index: usize) -> &str {
        &self.queues[index].relay
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

    /// Stop the consumers. What they already received stays in their streams, which end
    /// after it.
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
