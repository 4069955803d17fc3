//! The `feedgraph` service: a node holding shard replicas (all of them as standalone
//! leaders by default, or those a placement gives it), the broker over local and
//! remote shards, light scoring, served over gRPC; and the ML scorer, embedded or
//! standalone (`feedgraph scorer`).
//!
//! Owns: configuration ([`config`]: TOML file → env → CLI, validated at start-up), the
//! wiring of replicas, directory and broker into [`start`] / [`run`], the thin gRPC
//! adapters ([`service`]: proto ↔ domain, errors ↔ `tonic::Status` in one exhaustive
//! mapping; [`shard_service`]: the shard data plane for other nodes' brokers), the
//! remote shard client ([`remote`]) and the node's shard directory ([`routing`]), the
//! internal wire conversions ([`wire`]), gRPC health and reflection, Prometheus metrics
//! ([`metrics`]), the scorer service, its client and the model reload loop
//! ([`scorer`]), authentication by role in front of every gRPC route ([`auth`]), TLS
//! on the gRPC port with certificate reload ([`tls`]), the sweep of expired
//! impressions ([`seen_sweep`]), and the demo graph and models
//! ([`demo`]). `main.rs` only parses the
//! command line and calls into this crate, so tests start real nodes in-process
//! through the same [`start`].
//!
//! Invariants: the async executor never blocks — shards are opened, written and
//! queried on the blocking pool; a data directory keeps the shard count it was created
//! with; cursors are signed with a key stored in the data directory, so they survive
//! restarts (every node of a cluster needs the same key for cursors to move between
//! brokers).

