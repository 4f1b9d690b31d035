//! `queues`: how many jobs wait in each class queue (`high`, `normal`, `low`) of each relay,
//! read with passive declarations (nothing is consumed, nothing is created).

use anyhow::Context as _;
use lapin::options::QueueDeleteOptions;
use lapin::Connection;
use sluice_shared::amqp::topology::inspect_queue;
use sluice_shared::{Priority, Settings, Topology};

use crate::cli::QueuesArgs;
use crate::exit::Status;
use crate::relays::chosen_relays;

/// One class queue as `queues --json` prints it.
#[derive(Debug, serde::Serialize)]
pub struct QueueDepth {
    pub relay: String,
    pub class: Priority,
    pub queue: String,
    /// Jobs ready in the queue; `None` when the queue does not exist (no worker has
    /// declared it yet).
    pub ready: Option<u32>,
}

/// Run `queues`: exit 0, 1 when the broker cannot be reached.
pub async fn run(settings: &Settings, args: QueuesArgs) -> anyhow::Result<Status> {
    let relays = chosen_relays(settings, &args.relays)?;
    let topology = Topology::from_settings(settings);
    let connection = settings
        .amqp
        .connect_with_backoff("sluice-producer queues", std::time::Duration::from_secs(30))
        .await?;
    let mut depths = Vec::new();
    for relay in &relays {
        for class in Priority::ALL {
            let queue = topology.class_queue(relay, class);
            let ready = ready_jobs(&connection, &queue).await?;
            depths.push(QueueDepth {
                relay: relay.clone(),
                class,
                queue,
                ready,
            });
        }
    }
    let _ = connection.close(200, "done".into()).await;
    if args.json {
        for depth in &depths {
            println!("{}", serde_json::to_string(depth).expect("serializes"));
        }
    } else {
        for depth in &depths {
            let ready = depth
                .ready
                .map_or_else(|| "not declared yet".to_string(), |n| format!("{n} ready"));
            println!("{} {:<6} {ready}", depth.relay, depth.class.as_str());
        }
    }
    Ok(Status::Success)
}

/// A queue as the broker describes it (messages ready, consumers), `None` when it does not
/// exist; nothing is created or consumed.
pub async fn inspect(connection: &Connection, queue: &str) -> anyhow::Result<Option<lapin::Queue>> {
    inspect_queue(connection, queue)
        .await
        .with_context(|| format!("cannot look at {queue}"))
}

/// How many jobs `queue` holds ready, `None` when it does not exist.
pub async fn ready_jobs(connection: &Connection, queue: &str) -> anyhow::Result<Option<u32>> {
    Ok(inspect(connection, queue)
        .await?
        .map(|declared| declared.message_count()))
}

/// Delete `queue`, whatever it holds: the caller checked that it may go.
pub async fn delete_queue(connection: &Connection, queue: &str) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("cannot delete {queue}"))?;
    let _ = channel.close(200, "deleted".into()).await;
    Ok(())
}
