//! The settings tree both binaries load: one TOML file and `SLUICE__SECTION__KEY` overrides.
//!
//! The shape of this file is a contract with users (and with the deploy manifests): every
//! field is documented, has a named default and unknown keys are rejected by name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Environment variable that names the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "SLUICE_CONFIG";

/// Why the settings could not be loaded; the message always names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything sluice can be told, from a file and/or the environment.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The RabbitMQ broker and the namespace of every exchange and queue.
    #[serde(default)]
    pub amqp: AmqpSettings,
    /// Upstream SMTP relays by name; the name is the jobs' routing key.
    #[serde(default)]
    pub relays: BTreeMap<String, RelaySettings>,
    /// The retry ladder for deferred jobs.
    #[serde(default)]
    pub retry: RetrySettings,
    /// Settings that only the worker reads.
    #[serde(default)]
    pub worker: WorkerSettings,
    /// The event log: how long delivery events and campaign summaries are kept.
    #[serde(default)]
    pub events: EventsSettings,
}

/// How to reach RabbitMQ, and the prefix that keeps deployments (and tests) apart.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// AMQP 0-9-1 URL, or several separated by commas (the nodes of a cluster, e.g.
    /// `amqp://u:p@h1:5672/v,amqp://u:p@h2:5672/v`): every client connects to one that
    /// answers, starting at a random one, and moves on when it goes away. Credentials in
    /// them are never printed (write a ',' in a password as `%2C`).
    #[serde(default = "default_amqp_url")]
    pub url: SecretUrl,
    /// Prefix of every exchange and queue name.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// CA certificate(s) (PEM) trusted for `amqps://` besides the webpki roots, for a broker
    /// with a private CA. Read at every connection; a missing or non-PEM file is an error
    /// naming it, and stops the program instead of being retried.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: default_amqp_url(),
            namespace: default_namespace(),
            ca_file: None,
        }
    }
}

fn default_amqp_url() -> SecretUrl {
    SecretUrl("amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn default_namespace() -> String {
    "sluice".into()
}

/// How sluice talks to the relay's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP (a relay on loopback or inside a trusted network).
    #[default]
    None,
    /// STARTTLS, required: a relay that does not offer it is an error.
    Starttls,
    /// Implicit TLS from the first byte (usually port 465).
    Tls,
}

/// One upstream SMTP relay and the budget it may see from the whole fleet.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// Host name or address of the relay.
    #[serde(default = "default_relay_host")]
    pub host: String,
    /// TCP port of the relay.
    #[serde(default = "default_relay_port")]
    pub port: u16,
    /// `none`, `starttls` or `tls`.
    #[serde(default)]
    pub tls: TlsMode,
    /// Concurrent SMTP sessions this relay may see from all workers together.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Accepted messages per second this relay may see from all workers together; 0 = no limit.
    #[serde(default)]
    pub max_messages_per_second: u32,
    /// After this many messages a session is closed and a new one opened.
    #[serde(default = "default_max_messages_per_connection")]
    pub max_messages_per_connection: u32,
    /// How long to wait for the TCP connection and the greeting.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for the reply to each SMTP command (EHLO, STARTTLS, AUTH, MAIL,
    /// RCPT, DATA, RSET, QUIT), each on its own.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long sending a message's content and waiting for the reply to its final dot may
    /// take: 10 minutes by default, as RFC 5321 4.5.3.2.6 recommends, since a relay may
    /// scan the whole message before it answers (and a job given up too early is sent twice).
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// The share of sends `low` jobs get while `normal` ones also wait (0 to 1; `high`
    /// jobs always go first). Above 0, bulk mail is never starved completely.
    #[serde(default = "default_low_share")]
    pub low_share: f64,
    /// Relay that takes this relay's jobs while it is marked down.
    #[serde(default)]
    pub failover: Option<String>,
    /// How long a relay that failed stays marked down before it is probed again.
    #[serde(default = "default_down_cooloff", with = "humantime_serde")]
    pub down_cooloff: Duration,
    /// The same 5xx at RCPT for this many different recipients in a row is taken as the
    /// relay refusing us, not them: those bounce, then the relay is marked down (0 = never).
    #[serde(default = "default_refusals_before_down")]
    pub refusals_before_down: u32,
    /// SMTP AUTH user name (PLAIN or LOGIN).
    #[serde(default)]
    pub username: Option<String>,
    /// SMTP AUTH password; prefer `password_file` in containers.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File whose content (trailing newline trimmed) is the SMTP AUTH password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for this relay's TLS, for a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification. Dangerous; a warning is logged at start.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// Let the credentials go in clear text (`tls = "none"` with a username) to a relay
    /// whose host is not a loopback address. Off, such a relay stops the worker at start,
    /// before any connection: a password sent in clear is readable by anyone on the path.
    /// On, a warning is logged at start. A relay on loopback never needs it.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Name sent in EHLO; defaults to this machine's host name.
    #[serde(default)]
    pub helo_name: Option<String>,
    /// Reply rules of this relay (`[[relays.NAME.rules]]`), tried in order before the
    /// built-in ones: how the fleet answers a relay that pushes back.
    #[serde(default)]
    pub rules: Vec<ReplyRule>,
    /// Whether the built-in reply rules (throttling, too many connections, server busy, as
    /// SES, Microsoft 365, Gmail and Postfix word them) apply to this relay.
    #[serde(default = "default_rules_builtin")]
    pub rules_builtin: bool,
}

