//! `feedgraph`: serve, or talk to a server (feeds and writes). Parses the command line
//! and configuration, then calls the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use feedgraph_proto::auth::{AuthChannel, Bearer, Credentials};
use feedgraph_proto::pb::v1 as pb;
use feedgraph_server::Config;

#[derive(Parser, Debug)]
#[command(name = "feedgraph", version, about = "Sharded graph service for home and following feeds")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service: local shards, broker and light scoring over gRPC.
    Serve(ServeArgs),
    /// Print a user's following (or home) feed from a running service.
    Feed(FeedArgs),
    /// Send a write to a running service.
    Write(WriteArgs),
    /// Run the standalone ML scorer: serve a model directory over gRPC.
    Scorer(ScorerArgs),
    /// Write the features the broker would send the ML scorer, for sampled users of a
    /// data directory (which no running service may hold), as CSV for training.
    ExportFeatures(ExportArgs),
    /// Bulk-load a graph file written by `feedgraph-load ingest --out` into a data
    /// directory (which no running service may hold).
    BulkLoad(BulkLoadArgs),
    /// Shard replicas of running nodes: status, role transitions, checkpoints.
    Shard(ShardArgs),
    /// An etcd-managed cluster: status (shards × nodes), drains.
    Cluster(ClusterArgs),
}

/// What a command presents to a service with tokens or TLS.
#[derive(Args, Debug)]
struct TokenArg {
    /// Bearer token: `read` for feeds, `write` for writes, `admin` for shard and
    /// cluster commands. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "FEEDGRAPH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// TLS: the CA (PEM) that signs the service's certificate; addresses without a
    /// scheme are then dialled with https.
    #[arg(long, env = "FEEDGRAPH_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate chain (PEM), with --tls-key.
    #[arg(long, env = "FEEDGRAPH_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: this client's private key (PEM).
    #[arg(long, env = "FEEDGRAPH_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TokenArg {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let bearer = Bearer::from_user(self.token.as_deref()).context("--token / FEEDGRAPH_TOKEN")?;
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        let tls = match &self.tls_ca {
            Some(ca) => Some(feedgraph_proto::auth::client_tls(ca, identity)?),
            None if identity.is_some() => bail!("--tls-cert needs --tls-ca"),
            None => None,
        };
        Ok(Credentials::new(bearer, tls))
    }
}

