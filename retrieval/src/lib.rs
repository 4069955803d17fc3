//! Retrieval for feedgraph: the shard-local candidate query and the broker.
//!
//! Owns: the candidate query run next to the data ([`query`]: OR of followed users' /
//! boards' / topics' bitmaps → AND-NOT filters and seen pins → newest-first scan with a
//! work bound → drop blocked owners → light score → top-K per group);
//! the broker ([`broker`]: write routing, follows cache, scatter with deadlines, gather,
//! merge, ML re-ranking of the head with a deadline and a light-score fallback,
//! home-feed blending, diversity caps, rankings cached for pagination); the features
//! sent to the ML scorer ([`features`]); the pure ranking steps ([`rank`]); and
//! authenticated cursors ([`cursor`]).
//!
//! Invariants: speaks `feedgraph-model` types only (prost stops in `proto` and
//! `server`); never blocks the async executor — every RocksDB call runs on the blocking
//! pool; a shard that misses its deadline makes a page partial and flagged, never an
//! error; so does a scorer that fails or misses its deadline (light-score fallback); pages of one ranking concatenate to one list without duplicates.

pub mod broker;
pub mod cursor;
pub mod features;
pub mod query;
pub mod rank;

pub use broker::{
    Broker, BrokerConfig, FallbackReason, FeedPage, FeedStats, ModelRanking, Scoring, WriteResult,
};
pub use cursor::FeedKind;
pub use query::{Candidate, Source};

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
    /// A shard operation failed.
    #[error(transparent)]
    Store(#[from] feedgraph_graph_store::Error),
    /// A task died; a bug, not the request's fault.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
