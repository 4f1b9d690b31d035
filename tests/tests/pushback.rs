//! The fleet listens to the relay: a relay that refuses our rate slows the whole fleet
//! down (AIMD) and gets traffic back when it allows more; a relay that refuses sessions
//! gets fewer; a job refused so goes back untouched, never spending an attempt.

use std::time::{Duration, Instant};

use sluice_shared::events::EventOutcome;
use sluice_tests::app::TestApp;
use sluice_tests::postfix::PrivatePostfix;
use sluice_tests::scripted_smtp::Behaviour;
use sluice_tests::wait::eventually;

const SES_THROTTLE: &str = "454 Throttling failure: Maximum sending rate exceeded";
const TOO_MANY_SESSIONS: &str = "421 4.7.0 Too many concurrent SMTP connections";

/// How many of `times` fall in each whole second from `start`, for `seconds` seconds.
fn per_second(times: &[Instant], start: Instant, seconds: usize) -> Vec<usize> {
    let mut counts = vec![0; seconds];
    for t in times {
        if let Some(since) = t.checked_duration_since(start) {
            let i = since.as_secs() as usize;
            if i < seconds {
                counts[i] += 1;
            }
        }
    }
    counts
}

fn in_range(times: &[Instant], from: Instant, to: Instant) -> usize {
    times.iter().filter(|t| **t >= from && **t < to).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_allows_100_per_second_gets_between_70_and_100_and_more_when_it_allows_more() {
    const JOBS: usize = 10_000;
    let mut app = TestApp::builder("pushrate")
        .relay(
            "primary",
            Behaviour::accept_all().with_rate_limit(100, SES_THROTTLE),
            "max_connections = 4\nmax_messages_per_second = 400\n",
        )
        .retries(&["1s", "2s"])
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "r", JOBS).await;
    app.start_workers(3);

    assert!(
        smtp.wait_for_accepted(1, Duration::from_secs(30)).await >= 1,
        "nothing delivered"
    );
    let start = smtp
        .accepted_times()
        .into_iter()
        .min()
        .expect("one accepted");

    // Settled within 10 s: every second from then on between 70 and 100 accepted.
    tokio::time::sleep_until((start + Duration::from_secs(20)).into()).await;
    let accepted = per_second(&smtp.accepted_times(), start, 20);
    let refused = per_second(&smtp.rate_refusals(), start, 20);
    eprintln!("accepted per second: {accepted:?}");
    eprintln!("refused per second:  {refused:?}");
    for (second, count) in accepted.iter().enumerate().skip(10) {
        assert!(
            (70..=100).contains(count),
            "second {second}: {count} accepted, not between 70 and 100; per second: {accepted:?}"
        );
    }
    let settled_accepted: usize = accepted[10..].iter().sum();
    let settled_refused: usize = refused[10..].iter().sum();
    let share = settled_refused as f64 / (settled_accepted + settled_refused) as f64;
    assert!(
        share < 0.05,
        "{settled_refused} throttling replies for {settled_accepted} accepted after settling ({:.1}%)",
        share * 100.0
    );

    // The relay allows 300/s now: within 30 s the fleet sends more than 250/s.
    smtp.set_behaviour(Behaviour::accept_all().with_rate_limit(300, SES_THROTTLE));
    let raised = Instant::now();
    let climbed = eventually(Duration::from_secs(30), || async {
        let now = Instant::now();
        in_range(&smtp.accepted_times(), now - Duration::from_secs(1), now) > 250
    })
    .await;
    let after = per_second(&smtp.accepted_times(), raised, 35);
    eprintln!("accepted per second after the raise: {after:?}");
    assert!(
        climbed,
        "never above 250/s within 30 s of the raise: {after:?}"
    );
    eprintln!("above 250/s {:?} after the raise", raised.elapsed());

    // Every job delivered, none bounced or dead, none spent an attempt on throttling.
    let all = eventually(Duration::from_secs(90), || async {
        smtp.recipients().len() >= JOBS
    })
    .await;
    assert!(all, "only {} of {JOBS} delivered", smtp.recipients().len());
    let finals = events
        .wait_until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= JOBS
        })
        .await;
    assert!(finals, "not every job has a final event");
    for event in &events.seen {
        assert_eq!(
            (event.outcome, event.attempt),
            (EventOutcome::Delivered, 1),
            "{} was not delivered at its first attempt: {event:?}",
            event.id
        );
    }
    assert_eq!(app.dead_len("primary").await, 0);
    assert_eq!(app.retry_len("primary", 1).await, 0);
    eprintln!(
        "{} throttling replies in all, {} accepted",
        smtp.rate_refusals().len(),
        smtp.accepted_count()
    );
}

