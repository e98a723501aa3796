//! Spans recorded through `tracing` reach a real OTLP/gRPC receiver on loopback, under the
//! configured service name and resource attributes, whatever the stderr log level (the
//! CLI's default `warn` must not drop info spans before they are traced). The receiver implements the OpenTelemetry collector's trace
//! service with tonic, as Jaeger does on port 4317.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn spans_reach_an_otlp_receiver_with_the_service_name() {
    let receiver = Receiver::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    });

    let config = qatflow_telemetry::TelemetryConfig {
        service_name: "qatflow-test".into(),
        otlp_endpoint: Some(format!("http://{addr}")),
        // The CLI's default stderr level: it must not filter what is traced.
        log_level: "warn".into(),
        trace_level: "info".into(),
        resource: vec![
            ("node.name".into(), "gpu-1".into()),
            ("node.role".into(), "spark".into()),
        ],
        ansi: false,
    };
    let guard = qatflow_telemetry::init(&config).unwrap();
    assert!(guard.exporting());
    {
        let outer = tracing::info_span!("validate_dataset", lines = 3);
        let _o = outer.enter();
        tracing::info_span!("check_line").in_scope(|| tracing::info!("checked"));
    }
    drop(guard); // flushes and shuts down

    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let reqs = receiver.requests.lock().unwrap().clone();
        let spans: Vec<_> = reqs
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|rs| {
                let attr = |key: &str| {
                    rs.resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == key)
                        .and_then(|kv| kv.value.as_ref()?.value.clone())
                };
                let service = (attr("service.name"), attr("node.name"), attr("node.role"));
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| ss.spans.iter())
                    .map(move |s| {
                        (
                            service.clone(),
                            s.name.clone(),
                            s.trace_id.clone(),
                            s.parent_span_id.clone(),
                        )
                    })
            })
            .collect();
        if spans.len() >= 2 || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let outer = spans
        .iter()
        .find(|s| s.1 == "validate_dataset")
        .expect("outer span exported");
    let inner = spans
        .iter()
        .find(|s| s.1 == "check_line")
        .expect("inner span exported");
    assert_eq!(
        outer.0,
        (
            Some(Value::StringValue("qatflow-test".into())),
            Some(Value::StringValue("gpu-1".into())),
            Some(Value::StringValue("spark".into()))
        )
    );
    assert_eq!(outer.2, inner.2, "both spans share one trace id");
    assert!(outer.3.is_empty(), "outer span is a root");
    assert!(!inner.3.is_empty(), "inner span has a parent");
}
