//! Prometheus metrics and the `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::time::Instant;

use feedgraph_retrieval::{FeedPage, Scoring};
use feedgraph_scoring::ReloadReport;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The service's metrics, in their own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    feed_partial: IntCounter,
    feed_scanned: prometheus::Histogram,
    feed_scoring: IntCounterVec,
    model_loads: IntCounterVec,
    model_version: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("feedgraph".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("grpc_requests_total", "gRPC requests by method and status code"),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("grpc_request_seconds", "gRPC request latency by method").buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
            ]),
            &["method"],
        )?;
        let feed_partial = IntCounter::new("feed_partial_total", "Feed pages built without every shard")?;
        let feed_scanned = prometheus::Histogram::with_opts(
            HistogramOpts::new("feed_candidates_scanned", "Candidates scanned per ranking computed")
                .buckets(prometheus::exponential_buckets(100.0, 4.0, 8)?),
        )?;
        let feed_scoring = IntCounterVec::new(
            Opts::new(
                "feed_rankings_total",
                "Rankings computed, by scoring: light, model, or fallback_<reason> when the ML scorer could not be used",
            ),
            &["scoring"],
        )?;
        let model_loads = IntCounterVec::new(
            Opts::new("scorer_model_loads_total", "Model versions loaded or refused, by model and result"),
            &["model", "result"],
        )?;
        let model_version = IntGaugeVec::new(
            Opts::new("scorer_model_version", "Model version served, by model"),
            &["model"],
        )?;
        registry.register(Box::new(feed_scoring.clone()))?;
        registry.register(Box::new(model_loads.clone()))?;
        registry.register(Box::new(model_version.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(feed_partial.clone()))?;
        registry.register(Box::new(feed_scanned.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            feed_partial,
            feed_scanned,
            feed_scoring,
            model_loads,
            model_version,
        })
    }

    pub fn observe<T>(&self, method: &str, started: Instant, result: &Result<T, tonic::Status>) {
        let code = match result {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.requests.with_label_values(&[method, code.as_str()]).inc();
        self.latency.with_label_values(&[method]).observe(started.elapsed().as_secs_f64());
    }

    /// Runs a handler's body, recording its latency and status code under `method`.
    pub async fn observed<T>(
        &self,
        method: &str,
        body: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        let started = Instant::now();
        let result = body.await;
        self.observe(method, started, &result);
        result.map(tonic::Response::new)
    }

    pub fn observe_feed(&self, page: &FeedPage) {
        if page.stats.partial {
            self.feed_partial.inc();
        }
        if !page.stats.from_cache {
            self.feed_scanned.observe(page.stats.candidates_scanned as f64);
            let label = match page.stats.scoring {
                Scoring::Light => "light".to_owned(),
                Scoring::Model => "model".to_owned(),
                Scoring::LightFallback(r) => format!("fallback_{}", r.as_str()),
            };
            self.feed_scoring.with_label_values(&[label.as_str()]).inc();
        }
    }

    /// Records a model directory rescan.
    pub fn observe_reload(&self, report: &ReloadReport) {
        for (model, version) in &report.loaded {
            self.model_loads.with_label_values(&[model.as_str(), "loaded"]).inc();
            self.model_version.with_label_values(&[model.as_str()]).set(*version as i64);
        }
        for (model, _, _) in &report.refused {
            self.model_loads.with_label_values(&[model.as_str(), "refused"]).inc();
        }
        for model in &report.removed {
            let _ = self.model_version.remove_label_values(&[model.as_str()]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric names, which are constants.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Serves `GET /metrics` (and 404 for anything else) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics ") || request.starts_with("GET /metrics?") {
                let body = metrics.render();
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            let _ = stream.write_all(&response).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