/// What the fleet did about a relay's pushback is visible: the cut rate and the session limit
/// as gauges, each throttling reply counted by reason, a log line per change (not per job),
/// and `relay status` showing the cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_relay_s_cut_shows_in_metrics_logs_and_relay_status() {
    const JOBS: usize = 1500;
    let listen = format!("127.0.0.1:{}", sluice_tests::smtp_sink::free_port());
    let app = TestApp::builder("pushvisible")
        .relay(
            "primary",
            Behaviour::accept_all().with_rate_limit(100, SES_THROTTLE),
            "max_connections = 4\nmax_messages_per_second = 400\n",
        )
        .retries(&["1s", "2s"])
        .worker_args(&["--listen", &listen])
        .logged()
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "v", JOBS).await;

    // While the campaign runs: the fleet's rate for the relay is below the configured 400/s,
    // and `relay status` says so.
    assert!(smtp.wait_for_accepted(300, Duration::from_secs(60)).await >= 300);
    let scrape = metrics(&listen).await;
    let rate = sample(&scrape, "sluice_relay_effective_rate{relay=\"primary\"}");
    assert!(
        rate.is_some_and(|r| r > 0.0 && r < 400.0),
        "effective rate {rate:?}, not cut below 400/s:\n{scrape}"
    );
    assert_eq!(
        sample(
            &scrape,
            "sluice_relay_effective_connections{relay=\"primary\"}"
        ),
        Some(4.0),
        "no session was refused, so no session cut"
    );
    let status = relay_status(&app, "primary");
    let throttled_to = status["throttled_to"].as_f64();
    assert!(
        throttled_to.is_some_and(|to| to > 0.0 && to < 400.0) && status["throttled_at"].is_string(),
        "relay status does not show the cut: {status}"
    );
    assert_eq!(status["session_limit"], 4, "{status}");

    // Once every job is delivered: each throttling reply counted once, by reason, and a
    // log line for each cut, not for each refused job.
    assert!(
        events
            .wait_until(Duration::from_secs(90), |seen| seen
                .iter()
                .filter(|e| e.outcome.is_final())
                .count()
                >= JOBS)
            .await,
        "not every job ended"
    );
    let refusals = smtp.rate_refusals().len();
    let scrape = metrics(&listen).await;
    assert_eq!(
        sample(
            &scrape,
            "sluice_relay_throttled_total{reason=\"rate\",relay=\"primary\"}"
        ),
        Some(refusals as f64),
        "the relay refused {refusals} times"
    );
    let cuts = app.workers[0]
        .logs()
        .lines()
        .filter(|line| line.contains("the fleet's rate is cut"))
        .count();
    eprintln!("rate while running {rate:?}, status {throttled_to:?}; {refusals} refusals, {cuts} cuts logged");
    assert!(
        cuts >= 1 && cuts < refusals,
        "{cuts} log lines about a cut for {refusals} throttling replies"
    );
}

