//! `status`: a campaign's counts so far, its rate over the last minute and the time left,
//! read from the event log without waiting for anything.

use std::time::Duration;

use sluice_shared::Settings;

use crate::campaigns::state_name;
use crate::cli::StatusArgs;
use crate::control::ControlStream;
use crate::exit::Status;
use crate::log::{tally_until_now, unknown_campaign, Since};
use crate::tally::{Counts, Tally};

/// The window of the recent rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// What `status --json` prints.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `sending`, `paused`, `cancelled` or `finished` (see [`crate::campaigns::state_name`]).
    pub state: &'static str,
    #[serde(flatten)]
    pub counts: Counts,
    /// Final outcomes per second over the last minute.
    pub rate_per_second: f64,
    /// Seconds until every job has a final outcome at that rate; `None` when the number of
    /// jobs is unknown or nothing finished in the last minute.
    pub eta_seconds: Option<u64>,
}

impl Report {
    fn new(state: &'static str, counts: Counts, recent: u64) -> Report {
        let rate_per_second = recent as f64 / RATE_WINDOW.as_secs_f64();
        let eta_seconds = match counts.pending {
            Some(0) => Some(0),
            Some(pending) if rate_per_second > 0.0 => {
                Some((pending as f64 / rate_per_second).ceil() as u64)
            }
            _ => None,
        };
        Report {
            state,
            counts,
            rate_per_second,
            eta_seconds,
        }
    }
}

/// Run `status`: exit 0 whatever the counts, 1 for a campaign the log has never seen.
pub async fn run(settings: &Settings, args: StatusArgs) -> anyhow::Result<Status> {
    let since = match args.since {
        Some(ago) => Since::Ago(ago),
        None => Since::Beginning,
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let recent_since = now - RATE_WINDOW.as_secs() as i64;
    let tally = tally_until_now(settings, &args.campaign, since, recent_since).await?;
    if !tally.seen() {
        return Err(unknown_campaign(&args.campaign));
    }
    let control = ControlStream::open(settings).await?;
    let steering = control.state().await?.steering;
    control.close().await;
    let state = state_name(&steering, &tally);
    let report = Report::new(state, tally.counts(), tally.recent());
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
    } else {
        print!("{}", text(&report, &tally));
    }
    Ok(Status::Success)
}

/// The report for a person.
fn text(report: &Report, tally: &Tally) -> String {
    let counts = &report.counts;
    let mut out = format!("campaign {} ({})\n", counts.campaign, report.state);
    match tally.summary() {
        Some(summary) => out.push_str(&format!(
            "published {} jobs for relay {}, starting {}\n",
            summary.published, summary.relay, summary.started_at
        )),
        None => out.push_str("published: unknown (no campaign summary in the event log)\n"),
    }
    let pending = counts
        .pending
        .map_or_else(|| "unknown".to_string(), |p| p.to_string());
    out.push_str(&format!(
        "delivered {}, deferred {}, bounced {}, dead {}, cancelled {}, pending {pending}\n",
        counts.delivered, counts.deferred, counts.bounced, counts.dead, counts.cancelled
    ));
    let left = match report.eta_seconds {
        Some(0) => "finished".to_string(),
        Some(secs) => format!(
            "about {} left",
            humantime::format_duration(Duration::from_secs(secs))
        ),
        None => "time left unknown".to_string(),
    };
    out.push_str(&format!(
        "{:.1} per second over the last minute; {left}\n",
        report.rate_per_second
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(published: Option<u64>, finished: u64) -> Counts {
        Counts {
            campaign: "c1".into(),
            published,
            delivered: finished,
            deferred: 0,
            bounced: 0,
            dead: 0,
            cancelled: 0,
            pending: published.map(|p| p - finished),
            deferred_attempts: 0,
        }
    }

    #[test]
    fn the_time_left_follows_the_last_minutes_rate() {
        let report = Report::new("sending", counts(Some(1000), 400), 120);
        assert_eq!(report.rate_per_second, 2.0);
        assert_eq!(report.eta_seconds, Some(300));
        assert_eq!(
            Report::new("sending", counts(Some(10), 10), 0).eta_seconds,
            Some(0)
        );
        assert_eq!(
            Report::new("sending", counts(Some(10), 5), 0).eta_seconds,
            None
        );
        assert_eq!(
            Report::new("sending", counts(None, 5), 60).eta_seconds,
            None
        );
    }

    #[test]
    fn json_names_every_count() {
        let json = serde_json::to_value(Report::new("sending", counts(None, 5), 0)).unwrap();
        for key in [
            "state",
            "campaign",
            "published",
            "delivered",
            "deferred",
            "bounced",
            "dead",
            "cancelled",
            "pending",
            "rate_per_second",
            "eta_seconds",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert!(json["published"].is_null() && json["pending"].is_null());
    }
}
