//! Hostile and unusual input on the way to a relay: line endings that would smuggle a
//! second message past the relay's parser, recipients a relay without SMTPUTF8 cannot
//! take, AUTH that would go out in clear, and a relay that takes its time after the final
//! dot. The relay is our scripted server, which keeps the raw DATA bytes.

use std::time::Duration;

use sluice_shared::events::EventOutcome;
use sluice_tests::app::TestApp;
use sluice_tests::broker::TestNamespace;
use sluice_tests::processes::{ConfigFile, WorkerProcess};
use sluice_tests::scripted_smtp::{Behaviour, Phase};

/// A job text holding every SMTP-smuggling primitive: `<CR>.<CR>`, `<LF>.<LF>`,
/// `<LF>.<CR><LF>` and `<CR><LF>.<LF>`, each followed by what a smuggler would send next.
const SMUGGLING_TEXT: &str = "Hello\r.\rMAIL FROM:<a@evil.example>\n.\nRCPT TO:<b@evil.example>\n.\r\nDATA\r\n.\nsmuggled\r\nthe end";

/// Publish one job whose text and html carry [`SMUGGLING_TEXT`], deliver it through a
/// relay behaving as `behaviour`, and check the raw bytes the relay received.
async fn smuggling_never_reaches(tag: &str, behaviour: Behaviour) {
    let app = TestApp::builder(tag)
        .relay("primary", behaviour, "")
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    let job = serde_json::json!({
        "id": "smuggle-0", "campaign": "test", "from": "news@example.com",
        "to": "smuggle-0@example.org", "subject": "Hi",
        "text": SMUGGLING_TEXT, "html": format!("<p>{SMUGGLING_TEXT}</p>"),
    });
    ns.publish_raw("primary", "smuggle-0", job.to_string().as_bytes())
        .await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await,
        "no final outcome: {:?}",
        events.seen
    );
    assert_eq!(
        events.seen.last().map(|e| e.outcome),
        Some(EventOutcome::Delivered),
        "{:?}",
        events.seen
    );
    let accepted = smtp.accepted();
    assert_eq!(accepted.len(), 1, "one job, one message at the relay");
    assert_no_smuggling(&accepted[0].raw);
    let text = String::from_utf8_lossy(&accepted[0].data);
    assert!(
        text.contains("the end"),
        "the message was cut short:\n{text}"
    );
    assert_eq!(smtp.rcpt_attempts("b@evil.example"), 0);
}

