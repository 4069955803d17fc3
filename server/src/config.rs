//! Configuration: one TOML file, overridden by environment variables and command-line
//! flags (in that order; see `main.rs`), validated before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use feedgraph_retrieval::{AdmissionConfig, BrokerConfig, ModelRanking};
use feedgraph_scoring::Expr;
use serde::{Deserialize, Serialize};

/// The whole configuration of a `feedgraph serve` process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the shards (`shard-NNN/`), the cursor key and metadata.
    pub data_dir: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address (port 0 picks a free port).
    pub metrics_listen: SocketAddr,
    /// Number of logical shards, fixed when the data directory is created.
    pub shards: u32,
    /// Log filter (`tracing` env-filter syntax), e.g. `info` or `feedgraph=debug`.
    pub log: String,
    /// This node's id: its name in the placement, and how it introduces itself to the
    /// leaders it follows.
    pub node_id: String,
    /// Placement file: which node holds which replica of which shard, at which epoch
    /// (see `docs/placement.example.toml`). Unset: this node holds every shard as a
    /// standalone leader, without replication.
    pub placement: Option<PathBuf>,
    /// Membership of a cluster managed through etcd (placement, failover, drains).
    pub cluster: ClusterSettings,
    pub replication: ReplicationSettings,
    pub feed: FeedConfig,
    /// Named light-score expressions; requests choose one by name.
    pub rankings: BTreeMap<String, String>,
    pub store: StoreConfig,
    pub scorer: ScorerConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub debug: DebugConfig,
}

/// TLS on this node's gRPC port and on its calls to other nodes and to a standalone
/// scorer (the metrics port stays plain HTTP).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain this node presents. With `key_file`: TLS on. It must name
    /// the host or IP address others reach the node at (its placement or advertised
    /// address).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// PEM certificate(s) of the CA that signs the cluster's certificates: the nodes
    /// and the scorer this node calls must present one it signed (and, with
    /// `client_auth`, so must every client of this node).
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: every client, other nodes included, must present a certificate
    /// signed by `ca_file` (nodes present their own `cert_file`).
    pub client_auth: bool,
    /// How often `cert_file` and `key_file` are read again, in ms: a renewed pair is
    /// served without restart (a pair that does not load is refused and logged).
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            ca_file: None,
            client_auth: false,
            reload_interval_ms: 10_000,
        }
    }
}

impl TlsConfig {
    /// Whether the gRPC port serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Checks the fields (not the files: they are read at start).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(invalid("tls.key_file", "set both cert_file and key_file, or neither"));
        }
        if !self.enabled() && (self.ca_file.is_some() || self.client_auth) {
            return Err(invalid("tls.ca_file", "ca_file and client_auth need cert_file and key_file"));
        }
        if self.client_auth && self.ca_file.is_none() {
            return Err(invalid("tls.client_auth", "needs tls.ca_file to verify clients against"));
        }
        if self.reload_interval_ms == 0 {
            return Err(invalid("tls.reload_interval_ms", "must be at least 1"));
        }
        Ok(())
    }
}

/// Who may call what: bearer tokens per role (`read` < `write` < `admin`, each
/// including the lower ones). Tokens come from files or from the environment
/// (`FEEDGRAPH_READ_TOKENS`, `FEEDGRAPH_WRITE_TOKENS`, `FEEDGRAPH_ADMIN_TOKENS`,
/// comma-separated), never from this file, so a configuration can be printed and
/// committed. No tokens at all: every method is open (the demo); a cluster then
/// refuses to start unless `insecure`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `read` tokens (feeds, pins, follows, reflection), one per line; several allow
    /// a rotation without downtime.
    pub read_tokens_file: Option<PathBuf>,
    /// `write` tokens (graph writes and signals, and all `read` may do).
    pub write_tokens_file: Option<PathBuf>,
    /// `admin` tokens (replica admin, replication, the shard and scorer services
    /// between nodes, and everything else). This node's calls to other nodes (and to a
    /// standalone scorer, unless `scorer.token_file` is set) carry the first one, so
    /// every node of a cluster needs it.
    pub admin_tokens_file: Option<PathBuf>,
    /// Serve a placement or etcd cluster without tokens. Every method, writes and
    /// replica transitions included, is then open to whoever reaches the port.
    pub insecure: bool,
    /// How often the token files are read again, in ms: tokens are added and revoked
    /// without restart (files that do not load keep the tokens in force).
    pub reload_interval_ms: u64,
    /// Tokens from the environment (set by `feedgraph serve`; never serialized).
    #[serde(skip)]
    pub env_tokens: crate::auth::RoleTokens,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            read_tokens_file: None,
            write_tokens_file: None,
            admin_tokens_file: None,
            insecure: false,
            reload_interval_ms: 10_000,
            env_tokens: crate::auth::RoleTokens::default(),
        }
    }
}

impl AuthConfig {
    /// The tokens this process accepts (reads the token files).
    pub fn keyring(&self) -> Result<crate::auth::Keyring, ConfigError> {
        crate::auth::Keyring::load(self)
    }
}