/// One reply rule: a negative reply whose "code enhanced-code text" matches `pattern`
/// makes the fleet act on the whole relay, not just on the job.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplyRule {
    /// A regular expression over "code enhanced-code text", e.g. `5.7.1 .*daily quota`
    /// (unanchored, case-insensitive).
    #[serde(rename = "match")]
    pub pattern: String,
    /// What the fleet does when the rule matches.
    pub action: RuleAction,
    /// How long a `suspend` lasts (default: the relay's `down_cooloff`), or how long a
    /// `throttle` holds its cut before the rate recovers (default: no hold).
    #[serde(rename = "for", default, with = "humantime_serde::option")]
    pub hold: Option<Duration>,
}

/// What a [`ReplyRule`] makes the fleet do.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Cut the fleet's rate for the relay (and let it climb back); the job goes back untouched.
    Throttle,
    /// One fleet-wide session fewer for the relay; the job goes back untouched.
    LimitConnections,
    /// The relay is down fleet-wide for `for` (failover applies); the job goes back untouched.
    Suspend,
    /// An ordinary deferral of the job (its retry ladder), whatever the built-ins say.
    Defer,
    /// A permanent refusal of the job.
    Bounce,
}

impl Default for RelaySettings {
    fn default() -> Self {
        // Deserializing an empty table applies every named default in one place.
        serde_json::from_str("{}").expect("relay defaults")
    }
}

fn default_relay_host() -> String {
    "127.0.0.1".into()
}
fn default_relay_port() -> u16 {
    25
}
fn default_max_connections() -> u32 {
    4
}
fn default_low_share() -> f64 {
    0.2
}
fn default_max_messages_per_connection() -> u32 {
    100
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_down_cooloff() -> Duration {
    Duration::from_secs(30)
}
fn default_refusals_before_down() -> u32 {
    5
}
fn default_rules_builtin() -> bool {
    true
}

/// How a relay's credentials travel, as far as its configuration says: decided before any
/// connection, so that a password is never sent in clear by accident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleartextAuth {
    /// No username: nothing to protect.
    NoCredentials,
    /// STARTTLS (required) or implicit TLS.
    Encrypted,
    /// In clear, but to this machine.
    Loopback,
    /// In clear over the network, because `allow_plaintext_auth` says so (a warning at start).
    Allowed,
    /// In clear over the network without `allow_plaintext_auth`: a configuration error.
    Refused,
}

impl RelaySettings {
    /// Whether AUTH may go in clear text to this relay. A host is a loopback address when
    /// it is one (`127.0.0.0/8`, `::1`) or is `localhost`.
    pub fn cleartext_auth(&self) -> CleartextAuth {
        if self.username.is_none() {
            return CleartextAuth::NoCredentials;
        }
        if self.tls != TlsMode::None {
            return CleartextAuth::Encrypted;
        }
        let host = self.host.trim();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            CleartextAuth::Loopback
        } else if self.allow_plaintext_auth {
            CleartextAuth::Allowed
        } else {
            CleartextAuth::Refused
        }
    }

    /// The SMTP AUTH password from `password` or `password_file`, if any.
    pub fn resolved_password(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            return Ok(Some(Secret(
                text.trim_end_matches(['\r', '\n']).to_string(),
            )));
        }
        Ok(self.password.clone())
    }
}

