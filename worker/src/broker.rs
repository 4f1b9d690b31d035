//! The worker's two broker connections, and what it watches on them.
//!
//! - **consume**: budget slots, consumers, acks and the pulse. It never publishes, so a
//!   memory or disk alarm (RabbitMQ blocks the connections that publish) never stops acks
//!   or the release of a slot.
//! - **publish**: retry and dead copies and delivery events, in confirm mode. When the
//!   broker blocks it (`connection.blocked`), the worker logs it once, shows it on
//!   `/readyz` and in `sluice_broker_blocked`, and its lanes close their SMTP sessions and
//!   give back their slots until the broker unblocks it: nobody holds a relay's budget
//!   while they cannot settle.
//! - **The pulse and the fence.** A round trip on the consume connection every eighth of
//!   the heartbeat interval. The fence is open while the last answer is younger than half
//!   the heartbeat: a lane starts no SMTP transaction through a closed fence, and the
//!   worker drops every session and reconnects once it closes. The broker frees a silent
//!   connection's slots only after missing its heartbeats (at least a whole interval), so
//!   a worker cut off from the broker has closed its sessions before another worker can
//!   take its slots (see docs/operations.md, the relay budget).
//!
//! Every wait on the broker has a deadline ([`BROKER_DEADLINE`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicQosOptions;
use lapin::Connection;
use sluice_shared::config::AmqpSettings;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::health::Readiness;
use crate::metrics::Metrics;

/// The longest any single broker operation (channel open, declare, consume, confirm) may
/// take before it counts as failed.
pub const BROKER_DEADLINE: Duration = Duration::from_secs(10);

