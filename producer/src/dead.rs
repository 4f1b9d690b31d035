//! `dead list | replay | purge`: the jobs that ended in a relay's dead-letter queue.
//!
//! Dead queues are quorum queues. Peeking at one by taking messages and handing them back
//! (a get-and-requeue, or a consume closed without acks) would reorder it (RabbitMQ 3.10
//! redelivers returned messages first) and count every peek in `x-delivery-count`
//! (RabbitMQ 4.x drops a message past its default delivery limit of 20). So every command
//! reads a dead queue by **rotation**: it notes the queue's message count N, takes those N
//! messages one by one (manual ack), and for each one it keeps in the queue (all of them
//! for `list`, the ones not selected for `replay` and `purge`) publishes a copy (same body,
//! properties and headers) to the tail of the same queue, waits for the broker's confirm,
//! and only then acknowledges the original. After N steps the kept messages are back in
//! their order and no message was ever returned, so no delivery count grows.
//!
//! The one cost: an interruption between a confirmed copy and its original's ack leaves
//! that one message twice in the dead queue (the copy at the tail, the original back at the
//! head). Replay therefore sends a job id at most once per run, acknowledging the other
//! copies. Replay acknowledges a dead job only after the broker confirmed its copy on the
//! jobs exchange, so an interrupted replay loses nothing (at worst a job is replayed twice,
//! which the worker recognises by id).
//!
//! `--reason` matches the header `x-sluice-reason` (`invalid`, `retries exhausted`,
//! `bounced`); `--campaign` the job's `campaign` (`default` when it has none).

use std::collections::{BTreeSet, HashSet};
use std::io::{IsTerminal, Write};

use anyhow::Context as _;
use lapin::options::QueuePurgeOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use sluice_shared::amqp::topology::{QueueSpec, QueueState};
use sluice_shared::headers;
use sluice_shared::{Priority, Settings, Topology};

use crate::cli::{DeadFilter, DeadListArgs, DeadPurgeArgs, DeadReplayArgs};
use crate::exit::{Status, UsageError};
use crate::prompt::confirm;
use crate::publish::{Outgoing, Publisher, Setup, PERSISTENT};
use crate::relays::chosen_relays;
use crate::transfer::Transfer;

/// Replayed messages in flight (published, not yet confirmed), at most.
const REPLAY_WINDOW: usize = 500;

/// One dead job as `dead list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadJob {
    pub id: String,
    pub to: Option<String>,
    pub campaign: Option<String>,
    pub relay: String,
    pub reason: Option<String>,
    pub smtp_code: Option<i64>,
    pub smtp_reply: Option<String>,
    pub attempts: Option<i64>,
}

/// What `dead list` reads from a body, leniently: a body that is not a valid job (the
/// reason it may be dead) still shows what it has.
#[derive(Debug, Default, serde::Deserialize)]
struct BodyFields {
    id: Option<String>,
    to: Option<String>,
    campaign: Option<String>,
}

impl DeadJob {
    /// Describe a dead message from its properties and body.
    pub fn describe(relay: &str, properties: &BasicProperties, body: &[u8]) -> DeadJob {
        let fields: BodyFields = serde_json::from_slice(body).unwrap_or_default();
        let found = properties.headers().as_ref();
        DeadJob {
            id: properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .or(fields.id)
                .unwrap_or_else(|| "(no id)".into()),
            to: fields.to,
            campaign: fields.campaign,
            relay: relay.to_string(),
            reason: headers::get_str(found, headers::REASON),
            smtp_code: headers::get_int(found, headers::SMTP_CODE),
            smtp_reply: headers::get_str(found, headers::SMTP_REPLY),
            attempts: headers::get_int(found, headers::ATTEMPTS),
        }
    }
}

/// The campaign of a job that names none, as in event routing keys.
const DEFAULT_CAMPAIGN: &str = "default";

impl DeadFilter {
    /// Whether a dead job is one the filter selects.
    pub fn matches(&self, job: &DeadJob) -> bool {
        let reason_ok = self
            .reason
            .as_ref()
            .is_none_or(|wanted| job.reason.as_deref() == Some(wanted.as_str()));
        let campaign_ok = self.campaign.as_ref().is_none_or(|wanted| {
            job.campaign.as_deref().unwrap_or(DEFAULT_CAMPAIGN) == wanted.as_str()
        });
        reason_ok && campaign_ok
    }

    /// Whether the filter selects every job.
    pub fn is_empty(&self) -> bool {
        self.reason.is_none() && self.campaign.is_none()
    }

