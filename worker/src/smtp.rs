//! SMTP sessions with one relay: connect, STARTTLS or implicit TLS, AUTH, send, quit.
//!
//! A session is opened only while its worker holds a budget slot for the relay (see
//! [`crate::budget`]), which is why sessions are managed here explicitly instead of by a
//! connection pool: the budget must know about every open connection, idle ones included.
//!
//! lettre does the session set-up; the transaction itself is ours when the relay offers
//! PIPELINING (RFC 2920): MAIL, RCPT and DATA go out in one write and their replies are
//! read together, so a message costs two round trips instead of four. lettre 0.11 has no
//! pipelining of its own.

use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use sluice_shared::config::{CleartextAuth, RelaySettings, TlsMode};

use crate::line_endings::crlf_line_endings;

/// Why a session could not be opened. Every variant is a fault of the relay (or of our
/// settings for it), never of a job: no job is bounced or deferred for it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("relay {relay} did not answer within {timeout:?}")]
    Timeout { relay: String, timeout: Duration },
    #[error("relay {relay} refused the session: {reason}")]
    Refused {
        relay: String,
        reason: String,
        /// The relay's negative reply (code, text), when it gave one: what the reply rules
        /// read (see [`crate::pushback`]).
        reply: Option<(u16, String)>,
    },
    #[error("relay {relay} rejected our credentials: {reason}")]
    AuthRejected { relay: String, reason: String },
}

impl OpenError {
    /// The relay's negative reply at the greeting or EHLO, if that is why.
    pub fn reply(&self) -> Option<(u16, &str)> {
        match self {
            Self::Refused {
                reply: Some((code, text)),
                ..
            } => Some((*code, text.as_str())),
            _ => None,
        }
    }
}

/// Where in a transaction the relay answered: a refusal at MAIL FROM is about us (the
/// sender, the account), one at RCPT usually about the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Rcpt,
    Data,
    /// The reply after the content's final dot.
    Content,
}

/// The result of handing one message to the relay.
#[derive(Debug)]
pub enum SendError {
    /// The relay answered with a negative reply (4xx or 5xx) at `stage`.
    Reply {
        stage: Stage,
        code: u16,
        text: String,
    },
    /// No reply within the step's timeout (`command_timeout`, or `data_timeout` after the
    /// content): the session is unusable.
    Timeout(Duration),
    /// The connection broke (reset, closed before the reply...).
    Connection(String),
    /// This relay cannot take the message at all (an address it cannot carry): decided
    /// here, before any command, so it is the job's permanent failure and says nothing
    /// about the relay. The session stays usable.
    Unsendable { code: u16, text: String },
}

/// Everything needed to open sessions with one relay; built once at start.
pub struct RelayClient {
    name: Arc<str>,
    settings: RelaySettings,
    hello: ClientId,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
}

