//! The binaries as the container manifests run them: configured by environment variables
//! alone, probed over HTTP, stopped with SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::broker::{eventually, TestNamespace, AMQP_URL};
use sluice_tests::processes::{Binary, ConfigFile};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
use sluice_tests::smtp_sink::free_port;

/// The environment `deploy/k8s/worker-deployment.yaml` gives a worker, pointed at this test.
fn manifest_env(namespace: &str, smtp_port: u16, listen_port: u16) -> Vec<(String, String)> {
    [
        ("SLUICE__AMQP__URL", AMQP_URL.to_string()),
        ("SLUICE__AMQP__NAMESPACE", namespace.to_string()),
        ("SLUICE__RELAYS__PRIMARY__HOST", "127.0.0.1".into()),
        ("SLUICE__RELAYS__PRIMARY__PORT", smtp_port.to_string()),
        ("SLUICE__RELAYS__PRIMARY__TLS", "none".into()),
        ("SLUICE__RELAYS__PRIMARY__MAX_CONNECTIONS", "2".into()),
        ("SLUICE__RETRY__DELAYS", "1s,5s".into()),
        ("SLUICE__WORKER__LISTEN", format!("127.0.0.1:{listen_port}")),
        ("SLUICE__WORKER__SHUTDOWN_GRACE", "15s".into()),
        ("SLUICE_LOG_FORMAT", "json".into()),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_configured_by_environment_alone_is_healthy_ready_and_drains_on_sigterm() {
    let ns = TestNamespace::new("container", &["primary"], 2).await;
    // A slow relay, so that jobs are in flight when SIGTERM arrives.
    let smtp =
        ScriptedSmtp::start(Behaviour::accept_all().with_accept_delay(Duration::from_millis(1500)))
            .await;
    let listen = free_port();
    let mut worker = Binary::new("sluice-worker")
        .command()
        .envs(manifest_env(&ns.name, smtp.port(), listen))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start worker");

    assert!(
        eventually(Duration::from_secs(20), || async {
            sluice_tests::http::status(&format!("127.0.0.1:{}", listen), "/healthz").await
                == Some(200)
        })
        .await,
        "/healthz never answered"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            sluice_tests::http::status(&format!("127.0.0.1:{}", listen), "/readyz").await
                == Some(200)
        })
        .await,
        "/readyz never became ready"
    );
    let probe = Binary::new("sluice-worker")
        .command()
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{listen}/healthz"),
        ])
        .status()
        .expect("healthcheck");
    assert!(probe.success(), "the container HEALTHCHECK command failed");
    let metrics_port_closed = Binary::new("sluice-worker")
        .command()
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{}/healthz", free_port()),
        ])
        .status()
        .expect("healthcheck");
    assert!(
        !metrics_port_closed.success(),
        "healthcheck passed with nothing listening"
    );

    ns.publish_jobs("primary", "drain", 10).await;
    // Two sessions (max_connections = 2) are mid-transaction: stop now.
    assert!(
        eventually(Duration::from_secs(20), || async {
            smtp.sessions_open() == 2
                && smtp.rcpt_attempts("drain-0@example.org")
                    + smtp.rcpt_attempts("drain-1@example.org")
                    + smtp.accepted_count()
                    > 0
        })
        .await,
        "no transaction started on both sessions"
    );
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .expect("kill");
    let status = tokio::task::spawn_blocking(move || {
        let status = worker.wait().expect("wait");
        let mut logs = String::new();
        use std::io::Read;
        worker
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
        (status, logs)
    });
    let (status, logs) = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .expect("the worker did not stop within its grace period")
        .unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    // In-flight jobs were finished, the rest left for other workers: nothing lost or doubled.
    let delivered = smtp.accepted_count();
    assert!(delivered >= 1, "the jobs in flight were abandoned");
    let queued = ns.queue_len(&ns.topology.jobs_queue("primary")).await as usize;
    assert_eq!(
        delivered + queued,
        10,
        "{delivered} delivered + {queued} queued"
    );
    // Logs are JSON lines, as SLUICE_LOG_FORMAT=json asks.
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_producer_configured_by_environment_alone_sends_a_campaign() {
    let ns = TestNamespace::new("container-producer", &["primary"], 2).await;
    let files = ConfigFile::new("");
    let csv = files.write(
        "recipients.csv",
        "email,name\nann@example.org,Ann\nbob@example.org,Bob\n",
    );
    let text = files.write("body.txt", "Hello {{ name }}\n");
    let output = Binary::new("sluice-producer")
        .command()
        .args([
            "send",
            "--recipients",
            csv.to_str().unwrap(),
            "--from",
            "news@example.com",
        ])
        .args([
            "--subject",
            "Hi {{ name }}",
            "--text",
            text.to_str().unwrap(),
            "--relay",
            "primary",
        ])
        .env("SLUICE__AMQP__URL", AMQP_URL)
        .env("SLUICE__AMQP__NAMESPACE", &ns.name)
        .env("SLUICE__RETRY__DELAYS", "1s,5s")
        .output()
        .expect("run producer");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().last(),
        Some("published 2 jobs")
    );
    assert_eq!(ns.queue_len(&ns.topology.jobs_queue("primary")).await, 2);
}

#[test]
fn print_config_shows_the_effective_settings_without_secrets() {
    let output = Binary::new("sluice-worker")
        .command()
        .arg("print-config")
        .env(
            "SLUICE__AMQP__URL",
            "amqp://sluice:Pa55word@rabbitmq:5672/%2f",
        )
        .env("SLUICE__RELAYS__PRIMARY__USERNAME", "relay-user")
        .env("SLUICE__RELAYS__PRIMARY__PASSWORD", "RelayS3cret")
        .env("SLUICE__RELAYS__PRIMARY__PORT", "2526")
        .output()
        .expect("print-config");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !text.contains("Pa55word") && !text.contains("RelayS3cret"),
        "{text}"
    );
    let config: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(config["relays"]["primary"]["port"], 2526);
    assert_eq!(config["relays"]["primary"]["password"], "***");
    assert_eq!(config["amqp"]["url"], "amqp://sluice:***@rabbitmq:5672/%2f");
}
