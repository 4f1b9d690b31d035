//! Steering a campaign in flight: `pause`, `resume`, `cancel`, `relay suspend`, and the jobs'
//! own `not_before`/`not_after`, against the real broker, real workers and a scripted relay
//! at a budget of a few hundred messages per second.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sluice_shared::events::EventOutcome;
use sluice_shared::headers;
use sluice_tests::app::TestApp;
use sluice_tests::broker::TestNamespace;
use sluice_tests::processes::{run_producer, Run};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
use sluice_tests::wait::{eventually, wait_until};

/// How long a command takes to reach every worker, at most (the contract).
const FLEET_READS: Duration = Duration::from_secs(3);

fn budget(sessions: u32, rate: u32) -> String {
    format!("max_connections = {sessions}\nmax_messages_per_second = {rate}\n")
}

/// A job of `campaign` for `<id>@example.org`, with extra fields.
fn job(id: &str, campaign: &str, extra: serde_json::Value) -> (String, Vec<u8>) {
    let mut job = serde_json::json!({
        "id": id, "campaign": campaign, "from": "news@example.com",
        "to": format!("{id}@example.org"), "subject": "Hello", "text": "Body"
    });
    if let (Some(job), Some(extra)) = (job.as_object_mut(), extra.as_object()) {
        job.extend(extra.clone());
    }
    (id.to_string(), job.to_string().into_bytes())
}

/// `n` jobs of each campaign, interleaved, for `relay`.
async fn publish_campaigns(ns: &TestNamespace, relay: &str, campaigns: &[&str], n: usize) {
    let bodies: Vec<(String, Vec<u8>)> = (0..n)
        .flat_map(|i| {
            campaigns
                .iter()
                .map(move |c| job(&format!("{c}-{i}"), c, serde_json::json!({})))
        })
        .collect();
    ns.publish_bodies(relay, &bodies).await;
}

/// Run `sluice-producer <args>` with the app's config. A campaign it pauses gets a hold
/// queue, deleted with the namespace.
fn producer(app: &TestApp, args: &[&str]) -> Run {
    if let Some(at) = args.iter().position(|a| *a == "--campaign") {
        if let Some(campaign) = args.get(at + 1) {
            app.ns.delete_on_drop(app.ns.topology.hold_queue(campaign));
        }
    }
    Run::from(run_producer(&app.config.path, args))
}

/// How many times each recipient of `campaign` was accepted.
fn accepted_of(smtp: &ScriptedSmtp, campaign: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in smtp.accepted() {
        for to in message.rcpt_to {
            if to.starts_with(&format!("{campaign}-")) {
                *counts.entry(to).or_default() += 1;
            }
        }
    }
    counts
}

/// Acceptances of `campaign` at or after `from`.
fn accepted_since(smtp: &ScriptedSmtp, campaign: &str, from: Instant) -> Vec<Instant> {
    smtp.accepted()
        .iter()
        .filter(|m| m.at >= from)
        .filter(|m| {
            m.rcpt_to
                .iter()
                .any(|to| to.starts_with(&format!("{campaign}-")))
        })
        .map(|m| m.at)
        .collect()
}