/// A cut holds for the whole fleet within 2 seconds: the worker that met the throttling
/// reply tells the others on the control stream, and each follows within 2 s of the first
/// cut. One session at a time, so only the worker holding it meets the relay's refusals.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_reaches_every_worker_within_2_seconds() {
    let mut app = TestApp::builder("pushreach")
        .relay(
            "primary",
            Behaviour::accept_all().with_rate_limit(100, SES_THROTTLE),
            "max_connections = 1\nmax_messages_per_second = 400\n",
        )
        .retries(&["1s", "2s"])
        .logged()
        .worker_env(&[("RUST_LOG", "info")])
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "c", 1500).await;
    app.start_workers(3);
    let refused = eventually(Duration::from_secs(30), || async {
        !smtp.rate_refusals().is_empty()
    })
    .await;
    assert!(refused, "the relay never throttled");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let cut_by: Vec<usize> = (0..3)
        .filter(|w| app.workers[*w].logs().contains("the fleet's rate is cut"))
        .collect();
    assert!(!cut_by.is_empty(), "no worker logged a cut");
    let limited: Vec<Option<f64>> = app
        .workers
        .iter()
        .map(|worker| {
            worker
                .logs()
                .lines()
                .filter(|line| {
                    line.contains("the fleet's rate is cut")
                        || line.contains("following the fleet's limits")
                })
                .find_map(logged_at)
        })
        .collect();
    let first = limited
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "cut by workers {cut_by:?}; each worker's first cut or following, from the first: {:?}",
        limited
            .iter()
            .map(|at| at.map(|at| at - first))
            .collect::<Vec<_>>()
    );
    for (worker, at) in limited.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("worker {worker} never followed the cut"));
        assert!(
            at - first <= 2.0,
            "worker {worker} followed the cut {:.2} s after the first one",
            at - first
        );
    }
}

/// When a log line (`2026-12-06T23:23:02.425282Z  WARN ...`) was written, in seconds since
/// the Julian day epoch (so that lines on both sides of midnight compare).
fn logged_at(line: &str) -> Option<f64> {
    let (date, time) = line.split_whitespace().next()?.split_once('T')?;
    let mut ymd = date.split('-').map(|part| part.parse::<i32>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year, month, u8::try_from(day).ok()?).ok()?;
    let mut hms = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (hms.next()?, hms.next()?, hms.next()?);
    Some(
        f64::from(date.to_julian_day()) * 86_400.0
            + h.parse::<f64>().ok()? * 3600.0
            + m.parse::<f64>().ok()? * 60.0
            + s.parse::<f64>().ok()?,
    )
}

/// A session cut shows the same way: the fleet's session limit as a gauge and in `relay
/// status`, and the refused sessions counted as `connections`.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_s_session_cut_shows_in_metrics_and_relay_status() {
    let listen = format!("127.0.0.1:{}", sluice_tests::smtp_sink::free_port());
    let app = TestApp::builder("pushvisiblesess")
        .relay(
            "primary",
            Behaviour::accept_all().with_session_limit(2, TOO_MANY_SESSIONS),
            "max_connections = 6\nmax_messages_per_second = 60\n",
        )
        .retries(&["1s", "2s"])
        .worker_args(&["--listen", &listen])
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "s", 1000).await;
    assert!(smtp.wait_for_accepted(120, Duration::from_secs(60)).await >= 120);
    // Two sessions, or three while the fleet tries one more (at most once every 10 s).
    let scrape = metrics(&listen).await;
    let sessions = sample(
        &scrape,
        "sluice_relay_effective_connections{relay=\"primary\"}",
    );
    assert!(
        sessions.is_some_and(|n| (2.0..=3.0).contains(&n)),
        "effective connections {sessions:?}:\n{scrape}"
    );
    let counted = sample(
        &scrape,
        "sluice_relay_throttled_total{reason=\"connections\",relay=\"primary\"}",
    );
    assert!(
        counted.is_some_and(|n| n >= 1.0 && n <= smtp.session_refusals().len() as f64),
        "{counted:?} refused sessions counted, the relay refused {}",
        smtp.session_refusals().len()
    );
    let status = relay_status(&app, "primary");
    assert!(
        status["session_limit"]
            .as_u64()
            .is_some_and(|n| (2..=3).contains(&n)),
        "relay status does not show the session cut: {status}"
    );
}

/// `relay`'s line of `sluice-producer relay status --json`.
fn relay_status(app: &TestApp, relay: &str) -> serde_json::Value {
    let run = sluice_tests::processes::Binary::new("sluice-producer")
        .args(["relay", "status", "--json"])
        .config(&app.config.path)
        .output();
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["relay"] == relay)
        .unwrap_or_else(|| panic!("no line for {relay} in relay status: {run:?}"))
}

