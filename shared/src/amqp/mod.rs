//! Connecting to RabbitMQ: credentials never printed, back-off while the broker is away.

pub mod topology;

use std::time::Duration;

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
}

/// Heartbeat asked of the broker unless the URL names one: it bounds how long a vanished
/// worker keeps its budget slots and unacknowledged jobs.
const DEFAULT_HEARTBEAT_SECS: u16 = 15;

impl AmqpSettings {
    /// One connection attempt. `name` shows in the management UI (`sluice-worker`, ...).
    pub async fn connect(&self, name: &str) -> Result<Connection, ConnectError> {
        let mut url = self.url.expose().to_string();
        if !url.contains("heartbeat=") {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("heartbeat={DEFAULT_HEARTBEAT_SECS}"));
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.to_string()));
        Connection::connect(&url, properties)
            .await
            .map_err(|e| ConnectError {
                url: self.url.redacted(),
                reason: mask_secret(&e.to_string(), self.url.expose()),
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
                Err(e) if started.elapsed() + delay < max_wait => {
                    tracing::warn!(error = %e, retry_in = ?delay, "RabbitMQ not reachable");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Remove the password of `url` from an error text, should a dependency have echoed it.
fn mask_secret(text: &str, url: &str) -> String {
    let redacted = crate::config::redact_url(url);
    let mut out = text.replace(url, &redacted);
    if let Some(password) = password_of(url) {
        if !password.is_empty() {
            out = out.replace(password, "***");
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
