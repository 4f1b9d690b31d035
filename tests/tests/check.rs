//! `sluice-worker check` tries a configuration against the real broker and relays before
//! the first campaign: one line per check, exit 0 only when every check passed, nothing
//! declared and nothing sent.

use sluice_tests::aiosmtpd::{Aiosmtpd, Mode};
use sluice_tests::broker::{TestNamespace, AMQP_URL};
use sluice_tests::processes::{config_toml, Binary, ConfigFile};
use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
use sluice_tests::smtp_sink::free_port;
use sluice_tests::tls::TestPki;

/// Run `sluice-worker check --config <config>` off the async runtime; (exit code, stdout).
async fn check(config: &ConfigFile) -> (i32, String) {
    let path = config.path.clone();
    let run = tokio::task::spawn_blocking(move || {
        Binary::new("sluice-worker")
            .arg("check")
            .config(&path)
            .env("RUST_LOG", "error")
            .run()
    })
    .await
    .expect("join");
    (run.code.unwrap_or(-1), run.stdout)
}

/// The line of `stdout` about `what`.
fn line<'a>(stdout: &'a str, what: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line about {what}:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_setup_passes_every_check_and_declares_nothing() {
    let name = TestNamespace::fresh_name("check-ok");
    let smtp = ScriptedSmtp::start(Behaviour::auth_required("sluice", "0pen-sesame")).await;
    let config = ConfigFile::new(&config_toml(
        &name,
        &[(
            "primary",
            smtp.port(),
            "username = \"sluice\"\npassword = \"0pen-sesame\"\n",
        )],
        &["1s"],
    ));

    let (code, stdout) = check(&config).await;

    assert_eq!(code, 0, "{stdout}");
    assert!(line(&stdout, "broker").starts_with("ok"), "{stdout}");
    let queue = line(&stdout, &format!("queue {name}.jobs.primary"));
    assert!(queue.contains("not declared yet"), "{stdout}");
    let relay = line(&stdout, "relay primary");
    assert!(
        relay.starts_with("ok") && relay.contains("AUTH"),
        "{stdout}"
    );
    assert!(!stdout.contains("0pen-sesame"), "{stdout}");
    assert_eq!(smtp.auth_successes(), 1);
    assert_eq!(smtp.accepted_count(), 0, "check sends nothing");
    // Nothing was declared: the jobs queue still does not exist.
    let ns = TestNamespace::attach(AMQP_URL, &name, &[], 0).await;
    assert!(
        !ns.queue_exists(&ns.topology.jobs_queue("primary")).await,
        "check declared a queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_a_bad_certificate_and_a_closed_port_each_fail_by_name() {
    let name = TestNamespace::fresh_name("check-bad");
    let locked = ScriptedSmtp::start(Behaviour::auth_required("sluice", "right")).await;
    // A relay whose certificate comes from a CA the worker is not told about.
    let pki = TestPki::generate();
    let untrusted = Aiosmtpd::start(Mode::Starttls, Some(&pki), None).await;
    let closed = free_port();
    let config = ConfigFile::new(&config_toml(
        &name,
        &[
            (
                "locked",
                locked.port(),
                "username = \"sluice\"\npassword = \"wrong\"\n",
            ),
            (
                "untrusted",
                untrusted.port,
                "tls = \"starttls\"\nconnect_timeout = \"5s\"\n",
            ),
            ("closed", closed, "connect_timeout = \"2s\"\n"),
        ],
        &["1s"],
    ));

    let (code, stdout) = check(&config).await;

    assert_eq!(code, 1, "{stdout}");
    assert!(line(&stdout, "broker").starts_with("ok"), "{stdout}");
    let locked_line = line(&stdout, "relay locked");
    assert!(
        locked_line.starts_with("FAILED") && locked_line.contains("credentials"),
        "{stdout}"
    );
    let untrusted_line = line(&stdout, "relay untrusted");
    assert!(
        untrusted_line.starts_with("FAILED")
            && untrusted_line.to_lowercase().contains("certificate"),
        "{stdout}"
    );
    let closed_line = line(&stdout, "relay closed");
    assert!(
        closed_line.starts_with("FAILED") && closed_line.contains("connect"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("wrong"),
        "a password was printed:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_the_wrong_type_and_a_dead_broker_url_fail_by_name() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let smtp = ScriptedSmtp::start(Behaviour::accept_all()).await;
    let ns = TestNamespace::attach(AMQP_URL, &TestNamespace::fresh_name("check-old"), &[], 0).await;
    // The dead queue as an older sluice declared it: classic.
    let mut classic = FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    let dead = ns.topology.dead_queue("primary");
    ns.channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            classic,
        )
        .await
        .expect("declare an old-style dead queue");
    let dead_port = free_port();
    let nobody = format!("amqp://guest:S3cret@127.0.0.1:{dead_port}/%2f");
    let toml = config_toml(&ns.name, &[("primary", smtp.port(), "")], &["1s"])
        .replace(AMQP_URL, &format!("{nobody},{AMQP_URL}"));
    let config = ConfigFile::new(&toml);

    let (code, stdout) = check(&config).await;

    assert_eq!(code, 1, "{stdout}");
    let dead_line = line(&stdout, &format!("queue {dead}"));
    assert!(
        dead_line.starts_with("FAILED") && dead_line.contains("classic"),
        "{stdout}"
    );
    let nobody_line = line(&stdout, &format!("127.0.0.1:{dead_port}"));
    assert!(nobody_line.starts_with("FAILED"), "{stdout}");
    assert!(!stdout.contains("S3cret"), "{stdout}");
    assert!(line(&stdout, "relay primary").starts_with("ok"), "{stdout}");
    let _ = ns
        .channel
        .queue_delete(dead.as_str().into(), Default::default())
        .await;
}