/// The worker's `/metrics` page.
async fn metrics(listen: &str) -> String {
    let (code, scrape) = sluice_tests::http::get(listen, "/metrics")
        .await
        .expect("scrape /metrics");
    assert_eq!(code, 200);
    scrape
}

/// The value of one series (name and labels, as Prometheus prints them) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_that_serves_two_sessions_gets_two_from_a_fleet_allowed_six() {
    const JOBS: usize = 1500;
    let mut app = TestApp::builder("pushsess")
        .relay(
            "primary",
            Behaviour::accept_all().with_session_limit(2, TOO_MANY_SESSIONS),
            "max_connections = 6\nmax_messages_per_second = 60\n",
        )
        .retries(&["1s", "2s"])
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "s", JOBS).await;
    app.start_workers(3);

    let all = eventually(Duration::from_secs(90), || async {
        smtp.recipients().len() >= JOBS
    })
    .await;
    assert!(all, "only {} of {JOBS} delivered", smtp.recipients().len());
    let start = smtp.accepted_times().into_iter().min().expect("accepted");
    let end = smtp.accepted_times().into_iter().max().expect("accepted");
    let refusals = smtp.session_refusals();
    let late = in_range(&refusals, start + Duration::from_secs(10), end);
    let run = (end - start).as_secs_f64();
    eprintln!(
        "{} session refusals, {late} after the first 10 s of a {run:.0} s run; at most {} sessions served at once",
        refusals.len(),
        smtp.max_served_sessions()
    );
    // Settled at two: after the first seconds only the probe for one more session, once
    // every 10 s at most, is refused.
    let probes = ((run - 10.0) / 10.0).ceil().max(0.0) as usize + 1;
    assert!(
        late <= probes,
        "{late} sessions refused after the first 10 s, more than one per 10 s ({probes})"
    );
    assert!(smtp.max_served_sessions() <= 2);
    let finals = events
        .wait_until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= JOBS
        })
        .await;
    assert!(finals, "not every job has a final event");
    assert!(events
        .seen
        .iter()
        .all(|e| e.outcome == EventOutcome::Delivered && e.attempt == 1));
    assert_eq!(app.dead_len("primary").await, 0);
}

/// A relay that greets with "server busy" (Microsoft 365's `421 4.7.500`) is marked down
/// for its cool-off by a built-in rule: its failover takes the jobs, none spends an
/// attempt, and `relay status` says the primary is down, and why.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_greeting_server_busy_is_marked_down_and_its_failover_takes_over() {
    const JOBS: usize = 100;
    let app = TestApp::builder("pushbusy")
        .relay(
            "primary",
            Behaviour::greeting("421 4.7.500 Server busy. Please try again later"),
            "failover = \"backup\"\ndown_cooloff = \"60s\"\n",
        )
        .relay("backup", Behaviour::accept_all(), "")
        .start()
        .await;
    let (primary, backup) = (app.relay("primary"), app.relay("backup"));
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "b", JOBS).await;

    let finals = events
        .wait_until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= JOBS
        })
        .await;
    assert!(finals, "not every job has a final event");
    assert!(
        events
            .seen
            .iter()
            .all(|e| e.outcome == EventOutcome::Delivered && e.attempt == 1 && e.relay == "backup"),
        "{:?}",
        events.seen
    );
    assert_eq!(backup.recipients().len(), JOBS);
    assert!(primary.accepted().is_empty());

    let primary_status = relay_status(&app, "primary");
    assert_eq!(primary_status["state"], "down", "{primary_status}");
    assert!(
        primary_status["reason"]
            .as_str()
            .is_some_and(|why| why.contains("Server busy")),
        "{primary_status}"
    );
}

