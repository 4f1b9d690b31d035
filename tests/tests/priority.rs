//! Priority classes: a `high` job published by another service while a campaign of 20,000
//! `normal` jobs is queued reaches the relay within a second, within the relay's budget;
//! `low` jobs beside `normal` ones get about `low_share` of the sends.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_tests::app::TestApp;
use sluice_tests::scripted_smtp::Behaviour;
use sluice_tests::wait::wait_until;

const MAX_CONNECTIONS: usize = 4;
const MAX_RATE: usize = 200;
const BULK: usize = 20_000;
const HIGH: usize = 50;

/// Publishes `HIGH` jobs with `"priority": "high"` one at a time with pika, as a foreign
/// service would, 100 to 300 ms apart; prints `<recipient> <unix time before publishing>`.
const PIKA_PUBLISHER: &str = r#"
import json, random, sys, time
import pika
namespace, count = sys.argv[1], int(sys.argv[2])
connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
channel = connection.channel()
channel.confirm_delivery()
for i in range(count):
    job = {"id": f"reset-{i}", "campaign": "resets", "from": "Acme <auth@example.com>",
           "to": f"reset-{i}@example.org", "subject": "Your reset link",
           "text": "Click the link.", "priority": "high"}
    published = time.time()
    channel.basic_publish(exchange=f"{namespace}.jobs", routing_key="primary.high",
                          body=json.dumps(job),
                          properties=pika.BasicProperties(content_type="application/json",
                                                          delivery_mode=2, message_id=job["id"]),
                          mandatory=True)
    print(job["to"], published, flush=True)
    time.sleep(random.uniform(0.1, 0.3))
connection.close()
"#;

fn budget() -> String {
    format!("max_connections = {MAX_CONNECTIONS}\nmax_messages_per_second = {MAX_RATE}\n")
}

/// `at` (an `Instant` of this process) as Unix time.
fn unix_time(at: Instant, base: (Instant, SystemTime)) -> f64 {
    let (instant, system) = base;
    let system = if at >= instant {
        system + (at - instant)
    } else {
        system - (instant - at)
    };
    system
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_high_job_overtakes_a_queued_campaign_within_a_second() {
    let mut app = TestApp::builder("prio-high")
        .relay("primary", Behaviour::accept_all(), &budget())
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "bulk", BULK).await;
    app.start_workers(2);
    // The campaign is under way: every lane has its slot and its pace.
    assert!(smtp.wait_for_accepted(600, Duration::from_secs(60)).await >= 600);
    let base = (Instant::now(), SystemTime::now());
    let bulk_before = smtp.accepted_count();

    let output = Command::new("timeout")
        .args(["60", "/usr/bin/python3", "-c", PIKA_PUBLISHER])
        .args([app.ns.name.as_str(), &HIGH.to_string()])
        .output()
        .expect("run python3 (python3-pika)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let published: Vec<(String, f64)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let (to, at) = line.split_once(' ').expect("<to> <time>");
            (to.to_string(), at.parse().expect("a time"))
        })
        .collect();
    assert_eq!(published.len(), HIGH);
    wait_until(
        || async {
            let got = smtp.recipients();
            published.iter().all(|(to, _)| got.contains(to))
        },
        Duration::from_secs(30),
        "every high job at the relay",
    )
    .await;
    let window = base.0.elapsed();

    let accepted = smtp.accepted();
    let mut latencies: Vec<f64> = published
        .iter()
        .map(|(to, at)| {
            let first = accepted
                .iter()
                .find(|m| m.rcpt_to.contains(to))
                .expect("accepted");
            unix_time(first.at, base) - at
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let (p50, p100) = (latencies[HIGH / 2], latencies[HIGH - 1]);
    let bulk_during = accepted.len() - bulk_before - HIGH;
    let bulk_rate = bulk_during as f64 / window.as_secs_f64();
    eprintln!(
        "high jobs, publish to relay: p50 {:.0} ms, p100 {:.0} ms; normal meanwhile {bulk_during} ({bulk_rate:.0}/s); peak {}/s",
        p50 * 1000.0,
        p100 * 1000.0,
        smtp.max_accepted_in_any_second()
    );
    assert!(p100 <= 1.0, "a high job took {p100:.3} s: {latencies:?}");
    // The campaign keeps going beside them, within the budget.
    assert!(
        bulk_rate >= MAX_RATE as f64 * 0.5,
        "the normal campaign slowed to {bulk_rate:.0}/s"
    );
    assert!(
        smtp.wait_for_accepted(accepted.len() + 100, Duration::from_secs(10))
            .await
            > accepted.len()
    );
    let peak = smtp.max_accepted_in_any_second();
    assert!(
        peak <= MAX_RATE * 105 / 100,
        "{peak} messages in one second"
    );
    assert!(smtp.max_concurrent_sessions() <= MAX_CONNECTIONS);
}

#[tokio::test(flavor = "multi_thread")]
async fn low_jobs_get_their_share_while_normal_ones_wait() {
    const EACH: usize = 1500;
    const MEASURED: usize = 1000;
    let mut app = TestApp::builder("prio-low")
        .relay("primary", Behaviour::accept_all(), &budget())
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "bulk", EACH).await;
    app.ns.publish_jobs("primary.low", "low", EACH).await;
    app.start_workers(2);
    // Both classes still wait after MEASURED sends (at most EACH of either).
    assert!(
        smtp.wait_for_accepted(MEASURED, Duration::from_secs(60))
            .await
            >= MEASURED
    );
    let accepted = smtp.accepted();
    let low = accepted[..MEASURED]
        .iter()
        .filter(|m| m.rcpt_to.iter().any(|to| to.starts_with("low-")))
        .count();
    let share = low as f64 / MEASURED as f64;
    eprintln!("low jobs got {low} of the first {MEASURED} sends ({share:.3})");
    assert!(
        (0.15..=0.25).contains(&share),
        "low got {share:.3} of the sends, not 15% to 25%"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_priority_disagrees_with_its_key_is_dead_as_invalid() {
    let app = TestApp::builder("prio-invalid")
        .relay("primary", Behaviour::accept_all(), "")
        .workers(1)
        .start()
        .await;
    let mut job: serde_json::Value =
        serde_json::from_str(&sluice_tests::broker::job_json("liar", "liar@example.org"))
            .expect("json");
    job["priority"] = "high".into();
    app.ns
        .publish_raw("primary.low", "liar", job.to_string().as_bytes())
        .await;
    wait_until(
        || async { app.dead_len("primary").await == 1 },
        Duration::from_secs(30),
        "the job in the dead queue",
    )
    .await;
    let dead = app.ns.drain(&app.ns.topology.dead_queue("primary")).await;
    let headers = dead[0].delivery.properties.headers().clone();
    assert_eq!(
        sluice_shared::headers::get_str(headers.as_ref(), sluice_shared::headers::REASON)
            .as_deref(),
        Some("invalid")
    );
    assert_eq!(
        sluice_shared::headers::get_str(headers.as_ref(), sluice_shared::headers::PRIORITY)
            .as_deref(),
        Some("low")
    );
    assert_eq!(app.relay("primary").accepted_count(), 0);
}
