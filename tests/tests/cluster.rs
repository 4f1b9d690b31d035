//! A real three-node RabbitMQ cluster loses the node that leads the jobs queue in the middle
//! of a campaign: the producer finishes publishing, the workers move to other nodes, every
//! job is delivered (the retried ones too), and the relay budget holds throughout.

use std::collections::HashMap;
use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace};
use sluice_tests::processes::{config_toml_at, run_producer, ConfigFile, WorkerProcess};
use sluice_tests::rabbit_node::RabbitCluster;
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};

const ROWS: usize = 6000;
const MAX_CONNECTIONS: usize = 4;
/// Every 100th recipient is greylisted once: it waits in a retry step when the node dies.
const GREYLISTED_EVERY: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a 3-node cluster: deploy/test.sh runs it on its own after the main suite"]
async fn a_campaign_survives_the_loss_of_the_node_leading_its_jobs_queue() {
    let mut cluster = tokio::task::spawn_blocking(|| RabbitCluster::start("loss", 3))
        .await
        .expect("start a 3-node cluster");
    let name = TestNamespace::fresh_name("loss");
    let mut behaviour = Behaviour::accept_all().with_accept_delay(Duration::from_millis(2));
    for i in (0..ROWS).step_by(GREYLISTED_EVERY) {
        behaviour = behaviour.with_rcpt_script(
            &format!("r{i}@example.org"),
            &["451 4.7.1 greylisted, try again later", "250 2.1.5 ok"],
        );
    }
    let smtp = ScriptedSmtp::start(behaviour).await;
    let config = ConfigFile::new(&config_toml_at(
        &cluster.comma_url(),
        &name,
        &[(
            "primary",
            smtp.port(),
            &format!("max_connections = {MAX_CONNECTIONS}\n"),
        )],
        &["2s", "2s", "2s"],
    ));
    let mut csv = String::from("email,name\n");
    for i in 0..ROWS {
        csv.push_str(&format!("r{i}@example.org,R{i}\n"));
    }
    let recipients = config.write("recipients.csv", csv);
    let text = config.write("body.txt", "Hello {{ name }}\n");

    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start(&config.path, &[]))
        .collect();
    let producer = {
        let config = config.path.clone();
        let args: Vec<String> = [
            "send",
            "--recipients",
            recipients.to_str().unwrap(),
            "--campaign",
            "loss",
            "--from",
            "news@example.com",
            "--subject",
            "Hi {{ name }}",
            "--text",
            text.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_producer(&config, &args)
        })
    };

    // Mid-campaign (publishing still going, greylisted jobs in their retry step), the node
    // leading the jobs queue dies.
    let jobs_queue = format!("{name}.jobs.primary");
    assert!(
        smtp.wait_for_accepted(100, Duration::from_secs(60)).await >= 100,
        "the campaign did not start"
    );
    let leader = {
        let cluster = &cluster;
        let queue = jobs_queue.clone();
        tokio::task::block_in_place(|| cluster.await_quorum_leader(&queue, Duration::from_secs(10)))
            .expect("the jobs queue has a leader")
    };
    tokio::task::block_in_place(|| cluster.kill(leader));
    let killed_at = smtp.accepted_count();

    let published = tokio::time::timeout(Duration::from_secs(180), producer)
        .await
        .expect("the producer finished")
        .expect("join");
    let producer_said = String::from_utf8_lossy(&published.stderr).into_owned();
    eprintln!(
        "node {leader} killed after {killed_at} deliveries; the producer {}",
        if producer_said.contains("reconnecting") {
            "reconnected and republished what was unconfirmed"
        } else {
            "was not connected to it"
        }
    );
    assert!(
        published.status.success(),
        "the producer failed: {producer_said}"
    );
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert_eq!(
        stdout.lines().last(),
        Some(format!("published {ROWS} jobs").as_str()),
        "{producer_said}"
    );

    let per_recipient = || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for message in smtp.accepted() {
            for rcpt in &message.rcpt_to {
                *counts.entry(rcpt.clone()).or_default() += 1;
            }
        }
        counts
    };
    let all = eventually(Duration::from_secs(180), || async {
        per_recipient().len() >= ROWS
    })
    .await;
    let counts = per_recipient();
    let missing: Vec<String> = (0..ROWS)
        .map(|i| format!("r{i}@example.org"))
        .filter(|r| !counts.contains_key(r))
        .collect();
    assert!(
        all && missing.is_empty(),
        "{} never delivered (killed node {leader} after {killed_at} accepted), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for i in (0..ROWS).step_by(GREYLISTED_EVERY) {
        assert!(
            smtp.rcpt_attempts(&format!("r{i}@example.org")) >= 2,
            "r{i} was greylisted, so it went through a retry step"
        );
    }

    // Duplicates: the sessions connected through the lost node repeat at most their ack
    // batch plus the job in flight; the producer at most its unconfirmed window, which the
    // jobs queue de-duplicates nowhere, so it shows as deliveries too; a greylisted job
    // leaving its retry step as the leader changed may come back once more.
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let bound = MAX_CONNECTIONS * sluice_worker::settle::MAX_REPEATED_PER_SESSION
        + sluice_producer::send::CONFIRM_WINDOW
        + ROWS / GREYLISTED_EVERY;
    eprintln!("{duplicates} duplicates after losing node {leader}");
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, more than the design's {bound}"
    );
    assert!(
        smtp.max_concurrent_sessions() <= MAX_CONNECTIONS,
        "the relay saw {} sessions at once",
        smtp.max_concurrent_sessions()
    );

    let survivor = (0..3).find(|&i| i != leader).expect("a live node");
    let ns = TestNamespace::attach(&cluster.urls()[survivor], &name, &["primary"], 3).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            ns.try_queue_len(&jobs_queue).await == Ok(0)
        })
        .await,
        "the jobs queue is not empty (or cannot be counted): {:?}",
        ns.try_queue_len(&jobs_queue).await
    );
    assert_eq!(ns.queue_len(&ns.topology.dead_queue("primary")).await, 0);
}
