//! The sluice worker: consumes jobs from RabbitMQ and hands them to upstream SMTP relays,
//! never more at once than each relay allows the whole fleet.
//!
//! # Layout
//! - [`cli`]: command-line arguments.
//! - [`check`]: `sluice-worker check`, the configuration tried against the broker and relays.
//! - [`broker`]: the two broker connections (consume, publish), the fence, the alarm watch.
//! - [`context`]: what every lane shares.
//! - [`lane`]: a lane's life — slot, session, channels, window.
//! - [`feed`]: a lane's consumers, one channel and settler per queue.
//! - [`step`]: one job — parse, ensure a session, attempt, settle.
//! - [`deliver`]: job → MIME message → relay → [`settle::Outcome`].
//! - [`classify`]: a relay's reply → outcome; relay-wide refusals.
//! - [`pushback`]: replies that mean "slower", "fewer sessions", "not now"; the rate's
//!   arithmetic (a cut, then a cubic climb).
//! - [`limits`]: a relay's effective rate and session limit, the same on every worker.
//! - [`control`]: the control stream that carries those limits to the whole fleet.
//! - [`settle`]: outcome → ack / copy / requeue / event, in one place.
//! - [`budget`]: the fleet-wide relay budget (slots as exclusive queues, rate shares).
//! - [`relay`]: per-relay runtime state, circuit breaking, failover.
//! - [`memory`]: the byte bounds on job bodies held (lane windows, bodies worked on).
//! - [`line_endings`]: every line CRLF, in linear time (no smuggling through bare CR/LF).
//! - [`smtp`]: SMTP sessions (TLS, AUTH, timeouts, pipelining).
//! - [`health`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`tracing_spans`]: OpenTelemetry spans of each attempt (`process <queue>`, `smtp.send`).
//! - [`otel_metrics`]: the same metrics over OTLP, when an endpoint is configured.

pub mod broker;
pub mod budget;
pub mod check;
pub mod classify;
pub mod cli;
pub mod context;
pub mod control;
pub mod deliver;
pub mod depth;
pub mod feed;
pub mod health;
pub mod lane;
pub mod limits;
pub mod line_endings;
pub mod memory;
pub mod metrics;
pub mod otel_metrics;
pub mod pushback;
pub mod relay;
pub mod settle;
pub mod smtp;
pub mod step;
pub mod tracing_spans;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use sluice_shared::shutdown::Shutdown;
use sluice_shared::{Settings, Topology};
use tokio::task::JoinSet;

use crate::broker::{within, Broker};
use crate::budget::Budget;
use crate::context::LaneContext;
use crate::control::Control;
use crate::health::Readiness;
use crate::lane::run_lane;
use crate::metrics::Metrics;
use crate::relay::{Relay, Relays};
use crate::smtp::RelayClient;

