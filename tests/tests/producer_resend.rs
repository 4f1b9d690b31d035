//! Safe re-send against the real RabbitMQ: a campaign id sent before is refused unless
//! `--force`; an interrupted `send` (a signal, the broker lost) says `confirmed through
//! line N` and `send --start-line N+1` sends the rest; `--dedupe` sends each address once.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::collections::BTreeMap;
use std::time::Duration;

use producer_support::{run_producer_raw, ProducerEnv, Run};
use sluice_shared::Job;
use sluice_tests::tcp_proxy::TcpProxy;

const FROM: &str = "Example News <news@example.com>";

/// `send --recipients <file> --campaign <id>` with a small template, then `extra`.
fn send(recipients: &str, campaign: &str, text: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "send",
        "--recipients",
        recipients,
        "--campaign",
        campaign,
        "--from",
        FROM,
        "--subject",
        "Hello {{ name }}",
        "--text",
        text,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A recipients file of `rows` distinct addresses (lines 2..=rows+1).
fn recipients(env: &ProducerEnv, rows: usize) -> String {
    let mut csv = String::from("email,name\n");
    for i in 0..rows {
        csv.push_str(&format!("r{i}@example.org,R{i}\n"));
    }
    env.file("recipients.csv", csv)
}

/// Take every job now in the relay's queue: how many times each CSV line arrived.
async fn lines_in_queue(env: &ProducerEnv, campaign: &str) -> BTreeMap<u64, u32> {
    let mut lines = BTreeMap::new();
    for message in env.take_all(&env.jobs_queue()).await {
        let job = Job::from_bytes(&message.body, 1 << 20).expect("a valid job");
        let line = job
            .id
            .strip_prefix(&format!("{campaign}-"))
            .and_then(|line| line.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("job id {} is not {campaign}-<line>", job.id));
        *lines.entry(line).or_insert(0) += 1;
    }
    lines
}

/// N in `confirmed through line N`.
fn confirmed_through(run: &Run) -> u64 {
    let text = format!("{}\n{}", run.stdout, run.stderr);
    let rest = text
        .split("confirmed through line ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'confirmed through line N' in:\n{text}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a line number")
}

/// Wait for a started producer, failing the test when it takes longer than `timeout`.
async fn finished(child: std::process::Child, timeout: Duration) -> Run {
    tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || Run::from(child.wait_with_output().expect("output"))),
    )
    .await
    .unwrap_or_else(|_| panic!("the producer did not stop within {timeout:?}"))
    .expect("join")
}

#[tokio::test]
async fn a_campaign_with_a_summary_is_refused_unless_forced_and_events_alone_do_not_count() {
    let env = ProducerEnv::new("prefuse").await;
    let text = env.file("body.txt", "Dear {{ name }}\n");
    let file = recipients(&env, 5);
    let first = send(&file, "twice", &text, &[]);
    env.run(&strs(&first)).expect_code(0);
    assert_eq!(lines_in_queue(&env, "twice").await.len(), 5);

    let again = env.run(&strs(&first));

    again.expect_code(1);
    assert!(
        again.stderr.contains("campaign twice was already sent")
            && again.stderr.contains("--force"),
        "{}",
        again.stderr
    );
    assert!(!again.stdout.contains("published"), "{}", again.stdout);
    assert_eq!(
        env.ns.queue_len(&env.jobs_queue()).await,
        0,
        "nothing is published"
    );

    let forced = env.run(&strs(&send(&file, "twice", &text, &["--force", "--json"])));

    forced.expect_code(0);
    assert_eq!(forced.json()["published"], 5);
    assert_eq!(lines_in_queue(&env, "twice").await.len(), 5);

    // Another service's jobs of a campaign leave events in the log, never a summary.
    env.event("elsewhere", "elsewhere-1", "delivered").await;
    env.run(&strs(&send(&file, "elsewhere", &text, &[])))
        .expect_code(0);
}

