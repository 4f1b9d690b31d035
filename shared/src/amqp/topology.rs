//! Every exchange, queue, binding and queue argument sluice uses, named from the namespace.
//!
//! Nobody else spells a queue name. Both binaries call [`Topology::declare`] at start; the
//! declarations are idempotent, so the producer may run before any worker exists.
//!
//! Every queue that holds a job (jobs, retry steps, dead) is a quorum queue, replicated
//! across the cluster, and every move the broker makes between them (a retry step's
//! expiry back to the jobs exchange, a jobs queue's dead-lettering) is at-least-once:
//! the broker keeps the message until the target queue confirmed it.
//!
//! ```text
//! <ns>.jobs (direct) --relay--> <ns>.jobs.<relay> (quorum) --dead-letter--> <ns>.dead (direct) --relay--> <ns>.dead.<relay> (quorum)
//! <ns>.jobs (direct) --relay.high--> <ns>.jobs.<relay>.high (quorum), --relay.low--> <ns>.jobs.<relay>.low (quorum), dead-lettered alike
//! worker --deferred--> <ns>.retry.<relay>.<step> (quorum) --expires--> <ns>.jobs (routing key <relay>)
//! worker --deferred--> <ns>.retry.<relay>.high.<step> (quorum) --expires--> <ns>.jobs (routing key <relay>.high); .low alike
//! worker --outcome batch--> <ns>.events (topic, key <outcome>.<campaign>) --#--> <ns>.events.log (stream)
//! producer --campaign summary--> <ns>.events.log (straight into the stream, not via <ns>.events)
//! worker --holds--> <ns>.budget.<relay>.<slot> (exclusive: one per open SMTP session, fleet-wide)
//! worker --relay pushed back--> <ns>.control (stream) --every worker reads it from the start--> worker
//! producer --pause, resume, cancel, suspend--> <ns>.control (stream)
//! worker --job of a paused campaign--> <ns>.hold.<campaign> (quorum) --resume--> <ns>.jobs
//! worker --class queues' depth and oldest job, every 5 s--> <ns>.heads (stream, 10 min) --> relay status
//! ```

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{EventsSettings, Settings};
use crate::priority::Priority;

/// The end of the event log's name.
const EVENTS_LOG_SUFFIX: &str = ".events.log";
/// Segment size of the event log (RabbitMQ's default is 500 MB).
const LOG_SEGMENT_BYTES: i32 = 64 * 1024 * 1024;

/// How long the control stream keeps an entry: the event log's default retention, so that
/// a cancelled or paused campaign stays so as long as its events are kept. Fixed, not
/// configured: a stream's arguments cannot change once it is declared.
const CONTROL_MAX_AGE: &str = "7D";
/// Segment size of the small streams (control, heads).
const STREAM_SEGMENT_BYTES: i32 = 1024 * 1024;
/// How long the heads stream keeps the workers' reports: a reader wants the last few only.
const HEADS_MAX_AGE: &str = "10m";

/// The names of everything in one namespace, and the code that declares them.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    log_retention: EventsSettings,
}

