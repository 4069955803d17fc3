//! Write routing: a batch is split per shard and each part goes to the shard's leader
//! (local or remote) at the epoch the broker knows; a replica that answers "not the
//! leader" or "another epoch" redirects the broker, which retries there at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use feedgraph_graph_store::WriteOutcome;
use feedgraph_model::{Ack, BoardId, FollowTarget, Mutation, UserId, shard_of};

use super::Broker;
use crate::shards::{ReadAfter, Replica, ShardDirectory, ShardWrite};
use crate::{Error, Result};

/// Redirects followed for one shard's part of a write before giving up.
const MAX_REDIRECTS: usize = 3;

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteResult {
    pub applied: usize,
    pub unknown_pins: usize,
    /// Per shard touched: (shard, epoch, latest sequence after the commit).
    pub commits: Vec<(u32, u64, u64)>,
}

/// Commits one shard's part on its leader, following redirects.
async fn write_shard(
    shards: Arc<dyn ShardDirectory>,
    shard: u32,
    mutations: Vec<Mutation>,
    ack: Ack,
) -> Result<WriteOutcome> {
    let mut redirects = 0;
    loop {
        let (replica, epoch) = shards
            .leader(shard)
            .ok_or_else(|| Error::Unavailable(format!("shard {shard}: no leader is known; retry")))?;
        let w = ShardWrite { mutations: mutations.clone(), ack, epoch };
        let (result, address) = match &replica {
            Replica::Local(l) => (l.write(w).await, None),
            Replica::Remote(r) => (r.write(w).await, Some(r.address().to_owned())),
        };
        match result {
            Err(Error::NotLeader { leader, epoch, .. }) if redirects < MAX_REDIRECTS => {
                if leader.is_none() {
                    // Being moved: give the placement a moment to settle.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                shards.redirect(shard, leader.as_deref(), epoch);
            }
            Err(Error::StaleEpoch { current, .. }) if redirects < MAX_REDIRECTS && current > epoch => {
                // The same replica leads at a newer epoch than the broker knew.
                shards.redirect(shard, address.as_deref(), current);
            }
            other => return other,
        }
        redirects += 1;
    }
}

impl Broker {
    /// Applies a validated batch: boards named by pins and board follows are checked
    /// first (nothing is written if one is missing), then each shard's part is
    /// committed atomically on its leader. A failure on one shard after another
    /// committed is reported as an error; the committed part stays (no cross-shard
    /// transactions).
    pub async fn write(&self, mutations: Vec<Mutation>, ack: Ack) -> Result<WriteResult> {
        let mutations: Vec<Mutation> =
            mutations.into_iter().flat_map(Mutation::split_impressions_by_owner).collect();
        self.check_boards(&mutations).await?;

        let count = self.shard_count();
        let mut per_shard: BTreeMap<u32, Vec<Mutation>> = BTreeMap::new();
        for m in mutations {
            // Every mutation left after the split names a user (an empty impression
            // list has nothing to route and nothing to do).
            let Some(user) = m.routing_user() else { continue };
            per_shard.entry(shard_of(user, count)).or_default().push(m);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (shard, muts) in per_shard {
            let shards = self.shards.clone();
            tasks.spawn(async move { (shard, write_shard(shards, shard, muts, ack).await) });
        }
        let mut result = WriteResult::default();
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((shard, Ok(outcome))) => {
                    self.note_write(shard, outcome.epoch, outcome.sequence);
                    result.applied += outcome.applied;
                    result.unknown_pins += outcome.unknown_pins;
                    result.commits.push((shard, outcome.epoch, outcome.sequence));
                }
                Ok((shard, Err(e))) => {
                    if let Error::NotConfirmed { epoch, sequence, .. } = &e {
                        // Committed on the leader: later reads through this broker see it.
                        self.note_write(shard, *epoch, *sequence);
                    }
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::Internal(format!("write task failed: {e}")));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        result.commits.sort_unstable();
        Ok(result)
    }

    /// Reads of `shard` through this broker must see this commit.
    fn note_write(&self, shard: u32, epoch: u64, sequence: u64) {
        if let Some(w) = self.written.get(shard as usize) {
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            *w = (*w).max(ReadAfter { epoch, sequence });
        }
    }

    /// Every pin's board and every followed board must exist on its owner's shard (or
    /// be created earlier in the same request), with that owner.
    async fn check_boards(&self, mutations: &[Mutation]) -> Result<()> {
        let mut created: HashMap<BoardId, UserId> = HashMap::new();
        let mut to_check: Vec<(BoardId, UserId, String)> = Vec::new();
        for (i, m) in mutations.iter().enumerate() {
            match m {
                Mutation::UpsertBoard(b) => {
                    created.insert(b.id, b.owner);
                }
                Mutation::UpsertPin(p) => {
                    to_check.push((p.board, p.owner, format!("mutations[{i}].upsert_pin.board_id")))
                }
                Mutation::Follow { target: FollowTarget::Board { board, owner }, .. } => {
                    to_check.push((*board, *owner, format!("mutations[{i}].follow.target.board")))
                }
                _ => {}
            }
        }
        to_check.retain(|(board, owner, _)| created.get(board) != Some(owner));
        if to_check.is_empty() {
            return Ok(());
        }
        // One read per shard, of every board it must hold.
        let count = self.shard_count();
        let mut per_shard: BTreeMap<u32, Vec<BoardId>> = BTreeMap::new();
        for (board, owner, _) in &to_check {
            let boards = per_shard.entry(shard_of(*owner, count)).or_default();
            if !boards.contains(board) {
                boards.push(*board);
            }
        }
        let mut stored: HashMap<(u32, BoardId), Option<UserId>> = HashMap::new();
        for (shard, boards) in per_shard {
            let owners = self.board_owners(shard, boards.clone()).await?;
            stored.extend(boards.into_iter().zip(owners).map(|(b, o)| ((shard, b), o)));
        }
        for (board, owner, field) in to_check {
            if let Some(claimed) = created.get(&board) {
                return Err(Error::InvalidArgument {
                    field,
                    reason: format!(
                        "board {board} is created in this request for user {claimed}, not {owner}"
                    ),
                });
            }
            match stored.get(&(shard_of(owner, count), board)).copied().flatten() {
                None => return Err(Error::NotFound(format!("board {board} of user {owner} ({field})"))),
                Some(actual) if actual != owner => {
                    return Err(Error::InvalidArgument {
                        field,
                        reason: format!("board {board} belongs to user {actual}, not {owner}"),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}