/// The ML scorer: where it runs and how the broker uses it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScorerConfig {
    /// Serve this model directory in-process (the `ScorerService` is also offered on
    /// this node's gRPC port). Layout: `<dir>/<model>/<version>/`.
    pub model_dir: Option<PathBuf>,
    /// Or use a standalone `feedgraph scorer` at this URL (`http://host:port`).
    pub endpoint: Option<String>,
    /// Model the broker re-ranks feeds with; empty for light scores only.
    pub model: String,
    /// How many of the best light-scored candidates the model re-ranks.
    pub candidates: usize,
    /// How long the broker waits for scores before falling back to light scores, in
    /// milliseconds.
    pub deadline_ms: u64,
    /// Most items the in-process scorer accepts in one batch.
    pub max_batch: usize,
    /// How often the model directory is rescanned for new versions, in milliseconds.
    pub reload_interval_ms: u64,
    /// A token of the standalone scorer's own (this file's first line), sent to
    /// `endpoint` instead of this node's admin token, so that the scorer holds no
    /// credential that opens the cluster: configure it as an admin token of the scorer
    /// only. Or `FEEDGRAPH_SCORER_TOKEN`. Unset: the node's admin token is sent.
    pub token_file: Option<PathBuf>,
    /// The token from the environment (set by `feedgraph serve`; never serialized or
    /// printed).
    #[serde(skip)]
    pub env_token: EnvSecret,
}

impl Default for ScorerConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            endpoint: None,
            model: String::new(),
            candidates: 500,
            deadline_ms: 20,
            max_batch: 2000,
            reload_interval_ms: 1000,
            token_file: None,
            env_token: EnvSecret::default(),
        }
    }
}

impl ScorerConfig {
    /// What this node presents to a standalone scorer instead of its admin token, if a
    /// scorer token is configured (reads the token file).
    /// The token file has the token files' format (one per line, `#` comments); its
    /// first token is sent. The environment's token counts only with an `endpoint`.
    pub fn token(&self) -> Result<Option<feedgraph_proto::auth::Bearer>, ConfigError> {
        let text = match (&self.token_file, &self.env_token.0) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?,
            (None, Some(t)) if self.endpoint.is_some() => t.clone(),
            _ => return Ok(None),
        };
        let bad = |reason: String| invalid("scorer.token_file", reason);
        let tokens = feedgraph_proto::auth::Secret::parse_list(&text).map_err(|e| bad(e.to_string()))?;
        let first = tokens.first().ok_or_else(|| bad("holds no token".into()))?;
        Ok(Some(feedgraph_proto::auth::Bearer::new(Some(first))))
    }

    /// Checks the fields; `prefix` names the section in errors.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let field = |f: &str| format!("{prefix}{f}");
        if self.model_dir.is_some() && self.endpoint.is_some() {
            return Err(invalid(&field("endpoint"), "set either model_dir or endpoint, not both"));
        }
        if self.token_file.is_some() && self.endpoint.is_none() {
            return Err(invalid(
                &field("token_file"),
                "a scorer token is for a standalone scorer (endpoint)",
            ));
        }
        // Read now, so that `--check-config` refuses a token that will not load.
        self.token()?;
        if !self.model.is_empty() && self.model_dir.is_none() && self.endpoint.is_none() {
            return Err(invalid(&field("model"), "needs model_dir or endpoint"));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(invalid(&field("endpoint"), "must be an http:// or https:// URL"));
        }
        if self.max_batch == 0 || self.candidates == 0 || self.candidates > self.max_batch {
            return Err(invalid(&field("candidates"), "must be in 1..=max_batch"));
        }
        if self.deadline_ms == 0 || self.reload_interval_ms == 0 {
            return Err(invalid(
                &field("deadline_ms"),
                "deadline_ms and reload_interval_ms must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The whole configuration of a standalone `feedgraph scorer` process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScorerServerConfig {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address (port 0 picks a free port).
    pub metrics_listen: SocketAddr,
    /// The model directory (`<dir>/<model>/<version>/`).
    pub model_dir: PathBuf,
    /// Most items accepted in one `ScoreBatch`.
    pub max_batch: usize,
    /// How often the model directory is rescanned, in milliseconds.
    pub reload_interval_ms: u64,
    /// Log filter (`tracing` env-filter syntax).
    pub log: String,
    /// Tokens: `ScoreBatch` and `ListModels` need an `admin` token (what nodes send).
    pub auth: AuthConfig,
    /// TLS on the scorer's gRPC port.
    pub tls: TlsConfig,
}

impl Default for ScorerServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7879)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9879)),
            model_dir: PathBuf::from("models"),
            max_batch: 2000,
            reload_interval_ms: 1000,
            log: "info".into(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl ScorerServerConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), source: Box::new(e) })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 {
            return Err(invalid("max_batch", "must be at least 1"));
        }
        if self.reload_interval_ms == 0 {
            return Err(invalid("reload_interval_ms", "must be at least 1"));
        }
        self.auth.keyring()?;
        if self.auth.reload_interval_ms == 0 {
            return Err(invalid("auth.reload_interval_ms", "must be at least 1"));
        }
        if self.auth.insecure {
            return Err(invalid(
                "auth.insecure",
                "a standalone scorer without tokens is already open (and warns); insecure is for clusters",
            ));
        }
        self.tls.validate()?;
        Ok(())
    }
}

