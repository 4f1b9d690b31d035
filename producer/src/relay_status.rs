//! `relay status`: each configured relay as the fleet sees it — suspended, down or up,
//! throttled or not (from the control stream), the budget slots held (from the slot
//! queues), and the jobs waiting in its queues, its retry steps and its dead queue.
//!
//! The age of each class's oldest job comes from the heads stream, where the workers report
//! what they saw of each class queue's head (reading a job here would deliver it): the
//! youngest of the recent reports' bounds, `null` when no worker looked lately or the class
//! is empty.

use std::collections::HashMap;
use std::time::Duration;

use lapin::types::AMQPValue;
use lapin::Connection;
use serde::Serialize;
use sluice_shared::control::now_ms;
use sluice_shared::heads::HeadsEntry;
use sluice_shared::{Priority, Settings, Topology};

use crate::cli::RelayStatusArgs;
use crate::control::{new_marker, read_stream, rfc3339, ControlState, ControlStream, SmallStream};
use crate::exit::Status;
use crate::queues::ready_jobs;

/// A rate cut older than this is shown no more: the fleet has climbed back by then.
const RECENT_CUT: Duration = Duration::from_secs(300);

/// Workers' reports of their queues' heads older than this are not read (they report
/// every 5 s).
const HEADS_RECENT: Duration = Duration::from_secs(15);

/// One relay's line of `relay status --json`.
#[derive(Debug, Serialize)]
pub struct RelayReport {
    pub relay: String,
    /// `up`, `suspended` or `down`.
    pub state: &'static str,
    /// When a suspension or a cool-off the fleet was told of ends (RFC 3339).
    pub until: Option<String>,
    /// Why it is suspended or down.
    pub reason: Option<String>,
    /// The latest rate cut of the last few minutes, per second, and when it was made.
    pub throttled_to: Option<f64>,
    pub throttled_at: Option<String>,
    /// The fleet's session limit after the latest cut (`max_connections` when none).
    pub session_limit: u32,
    pub max_connections: u32,
    pub max_messages_per_second: u32,
    /// Budget slots held now, fleet-wide: sessions open or opening.
    pub slots_in_use: u32,
    /// Jobs ready in each class queue (`null` when not declared yet).
    pub queued_high: Option<u32>,
    pub queued_normal: Option<u32>,
    pub queued_low: Option<u32>,
    /// How old each class's oldest job is at most, in seconds, as the workers last saw it
    /// (`null`: empty, or no worker took from it in the last [`HEADS_RECENT`]).
    pub oldest_high_age_s: Option<f64>,
    pub oldest_normal_age_s: Option<f64>,
    pub oldest_low_age_s: Option<f64>,
    /// Jobs waiting in the retry steps, all classes.
    pub retrying: u32,
    /// Jobs in the dead queue.
    pub dead: Option<u32>,
    /// Its failover relay, if any.
    pub failover: Option<String>,
}

/// Run `relay status`.
pub async fn run(settings: &Settings, args: RelayStatusArgs) -> anyhow::Result<Status> {
    anyhow::ensure!(
        !settings.relays.is_empty(),
        "no relays configured: relay status reports the relays of the configuration"
    );
    let control = ControlStream::open(settings).await?;
    let state = control.state().await?;
    control.close().await;
    let topology = Topology::from_settings(settings);
    let connection = settings
        .amqp
        .connect_with_backoff("sluice-producer (relay status)", Duration::from_secs(30))
        .await?;
    let heads = fleet_heads(&topology, &connection).await?;
    let mut reports = Vec::new();
    for name in settings.relays.keys() {
        reports.push(report(settings, &topology, &connection, &state, &heads, name).await?);
    }
    let _ = connection.close(200, "done".into()).await;
    for report in &reports {
        if args.json {
            println!(
                "{}",
                serde_json::to_string(report).expect("report serializes")
            );
        } else {
            println!("{}", text(report));
        }
    }
    Ok(Status::Success)
}

async fn report(
    settings: &Settings,
    topology: &Topology,
    connection: &Connection,
    state: &ControlState,
    heads: &HashMap<(String, String), f64>,
    name: &str,
) -> anyhow::Result<RelayReport> {
    let relay = &settings.relays[name];
    let now = now_ms();
    let pushback = state.pushback.get(name).cloned().unwrap_or_default();
    let (state_name, until, reason) = match state.steering.suspension(name, now) {
        Some(s) => ("suspended", Some(s.until_ms), Some(s.reason.clone())),
        None => match pushback.down.filter(|(until, _)| *until > now) {
            Some((until, reason)) => ("down", Some(until), Some(reason)),
            None => ("up", None, None),
        },
    };
    let recent = |at: u64| now.saturating_sub(at) < RECENT_CUT.as_millis() as u64;
    let cut = pushback.rate_cut.filter(|(_, at)| recent(*at));
    let session_limit = pushback
        .sessions_cut
        .filter(|(_, at)| recent(*at))
        .map_or(relay.max_connections, |(to, _)| to);
    let mut slots_in_use = 0;
    for slot in 0..relay.max_connections {
        if slot_held(connection, &topology.budget_slot_queue(name, slot)).await? {
            slots_in_use += 1;
        }
    }
    let mut queued = [None; 3];
    let mut retrying = 0;
    for (i, class) in Priority::ALL.into_iter().enumerate() {
        queued[i] = ready_jobs(connection, &topology.class_queue(name, class)).await?;
        for step in 1..=settings.retry.delays.len() {
            let queue = topology.class_retry_queue(name, class, step);
            retrying += ready_jobs(connection, &queue).await?.unwrap_or(0);
        }
    }
    let oldest = |class: Priority| {
        heads
            .get(&(name.to_string(), class.as_str().to_string()))
            .copied()
    };
    Ok(RelayReport {
        relay: name.to_string(),
        state: state_name,
        until: until.map(rfc3339),
        reason,
        throttled_to: cut.map(|(to, _)| to),
        throttled_at: cut.map(|(_, at)| rfc3339(at)),
        session_limit,
        max_connections: relay.max_connections,
        max_messages_per_second: relay.max_messages_per_second,
        slots_in_use,
        queued_high: queued[0],
        queued_normal: queued[1],
        queued_low: queued[2],
        oldest_high_age_s: oldest(Priority::High),
        oldest_normal_age_s: oldest(Priority::Normal),
        oldest_low_age_s: oldest(Priority::Low),
        retrying,
        dead: ready_jobs(connection, &topology.dead_queue(name)).await?,
        failover: relay.failover.clone(),
    })
}

