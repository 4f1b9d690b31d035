//! Reading the event log (`<namespace>.events.log`, a RabbitMQ stream) for one campaign.
//!
//! The log holds every event batch the workers published and every campaign summary `send`
//! wrote. Reading it removes nothing: any number of readers, at any time within its
//! retention, see the same entries. Batches of other campaigns are skipped by their routing
//! key (`<outcome>.<campaign>`) without parsing their bodies.
//!
//! A stream has no "end": to know where "now" is, a reader writes a marker into the log
//! when it opens it and reads until it meets it ([`Entry::CaughtUp`]). Markers are tiny, go straight into
//! the stream (never through `<ns>.events`, so no subscriber sees them) and every reader
//! skips them.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use sluice_shared::events::{
    self, parse_batch, CampaignSummary, DeliveryEvent, BATCH_KIND, MARKER_KIND, SUMMARY_KIND,
};
use sluice_shared::{Settings, Topology};
use tokio::sync::mpsc;

use crate::tally::Tally;

/// Log entries handed to the reader before it acknowledges them (a stream requires a
/// prefetch and manual acks; an ack only makes room for more).
const PREFETCH: u16 = 2000;
/// Acknowledge (with `multiple`) every this many entries.
const ACK_EVERY: u64 = 500;
/// How long to keep trying to reach the broker.
const RECONNECT_WAIT: Duration = Duration::from_secs(60);
/// A campaign's entries may be stamped a little before its summary says it started
/// (clocks of producer and broker differ): read this much earlier.
const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// Where in the log to start reading.
#[derive(Debug, Clone, Copy)]
pub enum Since<'a> {
    /// The oldest entry the log still keeps.
    Beginning,
    /// Shortly before this moment (RFC 3339), e.g. when a campaign's publishing started.
    Started(&'a str),
    /// This long ago.
    Ago(Duration),
}

impl Since<'_> {
    /// The `x-stream-offset` consumer argument.
    fn offset(self) -> AMQPValue {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let at = match self {
            Since::Beginning => return AMQPValue::LongString("first".into()),
            Since::Started(text) => {
                match time::OffsetDateTime::parse(
                    text,
                    &time::format_description::well_known::Rfc3339,
                ) {
                    Ok(at) => at.unix_timestamp(),
                    Err(_) => return AMQPValue::LongString("first".into()),
                }
            }
            Since::Ago(ago) => now.saturating_sub(ago.as_secs() as i64),
        };
        let at = at.saturating_sub(CLOCK_SLACK.as_secs() as i64).max(0);
        AMQPValue::Timestamp(at as u64)
    }
}

/// One entry of the log that concerns the campaign read.
#[derive(Debug)]
pub enum Entry {
    /// A batch of the campaign's events.
    Events(Vec<DeliveryEvent>),
    /// The campaign's summary.
    Summary(CampaignSummary),
    /// The marker this reader wrote: everything logged before it has been read.
    CaughtUp,
}

/// A reader of one campaign's entries in the event log. The log is read by a task of its
/// own, so [`LogReader::next`] can be raced against a timer or a signal without losing an
/// entry.
pub struct LogReader {
    connection: Connection,
    entries: mpsc::Receiver<anyhow::Result<Entry>>,
    reading: tokio::task::JoinHandle<()>,
}

impl LogReader {
    /// Write a marker at the log's end, then start reading `campaign`'s entries from
    /// `since`: [`Entry::CaughtUp`] comes once everything logged before the marker was read.
    pub async fn open(
        settings: &Settings,
        campaign: &str,
        since: Since<'_>,
    ) -> anyhow::Result<LogReader> {
        Self::open_for(settings, Some(campaign), since).await
    }

    /// [`LogReader::open`] for the entries of every campaign.
    pub async fn open_all(settings: &Settings, since: Since<'_>) -> anyhow::Result<LogReader> {
        Self::open_for(settings, None, since).await
    }

