//! Helpers for sluice's integration tests: real services spawned per test.
//!
//! - [`app`]: one test's world (namespace, scripted relays, config, workers) from one description.
//! - [`busy_cores`]: every core kept busy for a step, as on a loaded machine.
//! - [`broker`]: a namespace of its own on the real RabbitMQ, and ways to look into it.
//! - [`event_schema`]: every event batch checked against `shared/event.schema.json`.
//! - [`processes`]: the real binaries and per-test config files.
//! - [`smtp_sink`]: Postfix's `smtp-sink`, dumping what it accepts.
//! - [`aiosmtpd`] and [`tls`]: a TLS/AUTH SMTP server and throwaway certificates for it.
//! - [`scripted_smtp`]: our own scriptable SMTP server for fault injection.
//! - [`otlp_receiver`]: an OTLP (gRPC and HTTP) receiver recording spans and metrics.
//! - [`http`]: one plain HTTP GET for the worker's endpoints.
//! - [`rabbit_node`]: private RabbitMQ nodes and clusters to crash, alarm and partition.
//! - [`tcp_proxy`]: a loopback TCP proxy whose traffic a test can cut.
//! - [`wait`]: waits on conditions with a deadline, and negative checks held for a stated time.

pub mod aiosmtpd;
pub mod app;
pub mod broker;
pub mod busy_cores;
pub mod event_schema;
pub mod http;
pub mod otlp_receiver;
pub mod postfix;
pub mod processes;
pub mod rabbit_node;
pub mod scripted_smtp;
pub mod smtp_sink;
pub mod tcp_proxy;
pub mod tls;
pub mod wait;
