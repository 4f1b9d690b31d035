//! SMTP sessions with one relay: connect, STARTTLS or implicit TLS, AUTH, send, quit.
//!
//! A session is opened only while its worker holds a budget slot for the relay (see
//! [`crate::budget`]), which is why sessions are managed here explicitly instead of by a
//! connection pool: the budget must know about every open connection, idle ones included.

use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use sluice_shared::config::{RelaySettings, TlsMode};

/// Why a session could not be opened. Every variant is a fault of the relay (or of our
/// settings for it), never of a job: no job is bounced or deferred for it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("relay {relay} did not answer within {timeout:?}")]
    Timeout { relay: String, timeout: Duration },
    #[error("relay {relay} refused the session: {reason}")]
    Refused { relay: String, reason: String },
    #[error("relay {relay} rejected our credentials: {reason}")]
    AuthRejected { relay: String, reason: String },
}

/// The result of handing one message to the relay.
#[derive(Debug)]
pub enum SendError {
    /// The relay answered with a negative reply (4xx or 5xx).
    Reply { code: u16, text: String },
    /// No reply within the command timeout: the session is unusable.
    Timeout(Duration),
    /// The connection broke (reset, closed before the reply...).
    Connection(String),
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
        let credentials = match (&settings.username, password) {
            (Some(user), Some(password)) => Some(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            )),
            (Some(_), None) => {
                anyhow::bail!("relays.{name}.username is set but no password or password_file")
            }
            (None, Some(_)) => anyhow::bail!("relays.{name}: a password is set but no username"),
            (None, None) => None,
        };
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
        })
    }

    fn open_error(&self, e: &lettre::transport::smtp::Error, timeout: Duration) -> OpenError {
        if e.is_timeout() {
            self.timeout(timeout)
        } else {
            self.refused(describe(e))
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
        }
    }
}

/// One open SMTP session. It is closed (QUIT) explicitly, or dropped after an error.
pub struct SmtpSession {
    conn: AsyncSmtpConnection,
    sent: u32,
    command_timeout: Duration,
}

impl SmtpSession {
    /// Hand one message to the relay: MAIL, RCPT, DATA. On any error the session is unusable.
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SendError> {
        self.sent += 1;
        // The timeout covers the whole transaction: a relay that stalls at any command
        // (or after the final dot) defers the job instead of holding it forever.
        let timeout = self.command_timeout * 4;
        match tokio::time::timeout(timeout, self.conn.send(envelope, message)).await {
            Err(_) => Err(SendError::Timeout(timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(match e.status() {
                Some(code) => SendError::Reply {
                    code: code.to_string().parse().unwrap_or(0),
                    text: reply_text(&e),
                },
                None if e.is_timeout() => SendError::Timeout(timeout),
                None => SendError::Connection(describe(&e)),
            }),
        }
    }

    /// Messages sent in this session (for `max_messages_per_connection`).
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// False once an error made the session unusable.
    pub fn is_usable(&self) -> bool {
        !self.conn.has_broken()
    }

    /// Say QUIT and close, without waiting longer than the command timeout.
    pub async fn close(mut self) {
        if self.conn.has_broken() {
            return;
        }
        let _ = tokio::time::timeout(self.command_timeout, self.conn.quit()).await;
    }
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
