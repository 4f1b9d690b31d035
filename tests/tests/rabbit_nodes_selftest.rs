//! The broker-fault helpers do what the fault tests rely on: a private node confirms,
//! blocks publishers under a memory alarm; a three-node cluster keeps a quorum queue
//! usable when its leader dies; a cut proxy swallows traffic without closing anything.
//!
//! Each test starts its own RabbitMQ nodes (about 5-10 s each here) and never touches the
//! machine's node on 5672. Run with
//! `cargo test -p sluice-tests --test rabbit_nodes_selftest -- --nocapture --test-threads 1`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event};
use sluice_tests::rabbit_node::{RabbitCluster, RabbitNode};
use sluice_tests::tcp_proxy::TcpProxy;

/// Bound on anything that should happen promptly (a confirm, an event, a connection).
const PROMPTLY: Duration = Duration::from_secs(10);

/// How long a confirm that must not come is waited for.
const SILENCE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_until_it_is_lifted() {
    let started = Instant::now();
    let node = RabbitNode::start("alarm");
    eprintln!("node {} up in {:?}", node.name(), started.elapsed());
    let connection = connect(&node.amqp_url()).await;
    let mut events = Box::pin(connection.events_listener());
    let channel = confirming_channel(&connection).await;
    declare(&channel, "alarm", FieldTable::default()).await;
    assert!(
        publish(&channel, "alarm", b"before").await,
        "first publish not confirmed"
    );

    tokio::task::block_in_place(|| node.set_memory_high_watermark(0.000_000_1));
    let mut pending = Box::pin(publish(&channel, "alarm", b"during"));
    assert!(
        tokio::time::timeout(SILENCE, &mut pending).await.is_err(),
        "a publish was confirmed under a memory alarm"
    );
    assert!(
        next_event(&mut events, |e| matches!(e, Event::ConnectionBlocked(_))).await,
        "no connection.blocked within {PROMPTLY:?}"
    );
    assert!(connection.status().blocked());

    tokio::task::block_in_place(|| node.set_memory_high_watermark(0.4));
    assert!(
        next_event(&mut events, |e| matches!(e, Event::ConnectionUnblocked)).await,
        "no connection.unblocked within {PROMPTLY:?}"
    );
    let confirmed = tokio::time::timeout(PROMPTLY, pending).await;
    assert_eq!(confirmed, Ok(true), "the blocked publish was not confirmed");
    assert_eq!(message_count(&channel, "alarm").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_survives_the_loss_of_its_leader() {
    let started = Instant::now();
    let mut cluster = RabbitCluster::start("quorum", 3);
    eprintln!("3-node cluster up in {:?}", started.elapsed());
    assert_eq!(cluster.running_nodes().len(), 3, "cluster_status");
    assert_eq!(cluster.comma_url().split(',').count(), 3);

    let queue = "jobs";
    let connection = connect(&cluster.urls()[0]).await;
    let channel = confirming_channel(&connection).await;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    declare(&channel, queue, quorum).await;
    for i in 0..10 {
        let body = format!("job-{i}");
        assert!(
            publish(&channel, queue, body.as_bytes()).await,
            "job-{i} not confirmed"
        );
    }
    let leader = tokio::task::block_in_place(|| cluster.await_quorum_leader(queue, PROMPTLY))
        .expect("the quorum queue has a leader");
    let mut members = tokio::task::block_in_place(|| cluster.quorum_members(queue));
    members.sort_unstable();
    assert_eq!(members, vec![0, 1, 2], "a replica on every node");
    let _ = connection.close(200, "bye".into()).await;

    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(leader));
    let new_leader =
        tokio::task::block_in_place(|| cluster.await_quorum_leader(queue, Duration::from_secs(30)))
            .expect("a new leader within 30 s");
    eprintln!(
        "leader {leader} killed, node {new_leader} leads after {:?}",
        killed.elapsed()
    );
    assert_ne!(new_leader, leader);

    let survivor = (leader + 1) % 3;
    let connection = connect(&cluster.urls()[survivor]).await;
    let channel = confirming_channel(&connection).await;
    assert_eq!(message_count(&channel, queue).await, 10);
    let mut bodies = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        message.ack(BasicAckOptions::default()).await.expect("ack");
        bodies.push(String::from_utf8_lossy(&message.data).into_owned());
    }
    let expected: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    assert_eq!(bodies, expected, "messages intact and in order");
    assert!(
        publish(&channel, queue, b"after").await,
        "publish after failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_proxy_swallows_traffic_without_closing_the_connection() {
    let node = RabbitNode::start("proxy");
    let upstream: SocketAddr = ([127, 0, 0, 1], node.port()).into();
    let proxy = TcpProxy::start(upstream).await;
    let via_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());

    let connection = connect(&via_proxy).await;
    let mut events = Box::pin(connection.events_listener());
    let channel = confirming_channel(&connection).await;
    declare(&channel, "cut", FieldTable::default()).await;
    assert!(
        publish(&channel, "cut", b"forwarded").await,
        "no confirm through the proxy"
    );

    proxy.cut();
    assert!(
        tokio::time::timeout(SILENCE, publish(&channel, "cut", b"lost"))
            .await
            .is_err(),
        "a confirm crossed a cut proxy"
    );
    assert!(
        connection.status().connected(),
        "a cut looks like silence, not like a closed socket"
    );
    assert!(
        tokio::time::timeout(
            SILENCE,
            Connection::connect(&via_proxy, ConnectionProperties::default())
        )
        .await
        .is_err(),
        "a new connection got through a cut proxy"
    );

    proxy.restore();
    let fresh = connect(&via_proxy).await;
    let channel = confirming_channel(&fresh).await;
    assert!(
        publish(&channel, "cut", b"restored").await,
        "no confirm after restore"
    );

    proxy.close_all();
    assert!(
        next_event(&mut events, |e| matches!(e, Event::Error(_))).await,
        "the cut connection saw no error after close_all"
    );
}

async fn connect(url: &str) -> Connection {
    tokio::time::timeout(
        PROMPTLY,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("no AMQP connection to {url} within {PROMPTLY:?}"))
    .unwrap_or_else(|e| panic!("AMQP connection to {url}: {e}"))
}

async fn confirming_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    channel
}

async fn declare(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

/// Publish a persistent message to `queue` (default exchange); true once the broker acks it.
async fn publish(channel: &Channel, queue: &str, body: &[u8]) -> bool {
    let Ok(confirm) = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    else {
        return false;
    };
    confirm.await.is_ok_and(|c| c.is_ack())
}

async fn message_count(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
        .message_count()
}

/// Wait (at most [`PROMPTLY`]) for a connection event matching `wanted`.
async fn next_event(
    events: &mut (impl futures_util::Stream<Item = Event> + Unpin),
    wanted: impl Fn(&Event) -> bool,
) -> bool {
    tokio::time::timeout(PROMPTLY, async {
        while let Some(event) = events.next().await {
            if wanted(&event) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}
