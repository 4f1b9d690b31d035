//! `pause`, `resume`, `cancel` (a campaign) and `relay suspend`, `relay resume`: the
//! operators' levers. Each command is an entry on the control stream (see
//! [`crate::control`]), which every worker follows within a broker round trip; the
//! workers act on each job as its turn comes (see the worker's `step` and `settle`).
//!
//! A paused campaign's jobs wait in its hold queue (`<ns>.hold.<campaign>`). `resume` moves
//! them back to their relays' queues and `cancel` ends them with a `cancelled` event each;
//! both take a job out of the hold queue only once its copy (or its event) is confirmed.
//! A worker slow to read the command may still hold a job just after: both commands look
//! at the hold queue again once the fleet has surely read the command ([`FLEET_READS`]),
//! and delete it only when it is empty.

use std::collections::HashSet;
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use sluice_shared::control::{now_ms, CampaignState, Change};
use sluice_shared::events::{self, now_rfc3339, DeliveryEvent, EventOutcome};
use sluice_shared::{headers, Job, Priority, Settings, Topology};

use crate::cli::{CampaignArgs, CancelArgs, RelayResumeArgs, RelaySuspendArgs};
use crate::control::{rfc3339, ControlStream};
use crate::exit::{Status, UsageError};
use crate::log::{campaign_is_known, unknown_campaign};
use crate::prompt::confirm;
use crate::publish::{Outgoing, Publisher, Setup};
use crate::queues::{delete_queue, inspect, ready_jobs};
use crate::transfer::{kept_properties, Transfer};

/// How long every worker takes at most to follow a control entry (the contract's bound).
pub const FLEET_READS: Duration = Duration::from_secs(3);
/// Held jobs moved back per confirm window.
const RESUME_WINDOW: usize = 500;
/// Cancelled held jobs reported per event message.
const CANCEL_BATCH: usize = 500;

/// `pause --campaign ID`.
pub async fn pause(settings: &Settings, args: CampaignArgs) -> anyhow::Result<Status> {
    let campaign = &args.campaign;
    let control = known_campaign(settings, campaign).await?;
    let state = control.state().await?;
    match state.steering.campaign(campaign) {
        Some(CampaignState::Cancelled { .. }) => {
            control.close().await;
            anyhow::bail!("campaign {campaign} was cancelled: there is nothing to pause");
        }
        Some(CampaignState::Paused { since_ms }) => {
            control.close().await;
            println!(
                "campaign {campaign} is already paused (since {}); its jobs wait in {}",
                rfc3339(since_ms),
                Topology::from_settings(settings).hold_queue(campaign)
            );
            return Ok(Status::Success);
        }
        None => {}
    }
    let topology = Topology::from_settings(settings);
    declare_hold_queue(settings, &topology, campaign).await?;
    control
        .tell(&Change::Pause {
            campaign: campaign.clone(),
            at_ms: now_ms(),
        })
        .await?;
    control.close().await;
    println!(
        "paused campaign {campaign}: within {} s no worker starts another SMTP transaction for \
         it; its jobs are set aside in {} until `sluice-producer resume --campaign {campaign}` \
         (a transaction already under way finishes)",
        FLEET_READS.as_secs(),
        topology.hold_queue(campaign)
    );
    Ok(Status::Success)
}

/// `resume --campaign ID`.
pub async fn resume(settings: &Settings, args: CampaignArgs) -> anyhow::Result<Status> {
    let campaign = &args.campaign;
    let control = known_campaign(settings, campaign).await?;
    let state = control.state().await?;
    if let Some(CampaignState::Cancelled { .. }) = state.steering.campaign(campaign) {
        control.close().await;
        anyhow::bail!("campaign {campaign} was cancelled: it cannot be resumed");
    }
    let was_paused = state.steering.campaign(campaign).is_some();
    let at_ms = now_ms();
    control
        .tell(&Change::Resume {
            campaign: campaign.clone(),
            at_ms,
        })
        .await?;
    control.close().await;
    let moved = empty_hold_queue(settings, campaign, Emptying::Resume { at_ms })
        .await
        .with_context(|| format!("while moving campaign {campaign}'s held jobs back"))?;
    if was_paused {
        println!(
            "resumed campaign {campaign}: {moved} held jobs are back in their relays' queues, \
             and the workers send its jobs again"
        );
    } else {
        println!(
            "campaign {campaign} was not paused; {moved} held jobs moved back to their relays' \
             queues"
        );
    }
    Ok(Status::Success)
}

