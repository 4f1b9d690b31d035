//! Faults and hostile input: every job still ends delivered, bounced or dead, once (or,
//! when a relay's answer is lost, twice rather than never: duplicates over loss).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sluice_shared::events::EventOutcome;
use sluice_tests::app::TestApp;
use sluice_tests::broker::{eventually, job_json, EventTap, TestNamespace};
use sluice_tests::busy_cores::BusyCores;
use sluice_tests::processes::{config_toml, ConfigFile, WorkerProcess};
use sluice_tests::scripted_smtp::{Behaviour, Phase, ScriptedSmtp};
use sluice_tests::smtp_sink::SmtpSink;

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_mid_data_defers_the_job_which_is_delivered_later() {
    let app = TestApp::builder("drop")
        .relay("primary", Behaviour::drop_mid_data(), "max_connections = 2")
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    ns.publish_jobs("primary", "dropped", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await
    );
    assert_eq!(events.seen[0].outcome, EventOutcome::Deferred);
    assert_eq!(events.seen[0].smtp_code, None);
    smtp.set_behaviour(Behaviour::accept_all());

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await
    );
    assert_eq!(events.seen.last().unwrap().outcome, EventOutcome::Delivered);
    assert_eq!(smtp.accepted_count(), 1);
    assert!(smtp.max_concurrent_sessions() <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_stalling_past_the_data_timeout_after_the_final_dot_defers_the_job() {
    let app = TestApp::builder("stall")
        .relay(
            "primary",
            Behaviour::stall_at(Phase::EndOfData, Duration::from_secs(30)),
            "max_connections = 2\ncommand_timeout = \"500ms\"\ndata_timeout = \"1s\"",
        )
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    ns.publish_jobs("primary", "stalled", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await
    );
    assert_eq!(events.seen[0].outcome, EventOutcome::Deferred);
    smtp.set_behaviour(Behaviour::accept_all());
    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await
    );
    assert_eq!(events.seen.last().unwrap().outcome, EventOutcome::Delivered);
    assert_eq!(smtp.accepted_count(), 1);
    assert!(smtp.max_concurrent_sessions() <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_closes_before_its_reply_counts_as_deferred_not_delivered() {
    let app = TestApp::builder("noreply")
        .relay("primary", Behaviour::accept_then_close(), "")
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    ns.publish_jobs("primary", "unanswered", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Deferred,
        "no reply is no delivery"
    );
    assert_eq!(smtp.accepted_but_unanswered().len(), 1);
    smtp.set_behaviour(Behaviour::accept_all());
    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await
    );
    // At least once: the relay has it twice, with the same Message-ID.
    let first = String::from_utf8_lossy(&smtp.accepted_but_unanswered()[0].data).into_owned();
    let second = String::from_utf8_lossy(&smtp.accepted()[0].data).into_owned();
    assert_eq!(message_id(&first), message_id(&second));
    assert_eq!(
        message_id(&first).as_deref(),
        Some("<unanswered-0@example.com>")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_campaign_leaves_every_job_ended_and_duplicates_recognisable() {
    const MAX_CONNECTIONS: usize = 4;
    let mut app = TestApp::builder("sigkill")
        .relay(
            "primary",
            Behaviour::accept_all().with_accept_delay(Duration::from_millis(5)),
            &format!("max_connections = {MAX_CONNECTIONS}"),
        )
        .retries(&["1s", "1s"])
        .workers(0)
        .start()
        .await;
    let mut events = app.ns.events().await;
    let ids = app.ns.publish_jobs("primary", "k", 600).await;
    app.start_workers(2);
    let smtp = app.relay("primary");

    assert!(smtp.wait_for_accepted(150, Duration::from_secs(30)).await >= 150);
    app.workers[0].kill();

    assert!(
        all_ended(&mut events, &ids, Duration::from_secs(60)).await,
        "not every job ended after the SIGKILL"
    );
    let per_id = sends_per_message_id(&smtp);
    assert_eq!(per_id.len(), 600, "every job delivered");
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    // The design's bound: per open session of the killed worker, the settled jobs whose
    // batched ack had not gone out, plus the one being sent.
    let bound = MAX_CONNECTIONS * sluice_worker::settle::MAX_REPEATED_PER_SESSION;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates: more than {MAX_CONNECTIONS} sessions x {} (ack batch + in flight)",
        sluice_worker::settle::MAX_REPEATED_PER_SESSION
    );
}

/// A graceful stop (SIGTERM) finishes what is in flight and acks it: unlike a SIGKILL, it
/// leaves nothing to be sent again. Stopped three times mid-campaign while every core is
/// busy (a slow broker is when a quorum queue forgets acks sent just before their channel
/// closes), the fleet still sends each of the 3,000 jobs once.
#[tokio::test(flavor = "multi_thread")]
async fn workers_stopped_mid_campaign_send_no_job_twice() {
    const JOBS: usize = 3000;
    let mut app = TestApp::builder("sigterm")
        .relay(
            "primary",
            Behaviour::accept_all().with_accept_delay(Duration::from_millis(5)),
            "max_connections = 4",
        )
        .retries(&["1s", "1s"])
        .workers(0)
        .start()
        .await;
    let mut events = app.ns.events().await;
    let ids = app.ns.publish_jobs("primary", "t", JOBS).await;
    let smtp = app.relay("primary");
    for (stop, accepted) in [(0, 500), (1, 1200), (2, 1900)] {
        app.start_worker();
        assert!(
            smtp.wait_for_accepted(accepted, Duration::from_secs(60))
                .await
                >= accepted
        );
        let busy = BusyCores::start();
        let status = tokio::task::block_in_place(|| app.workers[stop].terminate());
        drop(busy);
        assert!(status.success(), "worker {stop} exited with {status}");
    }
    app.start_worker();

    assert!(
        all_ended(&mut events, &ids, Duration::from_secs(90)).await,
        "not every job ended"
    );
    let per_id = sends_per_message_id(&smtp);
    assert_eq!(per_id.len(), JOBS, "every job delivered");
    let twice: Vec<&String> = per_id
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        twice.is_empty(),
        "{} jobs sent more than once after graceful stops: {twice:?}",
        twice.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_malformed_jobs_among_ten_thousand_good_ones() {
    let ns = TestNamespace::new("hostile", &["primary"], 1).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&format!(
        "{}\n[worker]\nmax_message_bytes = 4096\n",
        config_toml(
            &ns.name,
            &[("primary", sink.port, "max_connections = 8")],
            &["1s"]
        )
    ));
    let kinds: [(&str, MakeBody); 8] = [
        (
            "toolarge",
            Box::new(|id| {
                job_json(id, "a@example.org")
                    .replace(
                        "\"text\":",
                        &format!("\"html\":\"{}\",\"text\":", "x".repeat(5000)),
                    )
                    .into_bytes()
            }),
        ),
        ("notutf8", Box::new(|_| b"{\"id\":\"\xff\xfe\"}".to_vec())),
        (
            "crlfsubject",
            Box::new(|id| {
                job_json(id, "a@example.org")
                    .replace("Hello", "Hello\\r\\nBcc: victim@example.com")
                    .into_bytes()
            }),
        ),
        (
            "crlfheader",
            Box::new(|id| {
                job_json(id, "a@example.org")
                    .replace(
                        "\"text\":",
                        "\"headers\":{\"X-A\":\"1\\nBcc: victim@example.com\"},\"text\":",
                    )
                    .into_bytes()
            }),
        ),
        (
            "badaddress",
            Box::new(|id| job_json(id, "not-an-address@").into_bytes()),
        ),
        (
            "unknownfield",
            Box::new(|id| {
                job_json(id, "a@example.org")
                    .replace("\"text\":", "\"priority\":1,\"text\":")
                    .into_bytes()
            }),
        ),
        ("notjson", Box::new(|_| b"<xml/>".to_vec())),
        (
            "missingto",
            Box::new(|id| {
                serde_json::json!({"id": id, "from": "a@example.com", "subject": "s", "text": "t"})
                    .to_string()
                    .into_bytes()
            }),
        ),
    ];
    let mut bodies = Vec::with_capacity(20_000);
    for i in 0..10_000 {
        let good = format!("good-{i}");
        bodies.push((
            good.clone(),
            job_json(&good, &format!("good-{i}@example.org")).into_bytes(),
        ));
        let (kind, make) = &kinds[i % kinds.len()];
        let bad = format!("bad-{kind}-{i}");
        bodies.push((bad.clone(), make(&bad)));
    }
    ns.publish_bodies("primary", &bodies).await;
    // 10,000 "invalid job set aside" warnings would drown the test log: errors only.
    let mut worker = WorkerProcess::start_with_env(&config.path, &[], &[("RUST_LOG", "error")]);

    let dead_queue = ns.topology.dead_queue("primary");
    assert!(
        eventually(Duration::from_secs(240), || async {
            sink.count() >= 10_000 && ns.queue_len(&dead_queue).await >= 10_000
        })
        .await,
        "{} good delivered, {} bad dead",
        sink.count(),
        ns.queue_len(&dead_queue).await
    );
    assert!(
        worker.child.try_wait().expect("worker status").is_none(),
        "the worker died"
    );
    assert_eq!(sink.count(), 10_000, "exactly the good ones were sent");
    assert_eq!(ns.queue_len(&dead_queue).await, 10_000);
    assert!(
        sink.messages().iter().all(|m| !m.contains("victim")),
        "an injected header was sent"
    );
    let dead = ns.drain(&dead_queue).await;
    let dead_ids: HashSet<String> = dead
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(dead_ids.len(), 10_000);
    assert!(dead_ids.iter().all(|id| id.starts_with("bad-")));
    worker.terminate();
}

/// Builds a malformed job body from its id.
type MakeBody = Box<dyn Fn(&str) -> Vec<u8>>;

/// Wait until every one of `ids` has a final event.
async fn all_ended(events: &mut EventTap, ids: &[String], within: Duration) -> bool {
    let expected: HashSet<&String> = ids.iter().collect();
    events
        .wait_until(within, |seen| {
            let ended: HashSet<&String> = seen
                .iter()
                .filter(|e| e.outcome.is_final())
                .map(|e| &e.id)
                .collect();
            ended.is_superset(&expected)
        })
        .await
}

/// How many times the relay accepted each message, by its `Message-ID` (one per job).
fn sends_per_message_id(smtp: &ScriptedSmtp) -> HashMap<String, usize> {
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for message in smtp.accepted() {
        let text = String::from_utf8_lossy(&message.data).into_owned();
        *per_id
            .entry(message_id(&text).expect("Message-ID"))
            .or_default() += 1;
    }
    per_id
}

fn message_id(raw: &str) -> Option<String> {
    sluice_tests::smtp_sink::header_value(raw, "Message-ID")
}
