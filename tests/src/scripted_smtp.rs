//! A scriptable in-process SMTP server on 127.0.0.1 for fault-injection tests.
//!
//! Real servers (Postfix smtp-sink, aiosmtpd) cover the happy path; this one
//! exists for the faults they cannot produce on demand: greylisting scripts
//! per recipient, refused or dropped connections, stalls at a given phase,
//! replies that never come, slow relays and AUTH failures. It also counts
//! what the load-budget tests assert on: concurrent sessions and acceptances
//! per sliding second.
//!
//! ```no_run
//! # async fn demo() {
//! use sluice_tests::scripted_smtp::{Behaviour, ScriptedSmtp};
//! use std::time::Duration;
//! let smtp = ScriptedSmtp::start(
//!     Behaviour::rcpt_script("a@example.com", &["451 4.7.1 greylisted", "250 2.1.5 ok"]),
//! )
//! .await;
//! // ... point the worker at 127.0.0.1:smtp.port() and run it ...
//! assert_eq!(smtp.wait_for_accepted(1, Duration::from_secs(10)).await, 1);
//! assert_eq!(smtp.rcpt_attempts("a@example.com"), 2);
//! smtp.shutdown().await;
//! # }
//! ```
//!
//! The server runs as tasks on the caller's tokio runtime. A test that talks
//! to it with blocking I/O (`std::net::TcpStream`, a Python child process
//! waited on synchronously) must use a multi-thread runtime
//! (`#[tokio::test(flavor = "multi_thread")]`) or `spawn_blocking`, or the
//! server never gets to run.
//!
//! Behaviour is consulted afresh at every step of every session, so
//! [`ScriptedSmtp::set_behaviour`] also affects sessions that are already open
//! from their next command on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// Host name the server uses in its greeting and EHLO reply.
pub const SERVER_NAME: &str = "scripted-smtp.test";

/// Message size advertised in EHLO; larger messages get `552` after DATA.
pub const MAX_MESSAGE_SIZE: usize = 52_428_800;

/// Longest command line read before the session is answered `500` and closed,
/// so a client bug cannot make the server buffer without bound.
const MAX_COMMAND_LINE: usize = 64 * 1024;

/// How the server treats a connection as a whole; the other fields of
/// [`Behaviour`] refine the default `Accept`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Speak normal SMTP and accept messages (subject to recipient scripts).
    #[default]
    Accept,
    /// Accept the TCP connection and close it at once, without a greeting.
    RefuseConnections,
    /// Send this line (e.g. `421 4.3.2 service not available`) instead of the
    /// `220` greeting, then close.
    Greeting(String),
    /// After `354`, read the first line of the payload and close the socket
    /// without replying; nothing is recorded.
    DropMidData,
    /// Read the whole payload, record it in
    /// [`ScriptedSmtp::accepted_but_unanswered`] (not in `accepted`), then
    /// close without sending the final reply.
    AcceptThenClose,
    /// Stop answering for the given time each time the given phase is
    /// reached, then carry on as `Accept` if the client is still there.
    StallAt(Phase, Duration),
}

/// A point in an SMTP session, for stalls ([`Mode::StallAt`]) and for
/// choosing where recipient scripts answer ([`Behaviour::reply_phase`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before the `220` greeting is sent.
    Greeting,
    /// Before the reply to EHLO/HELO.
    Ehlo,
    /// Before the reply to MAIL FROM.
    Mail,
    /// Before the reply to RCPT TO. Recipient scripts answer here by default.
    #[default]
    Rcpt,
    /// Before the `354` reply to DATA.
    Data,
    /// After the first line of the payload has been read; the server stops
    /// reading the rest for the stall time.
    MidData,
    /// After the terminating `.` line, before the final reply. Recipient
    /// scripts answer here when [`Behaviour::reply_phase`] is `EndOfData`.
    EndOfData,
}

