//! Helpers for the `sluice-producer` tests: a namespace with a config file, the producer
//! run as a user would, a look into queues, and a TCP proxy that can cut connections.
//!
//! The test files include it with `#[path = "../src/producer_support.rs"] mod ...;`, so it
//! needs no entry in `lib.rs` (it only uses the public helpers of this crate).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sluice_tests::broker::TestNamespace;
pub use sluice_tests::processes::Run;
use sluice_tests::processes::{config_toml, Binary, ConfigFile};

/// A namespace of its own, a config file naming it (relay `primary`), and a scratch
/// directory for CSV and template files. Everything it created on the broker is deleted
/// when it is dropped (best effort, by its [`TestNamespace`]).
pub struct ProducerEnv {
    pub ns: TestNamespace,
    pub config: ConfigFile,
}

impl ProducerEnv {
    /// A fresh namespace `t-<tag>-<random>` with relay `primary` configured.
    pub async fn new(tag: &str) -> ProducerEnv {
        let ns = TestNamespace::new(tag, &["primary"], 2).await;
        let config = ConfigFile::new(&config_toml(
            &ns.name,
            &[("primary", 2525, "")],
            &["1s", "2s"],
        ));
        ProducerEnv { ns, config }
    }

    /// Write a file next to the config; returns its path as a string for arguments.
    pub fn file(&self, name: &str, content: impl AsRef<[u8]>) -> String {
        self.config.write(name, content).display().to_string()
    }

    /// Run `sluice-producer <args> --config <file>` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_env(args, &[])
    }

    /// Like [`ProducerEnv::run`] with extra environment variables.
    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        self.producer(args).envs(env.iter().copied()).run()
    }

    /// Start `sluice-producer <args> --config <file>` and wait for it in a blocking task.
    pub fn spawn(&self, args: &[&str]) -> tokio::task::JoinHandle<Run> {
        let producer = self.producer(args);
        tokio::task::spawn_blocking(move || producer.run())
    }

    /// Start `sluice-producer <args> --config <file>` with its output piped, for tests that
    /// signal it.
    pub fn start(&self, args: &[&str]) -> std::process::Child {
        self.producer(args)
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice-producer")
    }

    fn producer(&self, args: &[&str]) -> Binary {
        Binary::new("sluice-producer")
            .quiet()
            .args(args)
            .config(&self.config.path)
    }

    /// The name of the jobs queue of `primary`.
    pub fn jobs_queue(&self) -> String {
        self.ns.topology.jobs_queue("primary")
    }

    /// The name of the dead queue of `primary`.
    pub fn dead_queue(&self) -> String {
        self.ns.topology.dead_queue("primary")
    }

    /// True when `queue` exists; panics when the broker cannot say.
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.ns.queue_exists(queue).await
    }

    /// Take every message now in `queue`, in queue order (consumed without ack, so they
    /// are gone).
    pub async fn take_all(&self, queue: &str) -> Vec<Message> {
        let count = self.ns.queue_len(queue).await as usize;
        let channel = self.ns.connection.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                .await
                .unwrap_or_else(|_| panic!("{queue}: only {} of {count} messages came", out.len()))
                .expect("consumer open")
                .expect("delivery");
            out.push(Message {
                properties: delivery.properties,
                body: delivery.data,
            });
        }
        let _ = channel.close(200, "ok".into()).await;
        out
    }

    /// Take every message now in `queue`: how many came, and how many distinct message ids.
    pub async fn count_ids(&self, queue: &str) -> (usize, usize) {
        let ids: Vec<Option<String>> = self
            .take_all(queue)
            .await
            .iter()
            .map(Message::message_id)
            .collect();
        let distinct: std::collections::HashSet<&Option<String>> = ids.iter().collect();
        (ids.len(), distinct.len())
    }

    /// Publish to the default exchange straight into `queue` and wait for the confirm.
    pub async fn put(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.put_many(queue, &[(body.to_vec(), properties)]).await;
    }

    /// Publish many messages straight into `queue`, pipelining the confirms, and check
    /// that each was stored.
    pub async fn put_many(&self, queue: &str, messages: &[(Vec<u8>, BasicProperties)]) {
        for chunk in messages.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (body, properties) in chunk {
                let confirm = self
                    .ns
                    .channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body,
                        properties.clone().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                confirms.push(confirm);
            }
            for confirm in confirms {
                let confirm = confirm.await.expect("confirm");
                assert!(
                    confirm.is_ack() && confirm.take_message().is_none(),
                    "not stored in {queue}"
                );
            }
        }
    }

    /// Publish a delivery event to `<ns>.events` as a worker does: a batch of one, routing
    /// key `<outcome>.<campaign>`, stamped now.
    pub async fn event(&self, campaign: &str, id: &str, outcome: &str) {
        let body = serde_json::json!([{
            "id": id, "campaign": campaign, "to": "someone@example.org", "relay": "primary",
            "outcome": outcome, "attempt": 1, "smtp_code": 250, "smtp_reply": "250 ok",
            "at": sluice_shared::events::now_rfc3339()
        }]);
        let mut headers = FieldTable::default();
        sluice_shared::headers::set_int(
            &mut headers,
            sluice_shared::events::FORMAT_HEADER,
            sluice_shared::events::FORMAT_VERSION,
        );
        let confirm = self
            .ns
            .channel
            .basic_publish(
                self.ns.topology.events_exchange().into(),
                format!("{outcome}.{campaign}").into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_type(sluice_shared::events::BATCH_KIND.into())
                    .with_headers(headers),
            )
            .await
            .expect("publish event")
            .await
            .expect("confirm event");
        assert!(confirm.is_ack());
    }

    /// Wait until `queue` holds at least `n` ready messages.
    pub async fn wait_for_messages(&self, queue: &str, n: u32, timeout: Duration) -> bool {
        sluice_tests::broker::eventually(timeout, || async { self.ns.queue_len(queue).await >= n })
            .await
    }
}

/// `sluice-producer` with `args` exactly as given (for `--config` before the subcommand).
pub fn run_producer_raw(args: &[&str]) -> Run {
    Binary::new("sluice-producer").quiet().args(args).run()
}

/// One message taken from a queue.
pub struct Message {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Message {
    /// A header's value as text (strings and integers).
    pub fn header(&self, name: &str) -> Option<String> {
        sluice_shared::headers::get_str(self.properties.headers().as_ref(), name)
    }

    /// Names of all headers.
    pub fn header_names(&self) -> Vec<String> {
        self.properties
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    /// `message_id`.
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|m| m.to_string())
    }
}

/// A path under the test's scratch directory, for files that must not exist.
pub fn missing_path(env: &ProducerEnv, name: &str) -> PathBuf {
    env.config.dir.join(name)
}
