//! `queues`: how many jobs wait in each class queue (`high`, `normal`, `low`) of each relay,
//! read with passive declarations (nothing is consumed, nothing is created).

use anyhow::Context as _;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
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
            // The broker closes the channel when the queue is missing: one channel each.
            let channel = connection
                .create_channel()
                .await
                .context("cannot open a channel")?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let ready = match declared {
                Ok(declared) => Some(declared.message_count()),
                Err(e) if e.to_string().contains("NOT_FOUND") => None,
                Err(e) => return Err(e).with_context(|| format!("cannot look at {queue}")),
            };
            let _ = channel.close(200, "counted".into()).await;
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