/// The retry ladder: N delays mean at most N+1 delivery attempts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Wait before each retry, in order (`"30s"`, `"2m"`, ...).
    #[serde(
        default = "default_retry_delays",
        deserialize_with = "durations",
        serialize_with = "serialize_durations"
    )]
    pub delays: Vec<Duration>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            delays: default_retry_delays(),
        }
    }
}

fn default_retry_delays() -> Vec<Duration> {
    [30, 120, 600, 3600, 4 * 3600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

fn serialize_durations<S: Serializer>(
    delays: &[Duration],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(
        delays
            .iter()
            .map(|d| humantime::format_duration(*d).to_string()),
    )
}

/// A TOML list of durations, or one comma-separated string (`SLUICE__RETRY__DELAYS=1s,2s`:
/// the environment is read as text, see [`Settings::load`]).
fn durations<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Texts {
        List(Vec<String>),
        Joined(String),
    }
    let texts = match Texts::deserialize(deserializer)? {
        Texts::List(texts) => texts,
        Texts::Joined(text) => text.split(',').map(str::to_string).collect(),
    };
    texts
        .iter()
        .map(|text| {
            humantime::parse_duration(text.trim())
                .map_err(|e| serde::de::Error::custom(format!("bad duration {text:?}: {e}")))
        })
        .collect()
}

/// Settings only the worker reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Address of the HTTP server for `/healthz`, `/readyz` and `/metrics`; off when unset.
    #[serde(default)]
    pub listen: Option<String>,
    /// How long SIGTERM waits for in-flight jobs before leaving them to other workers.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Jobs larger than this (bytes of JSON) are set aside as invalid.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            listen: None,
            shutdown_grace: default_shutdown_grace(),
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_message_bytes() -> usize {
    10 * 1024 * 1024
}

/// How long the event log (`<namespace>.events.log`, a RabbitMQ stream) keeps delivery
/// events and campaign summaries: whichever limit is reached first drops the oldest.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// Events older than this are dropped (`"7d"`, `"12h"`; whole seconds).
    #[serde(default = "default_events_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// The log keeps at most about this many bytes (dropped a segment at a time).
    #[serde(default = "default_events_max_bytes")]
    pub max_bytes: u64,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            max_age: default_events_max_age(),
            max_bytes: default_events_max_bytes(),
        }
    }
}

fn default_events_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_events_max_bytes() -> u64 {
    10 * 1024 * 1024 * 1024
}

/// A secret string: it can be used, but it never prints.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A printed config shows that a secret is set, never its value.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A URL that may carry credentials: Debug and Display hide the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wrap a URL.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The full URL, credentials included, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
    /// The comma-separated URLs it holds, trimmed, in the order written.
    pub fn urls(&self) -> Vec<&str> {
        split_urls(&self.0)
    }
}

fn split_urls(text: &str) -> Vec<&str> {
    text.split(',').map(str::trim).collect()
}

/// A printed config shows the URL without its password.
impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replace the password of `scheme://user:password@host/...` with `***`, in each URL of a
/// comma-separated list.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return split_urls(url)
            .into_iter()
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    // Without a scheme (`user:password@host`, a typo), the whole text is the authority.
    let (scheme, rest) = match url.find("://") {
        Some(end) => url.split_at(end + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let masked = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_string()
    };
    format!(
        "{scheme}{masked}{}",
        &rest[at..] // "@host..." and everything after
    )
}

