//! The worker's Prometheus metrics, served on `/metrics`. Names are a contract with the
//! Grafana dashboard and the alert rules in `deploy/`.

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the worker exports, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// `process_*` (CPU, memory, file descriptors, start time), read from `/proc` at each
    /// scrape. A registry of its own: [`Metrics::families`] (mirrored over OTLP) stays the
    /// worker's own families and costs no `/proc` read.
    process: Registry,
    received: IntCounterVec,
    delivered: IntCounterVec,
    deferred: IntCounterVec,
    bounced: IntCounterVec,
    dead: IntCounterVec,
    cancelled: IntCounterVec,
    held: IntCounterVec,
    send_seconds: HistogramVec,
    sessions_open: IntGaugeVec,
    slots_held: IntGaugeVec,
    max_connections: IntGaugeVec,
    max_rate: IntGaugeVec,
    relay_up: IntGaugeVec,
    relay_down: IntCounterVec,
    failovers: IntCounterVec,
    slot_wait_seconds: HistogramVec,
    broker_blocked: IntGauge,
    queue_ready: IntGaugeVec,
    oldest_age: prometheus::GaugeVec,
    /// The publish time (Unix s) of the job last taken from each (relay, class) queue's
    /// head, while that queue is not sampled empty.
    last_heads: std::sync::Mutex<std::collections::HashMap<(String, String), u64>>,
    /// What the relay's pushback left of its budget (see `crate::limits`).
    effective_rate: prometheus::GaugeVec,
    effective_connections: IntGaugeVec,
    throttled: IntCounterVec,
    /// The same histogram over OTLP, once `otel_metrics::install` set it.
    otel_send_seconds: std::sync::OnceLock<opentelemetry::metrics::Histogram<f64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["relay"]).expect("metric");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["relay"]).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let received = counter(
            "sluice_jobs_received_total",
            "Jobs taken from a relay queue",
        );
        let delivered = counter(
            "sluice_jobs_delivered_total",
            "Jobs the relay accepted (2xx)",
        );
        let deferred = counter(
            "sluice_jobs_deferred_total",
            "Attempts deferred to a retry step (4xx, drop, timeout)",
        );
        let bounced = counter(
            "sluice_jobs_bounced_total",
            "Jobs refused permanently (5xx)",
        );
        let dead = counter(
            "sluice_jobs_dead_total",
            "Jobs set aside in the dead queue (invalid, expired or retries exhausted)",
        );
        let cancelled = counter(
            "sluice_jobs_cancelled_total",
            "Jobs ended unsent because an operator cancelled their campaign",
        );
        let held = counter(
            "sluice_jobs_held_total",
            "Jobs set aside in their campaign's hold queue because an operator paused it",
        );
        let sessions_open = gauge(
            "sluice_smtp_sessions_open",
            "SMTP sessions this worker has open",
        );
        let slots_held = gauge(
            "sluice_budget_slots_held",
            "Budget slots (fleet-wide connection tokens) this worker holds",
        );
        let max_connections = gauge(
            "sluice_relay_max_connections",
            "The relay's fleet-wide max_connections",
        );
        let max_rate = gauge(
            "sluice_relay_max_messages_per_second",
            "The relay's fleet-wide max_messages_per_second (0 = none)",
        );
        let relay_up = gauge(
            "sluice_relay_up",
            "1 while the relay is usable, 0 while it is marked down",
        );
        let relay_down = counter(
            "sluice_relay_down_total",
            "Times the relay went from up to down on this worker (no session, or a refusal streak); an outage counts once, however many probes fail",
        );
        let failovers = IntCounterVec::new(
            Opts::new(
                "sluice_relay_failovers_total",
                "Times the relay went down while it has a failover: its jobs go to `to`",
            ),
            &["relay", "to"],
        )
        .expect("metric");
        registry
            .register(Box::new(failovers.clone()))
            .expect("register");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "Always 1; the worker's version in the `version` label",
            ),
            &["version"],
        )
        .expect("metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info)).expect("register");
        let slot_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sluice_budget_slot_wait_seconds",
                "Time a lane with work waiting took to get a fleet-wide budget slot",
            )
            .buckets(Self::SLOT_WAIT_SECONDS_BUCKETS.to_vec()),
            &["relay"],
        )
        .expect("metric");
        registry
            .register(Box::new(slot_wait_seconds.clone()))
            .expect("register");
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register");
        let broker_blocked = IntGauge::new(
            "sluice_broker_blocked",
            "1 while the broker blocks this worker's publishing connection (memory or disk alarm)",
        )
        .expect("metric");
        registry
            .register(Box::new(broker_blocked.clone()))
            .expect("register");
        let queue_ready = IntGaugeVec::new(
            Opts::new(
                "sluice_queue_ready_jobs",
                "Jobs ready in a relay's class queue (high, normal, low), sampled every few seconds",
            ),
            &["relay", "class"],
        )
        .expect("metric");
        registry
            .register(Box::new(queue_ready.clone()))
            .expect("register");
        let oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                "sluice_queue_oldest_job_age_seconds",
                "Age of the oldest job of a relay's class queue: now minus the AMQP timestamp of the job this worker last took from its head (0 once the queue is sampled empty; jobs without a timestamp are not counted)",
            ),
            &["relay", "class"],
        )
        .expect("metric");
        registry
            .register(Box::new(oldest_age.clone()))
            .expect("register");
        let effective_rate = prometheus::GaugeVec::new(
            Opts::new(
                "sluice_relay_effective_rate",
                "The fleet's messages per second for the relay after its pushback (0 = no limit)",
            ),
            &["relay"],
        )
        .expect("metric");
        registry
            .register(Box::new(effective_rate.clone()))
            .expect("register");
        let effective_connections = gauge(
            "sluice_relay_effective_connections",
            "The fleet's session limit for the relay after its pushback",
        );
        let throttled = IntCounterVec::new(
            Opts::new(
                "sluice_relay_throttled_total",
                "Replies of the relay that pushed back (reason: rate, connections, suspended, session_fault, defer, bounce); a job refused so goes back untouched",
            ),
            &["relay", "reason"],
        )
        .expect("metric");
        registry
            .register(Box::new(throttled.clone()))
            .expect("register");
        let send_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sluice_smtp_send_seconds",
                "Time to hand one message to the relay",
            )
            .buckets(Self::SEND_SECONDS_BUCKETS.to_vec()),
            &["relay"],
        )
        .expect("metric");
        registry
            .register(Box::new(send_seconds.clone()))
            .expect("register");
        Self {
            inner: Arc::new(Inner {
                registry,
                process,
                received,
                delivered,
                deferred,
                bounced,
                dead,
                cancelled,
                held,
                send_seconds,
                sessions_open,
                slots_held,
                max_connections,
                max_rate,
                relay_up,
                relay_down,
                failovers,
                slot_wait_seconds,
                broker_blocked,
                queue_ready,
                oldest_age,
                last_heads: Default::default(),
                effective_rate,
                effective_connections,
                throttled,
                otel_send_seconds: Default::default(),
            }),
        }
    }

    /// Record whether the broker blocks our publishing connection.
    pub fn broker_blocked(&self, blocked: bool) {
        self.inner.broker_blocked.set(i64::from(blocked));
    }

    /// Record a relay's configured budget (shown beside what is used).
    pub fn relay_configured(&self, relay: &str, max_connections: u32, max_rate: u32) {
        let i = &self.inner;
        i.max_connections
            .with_label_values(&[relay])
            .set(max_connections.into());
        i.max_rate.with_label_values(&[relay]).set(max_rate.into());
        i.relay_up.with_label_values(&[relay]).set(1);
        for counter in [
            &i.received,
            &i.delivered,
            &i.deferred,
            &i.bounced,
            &i.dead,
            &i.cancelled,
            &i.held,
            &i.relay_down,
        ] {
            counter.with_label_values(&[relay]).inc_by(0);
        }
        i.sessions_open.with_label_values(&[relay]).set(0);
        i.slots_held.with_label_values(&[relay]).set(0);
    }

    /// The relay's effective rate and session limit now.
    pub fn effective_limits(&self, relay: &str, rate: f64, sessions: u32) {
        let i = &self.inner;
        i.effective_rate.with_label_values(&[relay]).set(rate);
        i.effective_connections
            .with_label_values(&[relay])
            .set(sessions.into());
    }

    /// The relay pushed back (`reason`: see [`crate::pushback::Pushback::reason`]).
    pub fn throttled(&self, relay: &str, reason: &str) {
        self.inner
            .throttled
            .with_label_values(&[relay, reason])
            .inc();
    }

    pub fn received(&self, relay: &str) {
        self.inner.received.with_label_values(&[relay]).inc();
    }
    pub fn delivered(&self, relay: &str) {
        self.inner.delivered.with_label_values(&[relay]).inc();
    }
    pub fn deferred(&self, relay: &str) {
        self.inner.deferred.with_label_values(&[relay]).inc();
    }
    pub fn bounced(&self, relay: &str) {
        self.inner.bounced.with_label_values(&[relay]).inc();
    }
    pub fn dead(&self, relay: &str) {
        self.inner.dead.with_label_values(&[relay]).inc();
    }
    pub fn cancelled(&self, relay: &str) {
        self.inner.cancelled.with_label_values(&[relay]).inc();
    }
    pub fn held(&self, relay: &str) {
        self.inner.held.with_label_values(&[relay]).inc();
    }
    pub fn send_seconds(&self, relay: &str, seconds: f64) {
        self.inner
            .send_seconds
            .with_label_values(&[relay])
            .observe(seconds);
        if let Some(histogram) = self.inner.otel_send_seconds.get() {
            histogram.record(
                seconds,
                &[opentelemetry::KeyValue::new("relay", relay.to_string())],
            );
        }
    }
    pub fn sessions_open(&self, relay: &str) -> IntGauge {
        self.inner.sessions_open.with_label_values(&[relay])
    }
    pub fn slots_held(&self, relay: &str) -> IntGauge {
        self.inner.slots_held.with_label_values(&[relay])
    }
    pub fn relay_up(&self, relay: &str, up: bool) {
        self.inner
            .relay_up
            .with_label_values(&[relay])
            .set(up.into());
    }

    /// `ready` jobs wait in `relay`'s `class` queue; an empty queue has no oldest job.
    pub fn queue_ready(&self, relay: &str, class: &str, ready: u32) {
        let i = &self.inner;
        i.queue_ready
            .with_label_values(&[relay, class])
            .set(ready.into());
        if ready == 0 {
            i.oldest_age.with_label_values(&[relay, class]).set(0.0);
            i.last_heads
                .lock()
                .expect("last heads")
                .remove(&(relay.to_string(), class.to_string()));
        }
    }

    /// How old the oldest job of `relay`'s `class` queue is at most, in seconds, from the
    /// last job taken from its head (`None`: sampled empty since, or none taken).
    pub fn oldest_age(&self, relay: &str, class: &str) -> Option<f64> {
        let published = *self
            .inner
            .last_heads
            .lock()
            .expect("last heads")
            .get(&(relay.to_string(), class.to_string()))?;
        Some((unix_now_s() - published as f64).max(0.0))
    }

    /// A job published at `published` (Unix seconds) was just taken from the head of
    /// `relay`'s `class` queue: it was the oldest there.
    pub fn head_taken(&self, relay: &str, class: &str, published: u64) {
        self.inner
            .oldest_age
            .with_label_values(&[relay, class])
            .set((unix_now_s() - published as f64).max(0.0));
        self.inner
            .last_heads
            .lock()
            .expect("last heads")
            .insert((relay.to_string(), class.to_string()), published);
    }

    /// The relay was marked down (it was up).
    pub fn relay_down(&self, relay: &str) {
        self.inner.relay_down.with_label_values(&[relay]).inc();
    }

    /// `relay` fails over to `to` here: its counter starts at 0, so `increase()` works
    /// from the first failover on.
    pub fn failover_configured(&self, relay: &str, to: &str) {
        self.inner
            .failovers
            .with_label_values(&[relay, to])
            .inc_by(0);
    }

    /// `relay` went down and its jobs now go to `to`.
    pub fn failover(&self, relay: &str, to: &str) {
        self.inner.failovers.with_label_values(&[relay, to]).inc();
    }

    /// A lane of `relay` got a budget slot `seconds` after it first saw work waiting.
    pub fn slot_wait_seconds(&self, relay: &str, seconds: f64) {
        self.inner
            .slot_wait_seconds
            .with_label_values(&[relay])
            .observe(seconds);
    }

    /// Every metric family as gathered now (those with at least one relay).
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.inner.registry.gather()
    }

    /// The buckets of `sluice_smtp_send_seconds`.
    pub const SEND_SECONDS_BUCKETS: [f64; 14] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];

    /// The buckets of `sluice_budget_slot_wait_seconds`: lanes poll for a slot about every
    /// 400 ms, and a saturated fleet waits for sessions to end (minutes on a slow relay).
    pub const SLOT_WAIT_SECONDS_BUCKETS: [f64; 12] = [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ];

    /// Also record send latencies into `histogram` (an OTLP instrument); set once.
    pub fn mirror_send_seconds(&self, histogram: opentelemetry::metrics::Histogram<f64>) {
        let _ = self.inner.otel_send_seconds.set(histogram);
    }

    /// The Prometheus text exposition of every metric, `process_*` included.
    pub fn render(&self) -> String {
        let mut families = self.inner.registry.gather();
        families.extend(self.inner.process.gather());
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("text encoding");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

/// Now, in Unix seconds.
fn unix_now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
    }

    #[test]
    fn the_scrape_names_the_version_and_the_process() {
        let text = Metrics::new().render();
        let build = format!(
            "sluice_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(series(&text, &build), Some("1"), "{text}");
        #[cfg(target_os = "linux")]
        {
            let rss: f64 = series(&text, "process_resident_memory_bytes ")
                .expect("process_resident_memory_bytes")
                .parse()
                .unwrap();
            assert!(rss > 0.0, "{text}");
            assert!(series(&text, "process_open_fds ").is_some(), "{text}");
        }
    }

    #[test]
    fn process_metrics_stay_out_of_the_families_mirrored_over_otlp() {
        let families = Metrics::new().families();
        assert!(families.iter().any(|f| f.name() == "sluice_build_info"));
        assert!(!families.iter().any(|f| f.name().starts_with("process_")));
    }

    #[test]
    fn down_failover_and_slot_wait_start_at_zero_and_count() {
        let metrics = Metrics::new();
        metrics.relay_configured("primary", 4, 0);
        metrics.failover_configured("primary", "backup");
        let before = metrics.render();
        assert_eq!(
            series(&before, "sluice_relay_down_total{relay=\"primary\"}"),
            Some("0")
        );
        assert_eq!(
            series(
                &before,
                "sluice_relay_failovers_total{relay=\"primary\",to=\"backup\"}"
            ),
            Some("0")
        );
        metrics.relay_down("primary");
        metrics.failover("primary", "backup");
        metrics.slot_wait_seconds("primary", 0.3);
        let after = metrics.render();
        assert_eq!(
            series(&after, "sluice_relay_down_total{relay=\"primary\"}"),
            Some("1")
        );
        assert_eq!(
            series(
                &after,
                "sluice_relay_failovers_total{relay=\"primary\",to=\"backup\"}"
            ),
            Some("1")
        );
        assert_eq!(
            series(
                &after,
                "sluice_budget_slot_wait_seconds_bucket{relay=\"primary\",le=\"0.25\"}"
            ),
            Some("0")
        );
        assert_eq!(
            series(
                &after,
                "sluice_budget_slot_wait_seconds_bucket{relay=\"primary\",le=\"0.5\"}"
            ),
            Some("1")
        );
    }
}