impl RelayClient {
    /// Prepare TLS parameters and credentials for `settings` (reads `ca_file`, `password_file`).
    pub fn new(name: &str, settings: &RelaySettings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let tls = match settings.tls {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Tls => {
                let mut builder = TlsParameters::builder(settings.host.clone());
                if let Some(path) = &settings.ca_file {
                    let pem = std::fs::read(path).with_context(|| {
                        format!("reading relays.{name}.ca_file {}", path.display())
                    })?;
                    let cert = Certificate::from_pem(&pem).with_context(|| {
                        format!("relays.{name}.ca_file is not a PEM certificate")
                    })?;
                    builder = builder.add_root_certificate(cert);
                }
                if settings.tls_insecure_skip_verify {
                    tracing::warn!(
                        relay = name,
                        "tls_insecure_skip_verify is on: the relay's certificate is NOT verified"
                    );
                    builder = builder
                        .dangerous_accept_invalid_certs(true)
                        .dangerous_accept_invalid_hostnames(true);
                }
                Some(
                    builder
                        .build_rustls()
                        .with_context(|| format!("TLS settings of relay {name}"))?,
                )
            }
        };
        let password = settings
            .resolved_password()
            .with_context(|| format!("password of relay {name}"))?;
        // `Settings::validate` already refused a username without a password (and the
        // reverse) and credentials that would go in clear text.
        let credentials = match (&settings.username, password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            )),
            _ => None,
        };
        if settings.cleartext_auth() == CleartextAuth::Allowed {
            tracing::warn!(
                relay = name,
                host = %settings.host,
                "allow_plaintext_auth is on: the relay's credentials go in clear text over the network"
            );
        }
        let hello = match &settings.helo_name {
            Some(name) => ClientId::Domain(name.clone()),
            None => ClientId::default(),
        };
        Ok(Self {
            name: name.into(),
            settings: settings.clone(),
            hello,
            tls,
            credentials,
        })
    }

    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The relay's settings.
    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// Open a session: TCP (and TLS), greeting, EHLO, STARTTLS and AUTH as configured.
    pub async fn open(&self) -> Result<SmtpSession, OpenError> {
        let connect_timeout = self.settings.connect_timeout;
        let connect = async {
            if self.settings.tls == TlsMode::Tls {
                // Implicit TLS: lettre wraps the socket itself.
                return AsyncSmtpConnection::connect_tokio1(
                    (self.settings.host.as_str(), self.settings.port),
                    Some(connect_timeout),
                    &self.hello,
                    self.tls.clone(),
                    None,
                )
                .await
                .map_err(|e| self.open_error(&e, connect_timeout));
            }
            // Our own socket, so that Nagle's algorithm is off: lettre writes a message's
            // body and its final dot separately, and with Nagle on (and the relay's delayed
            // ACK) every message would wait ~40 ms for nothing.
            let tcp =
                tokio::net::TcpStream::connect((self.settings.host.as_str(), self.settings.port))
                    .await
                    .map_err(|e| self.refused(format!("cannot connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                .await
                .map_err(|e| self.open_error(&e, connect_timeout))
        };
        let mut conn = match tokio::time::timeout(connect_timeout, connect).await {
            Err(_) => return Err(self.timeout(connect_timeout)),
            Ok(result) => result?,
        };
        let command_timeout = self.settings.command_timeout;
        if self.settings.tls == TlsMode::Starttls {
            if !conn.can_starttls() {
                conn.abort().await;
                return Err(
                    self.refused("STARTTLS is required but the relay does not offer it".into())
                );
            }
            let tls = self.tls.clone().expect("TLS parameters exist for starttls");
            match tokio::time::timeout(command_timeout, conn.starttls(tls, &self.hello)).await {
                Err(_) => return Err(self.timeout(command_timeout)),
                Ok(Err(e)) => {
                    return Err(self.refused(format!("STARTTLS failed: {}", describe(&e))))
                }
                Ok(Ok(())) => {}
            }
        }
        // lettre keeps only the EHLO keywords it knows, and PIPELINING is not one of them:
        // ask again (before AUTH, which some relays reset on a later EHLO).
        let pipelining =
            match tokio::time::timeout(command_timeout, offers_pipelining(&mut conn, &self.hello))
                .await
            {
                Err(_) => return Err(self.timeout(command_timeout)),
                Ok(Err(e)) => {
                    let mut error = self.refused(format!("EHLO failed: {}", describe(&e)));
                    if let OpenError::Refused { reply, .. } = &mut error {
                        *reply = negative_reply(&e);
                    }
                    return Err(error);
                }
                Ok(Ok(offered)) => offered,
            };
        if let Some(credentials) = &self.credentials {
            let auth = conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials);
            match tokio::time::timeout(command_timeout, auth).await {
                Err(_) => return Err(self.timeout(command_timeout)),
                // Never put the AUTH exchange itself in the message: only code and reply text.
                Ok(Err(e)) => {
                    return Err(OpenError::AuthRejected {
                        relay: self.name.to_string(),
                        reason: describe(&e),
                    })
                }
                Ok(Ok(_)) => {}
            }
        }
        Ok(SmtpSession {
            conn,
            sent: 0,
            command_timeout,
            data_timeout: self.settings.data_timeout,
            pipelining,
            broken: false,
        })
    }

    fn open_error(&self, e: &lettre::transport::smtp::Error, timeout: Duration) -> OpenError {
        if e.is_timeout() {
            self.timeout(timeout)
        } else {
            OpenError::Refused {
                relay: self.name.to_string(),
                reason: describe(e),
                reply: negative_reply(e),
            }
        }
    }

    fn timeout(&self, timeout: Duration) -> OpenError {
        OpenError::Timeout {
            relay: self.name.to_string(),
            timeout,
        }
    }

    fn refused(&self, reason: String) -> OpenError {
        OpenError::Refused {
            relay: self.name.to_string(),
            reason,
            reply: None,
        }
    }
}

/// One open SMTP session. It is closed (QUIT) explicitly, or dropped after an error.
pub struct SmtpSession {
    conn: AsyncSmtpConnection,
    sent: u32,
    /// For each command's reply (MAIL, RCPT, DATA, RSET, QUIT).
    command_timeout: Duration,
    /// For the content and the reply to its final dot.
    data_timeout: Duration,
    /// The relay offered PIPELINING in its EHLO reply.
    pipelining: bool,
    /// A timeout or a protocol surprise left the session in an unknown state.
    broken: bool,
}

impl SmtpSession {
    /// Hand one message to the relay: MAIL, RCPT, DATA. After a negative reply the
    /// transaction is reset and the session stays usable; after a timeout or a broken
    /// connection it is not. Each command's reply has `command_timeout`, the content and
    /// the reply to its final dot `data_timeout` (RFC 5321 4.5.3.2: a relay may check the
    /// whole message before it answers).
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SendError> {
        self.sent += 1;
        let smtputf8 = self
            .conn
            .server_info()
            .supports_feature(lettre::transport::smtp::extension::Extension::SmtpUtfEight);
        let envelope = &*envelope_for_relay(envelope, smtputf8)
            .map_err(|text| SendError::Unsendable { code: 553, text })?;
        // Non-ASCII addresses or content need SMTPUTF8 / 8BITMIME parameters: such messages
        // are rare enough to take the step-by-step path.
        let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
        let pipelined = self.pipelining
            && message.is_ascii()
            && envelope.from().is_none_or(ascii)
            && envelope.to().iter().all(ascii);
        // Every step has its own timeout (see `within`), so a relay that stalls anywhere
        // defers the job instead of holding it forever.
        let result = if pipelined {
            self.send_pipelined(envelope, message).await
        } else {
            self.send_stepwise(envelope, message).await
        };
        match result {
            Err(SendError::Timeout(after)) => {
                // Somewhere mid-transaction: nothing said on this connection can be trusted.
                self.broken = true;
                let after = if after.is_zero() {
                    self.command_timeout
                } else {
                    after
                };
                Err(SendError::Timeout(after))
            }
            Err(e @ SendError::Connection(_)) => {
                self.broken = true;
                Err(e)
            }
            result => result,
        }
    }

    /// MAIL, RCPT and DATA in one write, their replies read in order; then the content.
    async fn send_pipelined(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SendError> {
        let mut group = Mail::new(envelope.from().cloned(), Vec::new()).to_string();
        for recipient in envelope.to() {
            group.push_str(&Rcpt::new(recipient.clone(), Vec::new()).to_string());
        }
        group.push_str(&Data.to_string());
        // `command` writes the whole group and reads the first reply (MAIL's); one reply
        // per RCPT and DATA's follow.
        let command = self.command_timeout;
        let mut replies = vec![within(command, self.conn.command(group)).await?];
        for _ in 0..=envelope.to().len() {
            if replies.last().is_some_and(closes_session) {
                // A 421 ends the session (Postfix's "too many errors"): no further reply
                // comes, and the 421 is the answer to act on.
                break;
            }
            replies.push(within(command, self.conn.read_response()).await?);
        }
        // Every reply is read before acting on any, so the session stays in step.
        let data_accepted = replies.last().is_some_and(Result::is_ok);
        let last = replies.len() - 1;
        let mut refusal = None;
        for (i, reply) in replies.into_iter().enumerate() {
            let stage = match i {
                0 => Stage::Mail,
                i if i == last => Stage::Data,
                _ => Stage::Rcpt,
            };
            match reply {
                Ok(_) => {}
                Err(e) if e.status().is_some() => {
                    refusal.get_or_insert((stage, e));
                }
                Err(e) => return Err(send_error(Stage::Mail, e)),
            }
        }
        if let Some((stage, refused)) = refusal {
            if data_accepted {
                // DATA was accepted although an earlier command was refused: the relay
                // now expects content. Drop the connection rather than send an empty
                // message.
                self.broken = true;
            } else {
                self.reset().await;
            }
            return Err(send_error(stage, refused));
        }
        // The relay may take its time (a content scan) before it answers the final dot.
        let sent = within(self.data_timeout, write_content(&mut self.conn, message)).await?;
        self.finish(Stage::Content, sent).await
    }

    /// One command at a time, for relays without PIPELINING and for messages that need
    /// SMTPUTF8 or 8BITMIME. Like the pipelined path, a refusal resets the transaction
    /// and keeps the session.
    async fn send_stepwise(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SendError> {
        use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
        let info = self.conn.server_info();
        let mut parameters = Vec::new();
        let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
        if !(envelope.from().is_none_or(ascii) && envelope.to().iter().all(ascii)) {
            if !info.supports_feature(Extension::SmtpUtfEight) {
                return Err(SendError::Unsendable {
                    code: 553,
                    text: "5.6.7 non-ASCII address but the relay does not offer SMTPUTF8".into(),
                });
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.is_ascii() {
            if !info.supports_feature(Extension::EightBitMime) {
                return Err(SendError::Unsendable {
                    code: 554,
                    text: "5.6.1 8-bit content but the relay does not offer 8BITMIME".into(),
                });
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let command = self.command_timeout;
        let mail = Mail::new(envelope.from().cloned(), parameters);
        let reply = within(command, self.conn.command(mail)).await?;
        self.finish(Stage::Mail, reply).await?;
        for recipient in envelope.to() {
            let rcpt = Rcpt::new(recipient.clone(), Vec::new());
            let reply = within(command, self.conn.command(rcpt)).await?;
            self.finish(Stage::Rcpt, reply).await?;
        }
        let reply = within(command, self.conn.command(Data)).await?;
        self.finish(Stage::Data, reply).await?;
        let reply = within(self.data_timeout, write_content(&mut self.conn, message)).await?;
        self.finish(Stage::Content, reply).await
    }

    /// A reply at `stage`: a refusal resets the transaction (the session stays usable),
    /// anything else but success leaves the session to be dropped.
    async fn finish(
        &mut self,
        stage: Stage,
        reply: Result<Response, lettre::transport::smtp::Error>,
    ) -> Result<Response, SendError> {
        match reply {
            Ok(response) => Ok(response),
            Err(e) if e.status().is_some() => {
                self.reset().await;
                Err(send_error(stage, e))
            }
            Err(e) => Err(send_error(stage, e)),
        }
    }

    /// RSET after a refused transaction, so the session can carry the next message.
    async fn reset(&mut self) {
        let reset = tokio::time::timeout(self.command_timeout, self.conn.command(Rset)).await;
        if !matches!(reset, Ok(Ok(_))) {
            self.broken = true;
        }
    }

    /// Send one command at a time from now on: after a throttling reply a pipelined batch
    /// would be answered with errors (Postfix counts them, slows down and ends the session
    /// at its hard error limit). A new session pipelines again.
    pub fn stop_pipelining(&mut self) {
        self.pipelining = false;
    }

    /// Messages sent in this session (for `max_messages_per_connection`).
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// False once an error made the session unusable.
    pub fn is_usable(&self) -> bool {
        !self.broken && !self.conn.has_broken()
    }

    /// Say QUIT and close, without waiting longer than the command timeout.
    ///
    /// After the relay's 221 it waits (at most [`CLOSE_WAIT`]) for the relay to close its
    /// end: a relay counts a session until its socket closes (Postfix's anvil does), and the
    /// slot's next session must not overlap this one there.
    pub async fn close(mut self) {
        if !self.is_usable() {
            return;
        }
        let quit = tokio::time::timeout(self.command_timeout, self.conn.quit()).await;
        if matches!(quit, Ok(Ok(_))) {
            // Nothing more is expected: this read ends when the relay closes the connection.
            let _ = tokio::time::timeout(CLOSE_WAIT, self.conn.read_response()).await;
        }
    }
}

/// How long [`SmtpSession::close`] waits for the relay to close the connection after its
/// 221 (RFC 5321 4.1.1.10: it must). A relay that keeps it open costs a lane this much per
/// session it replaces.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Message content as sent after DATA's 354: every line ends with CRLF (a bare CR or LF
/// becomes CRLF), a dot at the start of a line is doubled (RFC 5321 4.5.2), and the
/// content ends with `CRLF . CRLF`. So no lone dot (`<CR>.<CR>`, `<LF>.<LF>`...) can end
/// the message early at a relay that accepts other line endings than CRLF.
struct DataContent<'a>(&'a str);

impl DataContent<'_> {
    /// True when the content goes out as it is: CRLF line endings only and no line that
    /// starts with a dot (what lettre's MIME output almost always is). One vectorised scan
    /// instead of a line-by-line copy, on every message.
    fn is_wire_ready(&self) -> bool {
        let bytes = self.0.as_bytes();
        !bytes.starts_with(b".")
            && memchr::memchr2_iter(b'\r', b'\n', bytes).all(|at| match bytes[at] {
                b'\r' => bytes.get(at + 1) == Some(&b'\n'),
                _ => at > 0 && bytes[at - 1] == b'\r' && bytes.get(at + 1) != Some(&b'.'),
            })
    }

    /// The general case: each line, stuffed when it starts with a dot, then CRLF.
    fn write_line_by_line(&self, f: &mut impl std::fmt::Write) -> std::fmt::Result {
        let mut rest = self.0;
        while !rest.is_empty() {
            let (line, ending) = match rest.find(['\r', '\n']) {
                Some(at) => (&rest[..at], Some(at)),
                None => (rest, None),
            };
            if line.starts_with('.') {
                f.write_str(".")?;
            }
            f.write_str(line)?;
            rest = match ending {
                None => "",
                Some(at) => {
                    f.write_str("\r\n")?;
                    let after = &rest[at..];
                    let length = if after.starts_with("\r\n") { 2 } else { 1 };
                    &after[length..]
                }
            };
        }
        f.write_str("\r\n.\r\n")
    }
}

impl std::fmt::Display for DataContent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_wire_ready() {
            f.write_str(self.0)?;
            return f.write_str("\r\n.\r\n");
        }
        self.write_line_by_line(f)
    }
}

/// The content of a message after DATA's 354, on either path, then `CRLF . CRLF`, with
/// every line ending CRLF and every line that starts with a dot stuffed (RFC 5321 4.5.2):
/// no lone dot (`<LF>.<LF>`...) can end the message early. A message that fits in one
/// [`CONTENT_CHUNK`] (nearly all of them) goes out with its final dot in one write, one
/// syscall; a larger one is made CRLF-only (see [`crate::line_endings`]; borrowed when it
/// already is) and written in pieces that lettre dot-stuffs one at a time, so sending it
/// adds one piece to the worker's memory, not a copy of the message.
async fn write_content(
    conn: &mut AsyncSmtpConnection,
    message: &[u8],
) -> Result<Response, lettre::transport::smtp::Error> {
    if message.len() <= CONTENT_CHUNK {
        if let Ok(text) = std::str::from_utf8(message) {
            return conn.command(DataContent(text)).await;
        }
    }
    let content = crlf_line_endings(message);
    conn.message_iter(content.chunks(CONTENT_CHUNK)).await
}

/// Bytes of content handed to lettre per write: lettre copies each piece it dot-stuffs.
const CONTENT_CHUNK: usize = 64 * 1024;

/// The envelope as this relay can take it. A relay that offers SMTPUTF8 takes any address;
/// for one that does not, an internationalised domain goes as its punycode (A-label) form,
/// which names the same domain, while a non-ASCII local part has no ASCII form at all: the
/// job cannot go through this relay (the error is the reply text to report).
fn envelope_for_relay(
    envelope: &Envelope,
    smtputf8: bool,
) -> Result<std::borrow::Cow<'_, Envelope>, String> {
    use std::borrow::Cow;
    let ascii = |a: &lettre::Address| AsRef::<str>::as_ref(a).is_ascii();
    if smtputf8 || (envelope.from().is_none_or(ascii) && envelope.to().iter().all(ascii)) {
        return Ok(Cow::Borrowed(envelope));
    }
    let to_ascii = |address: &lettre::Address| -> Result<lettre::Address, String> {
        if ascii(address) {
            return Ok(address.clone());
        }
        if !address.user().is_ascii() {
            return Err(format!(
                "5.6.7 <{address}>: the local part is not ASCII and the relay does not offer SMTPUTF8"
            ));
        }
        let domain = idna::domain_to_ascii(address.domain())
            .map_err(|_| format!("5.1.2 <{address}>: the domain has no ASCII (punycode) form"))?;
        lettre::Address::new(address.user(), domain).map_err(|e| format!("5.1.2 <{address}>: {e}"))
    };
    let from = envelope.from().map(to_ascii).transpose()?;
    let to = envelope
        .to()
        .iter()
        .map(to_ascii)
        .collect::<Result<Vec<_>, _>>()?;
    Envelope::new(from, to)
        .map(Cow::Owned)
        .map_err(|e| format!("5.1.3 {e}"))
}

/// Send EHLO again and look for PIPELINING among the keywords.
async fn offers_pipelining(
    conn: &mut AsyncSmtpConnection,
    hello: &ClientId,
) -> Result<bool, lettre::transport::smtp::Error> {
    let reply = conn.command(Ehlo::new(hello.clone())).await?;
    let offered = reply.message().any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    });
    Ok(offered)
}

