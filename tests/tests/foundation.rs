//! The spine: a campaign from a CSV through RabbitMQ to a real SMTP server (Postfix's
//! smtp-sink), jobs published by other services, and bad jobs set aside.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace};
use sluice_tests::processes::{config_toml, run_producer, Binary, ConfigFile, WorkerProcess};
use sluice_tests::smtp_sink::{header_value, SmtpSink};
use sluice_tests::wait::holds_throughout;

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_recipients_are_each_delivered_once_with_their_own_content() {
    let ns = TestNamespace::new("e2e", &["primary"], 2).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", sink.port, "max_connections = 4")],
        &["1s", "2s"],
    ));
    let mut csv = String::from("email,name\n");
    for i in 0..1000 {
        csv.push_str(&format!("user{i}@example.org,\"O'Brien, Zoë {i}\"\n"));
    }
    let recipients = config.write("recipients.csv", csv);
    let text = config.write(
        "body.txt",
        "Dear {{ name }},\nyour number is {{ email }}.\n",
    );

    let published = run_producer(
        &config.path,
        &[
            "send",
            "--recipients",
            recipients.to_str().unwrap(),
            "--from",
            "News <news@example.com>",
            "--subject",
            "Hello {{ name }}",
            "--text",
            text.to_str().unwrap(),
            "--campaign",
            "spring",
        ],
    );
    let stdout = String::from_utf8_lossy(&published.stdout);
    assert!(
        published.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    assert_eq!(stdout.lines().last(), Some("published 1000 jobs"));
    assert_eq!(ns.queue_len(&ns.topology.jobs_queue("primary")).await, 1000);

    let _workers = [
        WorkerProcess::start(&config.path, &[]),
        WorkerProcess::start(&config.path, &[]),
    ];
    assert!(
        eventually(Duration::from_secs(60), || async { sink.count() >= 1000 }).await,
        "only {} of 1000 messages arrived",
        sink.count()
    );
    holds_throughout(
        || async { sink.count() == 1000 },
        Duration::from_secs(2),
        "1000 messages and no more for 2 s after the last one arrived (every worker still runs)",
    )
    .await;

    let by_recipient: HashMap<String, Vec<String>> = sink.by_header("X-Rcpt-Args");
    for i in 0..1000 {
        let rcpt = format!("<user{i}@example.org>");
        let messages = by_recipient
            .get(&rcpt)
            .unwrap_or_else(|| panic!("{rcpt} got nothing"));
        assert_eq!(messages.len(), 1, "{rcpt} got {} messages", messages.len());
        let message = &messages[0];
        let subject = header_value(message, "Subject").expect("subject");
        // Non-ASCII subjects travel RFC 2047-encoded; the name must be in there verbatim
        // once decoded, which the body shows plainly.
        assert!(!subject.is_empty());
        assert!(
            message.contains(&format!("Message-ID: <spring-{}@example.com>", i + 2)),
            "{message}"
        );
        let body = decoded_body(message);
        assert!(
            body.contains(&format!("Dear O'Brien, Zoë {i},")),
            "{rcpt} got the wrong body: {body}"
        );
        assert!(body.contains(&format!("your number is user{i}@example.org.")));
    }
    assert_eq!(ns.queue_len(&ns.topology.jobs_queue("primary")).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_job_is_set_aside_while_the_worker_goes_on() {
    let ns = TestNamespace::new("malformed", &["primary"], 2).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", sink.port, "")],
        &["1s", "2s"],
    ));
    let _worker = WorkerProcess::start(&config.path, &[]);

    ns.publish_raw("primary", "broken-json", b"{\"id\": ").await;
    ns.publish_raw(
        "primary",
        "bad-address",
        job_json("bad-address", "not an address").as_bytes(),
    )
    .await;
    let injected = serde_json::json!({
        "id": "injected", "from": "news@example.com", "to": "a@example.org",
        "subject": "Hi\r\nBcc: victim@example.com", "text": "x"
    });
    ns.publish_raw("primary", "injected", injected.to_string().as_bytes())
        .await;
    for i in 0..5 {
        let id = format!("good-{i}");
        ns.publish_raw(
            "primary",
            &id,
            job_json(&id, &format!("good{i}@example.org")).as_bytes(),
        )
        .await;
    }

    let dead_queue = ns.topology.dead_queue("primary");
    assert!(
        eventually(Duration::from_secs(30), || async {
            sink.count() == 5 && ns.queue_len(&dead_queue).await == 3
        })
        .await,
        "expected 5 delivered and 3 dead, got {} delivered and {} dead",
        sink.count(),
        ns.queue_len(&dead_queue).await
    );
    let dead = ns.drain(&dead_queue).await;
    let mut ids: Vec<String> = dead
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["bad-address", "broken-json", "injected"]);
    for message in &dead {
        let headers = message.delivery.properties.headers().as_ref();
        assert_eq!(
            sluice_shared::headers::get_str(headers, "x-sluice-reason").as_deref(),
            Some("invalid")
        );
    }
    assert!(sink.messages().iter().all(|m| !m.contains("victim")));
    assert_eq!(ns.queue_len(&ns.topology.jobs_queue("primary")).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_published_from_python_with_pika_is_delivered() {
    let ns = TestNamespace::new("pika", &["primary"], 2).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", sink.port, "")],
        &["1s"],
    ));
    let _worker = WorkerProcess::start(&config.path, &[]);

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/publish_job.py"
    );
    let output = Command::new("/usr/bin/python3")
        .arg(script)
        .arg("pika@example.org")
        .env("SLUICE_NAMESPACE", &ns.name)
        .output()
        .expect("run python3 (python3-pika)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let job_id = String::from_utf8_lossy(&output.stdout).trim().to_string();

    assert!(eventually(Duration::from_secs(30), || async { sink.count() == 1 }).await);
    let message = &sink.messages()[0];
    assert_eq!(
        header_value(message, "X-Rcpt-Args").as_deref(),
        Some("<pika@example.org>")
    );
    assert!(message.contains(&format!("Message-ID: <{job_id}@example.com>")));
    assert!(message.contains("List-Unsubscribe: <mailto:unsubscribe@example.com>"));
    assert!(message.contains("multipart/alternative"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mistyped_config_key_stops_the_worker_naming_the_key() {
    let config = ConfigFile::new("[relays.primary]\nhost = \"127.0.0.1\"\nmax_conections = 4\n");
    let output = Binary::new("sluice-worker").config(&config.path).output();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_conections"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_variables_alone_configure_the_worker() {
    let ns = TestNamespace::new("env", &["primary"], 5).await;
    let sink = SmtpSink::start().await;
    let mut worker = Binary::new("sluice-worker")
        .env("SLUICE__AMQP__NAMESPACE", &ns.name)
        .env("SLUICE__RELAYS__PRIMARY__HOST", "127.0.0.1")
        .env("SLUICE__RELAYS__PRIMARY__PORT", sink.port.to_string())
        .env("SLUICE__RELAYS__PRIMARY__MAX_CONNECTIONS", "2")
        .command()
        .spawn()
        .expect("start worker");
    ns.publish_raw(
        "primary",
        "env-1",
        job_json("env-1", "env@example.org").as_bytes(),
    )
    .await;
    let delivered = eventually(Duration::from_secs(30), || async { sink.count() == 1 }).await;
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(
        delivered,
        "a worker configured by SLUICE__ variables did not deliver"
    );
}

fn job_json(id: &str, to: &str) -> String {
    serde_json::json!({
        "id": id, "from": "news@example.com", "to": to,
        "subject": format!("Hello {id}"), "text": format!("Body of {id}")
    })
    .to_string()
}

/// The body of a raw message, with quoted-printable soft breaks and escapes undone.
fn decoded_body(message: &str) -> String {
    let body = message
        .split("\n\n")
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n\n");
    if !message.contains("quoted-printable") {
        return body;
    }
    let joined = body.replace("=\r\n", "").replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&joined[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
#[should_panic(expected = "cannot count queue")]
async fn counting_a_queue_that_does_not_exist_fails_instead_of_saying_empty() {
    let ns = TestNamespace::new("qlen", &["primary"], 1).await;
    ns.queue_len(&ns.topology.jobs_queue("no-such-relay")).await;
}
