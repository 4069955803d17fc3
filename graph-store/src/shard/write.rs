//! The one write path of a shard, shared by the leader and its followers:
//!
//! - on the leader, [`prepare`] turns mutations into a `WriteBatch` and the [`Effects`]
//!   it will have beyond RocksDB (attribute rows, next ordinal, cache invalidations,
//!   epoch history);
//! - on a follower, [`Effects::decode`] recovers the same effects from the shipped
//!   batch itself (it names every pin record, bitmap key and follow entry it writes);
//! - both then go through [`Shard::apply`], which publishes the new ordinal watermark
//!   last.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use feedgraph_model::{BoardId, Durability, FollowTarget, Mutation, Pin, PinFlag, PinId, PinRef, UserId};
use rocksdb::{WriteBatch, WriteBatchIteratorCf};

use crate::bitmap::{self, Delta};
use crate::record::{
    EdgeKind, FilterKind, PinRecord, decode_board, decode_follow_key, decode_ordinal, encode_board,
    follow_key, ordinal_key, u32_key, u64_key,
};
use crate::{Error, Result};

use super::epochs::EpochHistory;
use super::replication::BATCH_HEADER;
use super::schema::{Cf, CfIds, META_EPOCHS, META_NEXT_ORDINAL};
use super::seen::{self, seen_key};
use super::{Shard, WriterState};

/// What a committed batch changes in memory, beyond RocksDB.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Effects {
    /// Pin records written, by ordinal (the last one wins within a batch).
    pub(crate) records: BTreeMap<u32, PinRecord>,
    /// The stored next ordinal, when the batch changed it.
    pub(crate) next_ordinal: Option<u32>,
    /// Bitmap keys changed (cache invalidation).
    pub(crate) bitmap_keys: BTreeSet<(Cf, Vec<u8>)>,
    /// Users whose follow or block lists changed (cache invalidation).
    pub(crate) follow_users: BTreeSet<UserId>,
    /// The epoch history, when the batch starts an epoch.
    pub(crate) epochs: Option<EpochHistory>,
}

impl Effects {
    /// Recovers the effects of a batch from its operations, and checks that it is a batch
    /// this code could have written: every operation a put, delete or merge into a
    /// family that takes it, every key and value decoding as its reader decodes it, the
    /// header's operation count, and nothing after the last operation. A batch that
    /// fails is refused before anything is written: RocksDB would take it and then fail
    /// on it (a merge into a family without a merge operator, trailing bytes, a value
    /// that does not decode), which would fence the replica as a bad disk instead of
    /// having it rebuilt from its leader.
    pub(crate) fn decode(batch: &WriteBatch, ids: &CfIds, count: u64) -> Result<Effects> {
        struct Decoder<'a> {
            ids: &'a CfIds,
            effects: Effects,
            error: Option<String>,
            ops: u64,
            /// What the operations seen take in a batch body, encoded as RocksDB does.
            encoded_len: usize,
        }
        impl Decoder<'_> {
            fn op(&mut self, cf_id: u32, key: &[u8], value: Option<&[u8]>, merge: bool) {
                self.ops += 1;
                self.encoded_len += encoded_op_len(cf_id, key, value);
                if self.error.is_some() {
                    return;
                }
                let Some(cf) = self.ids.get(cf_id) else {
                    self.error = Some(format!("names column family id {cf_id}, unknown here"));
                    return;
                };
                if let Err(what) = self.check(cf, key, value, merge) {
                    let key: String = key.iter().take(32).map(|b| format!("{b:02x}")).collect();
                    self.error = Some(format!("{what} (family {}, key {key})", cf.name()));
                }
            }

