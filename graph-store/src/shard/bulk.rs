//! Bulk load: a large import in chunked write batches that replicate through the
//! ordinary log (see ARCHITECTURE.md for why not SST ingestion).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use feedgraph_model::{Board, BoardId, Durability, FollowTarget, Pin, PinId, User, UserId};
use rocksdb::WriteBatch;

use crate::bitmap;
use crate::record::{PinRecord, encode_board, ordinal_key, u32_key, u64_key};
use crate::{Error, Result};

use super::Shard;
use super::schema::{Cf, META_NEXT_ORDINAL};
use super::write::{Effects, follow_entry};

/// A large import: users, boards, pins (any order: the loader sorts pins by creation
/// time so that ordinals follow time) and follows.
#[derive(Clone, Debug, Default)]
pub struct BulkLoad {
    pub users: Vec<User>,
    pub boards: Vec<Board>,
    pub pins: Vec<Pin>,
    pub follows: Vec<(UserId, FollowTarget)>,
}

impl BulkLoad {
    /// Cuts the load into one per shard of `shards`: each user, board, pin and follow
    /// on its owner's shard (`feedgraph_model::shard_of`).
    pub fn split_by_shard(self, shards: u32) -> Vec<BulkLoad> {
        use feedgraph_model::shard_of;
        let mut loads: Vec<BulkLoad> = (0..shards).map(|_| BulkLoad::default()).collect();
        for u in self.users {
            loads[shard_of(u.id, shards) as usize].users.push(u);
        }
        for b in self.boards {
            loads[shard_of(b.owner, shards) as usize].boards.push(b);
        }
        for p in self.pins {
            loads[shard_of(p.owner, shards) as usize].pins.push(p);
        }
        for (follower, target) in self.follows {
            loads[shard_of(follower, shards) as usize].follows.push((follower, target));
        }
        loads
    }
}

/// Progress of a bulk load, reported after each committed chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkProgress {
    pub pins_done: u64,
    pub pins_total: u64,
    pub edges_written: u64,
}

/// What a bulk load did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BulkLoadStats {
    pub pins_loaded: u64,
    /// Pins already on the shard, or repeated in the load; left unchanged.
    pub pins_skipped: u64,
    /// Adjacency entries written: pin→user, pin→board, pin→topic, and follows.
    pub edges_written: u64,
    pub elapsed: Duration,
}