/// One step of a transaction, within its own timeout: a relay that does not answer in
/// time is a [`SendError::Timeout`], whatever step it stalls at.
async fn within<T>(
    timeout: Duration,
    step: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<Result<T, lettre::transport::smtp::Error>, SendError> {
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| SendError::Timeout(timeout))
}

/// A lettre error as a [`SendError`]: a negative reply, a timeout, or a broken connection.
fn send_error(stage: Stage, e: lettre::transport::smtp::Error) -> SendError {
    match e.status() {
        Some(code) => SendError::Reply {
            stage,
            code: code.to_string().parse().unwrap_or(0),
            text: reply_text(&e),
        },
        None if e.is_timeout() => SendError::Timeout(Duration::ZERO),
        None => SendError::Connection(describe(&e)),
    }
}

/// True for a 421 reply: the relay closes the session after it.
fn closes_session(reply: &Result<Response, lettre::transport::smtp::Error>) -> bool {
    matches!(reply, Err(e) if e.status().is_some_and(|code| code.to_string() == "421"))
}

/// The code and text of a negative reply, if `e` is one.
fn negative_reply(e: &lettre::transport::smtp::Error) -> Option<(u16, String)> {
    let code = e.status()?.to_string().parse().ok()?;
    Some((code, reply_text(e)))
}

