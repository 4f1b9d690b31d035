//! `watch` (and `send --wait`): follow a campaign's delivery events until every job has a
//! final outcome, then print a summary and remove the campaign's watch queue.
//!
//! The watch queue is declared by `send` before the first job, so it holds every event of
//! the campaign plus one `campaign-summary` message with the number of jobs. Events are
//! acknowledged as they are counted; if `watch` is interrupted, it puts a summary with the
//! counts so far back on the queue, so that the next `watch` carries on from there.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};
use sluice_shared::events::{DeliveryEvent, EventOutcome};
use sluice_shared::headers;
use sluice_shared::shutdown::Shutdown;
use sluice_shared::{Settings, Topology};

use crate::cli::WatchArgs;
use crate::exit::Status;
use crate::progress::Progress;
use crate::publish::PERSISTENT;
use crate::summary::{EXPECTED_HEADER, SUMMARY_KIND};

/// Events handed to `watch` before it acknowledges them.
const PREFETCH: u16 = 500;
/// How long to keep trying to reach the broker.
const RECONNECT_WAIT: Duration = Duration::from_secs(60);
/// Reconnections in a row without a single event before giving up.
const MAX_FRUITLESS_RECONNECTS: u32 = 5;

/// Counts carried over by an interrupted `watch` (headers of its summary message).
const DELIVERED_HEADER: &str = "x-sluice-delivered";
const BOUNCED_HEADER: &str = "x-sluice-bounced";
const DEAD_HEADER: &str = "x-sluice-dead";
const DEFERRED_HEADER: &str = "x-sluice-deferred";

/// How a campaign ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub campaign: String,
    pub expected: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub dead: u64,
    pub deferred_attempts: u64,
}

impl Summary {
    /// Success only when every job was delivered.
    pub fn status(&self) -> Status {
        if self.bounced + self.dead == 0 {
            Status::Success
        } else {
            Status::CampaignFailed
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered {}, bounced {}, dead {}, deferred attempts {}",
            self.delivered, self.bounced, self.dead, self.deferred_attempts
        )
    }
}

/// Run `watch`.
pub async fn run(settings: &Settings, args: WatchArgs) -> anyhow::Result<Status> {
    let summary = follow(settings, &args.campaign).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("summary serializes")
        );
    } else {
        println!("{summary}");
    }
    Ok(summary.status())
}

/// Job ids already counted with a final outcome. Ids `<campaign>-<line>` (what `send`
/// makes) take one bit each; any other id is kept as text.
#[derive(Debug, Default)]
struct Finals {
    prefix: String,
    lines: Vec<u64>,
    others: HashSet<String>,
}

/// Lines beyond this are kept as text rather than in the bitmap (bounds the bitmap).
const MAX_BITMAP_LINE: u64 = 1 << 28;

impl Finals {
    fn new(campaign: &str) -> Finals {
        Finals {
            prefix: format!("{campaign}-"),
            ..Default::default()
        }
    }

    /// True when `id` had no final outcome yet.
    fn insert(&mut self, id: &str) -> bool {
        let line = id
            .strip_prefix(&self.prefix)
            .filter(|digits| !digits.starts_with('0') && !digits.starts_with('+'))
            .and_then(|digits| digits.parse::<u64>().ok())
            .filter(|&line| line < MAX_BITMAP_LINE);
        match line {
            Some(line) => {
                let (word, bit) = ((line / 64) as usize, line % 64);
                if word >= self.lines.len() {
                    self.lines.resize(word + 1, 0);
                }
                let fresh = self.lines[word] & (1 << bit) == 0;
                self.lines[word] |= 1 << bit;
                fresh
            }
            None => self.others.insert(id.to_string()),
        }
    }
}

/// The counts of one campaign, fed with events and summary messages. Pure: no broker.
#[derive(Debug)]
pub struct Tally {
    campaign: String,
    expected: Option<u64>,
    delivered: u64,
    bounced: u64,
    dead: u64,
    deferred: u64,
    finals: Finals,
}

impl Tally {
    /// Nothing counted yet.
    pub fn new(campaign: &str) -> Tally {
        Tally {
            campaign: campaign.to_string(),
            expected: None,
            delivered: 0,
            bounced: 0,
            dead: 0,
            deferred: 0,
            finals: Finals::new(campaign),
        }
    }

    /// A `campaign-summary` message: the number of jobs, and counts an interrupted `watch`
    /// carried over.
    pub fn on_summary(&mut self, headers: Option<&FieldTable>) {
        if let Some(expected) = headers::get_int(headers, EXPECTED_HEADER) {
            let expected = expected.max(0) as u64;
            self.expected = Some(self.expected.map_or(expected, |e| e.max(expected)));
        }
        let count = |name| headers::get_int(headers, name).unwrap_or(0).max(0) as u64;
        self.delivered += count(DELIVERED_HEADER);
        self.bounced += count(BOUNCED_HEADER);
        self.dead += count(DEAD_HEADER);
        self.deferred += count(DEFERRED_HEADER);
    }