/// Send `rows` rows, `signal` the producer mid-publish, check what it says, then continue
/// with `--start-line N+1`: every line arrives exactly once.
async fn interrupted_by_a_signal_then_continued(signal: &str, code: i32) {
    const ROWS: usize = 30_000;
    let env = ProducerEnv::new("psignal").await;
    let campaign = "resumed";
    let text = env.file("body.txt", "Dear {{ name }}\n");
    let file = recipients(&env, ROWS);
    let last_line = ROWS as u64 + 1;
    let first = send(&file, campaign, &text, &["--json"]);
    let child = env.start(&strs(&first));
    assert!(
        env.wait_for_messages(&env.jobs_queue(), 1000, Duration::from_secs(120))
            .await,
        "publishing did not start"
    );
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let stopped = finished(child, Duration::from_secs(60)).await;

    stopped.expect_code(code);
    let through = confirmed_through(&stopped);
    assert!(
        (1000..last_line).contains(&through),
        "the signal came mid-publish: confirmed through line {through} of {last_line}\n{}",
        stopped.stderr
    );
    let report = stopped.json();
    assert_eq!(report["confirmed_through_line"], through, "{report}");
    assert_eq!(report["interrupted"], format!("SIG{signal}"), "{report}");
    assert_eq!(report["published"], through - 1, "{report}");
    assert!(
        stopped
            .stderr
            .contains(&format!("continue with --start-line {}", through + 1)),
        "{}",
        stopped.stderr
    );
    // On a signal the producer waits for every confirm: lines 2..=N are in the queue, and
    // nothing after N.
    assert_eq!(
        env.ns.queue_len(&env.jobs_queue()).await as u64,
        through - 1,
        "exactly the lines through {through}"
    );

    // The interrupted run wrote its summary: the same send again is refused.
    let again = env.run(&strs(&send(&file, campaign, &text, &[])));
    again.expect_code(1);
    assert!(
        again
            .stderr
            .contains(&format!("--start-line {}", through + 1)),
        "{}",
        again.stderr
    );

    let start_line = (through + 1).to_string();
    let rest = env.run(&strs(&send(
        &file,
        campaign,
        &text,
        &["--start-line", &start_line, "--json"],
    )));

    rest.expect_code(0);
    assert_eq!(rest.json()["published"], last_line - through);
    let lines = lines_in_queue(&env, campaign).await;
    let wrong: Vec<(&u64, &u32)> = lines.iter().filter(|(_, &n)| n != 1).collect();
    assert!(wrong.is_empty(), "lines sent more than once: {wrong:?}");
    assert_eq!(
        lines.keys().copied().collect::<Vec<_>>(),
        (2..=last_line).collect::<Vec<_>>(),
        "every line exactly once"
    );
    // `status` (and `watch`) expect the jobs of both runs, not the sum of both summaries.
    let status = env.run(&["status", "--campaign", campaign, "--json"]);
    status.expect_code(0);
    assert_eq!(status.json()["published"], ROWS, "{}", status.stdout);
}

#[tokio::test]
async fn sigterm_mid_publish_exits_143_and_start_line_sends_the_rest_exactly_once() {
    interrupted_by_a_signal_then_continued("TERM", 143).await;
}

#[tokio::test]
async fn sigint_mid_publish_exits_130_and_start_line_sends_the_rest_exactly_once() {
    interrupted_by_a_signal_then_continued("INT", 130).await;
}