/// Feed assembly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Largest `page_size` a request may ask for.
    pub max_page_size: u32,
    /// Candidates each shard returns per group (following, interest).
    pub candidates_per_shard: usize,
    /// Candidates each shard examines at most, newest first (the work bound).
    pub scan_limit: usize,
    /// How long the broker waits for each shard, in milliseconds; later shards are left
    /// out and the response is flagged partial.
    pub shard_deadline_ms: u64,
    /// Items in one ranking, over all its pages.
    pub max_ranked: usize,
    /// At most this many items of one owner per page.
    pub max_per_owner: usize,
    /// At most this many items of one board per page.
    pub max_per_board: usize,
    /// Share of home-feed positions for interest candidates (followed topics and the
    /// topics of the user's recent saves), in [0, 1].
    pub home_interest_share: f64,
    /// How many of a user's newest saves define their engaged topics.
    pub engaged_recent_pins: usize,
    /// How many engaged topics the home feed draws from.
    pub engaged_topics: usize,
    /// How long a ranking stays cached for its next pages, in seconds.
    pub ranking_ttl_s: u64,
    /// MiB the cached rankings may take (each weighed by its candidates, ~100 bytes
    /// each: a ranking of 500 is ~50 KiB).
    pub ranking_cache_mb: u64,
    /// Examine every candidate up to `scan_limit` instead of skipping blocks of
    /// candidates that cannot make the top-K. The same rankings, slower: for
    /// comparisons.
    pub full_scan: bool,
    /// Rank only as far as the asked page needs when no ML model re-ranks the head (a
    /// first page of 25 merges the best ~50 candidates, not `max_ranked`), and extend
    /// the ranking from the same snapshot when a later page needs more. The same pages
    /// either way; off, a first page ranks all `max_ranked` up front.
    pub progressive_ranking: bool,
    /// Send a node the queries of all the shards a feed reads from it in one request
    /// (one round trip, one shared top-K floor) instead of one request per shard.
    pub batch_remote_queries: bool,
    /// Rankings computed at once; 0: one per core. Requests beyond wait in a short
    /// queue, then are shed with RESOURCE_EXHAUSTED.
    pub max_rankings_in_progress: usize,
    /// Rankings waiting for a slot; beyond, a request is shed at once.
    pub max_rankings_queued: usize,
    /// Longest wait for a slot, in milliseconds, before a queued request is shed.
    pub queue_wait_ms: u64,
    /// Ranking used when a request names none; must be in `rankings`.
    pub default_ranking: String,
}

/// RocksDB settings. The block cache and the memtable cap are one budget for the
/// whole node, shared by its shards.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Keep obsolete WAL files this long for followers to catch up, in seconds.
    pub wal_ttl_seconds: u64,
    /// Cap on retained obsolete WAL files per shard, in MiB.
    pub wal_size_limit_mb: u64,
    /// RocksDB block cache of the whole node, shared by its shards, in MiB.
    pub block_cache_mb: u64,
    /// All memtables of the node together, in MiB (past it, memtables are flushed
    /// early).
    pub write_buffers_total_mb: u64,
    /// Decoded-bitmap cache per shard, in MiB.
    pub bitmap_cache_mb: u64,
    /// Memtable size per column family, in MiB.
    pub write_buffer_mb: u64,
    /// Follow-list cache per shard, in MiB.
    pub follows_cache_mb: u64,
    /// Most users, boards and topics one user may follow: a follow past it is refused
    /// with FAILED_PRECONDITION (a feed reads the whole list on every request).
    pub max_follows_per_user: u32,
    /// Most users one user may block.
    pub max_blocks_per_user: u32,
    /// Impressions are left out of a viewer's feeds for this many hours, then deleted
    /// (kept at most one period longer).
    pub seen_window_hours: u32,
    /// Impressions are stored in one bitmap per viewer per period of this many hours;
    /// expiry drops whole periods.
    pub seen_period_hours: u32,
    /// Most impressions kept per viewer on each shard; past it the oldest go first.
    pub seen_max_entries: u32,
    /// How often each leader looks for viewers with expired impressions and deletes
    /// them (viewers still shown pins drop theirs with every new impression), in
    /// seconds.
    pub seen_sweep_interval_s: u64,
}

