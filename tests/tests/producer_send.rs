//! `sluice-producer send` against the real RabbitMQ: what lands in the jobs queue, what is
//! refused, and what the command prints.

#[path = "../src/producer_support.rs"]
mod producer_support;

use std::collections::BTreeSet;
use std::time::Duration;

use producer_support::{run_producer_raw, ProducerEnv};
use sluice_shared::Job;
use sluice_tests::broker::rabbitmqctl;
use sluice_tests::tcp_proxy::TcpProxy;

const FROM: &str = "Example News <news@example.com>";

/// A campaign's template files; returns the arguments naming them.
fn templates(env: &ProducerEnv) -> Vec<String> {
    let text = env.file("body.txt", "Dear {{ name }},\nyour code is {{ code }}.\n");
    let html = env.file("body.html", "<p>Dear {{ name }}</p>\n");
    vec![
        "--from".into(),
        FROM.into(),
        "--subject".into(),
        "Hello {{ name }}".into(),
        "--text".into(),
        text,
        "--html".into(),
        html,
        "--header".into(),
        "List-Unsubscribe: <https://example.com/u/{{ code }}>".into(),
    ]
}

fn send_args<'a>(recipients: &'a str, campaign: &'a str, templates: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["send", "--recipients", recipients, "--campaign", campaign];
    args.extend(templates.iter().map(String::as_str));
    args
}

fn jobs_of(messages: &[producer_support::Message]) -> Vec<Job> {
    messages
        .iter()
        .map(|m| Job::from_bytes(&m.body, 1 << 20).expect("every message is a valid job"))
        .collect()
}

#[tokio::test]
async fn a_thousand_recipients_become_a_thousand_rendered_jobs() {
    let env = ProducerEnv::new("psend").await;
    let campaign = String::from("spring");
    let mut csv = String::from("email,name,code\n");
    for i in 0..1000 {
        let name = if i == 7 {
            "O'Brien, Zoë <&>".to_string()
        } else {
            format!("Reader {i}")
        };
        csv.push_str(&format!("reader{i}@example.org,\"{name}\",K{i}\n"));
    }
    let recipients = env.file("recipients.csv", csv);
    let templates = templates(&env);

    let run = env.run(&send_args(&recipients, &campaign, &templates));

    run.expect_code(0);
    assert_eq!(run.last_line(), "published 1000 jobs");
    let messages = env.take_all(&env.jobs_queue()).await;
    assert_eq!(messages.len(), 1000);
    let jobs = jobs_of(&messages);
    let ids: BTreeSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let expected: BTreeSet<String> = (2..=1001).map(|line| format!("spring-{line}")).collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect());
    for (message, job) in messages.iter().zip(&jobs) {
        let line: usize = job.id.trim_start_matches("spring-").parse().unwrap();
        let i = line - 2;
        assert_eq!(message.message_id().as_deref(), Some(job.id.as_str()));
        assert_eq!(
            message
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(message.properties.delivery_mode(), &Some(2));
        assert_eq!(job.to, format!("reader{i}@example.org"));
        assert_eq!(job.campaign.as_deref(), Some("spring"));
        assert_eq!(job.from, FROM);
        assert_eq!(
            job.headers["List-Unsubscribe"],
            format!("<https://example.com/u/K{i}>")
        );
        if i == 7 {
            // Verbatim in the subject, text and headers; escaped in HTML only.
            assert_eq!(job.subject, "Hello O'Brien, Zoë <&>");
            assert_eq!(
                job.text.as_deref(),
                Some("Dear O'Brien, Zoë <&>,\nyour code is K7.\n")
            );
            assert_eq!(
                job.html.as_deref(),
                Some("<p>Dear O&#x27;Brien, Zoë &lt;&amp;&gt;</p>\n")
            );
        } else {
            assert_eq!(job.subject, format!("Hello Reader {i}"));
            assert_eq!(
                job.html.as_deref(),
                Some(format!("<p>Dear Reader {i}</p>\n").as_str())
            );
        }
    }
    // `watch` and `status` learn the total from the campaign's summary in the event log,
    // and every job names its campaign in a header too.
    assert!(messages
        .iter()
        .all(|message| message.header("x-sluice-campaign").as_deref() == Some("spring")));
    let log = env.ns.read_log().await;
    assert_eq!(log.len(), 1, "the summary, and nothing else yet");
    assert_eq!(
        log[0].properties.kind().as_ref().map(|k| k.as_str()),
        Some("campaign-summary")
    );
    let summary =
        sluice_shared::events::CampaignSummary::from_headers(log[0].properties.headers().as_ref())
            .expect("a summary");
    assert_eq!(
        (
            summary.campaign.as_str(),
            summary.published,
            summary.relay.as_str()
        ),
        ("spring", 1000, "primary")
    );
}

