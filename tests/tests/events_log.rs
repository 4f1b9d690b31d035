//! Delivery events as the fleet publishes them: batches on `<ns>.events`, kept in the
//! event log, read by `status`, by foreign subscribers, and never lost to a crash.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use sluice_shared::events::{DeliveryEvent, EventOutcome};
use sluice_tests::broker::{eventually, TestNamespace, AMQP_URL};
use sluice_tests::processes::{
    config_toml, config_toml_at, run_producer, ConfigFile, WorkerProcess,
};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
use sluice_tests::smtp_sink::SmtpSink;
use sluice_tests::tcp_proxy::TcpProxy;
use sluice_tests::wait::wait_until;

fn example(name: &str) -> String {
    format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `status --json` of a campaign, as JSON; `None` while the log has nothing of it (exit 1).
fn status(config: &ConfigFile, campaign: &str) -> Option<serde_json::Value> {
    let output = run_producer(&config.path, &["status", "--campaign", campaign, "--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(1) && stderr.contains("not in the event log") {
        return None;
    }
    assert!(output.status.success(), "status: {stderr}");
    Some(serde_json::from_slice(&output.stdout).expect("status prints JSON"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_published_with_pika_is_counted_by_status_and_seen_by_subscribers() {
    const JOBS: usize = 4;
    let ns = TestNamespace::new("evpika", &["primary"], 2).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", sink.port, "")],
        &["1s"],
    ));
    let campaign = format!("pika{}", &ns.name[ns.name.len() - 8..]);

    // A foreign service subscribes to the dead jobs of every campaign.
    let mut subscriber = Command::new("/usr/bin/python3")
        .args([&example("subscribe_events.py"), "dead.#", "--max", "1"])
        .env("SLUICE_NAMESPACE", &ns.name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 (python3-pika)");
    let mut subscriber_err = BufReader::new(subscriber.stderr.take().expect("stderr"));
    let mut line = String::new();
    subscriber_err
        .read_line(&mut line)
        .expect("subscriber says it listens");
    assert!(line.starts_with("listening on"), "{line}");

    // Another service publishes the campaign with pika: no summary, only jobs.
    for i in 0..JOBS {
        let output = Command::new("/usr/bin/python3")
            .arg(example("publish_job.py"))
            .arg(format!("reader{i}@example.org"))
            .env("SLUICE_NAMESPACE", &ns.name)
            .env("SLUICE_CAMPAIGN", &campaign)
            .output()
            .expect("run python3 (python3-pika)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // And one job whose body cannot be read: only its header names the campaign.
    let mut headers = FieldTable::default();
    sluice_shared::headers::set_str(&mut headers, sluice_shared::headers::CAMPAIGN, &campaign);
    ns.channel
        .basic_publish(
            ns.topology.jobs_exchange().into(),
            "primary".into(),
            BasicPublishOptions::default(),
            b"{not json",
            BasicProperties::default()
                .with_message_id("broken-1".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _worker = WorkerProcess::start(&config.path, &[]);

    let counted = eventually(Duration::from_secs(40), || async {
        status(&config, &campaign)
            .is_some_and(|report| report["delivered"] == JOBS && report["dead"] == 1)
    })
    .await;
    let report = status(&config, &campaign).expect("the campaign is in the log");
    assert!(counted, "{report}");
    assert_eq!(report["campaign"], campaign.as_str());
    assert!(report["published"].is_null(), "no summary: {report}");
    assert!(report["pending"].is_null(), "{report}");
    assert_eq!(
        (report["bounced"].clone(), report["deferred"].clone()),
        (0.into(), 0.into())
    );
    assert_eq!(sink.count(), JOBS);

    // The subscriber got the dead job's event, in its own queue, as a batch of one.
    let output = tokio::task::spawn_blocking(move || subscriber.wait_with_output())
        .await
        .expect("join")
        .expect("subscriber ends after one event");
    assert!(output.status.success());
    let events: Vec<DeliveryEvent> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("an event per line"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0].id.as_str(),
            events[0].campaign.as_str(),
            events[0].outcome
        ),
        ("broken-1", campaign.as_str(), EventOutcome::Dead)
    );
}

/// Delivered events per job id, as the log holds them.
fn delivered_events(events: &[DeliveryEvent]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in events
        .iter()
        .filter(|e| e.outcome == EventOutcome::Delivered)
    {
        *counts.entry(event.id.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_an_events_confirm_and_its_ack_repeats_an_event_never_loses_one() {
    const JOBS: usize = 400;
    let ns = TestNamespace::new("evkill", &["primary"], 2).await;
    // About 100 messages a second over two sessions: the kill comes mid-campaign.
    let smtp =
        ScriptedSmtp::start(Behaviour::accept_all().with_accept_delay(Duration::from_millis(20)))
            .await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let relays = [("primary", smtp.port(), "max_connections = 2\n")];
    let via_proxy = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
        proxy.port()
    );
    let cut_off = ConfigFile::new(&config_toml_at(&via_proxy, &ns.name, &relays, &["1s"]));
    let healthy = ConfigFile::new(&config_toml_at(
        &format!("{AMQP_URL}?heartbeat=2"),
        &ns.name,
        &relays,
        &["1s"],
    ));
    let ids = ns.publish_jobs("primary", "k", JOBS).await;

    let mut first = WorkerProcess::start(&cut_off.path, &[]);
    assert!(smtp.wait_for_accepted(50, Duration::from_secs(30)).await >= 50);
    // The worker's consume connection (its first) stops reaching the broker: its acks are
    // lost, while its publishing connection still gets the events of the jobs it goes on
    // sending confirmed. Then it dies, with those jobs confirmed as events and never acked.
    let sent_before_cut = smtp.accepted_count();
    proxy.cut_connection_towards_upstream(0);
    wait_until(
        || async { delivered_events(&ns.logged_events().await).len() >= sent_before_cut + 20 },
        Duration::from_secs(20),
        "the delivered events of 20 jobs sent after the cut in the log",
    )
    .await;
    first.kill();
    let _second = WorkerProcess::start(&healthy.path, &[]);

    let all_logged = eventually(Duration::from_secs(90), || async {
        delivered_events(&ns.logged_events().await).len() == JOBS
    })
    .await;
    let events = ns.logged_events().await;
    let delivered = delivered_events(&events);
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !delivered.contains_key(*id))
        .collect();
    assert!(
        all_logged && missing.is_empty(),
        "no delivered event for {missing:?}"
    );
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for message in smtp.accepted() {
        for rcpt in &message.rcpt_to {
            let id = rcpt
                .trim_matches(['<', '>'])
                .trim_end_matches("@example.org");
            *accepted.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    for (id, events) in &delivered {
        assert!(
            *events <= accepted.get(id).copied().unwrap_or(0),
            "{id}: {events} delivered events, but the relay accepted it {:?} times",
            accepted.get(id)
        );
    }
    let repeated = delivered.values().filter(|&&n| n > 1).count();
    assert!(
        repeated > 0,
        "no job was both confirmed as an event and left unacknowledged: the kill missed the window"
    );
    assert_eq!(ns.queue_len(&ns.topology.jobs_queue("primary")).await, 0);
}