impl Topology {
    /// The topology of one namespace, with the event log's default retention.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            log_retention: EventsSettings::default(),
        }
    }

    /// The topology the settings describe (`amqp.namespace`, `[events]`).
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            namespace: settings.amqp.namespace.clone(),
            log_retention: settings.events.clone(),
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

    /// The queue a relay's `normal` jobs wait in.
    pub fn jobs_queue(&self, relay: &str) -> String {
        format!("{}.jobs.{relay}", self.namespace)
    }

    /// The queue a relay's jobs of `class` wait in: `<ns>.jobs.<relay>` for `normal`,
    /// `<ns>.jobs.<relay>.high` and `.low` beside it.
    pub fn class_queue(&self, relay: &str, class: Priority) -> String {
        format!("{}.jobs.{relay}{}", self.namespace, class.suffix())
    }

    /// Direct exchange that catches what the broker dead-letters from a jobs queue.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Where a relay's jobs end when they cannot be delivered.
    pub fn dead_queue(&self, relay: &str) -> String {
        format!("{}.dead.{relay}", self.namespace)
    }

    /// Retry step `step` (1-based) of a relay's ladder for `normal` jobs.
    pub fn retry_queue(&self, relay: &str, step: usize) -> String {
        format!("{}.retry.{relay}.{step}", self.namespace)
    }

    /// Retry step `step` of a relay's ladder for jobs of `class`: its messages expire back
    /// to `<ns>.jobs` with the class's routing key, so a retried job keeps its class.
    pub fn class_retry_queue(&self, relay: &str, class: Priority, step: usize) -> String {
        format!("{}.retry.{relay}{}.{step}", self.namespace, class.suffix())
    }

    /// Topic exchange of delivery events (`<outcome>.<campaign>`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// The event log: a stream bound to the events exchange (every event batch), into which
    /// the producer also writes campaign summaries. Readers replay it; nothing consumes it
    /// away.
    pub fn events_log(&self) -> String {
        format!("{}{EVENTS_LOG_SUFFIX}", self.namespace)
    }

    /// The event log's arguments and binding (every routing key of the events exchange).
    pub fn events_log_spec(&self) -> QueueSpec {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), string("stream"));
        let max_age = format!("{}s", self.log_retention.max_age.as_secs());
        arguments.insert("x-max-age".into(), string(&max_age));
        arguments.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.log_retention.max_bytes).unwrap_or(i64::MAX)),
        );
        // Retention drops whole segments: small ones keep the log close to its limits.
        arguments.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongInt(LOG_SEGMENT_BYTES),
        );
        QueueSpec {
            name: self.events_log(),
            arguments,
            binding: Some((self.events_exchange(), "#".into())),
        }
    }

    /// Declare (idempotently) the event log and bind it to the events exchange. A log that
    /// exists with another retention is a [`TopologyError::LogRetention`].
    pub async fn declare_events_log(&self, channel: &Channel) -> Result<(), TopologyError> {
        self.declare_queue(channel, &self.events_log_spec()).await
    }

    /// The control stream: what a worker learned from a relay that pushes back (its rate
    /// cut, its session limit, its suspension) and the operators' commands (pause, resume,
    /// cancel, suspend), which every worker follows. A stream, so a worker started later
    /// replays it and starts throttled, and obeys a pause given before it started.
    pub fn control(&self) -> String {
        format!("{}.control", self.namespace)
    }

    /// The control stream's arguments: a week of entries at most, in small segments (an
    /// entry is a few hundred bytes; retention drops whole segments).
    pub fn control_spec(&self) -> QueueSpec {
        small_stream(self.control(), CONTROL_MAX_AGE)
    }

    /// The heads stream: every worker reports, each time it samples its class queues, their
    /// depth and the age of their oldest job, so that `relay status` can show what only a
    /// consumer sees (a producer cannot look at a quorum queue's head without taking it).
    pub fn heads(&self) -> String {
        format!("{}.heads", self.namespace)
    }

    /// The heads stream's arguments: ten minutes of reports, in small segments.
    pub fn heads_spec(&self) -> QueueSpec {
        small_stream(self.heads(), HEADS_MAX_AGE)
    }

    /// Where a paused campaign's jobs wait until it is resumed (or cancelled).
    pub fn hold_queue(&self, campaign: &str) -> String {
        format!("{}.hold.{campaign}", self.namespace)
    }

    /// The hold queue's arguments: a quorum queue like every queue that holds jobs, fed by
    /// the workers directly (no binding).
    pub fn hold_queue_spec(&self, campaign: &str) -> QueueSpec {
        QueueSpec {
            name: self.hold_queue(campaign),
            arguments: quorum(),
            binding: None,
        }
    }

    /// Exclusive queue whose existence means "budget slot `slot` of this relay is taken".
    pub fn budget_slot_queue(&self, relay: &str, slot: u32) -> String {
        format!("{}.budget.{relay}.{slot}", self.namespace)
    }

    /// Temporary queue `sluice-producer migrate-queues` keeps a queue's messages in while
    /// it recreates that queue. A relay name holds no '.', so this never names a real queue.
    pub fn migration_queue(&self, queue: &str) -> String {
        format!("{queue}.migrating")
    }

    /// Every queue that holds jobs for these relays, with the arguments it must have and
    /// the binding that feeds it: the one definition both [`Topology::declare`] and the
    /// migration use.
    pub fn job_queues(&self, relays: &[&str], retry_steps: usize) -> Vec<QueueSpec> {
        let mut specs = Vec::new();
        for relay in relays {
            // Jobs: anything the broker itself gives up on (a delivery limit, as RabbitMQ 4
            // sets by default) is dead-lettered, at least once, never dropped.
            // One queue per class (quorum queues have no priorities), each with every
            // guarantee of the others; dead-lettered with the relay's key to its one dead
            // queue.
            for class in Priority::ALL {
                specs.push(QueueSpec {
                    name: self.class_queue(relay, class),
                    arguments: at_least_once_dead_lettering(
                        &self.dead_exchange(),
                        (class != Priority::Normal).then_some(*relay),
                    ),
                    binding: Some((self.jobs_exchange(), class.routing_key(relay))),
                });
            }
            // Retry steps: messages carry their own expiration (the step's delay), so
            // changing `retry.delays` never makes a redeclaration fail; when they expire the
            // broker moves them back to the jobs exchange with their class's routing key,
            // and keeps them until the jobs queue confirmed them (at-least-once).
            for class in Priority::ALL {
                let key = class.routing_key(relay);
                for step in 1..=retry_steps {
                    specs.push(QueueSpec {
                        name: self.class_retry_queue(relay, class, step),
                        arguments: at_least_once_dead_lettering(&self.jobs_exchange(), Some(&key)),
                        binding: None,
                    });
                }
            }
            // Dead: replicated like the rest. `dead list` reads it by rotation (take, copy
            // to the tail, confirm, ack), never by returning messages, so neither its order
            // nor `x-delivery-count` changes (see producer/src/dead.rs).
            specs.push(QueueSpec {
                name: self.dead_queue(relay),
                arguments: quorum(),
                binding: Some((self.dead_exchange(), relay.to_string())),
            });
        }
        specs
    }

    /// Declare the exchanges, and for each relay its jobs, retry and dead queues.
    ///
    /// A queue left by an older sluice with other arguments (a classic retry or dead queue,
    /// a jobs queue without at-least-once dead-lettering) is a [`TopologyError::Mismatch`]
    /// naming it and the migration command: it is never used as it is.
    pub async fn declare(
        &self,
        channel: &Channel,
        relays: &[&str],
        retry_steps: usize,
    ) -> Result<(), TopologyError> {
        self.declare_exchanges(channel).await?;
        self.declare_events_log(channel).await?;
        self.declare_queue(channel, &self.control_spec()).await?;
        self.declare_queue(channel, &self.heads_spec()).await?;
        for spec in self.job_queues(relays, retry_steps) {
            self.declare_queue(channel, &spec).await?;
        }
        Ok(())
    }

    /// Whether `spec`'s queue exists and, if it does, has exactly the arguments this
    /// version declares: a mismatch is a [`TopologyError::Mismatch`]. Creates nothing;
    /// uses channels of its own, since the broker closes a channel on either answer.
    pub async fn check_queue(
        &self,
        connection: &Connection,
        spec: &QueueSpec,
    ) -> Result<QueueState, TopologyError> {
        let messages = match inspect_queue(connection, &spec.name).await? {
            Some(declared) => declared.message_count(),
            None => return Ok(QueueState::Absent),
        };
        // Redeclaring an existing queue with the same arguments changes nothing.
        let channel = connection.create_channel().await?;
        declare_durable(&channel, spec).await?;
        let _ = channel.close(200, "checked".into()).await;
        Ok(QueueState::Matches { messages })
    }

    /// Declare (idempotently) the exchanges jobs, dead letters and events go through.
    pub async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
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
        Ok(())
    }

    /// Declare one queue of [`Topology::job_queues`] and its binding. On a mismatch the
    /// broker closes `channel` (PRECONDITION_FAILED); the error says what differs.
    pub async fn declare_queue(
        &self,
        channel: &Channel,
        spec: &QueueSpec,
    ) -> Result<(), TopologyError> {
        declare_durable(channel, spec).await?;
        if let Some((exchange, key)) = &spec.binding {
            self.bind(channel, &spec.name, exchange, key).await?;
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

/// One queue that holds jobs: its name, the arguments it is declared with, and the
/// `(exchange, routing key)` binding that feeds it, if any.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: FieldTable,
    pub binding: Option<(String, String)>,
}

/// What [`Topology::check_queue`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// No such queue.
    Absent,
    /// The queue exists as declared, holding this many ready messages.
    Matches { messages: u32 },
}

