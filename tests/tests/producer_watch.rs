//! `sluice-producer watch` and `send --wait`, fed with delivery events published by hand.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::io::{BufRead, BufReader};
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
    let campaign = String::from("wok");
    send_campaign(&env, &campaign, 3).await;
    // Some events are logged before `watch` starts: it reads the log from its start.
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
            "campaign": "wok", "published": 3, "delivered": 3, "deferred": 0, "bounced": 0,
            "dead": 0, "cancelled": 0, "pending": 0, "deferred_attempts": 2
        })
    );
}

#[tokio::test]
async fn bounces_and_dead_jobs_make_watch_exit_3() {
    let env = ProducerEnv::new("pwatchbad").await;
    let campaign = String::from("wbad");
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
    let campaign = String::from("wwait");
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
async fn watching_or_asking_for_an_unknown_campaign_fails_at_once() {
    let env = ProducerEnv::new("pwatchnone").await;
    send_campaign(&env, "another", 1).await;

    for command in ["watch", "status"] {
        let run = env.run(&[command, "--campaign", "never-sent"]);
        run.expect_code(1);
        assert!(
            run.stderr.contains("never-sent") && run.stderr.contains("not in the event log"),
            "{command}: {}",
            run.stderr
        );
    }
}

#[tokio::test]
async fn any_number_of_watchers_see_the_same_complete_counts_now_or_later() {
    let env = ProducerEnv::new("pwatchmany").await;
    let campaign = String::from("wmany");
    send_campaign(&env, &campaign, 4).await;
    env.event(&campaign, "wmany-2", "delivered").await;

    let first = env.spawn(&["watch", "--campaign", &campaign, "--json"]);
    let second = env.spawn(&["watch", "--campaign", &campaign, "--json"]);
    env.event(&campaign, "wmany-3", "deferred").await;
    env.event(&campaign, "wmany-3", "bounced").await;
    env.event(&campaign, "wmany-4", "delivered").await;
    env.event(&campaign, "wmany-5", "dead").await;
    let (first, second) = (finished(first).await, finished(second).await);
    // Long after the campaign ended, a third watcher reads the same log.
    let third = finished(env.spawn(&["watch", "--campaign", &campaign, "--json"])).await;

    let expected = serde_json::json!({
        "campaign": "wmany", "published": 4, "delivered": 2, "deferred": 0, "bounced": 1,
        "dead": 1, "cancelled": 0, "pending": 0, "deferred_attempts": 1
    });
    for (name, run) in [("first", &first), ("second", &second), ("third", &third)] {
        run.expect_code(3);
        assert_eq!(run.json(), expected, "{name} watcher");
    }
}

#[tokio::test]
async fn status_reports_the_counts_so_far_without_waiting() {
    let env = ProducerEnv::new("pstatus").await;
    let campaign = String::from("wstat");
    send_campaign(&env, &campaign, 5).await;
    env.event(&campaign, "wstat-2", "delivered").await;
    env.event(&campaign, "wstat-3", "deferred").await;
    env.event(&campaign, "wstat-4", "deferred").await;
    env.event(&campaign, "wstat-4", "bounced").await;

    let json = env.run(&["status", "--campaign", &campaign, "--json"]);
    let text = env.run(&["status", "--campaign", &campaign]);

    json.expect_code(0);
    let report = json.json();
    let counts: Vec<(&str, serde_json::Value)> = [
        "published",
        "delivered",
        "deferred",
        "bounced",
        "dead",
        "cancelled",
        "pending",
    ]
    .into_iter()
    .map(|key| (key, report[key].clone()))
    .collect();
    assert_eq!(
        counts,
        [
            ("published", 5.into()),
            ("delivered", 1.into()),
            ("deferred", 1.into()),
            ("bounced", 1.into()),
            ("dead", 0.into()),
            ("cancelled", 0.into()),
            ("pending", 3.into()),
        ]
    );
    // Two final outcomes in the last minute: 2/60 per second, 3 pending → 90 s left.
    assert_eq!(report["rate_per_second"], serde_json::json!(2.0 / 60.0));
    assert_eq!(report["eta_seconds"], 90);
    text.expect_code(0);
    assert!(
        text.stdout
            .contains("delivered 1, deferred 1, bounced 1, dead 0, cancelled 0, pending 3"),
        "{}",
        text.stdout
    );
}

#[tokio::test]
async fn watch_gives_up_after_its_timeout_with_exit_4_and_the_counts_so_far() {
    let env = ProducerEnv::new("pwatchtime").await;
    let campaign = String::from("wtime");
    send_campaign(&env, &campaign, 2).await;
    env.event(&campaign, "wtime-2", "delivered").await;

    let started = std::time::Instant::now();
    let run = env.run(&[
        "watch",
        "--campaign",
        &campaign,
        "--timeout",
        "2s",
        "--json",
    ]);

    run.expect_code(4);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(run.json()["delivered"], 1);
    assert_eq!(run.json()["pending"], 1);
    let bad = env.run(&["watch", "--campaign", &campaign, "--timeout", "soon"]);
    bad.expect_code(2);
    assert!(bad.stderr.contains("--timeout"), "{}", bad.stderr);
}

#[tokio::test]
async fn an_interrupted_watch_takes_nothing_away_from_the_next_one() {
    let env = ProducerEnv::new("pwatchint").await;
    let campaign = String::from("wint");
    send_campaign(&env, &campaign, 3).await;
    env.event(&campaign, "wint-2", "delivered").await;
    env.event(&campaign, "wint-3", "deferred").await;

    let mut first = env.start(&["watch", "--campaign", &campaign]);
    // Interrupt it once its progress line shows it has read the delivered event.
    let stderr = BufReader::new(first.stderr.take().expect("piped stderr"));
    let reading = tokio::task::spawn_blocking(move || {
        let mut lines = stderr.lines();
        let mut seen = String::new();
        for line in lines.by_ref() {
            let line = line.expect("watch's stderr");
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with("finished 1/3") {
                break;
            }
        }
        (seen, lines)
    });
    let (mut stderr_text, rest) = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("no 'finished 1/3' progress line from watch within 20 s")
        .expect("join");
    assert!(stderr_text.contains("finished 1/3"), "{stderr_text}");
    let status = std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || {
        for line in rest {
            stderr_text.push_str(&line.expect("watch's stderr"));
            stderr_text.push('\n');
        }
        let mut output = first.wait_with_output().expect("wait");
        output.stderr = stderr_text.into_bytes();
        output
    })
    .await
    .expect("join");
    let first = Run::from(output);
    first.expect_code(130);
    assert!(first.stderr.contains("interrupted"), "{}", first.stderr);

    env.event(&campaign, "wint-3", "delivered").await;
    env.event(&campaign, "wint-4", "dead").await;
    let second = finished(env.spawn(&["watch", "--campaign", &campaign, "--json"])).await;

    second.expect_code(3);
    assert_eq!(
        second.json(),
        serde_json::json!({
            "campaign": "wint", "published": 3, "delivered": 2, "deferred": 0, "bounced": 0,
            "dead": 1, "cancelled": 0, "pending": 0, "deferred_attempts": 1
        })
    );
}