/// The raw DATA bytes: no bare CR or LF anywhere, and no line that is a lone dot but the
/// terminating one.
fn assert_no_smuggling(raw: &[u8]) {
    for (i, &b) in raw.iter().enumerate() {
        let next = raw.get(i + 1).copied();
        let previous = i.checked_sub(1).map(|p| raw[p]);
        assert!(
            !(b == b'\r' && next != Some(b'\n')),
            "bare CR at byte {i}: {:?}",
            String::from_utf8_lossy(&raw[i.saturating_sub(20)..(i + 20).min(raw.len())])
        );
        assert!(
            !(b == b'\n' && previous != Some(b'\r')),
            "bare LF at byte {i}: {:?}",
            String::from_utf8_lossy(&raw[i.saturating_sub(20)..(i + 20).min(raw.len())])
        );
    }
    let text = String::from_utf8_lossy(raw);
    let lines: Vec<&str> = text.split("\r\n").collect();
    // "...\r\n.\r\n" splits into [..., ".", ""].
    assert_eq!(lines.last(), Some(&""), "{text:?}");
    let dots = lines.iter().filter(|l| **l == ".").count();
    assert_eq!(dots, 1, "a lone dot inside the content: {text:?}");
    assert_eq!(lines[lines.len() - 2], ".", "{text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggling_sequences_in_a_job_never_reach_a_pipelining_relay() {
    smuggling_never_reaches("smuggle-pipe", Behaviour::accept_all()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggling_sequences_in_a_job_never_reach_a_relay_without_pipelining() {
    smuggling_never_reaches(
        "smuggle-step",
        Behaviour::accept_all().without_extension("PIPELINING"),
    )
    .await;
}

/// A job for `to`, published for `primary`.
async fn publish_job_to(ns: &TestNamespace, id: &str, to: &str) {
    let job = serde_json::json!({
        "id": id, "campaign": "test", "from": "news@example.com", "to": to,
        "subject": "Hi", "text": "Hello",
    });
    ns.publish_raw("primary", id, job.to_string().as_bytes())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idn_domain_reaches_a_relay_without_smtputf8_as_punycode() {
    let app = TestApp::builder("idn")
        .relay(
            "primary",
            Behaviour::accept_all().without_extension("SMTPUTF8"),
            "",
        )
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    publish_job_to(ns, "idn-0", "ann@bücher.example").await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen
                .iter()
                .any(|e| e.outcome.is_final()))
            .await,
        "no final outcome: {:?}",
        events.seen
    );
    assert_eq!(
        events.seen.iter().map(|e| e.outcome).collect::<Vec<_>>(),
        [EventOutcome::Delivered],
        "{:?}",
        events.seen
    );
    let accepted = smtp.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].rcpt_to, ["ann@xn--bcher-kva.example"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_ascii_local_part_bounces_at_once_on_a_relay_without_smtputf8_and_the_session_goes_on(
) {
    // One session, and a refusal streak shorter than the jobs that cannot be sent: a
    // local decision must neither tear the session down nor count as the relay's refusal.
    let app = TestApp::builder("utf8-local")
        .relay(
            "primary",
            Behaviour::accept_all().without_extension("SMTPUTF8"),
            "max_connections = 1\nrefusals_before_down = 3\ndown_cooloff = \"60s\"",
        )
        .retries(&["1s", "1s"])
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    for i in 0..5 {
        publish_job_to(ns, &format!("zoe-{i}"), &format!("zoë{i}@example.org")).await;
    }
    publish_job_to(ns, "plain-0", "plain-0@example.org").await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen
                .iter()
                .filter(|e| e.outcome.is_final())
                .count()
                == 6)
            .await,
        "not every job ended: {:?}",
        events.seen
    );
    for event in &events.seen {
        if event.id.starts_with("zoe-") {
            assert_eq!(event.outcome, EventOutcome::Bounced, "{event:?}");
            let reply = event.smtp_reply.as_deref().unwrap_or("");
            assert!(reply.contains("SMTPUTF8"), "{reply}");
        } else {
            assert_eq!(event.outcome, EventOutcome::Delivered, "{event:?}");
        }
    }
    assert_eq!(events.seen.len(), 6, "no deferrals: {:?}", events.seen);
    assert_eq!(smtp.accepted_count(), 1);
    assert_eq!(smtp.sessions_total(), 1, "the session was torn down");
}

/// A relay on a host that is not a loopback address, with credentials and no TLS. The
/// host is never contacted: the worker decides from its configuration, and the tests
/// publish no job.
fn cleartext_auth_config(ns: &TestNamespace, extra: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        "[amqp]\nurl = \"{}\"\nnamespace = \"{}\"\n\n[relays.faraway]\nhost = \"relay.example.invalid\"\nport = 25\ntls = \"none\"\nusername = \"sluice\"\npassword = \"s3cret-cleartext\"\n{extra}\n",
        sluice_tests::broker::AMQP_URL,
        ns.name
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_without_tls_to_a_remote_relay_stops_the_worker_at_start_naming_the_relay() {
    let ns = TestNamespace::new("cleartext-auth", &["faraway"], 1).await;
    let config = cleartext_auth_config(&ns, "");

    let mut worker = WorkerProcess::start_logged(&config.path, &[]);

    let status = worker.exit_within(Duration::from_secs(20)).await;
    let logs = worker.logs();
    let status = status.unwrap_or_else(|| panic!("the worker did not stop:\n{logs}"));
    assert!(!status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("faraway"), "the relay is not named:\n{logs}");
    assert!(
        logs.contains("allow_plaintext_auth"),
        "no way out is named:\n{logs}"
    );
    assert!(logs.contains("clear"), "no reason given:\n{logs}");
    assert!(!logs.contains("s3cret-cleartext"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_without_tls_to_a_remote_relay_starts_with_a_warning_when_allowed() {
    let ns = TestNamespace::new("cleartext-allowed", &["faraway"], 1).await;
    let config = cleartext_auth_config(&ns, "allow_plaintext_auth = true");

    let mut worker = WorkerProcess::start_logged(&config.path, &[]);

    let warned = sluice_tests::broker::eventually(Duration::from_secs(20), || {
        let logs = worker.logs();
        async move { logs.contains("allow_plaintext_auth") && logs.contains("faraway") }
    })
    .await;
    let logs = worker.logs();
    assert!(warned, "no warning at start:\n{logs}");
    assert!(logs.contains("WARN"), "{logs}");
    assert!(!logs.contains("s3cret-cleartext"), "{logs}");
    assert_eq!(
        worker.exit_within(Duration::from_secs(1)).await,
        None,
        "the worker stopped within 1 s of its warning:\n{logs}"
    );
    assert!(worker.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_slow_after_the_final_dot_within_data_timeout_delivers_not_defers() {
    // Longer than four command timeouts (what once bounded the whole transaction), far
    // shorter than the default data_timeout (10 minutes).
    let app = TestApp::builder("slow-dot")
        .relay(
            "primary",
            Behaviour::stall_at(Phase::EndOfData, Duration::from_secs(3)),
            "command_timeout = \"500ms\"",
        )
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;

    ns.publish_jobs("primary", "slow-dot", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "no outcome"
    );
    assert_eq!(
        events.seen.iter().map(|e| e.outcome).collect::<Vec<_>>(),
        [EventOutcome::Delivered],
        "{:?}",
        events.seen
    );
    assert_eq!(smtp.accepted_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_stalling_at_rcpt_past_the_command_timeout_defers_within_it() {
    let app = TestApp::builder("slow-rcpt")
        .relay(
            "primary",
            Behaviour::stall_at(Phase::Rcpt, Duration::from_secs(30)),
            "command_timeout = \"500ms\"",
        )
        .retries(&["10s"])
        .start()
        .await;
    let ns = &app.ns;
    let mut events = ns.events().await;

    ns.publish_jobs("primary", "slow-rcpt", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(20), |seen| !seen.is_empty())
            .await,
        "no outcome: the data_timeout must not cover the commands"
    );
    assert_eq!(events.seen[0].outcome, EventOutcome::Deferred);
    assert_eq!(
        events.seen[0].smtp_reply.as_deref(),
        Some("no reply within 500ms"),
        "{:?}",
        events.seen
    );
}
