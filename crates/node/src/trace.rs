//! W3C trace context in gRPC metadata: the client injects the current span's context, the
//! server extracts it into the span of each RPC, so one trace covers both nodes.
//!
//! The propagator is the global one that `qatflow-telemetry` installs; a tonic
//! interceptor runs before the handler's span exists, so extraction happens in the handler
//! ([`rpc_span`]).

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetaInjector<'a>(&'a mut MetadataMap);

impl Injector for MetaInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetaExtractor<'a>(&'a MetadataMap);

impl Extractor for MetaExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|kv| match kv {
                KeyAndValueRef::Ascii(k, _) => Some(k.as_str()),
                KeyAndValueRef::Binary(..) => None,
            })
            .collect()
    }
}

/// Writes the current span's context (`traceparent`) into `metadata`.
pub fn inject_current(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetaInjector(metadata))
    });
}

/// A span for the RPC `method` served by node `node`, child of the caller's span when the
/// request carries a `traceparent`.
pub fn rpc_span(node: &str, method: &'static str, metadata: &MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        node.name = node,
        otel.kind = "server"
    );
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetaExtractor(metadata)));
    // Without an OpenTelemetry layer there is nothing to attach to; that is not an error.
    let _ = span.set_parent(parent);
    span
}

/// A span for actor `actor` handling `message` on node `node`, child of the current span.
pub fn actor_span(node: &str, actor: &'static str, message: &'static str) -> tracing::Span {
    actor_span_in(&tracing::Span::current(), node, actor, message)
}

/// A span for actor `actor` handling `message` on node `node`, child of `parent` (the span
/// of the code that sent the message: actix does not carry spans across mailboxes).
pub fn actor_span_in(
    parent: &tracing::Span,
    node: &str,
    actor: &'static str,
    message: &'static str,
) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "actor",
        otel.name = format!("{actor}.{message}"),
        actor.name = actor,
        node.name = node
    )
}