    /// One delivery event; a job's final outcome counts once, whatever duplicates follow.
    pub fn on_event(&mut self, event: &DeliveryEvent) {
        match event.outcome {
            EventOutcome::Deferred => self.deferred += 1,
            outcome if self.finals.insert(&event.id) => match outcome {
                EventOutcome::Delivered => self.delivered += 1,
                EventOutcome::Bounced => self.bounced += 1,
                EventOutcome::Dead => self.dead += 1,
                EventOutcome::Deferred => unreachable!("handled above"),
            },
            _ => {}
        }
    }

    /// Jobs with a final outcome.
    pub fn finished_jobs(&self) -> u64 {
        self.delivered + self.bounced + self.dead
    }

    /// True once the total is known and every job has a final outcome.
    pub fn is_complete(&self) -> bool {
        self.expected
            .is_some_and(|expected| self.finished_jobs() >= expected)
    }

    /// The counts as they stand.
    pub fn summary(&self) -> Summary {
        Summary {
            campaign: self.campaign.clone(),
            expected: self.expected.unwrap_or(0),
            delivered: self.delivered,
            bounced: self.bounced,
            dead: self.dead,
            deferred_attempts: self.deferred,
        }
    }

    fn detail(&self) -> String {
        format!(
            "delivered {}, deferred {}, bounced {}, dead {}",
            self.delivered, self.deferred, self.bounced, self.dead
        )
    }

    /// Headers of the summary that carries these counts over to the next `watch`.
    fn checkpoint_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        if let Some(expected) = self.expected {
            headers::set_int(&mut table, EXPECTED_HEADER, expected as i64);
        }
        headers::set_int(&mut table, DELIVERED_HEADER, self.delivered as i64);
        headers::set_int(&mut table, BOUNCED_HEADER, self.bounced as i64);
        headers::set_int(&mut table, DEAD_HEADER, self.dead as i64);
        headers::set_int(&mut table, DEFERRED_HEADER, self.deferred as i64);
        table
    }
}

enum Ended {
    Complete,
    Interrupted,
}

/// Follow `campaign` until every job has a final outcome; remove its watch queue.
pub async fn follow(settings: &Settings, campaign: &str) -> anyhow::Result<Summary> {
    let topology = Topology::new(settings.amqp.namespace.clone());
    let queue = topology.campaign_watch_queue(campaign);
    let shutdown = Shutdown::on_signals();
    let mut tally = Tally::new(campaign);
    let mut progress = Progress::new("finished", None);
    let mut fruitless = 0;
    loop {
        let connection = settings
            .amqp
            .connect_with_backoff("sluice-producer watch", RECONNECT_WAIT)
            .await?;
        let channel = connection
            .create_channel()
            .await
            .context("cannot open a channel")?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!(
                    "campaign {campaign} has no watch queue {queue} (wrong campaign id or \
                     namespace? watch queues are removed after a finished watch, or a week unused)"
                )
            })?;
        let before = tally.finished_jobs() + tally.deferred;
        let result = consume(&channel, &queue, &mut tally, &mut progress, &shutdown).await;
        match result {
            Ok(Ended::Complete) => {
                progress.finish();
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .with_context(|| format!("cannot delete the watch queue {queue}"))?;
                let _ = connection.close(200, "done".into()).await;
                return Ok(tally.summary());
            }
            Ok(Ended::Interrupted) => {
                progress.finish();
                checkpoint(&channel, &queue, &tally)
                    .await
                    .context("interrupted, and could not save the counts so far")?;
                let _ = connection.close(200, "interrupted".into()).await;
                anyhow::bail!(
                    "interrupted ({}); run `sluice-producer watch --campaign {campaign}` to carry on",
                    tally.summary()
                );
            }
            Err(error) => {
                fruitless = if tally.finished_jobs() + tally.deferred > before {
                    1
                } else {
                    fruitless + 1
                };
                if fruitless > MAX_FRUITLESS_RECONNECTS {
                    return Err(error.context("lost the broker connection while watching"));
                }
                tracing::warn!(error = %format!("{error:#}"), "lost the broker connection while watching; reconnecting");
                let _ = connection.close(200, "reconnecting".into()).await;
            }
        }
    }
}