/// `cancel --campaign ID [--yes]`.
pub async fn cancel(settings: &Settings, args: CancelArgs) -> anyhow::Result<Status> {
    let campaign = &args.campaign;
    if !args.yes && !std::io::stdin().is_terminal() {
        return Err(UsageError(format!(
            "cancel ends every remaining job of campaign {campaign} for good: pass --yes \
             (there is no terminal to ask on)"
        ))
        .into());
    }
    let control = known_campaign(settings, campaign).await?;
    if !args.yes
        && !confirm(&format!(
            "Cancel campaign {campaign}? Its remaining jobs will never be sent."
        ))?
    {
        control.close().await;
        eprintln!("nothing changed");
        return Ok(Status::Success);
    }
    control
        .tell(&Change::Cancel {
            campaign: campaign.clone(),
            at_ms: now_ms(),
        })
        .await?;
    control.close().await;
    let cancelled = empty_hold_queue(settings, campaign, Emptying::Cancel)
        .await
        .with_context(|| format!("while cancelling campaign {campaign}'s held jobs"))?;
    println!(
        "cancelled campaign {campaign}: {cancelled} held jobs ended `cancelled`; within {} s no \
         worker starts another transaction for it, and its jobs still queued or waiting in a \
         retry step end `cancelled` as they come up (one event each, counted by `status`). Jobs \
         already handed to a relay are not recalled.",
        FLEET_READS.as_secs()
    );
    Ok(Status::Success)
}

/// `relay suspend NAME --for DURATION [--reason TEXT]`.
pub async fn suspend(settings: &Settings, args: RelaySuspendArgs) -> anyhow::Result<Status> {
    let relay = configured_relay(settings, &args.name)?;
    let now = now_ms();
    let until_ms = now.saturating_add(args.duration.as_millis() as u64);
    let reason = args
        .reason
        .clone()
        .unwrap_or_else(|| "suspended by an operator".to_string());
    let control = ControlStream::open(settings).await?;
    control
        .tell(&Change::Suspend {
            relay: relay.to_string(),
            until_ms,
            at_ms: now,
            reason,
        })
        .await?;
    control.close().await;
    let instead = match &settings.relays[relay].failover {
        Some(failover) => format!("its jobs go through its failover relay {failover}"),
        None => "its jobs wait in its queues (no failover relay)".to_string(),
    };
    println!(
        "suspended relay {relay} until {} ({}): within {} s no worker starts another transaction \
         on it; {instead}",
        rfc3339(until_ms),
        humantime::format_duration(args.duration),
        FLEET_READS.as_secs()
    );
    Ok(Status::Success)
}

/// `relay resume NAME`.
pub async fn resume_relay(settings: &Settings, args: RelayResumeArgs) -> anyhow::Result<Status> {
    let relay = configured_relay(settings, &args.name)?;
    let control = ControlStream::open(settings).await?;
    let state = control.state().await?;
    let suspended = state.steering.suspension(relay, now_ms()).is_some();
    control
        .tell(&Change::Unsuspend {
            relay: relay.to_string(),
            at_ms: now_ms(),
        })
        .await?;
    control.close().await;
    if suspended {
        println!("resumed relay {relay}: the workers open sessions to it again");
    } else {
        println!(
            "relay {relay} was not suspended; any cool-off it was in has ended, and the workers \
             open sessions to it again"
        );
    }
    Ok(Status::Success)
}

/// A relay of the configuration, or an error naming it (exit 1).
pub fn configured_relay<'a>(settings: &Settings, name: &'a str) -> anyhow::Result<&'a str> {
    if settings.relays.contains_key(name) {
        return Ok(name);
    }
    let known: Vec<&str> = settings.relays.keys().map(String::as_str).collect();
    anyhow::bail!(
        "unknown relay {name}: not in the configuration (configured: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

/// The control stream, once the event log showed `campaign` exists (exit 1 naming it if not).
async fn known_campaign(settings: &Settings, campaign: &str) -> anyhow::Result<ControlStream> {
    if !campaign_is_known(settings, campaign).await? {
        return Err(unknown_campaign(campaign));
    }
    ControlStream::open(settings).await
}

async fn connect(settings: &Settings) -> anyhow::Result<Connection> {
    Ok(settings
        .amqp
        .connect_with_backoff("sluice-producer (steering)", Duration::from_secs(30))
        .await?)
}

async fn declare_hold_queue(
    settings: &Settings,
    topology: &Topology,
    campaign: &str,
) -> anyhow::Result<()> {
    let connection = connect(settings).await?;
    let channel = connection.create_channel().await?;
    topology
        .declare_queue(&channel, &topology.hold_queue_spec(campaign))
        .await
        .with_context(|| format!("cannot declare {}", topology.hold_queue(campaign)))?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The hold queue of one campaign, being emptied.
struct Hold<'a> {
    settings: &'a Settings,
    topology: Topology,
    connection: &'a Connection,
    queue: String,
    campaign: &'a str,
    /// The jobs an earlier pass already moved or cancelled. A quorum queue may give back an
    /// original whose copy is confirmed and whose ack it received (see [`crate::transfer`]):
    /// met again, it is only removed.
    done: std::cell::RefCell<HashSet<JobCopy>>,
}

/// What tells two copies of one job apart from two jobs: its message id and its body.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JobCopy {
    message_id: Option<String>,
    body: u64,
}

