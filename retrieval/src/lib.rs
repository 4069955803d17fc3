//! Retrieval for feedgraph: the shard-local candidate query and the broker.
//!
//! Owns: the candidate query run next to the data ([`query`]: OR of followed users' /
//! boards' / topics' bitmaps → AND-NOT filters and seen pins → newest-first scan with a
//! work bound below the shard's published watermark → drop blocked owners → light
//! score → top-K per group); the seam through which the broker reaches shards
//! ([`shards`]: a directory of local and remote replicas, leaders for writes); the
//! broker ([`broker`]: write routing to leaders with redirects, the viewer's context,
//! scatter with deadlines to local lanes and remote replicas with failover, gather,
//! merge, ML re-ranking of the head with a deadline and a light-score fallback,
//! home-feed blending, diversity caps, rankings cached for pagination); the features
//! sent to the ML scorer ([`features`]); the pure ranking steps ([`rank`]); and
//! authenticated cursors ([`cursor`]).
//!
//! Invariants: speaks `feedgraph-model` types only (prost stops in `proto` and
//! `server`); never blocks the async executor — every RocksDB call runs on the blocking
//! pool; a shard that misses its deadline (or whose replicas all fail) makes a page
//! partial and flagged, never an error; so does a scorer that fails or misses its
//! deadline (light-score fallback); pages of one ranking concatenate to one list
//! without duplicates; a broker's reads see the writes it committed.

pub mod broker;
pub mod cursor;
pub mod features;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod query;
pub mod rank;
pub mod shards;

pub use broker::{
    AdmissionConfig, AdmissionStats, Broker, BrokerConfig, FallbackReason, FeedPage, FeedStats, ModelRanking,
    Scoring, WriteResult,
};
pub use cursor::FeedKind;
pub use query::{Candidate, ScanControl, Source};
pub use shards::{LocalReplica, LocalShards, ReadAfter, RemoteReplica, Replica, ShardDirectory, ShardWrite};

/// Everything the broker can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid field `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// Something the request names does not exist (a pin's board, a followed board).
    #[error("not found: {0}")]
    NotFound(String),
    /// The service is not in a state to do this (for example semi-sync without
    /// replicas).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The replica asked does not lead the shard; `leader` does, when known.
    #[error("shard {shard}: not the leader{}", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { shard: u32, leader: Option<String>, epoch: u64 },
    /// The write named another epoch than the leader's.
    #[error("shard {shard}: epoch {given} is not the leader's epoch {current}")]
    StaleEpoch { shard: u32, given: u64, current: u64 },
    /// The replica asked has not applied what the read must see.
    #[error("shard {shard}: the replica is behind the read's position")]
    Behind { shard: u32 },
    /// No replica could serve the request now.
    #[error("{0}")]
    Unavailable(String),
    /// A semi-sync write committed on the leader but no follower confirmed it in time.
    #[error("{detail}")]
    NotConfirmed { shard: u32, epoch: u64, sequence: u64, detail: String },
    /// A shard operation failed.
    #[error(transparent)]
    Store(#[from] feedgraph_graph_store::Error),
    /// Too many rankings in progress and queued: shed at once rather than queued behind
    /// work that cannot finish in time. Retry after `retry_after`.
    #[error(
        "overloaded: {in_progress} rankings in progress and {queued} queued; retry after {} ms",
        retry_after.as_millis()
    )]
    Overloaded { in_progress: usize, queued: usize, retry_after: std::time::Duration },
    /// The request was cancelled (its client went away) or passed its deadline; its
    /// work stopped.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A task died; a bug, not the request's fault.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
