//! Connecting to RabbitMQ: credentials never printed, back-off while the broker is away,
//! `amqps://` verified against the webpki roots plus `amqp.ca_file`.
//!
//! `amqp.url` may list several nodes of a cluster. Each connection attempt tries them in
//! turn from a random one (so a fleet spreads over the nodes) and keeps the first that
//! answers; since every client reconnects through these functions, a client whose node
//! went away (or paused as a minority) lands on another one.

pub mod topology;

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpSettings;

/// The broker could not be reached; the message carries the URL without its password.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to RabbitMQ at {url}: {reason}")]
pub struct ConnectError {
    /// The broker URL with its password masked.
    pub url: String,
    /// What lapin said, with any credentials masked.
    pub reason: String,
    /// A fault of the settings (`amqp.ca_file`), not of the broker: retrying cannot help.
    pub permanent: bool,
}

/// Heartbeat asked of the broker unless the URL names one: it bounds how long a vanished
/// worker keeps its budget slots and unacknowledged jobs.
const DEFAULT_HEARTBEAT_SECS: u16 = 15;

/// Largest AMQP frame asked for unless the URL names one. lapin keeps send and receive
/// buffers of 32 frames each, touched in full: at the broker's 128 KiB default that is
/// 8 MiB per connection, half an idle worker's memory. Jobs of a few KiB fit in one
/// 32 KiB frame; larger ones are split, as AMQP does anyway.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// How long one node may take to accept a connection (TCP, TLS, AMQP handshake) before
/// the next URL is tried: a node behind a silent network must not hold a client for ever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker node each named connection last connected to.
static NODES: std::sync::Mutex<Vec<(String, BrokerNode)>> = std::sync::Mutex::new(Vec::new());

/// A broker node's address, as OpenTelemetry's `server.address` and `server.port` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerNode {
    pub host: String,
    pub port: u16,
}

/// The node the connection called `name` (`sluice-worker`, ...) last connected to: with
/// several URLs it is not known before the connection is made. `None` before the first.
pub fn connected_node(name: &str) -> Option<BrokerNode> {
    let nodes = NODES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    nodes
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, node)| node.clone())
}

fn remember_node(name: &str, url: &str) {
    let Ok(uri) = url.parse::<lapin::uri::AMQPUri>() else {
        return;
    };
    let node = BrokerNode {
        host: uri.authority.host,
        port: uri.authority.port,
    };
    let mut nodes = NODES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match nodes.iter_mut().find(|(n, _)| n == name) {
        Some((_, known)) => *known = node,
        None => nodes.push((name.to_string(), node)),
    }
}

impl AmqpSettings {
    /// One connection attempt on each URL of `amqp.url` in turn, from a random one, until
    /// one answers. `name` shows in the management UI (`sluice-worker`, ...).
    pub async fn connect(&self, name: &str) -> Result<Connection, ConnectError> {
        let urls = self.url.urls();
        let tls = self.tls_config()?;
        let start = rand::random_range(0..urls.len().max(1));
        let mut failures = Vec::new();
        for i in 0..urls.len() {
            let url = urls[(start + i) % urls.len()];
            let attempt =
                tokio::time::timeout(CONNECT_TIMEOUT, connect_one(url, name, tls.clone()));
            let attempt = match attempt.await {
                Ok(attempt) => attempt.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            };
            match attempt {
                Ok(connection) => {
                    remember_node(name, url);
                    if !failures.is_empty() {
                        tracing::info!(
                            url = %crate::config::redact_url(url),
                            "connected to RabbitMQ after other nodes did not answer"
                        );
                    }
                    return Ok(connection);
                }
                Err(e) => failures.push(format!(
                    "{}: {}",
                    crate::config::redact_url(url),
                    mask_secret(&e, self.url.expose())
                )),
            }
        }
        Err(ConnectError {
            url: self.url.redacted(),
            reason: failures.join("; "),
            permanent: false,
        })
    }

