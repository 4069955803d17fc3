//! Point reads of one shard — the viewer's follows and engaged topics, pins, board
//! owners — from the first replica that can serve them (a local one first), failing
//! over to the next on any error that another replica may not have.

use std::collections::HashSet;
use std::sync::Arc;

use feedgraph_graph_store::{Follows, PinRecord, Shard};
use feedgraph_model::{BoardId, PinRef, TopicId, UserId, shard_of};

use super::{Broker, blocking};
use crate::query;
use crate::shards::{BoxFuture, ReadAfter, RemoteReplica, Replica};
use crate::{Error, Result};

/// Errors of the request itself: another replica would answer the same.
fn final_error(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument { .. } | Error::NotFound(_))
}

impl Broker {
    /// Reads `shard` with `local` (on the blocking pool) or `remote`, from the first
    /// replica that serves it.
    async fn read_shard<T: Send + 'static>(
        &self,
        shard: u32,
        local: impl Fn(&Shard) -> Result<T> + Clone + Send + 'static,
        remote: impl for<'a> Fn(&'a dyn RemoteReplica, ReadAfter) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        let after = self.read_after(shard);
        let mut last = None;
        for replica in self.shards.readers(shard) {
            let result = match &replica {
                Replica::Local(l) => match l.readable(after) {
                    Ok(store) => {
                        let f = local.clone();
                        blocking(move || f(&store)).await
                    }
                    Err(e) => Err(e),
                },
                Replica::Remote(r) => remote(r.as_ref(), after).await,
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if final_error(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(shard, error = %e, "replica could not serve a read; trying the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable(format!("shard {shard}: no replica serves reads"))))
    }

    /// A user's follow lists (cached by the user's shard until their next follow or
    /// block change).
    pub async fn follows_of(&self, user: UserId) -> Result<Arc<Follows>> {
        let shard = shard_of(user, self.shard_count());
        // A cached list from a readable local replica needs no trip to the blocking pool.
        if let Some(Replica::Local(l)) = self.shards.readers(shard).first()
            && let Ok(store) = l.readable(self.read_after(shard))
            && let Some(follows) = store.follows_if_cached(user)
        {
            return Ok(follows);
        }
        self.read_shard(shard, move |s| Ok(s.follows_cached(user)?), move |r, after| r.follows(user, after))
            .await
    }

    /// A pin with its flags; `None` when its owner's shard does not hold it.
    pub async fn pin(&self, pin: PinRef) -> Result<Option<PinRecord>> {
        let shard = shard_of(pin.owner, self.shard_count());
        self.read_shard(
            shard,
            move |s| Ok(s.pin(pin.pin)?.map(|(_, r)| r).filter(|r| r.owner == pin.owner)),
            move |r, after| r.pin(pin, after),
        )
        .await
    }

    /// Owners of `boards` on `shard`, in order.
    pub(super) async fn board_owners(&self, shard: u32, boards: Vec<BoardId>) -> Result<Vec<Option<UserId>>> {
        let local_boards = boards.clone();
        self.read_shard(
            shard,
            move |s| local_boards.iter().map(|b| Ok(s.board(*b)?.map(|b| b.owner))).collect(),
            move |r, after| r.board_owners(boards.clone(), after),
        )
        .await
    }

    /// Topics of the user's newest own pins (their saves), most frequent first,
    /// excluding `exclude`.
    pub(super) async fn engaged_topics(&self, user: UserId, exclude: &[TopicId]) -> Result<Vec<TopicId>> {
        let shard = shard_of(user, self.shard_count());
        let recent = self.cfg.engaged_recent_pins;
        let counts = self
            .read_shard(
                shard,
                move |s| query::engaged_topic_counts(s, user, recent),
                move |r, after| r.engaged_topics(user, recent, after),
            )
            .await?;
        let exclude: HashSet<TopicId> = exclude.iter().copied().collect();
        let mut topics: Vec<(TopicId, u32)> =
            counts.into_iter().filter(|(t, _)| !exclude.contains(t)).collect();
        topics.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(topics.into_iter().take(self.cfg.engaged_topics).map(|(t, _)| t).collect())
    }
}
