//! An OTLP receiver for tests: spans and metrics over OTLP/HTTP (protobuf) and OTLP/gRPC.
//!
//! It runs on its own thread and runtime and keeps everything it receives, so a test can point
//! services at it (`OTEL_EXPORTER_OTLP_ENDPOINT`) and then look at the spans they exported.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attributes with their values rendered as strings.
    pub attributes: Vec<(String, String)>,
    /// How it arrived: "http" or "grpc".
    pub transport: &'static str,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    metric_names: Mutex<Vec<String>>,
    gauges: Mutex<Vec<ReceivedGauge>>,
}

/// One data point of a gauge, with the `service.name` of the resource that sent it.
#[derive(Debug, Clone)]
pub struct ReceivedGauge {
    pub service: String,
    pub name: String,
    pub value: f64,
}

/// A running receiver.
pub struct OtlpReceiver {
    http: SocketAddr,
    grpc: SocketAddr,
    received: Arc<Received>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind OTLP/HTTP");
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind OTLP/gRPC");
        let addrs = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
        http.set_nonblocking(true).unwrap();
        grpc.set_nonblocking(true).unwrap();
        let received = Arc::new(Received::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let serving = received.clone();
        let thread = std::thread::spawn(move || serve(http, grpc, serving, stopped));
        Self {
            http: addrs.0,
            grpc: addrs.1,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.received.metric_names.lock().unwrap().clone()
    }

    /// Every gauge data point received, oldest first.
    pub fn gauges(&self) -> Vec<ReceivedGauge> {
        self.received.gauges.lock().unwrap().clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    http: std::net::TcpListener,
    grpc: std::net::TcpListener,
    received: Arc<Received>,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("OTLP receiver runtime");
    runtime.block_on(async move {
        let grpc = tokio::net::TcpListener::from_std(grpc).expect("tokio listener");
        let grpc_service = TraceServiceServer::new(GrpcTraces(received.clone()));
        let mut grpc_stop = stopped.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(tokio_stream_from(grpc), async move {
                    let _ = grpc_stop.changed().await;
                }),
        );
        serve_http(http, received, stopped).await;
    });
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

async fn serve_http(
    listener: std::net::TcpListener,
    received: Arc<Received>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let received = received.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let received = received.clone();
                async move { Ok::<_, Infallible>(handle_http(&received, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle_http(received: &Received, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(request) => {
                keep_spans(received, request, "http");
                status(StatusCode::OK)
            }
            Err(_) => status(StatusCode::BAD_REQUEST),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(request) => {
                keep_metrics(received, request);
                status(StatusCode::OK)
            }
            Err(_) => status(StatusCode::BAD_REQUEST),
        },
        _ => status(StatusCode::OK),
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

struct GrpcTraces(Arc<Received>);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep_spans(&self.0, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn keep_metrics(received: &Received, request: ExportMetricsServiceRequest) {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    let mut names = received.metric_names.lock().unwrap();
    let mut gauges = received.gauges.lock().unwrap();
    for resource in request.resource_metrics {
        let service = service_name(resource.resource.as_ref());
        for scope in resource.scope_metrics {
            for metric in scope.metrics {
                if let Some(Data::Gauge(gauge)) = &metric.data {
                    for point in &gauge.data_points {
                        let value = match point.value {
                            Some(Number::AsInt(i)) => i as f64,
                            Some(Number::AsDouble(d)) => d,
                            None => continue,
                        };
                        gauges.push(ReceivedGauge {
                            service: service.clone(),
                            name: metric.name.clone(),
                            value,
                        });
                    }
                }
                names.push(metric.name);
            }
        }
    }
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| r.attributes.iter())
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref().and_then(|v| v.value.as_ref()).map(render))
        .unwrap_or_default()
}

fn keep_spans(received: &Received, request: ExportTraceServiceRequest, transport: &'static str) {
    let mut spans = received.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = service_name(resource_spans.resource.as_ref());
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
                            (kv.key.clone(), value.map(render).unwrap_or_default())
                        })
                        .collect(),
                    transport,
                });
            }
        }
    }
}

fn render(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::BoolValue(b) => b.to_string(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
