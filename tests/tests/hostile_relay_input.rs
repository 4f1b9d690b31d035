//! Hostile and unusual input on the way to a relay: line endings that would smuggle a
//! second message past the relay's parser, recipients a relay without SMTPUTF8 cannot
//! take, AUTH that would go out in clear, and a relay that takes its time after the final
//! dot. The relay is our scripted server, which keeps the raw DATA bytes.

use std::time::Duration;

use sluice_shared::events::EventOutcome;
use sluice_tests::broker::TestNamespace;
use sluice_tests::processes::{config_toml, ConfigFile, WorkerProcess};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};

/// A job text holding every SMTP-smuggling primitive: `<CR>.<CR>`, `<LF>.<LF>`,
/// `<LF>.<CR><LF>` and `<CR><LF>.<LF>`, each followed by what a smuggler would send next.
const SMUGGLING_TEXT: &str = "Hello\r.\rMAIL FROM:<a@evil.example>\n.\nRCPT TO:<b@evil.example>\n.\r\nDATA\r\n.\nsmuggled\r\nthe end";

/// Publish one job whose text and html carry [`SMUGGLING_TEXT`], deliver it through a
/// relay behaving as `behaviour`, and check the raw bytes the relay received.
async fn smuggling_never_reaches(tag: &str, behaviour: Behaviour) {
    let ns = TestNamespace::new(tag, &["primary"], 1).await;
    let smtp = ScriptedSmtp::start(behaviour).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", smtp.port(), "")],
        &["1s"],
    ));
    let mut events = ns.events().await;
    let _worker = WorkerProcess::start(&config.path, &[]);
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
