//! Prometheus metrics and the `/metrics` HTTP endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use feedgraph_cluster::{Replicas, Role};

use feedgraph_retrieval::{Broker, FeedPage, Scoring};
use feedgraph_scoring::ReloadReport;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    auth_rejected: IntCounterVec,
    tls_reloads: IntCounterVec,
    tls_handshake_failures: IntCounter,
    token_reloads: IntCounterVec,
    replicas: OnceLock<Arc<Replicas>>,
    replica: ReplicaMetrics,
    broker: OnceLock<Arc<Broker>>,
    load: LoadMetrics,
}

/// Admission, the ranking cache and the process's CPU time: read when `/metrics` is
/// scraped.
#[derive(Debug)]
struct LoadMetrics {
    in_progress: IntGauge,
    queued: IntGauge,
    shed: IntCounter,
    ranking_cache_entries: IntGauge,
    ranking_cache_bytes: IntGauge,
    cpu_seconds: prometheus::Counter,
}

impl LoadMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let shed = IntCounter::new(
            "feed_shed_total",
            "Feed requests shed by admission control (answered RESOURCE_EXHAUSTED at once)",
        )?;
        registry.register(Box::new(shed.clone()))?;
        let cpu_seconds = prometheus::Counter::new(
            "process_cpu_seconds_total",
            "CPU time of the whole process (user + system), seconds",
        )?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        Ok(Self {
            in_progress: gauge("feed_rankings_in_progress", "Rankings being computed now")?,
            queued: gauge("feed_rankings_queued", "Rankings waiting for an admission slot now")?,
            shed,
            ranking_cache_entries: gauge("ranking_cache_entries", "Rankings cached for later pages")?,
            ranking_cache_bytes: gauge(
                "ranking_cache_bytes",
                "Bytes of the rankings cached for later pages",
            )?,
            cpu_seconds,
        })
    }

    fn refresh(&self, broker: Option<&Broker>) {
        if let Some(broker) = broker {
            let a = broker.admission_stats();
            self.in_progress.set(a.in_progress as i64);
            self.queued.set(a.queued as i64);
            self.shed.inc_by(a.shed_total.saturating_sub(self.shed.get()));
            let (entries, bytes) = broker.ranking_cache_usage();
            self.ranking_cache_entries.set(entries as i64);
            self.ranking_cache_bytes.set(bytes as i64);
        }
        if let Some(cpu) = process_cpu_seconds() {
            self.cpu_seconds.inc_by((cpu - self.cpu_seconds.get()).max(0.0));
        }
    }
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (Linux; in
/// clock ticks of 1/100 s, the USER_HZ Linux reports to user space).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Replica state per shard, and the node's RocksDB memory: read from the replicas when
/// `/metrics` is scraped.
#[derive(Debug)]
struct ReplicaMetrics {
    role: IntGaugeVec,
    epoch: IntGaugeVec,
    applied_sequence: IntGaugeVec,
    lag_sequences: IntGaugeVec,
    lag_ms: IntGaugeVec,
    readable: IntGaugeVec,
    writes_stopped: IntGaugeVec,
    applied_bytes_per_second: GaugeVec,
    applied_bytes: IntCounterVec,
    wal_gaps: IntCounterVec,
    rebuilds: IntCounterVec,
    stale_epoch_refusals: IntCounterVec,
    checkpoint_resumes: IntCounterVec,
    semi_sync_timeouts: IntCounterVec,
    seen_periods_expired: IntCounterVec,
    seen_entries_trimmed: IntCounterVec,
    bitmap_cache_bytes: IntGaugeVec,
    follows_cache_bytes: IntGaugeVec,
    follows_cache_entries: IntGaugeVec,
    block_cache_bytes: IntGauge,
    block_cache_capacity: IntGauge,
    write_buffer_bytes: IntGauge,
    write_buffer_capacity: IntGauge,
}

impl ReplicaMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &["shard"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let plain = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let rate = GaugeVec::new(
            Opts::new(
                "replica_applied_bytes_per_second",
                "WAL bytes applied per second over the last second",
            ),
            &["shard"],
        )?;
        registry.register(Box::new(rate.clone()))?;
        Ok(Self {
            role: gauge("replica_role", "Replica role: 0 offline, 1 follower, 2 leader")?,
            epoch: gauge("replica_epoch", "Newest epoch the replica accepted")?,
            applied_sequence: gauge(
                "replica_applied_sequence",
                "Last sequence number applied (committed, on a leader)",
            )?,
            lag_sequences: gauge(
                "replica_lag_sequences",
                "Follower: sequences behind the leader's latest as last seen",
            )?,
            lag_ms: gauge(
                "replica_lag_ms",
                "Follower: ms since the leader committed the newest batch applied (0 when caught up)",
            )?,
            readable: gauge("replica_readable", "1 when the replica serves reads")?,
            writes_stopped: gauge(
                "replica_writes_stopped",
                "1 when the replica's store failed (no space, I/O error, corruption) and takes no writes",
            )?,
            applied_bytes_per_second: rate,
            applied_bytes: counter("replica_applied_bytes_total", "WAL bytes applied by the follower")?,
            wal_gaps: counter(
                "replica_wal_gaps_total",
                "Times the follower's position had left the leader's WAL",
            )?,
            rebuilds: counter("replica_rebuilds_total", "Checkpoints installed (bootstraps and rebuilds)")?,
            stale_epoch_refusals: counter(
                "replica_stale_epoch_refusals_total",
                "Leaders at an older epoch refused",
            )?,
            checkpoint_resumes: counter(
                "replica_checkpoint_resumes_total",
                "Checkpoint streams resumed after breaking",
            )?,
            semi_sync_timeouts: counter(
                "replica_semi_sync_timeouts_total",
                "Semi-sync writes no follower confirmed in time",
            )?,
            seen_periods_expired: counter(
                "store_seen_periods_expired_total",
                "Viewer impression periods deleted by this leader as they left the seen window",
            )?,
            seen_entries_trimmed: counter(
                "store_seen_entries_trimmed_total",
                "Impressions this leader dropped because a viewer held more than store.seen_max_entries",
            )?,
            bitmap_cache_bytes: gauge(
                "store_bitmap_cache_bytes",
                "Weight of decoded bitmaps cached (bounded by store.bitmap_cache_mb)",
            )?,
            follows_cache_bytes: gauge(
                "store_follows_cache_bytes",
                "Weight of follow lists cached (bounded by store.follows_cache_mb)",
            )?,
            follows_cache_entries: gauge("store_follows_cache_entries", "Follow lists cached")?,
            block_cache_bytes: plain("store_block_cache_bytes", "Bytes in the node's RocksDB block cache")?,
            block_cache_capacity: plain(
                "store_block_cache_capacity_bytes",
                "Capacity of the node's RocksDB block cache",
            )?,
            write_buffer_bytes: plain("store_write_buffer_bytes", "Bytes in all memtables of the node")?,
            write_buffer_capacity: plain(
                "store_write_buffer_capacity_bytes",
                "Cap on all memtables of the node",
            )?,
        })
    }

    fn refresh(&self, replicas: &Replicas) {
        let set_counter = |c: &IntCounterVec, shard: &str, v: u64| {
            let c = c.with_label_values(&[shard]);
            c.inc_by(v.saturating_sub(c.get()));
        };
        for s in replicas.status() {
            let shard = s.shard.to_string();
            let shard = shard.as_str();
            let role = match s.role {
                Role::Offline => 0,
                Role::Follower { .. } => 1,
                Role::Leader { .. } => 2,
            };
            self.role.with_label_values(&[shard]).set(role);
            self.epoch.with_label_values(&[shard]).set(s.epoch as i64);
            self.applied_sequence.with_label_values(&[shard]).set(s.applied_sequence as i64);
            self.lag_sequences.with_label_values(&[shard]).set(s.lag_sequences as i64);
            self.lag_ms.with_label_values(&[shard]).set(s.lag_ms as i64);
            self.readable.with_label_values(&[shard]).set(i64::from(s.readable));
            self.writes_stopped.with_label_values(&[shard]).set(i64::from(s.fault.is_some()));
            self.applied_bytes_per_second.with_label_values(&[shard]).set(s.applied_bytes_per_sec);
            set_counter(&self.applied_bytes, shard, s.applied_bytes_total);
            set_counter(&self.wal_gaps, shard, s.wal_gaps);
            set_counter(&self.rebuilds, shard, s.rebuilds);
            set_counter(&self.stale_epoch_refusals, shard, s.stale_epoch_refusals);
            set_counter(&self.checkpoint_resumes, shard, s.checkpoint_resumes);
            set_counter(&self.semi_sync_timeouts, shard, s.semi_sync_timeouts);
        }
        for r in replicas.all() {
            if let Some(store) = r.store() {
                let (shard, seen) = (store.id().to_string(), store.seen_stats());
                set_counter(&self.seen_periods_expired, &shard, seen.periods_expired);
                set_counter(&self.seen_entries_trimmed, &shard, seen.entries_trimmed);
                let cache = store.cache_usage();
                self.bitmap_cache_bytes.with_label_values(&[&shard]).set(cache.bitmap_bytes as i64);
                self.follows_cache_bytes.with_label_values(&[&shard]).set(cache.follows_bytes as i64);
                self.follows_cache_entries.with_label_values(&[&shard]).set(cache.follows_entries as i64);
            }
        }
        let m = replicas.memory();
        self.block_cache_bytes.set(m.block_cache_usage() as i64);
        self.block_cache_capacity.set(m.block_cache_capacity() as i64);
        self.write_buffer_bytes.set(m.write_buffer_usage() as i64);
        self.write_buffer_capacity.set(m.write_buffer_capacity() as i64);
    }
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
        let auth_rejected = IntCounterVec::new(
            Opts::new(
                "auth_rejected_total",
                "Requests refused before any work: code unauthenticated (no or unknown token) or permission_denied (a token of a lower role), by the role the method needs",
            ),
            &["code", "needs"],
        )?;
        registry.register(Box::new(auth_rejected.clone()))?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "tls_certificate_reloads_total",
                "Changed TLS certificate files: loaded (now served) or refused (the previous pair stays)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(tls_reloads.clone()))?;
        let tls_handshake_failures = IntCounter::new(
            "tls_handshake_failures_total",
            "TLS handshakes that failed or timed out (a plaintext client, an untrusted certificate, a missing client certificate)",
        )?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        let token_reloads = IntCounterVec::new(
            Opts::new(
                "auth_token_reloads_total",
                "Changed token files: loaded (now in force) or refused (the tokens in force stay)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(token_reloads.clone()))?;
        registry.register(Box::new(feed_scoring.clone()))?;
        registry.register(Box::new(model_loads.clone()))?;
        registry.register(Box::new(model_version.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(feed_partial.clone()))?;
        registry.register(Box::new(feed_scanned.clone()))?;
        let replica = ReplicaMetrics::new(&registry)?;
        let load = LoadMetrics::new(&registry)?;
        Ok(Self {
            registry,
            requests,
            latency,
            feed_partial,
            feed_scanned,
            feed_scoring,
            model_loads,
            model_version,
            auth_rejected,
            tls_reloads,
            tls_handshake_failures,
            token_reloads,
            replicas: OnceLock::new(),
            replica,
            broker: OnceLock::new(),
            load,
        })
    }

    /// Reports this broker's admission and cache state (read at every scrape).
    pub fn watch_broker(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// Reports these replicas' state (read at every scrape).
    pub fn watch_replicas(&self, replicas: Arc<Replicas>) {
        let _ = self.replicas.set(replicas);
    }

    /// A request the authentication layer refused (`code`: `unauthenticated` or
    /// `permission_denied`; `needs`: the role its method needs).
    pub fn auth_rejected(&self, code: &str, needs: &str) {
        self.auth_rejected.with_label_values(&[code, needs]).inc();
    }

    /// Changed certificate files, `loaded` or `refused`.
    pub fn tls_reload(&self, result: &str) {
        self.tls_reloads.with_label_values(&[result]).inc();
    }

    /// Changed token files, `loaded` or `refused`.
    pub fn token_reload(&self, result: &str) {
        self.token_reloads.with_label_values(&[result]).inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
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
        if let Some(replicas) = self.replicas.get() {
            self.replica.refresh(replicas);
        }
        self.load.refresh(self.broker.get().map(|b| b.as_ref()));
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