/// A lazily connected channel to `addr` with `credentials`.
fn client_channel(addr: &str, credentials: &Credentials) -> anyhow::Result<AuthChannel> {
    let channel = credentials
        .endpoint(addr)
        .with_context(|| format!("address {addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(credentials.authorize(channel))
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// The cluster's etcd, `etcd://host:port[,host:port]`.
    #[arg(long, env = "FEEDGRAPH_CLUSTER", default_value = "etcd://127.0.0.1:2379")]
    etcd: String,
    /// The cluster's name (its keys are under `/feedgraph/<name>/`).
    #[arg(long, env = "FEEDGRAPH_CLUSTER_NAME", default_value = "default")]
    name: String,
    /// The etcd user, if etcd has authentication on; the password comes from
    /// `--etcd-password-file` or `FEEDGRAPH_ETCD_PASSWORD`.
    #[arg(long, env = "FEEDGRAPH_ETCD_USER")]
    etcd_user: Option<String>,
    /// A file holding the etcd user's password (its first line).
    #[arg(long, env = "FEEDGRAPH_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    #[command(flatten)]
    token: TokenArg,
    #[command(subcommand)]
    what: ClusterCommand,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Shards × nodes: each replica's role, applied sequence and lag; the controller;
    /// live, dead and draining nodes.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Move every replica off NODE (leaderships first), before stopping it.
    Drain {
        node: String,
        /// Wait until the node holds no replica (bounded by --timeout-s).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// End a drain: NODE takes replicas again.
    Undrain { node: String },
}

#[derive(Args, Debug)]
struct ShardArgs {
    #[command(flatten)]
    token: TokenArg,
    #[command(subcommand)]
    what: ShardCommand,
}

#[derive(Subcommand, Debug)]
enum ShardCommand {
    /// Every replica of the nodes: role, epoch, applied sequence, leader, lag, bytes/s.
    Status {
        /// Node addresses (repeatable); with --placement, every node of it.
        #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878")]
        addr: Vec<String>,
        /// A placement file: ask each of its nodes.
        #[arg(long)]
        placement: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a node's replica of a shard to OFFLINE, FOLLOWER (of --leader) or LEADER,
    /// under an epoch (never older than one the replica accepted).
    Transition {
        /// The node.
        #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878")]
        addr: String,
        #[arg(long)]
        shard: u32,
        /// `leader`, `follower` or `offline`.
        #[arg(long)]
        role: String,
        #[arg(long, default_value_t = 0)]
        epoch: u64,
        /// For `follower`: the leader's host:port.
        #[arg(long)]
        leader: Option<String>,
    },
    /// Write a RocksDB checkpoint (a backup) of a shard under the node's <data_dir>/backups.
    Checkpoint {
        #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878")]
        addr: String,
        #[arg(long)]
        shard: u32,
        /// A name (no `/`) of a directory that does not exist yet, made under the
        /// node's `<data_dir>/backups`.
        #[arg(long)]
        dir: String,
    },
}

#[derive(Args, Debug)]
struct BulkLoadArgs {
    /// TOML configuration file of the service whose data directory is loaded.
    #[arg(long, env = "FEEDGRAPH_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "FEEDGRAPH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of shards (only when creating a data directory).
    #[arg(long, env = "FEEDGRAPH_SHARDS")]
    shards: Option<u32>,
    /// The file (length-delimited `feedgraph.v1.WriteRequest`s).
    #[arg(long)]
    file: PathBuf,
    /// Pins buffered before the shards' loads are committed (bounds memory).
    #[arg(long, default_value_t = 1_000_000)]
    flush_pins: usize,
}

#[derive(Args, Debug)]
struct ScorerArgs {
    /// TOML configuration file (fields it leaves out keep their defaults).
    #[arg(long, env = "FEEDGRAPH_SCORER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// gRPC listen address.
    #[arg(long, env = "FEEDGRAPH_SCORER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long, env = "FEEDGRAPH_SCORER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Model directory (`<dir>/<model>/<version>/`).
    #[arg(long, env = "FEEDGRAPH_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Most items accepted in one batch.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Log filter.
    #[arg(long, env = "FEEDGRAPH_LOG")]
    log: Option<String>,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// TOML configuration file of the service whose data directory is read.
    #[arg(long, env = "FEEDGRAPH_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "FEEDGRAPH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Load the demo graph first if the data directory does not have it.
    #[arg(long)]
    demo: bool,
    /// How many users to sample, spread evenly over ids `1..=max_user_id`.
    #[arg(long, default_value_t = 500)]
    users: u64,
    /// Highest user id to sample (the demo graph's users are 1..=10000).
    #[arg(long, default_value_t = 10_000)]
    max_user_id: u64,
    /// Rows kept per feed (drawn evenly from its ranked candidates).
    #[arg(long, default_value_t = 50)]
    rows_per_feed: usize,
    /// Seed of the synthetic viewer context (`user.*` request features).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output CSV file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (fields it leaves out keep their defaults).
    #[arg(long, env = "FEEDGRAPH_CONFIG")]
    config: Option<PathBuf>,
    /// Load a sample graph (10k users, 50k boards, 1M pins) on first start, then serve.
    #[arg(long)]
    demo: bool,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// gRPC listen address.
    #[arg(long, env = "FEEDGRAPH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long, env = "FEEDGRAPH_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "FEEDGRAPH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of shards (only when creating a data directory).
    #[arg(long, env = "FEEDGRAPH_SHARDS")]
    shards: Option<u32>,
    /// Log filter, e.g. `info` or `feedgraph=debug`.
    #[arg(long, env = "FEEDGRAPH_LOG")]
    log: Option<String>,
    /// This node's id in the placement or the cluster.
    #[arg(long, env = "FEEDGRAPH_NODE_ID")]
    node_id: Option<String>,
    /// Join the cluster managed through this etcd: `etcd://host:port[,host:port]`.
    #[arg(long, env = "FEEDGRAPH_CLUSTER")]
    cluster: Option<String>,
    /// Replicas per shard, leader included (when the cluster is created).
    #[arg(long, env = "FEEDGRAPH_REPLICAS")]
    replicas: Option<u32>,
    /// The address other nodes and clients reach this node at (default: --listen).
    #[arg(long, env = "FEEDGRAPH_ADVERTISE")]
    advertise: Option<String>,
    /// Placement file: which node holds which replica of which shard (unset: every
    /// shard here, standalone).
    #[arg(long, env = "FEEDGRAPH_PLACEMENT")]
    placement: Option<PathBuf>,
    /// Serve this model directory in-process (the ML scorer).
    #[arg(long, env = "FEEDGRAPH_MODEL_DIR", conflicts_with = "scorer")]
    model_dir: Option<PathBuf>,
    /// Use a standalone scorer at this URL instead (`http://host:port`).
    #[arg(long, env = "FEEDGRAPH_SCORER")]
    scorer: Option<String>,
    /// Model that re-ranks feeds (`none`: light scores only). With --demo:
    /// engagement_mlp.
    #[arg(long, env = "FEEDGRAPH_MODEL")]
    model: Option<String>,
    /// Serve a placement or etcd cluster without tokens: every method, writes and
    /// admin included, open to whoever reaches the port. Tokens: `[auth]` token files,
    /// or FEEDGRAPH_READ_TOKENS / FEEDGRAPH_WRITE_TOKENS / FEEDGRAPH_ADMIN_TOKENS.
    #[arg(long)]
    insecure: bool,
}

#[derive(Args, Debug)]
struct FeedArgs {
    /// Service address.
    #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878")]
    addr: String,
    #[arg(long)]
    user: u64,
    /// The home feed (following blended with interests) instead of the following feed.
    #[arg(long)]
    home: bool,
    #[arg(long, default_value_t = 20)]
    page_size: u32,
    /// Cursor from the previous page.
    #[arg(long, default_value = "")]
    cursor: String,
    /// Named ranking expression (see the service's [rankings]).
    #[arg(long, default_value = "")]
    ranking: String,
    /// Request feature for the ranking expression (`req.NAME`), as NAME=VALUE; repeatable.
    #[arg(long, value_parser = parse_feature)]
    feature: Vec<(String, f32)>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    token: TokenArg,
}

fn parse_feature(s: &str) -> Result<(String, f32), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    let value: f32 = value.parse().map_err(|e| format!("{value}: {e}"))?;
    Ok((name.to_owned(), value))
}

#[derive(Args, Debug)]
struct WriteArgs {
    /// Service address.
    #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878", global = true)]
    addr: String,
    /// Wait for the WAL to be fsync'ed before acknowledging.
    #[arg(long, global = true)]
    sync: bool,
    #[command(flatten)]
    token: TokenArg,
    #[command(subcommand)]
    what: WriteCommand,
}

#[derive(Subcommand, Debug)]
enum WriteCommand {
    /// Create or rename a user.
    User {
        #[arg(long)]
        id: u64,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Create or rename a board.
    Board {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        owner: u64,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Create or update a pin.
    Pin {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        board: u64,
        #[arg(long)]
        owner: u64,
        /// Comma-separated topic ids.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<u32>,
        /// Creation time in ms since the epoch (default: now).
        #[arg(long)]
        created_at_ms: Option<i64>,
        #[arg(long, default_value_t = 0.5)]
        quality: f32,
        #[arg(long, default_value_t = 0)]
        saves: u32,
    },
    /// Follow a user (--user-id), a board (--board and --board-owner) or a topic.
    Follow(FollowArgs),
    /// Stop following.
    Unfollow(FollowArgs),
    /// Delete a pin.
    DeletePin {
        #[arg(long)]
        pin: u64,
        #[arg(long)]
        owner: u64,
    },
    /// Mark a pin as spam or unsafe (or clear the mark).
    Flag {
        #[arg(long)]
        pin: u64,
        #[arg(long)]
        owner: u64,
        /// `spam` or `unsafe`.
        #[arg(long)]
        flag: String,
        #[arg(long)]
        clear: bool,
    },
    /// Record that a user was shown a pin.
    Seen {
        #[arg(long)]
        user: u64,
        #[arg(long)]
        pin: u64,
        #[arg(long)]
        owner: u64,
    },
    /// Block a user.
    Block {
        #[arg(long)]
        user: u64,
        #[arg(long)]
        blocked: u64,
    },
    /// Unblock a user.
    Unblock {
        #[arg(long)]
        user: u64,
        #[arg(long)]
        blocked: u64,
    },
}

#[derive(Args, Debug)]
struct FollowArgs {
    /// The follower.
    #[arg(long)]
    user: u64,
    #[arg(long, conflicts_with_all = ["board", "topic"])]
    user_id: Option<u64>,
    #[arg(long, requires = "board_owner", conflicts_with = "topic")]
    board: Option<u64>,
    #[arg(long)]
    board_owner: Option<u64>,
    #[arg(long)]
    topic: Option<u32>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Feed(args) => feed(args).await,
        Command::Write(args) => write(args).await,
        Command::Scorer(args) => scorer(args).await,
        Command::ExportFeatures(args) => export_features(args).await,
        Command::BulkLoad(args) => {
            tokio::task::spawn_blocking(move || bulk_load(args)).await.unwrap_or_else(|e| Err(e.into()))
        }
        Command::Shard(args) => shard(args).await,
        Command::Cluster(args) => cluster(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the cause chain; no backtrace for a user's error.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn config_of(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    // Environment and flags override the file (clap reads both).
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = v;
    }
    if let Some(v) = &args.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = args.shards {
        config.shards = v;
    }
    if let Some(v) = &args.log {
        config.log = v.clone();
    }
    if let Some(v) = &args.node_id {
        config.node_id = v.clone();
    }
    if let Some(v) = &args.placement {
        config.placement = Some(v.clone());
    }
    if let Some(v) = &args.cluster {
        config.cluster.etcd = Some(v.clone());
    }
    if let Some(v) = args.replicas {
        config.cluster.replicas = v;
    }
    if let Some(v) = &args.advertise {
        config.cluster.advertise = Some(v.clone());
    }
    if args.demo && config.cluster.etcd.is_some() {
        bail!(
            "--demo serves a standalone node; load a cluster through any node instead (./dev cluster does)"
        );
    }
    if args.demo && config.placement.is_some() {
        bail!(
            "--demo serves a standalone node; load the demo graph into the leaders instead (see README: Replicas)"
        );
    }
    if let Some(v) = &args.model_dir {
        config.scorer.model_dir = Some(v.clone());
        config.scorer.endpoint = None;
    }
    if let Some(v) = &args.scorer {
        config.scorer.endpoint = Some(v.clone());
        config.scorer.model_dir = None;
    }
    // The demo serves its bundled models unless told otherwise.
    if args.demo && config.scorer.model_dir.is_none() && config.scorer.endpoint.is_none() {
        config.scorer.model_dir = Some(config.data_dir.join("models"));
        if config.scorer.model.is_empty() && args.model.is_none() {
            config.scorer.model = feedgraph_server::demo::DEMO_MODEL.into();
        }
    }
    if let Some(v) = &args.model {
        config.scorer.model = if v == "none" { String::new() } else { v.clone() };
    }
    if args.insecure {
        config.auth.insecure = true;
    }
    config.auth.env_tokens = env_tokens()?;
    config.cluster.env_etcd_password = env_etcd_password();
    config.scorer.env_token =
        feedgraph_server::config::EnvSecret(std::env::var("FEEDGRAPH_SCORER_TOKEN").ok());
    config.validate()?;
    Ok(config)
}

/// The etcd password given in the environment (`FEEDGRAPH_ETCD_PASSWORD`): not a clap
/// argument, so that it shows neither in `ps` nor in `--help`.
fn env_etcd_password() -> feedgraph_server::config::EnvSecret {
    feedgraph_server::config::EnvSecret(std::env::var("FEEDGRAPH_ETCD_PASSWORD").ok())
}

/// Tokens given in the environment (`FEEDGRAPH_{READ,WRITE,ADMIN}_TOKENS`), which
/// add to the configured token files. Not clap arguments: they must not show in `ps`
/// or in `--help`.
fn env_tokens() -> anyhow::Result<feedgraph_server::auth::RoleTokens> {
    let var = |name: &str| std::env::var(name).ok();
    Ok(feedgraph_server::auth::RoleTokens::from_env_values(
        var("FEEDGRAPH_READ_TOKENS").as_deref(),
        var("FEEDGRAPH_WRITE_TOKENS").as_deref(),
        var("FEEDGRAPH_ADMIN_TOKENS").as_deref(),
    )?)
}

/// With `--check-config`, prints the effective configuration and returns `true` (stop
/// here); otherwise starts logging to stderr with `log` as the filter.
fn check_or_start_logging(
    config: &impl serde::Serialize,
    check_config: bool,
    log: &str,
) -> anyhow::Result<bool> {
    if check_config {
        print!("{}", toml::to_string(config)?);
        eprintln!("configuration is valid");
        return Ok(true);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log).context("log filter")?)
        .with_writer(std::io::stderr)
        .init();
    Ok(false)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = config_of(&args)?;
    if check_or_start_logging(&config, args.check_config, &config.log)? {
        return Ok(());
    }
    if config.placement.is_some() || config.cluster.etcd.is_some() {
        let node = feedgraph_server::start(config.clone()).await?;
        let addr = node.grpc_addr();
        eprintln!(
            "feedgraph node `{}` serving gRPC on {addr}, metrics on http://{}/metrics; replicas of shards {:?}",
            config.node_id,
            node.metrics_addr(),
            node.replicas().shard_ids()
        );
        let exe =
            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "feedgraph".into());
        eprintln!("  {exe} shard status --addr {addr}");
        shutdown_signal().await;
        node.shutdown().await?;
        return Ok(());
    }

    let cfg = config.clone();
    let demo = args.demo;
    let (shards, info) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        if demo && let Some(dir) = &cfg.scorer.model_dir {
            feedgraph_server::demo::ensure_models(dir)?;
        }
        let shards = feedgraph_server::open_shards(&cfg)?;
        let info = if demo {
            let spec = feedgraph_loadtest::GraphSpec::demo(now_ms());
            eprintln!(
                "demo graph: {} users, {} boards, {} pins, {} topics",
                spec.users, spec.boards, spec.pins, spec.topics
            );
            Some(feedgraph_server::demo::ensure_loaded(&cfg.data_dir, &shards, &spec, &mut progress_bar)?)
        } else {
            None
        };
        Ok((shards, info))
    })
    .await??;
    if let Some(info) = &info {
        if info.pins_loaded > 0 {
            eprintln!(
                "\nloaded {} pins, {} edges in {:.1} s ({:.0} edges/s)",
                info.pins_loaded,
                info.edges_written,
                info.seconds,
                info.edges_written as f64 / info.seconds.max(1e-9)
            );
        } else {
            eprintln!("demo graph already loaded in {}", config.data_dir.display());
        }
    }
    let node = feedgraph_server::start_with(config, shards).await?;
    let addr = node.grpc_addr();
    eprintln!("feedgraph serving gRPC on {addr}, metrics on http://{}/metrics", node.metrics_addr());
    if let Some(info) = info {
        let exe =
            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "feedgraph".into());
        let u = info.showcase_user;
        eprintln!("\nTry (user {u} follows about 300 accounts and boards):");
        eprintln!("  {exe} feed --addr {addr} --user {u}");
        eprintln!("  {exe} feed --addr {addr} --user {u} --home --page-size 10 --ranking fresh");
        eprintln!(
            "  {exe} feed --addr {addr} --user {u} --feature user.mobile=1 --feature user.sessions_7d=20"
        );
        eprintln!(
            "  grpcurl -plaintext -d '{{\"user_id\": {u}, \"page_size\": 5}}' {addr} feedgraph.v1.FeedService/GetFollowingFeed"
        );
        eprintln!("\nCtrl-C stops the service.");
    }
    shutdown_signal().await;
    node.shutdown().await?;
    Ok(())
}