            fn check(
                &mut self,
                cf: Cf,
                key: &[u8],
                value: Option<&[u8]>,
                merge: bool,
            ) -> Result<(), &'static str> {
                let op = match (value, merge) {
                    (None, _) => Op::Delete,
                    (Some(v), false) => Op::Put(v),
                    (Some(v), true) => Op::Merge(v),
                };
                match (cf, op) {
                    (Cf::Pins, Op::Put(value)) => {
                        let ordinal = decode_ordinal(key).ok_or("bad ordinal key")?;
                        let record = PinRecord::decode(value).ok_or("bad pin record")?;
                        self.effects.records.insert(ordinal, record);
                    }
                    (Cf::Pins, _) => return Err("deletes or merges a pin record"),
                    (Cf::Meta, Op::Put(value)) if key == META_NEXT_ORDINAL => {
                        let next = value
                            .try_into()
                            .ok()
                            .map(u64::from_le_bytes)
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or("bad next ordinal")?;
                        self.effects.next_ordinal = Some(next);
                    }
                    (Cf::Meta, Op::Put(value)) if key == META_EPOCHS => {
                        self.effects.epochs = Some(EpochHistory::decode(value).ok_or("bad epoch history")?);
                    }
                    // The shard's identity, schema and lineage are written once, at its
                    // creation; a batch never changes them.
                    (Cf::Meta, _) => return Err("writes shard metadata a batch never writes"),
                    (Cf::PinIds, Op::Put(value)) if key.len() == 8 && value.len() == 4 => {}
                    (Cf::PinIds, Op::Delete) if key.len() == 8 => {}
                    (Cf::PinIds, _) => return Err("bad pin id entry"),
                    (Cf::Users, Op::Put(value)) if key.len() == 8 && std::str::from_utf8(value).is_ok() => {}
                    (Cf::Users, Op::Delete) if key.len() == 8 => {}
                    (Cf::Users, _) => return Err("bad user record"),
                    (Cf::Boards, Op::Put(value)) if key.len() == 8 && decode_board(value).is_some() => {}
                    (Cf::Boards, Op::Delete) if key.len() == 8 => {}
                    (Cf::Boards, _) => return Err("bad board record"),
                    (Cf::Follows, op) => {
                        let (user, kind, target) = decode_follow_key(key).ok_or("bad follow key")?;
                        match op {
                            Op::Delete => {}
                            Op::Put(owner) if kind == EdgeKind::Board as u8 => {
                                let owner =
                                    owner.try_into().ok().map(u64::from_le_bytes).and_then(UserId::new);
                                owner.ok_or("bad board owner in a follow entry")?;
                            }
                            Op::Put(_) if kind == EdgeKind::Topic as u8 && u32::try_from(target).is_err() => {
                                return Err("bad topic in a follow entry");
                            }
                            Op::Put(_) => {}
                            Op::Merge(_) => return Err("merges into the follow lists"),
                        }
                        self.effects.follow_users.insert(user);
                    }
                    (cf, op) if cf.is_bitmap() => {
                        if cf == Cf::Seen && seen::decode_seen_key(key).is_none() {
                            return Err("bad seen key");
                        }
                        match op {
                            Op::Delete => {}
                            Op::Put(value) => {
                                bitmap::decode_bitmap(value).ok_or("bad bitmap")?;
                            }
                            Op::Merge(operand) => {
                                if !bitmap::is_valid_operand(operand) {
                                    return Err("bad bitmap merge operand");
                                }
                            }
                        }
                        self.effects.bitmap_keys.insert((cf, key.to_vec()));
                    }
                    (_, _) => return Err("an operation this family never takes"),
                }
                Ok(())
            }
        }
        impl WriteBatchIteratorCf for Decoder<'_> {
            fn put_cf(&mut self, cf_id: u32, key: &[u8], value: &[u8]) {
                self.op(cf_id, key, Some(value), false);
            }
            fn delete_cf(&mut self, cf_id: u32, key: &[u8]) {
                self.op(cf_id, key, None, false);
            }
            fn merge_cf(&mut self, cf_id: u32, key: &[u8], value: &[u8]) {
                self.op(cf_id, key, Some(value), true);
            }
        }
        let mut decoder = Decoder { ids, effects: Effects::default(), error: None, ops: 0, encoded_len: 0 };
        // The iteration stops silently at a malformed record or one of another type (the
        // binding drops RocksDB's status): a body that does not hold exactly the
        // header's `count` operations, and nothing after them, is refused rather than
        // half-applied.
        batch.iterate_cf(&mut decoder);
        let body = batch.data().len().saturating_sub(BATCH_HEADER);
        match decoder.error {
            Some(e) => Err(Error::ReplicatedBatch(e)),
            None if decoder.ops != count => Err(Error::ReplicatedBatch(format!(
                "the body holds {} operations, the header {count}",
                decoder.ops
            ))),
            None if decoder.encoded_len != body => Err(Error::ReplicatedBatch(format!(
                "{} bytes follow its {count} operations (or they are not encoded as RocksDB encodes them)",
                body as i64 - decoder.encoded_len as i64
            ))),
            None => Ok(decoder.effects),
        }
    }
}

