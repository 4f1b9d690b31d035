//! A worker's memory is bounded by bytes, not only by a count of jobs: big jobs are
//! delivered (or set aside) without the worker's resident memory growing with its window
//! or with copies of each body. Peak resident memory is the kernel's `VmHWM`.

use std::time::Duration;

use sluice_shared::events::EventOutcome;
use sluice_tests::broker::{eventually, TestNamespace};
use sluice_tests::processes::{config_toml, ConfigFile, WorkerProcess};
use sluice_tests::smtp_sink::SmtpSink;

const MIB: usize = 1024 * 1024;

/// The contract: a worker fed fifty 8 MB jobs stays under this peak RSS.
const PEAK_RSS_LIMIT: usize = 128 * MIB;

/// A plain text of `size` bytes in 78-byte CRLF lines, as a big newsletter would be.
fn big_text(size: usize) -> String {
    let line = "The quick brown fox jumps over the lazy dog, and again, and again, and more.\r\n";
    let mut text = line.repeat(size / line.len() + 1);
    text.truncate(size);
    text
}

/// The worker's peak resident set size so far (`VmHWM` in `/proc/PID/status`), in bytes.
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kb: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_jobs_of_8_mb_are_delivered_under_128_mb_of_peak_rss() {
    let ns = TestNamespace::new("mem-big", &["primary"], 1).await;
    // smtp-sink has no message size limit; the worker's is raised above the jobs' size.
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&format!(
        "{}\n[worker]\nmax_message_bytes = {}\n",
        config_toml(&ns.name, &[("primary", sink.port, "")], &["1s"]),
        16 * MIB
    ));
    // All fifty wait in the queue before the worker starts: nothing but its own window
    // keeps it from taking them all at once. The relay has the default four connections.
    let text = big_text(8 * MIB);
    for i in 0..50 {
        let id = format!("big-{i}");
        let job = serde_json::json!({
            "id": id, "campaign": "test", "from": "news@example.com",
            "to": format!("{id}@example.org"), "subject": "A big one", "text": text,
        });
        ns.publish_raw("primary", &id, job.to_string().as_bytes())
            .await;
    }
    drop(text);
    let mut events = ns.events().await;
    let mut worker = WorkerProcess::start(&config.path, &[]);

    let all_final = events
        .wait_until(Duration::from_secs(600), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= 50
        })
        .await;
    let peak = peak_rss(worker.child.id());
    assert!(all_final, "not all 50 jobs ended: {:?}", events.seen);
    let delivered = events
        .finals()
        .iter()
        .filter(|e| e.outcome == EventOutcome::Delivered)
        .count();
    assert_eq!(delivered, 50, "{:?}", events.finals());
    assert!(
        eventually(Duration::from_secs(30), || async { sink.count() == 50 }).await,
        "the sink holds {} messages, not 50",
        sink.count()
    );
    worker.terminate();
    eprintln!("peak RSS of the worker: {} MiB", peak / MIB);
    assert!(
        peak < PEAK_RSS_LIMIT,
        "the worker peaked at {} MiB of resident memory for fifty 8 MiB jobs (limit {} MiB)",
        peak / MIB,
        PEAK_RSS_LIMIT / MIB
    );
}

/// A guard more than a proof: the worker already passed it before its bodies were bounded
/// in bytes (73 MiB then, about 67 now), since an oversized job is never parsed. It fails
/// if setting such jobs aside ever starts copying them per lane or holding many at once.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_jobs_over_max_message_bytes_are_set_aside_under_128_mb_of_peak_rss() {
    let ns = TestNamespace::new("mem-over", &["primary"], 1).await;
    let sink = SmtpSink::start().await;
    let config = ConfigFile::new(&format!(
        "{}\n[worker]\nmax_message_bytes = {}\n",
        config_toml(&ns.name, &[("primary", sink.port, "")], &["1s"]),
        4 * MIB
    ));
    // 12 MiB each, three times the limit: each is read, set aside whole (its body goes to
    // the dead queue for a replay), never parsed.
    let text = big_text(12 * MIB);
    for i in 0..20 {
        let id = format!("over-{i}");
        let job = serde_json::json!({
            "id": id, "campaign": "test", "from": "news@example.com",
            "to": format!("{id}@example.org"), "subject": "Too big", "text": text,
        });
        ns.publish_raw("primary", &id, job.to_string().as_bytes())
            .await;
    }
    drop(text);
    let dead_queue = ns.topology.dead_queue("primary");
    let mut worker = WorkerProcess::start(&config.path, &[]);

    let all_dead = eventually(Duration::from_secs(600), || async {
        ns.queue_len(&dead_queue).await >= 20
    })
    .await;
    let peak = peak_rss(worker.child.id());
    assert!(
        all_dead,
        "{} of 20 oversized jobs set aside",
        ns.queue_len(&dead_queue).await
    );
    assert_eq!(sink.count(), 0, "an oversized job reached the relay");
    worker.terminate();
    eprintln!("peak RSS of the worker: {} MiB", peak / MIB);
    assert!(
        peak < PEAK_RSS_LIMIT,
        "the worker peaked at {} MiB of resident memory setting aside twenty 12 MiB jobs \
         (limit {} MiB)",
        peak / MIB,
        PEAK_RSS_LIMIT / MIB
    );
}