/// Lines 3..8 are each wrong in their own way; 2, 9-10 and 11 are fine.
fn mixed_csv() -> Vec<u8> {
    let mut csv = b"email,name,code,vip\n".to_vec();
    csv.extend_from_slice(b"ann@example.org,Ann,A1,no\n"); // 2
    csv.extend_from_slice(b"not-an-address,Bob,B1,no\n"); // 3: bad address
    csv.extend_from_slice(b"cy@example.org,Cy,C1,yes\n"); // 4: {{ vip_note }} missing
    csv.extend_from_slice(b"dee@example.org,Dee,\"D1\r\nBcc: victim@example.com\",no\n"); // 5-6: CR/LF
    csv.extend_from_slice(b"eve@example.org,Eve\n"); // 7: ragged
    csv.extend_from_slice(b"fay@example.org,F\xe9e,F1,no\n"); // 8: Latin-1, not UTF-8
    csv.extend_from_slice(b"gus@example.org,Gus,G1,\"no,\nreally\"\n"); // 9-10: fine
    csv.extend_from_slice(b"hal@example.org,Hal,H1,no\n"); // 11
    csv
}

fn mixed_templates(env: &ProducerEnv) -> Vec<String> {
    let text = env.file(
        "mixed.txt",
        "Hi {{ name }}{% if vip == 'yes' %}, {{ vip_note }}{% endif %}\n",
    );
    vec![
        "--from".into(),
        FROM.into(),
        "--subject".into(),
        "Hello {{ name }}".into(),
        "--text".into(),
        text,
        "--header".into(),
        "X-Code: {{ code }}".into(),
    ]
}

#[tokio::test]
async fn invalid_rows_are_listed_by_line_and_nothing_is_published() {
    let env = ProducerEnv::new("pinvalid").await;
    let campaign = String::from("mixed");
    let recipients = env.file("mixed.csv", mixed_csv());
    let templates = mixed_templates(&env);

    let run = env.run(&send_args(&recipients, &campaign, &templates));

    run.expect_code(65);
    assert_eq!(run.reported_lines(), vec![3, 4, 5, 7, 8], "{}", run.stderr);
    assert!(
        run.problem_on(3).contains("not-an-address"),
        "{}",
        run.problem_on(3)
    );
    assert!(
        run.problem_on(4).contains("vip_note"),
        "{}",
        run.problem_on(4)
    );
    assert!(
        run.problem_on(5).contains("CR or LF"),
        "{}",
        run.problem_on(5)
    );
    assert!(
        run.problem_on(7).contains("wrong number of fields"),
        "{}",
        run.problem_on(7)
    );
    assert!(run.problem_on(8).contains("UTF-8"), "{}", run.problem_on(8));
    assert!(!run.stdout.contains("published"), "{}", run.stdout);
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
    assert!(
        env.ns.read_log().await.is_empty(),
        "no summary for a refused campaign"
    );
}

