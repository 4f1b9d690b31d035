//! The relay budget holds for the whole fleet: never more than `max_connections` sessions
//! and `max_messages_per_second` messages in any second, whatever the number of workers,
//! even when one dies; failover and circuit breaking when a relay is down.

use std::collections::HashSet;
use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace};
use sluice_tests::processes::{config_toml, ConfigFile, WorkerProcess};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};

const JOBS: usize = 3000;
const MAX_CONNECTIONS: usize = 4;
const MAX_RATE: usize = 200;

/// 3,000 jobs through `workers` worker processes, one of them SIGKILLed mid-run.
async fn budget_holds_with(workers: usize) {
    let ns = TestNamespace::new(&format!("budget{workers}"), &["primary"], 2).await;
    let smtp = ScriptedSmtp::start(Behaviour::accept_all()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[(
            "primary",
            smtp.port(),
            &format!("max_connections = {MAX_CONNECTIONS}\nmax_messages_per_second = {MAX_RATE}\n"),
        )],
        &["1s", "2s"],
    ));
    let ids = ns.publish_jobs("primary", "b", JOBS).await;
    let mut fleet: Vec<WorkerProcess> = (0..workers)
        .map(|_| WorkerProcess::start(&config.path, &[]))
        .collect();

    // Kill one worker once the campaign is well under way.
    assert!(
        smtp.wait_for_accepted(JOBS / 3, Duration::from_secs(60))
            .await
            >= JOBS / 3
    );
    fleet[0].kill();
    if workers == 1 {
        // A lone worker's death stops the campaign until it is rescheduled, as on Kubernetes.
        fleet.push(WorkerProcess::start(&config.path, &[]));
    }

    let unique = |smtp: &ScriptedSmtp| -> HashSet<String> {
        smtp.accepted()
            .iter()
            .flat_map(|m| m.rcpt_to.iter().cloned())
            .collect()
    };
    let all_arrived = eventually(Duration::from_secs(90), || async {
        unique(&smtp).len() >= JOBS
    })
    .await;
    assert!(
        all_arrived,
        "only {} of {JOBS} delivered",
        unique(&smtp).len()
    );

    let messages = smtp.accepted();
    let delivered = unique(&smtp);
    for id in &ids {
        assert!(
            delivered.contains(&format!("{id}@example.org")),
            "{id} never arrived"
        );
    }
    // Duplicates only from the killed worker's sessions: per session, the settled jobs whose
    // batched ack had not gone out, plus the one being sent.
    let bound = MAX_CONNECTIONS * sluice_worker::settle::MAX_REPEATED_PER_SESSION;
    assert!(
        messages.len() - JOBS <= bound,
        "{} duplicates, more than the design's {bound} (ack batch + in flight per session)",
        messages.len() - JOBS
    );
    eprintln!("{} duplicates after the kill", messages.len() - JOBS);

    assert!(
        smtp.max_concurrent_sessions() <= MAX_CONNECTIONS,
        "{} sessions at once with {workers} workers",
        smtp.max_concurrent_sessions()
    );
    let peak = smtp.max_accepted_in_any_second();
    assert!(
        peak <= MAX_RATE * 105 / 100,
        "{peak} messages in one second with {workers} workers"
    );

    if workers == 1 {
        return; // the restart gap says nothing about how well the budget is used
    }
    let first = messages.iter().map(|m| m.at).min().unwrap();
    let last = messages.iter().map(|m| m.at).max().unwrap();
    let rate = messages.len() as f64 / (last - first).as_secs_f64();
    assert!(
        rate >= MAX_RATE as f64 * 0.9,
        "throughput {rate:.0}/s is under 90% of the {MAX_RATE}/s budget with {workers} workers"
    );
    eprintln!(
        "{workers} workers: {rate:.0} msgs/s, peak {peak}/s, {} sessions max",
        smtp.max_concurrent_sessions()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_for_one_worker_killed_and_restarted() {
    budget_holds_with(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_for_three_workers_one_killed() {
    budget_holds_with(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_budget_holds_for_eight_workers_one_killed() {
    budget_holds_with(8).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_primary_fails_over_to_the_backup_and_gets_traffic_back_when_it_returns() {
    let ns = TestNamespace::new("failover", &["primary", "backup"], 1).await;
    let primary = ScriptedSmtp::start(Behaviour::refuse_connections()).await;
    let backup = ScriptedSmtp::start(Behaviour::accept_all()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[
            (
                "primary",
                primary.port(),
                "failover = \"backup\"\ndown_cooloff = \"1s\"\nmax_messages_per_second = 40\n",
            ),
            (
                "backup",
                backup.port(),
                "max_connections = 2\nmax_messages_per_second = 40\n",
            ),
        ],
        &["1s"],
    ));
    let _worker = WorkerProcess::start(&config.path, &[]);
    ns.publish_jobs("primary", "fo", 400).await;

    // Primary refuses: the backup receives everything, within its own budget.
    assert!(backup.wait_for_accepted(60, Duration::from_secs(30)).await >= 60);
    assert_eq!(primary.accepted_count(), 0);
    assert!(backup.max_concurrent_sessions() <= 2);

    // Primary comes back mid-run: traffic returns to it.
    primary.set_behaviour(Behaviour::accept_all());
    assert!(
        primary.wait_for_accepted(20, Duration::from_secs(30)).await >= 20,
        "the primary did not get traffic back"
    );
    assert!(
        eventually(Duration::from_secs(60), || async {
            primary.accepted_count() + backup.accepted_count() >= 400
        })
        .await
    );
    let all: HashSet<String> = primary
        .accepted()
        .iter()
        .chain(backup.accepted().iter())
        .flat_map(|m| m.rcpt_to.clone())
        .collect();
    assert_eq!(
        all.len(),
        400,
        "every job delivered through one relay or the other"
    );
    assert!(backup.max_accepted_in_any_second() <= 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_relay_without_failover_keeps_its_jobs_queued_until_it_returns() {
    let ns = TestNamespace::new("down", &["primary"], 1).await;
    let smtp = ScriptedSmtp::start(Behaviour::refuse_connections()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", smtp.port(), "down_cooloff = \"1s\"\n")],
        &["1s"],
    ));
    let mut events = ns.events().await;
    let _workers = [
        WorkerProcess::start(&config.path, &[]),
        WorkerProcess::start(&config.path, &[]),
    ];
    ns.publish_jobs("primary", "wait", 50).await;

    // A few probes, no job pushed through the retry ladder: the queue waits intact.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let jobs_queue = ns.topology.jobs_queue("primary");
    assert_eq!(ns.queue_len(&jobs_queue).await, 50);
    assert_eq!(
        ns.queue_len(&ns.topology.retry_queue("primary", 1)).await,
        0
    );
    let probes = smtp.sessions_total();
    assert!(probes >= 2, "the relay was never probed");
    assert!(
        probes <= 40,
        "{probes} connection attempts in 4 s is not backing off"
    );
    events
        .wait_until(Duration::from_millis(200), |_| false)
        .await;
    assert!(
        events.seen.is_empty(),
        "jobs were deferred: {:?}",
        events.seen
    );

    smtp.set_behaviour(Behaviour::accept_all());
    assert_eq!(
        smtp.wait_for_accepted(50, Duration::from_secs(30)).await,
        50
    );
    assert_eq!(ns.queue_len(&jobs_queue).await, 0);
}
