//! Logs through `tracing`, traces and metrics through OpenTelemetry (OTLP).
//!
//! Logs: readable on a terminal, JSON lines with `SLUICE_LOG_FORMAT=json`, level from
//! `RUST_LOG` (default `info`). Dependencies that log protocol traffic (lettre's SMTP
//! transcript carries `AUTH` lines) are capped at `warn` whatever `RUST_LOG` says, so
//! secrets never reach the output.
//!
//! Traces and metrics: exported with the OpenTelemetry SDK's OTLP exporter, configured by
//! the standard variables — `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`,
//! `..._METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`,
//! `OTEL_SDK_DISABLED`. With no endpoint, nothing is built: [`tracer`] and [`meter`]
//! answer `None`, callers skip their spans, and nothing is logged about it. Spans are
//! batched on the SDK's own thread; the [`Telemetry`] guard flushes them when dropped.

use std::sync::OnceLock;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Targets whose debug output may carry credentials or message content: always capped.
/// lapin is silenced altogether: it logs an ERROR for every channel the broker closes,
/// which is how a budget slot held by another worker is refused; sluice logs the broker
/// errors that matter itself.
const QUIET_TARGETS: &[(&str, &str)] = &[
    ("lettre", "warn"),
    ("lapin", "off"),
    ("amq_protocol", "off"),
];

/// Targets of the export machinery: capped at `warn` unless `RUST_LOG` names them, so that
/// a debug log does not drown in HTTP/2 frames and export failures still show.
const EXPORT_TARGETS: &[&str] = &[
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "tonic",
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "tower",
];

static TRACER: OnceLock<SdkTracer> = OnceLock::new();
static METER_PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// The tracer of this process, or `None` when traces are not exported. Checking it is one
/// atomic load: the per-job cost of tracing when it is off.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// A meter of this process, or `None` when metrics are not exported over OTLP.
pub fn meter(name: &'static str) -> Option<Meter> {
    METER_PROVIDER.get().map(|provider| provider.meter(name))
}

/// Keep this until the process exits: dropping it flushes spans and metrics not yet
/// exported (blocking for at most the exporter's timeout).
#[must_use = "dropping the guard flushes and stops the OpenTelemetry exporters"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// True when spans are exported.
    pub fn traces_enabled(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// True when metrics are exported over OTLP.
    pub fn metrics_enabled(&self) -> bool {
        self.meter_provider.is_some()
    }

    /// Flush and stop the exporters now (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing spans failed");
            }
        }
        if let Some(provider) = self.meter_provider.take() {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing metrics failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Install the global log subscriber (logs go to stderr, so stdout stays for results) and,
/// when an OTLP endpoint is configured, the trace and metric exporters. `service` is the
/// default `service.name` (`OTEL_SERVICE_NAME` wins). Call it inside the tokio runtime: the
/// gRPC exporter needs one.
pub fn init(service: &str) -> Telemetry {
    init_logs(service);
    let mut guard = Telemetry {
        tracer_provider: None,
        meter_provider: None,
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return guard;
    }
    let exporter_off =
        |name: &str| env(name).is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let want_traces = (endpoint || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
        && !exporter_off("OTEL_TRACES_EXPORTER");
    let want_metrics = (endpoint || env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some())
        && !exporter_off("OTEL_METRICS_EXPORTER");
    if !want_traces && !want_metrics {
        return guard;
    }
    let resource = resource(service);
    if want_traces {
        match opentelemetry_otlp::SpanExporter::builder().build() {
            Ok(exporter) => {
                // The batch processor runs on its own thread (OTEL_BSP_* tune it): ending a
                // span only queues it.
                let provider = SdkTracerProvider::builder()
                    .with_resource(resource.clone())
                    .with_batch_exporter(exporter)
                    .build();
                let _ = TRACER.set(provider.tracer(service.to_string()));
                guard.tracer_provider = Some(provider);
            }
            Err(e) => tracing::warn!(error = %e, "cannot export traces over OTLP; tracing is off"),
        }
    }
    if want_metrics {
        match opentelemetry_otlp::MetricExporter::builder().build() {
            Ok(exporter) => {
                let provider = SdkMeterProvider::builder()
                    .with_resource(resource)
                    .with_periodic_exporter(exporter)
                    .build();
                let _ = METER_PROVIDER.set(provider.clone());
                guard.meter_provider = Some(provider);
            }
            Err(e) => tracing::warn!(error = %e, "cannot export metrics over OTLP"),
        }
    }
    tracing::debug!(
        service,
        traces = guard.traces_enabled(),
        metrics = guard.metrics_enabled(),
        "OpenTelemetry export on"
    );
    guard
}

/// The SDK's resource (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`), with `service` as
/// the service name when neither names one.
fn resource(service: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(service.to_string());
    }
    // OTEL_SERVICE_NAME wins over a service.name in OTEL_RESOURCE_ATTRIBUTES.
    // The build's version unless OTEL_RESOURCE_ATTRIBUTES names one.
    if detected
        .get(&opentelemetry::Key::from_static_str("service.version"))
        .is_none()
    {
        builder = builder.with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    }
    if let Some(name) = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

fn init_logs(service: &str) {
    let user = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for (target, level) in QUIET_TARGETS {
        filter = filter.add_directive(format!("{target}={level}").parse().expect("directive"));
    }
    for target in EXPORT_TARGETS {
        if !user.contains(target) {
            filter = filter.add_directive(format!("{target}=warn").parse().expect("directive"));
        }
    }
    let json = std::env::var("SLUICE_LOG_FORMAT")
        .map(|v| v.eq_ignore_ascii_case("json"))
        .unwrap_or(false);
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    // EnvFilter lets a more specific directive (`RUST_LOG=lapin::channels=trace`) win over
    // the caps above: this filter holds them whatever RUST_LOG says.
    let cap = tracing_subscriber::filter::filter_fn(|meta| {
        QUIET_TARGETS
            .iter()
            .find(|(target, _)| meta.target().starts_with(target))
            .is_none_or(|(_, level)| {
                level
                    .parse::<tracing_subscriber::filter::LevelFilter>()
                    .is_ok_and(|max| *meta.level() <= max)
            })
    });
    let registry = tracing_subscriber::registry().with(filter).with(cap);
    let result = if json {
        registry
            .with(
                // Flat objects: timestamp, level, target, message and the event's fields
                // (trace_id and span_id on a delivery's lines) side by side.
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "logging initialised");
    }
}