/// Replication between the replicas of a shard, and how brokers reach other nodes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSettings {
    /// How long a follower's request waits at its leader for a new write, in ms (the
    /// long poll: an idle follower asks this often; a write is shipped at once).
    pub poll_wait_ms: u64,
    /// WAL bytes a leader sends per answer, about, in KiB.
    pub max_batch_kb: u64,
    /// How long an `ACK_SEMI_SYNC` write waits for a follower to apply it, in ms.
    pub semi_sync_timeout_ms: u64,
    /// Checkpoint stream chunk, in KiB.
    pub checkpoint_chunk_kb: u64,
    /// How long a leader keeps an unused checkpoint for a follower to resume, in s.
    pub checkpoint_ttl_s: u64,
    /// A follower further behind than this (ms since the leader committed what it
    /// applies) is logged.
    pub lag_warn_ms: u64,
    /// How often the broker asks the placement's nodes for their replicas' roles, in
    /// ms (a moved leader is also learnt at once from a refused write).
    pub map_refresh_ms: u64,
    /// Timeout of a point read or write sent to another node, in ms (a semi-sync write
    /// adds `semi_sync_timeout_ms`).
    pub remote_timeout_ms: u64,
    /// The newest committed batches each shard keeps in memory for its followers, in
    /// KiB: a caught-up follower is served from them, not from the WAL (which RocksDB
    /// reads from the start of the log file). 0: always read the WAL.
    pub recent_batches_kb: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            poll_wait_ms: 500,
            max_batch_kb: 4096,
            semi_sync_timeout_ms: 1000,
            checkpoint_chunk_kb: 1024,
            checkpoint_ttl_s: 600,
            lag_warn_ms: 5000,
            map_refresh_ms: 1000,
            remote_timeout_ms: 2000,
            recent_batches_kb: 8192,
        }
    }
}

/// A cluster managed through etcd: the controller places replicas, fails over and
/// drains; every node is a broker and a candidate for controller.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd to join, `etcd://host:port[,host:port]`. Unset: a standalone node (or the
    /// hand-written `placement`).
    pub etcd: Option<String>,
    /// The cluster's name: its state lives under `/feedgraph/<name>/` in etcd.
    pub name: String,
    /// Replicas per shard, leader included (used when the cluster is created).
    pub replicas: u32,
    /// The address other nodes and clients reach this node at. Unset: the gRPC
    /// listen address as bound.
    pub advertise: Option<String>,
    /// The node's lease in etcd, in ms (whole seconds, at least 1 s): a dead node's
    /// shards get new leaders about this long after it died. A node that cannot renew
    /// it fences its leaders first.
    pub lease_ttl_ms: u64,
    /// A follower whose node is gone this long is replaced on another node, in ms (a
    /// node back sooner catches up from the log instead of copying a checkpoint).
    pub replace_after_ms: u64,
    /// Followers bootstrapping from a checkpoint at once on one node.
    pub max_bootstraps_per_node: usize,
    /// The etcd user this node authenticates as (etcd with `auth enable`). Unset: etcd
    /// is reached without authentication, and anyone who reaches it can rewrite the
    /// shard map (the node warns at start).
    pub etcd_user: Option<String>,
    /// A file holding that user's password (its first line), or `FEEDGRAPH_ETCD_PASSWORD`
    /// in the environment: never in this file, so a configuration can be printed.
    pub etcd_password_file: Option<PathBuf>,
    /// The password from the environment (set by `feedgraph serve`; never serialized
    /// or printed).
    #[serde(skip)]
    pub env_etcd_password: EnvSecret,
}

/// A secret from the environment: never serialized, and `Debug` does not print it.
#[derive(Clone, Default, PartialEq)]
pub struct EnvSecret(pub Option<String>);

impl std::fmt::Debug for EnvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(<redacted>)" } else { "None" })
    }
}

impl ClusterSettings {
    /// The etcd user and password, if a user is configured (reads the password file).
    pub fn etcd_credentials(
        &self,
    ) -> Result<Option<feedgraph_cluster::manager::EtcdCredentials>, ConfigError> {
        let Some(user) = &self.etcd_user else { return Ok(None) };
        let password = match (&self.etcd_password_file, &self.env_etcd_password.0) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            (None, Some(p)) => p.clone(),
            (None, None) => {
                return Err(invalid(
                    "cluster.etcd_password_file",
                    "cluster.etcd_user needs a password: set etcd_password_file or FEEDGRAPH_ETCD_PASSWORD",
                ));
            }
        };
        if password.is_empty() {
            return Err(invalid("cluster.etcd_password_file", "the etcd password is empty"));
        }
        Ok(Some(feedgraph_cluster::manager::EtcdCredentials::new(user.clone(), &password)))
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            etcd: None,
            name: "default".into(),
            replicas: 3,
            advertise: None,
            lease_ttl_ms: 2000,
            replace_after_ms: 30_000,
            max_bootstraps_per_node: 2,
            etcd_user: None,
            etcd_password_file: None,
            env_etcd_password: EnvSecret::default(),
        }
    }
}

