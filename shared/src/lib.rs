//! What the sluice producer and worker share: the job wire format, configuration, the AMQP
//! topology, delivery events and telemetry.
//!
//! # Layout
//! - [`config`]: the settings tree, loaded from TOML plus `SLUICE__...` environment variables.
//! - [`job`]: the job JSON format and its validation (`job.schema.json` beside this crate).
//! - [`priority`]: the classes `high`, `normal`, `low`, their routing keys and weighing.
//! - [`headers`]: AMQP header names sluice reads and writes.
//! - [`control`]: the control stream's messages and the steering state they add up to.
//! - [`events`]: delivery events published to `<namespace>.events`.
//! - [`amqp`]: connecting to RabbitMQ; [`amqp::topology`] declares every exchange and queue.
//! - [`telemetry`]: logs, and OpenTelemetry traces and metrics over OTLP.
//! - [`trace_context`]: W3C `traceparent` in and out of AMQP headers.
//! - [`shutdown`]: the stop signal every task waits on.

pub mod amqp;
pub mod config;
pub mod control;
pub mod events;
pub mod headers;
pub mod heads;
pub mod job;
pub mod priority;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;

pub use amqp::topology::Topology;
pub use config::Settings;
pub use job::Job;
pub use priority::Priority;
