//! The control stream (`<ns>.control`) from the operator's side: write a command, confirmed,
//! and read what every entry so far adds up to (the operators' [`Steering`] and each relay's
//! latest pushback), the way a worker that starts now would.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use sluice_shared::amqp::topology::QueueSpec;
use sluice_shared::control::{Change, Steering};
use sluice_shared::{Settings, Topology};

/// Entries handed to the reader before it acknowledges them.
const PREFETCH: u16 = 1000;
/// How long to keep trying to reach the broker.
const RECONNECT_WAIT: Duration = Duration::from_secs(30);
/// The longest a read of the whole stream may take.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// A relay's latest pushback as the workers told it: what `relay status` shows beside the
/// operators' suspensions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushback {
    /// The latest rate cut: to this many per second, at this time (Unix ms).
    pub rate_cut: Option<(f64, u64)>,
    /// The latest session-limit cut: to this many sessions, at this time.
    pub sessions_cut: Option<(u32, u64)>,
    /// The latest "down until" a worker told (a busy server, a `suspend` rule), with why.
    pub down: Option<(u64, String)>,
}

/// Everything the control stream holds, added up.
#[derive(Debug, Default)]
pub struct ControlState {
    pub steering: Steering,
    pub pushback: BTreeMap<String, Pushback>,
}

impl ControlState {
    fn apply(&mut self, change: &Change) {
        self.steering.apply(change);
        match change {
            Change::Rate {
                relay, to, at_ms, ..
            } => {
                self.pushback.entry(relay.clone()).or_default().rate_cut = Some((*to, *at_ms));
            }
            Change::Sessions { relay, to, at_ms } => {
                self.pushback.entry(relay.clone()).or_default().sessions_cut = Some((*to, *at_ms));
            }
            Change::Down {
                relay,
                until_ms,
                reason,
                ..
            } => {
                self.pushback.entry(relay.clone()).or_default().down =
                    Some((*until_ms, reason.clone()));
            }
            _ => {}
        }
    }
}

/// One of the fleet's small streams (control, heads) from the operator's side: declared
/// (idempotent: the producer may come before any worker), written with confirms, and read
/// up to a marker the reader wrote itself (see [`read_stream`]).
pub struct SmallStream {
    channel: Channel,
    name: String,
}

impl SmallStream {
    /// Declare the stream `spec` on a channel of its own, in confirm mode.
    pub async fn open(
        connection: &Connection,
        topology: &Topology,
        spec: &QueueSpec,
    ) -> anyhow::Result<SmallStream> {
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        topology
            .declare_queue(&channel, spec)
            .await
            .with_context(|| format!("cannot declare the stream {}", spec.name))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("cannot enable publisher confirms")?;
        Ok(SmallStream {
            channel,
            name: spec.name.clone(),
        })
    }

    /// The stream's queue name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Write one entry and wait for the broker's confirm.
    pub async fn write(&self, entry: &[u8]) -> anyhow::Result<()> {
        let what = || format!("cannot write to the stream {}", self.name);
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions::default(),
                entry,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .with_context(what)?
            .await
            .with_context(what)?;
        anyhow::ensure!(
            confirm.is_ack(),
            "the broker refused an entry of {}",
            self.name
        );
        Ok(())
    }

    /// Close its channel.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// A connection to the control stream.
pub struct ControlStream {
    connection: Connection,
    stream: SmallStream,
}

impl ControlStream {
    /// Connect and declare the stream.
    pub async fn open(settings: &Settings) -> anyhow::Result<ControlStream> {
        let topology = Topology::from_settings(settings);
        let connection = settings
            .amqp
            .connect_with_backoff("sluice-producer (control)", RECONNECT_WAIT)
            .await?;
        let stream = SmallStream::open(&connection, &topology, &topology.control_spec()).await?;
        Ok(ControlStream { connection, stream })
    }

    /// Write one entry and wait for the broker's confirm.
    pub async fn tell(&self, change: &Change) -> anyhow::Result<()> {
        self.stream.write(&change.to_bytes()).await
    }

    /// Read every entry up to now (a marker written first tells where "now" is).
    pub async fn state(&self) -> anyhow::Result<ControlState> {
        let marker = new_marker();
        self.tell(&Change::Marker { id: marker.clone() }).await?;
        let mut state = ControlState::default();
        read_stream(
            &self.connection,
            self.stream.name(),
            AMQPValue::LongString("first".into()),
            |data| match serde_json::from_slice::<Change>(data) {
                Ok(Change::Marker { id }) => id == marker,
                Ok(change) => {
                    state.apply(&change);
                    false
                }
                Err(_) => false, // an entry of a newer version: not ours to judge
            },
        )
        .await?;
        Ok(state)
    }

    /// Close the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Unix milliseconds (the control stream's clock) as RFC 3339.
pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// A marker id of this reader's own, to write before reading a small stream: reading up
/// to it is reading up to "now".
pub fn new_marker() -> String {
    format!("{:032x}", uuid::Uuid::new_v4().as_u128())
}

/// Read `stream` from `offset` (`x-stream-offset`) on a channel of its own, handing each
/// entry to `entry` until it answers true (the reader's own marker, written before: "now").
pub async fn read_stream(
    connection: &Connection,
    stream: &str,
    offset: AMQPValue,
    mut entry: impl FnMut(&[u8]) -> bool,
) -> anyhow::Result<()> {
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("cannot set the prefetch count")?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), offset);
    let mut consumer = channel
        .basic_consume(
            stream.into(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .with_context(|| format!("cannot read the stream {stream}"))?;
    let read = tokio::time::timeout(READ_DEADLINE, async {
        while let Some(delivery) = consumer.next().await {
            let delivery =
                delivery.with_context(|| format!("reading the stream {stream} failed"))?;
            let done = entry(&delivery.data);
            delivery
                .ack(BasicAckOptions::default())
                .await
                .context("cannot acknowledge a stream entry")?;
            if done {
                return Ok(());
            }
        }
        anyhow::bail!("the broker stopped the reader of the stream {stream}")
    })
    .await;
    let _ = channel.close(200, "read".into()).await;
    match read {
        Ok(read) => read,
        Err(_) => anyhow::bail!("could not read the stream {stream} within {READ_DEADLINE:?}"),
    }
}