#[tokio::test]
async fn skip_invalid_publishes_the_valid_rows_and_still_lists_the_others() {
    let env = ProducerEnv::new("pskip").await;
    let campaign = String::from("mixed");
    let recipients = env.file("mixed.csv", mixed_csv());
    let templates = mixed_templates(&env);
    let mut args = send_args(&recipients, &campaign, &templates);
    args.extend(["--skip-invalid", "--json"]);

    let run = env.run(&args);

    run.expect_code(0);
    assert_eq!(run.reported_lines(), vec![3, 4, 5, 7, 8], "{}", run.stderr);
    assert_eq!(
        run.json(),
        serde_json::json!({"published": 3, "skipped": 5, "duplicates": 0, "campaign": "mixed"})
    );
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "--json prints one object: {}",
        run.stdout
    );
    let jobs = jobs_of(&env.take_all(&env.jobs_queue()).await);
    let ids: BTreeSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(
        ids,
        ["mixed-2", "mixed-9", "mixed-11"].map(String::from).into()
    );
}

#[tokio::test]
async fn a_file_without_an_email_column_is_refused_on_line_1() {
    let env = ProducerEnv::new("pnoemail").await;
    let recipients = env.file("r.csv", "name,address\nAnn,ann@example.org\n");
    let templates = templates(&env);
    let campaign = String::from("noemail");

    let run = env.run(&send_args(&recipients, &campaign, &templates));

    run.expect_code(65);
    assert!(run.problem_on(1).contains("email"), "{}", run.stderr);
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
}

#[tokio::test]
async fn config_is_accepted_before_or_after_the_subcommand() {
    let env = ProducerEnv::new("pconfig").await;
    let recipients = env.file("r.csv", "email,name,code\nann@example.org,Ann,A1\n");
    let templates = templates(&env);
    let config = env.config.path.display().to_string();

    let before = {
        let mut args = vec!["--config", config.as_str()];
        args.extend(send_args(&recipients, "before", &templates));
        args.push("--json");
        run_producer_raw(&args)
    };
    let after = env.run(&send_args(&recipients, "after", &templates));

    before.expect_code(0);
    assert_eq!(
        before.json(),
        serde_json::json!({"published": 1, "skipped": 0, "duplicates": 0, "campaign": "before"})
    );
    after.expect_code(0);
    assert_eq!(after.last_line(), "published 1 jobs");
    let ids: BTreeSet<String> = jobs_of(&env.take_all(&env.jobs_queue()).await)
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, ["after-2", "before-2"].map(String::from).into());
}

#[tokio::test]
async fn a_generated_campaign_id_names_the_jobs_and_return_path_is_the_envelope() {
    let env = ProducerEnv::new("pgen").await;
    let recipients = env.file("r.csv", "email,name,code\nann@example.org,Ann,A1\n");
    let templates = templates(&env);
    let mut args = vec!["send", "--recipients", recipients.as_str()];
    args.extend(templates.iter().map(String::as_str));
    args.extend(["--return-path", "bounces@example.com"]);

    let run = env.run(&args);

    run.expect_code(0);
    let campaign = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("campaign "))
        .expect("the campaign id is printed")
        .to_string();
    // c + UTC time + 4 hex digits: c20261128T112233Z3f9a
    assert_eq!(campaign.len(), 21, "{campaign}");
    assert!(
        campaign.starts_with('c')
            && campaign.as_bytes()[9] == b'T'
            && campaign.as_bytes()[16] == b'Z'
    );
    assert!(
        campaign[17..].chars().all(|c| c.is_ascii_hexdigit()),
        "{campaign}"
    );
    let jobs = jobs_of(&env.take_all(&env.jobs_queue()).await);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, format!("{campaign}-2"));
    assert_eq!(jobs[0].return_path.as_deref(), Some("bounces@example.com"));
    assert_eq!(
        jobs[0].envelope_sender().unwrap().to_string(),
        "bounces@example.com"
    );
}