/// Run the worker until `shutdown`: connect (and reconnect), run the lanes, drain.
pub async fn run(
    settings: Settings,
    only_relays: Vec<String>,
    listen: Option<String>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    memory::give_big_allocations_back();
    let (own, lanes_for) = select_relays(&settings, &only_relays)?;
    // Build every relay client once up front, so a bad TLS file or password file stops
    // the worker at start, not at its first job.
    let mut clients = std::collections::BTreeMap::new();
    let mut rules = std::collections::BTreeMap::new();
    for name in &lanes_for {
        let client = RelayClient::new(name, &settings.relays[name])?;
        clients.insert(name.clone(), Arc::new(client));
        let compiled = pushback::ReplyRules::new(name, &settings.relays[name])?;
        rules.insert(name.clone(), Arc::new(compiled));
    }
    let metrics = Metrics::new();
    for name in &lanes_for {
        let relay = &settings.relays[name];
        metrics.relay_configured(name, relay.max_connections, relay.max_messages_per_second);
    }
    otel_metrics::install(&metrics);
    let ready = Readiness::default();
    if let Some(addr) = listen.or_else(|| settings.worker.listen.clone()) {
        health::serve(&addr, ready.clone(), metrics.clone()).await?;
    }
    let topology = Topology::from_settings(&settings);
    let delays: Arc<[Duration]> = settings.retry.delays.clone().into();
    let bodies = Arc::new(memory::BodyBudget::new(memory::WORKING_BYTES));

    loop {
        let broker = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            b = Broker::connect(&settings.amqp, &ready, &metrics) => b?,
        };
        let broker = Arc::new(broker);
        let relay_names: Vec<&str> = lanes_for.iter().map(String::as_str).collect();
        let declared = async {
            let channel = within("opening a channel", broker.consume.create_channel()).await?;
            let declared = topology.declare(&channel, &relay_names, delays.len()).await;
            let _ = channel.close(200, "declared".into()).await;
            anyhow::Ok(declared)
        };
        let declared = match tokio::time::timeout(broker::BROKER_DEADLINE, declared).await {
            Ok(Ok(Err(mismatch))) if mismatch.is_mismatch() => {
                // An older version's queues: retrying cannot help, the operator must migrate.
                broker.close("topology mismatch").await;
                return Err(mismatch.into());
            }
            Ok(Ok(declared)) => declared.map_err(anyhow::Error::from),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!(
                "declaring the topology took longer than {:?}",
                broker::BROKER_DEADLINE
            )),
        };
        if let Err(e) = declared {
            tracing::warn!(
                error = format!("{e:#}"),
                "declaring the topology failed; reconnecting"
            );
            broker.close("reconnecting").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }

        let mut relays = Vec::new();
        for name in &lanes_for {
            let client = clients[name].clone();
            let budget = Budget::new(
                broker.consume.clone(),
                topology.clone(),
                name,
                settings.relays[name].max_connections,
                metrics.clone(),
            );
            relays.push(Arc::new(Relay::new(
                client,
                budget,
                rules[name].clone(),
                metrics.clone(),
                own.contains(name),
            )));
        }
        let relays = Arc::new(Relays { all: relays });
        let control = match Control::start(&broker, &topology, relays.clone()).await {
            Ok(control) => control,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "following the control stream failed; reconnecting"
                );
                broker.close("reconnecting").await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let ctx = Arc::new(LaneContext {
            broker: broker.clone(),
            topology: topology.clone(),
            relays: relays.clone(),
            delays: delays.clone(),
            max_message_bytes: settings.worker.max_message_bytes,
            bodies: bodies.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            control,
        });
        let mut lanes: Lanes = JoinSet::new();
        // Which relay each lane serves, to replace a failed lane with one of its kind.
        let mut lane_relays = std::collections::HashMap::new();
        let spawn_lane = |lanes: &mut Lanes, lane_relays: &mut LaneRelays, relay: &Arc<Relay>| {
            let handle = lanes.spawn(run_lane(ctx.clone(), relay.clone()));
            lane_relays.insert(handle.id(), relay.clone());
        };
        for relay in &relays.all {
            for _ in 0..relay.client.settings().max_connections {
                spawn_lane(&mut lanes, &mut lane_relays, relay);
            }
        }
        // Depths of the class queues of the relays this worker's lanes serve, for /metrics.
        let sampler = {
            let (broker, topology, metrics, shutdown) = (
                broker.clone(),
                topology.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            let relays: Vec<String> = lanes_for.iter().cloned().collect();
            tokio::spawn(async move {
                depth::sample_depths(&broker, &topology, &relays, &metrics, &shutdown).await
            })
        };
        ready.set(true);
        tracing::info!(relays = ?lanes_for, lanes = lanes.len(), "consuming");

        // Run until asked to stop or until the connection breaks. A lane that fails while
        // the connection is fine (a channel error) is replaced; the others go on.
        let broken = loop {
            let joined = tokio::select! {
                biased;
                _ = shutdown.wait() => break None,
                why = broker.lost() => break Some(anyhow::anyhow!(why)),
                Some(joined) = lanes.join_next_with_id() => joined,
            };
            let (id, failure) = match joined {
                Ok((_, Ok(()))) if shutdown.is_triggered() => break None,
                Ok((id, Ok(()))) => (id, anyhow::anyhow!("a lane stopped unexpectedly")),
                Ok((id, Err(e))) => (id, e),
                Err(e) => (e.id(), anyhow::Error::from(e).context("a lane panicked")),
            };
            if !broker.consume.status().connected() || !broker.fence_open() {
                break Some(failure);
            }
            tracing::warn!(
                error = format!("{failure:#}"),
                "a lane failed; starting another"
            );
            if let Some(relay) = lane_relays.remove(&id) {
                spawn_lane(&mut lanes, &mut lane_relays, &relay);
            }
        };
        sampler.abort();
        ready.set(false);
        match broken {
            None => {
                drain(&mut lanes, settings.worker.shutdown_grace).await;
                broker.close("worker stopping").await;
                tracing::info!("stopped");
                return Ok(());
            }
            Some(error) => {
                // Dropping the lanes drops their SMTP sessions: their slots went (or are
                // about to go) with the connection, so no session may outlive it.
                lanes.abort_all();
                while lanes.join_next().await.is_some() {}
                ready.set(false);
                broker.close("reconnecting").await;
                tracing::warn!(
                    error = format!("{error:#}"),
                    "lost the broker; reconnecting"
                );
                if shutdown.is_triggered() {
                    return Ok(());
                }
            }
        }
    }
}

/// The worker's running lanes.
type Lanes = JoinSet<anyhow::Result<()>>;

/// The relay each running lane serves.
type LaneRelays = std::collections::HashMap<tokio::task::Id, Arc<Relay>>;

/// Let lanes finish the jobs in flight, for at most `grace`; what is still unacknowledged
/// then goes back to the queue for other workers when the connection closes.
async fn drain(lanes: &mut Lanes, grace: Duration) {
    let finished =
        tokio::time::timeout(grace, async { while lanes.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            still_running = lanes.len(),
            "grace period over; leaving unfinished jobs to other workers"
        );
        lanes.abort_all();
    }
}

/// The relays whose queues this worker consumes (`--relay`, default all) and the relays
/// it needs lanes for (those plus their failover targets).
fn select_relays(
    settings: &Settings,
    only: &[String],
) -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>)> {
    if settings.relays.is_empty() {
        bail!("no relays configured: add a [relays.<name>] table to the config file or set SLUICE__RELAYS__<NAME>__HOST");
    }
    let own: BTreeSet<String> = if only.is_empty() {
        settings.relays.keys().cloned().collect()
    } else {
        for name in only {
            if !settings.relays.contains_key(name) {
                let known: Vec<&String> = settings.relays.keys().collect();
                bail!("--relay {name}: no such relay in the configuration (configured: {known:?})");
            }
        }
        only.iter().cloned().collect()
    };
    let mut lanes_for = own.clone();
    for name in &own {
        if let Some(failover) = &settings.relays[name].failover {
            lanes_for.insert(failover.clone());
        }
    }
    Ok((own, lanes_for))
}