impl JobCopy {
    fn of(delivery: &Delivery) -> JobCopy {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::hash::DefaultHasher::new();
        delivery.data.hash(&mut hasher);
        JobCopy {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            body: hasher.finish(),
        }
    }
}

impl Hold<'_> {
    /// Take the next held job that no earlier pass handled, removing the copies of those
    /// that one did.
    async fn take(&self, transfer: &Transfer) -> anyhow::Result<Option<Delivery>> {
        while let Some(delivery) = transfer.take(&self.queue).await? {
            if self.done.borrow_mut().insert(JobCopy::of(&delivery)) {
                return Ok(Some(delivery));
            }
            transfer.ack(&delivery).await?;
        }
        Ok(None)
    }
}

/// What emptying a hold queue does with each job.
#[derive(Debug, Clone, Copy)]
enum Emptying {
    /// Back to its relay's queue, marked as resumed at this time (Unix ms).
    Resume { at_ms: u64 },
    /// Ended with a `cancelled` event.
    Cancel,
}

/// Empty `campaign`'s hold queue as `how` says, then again once every worker has surely
/// read the command, and delete it if it is then empty. The number of jobs taken.
async fn empty_hold_queue(
    settings: &Settings,
    campaign: &str,
    how: Emptying,
) -> anyhow::Result<u64> {
    let topology = Topology::from_settings(settings);
    let queue = topology.hold_queue(campaign);
    let connection = connect(settings).await?;
    let started = tokio::time::Instant::now();
    let hold = Hold {
        settings,
        topology,
        connection: &connection,
        queue: queue.clone(),
        campaign,
        done: Default::default(),
    };
    let pass = || async {
        match how {
            Emptying::Resume { at_ms } => resume_held(&hold, at_ms).await,
            Emptying::Cancel => cancel_held(&hold).await,
        }
    };
    let mut taken = 0;
    if ready_jobs(&connection, &queue).await?.is_some() {
        taken += pass().await?;
        // A worker that had not yet read the command may have held a job meanwhile.
        tokio::time::sleep_until(started + FLEET_READS).await;
        taken += pass().await?;
        delete_if_idle(&connection, &queue).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(taken)
}

/// Move every held job back to its relay's class queue (confirmed before removal), marked
/// with the resume's time so that a worker that has not read the resume yet sends it.
async fn resume_held(hold: &Hold<'_>, resumed_at: u64) -> anyhow::Result<u64> {
    let Some(count) = ready_jobs(hold.connection, &hold.queue).await? else {
        return Ok(0);
    };
    let transfer = Transfer::open(hold.connection).await?;
    let relays: Vec<String> = hold.settings.relays.keys().cloned().collect();
    let setup = Setup {
        relays,
        retry_steps: hold.settings.retry.delays.len(),
    };
    let mut publisher = Publisher::connect(
        &hold.settings.amqp,
        hold.topology.clone(),
        setup,
        RESUME_WINDOW,
        true,
    )
    .await
    .context("cannot start moving held jobs back")?;
    let exchange: ShortString = hold.topology.jobs_exchange().into();
    let mut moved = 0;
    for _ in 0..count {
        let Some(delivery) = hold.take(&transfer).await? else {
            break;
        };
        let incoming = delivery.properties.headers().as_ref();
        let relay = headers::get_str(incoming, headers::RELAY)
            .with_context(|| format!("a job in {} names no relay", hold.queue))?;
        let class = headers::get_str(incoming, headers::PRIORITY)
            .and_then(|class| class.parse::<Priority>().ok())
            .unwrap_or(Priority::Normal);
        let mut properties = kept_properties(&delivery.properties);
        let mut table = properties.headers().clone().unwrap_or_default();
        headers::set_int(&mut table, headers::RESUMED_AT, resumed_at as i64);
        properties = properties.with_headers(table);
        publisher
            .publish(Outgoing {
                tag: delivery.delivery_tag,
                id: job_id(&delivery),
                exchange: exchange.clone(),
                routing_key: class.routing_key(&relay).into(),
                properties,
                body: delivery.data,
            })
            .await?;
        moved += transfer.ack_confirmed(&mut publisher).await?;
    }
    publisher.flush().await?;
    moved += transfer.ack_confirmed(&mut publisher).await?;
    publisher.close().await;
    transfer.close().await;
    Ok(moved)
}

/// End every held job with a `cancelled` event: the events of a batch are confirmed before
/// its jobs leave the hold queue (a crash between gives a duplicate event, never a job
/// without one).
async fn cancel_held(hold: &Hold<'_>) -> anyhow::Result<u64> {
    let Some(count) = ready_jobs(hold.connection, &hold.queue).await? else {
        return Ok(0);
    };
    let transfer = Transfer::open(hold.connection).await?;
    let events_channel = hold.connection.create_channel().await?;
    events_channel
        .confirm_select(Default::default())
        .await
        .context("cannot enable publisher confirms")?;
    let exchange = hold.topology.events_exchange();
    let mut cancelled = 0;
    let mut left = count;
    while left > 0 {
        let mut batch = Vec::new();
        let mut last_tag = None;
        while batch.len() < CANCEL_BATCH && left > 0 {
            let Some(delivery) = hold.take(&transfer).await? else {
                left = 0;
                break;
            };
            left -= 1;
            batch.push(cancelled_event(&delivery, hold.campaign));
            last_tag = Some(delivery.delivery_tag);
        }
        if batch.is_empty() {
            break;
        }
        let mut format = FieldTable::default();
        headers::set_int(&mut format, events::FORMAT_HEADER, events::FORMAT_VERSION);
        let confirm = events_channel
            .basic_publish(
                exchange.as_str().into(),
                events::routing_key(EventOutcome::Cancelled, hold.campaign).into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&batch).expect("events serialize"),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_type(events::BATCH_KIND.into())
                    .with_delivery_mode(2)
                    .with_headers(format),
            )
            .await
            .context("cannot publish cancelled events")?
            .await
            .context("no confirm from the broker for cancelled events")?;
        anyhow::ensure!(confirm.is_ack(), "the broker refused the cancelled events");
        if let Some(last_tag) = last_tag {
            transfer.ack_through(last_tag).await?;
        }
        cancelled += batch.len() as u64;
    }
    let _ = events_channel.close(200, "done".into()).await;
    transfer.close().await;
    Ok(cancelled)
}

