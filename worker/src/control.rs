//! The control stream: how the fleet learns what one worker learned from a relay. A worker
//! whose relay pushes back publishes the [`Change`] (a rate cut, a session limit, a
//! suspension) on `<ns>.control`; every worker reads the stream from its first entry, so
//! it follows each change within a broker round trip, and a worker started during a
//! throttle replays the changes and starts throttled. Changes carry their time: recovery
//! is a function of it (see [`crate::limits`]), and an old change replayed changes nothing
//! that a newer one set.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sluice_shared::Topology;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::{within, Broker};
use crate::limits::{now_ms, Change};
use crate::relay::Relays;

/// Changes read at once from the stream.
const PREFETCH: u16 = 256;

/// Tells the fleet; cheap to clone. Its tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Control {
    outbox: mpsc::UnboundedSender<Change>,
    _tasks: Arc<Tasks>,
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Control {
    /// Start following the control stream (declared with the topology) and publishing to
    /// it, over this broker connection's two connections.
    pub async fn start(
        broker: &Broker,
        topology: &Topology,
        relays: Arc<Relays>,
    ) -> anyhow::Result<Control> {
        let stream = topology.control();
        let reading = within(
            "opening the control channel",
            broker.consume.create_channel(),
        )
        .await?;
        within(
            "setting the control prefetch",
            reading.basic_qos(PREFETCH, BasicQosOptions::default()),
        )
        .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut consumer = within(
            "following the control stream",
            reading.basic_consume(
                stream.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            ),
        )
        .await?;
        let follow = tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                let Ok(delivery) = delivery else { break };
                match serde_json::from_slice::<Change>(&delivery.data) {
                    Ok(change) => follow(&relays, &change),
                    Err(e) => {
                        tracing::warn!(error = %e, "an unreadable entry in the control stream; skipped")
                    }
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
            let _ = reading;
        });
        let writing = within(
            "opening the control channel",
            broker.publish.create_channel(),
        )
        .await?;
        let (outbox, mut changes) = mpsc::unbounded_channel::<Change>();
        let publish = tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                let Ok(body) = serde_json::to_vec(&change) else {
                    continue;
                };
                let published = tokio::time::timeout(
                    Duration::from_secs(5),
                    writing.basic_publish(
                        "".into(),
                        stream.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                if !matches!(published, Ok(Ok(_))) {
                    tracing::warn!(
                        relay = change.relay(),
                        "could not tell the fleet about the relay's pushback"
                    );
                }
            }
        });
        Ok(Control {
            outbox,
            _tasks: Arc::new(Tasks(vec![follow, publish])),
        })
    }

    /// Tell the fleet (this worker included: it reads its own changes back).
    pub fn tell(&self, change: Change) {
        let _ = self.outbox.send(change);
    }
}

/// Apply one change read from the stream to this worker's relay of that name.
fn follow(relays: &Relays, change: &Change) {
    let Some(relay) = relays.get(change.relay()) else {
        return; // a relay this worker does not serve
    };
    match change {
        Change::Down {
            until_ms, reason, ..
        } => {
            let left = until_ms.saturating_sub(now_ms());
            if left > 0 {
                relay
                    .health
                    .mark_down_for(reason, Duration::from_millis(left));
            }
        }
        change => {
            relay.limits.apply(change);
        }
    }
}