/// The command that recreates queues left by an older sluice; every message names it.
pub const MIGRATE_COMMAND: &str = "sluice-producer migrate-queues";

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A queue exists with other arguments than this version declares (typically one left
    /// by an older sluice). Retrying cannot help: the queue must be migrated.
    #[error(
        "queue {queue} {difference}: stop the workers and run `{MIGRATE_COMMAND}` \
         (it moves the messages to a temporary queue, recreates the queue and moves them back)"
    )]
    Mismatch {
        /// The queue at fault.
        queue: String,
        /// What differs, e.g. "is a classic queue, sluice now needs quorum".
        difference: String,
    },
    /// The event log exists with another retention than `[events]` gives.
    #[error(
        "the event log {stream} {difference}: put the old [events] values back, or delete \
         the stream so that it is declared again (the events it holds are lost)"
    )]
    LogRetention {
        /// The stream at fault.
        stream: String,
        /// What differs.
        difference: String,
    },
    /// The broker or the connection failed; retrying may help.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

impl TopologyError {
    /// Classify a failed `queue.declare` of `queue`.
    fn from_declare(queue: &str, error: lapin::Error) -> TopologyError {
        let text = error.to_string();
        if !text.contains("PRECONDITION_FAILED") || !text.contains("inequivalent arg") {
            return TopologyError::Broker(error);
        }
        let difference = describe_inequivalence(&text);
        // Job queue names end in a relay name or a step number, never like the log's.
        if queue.ends_with(EVENTS_LOG_SUFFIX) {
            return TopologyError::LogRetention {
                stream: queue.to_string(),
                difference,
            };
        }
        TopologyError::Mismatch {
            queue: queue.to_string(),
            difference,
        }
    }