    async fn open_for(
        settings: &Settings,
        campaign: Option<&str>,
        since: Since<'_>,
    ) -> anyhow::Result<LogReader> {
        let topology = Topology::from_settings(settings);
        let connection = settings
            .amqp
            .connect_with_backoff("sluice-producer (event log)", RECONNECT_WAIT)
            .await?;
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        // The log exists once a worker or `send` declared the namespace's topology.
        topology
            .declare_exchanges(&channel)
            .await
            .context("cannot declare the events exchange")?;
        topology
            .declare_events_log(&channel)
            .await
            .context("cannot declare the event log")?;
        let log = topology.events_log();
        let marker = mark(&channel, &log).await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("cannot set the prefetch count")?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), since.offset());
        let consumer = channel
            .basic_consume(
                log.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .with_context(|| format!("cannot read the event log {log}"))?;
        let (sender, entries) = mpsc::channel(64);
        let filter = Filter {
            campaign: campaign.map(str::to_string),
            marker,
        };
        let reading = tokio::spawn(read(consumer, filter, sender));
        Ok(LogReader {
            connection,
            entries,
            reading,
        })
    }

    /// The next entry of this campaign; waits for one to be logged. Cancel-safe.
    pub async fn next(&mut self) -> anyhow::Result<Entry> {
        match self.entries.recv().await {
            Some(entry) => entry,
            None => anyhow::bail!("the event log reader stopped"),
        }
    }

    /// Stop reading.
    pub async fn close(self) {
        self.reading.abort();
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Read `campaign`'s entries up to now into a [`Tally`] (final outcomes stamped from
/// `recent_since`, Unix seconds, count towards its recent rate).
pub async fn tally_until_now(
    settings: &Settings,
    campaign: &str,
    since: Since<'_>,
    recent_since: i64,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new(campaign, recent_since);
    let mut reader = LogReader::open(settings, campaign, since).await?;
    let read = loop {
        match reader.next().await {
            Ok(Entry::CaughtUp) => break Ok(()),
            Ok(Entry::Summary(summary)) => tally.on_summary(summary),
            Ok(Entry::Events(batch)) => batch.iter().for_each(|event| tally.on_event(event)),
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    read.map(|()| tally)
}

/// Whether the event log holds anything of `campaign` (a summary or an event): what tells
/// a campaign id from a typo.
pub async fn campaign_is_known(settings: &Settings, campaign: &str) -> anyhow::Result<bool> {
    Ok(tally_until_now(settings, campaign, Since::Beginning, 0)
        .await?
        .seen())
}

/// The error for a campaign of which the event log holds nothing (exit 1).
pub fn unknown_campaign(campaign: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "unknown campaign {campaign}: it is not in the event log, no summary and no event \
         (wrong campaign id or namespace, nothing delivered yet, or older than the log's \
         retention, events.max_age)"
    )
}

/// Write a marker into the log, confirmed; returns its id.
async fn mark(channel: &Channel, log: &str) -> anyhow::Result<String> {
    const WHAT: &str = "cannot write a marker into the event log";
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("cannot enable publisher confirms")?;
    let id = uuid::Uuid::new_v4().to_string();
    let properties = BasicProperties::default()
        .with_type(MARKER_KIND.into())
        .with_message_id(id.as_str().into());
    let confirm = channel
        .basic_publish(
            "".into(),
            log.into(),
            BasicPublishOptions::default(),
            b"",
            properties,
        )
        .await
        .context(WHAT)?
        .await
        .context(WHAT)?;
    anyhow::ensure!(
        confirm.is_ack(),
        "the broker refused a marker for the event log"
    );
    Ok(id)
}

/// Read the log, sending this campaign's entries, until the reader is dropped.
async fn read(
    mut consumer: Consumer,
    filter: Filter,
    entries: mpsc::Sender<anyhow::Result<Entry>>,
) {
    let mut unacked = 0u64;
    loop {
        let delivery = match consumer.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                let _ = entries
                    .send(Err(
                        anyhow::Error::new(e).context("reading the event log failed")
                    ))
                    .await;
                return;
            }
            None => {
                let _ = entries
                    .send(Err(anyhow::anyhow!(
                        "the broker stopped the event log reader"
                    )))
                    .await;
                return;
            }
        };
        let entry = filter.entry(&delivery);
        unacked += 1;
        if unacked >= ACK_EVERY || entry.is_some() {
            unacked = 0;
            if let Err(e) = delivery.ack(BasicAckOptions { multiple: true }).await {
                let _ = entries
                    .send(Err(
                        anyhow::Error::new(e).context("cannot acknowledge log entries")
                    ))
                    .await;
                return;
            }
        }
        if let Some(entry) = entry {
            if entries.send(Ok(entry)).await.is_err() {
                return;
            }
        }
    }
}

/// Which log messages concern the reader.
struct Filter {
    /// `None`: every campaign.
    campaign: Option<String>,
    marker: String,
}

impl Filter {
    fn wants(&self, campaign: &str) -> bool {
        self.campaign
            .as_deref()
            .is_none_or(|wanted| wanted == campaign)
    }

    /// What a log message means for this campaign, if anything.
    fn entry(&self, delivery: &Delivery) -> Option<Entry> {
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        match kind {
            Some(SUMMARY_KIND) => {
                CampaignSummary::from_headers(delivery.properties.headers().as_ref())
                    .filter(|summary| self.wants(&summary.campaign))
                    .map(Entry::Summary)
            }
            Some(MARKER_KIND) => {
                let id = delivery.properties.message_id().as_ref()?;
                (id.as_str() == self.marker).then_some(Entry::CaughtUp)
            }
            // Event batches (and events of an older worker, which had no type).
            Some(BATCH_KIND) | None => {
                let (_, campaign) = events::parse_routing_key(delivery.routing_key.as_str())?;
                if !self.wants(campaign) {
                    return None;
                }
                match parse_batch(&delivery.data) {
                    Ok(batch) => Some(Entry::Events(batch)),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a log entry that is not an event batch");
                        None
                    }
                }
            }
            Some(_) => None,
        }
    }
}
