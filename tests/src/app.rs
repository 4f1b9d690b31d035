//! One test's world from one description, as zero2prod's `spawn_app` builds it: a namespace
//! of its own, scripted relays, a config naming them, and workers running that config.
//!
//! ```no_run
//! # async fn demo() {
//! use sluice_tests::app::TestApp;
//! use sluice_tests::scripted_smtp::Behaviour;
//! let app = TestApp::builder("tempfail")
//!     .relay("primary", Behaviour::every_rcpt("451 4.7.1 later"), "max_connections = 2")
//!     .retries(&["1s", "1s"])
//!     .workers(2)
//!     .start()
//!     .await;
//! app.ns.publish_jobs("primary", "grey", 1).await;
//! # }
//! ```

use std::sync::Arc;

use crate::broker::TestNamespace;
use crate::processes::{config_toml, ConfigFile, WorkerProcess};
use crate::scripted_smtp::{Behaviour, ScriptedSmtp};

/// A running test world; everything in it stops or is deleted when it is dropped.
pub struct TestApp {
    // Fields drop in this order: the workers stop before their relays and namespace go.
    /// The workers started so far, in order.
    pub workers: Vec<WorkerProcess>,
    relays: Vec<(String, Arc<ScriptedSmtp>)>,
    /// The test's own namespace, its topology declared.
    pub ns: TestNamespace,
    /// The config every worker of the app runs with.
    pub config: ConfigFile,
    worker: WorkerSpec,
}

/// What serves a relay of the app.
enum Server {
    /// A scripted SMTP server the app starts.
    Scripted(Box<Behaviour>),
    /// Something the test started on 127.0.0.1 (smtp-sink, aiosmtpd), at this port.
    At(u16),
}

/// How the app's workers are started: extra arguments and variables, logs kept or not.
#[derive(Clone, Default)]
struct WorkerSpec {
    args: Vec<String>,
    env: Vec<(String, String)>,
    logged: bool,
}

/// What a [`TestApp`] is made of; [`TestAppBuilder::start`] brings it up.
pub struct TestAppBuilder {
    tag: String,
    relays: Vec<(String, Server, String)>,
    retries: Vec<String>,
    workers: usize,
    worker: WorkerSpec,
}

impl TestApp {
    /// A world for the test named `tag` (the namespace is `t-<tag>-<random>`): by default
    /// no relay, one retry step of 1 s and one worker.
    pub fn builder(tag: &str) -> TestAppBuilder {
        TestAppBuilder {
            tag: tag.to_string(),
            relays: Vec::new(),
            retries: vec!["1s".to_string()],
            workers: 1,
            worker: WorkerSpec::default(),
        }
    }

    /// The scripted server behind relay `name` (shared, so the test can hold it while it
    /// starts or kills workers).
    pub fn relay(&self, name: &str) -> Arc<ScriptedSmtp> {
        self.relays
            .iter()
            .find(|(relay, _)| relay == name)
            .map(|(_, smtp)| Arc::clone(smtp))
            .unwrap_or_else(|| panic!("the app has no scripted relay {name}"))
    }

    /// Start one more worker as the app's workers are started.
    pub fn start_worker(&mut self) -> &mut WorkerProcess {
        let spec = &self.worker;
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let worker = WorkerProcess::launch(&self.config.path, &args, &env, spec.logged);
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// Start `n` more workers.
    pub fn start_workers(&mut self, n: usize) {
        for _ in 0..n {
            self.start_worker();
        }
    }

    /// Ready messages in relay `relay`'s jobs queue (panics when it cannot count).
    pub async fn jobs_len(&self, relay: &str) -> u32 {
        self.ns.queue_len(&self.ns.topology.jobs_queue(relay)).await
    }

    /// Ready messages in relay `relay`'s dead queue (panics when it cannot count).
    pub async fn dead_len(&self, relay: &str) -> u32 {
        self.ns.queue_len(&self.ns.topology.dead_queue(relay)).await
    }

    /// Ready messages in retry step `step` (1-based) of relay `relay`.
    pub async fn retry_len(&self, relay: &str, step: usize) -> u32 {
        self.ns
            .queue_len(&self.ns.topology.retry_queue(relay, step))
            .await
    }
}

impl TestAppBuilder {
    /// A relay `name` served by a scripted SMTP server with `behaviour`; `extra` is TOML
    /// added to its `[relays.<name>]` table (`max_connections = 2`, `failover = "backup"`).
    pub fn relay(mut self, name: &str, behaviour: Behaviour, extra: &str) -> Self {
        self.relays.push((
            name.to_string(),
            Server::Scripted(Box::new(behaviour)),
            extra.to_string(),
        ));
        self
    }

    /// A relay `name` served by something the test started on 127.0.0.1:`port`
    /// (smtp-sink, aiosmtpd); `extra` as for [`TestAppBuilder::relay`].
    pub fn relay_at(mut self, name: &str, port: u16, extra: &str) -> Self {
        self.relays
            .push((name.to_string(), Server::At(port), extra.to_string()));
        self
    }

    /// The retry ladder (`["1s", "2s"]`); its length is the number of retry steps.
    pub fn retries(mut self, delays: &[&str]) -> Self {
        self.retries = delays.iter().map(|d| d.to_string()).collect();
        self
    }

    /// How many workers [`TestAppBuilder::start`] starts (0 for a test that publishes
    /// first, then calls [`TestApp::start_workers`]).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Keep the workers' logs, for [`WorkerProcess::logs`].
    pub fn logged(mut self) -> Self {
        self.worker.logged = true;
        self
    }

    /// Arguments every worker gets after `--config` (`--listen 127.0.0.1:<port>`).
    pub fn worker_args(mut self, args: &[&str]) -> Self {
        self.worker.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Environment variables every worker gets (`OTEL_*`, `RUST_LOG`).
    pub fn worker_env<K: AsRef<str>, V: AsRef<str>>(mut self, env: &[(K, V)]) -> Self {
        self.worker.env = env
            .iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        self
    }

    /// Declare the namespace, start the relays, write the config, start the workers.
    pub async fn start(self) -> TestApp {
        let names: Vec<&str> = self
            .relays
            .iter()
            .map(|(name, _, _)| name.as_str())
            .collect();
        let ns = TestNamespace::new(&self.tag, &names, self.retries.len()).await;
        let mut relays = Vec::new();
        let mut tables = Vec::new();
        for (name, server, extra) in &self.relays {
            let port = match server {
                Server::Scripted(behaviour) => {
                    let smtp = ScriptedSmtp::start((**behaviour).clone()).await;
                    let port = smtp.port();
                    relays.push((name.clone(), Arc::new(smtp)));
                    port
                }
                Server::At(port) => *port,
            };
            tables.push((name.as_str(), port, extra.as_str()));
        }
        let delays: Vec<&str> = self.retries.iter().map(String::as_str).collect();
        let config = ConfigFile::new(&config_toml(&ns.name, &tables, &delays));
        let mut app = TestApp {
            workers: Vec::new(),
            relays,
            ns,
            config,
            worker: self.worker,
        };
        app.start_workers(self.workers);
        app
    }
}
