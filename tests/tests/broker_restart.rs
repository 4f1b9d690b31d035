//! The worker's `/readyz` follows the broker: unready while RabbitMQ is stopped, ready
//! again (and delivering) once it is back.
//!
//! Stopping the broker breaks every other test running at the same time, so the tests here
//! are `#[ignore]`d: `deploy/test.sh` runs them alone, after the main suite, with
//! `cargo test -p sluice-tests --test broker_restart -- --ignored --test-threads 1`.
//! They need `rabbitmqctl` (and the rights to stop and start the local node).

use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace, AMQP_URL};
use sluice_tests::processes::{config_toml, ConfigFile, WorkerProcess};
use sluice_tests::smtp_sink::{free_port, SmtpSink};

/// `rabbitmqctl args...`; false (said on stderr) when it fails.
fn rabbitmqctl(args: &[&str]) -> bool {
    sluice_tests::broker::rabbitmqctl(args)
        .map_err(|e| eprintln!("{e}"))
        .is_ok()
}

/// Stops the RabbitMQ application; starts it again when dropped, so that a failing test
/// never leaves the broker down for the tests that follow.
struct StoppedBroker {
    started: bool,
}

impl StoppedBroker {
    fn stop() -> Self {
        assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
        StoppedBroker { started: false }
    }

    fn start(&mut self) {
        self.started = true;
        assert!(rabbitmqctl(&["start_app"]), "rabbitmqctl start_app failed");
        assert!(
            rabbitmqctl(&["await_startup", "--timeout", "120"]),
            "RabbitMQ did not come back"
        );
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if !self.started {
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup", "--timeout", "120"]);
        }
    }
}

async fn publish_job(ns: &TestNamespace, id: &str, to: &str) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect after the restart");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = serde_json::json!({
        "id": id, "from": "news@example.com", "to": to, "subject": "back", "text": "back"
    })
    .to_string();
    let confirm = channel
        .basic_publish(
            ns.topology.jobs_exchange().into(),
            "primary".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            lapin::BasicProperties::default()
                .with_message_id(id.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared broker: deploy/test.sh runs it alone after the main suite"]
async fn readyz_follows_the_broker_going_away_and_coming_back() {
    let ns = TestNamespace::new("restart", &["primary"], 1).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", sink.port, "")],
        &["1s"],
    ));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = WorkerProcess::start(&config.path, &["--listen", &listen]);

    let ready = |want: u16| {
        let listen = listen.clone();
        async move { sluice_tests::http::status(&listen, "/readyz").await == Some(want) }
    };
    assert!(
        eventually(Duration::from_secs(30), || ready(200)).await,
        "the worker never became ready"
    );

    let mut broker = StoppedBroker::stop();
    assert!(
        eventually(Duration::from_secs(30), || ready(503)).await,
        "/readyz still answers {:?} with the broker stopped",
        sluice_tests::http::status(&listen, "/readyz").await
    );
    assert_eq!(
        sluice_tests::http::status(&listen, "/healthz").await,
        Some(200),
        "the worker is alive while it waits for the broker"
    );
    assert_eq!(
        worker.child.try_wait().ok().flatten(),
        None,
        "the worker exited"
    );

    broker.start();
    assert!(
        eventually(Duration::from_secs(90), || ready(200)).await,
        "/readyz did not come back with the broker"
    );

    // And it consumes again: a job published now (on a new connection: the namespace's
    // own went down with the broker) is delivered.
    publish_job(&ns, "after-restart", "back@example.org").await;
    assert!(
        eventually(Duration::from_secs(60), || async { sink.count() == 1 }).await,
        "nothing delivered after the broker came back"
    );
    assert!(worker.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared broker: deploy/test.sh runs it alone after the main suite"]
async fn a_campaign_survives_a_broker_restart_with_nothing_lost() {
    use sluice_tests::processes::run_producer;
    use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};

    const ROWS: usize = 20_000;
    let ns = TestNamespace::new("restart-campaign", &["primary"], 2).await;
    let smtp = ScriptedSmtp::start(Behaviour::accept_all()).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[(
            "primary",
            smtp.port(),
            "max_connections = 4\nmax_messages_per_second = 2000",
        )],
        &["1s", "2s"],
    ));
    let mut csv = String::from("email\n");
    for i in 0..ROWS {
        csv.push_str(&format!("r{i}@example.org\n"));
    }
    let recipients = config.write("recipients.csv", csv);
    let text = config.write("body.txt", "Hello {{ email }}\n");
    let _workers = [
        WorkerProcess::start(&config.path, &[]),
        WorkerProcess::start(&config.path, &[]),
    ];
    let producer_config = config.path.clone();
    let producer = tokio::task::spawn_blocking(move || {
        run_producer(
            &producer_config,
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
                "restart",
            ],
        )
    });

    // Restart the broker while the producer publishes and the workers deliver.
    assert!(smtp.wait_for_accepted(200, Duration::from_secs(60)).await >= 200);
    // The broker stays down for 3 s: the scenario's outage, not a wait for a condition.
    let mut broker = StoppedBroker::stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.start();

    let published = tokio::time::timeout(Duration::from_secs(180), producer)
        .await
        .expect("the producer did not finish after the broker came back")
        .unwrap();
    assert!(
        published.status.success(),
        "the producer failed across the restart: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert!(
        eventually(Duration::from_secs(240), || async {
            smtp.recipients().len() >= ROWS
        })
        .await,
        "only {} of {ROWS} recipients got their message after the restart",
        smtp.recipients().len()
    );
    let duplicates = smtp.accepted_count() - ROWS;
    eprintln!("broker restart: {ROWS} delivered, {duplicates} duplicates (at least once)");
    // Every session repeats at most its ack batch plus the message in flight; the producer
    // publishes again at most what was unconfirmed (its confirm window).
    let bound =
        4 * sluice_worker::settle::MAX_REPEATED_PER_SESSION + sluice_producer::send::CONFIRM_WINDOW;
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, more than the design's {bound}"
    );
}
