//! An in-test OTLP receiver on 127.0.0.1: the gRPC `TraceService` and `MetricsService`
//! (tonic, on the official `opentelemetry-proto` types) and OTLP/HTTP (`POST /v1/traces`,
//! `POST /v1/metrics` with protobuf bodies), recording every span and metric name it gets.
//!
//! ```no_run
//! # async fn demo() {
//! use sluice_tests::otlp_receiver::OtlpReceiver;
//! let receiver = OtlpReceiver::start().await;
//! // OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint(), OTEL_EXPORTER_OTLP_PROTOCOL=grpc
//! // or receiver.http_endpoint() with http/protobuf; run the binaries...
//! let spans = receiver.spans();
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// OTLP span kinds (`opentelemetry.proto.trace.v1.Span.SpanKind`).
pub mod kind {
    pub const INTERNAL: i32 = 1;
    pub const SERVER: i32 = 2;
    pub const CLIENT: i32 = 3;
    pub const PRODUCER: i32 = 4;
    pub const CONSUMER: i32 = 5;
}

/// OTLP status codes (`opentelemetry.proto.trace.v1.Status.StatusCode`).
pub mod status {
    pub const UNSET: i32 = 0;
    pub const OK: i32 = 1;
    pub const ERROR: i32 = 2;
}

/// Which transport a request came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// One received span, flattened: ids as lowercase hex, attributes as text.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `service.name` of the resource that sent it.
    pub service: String,
    pub resource: HashMap<String, String>,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub trace_state: String,
    pub kind: i32,
    pub status_code: i32,
    pub status_message: String,
    pub attributes: HashMap<String, String>,
    pub transport: Transport,
}

impl ReceivedSpan {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Recorded {
    spans: Vec<ReceivedSpan>,
    /// (service, metric name, transport)
    metrics: Vec<(String, String, Transport)>,
    /// `name=value` of every request header (gRPC metadata) starting with `x-`.
    headers: Vec<String>,
}

type Shared = Arc<Mutex<Recorded>>;

/// A running receiver; its servers stop when it is dropped.
pub struct OtlpReceiver {
    grpc: SocketAddr,
    http: SocketAddr,
    recorded: Shared,
    tasks: Vec<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Start both servers on ports of their own.
    pub async fn start() -> OtlpReceiver {
        let recorded: Shared = Arc::default();

        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let grpc = grpc_listener.local_addr().expect("gRPC address");
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
        let grpc_server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Grpc(recorded.clone())))
            .add_service(MetricsServiceServer::new(Grpc(recorded.clone())))
            .serve_with_incoming(incoming);
        let grpc_task = tokio::spawn(async move {
            let _ = grpc_server.await;
        });

        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let http = http_listener.local_addr().expect("HTTP address");
        let app = Router::new()
            .route("/v1/traces", post(http_traces))
            .route("/v1/metrics", post(http_metrics))
            .with_state(recorded.clone());
        let http_task = tokio::spawn(async move {
            let _ = axum::serve(http_listener, app).await;
        });

        OtlpReceiver {
            grpc,
            http,
            recorded,
            tasks: vec![grpc_task, http_task],
        }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` (the
    /// exporter appends `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.recorded.lock().expect("receiver lock").spans.clone()
    }

    /// Names of the metrics received so far from `service`.
    pub fn metric_names(&self, service: &str) -> Vec<String> {
        let recorded = self.recorded.lock().expect("receiver lock");
        let mut names: Vec<String> = recorded
            .metrics
            .iter()
            .filter(|(s, _, _)| s == service)
            .map(|(_, name, _)| name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `name=value` of the `x-...` request headers the exporters sent
    /// (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub fn request_headers(&self) -> Vec<String> {
        let mut headers = self.recorded.lock().expect("receiver lock").headers.clone();
        headers.sort();
        headers.dedup();
        headers
    }

    /// Wait until `done(spans)` holds or `timeout` passes; returns the spans either way.
    pub async fn wait_for_spans(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn record_headers<'a>(
    recorded: &Shared,
    headers: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) {
    let mut out = recorded.lock().expect("receiver lock");
    for (name, value) in headers {
        if let (true, Some(value)) = (name.starts_with("x-"), value) {
            out.headers.push(format!("{name}={value}"));
        }
    }
}

fn grpc_headers(recorded: &Shared, metadata: &tonic::metadata::MetadataMap) {
    let http = metadata.clone().into_headers();
    record_headers(
        recorded,
        http.iter().map(|(n, v)| (n.as_str(), v.to_str().ok())),
    );
}

fn http_headers(recorded: &Shared, headers: &axum::http::HeaderMap) {
    record_headers(
        recorded,
        headers.iter().map(|(n, v)| (n.as_str(), v.to_str().ok())),
    );
}

fn record_traces(recorded: &Shared, request: ExportTraceServiceRequest, transport: Transport) {
    let mut out = recorded.lock().expect("receiver lock");
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                let (status_code, status_message) = span
                    .status
                    .map(|s| (s.code, s.message))
                    .unwrap_or((status::UNSET, String::new()));
                out.spans.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    trace_state: span.trace_state,
                    kind: span.kind,
                    status_code,
                    status_message,
                    attributes: attributes(&span.attributes),
                    transport,
                });
            }
        }
    }
}

fn record_metrics(recorded: &Shared, request: ExportMetricsServiceRequest, transport: Transport) {
    let mut out = recorded.lock().expect("receiver lock");
    for resource_metrics in request.resource_metrics {
        let service = resource_metrics
            .resource
            .map(|r| attributes(&r.attributes))
            .and_then(|a| a.get("service.name").cloned())
            .unwrap_or_default();
        for scope in resource_metrics.scope_metrics {
            for metric in scope.metrics {
                out.metrics.push((service.clone(), metric.name, transport));
            }
        }
    }
}

struct Grpc(Shared);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        grpc_headers(&self.0, request.metadata());
        record_traces(&self.0, request.into_inner(), Transport::Grpc);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        grpc_headers(&self.0, request.metadata());
        record_metrics(&self.0, request.into_inner(), Transport::Grpc);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn protobuf(body: Vec<u8>) -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

async fn http_traces(
    State(recorded): State<Shared>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    http_headers(&recorded, &headers);
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            record_traces(&recorded, request, Transport::Http);
            protobuf(ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn http_metrics(
    State(recorded): State<Shared>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    http_headers(&recorded, &headers);
    match ExportMetricsServiceRequest::decode(body) {
        Ok(request) => {
            record_metrics(&recorded, request, Transport::Http);
            protobuf(ExportMetricsServiceResponse::default().encode_to_vec())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}