/// The age bound of each (relay, class) queue's oldest job from the workers' reports of the
/// last [`HEADS_RECENT`]: the smallest (each report's is an upper bound), and none for a
/// class a report saw empty after the others.
async fn fleet_heads(
    topology: &Topology,
    connection: &Connection,
) -> anyhow::Result<HashMap<(String, String), f64>> {
    let heads = SmallStream::open(connection, topology, &topology.heads_spec()).await?;
    let marker = new_marker();
    heads
        .write(&HeadsEntry::Marker { id: marker.clone() }.to_bytes())
        .await?;

    let since_ms = now_ms().saturating_sub(HEADS_RECENT.as_millis() as u64);
    // The latest report of each queue decides whether it is empty; the smallest bound of
    // the recent ones is its age.
    let mut latest: HashMap<(String, String), (u64, u32)> = HashMap::new();
    let mut smallest: HashMap<(String, String), f64> = HashMap::new();
    read_stream(
        connection,
        heads.name(),
        AMQPValue::Timestamp(since_ms / 1000),
        |data| match serde_json::from_slice::<HeadsEntry>(data) {
            Ok(HeadsEntry::Marker { id }) => id == marker,
            Ok(HeadsEntry::Report { at_ms, queues }) if at_ms >= since_ms => {
                for head in queues {
                    let key = (head.relay, head.class);
                    if latest.get(&key).is_none_or(|(at, _)| *at <= at_ms) {
                        latest.insert(key.clone(), (at_ms, head.ready));
                    }
                    if let Some(age) = head.oldest_age_s {
                        let age = age + now_ms().saturating_sub(at_ms) as f64 / 1000.0;
                        let entry = smallest.entry(key).or_insert(age);
                        *entry = entry.min(age);
                    }
                }
                false
            }
            _ => false,
        },
    )
    .await?;
    heads.close().await;
    smallest.retain(|key, _| latest.get(key).is_some_and(|(_, ready)| *ready > 0));
    Ok(smallest)
}

/// A slot queue exists while a worker holds the slot (it is exclusive to that worker's
/// connection, so looking at it from here is refused, which says the same).
async fn slot_held(connection: &Connection, queue: &str) -> anyhow::Result<bool> {
    match ready_jobs(connection, queue).await {
        Ok(found) => Ok(found.is_some()),
        Err(e) if format!("{e:#}").contains("RESOURCE_LOCKED") => Ok(true),
        Err(e) => Err(e),
    }
}

/// The report for a person.
fn text(r: &RelayReport) -> String {
    let count = |n: Option<u32>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    let mut state = r.state.to_string();
    if let Some(until) = &r.until {
        state.push_str(&format!(" until {until}"));
    }
    if let Some(reason) = &r.reason {
        state.push_str(&format!(" ({reason})"));
    }
    if let (Some(to), Some(at)) = (r.throttled_to, &r.throttled_at) {
        state.push_str(&format!(
            ", throttled to {to:.0}/s at {at} (climbing back to {}/s)",
            r.max_messages_per_second
        ));
    }
    let failover = r
        .failover
        .as_ref()
        .map_or_else(String::new, |f| format!(", failover {f}"));
    format!(
        "relay {}: {state}\n  slots in use {} of {} (session limit {}{failover})\n  \
         queued high {}, normal {}, low {}; oldest {}; retrying {}; dead {}",
        r.relay,
        r.slots_in_use,
        r.max_connections,
        r.session_limit,
        count(r.queued_high),
        count(r.queued_normal),
        count(r.queued_low),
        ages(r),
        r.retrying,
        count(r.dead),
    )
}

/// The oldest job of each class, for a person: "high -, normal 12s, low 3s".
fn ages(r: &RelayReport) -> String {
    let age = |a: Option<f64>| a.map_or_else(|| "-".to_string(), |a| format!("{a:.0}s"));
    format!(
        "high {}, normal {}, low {}",
        age(r.oldest_high_age_s),
        age(r.oldest_normal_age_s),
        age(r.oldest_low_age_s)
    )
}