pub mod auth;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod reload;
pub mod remote;
pub mod routing;
pub mod scorer;
pub mod seen_sweep;
pub mod service;
pub mod shard_service;
pub mod tls;
pub mod wire;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use feedgraph_cluster::manager::{self, Member, MemberConfig};
use feedgraph_cluster::{NodeSetup, Placement, Replicas};
use feedgraph_graph_store::Shard;
use feedgraph_proto::pb;
use feedgraph_retrieval::Broker;
use feedgraph_scoring::LocalScorer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{ClusterSettings, Config, ConfigError, ScorerConfig, ScorerServerConfig};

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("shard store: {0}")]
    Store(#[from] feedgraph_graph_store::Error),
    #[error("broker: {0}")]
    Broker(#[from] feedgraph_retrieval::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("data directory: {0}")]
    DataDir(String),
    #[error("grpc: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("task failed: {0}")]
    Task(String),
    #[error("scorer: {0}")]
    Scorer(String),
    #[error("replicas: {0}")]
    Cluster(#[from] feedgraph_cluster::Error),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

const SHARD_COUNT_FILE: &str = "SHARDS";
const CURSOR_KEY_FILE: &str = "cursor.key";

/// Creates the data directory if needed and checks that it was made with the
/// configured shard count (placement depends on it). Blocking.
fn check_data_dir(config: &Config) -> Result<(), Error> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let count_file = dir.join(SHARD_COUNT_FILE);
    match std::fs::read_to_string(&count_file) {
        Ok(text) => {
            let stored: u32 = text
                .trim()
                .parse()
                .map_err(|_| Error::DataDir(format!("{} is not a shard count", count_file.display())))?;
            if stored != config.shards {
                return Err(Error::DataDir(format!(
                    "{} holds {stored} shards but the configuration says {}; shard placement depends on the count",
                    dir.display(),
                    config.shards
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&count_file, format!("{}\n", config.shards))
                .map_err(io(format!("writing {}", count_file.display())))?;
        }
        Err(e) => return Err(io(format!("reading {}", count_file.display()))(e)),
    }
    Ok(())
}

/// Opens (creating if needed) every shard of the data directory as a standalone
/// leader, sharing one RocksDB memory budget, after checking that the directory was
/// made with the configured shard count. Blocking.
pub fn open_shards(config: &Config) -> Result<Vec<Arc<Shard>>, Error> {
    let (shards, unopened) = open_shards_serving(config, false)?;
    debug_assert!(unopened.is_empty());
    Ok(shards)
}

/// Shards whose stores did not open, with why.
type Unopened = Vec<(u32, String)>;

/// [`open_shards`] for serving: with `lenient`, a shard whose store fails to open
/// because its data is corrupted is logged and returned with the reason instead, so the node can serve the others; it fails if no
/// shard opens (another process holding every store's lock, say).
fn open_shards_serving(config: &Config, lenient: bool) -> Result<(Vec<Arc<Shard>>, Unopened), Error> {
    check_data_dir(config)?;
    let memory = config.store_memory();
    let started = std::time::Instant::now();
    let (mut shards, mut unopened) = (Vec::new(), Vec::new());
    let mut first_error = None;
    for i in 0..config.shards {
        let path = config.data_dir.join(format!("shard-{i:03}"));
        match Shard::open(&path, &config.shard_options(i, &memory)) {
            Ok(s) => shards.push(Arc::new(s)),
            Err(e) if lenient && e.is_corruption() => {
                tracing::error!(shard = i, path = %path.display(), error = %e, "the shard's store did not open; serving the other shards without it");
                unopened.push((i, e.to_string()));
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if shards.is_empty()
        && let Some(e) = first_error
    {
        return Err(e.into());
    }
    let pins: u64 = shards.iter().map(|s| u64::from(s.next_ordinal())).sum();
    tracing::info!(
        shards = shards.len(),
        pins,
        seconds = started.elapsed().as_secs_f64(),
        "shards opened (attribute rows rebuilt)"
    );
    Ok((shards, unopened))
}

/// The key cursors are signed with: read from the data directory, created on first use.
fn cursor_key(dir: &Path) -> Result<[u8; 32], Error> {
    let path = dir.join(CURSOR_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| {
            Error::DataDir(format!("{} must hold 32 bytes; delete it to make a new key", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            std::fs::write(&path, key).map_err(io(format!("writing {}", path.display())))?;
            Ok(key)
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Task(e.to_string()))?
}

/// A running node. Dropping it without [`Node::shutdown`] leaves the servers running
/// until the runtime stops.
#[derive(Debug)]
pub struct Node {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    broker: Arc<Broker>,
    replicas: Arc<Replicas>,
    directory: Arc<routing::ClusterDirectory>,
    scorer_registry: Option<Arc<feedgraph_scoring::Registry>>,
    /// Membership of an etcd cluster, when the node joined one.
    member: Option<Member>,
    serving: Serving,
}

/// A gRPC server and the tasks that live with it (metrics, model reload), stopped
/// together.
#[derive(Debug)]
pub(crate) struct Serving {
    pub stops: Vec<oneshot::Sender<()>>,
    pub server: JoinHandle<Result<(), tonic::transport::Error>>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Serving {
    /// Runs a [`reload`] loop until the server stops.
    fn reload(
        &mut self,
        what: &'static str,
        interval: std::time::Duration,
        check: impl Fn() -> reload::Reload + Send + Sync + 'static,
        count: impl Fn(&str) + Send + 'static,
    ) {
        let (stop, stopped) = oneshot::channel::<()>();
        self.tasks.push(reload::spawn(what, interval, check, count, stopped));
        self.stops.push(stop);
    }

    /// Signals every stop, lets the server finish its in-flight requests, then waits
    /// for the tasks.
    pub async fn stop(self) -> Result<(), Error> {
        for s in self.stops {
            let _ = s.send(());
        }
        let served = self.server.await.map_err(|e| Error::Task(e.to_string()))?;
        for t in self.tasks {
            let _ = t.await;
        }
        Ok(served?)
    }
}

impl Node {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The node's broker, for in-process use (benchmarks, embedding).
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The replicas this node holds, for in-process use (tests, benchmarks).
    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// The node's view of where every shard's replicas are.
    pub fn directory(&self) -> &Arc<routing::ClusterDirectory> {
        &self.directory
    }

    /// The node's membership of an etcd cluster (`cluster.etcd`).
    pub fn member(&self) -> Option<&Member> {
        self.member.as_ref()
    }

    /// The in-process model registry, when this node serves `scorer.model_dir`.
    pub fn scorer_registry(&self) -> Option<&Arc<feedgraph_scoring::Registry>> {
        self.scorer_registry.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish, stops replication, and waits
    /// (bounded) until nothing else holds the node's stores, so that a restart on the
    /// same directory can open them.
    pub async fn shutdown(self) -> Result<(), Error> {
        let Node { broker, replicas, directory, serving, member, .. } = self;
        // Leave the cluster first: the lease is revoked, so the controller moves this
        // node's leaderships at once instead of after the lease would have expired.
        if let Some(m) = member {
            m.stop().await;
        }
        // Replication first: it ends the followers' long polls this node serves, which
        // the server would otherwise wait for while draining.
        replicas.shutdown().await;
        let served = serving.stop().await;
        // Work still finishing on the blocking pool (a shard lane past its deadline)
        // holds stores and so their RocksDB locks.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (Arc::strong_count(&broker) > 1 || !broker.shards_idle() || Arc::strong_count(&replicas) > 2)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop((broker, directory));
        served
    }
}

/// Opens the node's replicas (every shard standalone, or the placement's), then serves
/// gRPC (with health and reflection) and metrics.
pub async fn start(config: Config) -> Result<Node, Error> {
    config.validate()?;
    if config.cluster.etcd.is_some() {
        return start_clustered(config).await;
    }
    match &config.placement {
        None => {
            let cfg = config.clone();
            let (shards, unopened) = blocking(move || open_shards_serving(&cfg, true)).await?;
            start_standalone(config, shards, unopened).await
        }
        Some(path) => {
            let placement = Placement::from_file(path)?;
            start_placed(config, placement).await
        }
    }
}

/// The gRPC listener (served plain or with TLS by [`spawn_server`]).
pub(crate) fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    let what = || format!("binding gRPC on {addr}");
    let listener = std::net::TcpListener::bind(addr).map_err(io(what()))?;
    listener.set_nonblocking(true).map_err(io(what()))?;
    tokio::net::TcpListener::from_std(listener).map_err(io(what()))
}

/// The node's security: the tokens it accepts, its server TLS, and what its own calls
/// to other nodes and a scorer present. Blocking (reads token and certificate files).
struct Security {
    keyring: auth::Keyring,
    tls: Option<Arc<tls::ServerTls>>,
    credentials: feedgraph_proto::auth::Credentials,
}

impl Security {
    fn load(config: &Config) -> Result<Self, Error> {
        let keyring = config.auth.keyring()?;
        let credentials =
            feedgraph_proto::auth::Credentials::new(keyring.node_bearer(), tls::client_config(&config.tls)?);
        Ok(Self { keyring, tls: tls::ServerTls::load(&config.tls)?, credentials })
    }
}

/// The router every listener of this crate serves (see [`server_builder`]).
pub(crate) type AuthRouter =
    tonic::transport::server::Router<tower_layer::Stack<auth::AuthLayer, tower_layer::Identity>>;

/// Serves `router` on `listener`, plain or with `tls` (handshakes off the accept
/// loop), and reloads the token files and the certificate while it serves.
pub(crate) fn spawn_server(
    router: AuthRouter,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<tls::ServerTls>>,
    tokens: &Arc<auth::Tokens>,
    metrics: &Arc<metrics::Metrics>,
) -> Serving {
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
    };
    let server = match &tls {
        // tonic ignores the builder's nodelay with a custom incoming: set it here.
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        Some(tls) => {
            tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener, metrics.clone()), signal))
        }
    };
    let mut serving = Serving { stops: vec![stop], server, tasks: Vec::new() };
    if let Some(interval) = tokens.reload_interval() {
        let (t, m) = (tokens.clone(), metrics.clone());
        serving.reload("token files", interval, move || t.reload(), move |r| m.token_reload(r));
    }
    if let Some(tls) = tls {
        let (interval, m) = (tls.reload_interval(), metrics.clone());
        serving.reload(
            "TLS certificate",
            interval,
            move || tls.reload_if_changed(),
            move |r| m.tls_reload(r),
        );
    }
    serving
}

fn node_setup(
    config: &Config,
    address: String,
    memory: feedgraph_graph_store::StoreMemory,
    security: &Security,
) -> NodeSetup {
    let (cfg, mem) = (config.clone(), memory.clone());
    NodeSetup {
        node_id: config.node_id.clone(),
        address,
        shard_count: config.shards,
        data_dir: config.data_dir.clone(),
        options: Arc::new(move |shard| cfg.shard_options(shard, &mem)),
        memory,
        replication: config.replication_config(security.credentials.clone()),
    }
}

/// Serves already opened shards (see [`open_shards`]) as a standalone node: every
/// shard a local leader at its epoch (unless a replica remembers another role).
pub async fn start_with(config: Config, shards: Vec<Arc<Shard>>) -> Result<Node, Error> {
    start_standalone(config, shards, Vec::new()).await
}

/// [`start_with`], holding the shards in `unopened` offline (with why their stores did
/// not open).
async fn start_standalone(
    config: Config,
    shards: Vec<Arc<Shard>>,
    unopened: Vec<(u32, String)>,
) -> Result<Node, Error> {
    config.validate()?;
    let incoming = bind(config.listen)?;
    let grpc_addr = incoming.local_addr().map_err(io("gRPC listener address"))?;
    let memory = shards.first().map_or_else(|| config.store_memory(), |s| s.memory().clone());
    let cfg = config.clone();
    let security = blocking(move || Security::load(&cfg)).await?;
    let replicas =
        Replicas::standalone(node_setup(&config, grpc_addr.to_string(), memory, &security), shards, unopened)
            .await?;
    serve(config, security, replicas, Mode::Standalone, incoming).await
}

/// A node of an etcd cluster: it opens the replicas it remembers (leaders offline
/// until the controller says otherwise), serves, then joins.
async fn start_clustered(config: Config) -> Result<Node, Error> {
    let cfg = config.clone();
    blocking(move || check_data_dir(&cfg)).await?;
    let incoming = bind(config.listen)?;
    let grpc_addr = incoming.local_addr().map_err(io("gRPC listener address"))?;
    let address = config.cluster.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());
    let cfg = config.clone();
    let security = blocking(move || Security::load(&cfg)).await?;
    let replicas =
        Replicas::remembered(node_setup(&config, address, config.store_memory(), &security)).await?;
    serve(config, security, replicas, Mode::Cluster, incoming).await
}

/// Where a node's replicas come from.
enum Mode {
    Standalone,
    Placed(Placement),
    Cluster,
}

/// A node of a placement: it holds the replicas the placement gives it.
async fn start_placed(config: Config, placement: Placement) -> Result<Node, Error> {
    let cfg = config.clone();
    blocking(move || check_data_dir(&cfg)).await?;
    let incoming = bind(config.listen)?;
    let address = placement
        .address(&config.node_id)
        .ok_or_else(|| Error::DataDir(format!("node `{}` is not in the placement", config.node_id)))?
        .to_owned();
    let cfg = config.clone();
    let security = blocking(move || Security::load(&cfg)).await?;
    let replicas =
        Replicas::placed(node_setup(&config, address, config.store_memory(), &security), &placement).await?;
    tracing::info!(node = %config.node_id, replicas = ?replicas.shard_ids(), "replicas placed");
    serve(config, security, replicas, Mode::Placed(placement), incoming).await
}

async fn serve(
    config: Config,
    security: Security,
    replicas: Arc<Replicas>,
    mode: Mode,
    incoming: tokio::net::TcpListener,
) -> Result<Node, Error> {
    let Security { keyring, tls, credentials } = security;
    let placement = match &mode {
        Mode::Placed(p) => Some(p),
        Mode::Standalone | Mode::Cluster => None,
    };
    let broker_config = config.validate()?;
    let grpc_addr = incoming.local_addr().map_err(io("gRPC listener address"))?;
    let dir = config.data_dir.clone();
    let key = blocking(move || cursor_key(&dir)).await?;
    let metrics = Arc::new(metrics::Metrics::new()?);
    metrics.watch_replicas(replicas.clone());
    let r = &config.replication;
    let directory = Arc::new(routing::ClusterDirectory::new(
        replicas.clone(),
        placement,
        std::time::Duration::from_millis(r.remote_timeout_ms),
        std::time::Duration::from_millis(r.semi_sync_timeout_ms),
        credentials.clone(),
    ));
    let delays = broker_config.shard_delays.clone();
    let mut broker = Broker::with_directory(directory.clone(), broker_config, key)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let sc = &config.scorer;
    let embedded = match &sc.model_dir {
        Some(dir) => Some(
            scorer::embed(
                dir.clone(),
                sc.max_batch,
                std::time::Duration::from_millis(sc.reload_interval_ms),
                metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    if let Some(e) = &embedded {
        broker = broker.with_scorer(Arc::new(LocalScorer::new(e.registry.clone(), sc.max_batch)));
        health
            .set_serving::<pb::internal::scorer_service_server::ScorerServiceServer<scorer::ScorerApi>>()
            .await;
    } else if let Some(endpoint) = &sc.endpoint {
        // A scorer token of its own, if configured, instead of the node's admin token.
        let scorer_credentials = match sc.token()? {
            Some(bearer) => feedgraph_proto::auth::Credentials::new(bearer, credentials.tls.clone()),
            None => credentials.clone(),
        };
        broker = broker.with_scorer(Arc::new(scorer::RemoteScorer::new(endpoint, &scorer_credentials)?));
    }
    let broker = Arc::new(broker);
    metrics.watch_broker(broker.clone());
    use feedgraph_cluster::service::{AdminApi, ReplicationApi};
    use pb::internal::{
        admin_service_server::AdminServiceServer, replication_service_server::ReplicationServiceServer,
        shard_service_server::ShardServiceServer,
    };
    health.set_serving::<pb::v1::graph_service_server::GraphServiceServer<service::GraphApi>>().await;
    health.set_serving::<pb::v1::feed_service_server::FeedServiceServer<service::FeedApi>>().await;
    health.set_serving::<ShardServiceServer<shard_service::ShardApi>>().await;
    health.set_serving::<ReplicationServiceServer<ReplicationApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    let reflection = reflection()?;

    let metrics_listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(io(format!("binding metrics on {}", config.metrics_listen)))?;
    let metrics_addr = metrics_listener.local_addr().map_err(io("metrics listener address"))?;

    let graph = service::GraphApi { broker: broker.clone(), metrics: metrics.clone() };
    let feed = service::FeedApi { broker: broker.clone(), metrics: metrics.clone() };
    let shard = shard_service::ShardApi::new(replicas.clone(), metrics.clone(), delays);
    let max = feedgraph_cluster::net::MAX_MESSAGE_BYTES;
    let (scorer_service, scorer_registry, mut stops, mut tasks) = match embedded {
        Some(e) => (Some(e.service), Some(e.registry), vec![e.stop], vec![e.reloader]),
        None => (None, None, Vec::new(), Vec::new()),
    };
    if !keyring.enabled() {
        tracing::warn!(
            "no tokens configured: every RPC, writes and admin included, is open to whoever reaches {grpc_addr}"
        );
    }
    let tokens = auth::Tokens::new(keyring, config.auth.clone());
    let router = crate::server_builder(auth::AuthLayer::new(tokens.clone(), metrics.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::v1::graph_service_server::GraphServiceServer::new(graph))
        .add_service(pb::v1::feed_service_server::FeedServiceServer::new(feed))
        .add_service(ShardServiceServer::new(shard).max_decoding_message_size(max))
        .add_service(ReplicationServiceServer::new(ReplicationApi { replicas: replicas.clone() }))
        .add_service(AdminServiceServer::new(AdminApi { replicas: replicas.clone() }))
        .add_optional_service(scorer_service);
    let mut serving = spawn_server(router, incoming, tls, &tokens, &metrics);
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics, async {
        let _ = metrics_stopped.await;
    }));
    let (stop_refresh, refresh_stopped) = oneshot::channel::<()>();
    if let Some(t) =
        directory.spawn_refresh(std::time::Duration::from_millis(r.map_refresh_ms), refresh_stopped)
    {
        tasks.push(t);
    }
    tracing::info!(
        %grpc_addr,
        %metrics_addr,
        node = %config.node_id,
        shards = config.shards,
        replicas = replicas.shard_ids().len(),
        model = %config.scorer.model,
        "feedgraph serving"
    );
    let (stop_sweep, sweep_stopped) = oneshot::channel::<()>();
    tasks.push(seen_sweep::spawn(
        replicas.clone(),
        std::time::Duration::from_secs(config.store.seen_sweep_interval_s),
        sweep_stopped,
    ));
    stops.extend([stop_metrics, stop_refresh, stop_sweep]);
    tasks.push(metrics_task);
    serving.stops.extend(stops);
    serving.tasks.extend(tasks);
    // Joined once serving: the controller calls this node as soon as it registers.
    let member = match (&mode, &config.cluster.etcd) {
        (Mode::Cluster, Some(url)) => match join(&config, url, &replicas, &directory, credentials).await {
            Ok(m) => Some(m),
            Err(e) => {
                replicas.shutdown().await;
                let _ = serving.stop().await;
                return Err(e);
            }
        },
        _ => None,
    };
    Ok(Node { grpc_addr, metrics_addr, broker, replicas, directory, scorer_registry, member, serving })
}

async fn join(
    config: &Config,
    url: &str,
    replicas: &Arc<Replicas>,
    directory: &Arc<routing::ClusterDirectory>,
    credentials: feedgraph_proto::auth::Credentials,
) -> Result<Member, Error> {
    let c = &config.cluster;
    let member_config = MemberConfig {
        endpoints: manager::parse_endpoints(url)?,
        cluster_name: c.name.clone(),
        node_id: config.node_id.clone(),
        address: replicas.address().to_owned(),
        spec: manager::ClusterSpec { shards: config.shards, replicas: c.replicas },
        lease_ttl: std::time::Duration::from_millis(c.lease_ttl_ms),
        controller: manager::ControllerConfig {
            replace_after: std::time::Duration::from_millis(c.replace_after_ms),
            max_bootstraps_per_node: c.max_bootstraps_per_node,
            credentials,
            ..manager::ControllerConfig::default()
        },
        etcd_credentials: c.etcd_credentials()?,
    };
    if member_config.etcd_credentials.is_none() {
        tracing::warn!(
            etcd = url,
            "etcd is reached without authentication: anyone who reaches it can rewrite the shard map (set cluster.etcd_user)"
        );
    }
    let d = directory.clone();
    let member =
        Member::join(member_config, replicas.clone(), Arc::new(move |view| d.apply_view(view))).await?;
    tracing::info!(node = %config.node_id, cluster = %c.name, "joined the etcd cluster");
    Ok(member)
}

/// HTTP/2 flow-control windows. The default 64 KiB stream window is smaller than one
/// 1,000-item `ScoreBatch` (~70 KB), which then needs a window update mid-message;
/// sized so that it never does (no change measurable on loopback here, where the
/// update is cheap; it is a round trip between hosts).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// The gRPC server settings every listener of this crate uses, with `auth` in front of
/// every route.
pub(crate) fn server_builder(
    auth: auth::AuthLayer,
) -> tonic::transport::Server<tower_layer::Stack<auth::AuthLayer, tower_layer::Identity>> {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .layer(auth)
}

/// gRPC reflection over every service this crate serves.
pub(crate) fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(feedgraph_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Reflection(e.to_string()))
}

/// Serves until `shutdown` resolves, then stops gracefully.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let node = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    node.shutdown().await
}
