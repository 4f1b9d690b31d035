//! Samples the depth of every class queue of the worker's relays for `/metrics`
//! (`sluice_queue_ready_jobs{relay,class}`), every [`SAMPLE_EVERY`].

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sluice_shared::shutdown::Shutdown;
use sluice_shared::{Priority, Topology};

use crate::broker::{within, Broker};
use crate::metrics::Metrics;

/// How often the depths are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Sample until shutdown (or until the connection breaks: the caller aborts it then). A
/// queue that cannot be looked at is skipped until the next round.
pub async fn sample_depths(
    broker: &Broker,
    topology: &Topology,
    relays: &[String],
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    let mut channel = None;
    loop {
        for relay in relays {
            for class in Priority::ALL {
                if channel
                    .as_ref()
                    .is_none_or(|c: &lapin::Channel| !c.status().connected())
                {
                    channel = within(
                        "opening a sampling channel",
                        broker.consume.create_channel(),
                    )
                    .await
                    .ok();
                }
                let Some(open) = channel.as_ref() else {
                    continue;
                };
                let declared = within(
                    "sampling a class queue",
                    open.queue_declare(
                        topology.class_queue(relay, class).into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await;
                match declared {
                    Ok(queue) => metrics.queue_ready(relay, class.as_str(), queue.message_count()),
                    Err(_) => channel = None,
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}