    /// Whether this is a queue to migrate rather than a broker fault.
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            TopologyError::Mismatch { .. } | TopologyError::LogRetention { .. }
        )
    }
}

/// A queue as the broker describes it (messages ready, consumers), `None` when it does not
/// exist. A passive declaration: nothing is created or consumed. The broker closes the
/// channel when the queue is missing, so each look has a channel of its own.
pub async fn inspect_queue(
    connection: &Connection,
    queue: &str,
) -> Result<Option<lapin::Queue>, lapin::Error> {
    let channel = connection.create_channel().await?;
    let found = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = channel.close(200, "checked".into()).await;
    match found {
        Ok(declared) => Ok(Some(declared)),
        Err(e) if e.to_string().contains("NOT_FOUND") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Declare `spec`'s queue, durable with its arguments; a queue that exists with other
/// arguments is a [`TopologyError::Mismatch`].
async fn declare_durable(channel: &Channel, spec: &QueueSpec) -> Result<(), TopologyError> {
    channel
        .queue_declare(
            spec.name.as_str().into(),
            QueueDeclareOptions::durable(),
            spec.arguments.clone(),
        )
        .await
        .map_err(|e| TopologyError::from_declare(&spec.name, e))?;
    Ok(())
}

/// Turn RabbitMQ's "inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received
/// 'quorum' but current is 'classic'" into "is a classic queue, sluice now needs quorum".
fn describe_inequivalence(text: &str) -> String {
    let quoted = |after: &str| -> Option<String> {
        let rest = &text[text.find(after)? + after.len()..];
        let rest = rest.strip_prefix('\'').unwrap_or(rest);
        Some(rest[..rest.find('\'')?].to_string())
    };
    let arg = quoted("inequivalent arg ").unwrap_or_else(|| "?".into());
    let current = if text.contains("but current is none") {
        None
    } else {
        quoted("but current is ")
    };
    let wanted = quoted("received the value ").or_else(|| quoted("received "));
    match (arg.as_str(), current, wanted) {
        ("x-queue-type", Some(current), Some(wanted)) => {
            format!("is a {current} queue, sluice now needs {wanted}")
        }
        ("x-queue-type", None, Some(wanted)) => {
            format!("is a classic queue, sluice now needs {wanted}")
        }
        (arg, None, Some(wanted)) => {
            format!("has no {arg}, sluice now needs {arg} = {wanted}")
        }
        (arg, Some(current), Some(wanted)) => {
            format!("has {arg} = {current}, sluice now needs {wanted}")
        }
        (arg, current, None) => format!(
            "has {arg} = {}, which this version of sluice does not declare",
            current.unwrap_or_else(|| "none".into())
        ),
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args
}

/// A quorum queue whose expired or rejected messages the broker moves to `exchange` (with
/// `routing_key`, else their own), keeping each until the target confirmed it. On RabbitMQ
/// 3.10 `at-least-once` only takes effect together with `x-overflow = reject-publish`;
/// without a length limit that never rejects anything.
fn at_least_once_dead_lettering(exchange: &str, routing_key: Option<&str>) -> FieldTable {
    let mut args = quorum();
    args.insert("x-dead-letter-exchange".into(), string(exchange));
    if let Some(key) = routing_key {
        args.insert("x-dead-letter-routing-key".into(), string(key));
    }
    args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
    args.insert("x-overflow".into(), string("reject-publish"));
    args
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// A stream of small entries kept `max_age`, in small segments (retention drops whole
/// segments).
fn small_stream(name: String, max_age: &str) -> QueueSpec {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), string("stream"));
    arguments.insert("x-max-age".into(), string(max_age));
    arguments.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongInt(STREAM_SEGMENT_BYTES),
    );
    QueueSpec {
        name,
        arguments,
        binding: None,
    }
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
        assert_eq!(
            t.class_queue("primary", Priority::Normal),
            t.jobs_queue("primary")
        );
        assert_eq!(
            t.class_queue("primary", Priority::High),
            "acme.jobs.primary.high"
        );
        assert_eq!(
            t.class_retry_queue("primary", Priority::Low, 2),
            "acme.retry.primary.low.2"
        );
        assert_eq!(
            t.class_retry_queue("primary", Priority::Normal, 2),
            t.retry_queue("primary", 2)
        );
        assert_eq!(t.events_exchange(), "acme.events");
        assert_eq!(t.events_log(), "acme.events.log");
        assert_eq!(
            t.migration_queue("acme.dead.primary"),
            "acme.dead.primary.migrating"
        );
    }

    #[test]
    fn the_broker_s_inequivalence_becomes_what_differs() {
        let cases = [
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'quorum' but current is 'classic'",
                "is a classic queue, sluice now needs quorum",
            ),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-strategy' for queue 'q' in vhost '/': received the value 'at-least-once' of type 'longstr' but current is none",
                "has no x-dead-letter-strategy, sluice now needs x-dead-letter-strategy = at-least-once",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(describe_inequivalence(text), expected);
        }
        let e = TopologyError::Mismatch {
            queue: "acme.dead.primary".into(),
            difference: "is a classic queue, sluice now needs quorum".into(),
        };
        assert!(e
            .to_string()
            .contains("acme.dead.primary is a classic queue"));
        assert!(e.to_string().contains(MIGRATE_COMMAND));
    }
}
