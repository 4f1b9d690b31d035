//! Observability end to end: traces from the producer's `publish <exchange>` span through
//! every `process <queue>` attempt, named and attributed as the OpenTelemetry messaging
//! conventions say (OTLP over gRPC and over HTTP, into an in-test receiver), trace context from
//! other services, and the worker's `/metrics` (and OTLP metrics) counting what was sent,
//! checked against the Grafana dashboard.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use sluice_shared::events::{DeliveryEvent, EventOutcome};
use sluice_tests::app::TestApp;
use sluice_tests::broker::eventually;
use sluice_tests::otlp_receiver::{kind, status, OtlpReceiver, ReceivedSpan};
use sluice_tests::processes::run_producer_with_env;
use sluice_tests::scripted_smtp::Behaviour;
use sluice_tests::smtp_sink::free_port;

const WAIT: Duration = Duration::from_secs(60);

/// The `OTEL_*` variables a deployment would set, pointed at `receiver`.
fn otel_env(receiver: &OtlpReceiver, protocol: &str) -> Vec<(&'static str, String)> {
    let endpoint = match protocol {
        "grpc" => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    };
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_string()),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-sluice-test=token-1".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test".into(),
        ),
        // Export quickly, so the test need not stop the worker to see its spans.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn job_json(id: &str, to: &str) -> String {
    serde_json::json!({
        "id": id, "campaign": "metrics", "from": "news@example.com", "to": to,
        "subject": format!("Hello {id}"), "text": format!("Body of {id}")
    })
    .to_string()
}

fn spans_named<'a>(spans: &'a [ReceivedSpan], name: &str, trace_id: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.name == name && s.trace_id == trace_id)
        .collect()
}

