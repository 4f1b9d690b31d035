//! Samples the depth of every class queue of the worker's relays for `/metrics`
//! (`sluice_queue_ready_jobs{relay,class}`), every [`SAMPLE_EVERY`], and reports each sample
//! with the age of each class's oldest job to the heads stream, for `relay status`.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sluice_shared::control::now_ms;
use sluice_shared::heads::{HeadsEntry, QueueHead};
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
    let mut reporting = None;
    loop {
        let mut heads = Vec::new();
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
                    Ok(queue) => {
                        let ready = queue.message_count();
                        metrics.queue_ready(relay, class.as_str(), ready);
                        heads.push(QueueHead {
                            relay: relay.clone(),
                            class: class.as_str().to_string(),
                            ready,
                            oldest_age_s: metrics.oldest_age(relay, class.as_str()),
                        });
                    }
                    Err(_) => channel = None,
                }
            }
        }
        if !heads.is_empty() && !broker.is_blocked() {
            report(broker, topology, &mut reporting, heads).await;
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

/// Publish one sample to the heads stream (best effort, unconfirmed: the next one follows
/// in [`SAMPLE_EVERY`]), on the publishing connection like every other publish.
async fn report(
    broker: &Broker,
    topology: &Topology,
    reporting: &mut Option<lapin::Channel>,
    queues: Vec<QueueHead>,
) {
    if reporting.as_ref().is_none_or(|c| !c.status().connected()) {
        *reporting = within(
            "opening a reporting channel",
            broker.publish.create_channel(),
        )
        .await
        .ok();
    }
    let Some(channel) = reporting.as_ref() else {
        return;
    };
    let entry = HeadsEntry::Report {
        at_ms: now_ms(),
        queues,
    };
    let published = within(
        "reporting queue heads",
        channel.basic_publish(
            "".into(),
            topology.heads().as_str().into(),
            BasicPublishOptions::default(),
            &entry.to_bytes(),
            BasicProperties::default(),
        ),
    )
    .await;
    if published.is_err() {
        *reporting = None;
    }
}
