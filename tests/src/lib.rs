//! Helpers for sluice's integration tests: real services spawned per test.
//!
//! - [`broker`]: a namespace of its own on the real RabbitMQ, and ways to look into it.
//! - [`processes`]: the real binaries and per-test config files.
//! - [`smtp_sink`]: Postfix's `smtp-sink`, dumping what it accepts.
//! - [`scripted_smtp`]: our own scriptable SMTP server for fault injection.

pub mod broker;
pub mod processes;
pub mod scripted_smtp;
pub mod smtp_sink;
