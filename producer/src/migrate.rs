//! `migrate-queues`: recreate the queues an older sluice declared differently, keeping every
//! message, in order, with its properties and headers.
//!
//! For each queue of [`Topology::job_queues`] that does not match (the broker answers
//! PRECONDITION_FAILED to its declaration), in steps that each leave a state the next run
//! resumes from:
//! 1. declare the temporary quorum queue `<queue>.migrating`, bound like the queue (so a
//!    message routed while the queue is gone, such as a retry expiring, lands there);
//! 2. move every message of the queue to it (copy confirmed, then the original acked);
//! 3. delete the emptied queue, declare it as this version does, with its binding;
//! 4. unbind the temporary queue, move its messages back the same way, delete it.
//!
//! A run finds each queue either mismatched (resume at 1–2, appending to a temporary queue
//! that may hold part of it already), absent (declare it, go on at 4), or matching (go on at
//! 4 if a temporary queue is left). A copy's expiration is kept aside in a header while it
//! sits in the temporary queue (which has no dead-letter target), and restored after.

use std::io::IsTerminal;

use anyhow::Context as _;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use sluice_shared::amqp::topology::{QueueSpec, QueueState, TopologyError};
use sluice_shared::{Settings, Topology};

use crate::cli::MigrateArgs;
use crate::exit::{Status, UsageError};
use crate::prompt::confirm;
use crate::queues::{delete_queue, inspect};
use crate::relays::{check_relay_name, DEFAULT_RELAY};
use crate::transfer::{kept_properties, Transfer};

/// Where a message's expiration waits while it is in the temporary queue.
const KEPT_EXPIRATION: &str = "x-sluice-migrated-expiration";

/// `migrate-queues`.
pub async fn run(settings: &Settings, args: MigrateArgs) -> anyhow::Result<Status> {
    let relays = if args.relays.is_empty() {
        if settings.relays.is_empty() {
            vec![DEFAULT_RELAY.to_string()]
        } else {
            settings.relays.keys().cloned().collect()
        }
    } else {
        for relay in &args.relays {
            check_relay_name(relay)?;
        }
        args.relays.clone()
    };
    if !args.yes && !std::io::stdin().is_terminal() {
        return Err(UsageError(
            "migrate-queues deletes and recreates queues: stop the workers, then pass --yes \
             (there is no terminal to ask on)"
                .into(),
        )
        .into());
    }
    if !args.yes
        && !confirm(&format!(
            "Recreate the queues of namespace {} that an older sluice declared differently \
             (relays {})? Every worker must be stopped.",
            settings.amqp.namespace,
            relays.join(", ")
        ))?
    {
        eprintln!("nothing changed");
        return Ok(Status::Success);
    }

    let topology = Topology::from_settings(settings);
    let connection = settings
        .amqp
        .connect_with_backoff(
            "sluice-producer migrate-queues",
            std::time::Duration::from_secs(30),
        )
        .await?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    topology
        .declare_exchanges(&channel)
        .await
        .context("cannot declare the exchanges")?;
    let _ = channel.close(200, "declared".into()).await;

    let names: Vec<&str> = relays.iter().map(String::as_str).collect();
    let mut migrated = 0usize;
    for spec in topology.job_queues(&names, settings.retry.delays.len()) {
        if migrate_queue(&connection, &topology, &spec)
            .await
            .with_context(|| format!("while migrating {}", spec.name))?
        {
            migrated += 1;
        }
    }
    if recreate_control_stream(&connection, &topology).await? {
        migrated += 1;
    }
    let _ = connection.close(200, "done".into()).await;
    println!("migrated {migrated} queues");
    Ok(Status::Success)
}

/// Bring one queue to its declaration; true if anything had to move.
async fn migrate_queue(
    connection: &Connection,
    topology: &Topology,
    spec: &QueueSpec,
) -> anyhow::Result<bool> {
    let temporary = topology.migration_queue(&spec.name);
    let mut moved_any = false;
    match topology.check_queue(connection, spec).await {
        Ok(QueueState::Matches { .. }) => {}
        Ok(QueueState::Absent) => declare(connection, topology, spec).await?,
        Err(TopologyError::Mismatch { difference, .. }) => {
            eprintln!(
                "{}: {difference}; moving its messages to {temporary}",
                spec.name
            );
            declare_temporary(connection, &temporary, spec).await?;
            let moved = move_all(connection, &spec.name, &temporary, stash_expiration).await?;
            eprintln!("{}: {moved} messages kept in {temporary}", spec.name);
            delete(connection, &spec.name).await?;
            declare(connection, topology, spec).await?;
            moved_any = true;
        }
        Err(e) => return Err(e.into()),
    }
    if exists(connection, &temporary).await? {
        unbind_temporary(connection, &temporary, spec).await?;
        let moved = move_all(connection, &temporary, &spec.name, restore_expiration).await?;
        delete(connection, &temporary).await?;
        eprintln!("{}: recreated, {moved} messages moved back", spec.name);
        moved_any = true;
    }
    Ok(moved_any)
}