/// Everything a test can script about the server; `Default` accepts every
/// message. Build it with the constructors and `with_*` helpers, or with
/// struct update syntax on the public fields.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Connection-level behaviour.
    pub mode: Mode,
    /// Replies per recipient (keys compared case-insensitively): the n-th
    /// attempt for that address gets the n-th reply, later attempts the last
    /// one. Each reply is a full `CODE text` line. An empty list means "no
    /// script".
    pub rcpt_scripts: HashMap<String, Vec<String>>,
    /// Reply for every recipient that has no script (e.g.
    /// `550 5.1.1 no such user`); `None` accepts them.
    pub default_rcpt_reply: Option<String>,
    /// Where scripted replies are given: at RCPT (default, [`Phase::Rcpt`]) or
    /// as the reply to the end of DATA ([`Phase::EndOfData`]); any other
    /// phase is treated as `Rcpt`.
    pub reply_phase: Phase,
    /// Wait this long before every final reply after DATA (slow relay).
    pub accept_delay: Duration,
    /// `Some((username, password))` advertises `AUTH PLAIN LOGIN` and makes
    /// MAIL answer `530` until the client has authenticated.
    pub auth: Option<(String, String)>,
    /// Reply to every MAIL FROM instead of `250` (e.g. `554 5.7.1 Account
    /// suspended`): a relay that refuses the sender or the account.
    pub mail_reply: Option<String>,
    /// EHLO keywords not to advertise (e.g. `PIPELINING`, `SMTPUTF8`),
    /// compared case-insensitively: a more old-fashioned relay.
    pub withheld_extensions: Vec<String>,
    /// `Some((n, reply))`: a relay that takes at most `n` messages in any second and
    /// answers every MAIL FROM beyond that with `reply` (e.g. SES's `454 Throttling
    /// failure: Maximum sending rate exceeded`). A MAIL admitted counts for its second.
    pub rate_limit: Option<(usize, String)>,
    /// `Some((n, reply))`: a relay that serves at most `n` sessions at once and greets
    /// every further one with `reply` (e.g. `421 4.7.0 Too many concurrent SMTP
    /// connections`), then closes it.
    pub session_limit: Option<(usize, String)>,
}

impl Behaviour {
    /// Accept everything (the default), for readability at call sites.
    pub fn accept_all() -> Self {
        Self::default()
    }

    /// Accept everything except `rcpt`, which gets `replies` in order.
    pub fn rcpt_script(rcpt: &str, replies: &[&str]) -> Self {
        Self::default().with_rcpt_script(rcpt, replies)
    }

    /// Give every recipient the same reply (e.g. `451 try again later`).
    pub fn every_rcpt(reply: &str) -> Self {
        Self::default().with_default_rcpt_reply(reply)
    }

    /// Answer every MAIL FROM with `reply` (e.g. `554 5.7.1 Account suspended`).
    pub fn refuse_mail(reply: &str) -> Self {
        assert_reply_line(reply);
        Self {
            mail_reply: Some(reply.to_owned()),
            ..Self::default()
        }
    }

    /// Close every connection right after accepting it, with no greeting.
    pub fn refuse_connections() -> Self {
        Self::default().with_mode(Mode::RefuseConnections)
    }

    /// Greet with `line` (e.g. `421 4.3.2 service not available`), then close.
    pub fn greeting(line: &str) -> Self {
        assert_reply_line(line);
        Self::default().with_mode(Mode::Greeting(line.to_owned()))
    }

    /// Close the socket part-way through the DATA payload.
    pub fn drop_mid_data() -> Self {
        Self::default().with_mode(Mode::DropMidData)
    }

    /// Read the whole message, then close without answering.
    pub fn accept_then_close() -> Self {
        Self::default().with_mode(Mode::AcceptThenClose)
    }

    /// Stop answering for `stall` whenever `phase` is reached.
    pub fn stall_at(phase: Phase, stall: Duration) -> Self {
        Self::default().with_mode(Mode::StallAt(phase, stall))
    }

    /// Stop reading for `stall` after the first line of the payload.
    pub fn stall_mid_data(stall: Duration) -> Self {
        Self::stall_at(Phase::MidData, stall)
    }

    /// Require AUTH PLAIN or LOGIN with these credentials before MAIL.
    pub fn auth_required(username: &str, password: &str) -> Self {
        Self::default().with_auth(username, password)
    }

    /// Replace the connection-level mode.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Add (or replace) the reply script of one recipient.
    pub fn with_rcpt_script(mut self, rcpt: &str, replies: &[&str]) -> Self {
        replies.iter().for_each(|r| assert_reply_line(r));
        self.rcpt_scripts.insert(
            rcpt.to_ascii_lowercase(),
            replies.iter().map(|r| (*r).to_owned()).collect(),
        );
        self
    }

    /// Set the reply for recipients without a script.
    pub fn with_default_rcpt_reply(mut self, reply: &str) -> Self {
        assert_reply_line(reply);
        self.default_rcpt_reply = Some(reply.to_owned());
        self
    }

    /// Give scripted replies at `phase` (`Rcpt` or `EndOfData`).
    pub fn with_reply_phase(mut self, phase: Phase) -> Self {
        self.reply_phase = phase;
        self
    }

    /// Delay every final reply after DATA by `delay`.
    pub fn with_accept_delay(mut self, delay: Duration) -> Self {
        self.accept_delay = delay;
        self
    }

