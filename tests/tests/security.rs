//! Security: TLS to relays (STARTTLS required, implicit TLS, verification on by default),
//! SMTP AUTH, and secrets that never reach any output. The relay is aiosmtpd, a real SMTP
//! server with TLS and AUTH, with a certificate from a CA generated for each test.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use sluice_shared::events::EventOutcome;
use sluice_tests::aiosmtpd::{Aiosmtpd, Mode};
use sluice_tests::app::TestApp;
use sluice_tests::broker::rabbitmqctl;
use sluice_tests::broker::{eventually, EventTap, TestNamespace};
use sluice_tests::processes::{config_toml, Binary, ConfigFile};
use sluice_tests::tls::{TestPki, TlsProxy};
use sluice_tests::wait::{holds_throughout, wait_until};

const USER: &str = "sluice-relay-user";
const PASSWORD: &str = "Rel4yPassw0rd-7c1e";

#[tokio::test(flavor = "multi_thread")]
async fn starttls_and_auth_with_a_private_ca_deliver_over_an_encrypted_authenticated_session() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), Some((USER, PASSWORD))).await;
    let app = TestApp::builder("sec-starttls")
        .relay_at(
            "primary",
            relay.port,
            &tls_lines("starttls", Some(&pki), Some(PASSWORD)),
        )
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "info")],
    );

    ns.publish_jobs("primary", "tls", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "no outcome; worker said:\n{}",
        worker.text()
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Delivered,
        "{:?}",
        events.seen
    );
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].tls, "the message came in clear");
    assert_eq!(messages[0].auth_user.as_deref(), Some(USER));
    assert_eq!(messages[0].rcpt_tos, ["tls-0@example.org"]);
    // Nothing but EHLO and STARTTLS before the session was encrypted.
    let commands = relay.commands();
    let clear: Vec<&String> = commands.iter().filter(|c| c.ends_with("tls=0")).collect();
    assert!(
        clear
            .iter()
            .all(|c| c.contains(" EHLO ") || c.contains(" STARTTLS ")),
        "{commands:?}"
    );
    assert!(
        commands.iter().any(|c| c.contains(" STARTTLS tls=0")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains(" AUTH-RESULT PLAIN ok tls=1")
                || c.contains(" AUTH-RESULT LOGIN ok tls=1")),
        "{commands:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_with_a_private_ca_delivers() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Tls, Some(&pki), Some((USER, PASSWORD))).await;
    let app = TestApp::builder("sec-tls")
        .relay_at(
            "primary",
            relay.port,
            &tls_lines("tls", Some(&pki), Some(PASSWORD)),
        )
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "info")],
    );

    ns.publish_jobs("primary", "implicit", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "no outcome; worker said:\n{}",
        worker.text()
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Delivered,
        "{:?}",
        events.seen
    );
    let messages = relay.messages();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].tls);
    assert_eq!(messages[0].auth_user.as_deref(), Some(USER));
    let commands = relay.commands();
    assert!(
        commands.iter().all(|c| c.ends_with("tls=1")),
        "{commands:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_verified_by_default_and_a_relay_with_an_unknown_ca_is_down() {
    // The same kind of servers as above, but the worker is not told about their CA.
    let pki = TestPki::generate();
    let starttls = Aiosmtpd::start(Mode::Starttls, Some(&pki), None).await;
    let implicit = Aiosmtpd::start(Mode::Tls, Some(&pki), None).await;
    let app = TestApp::builder("sec-verify")
        .relay_at(
            "viastarttls",
            starttls.port,
            &tls_lines("starttls", None, None),
        )
        .relay_at("viatls", implicit.port, &tls_lines("tls", None, None))
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "info")],
    );

    ns.publish_jobs("viastarttls", "unverified-a", 1).await;
    ns.publish_jobs("viatls", "unverified-b", 1).await;

    for name in ["viastarttls", "viatls"] {
        let needle = format!("relay {name} refused the session");
        worker.wait_for(&needle, Duration::from_secs(30)).await;
    }
    let log = worker.text();
    assert!(log.contains("relay marked down"), "{log}");
    for line in log.lines().filter(|l| l.contains("refused the session")) {
        assert!(
            line.contains("invalid peer certificate") && line.contains("UnknownIssuer"),
            "{line}"
        );
    }
    // Probed again and again through 1 s cool-offs, never delivered, never dead. Later
    // probes are logged at debug level only; the STARTTLS relay sees each one's EHLO.
    holds_throughout(
        || async { starttls.messages().is_empty() && implicit.messages().is_empty() },
        Duration::from_secs(4),
        "no message at either relay through four 1 s cool-offs",
    )
    .await;
    let probes = starttls
        .commands()
        .iter()
        .filter(|c| c.contains(" EHLO "))
        .count();
    assert!(
        probes >= 2,
        "the STARTTLS relay was probed {probes} time(s)"
    );
    assert_relay_fault_kept_the_jobs(ns, &mut events, &["viastarttls", "viatls"]).await;
    assert!(starttls.messages().is_empty() && implicit.messages().is_empty());
    for commands in [starttls.commands(), implicit.commands()] {
        assert!(
            commands
                .iter()
                .all(|c| c.contains(" EHLO ") || c.contains(" STARTTLS ")),
            "{commands:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skipping_verification_delivers_and_says_so_at_start() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), None).await;
    let extra = format!(
        "{}tls_insecure_skip_verify = true\n",
        tls_lines("starttls", None, None)
    );
    let app = TestApp::builder("sec-insecure")
        .relay_at("primary", relay.port, &extra)
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    // At `warn`, the level a quiet production worker runs at.
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "warn")],
    );

    worker
        .wait_for("tls_insecure_skip_verify", Duration::from_secs(20))
        .await;
    assert!(worker.text().contains("NOT verified"), "{}", worker.text());
    ns.publish_jobs("primary", "insecure", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Delivered,
        "{:?}",
        events.seen
    );
    assert_eq!(relay.messages().len(), 1);
    assert!(relay.messages()[0].tls);
}

