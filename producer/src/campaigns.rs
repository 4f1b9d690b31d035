//! `campaigns`: every campaign the event log holds, with its state and counts, and the one
//! place that names a campaign's state.

use std::collections::BTreeMap;

use serde::Serialize;
use sluice_shared::control::{CampaignState, Steering};
use sluice_shared::Settings;

use crate::cli::CampaignsArgs;
use crate::control::ControlStream;
use crate::exit::Status;
use crate::log::{Entry, LogReader, Since};
use crate::tally::{Counts, Tally};

/// A campaign's state: `cancelled` or `paused` (an operator's command), else `finished`
/// (every job published has a final outcome) or `sending`.
pub fn state_name(steering: &Steering, tally: &Tally) -> &'static str {
    match steering.campaign(tally.counts().campaign.as_str()) {
        Some(state @ (CampaignState::Cancelled { .. } | CampaignState::Paused { .. })) => {
            state.name()
        }
        None if tally.is_complete() => "finished",
        None => "sending",
    }
}

/// One line of `campaigns --json`.
#[derive(Debug, Serialize)]
pub struct CampaignLine {
    pub state: &'static str,
    #[serde(flatten)]
    pub counts: Counts,
}

/// Run `campaigns`.
pub async fn run(settings: &Settings, args: CampaignsArgs) -> anyhow::Result<Status> {
    let control = ControlStream::open(settings).await?;
    let steering = control.state().await?.steering;
    control.close().await;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    fn tally<'t>(tallies: &'t mut BTreeMap<String, Tally>, campaign: &str) -> &'t mut Tally {
        tallies
            .entry(campaign.to_string())
            .or_insert_with(|| Tally::new(campaign, 0))
    }
    let mut reader = LogReader::open_all(settings, Since::Beginning).await?;
    let read = loop {
        match reader.next().await {
            Ok(Entry::CaughtUp) => break Ok(()),
            Ok(Entry::Summary(summary)) => {
                tally(&mut tallies, &summary.campaign.clone()).on_summary(summary)
            }
            Ok(Entry::Events(batch)) => {
                for event in &batch {
                    tally(&mut tallies, &event.campaign).on_event(event);
                }
            }
            Err(e) => break Err(e),
        }
    };
    reader.close().await;
    read?;
    if tallies.is_empty() && !args.json {
        println!("no campaign in the event log");
    }
    for tally in tallies.values() {
        let line = CampaignLine {
            state: state_name(&steering, tally),
            counts: tally.counts(),
        };
        if args.json {
            println!("{}", serde_json::to_string(&line).expect("line serializes"));
        } else {
            let c = &line.counts;
            let published = c
                .published
                .map_or_else(|| "unknown".to_string(), |n| n.to_string());
            println!(
                "{} {}: published {published}, delivered {}, bounced {}, dead {}, cancelled {}, \
                 deferred {}",
                c.campaign, line.state, c.delivered, c.bounced, c.dead, c.cancelled, c.deferred
            );
        }
    }
    Ok(Status::Success)
}