    /// The filter in words, for a question or a summary.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(reason) = &self.reason {
            parts.push(format!("reason {reason:?}"));
        }
        if let Some(campaign) = &self.campaign {
            parts.push(format!("campaign {campaign:?}"));
        }
        parts.join(" and ")
    }
}

/// The properties of a replayed job: the original's, minus everything about its past
/// attempts (`x-sluice-*`, the broker's `x-death`...), persistent, no expiration.
pub fn replay_properties(original: &BasicProperties, id: &str) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(table) = original.headers() {
        for (name, value) in table.inner() {
            if !is_history_header(name.as_str()) {
                kept.insert(name.clone(), value.clone());
            }
        }
    }
    let content_type = original
        .content_type()
        .clone()
        .unwrap_or_else(|| "application/json".into());
    BasicProperties::default()
        .with_content_type(content_type)
        .with_delivery_mode(PERSISTENT)
        .with_message_id(id.into())
        .with_timestamp(crate::publish::unix_now())
        .with_headers(kept)
}

/// Headers that describe a job's earlier delivery attempts rather than the job.
fn is_history_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("x-sluice-")
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "x-delivery-count"
}

/// How many messages a relay's dead queue holds, or `None` if it does not exist. A dead
/// queue left by an older sluice (classic) is an error naming the migration command.
async fn dead_queue_len(
    connection: &Connection,
    topology: &Topology,
    relay: &str,
) -> anyhow::Result<Option<u32>> {
    let spec: QueueSpec = topology
        .job_queues(&[relay], 0)
        .into_iter()
        .find(|spec| spec.name == topology.dead_queue(relay))
        .expect("every relay has a dead queue");
    match topology
        .check_queue(connection, &spec)
        .await
        .with_context(|| format!("cannot inspect {}", spec.name))?
    {
        QueueState::Absent => Ok(None),
        QueueState::Matches { messages } => Ok(Some(messages)),
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<Connection> {
    Ok(settings
        .amqp
        .connect_with_backoff("sluice-producer dead", std::time::Duration::from_secs(30))
        .await?)
}

/// `dead list`: every message of the queue is rotated (see the module docs), so the queue
/// ends as it began even with `--limit`.
pub async fn list(settings: &Settings, args: DeadListArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let topology = Topology::from_settings(settings);
    let connection = connect(settings).await?;
    let mut jobs = Vec::new();
    let mut more = Vec::new();
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some(count) = dead_queue_len(&connection, &topology, relay).await? else {
            continue;
        };
        let transfer = Transfer::open(&connection).await?;
        let mut shown = 0u32;
        let mut hidden = 0u32;
        for _ in 0..count {
            let Some(delivery) = transfer.take(&queue).await? else {
                break;
            };
            let job = DeadJob::describe(relay, &delivery.properties, &delivery.data);
            transfer.rotate(&delivery, &queue).await?;
            if !args.filter.matches(&job) {
                continue;
            }
            if shown < args.limit {
                shown += 1;
                jobs.push(job);
            } else {
                hidden += 1;
            }
        }
        transfer.close().await;
        if hidden > 0 {
            more.push(format!("{relay}: {hidden} more not shown (--limit)"));
        }
    }
    let _ = connection.close(200, "done".into()).await;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        for job in &jobs {
            writeln!(out, "{}", serde_json::to_string(job).expect("serializes"))?;
        }
    } else {
        write_table(&mut out, &jobs, std::io::stdout().is_terminal())?;
    }
    for line in more {
        eprintln!("{line}");
    }
    Ok(Status::Success)
}