#[tokio::test(flavor = "multi_thread")]
async fn required_starttls_never_talks_in_clear_to_a_relay_that_does_not_offer_it() {
    // A plain server that offers AUTH in clear: a lax client would log in and send.
    let relay = Aiosmtpd::start(Mode::Plain, None, Some((USER, PASSWORD))).await;
    let app = TestApp::builder("sec-nostarttls")
        .relay_at(
            "primary",
            relay.port,
            &tls_lines("starttls", None, Some(PASSWORD)),
        )
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "info")],
    );

    ns.publish_jobs("primary", "clear", 1).await;

    assert!(
        eventually(Duration::from_secs(30), || async {
            !relay.commands().is_empty()
        })
        .await,
        "the worker never tried the relay:\n{}",
        worker.text()
    );
    // Cool-offs of 1 s: several sessions are tried.
    wait_until(
        || async {
            relay
                .commands()
                .iter()
                .filter(|c| c.contains(" EHLO "))
                .count()
                >= 3
        },
        Duration::from_secs(20),
        "three sessions tried with the relay",
    )
    .await;
    let commands = relay.commands();
    assert!(
        commands
            .iter()
            .all(|c| c.contains(" EHLO ") || c.contains(" QUIT ")),
        "something beyond EHLO went out in clear: {commands:?}"
    );
    assert!(
        worker.text().contains("STARTTLS is required"),
        "{}",
        worker.text()
    );
    assert!(relay.messages().is_empty());
    assert_relay_fault_kept_the_jobs(ns, &mut events, &["primary"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_marks_the_relay_down_and_bounces_nothing() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), Some((USER, PASSWORD))).await;
    let wrong = "Wr0ngPassw0rd-51d2";
    let app = TestApp::builder("sec-badpw")
        .relay_at(
            "primary",
            relay.port,
            &tls_lines("starttls", Some(&pki), Some(wrong)),
        )
        .workers(0)
        .start()
        .await;
    let (ns, config) = (&app.ns, &app.config);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "debug")],
    );

    ns.publish_jobs("primary", "badpw", 1).await;

    worker
        .wait_for("rejected our credentials", Duration::from_secs(30))
        .await;
    worker
        .wait_for("relay marked down", Duration::from_secs(30))
        .await;
    let log = worker.text();
    assert!(
        log.contains("relay marked down") && log.contains("535"),
        "{log}"
    );
    assert!(relay
        .commands()
        .iter()
        .any(|c| c.contains(" AUTH-RESULT PLAIN fail tls=1")
            || c.contains(" AUTH-RESULT LOGIN fail tls=1")));
    assert!(relay.messages().is_empty());
    assert_relay_fault_kept_the_jobs(ns, &mut events, &["primary"]).await;
    let output = worker.stop();
    assert_no_secret(
        &output,
        &[(USER, wrong)],
        "worker with a wrong relay password",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_can_come_from_a_file() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), Some((USER, PASSWORD))).await;
    let ns = TestNamespace::new("sec-pwfile", &["primary"], 1).await;
    let secrets = ConfigFile::new("");
    // As a container secret is mounted: the value and a trailing newline.
    let password_file = secrets.write("relay-password", format!("{PASSWORD}\n"));
    let extra = format!(
        "{}username = \"{USER}\"\npassword_file = {:?}\n",
        tls_lines("starttls", Some(&pki), None),
        path(&password_file)
    );
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[("primary", relay.port, &extra)],
        &["1s"],
    ));
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "info")],
    );

    ns.publish_jobs("primary", "pwfile", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "{}",
        worker.text()
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Delivered,
        "{:?}",
        events.seen
    );
    assert_eq!(relay.messages().len(), 1);
    assert_eq!(relay.messages()[0].auth_user.as_deref(), Some(USER));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_output_of_a_trace_level_run() {
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), Some((USER, PASSWORD))).await;
    let broker_user = RabbitUser::create();
    let ns = TestNamespace::new("sec-trace", &["primary", "badauth"], 1).await;
    let wrong = "Wr0ngPassw0rd-93fa";
    let mut toml = config_toml(
        &ns.name,
        &[
            (
                "primary",
                relay.port,
                &tls_lines("starttls", Some(&pki), Some(PASSWORD)),
            ),
            (
                "badauth",
                relay.port,
                &tls_lines("starttls", Some(&pki), Some(wrong)),
            ),
        ],
        &["1s"],
    );
    toml = toml.replace(sluice_tests::broker::AMQP_URL, &broker_user.url());
    let config = ConfigFile::new(&toml);
    let mut events = ns.events().await;
    // `trace` for everything, plus directives that name the chatty dependencies by their
    // module paths: the caps on them must hold whatever RUST_LOG says.
    let rust_log = "trace,lapin=trace,lapin::io_loop=trace,amq_protocol_tcp=trace,\
                    amq_protocol=trace,lettre=trace,lettre::transport::smtp=trace";
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", rust_log)],
    );

    ns.publish_jobs("primary", "trace", 1).await;
    ns.publish_jobs("badauth", "trace-bad", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "{}",
        worker.text()
    );
    assert_eq!(events.seen[0].outcome, EventOutcome::Delivered);
    worker
        .wait_for("rejected our credentials", Duration::from_secs(30))
        .await;

    // The producer, with the same broker credentials in its URL.
    let recipients = config.write("recipients.csv", "email\nsomeone@example.org\n");
    let text = config.write("body.txt", "Hello\n");
    let producer = Captured::spawn(
        "sluice-producer",
        &[
            "--config",
            path(&config.path),
            "send",
            "--relay",
            "primary",
            "--recipients",
            path(&recipients),
            "--from",
            "news@example.com",
            "--subject",
            "Hi",
            "--text",
            path(&text),
        ],
        &[("RUST_LOG", rust_log)],
    );
    let (status, producer_output) = producer.wait();
    assert!(status.success(), "{producer_output}");
    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| seen.len() >= 2)
            .await,
        "{}",
        worker.text()
    );

    let worker_output = worker.stop();
    // The run was really at trace level: otherwise this test would prove nothing.
    assert!(
        worker_output.contains("TRACE") || worker_output.contains("DEBUG"),
        "{worker_output}"
    );
    assert!(worker_output.contains("rejected our credentials"));
    // The protocol chatter of the AMQP and SMTP libraries stays capped, even when RUST_LOG
    // names their modules: no line below WARN from their targets ("lapin::io_loop:").
    for output in [&worker_output, &producer_output] {
        for line in output.lines() {
            let below_warn = ["TRACE", "DEBUG", "INFO"].iter().any(|l| line.contains(l));
            let from_capped = line.split_whitespace().any(|word| {
                word.ends_with(':')
                    && ["lapin", "amq_protocol", "lettre"]
                        .iter()
                        .any(|t| word.starts_with(t))
            });
            assert!(
                !(below_warn && from_capped),
                "a capped dependency logged: {line}"
            );
        }
    }
    let secrets = [
        (USER, PASSWORD),
        (USER, wrong),
        (broker_user.name.as_str(), broker_user.password.as_str()),
    ];
    assert_no_secret(&worker_output, &secrets, "worker at RUST_LOG=trace");
    assert_no_secret(&producer_output, &secrets, "producer at RUST_LOG=trace");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_reported_without_the_password_in_its_url() {
    let url = "amqp://sluice:S3cr3tPw@127.0.0.1:1/%2f";
    let config = ConfigFile::new(&format!(
        "[amqp]\nurl = \"{url}\"\nnamespace = \"sec-unreachable\"\n\n[relays.primary]\nport = 2525\n"
    ));
    let recipients = config.write("recipients.csv", "email\nsomeone@example.org\n");
    let text = config.write("body.txt", "Hello\n");
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "trace")],
    );
    let producer = Captured::spawn(
        "sluice-producer",
        &[
            "send",
            "--config",
            path(&config.path),
            "--recipients",
            path(&recipients),
            "--from",
            "news@example.com",
            "--subject",
            "Hi",
            "--text",
            path(&text),
        ],
        &[("RUST_LOG", "trace")],
    );
    for (name, process) in [("worker", &worker), ("producer", &producer)] {
        process
            .wait_for("RabbitMQ not reachable", Duration::from_secs(20))
            .await;
        assert!(
            process.text().contains("sluice:***@127.0.0.1:1"),
            "{name}: {}",
            process.text()
        );
    }
    let secrets = [("sluice", "S3cr3tPw")];
    assert_no_secret(&worker.stop(), &secrets, "worker, unreachable broker");
    assert_no_secret(&producer.stop(), &secrets, "producer, unreachable broker");
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_a_private_ca_reaches_the_broker_and_an_unknown_ca_does_not() {
    // The real broker behind a TLS-terminating proxy: an amqps:// endpoint with a
    // certificate from a private CA.
    let pki = TestPki::generate();
    let proxy = TlsProxy::start(&pki, "127.0.0.1:5672").await;
    let relay = Aiosmtpd::start(Mode::Plain, None, None).await;
    let ns = TestNamespace::new("sec-amqps", &["primary"], 1).await;
    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let toml = config_toml(&ns.name, &[("primary", relay.port, "")], &["1s"])
        .replace(sluice_tests::broker::AMQP_URL, &amqps);
    let with_ca = ConfigFile::new(&toml.replace(
        "[amqp]\n",
        &format!("[amqp]\nca_file = {:?}\n", path(&pki.ca_cert)),
    ));
    let without_ca = ConfigFile::new(&toml);
    let recipients = with_ca.write("recipients.csv", "email\nsomeone@example.org\n");
    let text = with_ca.write("body.txt", "Hello\n");
    let send = |config: &Path| {
        [
            "send",
            "--config",
            path(config),
            "--recipients",
            path(&recipients),
            "--from",
            "news@example.com",
            "--subject",
            "Hi",
            "--text",
            path(&text),
        ]
        .map(str::to_string)
    };

    // Without the CA: the broker's certificate is refused, nothing is published.
    let args = send(&without_ca.path);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = Captured::spawn("sluice-producer", &args, &[("RUST_LOG", "info")]);
    refused
        .wait_for("RabbitMQ not reachable", Duration::from_secs(20))
        .await;
    let refused = refused.stop();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    assert_eq!(proxy.handshakes(), 0);

    // With it: published through TLS, and a worker on amqps delivers it.
    let args = send(&with_ca.path);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let producer = Captured::spawn("sluice-producer", &args, &[("RUST_LOG", "info")]);
    // Waited for off the runtime's threads: the proxy runs on them.
    let (status, output) = tokio::task::spawn_blocking(move || producer.wait())
        .await
        .expect("wait for the producer");
    assert!(status.success(), "{output}");
    assert!(proxy.handshakes() >= 1);
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&with_ca.path)],
        &[("RUST_LOG", "info")],
    );
    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "{}",
        worker.text()
    );
    assert_eq!(events.seen[0].outcome, EventOutcome::Delivered);
    assert_eq!(relay.messages().len(), 1);
    assert!(
        proxy.handshakes() >= 2,
        "the worker did not come through TLS"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_broker_ca_file_stops_the_worker_naming_the_file() {
    let config = ConfigFile::new(
        "[amqp]\nurl = \"amqps://sluice:S3cr3tPw@127.0.0.1:5671/%2f\"\n\
         ca_file = \"/nonexistent/sluice/broker-ca.pem\"\n\n[relays.primary]\nport = 2525\n",
    );
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[("RUST_LOG", "debug")],
    );
    let (status, output) = worker.wait_at_most(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{output}");
    assert!(
        output.contains("amqp.ca_file /nonexistent/sluice/broker-ca.pem"),
        "{output}"
    );
    assert_no_secret(
        &output,
        &[("sluice", "S3cr3tPw")],
        "worker with a missing CA file",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn help_and_configuration_errors_show_no_secret() {
    let url = "amqp://sluice:S3cr3tPw@127.0.0.1:5672/%2f";
    let env = [
        ("SLUICE__AMQP__URL", url),
        ("SLUICE__RELAYS__PRIMARY__USERNAME", USER),
        ("SLUICE__RELAYS__PRIMARY__PASSWORD", PASSWORD),
    ];
    let secrets = [("sluice", "S3cr3tPw"), (USER, PASSWORD)];
    for (binary, args) in [
        ("sluice-worker", &["--help"][..]),
        ("sluice-producer", &["--help"][..]),
        ("sluice-producer", &["send", "--help"][..]),
        ("sluice-producer", &["dead", "list", "--help"][..]),
    ] {
        let output = run(binary, args, &env);
        assert!(output.status.success(), "{binary} {args:?}");
        let text = output_text(&output);
        assert!(text.contains("Usage"), "{text}");
        assert_no_secret(&text, &secrets, &format!("{binary} {args:?}"));
    }

    // The effective configuration, printed with its secrets masked.
    let printed = run("sluice-worker", &["print-config"], &env);
    let text = output_text(&printed);
    assert!(printed.status.success(), "{text}");
    assert!(text.contains("sluice:***@127.0.0.1"), "{text}");
    assert_no_secret(&text, &secrets, "sluice-worker print-config");

    // Configuration errors, each in a config that holds secrets.
    let with_secrets = |relay_extra: &str| {
        format!(
            "[amqp]\nurl = \"{url}\"\n\n[relays.primary]\nusername = \"{USER}\"\n\
             password = \"{PASSWORD}\"\n{relay_extra}\n"
        )
    };
    let cases = [
        ("an invalid port", with_secrets("port = 70000"), "port"),
        ("a mistyped key", with_secrets("prot = 2525"), "prot"),
        (
            "password and password_file",
            with_secrets("password_file = \"/run/secrets/pw\""),
            "password_file",
        ),
        // A TOML syntax error on the very line that holds the password.
        (
            "a syntax error next to the password",
            format!(
                "[relays.primary]\nusername = \"{USER}\"\npassword = \"{PASSWORD}\" port = 25\n"
            ),
            "line 3",
        ),
        // A URL without its scheme, with a password in it.
        (
            "a URL without a scheme",
            "[amqp]\nurl = \"sluice:S3cr3tPw@127.0.0.1:5672/%2f\"\n".to_string(),
            "amqp.url",
        ),
        // A URL that is not AMQP, with a password in it.
        (
            "a non-AMQP URL",
            "[amqp]\nurl = \"http://sluice:S3cr3tPw@127.0.0.1/\"\n".to_string(),
            "amqp.url",
        ),
    ];
    for (what, toml, expected) in cases {
        let config = ConfigFile::new(&toml);
        for (binary, args) in [
            ("sluice-worker", &["--config", path(&config.path)][..]),
            (
                "sluice-producer",
                &["dead", "list", "--config", path(&config.path)][..],
            ),
        ] {
            let output = run(binary, args, &[("RUST_LOG", "trace")]);
            let text = output_text(&output);
            assert!(!output.status.success(), "{binary} accepted {what}: {text}");
            assert!(
                text.contains(expected),
                "{binary}, {what}: the error should name {expected:?}: {text}"
            );
            assert_no_secret(&text, &secrets, &format!("{binary}, {what}"));
        }
    }
}

// ---------------------------------------------------------------------------------------

/// The TOML lines of a relay with `tls`, the test CA (if given), and AUTH (if a password is
/// given); a short cool-off so that a relay marked down is probed again during the test.
fn tls_lines(tls: &str, pki: Option<&TestPki>, password: Option<&str>) -> String {
    let mut lines = format!("tls = \"{tls}\"\ndown_cooloff = \"1s\"\nconnect_timeout = \"5s\"\n");
    if let Some(pki) = pki {
        lines.push_str(&format!("ca_file = {:?}\n", path(&pki.ca_cert)));
    }
    if let Some(password) = password {
        lines.push_str(&format!(
            "username = \"{USER}\"\npassword = \"{password}\"\n"
        ));
    }
    lines
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A relay fault is no job's fault: every job is still in its relay's queue, none dead,
/// none with a final outcome.
async fn assert_relay_fault_kept_the_jobs(
    ns: &TestNamespace,
    events: &mut EventTap,
    relays: &[&str],
) {
    events
        .holds_throughout(
            |seen| seen.iter().all(|e| !e.outcome.is_final()),
            Duration::from_secs(1),
            "no final outcome among the events of the relay's faults, read for 1 s after them",
        )
        .await;
    for relay in relays {
        let jobs = ns.topology.jobs_queue(relay);
        assert!(
            eventually(Duration::from_secs(10), || async {
                ns.queue_len(&jobs).await == 1
            })
            .await,
            "{relay}: the job is not back in its queue"
        );
        assert_eq!(
            ns.queue_len(&ns.topology.dead_queue(relay)).await,
            0,
            "{relay}"
        );
    }
}

/// Fail if `output` holds any password of `credentials` (user, password) in clear, in
/// base64 on its own (AUTH LOGIN), or as an `AUTH PLAIN` response (base64 of
/// `\0user\0password`).
fn assert_no_secret(output: &str, credentials: &[(&str, &str)], what: &str) {
    // Unpadded forms: a substring of the padded one, so this catches both.
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
    for (user, password) in credentials {
        let forms = [
            password.to_string(),
            b64(password.as_bytes()),
            b64(format!("\0{user}\0{password}").as_bytes()),
            b64(format!("{user}\0{user}\0{password}").as_bytes()),
        ];
        for form in forms {
            if let Some(at) = output.find(&form) {
                let line = output[..at].rsplit('\n').next().unwrap_or("");
                panic!("{what}: a secret ({form}) is in the output, on the line starting {line:?}");
            }
        }
    }
}

/// A process whose stdout and stderr are captured together, killed when dropped.
struct Captured {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Captured {
    fn spawn(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Binary::new(binary)
            .command()
            .args(args)
            .envs(env.iter().copied())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for mut stream in [stdout, stderr] {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut buffer = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .expect("output lock")
                        .push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            }));
        }
        Self {
            child,
            output,
            readers,
        }
    }

    /// Everything printed so far.
    fn text(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Wait until the output contains `needle`; panics with the output after `timeout`.
    async fn wait_for(&self, needle: &str, timeout: Duration) {
        let found = eventually(timeout, || async { self.text().contains(needle) }).await;
        assert!(
            found,
            "no {needle:?} within {timeout:?} in the output:\n{}",
            self.text()
        );
    }

    /// SIGTERM, wait for the exit, and return everything printed.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.finish().1
    }

    /// Wait for the process to exit on its own.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let (status, text) = self.finish();
        (status.expect("exit status"), text)
    }

    /// Wait up to `timeout` for the process to exit on its own (killed after that).
    fn wait_at_most(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.finish();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let (_, text) = self.finish();
        (None, text)
    }

    fn finish(&mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.child.wait().ok();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        (status, self.text())
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a binary to completion.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Binary::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .output()
}

fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A RabbitMQ user with a distinctive password, for as long as a test needs it.
struct RabbitUser {
    name: String,
    password: String,
}

impl RabbitUser {
    fn create() -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let user = Self {
            name: format!("sluice-sec-{tag}"),
            password: format!("AmqpPassw0rd{tag}"),
        };
        for args in [
            &["add_user", &user.name, &user.password][..],
            &["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"],
        ] {
            rabbitmqctl(args).unwrap_or_else(|e| panic!("{e}"));
        }
        user
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_user", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_demanding_authentication_we_do_not_offer_is_down_not_a_bounce() {
    use sluice_tests::app::TestApp;
    use sluice_tests::scripted_smtp::Behaviour;

    // The relay wants AUTH; our settings carry no credentials, so MAIL gets 530.
    let app = TestApp::builder("sec-530")
        .relay(
            "primary",
            Behaviour::auth_required("relay-user", "relay-pass"),
            "down_cooloff = \"1s\"",
        )
        .start()
        .await;
    let (ns, smtp) = (&app.ns, app.relay("primary"));
    let mut events = ns.events().await;
    ns.publish_jobs("primary", "needs-auth", 1).await;

    assert!(
        eventually(Duration::from_secs(10), || async {
            smtp.sessions_total() >= 2
        })
        .await
    );
    assert_relay_fault_kept_the_jobs(ns, &mut events, &["primary"]).await;
    assert_eq!(smtp.accepted_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_given_by_environment_reach_the_relay_verbatim() {
    // Both look like numbers: parsed as such they would reach the relay as 42 and 123.
    let (user, password) = ("0042", "0123");
    let pki = TestPki::generate();
    let relay = Aiosmtpd::start(Mode::Starttls, Some(&pki), Some((user, password))).await;
    let ns = TestNamespace::new("sec-envpw", &["primary"], 1).await;
    let config = ConfigFile::new(&config_toml(
        &ns.name,
        &[(
            "primary",
            relay.port,
            &tls_lines("starttls", Some(&pki), None),
        )],
        &["1s"],
    ));
    let mut events = ns.events().await;
    let worker = Captured::spawn(
        "sluice-worker",
        &["--config", path(&config.path)],
        &[
            ("RUST_LOG", "info"),
            ("SLUICE__RELAYS__PRIMARY__USERNAME", user),
            ("SLUICE__RELAYS__PRIMARY__PASSWORD", password),
        ],
    );

    ns.publish_jobs("primary", "envpw", 1).await;

    assert!(
        events
            .wait_until(Duration::from_secs(30), |seen| !seen.is_empty())
            .await,
        "{}",
        worker.text()
    );
    assert_eq!(
        events.seen[0].outcome,
        EventOutcome::Delivered,
        "{:?}\n{}",
        events.seen,
        worker.text()
    );
    assert_eq!(relay.messages().len(), 1);
    assert_eq!(relay.messages()[0].auth_user.as_deref(), Some(user));
}