/// The heartbeat assumed when the broker negotiated none.
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(15);

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{what}: {source}")]
    Amqp {
        what: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("{what}: no answer from the broker within {BROKER_DEADLINE:?}")]
    Deadline { what: &'static str },
    #[error("{what}: the broker blocks publishing (resource alarm)")]
    Blocked { what: &'static str },
}

/// Run one broker operation with the [`BROKER_DEADLINE`].
pub async fn within<T>(
    what: &'static str,
    operation: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(BROKER_DEADLINE, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(BrokerError::Amqp { what, source }),
        Err(_) => Err(BrokerError::Deadline { what }),
    }
}

/// The name of the connection jobs are consumed on (shown in the management UI; its node is
/// the `server.address` of the `process` spans).
pub const CONSUME_CONNECTION: &str = "sluice-worker";

/// The worker's connections to the broker and their watchers.
pub struct Broker {
    /// Budget slots, consumers, acks, the pulse.
    pub consume: Arc<Connection>,
    /// Copies and events, in confirm mode.
    pub publish: Arc<Connection>,
    fence: Fence,
    blocked: watch::Receiver<bool>,
    lost: watch::Receiver<Option<String>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl Broker {
    /// Connect both connections (retrying until the broker answers) and start watching them.
    pub async fn connect(
        settings: &AmqpSettings,
        ready: &Readiness,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let consume = settings
            .connect_with_backoff(CONSUME_CONNECTION, Duration::MAX)
            .await?;
        let publish = settings
            .connect_with_backoff("sluice-worker-publish", Duration::MAX)
            .await?;
        let heartbeat = match consume.configuration().heartbeat() {
            0 => FALLBACK_HEARTBEAT,
            secs => Duration::from_secs(u64::from(secs)),
        };
        // A new connection starts unblocked; the broker says so again if its alarm is on.
        ready.set_blocked(false);
        metrics.broker_blocked(false);
        let consume = Arc::new(consume);
        let publish = Arc::new(publish);
        let fence = Fence::new(heartbeat / 2);
        let (lost_tx, lost) = watch::channel(None);
        let (blocked_tx, blocked) = watch::channel(false);
        let pulse_channel = within("opening the pulse channel", consume.create_channel()).await?;
        let watchers = vec![
            tokio::spawn(pulse(
                pulse_channel,
                consume.clone(),
                publish.clone(),
                fence.clone(),
                heartbeat,
                lost_tx.clone(),
            )),
            tokio::spawn(watch_blocked(
                publish.clone(),
                blocked_tx,
                lost_tx,
                ready.clone(),
                metrics.clone(),
            )),
        ];
        Ok(Self {
            consume,
            publish,
            fence,
            blocked,
            lost,
            watchers,
        })
    }

    /// True while the consume connection has answered within half the heartbeat: the
    /// slots it holds are still ours.
    pub fn fence_open(&self) -> bool {
        self.fence.is_open()
    }

    /// True while the broker blocks the publishing connection.
    pub fn is_blocked(&self) -> bool {
        *self.blocked.borrow()
    }

    /// A receiver that changes whenever the publishing connection is blocked or unblocked.
    pub fn blocked_changes(&self) -> watch::Receiver<bool> {
        self.blocked.clone()
    }

    /// Resolves once the connections can no longer be trusted: one broke, or the fence
    /// closed. Says why.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        loop {
            if let Some(why) = lost.borrow_and_update().clone() {
                return why;
            }
            if lost.changed().await.is_err() {
                return "the broker watchers stopped".into();
            }
        }
    }

    /// Close both connections and stop watching them.
    pub async fn close(&self, why: &str) {
        for watcher in &self.watchers {
            watcher.abort();
        }
        let _ = tokio::time::timeout(
            BROKER_DEADLINE,
            self.consume.close(200, why.to_string().into()),
        )
        .await;
        let _ = tokio::time::timeout(
            BROKER_DEADLINE,
            self.publish.close(200, why.to_string().into()),
        )
        .await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

/// When the consume connection last answered, and how long that stays good for.
#[derive(Clone)]
struct Fence {
    last_life: Arc<Mutex<Instant>>,
    valid_for: Duration,
}

impl Fence {
    fn new(valid_for: Duration) -> Self {
        Self {
            last_life: Arc::new(Mutex::new(Instant::now())),
            valid_for,
        }
    }

    fn alive(&self) {
        *self.last_life.lock().expect("fence lock") = Instant::now();
    }

    fn is_open(&self) -> bool {
        self.last_life.lock().expect("fence lock").elapsed() < self.valid_for
    }
}

/// A round trip on the consume connection every eighth of the heartbeat; reports the connection
/// lost when the fence closes or either connection breaks.
async fn pulse(
    channel: lapin::Channel,
    consume: Arc<Connection>,
    publish: Arc<Connection>,
    fence: Fence,
    heartbeat: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let every = (heartbeat / 8).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        if !consume.status().connected() || !publish.status().connected() {
            lost.send_replace(Some("a broker connection closed".into()));
            return;
        }
        match tokio::time::timeout(every, channel.basic_qos(0, BasicQosOptions::default())).await {
            Ok(Ok(())) => fence.alive(),
            Ok(Err(e)) => {
                lost.send_replace(Some(format!("the broker connection failed: {e}")));
                return;
            }
            Err(_) => {} // no answer yet: the fence decides
        }
        if !fence.is_open() {
            lost.send_replace(Some(format!(
                "no answer from the broker for {:?} (half the heartbeat)",
                fence.valid_for
            )));
            return;
        }
    }
}

/// Follow `connection.blocked` / `connection.unblocked` on the publishing connection.
async fn watch_blocked(
    publish: Arc<Connection>,
    blocked: watch::Sender<bool>,
    lost: watch::Sender<Option<String>>,
    ready: Readiness,
    metrics: Metrics,
) {
    let mut events = publish.events_listener();
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(
                    %reason,
                    "the broker blocks publishing (resource alarm): closing SMTP sessions and giving back slots until it unblocks"
                );
                blocked.send_replace(true);
                ready.set_blocked(true);
                metrics.broker_blocked(true);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("the broker unblocked publishing; resuming");
                blocked.send_replace(false);
                ready.set_blocked(false);
                metrics.broker_blocked(false);
            }
            lapin::Event::Error(e) => {
                lost.send_replace(Some(format!("the publishing connection failed: {e}")));
            }
            _ => {}
        }
    }
}
