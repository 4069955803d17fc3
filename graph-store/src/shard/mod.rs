//! One shard: a RocksDB instance plus in-memory pin attributes.
//!
//! Split by concept: [`schema`] (column families, options, family ids), [`cache`]
//! (decoded hot reads), [`write`] (the one write path: prepare, decode, apply),
//! [`bulk`] (bulk load), [`reads`], [`epochs`] (leadership terms, the log-prefix
//! check) and [`replication`] (WAL since a position, replicated apply, fences,
//! checkpoints, digests).

mod bulk;
mod cache;
pub(crate) mod epochs;
mod reads;
mod replication;
pub(crate) mod schema;
mod seen;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use feedgraph_model::{BoardId, Durability, Mutation, TopicId, UserId};
use rocksdb::{ColumnFamily, DB, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::attrs::PinAttributes;
use crate::record::{PinRecord, decode_ordinal};
use crate::{Error, Result, SCHEMA_VERSION};

pub use bulk::{BulkLoad, BulkLoadStats, BulkProgress};
pub use cache::CacheUsage;
pub use epochs::{Divergence, EpochHistory, EpochStart, LogPosition};
pub use replication::{CommitListener, Digest, WalBatch};
pub use schema::StoreMemory;
pub use seen::{SeenStats, SeenSweep, SeenWindow};

use cache::ReadCache;
use schema::{Cf, CfIds, META_EPOCHS, META_LINEAGE, META_NEXT_ORDINAL, META_SCHEMA_VERSION, META_SHARD_ID};

/// How a shard's RocksDB instance is opened.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// The logical shard this directory holds; checked against what is stored.
    pub shard_id: u32,
    /// Keep WAL files this long after they are obsolete, so followers can catch up
    /// (0 = delete as soon as obsolete; followers then re-bootstrap after a flush).
    pub wal_ttl_seconds: u64,
    /// Upper bound on retained obsolete WAL files, in MiB (0 = no size bound).
    pub wal_size_limit_mb: u64,
    /// Block cache and memtable budget, shared with the node's other shards.
    pub memory: StoreMemory,
    /// Memtable size per column family, in bytes (the node-wide cap in `memory` bounds
    /// their sum).
    pub write_buffer_bytes: usize,
    /// RocksDB background flush/compaction threads.
    pub background_jobs: i32,
    /// In-memory cache of decoded adjacency and filter bitmaps, in bytes (0 = off).
    pub bitmap_cache_bytes: u64,
    /// In-memory cache of follow lists, in bytes (0 = off).
    pub follows_cache_bytes: u64,
    /// The newest committed batches kept in memory for followers, in bytes (a batch
    /// larger than half of it is read from the WAL instead).
    pub recent_batches_bytes: usize,
    /// How long, and how many, impressions are kept per viewer.
    pub seen: SeenWindow,
    /// Most users, boards and topics one user may follow (a follow past it is
    /// refused; lists already longer, from a bulk load, are kept).
    pub max_follows: u32,
    /// Most users one user may block.
    pub max_blocks: u32,
}

impl ShardOptions {
    /// Defaults, with a memory budget of this shard's own (a node shares one
    /// [`StoreMemory`] between its shards instead).
    pub fn new(shard_id: u32) -> Self {
        Self {
            shard_id,
            wal_ttl_seconds: 3600,
            wal_size_limit_mb: 1024,
            memory: StoreMemory::new(64 << 20, 256 << 20),
            write_buffer_bytes: 32 << 20,
            background_jobs: 2,
            bitmap_cache_bytes: 64 << 20,
            follows_cache_bytes: 32 << 20,
            recent_batches_bytes: 8 << 20,
            seen: SeenWindow::default(),
            max_follows: 10_000,
            max_blocks: 10_000,
        }
    }
}

