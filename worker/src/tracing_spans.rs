//! The worker's OpenTelemetry spans: one `process <queue>` span (kind consumer) per attempt,
//! child of the context the job carries in its headers, with `smtp.connect` and `smtp.send`
//! children (kind client) for the SMTP work. Names and attributes follow the OpenTelemetry
//! messaging conventions for RabbitMQ (`messaging.*`, the broker's `server.address` and
//! `server.port`, `error.type` on failure); sluice's own attributes start with `sluice.`.
//!
//! When tracing is off ([`telemetry::tracer`] is `None`) every type here is an empty shell:
//! no span is built, no attribute formatted, no header parsed beyond the trace id that
//! delivery events carry.

use std::borrow::Cow;

use lapin::types::FieldTable;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use sluice_shared::events::EventOutcome;
use sluice_shared::{telemetry, trace_context};

/// The relay's SMTP reply code (sluice's own attribute: SMTP has no convention yet).
pub const REPLY_CODE: &str = "sluice.smtp.reply_code";

/// `error.type` of a failed SMTP step: the reply code when the relay answered, else what the
/// conventions use for a failure without one.
fn error_type(code: Option<u16>) -> opentelemetry::Value {
    match code {
        Some(code) => code.to_string().into(),
        None => "_OTHER".into(),
    }
}

/// What a `process` span is about; only read when tracing is on.
pub struct DeliverAttributes<'a> {
    /// The queue the job was consumed from.
    pub queue: Cow<'a, str>,
    /// The AMQP `message_id` (the job id).
    pub message_id: &'a str,
    /// The routing key the job was published with.
    pub routing_key: &'a str,
    /// The relay the attempt goes through.
    pub relay: &'a str,
    pub campaign: &'a str,
    /// 1 for the first attempt.
    pub attempt: i64,
}

/// The span of one delivery attempt; ends (and is queued for export) at [`DeliverSpan::finish`].
pub struct DeliverSpan {
    cx: Option<Context>,
}

impl DeliverSpan {
    /// Start the span as a child of the context in `incoming` (a new trace when there is
    /// none). `attributes` is only called when tracing is on.
    pub fn start<'a>(
        incoming: Option<&FieldTable>,
        attributes: impl FnOnce() -> DeliverAttributes<'a>,
    ) -> Self {
        let Some(tracer) = telemetry::tracer() else {
            return Self { cx: None };
        };
        let parent = trace_context::extract(incoming);
        let a = attributes();
        let mut attributes = vec![
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.operation.name", "process"),
            KeyValue::new("messaging.destination.name", a.queue.to_string()),
            KeyValue::new("messaging.message.id", a.message_id.to_string()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                a.routing_key.to_string(),
            ),
            KeyValue::new("sluice.relay", a.relay.to_string()),
            KeyValue::new("sluice.campaign", a.campaign.to_string()),
            KeyValue::new("sluice.attempt", a.attempt),
        ];
        if let Some(node) = sluice_shared::amqp::connected_node(crate::broker::CONSUME_CONNECTION) {
            attributes.push(KeyValue::new("server.address", node.host));
            attributes.push(KeyValue::new("server.port", i64::from(node.port)));
        }
        let span = tracer
            .span_builder(format!("process {}", a.queue))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Self {
            cx: Some(parent.with_span(span)),
        }
    }

    /// The trace and span ids (lowercase hex) of this attempt, for the log lines that
    /// belong to it: `None` when tracing is off.
    pub fn ids(&self) -> Option<(String, String)> {
        let cx = self.cx.as_ref()?;
        let span = cx.span();
        let context = span.span_context();
        context.is_valid().then(|| {
            (
                context.trace_id().to_string(),
                context.span_id().to_string(),
            )
        })
    }

    /// The span's context, to hand to a retry copy that has no `traceparent` of its own.
    pub fn context(&self) -> Option<&Context> {
        self.cx.as_ref()
    }

    /// A child span (kind client) named `name`, e.g. `smtp.send`, for work done within
    /// this attempt.
    pub fn child(&self, name: &'static str, relay: &str, host: &str, port: u16) -> ChildSpan {
        let (Some(cx), Some(tracer)) = (&self.cx, telemetry::tracer()) else {
            return ChildSpan { cx: None };
        };
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("sluice.relay", relay.to_string()),
                KeyValue::new("server.address", host.to_string()),
                KeyValue::new("server.port", i64::from(port)),
            ])
            .start_with_context(tracer, cx);
        ChildSpan {
            cx: Some(cx.with_span(span)),
        }
    }

    /// The job was put back untouched (no SMTP session could be had): no attempt was made.
    pub fn requeued(self, why: &str) {
        if let Some(cx) = self.cx {
            let span = cx.span();
            span.set_attribute(KeyValue::new("sluice.requeued", true));
            span.set_attribute(KeyValue::new("error.type", "not_attempted"));
            span.set_status(Status::error(why.to_string()));
            span.end();
        }
    }

    /// Record what the broker was told to do with the job (`sluice.outcome`).
    pub fn record_outcome(&self, event: EventOutcome) {
        if let Some(cx) = &self.cx {
            cx.span()
                .set_attribute(KeyValue::new("sluice.outcome", event.as_str()));
        }
    }

    /// Record how the attempt ended and end the span: the relay's reply code, and for every
    /// outcome but delivered an `error.type` (the outcome: `deferred`, `bounced`, ...) and
    /// an error status with the reply.
    pub fn finish(self, code: Option<u16>, error_type: Option<&'static str>, reply: &str) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        if let Some(code) = code {
            span.set_attribute(KeyValue::new(REPLY_CODE, i64::from(code)));
        }
        if let Some(error_type) = error_type {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(Status::error(reply.to_string()));
        }
        span.end();
    }

    /// The settling failed: the delivery stays unacknowledged and comes back.
    pub fn failed(self, error: &dyn std::fmt::Display) {
        if let Some(cx) = self.cx {
            let span = cx.span();
            span.set_attribute(KeyValue::new("error.type", "not_settled"));
            span.set_status(Status::error(format!("not settled: {error}")));
            span.end();
        }
    }
}

/// A child of a [`DeliverSpan`]; ends at [`ChildSpan::end`] (or when dropped).
pub struct ChildSpan {
    cx: Option<Context>,
}

impl ChildSpan {
    /// End the span, with the SMTP reply code when there was one and an error status when
    /// `ok` is false.
    pub fn end(self, code: Option<u16>, ok: bool, description: &str) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        if let Some(code) = code {
            span.set_attribute(KeyValue::new(REPLY_CODE, i64::from(code)));
        }
        if !ok {
            span.set_attribute(KeyValue::new("error.type", error_type(code)));
            span.set_status(Status::error(description.to_string()));
        }
        span.end();
    }
}

/// The trace id a delivery event carries: the attempt's own when it is traced, else the one
/// in the job's `traceparent` header.
pub fn event_trace_id(span: &DeliverSpan, incoming: Option<&FieldTable>) -> Option<String> {
    if let Some(cx) = &span.cx {
        let id = cx.span().span_context().trace_id();
        if id != opentelemetry::trace::TraceId::INVALID {
            return Some(id.to_string());
        }
    }
    trace_context::trace_id_of(incoming)
}
