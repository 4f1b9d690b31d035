//! A per-test AMQP namespace on the real RabbitMQ, with helpers to look into its queues.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_shared::amqp::topology::inspect_queue;
use sluice_shared::Topology;

/// The broker every test uses.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A namespace of its own for one test, so tests run in parallel without seeing each
/// other's queues. Its queues and exchanges are deleted when it is dropped (best effort).
pub struct TestNamespace {
    pub name: String,
    /// The broker it lives on.
    pub url: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
    relays: Vec<String>,
    retry_steps: usize,
    /// Queues a test made the binaries create beyond the topology (hold queues).
    extra_queues: std::sync::Mutex<Vec<String>>,
}

impl TestNamespace {
    /// Delete `queue` too when the namespace goes (a hold queue a test made a campaign's
    /// pause create, for instance).
    pub fn delete_on_drop(&self, queue: String) {
        self.extra_queues.lock().expect("lock").push(queue);
    }

    /// A fresh namespace `t-<tag>-<random>`; declares the topology for `relays`.
    pub async fn new(tag: &str, relays: &[&str], retry_steps: usize) -> Self {
        Self::new_at(AMQP_URL, tag, relays, retry_steps).await
    }

    /// [`TestNamespace::new`] on the broker at `url` (a private node or cluster).
    pub async fn new_at(url: &str, tag: &str, relays: &[&str], retry_steps: usize) -> Self {
        let ns = Self::attach(url, &Self::fresh_name(tag), relays, retry_steps).await;
        ns.topology
            .declare(&ns.channel, relays, retry_steps)
            .await
            .expect("declare topology");
        ns
    }