fn scorer_config_of(args: &ScorerArgs) -> anyhow::Result<feedgraph_server::ScorerServerConfig> {
    let mut config = match &args.config {
        Some(path) => feedgraph_server::ScorerServerConfig::from_file(path)?,
        None => feedgraph_server::ScorerServerConfig::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = v;
    }
    if let Some(v) = &args.model_dir {
        config.model_dir = v.clone();
    }
    if let Some(v) = args.max_batch {
        config.max_batch = v;
    }
    if let Some(v) = &args.log {
        config.log = v.clone();
    }
    config.auth.env_tokens = env_tokens()?;
    config.validate()?;
    Ok(config)
}

async fn scorer(args: ScorerArgs) -> anyhow::Result<()> {
    let config = scorer_config_of(&args)?;
    if check_or_start_logging(&config, args.check_config, &config.log)? {
        return Ok(());
    }
    let node = feedgraph_server::scorer::start_scorer(config).await?;
    let models = node.registry().list();
    eprintln!(
        "feedgraph scorer serving gRPC on {}, metrics on http://{}/metrics",
        node.grpc_addr(),
        node.metrics_addr()
    );
    for m in &models {
        eprintln!(
            "  model {} version {} ({}, {} features)",
            m.name,
            m.version,
            m.kind.as_str(),
            m.feature_names.len()
        );
    }
    if models.is_empty() {
        eprintln!("  no model loaded yet: drop <model>/<version>/ directories into the model directory");
    }
    shutdown_signal().await;
    node.shutdown().await?;
    Ok(())
}