#[tokio::test]
async fn usage_and_configuration_errors_have_their_own_exit_codes() {
    let env = ProducerEnv::new("pusage").await;
    let recipients = env.file("r.csv", "email,name,code\nann@example.org,Ann,A1\n");
    let templates = templates(&env);

    // Two relays configured: --relay is required.
    let two = env.file(
        "two.toml",
        format!(
            "[amqp]\nnamespace = \"{}\"\n[relays.a]\nhost = \"127.0.0.1\"\n[relays.b]\nhost = \"127.0.0.1\"\n",
            env.ns.name
        ),
    );
    let mut args = vec!["--config", two.as_str()];
    args.extend(send_args(&recipients, "two", &templates));
    let run = run_producer_raw(&args);
    run.expect_code(2);
    assert!(run.stderr.contains("--relay"), "{}", run.stderr);

    // A typo in the configuration is named.
    let typo = env.file("typo.toml", "[amqp]\nnamespaec = \"x\"\n");
    let mut args = vec!["--config", typo.as_str()];
    args.extend(send_args(&recipients, "typo", &templates));
    let run = run_producer_raw(&args);
    // The same code as sluice-worker gives a bad configuration.
    run.expect_code(2);
    assert!(run.stderr.contains("namespaec"), "{}", run.stderr);

    // clap's own usage errors.
    env.run(&["send", "--recipients", recipients.as_str()])
        .expect_code(2);
    assert!(env
        .run(&["send", "--help"])
        .expect_code(0)
        .stdout
        .contains("Exit codes:"));
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
}

#[tokio::test]
async fn a_dropped_connection_is_reconnected_and_no_job_is_lost() {
    let env = ProducerEnv::new("preconnect").await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let config = env.file(
        "proxied.toml",
        format!(
            "[amqp]\nurl = \"{}\"\nnamespace = \"{}\"\n[relays.primary]\nhost = \"127.0.0.1\"\n[retry]\ndelays = [\"1s\", \"2s\"]\n",
            url,
            env.ns.name
        ),
    );
    let rows = 12_000;
    let mut csv = String::from("email,name,code\n");
    for i in 0..rows {
        csv.push_str(&format!("r{i}@example.org,R{i},C{i}\n"));
    }
    let recipients = env.file("many.csv", csv);
    let templates = templates(&env);
    let campaign = String::from("cut");
    let mut args = vec!["--config", config.as_str()];
    args.extend(send_args(&recipients, &campaign, &templates));
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let producer = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_producer_raw(&args)
    });

    // Cut the connection once publishing is under way.
    assert!(
        env.wait_for_messages(&env.jobs_queue(), 1000, Duration::from_secs(60))
            .await,
        "publishing did not start"
    );
    proxy.close_all();
    let run = tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer finished")
        .expect("join");

    run.expect_code(0);
    assert_eq!(run.last_line(), format!("published {rows} jobs"));
    assert!(proxy.connections() >= 2, "the producer reconnected");
    assert!(run.stderr.contains("reconnecting"), "{}", run.stderr);
    let jobs = jobs_of(&env.take_all(&env.jobs_queue()).await);
    let ids: BTreeSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(
        ids.len(),
        rows,
        "every job arrived (duplicates allowed: {})",
        jobs.len()
    );
    // Only what was unconfirmed when the connection broke is published again: at most the
    // producer's confirm window.
    assert!(
        jobs.len() - rows <= sluice_producer::send::CONFIRM_WINDOW,
        "{} duplicates, more than the confirm window",
        jobs.len() - rows
    );
    assert!(jobs.len() >= rows);
}

/// A RabbitMQ policy for the test's namespace, cleared when dropped.
struct Policy(String);

impl Policy {
    fn set(name: &str, pattern: &str, definition: &str) -> Policy {
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "queues",
            name,
            pattern,
            definition,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        Policy(name.to_string())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["clear_policy", &self.0]);
    }
}

#[tokio::test]
async fn a_queue_that_refuses_jobs_makes_send_fail_with_a_nack() {
    let env = ProducerEnv::new("pnack").await;
    // The jobs queue takes 5 jobs and refuses the rest (nack), as a full queue would.
    let _full = Policy::set(
        &format!("{}-full", env.ns.name),
        &format!("^{}\\.jobs\\.", env.ns.name.replace('-', "\\-")),
        r#"{"max-length": 5, "overflow": "reject-publish"}"#,
    );
    let mut csv = String::from("email,name,code\n");
    for i in 0..2000 {
        csv.push_str(&format!("r{i}@example.org,R{i},C{i}\n"));
    }
    let recipients = env.file("many.csv", csv);
    let templates = templates(&env);
    let campaign = String::from("full");

    let run = env.run(&send_args(&recipients, &campaign, &templates));

    run.expect_code(1);
    assert!(run.stderr.contains("(nack)"), "{}", run.stderr);
    assert!(!run.stdout.contains("published"), "{}", run.stdout);
}