fn write_table(out: &mut impl Write, jobs: &[DeadJob], terminal: bool) -> std::io::Result<()> {
    if jobs.is_empty() {
        return writeln!(out, "no dead jobs");
    }
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|job| {
            let reply = match (&job.smtp_code, &job.smtp_reply) {
                (Some(code), Some(reply)) if !reply.starts_with(&code.to_string()) => {
                    format!("{code} {reply}")
                }
                (_, Some(reply)) => reply.clone(),
                (Some(code), None) => code.to_string(),
                (None, None) => "-".into(),
            };
            let reply = reply.replace(['\r', '\n'], " ");
            let reply = if terminal && reply.chars().count() > 70 {
                format!("{}…", reply.chars().take(69).collect::<String>())
            } else {
                reply
            };
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            [
                job.id.clone(),
                job.relay.clone(),
                or_dash(&job.to),
                or_dash(&job.reason),
                job.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                reply,
            ]
        })
        .collect();
    let titles = ["ID", "RELAY", "TO", "REASON", "ATTEMPTS", "LAST REPLY"];
    let mut widths = titles.map(|t| t.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text
    };
    writeln!(out, "{}", line(titles))?;
    for row in &rows {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

/// The class a dead job is replayed in: the one its copy recorded (`x-sluice-priority`),
/// else its body's `priority`, else `normal`.
fn replay_class(properties: &BasicProperties, body: &[u8]) -> Priority {
    let recorded = headers::get_str(properties.headers().as_ref(), headers::PRIORITY)
        .and_then(|class| class.parse().ok());
    recorded
        .or_else(|| {
            #[derive(serde::Deserialize)]
            struct Class {
                priority: Option<Priority>,
            }
            serde_json::from_slice::<Class>(body).ok()?.priority
        })
        .unwrap_or_default()
}

/// `dead replay`: the selected jobs go to the jobs exchange (a job id at most once per
/// run), the others are rotated back in place.
pub async fn replay(settings: &Settings, args: DeadReplayArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let wanted: BTreeSet<String> = args.ids.iter().cloned().collect();
    let topology = Topology::from_settings(settings);
    let connection = connect(settings).await?;
    let mut replayed = 0u64;
    let mut duplicates = 0u64;
    let mut found = BTreeSet::new();
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some(count) = dead_queue_len(&connection, &topology, relay).await? else {
            continue;
        };
        let transfer = Transfer::open(&connection).await?;
        let setup = Setup {
            relays: vec![relay.clone()],
            retry_steps: settings.retry.delays.len(),
        };
        let mut publisher =
            Publisher::connect(&settings.amqp, topology.clone(), setup, REPLAY_WINDOW, true)
                .await
                .context("cannot start replaying")?;
        let exchange: ShortString = topology.jobs_exchange().into();
        let mut sent: HashSet<String> = HashSet::new();
        // Only the messages present now: a job that dies again meanwhile is not replayed twice.
        for _ in 0..count {
            let Some(delivery) = transfer.take(&queue).await? else {
                break;
            };
            let described = DeadJob::describe(relay, &delivery.properties, &delivery.data);
            let selected = args.filter.matches(&described)
                && (wanted.is_empty() || wanted.contains(&described.id));
            if !selected {
                transfer.rotate(&delivery, &queue).await?;
                continue;
            }
            if !sent.insert(described.id.clone()) {
                // A second copy of a job sent in this run (left by an interrupted rotation):
                // the first one's copy is on its way, this one goes.
                transfer.ack(&delivery).await?;
                duplicates += 1;
                continue;
            }
            found.insert(described.id.clone());
            let class = replay_class(&delivery.properties, &delivery.data);
            publisher
                .publish(Outgoing {
                    tag: delivery.delivery_tag,
                    properties: replay_properties(&delivery.properties, &described.id),
                    id: described.id,
                    exchange: exchange.clone(),
                    routing_key: class.routing_key(relay).into(),
                    body: delivery.data,
                })
                .await
                .with_context(|| format!("while replaying the dead jobs of {relay}"))?;
            replayed += transfer
                .ack_confirmed(&mut publisher)
                .await
                .context("cannot remove replayed jobs from the dead queue")?;
        }
        publisher
            .flush()
            .await
            .with_context(|| format!("while replaying the dead jobs of {relay}"))?;
        replayed += transfer
            .ack_confirmed(&mut publisher)
            .await
            .context("cannot remove replayed jobs from the dead queue")?;
        publisher.close().await;
        transfer.close().await;
    }
    let _ = connection.close(200, "done".into()).await;
    if duplicates > 0 {
        eprintln!("removed {duplicates} duplicate copies of jobs replayed once");
    }
    println!("replayed {replayed} jobs");
    let missing: Vec<&String> = wanted.difference(&found).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "not found in the dead queue(s) of {}{}: {}",
            relays.join(", "),
            if args.filter.is_empty() {
                String::new()
            } else {
                format!(" with {}", args.filter.describe())
            },
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Status::Success)
}