impl Settings {
    /// Load the settings: built-in defaults, then the file (`path`, else `$SLUICE_CONFIG`,
    /// else none), then `SLUICE__SECTION__KEY` environment variables; then check them.
    ///
    /// An environment value is text, and stays the exact text given where the key is a
    /// string: `SLUICE__RELAYS__X__PASSWORD=0123` is the password `0123`, not the number
    /// 123 printed back. Numeric and boolean keys parse their text when deserialized.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let env_path = std::env::var_os(CONFIG_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let settings = Self::build(path, None)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Defaults, the file at `path`, then the `SLUICE__` variables of `environment` (the
    /// process environment when `None`); not yet validated.
    fn build(
        path: Option<PathBuf>,
        environment: Option<config::Map<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = &path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            check_toml_syntax(&text, path)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SLUICE")
                .prefix_separator("__")
                .separator("__")
                // Every value stays text: `try_parsing` would turn a password `0123` into
                // the integer 123 before serde sees that the key is a string.
                .try_parsing(false)
                .source(environment),
        );
        let where_from = path
            .as_ref()
            .map(|p| format!(" (file {})", p.display()))
            .unwrap_or_default();
        builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Invalid(format!("{e}{where_from}")))
    }

    /// Checks that serde cannot express: names, ranges and references between relays.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if !is_name(&self.amqp.namespace) {
            return bad(format!(
                "amqp.namespace {:?}: use letters, digits, '-', '_' and '.'",
                self.amqp.namespace
            ));
        }
        let urls = self.amqp.url.urls();
        for (i, url) in urls.iter().enumerate() {
            if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
                let which = if urls.len() > 1 {
                    format!(" (URL {} of {})", i + 1, urls.len())
                } else {
                    String::new()
                };
                return bad(format!(
                    "amqp.url {:?}{which}: must start with amqp:// or amqps://",
                    redact_url(url)
                ));
            }
        }
        for (name, relay) in &self.relays {
            if !is_name(name) || name.contains('.') {
                return bad(format!(
                    "relays.{name}: a relay name uses letters, digits, '-' and '_'"
                ));
            }
            if relay.max_connections == 0 {
                return bad(format!("relays.{name}.max_connections must be at least 1"));
            }
            if relay.max_messages_per_connection == 0 {
                return bad(format!(
                    "relays.{name}.max_messages_per_connection must be at least 1"
                ));
            }
            if !(0.0..=1.0).contains(&relay.low_share) {
                return bad(format!(
                    "relays.{name}.low_share must be between 0 and 1 (the share of sends low jobs get)"
                ));
            }
            if relay.host.trim().is_empty() {
                return bad(format!("relays.{name}.host is empty"));
            }
            if let Some(failover) = &relay.failover {
                if failover == name || !self.relays.contains_key(failover) {
                    return bad(format!(
                        "relays.{name}.failover names {failover:?}, which is not another configured relay"
                    ));
                }
            }
            let has_password = relay.password.is_some() || relay.password_file.is_some();
            if relay.password.is_some() && relay.password_file.is_some() {
                return bad(format!(
                    "relays.{name}: set password or password_file, not both"
                ));
            }
            if relay.username.is_some() && !has_password {
                return bad(format!(
                    "relays.{name}.username is set but no password or password_file"
                ));
            }
            if relay.username.is_none() && has_password {
                return bad(format!("relays.{name}: a password is set but no username"));
            }
            for (i, rule) in relay.rules.iter().enumerate() {
                if let Err(e) = regex_automata::meta::Regex::new(&rule.pattern) {
                    return bad(format!(
                        "relays.{name}.rules[{i}]: match = {:?} is not a regular expression: {e}",
                        rule.pattern
                    ));
                }
            }
            if relay.cleartext_auth() == CleartextAuth::Refused {
                return bad(format!(
                    "relays.{name}: the credentials would go in clear text to {host}, which is \
                     not a loopback address (tls = \"none\" with a username): use tls = \
                     \"starttls\" or \"tls\", or set relays.{name}.allow_plaintext_auth = true \
                     if the network to it is trusted",
                    host = relay.host
                ));
            }
        }
        if self.retry.delays.iter().any(|d| d.is_zero()) {
            return bad("retry.delays: every delay must be longer than zero".into());
        }
        if self.events.max_age.as_secs() == 0 {
            return bad("events.max_age must be at least one second".into());
        }
        if self.events.max_bytes == 0 {
            return bad("events.max_bytes must be more than zero".into());
        }
        Ok(())
    }
}

/// Report a TOML syntax error by line and column only: the parser's own message (which
/// `config` passes on) quotes the offending line, and that may be the one with a password.
fn check_toml_syntax(text: &str, path: &Path) -> Result<(), ConfigError> {
    let Err(e) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let at = e
        .span()
        .and_then(|span| text.get(..span.start))
        .map(|before| {
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!(" at line {line}, column {column}")
        })
        .unwrap_or_default();
    Err(ConfigError::Invalid(format!(
        "TOML syntax error{at} (file {}): {}",
        path.display(),
        e.message().trim()
    )))
}