/// The `cancelled` event of a held job.
fn cancelled_event(delivery: &Delivery, campaign: &str) -> DeliveryEvent {
    let incoming = delivery.properties.headers().as_ref();
    let job = Job::from_bytes(&delivery.data, usize::MAX).ok();
    DeliveryEvent {
        id: job
            .as_ref()
            .map_or_else(|| job_id(delivery), |job| job.id.clone()),
        campaign: campaign.to_string(),
        to: job.map(|job| job.to).unwrap_or_default(),
        relay: headers::get_str(incoming, headers::RELAY).unwrap_or_default(),
        outcome: EventOutcome::Cancelled,
        attempt: headers::get_int(incoming, headers::ATTEMPT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1),
        smtp_code: None,
        smtp_reply: Some("its campaign was cancelled".into()),
        at: now_rfc3339(),
        trace_id: None,
    }
}

fn job_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |id| id.to_string())
}

/// Delete an empty hold queue nobody consumes; leave one that is not (a job a late worker
/// held: the next `resume` or `cancel` takes it). A quorum queue counts a message taken and
/// acknowledged a moment ago for a little while: the count is read a few times.
async fn delete_if_idle(connection: &Connection, queue: &str) -> anyhow::Result<()> {
    for _ in 0..10 {
        match inspect(connection, queue).await? {
            None => return Ok(()),
            Some(q) if q.message_count() == 0 && q.consumer_count() == 0 => {
                return delete_queue(connection, queue).await;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    eprintln!("{queue} is not empty: a worker held a job late; run the command again to move it");
    Ok(())
}