async fn hold_len(app: &TestApp, campaign: &str) -> u32 {
    app.ns
        .try_queue_len(&app.ns.topology.hold_queue(campaign))
        .await
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_stops_one_campaign_within_3_s_the_other_keeps_the_full_rate_and_resume_sends_each_held_job_once(
) {
    const EACH: usize = 3000;
    const RATE: u32 = 200;
    let mut app = TestApp::builder("steer-pause")
        .relay("primary", Behaviour::accept_all(), &budget(4, RATE))
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    publish_campaigns(&app.ns, "primary", &["spring", "autumn"], EACH).await;
    app.start_workers(2);
    assert!(smtp.wait_for_accepted(400, Duration::from_secs(60)).await >= 400);

    let paused = producer(&app, &["pause", "--campaign", "spring"]);
    paused.expect_code(0);
    assert!(
        paused.stdout.contains("paused campaign spring"),
        "{}",
        paused.stdout
    );
    let returned = Instant::now();

    // Measured over 5 s once the fleet has read the pause: not one spring transaction, and
    // autumn alone at the relay's whole budget.
    tokio::time::sleep(FLEET_READS + Duration::from_secs(5)).await;
    let stopped = returned + FLEET_READS;
    let spring_after = accepted_since(&smtp, "spring", stopped);
    assert!(
        spring_after.is_empty(),
        "{} spring messages accepted more than 3 s after the pause returned",
        spring_after.len()
    );
    let autumn = accepted_since(&smtp, "autumn", stopped)
        .into_iter()
        .filter(|at| *at < stopped + Duration::from_secs(5))
        .count();
    let autumn_rate = autumn as f64 / 5.0;
    let per_second: Vec<usize> = (0..8)
        .map(|s| {
            let from = returned + Duration::from_secs(s);
            accepted_since(&smtp, "autumn", from)
                .into_iter()
                .filter(|at| *at < from + Duration::from_secs(1))
                .count()
        })
        .collect();
    eprintln!(
        "autumn per second after the pause returned: {per_second:?}; hold {}",
        hold_len(&app, "spring").await
    );
    eprintln!("autumn alone: {autumn_rate:.0}/s of a budget of {RATE}/s");
    assert!(
        autumn_rate >= f64::from(RATE) * 0.8,
        "autumn slowed to {autumn_rate:.0}/s while spring was paused"
    );
    let status = producer(&app, &["status", "--campaign", "spring", "--json"]);
    status.expect_code(0);
    assert_eq!(status.json()["state"], "paused", "{}", status.stdout);
    let relays = producer(&app, &["relay", "status", "--json"]);
    relays.expect_code(0);
    let primary = relays.json();
    assert_eq!(primary["relay"], "primary");
    assert_eq!(primary["state"], "up");
    let slots = primary["slots_in_use"].as_u64().expect("slots_in_use");
    assert!((1..=4).contains(&slots), "{}", relays.stdout);
    assert!(primary["queued_normal"].as_u64().expect("queued_normal") > 0);

    // Autumn finishes; spring's remaining jobs are all in the hold queue, none left queued.
    wait_until(
        || async { accepted_of(&smtp, "autumn").len() == EACH },
        Duration::from_secs(60),
        "every autumn job delivered",
    )
    .await;
    let delivered_before = accepted_of(&smtp, "spring").len();
    wait_until(
        || async { hold_len(&app, "spring").await as usize + delivered_before == EACH },
        Duration::from_secs(30),
        "the rest of spring in its hold queue",
    )
    .await;
    assert_eq!(app.jobs_len("primary").await, 0);

    let before_resume = Instant::now();
    let resumed = producer(&app, &["resume", "--campaign", "spring"]);
    resumed.expect_code(0);
    let moved: usize = resumed
        .stdout
        .strip_prefix("resumed campaign spring: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", resumed.stdout));
    wait_until(
        || async { accepted_of(&smtp, "spring").len() == EACH },
        Duration::from_secs(60),
        "every spring job delivered after the resume",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_after_resume = accepted_since(&smtp, "spring", before_resume).len();
    eprintln!(
        "{delivered_before} spring jobs sent before the pause took hold, {moved} held and sent after the resume"
    );
    assert_eq!(moved, sent_after_resume, "every held job, and only those");
    for campaign in ["spring", "autumn"] {
        let twice: Vec<_> = accepted_of(&smtp, campaign)
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .collect();
        assert!(twice.is_empty(), "{campaign} jobs sent twice: {twice:?}");
    }
    assert!(
        !app.ns
            .queue_exists(&app.ns.topology.hold_queue("spring"))
            .await,
        "the hold queue is left, with {} jobs; resume said: {}",
        hold_len(&app, "spring").await,
        resumed.stderr
    );
    assert!(smtp.max_accepted_in_any_second() <= RATE as usize * 105 / 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_ends_every_remaining_job_cancelled_and_nothing_is_sent_3_s_after() {
    const JOBS: usize = 1500;
    let mut app = TestApp::builder("steer-cancel")
        .relay(
            "primary",
            // One job waits in a retry step when the campaign is cancelled.
            Behaviour::accept_all().with_rcpt_script("typo-3@example.org", &["451 4.7.1 later"]),
            &budget(2, 100),
        )
        .retries(&["3s", "3s"])
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    publish_campaigns(&app.ns, "primary", &["typo"], JOBS).await;
    app.start_workers(1);
    assert!(smtp.wait_for_accepted(100, Duration::from_secs(60)).await >= 100);
    // Some of its jobs held, some queued, one in a retry step.
    producer(&app, &["pause", "--campaign", "typo"]).expect_code(0);
    wait_until(
        || async { hold_len(&app, "typo").await >= 50 },
        Duration::from_secs(30),
        "jobs in the hold queue",
    )
    .await;
    producer(&app, &["resume", "--campaign", "typo"]).expect_code(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    producer(&app, &["pause", "--campaign", "typo"]).expect_code(0);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cancelled = producer(&app, &["cancel", "--campaign", "typo", "--yes"]);
    cancelled.expect_code(0);
    assert!(
        cancelled.stdout.contains("not recalled"),
        "{}",
        cancelled.stdout
    );
    let returned = Instant::now();
    // Every job ends: delivered before the cancel, or cancelled — one final outcome each.
    let all_ended = events
        .wait_until(Duration::from_secs(60), |seen| {
            seen.iter()
                .filter(|e| e.outcome.is_final())
                .map(|e| e.id.as_str())
                .collect::<HashSet<_>>()
                .len()
                == JOBS
        })
        .await;
    assert!(all_ended, "not every job ended");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late = accepted_since(&smtp, "typo", returned + FLEET_READS);
    assert!(late.is_empty(), "{} sent 3 s after the cancel", late.len());
    let ids = |outcome: EventOutcome| -> HashSet<String> {
        events
            .seen
            .iter()
            .filter(|e| e.outcome == outcome)
            .map(|e| e.id.clone())
            .collect()
    };
    let (delivered, cancelled) = (ids(EventOutcome::Delivered), ids(EventOutcome::Cancelled));
    assert!(delivered.is_disjoint(&cancelled));
    assert_eq!(delivered.len() + cancelled.len(), JOBS);
    assert_eq!(accepted_of(&smtp, "typo").len(), delivered.len());
    assert!(cancelled.contains("typo-3"), "the job in a retry step");
    assert!(!cancelled.is_empty() && ids(EventOutcome::Dead).is_empty());

    let status = producer(&app, &["status", "--campaign", "typo", "--json"]);
    status.expect_code(0);
    let report = status.json();
    assert_eq!(report["state"], "cancelled", "{}", status.stdout);
    assert_eq!(report["cancelled"], cancelled.len() as u64);
    assert_eq!(report["delivered"], delivered.len() as u64);
    let campaigns = producer(&app, &["campaigns", "--json"]);
    campaigns.expect_code(0);
    let line: serde_json::Value = campaigns
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["campaign"] == "typo")
        .expect("typo listed");
    assert_eq!(line["state"], "cancelled");
    assert_eq!(line["cancelled"], cancelled.len() as u64);
    assert_eq!(app.dead_len("primary").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_after_a_pause_obeys_it() {
    const ROWS: usize = 40;
    let mut app = TestApp::builder("steer-late")
        .relay("primary", Behaviour::accept_all(), &budget(2, 200))
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    let csv: String = std::iter::once("email".to_string())
        .chain((0..ROWS).map(|i| format!("late-{i}@example.org")))
        .collect::<Vec<_>>()
        .join("\n");
    let recipients = app.config.write("late.csv", csv);
    let text = app.config.write("late.txt", "Hello");
    let sent = producer(
        &app,
        &[
            "send",
            "--recipients",
            recipients.to_str().unwrap(),
            "--from",
            "news@example.com",
            "--subject",
            "Hi",
            "--text",
            text.to_str().unwrap(),
            "--campaign",
            "late",
        ],
    );
    sent.expect_code(0);
    producer(&app, &["pause", "--campaign", "late"]).expect_code(0);

    app.start_workers(1);
    wait_until(
        || async { hold_len(&app, "late").await as usize == ROWS },
        Duration::from_secs(30),
        "every job of the paused campaign in its hold queue",
    )
    .await;
    assert_eq!(smtp.accepted_count(), 0, "a paused campaign's job was sent");
    let status = producer(&app, &["status", "--campaign", "late", "--json"]);
    assert_eq!(status.json()["state"], "paused");

    producer(&app, &["resume", "--campaign", "late"]).expect_code(0);
    assert_eq!(
        smtp.wait_for_accepted(ROWS, Duration::from_secs(30)).await,
        ROWS
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(smtp.accepted_count(), ROWS, "each job exactly once");
    let status = producer(&app, &["status", "--campaign", "late", "--json"]);
    assert_eq!(status.json()["state"], "finished", "{}", status.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_relay_s_traffic_goes_to_its_failover_and_comes_back_after_the_duration() {
    let app = TestApp::builder("steer-suspend")
        .relay(
            "primary",
            Behaviour::accept_all(),
            &format!("{}failover = \"backup\"\n", budget(2, 100)),
        )
        .relay("backup", Behaviour::accept_all(), &budget(2, 100))
        .workers(1)
        .start()
        .await;
    let (primary, backup) = (app.relay("primary"), app.relay("backup"));
    app.ns.publish_jobs("primary", "sus", 2500).await;
    assert!(
        primary
            .wait_for_accepted(100, Duration::from_secs(30))
            .await
            >= 100
    );
    assert_eq!(backup.accepted_count(), 0);

    let suspended = producer(
        &app,
        &[
            "relay",
            "suspend",
            "primary",
            "--for",
            "6s",
            "--reason",
            "the provider asked",
        ],
    );
    suspended.expect_code(0);
    let returned = Instant::now();
    assert!(
        suspended.stdout.contains("failover relay backup"),
        "{}",
        suspended.stdout
    );
    let status = producer(&app, &["relay", "status", "--json"]);
    status.expect_code(0);
    let primary_line: serde_json::Value = status
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["relay"] == "primary")
        .expect("primary listed");
    assert_eq!(primary_line["state"], "suspended", "{}", status.stdout);
    assert_eq!(primary_line["reason"], "the provider asked");

    // From 3 s after the command to the end of the suspension: the backup only.
    let window_end = returned + Duration::from_secs(5);
    tokio::time::sleep_until((window_end).into()).await;
    let on_primary = primary
        .accepted()
        .iter()
        .filter(|m| m.at >= returned + FLEET_READS && m.at < window_end)
        .count();
    let on_backup = backup
        .accepted()
        .iter()
        .filter(|m| m.at >= returned + FLEET_READS && m.at < window_end)
        .count();
    assert_eq!(on_primary, 0, "the suspended relay got transactions");
    assert!(on_backup >= 100, "the failover took only {on_backup}");

    // After the 6 s, traffic comes back to the primary.
    let back = primary.accepted_count();
    assert!(
        eventually(Duration::from_secs(10), || async {
            primary.accepted_count() >= back + 50
        })
        .await,
        "no traffic back on the primary after its suspension"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_past_not_after_ends_dead_expired_and_one_before_not_before_waits_without_an_attempt()
{
    let app = TestApp::builder("steer-times")
        .relay("primary", Behaviour::accept_all(), "")
        .retries(&["1s", "2s"])
        .workers(1)
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    let rfc3339 = |offset: time::Duration| {
        (time::OffsetDateTime::now_utc() + offset)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let late = job(
        "stale",
        "times",
        serde_json::json!({ "not_after": rfc3339(-time::Duration::hours(1)) }),
    );
    let due_in = Duration::from_secs(4);
    let early = job(
        "early",
        "times",
        serde_json::json!({ "not_before": rfc3339(time::Duration::seconds(4)) }),
    );
    let published = Instant::now();
    app.ns.publish_bodies("primary", &[late, early]).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen
                .iter()
                .filter(|e| e.outcome.is_final())
                .count()
                >= 2)
            .await
    );
    let stale: Vec<_> = events.seen.iter().filter(|e| e.id == "stale").collect();
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(stale[0].outcome, EventOutcome::Dead);
    let dead = app.ns.drain(&app.ns.topology.dead_queue("primary")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        headers::get_str(
            dead[0].delivery.properties.headers().as_ref(),
            headers::REASON
        )
        .as_deref(),
        Some("expired")
    );

    let early: Vec<_> = events.seen.iter().filter(|e| e.id == "early").collect();
    assert_eq!(early.len(), 1, "no deferral: waiting is not an attempt");
    assert_eq!(early[0].outcome, EventOutcome::Delivered);
    assert_eq!(early[0].attempt, 1);
    let sent_at = smtp.accepted()[0].at;
    assert!(
        sent_at >= published + due_in - Duration::from_millis(500),
        "sent {:?} after publishing, before its not_before",
        sent_at - published
    );
    assert_eq!(smtp.accepted_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_campaign_or_relay_is_an_error_naming_it() {
    let app = TestApp::builder("steer-unknown")
        .relay("primary", Behaviour::accept_all(), "")
        .workers(0)
        .start()
        .await;
    for command in ["pause", "resume", "cancel"] {
        let mut args = vec![command, "--campaign", "nosuch"];
        if command == "cancel" {
            args.push("--yes");
        }
        let run = producer(&app, &args);
        run.expect_code(1);
        assert!(
            run.stderr.contains("unknown campaign nosuch"),
            "{command}: {}",
            run.stderr
        );
    }
    for args in [
        &["relay", "suspend", "nosuch", "--for", "1m"][..],
        &["relay", "resume", "nosuch"][..],
    ] {
        let run = producer(&app, args);
        run.expect_code(1);
        assert!(
            run.stderr.contains("unknown relay nosuch"),
            "{args:?}: {}",
            run.stderr
        );
    }
}

/// Thousands of jobs held by the fleet go back once each: a quorum queue ignores some of a
/// burst of single acks sent just before their channel closes (rabbitmq-server#10327), and
/// `resume` would find those jobs held again and send them a second time.
#[tokio::test]
async fn resume_moves_thousands_of_held_jobs_back_each_exactly_once() {
    const HELD: usize = 3000;
    let env = producer_support::ProducerEnv::new("steer-resume-many").await;
    env.event("bulk", "bulk-delivered", "delivered").await;
    let paused = env.run(&["pause", "--campaign", "bulk"]);
    paused.expect_code(0);
    let hold = env.ns.topology.hold_queue("bulk");
    env.ns.delete_on_drop(hold.clone());
    // As workers set jobs aside: the relay whose queue each came from in a header.
    let held: Vec<(Vec<u8>, lapin::BasicProperties)> = (0..HELD)
        .map(|i| {
            let (id, body) = job(&format!("bulk-{i}"), "bulk", serde_json::json!({}));
            let mut table = lapin::types::FieldTable::default();
            headers::set_str(&mut table, headers::RELAY, "primary");
            let properties = lapin::BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_content_type("application/json".into())
                .with_headers(table);
            (body, properties)
        })
        .collect();
    env.put_many(&hold, &held).await;

    let resumed = env.run(&["resume", "--campaign", "bulk"]);

    resumed.expect_code(0);
    assert!(
        resumed
            .stdout
            .starts_with(&format!("resumed campaign bulk: {HELD} held jobs")),
        "{}",
        resumed.stdout
    );
    assert!(!env.queue_exists(&hold).await, "{}", resumed.stderr);
    // Every job once: as many messages as jobs, each id once.
    assert_eq!(env.count_ids(&env.jobs_queue()).await, (HELD, HELD));
}