/// Names that end up in queue names: short, printable, no spaces.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_rules_are_read_and_a_bad_pattern_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("sluice-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("rules.toml");
        let rules = "[relays.primary]\nrules_builtin = false\n\
            [[relays.primary.rules]]\nmatch = '5\\.7\\.1 .*daily quota'\naction = \"suspend\"\nfor = \"1h\"\n\
            [[relays.primary.rules]]\nmatch = 'slow down'\naction = \"throttle\"\n";
        std::fs::write(&path, rules).expect("write");
        let settings = Settings::load(Some(&path)).expect("valid rules");
        let relay = &settings.relays["primary"];
        assert!(!relay.rules_builtin);
        assert_eq!(
            relay.rules,
            vec![
                ReplyRule {
                    pattern: r"5\.7\.1 .*daily quota".into(),
                    action: RuleAction::Suspend,
                    hold: Some(Duration::from_secs(3600)),
                },
                ReplyRule {
                    pattern: "slow down".into(),
                    action: RuleAction::Throttle,
                    hold: None,
                },
            ]
        );
        std::fs::write(
            &path,
            "[relays.primary]\n[[relays.primary.rules]]\nmatch = '('\naction = \"bounce\"\n",
        )
        .expect("write");
        let error = Settings::load(Some(&path)).expect_err("a bad pattern");
        assert!(
            error.to_string().contains("relays.primary.rules[0]"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn auth_in_clear_text_goes_only_to_loopback_or_where_allowed() {
        use CleartextAuth::*;
        let cases = [
            ("relay.example.com", TlsMode::None, true, false, Refused),
            ("192.0.2.10", TlsMode::None, true, false, Refused),
            ("0.0.0.0", TlsMode::None, true, false, Refused),
            ("relay.example.com", TlsMode::None, true, true, Allowed),
            ("127.0.0.1", TlsMode::None, true, false, Loopback),
            ("127.8.9.10", TlsMode::None, true, false, Loopback),
            ("::1", TlsMode::None, true, false, Loopback),
            ("[::1]", TlsMode::None, true, false, Loopback),
            ("localhost", TlsMode::None, true, false, Loopback),
            (
                "relay.example.com",
                TlsMode::Starttls,
                true,
                false,
                Encrypted,
            ),
            ("relay.example.com", TlsMode::Tls, true, false, Encrypted),
            (
                "relay.example.com",
                TlsMode::None,
                false,
                false,
                NoCredentials,
            ),
        ];
        for (host, tls, credentials, allowed, expected) in cases {
            let settings = RelaySettings {
                host: host.into(),
                tls,
                allow_plaintext_auth: allowed,
                username: credentials.then(|| "sluice".to_string()),
                ..RelaySettings::default()
            };
            assert_eq!(
                settings.cleartext_auth(),
                expected,
                "{host} {tls:?} credentials={credentials} allowed={allowed}"
            );
        }
    }

    #[test]
    fn redacts_passwords_in_urls() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f"),
            ("amqps://user@host/vh", "amqps://user@host/vh"),
            ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
            (
                "guest:pw@127.0.0.1:5672/%2f",
                "guest:***@127.0.0.1:5672/%2f",
            ),
            ("127.0.0.1:5672/a@b", "127.0.0.1:5672/a@b"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
        }
        let secret = SecretUrl::new("amqp://a:topsecret@h/");
        assert!(!format!("{secret:?} {secret}").contains("topsecret"));
        assert!(!format!("{:?}", Secret::new("topsecret")).contains("topsecret"));
    }

    #[test]
    fn several_urls_are_each_redacted_and_split() {
        let url = SecretUrl::new("amqp://u:pw1@h1:5672/v, amqps://u:pw2@h2:5671/v,amqp://h3/v");
        assert_eq!(
            url.urls(),
            [
                "amqp://u:pw1@h1:5672/v",
                "amqps://u:pw2@h2:5671/v",
                "amqp://h3/v"
            ]
        );
        assert_eq!(
            url.redacted(),
            "amqp://u:***@h1:5672/v,amqps://u:***@h2:5671/v,amqp://h3/v"
        );
        let shown = format!("{url:?} {url} {}", serde_json::to_string(&url).unwrap());
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
    }

    #[test]
    fn every_url_of_a_list_is_validated_and_the_bad_one_named() {
        let mut settings = Settings::default();
        settings.amqp.url = SecretUrl::new("amqp://u:pw1@h1:5672/v,http://u:pw2@h2:5672/v");
        let e = settings.validate().unwrap_err().to_string();
        assert!(
            e.contains("URL 2 of 2") && e.contains("http://u:***@h2"),
            "{e}"
        );
        assert!(!e.contains("pw1") && !e.contains("pw2"), "{e}");
        settings.amqp.url = SecretUrl::new("amqp://u:pw1@h1:5672/v,");
        let e = settings.validate().unwrap_err().to_string();
        assert!(e.contains("URL 2 of 2"), "{e}");
        settings.amqp.url = SecretUrl::new("amqp://u:pw1@h1/v,amqps://u:pw2@h2/v");
        settings.validate().unwrap();
    }

    #[test]
    fn a_toml_syntax_error_names_the_line_but_does_not_quote_it() {
        let text = "[relays.primary]\nusername = \"u\"\npassword = \"topsecret\" port = 25\n";
        let e = check_toml_syntax(text, Path::new("/etc/sluice.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("/etc/sluice.toml"),
            "{e}"
        );
        assert!(!e.contains("topsecret"), "{e}");
        assert!(check_toml_syntax("[amqp]\nnamespace = \"x\"\n", Path::new("f")).is_ok());
    }

    /// Settings from `SLUICE__` variables only.
    fn from_env(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let environment = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::build(None, Some(environment))
    }

    #[test]
    fn environment_strings_are_kept_verbatim() {
        type Get = fn(&Settings) -> Option<String>;
        let keys: [(&str, Get); 8] = [
            ("SLUICE__AMQP__URL", |s| {
                Some(s.amqp.url.expose().to_string())
            }),
            ("SLUICE__AMQP__NAMESPACE", |s| {
                Some(s.amqp.namespace.clone())
            }),
            ("SLUICE__RELAYS__X__HOST", |s| {
                Some(s.relays["x"].host.clone())
            }),
            ("SLUICE__RELAYS__X__USERNAME", |s| {
                s.relays["x"].username.clone()
            }),
            ("SLUICE__RELAYS__X__PASSWORD", |s| {
                s.relays["x"]
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_string())
            }),
            ("SLUICE__RELAYS__X__HELO_NAME", |s| {
                s.relays["x"].helo_name.clone()
            }),
            ("SLUICE__RELAYS__X__FAILOVER", |s| {
                s.relays["x"].failover.clone()
            }),
            ("SLUICE__WORKER__LISTEN", |s| s.worker.listen.clone()),
        ];
        for value in ["0123", "007", "true", "FALSE", "1e5", "1.50", "-0", "0x1f"] {
            for (key, get) in keys {
                let settings = from_env(&[(key, value), ("SLUICE__RELAYS__X__PORT", "25")])
                    .unwrap_or_else(|e| panic!("{key}={value}: {e}"));
                assert_eq!(get(&settings).as_deref(), Some(value), "{key}={value}");
            }
        }
    }

    #[test]
    fn environment_numbers_and_booleans_still_parse_where_the_key_wants_them() {
        let settings = from_env(&[
            ("SLUICE__RELAYS__X__MAX_CONNECTIONS", "7"),
            ("SLUICE__RELAYS__X__PORT", "02525"),
            ("SLUICE__RELAYS__X__TLS_INSECURE_SKIP_VERIFY", "true"),
            ("SLUICE__RELAYS__X__TLS", "starttls"),
            ("SLUICE__RELAYS__X__COMMAND_TIMEOUT", "45s"),
            ("SLUICE__WORKER__MAX_MESSAGE_BYTES", "1000"),
            ("SLUICE__RETRY__DELAYS", "1s,2m"),
        ])
        .unwrap();
        let relay = &settings.relays["x"];
        assert_eq!(relay.max_connections, 7);
        assert_eq!(relay.port, 2525);
        assert!(relay.tls_insecure_skip_verify);
        assert_eq!(relay.tls, TlsMode::Starttls);
        assert_eq!(relay.command_timeout, Duration::from_secs(45));
        assert_eq!(settings.worker.max_message_bytes, 1000);
        assert_eq!(
            settings.retry.delays,
            [Duration::from_secs(1), Duration::from_secs(120)]
        );
        let e = from_env(&[("SLUICE__RELAYS__X__MAX_CONNECTIONS", "seven")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn relay_defaults_are_named() {
        let relay = RelaySettings::default();
        assert_eq!(relay.max_connections, 4);
        assert_eq!(relay.port, 25);
        assert_eq!(relay.tls, TlsMode::None);
        assert_eq!(relay.command_timeout, Duration::from_secs(30));
        assert!(!relay.allow_plaintext_auth);
        assert_eq!(relay.data_timeout, Duration::from_secs(600));
    }
}