/// A relay's own rules override what a reply's code would mean: a temporary `451` its
/// operator knows is final bounces at once (`action = "bounce"`), and a `550` known to
/// pass is deferred to the retry ladder (`action = "defer"`) and delivered on retry.
#[tokio::test(flavor = "multi_thread")]
async fn custom_bounce_and_defer_rules_override_the_reply_code() {
    let app = TestApp::builder("pushrules")
        .relay(
            "primary",
            Behaviour::accept_all()
                .with_rcpt_script(
                    "gone-0@example.org",
                    &["451 4.7.1 Recipient address permanently blocked"],
                )
                .with_rcpt_script(
                    "grey-0@example.org",
                    &["550 5.7.1 Greylisted, come back later", "250 2.1.5 Ok"],
                ),
            "[[relays.primary.rules]]\nmatch = '4\\.7\\.1 .*permanently blocked'\naction = \"bounce\"\n\
             [[relays.primary.rules]]\nmatch = '5\\.7\\.1 greylisted'\naction = \"defer\"\n",
        )
        .retries(&["1s", "1s"])
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "gone", 1).await;
    app.ns.publish_jobs("primary", "grey", 1).await;
    let finals = events
        .wait_until(Duration::from_secs(30), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= 2
        })
        .await;
    assert!(finals, "not every job ended: {:?}", events.seen);
    let outcomes: Vec<(String, EventOutcome, u32)> = events
        .seen
        .iter()
        .map(|e| (e.id.clone(), e.outcome, e.attempt))
        .collect();
    assert!(
        outcomes.contains(&("gone-0".into(), EventOutcome::Bounced, 1)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("grey-0".into(), EventOutcome::Deferred, 1))
            && outcomes.contains(&("grey-0".into(), EventOutcome::Delivered, 2)),
        "{outcomes:?}"
    );
    assert_eq!(smtp.rcpt_attempts("gone-0@example.org"), 1);
    assert!(smtp.recipients().contains("grey-0@example.org"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_suspend_rule_suspends_the_relay_fleet_wide_and_its_failover_takes_over() {
    const JOBS: usize = 200;
    let mut app = TestApp::builder("pushsusp")
        .relay(
            "primary",
            Behaviour::refuse_mail("550 5.7.1 Daily quota exceeded for this account"),
            // Without the rule: a relay fault, down for 1 s on one worker, probed again
            // after each second by every worker.
            "failover = \"backup\"\ndown_cooloff = \"1s\"\nmax_connections = 2\n\
             [[relays.primary.rules]]\nmatch = '5\\.7\\.1 .*daily quota'\naction = \"suspend\"\nfor = \"1h\"\n",
        )
        .relay("backup", Behaviour::accept_all(), "max_connections = 2\n")
        .workers(0)
        .start()
        .await;
    let primary = app.relay("primary");
    let backup = app.relay("backup");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "q", JOBS).await;
    app.start_workers(2);

    let all = eventually(Duration::from_secs(60), || async {
        backup.recipients().len() >= JOBS
    })
    .await;
    assert!(
        all,
        "only {} of {JOBS} through the failover",
        backup.recipients().len()
    );
    let sessions = primary.sessions_total();
    // More jobs, and several of the 1 s cool-offs the rule replaced: nobody asks the
    // primary again.
    app.ns.publish_jobs("primary", "q2", JOBS).await;
    let more = eventually(Duration::from_secs(60), || async {
        backup.recipients().len() >= 2 * JOBS
    })
    .await;
    assert!(
        more,
        "only {} through the failover",
        backup.recipients().len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        primary.sessions_total(),
        sessions,
        "the suspended primary was asked again"
    );
    eprintln!("{sessions} sessions with the primary in all, from 2 workers");
    assert!(primary.accepted().is_empty());
    let finals = events
        .wait_until(Duration::from_secs(30), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= 2 * JOBS
        })
        .await;
    assert!(finals, "not every job has a final event");
    assert!(events
        .seen
        .iter()
        .all(|e| e.outcome == EventOutcome::Delivered && e.attempt == 1 && e.relay == "backup"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_ended_with_too_many_errors_sends_the_job_back_untouched() {
    let app = TestApp::builder("pusherr")
        .relay(
            "primary",
            Behaviour::rcpt_script(
                "e-0@example.org",
                &[
                    "421 4.7.0 scripted-smtp.test Error: too many errors",
                    "250 2.1.5 Ok",
                ],
            ),
            "max_connections = 1\n",
        )
        .retries(&["1h"])
        .workers(1)
        .start()
        .await;
    let smtp = app.relay("primary");
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "e", 5).await;
    let finals = events
        .wait_until(Duration::from_secs(30), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= 5
        })
        .await;
    assert!(finals, "not every job has a final event: {:?}", events.seen);
    // Not a deferral: no retry step (an hour away) and the first attempt delivered it.
    for event in &events.seen {
        assert_eq!(
            (event.outcome, event.attempt),
            (EventOutcome::Delivered, 1),
            "{event:?}"
        );
    }
    assert_eq!(smtp.rcpt_attempts("e-0@example.org"), 2);
    assert_eq!(app.retry_len("primary", 1).await, 0);
}

/// How many of `seconds` (as [`PrivatePostfix::seconds_of`] counts them) fall in each
/// second, in order.
fn counts_by_second(seconds: &[u64]) -> Vec<(u64, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for s in seconds {
        *counts.entry(*s).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_postfix_limiting_two_connections_gets_two_and_every_job() {
    const JOBS: usize = 1000;
    let postfix = PrivatePostfix::start(&[("smtpd_client_connection_count_limit", "2")]).await;
    let mut app = TestApp::builder("pushpfconn")
        .relay_at(
            "primary",
            postfix.port,
            "max_connections = 6\nmax_messages_per_second = 30\n",
        )
        .workers(0)
        .start()
        .await;
    app.ns.publish_jobs("primary", "c", JOBS).await;
    // Six workers, so that after a refused probe another worker is likely to want the
    // freed slot before it has read the cut from the control stream.
    app.start_workers(6);
    let all = eventually(Duration::from_secs(120), || async {
        postfix.arrived().len() >= JOBS
    })
    .await;
    let refusals = postfix.session_refusals();
    let accepted = counts_by_second(&postfix.accepted_seconds());
    eprintln!(
        "{} arrived; {} sessions refused by Postfix, by second: {:?}; accepted by second: {:?}",
        postfix.arrived().len(),
        refusals.len(),
        counts_by_second(&refusals),
        accepted
    );
    assert!(all, "only {} of {JOBS} arrived", postfix.arrived().len());
    // The refusals stop growing after the first seconds: after the first 10 s, at most
    // the probe for one more session every 10 s.
    let first = accepted.first().expect("accepted").0;
    let late: Vec<&u64> = refusals.iter().filter(|s| **s >= first + 10).collect();
    let run = (accepted.last().expect("accepted").0 - first) as usize;
    let probes = run.saturating_sub(10) / 10 + 1;
    assert!(
        late.len() <= probes,
        "{} refusals after the first 10 s of {run} s, more than {probes}: {late:?}",
        late.len()
    );
}

/// What a run against a Postfix limiting the message rate to 50 per time unit of 1 s saw.
struct PostfixRateRun {
    accepted: Vec<(u64, usize)>,
    settled_accepted: usize,
    settled_refused: usize,
    settled_seconds: usize,
}

/// 1,500 jobs, three workers configured for 400/s, against Postfix's anvil at
/// `smtpd_client_message_rate_limit = 50`, `anvil_rate_time_unit = 1s`: every job must
/// arrive at its first attempt, none dead.
async fn run_against_postfix_rate_limit(tag: &str) -> PostfixRateRun {
    const JOBS: usize = 1500;
    let postfix = PrivatePostfix::start(&[
        ("smtpd_client_message_rate_limit", "50"),
        ("anvil_rate_time_unit", "1s"),
    ])
    .await;
    let mut app = TestApp::builder(tag)
        .relay_at(
            "primary",
            postfix.port,
            "max_connections = 4\nmax_messages_per_second = 400\n",
        )
        .retries(&["1s", "2s"])
        .workers(0)
        .start()
        .await;
    let mut events = app.ns.events().await;
    app.ns.publish_jobs("primary", "p", JOBS).await;
    app.start_workers(3);
    let all = eventually(Duration::from_secs(150), || async {
        postfix.arrived().len() >= JOBS
    })
    .await;
    let accepted = counts_by_second(&postfix.accepted_seconds());
    let refused = counts_by_second(&postfix.rate_refusals());
    eprintln!("accepted by second: {accepted:?}");
    eprintln!("refused by second: {refused:?}");
    assert!(all, "only {} of {JOBS} arrived", postfix.arrived().len());
    let finals = events
        .wait_until(Duration::from_secs(60), |seen| {
            seen.iter().filter(|e| e.outcome.is_final()).count() >= JOBS
        })
        .await;
    assert!(finals, "not every job has a final event");
    assert!(events
        .seen
        .iter()
        .all(|e| e.outcome == EventOutcome::Delivered && e.attempt == 1));
    assert_eq!(app.dead_len("primary").await, 0);
    // A session that met a throttle pipelines no more: Postfix never ends one for its
    // errors (the 503s it answers the rest of a pipelined batch with).
    let log = postfix.log();
    let ended_for_errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("too many errors"))
        .collect();
    assert!(
        ended_for_errors.is_empty(),
        "Postfix ended sessions for their errors: {ended_for_errors:?}"
    );

    // Settled: from 10 s after the first acceptance to the last whole second.
    let first = accepted.first().expect("accepted").0;
    let last = accepted.last().expect("accepted").0;
    let in_settled = |s: &u64| *s >= first + 10 && *s < last;
    let settled_accepted = accepted
        .iter()
        .filter(|(s, _)| in_settled(s))
        .map(|(_, c)| c)
        .sum();
    let settled_refused = refused
        .iter()
        .filter(|(s, _)| in_settled(s))
        .map(|(_, c)| c)
        .sum();
    let settled_seconds = (last - first).saturating_sub(10) as usize;
    PostfixRateRun {
        accepted,
        settled_accepted,
        settled_refused,
        settled_seconds,
    }
}

/// Postfix's anvil counts in whole seconds and starts a new interval only once
/// `start + anvil_rate_time_unit < now`: with a unit of 1 s an interval spans two clock
/// seconds, so it accepts at most 50 messages per 2 s, 25/s on average, in bursts of 50.
/// The fleet must get at least 0.7 of that.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_postfix_limiting_the_message_rate_gets_every_job_at_its_first_attempt() {
    let run = run_against_postfix_rate_limit("pushpfrate").await;
    assert!(
        run.settled_seconds >= 10,
        "too short a run: {:?}",
        run.accepted
    );
    let rate = run.settled_accepted as f64 / run.settled_seconds as f64;
    eprintln!(
        "settled: {rate:.1} accepted/s, {} refusals for {} accepted",
        run.settled_refused, run.settled_accepted
    );
    assert!(
        rate >= 0.7 * 25.0,
        "{rate:.1}/s after settling, under 0.7 of the 25/s Postfix allows"
    );
}

/// The issue's bound: refusals under 5% of attempts once settled (from the 10th second).
/// Met since cuts in a row go deeper and the rate levels off just under the refused one
/// (2.5% measured); with an additive increase back at the refused rate every 2 s it was 17%.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_postfix_limiting_the_message_rate_refuses_under_5_percent_once_settled() {
    let run = run_against_postfix_rate_limit("pushpfrate5").await;
    let share = run.settled_refused as f64 / (run.settled_accepted + run.settled_refused) as f64;
    assert!(
        share < 0.05,
        "{} refusals for {} accepted after settling ({:.0}%)",
        run.settled_refused,
        run.settled_accepted,
        share * 100.0
    );
}