/// The configuration of a service whose data directory a command opens directly.
fn store_config(
    file: &Option<PathBuf>,
    data_dir: &Option<PathBuf>,
    shards: Option<u32>,
) -> anyhow::Result<Config> {
    let mut config = match file {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = shards {
        config.shards = v;
    }
    // A node's configuration validates with its secrets (the commands using it do not
    // reach etcd or a scorer, but must accept the configuration the node runs on).
    config.cluster.env_etcd_password = env_etcd_password();
    Ok(config)
}

async fn export_features(args: ExportArgs) -> anyhow::Result<()> {
    use feedgraph_model::{FeedRequest, UserId};
    use feedgraph_retrieval::FeedKind;
    let mut config = store_config(&args.config, &args.data_dir, None)?;
    // Features are exported whatever model the service would use.
    config.scorer = Default::default();
    let broker_config = config.validate()?;
    let cfg = config.clone();
    let demo = args.demo;
    let shards = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let shards = feedgraph_server::open_shards(&cfg)?;
        if demo {
            let spec = feedgraph_loadtest::GraphSpec::demo(now_ms());
            feedgraph_server::demo::ensure_loaded(&cfg.data_dir, &shards, &spec, &mut progress_bar)?;
        }
        Ok(shards)
    })
    .await??;
    let broker = feedgraph_retrieval::Broker::new(shards, broker_config, [0; 32])?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?,
    );
    let context_names: Vec<&str> = feedgraph_retrieval::features::CONTEXT_FEATURES
        .into_iter()
        .chain(feedgraph_loadtest::USER_CONTEXT_FEATURES)
        .collect();
    writeln!(
        out,
        "user,pin,feed,{},{}",
        feedgraph_retrieval::features::ITEM_FEATURES.join(","),
        context_names.join(",")
    )?;
    let step = (args.max_user_id / args.users.max(1)).max(1);
    let (mut rows, mut feeds) = (0u64, 0u64);
    for k in 0..args.users {
        let Some(user) = UserId::new(1 + k * step) else { continue };
        let features = feedgraph_loadtest::user_context(user, args.seed)
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        let req =
            FeedRequest { user, page_size: std::num::NonZeroU32::MIN, cursor: None, ranking: None, features };
        for (kind, name) in [(FeedKind::Following, "following"), (FeedKind::Home, "home")] {
            let batch = broker.model_inputs(kind, &req).await?;
            if batch.is_empty() {
                continue;
            }
            feeds += 1;
            let context: Vec<String> = context_names
                .iter()
                .map(|n| batch.user_features.get(*n).copied().unwrap_or(0.0).to_string())
                .collect();
            let context = context.join(",");
            let stride = batch.len().div_ceil(args.rows_per_feed.max(1));
            for i in (0..batch.len()).step_by(stride.max(1)) {
                let values: Vec<String> = batch.row(i).iter().map(|v| v.to_string()).collect();
                writeln!(out, "{},{},{name},{},{context}", user.get(), batch.item_ids[i], values.join(","))?;
                rows += 1;
            }
        }
    }
    out.flush()?;
    eprintln!("wrote {rows} rows from {feeds} feeds to {}", args.out.display());
    Ok(())
}