async fn greylisted_once_then_delivered_is_one_trace(protocol: &str) {
    let tag = protocol.replace('/', "-");
    let receiver = OtlpReceiver::start().await;
    let env = otel_env(&receiver, protocol);
    // JSON logs at info: the deferral's line names its trace and span.
    let mut worker_env = env.clone();
    worker_env.extend([
        ("SLUICE_LOG_FORMAT", "json".to_string()),
        ("RUST_LOG", "info".to_string()),
    ]);
    let mut app = TestApp::builder(&format!("otel-{tag}"))
        .relay(
            "primary",
            Behaviour::rcpt_script(
                "grey@example.org",
                &["451 4.7.1 greylisted, come back later", "250 2.1.5 ok"],
            ),
            "",
        )
        .worker_env(&worker_env)
        .logged()
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let recipients = config.write("recipients.csv", "email\ngrey@example.org\n");
    let text = config.write("body.txt", "Hello {{ email }}\n");
    let mut events = ns.events().await;

    let published = run_producer_with_env(
        &config.path,
        &[
            "send",
            "--recipients",
            recipients.to_str().unwrap(),
            "--from",
            "news@example.com",
            "--subject",
            "Traced",
            "--text",
            text.to_str().unwrap(),
            "--campaign",
            "traced",
        ],
        &borrowed(&env),
    );
    assert!(
        published.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    // The producer flushed its span before exiting.
    let spans = receiver.spans();
    let publish_name = format!("publish {}", ns.topology.jobs_exchange());
    let publish: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == publish_name).collect();
    assert_eq!(publish.len(), 1, "one job, one publish span: {spans:#?}");
    let publish = publish[0].clone();
    assert_eq!(publish.service, "sluice-producer");
    assert_eq!(publish.kind, kind::PRODUCER);
    assert_eq!(publish.parent_span_id, "", "a CSV job starts its own trace");
    assert_eq!(publish.attr("messaging.system"), Some("rabbitmq"));
    assert_eq!(publish.attr("messaging.operation.type"), Some("send"));
    assert_eq!(publish.attr("messaging.operation.name"), Some("publish"));
    assert_eq!(
        publish.attr("messaging.destination.name"),
        Some(ns.topology.jobs_exchange().as_str())
    );
    assert_eq!(
        publish.attr("messaging.rabbitmq.destination.routing_key"),
        Some("primary")
    );
    assert_eq!(publish.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(publish.attr("server.port"), Some("5672"));
    assert_eq!(publish.attr("error.type"), None);
    assert_eq!(publish.attr("sluice.campaign"), Some("traced"));
    assert_eq!(
        publish.resource.get("service.version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        publish
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("test")
    );
    let job_id = publish
        .attr("messaging.message.id")
        .expect("message id")
        .to_string();

    app.start_worker();
    let ns = &app.ns;
    assert!(
        events
            .wait_until(WAIT, |seen| seen
                .iter()
                .any(|e| e.outcome == EventOutcome::Delivered))
            .await,
        "the job was not delivered: {:?}",
        events.seen
    );
    let trace = publish.trace_id.clone();
    let process_name = format!("process {}", ns.topology.jobs_queue("primary"));
    let spans = receiver
        .wait_for_spans(WAIT, |spans| {
            spans_named(spans, &process_name, &trace).len() >= 2
                && spans_named(spans, "smtp.send", &trace).len() >= 2
        })
        .await;
    assert!(
        app.workers[0].terminate().success(),
        "the worker did not stop cleanly"
    );

    // Both attempts are children of the publish span: siblings in one trace.
    let mut delivers = spans_named(&spans, &process_name, &trace);
    assert_eq!(delivers.len(), 2, "{delivers:#?}");
    delivers.sort_by_key(|s| s.attr("sluice.attempt").map(str::to_string));
    for (i, deliver) in delivers.iter().enumerate() {
        let attempt = (i + 1).to_string();
        assert_eq!(deliver.attr("sluice.attempt"), Some(attempt.as_str()));
        assert_eq!(deliver.service, "sluice-worker");
        assert_eq!(deliver.kind, kind::CONSUMER);
        assert_eq!(
            deliver.parent_span_id, publish.span_id,
            "attempt {attempt}'s parent"
        );
        assert_eq!(deliver.attr("messaging.system"), Some("rabbitmq"));
        assert_eq!(deliver.attr("messaging.operation.type"), Some("process"));
        assert_eq!(deliver.attr("messaging.operation.name"), Some("process"));
        assert_eq!(
            deliver.attr("messaging.destination.name"),
            Some(ns.topology.jobs_queue("primary").as_str())
        );
        assert_eq!(
            deliver.attr("messaging.rabbitmq.destination.routing_key"),
            Some("primary")
        );
        assert_eq!(deliver.attr("server.address"), Some("127.0.0.1"));
        assert_eq!(deliver.attr("server.port"), Some("5672"));
        assert_eq!(
            deliver.resource.get("service.version").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(deliver.attr("messaging.message.id"), Some(job_id.as_str()));
        assert_eq!(deliver.attr("sluice.relay"), Some("primary"));
        assert_eq!(deliver.attr("sluice.campaign"), Some("traced"));
        assert_eq!(
            deliver
                .resource
                .get("deployment.environment")
                .map(String::as_str),
            Some("test")
        );

        let sends: Vec<&ReceivedSpan> = spans_named(&spans, "smtp.send", &trace)
            .into_iter()
            .filter(|s| s.parent_span_id == deliver.span_id)
            .collect();
        assert_eq!(
            sends.len(),
            1,
            "one smtp.send under attempt {attempt}: {spans:#?}"
        );
        assert_eq!(sends[0].kind, kind::CLIENT);
        assert_eq!(sends[0].attr("server.address"), Some("127.0.0.1"));
        assert_eq!(
            sends[0].attr("server.port"),
            Some(app.relay("primary").port().to_string().as_str())
        );
    }
    let (first, second) = (delivers[0], delivers[1]);
    assert_eq!(first.status_code, status::ERROR, "a deferral is an error");
    assert_eq!(first.attr("sluice.smtp.reply_code"), Some("451"));
    assert_eq!(first.attr("error.type"), Some("deferred"));
    assert_eq!(first.attr("sluice.outcome"), Some("deferred"));
    assert!(
        first.status_message.contains("greylisted"),
        "{}",
        first.status_message
    );
    assert_ne!(second.status_code, status::ERROR);
    assert_eq!(second.attr("sluice.smtp.reply_code"), Some("250"));
    assert_eq!(second.attr("error.type"), None);
    assert_eq!(second.attr("sluice.outcome"), Some("delivered"));
    // Every other span of the trace (a session opened for attempt 2) hangs under a deliver.
    for span in spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name.starts_with("smtp."))
    {
        assert!(
            delivers.iter().any(|d| d.span_id == span.parent_span_id),
            "{span:#?} is not under a process span"
        );
    }

    // The deferral's log line is a flat JSON object that leads to its trace and span.
    let logs = app.workers[0].logs();
    let deferral: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "not delivered" && line["job.id"] == job_id.as_str())
        .collect();
    assert_eq!(deferral.len(), 1, "one deferral logged: {logs}");
    let line = &deferral[0];
    for key in ["timestamp", "level", "target", "message"] {
        assert!(line.get(key).is_some(), "no {key} in {line}");
    }
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["trace_id"], trace.as_str(), "{line}");
    assert_eq!(line["span_id"], first.span_id.as_str(), "{line}");
    assert!(line.get("fields").is_none(), "not flat: {line}");

    // Delivery events carry the trace id.
    let ours: Vec<&DeliveryEvent> = events.seen.iter().filter(|e| e.id == job_id).collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    for event in ours {
        assert_eq!(event.trace_id.as_deref(), Some(trace.as_str()), "{event:?}");
    }
    assert!(
        receiver
            .request_headers()
            .contains(&"x-sluice-test=token-1".to_string()),
        "OTEL_EXPORTER_OTLP_HEADERS not sent: {:?}",
        receiver.request_headers()
    );
    assert_eq!(app.relay("primary").rcpt_attempts("grey@example.org"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greylisted_job_is_one_trace_over_grpc() {
    greylisted_once_then_delivered_is_one_trace("grpc").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greylisted_job_is_one_trace_over_http_protobuf() {
    greylisted_once_then_delivered_is_one_trace("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_from_another_service_continues_its_trace() {
    let receiver = OtlpReceiver::start().await;
    let app = TestApp::builder("otel-foreign")
        .relay("primary", Behaviour::accept_all(), "")
        .worker_env(&otel_env(&receiver, "grpc"))
        .start()
        .await;
    let ns = &app.ns;
    let mut events = ns.events().await;

    // Published as another service would: its own span's context in the headers.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(format!("00-{trace_id}-{parent_span}-01").into()),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString("billing=7f3a".into()),
    );
    ns.publish_with(
        "primary",
        job_json("foreign-1", "someone@example.org").as_bytes(),
        BasicProperties::default()
            .with_message_id("foreign-1".into())
            .with_headers(headers),
    )
    .await;

    assert!(
        events
            .wait_until(WAIT, |seen| seen
                .iter()
                .any(|e| e.id == "foreign-1" && e.outcome.is_final()))
            .await,
        "not delivered: {:?}",
        events.seen
    );
    let event = events.seen.iter().find(|e| e.id == "foreign-1").unwrap();
    assert_eq!(event.outcome, EventOutcome::Delivered);
    assert_eq!(event.trace_id.as_deref(), Some(trace_id.as_str()));

    let process_name = format!("process {}", ns.topology.jobs_queue("primary"));
    let spans = receiver
        .wait_for_spans(WAIT, |spans| {
            !spans_named(spans, &process_name, &trace_id).is_empty()
                && !spans_named(spans, "smtp.send", &trace_id).is_empty()
        })
        .await;
    let delivers = spans_named(&spans, &process_name, &trace_id);
    assert_eq!(
        delivers.len(),
        1,
        "the process span did not join the caller's trace: {spans:#?}"
    );
    let deliver = delivers[0];
    assert_eq!(deliver.parent_span_id, parent_span);
    assert_eq!(deliver.trace_state, "billing=7f3a");
    assert_eq!(deliver.attr("messaging.message.id"), Some("foreign-1"));
    assert_eq!(deliver.attr("sluice.attempt"), Some("1"));
    let send = spans_named(&spans, "smtp.send", &trace_id)[0];
    assert_eq!(send.parent_span_id, deliver.span_id);
}

/// The value of `series` (name and labels, exactly as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn check_dashboard(dashboard: &Path, scrape: &Path) -> std::process::Output {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/check_dashboard.py"
    );
    Command::new("python3")
        .arg(script)
        .arg(dashboard)
        .arg("--metrics")
        .arg(scrape)
        .output()
        .expect("run python3 deploy/grafana/check_dashboard.py")
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_was_sent_and_the_dashboard_queries_only_those() {
    let receiver = OtlpReceiver::start().await;
    let listen = format!("127.0.0.1:{}", free_port());
    let app = TestApp::builder("otel-metrics")
        .relay(
            "primary",
            Behaviour::rcpt_script("nobody@example.org", &["550 5.1.1 no such user"]),
            "max_connections = 3\nmax_messages_per_second = 50",
        )
        .worker_env(&otel_env(&receiver, "http/protobuf"))
        .worker_args(&["--listen", &listen])
        .start()
        .await;
    let ns = &app.ns;
    let mut events = ns.events().await;

    for i in 0..5 {
        let id = format!("ok-{i}");
        ns.publish_raw(
            "primary",
            &id,
            job_json(&id, &format!("ok{i}@example.org")).as_bytes(),
        )
        .await;
    }
    ns.publish_raw(
        "primary",
        "bounce",
        job_json("bounce", "nobody@example.org").as_bytes(),
    )
    .await;
    ns.publish_raw("primary", "broken", b"{\"id\": ").await;
    assert!(
        events
            .wait_until(WAIT, |seen| seen
                .iter()
                .filter(|e| e.outcome.is_final())
                .count()
                >= 7)
            .await,
        "not every job finished: {:?}",
        events.seen
    );

    let (code, scrape) = sluice_tests::http::get(&listen, "/metrics")
        .await
        .expect("scrape /metrics");
    assert_eq!(code, 200);
    let value = |name: &str| sample(&scrape, &format!("{name}{{relay=\"primary\"}}"));
    assert_eq!(value("sluice_jobs_received_total"), Some(7.0), "{scrape}");
    assert_eq!(value("sluice_jobs_delivered_total"), Some(5.0), "{scrape}");
    assert_eq!(value("sluice_jobs_bounced_total"), Some(1.0), "{scrape}");
    assert_eq!(value("sluice_jobs_dead_total"), Some(1.0), "{scrape}");
    assert_eq!(value("sluice_jobs_deferred_total"), Some(0.0), "{scrape}");
    assert_eq!(
        value("sluice_smtp_send_seconds_count"),
        Some(6.0),
        "{scrape}"
    );
    assert_eq!(value("sluice_relay_max_connections"), Some(3.0), "{scrape}");
    assert_eq!(
        value("sluice_relay_max_messages_per_second"),
        Some(50.0),
        "{scrape}"
    );
    assert_eq!(value("sluice_relay_up"), Some(1.0), "{scrape}");
    assert_eq!(value("sluice_relay_down_total"), Some(0.0), "{scrape}");
    // Every session began with a slot taken while its jobs waited.
    let slot_waits = value("sluice_budget_slot_wait_seconds_count").unwrap_or(0.0);
    assert!(slot_waits >= 1.0, "no slot wait observed: {scrape}");
    assert_eq!(
        sample(
            &scrape,
            "sluice_budget_slot_wait_seconds_bucket{relay=\"primary\",le=\"+Inf\"}"
        ),
        Some(slot_waits),
        "{scrape}"
    );
    // Which version runs, and the standard process metrics.
    assert_eq!(
        sample(
            &scrape,
            &format!(
                "sluice_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{scrape}"
    );
    let rss = sample(&scrape, "process_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 0.0, "no process_resident_memory_bytes: {scrape}");
    assert!(
        sample(&scrape, "process_start_time_seconds").unwrap_or(0.0) > 0.0,
        "{scrape}"
    );

    // The dashboard queries only metrics this scrape has...
    let scrape_file = app.config.write("metrics.txt", &scrape);
    let dashboard = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/sluice-dashboard.json"
    ));
    let checked = check_dashboard(dashboard, &scrape_file);
    assert!(
        checked.status.success(),
        "dashboard check failed:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // ...and the check does fail on a metric the worker does not export.
    let mut wrong: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    wrong["panels"][1]["targets"][0]["expr"] = "sum(rate(sluice_jobs_teleported_total[5m]))".into();
    let wrong_file = app.config.write("wrong-dashboard.json", wrong.to_string());
    let refused = check_dashboard(&wrong_file, &scrape_file);
    assert!(
        !refused.status.success(),
        "an unknown metric passed the dashboard check"
    );
    assert!(String::from_utf8_lossy(&refused.stdout).contains("sluice_jobs_teleported_total"));

    // The same numbers go out over OTLP.
    let exported = eventually(WAIT, || async {
        let names = receiver.metric_names("sluice-worker");
        [
            "sluice_jobs_delivered",
            "sluice_smtp_send_seconds",
            "sluice_relay_up",
            "sluice_smtp_sessions_open",
        ]
        .iter()
        .all(|n| names.iter().any(|got| got == n))
    })
    .await;
    assert!(
        exported,
        "OTLP metrics missing: {:?}",
        receiver.metric_names("sluice-worker")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_on_a_closed_port_counts_as_down_once_and_fails_over() {
    let closed = free_port(); // bound and released: nothing listens there
    let listen = format!("127.0.0.1:{}", free_port());
    let app = TestApp::builder("metrics-down")
        .relay_at(
            "primary",
            closed,
            "failover = \"backup\"\ndown_cooloff = \"60s\"\nconnect_timeout = \"2s\"",
        )
        .relay("backup", Behaviour::accept_all(), "")
        .retries(&["1s"])
        .worker_args(&["--listen", &listen])
        .workers(1)
        .start()
        .await;
    let (ns, backup) = (&app.ns, app.relay("backup"));
    let mut events = ns.events().await;
    // The scrape, once the worker serves one.
    let scrape = || async {
        match sluice_tests::http::get(&listen, "/metrics").await {
            Some((200, scrape)) => Some(scrape),
            _ => None,
        }
    };
    // Served once the worker has set up its relays (the /metrics endpoint comes up first).
    let failover_series = "sluice_relay_failovers_total{relay=\"primary\",to=\"backup\"}";
    let up = eventually(WAIT, || async {
        scrape().await.is_some_and(|s| s.contains(failover_series))
    })
    .await;
    assert!(up, "the worker never served its relays' metrics");
    let before = scrape().await.expect("scrape /metrics");
    assert_eq!(
        sample(&before, "sluice_relay_down_total{relay=\"primary\"}"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            "sluice_relay_failovers_total{relay=\"primary\",to=\"backup\"}"
        ),
        Some(0.0),
        "{before}"
    );

    for i in 0..3 {
        let id = format!("down-{i}");
        ns.publish_raw(
            "primary",
            &id,
            job_json(&id, &format!("down{i}@example.org")).as_bytes(),
        )
        .await;
    }
    assert!(
        events
            .wait_until(WAIT, |seen| seen
                .iter()
                .filter(|e| e.outcome == EventOutcome::Delivered)
                .count()
                >= 3)
            .await,
        "the jobs did not go out through the backup: {:?}",
        events.seen
    );

    let after = scrape().await.expect("scrape /metrics");
    let value = |series: &str| sample(&after, series);
    // Down once for its cool-off, however many lanes failed to connect.
    assert_eq!(
        value("sluice_relay_down_total{relay=\"primary\"}"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        value("sluice_relay_failovers_total{relay=\"primary\",to=\"backup\"}"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(value("sluice_relay_up{relay=\"primary\"}"), Some(0.0));
    assert_eq!(
        value("sluice_relay_down_total{relay=\"backup\"}"),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        value("sluice_jobs_delivered_total{relay=\"backup\"}"),
        Some(3.0),
        "{after}"
    );
    assert!(
        value("sluice_budget_slot_wait_seconds_count{relay=\"backup\"}").unwrap_or(0.0) >= 1.0,
        "the backup's lanes took no slot: {after}"
    );
    assert_eq!(backup.accepted_count(), 3);

    // Every worker metric the alert rules name is one this scrape has.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/sluice-alerts.yaml"
    ))
    .expect("read deploy/prometheus/sluice-alerts.yaml");
    let named = sluice_metric_names(&rules);
    assert!(named.len() >= 5, "{named:?}");
    let unknown: Vec<&String> = named
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            !after.contains(&format!("# TYPE {family} "))
                && !after.contains(&format!("# TYPE {name} "))
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "the alert rules name metrics the worker does not export: {unknown:?}"
    );
}

/// The `sluice_*` metric names in `text`.
fn sluice_metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("sluice_")
        .filter(|(at, _)| {
            !text[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| name.len() > "sluice_".len()) // not the `sluice_*` of a comment
        .collect()
}
