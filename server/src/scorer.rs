//! The ML scorer over gRPC: the `ScorerService` adapter (served standalone by
//! `feedgraph scorer`, or beside the feeds in `feedgraph serve`), the client the broker
//! uses for a remote scorer, and the loop that reloads the model directory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use feedgraph_proto::pb::internal as ipb;
use feedgraph_scoring::{self as scoring, BoxFuture, LocalScorer, Registry, ScoreBatch, Scorer, Scores};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::{Error, io};

/// Maps a scoring error to the status a client can act on.
pub fn scoring_status(e: scoring::Error) -> Status {
    use scoring::Error as E;
    match e {
        E::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        E::BatchTooLarge { .. } => Status::resource_exhausted(e.to_string()),
        E::UnknownModel(_) => Status::not_found(e.to_string()),
        E::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
        E::Unavailable(_) => Status::unavailable(e.to_string()),
        E::InvalidModel { .. } | E::Internal(_) => {
            tracing::error!(error = %e, "scoring failed");
            Status::internal(e.to_string())
        }
    }
}

fn from_proto(r: ipb::ScoreBatchRequest) -> ScoreBatch {
    ScoreBatch {
        model: r.model,
        user_features: r.user_features.into_iter().collect(),
        feature_names: r.feature_names,
        item_ids: r.item_ids,
        values: r.values,
    }
}

pub fn to_proto(b: ScoreBatch) -> ipb::ScoreBatchRequest {
    ipb::ScoreBatchRequest {
        model: b.model,
        user_features: b.user_features.into_iter().collect(),
        feature_names: b.feature_names,
        item_ids: b.item_ids,
        values: b.values,
    }
}

/// `feedgraph.internal.v1.ScorerService` over a local registry.
#[derive(Debug, Clone)]
pub struct ScorerApi {
    pub scorer: LocalScorer,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl ipb::scorer_service_server::ScorerService for ScorerApi {
    async fn score_batch(
        &self,
        request: Request<ipb::ScoreBatchRequest>,
    ) -> Result<Response<ipb::ScoreBatchResponse>, Status> {
        self.metrics
            .observed("ScoreBatch", async {
                let batch = from_proto(request.into_inner());
                let Scores { scores, model, version } =
                    self.scorer.score(batch).await.map_err(scoring_status)?;
                Ok(ipb::ScoreBatchResponse { scores, model, model_version: version.to_string() })
            })
            .await
    }

    async fn list_models(
        &self,
        _request: Request<ipb::ListModelsRequest>,
    ) -> Result<Response<ipb::ListModelsResponse>, Status> {
        self.metrics
            .observed("ListModels", async {
                let models = self
                    .scorer
                    .registry()
                    .list()
                    .into_iter()
                    .map(|m| ipb::ModelInfo {
                        name: m.name,
                        version: m.version.to_string(),
                        kind: m.kind.as_str().to_string(),
                        feature_names: m.feature_names,
                    })
                    .collect();
                Ok(ipb::ListModelsResponse { models })
            })
            .await
    }
}

/// A scorer in another process, reached over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteScorer {
    client: ipb::scorer_service_client::ScorerServiceClient<feedgraph_proto::auth::AuthChannel>,
}

impl RemoteScorer {
    /// Connects lazily: an unreachable scorer fails requests (and feeds fall back to
    /// light scores), it does not stop the node from starting.
    /// Every request carries `credentials` (the node's admin token and TLS settings,
    /// when it has them).
    pub fn new(endpoint: &str, credentials: &feedgraph_proto::auth::Credentials) -> Result<Self, Error> {
        let channel = credentials
            .endpoint(endpoint)
            .map_err(|e| Error::Scorer(format!("scorer endpoint: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONNECTION_WINDOW)
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        let channel = credentials.authorize(channel);
        Ok(Self { client: ipb::scorer_service_client::ScorerServiceClient::new(channel) })
    }
}

impl Scorer for RemoteScorer {
    fn score(&self, batch: ScoreBatch) -> BoxFuture<'_, scoring::Result<Scores>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let r = client.score_batch(to_proto(batch)).await.map_err(|s| {
                use tonic::Code;
                let msg = s.message().to_string();
                match s.code() {
                    Code::InvalidArgument | Code::ResourceExhausted => {
                        scoring::Error::InvalidArgument { item: None, feature: None, reason: msg }
                    }
                    Code::NotFound => scoring::Error::UnknownModel(msg),
                    Code::DeadlineExceeded | Code::Cancelled => {
                        scoring::Error::DeadlineExceeded(Duration::ZERO)
                    }
                    _ => scoring::Error::Unavailable(format!("{:?}: {msg}", s.code())),
                }
            })?;
            let r = r.into_inner();
            let version = r.model_version.parse().map_err(|_| {
                scoring::Error::Unavailable(format!("scorer sent version `{}`", r.model_version))
            })?;
            Ok(Scores { scores: r.scores, model: r.model, version })
        })
    }
}

/// Opens a model directory, logging and counting what loaded and what was refused.
/// Blocking.
pub fn open_registry(dir: &std::path::Path, metrics: &Metrics) -> Result<Arc<Registry>, Error> {
    let (registry, report) = Registry::open(dir).map_err(|e| Error::Scorer(e.to_string()))?;
    log_reload(&report, metrics);
    Ok(registry)
}