    /// Do not advertise the EHLO keyword `keyword` (e.g. `PIPELINING`).
    pub fn without_extension(mut self, keyword: &str) -> Self {
        self.withheld_extensions.push(keyword.to_ascii_uppercase());
        self
    }

    /// Require authentication with these credentials.
    /// At most `n` messages in any second; MAIL beyond that gets `reply`.
    pub fn with_rate_limit(mut self, n: usize, reply: &str) -> Self {
        assert_reply_line(reply);
        self.rate_limit = Some((n, reply.to_owned()));
        self
    }

    /// At most `n` sessions at once; a further one is greeted with `reply` and closed.
    pub fn with_session_limit(mut self, n: usize, reply: &str) -> Self {
        assert_reply_line(reply);
        self.session_limit = Some((n, reply.to_owned()));
        self
    }

    pub fn with_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some((username.to_owned(), password.to_owned()));
        self
    }

    /// The scripted reply for the `attempt`-th (1-based) try of `rcpt`, if any.
    fn scripted_reply(&self, rcpt: &str, attempt: usize) -> Option<&str> {
        match self.rcpt_scripts.get(&rcpt.to_ascii_lowercase()) {
            Some(script) if !script.is_empty() => {
                Some(script[attempt.clamp(1, script.len()) - 1].as_str())
            }
            _ => self.default_rcpt_reply.as_deref(),
        }
    }

    fn stall_for(&self, phase: Phase) -> Option<Duration> {
        match self.mode {
            Mode::StallAt(p, d) if p == phase => Some(d),
            _ => None,
        }
    }

    fn replies_at_end_of_data(&self) -> bool {
        self.reply_phase == Phase::EndOfData
    }
}

/// Panics with a clear message when a scripted reply is not `CODE text`.
fn assert_reply_line(line: &str) {
    let b = line.as_bytes();
    assert!(
        b.len() >= 3
            && b[..3].iter().all(u8::is_ascii_digit)
            && (b.len() == 3 || b[3] == b' ')
            && !line.contains(['\r', '\n']),
        "scripted SMTP reply must be a single `CODE text` line, got {line:?}"
    );
}

/// A message the server received in full, as tests assert on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Reverse path from MAIL FROM, without angle brackets (`""` for `<>`).
    pub mail_from: String,
    /// Recipients that got a 2xx at RCPT, in order, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The payload without the terminating `.` line, dot-unstuffed, with the
    /// client's line endings kept as sent.
    pub data: Vec<u8>,
    /// The bytes exactly as they came after `354`, dot-stuffing and the
    /// terminating `.` line included, for tests of what went over the wire.
    /// A bare LF ends a line here as it does for lenient relays.
    pub raw: Vec<u8>,
    /// When the message was recorded: immediately before its final reply was
    /// written (or, for [`Mode::AcceptThenClose`], before the close).
    pub at: Instant,
    /// Username the session authenticated as, if it did.
    pub auth_user: Option<String>,
    /// 1-based number of the TCP connection it came on, to tell reused
    /// (pooled) connections from new ones.
    pub session: usize,
}

#[derive(Default)]
struct Records {
    accepted: Vec<ReceivedMessage>,
    unanswered: Vec<ReceivedMessage>,
    rcpt_attempts: HashMap<String, usize>,
    data_attempts: HashMap<String, usize>,
    auth_successes: usize,
    auth_failures: usize,
    /// MAIL commands admitted under [`Behaviour::rate_limit`], by time.
    admitted: std::collections::VecDeque<Instant>,
    /// When MAIL was refused by the rate limit.
    rate_refusals: Vec<Instant>,
    /// When a session was refused by the session limit.
    session_refusals: Vec<Instant>,
}

struct Inner {
    behaviour: Mutex<Behaviour>,
    records: Mutex<Records>,
    accepted_changed: Notify,
    open: AtomicUsize,
    max_open: AtomicUsize,
    total: AtomicUsize,
    /// Sessions greeted with 220 and still open (those a session limit refused excluded).
    served: AtomicUsize,
    max_served: AtomicUsize,
}

impl Inner {
    fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        lock(&self.records)
    }
}

/// Locks ignoring poisoning: a panicking session must not hide the records.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrements the open-session counter when a session's socket is gone,
/// including when its task is aborted at shutdown. A session that ended with
/// QUIT stays open until the server closes it, as for a real relay (Postfix's
/// anvil counts a client until smtpd is done with it), not from the `221` on;
/// like smtpd, which tells anvil before its connection is closed, the count
/// drops just before the server's close, so a client that waits for the
/// close sees the session gone.
/// Counts a served session until it ends.
struct ServedGuard<'a>(&'a Inner);

impl Drop for ServedGuard<'_> {
    fn drop(&mut self) {
        self.0.served.fetch_sub(1, Ordering::SeqCst);
    }
}

