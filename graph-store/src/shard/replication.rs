//! What replication is built from, on one shard: the WAL since a position (gaps
//! reported, never skipped), applying a shipped batch at the leader's sequence numbers,
//! leadership epochs and write fences, log positions for the prefix check, exact
//! checkpoints, a digest of everything a replica holds, and a commit listener.

use std::path::Path;
use std::sync::Arc;

use feedgraph_model::Durability;
use roaring::RoaringBitmap;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use sha2::{Digest as _, Sha256};

use crate::bitmap;
use crate::{Error, Result};

use super::epochs::{self, EpochHistory, LogPosition};
use super::schema::{Cf, META_EPOCHS};
use super::write::Effects;
use super::{Fence, Shard};

/// One WAL write batch, as shipped to followers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalBatch {
    /// Sequence number of the batch's first operation.
    pub sequence: u64,
    /// Operations in the batch (each consumes one sequence number).
    pub count: u64,
    /// RocksDB's write-batch representation.
    pub data: Vec<u8>,
    /// When this shard committed it (Unix ms), or 0 when it was read back from the WAL.
    pub commit_ms: i64,
}

/// The newest committed batches, contiguous in sequence, kept in memory so that
/// caught-up followers are served without reading the WAL: RocksDB's WAL iterator finds
/// a position by reading its log file from the start (measured: ~20 ms per request once
/// the live log holds a bulk load).
#[derive(Debug)]
pub(crate) struct RecentBatches {
    batches: std::collections::VecDeque<WalBatch>,
    bytes: usize,
    cap: usize,
}

impl RecentBatches {
    pub(crate) fn new(cap: usize) -> Self {
        Self { batches: Default::default(), bytes: 0, cap }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }

    fn push(&mut self, b: WalBatch) {
        if self.batches.back().is_some_and(|last| last.sequence + last.count != b.sequence) {
            self.clear();
        }
        self.bytes += b.data.len();
        self.batches.push_back(b);
        while self.bytes > self.cap && self.batches.len() > 1 {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.data.len();
            }
        }
    }

    /// The batches after `since`, about `max_bytes` of them (at least one), if this
    /// buffer holds the one that starts at `since + 1`.
    fn since(&self, since: u64, max_bytes: usize) -> Option<Vec<WalBatch>> {
        let i = self.batches.partition_point(|b| b.sequence <= since);
        if self.batches.get(i)?.sequence != since + 1 {
            return None;
        }
        let mut bytes = 0;
        let mut out = Vec::new();
        for b in self.batches.iter().skip(i) {
            if !out.is_empty() && bytes + b.data.len() > max_bytes {
                break;
            }
            bytes += b.data.len();
            out.push(b.clone());
        }
        Some(out)
    }
}

/// Called after every commit (leader write, replicated apply, epoch start) with the
/// shard's new latest sequence number, under the shard's writer lock: keep it short.
pub type CommitListener = Arc<dyn Fn(u64) + Send + Sync>;

/// A checksum over everything a replica holds: every column family's contents (bitmaps
/// compared as sets) and the in-memory attribute rows. Equal digests mean equal
/// replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Length of a write batch's header: sequence (LE u64) and count (LE u32).
pub(crate) const BATCH_HEADER: usize = 12;

impl Shard {
    /// The WAL batches after `since` (a sequence number at a batch boundary, as a
    /// follower's applied position always is), up to about `max_bytes`.
    ///
    /// RocksDB's WAL iterator silently starts at the next available batch when the
    /// requested one was purged; this checks that the batches are contiguous from
    /// `since + 1` and reports [`Error::WalGap`] instead of skipping ahead.
    pub fn updates_since(&self, since: u64, max_bytes: usize) -> Result<Vec<WalBatch>> {
        let latest = self.latest_sequence();
        if since > latest {
            return Err(Error::AheadOfLog { since, latest });
        }
        if since == latest {
            return Ok(Vec::new());
        }
        if let Some(batches) = self.recent_updates_since(since, max_bytes) {
            return Ok(batches);
        }
        let iter =
            self.db.get_updates_since(since).map_err(|_| Error::WalGap { since, next_available: None })?;
        let mut expected = since + 1;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in iter {
            let (sequence, batch) = item?;
            if sequence != expected {
                return Err(Error::WalGap { since: expected - 1, next_available: Some(sequence) });
            }
            let count = batch.len() as u64;
            if count == 0 {
                // A record of no operations (an empty batch committed to sync the WAL,
                // by older versions): it changes nothing and takes no sequence number.
                continue;
            }
            expected = sequence + count;
            bytes += batch.size_in_bytes();
            out.push(WalBatch { sequence, count, data: batch.data().to_vec(), commit_ms: 0 });
            if bytes >= max_bytes {
                break;
            }
        }
        if out.is_empty() {
            // Newer writes exist but the log holds none of them: all purged.
            return Err(Error::WalGap { since, next_available: None });
        }
        Ok(out)
    }

