//! Every job ends known and none is lost: a relay flapping while another takes its jobs,
//! a relay that refuses the account rather than the recipient, bounces kept for replay.

use std::collections::HashSet;
use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace};
use sluice_tests::processes::{config_toml, run_producer, ConfigFile, WorkerProcess};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};

/// Recipients a relay accepted, each once.
fn recipients(smtp: &ScriptedSmtp) -> HashSet<String> {
    smtp.accepted()
        .iter()
        .flat_map(|m| m.rcpt_to.iter().cloned())
        .collect()
}

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
    let ns = TestNamespace::new("flap", &["primary", "backup"], 2).await;
    // 20 ms per message: both queues stay busy while the primary flaps.
    let slow = || Behaviour::accept_all().with_accept_delay(Duration::from_millis(20));
    let primary = ScriptedSmtp::start(slow()).await;
    let backup = ScriptedSmtp::start(slow()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[
            (
                "primary",
                primary.port(),
                "max_connections = 4\nmax_messages_per_connection = 20\nfailover = \"backup\"\ndown_cooloff = \"1s\"\n",
            ),
            ("backup", backup.port(), "max_connections = 4\n"),
        ],
        &["1s", "1s", "1s"],
    ));
    let mut ids = ns.publish_jobs("primary", "p", EACH).await;
    ids.extend(ns.publish_jobs("backup", "b", EACH).await);
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start_logged(&config.path, &[]))
        .collect();

    // The primary goes down and comes back four times while both queues are busy: the
    // backup's lanes take the primary's queue beside their own, then give it back.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        primary.set_behaviour(Behaviour::refuse_connections());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        primary.set_behaviour(slow());
    }

    let delivered = || {
        let mut all = recipients(&primary);
        all.extend(recipients(&backup));
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
    for worker in &workers {
        assert_no_channel_errors(worker);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_the_account_bounces_nothing_and_keeps_the_campaign() {
    const JOBS: usize = 200;
    let ns = TestNamespace::new("suspended", &["primary"], 2).await;
    let mut events = ns.events().await;
    let smtp = ScriptedSmtp::start(Behaviour::refuse_mail("554 5.7.1 Account suspended")).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", smtp.port(), "down_cooloff = \"1s\"\n")],
        &["1s", "1s"],
    ));
    let ids = ns.publish_jobs("primary", "s", JOBS).await;
    let worker = WorkerProcess::start_logged(&config.path, &[]);

    // The relay refuses every transaction at MAIL FROM for a while: the worker probes it
    // after each cool-off, and every refused job goes back untouched.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(smtp.accepted_count(), 0);
    events.wait_until(Duration::from_secs(1), |_| false).await;
    let bounced = events
        .seen
        .iter()
        .filter(|e| e.outcome.as_str() == "bounced")
        .count();
    assert_eq!(bounced, 0, "a refused account bounced jobs");
    assert_eq!(
        ns.queue_len(&ns.topology.dead_queue("primary")).await,
        0,
        "a refused account set jobs aside"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            ns.queue_len(&ns.topology.jobs_queue("primary")).await == JOBS as u32
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
    let got = recipients(&smtp);
    for id in &ids {
        assert!(got.contains(&format!("{id}@example.org")), "{id} missing");
    }
    assert_no_channel_errors(&worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_the_account_hands_the_campaign_to_its_failover() {
    const JOBS: usize = 200;
    let ns = TestNamespace::new("suspfail", &["primary", "backup"], 2).await;
    let primary = ScriptedSmtp::start(Behaviour::refuse_mail("550 5.7.1 Relaying denied")).await;
    let backup = ScriptedSmtp::start(Behaviour::accept_all()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[
            (
                "primary",
                primary.port(),
                "failover = \"backup\"\ndown_cooloff = \"30s\"\n",
            ),
            ("backup", backup.port(), ""),
        ],
        &["1s", "1s"],
    ));
    let ids = ns.publish_jobs("primary", "f", JOBS).await;
    let _worker = WorkerProcess::start(&config.path, &[]);

    assert_eq!(
        backup
            .wait_for_accepted(JOBS, Duration::from_secs(30))
            .await,
        JOBS,
        "the failover relay did not take the campaign"
    );
    assert_eq!(primary.accepted_count(), 0);
    let got = recipients(&backup);
    for id in &ids {
        assert!(got.contains(&format!("{id}@example.org")), "{id} missing");
    }
    assert_eq!(ns.queue_len(&ns.topology.dead_queue("primary")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_refusal_for_several_recipients_in_a_row_marks_the_relay_down() {
    const JOBS: usize = 40;
    const STREAK: usize = 3;
    let ns = TestNamespace::new("streak", &["primary"], 2).await;
    let mut events = ns.events().await;
    let smtp = ScriptedSmtp::start(Behaviour::every_rcpt(
        "550 5.4.1 Recipient address rejected: Access denied",
    ))
    .await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[(
            "primary",
            smtp.port(),
            &format!(
                "max_connections = 1\ndown_cooloff = \"30s\"\nrefusals_before_down = {STREAK}\n"
            ),
        )],
        &["1s", "1s"],
    ));
    ns.publish_jobs("primary", "r", JOBS).await;
    let _worker = WorkerProcess::start(&config.path, &[]);

    // The first STREAK recipients bounce; then the relay is down and the rest wait.
    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| seen.len() >= STREAK)
            .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    events
        .wait_until(Duration::from_millis(500), |_| false)
        .await;
    let bounced = events
        .seen
        .iter()
        .filter(|e| e.outcome.as_str() == "bounced")
        .count();
    assert_eq!(bounced, STREAK, "events: {:?}", events.seen);
    assert_eq!(
        ns.queue_len(&ns.topology.jobs_queue("primary")).await,
        (JOBS - STREAK) as u32,
        "the rest of the campaign is not kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounced_job_is_kept_in_the_dead_queue_for_replay() {
    let ns = TestNamespace::new("bouncekeep", &["primary"], 2).await;
    // The relay refuses k-1 once, wrongly: its next answer is yes.
    let smtp = ScriptedSmtp::start(Behaviour::rcpt_script(
        "k-1@example.org",
        &["550 5.1.1 no such user", "250 2.1.5 ok"],
    ))
    .await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", smtp.port(), "")],
        &["1s", "1s"],
    ));
    ns.publish_jobs("primary", "k", 3).await;
    let _worker = WorkerProcess::start(&config.path, &[]);

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
    assert!(recipients(&smtp).contains("k-1@example.org"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            ns.queue_len(&dead).await == 0
        })
        .await
    );
}
