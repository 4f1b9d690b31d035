//! The control stream: how the fleet learns what one worker learned from a relay, and what
//! an operator commands. A worker whose relay pushes back publishes the [`Change`] (a rate
//! cut, a session limit, a suspension) on `<ns>.control`; `sluice-producer` publishes the
//! operators' commands there (pause, resume, cancel a campaign; suspend, resume a relay).
//! Every worker reads the stream from its first entry, so it follows each entry within a
//! broker round trip, and a worker started during a throttle or a pause replays the stream
//! and starts throttled, or paused: [`Control::start`] returns only once the worker has
//! read everything written before it started. Changes carry their time: recovery is a
//! function of it (see [`crate::limits`]), and an old change replayed changes nothing that
//! a newer one set.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sluice_shared::control::{CampaignState, Steering};
use sluice_shared::Topology;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{within, Broker};
use crate::limits::{now_ms, Change};
use crate::relay::Relays;

/// Changes read at once from the stream.
const PREFETCH: u16 = 256;

/// The longest a worker waits to have read the stream up to its start.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Tells the fleet, and knows what the operators commanded; cheap to clone. Its tasks stop
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Control {
    outbox: mpsc::UnboundedSender<Change>,
    steering: Arc<RwLock<Steering>>,
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
        let writing = within(
            "opening the control channel",
            broker.publish.create_channel(),
        )
        .await?;
        // Where "now" is: everything before this marker is read before any lane starts.
        let marker = format!("{:032x}", rand::random::<u128>());
        let mark = Change::Marker { id: marker.clone() };
        within(
            "marking the control stream",
            writing.basic_publish(
                "".into(),
                stream.as_str().into(),
                BasicPublishOptions::default(),
                &mark.to_bytes(),
                BasicProperties::default(),
            ),
        )
        .await?;
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
        let steering = Arc::new(RwLock::new(Steering::default()));
        let (caught_up, read_up_to_start) = oneshot::channel();
        let follow = {
            let steering = steering.clone();
            tokio::spawn(async move {
                let mut caught_up = Some(caught_up);
                while let Some(delivery) = consumer.next().await {
                    let Ok(delivery) = delivery else { break };
                    match serde_json::from_slice::<Change>(&delivery.data) {
                        Ok(Change::Marker { id }) if id == marker => {
                            if let Some(caught_up) = caught_up.take() {
                                let _ = caught_up.send(());
                            }
                        }
                        Ok(change) => follow(&relays, &steering, &change),
                        Err(e) => {
                            tracing::warn!(error = %e, "an unreadable entry in the control stream; skipped")
                        }
                    }
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                let _ = reading;
            })
        };
        let caught_up = tokio::time::timeout(CATCH_UP, read_up_to_start).await;
        if !matches!(caught_up, Ok(Ok(()))) {
            follow.abort();
            anyhow::bail!(
                "could not read the control stream {stream} up to now within {CATCH_UP:?}"
            );
        }
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
                        relay = change.relay().unwrap_or_default(),
                        "could not tell the fleet about the relay's pushback"
                    );
                }
            }
        });
        Ok(Control {
            outbox,
            steering,
            _tasks: Arc::new(Tasks(vec![follow, publish])),
        })
    }

    /// Tell the fleet (this worker included: it reads its own changes back).
    pub fn tell(&self, change: Change) {
        let _ = self.outbox.send(change);
    }

    /// Where the operators left `campaign` (`None`: send its jobs).
    pub fn campaign(&self, campaign: &str) -> Option<CampaignState> {
        self.steering
            .read()
            .expect("steering lock")
            .campaign(campaign)
    }
}

/// Apply one entry read from the stream: an operator's command to the steering state (and
/// a relay's suspension to that relay), a relay's pushback to this worker's relay of that
/// name.
fn follow(relays: &Relays, steering: &RwLock<Steering>, change: &Change) {
    if steering.write().expect("steering lock").apply(change) {
        tracing::info!(?change, "following an operator's command");
    }
    let Some(relay) = change.relay().and_then(|name| relays.get(name)) else {
        return; // not about a relay, or one this worker does not serve
    };
    match change {
        Change::Suspend {
            until_ms, reason, ..
        }
        | Change::Down {
            until_ms, reason, ..
        } => {
            let left = until_ms.saturating_sub(now_ms());
            if left > 0 {
                let why = match change {
                    Change::Suspend { .. } => format!("suspended: {reason}"),
                    _ => reason.clone(),
                };
                relay
                    .health
                    .mark_down_for(&why, Duration::from_millis(left));
            }
        }
        Change::Unsuspend { .. } => relay.health.resume(),
        change => {
            relay.limits.apply(change);
        }
    }
}