    /// TLS settings for `amqps://`: the webpki roots, plus the CA certificates of
    /// `amqp.ca_file` when it is set. Read at every connect, so a renewed CA file is picked
    /// up on reconnection.
    fn tls_config(&self) -> Result<OwnedTLSConfig, ConnectError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let Some(path) = &self.ca_file else {
            return Ok(OwnedTLSConfig::default());
        };
        let bad = |reason: String| ConnectError {
            url: self.url.redacted(),
            reason,
            permanent: true,
        };
        let pem = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read amqp.ca_file {}: {e}", path.display())))?;
        // lapin skips what it cannot parse: check here, so that a wrong file is an error
        // naming it rather than a certificate failure at every connection.
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                bad(format!(
                    "amqp.ca_file {} is not valid PEM: {e}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(bad(format!(
                "amqp.ca_file {} holds no PEM certificate",
                path.display()
            )));
        }
        Ok(OwnedTLSConfig {
            cert_chain: Some(pem),
            ..OwnedTLSConfig::default()
        })
    }

    /// Connect, retrying with exponential back-off (up to `max_wait` in total).
    pub async fn connect_with_backoff(
        &self,
        name: &str,
        max_wait: Duration,
    ) -> Result<Connection, ConnectError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.connect(name).await {
                Ok(connection) => return Ok(connection),
                Err(e) if !e.permanent && started.elapsed() + delay < max_wait => {
                    tracing::warn!(error = %e, retry_in = ?delay, "RabbitMQ not reachable");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One connection attempt on one URL, with sluice's heartbeat and frame size unless the
/// URL names its own.
async fn connect_one(
    url: &str,
    name: &str,
    tls: OwnedTLSConfig,
) -> Result<Connection, lapin::Error> {
    let mut url = url.to_string();
    for (key, value) in [
        ("heartbeat", DEFAULT_HEARTBEAT_SECS.to_string()),
        ("frame_max", DEFAULT_FRAME_MAX.to_string()),
    ] {
        if !url.contains(&format!("{key}=")) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    }
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(&url, properties, tls, runtime).await
}

/// Remove the passwords of `urls` (one URL or a comma-separated list) from an error text,
/// should a dependency have echoed them.
pub fn mask_secret(text: &str, urls: &str) -> String {
    let mut out = text.to_string();
    for url in crate::config::SecretUrl::new(urls).urls() {
        if url.is_empty() {
            continue;
        }
        out = out.replace(url, &crate::config::redact_url(url));
        if let Some(password) = password_of(url) {
            if !password.is_empty() {
                out = out.replace(password, "***");
            }
        }
    }
    out
}

fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_that_accepts_but_never_answers_is_given_up_on() {
        // The kernel completes the TCP handshake into the backlog; nothing ever speaks AMQP.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let settings = AmqpSettings {
            url: crate::config::SecretUrl::new(format!(
                "amqp://sluice:S3cr3tPw@127.0.0.1:{port}/%2f"
            )),
            ..AmqpSettings::default()
        };
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(CONNECT_TIMEOUT * 2, settings.connect("test"))
            .await
            .expect("connect gives up on a silent node")
            .expect_err("a silent node is no connection");
        assert!(started.elapsed() >= CONNECT_TIMEOUT);
        let text = e.to_string();
        assert!(text.contains("no answer within"), "{text}");
        assert!(!text.contains("S3cr3tPw"), "{text}");
        drop(silent);
    }

    fn settings(ca_file: &str) -> AmqpSettings {
        AmqpSettings {
            url: crate::config::SecretUrl::new("amqps://sluice:S3cr3tPw@127.0.0.1:1/%2f"),
            ca_file: Some(ca_file.into()),
            ..AmqpSettings::default()
        }
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_a_permanent_error_naming_the_file() {
        let path = "/nonexistent/sluice-test/broker-ca.pem";
        let e = settings(path)
            .connect_with_backoff("test", Duration::from_secs(60))
            .await
            .expect_err("no CA file, no connection");
        let text = e.to_string();
        assert!(e.permanent);
        assert!(
            text.contains("amqp.ca_file") && text.contains(path),
            "{text}"
        );
        assert!(!text.contains("S3cr3tPw"), "{text}");
    }

    #[test]
    fn every_password_of_a_list_is_masked() {
        let urls = "amqp://a:first-pw@h1/v,amqp://b:second-pw@h2/v";
        let text = "h1 said amqp://a:first-pw@h1/v, then second-pw leaked";
        let masked = mask_secret(text, urls);
        assert!(
            !masked.contains("first-pw") && !masked.contains("second-pw"),
            "{masked}"
        );
        assert!(masked.contains("amqp://a:***@h1/v"), "{masked}");
    }

    #[tokio::test]
    async fn no_node_answering_is_an_error_naming_each_without_passwords() {
        let closed = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let settings = AmqpSettings {
            url: crate::config::SecretUrl::new(format!(
                "amqp://u:first-pw@127.0.0.1:{}/%2f,amqp://u:second-pw@127.0.0.1:{}/%2f",
                closed(),
                closed()
            )),
            ..AmqpSettings::default()
        };
        let e = settings.connect("test").await.expect_err("nothing listens");
        let text = e.to_string();
        assert!(!e.permanent);
        assert_eq!(text.matches("amqp://u:***@127.0.0.1:").count(), 4, "{text}");
        assert!(
            !text.contains("first-pw") && !text.contains("second-pw"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_ca_file_without_certificates_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join(format!("sluice-not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "this is not a certificate\n").unwrap();
        let e = settings(path.to_str().unwrap())
            .connect("test")
            .await
            .expect_err("no certificate, no connection");
        let _ = std::fs::remove_file(&path);
        let text = e.to_string();
        assert!(e.permanent);
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("no PEM certificate"), "{text}");
    }
}
