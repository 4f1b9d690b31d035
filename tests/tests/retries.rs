//! Retries, dead letters and delivery outcomes: every job ends somewhere known, kept by
//! RabbitMQ rather than by a worker's memory. Faults come from our scripted SMTP server.

use std::collections::HashMap;
use std::time::Duration;

use sluice_shared::events::{DeliveryEvent, EventOutcome};
use sluice_shared::headers;
use sluice_tests::app::TestApp;
use sluice_tests::processes::run_producer;
use sluice_tests::scripted_smtp::Behaviour;
use sluice_tests::wait::{eventually, holds_throughout};

/// One final event per job, and the count of each outcome.
fn final_outcomes(events: &[DeliveryEvent]) -> HashMap<String, EventOutcome> {
    let mut finals = HashMap::new();
    for event in events.iter().filter(|e| e.outcome.is_final()) {
        let previous = finals.insert(event.id.clone(), event.outcome);
        assert!(previous.is_none(), "job {} has two final events", event.id);
    }
    finals
}

#[tokio::test(flavor = "multi_thread")]
async fn tempfailed_twice_then_delivered_once() {
    let app = TestApp::builder("tempfail")
        .relay(
            "primary",
            Behaviour::rcpt_script(
                "grey-0@example.org",
                &[
                    "451 4.7.1 greylisted",
                    "451 4.7.1 greylisted",
                    "250 2.1.5 ok",
                ],
            ),
            "",
        )
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    ns.publish_jobs("primary", "grey", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await
    );
    assert_eq!(smtp.accepted_count(), 1);
    assert_eq!(smtp.rcpt_attempts("grey-0@example.org"), 3);
    let outcomes: Vec<(EventOutcome, u32)> =
        events.seen.iter().map(|e| (e.outcome, e.attempt)).collect();
    assert_eq!(
        outcomes,
        [
            (EventOutcome::Deferred, 1),
            (EventOutcome::Deferred, 2),
            (EventOutcome::Delivered, 3)
        ]
    );
    assert_eq!(events.seen[0].smtp_code, Some(451));
    // Nothing arrives twice, nothing waits anywhere.
    holds_throughout(
        || async {
            smtp.accepted_count() == 1
                && app.retry_len("primary", 1).await == 0
                && app.retry_len("primary", 2).await == 0
        },
        Duration::from_secs(3),
        "one message and empty retry steps for 3 s, past a 1 s retry step and a redelivery",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_550_bounces_once_and_is_never_retried() {
    let app = TestApp::builder("bounce")
        .relay(
            "primary",
            Behaviour::every_rcpt("550 5.1.1 no such user"),
            "",
        )
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    ns.publish_jobs("primary", "gone", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await
    );
    events
        .holds_throughout(
            |seen| seen.len() == 1,
            Duration::from_secs(3),
            "a single event for 3 s, past the whole ladder (1 s + 1 s): a retry would be a second attempt",
        )
        .await;
    let event = &events.seen[0];
    assert_eq!(event.outcome, EventOutcome::Bounced);
    assert_eq!(event.smtp_code, Some(550));
    assert_eq!(event.campaign, "test");
    assert!(event
        .smtp_reply
        .as_deref()
        .unwrap_or("")
        .contains("no such user"));
    assert_eq!(smtp.rcpt_attempts("gone-0@example.org"), 1);
    // Kept for a replay after a misclassification, marked as a bounce.
    let kept = ns.drain(&ns.topology.dead_queue("primary")).await;
    assert_eq!(kept.len(), 1);
    let headers = kept[0].properties.headers().as_ref();
    assert_eq!(
        sluice_shared::headers::get_str(headers, sluice_shared::headers::REASON).as_deref(),
        Some("bounced")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_tempfailing_for_the_whole_ladder_kills_every_job_and_replay_delivers_them() {
    let app = TestApp::builder("ladder")
        .relay("primary", Behaviour::every_rcpt("451 4.3.0 try later"), "")
        .retries(&["1s", "2s"])
        .start()
        .await;
    let (ns, smtp, config) = (&app.ns, app.relay("primary"), &app.config);
    let mut events = ns.events().await;

    let ids = ns.publish_jobs("primary", "doomed", 20).await;

    let dead_queue = ns.topology.dead_queue("primary");
    assert!(
        eventually(Duration::from_secs(60), || async {
            ns.queue_len(&dead_queue).await == 20
        })
        .await,
        "only {} of 20 jobs reached the dead queue",
        ns.queue_len(&dead_queue).await
    );
    assert_eq!(smtp.accepted_count(), 0);
    for id in &ids {
        assert_eq!(
            smtp.rcpt_attempts(&format!("{id}@example.org")),
            3,
            "{id}: 2 delays = 3 attempts"
        );
    }

    // The dead queue says why, without removing anything.
    let listed = run_producer(&config.path, &["dead", "list", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 20);
    for line in &lines {
        assert_eq!(line["reason"], "retries exhausted");
        assert_eq!(line["smtp_code"], 451);
        assert_eq!(line["attempts"], 3);
        assert_eq!(line["relay"], "primary");
    }
    assert_eq!(ns.queue_len(&dead_queue).await, 20);

    // Once the relay accepts again, a replay delivers every one of them.
    smtp.set_behaviour(Behaviour::accept_all());
    let replayed = run_producer(&config.path, &["dead", "replay"]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert_eq!(
        smtp.wait_for_accepted(20, Duration::from_secs(30)).await,
        20
    );
    assert_eq!(ns.queue_len(&dead_queue).await, 0);

    assert!(
        events
            .wait_until(Duration::from_secs(10), |seen| seen
                .iter()
                .filter(|e| e.outcome == EventOutcome::Delivered)
                .count()
                == 20)
            .await
    );
    let dead_events = events
        .seen
        .iter()
        .filter(|e| e.outcome == EventOutcome::Dead)
        .count();
    assert_eq!(dead_events, 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_jobs_carry_headers_that_say_why() {
    let app = TestApp::builder("why")
        .relay(
            "primary",
            Behaviour::every_rcpt("452 4.2.2 mailbox full"),
            "",
        )
        .retries(&["1s"])
        .start()
        .await;
    let ns = &app.ns;

    ns.publish_jobs("primary", "full", 1).await;
    let dead_queue = ns.topology.dead_queue("primary");
    assert!(
        eventually(Duration::from_secs(30), || async {
            ns.queue_len(&dead_queue).await == 1
        })
        .await
    );
    let dead = ns.drain(&dead_queue).await;
    let h = dead[0].delivery.properties.headers().as_ref();
    assert_eq!(
        headers::get_str(h, headers::REASON).as_deref(),
        Some("retries exhausted")
    );
    assert_eq!(headers::get_int(h, headers::SMTP_CODE), Some(452));
    assert!(headers::get_str(h, headers::SMTP_REPLY)
        .unwrap()
        .contains("mailbox full"));
    assert_eq!(headers::get_int(h, headers::ATTEMPTS), Some(2));
    let first = headers::get_str(h, headers::FIRST_ATTEMPT).expect("first attempt");
    let last = headers::get_str(h, headers::LAST_ATTEMPT).expect("last attempt");
    assert!(first < last, "{first} should come before {last}");
    let body: serde_json::Value = serde_json::from_slice(&dead[0].delivery.data).unwrap();
    assert_eq!(body["id"], "full-0", "the dead copy keeps the original job");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_named_by_the_relay_picks_a_long_enough_retry_step() {
    let app = TestApp::builder("hint")
        .relay(
            "primary",
            Behaviour::every_rcpt("451 4.7.1 try again in 20 seconds"),
            "",
        )
        .retries(&["1s", "30s", "60s"])
        .start()
        .await;
    let ns = &app.ns;
    let mut events = ns.events().await;

    ns.publish_jobs("primary", "hinted", 1).await;
    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await
    );
    // Step 1 (1 s) is too short for "20 seconds": the job waits in step 2 (30 s).
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.retry_len("primary", 2).await == 1
        })
        .await
    );
    assert_eq!(app.retry_len("primary", 1).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_job_ends_exactly_once_whatever_happens() {
    let app = TestApp::builder("ledger")
        .relay(
            "primary",
            Behaviour::accept_all()
                .with_rcpt_script("mix-1@example.org", &["550 5.1.1 unknown"])
                .with_rcpt_script("mix-2@example.org", &["451 later", "250 ok"])
                .with_rcpt_script("mix-3@example.org", &["451 later"])
                .with_rcpt_script("mix-4@example.org", &["421 4.3.2 closing"]),
            "",
        )
        .retries(&["1s", "1s"])
        .workers(2)
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    let mut published = ns.publish_jobs("primary", "mix", 30).await;
    ns.publish_raw("primary", "mix-invalid", b"[1, 2, 3]").await;
    published.push("mix-invalid".into());

    assert!(
        events
            .wait_until(Duration::from_secs(60), |seen| final_outcomes(seen).len()
                == published.len())
            .await,
        "not every job ended: {:?}",
        final_outcomes(&events.seen)
    );
    events
        .holds_throughout(
            |seen| final_outcomes(seen).len() == published.len(),
            Duration::from_secs(3),
            "no second final event for 3 s, past the whole ladder (1 s + 1 s)",
        )
        .await;
    let finals = final_outcomes(&events.seen);
    let mut ids: Vec<&String> = finals.keys().collect();
    ids.sort();
    let mut expected: Vec<&String> = published.iter().collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "delivered + bounced + dead = published, per job id"
    );
    assert_eq!(finals["mix-1"], EventOutcome::Bounced);
    assert_eq!(finals["mix-2"], EventOutcome::Delivered);
    assert_eq!(finals["mix-3"], EventOutcome::Dead);
    assert_eq!(finals["mix-4"], EventOutcome::Dead);
    assert_eq!(finals["mix-invalid"], EventOutcome::Dead);
    let delivered = finals
        .values()
        .filter(|o| **o == EventOutcome::Delivered)
        .count();
    assert_eq!(delivered, 27);
    assert_eq!(smtp.accepted_count(), 27, "each delivered job arrived once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_recipient_does_not_cost_the_session() {
    // The scripted server offers PIPELINING, so this is the worker's own transaction:
    // after the 550 it must reset (RSET) and carry on in the same session.
    let app = TestApp::builder("rset")
        .relay(
            "primary",
            Behaviour::accept_all().with_rcpt_script("keep-1@example.org", &["550 5.1.1 unknown"]),
            "max_connections = 1",
        )
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    ns.publish_jobs("primary", "keep", 5).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| {
                seen.iter().filter(|e| e.outcome.is_final()).count() == 5
            })
            .await,
        "not every job ended: {:?}",
        events.seen
    );
    let finals = final_outcomes(&events.seen);
    assert_eq!(finals["keep-1"], EventOutcome::Bounced);
    for id in ["keep-0", "keep-2", "keep-3", "keep-4"] {
        assert_eq!(finals[id], EventOutcome::Delivered, "{id}");
    }
    assert_eq!(smtp.accepted_count(), 4);
    assert_eq!(smtp.sessions_total(), 1, "the refusal closed the session");
}