async fn consume(
    channel: &Channel,
    queue: &str,
    tally: &mut Tally,
    progress: &mut Progress,
    shutdown: &Shutdown,
) -> anyhow::Result<Ended> {
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .context("cannot set the prefetch count")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("cannot enable publisher confirms")?;
    let mut consumer: Consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot consume from {queue}"))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if tally.is_complete() {
            return Ok(Ended::Complete);
        }
        tokio::select! {
            _ = shutdown.wait() => return Ok(Ended::Interrupted),
            _ = tick.tick() => progress.maybe_print_line(),
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(delivery) => delivery.context("the watch consumer failed")?,
                    None => anyhow::bail!("the broker cancelled the watch consumer (was {queue} deleted?)"),
                };
                if delivery.properties.kind().as_ref().is_some_and(|k| k.as_str() == SUMMARY_KIND) {
                    tally.on_summary(delivery.properties.headers().as_ref());
                    if let Some(expected) = tally.expected {
                        progress.set_total(expected);
                    }
                } else {
                    match serde_json::from_slice::<DeliveryEvent>(&delivery.data) {
                        Ok(event) => tally.on_event(&event),
                        Err(e) => tracing::warn!(error = %e, "ignoring a message that is not a delivery event"),
                    }
                }
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .context("cannot acknowledge an event")?;
                progress.set_detail(tally.detail());
                progress.set(tally.finished_jobs());
            }
        }
    }
}

/// Put the counts so far back on the queue, as a summary message, before stopping.
async fn checkpoint(channel: &Channel, queue: &str, tally: &Tally) -> anyhow::Result<()> {
    let properties = BasicProperties::default()
        .with_type(SUMMARY_KIND.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(tally.checkpoint_headers());
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"",
            properties,
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused the checkpoint");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, outcome: EventOutcome) -> DeliveryEvent {
        DeliveryEvent {
            id: id.into(),
            campaign: "c1".into(),
            to: "a@example.org".into(),
            relay: "primary".into(),
            outcome,
            attempt: 1,
            smtp_code: None,
            smtp_reply: None,
            at: "2026-11-28T11:22:33Z".into(),
            trace_id: None,
        }
    }

    fn expected(n: i64) -> FieldTable {
        let mut table = FieldTable::default();
        headers::set_int(&mut table, EXPECTED_HEADER, n);
        table
    }

    #[test]
    fn counts_each_jobs_final_outcome_once() {
        use EventOutcome::*;
        let mut tally = Tally::new("c1");
        let events = [
            ("c1-2", Deferred),
            ("c1-2", Deferred),
            ("c1-2", Delivered),
            ("c1-2", Delivered), // redelivered job, same outcome again
            ("c1-3", Bounced),
            ("odd-id", Dead),
            ("odd-id", Dead),
        ];
        for (id, outcome) in events {
            tally.on_event(&event(id, outcome));
        }
        assert!(!tally.is_complete(), "total not known yet");
        tally.on_summary(Some(&expected(4)));
        assert!(!tally.is_complete());
        tally.on_event(&event("c1-70000", Delivered));
        assert!(tally.is_complete());
        let summary = tally.summary();
        assert_eq!(
            summary.to_string(),
            "delivered 2, bounced 1, dead 1, deferred attempts 2"
        );
        assert_eq!(summary.status(), Status::CampaignFailed);
    }

    #[test]
    fn an_empty_campaign_is_complete_at_once_and_successful() {
        let mut tally = Tally::new("c1");
        tally.on_summary(Some(&expected(0)));
        assert!(tally.is_complete());
        assert_eq!(tally.summary().status(), Status::Success);
    }

    #[test]
    fn a_checkpoint_carries_the_counts_over() {
        let mut first = Tally::new("c1");
        first.on_summary(Some(&expected(3)));
        first.on_event(&event("c1-2", EventOutcome::Delivered));
        first.on_event(&event("c1-3", EventOutcome::Deferred));
        let mut second = Tally::new("c1");
        second.on_summary(Some(&first.checkpoint_headers()));
        second.on_event(&event("c1-3", EventOutcome::Delivered));
        second.on_event(&event("c1-4", EventOutcome::Delivered));
        assert!(second.is_complete());
        assert_eq!(
            second.summary().to_string(),
            "delivered 3, bounced 0, dead 0, deferred attempts 1"
        );
    }

    #[test]
    fn line_ids_and_other_ids_are_told_apart() {
        let mut finals = Finals::new("c1");
        for (id, fresh) in [
            ("c1-2", true),
            ("c1-2", false),
            ("c1-02", true), // not what send makes: kept as text
            ("c1-02", false),
            ("c1-x", true),
            ("c10-2", true),
            ("c1-99999999999", true),
            ("c1-99999999999", false),
        ] {
            assert_eq!(finals.insert(id), fresh, "{id}");
        }
    }
}