    /// [`Shard::updates_since`] from the batches held in memory only: `None` when they
    /// do not reach back to `since + 1` (then the WAL must be read, on a blocking
    /// pool). Never touches the disk.
    pub fn recent_updates_since(&self, since: u64, max_bytes: usize) -> Option<Vec<WalBatch>> {
        if since == self.latest_sequence() {
            // Caught up: nothing to read (the idle end of a long poll).
            return Some(Vec::new());
        }
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).since(since, max_bytes)
    }

    /// Whether a batch of `bytes` is kept in memory after its commit.
    pub(crate) fn recent_wants(&self, bytes: usize) -> bool {
        self.recent_cap > 0 && bytes <= self.recent_cap / 2
    }

    /// Keeps the batch of `count` operations just committed (`None`: too large to keep,
    /// so the batches held no longer reach the newest one).
    pub(crate) fn remember(&self, count: u64, data: Option<Vec<u8>>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        match data {
            Some(mut data) if data.len() >= BATCH_HEADER => {
                let sequence = self.latest_sequence() + 1 - count;
                // RocksDB stamps the sequence on its copy at commit: stamp ours.
                data[..8].copy_from_slice(&sequence.to_le_bytes());
                recent.push(WalBatch { sequence, count, data, commit_ms: super::wall_clock_ms() as i64 });
            }
            _ => recent.clear(),
        }
    }

    /// Applies batches shipped from the leader, in order, at the leader's sequence
    /// numbers, with the same in-memory effects as the leader's own writes (recovered
    /// from the batches). Only a replica applies; the first batch must start right
    /// after the replica's latest sequence and each the next right after the one before.
    /// Each batch is its own write, under one hold of the writer lock: every replica's
    /// WAL keeps the leader's batch boundaries, so a promoted follower can serve any
    /// other follower's position (a position inside a merged record could only be
    /// served by a rebuild). Returns the new log position (read under the same lock).
    pub fn apply_replicated(&self, batches: &[WalBatch]) -> Result<LogPosition> {
        let mut writer = self.lock_writer();
        if writer.fence != Fence::Replica {
            return Err(Error::NotReplica);
        }
        let start = self.latest_sequence() + 1;
        let mut expected = start;
        for batch in batches {
            if batch.sequence != expected {
                return Err(Error::SequenceMismatch { expected, got: batch.sequence });
            }
            Self::check_header(batch)?;
            expected += batch.count;
        }
        for batch in batches {
            let wb = WriteBatch::from_data(&batch.data);
            let effects = Effects::decode(&wb, &self.cf_ids, batch.count)?;
            effects.check_ordinals(writer.next_ordinal)?;
            let latest = self.apply(&mut writer, wb, &effects, Durability::Buffered)?;
            if latest != batch.sequence + batch.count - 1 {
                // Sequence numbers no longer match the leader's: this replica must be
                // rebuilt (never seen; it would take a local write on a replica).
                return Err(Error::SequenceMismatch {
                    expected: batch.sequence + batch.count - 1,
                    got: latest,
                });
            }
        }
        Ok(self.position(&self.epoch_history()))
    }

    /// RocksDB reads a batch's header without bounds checks: validate it first.
    fn check_header(batch: &WalBatch) -> Result<()> {
        let header = batch
            .data
            .first_chunk::<BATCH_HEADER>()
            .ok_or_else(|| Error::ReplicatedBatch("shorter than a batch header".into()))?;
        let (seq, count) = header.split_at(8);
        let (seq, count) = (
            u64::from_le_bytes(seq.try_into().unwrap_or_default()),
            u64::from(u32::from_le_bytes(count.try_into().unwrap_or_default())),
        );
        if seq != batch.sequence || count != batch.count || count == 0 {
            return Err(Error::ReplicatedBatch(format!(
                "header says sequence {seq}, {count} operations; the leader said {}, {}",
                batch.sequence, batch.count
            )));
        }
        Ok(())
    }

    /// Makes this shard the writable leader of `epoch`. A newer epoch than any in the
    /// history starts a term: its history entry is the term's first (synced) write, so
    /// followers replicate it. The newest epoch already in the history resumes that
    /// term only on a shard opened or fenced as its leader (a restarted leader); on a
    /// replica, or for an older epoch, it is [`Error::StaleEpoch`].
    pub fn lead(&self, epoch: u64) -> Result<()> {
        let mut writer = self.lock_writer();
        let history = self.epoch_history();
        let current = history.current();
        // A term is begun once: the same epoch again is only this leader resuming it
        // (a reopen); from a replica it would make two leaders of one epoch, whose
        // histories the prefix check could not tell apart.
        let resumes = epoch == current && writer.fence == Fence::Leader { epoch };
        if epoch < current || (epoch == current && !resumes) {
            return Err(Error::StaleEpoch { given: epoch, current });
        }
        if epoch > current {
            let start = self.latest_sequence() + 1;
            let next = history.with(epoch, start).ok_or(Error::StaleEpoch { given: epoch, current })?;
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(Cf::Meta), META_EPOCHS, next.encode());
            let effects = Effects { epochs: Some(next), ..Effects::default() };
            self.apply(&mut writer, batch, &effects, Durability::Sync)?;
        }
        writer.fence = Fence::Leader { epoch };
        Ok(())
    }

    /// Stops local writes: from now on the shard only applies shipped batches.
    pub fn follow(&self) {
        self.lock_writer().fence = Fence::Replica;
    }

    /// The epoch local writes are accepted at, or `None` on a replica.
    pub fn writable_epoch(&self) -> Option<u64> {
        match self.lock_writer().fence {
            Fence::Leader { epoch } => Some(epoch),
            Fence::Replica => None,
        }
    }

    /// Which epoch wrote which sequence numbers.
    pub fn epoch_history(&self) -> Arc<EpochHistory> {
        self.history.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where this shard's log stands. Taken under the writer lock, so that the latest
    /// sequence and the history that says who wrote it are one state.
    pub fn log_position(&self) -> LogPosition {
        let _writer = self.lock_writer();
        self.position(&self.epoch_history())
    }

    /// The latest sequence with what identifies its log; the caller keeps it stable.
    fn position(&self, history: &EpochHistory) -> LogPosition {
        let sequence = self.latest_sequence();
        LogPosition {
            lineage: self.lineage,
            layout: self.cf_ids.layout(),
            sequence,
            epoch: history.epoch_at(sequence),
        }
    }

    /// Whether a follower at `follower` holds a prefix of this (leading) shard's log, so
    /// that shipping can continue from its position; [`Error::Diverged`] otherwise.
    /// Reads memory only. No lock is needed on a leader: its history changes only when
    /// it starts an epoch, before it serves any follower of it.
    pub fn check_follower(&self, follower: &LogPosition) -> Result<()> {
        let history = self.epoch_history();
        epochs::check_prefix(&self.position(&history), &history, follower).map_err(Error::Diverged)
    }

    /// Writes a consistent checkpoint (hard links where possible) into `dir`, which
    /// must not exist, and returns the sequence number it contains. Writes and applies
    /// wait while it is taken, so the returned sequence is exact.
    pub fn checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        let _writer = self.lock_writer();
        let sequence = self.latest_sequence();
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir.as_ref())?;
        Ok(sequence)
    }

    /// Sets (or clears) the function told about every commit.
    pub fn set_commit_listener(&self, listener: Option<CommitListener>) {
        *self.commit_listener.write().unwrap_or_else(|e| e.into_inner()) = listener;
    }

    pub(crate) fn notify_commit(&self, sequence: u64) {
        if let Some(listener) = self.commit_listener.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            listener(sequence);
        }
    }

    /// A checksum over every column family (bitmaps as sets of ordinals, so the same
    /// set merged differently hashes the same) and the in-memory attribute rows, taken
    /// under the writer lock so that both are one state. Reads the whole shard.
    pub fn digest(&self) -> Result<Digest> {
        let _writer = self.lock_writer();
        let mut h = Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        for cf in Cf::ALL {
            put(cf.name().as_bytes());
            let mut ro = ReadOptions::default();
            ro.fill_cache(false);
            for item in self.db.iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start) {
                let (k, v) = item?;
                put(&k);
                if cf.is_bitmap() {
                    let set: RoaringBitmap =
                        bitmap::decode_bitmap(&v).ok_or_else(|| Error::corrupt(cf, &k, "bad bitmap"))?;
                    let ids: Vec<u8> = set.iter().flat_map(u32::to_le_bytes).collect();
                    put(&ids);
                } else {
                    put(&v);
                }
            }
        }
        let attrs = self.attributes();
        put(&(attrs.len() as u64).to_le_bytes());
        let mut row = Vec::with_capacity(64);
        for ordinal in 0..attrs.len() as u32 {
            row.clear();
            if let Some(a) = attrs.get(ordinal) {
                for v in [a.pin_id, a.owner, a.board, a.created_at_ms as u64] {
                    row.extend_from_slice(&v.to_le_bytes());
                }
                let s = a.signals;
                for v in [s.quality.to_bits(), s.saves, s.clicks, s.closeups] {
                    row.extend_from_slice(&v.to_le_bytes());
                }
                row.extend([u8::from(a.deleted), u8::from(a.spam), u8::from(a.is_unsafe)]);
            }
            put(&row);
        }
        drop(attrs);
        put(&self.next_ordinal().to_le_bytes());
        Ok(Digest(h.finalize().into()))
    }
}
