//! `sluice-producer dead list | replay | purge` on a dead queue filled by hand.

#[path = "../src/producer_support.rs"]
mod producer_support;

use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use producer_support::ProducerEnv;
use sluice_shared::headers;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn job_body(id: &str, to: &str) -> Vec<u8> {
    serde_json::json!({
        "id": id, "campaign": "spring", "from": "news@example.com", "to": to,
        "subject": "Hello", "text": "Hi"
    })
    .to_string()
    .into_bytes()
}

/// Properties as the worker sets them on a dead job, plus a trace and the broker's x-death.
fn dead_properties(
    id: &str,
    reason: &str,
    code: i64,
    reply: &str,
    attempts: i64,
) -> BasicProperties {
    let mut table = FieldTable::default();
    headers::set_str(&mut table, headers::REASON, reason);
    headers::set_int(&mut table, headers::SMTP_CODE, code);
    headers::set_str(&mut table, headers::SMTP_REPLY, reply);
    headers::set_int(&mut table, headers::ATTEMPTS, attempts);
    headers::set_int(&mut table, headers::ATTEMPT, attempts);
    headers::set_str(&mut table, headers::RELAY, "primary");
    headers::set_str(&mut table, "traceparent", TRACEPARENT);
    headers::set_str(&mut table, "tracestate", "vendor=1");
    let mut death = FieldTable::default();
    death.insert(
        "queue".into(),
        AMQPValue::LongString("x.jobs.primary".into()),
    );
    table.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_headers(table)
}

/// Three dead jobs: two valid ones and a body that is not a job at all.
async fn fill_dead_queue(env: &ProducerEnv) -> Vec<&'static str> {
    let queue = env.dead_queue();
    env.put(
        &queue,
        &job_body("spring-2", "ann@example.org"),
        dead_properties(
            "spring-2",
            "retries exhausted",
            451,
            "451 4.7.1 try again later",
            6,
        ),
    )
    .await;
    env.put(
        &queue,
        &job_body("spring-3", "bob@example.org"),
        dead_properties("spring-3", "bounced", 550, "550 5.1.1 no such user", 1),
    )
    .await;
    env.put(
        &queue,
        b"\xff this is not JSON",
        dead_properties("broken-1", "invalid", 0, "job is not valid UTF-8", 1),
    )
    .await;
    vec!["spring-2", "spring-3", "broken-1"]
}