impl Shard {
    /// Imports a large data set in chunks of `chunk_pins` pins, each chunk one atomic
    /// `WriteBatch` holding complete pins with all their edges (so a crash leaves a
    /// consistent prefix), and fsyncs the WAL at the end. Pins are sorted by creation
    /// time first so that ordinals follow time. Pins already on the shard are skipped
    /// (use [`Shard::write`] to update them). The whole load is validated before the
    /// first chunk is written. Only a shard that accepts writes (a leader) loads.
    pub fn bulk_load(
        &self,
        load: BulkLoad,
        chunk_pins: usize,
        progress: &mut dyn FnMut(&BulkProgress),
    ) -> Result<BulkLoadStats> {
        let started = Instant::now();
        let BulkLoad { users, boards, mut pins, follows } = load;
        let chunk_pins = chunk_pins.max(1);

        // Validate: every pin's board exists (in the load or on the shard) with the
        // pin's owner.
        let mut board_owner: HashMap<BoardId, UserId> = boards.iter().map(|b| (b.id, b.owner)).collect();
        for b in &boards {
            if let Some((owner, _)) = self.board_record(b.id)? {
                Error::check_owner(|| format!("board {}", b.id), owner, b.owner)?;
            }
        }
        for p in &pins {
            let owner = match board_owner.get(&p.board) {
                Some(o) => *o,
                None => match self.board_record(p.board)? {
                    Some((o, _)) => {
                        board_owner.insert(p.board, o);
                        o
                    }
                    None => return Err(Error::BoardNotFound(p.board)),
                },
            };
            Error::check_owner(|| format!("board {} of pin {}", p.board, p.id), owner, p.owner)?;
        }

        pins.sort_by_key(|p| (p.created_at_ms, p.id));
        let pins_total = pins.len() as u64;
        // Ids repeated within the load (rare): only the first occurrence is loaded.
        let duplicate_ids: HashSet<PinId> = {
            let mut ids: Vec<PinId> = pins.iter().map(|p| p.id).collect();
            ids.sort_unstable();
            ids.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect()
        };
        let mut first_of_duplicates: HashSet<PinId> = HashSet::new();
        let mut stats =
            BulkLoadStats { pins_loaded: 0, pins_skipped: 0, edges_written: 0, elapsed: Duration::ZERO };

        let mut writer = self.lock_writer();
        writer.check_writable(None)?;
        let shard_was_empty = writer.next_ordinal == 0;

        // Users, boards and follows go in the first batch.
        let mut batch = WriteBatch::default();
        let mut effects = Effects::default();
        for u in &users {
            batch.put_cf(self.cf(Cf::Users), u64_key(u.id.get()), u.username.as_bytes());
        }
        for b in &boards {
            batch.put_cf(self.cf(Cf::Boards), u64_key(b.id.get()), encode_board(b.owner, &b.name));
        }
        for (follower, target) in &follows {
            let (key, value) = follow_entry(*follower, *target);
            batch.put_cf(self.cf(Cf::Follows), key, value);
            effects.follow_users.insert(*follower);
            stats.edges_written += 1;
        }

        let mut done = 0u64;
        for chunk in pins.chunks(chunk_pins) {
            let existing: Vec<bool> = if shard_was_empty {
                vec![false; chunk.len()]
            } else {
                let keys: Vec<[u8; 8]> = chunk.iter().map(|p| u64_key(p.id.get())).collect();
                self.db
                    .batched_multi_get_cf(self.cf(Cf::PinIds), keys.iter(), false)
                    .into_iter()
                    .map(|r| r.map(|v| v.is_some()))
                    .collect::<std::result::Result<_, _>>()?
            };
            // Edges aggregated per key; ordinals ascend within a chunk, so each list is
            // sorted. Keys are emitted sorted too: RocksDB's skiplist inserts sorted
            // keys through its sequential-insert fast path.
            let mut user_edges: HashMap<u64, Vec<u32>> = HashMap::new();
            let mut board_edges: HashMap<u64, Vec<u32>> = HashMap::new();
            let mut topic_edges: HashMap<u32, Vec<u32>> = HashMap::new();
            let mut id_entries: Vec<(u64, u32)> = Vec::with_capacity(chunk.len());
            let mut next = writer.next_ordinal;
            for (p, exists) in chunk.iter().zip(existing) {
                if exists || (duplicate_ids.contains(&p.id) && !first_of_duplicates.insert(p.id)) {
                    stats.pins_skipped += 1;
                    continue;
                }
                let ordinal = next;
                next = next
                    .checked_add(1)
                    .filter(|n| *n < u32::MAX)
                    .ok_or(Error::OrdinalsExhausted { shard: self.id })?;
                let rec = PinRecord::new_live(p);
                batch.put_cf(self.cf(Cf::Pins), ordinal_key(ordinal), rec.encode());
                id_entries.push((p.id.get(), ordinal));
                user_edges.entry(p.owner.get()).or_default().push(ordinal);
                board_edges.entry(p.board.get()).or_default().push(ordinal);
                for t in &p.topics {
                    topic_edges.entry(t.get()).or_default().push(ordinal);
                }
                stats.edges_written += 2 + p.topics.len() as u64;
                effects.records.insert(ordinal, rec);
            }
            id_entries.sort_unstable();
            for (id, ordinal) in id_entries {
                batch.put_cf(self.cf(Cf::PinIds), u64_key(id), ordinal.to_le_bytes());
            }
            let mut keys = BTreeSet::new();
            for (cf, edges) in [(Cf::UserPins, user_edges), (Cf::BoardPins, board_edges)] {
                let mut edges: Vec<(u64, Vec<u32>)> = edges.into_iter().collect();
                edges.sort_unstable_by_key(|(k, _)| *k);
                for (key, ordinals) in edges {
                    batch.merge_cf(self.cf(cf), u64_key(key), bitmap::encode_sorted_additions(&ordinals));
                    keys.insert((cf, u64_key(key).to_vec()));
                }
            }
            let mut topic_edges: Vec<(u32, Vec<u32>)> = topic_edges.into_iter().collect();
            topic_edges.sort_unstable_by_key(|(k, _)| *k);
            for (key, ordinals) in topic_edges {
                batch.merge_cf(
                    self.cf(Cf::TopicPins),
                    u32_key(key),
                    bitmap::encode_sorted_additions(&ordinals),
                );
                keys.insert((Cf::TopicPins, u32_key(key).to_vec()));
            }
            batch.put_cf(self.cf(Cf::Meta), META_NEXT_ORDINAL, u64::from(next).to_le_bytes());
            effects.bitmap_keys = keys;
            effects.next_ordinal = Some(next);
            let loaded = effects.records.len() as u64;
            self.apply(
                &mut writer,
                std::mem::take(&mut batch),
                &std::mem::take(&mut effects),
                Durability::Buffered,
            )?;
            stats.pins_loaded += loaded;
            done += chunk.len() as u64;
            progress(&BulkProgress { pins_done: done, pins_total, edges_written: stats.edges_written });
        }
        // The final (possibly pin-less) batch, synced: it makes every earlier chunk
        // durable too, since the WAL is sequential.
        self.apply(&mut writer, batch, &effects, Durability::Sync)?;
        if pins.is_empty() {
            progress(&BulkProgress { pins_done: 0, pins_total: 0, edges_written: stats.edges_written });
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}
