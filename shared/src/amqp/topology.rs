//! Every exchange, queue, binding and queue argument sluice uses, named from the namespace.
//!
//! Nobody else spells a queue name. Both binaries call [`Topology::declare`] at start; the
//! declarations are idempotent, so the producer may run before any worker exists.
//!
//! ```text
//! <ns>.jobs (direct) --relay--> <ns>.jobs.<relay> (quorum) --dead-letter--> <ns>.dead (direct) --relay--> <ns>.dead.<relay> (classic)
//! worker --deferred--> <ns>.retry.<relay>.<step> --expires--> <ns>.jobs (routing key <relay>)
//! worker --outcome--> <ns>.events (topic, key <outcome>.<campaign>)
//! worker --holds--> <ns>.budget.<relay>.<slot> (exclusive: one per open SMTP session, fleet-wide)
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The names of everything in one namespace, and the code that declares them.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    /// The topology of one namespace (`amqp.namespace`).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    /// The namespace every name starts with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Direct exchange jobs are published to, with the relay name as routing key.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.namespace)
    }

    /// The queue a relay's jobs wait in.
    pub fn jobs_queue(&self, relay: &str) -> String {
        format!("{}.jobs.{relay}", self.namespace)
    }

    /// Direct exchange that catches what the broker dead-letters from a jobs queue.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Where a relay's jobs end when they cannot be delivered.
    pub fn dead_queue(&self, relay: &str) -> String {
        format!("{}.dead.{relay}", self.namespace)
    }

    /// Retry step `step` (1-based) of a relay's ladder.
    pub fn retry_queue(&self, relay: &str, step: usize) -> String {
        format!("{}.retry.{relay}.{step}", self.namespace)
    }

    /// Topic exchange of delivery events (`<outcome>.<campaign>`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// Durable queue that keeps one campaign's events for `sluice-producer watch`; it is
    /// declared before the campaign's first job is published, so no event is missed.
    pub fn campaign_watch_queue(&self, campaign: &str) -> String {
        format!("{}.watch.{campaign}", self.namespace)
    }

    /// Declare (idempotently) the queue that collects a campaign's events: bound to
    /// `*.<campaign>` on the events exchange, removed by the broker after a week unused.
    pub async fn declare_campaign_watch(
        &self,
        channel: &Channel,
        campaign: &str,
    ) -> lapin::Result<String> {
        let queue = self.campaign_watch_queue(campaign);
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(WATCH_QUEUE_EXPIRES_MS),
        );
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
        self.bind(
            channel,
            &queue,
            &self.events_exchange(),
            &format!("*.{campaign}"),
        )
        .await?;
        Ok(queue)
    }

    /// Exclusive queue whose existence means "budget slot `slot` of this relay is taken".
    pub fn budget_slot_queue(&self, relay: &str, slot: u32) -> String {
        format!("{}.budget.{relay}.{slot}", self.namespace)
    }

    /// Declare the exchanges, and for each relay its jobs, retry and dead queues.
    pub async fn declare(
        &self,
        channel: &Channel,
        relays: &[&str],
        retry_steps: usize,
    ) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (exchange, kind) in [
            (self.jobs_exchange(), ExchangeKind::Direct),
            (self.dead_exchange(), ExchangeKind::Direct),
            (self.events_exchange(), ExchangeKind::Topic),
        ] {
            channel
                .exchange_declare(exchange.into(), kind, durable, FieldTable::default())
                .await?;
        }
        for relay in relays {
            self.declare_relay(channel, relay, retry_steps).await?;
        }
        Ok(())
    }

    async fn declare_relay(
        &self,
        channel: &Channel,
        relay: &str,
        retry_steps: usize,
    ) -> lapin::Result<()> {
        let durable = QueueDeclareOptions::durable();

        // Jobs: quorum (replicated), and anything the broker itself gives up on (a delivery
        // limit, as RabbitMQ 4 sets by default) is dead-lettered, never dropped.
        let mut jobs_args = quorum();
        jobs_args.insert(
            "x-dead-letter-exchange".into(),
            string(&self.dead_exchange()),
        );
        let jobs_queue = self.jobs_queue(relay);
        channel
            .queue_declare(jobs_queue.as_str().into(), durable, jobs_args)
            .await?;
        self.bind(channel, &jobs_queue, &self.jobs_exchange(), relay)
            .await?;

        // Dead: a classic durable queue, not quorum. `sluice-producer dead list` peeks by
        // consuming without acking and closing the channel; a classic queue puts returned
        // messages back in their original place, while on RabbitMQ 3.10 a quorum queue
        // redelivers them ahead of the rest (reordering the list) and counts every peek
        // towards `x-delivery-count` (RabbitMQ 4 drops messages past its default limit of 20).
        let dead_queue = self.dead_queue(relay);
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), string("classic"));
        channel
            .queue_declare(dead_queue.as_str().into(), durable, dead_args)
            .await?;
        self.bind(channel, &dead_queue, &self.dead_exchange(), relay)
            .await?;

        // Retry steps: messages carry their own expiration (the step's delay), so changing
        // `retry.delays` never makes a redeclaration fail; when they expire the broker
        // dead-letters them back to the jobs exchange with the relay's routing key.
        for step in 1..=retry_steps {
            let mut args = FieldTable::default();
            args.insert(
                "x-dead-letter-exchange".into(),
                string(&self.jobs_exchange()),
            );
            args.insert("x-dead-letter-routing-key".into(), string(relay));
            channel
                .queue_declare(self.retry_queue(relay, step).into(), durable, args)
                .await?;
        }
        Ok(())
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<()> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

/// A campaign's watch queue disappears after a week without a consumer.
const WATCH_QUEUE_EXPIRES_MS: i64 = 7 * 24 * 3600 * 1000;

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology::new("acme");
        assert_eq!(t.jobs_exchange(), "acme.jobs");
        assert_eq!(t.jobs_queue("primary"), "acme.jobs.primary");
        assert_eq!(t.dead_queue("primary"), "acme.dead.primary");
        assert_eq!(t.retry_queue("primary", 2), "acme.retry.primary.2");
        assert_eq!(t.events_exchange(), "acme.events");
    }
}
