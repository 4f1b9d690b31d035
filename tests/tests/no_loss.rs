//! Every job ends known and none is lost: a relay flapping while another takes its jobs,
//! a relay that refuses the account rather than the recipient, bounces kept for replay.

use std::time::Duration;

use sluice_tests::app::TestApp;
use sluice_tests::processes::{run_producer, WorkerProcess};
use sluice_tests::scripted_smtp::Behaviour;
use sluice_tests::wait::{eventually, holds_throughout};

/// Recipients a relay accepted, each once.
/// What a worker must never log: the broker closing a channel over a bad ack, or a lane
/// failing on a channel error.
fn assert_no_channel_errors(worker: &WorkerProcess) {
    let logs = worker.logs();
    for bad in [
        "unknown delivery tag",
        "PRECONDITION_FAILED",
        "a lane failed",
    ] {
        assert!(!logs.contains(bad), "worker logged {bad:?}:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_under_load_delivers_every_job_of_both_queues() {
    const EACH: usize = 3000;
    // 20 ms per message: both queues stay busy while the primary flaps.
    let slow = || Behaviour::accept_all().with_accept_delay(Duration::from_millis(20));
    let mut app = TestApp::builder("flap")
        .relay(
            "primary",
            slow(),
            "max_connections = 4\nmax_messages_per_connection = 20\nfailover = \"backup\"\ndown_cooloff = \"1s\"\n",
        )
        .relay("backup", slow(), "max_connections = 4\n")
        .retries(&["1s", "1s", "1s"])
        .workers(0)
        .logged()
        .start()
        .await;
    let (primary, backup) = (app.relay("primary"), app.relay("backup"));
    let mut ids = app.ns.publish_jobs("primary", "p", EACH).await;
    ids.extend(app.ns.publish_jobs("backup", "b", EACH).await);
    app.start_workers(2);
    let ns = &app.ns;

    // The primary goes down and comes back four times while both queues are busy: the
    // backup's lanes take the primary's queue beside their own, then give it back.
    // The sleeps are the scenario (up 1.5 s, down 2.5 s), not waits for a condition.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        primary.set_behaviour(Behaviour::refuse_connections());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        primary.set_behaviour(slow());
    }

    let delivered = || {
        let mut all = primary.recipients();
        all.extend(backup.recipients());
        all
    };
    let all_arrived = eventually(Duration::from_secs(120), || async {
        delivered().len() >= 2 * EACH
    })
    .await;
    let got = delivered();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !got.contains(&format!("{id}@example.org")))
        .collect();
    assert!(
        all_arrived && missing.is_empty(),
        "{} of {} jobs never delivered (e.g. {:?})",
        missing.len(),
        2 * EACH,
        &missing[..missing.len().min(5)]
    );
    for relay in ["primary", "backup"] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                ns.queue_len(&ns.topology.jobs_queue(relay)).await == 0
            })
            .await,
            "{relay}'s jobs queue is not empty"
        );
        assert_eq!(
            ns.queue_len(&ns.topology.dead_queue(relay)).await,
            0,
            "something died on {relay}"
        );
    }
    for worker in &app.workers {
        assert_no_channel_errors(worker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_the_account_bounces_nothing_and_keeps_the_campaign() {
    const JOBS: usize = 200;
    let mut app = TestApp::builder("suspended")
        .relay(
            "primary",
            Behaviour::refuse_mail("554 5.7.1 Account suspended"),
            "down_cooloff = \"1s\"\n",
        )
        .retries(&["1s", "1s"])
        .workers(0)
        .logged()
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    let ids = app.ns.publish_jobs("primary", "s", JOBS).await;
    app.start_worker();

    // The relay refuses every transaction at MAIL FROM for a while: the worker probes it
    // after each cool-off, and every refused job goes back untouched.
    holds_throughout(
        || async { smtp.accepted_count() == 0 && app.dead_len("primary").await == 0 },
        Duration::from_secs(4),
        "nothing accepted and nothing set aside through four 1 s cool-offs",
    )
    .await;
    let bounced = |seen: &[sluice_shared::events::DeliveryEvent]| {
        seen.iter()
            .filter(|e| e.outcome.as_str() == "bounced")
            .count()
    };
    events
        .holds_throughout(
            |seen| bounced(seen) == 0,
            Duration::from_secs(1),
            "no bounce among the events of four cool-offs, read for 1 s",
        )
        .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.jobs_len("primary").await == JOBS as u32
        })
        .await,
        "the campaign is not kept whole in the jobs queue"
    );

    // The account is reinstated: everything goes, once each.
    smtp.set_behaviour(Behaviour::accept_all());
    assert_eq!(
        smtp.wait_for_accepted(JOBS, Duration::from_secs(30)).await,
        JOBS
    );
    let got = smtp.recipients();
    for id in &ids {
        assert!(got.contains(&format!("{id}@example.org")), "{id} missing");
    }
    assert_no_channel_errors(&app.workers[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_the_account_hands_the_campaign_to_its_failover() {
    const JOBS: usize = 200;
    let mut app = TestApp::builder("suspfail")
        .relay(
            "primary",
            Behaviour::refuse_mail("550 5.7.1 Relaying denied"),
            "failover = \"backup\"\ndown_cooloff = \"30s\"\n",
        )
        .relay("backup", Behaviour::accept_all(), "")
        .retries(&["1s", "1s"])
        .workers(0)
        .start()
        .await;
    let (primary, backup) = (app.relay("primary"), app.relay("backup"));
    let ids = app.ns.publish_jobs("primary", "f", JOBS).await;
    app.start_worker();

    assert_eq!(
        backup
            .wait_for_accepted(JOBS, Duration::from_secs(30))
            .await,
        JOBS,
        "the failover relay did not take the campaign"
    );
    assert_eq!(primary.accepted_count(), 0);
    let got = backup.recipients();
    for id in &ids {
        assert!(got.contains(&format!("{id}@example.org")), "{id} missing");
    }
    assert_eq!(app.dead_len("primary").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_refusal_for_several_recipients_in_a_row_marks_the_relay_down() {
    const JOBS: usize = 40;
    const STREAK: usize = 3;
    let mut app = TestApp::builder("streak")
        .relay(
            "primary",
            Behaviour::every_rcpt("550 5.4.1 Recipient address rejected: Access denied"),
            &format!(
                "max_connections = 1\ndown_cooloff = \"30s\"\nrefusals_before_down = {STREAK}\n"
            ),
        )
        .retries(&["1s", "1s"])
        .workers(0)
        .start()
        .await;
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "r", JOBS).await;
    app.start_worker();

    // The first STREAK recipients bounce; then the relay is down and the rest wait.
    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| seen.len() >= STREAK)
            .await
    );
    events
        .holds_throughout(
            |seen| seen.len() == STREAK,
            Duration::from_millis(2500),
            "no event past the streak for 2.5 s, with the relay down for 30 s",
        )
        .await;
    let bounced = events
        .seen
        .iter()
        .filter(|e| e.outcome.as_str() == "bounced")
        .count();
    assert_eq!(bounced, STREAK, "events: {:?}", events.seen);
    assert_eq!(
        app.jobs_len("primary").await,
        (JOBS - STREAK) as u32,
        "the rest of the campaign is not kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounced_job_is_kept_in_the_dead_queue_for_replay() {
    // The relay refuses k-1 once, wrongly: its next answer is yes.
    let mut app = TestApp::builder("bouncekeep")
        .relay(
            "primary",
            Behaviour::rcpt_script(
                "k-1@example.org",
                &["550 5.1.1 no such user", "250 2.1.5 ok"],
            ),
            "",
        )
        .retries(&["1s", "1s"])
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "k", 3).await;
    app.start_worker();
    let (ns, config) = (&app.ns, &app.config);

    assert_eq!(smtp.wait_for_accepted(2, Duration::from_secs(20)).await, 2);
    let dead = ns.topology.dead_queue("primary");
    assert!(
        eventually(Duration::from_secs(10), || async {
            ns.queue_len(&dead).await == 1
        })
        .await,
        "the bounced job is not in the dead queue"
    );
    let listed = run_producer(&config.path, &["dead", "list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("k-1"), "{text}");
    assert!(text.contains("bounced"), "{text}");
    assert!(text.contains("5.1.1"), "{text}");

    // After a look, the operator sends the bounces again.
    let replayed = run_producer(&config.path, &["dead", "replay", "--reason", "bounced"]);
    assert!(replayed.status.success(), "{replayed:?}");
    assert_eq!(smtp.wait_for_accepted(3, Duration::from_secs(20)).await, 3);
    assert!(smtp.recipients().contains("k-1@example.org"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            ns.queue_len(&dead).await == 0
        })
        .await
    );
}