/// What a committed write reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The shard's latest sequence number after the commit.
    pub sequence: u64,
    /// The leadership epoch the write was committed under.
    pub epoch: u64,
    /// Mutations applied.
    pub applied: usize,
    /// Pin-level mutations (delete, flag, signals, impressions) naming a pin that does
    /// not exist on this shard; they are no-ops, so retries are idempotent.
    pub unknown_pins: usize,
}

/// A user's follow and block lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Follows {
    pub users: Vec<UserId>,
    /// Followed boards with their owners (whose shards hold the boards' pins).
    pub boards: Vec<(BoardId, UserId)>,
    pub topics: Vec<TopicId>,
    pub blocked: Vec<UserId>,
}

/// One shard: a RocksDB instance plus in-memory pin attributes. `Send + Sync`; every
/// method blocks on disk.
pub struct Shard {
    db: DB,
    id: u32,
    path: PathBuf,
    cf_ids: CfIds,
    lineage: u64,
    memory: StoreMemory,
    /// The single writer's state; held for the whole of a write (leader) or a
    /// replicated apply (follower), so that ordinal allocation, commit and in-memory
    /// effects happen in one order.
    writer: Mutex<WriterState>,
    /// `writer.next_ordinal` as of the last published commit, for readers: they must
    /// not wait on the writer's lock (held across a commit, fsync included). Published
    /// last, after the rows and caches it covers.
    committed_next_ordinal: AtomicU32,
    attrs: RwLock<PinAttributes>,
    cache: ReadCache,
    history: RwLock<Arc<EpochHistory>>,
    commit_listener: RwLock<Option<CommitListener>>,
    /// The newest committed batches, for followers (see `replication`).
    recent: Mutex<replication::RecentBatches>,
    /// The byte cap of `recent` (fixed: read on every commit without its lock).
    recent_cap: usize,
    seen_window: SeenWindow,
    seen_counters: seen::SeenCounters,
    max_follows: u32,
    max_blocks: u32,
    /// Why the shard stopped taking writes, once its store failed (see
    /// [`Shard::fault`]).
    fault: RwLock<Option<String>>,
    /// Whether the fault is a damaged file (set with `fault`): a replica can be rebuilt
    /// over it from another copy, where a full or failing disk needs an operator, and a
    /// value wrong in every copy would come back with the copy.
    damaged_file: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).field("path", &self.path).finish()
    }
}

/// Whether local writes are accepted: a leader writes at its epoch; a replica only
/// applies batches shipped from its leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fence {
    Leader { epoch: u64 },
    Replica,
}

#[derive(Debug)]
pub(crate) struct WriterState {
    next_ordinal: u32,
    fence: Fence,
}

impl WriterState {
    /// `Ok(epoch)` when a write at `epoch` (any epoch for `None`) may be committed.
    fn check_writable(&self, epoch: Option<u64>) -> Result<u64> {
        match (self.fence, epoch) {
            (Fence::Replica, _) => Err(Error::ReadOnlyReplica),
            (Fence::Leader { epoch: current }, Some(given)) if given != current => {
                Err(Error::StaleEpoch { given, current })
            }
            (Fence::Leader { epoch }, _) => Ok(epoch),
        }
    }
}

/// Milliseconds since the Unix epoch by this machine's clock (0 before 1970): commit
/// times of recent batches, and the clock of the `seen` window.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn read_u64(cf: Cf, key: &[u8], value: &[u8]) -> Result<u64> {
    value.try_into().map(u64::from_le_bytes).map_err(|_| Error::corrupt(cf, key, "expected 8 bytes"))
}

impl Shard {
    /// Opens (creating if missing) the shard stored in `path` as a writable leader at
    /// the newest epoch of its history (0 for a standalone shard), and rebuilds the
    /// in-memory pin attributes from the `pins` column family.
    pub fn open(path: impl AsRef<Path>, opts: &ShardOptions) -> Result<Shard> {
        Self::open_as(path.as_ref(), opts, true)
    }