fn bulk_load(args: BulkLoadArgs) -> anyhow::Result<()> {
    use feedgraph_graph_store::BulkLoad;
    use feedgraph_model::{Mutation, shard_of};
    let config = store_config(&args.config, &args.data_dir, args.shards)?;
    config.validate()?;
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let mut reader = feedgraph_loadtest::scenario::FileReader::new(std::io::BufReader::new(file));
    let shards = feedgraph_server::open_shards(&config)?;
    let n = config.shards;
    let started = std::time::Instant::now();
    let mut loads: Vec<BulkLoad> = (0..n).map(|_| BulkLoad::default()).collect();
    let (mut buffered, mut pins, mut edges, mut requests) = (0usize, 0u64, 0u64, 0u64);
    let mut flush = |loads: &mut Vec<BulkLoad>| -> anyhow::Result<()> {
        for (shard, load) in shards.iter().zip(loads.iter_mut()) {
            let stats = shard.bulk_load(std::mem::take(load), 200_000, &mut |_| {})?;
            pins += stats.pins_loaded;
            edges += stats.edges_written;
        }
        eprint!(
            "\rloaded {pins} pins, {edges} edges ({:.0} edges/s)   ",
            edges as f64 / started.elapsed().as_secs_f64().max(1e-9)
        );
        Ok(())
    };
    while let Some(request) = reader.next_request()? {
        for (i, m) in request.mutations.into_iter().enumerate() {
            let at = || format!("request {requests}, mutation {i}");
            let m =
                Mutation::try_from(m).map_err(|e| anyhow::anyhow!("{}: {}: {}", at(), e.field, e.reason))?;
            match m {
                Mutation::UpsertUser(u) => loads[shard_of(u.id, n) as usize].users.push(u),
                Mutation::UpsertBoard(b) => loads[shard_of(b.owner, n) as usize].boards.push(b),
                Mutation::UpsertPin(p) => {
                    loads[shard_of(p.owner, n) as usize].pins.push(p);
                    buffered += 1;
                }
                Mutation::Follow { follower, target } => {
                    loads[shard_of(follower, n) as usize].follows.push((follower, target))
                }
                other => bail!("{}: bulk-load takes users, boards, pins and follows, not {other:?}", at()),
            }
        }
        requests += 1;
        if buffered >= args.flush_pins {
            flush(&mut loads)?;
            buffered = 0;
        }
    }
    flush(&mut loads)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "\nbulk-loaded {} into {}: {requests} requests, {pins} pins, {edges} edges in {secs:.1} s ({:.0} edges/s)",
        args.file.display(),
        config.data_dir.display(),
        edges as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn progress_bar(done: u64, total: u64) {
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    eprint!("\rloading [{:<25}] {pct:>3}%  {done}/{total} pins", "#".repeat(pct as usize / 4));
    let _ = std::io::stderr().flush();
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn feed(args: FeedArgs) -> anyhow::Result<()> {
    let mut client = pb::feed_service_client::FeedServiceClient::new(client_channel(
        &args.addr,
        &args.token.credentials()?,
    )?);
    let request = pb::FeedRequest {
        user_id: args.user,
        page_size: args.page_size,
        cursor: args.cursor,
        ranking: args.ranking,
        request_id: String::new(),
        features: args.feature.into_iter().collect(),
    };
    let response = if args.home {
        client.get_home_feed(request).await
    } else {
        client.get_following_feed(request).await
    };
    let r = match response {
        Ok(r) => r.into_inner(),
        Err(s) => bail!("{:?}: {}", s.code(), s.message()),
    };
    let stats = r.stats.unwrap_or_default();
    if args.json {
        println!("{}", feed_json(&r.items, &r.next_cursor, &stats));
        return Ok(());
    }
    let now = now_ms();
    println!(
        "{:>4}  {:>9}  {:>7}  {:>8}  {:>7}  {:>7}  source",
        "rank", "pin", "owner", "board", "age_h", "score"
    );
    for (i, item) in r.items.iter().enumerate() {
        println!(
            "{:>4}  {:>9}  {:>7}  {:>8}  {:>7.1}  {:>7.3}  {}",
            i + 1,
            item.pin_id,
            item.owner_id,
            item.board_id,
            (now - item.created_at_ms) as f64 / 3.6e6,
            item.score,
            source_name(item.source)
        );
    }
    println!(
        "\n{} items; scanned {} candidates on {}/{} shards{}; scoring {}; {} µs in the server",
        r.items.len(),
        stats.candidates_scanned,
        stats.shards_answered,
        stats.shards_asked,
        if stats.partial { " (PARTIAL)" } else { "" },
        if stats.model.is_empty() {
            scoring_name(stats.scoring).to_owned()
        } else {
            format!("{} ({})", scoring_name(stats.scoring), stats.model)
        },
        stats.server_latency_us
    );
    if !r.next_cursor.is_empty() {
        println!("next page: --cursor {}", r.next_cursor);
    }
    Ok(())
}

fn source_name(v: i32) -> &'static str {
    match pb::FeedSource::try_from(v) {
        Ok(pb::FeedSource::FollowedUser) => "followed user",
        Ok(pb::FeedSource::FollowedBoard) => "followed board",
        Ok(pb::FeedSource::FollowedTopic) => "followed topic",
        Ok(pb::FeedSource::EngagedTopic) => "engaged topic",
        _ => "unknown",
    }
}

fn scoring_name(v: i32) -> &'static str {
    match pb::Scoring::try_from(v) {
        Ok(pb::Scoring::Light) => "light",
        Ok(pb::Scoring::Model) => "model",
        Ok(pb::Scoring::LightFallback) => "light (model fallback)",
        _ => "unknown",
    }
}

