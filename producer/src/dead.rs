//! `dead list | replay | purge`: the jobs that ended in a relay's dead-letter queue.
//!
//! Listing takes messages with `basic.get` without acknowledging them, then closes the
//! channel so the broker puts them back where they were (the dead queues are classic queues
//! for that reason: see `Topology::declare`). Replay acknowledges a dead job only after the
//! broker confirmed its copy on the jobs exchange, so an interrupted replay loses nothing
//! (at worst a job is replayed twice, which the worker recognises by id).

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use sluice_shared::headers;
use sluice_shared::{Settings, Topology};

use crate::cli::{DeadListArgs, DeadPurgeArgs, DeadReplayArgs, RelayChoice};
use crate::exit::{Status, UsageError};
use crate::publish::{Outgoing, Publisher, Setup, PERSISTENT};
use crate::send::DEFAULT_RELAY;

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

/// The relays a `dead` command acts on: `--relay`, else every configured relay, else
/// `primary`. A relay no longer configured may still have dead jobs, so any name goes.
pub fn chosen_relays(settings: &Settings, choice: &RelayChoice) -> Result<Vec<String>, UsageError> {
    match &choice.relay {
        Some(name) => {
            check_relay_name(name)?;
            Ok(vec![name.clone()])
        }
        None if settings.relays.is_empty() => Ok(vec![DEFAULT_RELAY.to_string()]),
        None => Ok(settings.relays.keys().cloned().collect()),
    }
}

/// A relay name goes into queue names: letters, digits, '-' and '_'.
pub fn check_relay_name(name: &str) -> Result<(), UsageError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--relay {name:?}: a relay name uses letters, digits, '-' and '_'"
        )))
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

/// A relay's dead queue, if it exists: a channel on it and how many messages it holds.
async fn open_dead_queue(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<Option<(Channel, u32)>> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
    {
        Ok(declared) => Ok(Some((channel, declared.message_count()))),
        // 404: nothing was ever dead-lettered for this relay (the broker closed the channel).
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {queue}")),
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    error.to_string().contains("NOT_FOUND")
}

async fn connect(settings: &Settings) -> anyhow::Result<Connection> {
    Ok(settings
        .amqp
        .connect_with_backoff("sluice-producer dead", std::time::Duration::from_secs(30))
        .await?)
}

/// `dead list`.
pub async fn list(settings: &Settings, args: DeadListArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let topology = Topology::new(settings.amqp.namespace.clone());
    let connection = connect(settings).await?;
    let mut jobs = Vec::new();
    let mut more = Vec::new();
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some((channel, count)) = open_dead_queue(&connection, &queue).await? else {
            continue;
        };
        let mut taken = 0u32;
        while taken < args.limit {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("cannot read {queue}"))?
            else {
                break;
            };
            taken += 1;
            let delivery = message.delivery;
            jobs.push(DeadJob::describe(
                relay,
                &delivery.properties,
                &delivery.data,
            ));
        }
        // Never acknowledged: closing the channel puts every message back, in place.
        channel
            .close(200, "listed".into())
            .await
            .with_context(|| format!("cannot hand the listed messages back to {queue}"))?;
        if count > taken {
            more.push(format!(
                "{relay}: {} more not shown (--limit)",
                count - taken
            ));
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

/// `dead replay`.
pub async fn replay(settings: &Settings, args: DeadReplayArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let wanted: BTreeSet<String> = args.ids.iter().cloned().collect();
    let topology = Topology::new(settings.amqp.namespace.clone());
    let connection = connect(settings).await?;
    let mut replayed = 0u64;
    let mut found = BTreeSet::new();
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some((channel, count)) = open_dead_queue(&connection, &queue).await? else {
            continue;
        };
        let setup = Setup {
            relays: vec![relay.clone()],
            retry_steps: settings.retry.delays.len(),
            watch_campaign: None,
        };
        let mut publisher =
            Publisher::connect(&settings.amqp, topology.clone(), setup, REPLAY_WINDOW, true)
                .await
                .context("cannot start replaying")?;
        let exchange: ShortString = topology.jobs_exchange().into();
        // Only the messages present now: a job that dies again meanwhile is not replayed twice.
        for _ in 0..count {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("cannot read {queue}"))?
            else {
                break;
            };
            let delivery = message.delivery;
            let described = DeadJob::describe(relay, &delivery.properties, &delivery.data);
            if !wanted.is_empty() && !wanted.contains(&described.id) {
                // Not selected: left unacknowledged, it goes back in place when the channel
                // closes.
                continue;
            }
            found.insert(described.id.clone());
            publisher
                .publish(Outgoing {
                    tag: delivery.delivery_tag,
                    properties: replay_properties(&delivery.properties, &described.id),
                    id: described.id,
                    exchange: exchange.clone(),
                    routing_key: relay.as_str().into(),
                    body: delivery.data,
                })
                .await
                .with_context(|| format!("while replaying the dead jobs of {relay}"))?;
            replayed += ack_confirmed(&mut publisher, &channel).await?;
        }
        publisher
            .flush()
            .await
            .with_context(|| format!("while replaying the dead jobs of {relay}"))?;
        replayed += ack_confirmed(&mut publisher, &channel).await?;
        publisher.close().await;
        channel
            .close(200, "replayed".into())
            .await
            .with_context(|| format!("cannot hand the jobs not replayed back to {queue}"))?;
    }
    let _ = connection.close(200, "done".into()).await;
    println!("replayed {replayed} jobs");
    let missing: Vec<&String> = wanted.difference(&found).collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "not found in the dead queue(s) of {}: {}",
            relays.join(", "),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Status::Success)
}

/// A dead job leaves its queue only once its copy is confirmed.
async fn ack_confirmed(publisher: &mut Publisher, channel: &Channel) -> anyhow::Result<u64> {
    let tags: Vec<u64> = publisher.drain_confirmed().collect();
    for &tag in &tags {
        channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .context("cannot remove a replayed job from the dead queue")?;
    }
    Ok(tags.len() as u64)
}

/// `dead purge`.
pub async fn purge(settings: &Settings, args: DeadPurgeArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let interactive = std::io::stdin().is_terminal();
    if !args.yes && !interactive {
        return Err(UsageError(
            "dead purge deletes jobs for good: pass --yes (there is no terminal to ask on)".into(),
        )
        .into());
    }
    let topology = Topology::new(settings.amqp.namespace.clone());
    let connection = connect(settings).await?;
    let mut purged = 0u64;
    for relay in &relays {
        let queue = topology.dead_queue(relay);
        let Some((channel, count)) = open_dead_queue(&connection, &queue).await? else {
            continue;
        };
        if !args.yes
            && !confirm(&format!(
                "Delete the {count} dead job(s) of relay {relay} ({queue})?"
            ))?
        {
            eprintln!("kept the dead jobs of {relay}");
            continue;
        }
        purged += u64::from(
            channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .with_context(|| format!("cannot purge {queue}"))?,
        );
        let _ = channel.close(200, "purged".into()).await;
    }
    let _ = connection.close(200, "done".into()).await;
    println!("purged {purged} jobs");
    Ok(Status::Success)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
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