struct SessionGuard(Arc<Inner>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running scripted SMTP server; dropping it stops it too, but
/// [`ScriptedSmtp::shutdown`] also waits for the sessions to close.
pub struct ScriptedSmtp {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ScriptedSmtp {
    /// Start on 127.0.0.1 with an ephemeral port and the given behaviour.
    pub async fn start(behaviour: Behaviour) -> ScriptedSmtp {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("scripted SMTP server: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr of bound listener");
        let inner = Arc::new(Inner {
            behaviour: Mutex::new(behaviour),
            records: Mutex::new(Records::default()),
            accepted_changed: Notify::new(),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            max_served: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&inner), stop_rx));
        ScriptedSmtp {
            addr,
            inner,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Address to point a client at (always 127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Port to point a client at.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replace the behaviour while running (e.g. a relay that comes back
    /// mid-test). New connections and the next command of open sessions use
    /// it; per-recipient attempt counts are kept.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.inner.behaviour) = behaviour;
    }

    /// Every message accepted with 250 after DATA, in order.
    pub fn accepted(&self) -> Vec<ReceivedMessage> {
        self.inner.records().accepted.clone()
    }

    /// Every recipient of an accepted message, each once however often it arrived.
    pub fn recipients(&self) -> std::collections::HashSet<String> {
        self.inner
            .records()
            .accepted
            .iter()
            .flat_map(|m| m.rcpt_to.iter().cloned())
            .collect()
    }

    /// Number of messages accepted with 250 after DATA.
    pub fn accepted_count(&self) -> usize {
        self.inner.records().accepted.len()
    }

    /// Messages read in full under [`Mode::AcceptThenClose`] but never
    /// answered; they are not in [`accepted`](Self::accepted).
    pub fn accepted_but_unanswered(&self) -> Vec<ReceivedMessage> {
        self.inner.records().unanswered.clone()
    }

    /// Wait until at least `n` messages are accepted or `timeout` passes;
    /// returns the accepted count at that moment.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.accepted_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let count = self.accepted_count();
            if count >= n {
                return count;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.accepted_count();
            }
        }
    }

    /// Largest number of SMTP sessions open at the same moment since start.
    /// A session is open from TCP accept until its socket is closed by either
    /// side; refused connections count for their brief moment too, so the
    /// figure never under-states what a client held open.
    pub fn max_concurrent_sessions(&self) -> usize {
        self.inner.max_open.load(Ordering::SeqCst)
    }

    /// Sessions open right now (same definition as
    /// [`max_concurrent_sessions`](Self::max_concurrent_sessions)).
    pub fn sessions_open(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start, including the ones closed at
    /// once by [`Mode::RefuseConnections`] or a [`Mode::Greeting`].
    pub fn sessions_total(&self) -> usize {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// Largest number of messages accepted within any sliding one-second
    /// window `[t_i, t_i + 1s)`, computed exactly from acceptance timestamps.
    pub fn max_accepted_in_any_second(&self) -> usize {
        self.max_accepted_in_window(Duration::from_secs(1))
    }

    /// Same as [`max_accepted_in_any_second`](Self::max_accepted_in_any_second)
    /// for another window length, for budgets not expressed per second.
    pub fn max_accepted_in_window(&self, window: Duration) -> usize {
        let times: Vec<Instant> = self.inner.records().accepted.iter().map(|m| m.at).collect();
        max_in_window(times, window)
    }

    /// How many times RCPT TO named `rcpt` (case-insensitive), whatever the
    /// reply, for "451 twice then 250" assertions.
    pub fn rcpt_attempts(&self, rcpt: &str) -> usize {
        let records = self.inner.records();
        records
            .rcpt_attempts
            .get(&rcpt.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Successful AUTH exchanges (235 sent), to check the client logged in.
    /// The most sessions served (greeted with 220) at once.
    pub fn max_served_sessions(&self) -> usize {
        self.inner.max_served.load(Ordering::SeqCst)
    }

    /// Sessions served now.
    pub fn sessions_served(&self) -> usize {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// When MAIL was refused by [`Behaviour::rate_limit`].
    pub fn rate_refusals(&self) -> Vec<Instant> {
        self.inner.records().rate_refusals.clone()
    }

    /// When a session was refused by [`Behaviour::session_limit`].
    pub fn session_refusals(&self) -> Vec<Instant> {
        self.inner.records().session_refusals.clone()
    }

    /// When each accepted message was accepted.
    pub fn accepted_times(&self) -> Vec<Instant> {
        self.inner.records().accepted.iter().map(|m| m.at).collect()
    }

    pub fn auth_successes(&self) -> usize {
        self.inner.records().auth_successes
    }

    /// Failed AUTH exchanges (535 sent), to check wrong credentials were tried.
    pub fn auth_failures(&self) -> usize {
        self.inner.records().auth_failures
    }

    /// Stop listening and close all sessions, waiting until they are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ScriptedSmtp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the accept loop drops its JoinSet, which aborts sessions.
            task.abort();
        }
    }
}

/// Exact sliding-window maximum: for each timestamp t_i, how many fall in
/// `[t_i, t_i + window)`.
fn max_in_window(mut times: Vec<Instant>, window: Duration) -> usize {
    times.sort_unstable();
    let mut best = 0;
    let mut end = 0;
    for (i, &start) in times.iter().enumerate() {
        end = end.max(i);
        while end < times.len() && times[end] < start + window {
            end += 1;
        }
        best = best.max(end - i);
    }
    best
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, mut stop: oneshot::Receiver<()>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let open = inner.open.fetch_add(1, Ordering::SeqCst) + 1;
                    inner.max_open.fetch_max(open, Ordering::SeqCst);
                    let session = inner.total.fetch_add(1, Ordering::SeqCst) + 1;
                    let guard = SessionGuard(Arc::clone(&inner));
                    let inner = Arc::clone(&inner);
                    sessions.spawn(async move {
                        // The guard lives in the session: dropped just before the
                        // server closes after QUIT, else after the stream is closed.
                        let _ = run_session(stream, &inner, session, guard).await;
                    });
                }
                // e.g. EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(listener);
    sessions.shutdown().await;
}

/// Why a session ended early; only used to unwind with `?`.
#[derive(Debug)]
enum End {
    /// The peer closed or reset the connection, or I/O failed.
    Closed,
    /// The script says to close now.
    Hangup,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Closed
    }
}

struct Session<'a> {
    io: BufReader<TcpStream>,
    /// Counted as open until dropped (declared after `io`: dropped after it).
    open: Option<SessionGuard>,
    inner: &'a Inner,
    number: usize,
    greeted: bool,
    auth_user: Option<String>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

async fn run_session(
    stream: TcpStream,
    inner: &Inner,
    number: usize,
    guard: SessionGuard,
) -> Result<(), End> {
    let behaviour = inner.behaviour();
    if behaviour.mode == Mode::RefuseConnections {
        return Ok(());
    }
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        io: BufReader::new(stream),
        open: Some(guard),
        inner,
        number,
        greeted: false,
        auth_user: None,
        mail_from: None,
        rcpt_to: Vec::new(),
    };
    s.stall(&behaviour, Phase::Greeting).await?;
    if let Mode::Greeting(line) = &behaviour.mode {
        s.reply(line).await?;
        s.io.get_mut().shutdown().await?;
        return Ok(());
    }
    let _served = match &behaviour.session_limit {
        Some((limit, refusal)) => {
            let served = inner.served.fetch_add(1, Ordering::SeqCst);
            if served >= *limit {
                inner.served.fetch_sub(1, Ordering::SeqCst);
                inner.records().session_refusals.push(Instant::now());
                s.reply(refusal).await?;
                s.io.get_mut().shutdown().await?;
                return Ok(());
            }
            inner.max_served.fetch_max(served + 1, Ordering::SeqCst);
            ServedGuard(inner)
        }
        None => {
            let served = inner.served.fetch_add(1, Ordering::SeqCst) + 1;
            inner.max_served.fetch_max(served, Ordering::SeqCst);
            ServedGuard(inner)
        }
    };
    s.reply(&format!("220 {SERVER_NAME} ESMTP sluice scripted server"))
        .await?;
    s.command_loop().await
}

impl Session<'_> {
    async fn reply(&mut self, line: &str) -> Result<(), End> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.io.write_all(&bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Reads one line including its terminator; `Closed` at EOF.
    async fn read_line(&mut self, limit: usize) -> Result<Vec<u8>, End> {
        let mut line = Vec::new();
        let n = (&mut self.io)
            .take(limit as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(End::Closed);
        }
        Ok(line)
    }

    /// Waits out a scripted stall for `phase`, ending the session early if
    /// the client closes meanwhile (so it is not counted as open).
    async fn stall(&mut self, behaviour: &Behaviour, phase: Phase) -> Result<(), End> {
        match behaviour.stall_for(phase) {
            Some(duration) => self.pause(duration).await,
            None => Ok(()),
        }
    }

    /// Stops answering for `duration`; `Closed` if the client closes or
    /// resets the connection meanwhile.
    async fn pause(&mut self, duration: Duration) -> Result<(), End> {
        let deadline = tokio::time::Instant::now() + duration;
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Ok(()),
            peeked = self.io.get_ref().peek(&mut probe) => match peeked {
                Ok(0) | Err(_) => Err(End::Closed),
                // Data is waiting, so EOF can no longer be seen without
                // reading it: just sit out the rest of the stall.
                Ok(_) => {
                    tokio::time::sleep_until(deadline).await;
                    Ok(())
                }
            },
        }
    }

    async fn command_loop(&mut self) -> Result<(), End> {
        loop {
            let raw = self.read_line(MAX_COMMAND_LINE).await?;
            if !raw.ends_with(b"\n") && raw.len() >= MAX_COMMAND_LINE {
                self.reply("500 5.5.2 line too long").await?;
                return Err(End::Hangup);
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let (verb, arg) = match line.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
                None => (line.trim().to_ascii_uppercase(), ""),
            };
            let behaviour = self.inner.behaviour();
            match verb.as_str() {
                "EHLO" | "HELO" => self.ehlo(&behaviour, &verb == "EHLO").await?,
                "AUTH" => self.auth(&behaviour, arg).await?,
                "MAIL" => self.mail(&behaviour, arg).await?,
                "RCPT" => self.rcpt(&behaviour, arg).await?,
                "DATA" => self.data(&behaviour).await?,
                "RSET" => {
                    self.reset();
                    self.reply("250 2.0.0 Ok").await?;
                }
                "NOOP" => self.reply("250 2.0.0 Ok").await?,
                "QUIT" => {
                    self.reply("221 2.0.0 Bye").await?;
                    self.open.take();
                    self.io.get_mut().shutdown().await?;
                    return Ok(());
                }
                _ => {
                    self.reply("502 5.5.2 Error: command not recognized")
                        .await?
                }
            }
        }
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    async fn ehlo(&mut self, behaviour: &Behaviour, extended: bool) -> Result<(), End> {
        self.stall(behaviour, Phase::Ehlo).await?;
        self.reset();
        self.greeted = true;
        if !extended {
            return self.reply(&format!("250 {SERVER_NAME}")).await;
        }
        let mut lines = vec![format!("250-{SERVER_NAME}")];
        for keyword in ["PIPELINING", "8BITMIME", "SMTPUTF8"] {
            if !behaviour.withheld_extensions.iter().any(|w| w == keyword) {
                lines.push(format!("250-{keyword}"));
            }
        }
        if behaviour.auth.is_some() {
            lines.push("250-AUTH PLAIN LOGIN".to_owned());
        }
        lines.push(format!("250 SIZE {MAX_MESSAGE_SIZE}"));
        self.reply(&lines.join("\r\n")).await
    }

    async fn auth(&mut self, behaviour: &Behaviour, arg: &str) -> Result<(), End> {
        let Some((user, pass)) = &behaviour.auth else {
            return self.reply("502 5.5.1 AUTH not supported").await;
        };
        if !self.greeted {
            return self.reply("503 5.5.1 Error: send EHLO first").await;
        }
        if self.auth_user.is_some() {
            return self.reply("503 5.5.1 Error: already authenticated").await;
        }
        if self.mail_from.is_some() {
            return self
                .reply("503 5.5.1 Error: MAIL transaction in progress")
                .await;
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_owned())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => {
                let encoded = match initial {
                    Some(i) => i,
                    None => match self.auth_response("334 ").await? {
                        Some(r) => r,
                        None => return self.reply("501 5.7.0 Authentication aborted").await,
                    },
                };
                decode_b64(&encoded).and_then(|raw| {
                    let mut parts = raw.split(|&b| b == 0);
                    let _authzid = parts.next()?;
                    let u = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let p = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    parts.next().is_none().then_some((u, p))
                })
            }
            "LOGIN" => {
                let encoded_user = match initial {
                    Some(i) => Some(i),
                    // base64("Username:")
                    None => self.auth_response("334 VXNlcm5hbWU6").await?,
                };
                let Some(encoded_user) = encoded_user else {
                    return self.reply("501 5.7.0 Authentication aborted").await;
                };
                // base64("Password:")
                let Some(encoded_pass) = self.auth_response("334 UGFzc3dvcmQ6").await? else {
                    return self.reply("501 5.7.0 Authentication aborted").await;
                };
                let u = decode_b64(&encoded_user).and_then(|b| String::from_utf8(b).ok());
                let p = decode_b64(&encoded_pass).and_then(|b| String::from_utf8(b).ok());
                u.zip(p)
            }
            _ => {
                return self
                    .reply("504 5.5.4 Unrecognized authentication type")
                    .await
            }
        };
        match credentials {
            Some((u, p)) if &u == user && &p == pass => {
                self.inner.records().auth_successes += 1;
                self.auth_user = Some(u);
                self.reply("235 2.7.0 Authentication successful").await
            }
            _ => {
                self.inner.records().auth_failures += 1;
                self.reply("535 5.7.8 authentication failed").await
            }
        }
    }

    /// Sends a `334` prompt and reads the answer; `None` if the client
    /// cancelled with `*`.
    async fn auth_response(&mut self, prompt: &str) -> Result<Option<String>, End> {
        self.reply(prompt).await?;
        let raw = self.read_line(MAX_COMMAND_LINE).await?;
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim();
        Ok((line != "*").then(|| line.to_owned()))
    }

    async fn mail(&mut self, behaviour: &Behaviour, arg: &str) -> Result<(), End> {
        self.stall(behaviour, Phase::Mail).await?;
        if !self.greeted {
            return self.reply("503 5.5.1 Error: send HELO/EHLO first").await;
        }
        if behaviour.auth.is_some() && self.auth_user.is_none() {
            return self.reply("530 5.7.0 authentication required").await;
        }
        if self.mail_from.is_some() {
            return self.reply("503 5.5.1 Error: nested MAIL command").await;
        }
        let Some(from) = parse_path(arg, "FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>").await;
        };
        if let Some(refusal) = &behaviour.mail_reply {
            return self.reply(refusal).await;
        }
        if let Some((limit, refusal)) = &behaviour.rate_limit {
            let now = Instant::now();
            let admitted = {
                let mut records = self.inner.records();
                while records
                    .admitted
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    records.admitted.pop_front();
                }
                if records.admitted.len() < *limit {
                    records.admitted.push_back(now);
                    true
                } else {
                    records.rate_refusals.push(now);
                    false
                }
            };
            if !admitted {
                return self.scripted(refusal).await;
            }
        }
        self.mail_from = Some(from);
        self.reply("250 2.1.0 Ok").await
    }

    async fn rcpt(&mut self, behaviour: &Behaviour, arg: &str) -> Result<(), End> {
        self.stall(behaviour, Phase::Rcpt).await?;
        if self.mail_from.is_none() {
            return self.reply("503 5.5.1 Error: need MAIL command").await;
        }
        let Some(rcpt) = parse_path(arg, "TO:").filter(|r| !r.is_empty()) else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>").await;
        };
        let attempt = {
            let mut records = self.inner.records();
            let n = records
                .rcpt_attempts
                .entry(rcpt.to_ascii_lowercase())
                .or_insert(0);
            *n += 1;
            *n
        };
        let scripted = if behaviour.replies_at_end_of_data() {
            None
        } else {
            behaviour.scripted_reply(&rcpt, attempt)
        };
        match scripted {
            None => {
                self.rcpt_to.push(rcpt);
                self.reply("250 2.1.5 Ok").await
            }
            Some(reply) => {
                if reply.starts_with('2') {
                    self.rcpt_to.push(rcpt);
                }
                self.scripted(reply).await
            }
        }
    }

    /// Sends a scripted reply; a `421` also closes the connection, as real
    /// servers do.
    async fn scripted(&mut self, reply: &str) -> Result<(), End> {
        self.reply(reply).await?;
        if reply.starts_with("421") {
            let _ = self.io.get_mut().shutdown().await;
            return Err(End::Hangup);
        }
        Ok(())
    }

    async fn data(&mut self, behaviour: &Behaviour) -> Result<(), End> {
        if self.mail_from.is_none() {
            return self.reply("503 5.5.1 Error: need MAIL command").await;
        }
        if self.rcpt_to.is_empty() {
            return self.reply("554 5.5.1 Error: no valid recipients").await;
        }
        self.stall(behaviour, Phase::Data).await?;
        self.reply("354 End data with <CR><LF>.<CR><LF>").await?;

        let mut data = Vec::new();
        let mut raw_data = Vec::new();
        let mut too_big = false;
        let mut first_line = true;
        loop {
            let raw = self.read_line(usize::MAX).await?;
            if !raw.ends_with(b"\n") {
                // EOF in the middle of a line: the client went away.
                return Err(End::Closed);
            }
            if raw_data.len() + raw.len() <= MAX_MESSAGE_SIZE + 2 {
                raw_data.extend_from_slice(&raw);
            }
            let content = raw
                .strip_suffix(b"\r\n")
                .or_else(|| raw.strip_suffix(b"\n"))
                .unwrap_or(&raw);
            if content == b"." {
                break;
            }
            let unstuffed = raw.strip_prefix(b".").unwrap_or(&raw);
            if data.len() + unstuffed.len() > MAX_MESSAGE_SIZE {
                too_big = true;
            } else if !too_big {
                data.extend_from_slice(unstuffed);
            }
            if first_line {
                first_line = false;
                // Re-read the behaviour: a test may switch it during DATA.
                let now = self.inner.behaviour();
                if now.mode == Mode::DropMidData {
                    return Err(End::Hangup);
                }
                self.stall(&now, Phase::MidData).await?;
            }
        }

        let behaviour = self.inner.behaviour();
        let message = ReceivedMessage {
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            data,
            raw: raw_data,
            at: Instant::now(),
            auth_user: self.auth_user.clone(),
            session: self.number,
        };
        if behaviour.mode == Mode::DropMidData && message.data.is_empty() {
            // An empty payload has no first line to drop after.
            return Err(End::Hangup);
        }
        if behaviour.mode == Mode::AcceptThenClose {
            self.inner.records().unanswered.push(message);
            return Err(End::Hangup);
        }
        self.stall(&behaviour, Phase::EndOfData).await?;
        if !behaviour.accept_delay.is_zero() {
            self.pause(behaviour.accept_delay).await?;
        }
        if too_big {
            return self.reply("552 5.3.4 Error: message too big").await;
        }
        let rejection = if behaviour.replies_at_end_of_data() {
            let mut records = self.inner.records();
            let mut first_failure = None;
            for rcpt in &message.rcpt_to {
                let n = records
                    .data_attempts
                    .entry(rcpt.to_ascii_lowercase())
                    .or_insert(0);
                *n += 1;
                if let Some(reply) = behaviour.scripted_reply(rcpt, *n) {
                    if !reply.starts_with('2') && first_failure.is_none() {
                        first_failure = Some(reply.to_owned());
                    }
                }
            }
            first_failure
        } else {
            None
        };
        if let Some(reply) = rejection {
            return self.scripted(&reply).await;
        }
        let queue_id = {
            let mut records = self.inner.records();
            let mut message = message;
            // Timestamp under the lock so `accepted` stays in time order.
            message.at = Instant::now();
            records.accepted.push(message);
            records.accepted.len()
        };
        self.inner.accepted_changed.notify_waiters();
        self.reply(&format!("250 2.0.0 Ok: queued as {queue_id}"))
            .await
    }
}