fn feed_json(items: &[pb::FeedItem], cursor: &str, s: &pb::FeedStats) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|i| {
            format!(
                r#"{{"pin_id":{},"owner_id":{},"board_id":{},"created_at_ms":{},"score":{},"source":"{}"}}"#,
                i.pin_id,
                i.owner_id,
                i.board_id,
                i.created_at_ms,
                if i.score.is_finite() { i.score.to_string() } else { "null".into() },
                source_name(i.source)
            )
        })
        .collect();
    // Cursors are URL-safe base64: nothing to escape.
    format!(
        r#"{{"items":[{}],"next_cursor":"{}","stats":{{"candidates_scanned":{},"shards_asked":{},"shards_answered":{},"partial":{},"scoring":"{}","server_latency_us":{}}}}}"#,
        items.join(","),
        cursor,
        s.candidates_scanned,
        s.shards_asked,
        s.shards_answered,
        s.partial,
        scoring_name(s.scoring),
        s.server_latency_us
    )
}

async fn write(args: WriteArgs) -> anyhow::Result<()> {
    use pb::mutation::Op;
    let op = match args.what {
        WriteCommand::User { id, name } => Op::UpsertUser(pb::UpsertUser { user_id: id, username: name }),
        WriteCommand::Board { id, owner, name } => {
            Op::UpsertBoard(pb::UpsertBoard { board_id: id, owner_id: owner, name })
        }
        WriteCommand::Pin { id, board, owner, topics, created_at_ms, quality, saves } => {
            Op::UpsertPin(pb::UpsertPin {
                pin_id: id,
                board_id: board,
                owner_id: owner,
                created_at_ms: created_at_ms.unwrap_or_else(now_ms),
                topic_ids: topics,
                signals: Some(pb::PinSignals { quality, saves, ..Default::default() }),
            })
        }
        WriteCommand::Follow(f) => Op::Follow(pb::Follow { follower_id: f.user, target: Some(target(&f)?) }),
        WriteCommand::Unfollow(f) => {
            Op::Unfollow(pb::Unfollow { follower_id: f.user, target: Some(target(&f)?) })
        }
        WriteCommand::DeletePin { pin, owner } => {
            Op::DeletePin(pb::DeletePin { pin: Some(pb::PinRef { pin_id: pin, owner_id: owner }) })
        }
        WriteCommand::Flag { pin, owner, flag, clear } => Op::FlagPin(pb::FlagPin {
            pin: Some(pb::PinRef { pin_id: pin, owner_id: owner }),
            flag: match flag.as_str() {
                "spam" => pb::PinFlag::Spam,
                "unsafe" => pb::PinFlag::Unsafe,
                other => bail!("--flag must be spam or unsafe, not {other}"),
            } as i32,
            clear,
        }),
        WriteCommand::Seen { user, pin, owner } => Op::RecordImpressions(pb::RecordImpressions {
            user_id: user,
            pins: vec![pb::PinRef { pin_id: pin, owner_id: owner }],
        }),
        WriteCommand::Block { user, blocked } => {
            Op::BlockUser(pb::BlockUser { user_id: user, blocked_user_id: blocked })
        }
        WriteCommand::Unblock { user, blocked } => {
            Op::UnblockUser(pb::UnblockUser { user_id: user, blocked_user_id: blocked })
        }
    };
    let mut client = pb::graph_service_client::GraphServiceClient::new(client_channel(
        &args.addr,
        &args.token.credentials()?,
    )?);
    let request = pb::WriteRequest {
        mutations: vec![pb::Mutation { op: Some(op) }],
        ack: if args.sync { pb::Ack::Sync } else { pb::Ack::Async } as i32,
        request_id: String::new(),
    };
    match client.write(request).await {
        Ok(r) => {
            let r = r.into_inner();
            let commits: Vec<String> = r
                .commits
                .iter()
                .map(|c| format!("shard {} at sequence {} (epoch {})", c.shard, c.sequence, c.epoch))
                .collect();
            println!("applied {} mutation(s): {}", r.applied, commits.join(", "));
            Ok(())
        }
        Err(s) => bail!("{:?}: {}", s.code(), s.message()),
    }
}

fn target(f: &FollowArgs) -> anyhow::Result<pb::FollowTarget> {
    use pb::follow_target::Target;
    let t = match (f.user_id, f.board, f.topic) {
        (Some(u), None, None) => Target::UserId(u),
        (None, Some(b), None) => {
            Target::Board(pb::BoardRef { board_id: b, owner_id: f.board_owner.unwrap_or(0) })
        }
        (None, None, Some(t)) => Target::TopicId(t),
        _ => bail!("name exactly one of --user-id, --board (with --board-owner), --topic"),
    };
    Ok(pb::FollowTarget { target: Some(t) })
}

fn admin_client(
    addr: &str,
    credentials: &Credentials,
) -> anyhow::Result<feedgraph_proto::pb::internal::admin_service_client::AdminServiceClient<AuthChannel>> {
    Ok(feedgraph_proto::pb::internal::admin_service_client::AdminServiceClient::new(client_channel(
        addr,
        credentials,
    )?))
}