    /// Opens an existing shard as a replica: it writes nothing of its own (its sequence
    /// numbers must stay the leader's) and accepts only [`Shard::apply_replicated`].
    pub fn open_replica(path: impl AsRef<Path>, opts: &ShardOptions) -> Result<Shard> {
        Self::open_as(path.as_ref(), opts, false)
    }

    fn open_as(path: &Path, opts: &ShardOptions, leader: bool) -> Result<Shard> {
        let started = Instant::now();
        if leader {
            std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        }
        let (db_opts, cfs) = schema::db_options(opts, leader);
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let cf_ids =
            CfIds::learn(&db).ok_or_else(|| Error::corrupt(Cf::Meta, b"", "column families missing"))?;
        let mut shard = Shard {
            db,
            id: opts.shard_id,
            path: path.to_path_buf(),
            cf_ids,
            lineage: 0,
            memory: opts.memory.clone(),
            writer: Mutex::new(WriterState { next_ordinal: 0, fence: Fence::Replica }),
            committed_next_ordinal: AtomicU32::new(0),
            attrs: RwLock::new(PinAttributes::default()),
            cache: ReadCache::new(opts),
            history: RwLock::new(Arc::new(EpochHistory::default())),
            commit_listener: RwLock::new(None),
            recent: Mutex::new(replication::RecentBatches::new(opts.recent_batches_bytes)),
            recent_cap: opts.recent_batches_bytes,
            seen_window: opts.seen,
            seen_counters: seen::SeenCounters::default(),
            max_follows: opts.max_follows,
            max_blocks: opts.max_blocks,
            fault: RwLock::new(None),
            damaged_file: std::sync::atomic::AtomicBool::new(false),
        };
        shard.check_meta(opts.shard_id, leader)?;
        shard.rebuild_attributes()?;
        let epoch = shard.epoch_history().current();
        shard.writer.get_mut().unwrap_or_else(|e| e.into_inner()).fence =
            if leader { Fence::Leader { epoch } } else { Fence::Replica };
        tracing::debug!(
            shard = shard.id,
            pins = shard.next_ordinal(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard opened"
        );
        Ok(shard)
    }

    pub(crate) fn cf(&self, cf: Cf) -> &ColumnFamily {
        // Every family is created at open (`create_missing_column_families`), or the
        // open fails (a replica's `CfIds::learn`), so a missing handle is a
        // programming error in this crate, caught by every test.
        #[allow(clippy::expect_used)]
        self.db.cf_handle(cf.name()).expect("column family created at open")
    }

    /// Checks the shard id and schema version; loads the lineage and epoch history. A
    /// new database (leader only) is stamped with its id, schema and a fresh lineage.
    fn check_meta(&mut self, shard_id: u32, leader: bool) -> Result<()> {
        let meta = self.cf(Cf::Meta);
        let get = |key: &[u8]| -> Result<Option<u64>> {
            match self.db.get_cf(meta, key)? {
                Some(v) => read_u64(Cf::Meta, key, &v).map(Some),
                None => Ok(None),
            }
        };
        let mut stamp = WriteBatch::default();
        match get(META_SHARD_ID)? {
            Some(found) => {
                let found = found as u32;
                if found != shard_id {
                    return Err(Error::ShardMismatch { expected: shard_id, found });
                }
                let version = get(META_SCHEMA_VERSION)?
                    .ok_or_else(|| Error::corrupt(Cf::Meta, META_SCHEMA_VERSION, "missing"))?
                    as u32;
                if version != SCHEMA_VERSION {
                    return Err(Error::SchemaVersion { found: version, supported: SCHEMA_VERSION });
                }
            }
            None if leader => {
                stamp.put_cf(meta, META_SHARD_ID, u64::from(shard_id).to_le_bytes());
                stamp.put_cf(meta, META_SCHEMA_VERSION, u64::from(SCHEMA_VERSION).to_le_bytes());
            }
            None => return Err(Error::corrupt(Cf::Meta, META_SHARD_ID, "missing: not a shard database")),
        }
        let lineage = match get(META_LINEAGE)? {
            Some(l) => l,
            // Databases made before lineages existed get one when opened as leaders.
            None if leader => {
                let lineage = rand::random::<u64>() | 1;
                stamp.put_cf(meta, META_LINEAGE, lineage.to_le_bytes());
                lineage
            }
            None => return Err(Error::corrupt(Cf::Meta, META_LINEAGE, "missing on a replica")),
        };
        if !stamp.is_empty() {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db.write_opt(stamp, &wo)?;
        }
        let history = match self.db.get_cf(meta, META_EPOCHS)? {
            Some(bytes) => EpochHistory::decode(&bytes)
                .ok_or_else(|| Error::corrupt(Cf::Meta, META_EPOCHS, "bad epoch history"))?,
            None => EpochHistory::default(),
        };
        self.lineage = lineage;
        *self.history.get_mut().unwrap_or_else(|e| e.into_inner()) = Arc::new(history);
        Ok(())
    }

    /// Loads every pin record into the attribute rows, and recovers the next ordinal as
    /// the larger of the stored counter and the highest stored pin + 1 (so a crash
    /// between the two can never lead to reuse).
    fn rebuild_attributes(&mut self) -> Result<()> {
        let pins = self.cf(Cf::Pins);
        let mut attrs = PinAttributes::default();
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut expected = 0u32;
        for item in self.db.iterator_cf_opt(pins, ro, IteratorMode::Start) {
            let (k, v) = item?;
            let ordinal =
                decode_ordinal(&k).ok_or_else(|| Error::corrupt(Cf::Pins, &k, "bad ordinal key"))?;
            if ordinal != expected {
                return Err(Error::corrupt(Cf::Pins, &k, "ordinals are not dense"));
            }
            let rec = PinRecord::decode(&v).ok_or_else(|| Error::corrupt(Cf::Pins, &k, "bad pin record"))?;
            attrs.set(ordinal, &rec);
            expected = ordinal.wrapping_add(1);
        }
        let stored = match self.db.get_cf(self.cf(Cf::Meta), META_NEXT_ORDINAL)? {
            Some(v) => read_u64(Cf::Meta, META_NEXT_ORDINAL, &v)? as u32,
            None => 0,
        };
        let next = stored.max(attrs.len() as u32);
        *self.attrs.get_mut().unwrap_or_else(|e| e.into_inner()) = attrs;
        self.writer.get_mut().unwrap_or_else(|e| e.into_inner()).next_ordinal = next;
        *self.committed_next_ordinal.get_mut() = next;
        Ok(())
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, WriterState> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn attrs_mut(&self) -> RwLockWriteGuard<'_, PinAttributes> {
        self.attrs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard id this directory holds.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why this shard stopped taking writes, if its store failed: RocksDB reported
    /// no space, an I/O error or corruption on a write (RocksDB then refuses writes
    /// itself until reopened), or a read met corruption (writing on top of it could
    /// spread it). Reads continue. Cleared only by reopening.
    pub fn fault(&self) -> Option<String> {
        self.fault.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether [`Shard::fault`] is a damaged file (not a full, failing or read-only
    /// disk, nor a value that is wrong in every copy): this copy is bad, and a replica
    /// may be rebuilt from its leader's.
    pub fn fault_is_damaged_file(&self) -> bool {
        self.damaged_file.load(Ordering::Relaxed)
    }

    /// Passes `r` through, stopping writes if it is a storage fault (the first one is
    /// kept and logged).
    pub(crate) fn observe<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && e.is_storage_fault()
        {
            let mut fault = self.fault.write().unwrap_or_else(|e| e.into_inner());
            if fault.is_none() {
                tracing::error!(
                    shard = self.id,
                    path = %self.path.display(),
                    error = %e,
                    "store failed: the shard takes no more writes until it is reopened; it keeps serving reads"
                );
                *fault = Some(e.to_string());
                self.damaged_file.store(e.is_damaged_file(), Ordering::Relaxed);
            }
        }
        r
    }

    /// `Err(WritesStopped)` once the store failed.
    pub(crate) fn check_writable_store(&self) -> Result<()> {
        match self.fault() {
            Some(reason) => Err(Error::WritesStopped { shard: self.id, reason }),
            None => Ok(()),
        }
    }

    /// What this shard's read caches (bitmaps, follow lists) hold now.
    pub fn cache_usage(&self) -> CacheUsage {
        self.cache.usage()
    }

    /// The RocksDB memory budget this shard shares with the node's other shards.
    pub fn memory(&self) -> &StoreMemory {
        &self.memory
    }

    /// Read access to the pin attribute rows (hold it only for a scan).
    pub fn attributes(&self) -> RwLockReadGuard<'_, PinAttributes> {
        self.attrs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The ordinal the next new pin will get (= number of pins ever created here), as
    /// of the last published commit: every ordinal below it has its attribute row and
    /// bitmap entries in place. Never waits for a write in progress.
    pub fn next_ordinal(&self) -> u32 {
        self.committed_next_ordinal.load(Ordering::Acquire)
    }

    /// RocksDB's latest sequence number: what replication positions are measured in.
    pub fn latest_sequence(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    // ---------------------------------------------------------------- writes

    /// Applies the mutations atomically in one `WriteBatch` under the shard's current
    /// leader epoch (tools and tests; the service fences with [`Shard::write_at`]).
    /// Validation failures (unknown board, owner mismatch) fail the whole call and
    /// write nothing; a replica refuses with [`Error::ReadOnlyReplica`].
    pub fn write(&self, mutations: &[Mutation], durability: Durability) -> Result<WriteOutcome> {
        self.write_fenced(None, mutations, durability)
    }

    /// [`Shard::write`] by a writer that believes `epoch` is the leader epoch: refused
    /// with [`Error::StaleEpoch`] (naming the current one) unless it is.
    pub fn write_at(
        &self,
        epoch: u64,
        mutations: &[Mutation],
        durability: Durability,
    ) -> Result<WriteOutcome> {
        self.write_fenced(Some(epoch), mutations, durability)
    }

    fn write_fenced(
        &self,
        epoch: Option<u64>,
        mutations: &[Mutation],
        durability: Durability,
    ) -> Result<WriteOutcome> {
        self.write_as_of(epoch, mutations, durability, wall_clock_ms())
    }

    /// [`Shard::write`] (or [`Shard::write_at`] with `Some(epoch)`) as of `now_ms`, the
    /// clock the `seen` window reads: for backfills of dated impressions, and tests.
    pub fn write_as_of(
        &self,
        epoch: Option<u64>,
        mutations: &[Mutation],
        durability: Durability,
        now_ms: u64,
    ) -> Result<WriteOutcome> {
        let mut writer = self.lock_writer();
        let epoch = writer.check_writable(epoch)?;
        let prepared = write::prepare(self, writer.next_ordinal, mutations, now_ms)?;
        let sequence = self.apply(&mut writer, prepared.batch, &prepared.effects, durability)?;
        self.seen_counters.add(prepared.seen_dropped);
        Ok(WriteOutcome { sequence, epoch, applied: mutations.len(), unknown_pins: prepared.unknown_pins })
    }

    /// Flushes every column family's memtable to SST files (makes obsolete WAL files
    /// eligible for deletion).
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&ColumnFamily> = Cf::ALL.iter().map(|c| self.cf(*c)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    /// Compacts every column family fully (merges operands into stored bitmaps).
    pub fn compact(&self) -> Result<()> {
        for cf in Cf::ALL {
            self.db.compact_range_cf::<&[u8], &[u8]>(self.cf(cf), None, None);
        }
        Ok(())
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Shard>();
}

#[cfg(test)]
mod tests;