/// Parses `FROM:<addr> PARAMS` / `TO:<addr> PARAMS` (prefix case-insensitive,
/// optional space after the colon, brackets optional); returns the address.
fn parse_path(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        Some(inner[..end].trim().to_owned())
    } else {
        let addr = rest.split_whitespace().next()?;
        Some(addr.to_owned())
    }
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn window_counts_half_open_interval() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let times = vec![ms(0), ms(100), ms(999), ms(1000), ms(1500), ms(1999)];
        // [0,1000) holds 3; [999,1999) holds 3; [1000,2000) holds 3.
        assert_eq!(max_in_window(times.clone(), Duration::from_secs(1)), 3);
        assert_eq!(max_in_window(times, Duration::from_millis(1001)), 4);
        assert_eq!(max_in_window(vec![], Duration::from_secs(1)), 0);
        assert_eq!(max_in_window(vec![ms(5), ms(5)], Duration::from_secs(1)), 2);
    }

    #[test]
    fn paths_with_parameters() {
        assert_eq!(
            parse_path("FROM:<a@b> SIZE=123 BODY=8BITMIME", "FROM:").as_deref(),
            Some("a@b")
        );
        assert_eq!(parse_path("from: <x@y>", "FROM:").as_deref(), Some("x@y"));
        assert_eq!(parse_path("FROM:<>", "FROM:").as_deref(), Some(""));
        assert_eq!(
            parse_path("To:c@d NOTIFY=NEVER", "TO:").as_deref(),
            Some("c@d")
        );
        assert_eq!(parse_path("TO <c@d>", "TO:"), None);
        assert_eq!(parse_path("FROM:<a@b", "FROM:"), None);
    }

    #[test]
    fn script_index_clamps_to_last() {
        let b = Behaviour::rcpt_script("A@x", &["451 a", "250 b"]);
        assert_eq!(b.scripted_reply("a@X", 1), Some("451 a"));
        assert_eq!(b.scripted_reply("a@x", 2), Some("250 b"));
        assert_eq!(b.scripted_reply("a@x", 7), Some("250 b"));
        assert_eq!(b.scripted_reply("other@x", 1), None);
        let b = b.with_default_rcpt_reply("550 no");
        assert_eq!(b.scripted_reply("other@x", 1), Some("550 no"));
    }

    #[test]
    #[should_panic(expected = "CODE text")]
    fn rejects_malformed_reply() {
        let _ = Behaviour::every_rcpt("ok");
    }
}