fn role_name(v: i32) -> &'static str {
    use feedgraph_proto::pb::internal::ReplicaRole;
    match ReplicaRole::try_from(v) {
        Ok(ReplicaRole::Leader) => "leader",
        Ok(ReplicaRole::Follower) => "follower",
        Ok(ReplicaRole::Offline) => "offline",
        _ => "unknown",
    }
}

const MIB: f64 = (1 << 20) as f64;

async fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    use feedgraph_cluster::Role;
    use feedgraph_cluster::manager::{self, ClusterStatus, Keys};
    let etcd = feedgraph_server::ClusterSettings {
        etcd_user: args.etcd_user.clone(),
        etcd_password_file: args.etcd_password_file.clone(),
        env_etcd_password: env_etcd_password(),
        ..Default::default()
    };
    let etcd_credentials = etcd.etcd_credentials()?;
    let mut client =
        manager::connect(&manager::parse_endpoints(&args.etcd)?, etcd_credentials.as_ref()).await?;
    let keys = Keys::new(&args.name);
    let credentials = args.token.credentials()?;
    match args.what {
        ClusterCommand::Status { json } => {
            let status = ClusterStatus::read(&mut client, &keys, &credentials).await?;
            let view = &status.view;
            let Some(spec) = view.spec else {
                bail!("no cluster `{}` in etcd at {} (no node has joined it)", args.name, args.etcd);
            };
            let report = |node: &str, shard: usize| status.report(node, shard as u32);
            if json {
                let shards: Vec<serde_json::Value> = view.shards.iter().enumerate().map(|(shard, a)| {
                    let replicas: Vec<serde_json::Value> = view.members.keys().filter_map(|node| {
                        let r = report(node, shard)?;
                        Some(serde_json::json!({
                            "node": node, "role": r.role.name(), "epoch": r.epoch, "applied_sequence": r.applied_sequence,
                            "lag_sequences": r.lag_sequences, "lag_ms": r.lag_ms, "readable": r.readable,
                            "fenced": r.fenced, "state": r.state,
                        }))
                    }).collect();
                    serde_json::json!({"shard": shard, "assignment": a, "replicas": replicas})
                }).collect();
                let nodes: Vec<serde_json::Value> = view.members.iter().map(|(n, a)| serde_json::json!({
                    "node": n, "address": a, "live": view.is_live(n), "draining": view.draining.contains(n),
                    "answered": status.reports.get(n).is_some_and(|r| r.is_ok()),
                })).collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "cluster": args.name, "shards": spec.shards, "replicas": spec.replicas,
                        "controller": status.controller, "converged": status.converged(),
                        "nodes": nodes, "shard_map": shards,
                    })
                );
                return Ok(());
            }
            let load = view.load();
            println!(
                "cluster `{}`: {} shards × {} replicas; controller {}; {}",
                args.name,
                spec.shards,
                spec.replicas,
                status.controller.as_deref().unwrap_or("(none elected)"),
                if status.converged() { "converged" } else { "CONVERGING" }
            );
            for (node, address) in &view.members {
                let (replicas, leaders) = load.get(node.as_str()).copied().unwrap_or((0, 0));
                let state = match (view.is_live(node), status.reports.get(node)) {
                    (false, _) => "DEAD".to_owned(),
                    (true, Some(Err(e))) => format!("live, NOT ANSWERING ({e})"),
                    (true, _) => "live".to_owned(),
                };
                let drain = if view.draining.contains(node) { ", DRAINING" } else { "" };
                println!("  {node} at {address}: {state}{drain}; {replicas} replicas, {leaders} leaders");
            }
            let nodes: Vec<&String> = view.members.keys().collect();
            let width = 20;
            print!("\n{:>5}  {:>8}", "shard", "epoch");
            for n in &nodes {
                print!("  {:<width$}", n);
            }
            println!();
            for (shard, a) in view.shards.iter().enumerate() {
                print!("{shard:>5}  {:>8}", a.as_ref().map_or("-".into(), |a| a.epoch.to_string()));
                for n in &nodes {
                    let placed = a.as_ref().and_then(|a| {
                        if a.leader == **n {
                            Some("leader")
                        } else if a.followers.contains(n) {
                            Some("follower")
                        } else {
                            None
                        }
                    });
                    let cell = match (placed, report(n, shard)) {
                        (None, None) => "-".to_owned(),
                        (_, Some(r)) => {
                            let mut c = match &r.role {
                                Role::Leader { .. } => format!("L {}", r.applied_sequence),
                                Role::Follower { .. } if !r.has_data => "F bootstrapping".to_owned(),
                                Role::Follower { .. } => {
                                    format!("F {} -{}", r.applied_sequence, r.lag_sequences)
                                }
                                Role::Offline => "offline".to_owned(),
                            };
                            if r.fenced {
                                c.push_str(" FENCED");
                            }
                            if placed.is_some_and(|p| p != r.role.name()) || placed.is_none() {
                                c.push_str(&format!(" (map: {})", placed.unwrap_or("none")));
                            }
                            c
                        }
                        (Some(p), None) => format!("{p} (no report)"),
                    };
                    print!("  {cell:<width$}");
                }
                println!();
            }
            println!(
                "\nL = leader, F = follower: applied sequence, then -lag in sequences behind the leader"
            );
            Ok(())
        }
        ClusterCommand::Drain { node, wait, timeout_s } => {
            let view = manager::ClusterView::read(&mut client, &keys).await?;
            if !view.members.contains_key(&node) {
                bail!(
                    "no node `{node}` in cluster `{}` (members: {:?})",
                    args.name,
                    view.members.keys().collect::<Vec<_>>()
                );
            }
            manager::set_drain(&mut client, &keys, &node, true).await?;
            println!("draining {node}: its replicas move to other nodes, leaderships first");
            if wait {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
                loop {
                    let status = ClusterStatus::read(&mut client, &keys, &credentials).await?;
                    let held = status.view.shards.iter().flatten().filter(|a| a.holds(&node)).count();
                    if held == 0 && status.converged() {
                        println!("{node} holds no replica; it can be stopped");
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("{node} still holds {held} replicas after {timeout_s} s");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
            Ok(())
        }
        ClusterCommand::Undrain { node } => {
            manager::set_drain(&mut client, &keys, &node, false).await?;
            println!("{node} takes replicas again");
            Ok(())
        }
    }
}

async fn shard(args: ShardArgs) -> anyhow::Result<()> {
    use feedgraph_proto::pb::internal as ipb;
    let credentials = args.token.credentials()?;
    match args.what {
        ShardCommand::Status { addr, placement, json } => {
            let addrs: Vec<String> = match placement {
                Some(p) => feedgraph_cluster::Placement::from_file(&p)?.nodes.into_values().collect(),
                None => addr,
            };
            let mut nodes = Vec::new();
            for a in &addrs {
                let answer = match admin_client(a, &credentials) {
                    Ok(mut c) => c
                        .list_replicas(ipb::ListReplicasRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message())),
                    Err(e) => Err(e),
                };
                nodes.push((a.clone(), answer));
            }
            if json {
                let out: Vec<serde_json::Value> = nodes.iter().map(|(a, r)| match r {
                    Ok(l) => serde_json::json!({
                        "address": a, "node": l.node, "shard_count": l.shard_count,
                        "block_cache_bytes": l.block_cache_bytes, "write_buffer_bytes": l.write_buffer_bytes,
                        "replicas": l.replicas.iter().map(|r| serde_json::json!({
                            "shard": r.shard, "role": role_name(r.role), "epoch": r.epoch,
                            "applied_sequence": r.applied_sequence, "pins": r.pins, "leader": r.leader,
                            "leader_sequence": r.leader_sequence, "lag_sequences": r.lag_sequences, "lag_ms": r.lag_ms,
                            "applied_bytes_per_sec": r.applied_bytes_per_sec, "applied_bytes_total": r.applied_bytes_total,
                            "readable": r.readable, "state": r.state, "fault": r.fault,
                            "followers": r.followers.iter().map(|f| serde_json::json!({"node": f.node, "applied_sequence": f.applied_sequence})).collect::<Vec<_>>(),
                            "wal_gaps": r.wal_gaps, "rebuilds": r.rebuilds, "stale_epoch_refusals": r.stale_epoch_refusals,
                            "checkpoint_resumes": r.checkpoint_resumes, "semi_sync_timeouts": r.semi_sync_timeouts,
                        })).collect::<Vec<_>>(),
                    }),
                    Err(e) => serde_json::json!({"address": a, "error": e.to_string()}),
                }).collect();
                println!("{}", serde_json::Value::Array(out));
                return Ok(());
            }
            for (a, r) in &nodes {
                let l = match r {
                    Ok(l) => l,
                    Err(e) => {
                        println!("node at {a}: NO ANSWER ({e:#})\n");
                        continue;
                    }
                };
                println!(
                    "node {} at {a}: {} replicas of {} shards; block cache {:.1} of {:.0} MiB, memtables {:.1} of {:.0} MiB",
                    l.node,
                    l.replicas.len(),
                    l.shard_count,
                    l.block_cache_bytes as f64 / MIB,
                    l.block_cache_capacity as f64 / MIB,
                    l.write_buffer_bytes as f64 / MIB,
                    l.write_buffer_capacity as f64 / MIB
                );
                println!(
                    "{:>5}  {:<8}  {:>5}  {:>10}  {:<21}  {:>7}  {:>7}  {:>8}  state",
                    "shard", "role", "epoch", "applied", "leader", "lag seq", "lag ms", "MB/s in"
                );
                for r in &l.replicas {
                    let follower = role_name(r.role) == "follower";
                    let followers: Vec<String> =
                        r.followers.iter().map(|f| format!("{}@{}", f.node, f.applied_sequence)).collect();
                    let mut state = r.state.clone();
                    if !followers.is_empty() {
                        state = format!("{state}; followers {}", followers.join(" "));
                    }
                    if !r.readable {
                        state = format!("{state}; NOT READABLE");
                    }
                    if !r.fault.is_empty() {
                        state = format!("{state}; WRITES STOPPED: {}", r.fault);
                    }
                    println!(
                        "{:>5}  {:<8}  {:>5}  {:>10}  {:<21}  {:>7}  {:>7}  {:>8}  {state}",
                        r.shard,
                        role_name(r.role),
                        r.epoch,
                        r.applied_sequence,
                        if follower { r.leader.as_str() } else { "-" },
                        if follower { r.lag_sequences.to_string() } else { "-".into() },
                        if follower { r.lag_ms.to_string() } else { "-".into() },
                        if follower { format!("{:.2}", r.applied_bytes_per_sec / 1e6) } else { "-".into() },
                    );
                }
                println!();
            }
            Ok(())
        }
        ShardCommand::Transition { addr, shard, role, epoch, leader } => {
            let target = match role.as_str() {
                "leader" => ipb::ReplicaRole::Leader,
                "follower" => ipb::ReplicaRole::Follower,
                "offline" => ipb::ReplicaRole::Offline,
                other => bail!("--role must be leader, follower or offline, not {other}"),
            };
            let mut client = admin_client(&addr, &credentials)?;
            let r = client
                .transition_replica(ipb::TransitionReplicaRequest {
                    shard,
                    target: target as i32,
                    epoch,
                    leader: leader.unwrap_or_default(),
                    create_empty: false,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let s = r.status.unwrap_or_default();
            println!(
                "shard {} on {addr}: {} at epoch {}{} (applied sequence {}, {})",
                s.shard,
                role_name(s.role),
                s.epoch,
                if s.leader.is_empty() { String::new() } else { format!(", following {}", s.leader) },
                s.applied_sequence,
                s.state
            );
            Ok(())
        }
        ShardCommand::Checkpoint { addr, shard, dir } => {
            let mut client = admin_client(&addr, &credentials)?;
            let r = client
                .create_checkpoint(ipb::CreateCheckpointRequest { shard, directory: dir })
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!("checkpoint of shard {shard} at sequence {} in {} (on {addr})", r.sequence, r.directory);
            Ok(())
        }
    }
}
