//! The README's quick start, run as a newcomer would paste it: from a copied example config
//! to a delivered sample campaign and its traces in an OTLP receiver.
//!
//! The block is read from README.md, so the test and the README cannot drift apart. Only
//! what would touch the machine beyond this test changes: the install lines are skipped
//! (the built binaries are on PATH instead), and the relay's port, smtp-sink's dump
//! directory, the OTLP endpoint and the AMQP namespace are this test's own.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::broker::TestNamespace;
use sluice_tests::otlp_receiver::OtlpReceiver;
use sluice_tests::processes::bin;
use sluice_tests::smtp_sink::free_port;

/// How long the whole block may take: a 20-recipient campaign on a loaded 2-core machine.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first ```sh block after the "## Quick start" heading.
fn quick_start_block(readme: &str) -> String {
    let section = readme
        .split("\n## Quick start")
        .nth(1)
        .expect("README.md has a '## Quick start' section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the quick start has a ```sh block");
    block.to_string()
}

/// Run `script` with bash in `dir`, in a process group of its own, killed whole after
/// `timeout`. Returns the exit code (None when killed) and the combined output.
fn run_script(
    script: &str,
    dir: &Path,
    path: &str,
    env: &[(&str, String)],
) -> (Option<i32>, String) {
    let log = dir.join("quick-start.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(std::fs::File::create(dir.join("quick-start.err")).expect("log file"))
        .process_group(0)
        .spawn()
        .expect("start bash");
    let deadline = Instant::now() + BLOCK_TIMEOUT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for bash") {
            break status.code();
        }
        if Instant::now() >= deadline {
            // The worker and smtp-sink run in the background: end the whole group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(dir.join("quick-start.err")).unwrap_or_default()
    );
    (code, output)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_quick_start_delivers_the_sample_campaign_and_its_traces() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let block = quick_start_block(&readme);
    let receiver = OtlpReceiver::start().await;

    let dir = std::env::temp_dir().join(format!(
        "sluice-quick-start-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mail = dir.join("mail");
    std::fs::create_dir_all(&mail).expect("temp dir");
    std::os::unix::fs::symlink(root.join("deploy"), dir.join("deploy")).expect("link deploy/");
    let relay_port = free_port().to_string();

    // The block as written, but for what is this test's own.
    let mut lines = Vec::new();
    for line in block.lines() {
        if line.starts_with("bash deploy/services.sh") || line.starts_with("cargo install") {
            continue; // the test suite started the services and built the binaries
        }
        lines.push(
            line.replace("2525", &relay_port)
                .replace("/tmp/mail-", &format!("{}/", mail.display()))
                .replace("http://127.0.0.1:4317", &receiver.grpc_endpoint()),
        );
    }
    let needed = [
        "sluice-worker check",
        "sluice-worker --config",
        "send --config",
        "status",
    ];
    for word in needed {
        assert!(
            lines.iter().any(|l| l.contains(word)),
            "the quick start no longer has {word:?}:\n{block}"
        );
    }
    // Stop what the block started in the background (the worker finishes its jobs and
    // flushes its spans on SIGTERM) before bash exits.
    let script = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{}\n",
        lines.join("\n")
    );

    let bin_dir = bin("sluice-worker").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Removed with its queues when the test ends.
    let ns = TestNamespace::attach(
        sluice_tests::broker::AMQP_URL,
        &TestNamespace::fresh_name("quick-start"),
        &["primary"],
        5,
    )
    .await;
    let env = [("SLUICE__AMQP__NAMESPACE", ns.name.clone())];
    let (code, output) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || run_script(&script, &dir, &path, &env)
    })
    .await
    .expect("run the block");
    assert_eq!(code, Some(0), "the quick start failed\n{output}");

    // Every recipient of the sample got its mail.
    let recipients = std::fs::read_to_string(root.join("deploy/sample/recipients.csv"))
        .expect("sample recipients");
    let rows = recipients
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    let delivered = std::fs::read_dir(&mail).expect("mail dir").count();
    assert_eq!(delivered, rows, "mail caught by smtp-sink\n{output}");
    assert!(
        output.contains("delivered"),
        "status says nothing delivered\n{output}"
    );

    // Each delivery is a trace: the producer's publish span and the worker's process span
    // share a trace id.
    let spans = receiver
        .wait_for_spans(Duration::from_secs(20), |spans| {
            spans
                .iter()
                .filter(|s| s.service == "sluice-worker" && s.name.starts_with("process "))
                .count()
                >= rows
        })
        .await;
    let published: std::collections::HashSet<&str> = spans
        .iter()
        .filter(|s| s.service == "sluice-producer" && s.name.starts_with("publish "))
        .map(|s| s.trace_id.as_str())
        .collect();
    let processed: Vec<&str> = spans
        .iter()
        .filter(|s| s.service == "sluice-worker" && s.name.starts_with("process "))
        .map(|s| s.trace_id.as_str())
        .collect();
    assert!(
        processed.len() >= rows,
        "worker spans: {}\n{output}",
        processed.len()
    );
    assert!(
        processed.iter().all(|id| published.contains(id)),
        "a worker span is not in a trace the producer started"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