async fn dead_ids(env: &ProducerEnv) -> Vec<String> {
    env.take_all(&env.dead_queue())
        .await
        .iter()
        .map(|m| m.message_id().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn dead_list_shows_every_job_and_leaves_the_queue_as_it_was() {
    let env = ProducerEnv::new("pdeadlist").await;
    let ids = fill_dead_queue(&env).await;

    let json = env.run(&["dead", "list", "--json"]);
    let table = env.run(&["dead", "list"]);
    let limited = env.run(&["dead", "list", "--json", "--limit", "2"]);

    json.expect_code(0);
    let listed: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(listed.len(), 3, "{}", json.stdout);
    assert_eq!(
        listed[0],
        serde_json::json!({
            "id": "spring-2", "to": "ann@example.org", "campaign": "spring", "relay": "primary",
            "reason": "retries exhausted", "smtp_code": 451,
            "smtp_reply": "451 4.7.1 try again later", "attempts": 6
        })
    );
    assert_eq!(listed[1]["id"], "spring-3");
    assert_eq!(listed[1]["reason"], "bounced");
    assert_eq!(listed[2]["id"], "broken-1");
    assert_eq!(listed[2]["to"], serde_json::Value::Null);
    assert_eq!(listed[2]["reason"], "invalid");

    table.expect_code(0);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", table.stdout);
    assert!(
        lines[1].starts_with("spring-2")
            && lines[1].contains("ann@example.org")
            && lines[1].contains("retries exhausted")
    );
    assert!(
        lines[1].contains("451 4.7.1 try again later"),
        "{}",
        lines[1]
    );

    limited.expect_code(0);
    assert_eq!(limited.stdout.lines().count(), 2);
    assert!(limited.stderr.contains("1 more"), "{}", limited.stderr);

    // Listing three times removed nothing and reordered nothing.
    assert_eq!(dead_ids(&env).await, ids);
}

#[tokio::test]
async fn replay_by_id_moves_only_that_job_with_its_history_dropped() {
    let env = ProducerEnv::new("pdeadreplay").await;
    fill_dead_queue(&env).await;

    let run = env.run(&["dead", "replay", "--id", "spring-3"]);

    run.expect_code(0);
    assert_eq!(run.last_line(), "replayed 1 jobs");
    let replayed = env.take_all(&env.jobs_queue()).await;
    assert_eq!(replayed.len(), 1);
    let job = &replayed[0];
    assert_eq!(job.message_id().as_deref(), Some("spring-3"));
    assert_eq!(job.body, job_body("spring-3", "bob@example.org"));
    assert_eq!(job.properties.delivery_mode(), &Some(2));
    // (`x-delivery-count` is the quorum jobs queue's own, added on delivery to this test.)
    let mut names: Vec<String> = job
        .header_names()
        .into_iter()
        .filter(|n| n != "x-delivery-count")
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["traceparent", "tracestate"],
        "attempt headers and x-death are gone"
    );
    assert_eq!(job.header("traceparent").as_deref(), Some(TRACEPARENT));
    // The others stay dead, in their order.
    assert_eq!(dead_ids(&env).await, ["spring-2", "broken-1"]);
}

#[tokio::test]
async fn replay_without_ids_moves_every_job_and_unknown_ids_are_an_error() {
    let env = ProducerEnv::new("pdeadall").await;
    fill_dead_queue(&env).await;

    let missing = env.run(&["dead", "replay", "--id", "nope-1"]);
    let all = env.run(&["dead", "replay"]);

    missing.expect_code(1);
    assert_eq!(missing.stdout.lines().last(), Some("replayed 0 jobs"));
    assert!(missing.stderr.contains("nope-1"), "{}", missing.stderr);
    all.expect_code(0);
    assert_eq!(all.last_line(), "replayed 3 jobs");
    let mut ids: Vec<String> = env
        .take_all(&env.jobs_queue())
        .await
        .iter()
        .map(|m| m.message_id().unwrap_or_default())
        .collect();
    // Replays are published over several channels: every job comes back, in no set order.
    ids.sort();
    assert_eq!(ids, ["broken-1", "spring-2", "spring-3"]);
    assert_eq!(env.ns.queue_len(&env.dead_queue()).await, 0);
}

#[tokio::test]
async fn purge_asks_for_yes_without_a_terminal() {
    let env = ProducerEnv::new("pdeadpurge").await;
    fill_dead_queue(&env).await;

    let refused = env.run(&["dead", "purge"]);
    refused.expect_code(2);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(env.ns.queue_len(&env.dead_queue()).await, 3);

    let purged = env.run(&["dead", "purge", "--yes"]);
    purged.expect_code(0);
    assert_eq!(purged.last_line(), "purged 3 jobs");
    assert_eq!(env.ns.queue_len(&env.dead_queue()).await, 0);
}

/// A dead job of `campaign` (none: the job names no campaign) that died for `reason`.
async fn put_dead(env: &ProducerEnv, id: &str, campaign: Option<&str>, reason: &str) {
    let mut body = serde_json::json!({
        "id": id, "from": "news@example.com", "to": format!("{id}@example.org"),
        "subject": "Hello", "text": "Hi"
    });
    if let Some(campaign) = campaign {
        body["campaign"] = campaign.into();
    }
    env.put(
        &env.dead_queue(),
        body.to_string().as_bytes(),
        dead_properties(id, reason, 550, "550 5.1.1 no such user", 1),
    )
    .await;
}

/// Five dead jobs over two campaigns (one without any) and three reasons.
async fn fill_mixed(env: &ProducerEnv) -> Vec<&'static str> {
    put_dead(env, "a-1", Some("autumn"), "bounced").await;
    put_dead(env, "s-1", Some("spring"), "retries exhausted").await;
    put_dead(env, "a-2", Some("autumn"), "invalid").await;
    put_dead(env, "n-1", None, "bounced").await;
    put_dead(env, "s-2", Some("spring"), "bounced").await;
    vec!["a-1", "s-1", "a-2", "n-1", "s-2"]
}