/// Fault injection for tests and drills. Never set in production.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DebugConfig {
    /// Extra latency added to each candidate query this node serves for a shard, in
    /// milliseconds, keyed by shard number (`{ "3" = 500 }`).
    pub shard_delays_ms: BTreeMap<String, u64>,
    /// The first checkpoint stream this node serves breaks after this many bytes
    /// (drills of resumption).
    pub break_checkpoint_after_bytes: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        let mut rankings = BTreeMap::new();
        rankings.insert("default".into(), "2*quality + 0.3*ln(1 + saves) - age_hours/48".into());
        rankings.insert("fresh".into(), "quality - age_hours/6".into());
        rankings.insert("popular".into(), "ln(1 + saves) + 0.5*ln(1 + closeups) - age_days/7".into());
        rankings.insert("recent".into(), "-age_hours".into());
        Self {
            data_dir: PathBuf::from("data/feedgraph"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9878)),
            shards: 16,
            log: "info".into(),
            node_id: "node-1".into(),
            placement: None,
            cluster: ClusterSettings::default(),
            replication: ReplicationSettings::default(),
            feed: FeedConfig::default(),
            rankings,
            store: StoreConfig::default(),
            scorer: ScorerConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            max_page_size: 100,
            candidates_per_shard: 500,
            scan_limit: 20_000,
            shard_deadline_ms: 100,
            max_ranked: 500,
            max_per_owner: 3,
            max_per_board: 3,
            home_interest_share: 0.3,
            engaged_recent_pins: 50,
            engaged_topics: 5,
            ranking_ttl_s: 600,
            ranking_cache_mb: 256,
            full_scan: false,
            progressive_ranking: true,
            batch_remote_queries: true,
            max_rankings_in_progress: 0,
            max_rankings_queued: 16,
            queue_wait_ms: 4,
            default_ranking: "default".into(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            wal_ttl_seconds: 3600,
            wal_size_limit_mb: 1024,
            block_cache_mb: 512,
            write_buffers_total_mb: 1024,
            bitmap_cache_mb: 32,
            write_buffer_mb: 16,
            follows_cache_mb: 32,
            max_follows_per_user: 10_000,
            max_blocks_per_user: 10_000,
            seen_window_hours: 30 * 24,
            seen_period_hours: 24,
            seen_max_entries: 10_000,
            seen_sweep_interval_s: 600,
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
}

