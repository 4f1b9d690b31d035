//! W3C trace context (`traceparent`, `tracestate`) and baggage in and out of AMQP message
//! headers, with the propagators `OTEL_PROPAGATORS` names (`tracecontext,baggage` by
//! default; `none` turns propagation off; others are not supported and say so once).
//!
//! The producer writes the context of its `publish` span (with baggage) into a job's headers; the worker
//! reads it back to make each `process` span a child of it. Retry and dead copies carry the
//! incoming headers unchanged, so every attempt of a job hangs under the same parent.
//! Header values are written as AMQP long strings; short strings are read too, since other
//! publishers (pika, other services) may use them.

use lapin::types::{AMQPValue, FieldTable};
use std::sync::OnceLock;

use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

/// The W3C header holding version, trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header holding vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// The context carried by `headers` (an empty context when there is none or it is invalid).
pub fn extract(headers: Option<&FieldTable>) -> Context {
    match headers {
        Some(table) => propagator().extract(&HeaderExtractor(table)),
        None => Context::new(),
    }
}

/// Write `cx`'s span context into `headers` (nothing when `cx` has no valid span).
pub fn inject(cx: &Context, headers: &mut FieldTable) {
    propagator().inject_context(cx, &mut HeaderInjector(headers));
}

/// The propagators `OTEL_PROPAGATORS` asks for, built once.
fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(|| {
        let names = std::env::var("OTEL_PROPAGATORS").unwrap_or_default();
        let (propagators, unsupported) = propagators_named(&names);
        for name in unsupported {
            tracing::warn!(propagator = %name, "OTEL_PROPAGATORS names a propagator sluice does not support; ignored");
        }
        TextMapCompositePropagator::new(propagators)
    })
}

/// The propagators of an `OTEL_PROPAGATORS` value (the default when empty), and the names
/// not supported.
fn propagators_named(names: &str) -> (Vec<Box<dyn TextMapPropagator + Send + Sync>>, Vec<String>) {
    let names = if names.trim().is_empty() {
        "tracecontext,baggage"
    } else {
        names
    };
    let mut propagators: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
    let mut unsupported = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "tracecontext" => propagators.push(Box::new(TraceContextPropagator::new())),
            "baggage" => propagators.push(Box::new(BaggagePropagator::new())),
            "none" => return (Vec::new(), unsupported),
            other => unsupported.push(other.to_string()),
        }
    }
    (propagators, unsupported)
}

/// The trace id (32 lowercase hex digits) of a valid `traceparent` header, without
/// building a context: cheap enough for every event, with tracing on or off.
pub fn trace_id_of(headers: Option<&FieldTable>) -> Option<String> {
    let value = header_str(headers?, TRACEPARENT)?;
    let mut parts = value.trim().split('-');
    let (version, trace_id, span_id) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && hex(span_id, 16)
        && trace_id.bytes().any(|b| b != b'0');
    valid.then(|| trace_id.to_ascii_lowercase())
}

fn header_str<'a>(table: &'a FieldTable, name: &str) -> Option<&'a str> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header_str(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(value.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn a_context_survives_the_round_trip_through_headers() {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let cx = Context::new().with_remote_span_context(span_context.clone());
        let mut headers = FieldTable::default();
        inject(&cx, &mut headers);
        assert!(matches!(
            headers.inner().get(TRACEPARENT),
            Some(AMQPValue::LongString(_))
        ));
        let back = extract(Some(&headers));
        let got = back.span().span_context().clone();
        assert_eq!(got.trace_id(), span_context.trace_id());
        assert_eq!(got.span_id(), span_context.span_id());
        assert!(got.is_sampled());
        assert_eq!(got.trace_state().header(), "vendor=x");
        assert_eq!(
            trace_id_of(Some(&headers)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn otel_propagators_chooses_what_travels_in_the_headers() {
        let parent = table(&[
            (TRACEPARENT, AMQPValue::LongString(PARENT.into())),
            ("baggage", AMQPValue::LongString("tenant=acme".into())),
        ]);
        // (OTEL_PROPAGATORS, traceparent carried, baggage carried, unsupported names)
        let cases = [
            ("", true, true, vec![]),
            ("tracecontext,baggage", true, true, vec![]),
            ("tracecontext", true, false, vec![]),
            (" baggage ", false, true, vec![]),
            ("none", false, false, vec![]),
            ("b3,tracecontext", true, false, vec!["b3".to_string()]),
        ];
        for (names, trace, baggage, unsupported) in cases {
            let (propagators, unknown) = propagators_named(names);
            assert_eq!(unknown, unsupported, "{names:?}");
            let propagator = TextMapCompositePropagator::new(propagators);
            let cx = propagator.extract(&HeaderExtractor(&parent));
            let mut out = FieldTable::default();
            propagator.inject_context(&cx, &mut HeaderInjector(&mut out));
            assert_eq!(
                out.inner().contains_key(TRACEPARENT),
                trace,
                "{names:?}: {out:?}"
            );
            let carried = header_str(&out, "baggage").unwrap_or_default();
            assert_eq!(
                carried.contains("tenant=acme"),
                baggage,
                "{names:?}: {out:?}"
            );
        }
    }

    #[test]
    fn short_strings_from_other_publishers_are_read() {
        let headers = table(&[(TRACEPARENT, AMQPValue::ShortString(PARENT.into()))]);
        let cx = extract(Some(&headers));
        assert_eq!(
            cx.span().span_context().span_id(),
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
    }

    #[test]
    fn trace_ids_are_only_taken_from_valid_headers() {
        let cases = [
            (PARENT, Some("0af7651916cd43dd8448eb211c80319c")),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                Some("0af7651916cd43dd8448eb211c80319c"),
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
                None,
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            ),
            ("garbage", None),
            ("", None),
        ];
        for (value, want) in cases {
            let headers = table(&[(TRACEPARENT, AMQPValue::LongString(value.into()))]);
            assert_eq!(trace_id_of(Some(&headers)).as_deref(), want, "{value}");
        }
        assert_eq!(trace_id_of(None), None);
        assert_eq!(trace_id_of(Some(&FieldTable::default())), None);
        assert!(!extract(None).has_active_span());
    }
}