/// Runs `args` in a blocking task; a producer that hangs fails the test instead of it.
async fn run_bounded(env: &ProducerEnv, args: &[&str], timeout: Duration) -> producer_support::Run {
    let mut child = env.start(args);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().expect("wait for the producer") {
            Some(_) => {
                return producer_support::Run::from(child.wait_with_output().expect("output"))
            }
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let run = producer_support::Run::from(child.wait_with_output().expect("output"));
                panic!("the producer hung for {timeout:?}:\n{}", run.stderr);
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn a_character_split_across_two_fields_is_invalid_utf8_on_its_line() {
    let env = ProducerEnv::new("psplit").await;
    let campaign = String::from("split");
    // "ë" is C3 AB: its first byte ends the name field, its second starts the code field.
    // The row as a whole is valid UTF-8; each of the two fields is not.
    let mut csv = b"email,name,code\n".to_vec();
    csv.extend_from_slice(b"ann@example.org,Ann,A1\n"); // 2
    csv.extend_from_slice(b"zoe@example.org,Zo\xc3,\xabK2\n"); // 3
    let recipients = env.file("split.csv", csv);
    let templates = templates(&env);

    let run = run_bounded(
        &env,
        &send_args(&recipients, &campaign, &templates),
        Duration::from_secs(30),
    )
    .await;

    run.expect_code(65);
    assert_eq!(run.reported_lines(), vec![3], "{}", run.stderr);
    assert!(
        run.problem_on(3).contains("not valid UTF-8") && run.problem_on(3).contains("\"name\""),
        "{}",
        run.problem_on(3)
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
}

#[tokio::test]
async fn a_template_that_never_ends_or_renders_too_much_fails_its_rows() {
    let env = ProducerEnv::new("pfuel").await;
    let recipients = env.file(
        "r.csv",
        "email,name,code\nann@example.org,Ann,A1\nbob@example.org,Bob,B1\n",
    );
    let cases = [
        (
            "endless",
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "does more work than one row may",
        ),
        (
            "huge",
            "{% for i in range(100000) %}{{ name * 1000 }}{% endfor %}",
            "renders more than",
        ),
    ];
    for (name, body, problem) in cases {
        let text = env.file(&format!("{name}.txt"), body);
        let campaign = name.to_string();
        let args = [
            "send",
            "--recipients",
            recipients.as_str(),
            "--campaign",
            campaign.as_str(),
            "--from",
            FROM,
            "--subject",
            "Hello {{ name }}",
            "--text",
            text.as_str(),
        ];

        let run = run_bounded(&env, &args, Duration::from_secs(60)).await;

        run.expect_code(65);
        assert_eq!(run.reported_lines(), vec![2, 3], "{name}: {}", run.stderr);
        assert!(
            run.problem_on(2).starts_with("line 2: text: ") && run.problem_on(2).contains(problem),
            "{name}: {}",
            run.problem_on(2)
        );
        assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0, "{name}");
    }
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[tokio::test]
async fn a_record_over_the_record_byte_limit_is_refused_on_its_line() {
    let env = ProducerEnv::new("precord").await;
    let campaign = String::from("wide");
    // 63 fields of 1 MiB each: every field within the field limit, the record far over the
    // record limit.
    let mut csv = b"email".to_vec();
    for i in 1..64 {
        csv.extend_from_slice(format!(",c{i}").as_bytes());
    }
    csv.extend_from_slice(b"\nann@example.org");
    let field = vec![b'x'; 1 << 20];
    for _ in 1..64 {
        csv.push(b',');
        csv.extend_from_slice(&field);
    }
    csv.push(b'\n');
    let recipients = env.file("wide.csv", csv);
    let text = env.file("wide.txt", "Hello {{ c1[:5] }}\n");
    let args = [
        "send",
        "--recipients",
        recipients.as_str(),
        "--campaign",
        campaign.as_str(),
        "--from",
        FROM,
        "--subject",
        "Hello",
        "--text",
        text.as_str(),
    ];

    let run = run_bounded(&env, &args, Duration::from_secs(60)).await;

    run.expect_code(65);
    assert!(
        run.problem_on(2).contains("record too large")
            && run
                .problem_on(2)
                .contains(&sluice_producer::rows::MAX_RECORD_BYTES.to_string()),
        "{}",
        run.problem_on(2)
    );
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 0);
}

/// The memory `send` stays within on any file, as docs/design.md (security, oversized input) documents it.
const SEND_MEMORY_BOUND_MIB: u64 = 200;

#[tokio::test]
async fn send_stays_within_its_memory_bound_on_a_file_of_large_rows() {
    let env = ProducerEnv::new("prss").await;
    let campaign = String::from("large");
    let rows = 150;
    let field = "x".repeat(sluice_producer::rows::MAX_FIELD_BYTES);
    let mut csv = String::from("email,name\n");
    for i in 0..rows {
        csv.push_str(&format!("r{i}@example.org,{field}\n"));
    }
    let recipients = env.file("large.csv", csv);
    let text = env.file("large.txt", "Dear {{ name }}\n");
    let args = [
        "send",
        "--recipients",
        recipients.as_str(),
        "--campaign",
        campaign.as_str(),
        "--from",
        FROM,
        "--subject",
        "Hello",
        "--text",
        text.as_str(),
    ];

    let mut child = env.start(&args);
    let pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut peak_kib = 0;
    while child.try_wait().expect("wait for the producer").is_none() {
        assert!(std::time::Instant::now() < deadline, "send took over 180 s");
        if let Some(kib) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = producer_support::Run::from(child.wait_with_output().expect("output"));

    run.expect_code(0);
    assert_eq!(run.last_line(), format!("published {rows} jobs"));
    assert!(peak_kib > 0, "the peak memory was never read");
    assert!(
        peak_kib < SEND_MEMORY_BOUND_MIB * 1024,
        "send peaked at {} MiB on {rows} rows of 1 MiB, over its bound of {SEND_MEMORY_BOUND_MIB} MiB",
        peak_kib / 1024
    );
    eprintln!("send peaked at {} MiB", peak_kib / 1024);
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, rows);
}

#[tokio::test]
async fn sigterm_mid_publish_stops_reports_how_far_it_got_and_the_queue_agrees() {
    let env = ProducerEnv::new("pterm").await;
    let campaign = String::from("term");
    let rows = 60_000;
    let mut csv = String::from("email,name,code\n");
    for i in 0..rows {
        csv.push_str(&format!("r{i}@example.org,R{i},C{i}\n"));
    }
    let recipients = env.file("many.csv", csv);
    let templates = templates(&env);
    let child = env.start(&send_args(&recipients, &campaign, &templates));
    let pid = child.id().to_string();

    assert!(
        env.wait_for_messages(&env.jobs_queue(), 1000, Duration::from_secs(120))
            .await,
        "publishing did not start"
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            producer_support::Run::from(child.wait_with_output().expect("output"))
        }),
    )
    .await
    .expect("the producer stopped within 60 s of SIGTERM")
    .expect("join");

    run.expect_code(143);
    let published = published_of(&run.stderr, rows)
        .unwrap_or_else(|| panic!("no 'published N of {rows} jobs' in:\n{}", run.stderr));
    assert!(
        (1000..rows as u32).contains(&published),
        "published {published} of {rows}"
    );
    assert!(!run.stdout.contains("published"), "{}", run.stdout);
    // Every job it counted is confirmed, and it counted every job it published.
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, published);
}

/// N in `... published N of <total> jobs ...`.
fn published_of(stderr: &str, total: usize) -> Option<u32> {
    let rest = stderr.split("published ").nth(1)?;
    let (n, rest) = rest.split_once(' ')?;
    rest.starts_with(&format!("of {total} jobs"))
        .then(|| n.parse().ok())
        .flatten()
}