/// The ceiling the two tests above are held to, measured with a client nobody here wrote:
/// Postfix's own `smtp-source`, restarted the moment a refusal ends it, for 12 s, while
/// one more session stays open, as a pooled sender's sessions do. Anvil, at
/// `smtpd_client_message_rate_limit = 50` and `anvil_rate_time_unit = 1s`, then accepts at
/// most 50 messages per interval of two clock seconds: even this greedy client gets 25/s,
/// below the 35/s the issue asked of the fleet. (Anvil forgets a client one time unit after
/// its last session closed; a client that drops every session for that long starts a fresh
/// count. sluice keeps its sessions.)
#[tokio::test(flavor = "multi_thread")]
async fn postfix_itself_accepts_at_most_50_per_two_seconds_at_a_limit_of_50_per_1s() {
    let postfix = PrivatePostfix::start(&[
        ("smtpd_client_message_rate_limit", "50"),
        ("anvil_rate_time_unit", "1s"),
    ])
    .await;
    let port = postfix.port;
    let held = hold_a_session(port).await;
    let runs = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(12);
        let mut runs = 0;
        while Instant::now() < deadline && runs < 200 {
            let _ = std::process::Command::new("smtp-source")
                .args(["-s", "1", "-m", "1000", "-f", "a@example.com"])
                .args(["-t", "b@example.org", &format!("127.0.0.1:{port}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("smtp-source (Debian package postfix)");
            runs += 1;
        }
        runs
    })
    .await
    .expect("smtp-source loop");
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = counts_by_second(&postfix.accepted_seconds());
    eprintln!("{runs} smtp-source runs; accepted by second: {accepted:?}");
    assert!(
        runs >= 5 && postfix.rate_refusals().len() >= 5,
        "smtp-source was not refused often enough to test the ceiling: {runs} runs, {:?}",
        postfix.rate_refusals()
    );
    let first = accepted.first().expect("accepted").0;
    let last = accepted.last().expect("accepted").0;
    let span = (last - first + 1) as usize;
    let total: usize = accepted.iter().map(|(_, c)| c).sum();
    // Two-second intervals back to back from anvil's first count, which may be up to a
    // second before `cleanup` logged the first message.
    assert!(
        total <= 50 * (span + 1).div_ceil(2),
        "{total} accepted in {span} s, more than 50 per two seconds: {accepted:?}"
    );
    assert!(
        (total as f64 / span as f64) < 35.0,
        "{total} accepted in {span} s"
    );
}

/// An SMTP session past its EHLO, left open until dropped.
async fn hold_a_session(port: u16) -> tokio::io::BufReader<tokio::net::TcpStream> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the private postfix");
    let mut session = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    session.read_line(&mut line).await.expect("greeting");
    assert!(line.starts_with("220"), "greeting: {line}");
    session
        .get_mut()
        .write_all(b"EHLO held.example.com\r\n")
        .await
        .expect("EHLO");
    loop {
        line.clear();
        session.read_line(&mut line).await.expect("EHLO reply");
        assert!(line.starts_with("250"), "EHLO reply: {line}");
        if line.as_bytes().get(3) == Some(&b' ') {
            return session;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_during_a_throttle_starts_throttled() {
    const JOBS: usize = 3000;
    let mut app = TestApp::builder("pushreplay")
        .relay(
            "primary",
            Behaviour::accept_all().with_rate_limit(100, SES_THROTTLE),
            "max_connections = 4\nmax_messages_per_second = 400\n",
        )
        .workers(0)
        .start()
        .await;
    let smtp = app.relay("primary");
    app.ns.publish_jobs("primary", "t", JOBS).await;
    app.start_workers(1);
    assert!(smtp.wait_for_accepted(1, Duration::from_secs(30)).await >= 1);
    let start = smtp.accepted_times().into_iter().min().expect("accepted");
    // Killed once settled: killed mid-descent, its successor starts at the rate the fleet
    // had then (still above the relay's) and meets the rest of the descent's refusals.
    tokio::time::sleep_until((start + Duration::from_secs(20)).into()).await;
    let cold = smtp
        .rate_refusals()
        .iter()
        .filter(|t| **t < start + Duration::from_secs(5))
        .count();

    // The throttled worker dies; a new one replays the control stream.
    app.workers[0].kill();
    let before = smtp.accepted_count();
    app.start_worker();
    assert!(
        smtp.wait_for_accepted(before + 1, Duration::from_secs(30))
            .await
            > before,
        "the new worker delivers nothing"
    );
    let restart = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warm = in_range(
        &smtp.rate_refusals(),
        restart,
        restart + Duration::from_secs(5),
    );
    let accepted = in_range(
        &smtp.accepted_times(),
        restart,
        restart + Duration::from_secs(5),
    );
    eprintln!(
        "first 5 s: {cold} throttling replies from a fresh fleet; {warm} (for {accepted} accepted) from a worker started during the throttle"
    );
    assert!(
        warm * 10 <= cold && warm < 25,
        "a worker started during the throttle met {warm} throttling replies in its first 5 s (a fresh fleet: {cold})"
    );
}
