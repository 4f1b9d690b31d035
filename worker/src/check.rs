//! `sluice-worker check`: try the configuration against the real broker and relays before
//! the first campaign, and say what is wrong in one line per check. It declares nothing and
//! sends nothing.
//!
//! - every broker URL of `amqp.url` answers;
//! - every queue the worker would declare is either absent (not declared yet: fine) or
//!   exactly as this version declares it (a queue of another type or with other arguments
//!   is a failure naming it, never overwritten);
//! - every relay opens a session (connection, greeting, EHLO, STARTTLS and its
//!   certificate, AUTH) within its fleet-wide budget: a budget slot is taken for it, and
//!   the session is closed with QUIT.

use std::sync::Arc;

use sluice_shared::amqp::topology::QueueState;
use sluice_shared::config::{redact_url, AmqpSettings, SecretUrl};
use sluice_shared::{Settings, Topology};

use crate::budget::Budget;
use crate::metrics::Metrics;
use crate::smtp::RelayClient;

/// One check's verdict.
enum Verdict {
    Ok(String),
    Skipped(String),
    Failed(String),
}

/// Run every check for `relays` (all configured ones when empty), print one line each,
/// and return true when none failed.
pub async fn run(settings: &Settings, relays: &[String]) -> anyhow::Result<bool> {
    let relays: Vec<String> = if relays.is_empty() {
        settings.relays.keys().cloned().collect()
    } else {
        for name in relays {
            if !settings.relays.contains_key(name) {
                anyhow::bail!("--relay {name}: no such relay in the configuration");
            }
        }
        relays.to_vec()
    };
    let mut failed = 0;
    let mut report = |what: &str, verdict: Verdict| {
        let (word, why) = match verdict {
            Verdict::Ok(why) => ("ok", why),
            Verdict::Skipped(why) => ("skipped", why),
            Verdict::Failed(why) => {
                failed += 1;
                ("FAILED", why)
            }
        };
        println!("{word:<8} {what}: {why}");
    };

    // Every broker URL on its own.
    let mut connection = None;
    for url in settings.amqp.url.urls() {
        let one = AmqpSettings {
            url: SecretUrl::new(url),
            ..settings.amqp.clone()
        };
        let what = format!("broker {}", redact_url(url));
        match one.connect("sluice-worker-check").await {
            Ok(c) => {
                report(&what, Verdict::Ok("connected".into()));
                connection.get_or_insert(c);
            }
            Err(e) => {
                // The reason of a one-URL attempt starts with that URL: say it once.
                let prefix = format!("{}: ", redact_url(url));
                let reason = e.reason.strip_prefix(&prefix).unwrap_or(&e.reason);
                report(&what, Verdict::Failed(reason.to_string()));
            }
        }
    }
    let Some(connection) = connection else {
        report("topology", Verdict::Skipped("no broker answered".into()));
        return Ok(false);
    };
    let connection = Arc::new(connection);

    // The queues this worker would declare.
    let topology = Topology::from_settings(settings);
    let names: Vec<&str> = relays.iter().map(String::as_str).collect();
    let mut specs = topology.job_queues(&names, settings.retry.delays.len());
    specs.push(topology.events_log_spec());
    for spec in specs {
        let what = format!("queue {}", spec.name);
        let verdict = match topology.check_queue(&connection, &spec).await {
            Ok(QueueState::Absent) => Verdict::Ok("not declared yet (a worker declares it)".into()),
            Ok(QueueState::Matches { messages }) => {
                Verdict::Ok(format!("as declared, {messages} ready"))
            }
            Err(e) => Verdict::Failed(e.to_string()),
        };
        report(&what, verdict);
    }

    // One session per relay, within its budget.
    let metrics = Metrics::new();
    for name in &relays {
        let relay = &settings.relays[name];
        let what = format!("relay {name} ({}:{})", relay.host, relay.port);
        let client = match RelayClient::new(name, relay) {
            Ok(client) => client,
            Err(e) => {
                report(&what, Verdict::Failed(format!("{e:#}")));
                continue;
            }
        };
        let budget = Budget::new(
            connection.clone(),
            topology.clone(),
            name,
            relay.max_connections,
            metrics.clone(),
        );
        let slot = match budget.try_acquire(relay.max_connections).await {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                report(
                    &what,
                    Verdict::Skipped(format!(
                        "all {} budget slots are in use by running workers; no session opened",
                        relay.max_connections
                    )),
                );
                continue;
            }
            Err(e) => {
                report(
                    &what,
                    Verdict::Failed(format!("cannot take a budget slot: {e}")),
                );
                continue;
            }
        };
        let verdict = match client.open().await {
            Ok(session) => {
                session.close().await;
                Verdict::Ok(session_summary(relay))
            }
            Err(e) => Verdict::Failed(e.to_string()),
        };
        budget.release(slot).await;
        report(&what, verdict);
    }
    let _ = connection.close(200, "checked".into()).await;
    Ok(failed == 0)
}

/// What an opened session proved, from the settings it was opened with.
fn session_summary(relay: &sluice_shared::config::RelaySettings) -> String {
    use sluice_shared::config::TlsMode;
    let mut steps = vec!["greeting", "EHLO"];
    match relay.tls {
        TlsMode::Starttls => steps.push("STARTTLS with a verified certificate"),
        TlsMode::Tls => steps.push("TLS with a verified certificate"),
        TlsMode::None => {}
    }
    if relay.tls_insecure_skip_verify && relay.tls != TlsMode::None {
        steps.pop();
        steps.push("TLS (certificate NOT verified: tls_insecure_skip_verify)");
    }
    if relay.username.is_some() {
        steps.push("AUTH");
    }
    format!("session opened ({}), nothing sent", steps.join(", "))
}