impl Effects {
    /// Checks the ordinals a shipped batch writes against the replica's next ordinal
    /// `next`, as its leader assigned them: dense — the next ordinal never goes back,
    /// and each ordinal it moves past has its pin record in the batch — and every pin
    /// record below the new next ordinal. A batch naming ordinal 16M on a shard of a
    /// thousand pins would otherwise grow the attribute rows to 16M (found by fuzzing:
    /// 1.9 GB for one 160-byte batch), and break the density checked at open.
    pub(crate) fn check_ordinals(&self, next: u32) -> Result<()> {
        let new_next = self.next_ordinal.unwrap_or(next);
        if new_next < next {
            return Err(Error::ReplicatedBatch(format!(
                "moves the next ordinal back from {next} to {new_next}"
            )));
        }
        if let Some((&ordinal, _)) = self.records.last_key_value()
            && ordinal >= new_next
        {
            return Err(Error::ReplicatedBatch(format!(
                "writes the pin record of ordinal {ordinal}, at or past the next ordinal {new_next}"
            )));
        }
        // The records are at most the batch's operations, so this loop is bounded by
        // the batch, not by the ordinals it names.
        let created = self.records.range(next..new_next).count() as u64;
        if created != u64::from(new_next - next) {
            return Err(Error::ReplicatedBatch(format!(
                "moves the next ordinal from {next} to {new_next} with {created} new pin records"
            )));
        }
        Ok(())
    }
}