/// `dead purge`: without a filter the queue is purged at once; with one, the matching jobs
/// are removed and the others rotated back in place.
pub async fn purge(settings: &Settings, args: DeadPurgeArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let interactive = std::io::stdin().is_terminal();
    if !args.yes && !interactive {
        return Err(UsageError(
            "dead purge deletes jobs for good: pass --yes (there is no terminal to ask on)".into(),
        )
        .into());
    }
    let topology = Topology::from_settings(settings);
    let connection = connect(settings).await?;
    let mut purged = 0u64;
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some(count) = dead_queue_len(&connection, &topology, relay).await? else {
            continue;
        };
        let question = if args.filter.is_empty() {
            format!("Delete the {count} dead job(s) of relay {relay} ({queue})?")
        } else {
            format!(
                "Delete the dead jobs with {} of relay {relay} ({queue})?",
                args.filter.describe()
            )
        };
        if !args.yes && !confirm(&question)? {
            eprintln!("kept the dead jobs of {relay}");
            continue;
        }
        if args.filter.is_empty() {
            purged += u64::from(purge_all(&connection, &queue).await?);
            continue;
        }
        let transfer = Transfer::open(&connection).await?;
        for _ in 0..count {
            let Some(delivery) = transfer.take(&queue).await? else {
                break;
            };
            let described = DeadJob::describe(relay, &delivery.properties, &delivery.data);
            if args.filter.matches(&described) {
                transfer.ack(&delivery).await?;
                purged += 1;
            } else {
                transfer.rotate(&delivery, &queue).await?;
            }
        }
        transfer.close().await;
    }
    let _ = connection.close(200, "done".into()).await;
    println!("purged {purged} jobs");
    Ok(Status::Success)
}

async fn purge_all(connection: &Connection, queue: &str) -> anyhow::Result<u32> {
    let channel: Channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    let purged = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("cannot purge {queue}"))?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn dead_properties() -> BasicProperties {
        let mut table = FieldTable::default();
        headers::set_str(&mut table, headers::REASON, "retries exhausted");
        headers::set_int(&mut table, headers::SMTP_CODE, 451);
        headers::set_str(&mut table, headers::SMTP_REPLY, "451 4.7.1 try later");
        headers::set_int(&mut table, headers::ATTEMPTS, 6);
        headers::set_int(&mut table, headers::ATTEMPT, 6);
        headers::set_str(
            &mut table,
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        headers::set_str(&mut table, "tracestate", "vendor=1");
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        headers::set_str(&mut table, "x-first-death-queue", "sluice.jobs.primary");
        BasicProperties::default()
            .with_message_id("spring-7".into())
            .with_expiration("30000".into())
            .with_headers(table)
    }

    #[test]
    fn describes_dead_jobs_even_with_broken_bodies() {
        let body = br#"{"id":"spring-7","campaign":"spring","from":"n@example.com","to":"ann@example.org","subject":"s","text":"t"}"#;
        let job = DeadJob::describe("primary", &dead_properties(), body);
        assert_eq!(
            job,
            DeadJob {
                id: "spring-7".into(),
                to: Some("ann@example.org".into()),
                campaign: Some("spring".into()),
                relay: "primary".into(),
                reason: Some("retries exhausted".into()),
                smtp_code: Some(451),
                smtp_reply: Some("451 4.7.1 try later".into()),
                attempts: Some(6),
            }
        );
        let broken = DeadJob::describe(
            "primary",
            &BasicProperties::default().with_message_id("m1".into()),
            b"\xff not json",
        );
        assert_eq!(broken.id, "m1");
        assert_eq!(broken.to, None);
        let no_id = DeadJob::describe(
            "primary",
            &BasicProperties::default(),
            br#"{"id":"x-1","to":"b@example.org"}"#,
        );
        assert_eq!(no_id.id, "x-1");
        assert_eq!(no_id.to.as_deref(), Some("b@example.org"));
    }

    #[test]
    fn replay_forgets_the_history_but_keeps_the_trace() {
        let properties = replay_properties(&dead_properties(), "spring-7");
        let names: Vec<String> = properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(names, ["traceparent", "tracestate"]);
        assert_eq!(properties.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(properties.expiration(), &None);
        assert_eq!(
            properties.message_id().as_ref().map(|m| m.as_str()),
            Some("spring-7")
        );
        assert_eq!(
            properties.content_type().as_ref().map(|m| m.as_str()),
            Some("application/json")
        );
    }

    #[test]
    fn table_lists_one_job_per_line() {
        let jobs = vec![DeadJob::describe("primary", &dead_properties(), b"{}")];
        let mut out = Vec::new();
        write_table(&mut out, &jobs, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].starts_with("spring-7"));
        assert!(lines[1].contains("retries exhausted"));
        assert!(lines[1].ends_with("451 4.7.1 try later"));
    }
}
