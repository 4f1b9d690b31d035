//! `sluice-producer watch` and `send --wait`, fed with delivery events published by hand.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::time::Duration;

use producer_support::{ProducerEnv, Run};

/// Publish a campaign of `n` recipients (job ids `<campaign>-2` ...).
async fn send_campaign(env: &ProducerEnv, campaign: &str, n: usize) {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        csv.push_str(&format!("r{i}@example.org,R{i}\n"));
    }
    let recipients = env.file(&format!("{campaign}.csv"), csv);
    let text = env.file("body.txt", "Hi {{ name }}\n");
    env.run(&[
        "send",
        "--recipients",
        &recipients,
        "--campaign",
        campaign,
        "--from",
        "news@example.com",
        "--subject",
        "Hi",
        "--text",
        &text,
    ])
    .expect_code(0);
}

async fn finished(handle: tokio::task::JoinHandle<Run>) -> Run {
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("watch finished in time")
        .expect("join")
}

#[tokio::test]
async fn watch_counts_each_final_outcome_once_and_exits_0_when_all_were_delivered() {
    let env = ProducerEnv::new("pwatchok").await;
    let campaign = env.campaign("wok");
    send_campaign(&env, &campaign, 3).await;
    // Some events arrive before `watch` starts: the watch queue keeps them.
    env.event(&campaign, "wok-2", "deferred").await;
    env.event(&campaign, "wok-2", "delivered").await;

    let watch = env.spawn(&["watch", "--campaign", &campaign, "--json"]);
    env.event(&campaign, "wok-3", "delivered").await;
    env.event(&campaign, "wok-2", "delivered").await; // a duplicate: counted once
    env.event(&campaign, "wok-4", "deferred").await;
    env.event(&campaign, "wok-4", "delivered").await;
    let run = finished(watch).await;

    run.expect_code(0);
    assert_eq!(
        run.json(),
        serde_json::json!({
            "campaign": "wok", "expected": 3, "delivered": 3, "bounced": 0, "dead": 0,
            "deferred_attempts": 2
        })
    );
    assert!(
        !env.queue_exists(&env.watch_queue(&campaign)).await,
        "the watch queue is removed once the campaign is over"
    );
}

#[tokio::test]
async fn bounces_and_dead_jobs_make_watch_exit_3() {
    let env = ProducerEnv::new("pwatchbad").await;
    let campaign = env.campaign("wbad");
    send_campaign(&env, &campaign, 3).await;

    let watch = env.spawn(&["watch", "--campaign", &campaign]);
    env.event(&campaign, "wbad-2", "delivered").await;
    env.event(&campaign, "wbad-3", "bounced").await;
    env.event(&campaign, "wbad-4", "deferred").await;
    env.event(&campaign, "wbad-4", "dead").await;
    let run = finished(watch).await;

    run.expect_code(3);
    assert_eq!(
        run.last_line(),
        "delivered 1, bounced 1, dead 1, deferred attempts 1"
    );
}

#[tokio::test]
async fn send_wait_follows_the_campaign_it_published() {
    let env = ProducerEnv::new("pwait").await;
    let campaign = env.campaign("wwait");
    let recipients = env.file("r.csv", "email,name\na@example.org,A\nb@example.org,B\n");
    let text = env.file("body.txt", "Hi {{ name }}\n");

    let send = env.spawn(&[
        "send",
        "--recipients",
        &recipients,
        "--campaign",
        &campaign,
        "--from",
        "news@example.com",
        "--subject",
        "Hi",
        "--text",
        &text,
        "--wait",
    ]);
    assert!(
        env.wait_for_messages(&env.jobs_queue(), 2, Duration::from_secs(30))
            .await,
        "the jobs were published"
    );
    env.event(&campaign, "wwait-2", "delivered").await;
    env.event(&campaign, "wwait-3", "bounced").await;
    let run = finished(send).await;

    run.expect_code(3);
    assert!(run.stdout.contains("published 2 jobs"), "{}", run.stdout);
    assert_eq!(
        run.last_line(),
        "delivered 1, bounced 1, dead 0, deferred attempts 0"
    );
}

#[tokio::test]
async fn watching_an_unknown_campaign_fails_at_once() {
    let env = ProducerEnv::new("pwatchnone").await;

    let run = env.run(&["watch", "--campaign", "never-sent"]);

    run.expect_code(1);
    assert!(run.stderr.contains("never-sent"), "{}", run.stderr);
}

#[tokio::test]
async fn an_interrupted_watch_leaves_its_counts_for_the_next_one() {
    let env = ProducerEnv::new("pwatchint").await;
    let campaign = env.campaign("wint");
    send_campaign(&env, &campaign, 3).await;
    env.event(&campaign, "wint-2", "delivered").await;
    env.event(&campaign, "wint-3", "deferred").await;
    let queue = env.watch_queue(&campaign);

    let first = env.start(&["watch", "--campaign", &campaign]);
    assert!(
        sluice_tests::broker::eventually(Duration::from_secs(30), || async {
            env.ns.queue_len(&queue).await == 0
        })
        .await,
        "the first watch consumed what was there"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let first = Run::from(
        tokio::task::spawn_blocking(move || first.wait_with_output())
            .await
            .expect("join")
            .expect("wait"),
    );
    first.expect_code(1);
    assert!(first.stderr.contains("interrupted"), "{}", first.stderr);

    env.event(&campaign, "wint-3", "delivered").await;
    env.event(&campaign, "wint-4", "dead").await;
    let second = finished(env.spawn(&["watch", "--campaign", &campaign, "--json"])).await;

    second.expect_code(3);
    assert_eq!(
        second.json(),
        serde_json::json!({
            "campaign": "wint", "expected": 3, "delivered": 2, "bounced": 0, "dead": 1,
            "deferred_attempts": 1
        })
    );
}