/// A batch operation, as [`Effects::decode`] checks it.
enum Op<'a> {
    Put(&'a [u8]),
    Delete,
    Merge(&'a [u8]),
}

/// The bytes RocksDB's `WriteBatch` takes for one put, delete or merge: a type byte,
/// the family id unless it is the default family's, then the length-prefixed key and
/// value (`db/write_batch.cc`).
fn encoded_op_len(cf_id: u32, key: &[u8], value: Option<&[u8]>) -> usize {
    fn varint_len(n: usize) -> usize {
        (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
    }
    let cf = if cf_id == 0 { 0 } else { varint_len(cf_id as usize) };
    1 + cf + varint_len(key.len()) + key.len() + value.map_or(0, |v| varint_len(v.len()) + v.len())
}

impl Shard {
    /// Commits `batch` and makes its effects visible, in this order: RocksDB, the read
    /// caches, the attribute rows, then the published next ordinal — readers bound their
    /// scans by it, so they never meet an ordinal whose row or bitmaps are not in place
    /// — then the epoch history and the commit listener. The caller holds the writer.
    pub(crate) fn apply(
        &self,
        writer: &mut WriterState,
        batch: WriteBatch,
        effects: &Effects,
        durability: Durability,
    ) -> Result<u64> {
        self.check_writable_store()?;
        if batch.is_empty() {
            // An empty batch would still become a WAL record (of no operations, which
            // followers refuse): only make what came before durable, if asked.
            if durability == Durability::Sync {
                self.stop_on_fault(self.db.flush_wal(true).map_err(Error::from))?;
            }
        } else {
            let count = batch.len() as u64;
            let data = self.recent_wants(batch.size_in_bytes()).then(|| batch.data().to_vec());
            self.stop_on_fault(self.commit(batch, durability))?;
            self.remember(count, data);
        }
        self.cache.invalidate(
            effects.bitmap_keys.iter().map(|(cf, key)| (*cf, key.as_slice())),
            effects.follow_users.iter().copied(),
        );
        if !effects.records.is_empty() {
            let mut attrs = self.attrs_mut();
            attrs.reserve(effects.records.len());
            for (ordinal, record) in &effects.records {
                attrs.set(*ordinal, record);
            }
        }
        if let Some(next) = effects.next_ordinal {
            writer.next_ordinal = next;
            self.committed_next_ordinal.store(next, std::sync::atomic::Ordering::Release);
        }
        if let Some(history) = &effects.epochs {
            *self.history.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(history.clone());
        }
        let sequence = self.latest_sequence();
        self.notify_commit(sequence);
        Ok(sequence)
    }

    /// A failed commit that is a storage fault stops the shard's writes, and is
    /// reported as such (the caller's write was not applied).
    fn stop_on_fault(&self, r: Result<()>) -> Result<()> {
        self.observe(r).map_err(|e| match e.is_storage_fault() {
            true => Error::WritesStopped { shard: self.id, reason: e.to_string() },
            false => e,
        })
    }

    pub(crate) fn commit(&self, batch: WriteBatch, durability: Durability) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(durability == Durability::Sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }
}

/// What [`prepare`] returns besides the batch.
pub(crate) struct Prepared {
    pub(crate) batch: WriteBatch,
    pub(crate) effects: Effects,
    pub(crate) unknown_pins: usize,
    /// What the `seen` window dropped.
    pub(crate) seen_dropped: super::SeenStats,
}

/// Builds one write request into a batch and its effects, reading what it needs
/// (validation failures write nothing: nothing is committed here).
/// `now_ms` places impressions in their period of the `seen` window and decides what
/// has left it.
pub(crate) fn prepare(
    shard: &Shard,
    next_ordinal: u32,
    mutations: &[Mutation],
    now_ms: u64,
) -> Result<Prepared> {
    let mut w = BatchBuilder::new(shard, next_ordinal, now_ms);
    for m in mutations {
        w.apply(m)?;
    }
    // The caps hold on what the whole request leaves (an unfollow after a follow in
    // the same request makes room for it).
    for (user, set) in &w.follow_sets {
        set.check_caps(*user, shard.max_follows, shard.max_blocks)?;
    }
    let BatchBuilder {
        mut batch,
        mut deltas,
        records,
        next_ordinal: next,
        unknown_pins,
        follow_changes,
        seen_users,
        ..
    } = w;
    let mut bitmap_keys = BTreeSet::new();
    let mut seen_dropped = super::SeenStats::default();
    for user in seen_users {
        let current = (Cf::Seen, seen_key(user, shard.seen_window.period_start(now_ms)));
        let (mut trims, mut deleted) = (Vec::new(), Vec::new());
        let dropped = seen::apply_window(
            shard,
            user,
            now_ms,
            deltas.get(&current),
            &mut batch,
            &mut trims,
            &mut deleted,
        )?;
        seen_dropped = seen_dropped.plus(dropped);
        for (key, delta) in trims {
            let slot = deltas.entry((Cf::Seen, key)).or_default();
            *slot = std::mem::take(slot).then(&delta);
        }
        bitmap_keys.extend(deleted.into_iter().map(|k| (Cf::Seen, k)));
    }
    for ((cf, key), delta) in deltas {
        if !delta.is_empty() {
            batch.merge_cf(shard.cf(cf), &key, delta.encode());
            bitmap_keys.insert((cf, key));
        }
    }
    let next_ordinal = (next != next_ordinal).then(|| {
        batch.put_cf(shard.cf(Cf::Meta), META_NEXT_ORDINAL, u64::from(next).to_le_bytes());
        next
    });
    let effects = Effects {
        records,
        next_ordinal,
        bitmap_keys,
        follow_users: follow_changes.into_iter().collect(),
        epochs: None,
    };
    Ok(Prepared { batch, effects, unknown_pins, seen_dropped })
}

pub(crate) fn follow_entry(follower: UserId, target: FollowTarget) -> ([u8; 17], Vec<u8>) {
    match target {
        FollowTarget::User(u) => (follow_key(follower, EdgeKind::User, u.get()), Vec::new()),
        FollowTarget::Board { board, owner } => {
            (follow_key(follower, EdgeKind::Board, board.get()), owner.get().to_le_bytes().to_vec())
        }
        FollowTarget::Topic(t) => (follow_key(follower, EdgeKind::Topic, u64::from(t.get())), Vec::new()),
    }
}

/// A user's follow and block keys (`follows` keys, so one set covers every kind).
#[derive(Default)]
struct FollowSet {
    follows: HashSet<[u8; 17]>,
    blocks: HashSet<[u8; 17]>,
    /// The sizes as stored before the batch: a batch may not grow a list past its cap
    /// (a list already past a lowered cap may still shrink, or swap entries).
    stored: (usize, usize),
}

impl FollowSet {
    /// `Err(TooMany)` if the batch leaves a list past its cap and longer than it was.
    fn check_caps(&self, user: UserId, max_follows: u32, max_blocks: u32) -> Result<()> {
        let lists = [
            ("follows", self.follows.len(), self.stored.0, max_follows),
            ("blocks", self.blocks.len(), self.stored.1, max_blocks),
        ];
        for (what, count, stored, limit) in lists {
            if count > limit as usize && count > stored {
                return Err(Error::TooMany { user, what, count, limit });
            }
        }
        Ok(())
    }
}

/// Accumulates one write request into a `WriteBatch`, with an overlay of what the
/// batch itself created so that later mutations see earlier ones.
struct BatchBuilder<'a> {
    shard: &'a Shard,
    batch: WriteBatch,
    /// Bitmap changes, aggregated per key (one merge operand per key per batch).
    deltas: BTreeMap<(Cf, Vec<u8>), Delta>,
    /// Pins created or changed by this batch, by ordinal.
    records: BTreeMap<u32, PinRecord>,
    new_ordinals: HashMap<PinId, u32>,
    boards: HashMap<BoardId, UserId>,
    next_ordinal: u32,
    unknown_pins: usize,
    /// Users whose follow or block lists this batch changes.
    follow_changes: HashSet<UserId>,
    /// Viewers whose impressions the `seen` window is applied to after the batch.
    seen_users: BTreeSet<UserId>,
    /// Follow and block lists of users this batch changes, as it leaves them (loaded
    /// on first use, for the per-user caps).
    follow_sets: HashMap<UserId, FollowSet>,
    now_ms: u64,
}

impl<'a> BatchBuilder<'a> {
    fn new(shard: &'a Shard, next_ordinal: u32, now_ms: u64) -> Self {
        Self {
            shard,
            batch: WriteBatch::default(),
            deltas: BTreeMap::new(),
            records: BTreeMap::new(),
            new_ordinals: HashMap::new(),
            boards: HashMap::new(),
            next_ordinal,
            unknown_pins: 0,
            follow_changes: HashSet::new(),
            seen_users: BTreeSet::new(),
            follow_sets: HashMap::new(),
            now_ms,
        }
    }

    fn change(&mut self, cf: Cf, key: Vec<u8>, delta: Delta) {
        let slot = self.deltas.entry((cf, key)).or_default();
        *slot = std::mem::take(slot).then(&delta);
    }

    /// `user`'s follow and block keys as this batch leaves them so far.
    fn follow_set(&mut self, user: UserId) -> Result<&mut FollowSet> {
        use std::collections::hash_map::Entry;
        match self.follow_sets.entry(user) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let f = self.shard.follows_cached(user)?;
                let mut set = FollowSet::default();
                set.follows.extend(f.users.iter().map(|u| follow_entry(user, FollowTarget::User(*u)).0));
                set.follows.extend(f.boards.iter().map(|(board, owner)| {
                    follow_entry(user, FollowTarget::Board { board: *board, owner: *owner }).0
                }));
                set.follows.extend(f.topics.iter().map(|t| follow_entry(user, FollowTarget::Topic(*t)).0));
                set.blocks.extend(f.blocked.iter().map(|b| follow_key(user, EdgeKind::Blocked, b.get())));
                set.stored = (set.follows.len(), set.blocks.len());
                Ok(e.insert(set))
            }
        }
    }

    fn board_owner(&mut self, board: BoardId) -> Result<Option<UserId>> {
        if let Some(o) = self.boards.get(&board) {
            return Ok(Some(*o));
        }
        let owner = self.shard.board_record(board)?.map(|(o, _)| o);
        if let Some(o) = owner {
            self.boards.insert(board, o);
        }
        Ok(owner)
    }

    /// The pin's ordinal and current record (this batch's version if it changed it).
    fn existing_pin(&mut self, pin: PinId) -> Result<Option<(u32, PinRecord)>> {
        let ordinal = match self.new_ordinals.get(&pin) {
            Some(o) => *o,
            None => match self.shard.ordinal(pin)? {
                Some(o) => o,
                None => return Ok(None),
            },
        };
        if let Some(rec) = self.records.get(&ordinal) {
            return Ok(Some((ordinal, rec.clone())));
        }
        match self.shard.pin_at(ordinal)? {
            Some(rec) => Ok(Some((ordinal, rec))),
            None => Err(Error::corrupt(
                Cf::Pins.name(),
                &ordinal_key(ordinal),
                "pin id maps to a missing ordinal",
            )),
        }
    }

    /// Like `existing_pin`, for pin-level mutations: an unknown pin counts as unknown
    /// and is a no-op; one stored with another owner is refused.
    fn referenced_pin(&mut self, pin: PinRef) -> Result<Option<(u32, PinRecord)>> {
        match self.existing_pin(pin.pin)? {
            Some((ordinal, rec)) if rec.owner == pin.owner => Ok(Some((ordinal, rec))),
            Some((_, rec)) => Err(Error::OwnerMismatch {
                what: format!("pin {}", pin.pin),
                actual: rec.owner,
                claimed: pin.owner,
            }),
            None => {
                self.unknown_pins += 1;
                Ok(None)
            }
        }
    }

    fn put_record(&mut self, ordinal: u32, rec: PinRecord) {
        self.batch.put_cf(self.shard.cf(Cf::Pins), ordinal_key(ordinal), rec.encode());
        self.records.insert(ordinal, rec);
    }

    fn apply(&mut self, m: &Mutation) -> Result<()> {
        let shard = self.shard;
        let cf = |c| shard.cf(c);
        match m {
            Mutation::UpsertUser(u) => {
                self.batch.put_cf(cf(Cf::Users), u64_key(u.id.get()), u.username.as_bytes());
            }
            Mutation::UpsertBoard(b) => {
                if let Some(owner) = self.board_owner(b.id)? {
                    Error::check_owner(|| format!("board {}", b.id), owner, b.owner)?;
                }
                self.batch.put_cf(cf(Cf::Boards), u64_key(b.id.get()), encode_board(b.owner, &b.name));
                self.boards.insert(b.id, b.owner);
            }
            Mutation::UpsertPin(p) => self.upsert_pin(p)?,
            Mutation::Follow { follower, target } => {
                let (key, value) = follow_entry(*follower, *target);
                self.follow_set(*follower)?.follows.insert(key);
                self.batch.put_cf(cf(Cf::Follows), key, value);
                self.follow_changes.insert(*follower);
            }
            Mutation::Unfollow { follower, target } => {
                let (key, _) = follow_entry(*follower, *target);
                self.follow_set(*follower)?.follows.remove(&key);
                self.batch.delete_cf(cf(Cf::Follows), key);
                self.follow_changes.insert(*follower);
            }
            Mutation::BlockUser { user, blocked } => {
                let key = follow_key(*user, EdgeKind::Blocked, blocked.get());
                self.follow_set(*user)?.blocks.insert(key);
                self.batch.put_cf(cf(Cf::Follows), key, []);
                self.follow_changes.insert(*user);
            }
            Mutation::UnblockUser { user, blocked } => {
                let key = follow_key(*user, EdgeKind::Blocked, blocked.get());
                self.follow_set(*user)?.blocks.remove(&key);
                self.batch.delete_cf(cf(Cf::Follows), key);
                self.follow_changes.insert(*user);
            }
            Mutation::DeletePin(pin) => {
                if let Some((ordinal, mut rec)) = self.referenced_pin(*pin)? {
                    rec.deleted = true;
                    self.put_record(ordinal, rec);
                    self.change(Cf::Filters, FilterKind::Deleted.key().to_vec(), Delta::add([ordinal]));
                }
            }
            Mutation::FlagPin { pin, flag, on } => {
                if let Some((ordinal, mut rec)) = self.referenced_pin(*pin)? {
                    let kind = match flag {
                        PinFlag::Spam => {
                            rec.spam = *on;
                            FilterKind::Spam
                        }
                        PinFlag::Unsafe => {
                            rec.is_unsafe = *on;
                            FilterKind::Unsafe
                        }
                    };
                    self.put_record(ordinal, rec);
                    let delta = if *on { Delta::add([ordinal]) } else { Delta::remove([ordinal]) };
                    self.change(Cf::Filters, kind.key().to_vec(), delta);
                }
            }
            Mutation::RecordImpressions { user, pins } => {
                let mut ordinals = Vec::with_capacity(pins.len());
                for pin in pins {
                    match self.existing_pin(pin.pin)? {
                        Some((ordinal, rec)) if rec.owner == pin.owner => ordinals.push(ordinal),
                        _ => self.unknown_pins += 1,
                    }
                }
                if !ordinals.is_empty() {
                    let period = self.shard.seen_window.period_start(self.now_ms);
                    self.change(Cf::Seen, seen_key(*user, period), Delta::add(ordinals));
                }
                // Also with no pins: an empty `RecordImpressions` applies the window.
                self.seen_users.insert(*user);
            }
            Mutation::UpdateSignals { pin, update } => {
                if let Some((ordinal, mut rec)) = self.referenced_pin(*pin)? {
                    update.apply_to(&mut rec.signals);
                    self.put_record(ordinal, rec);
                }
            }
        }
        Ok(())
    }

    fn upsert_pin(&mut self, p: &Pin) -> Result<()> {
        let board_owner = self.board_owner(p.board)?.ok_or(Error::BoardNotFound(p.board))?;
        Error::check_owner(|| format!("board {} of pin {}", p.board, p.id), board_owner, p.owner)?;
        match self.existing_pin(p.id)? {
            Some((ordinal, old)) => {
                Error::check_owner(|| format!("pin {}", p.id), old.owner, p.owner)?;
                if old.board != p.board {
                    self.change(Cf::BoardPins, u64_key(old.board.get()).to_vec(), Delta::remove([ordinal]));
                    self.change(Cf::BoardPins, u64_key(p.board.get()).to_vec(), Delta::add([ordinal]));
                }
                for t in old.topics.iter().filter(|t| !p.topics.contains(t)) {
                    self.change(Cf::TopicPins, u32_key(t.get()).to_vec(), Delta::remove([ordinal]));
                }
                for t in p.topics.iter().filter(|t| !old.topics.contains(t)) {
                    self.change(Cf::TopicPins, u32_key(t.get()).to_vec(), Delta::add([ordinal]));
                }
                let rec = PinRecord {
                    board: p.board,
                    created_at_ms: p.created_at_ms,
                    topics: p.topics.clone(),
                    signals: p.signals,
                    ..old
                };
                self.put_record(ordinal, rec);
            }
            None => {
                let ordinal = self.next_ordinal;
                self.next_ordinal = ordinal
                    .checked_add(1)
                    .filter(|n| *n < u32::MAX)
                    .ok_or(Error::OrdinalsExhausted { shard: self.shard.id })?;
                self.new_ordinals.insert(p.id, ordinal);
                self.batch.put_cf(self.shard.cf(Cf::PinIds), u64_key(p.id.get()), ordinal.to_le_bytes());
                self.change(Cf::UserPins, u64_key(p.owner.get()).to_vec(), Delta::add([ordinal]));
                self.change(Cf::BoardPins, u64_key(p.board.get()).to_vec(), Delta::add([ordinal]));
                for t in &p.topics {
                    self.change(Cf::TopicPins, u32_key(t.get()).to_vec(), Delta::add([ordinal]));
                }
                let rec = PinRecord::new_live(p);
                self.put_record(ordinal, rec);
            }
        }
        Ok(())
    }
}
