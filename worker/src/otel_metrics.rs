//! The worker's metrics over OTLP as well, when an endpoint is configured: observable
//! instruments read the Prometheus registry at each export (so both show the same
//! numbers), and send latencies are recorded into an OTel histogram with the same buckets.
//!
//! Names are the Prometheus ones, counters without `_total` (Prometheus' OTLP ingestion
//! adds it back); every series keeps its `relay` attribute.

use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use prometheus::proto::{MetricFamily, MetricType};
use sluice_shared::telemetry;

use crate::metrics::Metrics;

/// Register the instruments when OTLP metrics are on; a no-op otherwise. Call it after every
/// relay was passed to [`Metrics::relay_configured`], so that every family exists.
pub fn install(metrics: &Metrics) {
    let Some(meter) = telemetry::meter("sluice-worker") else {
        return;
    };
    register(&meter, metrics);
}

fn register(meter: &Meter, metrics: &Metrics) {
    for family in metrics.families() {
        let name = family.name().to_string();
        let help = family.help().to_string();
        match family.get_field_type() {
            MetricType::COUNTER => {
                let source = metrics.clone();
                let wanted = name.clone();
                meter
                    .u64_observable_counter(name.trim_end_matches("_total").to_string())
                    .with_description(help)
                    .with_callback(move |observer| {
                        for_each_series(&source, &wanted, |relay, metric| {
                            observer.observe(metric.get_counter().get_value() as u64, relay)
                        })
                    })
                    .build();
            }
            MetricType::GAUGE => {
                let source = metrics.clone();
                let wanted = name.clone();
                meter
                    .i64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        for_each_series(&source, &wanted, |relay, metric| {
                            observer.observe(metric.get_gauge().get_value() as i64, relay)
                        })
                    })
                    .build();
            }
            _ => {}
        }
    }
    let histogram = meter
        .f64_histogram("sluice_smtp_send_seconds")
        .with_description("Time to hand one message to the relay")
        .with_unit("s")
        .with_boundaries(Metrics::SEND_SECONDS_BUCKETS.to_vec())
        .build();
    metrics.mirror_send_seconds(histogram);
}

/// Call `observe` with each series of family `name` and its attributes.
fn for_each_series(
    metrics: &Metrics,
    name: &str,
    mut observe: impl FnMut(&[KeyValue], &prometheus::proto::Metric),
) {
    let families: Vec<MetricFamily> = metrics.families();
    let Some(family) = families.iter().find(|f| f.name() == name) else {
        return;
    };
    for metric in family.get_metric() {
        let attributes: Vec<KeyValue> = metric
            .get_label()
            .iter()
            .map(|label| KeyValue::new(label.name().to_string(), label.value().to_string()))
            .collect();
        observe(&attributes, metric);
    }
}