    /// A name no other test uses: `t-<tag>-<random>`.
    pub fn fresh_name(tag: &str) -> String {
        format!(
            "t-{tag}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }

    /// Look into namespace `name` on the broker at `url` without declaring anything (the
    /// binaries under test declare it, or it exists already).
    pub async fn attach(url: &str, name: &str, relays: &[&str], retry_steps: usize) -> Self {
        let name = name.to_string();
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ must answer at {url} (the test command starts the machine's broker): {e}")
            });
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let topology = Topology::new(&name);
        Self {
            name,
            url: url.to_string(),
            topology,
            connection,
            channel,
            relays: relays.iter().map(|r| r.to_string()).collect(),
            retry_steps,
            extra_queues: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Ready messages in a queue. Panics, naming the queue, when the queue does not exist or
    /// the broker does not answer within 30 s: a lookup that failed is never a count of 0,
    /// so no "the queue is empty" can pass because nobody could look.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.try_queue_len(queue)
            .await
            .unwrap_or_else(|e| panic!("cannot count queue {queue}: {e}"))
    }

    /// Ready messages in a queue, or why they could not be counted (the queue is absent,
    /// the broker refused or did not answer within 30 s); for polls that go on through a
    /// broker's restart or failover.
    pub async fn try_queue_len(&self, queue: &str) -> Result<u32, String> {
        let lookup = async {
            match inspect_queue(&self.connection, queue).await {
                Ok(Some(declared)) => Ok(declared.message_count()),
                Ok(None) => Err(format!("NOT_FOUND: no queue {queue}")),
                Err(e) => Err(format!("the broker says: {e}")),
            }
        };
        tokio::time::timeout(Duration::from_secs(30), lookup)
            .await
            .map_err(|_| "the broker did not answer within 30 s".to_string())?
    }

    /// Whether a queue exists; panics when the broker cannot say.
    pub async fn queue_exists(&self, queue: &str) -> bool {
        match self.try_queue_len(queue).await {
            Ok(_) => true,
            Err(why) if why.contains("NOT_FOUND") => false,
            Err(why) => panic!("cannot tell whether {queue} exists: {why}"),
        }
    }

    /// Publish a raw body to the jobs exchange for `relay`, as another service would.
    pub async fn publish_raw(&self, relay: &str, message_id: &str, body: &[u8]) {
        self.publish_with(
            relay,
            body,
            BasicProperties::default().with_message_id(message_id.into()),
        )
        .await;
    }

    /// Publish a body with the given properties (persistent, JSON) and wait for the confirm.
    pub async fn publish_with(&self, relay: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.jobs_exchange().into(),
                relay.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker did not confirm the job");
    }

    /// Publish raw bodies `(message_id, body)` for `relay`, pipelining confirms.
    pub async fn publish_bodies(&self, relay: &str, bodies: &[(String, Vec<u8>)]) {
        let mut pending = Vec::new();
        for (id, body) in bodies {
            let confirm = self
                .channel
                .basic_publish(
                    self.topology.jobs_exchange().into(),
                    relay.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    BasicProperties::default()
                        .with_message_id(id.as_str().into())
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
                .expect("publish");
            pending.push(confirm);
            if pending.len() >= 500 {
                for confirm in pending.drain(..) {
                    assert!(confirm.await.expect("confirm").is_ack());
                }
            }
        }
        for confirm in pending {
            assert!(confirm.await.expect("confirm").is_ack());
        }
    }

    /// Publish `n` valid jobs for `relay` (ids `<prefix>-<i>`, recipients
    /// `<prefix>-<i>@example.org`), pipelining confirms; returns the ids.
    pub async fn publish_jobs(&self, relay: &str, prefix: &str, n: usize) -> Vec<String> {
        let bodies: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let body = job_json(&id, &format!("{id}@example.org")).into_bytes();
                (id, body)
            })
            .collect();
        self.publish_bodies(relay, &bodies).await;
        bodies.into_iter().map(|(id, _)| id).collect()
    }

    /// Take (and ack) every message now in a queue.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            message.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(message);
        }
        out
    }

    /// Everything the event log holds now, oldest first: read from its first entry up to a
    /// marker written for the purpose (not returned). Every event batch is checked against
    /// the schema.
    pub async fn read_log(&self) -> Vec<lapin::message::Delivery> {
        let log = self.topology.events_log();
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let marker = uuid::Uuid::new_v4().to_string();
        channel
            .basic_publish(
                "".into(),
                log.as_str().into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default()
                    .with_type(sluice_shared::events::MARKER_KIND.into())
                    .with_message_id(marker.as_str().into()),
            )
            .await
            .expect("publish marker")
            .await
            .expect("marker confirmed");
        channel
            .basic_qos(1000, Default::default())
            .await
            .expect("qos");
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            lapin::types::AMQPValue::LongString("first".into()),
        );
        let mut consumer = channel
            .basic_consume(
                log.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .expect("read the event log");
        let mut entries = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let delivery = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .expect("the marker came back within 60 s")
                .expect("the log reader stays open")
                .expect("a log entry");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
            if kind.as_deref() == Some(sluice_shared::events::MARKER_KIND) {
                if delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str())
                    == Some(marker.as_str())
                {
                    break;
                }
                continue;
            }
            if kind.as_deref() == Some(sluice_shared::events::BATCH_KIND) {
                crate::event_schema::assert_valid_batch(&delivery.data);
            }
            entries.push(delivery);
        }
        let _ = channel.close(200, "read".into()).await;
        entries
    }

    /// Every delivery event the log holds now, in the order logged.
    pub async fn logged_events(&self) -> Vec<sluice_shared::events::DeliveryEvent> {
        self.read_log()
            .await
            .iter()
            .filter(|d| {
                d.properties.kind().as_ref().map(|k| k.as_str())
                    == Some(sluice_shared::events::BATCH_KIND)
            })
            .flat_map(|d| sluice_shared::events::parse_batch(&d.data).expect("event batch"))
            .collect()
    }

    /// Collect events of this namespace from now on: bind a private queue to `<ns>.events`.
    pub async fn events(&self) -> EventTap {
        let channel = self.connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("event queue");
        channel
            .queue_bind(
                queue.name().clone(),
                self.topology.events_exchange().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind events");
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        EventTap {
            _channel: channel,
            consumer,
            seen: Vec::new(),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let mut queues = vec![
            self.topology.events_log(),
            self.topology.control(),
            self.topology.heads(),
        ];
        queues.extend(
            self.extra_queues
                .lock()
                .map(|q| q.clone())
                .unwrap_or_default(),
        );
        for relay in &self.relays {
            queues.push(self.topology.dead_queue(relay));
            for class in sluice_shared::Priority::ALL {
                queues.push(self.topology.class_queue(relay, class));
                for step in 1..=self.retry_steps.max(5) {
                    queues.push(self.topology.class_retry_queue(relay, class, step));
                }
            }
        }
        let exchanges = vec![
            self.topology.jobs_exchange(),
            self.topology.dead_exchange(),
            self.topology.events_exchange(),
        ];
        // Best effort, from a plain thread: Drop cannot await.
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let connection = Connection::connect(&url, ConnectionProperties::default())
                    .await
                    .ok()?;
                for queue in queues {
                    let channel = connection.create_channel().await.ok()?;
                    let _ = channel
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in exchanges {
                    let channel = connection.create_channel().await.ok()?;
                    let _ = channel
                        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "cleanup".into()).await;
                Some(())
            })
        })
        .join();
    }
}

