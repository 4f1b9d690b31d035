//! Self-tests of the scripted SMTP server, driven by raw sockets and smtplib.

use std::time::{Duration, Instant};

use base64::Engine as _;
use sluice_tests::scripted_smtp::{Behaviour, Mode, Phase, ScriptedSmtp};
use sluice_tests::wait::wait_until;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// Held for reading while a server binds port 0, and for writing by the test
/// that checks a shut-down server's port is closed: otherwise a test running
/// in parallel may be handed that very port by the kernel.
static BIND: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn start(behaviour: Behaviour) -> ScriptedSmtp {
    let _bind = BIND.read().await;
    ScriptedSmtp::start(behaviour).await
}

/// A minimal SMTP client over a raw socket, so the tests see exact replies.
struct Client {
    io: BufReader<TcpStream>,
}

impl Client {
    /// Connects without reading the greeting.
    async fn connect_raw(smtp: &ScriptedSmtp) -> Client {
        let stream = TcpStream::connect(smtp.addr()).await.expect("connect");
        Client {
            io: BufReader::new(stream),
        }
    }

    /// Connects and checks the 220 greeting.
    async fn connect(smtp: &ScriptedSmtp) -> Client {
        let mut c = Self::connect_raw(smtp).await;
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "greeting: {greeting:?}");
        c
    }

    /// Reads one (possibly multi-line) reply, lines joined with `\n`.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(T, self.io.read_line(&mut line))
                .await
                .expect("reply timed out")
                .expect("read reply");
            assert!(n > 0, "connection closed, replies so far: {lines:?}");
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.io.get_mut().write_all(raw).await.expect("write");
    }

    /// Sends one command line and returns the reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends one command and asserts the reply code.
    async fn expect(&mut self, line: &str, code: &str) -> String {
        let reply = self.cmd(line).await;
        assert!(
            reply.starts_with(code),
            "{line:?} expected {code}, got {reply:?}"
        );
        reply
    }

    /// Reads until EOF (or reset) and returns what came; fails on timeout.
    async fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(T, self.io.read_to_end(&mut rest))
            .await
            .expect("server did not close the connection");
        rest
    }

    /// A whole transaction from MAIL to the end-of-data reply.
    async fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        self.expect(&format!("MAIL FROM:<{from}>"), "250").await;
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), "250").await;
        }
        self.expect("DATA", "354").await;
        self.send(body.as_bytes()).await;
        self.cmd(".").await
    }
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Runs a Python snippet (with `port` defined) off the runtime threads.
async fn python(port: u16, code: &str) -> std::process::Output {
    let code = format!("import smtplib, sys\nport = {port}\n{code}");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(code)
            .output()
            .expect("run /usr/bin/python3")
    })
    .await
    .expect("join python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_and_records_content() {
    let smtp = start(Behaviour::accept_all()).await;
    assert_eq!(smtp.addr().ip().to_string(), "127.0.0.1");
    assert_eq!(smtp.addr().port(), smtp.port());
    let mut c = Client::connect(&smtp).await;
    let ehlo = c.expect("ehlo client.test", "250").await;
    assert_eq!(
        ehlo,
        "250-scripted-smtp.test\n250-PIPELINING\n250-8BITMIME\n250-SMTPUTF8\n250 SIZE 52428800"
    );
    c.expect(
        "mail from:<Sender@Example.com> SIZE=123 BODY=8BITMIME",
        "250",
    )
    .await;
    c.expect("RCPT TO:<a@example.com> NOTIFY=NEVER", "250")
        .await;
    c.expect("Rcpt To: <b@example.com>", "250").await;
    c.expect("data", "354").await;
    // Dot-stuffed lines, a bare-LF line, and a line that is only "..".
    c.send(b"Subject: hi\r\n\r\n..leading dot\r\nbare lf\n..\r\n.\r\n")
        .await;
    let end = c.reply().await;
    assert!(end.starts_with("250 "), "end of data: {end:?}");
    c.expect("NOOP", "250").await;
    c.expect("VRFY someone", "502").await;
    c.expect("RSET", "250").await;
    c.expect("QUIT", "221").await;
    assert!(c.read_to_close().await.is_empty());

    let got = smtp.accepted();
    assert_eq!(got.len(), 1);
    assert_eq!(smtp.accepted_count(), 1);
    assert_eq!(got[0].mail_from, "Sender@Example.com");
    assert_eq!(got[0].rcpt_to, vec!["a@example.com", "b@example.com"]);
    assert_eq!(
        got[0].data,
        b"Subject: hi\r\n\r\n.leading dot\r\nbare lf\n.\r\n".to_vec()
    );
    assert_eq!(got[0].auth_user, None);
    assert_eq!(got[0].session, 1);
    assert_eq!(smtp.rcpt_attempts("A@example.com"), 1);
    wait_until(|| async { smtp.sessions_open() == 0 }, T, "session close").await;
    assert_eq!(smtp.sessions_total(), 1);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_order_errors_and_large_message() {
    let smtp = start(Behaviour::default()).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("MAIL FROM:<a@b>", "503").await; // before EHLO
    c.expect("HELO client.test", "250").await;
    c.expect("RCPT TO:<a@b>", "503").await; // before MAIL
    c.expect("DATA", "503").await;
    c.expect("MAIL FROM a@b", "501").await;
    c.expect("MAIL FROM:<>", "250").await; // null sender
    c.expect("MAIL FROM:<x@y>", "503").await; // nested
    c.expect("DATA", "554").await; // no recipients
    c.expect("RCPT TO:<big@example.com>", "250").await;
    c.expect("DATA", "354").await;
    let line = format!("{}\r\n", "x".repeat(998));
    let body = line.repeat(3 * 1024); // ~3 MB
    c.send(body.as_bytes()).await;
    c.expect(".", "250").await;
    // A second message on the same connection.
    let reply = c
        .send_mail("s@example.com", &["t@example.com"], "hi\r\n")
        .await;
    assert!(reply.starts_with("250"), "{reply:?}");
    c.expect("QUIT", "221").await;

    let got = smtp.accepted();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].data.len(), body.len());
    assert_eq!(got[0].data, body.as_bytes());
    assert_eq!(got[1].data, b"hi\r\n");
    assert_eq!(got[0].session, got[1].session);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_sends_a_message() {
    let smtp = start(Behaviour::default()).await;
    let out = python(
        smtp.port(),
        r#"
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
s.ehlo("py.test")
assert s.has_extn("8bitmime") and s.has_extn("size"), s.esmtp_features
s.sendmail("from@example.com", ["to1@example.com", "to2@example.com"],
           "Subject: py\r\n\r\n.dot line\r\nbody\r\n")
s.quit()
"#,
    )
    .await;
    assert!(out.status.success(), "python: {out:?}");
    assert_eq!(smtp.wait_for_accepted(1, T).await, 1);
    let m = &smtp.accepted()[0];
    assert_eq!(m.mail_from, "from@example.com");
    assert_eq!(m.rcpt_to, vec!["to1@example.com", "to2@example.com"]);
    assert_eq!(m.data, b"Subject: py\r\n\r\n.dot line\r\nbody\r\n");
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcpt_script_451_451_then_250() {
    let smtp = start(Behaviour::rcpt_script(
        "grey@example.com",
        &[
            "451 4.7.1 greylisted",
            "451 4.7.1 greylisted",
            "250 2.1.5 ok",
        ],
    ))
    .await;
    let mut codes = Vec::new();
    for attempt in 0..4 {
        let mut c = Client::connect(&smtp).await;
        c.expect("EHLO c", "250").await;
        c.expect(&format!("MAIL FROM:<s{attempt}@example.com>"), "250")
            .await;
        let reply = c.cmd("RCPT TO:<Grey@Example.com>").await;
        codes.push(reply.clone());
        // Other recipients are unaffected by the script.
        c.expect("RCPT TO:<other@example.com>", "250").await;
        if reply.starts_with("451") {
            c.expect("RSET", "250").await;
            c.expect("QUIT", "221").await;
            continue;
        }
        c.expect("DATA", "354").await;
        c.expect("body\r\n.", "250").await;
        c.expect("QUIT", "221").await;
    }
    assert_eq!(
        codes,
        vec![
            "451 4.7.1 greylisted",
            "451 4.7.1 greylisted",
            "250 2.1.5 ok",
            "250 2.1.5 ok"
        ]
    );
    assert_eq!(smtp.rcpt_attempts("grey@example.com"), 4);
    assert_eq!(smtp.rcpt_attempts("other@example.com"), 4);
    assert_eq!(smtp.rcpt_attempts("nobody@example.com"), 0);
    let got = smtp.accepted();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mail_from, "s2@example.com");
    assert_eq!(
        got[0].rcpt_to,
        vec!["Grey@Example.com", "other@example.com"]
    );
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rcpt_550_is_never_accepted() {
    let smtp = start(Behaviour::every_rcpt("550 5.1.1 no such user")).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    let reply = c.cmd("RCPT TO:<x@example.com>").await;
    assert_eq!(reply, "550 5.1.1 no such user");
    c.expect("DATA", "554").await;
    c.expect("QUIT", "221").await;

    // smtplib sees the refusal too.
    let out = python(
        smtp.port(),
        r#"
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
try:
    s.sendmail("a@example.com", ["x@example.com"], "Subject: x\r\n\r\nx\r\n")
    sys.exit("sendmail should have raised")
except smtplib.SMTPRecipientsRefused as e:
    assert e.recipients["x@example.com"][0] == 550, e.recipients
s.quit()
"#,
    )
    .await;
    assert!(out.status.success(), "python: {out:?}");
    assert_eq!(smtp.rcpt_attempts("x@example.com"), 2);
    assert_eq!(smtp.accepted_count(), 0);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_at_end_of_data() {
    let behaviour = Behaviour::rcpt_script("a@example.com", &["451 4.3.0 try later", "250 ok"])
        .with_reply_phase(Phase::EndOfData);
    let smtp = start(behaviour).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let first = c
        .send_mail(
            "s@example.com",
            &["a@example.com", "b@example.com"],
            "x\r\n",
        )
        .await;
    assert_eq!(first, "451 4.3.0 try later");
    let second = c
        .send_mail(
            "s@example.com",
            &["a@example.com", "b@example.com"],
            "y\r\n",
        )
        .await;
    assert!(second.starts_with("250 "), "{second:?}");
    assert_eq!(smtp.accepted_count(), 1);
    assert_eq!(smtp.accepted()[0].data, b"y\r\n");
    assert_eq!(smtp.rcpt_attempts("a@example.com"), 2);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_and_login() {
    let smtp = start(Behaviour::auth_required("user", "s3cret")).await;

    // MAIL before AUTH, then a wrong password, then the right one inline.
    let mut c = Client::connect(&smtp).await;
    let ehlo = c.expect("EHLO c", "250").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    c.expect("MAIL FROM:<s@example.com>", "530").await;
    let wrong = b64(b"\0user\0wrong");
    let reply = c.cmd(&format!("AUTH PLAIN {wrong}")).await;
    assert_eq!(reply, "535 5.7.8 authentication failed");
    c.expect("AUTH PLAIN !!notbase64", "535").await;
    c.expect(&format!("AUTH PLAIN {}", b64(b"\0user\0s3cret")), "235")
        .await;
    let reply = c
        .send_mail("s@example.com", &["r@example.com"], "x\r\n")
        .await;
    assert!(reply.starts_with("250"), "{reply:?}");
    c.expect("QUIT", "221").await;

    // AUTH PLAIN after a 334 prompt.
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    c.expect("AUTH PLAIN", "334").await;
    c.expect(&b64(b"\0user\0s3cret"), "235").await;
    c.expect("QUIT", "221").await;

    // AUTH LOGIN, right and wrong.
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd(&b64(b"user")).await, "334 UGFzc3dvcmQ6");
    c.expect(&b64(b"nope"), "535").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    c.expect(&b64(b"user"), "334").await;
    c.expect(&b64(b"s3cret"), "235").await;
    c.expect("QUIT", "221").await;

    assert_eq!(smtp.auth_successes(), 3);
    assert_eq!(smtp.auth_failures(), 3);
    assert_eq!(smtp.accepted()[0].auth_user.as_deref(), Some("user"));

    // smtplib login: success, then failure.
    let out = python(
        smtp.port(),
        r#"
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
s.login("user", "s3cret")
s.sendmail("a@example.com", ["b@example.com"], "Subject: a\r\n\r\nauthed\r\n")
s.quit()
s = smtplib.SMTP("127.0.0.1", port, timeout=10)
try:
    s.login("user", "bad")
    sys.exit("login should have failed")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
s.quit()
"#,
    )
    .await;
    assert!(out.status.success(), "python: {out:?}");
    assert_eq!(smtp.auth_successes(), 4);
    // smtplib tries each advertised mechanism: PLAIN, then LOGIN.
    assert_eq!(smtp.auth_failures(), 5);
    assert_eq!(smtp.accepted_count(), 2);
    assert_eq!(smtp.accepted()[1].data, b"Subject: a\r\n\r\nauthed\r\n");
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_concurrent_sessions() {
    let smtp = start(Behaviour::default()).await;
    let mut a = Client::connect(&smtp).await;
    let mut b = Client::connect(&smtp).await;
    let c = Client::connect(&smtp).await;
    assert_eq!(smtp.sessions_open(), 3);
    assert_eq!(smtp.max_concurrent_sessions(), 3);
    // One closes by QUIT, one by dropping the socket, one stays.
    a.expect("QUIT", "221").await;
    drop(c);
    wait_until(
        || async { smtp.sessions_open() == 1 },
        T,
        "two sessions to close",
    )
    .await;
    // A new one brings it back to 2; the maximum stays 3.
    let d = Client::connect(&smtp).await;
    assert_eq!(smtp.sessions_open(), 2);
    assert_eq!(smtp.max_concurrent_sessions(), 3);
    assert_eq!(smtp.sessions_total(), 4);
    b.expect("QUIT", "221").await;
    drop(d);
    wait_until(
        || async { smtp.sessions_open() == 0 },
        T,
        "all sessions to close",
    )
    .await;
    assert_eq!(smtp.max_concurrent_sessions(), 3);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_second_window() {
    let smtp = start(Behaviour::default()).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    for i in 0..3 {
        let r = c
            .send_mail("s@x.test", &["r@x.test"], &format!("{i}\r\n"))
            .await;
        assert!(r.starts_with("250"), "{r:?}");
    }
    assert_eq!(smtp.max_accepted_in_any_second(), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 3..5 {
        let r = c
            .send_mail("s@x.test", &["r@x.test"], &format!("{i}\r\n"))
            .await;
        assert!(r.starts_with("250"), "{r:?}");
    }
    assert_eq!(smtp.accepted_count(), 5);
    assert_eq!(smtp.max_accepted_in_any_second(), 3);
    assert_eq!(smtp.max_accepted_in_window(Duration::from_secs(5)), 5);
    let at: Vec<_> = smtp.accepted().iter().map(|m| m.at).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]));
    assert!(at[3] - at[2] >= Duration::from_millis(1100));
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mid_data_is_not_accepted() {
    let smtp = start(Behaviour::drop_mid_data()).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    c.expect("RCPT TO:<r@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.send(b"Subject: first line\r\n").await;
    let rest = c.read_to_close().await;
    assert!(rest.is_empty(), "no reply expected, got {rest:?}");
    wait_until(|| async { smtp.sessions_open() == 0 }, T, "session close").await;
    assert_eq!(smtp.accepted_count(), 0);
    assert!(smtp.accepted_but_unanswered().is_empty());

    // Switch back: the relay recovers.
    smtp.set_behaviour(Behaviour::default());
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let r = c
        .send_mail("s@example.com", &["r@example.com"], "ok\r\n")
        .await;
    assert!(r.starts_with("250"), "{r:?}");
    assert_eq!(smtp.accepted_count(), 1);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_then_close_is_not_accepted() {
    let smtp = start(Behaviour::accept_then_close()).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    c.expect("RCPT TO:<r@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.send(b"Subject: lost\r\n\r\nbody\r\n.\r\n").await;
    let rest = c.read_to_close().await;
    assert!(rest.is_empty(), "no reply expected, got {rest:?}");
    assert_eq!(smtp.accepted_count(), 0);
    let unanswered = smtp.accepted_but_unanswered();
    assert_eq!(unanswered.len(), 1);
    assert_eq!(unanswered[0].data, b"Subject: lost\r\n\r\nbody\r\n");
    assert_eq!(unanswered[0].rcpt_to, vec!["r@example.com"]);
    assert_eq!(
        smtp.wait_for_accepted(1, Duration::from_millis(200)).await,
        0
    );
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_421_greeting() {
    let smtp = start(Behaviour::refuse_connections()).await;
    let mut c = Client::connect_raw(&smtp).await;
    assert!(c.read_to_close().await.is_empty());
    assert_eq!(smtp.sessions_total(), 1);
    wait_until(|| async { smtp.sessions_open() == 0 }, T, "session close").await;

    smtp.set_behaviour(Behaviour::greeting("421 4.3.2 service not available"));
    let mut c = Client::connect_raw(&smtp).await;
    assert_eq!(c.reply().await, "421 4.3.2 service not available");
    assert!(c.read_to_close().await.is_empty());
    assert_eq!(smtp.sessions_total(), 2);
    assert_eq!(smtp.max_concurrent_sessions(), 1);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_and_accept_delay() {
    let stall = Duration::from_millis(400);
    let smtp = start(Behaviour::stall_at(Phase::Mail, stall)).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let t = Instant::now();
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    assert!(
        t.elapsed() >= stall,
        "MAIL answered after {:?}",
        t.elapsed()
    );
    c.expect("QUIT", "221").await;

    // A client that gives up during a greeting stall is no longer counted.
    smtp.set_behaviour(Behaviour::stall_at(
        Phase::Greeting,
        Duration::from_secs(30),
    ));
    let c = Client::connect_raw(&smtp).await;
    wait_until(
        || async { smtp.sessions_open() == 1 },
        T,
        "stalled session to open",
    )
    .await;
    drop(c);
    wait_until(
        || async { smtp.sessions_open() == 0 },
        T,
        "stalled session to close",
    )
    .await;

    // Stall at end of data, then the message is still accepted.
    smtp.set_behaviour(Behaviour::stall_at(Phase::EndOfData, stall));
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let t = Instant::now();
    let r = c
        .send_mail("s@example.com", &["r@example.com"], "x\r\n")
        .await;
    assert!(r.starts_with("250"), "{r:?}");
    assert!(t.elapsed() >= stall);

    // A client that times out during a mid-data stall leaves nothing accepted.
    smtp.set_behaviour(Behaviour::stall_mid_data(Duration::from_secs(30)));
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    c.expect("RCPT TO:<r@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.send(b"line one\r\n").await;
    // Nothing marks the server reaching its stall: give it a moment to read the line, so
    // the close comes during the stall (a close before it ends the session all the same).
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    wait_until(
        || async { smtp.sessions_open() == 0 },
        T,
        "mid-data session to close",
    )
    .await;
    assert_eq!(smtp.accepted_count(), 1);

    // Accept delay.
    smtp.set_behaviour(Behaviour::default().with_accept_delay(stall));
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let t = Instant::now();
    let r = c
        .send_mail("s@example.com", &["r@example.com"], "x\r\n")
        .await;
    assert!(r.starts_with("250"), "{r:?}");
    assert!(t.elapsed() >= stall);
    assert_eq!(smtp.accepted_count(), 2);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_behaviour_applies_to_open_sessions() {
    let smtp = start(Behaviour::every_rcpt("451 4.3.0 try again in 120 seconds")).await;
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    c.expect("RCPT TO:<r@example.com>", "451").await;
    smtp.set_behaviour(Behaviour::accept_all());
    c.expect("RCPT TO:<r@example.com>", "250").await;
    c.expect("DATA", "354").await;
    c.expect("x\r\n.", "250").await;
    assert_eq!(smtp.rcpt_attempts("r@example.com"), 2);

    // A scripted 421 closes the connection.
    smtp.set_behaviour(Behaviour::every_rcpt("421 4.3.2 shutting down"));
    c.expect("MAIL FROM:<s@example.com>", "250").await;
    c.expect("RCPT TO:<r@example.com>", "421").await;
    assert!(c.read_to_close().await.is_empty());
    assert_eq!(smtp.accepted_count(), 1);
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_accepted_wakes_and_times_out() {
    let smtp = start(Behaviour::default()).await;
    let t = Instant::now();
    assert_eq!(
        smtp.wait_for_accepted(1, Duration::from_millis(200)).await,
        0
    );
    assert!(t.elapsed() >= Duration::from_millis(200));

    let addr = smtp.addr();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = Client {
            io: BufReader::new(stream),
        };
        c.reply().await;
        c.expect("EHLO c", "250").await;
        for _ in 0..2 {
            c.send_mail("s@example.com", &["r@example.com"], "x\r\n")
                .await;
        }
        c.expect("QUIT", "221").await;
    });
    assert_eq!(smtp.wait_for_accepted(2, T).await, 2);
    sender.await.unwrap();
    smtp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_and_listener() {
    let smtp = start(Behaviour {
        mode: Mode::Accept,
        ..Behaviour::default()
    })
    .await;
    let addr = smtp.addr();
    let mut c = Client::connect(&smtp).await;
    c.expect("EHLO c", "250").await;
    let _no_binds = BIND.write().await;
    smtp.shutdown().await;
    assert!(c.read_to_close().await.is_empty());
    assert!(TcpStream::connect(addr).await.is_err(), "port still open");
}
