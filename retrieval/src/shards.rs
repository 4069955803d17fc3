//! The seam between the broker and the shards. The broker reaches every shard through
//! a [`ShardDirectory`], which names the shard's replicas in the order to read them and
//! its leader for writes. A replica is either in this process ([`LocalReplica`]: the
//! broker scans it in its lanes and reads it on the blocking pool) or on another node
//! ([`RemoteReplica`]: one RPC per call, with its own deadline). Replication, epochs
//! and the wire live behind these traits (`cluster`, `server`); [`LocalShards`] is the
//! standalone directory: every shard a local leader, no replication.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use feedgraph_graph_store::{Follows, PinRecord, Shard, WriteOutcome};
use feedgraph_model::{Ack, BoardId, Mutation, PinRef, TopicId, UserId};

use crate::query::{CandidateQuery, ShardAnswer};
use crate::{Error, Result};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How fresh a replica must be to serve a read: `sequence` of `epoch` applied (any
/// position in a later epoch will do). The broker asks each shard for the newest write
/// it committed there, so that its own writes are visible to its next reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadAfter {
    pub epoch: u64,
    pub sequence: u64,
}

/// One shard's part of a write, for its leader.
#[derive(Clone, Debug)]
pub struct ShardWrite {
    pub mutations: Vec<Mutation>,
    pub ack: Ack,
    /// The epoch the broker believes the leader has; another is refused.
    pub epoch: u64,
}

/// A replica in this process.
pub trait LocalReplica: Send + Sync + Debug {
    /// The store to read, when this replica serves reads and has applied `after`
    /// ([`Error::Behind`] or [`Error::Unavailable`] otherwise: try another replica).
    fn readable(&self, after: ReadAfter) -> Result<Arc<Shard>>;
    /// Commits a write here, if this replica leads at `w.epoch`.
    fn write(&self, w: ShardWrite) -> BoxFuture<'_, Result<WriteOutcome>>;
}

/// A replica on another node.
pub trait RemoteReplica: Send + Sync + Debug {
    /// The node's address (`host:port`).
    fn address(&self) -> &str;
    fn candidates(
        &self,
        q: CandidateQuery,
        after: ReadAfter,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ShardAnswer>>;
    /// The candidate queries of several shards this replica's node holds, in one
    /// request: one round trip, and scans under one shared floor when `share_floors`.
    /// Per query, in order, its answer or its own error; `Err`: the request as a whole
    /// failed.
    fn node_candidates(
        &self,
        queries: Vec<(u32, CandidateQuery, ReadAfter)>,
        share_floors: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Result<ShardAnswer>>>>;
    fn write(&self, w: ShardWrite) -> BoxFuture<'_, Result<WriteOutcome>>;
    fn follows(&self, user: UserId, after: ReadAfter) -> BoxFuture<'_, Result<Arc<Follows>>>;
    fn pin(&self, pin: PinRef, after: ReadAfter) -> BoxFuture<'_, Result<Option<PinRecord>>>;
    /// Owners of boards, in order (`None`: the shard does not hold the board).
    fn board_owners(
        &self,
        boards: Vec<BoardId>,
        after: ReadAfter,
    ) -> BoxFuture<'_, Result<Vec<Option<UserId>>>>;
    fn engaged_topics(
        &self,
        user: UserId,
        recent: usize,
        after: ReadAfter,
    ) -> BoxFuture<'_, Result<Vec<(TopicId, u32)>>>;
}

/// A replica of a shard, as the broker reaches it.
#[derive(Clone, Debug)]
pub enum Replica {
    Local(Arc<dyn LocalReplica>),
    Remote(Arc<dyn RemoteReplica>),
}

/// Where every shard's replicas are.
pub trait ShardDirectory: Send + Sync + Debug {
    fn shard_count(&self) -> u32;
    /// The replicas of `shard` to read from, in the order to try them (a local one
    /// first).
    fn readers(&self, shard: u32) -> Vec<Replica>;
    /// The leader of `shard` and its epoch, as far as this node knows.
    fn leader(&self, shard: u32) -> Option<(Replica, u64)>;
    /// A replica answered that `leader` leads `shard` at `epoch` (or that it does not
    /// know who does): use it from now on.
    fn redirect(&self, shard: u32, leader: Option<&str>, epoch: u64);
    /// No work outside the directory holds a local store (so it can be reopened).
    fn idle(&self) -> bool;
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// A shard in this process with no replication: it leads at the newest epoch of its
/// history (0 unless it was once replicated).
#[derive(Debug)]
pub struct StandaloneReplica {
    shard: Arc<Shard>,
}

impl LocalReplica for StandaloneReplica {
    fn readable(&self, _after: ReadAfter) -> Result<Arc<Shard>> {
        Ok(self.shard.clone())
    }

    fn write(&self, w: ShardWrite) -> BoxFuture<'_, Result<WriteOutcome>> {
        let shard = self.shard.clone();
        Box::pin(async move {
            if w.ack == Ack::SemiSync {
                return Err(Error::FailedPrecondition(format!(
                    "shard {}: ack SEMI_SYNC needs follower replicas; this node serves the shard without replication",
                    shard.id()
                )));
            }
            let id = shard.id();
            blocking(move || {
                shard.write_at(w.epoch, &w.mutations, w.ack.local_durability()).map_err(|e| match e {
                    feedgraph_graph_store::Error::StaleEpoch { given, current } => {
                        Error::StaleEpoch { shard: id, given, current }
                    }
                    other => Error::Store(other),
                })
            })
            .await
        })
    }
}

/// The standalone directory: `shards[i]` holds shard `i`, each a local leader.
#[derive(Debug)]
pub struct LocalShards {
    shards: Vec<Arc<StandaloneReplica>>,
}

impl LocalShards {
    /// `shards[i]` must hold logical shard `i`.
    pub fn new(shards: Vec<Arc<Shard>>) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::FailedPrecondition("a broker needs at least one shard".into()));
        }
        if let Some((i, s)) = shards.iter().enumerate().find(|(i, s)| s.id() as usize != *i) {
            return Err(Error::FailedPrecondition(format!("shard at position {i} holds shard {}", s.id())));
        }
        Ok(Self { shards: shards.into_iter().map(|shard| Arc::new(StandaloneReplica { shard })).collect() })
    }
}

impl ShardDirectory for LocalShards {
    fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn readers(&self, shard: u32) -> Vec<Replica> {
        self.shards.get(shard as usize).map(|s| Replica::Local(s.clone())).into_iter().collect()
    }

    fn leader(&self, shard: u32) -> Option<(Replica, u64)> {
        let s = self.shards.get(shard as usize)?;
        let epoch = s.shard.writable_epoch()?;
        Some((Replica::Local(s.clone()), epoch))
    }

    fn redirect(&self, _shard: u32, _leader: Option<&str>, _epoch: u64) {}

    fn idle(&self) -> bool {
        self.shards.iter().all(|s| Arc::strong_count(&s.shard) == 1)
    }
}