/// The reply text of a negative SMTP reply (lettre keeps it as the error's source).
fn reply_text(e: &lettre::transport::smtp::Error) -> String {
    use std::error::Error;
    e.source()
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string())
}

/// An error's text with its causes, for logs and dead-letter headers.
fn describe(e: &lettre::transport::smtp::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{envelope_for_relay, DataContent};

    use lettre::address::Envelope;

    #[test]
    fn a_relay_without_smtputf8_gets_punycode_domains_and_no_utf8_local_parts() {
        let envelope = |to: &str| {
            Envelope::new(
                Some("news@example.com".parse().unwrap()),
                vec![to.parse().unwrap()],
            )
            .unwrap()
        };
        let cases = [
            ("ann@example.org", false, Ok("ann@example.org")),
            ("ann@bücher.example", false, Ok("ann@xn--bcher-kva.example")),
            ("ann@BÜCHER.example", false, Ok("ann@xn--bcher-kva.example")),
            ("ann@例え.テスト", false, Ok("ann@xn--r8jz45g.xn--zckzah")),
            ("zoë@example.org", false, Err("local part is not ASCII")),
            ("zoë@bücher.example", false, Err("local part is not ASCII")),
            // A relay that offers SMTPUTF8 takes them as they are.
            ("ann@bücher.example", true, Ok("ann@bücher.example")),
            ("zoë@example.org", true, Ok("zoë@example.org")),
        ];
        for (to, smtputf8, expected) in cases {
            let original = envelope(to);
            let sent = envelope_for_relay(&original, smtputf8);
            match (sent, expected) {
                (Ok(sent), Ok(address)) => {
                    assert_eq!(sent.to()[0].to_string(), address, "{to}");
                    assert_eq!(sent.from().unwrap().to_string(), "news@example.com");
                }
                (Err(text), Err(needle)) => {
                    assert!(text.contains(needle) && text.contains("SMTPUTF8"), "{text}");
                    assert!(text.starts_with("5.6.7 "), "{text}");
                }
                (sent, expected) => panic!(
                    "{to}: {:?} but expected {expected:?}",
                    sent.map(|e| e.to().to_vec())
                ),
            }
        }
    }

    #[test]
    fn content_is_dot_stuffed_and_terminated() {
        let cases = [
            ("Hello\r\n", "Hello\r\n\r\n.\r\n"),
            (".hidden\r\nline\r\n", "..hidden\r\nline\r\n\r\n.\r\n"),
            ("a\r\n.\r\nb.c\r\n..x", "a\r\n..\r\nb.c\r\n...x\r\n.\r\n"),
        ];
        for (content, wire) in cases {
            assert_eq!(DataContent(content).to_string(), wire, "{content:?}");
        }
    }

    /// The shortcut for content that is already wire-ready writes exactly what the line by
    /// line path writes, on every string of up to 6 characters from the alphabet that
    /// matters (a dot, CR, LF and a letter).
    #[test]
    fn wire_ready_content_is_sent_as_the_line_by_line_path_would() {
        let alphabet = ['a', '.', '\r', '\n'];
        let mut shortcut = 0;
        for length in 0..=6u32 {
            for mut n in 0..4usize.pow(length) {
                let mut content = String::new();
                for _ in 0..length {
                    content.push(alphabet[n % 4]);
                    n /= 4;
                }
                let data = DataContent(&content);
                let mut line_by_line = String::new();
                data.write_line_by_line(&mut line_by_line).unwrap();
                assert_eq!(data.to_string(), line_by_line, "{content:?}");
                shortcut += usize::from(data.is_wire_ready());
            }
        }
        assert!(
            shortcut > 100,
            "the shortcut was taken only {shortcut} times"
        );
    }

    /// The SMTP-smuggling primitives, whatever line ending surrounds the dot.
    const SMUGGLING: [(&str, &str); 6] = [
        ("a\r.\rb", "a\r\n..\r\nb\r\n.\r\n"),
        ("a\n.\nb", "a\r\n..\r\nb\r\n.\r\n"),
        ("a\n.\r\nb", "a\r\n..\r\nb\r\n.\r\n"),
        ("a\r\n.\nb", "a\r\n..\r\nb\r\n.\r\n"),
        ("a\r\n.\rb", "a\r\n..\r\nb\r\n.\r\n"),
        (".\r.\n.", "..\r\n..\r\n..\r\n.\r\n"),
    ];

    #[test]
    fn bare_cr_and_lf_become_crlf_and_every_lone_dot_is_stuffed() {
        let cases = [
            ("no\nbare.\n.lf", "no\r\nbare.\r\n..lf\r\n.\r\n"),
            ("cr\ronly", "cr\r\nonly\r\n.\r\n"),
            ("\r\r\n\n", "\r\n\r\n\r\n\r\n.\r\n"),
            ("ends\r", "ends\r\n\r\n.\r\n"),
        ];
        for (content, wire) in cases.into_iter().chain(SMUGGLING) {
            let sent = DataContent(content).to_string();
            assert_eq!(sent, wire, "{content:?}");
            assert_only_the_last_line_is_a_dot(&sent);
        }
    }

    fn assert_only_the_last_line_is_a_dot(wire: &str) {
        let lines: Vec<&str> = wire.split("\r\n").collect();
        assert!(!wire.replace("\r\n", "").contains(['\r', '\n']), "{wire:?}");
        let dots: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == ".").collect();
        assert_eq!(dots, [lines.len() - 2], "{wire:?}");
    }
}