/// An older sluice kept the control stream for a day and wrote only relay pushback into it
/// (rate cuts, session limits), which the workers learn again from the relays: a stream of
/// another retention is deleted and declared anew, without copying. True when it was.
async fn recreate_control_stream(
    connection: &Connection,
    topology: &Topology,
) -> anyhow::Result<bool> {
    let spec = topology.control_spec();
    match topology.check_queue(connection, &spec).await {
        Ok(_) => Ok(false),
        Err(TopologyError::Mismatch { difference, .. }) => {
            eprintln!(
                "{}: {difference}; recreated empty (it held only relay pushback, which the \
                 workers learn again)",
                spec.name
            );
            delete_queue(connection, &spec.name).await?;
            declare(connection, topology, &spec).await?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// Move every message of `from` to the tail of `to`, in order, each copy confirmed before
/// its original is acknowledged.
async fn move_all(
    connection: &Connection,
    from: &str,
    to: &str,
    properties: fn(&BasicProperties) -> BasicProperties,
) -> anyhow::Result<u64> {
    let transfer = Transfer::open(connection).await?;
    let mut moved = 0;
    while let Some(delivery) = transfer.take(from).await? {
        transfer
            .copy_then_ack(&delivery, "", to, properties(&delivery.properties))
            .await?;
        moved += 1;
    }
    transfer.close().await;
    Ok(moved)
}

/// The temporary queue has no TTL and no dead-letter target: an expiration would drop the
/// message, so it waits in a header.
fn stash_expiration(original: &BasicProperties) -> BasicProperties {
    let kept = kept_properties(original);
    let Some(expiration) = original.expiration().clone() else {
        return kept;
    };
    let mut headers = kept.headers().clone().unwrap_or_default();
    headers.insert(
        KEPT_EXPIRATION.into(),
        AMQPValue::LongString(expiration.as_str().into()),
    );
    without_expiration(&kept.with_headers(headers))
}

/// Every property of `p` but its expiration (lapin has no way to unset one).
fn without_expiration(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),*) => {
            $(if let Some(value) = p.$get().clone() {
                out = out.$set(value);
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id
    );
    out
}

/// The original properties back, expiration included.
fn restore_expiration(stashed: &BasicProperties) -> BasicProperties {
    let kept = kept_properties(stashed);
    let Some(headers) = kept.headers().clone() else {
        return kept;
    };
    let mut rest = FieldTable::default();
    let mut expiration = None;
    for (name, value) in headers.inner() {
        if name.as_str() == KEPT_EXPIRATION {
            if let AMQPValue::LongString(text) = value {
                expiration = Some(text.to_string());
            }
        } else {
            rest.insert(name.clone(), value.clone());
        }
    }
    let restored = kept.with_headers(rest);
    match expiration {
        Some(expiration) => restored.with_expiration(expiration.into()),
        None => restored,
    }
}

async fn declare(
    connection: &Connection,
    topology: &Topology,
    spec: &QueueSpec,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    topology.declare_queue(&channel, spec).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn declare_temporary(
    connection: &Connection,
    temporary: &str,
    spec: &QueueSpec,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(temporary.into(), QueueDeclareOptions::durable(), args)
        .await
        .with_context(|| format!("cannot declare {temporary}"))?;
    if let Some((exchange, key)) = &spec.binding {
        channel
            .queue_bind(
                temporary.into(),
                exchange.as_str().into(),
                key.as_str().into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot bind {temporary}"))?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn unbind_temporary(
    connection: &Connection,
    temporary: &str,
    spec: &QueueSpec,
) -> anyhow::Result<()> {
    let Some((exchange, key)) = &spec.binding else {
        return Ok(());
    };
    let channel = connection.create_channel().await?;
    channel
        .queue_unbind(
            temporary.into(),
            exchange.as_str().into(),
            key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot unbind {temporary}"))?;
    let _ = channel.close(200, "unbound".into()).await;
    Ok(())
}

async fn exists(connection: &Connection, queue: &str) -> anyhow::Result<bool> {
    Ok(inspect(connection, queue).await?.is_some())
}

/// Delete an emptied queue; one that is not empty (something published meanwhile) is an
/// error, and the next run moves what arrived. (Quorum queues refuse `if-empty` on
/// RabbitMQ 3.10 with a connection error, so the count is checked first.)
async fn delete(connection: &Connection, queue: &str) -> anyhow::Result<()> {
    let declared = inspect(connection, queue)
        .await?
        .with_context(|| format!("cannot delete {queue}: it does not exist"))?;
    if declared.message_count() > 0 || declared.consumer_count() > 0 {
        anyhow::bail!(
            "{queue} is not idle ({} messages arrived, {} consumers): stop every worker and \
             publisher, then run migrate-queues again",
            declared.message_count(),
            declared.consumer_count()
        );
    }
    delete_queue(connection, queue).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiration_waits_in_a_header_and_comes_back() {
        let mut headers = FieldTable::default();
        headers.insert("x-sluice-attempt".into(), AMQPValue::LongLongInt(2));
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_expiration("30000".into())
            .with_headers(headers);
        let stashed = stash_expiration(&original);
        assert_eq!(stashed.expiration(), &None);
        let back = restore_expiration(&stashed);
        assert_eq!(back, original);
        let plain = BasicProperties::default().with_message_id("m2".into());
        assert_eq!(restore_expiration(&stash_expiration(&plain)), plain);
    }
}