#[tokio::test]
async fn a_broker_lost_for_good_exits_1_and_start_line_sends_the_rest() {
    const ROWS: usize = 30_000;
    let env = ProducerEnv::new("plost").await;
    let campaign = "lost";
    let text = env.file("body.txt", "Dear {{ name }}\n");
    let file = recipients(&env, ROWS);
    let last_line = ROWS as u64 + 1;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let via_proxy = env.file(
        "proxied.toml",
        format!(
            "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:{}/%2f\"\nnamespace = \"{}\"\n\
             [relays.primary]\nhost = \"127.0.0.1\"\n[retry]\ndelays = [\"1s\", \"2s\"]\n",
            proxy.port(),
            env.ns.name
        ),
    );
    let mut args = vec!["--config".to_string(), via_proxy];
    args.extend(send(&file, campaign, &text, &["--json"]));
    let producer = tokio::task::spawn_blocking(move || run_producer_raw(&strs(&args)));
    // A message reaches the queue before its confirm reaches the producer, which has up to
    // a confirm window of them outstanding: with 1,000 + that window in the queue, at least
    // 1,000 are confirmed.
    let in_queue = 1000 + sluice_producer::send::CONFIRM_WINDOW as u32;
    assert!(
        env.wait_for_messages(&env.jobs_queue(), in_queue, Duration::from_secs(120))
            .await,
        "publishing did not start"
    );

    // The broker goes away for good: every connection reset, every new one refused. The
    // producer retries for its reconnect wait (60 s), then gives up.
    drop(proxy);
    let stopped = tokio::time::timeout(Duration::from_secs(150), producer)
        .await
        .expect("the producer gave up within 150 s")
        .expect("join");

    stopped.expect_code(1);
    let through = confirmed_through(&stopped);
    assert!(
        (1000..last_line).contains(&through),
        "cut mid-publish: confirmed through line {through} of {last_line}\n{}",
        stopped.stderr
    );
    let report = stopped.json();
    assert_eq!(report["confirmed_through_line"], through, "{report}");
    assert_eq!(report["interrupted"], "broker lost", "{report}");

    let start_line = (through + 1).to_string();
    let rest = env.run(&strs(&send(
        &file,
        campaign,
        &text,
        &["--start-line", &start_line],
    )));

    rest.expect_code(0);
    let lines = lines_in_queue(&env, campaign).await;
    assert_eq!(
        lines.keys().copied().collect::<Vec<_>>(),
        (2..=last_line).collect::<Vec<_>>(),
        "no line is missing"
    );
    // At least once: jobs the first run published without a confirm before the connection
    // died may be in the queue as well as their copies from the second run. Only lines
    // after N can be such: every line up to N was confirmed, and the second run starts
    // after it.
    let twice: Vec<u64> = lines
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&line, _)| line)
        .collect();
    assert!(
        twice.iter().all(|&line| line > through) && lines.values().all(|&n| n <= 2),
        "lines through {through} must arrive once, later ones at most twice: {twice:?}"
    );
    let status = env.run(&["status", "--campaign", campaign, "--json"]);
    status.expect_code(0);
    assert_eq!(status.json()["published"], ROWS, "{}", status.stdout);
}

#[tokio::test]
async fn duplicate_addresses_are_reported_by_line_and_dedupe_sends_each_once() {
    let env = ProducerEnv::new("pdedupe").await;
    let text = env.file("body.txt", "Dear {{ name }}\n");
    let file = env.file(
        "dupes.csv",
        "email,name\n\
         ann@example.org,Ann\n\
         bob@example.org,Bob\n\
         Ann@Example.ORG,Ann again\n\
         cy@example.org,Cy\n\
         bob@example.org,Bob again\n",
    );

    let sent = env.run(&strs(&send(&file, "dupes", &text, &["--json"])));

    sent.expect_code(0);
    for report in [
        "line 4: duplicate of line 2 (Ann@Example.ORG)",
        "line 6: duplicate of line 3 (bob@example.org)",
    ] {
        assert!(sent.stderr.contains(report), "{}", sent.stderr);
    }
    assert_eq!(sent.json()["duplicates"], 2);
    assert_eq!(
        sent.json()["published"],
        5,
        "without --dedupe they are sent"
    );
    assert_eq!(
        lines_in_queue(&env, "dupes")
            .await
            .into_keys()
            .collect::<Vec<_>>(),
        [2, 3, 4, 5, 6]
    );

    let deduped = env.run(&strs(&send(&file, "once", &text, &["--dedupe", "--json"])));

    deduped.expect_code(0);
    assert!(
        deduped
            .stderr
            .contains("line 6: duplicate of line 3 (bob@example.org)"),
        "{}",
        deduped.stderr
    );
    assert_eq!(deduped.json()["duplicates"], 2);
    assert_eq!(deduped.json()["published"], 3);
    assert_eq!(
        lines_in_queue(&env, "once")
            .await
            .into_keys()
            .collect::<Vec<_>>(),
        [2, 3, 5],
        "the first occurrence of each address"
    );
}
