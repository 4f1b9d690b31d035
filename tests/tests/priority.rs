//! Priority classes: a `high` job published by another service while a campaign of 20,000
//! `normal` jobs is queued reaches the relay within a second, within the relay's budget;
//! `low` jobs beside `normal` ones get about `low_share` of the sends.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_shared::{headers, Priority};
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

fn job_with_priority(id: &str, to: &str, priority: &str) -> Vec<u8> {
    let mut job: serde_json::Value =
        serde_json::from_str(&sluice_tests::broker::job_json(id, to)).expect("json");
    job["priority"] = priority.into();
    job.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_high_job_is_retried_as_high() {
    let app = TestApp::builder("prio-retry")
        .relay(
            "primary",
            Behaviour::rcpt_script("again@example.org", &["451 4.7.1 later", "250 2.1.5 ok"]),
            "",
        )
        .retries(&["3s"])
        .workers(1)
        .start()
        .await;
    app.ns
        .publish_raw(
            "primary.high",
            "again",
            &job_with_priority("again", "again@example.org", "high"),
        )
        .await;
    let high_retry = app
        .ns
        .topology
        .class_retry_queue("primary", Priority::High, 1);
    wait_until(
        || async { app.ns.queue_len(&high_retry).await == 1 },
        Duration::from_secs(20),
        "the deferred job in the high retry ladder",
    )
    .await;
    assert_eq!(
        app.retry_len("primary", 1).await,
        0,
        "not in normal's ladder"
    );
    let smtp = app.relay("primary");
    wait_until(
        || async { smtp.recipients().contains("again@example.org") },
        Duration::from_secs(30),
        "the retried job delivered",
    )
    .await;
}

#[tokio::test]
async fn dead_replay_publishes_each_job_in_its_class() {
    let env = producer_support::ProducerEnv::new("prio-replay").await;
    let queue = env.dead_queue();
    let dead = |class: Option<&str>| {
        let mut table = lapin::types::FieldTable::default();
        headers::set_str(&mut table, headers::REASON, "bounced");
        if let Some(class) = class {
            headers::set_str(&mut table, headers::PRIORITY, class);
        }
        lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(table)
    };
    // Recorded by the worker on the dead copy; or only in the body; or neither.
    let high = job_with_priority("was-high", "a@example.org", "high");
    env.put(
        &queue,
        &high,
        dead(Some("high")).with_message_id("was-high".into()),
    )
    .await;
    let low = job_with_priority("was-low", "b@example.org", "low");
    env.put(&queue, &low, dead(None).with_message_id("was-low".into()))
        .await;
    let plain = sluice_tests::broker::job_json("was-normal", "c@example.org");
    env.put(
        &queue,
        plain.as_bytes(),
        dead(None).with_message_id("was-normal".into()),
    )
    .await;

    let run = env.run(&["dead", "replay"]);

    run.expect_code(0);
    let t = &env.ns.topology;
    for (class, id) in [
        (Priority::High, "was-high"),
        (Priority::Low, "was-low"),
        (Priority::Normal, "was-normal"),
    ] {
        let ids: Vec<String> = env
            .take_all(&t.class_queue("primary", class))
            .await
            .iter()
            .map(|m| m.message_id().unwrap_or_default())
            .collect();
        assert_eq!(ids, [id], "{class} queue");
    }
}

#[tokio::test]
async fn send_with_priority_publishes_to_the_class_key() {
    let env = producer_support::ProducerEnv::new("prio-send").await;
    let recipients = env.file("r.csv", "email\nann@example.org\n");
    let text = env.file("body.txt", "Hi");
    let run = env.run(&[
        "send",
        "--recipients",
        &recipients,
        "--from",
        "news@example.com",
        "--subject",
        "Hello",
        "--text",
        &text,
        "--campaign",
        "urgent",
        "--priority",
        "high",
    ]);
    run.expect_code(0);
    let high = env
        .take_all(&env.ns.topology.class_queue("primary", Priority::High))
        .await;
    assert_eq!(high.len(), 1);
    let job: serde_json::Value = serde_json::from_slice(&high[0].body).expect("json");
    assert_eq!(job["priority"], "high");
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
    let bad = env.run(&[
        "send",
        "--recipients",
        &recipients,
        "--from",
        "news@example.com",
        "--subject",
        "Hello",
        "--text",
        &text,
        "--priority",
        "urgent",
    ]);
    bad.expect_code(2);
}

/// The value of the series `name{class="<class>",relay="primary"}` in a scrape.
fn series(scrape: &str, name: &str, class: &str) -> Option<f64> {
    let prefix = format!("{name}{{class=\"{class}\",relay=\"primary\"}} ");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn depth_and_oldest_age_per_class_are_shown() {
    let listen = format!("127.0.0.1:{}", sluice_tests::smtp_sink::free_port());
    let app = TestApp::builder("prio-depth")
        .relay(
            "primary",
            Behaviour::accept_all().with_accept_delay(Duration::from_millis(300)),
            "max_connections = 1\n",
        )
        .worker_args(&["--listen", &listen])
        .workers(0)
        .start()
        .await;
    // 60 normal jobs published two minutes ago (by their AMQP timestamp), 5 low ones now.
    let two_minutes_ago = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        - 120;
    let old: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| {
            let id = format!("old-{i}");
            let body = sluice_tests::broker::job_json(&id, &format!("{id}@example.org"));
            (id, body.into_bytes())
        })
        .collect();
    for (id, body) in &old {
        let properties = lapin::BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_timestamp(two_minutes_ago);
        app.ns.publish_with("primary", body, properties).await;
    }
    app.ns.publish_jobs("primary.low", "new", 5).await;

    let queues = sluice_tests::processes::Binary::new("sluice-producer")
        .args(["queues", "--json"])
        .config(&app.config.path)
        .output();
    assert!(queues.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&queues.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    let ready = |class: &str| {
        lines
            .iter()
            .find(|l| l["class"] == class)
            .map(|l| l["ready"].clone())
    };
    assert_eq!(ready("normal"), Some(60.into()));
    assert_eq!(ready("low"), Some(5.into()));
    assert_eq!(ready("high"), Some(0.into()));

    let mut app = app;
    app.start_workers(1);
    let scrape = std::sync::Mutex::new(String::new());
    let shown = sluice_tests::wait::eventually(Duration::from_secs(30), || async {
        let Some((200, body)) = sluice_tests::http::get(&listen, "/metrics").await else {
            return false;
        };
        let age = series(&body, "sluice_queue_oldest_job_age_seconds", "normal");
        let depth = series(&body, "sluice_queue_ready_jobs", "normal");
        *scrape.lock().unwrap() = body;
        age.is_some_and(|age| age >= 119.0) && depth.is_some_and(|d| d > 0.0)
    })
    .await;
    let scrape = scrape.into_inner().unwrap();
    assert!(shown, "no depth or age of normal jobs in:\n{scrape}");
    assert_eq!(
        series(&scrape, "sluice_queue_ready_jobs", "high"),
        Some(0.0)
    );

    // `relay status` shows the same, from the workers' reports on the heads stream: the
    // normal jobs are two minutes old (plus this test's time, well under 30 s), no high job.
    let status = std::sync::Mutex::new(serde_json::Value::Null);
    let reported = sluice_tests::wait::eventually(Duration::from_secs(30), || async {
        let run = sluice_tests::processes::Binary::new("sluice-producer")
            .args(["relay", "status", "--json"])
            .config(&app.config.path)
            .output();
        let Ok(report) = serde_json::from_slice::<serde_json::Value>(&run.stdout) else {
            return false;
        };
        let shown = report["oldest_normal_age_s"].is_number();
        *status.lock().unwrap() = report;
        shown
    })
    .await;
    let status = status.into_inner().unwrap();
    assert!(reported, "no age of the oldest normal job in {status}");
    let age = status["oldest_normal_age_s"].as_f64().expect("a number");
    assert!((119.0..150.0).contains(&age), "{status}");
    assert!(
        status["queued_normal"].as_u64().is_some_and(|n| n > 0),
        "{status}"
    );
    assert!(status["oldest_high_age_s"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_relay_s_high_jobs_fail_over_first() {
    let app = TestApp::builder("prio-failover")
        .relay(
            "primary",
            Behaviour::refuse_connections(),
            "failover = \"backup\"\ndown_cooloff = \"1s\"\n",
        )
        .relay(
            "backup",
            Behaviour::accept_all(),
            "max_connections = 1\nmax_messages_per_second = 20\n",
        )
        .start()
        .await;
    let backup = app.relay("backup");
    app.ns.publish_jobs("primary", "bulk", 200).await;
    // The backup is sending the primary's normal jobs at 20/s when high ones arrive.
    assert!(backup.wait_for_accepted(10, Duration::from_secs(30)).await >= 10);
    let bodies: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let id = format!("urgent-{i}");
            let body = job_with_priority(&id, &format!("{id}@example.org"), "high");
            (id, body)
        })
        .collect();
    app.ns.publish_bodies("primary.high", &bodies).await;
    let sent_before = backup.accepted_count();
    wait_until(
        || async {
            let got = backup.recipients();
            (0..5).all(|i| got.contains(&format!("urgent-{i}@example.org")))
        },
        Duration::from_secs(10),
        "the high jobs through the backup",
    )
    .await;
    // Sent next, not after the 190 normal jobs still waiting: within a few sends.
    let position = backup
        .accepted()
        .iter()
        .rposition(|m| m.rcpt_to.iter().any(|to| to.starts_with("urgent-")))
        .expect("sent");
    assert!(
        position < sent_before + 5 + 5,
        "the last high job went out as send {position}, {sent_before} were sent before they came"
    );
    assert_eq!(app.relay("primary").accepted_count(), 0);
}
