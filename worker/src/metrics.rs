//! The worker's Prometheus metrics, served on `/metrics`. Names are a contract with the
//! Grafana dashboard in `deploy/`.

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
    received: IntCounterVec,
    delivered: IntCounterVec,
    deferred: IntCounterVec,
    bounced: IntCounterVec,
    dead: IntCounterVec,
    send_seconds: HistogramVec,
    sessions_open: IntGaugeVec,
    slots_held: IntGaugeVec,
    max_connections: IntGaugeVec,
    max_rate: IntGaugeVec,
    relay_up: IntGaugeVec,
    broker_blocked: IntGauge,
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
            "Jobs set aside in the dead queue (invalid or retries exhausted)",
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
        let broker_blocked = IntGauge::new(
            "sluice_broker_blocked",
            "1 while the broker blocks this worker's publishing connection (memory or disk alarm)",
        )
        .expect("metric");
        registry
            .register(Box::new(broker_blocked.clone()))
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
                received,
                delivered,
                deferred,
                bounced,
                dead,
                send_seconds,
                sessions_open,
                slots_held,
                max_connections,
                max_rate,
                relay_up,
                broker_blocked,
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
        for counter in [&i.received, &i.delivered, &i.deferred, &i.bounced, &i.dead] {
            counter.with_label_values(&[relay]).inc_by(0);
        }
        i.sessions_open.with_label_values(&[relay]).set(0);
        i.slots_held.with_label_values(&[relay]).set(0);
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

    /// Every metric family as gathered now (those with at least one relay).
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.inner.registry.gather()
    }

    /// The buckets of `sluice_smtp_send_seconds`.
    pub const SEND_SECONDS_BUCKETS: [f64; 14] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];

    /// Also record send latencies into `histogram` (an OTLP instrument); set once.
    pub fn mirror_send_seconds(&self, histogram: opentelemetry::metrics::Histogram<f64>) {
        let _ = self.inner.otel_send_seconds.set(histogram);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut buffer)
            .expect("text encoding");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}
