//! `sluice-producer migrate-queues` on a namespace an older sluice declared: classic retry
//! and dead queues, a jobs queue without at-least-once dead-lettering.

#[path = "../src/producer_support.rs"]
mod producer_support;

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use producer_support::ProducerEnv;
use sluice_shared::amqp::topology::QueueState;
use sluice_shared::headers;

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// Replace the namespace's queues by the ones the previous version declared.
async fn declare_old_topology(env: &ProducerEnv) {
    let t = &env.ns.topology;
    let channel = env.ns.connection.create_channel().await.expect("channel");
    let mut queues = vec![
        (
            t.jobs_queue("primary"),
            "quorum",
            Some(t.dead_exchange()),
            None,
        ),
        (t.dead_queue("primary"), "classic", None, None),
    ];
    for step in 1..=2 {
        queues.push((
            t.retry_queue("primary", step),
            "classic",
            Some(t.jobs_exchange()),
            Some("primary"),
        ));
    }
    for (name, kind, dlx, key) in queues {
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the new queue");
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(kind));
        if let Some(dlx) = dlx {
            args.insert("x-dead-letter-exchange".into(), long(&dlx));
        }
        if let Some(key) = key {
            args.insert("x-dead-letter-routing-key".into(), long(key));
        }
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .expect("declare the old queue");
    }
    for (queue, exchange) in [
        (t.jobs_queue("primary"), t.jobs_exchange()),
        (t.dead_queue("primary"), t.dead_exchange()),
    ] {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "primary".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
}

fn props(id: &str, reason: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    headers::set_str(&mut table, headers::REASON, reason);
    headers::set_str(
        &mut table,
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_headers(table)
}

async fn ids_of(env: &ProducerEnv, queue: &str) -> Vec<producer_support::Message> {
    env.take_all(queue).await
}

#[tokio::test]
async fn old_queues_are_refused_by_name_then_migrated_with_every_message_in_order() {
    let env = ProducerEnv::new("pmigrate").await;
    declare_old_topology(&env).await;
    let t = env.ns.topology.clone();
    let (jobs, dead, retry1) = (
        t.jobs_queue("primary"),
        t.dead_queue("primary"),
        t.retry_queue("primary", 1),
    );
    for id in ["j-1", "j-2", "j-3"] {
        env.put(&jobs, id.as_bytes(), props(id, "none")).await;
    }
    for id in ["r-1", "r-2"] {
        env.put(
            &retry1,
            id.as_bytes(),
            props(id, "deferred").with_expiration("600000".into()),
        )
        .await;
    }
    // An earlier run was interrupted half-way through the dead queue: d-1 already sits in
    // the temporary queue, d-2 still in the old classic queue.
    let temporary = t.migration_queue(&dead);
    let channel = env.ns.connection.create_channel().await.expect("channel");
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), long("quorum"));
    channel
        .queue_declare(
            temporary.as_str().into(),
            QueueDeclareOptions::durable(),
            quorum,
        )
        .await
        .expect("temporary queue");
    env.put(&temporary, b"d-1", props("d-1", "bounced")).await;
    env.put(&dead, b"d-2", props("d-2", "invalid")).await;

    let refused = env.run(&["dead", "list"]);
    let worker = sluice_tests::processes::Binary::new("sluice-worker")
        .config(&env.config.path)
        .env("RUST_LOG", "warn")
        .output();
    let migrated = env.run(&["migrate-queues", "--yes"]);
    let again = env.run(&["migrate-queues", "--yes"]);
    let listed = env.run(&["dead", "list", "--json"]);

    refused.expect_code(1);
    assert!(
        refused.stderr.contains(&dead)
            && refused
                .stderr
                .contains("is a classic queue, sluice now needs quorum")
            && refused.stderr.contains("sluice-producer migrate-queues"),
        "{}",
        refused.stderr
    );
    // The worker stops at start with the same message instead of retrying for ever.
    let worker_said = String::from_utf8_lossy(&worker.stderr);
    assert!(!worker.status.success(), "{worker_said}");
    assert!(
        worker_said.contains("sluice now needs")
            && worker_said.contains(&env.ns.topology.jobs_queue("primary"))
            && worker_said.contains("sluice-producer migrate-queues"),
        "{worker_said}"
    );
    migrated.expect_code(0);
    assert_eq!(
        migrated.last_line(),
        "migrated 4 queues",
        "{}",
        migrated.stderr
    );
    assert_eq!(again.expect_code(0).last_line(), "migrated 0 queues");
    listed.expect_code(0);
    assert!(!env.queue_exists(&temporary).await);
    for spec in t.job_queues(&["primary"], 2) {
        let state = t.check_queue(&env.ns.connection, &spec).await;
        assert!(
            matches!(state, Ok(QueueState::Matches { .. })),
            "{}: {state:?}",
            spec.name
        );
    }
    let moved = ids_of(&env, &jobs).await;
    let ids: Vec<String> = moved.iter().map(|m| m.message_id().unwrap()).collect();
    assert_eq!(ids, ["j-1", "j-2", "j-3"]);
    assert_eq!(moved[0].body, b"j-1");
    assert_eq!(moved[0].header("x-sluice-reason").as_deref(), Some("none"));
    assert!(moved[0].header("traceparent").is_some());
    let waiting = ids_of(&env, &retry1).await;
    let ids: Vec<String> = waiting.iter().map(|m| m.message_id().unwrap()).collect();
    assert_eq!(ids, ["r-1", "r-2"]);
    for message in &waiting {
        assert_eq!(
            message.properties.expiration().as_ref().map(|e| e.as_str()),
            Some("600000")
        );
        assert_eq!(message.header("x-sluice-migrated-expiration"), None);
        assert_eq!(
            message.header("x-sluice-reason").as_deref(),
            Some("deferred")
        );
    }
    let dead_left = ids_of(&env, &dead).await;
    let ids: Vec<String> = dead_left.iter().map(|m| m.message_id().unwrap()).collect();
    assert_eq!(ids, ["d-1", "d-2"]);
}

#[tokio::test]
async fn a_control_stream_of_an_older_retention_is_refused_then_recreated() {
    let env = ProducerEnv::new("migctl").await;
    let t = &env.ns.topology;
    let channel = env.ns.connection.create_channel().await.expect("channel");
    channel
        .queue_delete(t.control().as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the new stream");
    // What the previous version declared: a day of pushback changes.
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("stream"));
    args.insert("x-max-age".into(), long("1D"));
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongInt(1024 * 1024),
    );
    channel
        .queue_declare(
            t.control().as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("declare the old stream");
    let spec = t.control_spec();
    let refused = t.check_queue(&env.ns.connection, &spec).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.is_mismatch()),
        "{refused:?}"
    );

    env.run(&["migrate-queues", "--yes"]).expect_code(0);
    assert!(matches!(
        t.check_queue(&env.ns.connection, &spec).await,
        Ok(QueueState::Matches { .. })
    ));
    // Steering works on it.
    env.run(&["relay", "suspend", "primary", "--for", "1m"])
        .expect_code(0);
    let status = env.run(&["relay", "status", "--json"]);
    status.expect_code(0);
    assert!(
        status.stdout.contains(r#""state":"suspended""#),
        "{}",
        status.stdout
    );
}
