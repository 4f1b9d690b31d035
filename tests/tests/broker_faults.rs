//! The broker misbehaves and nothing is lost: a memory alarm blocks publishing mid-campaign,
//! and a worker is cut off from the broker while its relay stays reachable.

use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace, AMQP_URL};
use sluice_tests::processes::{config_toml_at, ConfigFile, WorkerProcess};
use sluice_tests::rabbit_node::RabbitNode;
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
use sluice_tests::smtp_sink::free_port;
use sluice_tests::tcp_proxy::TcpProxy;
use sluice_tests::wait::{holds_throughout, wait_until};

/// The value of an unlabelled metric in a Prometheus scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_mid_campaign_loses_nothing_and_the_worker_recovers_by_itself() {
    const JOBS: usize = 600;
    let node = tokio::task::spawn_blocking(|| RabbitNode::start("alarm"))
        .await
        .expect("start a private RabbitMQ node");
    let url = node.amqp_url();
    let ns = TestNamespace::new_at(&url, "alarm", &["primary"], 2).await;
    // 10 ms per message over 2 sessions: the campaign takes a few seconds.
    let smtp =
        ScriptedSmtp::start(Behaviour::accept_all().with_accept_delay(Duration::from_millis(10)))
            .await;
    let config = ConfigFile::new(&config_toml_at(
        &url,
        &ns.name,
        &[("primary", smtp.port(), "max_connections = 2\n")],
        &["1s", "1s"],
    ));
    let ids = ns.publish_jobs("primary", "a", JOBS).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut worker = WorkerProcess::start_logged(&config.path, &["--listen", &listen]);
    assert!(
        smtp.wait_for_accepted(JOBS / 5, Duration::from_secs(30))
            .await
            >= JOBS / 5,
        "the campaign did not start"
    );

    // The alarm: RabbitMQ blocks every connection that publishes.
    node.set_memory_high_watermark(0.000_000_1);
    let slots_held = || async {
        let (_, scrape) = sluice_tests::http::get(&listen, "/metrics")
            .await
            .expect("a scrape");
        sample(&scrape, "sluice_budget_slots_held{relay=\"primary\"}")
    };
    let gave_back = eventually(Duration::from_secs(15), || async {
        smtp.sessions_open() == 0
            && sluice_tests::http::status(&listen, "/readyz").await == Some(503)
            && slots_held().await == Some(0.0)
    })
    .await;
    let (_, scrape) = sluice_tests::http::get(&listen, "/metrics")
        .await
        .expect("a scrape");
    let (_, readyz) = sluice_tests::http::get(&listen, "/readyz")
        .await
        .expect("readyz");
    assert!(
        gave_back,
        "blocked, the worker must close its SMTP sessions, give back its slots and be unready \
         ({} sessions open, slots held: {:?})",
        smtp.sessions_open(),
        slots_held().await
    );
    assert!(readyz.contains("blocked"), "{readyz}");
    assert_eq!(sample(&scrape, "sluice_broker_blocked"), Some(1.0));
    // While blocked, nothing new is sent.
    let during = smtp.accepted_count();
    holds_throughout(
        || async { smtp.accepted_count() == during && smtp.sessions_open() == 0 },
        Duration::from_secs(3),
        "no message and no session for 3 s while the broker blocks (the worker sent about 200 a second)",
    )
    .await;

    // The alarm clears: the same worker process finishes the campaign.
    node.set_memory_high_watermark(0.4);
    let done = eventually(Duration::from_secs(60), || async {
        smtp.recipients().len() >= JOBS
    })
    .await;
    let got = smtp.recipients();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !got.contains(&format!("{id}@example.org")))
        .collect();
    assert!(done && missing.is_empty(), "never delivered: {missing:?}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            ns.try_queue_len(&ns.topology.jobs_queue("primary")).await == Ok(0)
        })
        .await,
        "the jobs queue is not empty (or cannot be counted): {:?}",
        ns.try_queue_len(&ns.topology.jobs_queue("primary")).await
    );
    assert_eq!(ns.queue_len(&ns.topology.dead_queue("primary")).await, 0);
    assert!(
        worker.child.try_wait().expect("worker status").is_none(),
        "the worker exited instead of recovering"
    );
    assert_eq!(
        sluice_tests::http::status(&listen, "/readyz").await,
        Some(200)
    );
    let logs = worker.logs();
    assert_eq!(
        logs.matches("blocks publishing (resource alarm)").count(),
        1,
        "the block is logged once:\n{logs}"
    );
    worker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_broker_stops_sending_before_its_slots_change_hands() {
    const JOBS: usize = 2000;
    const MAX_CONNECTIONS: usize = 2;
    let ns = TestNamespace::new("fence", &["primary"], 2).await;
    let smtp =
        ScriptedSmtp::start(Behaviour::accept_all().with_accept_delay(Duration::from_millis(20)))
            .await;
    let broker: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = TcpProxy::start(broker).await;
    // A short heartbeat, so that the broker frees the silent worker's slots within seconds.
    let relays = [(
        "primary",
        smtp.port(),
        "max_connections = 2\nmax_messages_per_connection = 1000\n",
    )];
    let via_proxy = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2",
        proxy.port()
    );
    let direct = format!("{AMQP_URL}?heartbeat=2");
    let cut_off = ConfigFile::new(&config_toml_at(&via_proxy, &ns.name, &relays, &["1s"]));
    let healthy = ConfigFile::new(&config_toml_at(&direct, &ns.name, &relays, &["1s"]));
    ns.publish_jobs("primary", "f", JOBS).await;

    // The first worker takes both slots; the second waits for one.
    let _first = WorkerProcess::start(&cut_off.path, &[]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            smtp.sessions_open() == MAX_CONNECTIONS
        })
        .await
    );
    let second_listen = format!("127.0.0.1:{}", free_port());
    let _second = WorkerProcess::start(&healthy.path, &["--listen", &second_listen]);
    wait_until(
        || async { sluice_tests::http::status(&second_listen, "/readyz").await == Some(200) },
        Duration::from_secs(20),
        "the second worker to be ready",
    )
    .await;
    let before = smtp.accepted_count();

    // The first worker's packets to the broker are lost; it still hears the broker, but
    // not the broker closing its connection after missing its heartbeats. Its relay is
    // reachable all along.
    proxy.cut_towards_upstream();
    let taken_over = eventually(Duration::from_secs(40), || async {
        smtp.accepted_count() >= before + 300
    })
    .await;
    assert!(taken_over, "the second worker never took over");
    assert!(
        smtp.max_concurrent_sessions() <= MAX_CONNECTIONS,
        "the relay saw {} sessions at once, budget {MAX_CONNECTIONS}",
        smtp.max_concurrent_sessions()
    );
    let all = eventually(Duration::from_secs(120), || async {
        smtp.recipients().len() >= JOBS
    })
    .await;
    assert!(all, "only {} of {JOBS} delivered", smtp.recipients().len());
    assert!(smtp.max_concurrent_sessions() <= MAX_CONNECTIONS);
}