fn listed_ids(run: &producer_support::Run) -> Vec<String> {
    run.expect_code(0);
    run.stdout
        .lines()
        .map(|l| {
            let job: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            job["id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn list_filters_by_reason_and_campaign_and_keeps_the_queue_in_order() {
    let env = ProducerEnv::new("pdeadfilter").await;
    let ids = fill_mixed(&env).await;

    let bounced = env.run(&["dead", "list", "--json", "--reason", "bounced"]);
    let autumn = env.run(&["dead", "list", "--json", "--campaign", "autumn"]);
    let both = env.run(&[
        "dead",
        "list",
        "--json",
        "--reason",
        "bounced",
        "--campaign",
        "spring",
    ]);
    let default = env.run(&["dead", "list", "--json", "--campaign", "default"]);

    assert_eq!(listed_ids(&bounced), ["a-1", "n-1", "s-2"]);
    assert_eq!(listed_ids(&autumn), ["a-1", "a-2"]);
    assert_eq!(listed_ids(&both), ["s-2"]);
    assert_eq!(listed_ids(&default), ["n-1"]);
    assert_eq!(dead_ids(&env).await, ids);
}

#[tokio::test]
async fn listing_again_and_again_counts_no_delivery_and_keeps_the_order() {
    let env = ProducerEnv::new("pdeadcount").await;
    let ids = fill_mixed(&env).await;

    for _ in 0..5 {
        assert_eq!(listed_ids(&env.run(&["dead", "list", "--json"])), ids);
    }

    let left = env.take_all(&env.dead_queue()).await;
    let order: Vec<String> = left.iter().map(|m| m.message_id().unwrap()).collect();
    assert_eq!(order, ids);
    for message in &left {
        // A quorum queue adds x-delivery-count to a message handed back before; none was.
        assert_eq!(message.header("x-delivery-count"), None);
        assert!(message.header("x-sluice-reason").is_some());
        assert_eq!(message.header("traceparent").as_deref(), Some(TRACEPARENT));
    }
}

#[tokio::test]
async fn replay_of_bounced_jobs_sends_only_those_and_keeps_the_others_in_order() {
    let env = ProducerEnv::new("pdeadrbounce").await;
    fill_mixed(&env).await;

    let run = env.run(&["dead", "replay", "--reason", "bounced"]);

    run.expect_code(0);
    assert_eq!(run.last_line(), "replayed 3 jobs");
    let mut sent: Vec<String> = env
        .take_all(&env.jobs_queue())
        .await
        .iter()
        .map(|m| m.message_id().unwrap())
        .collect();
    sent.sort();
    assert_eq!(sent, ["a-1", "n-1", "s-2"]);
    assert_eq!(dead_ids(&env).await, ["s-1", "a-2"]);
}

#[tokio::test]
async fn replay_by_campaign_sends_a_job_left_twice_only_once() {
    let env = ProducerEnv::new("pdeaddup").await;
    fill_mixed(&env).await;
    // An interrupted listing left a second copy of s-1 at the tail.
    put_dead(&env, "s-1", Some("spring"), "retries exhausted").await;

    let run = env.run(&["dead", "replay", "--campaign", "spring"]);

    run.expect_code(0);
    assert_eq!(run.last_line(), "replayed 2 jobs");
    let mut sent: Vec<String> = env
        .take_all(&env.jobs_queue())
        .await
        .iter()
        .map(|m| m.message_id().unwrap())
        .collect();
    sent.sort();
    assert_eq!(sent, ["s-1", "s-2"]);
    assert_eq!(dead_ids(&env).await, ["a-1", "a-2", "n-1"]);
}

#[tokio::test]
async fn purge_with_a_filter_removes_only_matching_jobs_and_keeps_the_order() {
    let env = ProducerEnv::new("pdeadpfilter").await;
    fill_mixed(&env).await;

    let by_reason = env.run(&["dead", "purge", "--yes", "--reason", "invalid"]);
    let by_campaign = env.run(&["dead", "purge", "--yes", "--campaign", "spring"]);

    assert_eq!(by_reason.expect_code(0).last_line(), "purged 1 jobs");
    assert_eq!(by_campaign.expect_code(0).last_line(), "purged 2 jobs");
    assert_eq!(dead_ids(&env).await, ["a-1", "n-1"]);
}

/// Thousands of dead jobs replayed in one run: each leaves the dead queue and arrives once.
/// A quorum queue ignores some of a burst of single acks sent just before their channel
/// closes (rabbitmq-server#10327): those jobs would be back in the dead queue, replayed.
#[tokio::test]
async fn replaying_thousands_of_dead_jobs_moves_each_exactly_once() {
    const JOBS: usize = 3000;
    let env = ProducerEnv::new("pdeadmany").await;
    let dead: Vec<(Vec<u8>, BasicProperties)> = (0..JOBS)
        .map(|i| {
            let id = format!("bulk-{i}");
            let properties = dead_properties(&id, "bounced", 550, "550 5.1.1 no such user", 1);
            (job_body(&id, &format!("{id}@example.org")), properties)
        })
        .collect();
    env.put_many(&env.dead_queue(), &dead).await;

    let run = {
        let _loaded = sluice_tests::busy_cores::BusyCores::start();
        env.run(&["dead", "replay"])
    };

    run.expect_code(0);
    assert_eq!(run.last_line(), format!("replayed {JOBS} jobs"));
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        env.ns.queue_len(&env.dead_queue()).await,
        0,
        "replayed jobs came back to the dead queue"
    );
    // Every job once: as many messages as jobs, each id once.
    assert_eq!(env.count_ids(&env.jobs_queue()).await, (JOBS, JOBS));
}