fn log_reload(report: &scoring::ReloadReport, metrics: &Metrics) {
    for (model, version) in &report.loaded {
        tracing::info!(%model, version, "model version loaded");
    }
    for (model, version, why) in &report.refused {
        tracing::error!(%model, version, error = %why, "model version refused; the previous version keeps serving");
    }
    for model in &report.removed {
        tracing::info!(%model, "model removed (its directory is gone)");
    }
    metrics.observe_reload(report);
}

/// Rescans the registry's directory every `interval` until `stop` fires.
pub fn spawn_reloader(
    registry: Arc<Registry>,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let registry = registry.clone();
            match tokio::task::spawn_blocking(move || registry.reload()).await {
                Ok(Ok(report)) => log_reload(&report, &metrics),
                Ok(Err(e)) => tracing::warn!(error = %e, "model directory rescan failed"),
                Err(e) => tracing::warn!(error = %e, "model directory rescan task failed"),
            }
        }
    })
}

/// A running standalone scorer.
#[derive(Debug)]
pub struct ScorerNode {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    registry: Arc<Registry>,
    serving: crate::Serving,
}

impl ScorerNode {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Stops accepting, lets in-flight requests finish, and stops.
    pub async fn shutdown(self) -> Result<(), Error> {
        self.serving.stop().await
    }
}

/// What a gRPC server needs to offer the scorer service: the service, its health
/// entry, and the reload loop's stop handle.
pub(crate) struct Embedded {
    pub service: ipb::scorer_service_server::ScorerServiceServer<ScorerApi>,
    pub stop: oneshot::Sender<()>,
    pub reloader: JoinHandle<()>,
    pub registry: Arc<Registry>,
}

/// Opens the model directory and starts its reload loop.
pub(crate) async fn embed(
    dir: std::path::PathBuf,
    max_batch: usize,
    reload_interval: Duration,
    metrics: Arc<Metrics>,
) -> Result<Embedded, Error> {
    let m = metrics.clone();
    let registry = tokio::task::spawn_blocking(move || open_registry(&dir, &m))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let (stop, stopped) = oneshot::channel();
    let reloader = spawn_reloader(registry.clone(), reload_interval, metrics.clone(), stopped);
    let api = ScorerApi { scorer: LocalScorer::new(registry.clone(), max_batch), metrics };
    let service =
        ipb::scorer_service_server::ScorerServiceServer::new(api).max_decoding_message_size(16 << 20);
    Ok(Embedded { service, stop, reloader, registry })
}

/// Serves a model directory over gRPC (with health, reflection and metrics).
pub async fn start_scorer(config: crate::config::ScorerServerConfig) -> Result<ScorerNode, Error> {
    config.validate()?;
    let metrics = Arc::new(Metrics::new()?);
    let embedded = embed(
        config.model_dir.clone(),
        config.max_batch,
        Duration::from_millis(config.reload_interval_ms),
        metrics.clone(),
    )
    .await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ipb::scorer_service_server::ScorerServiceServer<ScorerApi>>().await;
    let reflection = crate::reflection()?;
    let incoming = crate::bind(config.listen)?;
    let grpc_addr = incoming.local_addr().map_err(io("gRPC listener address"))?;
    let metrics_listener = crate::metrics::bind(config.metrics_listen)
        .await
        .map_err(io(format!("binding metrics on {}", config.metrics_listen)))?;
    let metrics_addr = metrics_listener.local_addr().map_err(io("metrics listener address"))?;
    let cfg = config.clone();
    let (keyring, tls) = tokio::task::spawn_blocking(move || {
        Ok::<_, Error>((cfg.auth.keyring()?, crate::tls::ServerTls::load(&cfg.tls)?))
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    if !keyring.enabled() {
        tracing::warn!("no tokens configured: scoring is open to whoever reaches {grpc_addr}");
    }
    let tokens = crate::auth::Tokens::new(keyring, config.auth.clone());
    let router = crate::server_builder(crate::auth::AuthLayer::new(tokens.clone(), metrics.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(embedded.service);
    let mut serving = crate::spawn_server(router, incoming, tls, &tokens, &metrics);
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    let metrics_task = tokio::spawn(crate::metrics::serve(metrics_listener, metrics, async {
        let _ = metrics_stopped.await;
    }));
    let models: HashMap<String, u64> =
        embedded.registry.list().into_iter().map(|m| (m.name, m.version)).collect();
    tracing::info!(%grpc_addr, %metrics_addr, ?models, "feedgraph scorer serving");
    Ok(ScorerNode {
        grpc_addr,
        metrics_addr,
        registry: embedded.registry,
        serving: {
            serving.stops.extend([stop_metrics, embedded.stop]);
            serving.tasks.extend([metrics_task, embedded.reloader]);
            serving
        },
    })
}

/// Serves the scorer until `shutdown` resolves, then stops gracefully.
pub async fn run_scorer(
    config: crate::config::ScorerServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let node = start_scorer(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    node.shutdown().await
}