impl Config {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), source: Box::new(e) })
    }

    /// Checks every field and compiles the rankings.
    pub fn validate(&self) -> Result<BrokerConfig, ConfigError> {
        let f = &self.feed;
        if self.shards == 0 || self.shards > 4096 {
            return Err(invalid("shards", "must be in 1..=4096"));
        }
        if self.node_id.is_empty()
            || !self.node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid("node_id", "must be non-empty letters, digits, `-`, `_` or `.`"));
        }
        if let Some(path) = &self.placement {
            let p = feedgraph_cluster::Placement::from_file(path)
                .map_err(|e| invalid("placement", e.to_string()))?;
            if p.shard_count != self.shards {
                return Err(invalid(
                    "placement",
                    format!("the placement has {} shards, the configuration {}", p.shard_count, self.shards),
                ));
            }
            if p.address(&self.node_id).is_none() {
                return Err(invalid("node_id", format!("`{}` is not a node of the placement", self.node_id)));
            }
        }
        let keyring = self.auth.keyring()?;
        if self.auth.reload_interval_ms == 0 {
            return Err(invalid("auth.reload_interval_ms", "must be at least 1"));
        }
        if keyring.enabled() && self.auth.insecure {
            return Err(invalid("auth.insecure", "tokens are configured; drop one or the other"));
        }
        if (self.placement.is_some() || self.cluster.etcd.is_some())
            && !keyring.enabled()
            && !self.auth.insecure
        {
            return Err(invalid(
                "auth",
                "a cluster needs tokens, or every node's admin and shard methods are open to anyone who reaches its port: set auth.admin_tokens_file (and the read and write files) or FEEDGRAPH_ADMIN_TOKENS, or serve it open with --insecure",
            ));
        }
        self.tls.validate()?;
        let st = &self.store;
        if st.seen_period_hours == 0 || st.seen_period_hours > 24 * 366 {
            return Err(invalid("store.seen_period_hours", "must be in 1..=8784 (a year)"));
        }
        if st.seen_window_hours < st.seen_period_hours || st.seen_window_hours > 24 * 366 * 10 {
            return Err(invalid(
                "store.seen_window_hours",
                "must be at least store.seen_period_hours and at most ten years",
            ));
        }
        if st.seen_window_hours / st.seen_period_hours > 1000 {
            return Err(invalid(
                "store.seen_period_hours",
                "at most 1000 periods per window (seen_window_hours / seen_period_hours): longer periods",
            ));
        }
        if st.seen_max_entries == 0 || st.seen_max_entries > 10_000_000 {
            return Err(invalid("store.seen_max_entries", "must be in 1..=10000000"));
        }
        if st.max_follows_per_user == 0 || st.max_follows_per_user > 1_000_000 {
            return Err(invalid("store.max_follows_per_user", "must be in 1..=1000000"));
        }
        if st.max_blocks_per_user == 0 || st.max_blocks_per_user > 1_000_000 {
            return Err(invalid("store.max_blocks_per_user", "must be in 1..=1000000"));
        }
        if st.seen_sweep_interval_s == 0 {
            return Err(invalid("store.seen_sweep_interval_s", "must be at least 1"));
        }
        let calls_others = self.placement.is_some()
            || self.cluster.etcd.is_some()
            || self.scorer.endpoint.as_deref().is_some_and(|e| e.starts_with("https://"));
        if self.tls.enabled() && calls_others && self.tls.ca_file.is_none() {
            return Err(invalid(
                "tls.ca_file",
                "this node calls other nodes (or a scorer) over TLS: set the CA that signs their certificates",
            ));
        }
        if self.tls.enabled() && self.scorer.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            return Err(invalid(
                "scorer.endpoint",
                "TLS is on: use https:// (an http:// scorer would be sent this node's admin token in clear)",
            ));
        }
        if self.scorer.endpoint.as_deref().is_some_and(|e| e.starts_with("https://")) && !self.tls.enabled() {
            return Err(invalid(
                "scorer.endpoint",
                "an https:// scorer needs [tls] cert_file, key_file and ca_file on this node",
            ));
        }
        let c = &self.cluster;
        if let Some(url) = &c.etcd {
            if self.placement.is_some() {
                return Err(invalid(
                    "cluster.etcd",
                    "set either a placement file or an etcd cluster, not both",
                ));
            }
            feedgraph_cluster::manager::parse_endpoints(url)
                .map_err(|e| invalid("cluster.etcd", e.to_string()))?;
        }
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            return Err(invalid("cluster.name", "must be non-empty letters, digits, `-`, `_` or `.`"));
        }
        if c.replicas == 0 || c.replicas > 9 {
            return Err(invalid("cluster.replicas", "must be in 1..=9"));
        }
        if c.lease_ttl_ms < 1000 || !c.lease_ttl_ms.is_multiple_of(1000) {
            return Err(invalid(
                "cluster.lease_ttl_ms",
                "must be whole seconds, at least 1000 (etcd leases count seconds)",
            ));
        }
        if c.max_bootstraps_per_node == 0 {
            return Err(invalid("cluster.max_bootstraps_per_node", "must be at least 1"));
        }
        if c.etcd_user.as_deref().is_some_and(str::is_empty) {
            return Err(invalid(
                "cluster.etcd_user",
                "must not be empty (leave it unset for no authentication)",
            ));
        }
        if c.etcd_user.is_none() && c.etcd_password_file.is_some() {
            return Err(invalid("cluster.etcd_password_file", "a password without cluster.etcd_user"));
        }
        // Read now (the file too), so that `--check-config` refuses a password that
        // will not load.
        c.etcd_credentials()?;
        let r = &self.replication;
        for (name, v) in [
            ("replication.poll_wait_ms", r.poll_wait_ms),
            ("replication.max_batch_kb", r.max_batch_kb),
            ("replication.semi_sync_timeout_ms", r.semi_sync_timeout_ms),
            ("replication.checkpoint_chunk_kb", r.checkpoint_chunk_kb),
            ("replication.map_refresh_ms", r.map_refresh_ms),
            ("replication.remote_timeout_ms", r.remote_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if r.checkpoint_chunk_kb > 16 << 10 {
            return Err(invalid("replication.checkpoint_chunk_kb", "must be at most 16384"));
        }
        if self.store.block_cache_mb == 0 || self.store.write_buffers_total_mb == 0 {
            return Err(invalid(
                "store.block_cache_mb",
                "the block cache and write_buffers_total_mb need at least 1 MiB",
            ));
        }
        if f.max_page_size == 0 || f.max_page_size > 1000 {
            return Err(invalid("feed.max_page_size", "must be in 1..=1000"));
        }
        for (name, v) in [
            ("feed.candidates_per_shard", f.candidates_per_shard),
            ("feed.scan_limit", f.scan_limit),
            ("feed.max_ranked", f.max_ranked),
            ("feed.max_per_owner", f.max_per_owner),
            ("feed.max_per_board", f.max_per_board),
        ] {
            if v == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if f.shard_deadline_ms == 0 {
            return Err(invalid("feed.shard_deadline_ms", "must be at least 1"));
        }
        if f.ranking_cache_mb == 0 {
            return Err(invalid("feed.ranking_cache_mb", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&f.home_interest_share) {
            return Err(invalid("feed.home_interest_share", "must be in [0, 1]"));
        }
        let mut rankings = BTreeMap::new();
        for (name, source) in &self.rankings {
            let expr =
                Expr::compile(source).map_err(|e| invalid(&format!("rankings.{name}"), e.to_string()))?;
            rankings.insert(name.clone(), Arc::new(expr));
        }
        if !rankings.contains_key(&f.default_ranking) {
            return Err(invalid(
                "feed.default_ranking",
                format!("`{}` is not in [rankings]", f.default_ranking),
            ));
        }
        self.scorer.validate("scorer.")?;
        let model = (!self.scorer.model.is_empty()).then(|| ModelRanking {
            name: self.scorer.model.clone(),
            candidates: self.scorer.candidates,
            deadline: Duration::from_millis(self.scorer.deadline_ms),
        });
        let mut shard_delays = std::collections::HashMap::new();
        for (shard, ms) in &self.debug.shard_delays_ms {
            let s: u32 = shard.parse().ok().filter(|s| *s < self.shards).ok_or_else(|| {
                invalid("debug.shard_delays_ms", format!("`{shard}` is not a shard number"))
            })?;
            shard_delays.insert(s, Duration::from_millis(*ms));
        }
        Ok(BrokerConfig {
            max_page_size: f.max_page_size,
            candidates_per_shard: f.candidates_per_shard,
            scan_limit: f.scan_limit,
            shard_deadline: Duration::from_millis(f.shard_deadline_ms),
            max_ranked: f.max_ranked,
            max_per_owner: f.max_per_owner,
            max_per_board: f.max_per_board,
            home_interest_share: f.home_interest_share,
            engaged_recent_pins: f.engaged_recent_pins,
            engaged_topics: f.engaged_topics,
            ranking_ttl: Duration::from_secs(f.ranking_ttl_s.max(1)),
            ranking_cache_bytes: f.ranking_cache_mb << 20,
            full_scan: f.full_scan,
            progressive_ranking: f.progressive_ranking,
            batch_remote_queries: f.batch_remote_queries,
            admission: AdmissionConfig {
                in_progress: f.max_rankings_in_progress,
                queued: f.max_rankings_queued,
                queue_wait: Duration::from_millis(f.queue_wait_ms),
            },
            rankings,
            default_ranking: f.default_ranking.clone(),
            shard_delays,
            model,
        })
    }

    /// The node's RocksDB memory budget (one per process: every shard shares it).
    pub fn store_memory(&self) -> feedgraph_graph_store::StoreMemory {
        feedgraph_graph_store::StoreMemory::new(
            (self.store.block_cache_mb << 20) as usize,
            (self.store.write_buffers_total_mb << 20) as usize,
        )
    }

    /// The shard options for shard `id`, sharing `memory` with the node's other shards.
    pub fn shard_options(
        &self,
        id: u32,
        memory: &feedgraph_graph_store::StoreMemory,
    ) -> feedgraph_graph_store::ShardOptions {
        let s = &self.store;
        feedgraph_graph_store::ShardOptions {
            shard_id: id,
            wal_ttl_seconds: s.wal_ttl_seconds,
            wal_size_limit_mb: s.wal_size_limit_mb,
            memory: memory.clone(),
            write_buffer_bytes: (s.write_buffer_mb.max(1) << 20) as usize,
            background_jobs: 2,
            bitmap_cache_bytes: s.bitmap_cache_mb << 20,
            follows_cache_bytes: s.follows_cache_mb << 20,
            max_follows: s.max_follows_per_user,
            max_blocks: s.max_blocks_per_user,
            recent_batches_bytes: (self.replication.recent_batches_kb << 10) as usize,
            seen: feedgraph_graph_store::SeenWindow {
                window_hours: s.seen_window_hours,
                period_hours: s.seen_period_hours,
                max_entries: s.seen_max_entries,
            },
        }
    }

    /// Replication settings for the node's replicas, whose requests present
    /// `credentials`.
    pub fn replication_config(
        &self,
        credentials: feedgraph_proto::auth::Credentials,
    ) -> feedgraph_cluster::ReplicationConfig {
        let r = &self.replication;
        feedgraph_cluster::ReplicationConfig {
            poll_wait: Duration::from_millis(r.poll_wait_ms),
            max_batch_bytes: (r.max_batch_kb << 10) as usize,
            semi_sync_timeout: Duration::from_millis(r.semi_sync_timeout_ms),
            checkpoint_chunk_bytes: (r.checkpoint_chunk_kb << 10) as usize,
            checkpoint_ttl: Duration::from_secs(r.checkpoint_ttl_s),
            lag_warn: Duration::from_millis(r.lag_warn_ms),
            break_checkpoint_after_bytes: self.debug.break_checkpoint_after_bytes,
            credentials,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_cluster_needs_tokens_or_insecure_and_tokens_are_never_printed() {
        let mut c = Config::default();
        c.cluster.etcd = Some("etcd://127.0.0.1:2379".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
        c.auth.insecure = true;
        c.validate().unwrap();
        let token = feedgraph_proto::auth::Secret::new("admin-token-not-to-print").unwrap();
        c.auth.env_tokens.admin = vec![token];
        // Tokens and insecure contradict each other.
        assert!(c.validate().unwrap_err().to_string().contains("auth.insecure"));
        c.auth.insecure = false;
        c.validate().unwrap();
        let printed = format!("{}\n{c:?}", toml::to_string(&c).unwrap());
        assert!(!printed.contains("not-to-print"), "{printed}");
    }

    #[test]
    fn an_etcd_user_needs_a_password_which_is_never_printed() {
        let mut c = Config::default();
        c.cluster.etcd = Some("etcd://127.0.0.1:2379".into());
        c.auth.insecure = true;
        c.cluster.etcd_user = Some("feedgraph".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.etcd_password_file"), "{e}");
        c.cluster.env_etcd_password = EnvSecret(Some("etcd-password-not-to-print".into()));
        c.validate().unwrap();
        let credentials = c.cluster.etcd_credentials().unwrap().unwrap();
        assert_eq!(credentials.user(), "feedgraph");
        let printed = format!("{}\n{c:?}\n{credentials:?}", toml::to_string(&c).unwrap());
        assert!(!printed.contains("not-to-print"), "{printed}");
        // A password file wins over the environment: its first line is the password.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etcd-password");
        std::fs::write(&file, "\nsecond line\n").unwrap();
        c.cluster.etcd_password_file = Some(file.clone());
        let e = c.cluster.etcd_credentials().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(&file, "from-the-file\n").unwrap();
        assert!(c.cluster.etcd_credentials().unwrap().is_some());
        // A password without a user is a mistake, not ignored.
        c.cluster.etcd_user = None;
        assert!(c.validate().unwrap_err().to_string().contains("without cluster.etcd_user"));
    }

    #[test]
    fn a_scorer_token_is_for_a_standalone_scorer_and_never_printed() {
        let mut c = Config::default();
        // From the environment, a scorer token means nothing without an endpoint (an
        // environment shared by several services must not stop a node); in the
        // configuration it is a mistake.
        c.scorer.env_token = EnvSecret(Some("scorer-token-not-to-print".into()));
        c.validate().unwrap();
        assert!(c.scorer.token().unwrap().is_none());
        c.scorer.token_file = Some("scorer.token".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("scorer.token_file"), "{e}");
        c.scorer.token_file = None;
        c.scorer.model_dir = None;
        c.scorer.model = String::new();
        c.scorer.endpoint = Some("http://127.0.0.1:7979".into());
        c.validate().unwrap();
        assert!(c.scorer.token().unwrap().is_some());
        let printed = format!("{}\n{c:?}", toml::to_string(&c).unwrap());
        assert!(!printed.contains("not-to-print"), "{printed}");
        c.scorer.env_token = EnvSecret(Some("short".into()));
        assert!(c.scorer.token().is_err(), "a token shorter than 16 characters");
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused() {
        let field = |c: &Config| match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut c = Config::default();
        c.tls.cert_file = Some("node.crt".into());
        assert_eq!(field(&c), "tls.key_file");
        c.tls.key_file = Some("node.key".into());
        c.validate().unwrap();
        c.tls.client_auth = true;
        assert_eq!(field(&c), "tls.client_auth");
        c.tls.client_auth = false;
        // A cluster over TLS needs the CA that signs the other nodes' certificates.
        c.cluster.etcd = Some("etcd://127.0.0.1:2379".into());
        c.auth.insecure = true;
        assert_eq!(field(&c), "tls.ca_file");
        c.tls.ca_file = Some("ca.crt".into());
        c.validate().unwrap();
        c.scorer.endpoint = Some("http://127.0.0.1:7879".into());
        assert_eq!(field(&c), "scorer.endpoint");
        c.scorer.endpoint = Some("https://127.0.0.1:7879".into());
        c.validate().unwrap();
        c.tls = TlsConfig::default();
        assert_eq!(field(&c), "scorer.endpoint");
    }

    #[test]
    fn partial_files_keep_defaults() {
        let c: Config = toml::from_str("shards = 4\n[feed]\nmax_per_owner = 1\n").unwrap();
        assert_eq!(c.shards, 4);
        assert_eq!(c.feed.max_per_owner, 1);
        assert_eq!(c.feed.max_page_size, 100);
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut c = Config::default();
        c.rankings.insert("broken".into(), "2 * qualty".into());
        match c.validate() {
            Err(ConfigError::Invalid { field, reason }) => {
                assert_eq!(field, "rankings.broken");
                assert!(reason.contains("line 1, column 5"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let c = Config { shards: 0, ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field, .. }) if field == "shards"));
        assert!(toml::from_str::<Config>("shardz = 3").is_err(), "unknown fields are refused");
        let mut c = Config::default();
        c.debug.shard_delays_ms.insert("99".into(), 5);
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.scorer.model = "m".into();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field, .. }) if field == "scorer.model"));
        c.scorer.endpoint = Some("127.0.0.1:1".into());
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { field, .. }) if field == "scorer.endpoint")
        );
        c.scorer.endpoint = Some("http://127.0.0.1:1".into());
        c.validate().unwrap();
        c.scorer.candidates = 5000;
        assert!(c.validate().is_err());
    }
}
