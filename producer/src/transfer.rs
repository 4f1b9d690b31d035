//! Moving messages between queues, or round one queue, without losing one: each copy is
//! published with a confirm, and its original acknowledged only once that copy is confirmed.
//!
//! One message at a time: an interruption (a crash, a lost connection) can leave at most
//! one message in two places, never in none. No message is handed back to its queue (no
//! nack, no requeue) in the normal course, so a quorum queue's `x-delivery-count` does not
//! grow and a delivery limit is never approached; only the one message in flight when an
//! interruption closes the channel goes back.
//!
//! Copies published through a [`Publisher`] window are acknowledged with one `multiple` ack
//! per confirmed run ([`Transfer::ack_confirmed`]), never a burst of single acks: a quorum
//! queue holds back a burst of settlements and forgets what it held back when the channel
//! closes (rabbitmq-server#10327), so those originals would come back beside their copies.
//! Even one ack sent just before the close can be overtaken by the close on a busy broker:
//! [`Transfer::close`] gives the acks [`ACK_SETTLE`] to be applied first, and a caller that
//! takes from the same queue again afterwards recognises an original it already moved.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::publish::Publisher;

/// The broker's own count of a quorum queue message's earlier deliveries: it belongs to the
/// copy it was counted for, not to a new one.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// How long acks get to be applied by a quorum queue before their channel closes.
pub const ACK_SETTLE: Duration = Duration::from_secs(1);

/// A channel to take messages on (manual ack) and a confirm-mode channel to copy them with.
pub struct Transfer {
    take: Channel,
    put: Channel,
    /// When the last ack went out on `take`.
    last_ack: Mutex<Option<Instant>>,
}

impl Transfer {
    /// Open both channels on `connection`.
    pub async fn open(connection: &Connection) -> anyhow::Result<Self> {
        let take = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        let put = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        put.confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(Self {
            take,
            put,
            last_ack: Mutex::new(None),
        })
    }

    /// The next message of `queue`, unacknowledged, or `None` when it is empty.
    pub async fn take(&self, queue: &str) -> anyhow::Result<Option<Delivery>> {
        Ok(self
            .take
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("cannot read {queue}"))?
            .map(|message| message.delivery))
    }

    /// Publish a copy of `original` (its body, with `properties`) and, once the broker
    /// confirmed it, acknowledge the original. An unroutable copy (`mandatory`) or a Nack is
    /// an error, and the original stays where it was.
    pub async fn copy_then_ack(
        &self,
        original: &Delivery,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirmation = self
            .put
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &original.data,
                properties,
            )
            .await
            .with_context(|| format!("cannot publish to {exchange:?} ({routing_key})"))?
            .await
            .with_context(|| format!("no confirm from the broker for {routing_key}"))?;
        match confirmation {
            lapin::Confirmation::Ack(None) => {}
            lapin::Confirmation::Ack(Some(_)) => anyhow::bail!(
                "the broker could not route a copy to {routing_key} (queue or binding missing)"
            ),
            other => anyhow::bail!("the broker refused a copy for {routing_key}: {other:?}"),
        }
        self.ack(original).await
    }

    /// Copy `original` to the tail of `queue` itself (through the default exchange), then
    /// acknowledge it: taking N messages this way and stopping leaves the queue as it was.
    pub async fn rotate(&self, original: &Delivery, queue: &str) -> anyhow::Result<()> {
        self.copy_then_ack(original, "", queue, kept_properties(&original.properties))
            .await
            .with_context(|| format!("cannot put a message back at the tail of {queue}"))
    }

    /// Acknowledge (remove) `original` without a copy.
    pub async fn ack(&self, original: &Delivery) -> anyhow::Result<()> {
        self.acked();
        self.take
            .basic_ack(original.delivery_tag, BasicAckOptions::default())
            .await
            .context("cannot acknowledge a message")
    }

    /// Acknowledge the messages whose copies `publisher` confirmed since the last call, and
    /// return how many. `publisher` must carry the take tags (`keep_tags`) of messages
    /// published in the order they were taken, and every message taken before them must be
    /// acknowledged already: then one `multiple` ack up to the last confirmed tag removes
    /// exactly those.
    pub async fn ack_confirmed(&self, publisher: &mut Publisher) -> anyhow::Result<u64> {
        let mut confirmed = 0;
        let mut last = None;
        for tag in publisher.drain_confirmed() {
            confirmed += 1;
            last = Some(tag);
        }
        if let Some(last) = last {
            self.ack_through(last).await?;
        }
        Ok(confirmed)
    }

    /// Acknowledge every message taken so far up to `delivery_tag` in one `multiple` ack
    /// (one settlement, see the module's note on bursts of single acks).
    pub async fn ack_through(&self, delivery_tag: u64) -> anyhow::Result<()> {
        self.acked();
        self.take
            .basic_ack(delivery_tag, BasicAckOptions { multiple: true })
            .await
            .context("cannot acknowledge messages")
    }

    fn acked(&self) {
        *self.last_ack.lock().expect("last ack") = Some(Instant::now());
    }

    /// Close both channels, once the last ack had [`ACK_SETTLE`] to be applied; anything
    /// still unacknowledged goes back to its queue.
    pub async fn close(self) {
        let last_ack = *self.last_ack.lock().expect("last ack");
        if let Some(at) = last_ack {
            tokio::time::sleep_until((at + ACK_SETTLE).into()).await;
        }
        let _ = self.take.close(200, "done".into()).await;
        let _ = self.put.close(200, "done".into()).await;
    }
}

/// The properties of a copy: every property and header of the original, but the broker's
/// delivery count of the original.
pub fn kept_properties(original: &BasicProperties) -> BasicProperties {
    let Some(headers) = original.headers() else {
        return original.clone();
    };
    let mut kept = FieldTable::default();
    for (name, value) in headers.inner() {
        if !name.as_str().eq_ignore_ascii_case(DELIVERY_COUNT) {
            kept.insert(name.clone(), value.clone());
        }
    }
    original.clone().with_headers(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    #[test]
    fn a_copy_keeps_everything_but_the_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-sluice-reason".into(),
            AMQPValue::LongString("bounced".into()),
        );
        headers.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_expiration("30000".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let copy = kept_properties(&original);
        let names: Vec<String> = copy
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(names, ["x-sluice-reason"]);
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.expiration(), original.expiration());
        assert_eq!(copy.delivery_mode(), &Some(2));
    }
}