/// Delivery events seen by a test.
pub struct EventTap {
    _channel: Channel,
    consumer: lapin::Consumer,
    pub seen: Vec<sluice_shared::events::DeliveryEvent>,
}

impl EventTap {
    /// Read events until `done(seen)` holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[sluice_shared::events::DeliveryEvent]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.seen) {
            if !self.read_batch(deadline).await {
                return done(&self.seen);
            }
        }
        true
    }

    /// A negative check: read every event that arrives for `period`, and panic, saying
    /// `what` was watched, as soon as `condition(seen)` no longer holds (or at the end).
    /// `what` says why `period` is long enough to mean it.
    pub async fn holds_throughout(
        &mut self,
        condition: impl Fn(&[sluice_shared::events::DeliveryEvent]) -> bool,
        period: Duration,
        what: &str,
    ) {
        let start = tokio::time::Instant::now();
        let deadline = start + period;
        loop {
            assert!(
                condition(&self.seen),
                "{what}: broken after {:?} of the {period:?} watched; events: {:?}",
                start.elapsed(),
                self.seen
            );
            if !self.read_batch(deadline).await {
                return;
            }
        }
    }

    /// Add the next batch to `seen`; false when none came by `deadline`. Panics when the
    /// tap itself fails: events nobody could read are not "no events".
    async fn read_batch(&mut self, deadline: tokio::time::Instant) -> bool {
        let delivery = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
            Err(_) => return false,
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(e))) => panic!("the event tap failed: {e}"),
            Ok(None) => panic!("the event tap was closed"),
        };
        crate::event_schema::assert_valid_batch(&delivery.data);
        let batch: Vec<sluice_shared::events::DeliveryEvent> =
            serde_json::from_slice(&delivery.data).expect("event batch JSON");
        let key = delivery.routing_key.as_str();
        for event in &batch {
            assert_eq!(
                key,
                sluice_shared::events::routing_key(event.outcome, &event.campaign),
                "every event of a batch has the batch's outcome and campaign"
            );
        }
        self.seen.extend(batch);
        true
    }

    /// Events with a final outcome (delivered, bounced, dead).
    pub fn finals(&self) -> Vec<&sluice_shared::events::DeliveryEvent> {
        self.seen.iter().filter(|e| e.outcome.is_final()).collect()
    }
}

pub use crate::wait::eventually;

/// Run `rabbitmqctl args...` against the machine's broker (the tests run as root beside
/// it): its stdout, or the command and everything it said when it failed or could not run.
pub fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("rabbitmqctl {args:?} could not run: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A valid job body (campaign `test`).
pub fn job_json(id: &str, to: &str) -> String {
    serde_json::json!({
        "id": id, "campaign": "test", "from": "news@example.com", "to": to,
        "subject": format!("Hello {id}"), "text": format!("Body of {id}")
    })
    .to_string()
}
