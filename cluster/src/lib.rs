//! Shard replicas on a node, and replication between nodes.
//!
//! Owns: the placement of replicas ([`placement`]: given by hand today; the cluster
//! manager will compute it), the replica state model ([`Role`]: `OFFLINE`, `FOLLOWER`
//! of a leader at an epoch, `LEADER` at an epoch — persisted with the newest epoch
//! accepted), the replicas a node holds ([`Replicas`], [`Replica`]), leader → follower
//! log shipping (a long-poll pull with the log-prefix check; semi-sync
//! acknowledgements), checkpoint bootstrap (streamed, verified, resumable, swapped in
//! while other replicas serve), the `ReplicationService` and `AdminService` every
//! node serves ([`service`]), and the cluster manager on etcd ([`manager`]: leases,
//! controller election, the shard map, failover, drains).
//!
//! Invariants:
//! - A replica never accepts an epoch older than one it accepted; a leader writes only
//!   at its epoch and a follower takes only its leader's log at its epoch (fencing).
//! - A follower's log is always a prefix of its leader's: shipping continues only after
//!   the prefix check (lineage, layout, the epoch that wrote the follower's last
//!   sequence); a position the leader's WAL no longer reaches, or a log that ran past
//!   the leader's, is rebuilt from a checkpoint — never skipped, never merged.
//! - An acknowledged semi-sync write has been applied by at least one follower of the
//!   leader's term.
//! - The async executor never blocks: RocksDB and file work run on the blocking pool.

mod checkpoint;
mod follower;
#[doc(hidden)]
pub mod fuzz_targets;
mod leader;
pub mod manager;
pub mod net;
pub mod placement;
mod replica;
mod replicas;
mod role;
pub mod service;

use std::time::Duration;

pub use placement::{Placement, ShardPlacement};
pub use replica::{Replica, ReplicaStatus};
pub use replicas::{NodeSetup, Replicas, StoreOptions};
pub use role::Role;

/// Replication settings of a node.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// How long a follower's `GetUpdates` waits at the leader for a new write.
    pub poll_wait: Duration,
    /// WAL bytes per `GetUpdates` answer, about (at least one batch is sent).
    pub max_batch_bytes: usize,
    /// How long a `SEMI_SYNC` write waits for a follower to apply it.
    pub semi_sync_timeout: Duration,
    /// Checkpoint stream chunk size.
    pub checkpoint_chunk_bytes: usize,
    /// How long the leader keeps an unused checkpoint for a follower to resume.
    pub checkpoint_ttl: Duration,
    /// A follower further behind its leader than this is logged (once, until it
    /// catches up).
    pub lag_warn: Duration,
    /// Fault injection: the first checkpoint stream this node serves breaks after this
    /// many bytes (tests of resumption).
    pub break_checkpoint_after_bytes: Option<u64>,
    /// What this node's requests to its leaders carry (its admin token, when the
    /// cluster has tokens; TLS settings, when it uses TLS).
    pub credentials: feedgraph_proto::auth::Credentials,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            poll_wait: Duration::from_millis(500),
            max_batch_bytes: 4 << 20,
            semi_sync_timeout: Duration::from_millis(1000),
            checkpoint_chunk_bytes: 1 << 20,
            checkpoint_ttl: Duration::from_secs(600),
            lag_warn: Duration::from_secs(5),
            break_checkpoint_after_bytes: None,
            credentials: feedgraph_proto::auth::Credentials::none(),
        }
    }
}

/// How fresh a replica must be to serve a read: `sequence` of `epoch` applied, or any
/// position in a later epoch. The default asks nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadAfter {
    pub epoch: u64,
    pub sequence: u64,
}

/// Everything replica management can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] feedgraph_graph_store::Error),

    /// This replica does not lead the shard; `leader` does, when known.
    #[error("shard {shard}: this replica is not the leader{}", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { shard: u32, leader: Option<String>, epoch: u64 },

    /// The request named an epoch other than the replica's.
    #[error("shard {shard}: epoch {given} is not this replica's epoch {current}")]
    StaleEpoch { shard: u32, given: u64, current: u64 },

    /// A promotion at an epoch this replica already accepted: a new leader needs a
    /// new epoch, or two leaders could write under one.
    #[error(
        "shard {shard}: a new leader needs an epoch above {promised} (the newest this replica accepted), not {given}"
    )]
    EpochNotNewer { shard: u32, given: u64, promised: u64 },

    /// A standalone shard (epoch 0) has no followers to replicate to.
    #[error(
        "shard {shard} is standalone (epoch 0): make it a leader at an epoch of at least 1 to replicate it or write SEMI_SYNC"
    )]
    Standalone { shard: u32 },

    /// A semi-sync write committed on the leader, but no follower applied it in time.
    #[error(
        "shard {shard}: the write is committed on the leader (epoch {epoch}, sequence {sequence}) but no follower confirmed it within {waited:?}; it may be lost if the leader fails now"
    )]
    NotConfirmed { shard: u32, epoch: u64, sequence: u64, waited: Duration },

    /// The node holds no replica of the shard.
    #[error("shard {shard}: this node holds no replica of it")]
    NoReplica { shard: u32 },

    /// The replica has no data yet (a follower still bootstrapping).
    #[error("shard {shard}: this replica has no data yet")]
    NoData { shard: u32 },

    /// The replica does not serve reads now.
    #[error("shard {shard}: this replica does not serve reads now ({state})")]
    Unreadable { shard: u32, state: String },

    /// The replica has not applied what the read must see.
    #[error("shard {shard}: this replica is behind the read's position")]
    Behind { shard: u32 },

    #[error("placement: {0}")]
    Placement(String),

    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// Talking to another node failed.
    #[error("{0}")]
    Remote(String),

    /// Another node refused this node's token (`UNAUTHENTICATED` or
    /// `PERMISSION_DENIED`): a configuration fault that no retry cures.
    #[error("refused: {0} (this node's admin token is not one the other node accepts)")]
    Unauthorized(String),

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },

    /// The node is shutting down.
    #[error("shutting down")]
    Shutdown,

    /// etcd could not be reached or holds something unexpected.
    #[error("cluster coordination: {0}")]
    Coordination(String),

    /// This node's controller lost its election while acting.
    #[error("no longer the controller")]
    Deposed,

    /// A task died; a bug, not the request's fault.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// A failed call to another node, typed by why it failed.
    pub(crate) fn remote(status: &tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Error::Unauthorized(status.message().to_owned())
            }
            _ => Error::Remote(status.message().to_owned()),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs blocking work (RocksDB, files) on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
