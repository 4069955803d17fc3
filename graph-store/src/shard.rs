use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use feedgraph_model::{
    Board, BoardId, Durability, FollowTarget, Mutation, Pin, PinFlag, PinId, PinRef, TopicId, User, UserId,
};
use roaring::RoaringBitmap;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

use crate::attrs::PinAttributes;
use crate::bitmap::{self, Delta};
use crate::record::{
    EdgeKind, FilterKind, PinRecord, decode_board, decode_ordinal, encode_board, follow_key, ordinal_key,
    u32_key, u64_key,
};
use crate::{Error, Result, SCHEMA_VERSION};

/// Column families. Bitmap families carry the roaring merge operator.
const CF_META: &str = "meta";
const CF_PINS: &str = "pins";
const CF_PIN_IDS: &str = "pin_ids";
const CF_USERS: &str = "users";
const CF_BOARDS: &str = "boards";
const CF_USER_PINS: &str = "user_pins";
const CF_BOARD_PINS: &str = "board_pins";
const CF_TOPIC_PINS: &str = "topic_pins";
const CF_FOLLOWS: &str = "follows";
const CF_FILTERS: &str = "filters";
const CF_SEEN: &str = "seen";

const PLAIN_CFS: [&str; 6] = [CF_META, CF_PINS, CF_PIN_IDS, CF_USERS, CF_BOARDS, CF_FOLLOWS];
const BITMAP_CFS: [&str; 5] = [CF_USER_PINS, CF_BOARD_PINS, CF_TOPIC_PINS, CF_FILTERS, CF_SEEN];

const META_SHARD_ID: &[u8] = b"shard_id";
const META_SCHEMA_VERSION: &[u8] = b"schema_version";
const META_NEXT_ORDINAL: &[u8] = b"next_ordinal";
const META_EPOCH: &[u8] = b"epoch";

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
    /// LRU block cache for this shard, in bytes.
    pub block_cache_bytes: usize,
    /// Memtable size per column family, in bytes.
    pub write_buffer_bytes: usize,
    /// RocksDB background flush/compaction threads.
    pub background_jobs: i32,
    /// In-memory cache of decoded adjacency and filter bitmaps, in bytes (0 = off).
    pub bitmap_cache_bytes: u64,
    /// Users whose follow lists are cached.
    pub follows_cache_entries: u64,
}

impl ShardOptions {
    pub fn new(shard_id: u32) -> Self {
        Self {
            shard_id,
            wal_ttl_seconds: 3600,
            wal_size_limit_mb: 1024,
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 32 << 20,
            background_jobs: 2,
            bitmap_cache_bytes: 64 << 20,
            follows_cache_entries: 100_000,
        }
    }
}

/// What a committed write reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The shard's latest sequence number after the commit.
    pub sequence: u64,
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

/// One WAL write batch, as shipped to followers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalBatch {
    /// Sequence number of the batch's first operation.
    pub sequence: u64,
    /// Operations in the batch (each consumes one sequence number).
    pub count: u64,
    /// RocksDB's write-batch representation.
    pub data: Vec<u8>,
}

/// A large import: users, boards, pins (any order: the loader sorts pins by creation
/// time so that ordinals follow time) and follows.
#[derive(Clone, Debug, Default)]
pub struct BulkLoad {
    pub users: Vec<User>,
    pub boards: Vec<Board>,
    pub pins: Vec<Pin>,
    pub follows: Vec<(UserId, FollowTarget)>,
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

/// One shard: a RocksDB instance plus in-memory pin attributes. `Send + Sync`; every
/// method blocks on disk.
pub struct Shard {
    db: DB,
    id: u32,
    path: PathBuf,
    /// The single writer's state; held for the whole of a write so that ordinal
    /// allocation, commit and attribute update happen in one order.
    writer: Mutex<WriterState>,
    /// `writer.next_ordinal` as of the last commit, for readers: they must not wait on
    /// the writer's lock (held across a commit, fsync included).
    committed_next_ordinal: AtomicU32,
    attrs: RwLock<PinAttributes>,
    cache: ReadCache,
}

/// Decoded hot reads — adjacency and filter bitmaps, follow lists — invalidated
/// exactly: a write invalidates the bitmap keys its merge operands touched and the
/// follow lists it changed.
///
/// A reader that fetched a value from RocksDB caches it only if no write committed
/// since it started reading (`generation` unchanged), checked under `gate`; a writer
/// bumps `generation` and invalidates under the same gate after its commit. So a value
/// read before a commit is either inserted before the writer's invalidation (and
/// removed by it) or not inserted at all.
struct ReadCache {
    bitmaps: moka::sync::Cache<(u8, u64), Arc<RoaringBitmap>>,
    follows: moka::sync::Cache<UserId, Arc<Follows>>,
    generation: AtomicU64,
    gate: RwLock<()>,
}

impl ReadCache {
    fn new(opts: &ShardOptions) -> Self {
        let bitmaps = moka::sync::Cache::builder()
            .max_capacity(opts.bitmap_cache_bytes)
            .weigher(|_, v: &Arc<RoaringBitmap>| u32::try_from(v.serialized_size() + 64).unwrap_or(u32::MAX))
            .build();
        let follows = moka::sync::Cache::builder().max_capacity(opts.follows_cache_entries).build();
        Self { bitmaps, follows, generation: AtomicU64::new(0), gate: RwLock::new(()) }
    }

    /// Reads through the cache: `get` on a hit, else `load`, then `insert` only if no
    /// write committed meanwhile.
    fn read_through<V: Clone>(
        &self,
        get: impl FnOnce() -> Option<V>,
        load: impl FnOnce() -> Result<V>,
        insert: impl FnOnce(&V),
    ) -> Result<V> {
        if let Some(v) = get() {
            return Ok(v);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let v = load()?;
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) == generation {
            insert(&v);
        }
        Ok(v)
    }

    /// Cache key of a bitmap key, for the cached families.
    fn key(cf: &str, key: &[u8]) -> Option<(u8, u64)> {
        let id = match key.len() {
            8 => u64::from_be_bytes(key.try_into().ok()?),
            4 => u64::from(u32::from_be_bytes(key.try_into().ok()?)),
            _ => 0,
        };
        match cf {
            CF_USER_PINS => Some((1, id)),
            CF_BOARD_PINS => Some((2, id)),
            CF_TOPIC_PINS => Some((3, id)),
            CF_FILTERS => FilterKind::ALL.iter().position(|k| k.key() == key).map(|i| (4, i as u64)),
            _ => None,
        }
    }

    /// Called after a commit, with the bitmap keys and follow lists it changed.
    fn invalidate<'k>(&self, keys: impl Iterator<Item = (&'k str, &'k [u8])>, follows: &HashSet<UserId>) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        for (cf, key) in keys {
            if let Some(k) = Self::key(cf, key) {
                self.bitmaps.invalidate(&k);
            }
        }
        for user in follows {
            self.follows.invalidate(user);
        }
    }

    /// Called after a commit that may have changed anything (a bulk-load chunk).
    fn invalidate_all(&self) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.bitmaps.invalidate_all();
        self.follows.invalidate_all();
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).field("path", &self.path).finish()
    }
}

#[derive(Debug)]
struct WriterState {
    next_ordinal: u32,
}

fn db_options(opts: &ShardOptions, cache: &Cache) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_wal_ttl_seconds(opts.wal_ttl_seconds);
    db_opts.set_wal_size_limit_mb(opts.wal_size_limit_mb);
    db_opts.set_max_background_jobs(opts.background_jobs);
    db_opts.set_keep_log_file_num(4);

    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);

    let cf_opts = |merge: bool| {
        let mut o = Options::default();
        o.set_block_based_table_factory(&table);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_write_buffer_size(opts.write_buffer_bytes);
        if merge {
            o.set_merge_operator(bitmap::MERGE_OPERATOR_NAME, bitmap::full_merge, bitmap::partial_merge);
        }
        o
    };
    let mut cfs: Vec<ColumnFamilyDescriptor> =
        PLAIN_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_opts(false))).collect();
    cfs.extend(BITMAP_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_opts(true))));
    (db_opts, cfs)
}

fn read_u64(cf: &'static str, key: &[u8], value: &[u8]) -> Result<u64> {
    value.try_into().map(u64::from_le_bytes).map_err(|_| Error::corrupt(cf, key, "expected 8 bytes"))
}

impl Shard {
    /// Opens (creating if missing) the shard stored in `path`, and rebuilds the
    /// in-memory pin attributes from the `pins` column family.
    pub fn open(path: impl AsRef<Path>, opts: &ShardOptions) -> Result<Shard> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        let (db_opts, cfs) = db_options(opts, &cache);
        let db = DB::open_cf_descriptors(&db_opts, &path, cfs)?;
        let mut shard = Shard {
            db,
            id: opts.shard_id,
            path,
            writer: Mutex::new(WriterState { next_ordinal: 0 }),
            committed_next_ordinal: AtomicU32::new(0),
            attrs: RwLock::new(PinAttributes::default()),
            cache: ReadCache::new(opts),
        };
        shard.check_meta(opts.shard_id)?;
        shard.rebuild_attributes()?;
        Ok(shard)
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        // Every family is created at open (`create_missing_column_families`), so a
        // missing handle is a programming error in this module, caught by every test.
        #[allow(clippy::expect_used)]
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn check_meta(&mut self, shard_id: u32) -> Result<()> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, META_SHARD_ID)? {
            Some(v) => {
                let found = read_u64(CF_META, META_SHARD_ID, &v)? as u32;
                if found != shard_id {
                    return Err(Error::ShardMismatch { expected: shard_id, found });
                }
                let version = match self.db.get_cf(meta, META_SCHEMA_VERSION)? {
                    Some(v) => read_u64(CF_META, META_SCHEMA_VERSION, &v)? as u32,
                    None => return Err(Error::corrupt(CF_META, META_SCHEMA_VERSION, "missing")),
                };
                if version != SCHEMA_VERSION {
                    return Err(Error::SchemaVersion { found: version, supported: SCHEMA_VERSION });
                }
            }
            None => {
                let mut batch = WriteBatch::default();
                batch.put_cf(meta, META_SHARD_ID, u64::from(shard_id).to_le_bytes());
                batch.put_cf(meta, META_SCHEMA_VERSION, u64::from(SCHEMA_VERSION).to_le_bytes());
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db.write_opt(batch, &wo)?;
            }
        }
        Ok(())
    }

    /// Loads every pin record into the attribute columns, and recovers the next
    /// ordinal as the larger of the stored counter and the highest stored pin + 1 (so a
    /// crash between the two can never lead to reuse).
    fn rebuild_attributes(&mut self) -> Result<()> {
        let pins = self.cf(CF_PINS);
        let mut attrs = PinAttributes::default();
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut expected = 0u32;
        for item in self.db.iterator_cf_opt(pins, ro, IteratorMode::Start) {
            let (k, v) = item?;
            let ordinal = decode_ordinal(&k).ok_or_else(|| Error::corrupt(CF_PINS, &k, "bad ordinal key"))?;
            if ordinal != expected {
                return Err(Error::corrupt(CF_PINS, &k, "ordinals are not dense"));
            }
            let rec = PinRecord::decode(&v).ok_or_else(|| Error::corrupt(CF_PINS, &k, "bad pin record"))?;
            attrs.set(ordinal, &rec);
            expected = ordinal.wrapping_add(1);
        }
        let stored = match self.db.get_cf(self.cf(CF_META), META_NEXT_ORDINAL)? {
            Some(v) => read_u64(CF_META, META_NEXT_ORDINAL, &v)? as u32,
            None => 0,
        };
        let next = stored.max(attrs.len() as u32);
        *self.attrs.get_mut().unwrap_or_else(|e| e.into_inner()) = attrs;
        self.writer.get_mut().unwrap_or_else(|e| e.into_inner()).next_ordinal = next;
        *self.committed_next_ordinal.get_mut() = next;
        Ok(())
    }

    fn lock_writer(&self) -> MutexGuard<'_, WriterState> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attrs_mut(&self) -> RwLockWriteGuard<'_, PinAttributes> {
        self.attrs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard id this directory holds.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read access to the pin attribute columns (hold it only for a scan).
    pub fn attributes(&self) -> RwLockReadGuard<'_, PinAttributes> {
        self.attrs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The ordinal the next new pin will get (= number of pins ever created here), as
    /// of the last commit. Never waits for a write in progress.
    pub fn next_ordinal(&self) -> u32 {
        self.committed_next_ordinal.load(Ordering::Acquire)
    }

    /// RocksDB's latest sequence number: what replication positions are measured in.
    pub fn latest_sequence(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    // ---------------------------------------------------------------- writes

    /// Applies the mutations atomically in one `WriteBatch`. Validation failures
    /// (unknown board, owner mismatch) fail the whole call and write nothing.
    pub fn write(&self, mutations: &[Mutation], durability: Durability) -> Result<WriteOutcome> {
        let mut writer = self.lock_writer();
        let mut w = BatchBuilder::new(self, writer.next_ordinal);
        for m in mutations {
            w.apply(m)?;
        }
        let BatchBuilder { batch, deltas, records, next_ordinal, unknown_pins, follow_changes, .. } = w;
        let mut batch = batch;
        for ((cf, key), delta) in &deltas {
            if !delta.is_empty() {
                batch.merge_cf(self.cf(cf), key, delta.encode());
            }
        }
        if next_ordinal != writer.next_ordinal {
            batch.put_cf(self.cf(CF_META), META_NEXT_ORDINAL, u64::from(next_ordinal).to_le_bytes());
        }
        self.commit(batch, durability)?;
        writer.next_ordinal = next_ordinal;
        self.committed_next_ordinal.store(next_ordinal, Ordering::Release);
        self.cache.invalidate(deltas.keys().map(|(cf, key)| (*cf, key.as_slice())), &follow_changes);
        let mut attrs = self.attrs_mut();
        for (ordinal, rec) in &records {
            attrs.set(*ordinal, rec);
        }
        drop(attrs);
        Ok(WriteOutcome { sequence: self.latest_sequence(), applied: mutations.len(), unknown_pins })
    }

    fn commit(&self, batch: WriteBatch, durability: Durability) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Records the leadership epoch this shard is written under (fsync'ed).
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let _writer = self.lock_writer();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), META_EPOCH, epoch.to_le_bytes());
        self.commit(batch, Durability::Sync)
    }

    /// The last recorded epoch (0 if none).
    pub fn epoch(&self) -> Result<u64> {
        match self.db.get_cf(self.cf(CF_META), META_EPOCH)? {
            Some(v) => read_u64(CF_META, META_EPOCH, &v),
            None => Ok(0),
        }
    }

    // ---------------------------------------------------------------- bulk load

    /// Imports a large data set in chunks of `chunk_pins` pins, each chunk one atomic
    /// `WriteBatch` holding complete pins with all their edges (so a crash leaves a
    /// consistent prefix), and fsyncs the WAL at the end. Pins are sorted by creation
    /// time first so that ordinals follow time. Pins already on the shard are skipped
    /// (use [`Shard::write`] to update them). The whole load is validated before the
    /// first chunk is written.
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
        let shard_was_empty = writer.next_ordinal == 0;

        // Users, boards and follows go in the first batch.
        let mut batch = WriteBatch::default();
        for u in &users {
            batch.put_cf(self.cf(CF_USERS), u64_key(u.id.get()), u.username.as_bytes());
        }
        for b in &boards {
            batch.put_cf(self.cf(CF_BOARDS), u64_key(b.id.get()), encode_board(b.owner, &b.name));
        }
        for (follower, target) in &follows {
            let (key, value) = follow_entry(*follower, *target);
            batch.put_cf(self.cf(CF_FOLLOWS), key, value);
            stats.edges_written += 1;
        }

        let mut done = 0u64;
        for chunk in pins.chunks(chunk_pins) {
            let existing: Vec<bool> = if shard_was_empty {
                vec![false; chunk.len()]
            } else {
                let keys: Vec<[u8; 8]> = chunk.iter().map(|p| u64_key(p.id.get())).collect();
                self.db
                    .batched_multi_get_cf(self.cf(CF_PIN_IDS), keys.iter(), false)
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
            let mut new_records = Vec::with_capacity(chunk.len());
            for (p, exists) in chunk.iter().zip(existing) {
                if exists || (duplicate_ids.contains(&p.id) && !first_of_duplicates.insert(p.id)) {
                    stats.pins_skipped += 1;
                    continue;
                }
                let ordinal = next;
                next = next.checked_add(1).ok_or(Error::OrdinalsExhausted { shard: self.id })?;
                let rec = PinRecord {
                    id: p.id,
                    owner: p.owner,
                    board: p.board,
                    created_at_ms: p.created_at_ms,
                    topics: p.topics.clone(),
                    signals: p.signals,
                    deleted: false,
                    spam: false,
                    is_unsafe: false,
                };
                batch.put_cf(self.cf(CF_PINS), ordinal_key(ordinal), rec.encode());
                id_entries.push((p.id.get(), ordinal));
                user_edges.entry(p.owner.get()).or_default().push(ordinal);
                board_edges.entry(p.board.get()).or_default().push(ordinal);
                for t in &p.topics {
                    topic_edges.entry(t.get()).or_default().push(ordinal);
                }
                stats.edges_written += 2 + p.topics.len() as u64;
                new_records.push((ordinal, rec));
            }
            id_entries.sort_unstable();
            for (id, ordinal) in id_entries {
                batch.put_cf(self.cf(CF_PIN_IDS), u64_key(id), ordinal.to_le_bytes());
            }
            for (cf, edges) in [(CF_USER_PINS, user_edges), (CF_BOARD_PINS, board_edges)] {
                let mut edges: Vec<(u64, Vec<u32>)> = edges.into_iter().collect();
                edges.sort_unstable_by_key(|(k, _)| *k);
                for (key, ordinals) in edges {
                    batch.merge_cf(self.cf(cf), u64_key(key), bitmap::encode_sorted_additions(&ordinals));
                }
            }
            let mut topic_edges: Vec<(u32, Vec<u32>)> = topic_edges.into_iter().collect();
            topic_edges.sort_unstable_by_key(|(k, _)| *k);
            for (key, ordinals) in topic_edges {
                batch.merge_cf(
                    self.cf(CF_TOPIC_PINS),
                    u32_key(key),
                    bitmap::encode_sorted_additions(&ordinals),
                );
            }
            batch.put_cf(self.cf(CF_META), META_NEXT_ORDINAL, u64::from(next).to_le_bytes());
            self.commit(std::mem::take(&mut batch), Durability::Buffered)?;
            writer.next_ordinal = next;
            self.committed_next_ordinal.store(next, Ordering::Release);
            self.cache.invalidate_all();
            {
                let mut attrs = self.attrs_mut();
                attrs.reserve(new_records.len());
                for (ordinal, rec) in &new_records {
                    attrs.set(*ordinal, rec);
                }
            }
            stats.pins_loaded += new_records.len() as u64;
            done += chunk.len() as u64;
            progress(&BulkProgress { pins_done: done, pins_total, edges_written: stats.edges_written });
        }
        // The final (possibly pin-less) batch, synced: it makes every earlier chunk
        // durable too, since the WAL is sequential.
        self.commit(batch, Durability::Sync)?;
        self.cache.invalidate_all();
        if pins.is_empty() {
            progress(&BulkProgress { pins_done: 0, pins_total: 0, edges_written: stats.edges_written });
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }

    // ---------------------------------------------------------------- reads

    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// The ordinal of a pin, if it exists on this shard.
    pub fn ordinal(&self, pin: PinId) -> Result<Option<u32>> {
        let key = u64_key(pin.get());
        match self.db.get_pinned_cf(self.cf(CF_PIN_IDS), key)? {
            Some(v) => Ok(Some(
                v.as_ref()
                    .try_into()
                    .map(u32::from_le_bytes)
                    .map_err(|_| Error::corrupt(CF_PIN_IDS, &key, "expected 4 bytes"))?,
            )),
            None => Ok(None),
        }
    }

    /// The stored record of the pin with this ordinal.
    pub fn pin_at(&self, ordinal: u32) -> Result<Option<PinRecord>> {
        let key = ordinal_key(ordinal);
        match self.get(CF_PINS, &key)? {
            Some(v) => {
                PinRecord::decode(&v).map(Some).ok_or_else(|| Error::corrupt(CF_PINS, &key, "bad pin record"))
            }
            None => Ok(None),
        }
    }

    /// A pin and its ordinal; `None` for a pin this shard does not hold.
    pub fn pin(&self, pin: PinId) -> Result<Option<(u32, PinRecord)>> {
        match self.ordinal(pin)? {
            Some(ordinal) => Ok(self.pin_at(ordinal)?.map(|r| (ordinal, r))),
            None => Ok(None),
        }
    }

    pub fn user(&self, user: UserId) -> Result<Option<User>> {
        let key = u64_key(user.get());
        match self.get(CF_USERS, &key)? {
            Some(v) => {
                let username =
                    String::from_utf8(v).map_err(|_| Error::corrupt(CF_USERS, &key, "bad utf-8"))?;
                Ok(Some(User { id: user, username }))
            }
            None => Ok(None),
        }
    }

    pub fn board(&self, board: BoardId) -> Result<Option<Board>> {
        Ok(self.board_record(board)?.map(|(owner, name)| Board { id: board, owner, name }))
    }

    fn board_record(&self, board: BoardId) -> Result<Option<(UserId, String)>> {
        let key = u64_key(board.get());
        match self.get(CF_BOARDS, &key)? {
            Some(v) => {
                decode_board(&v).map(Some).ok_or_else(|| Error::corrupt(CF_BOARDS, &key, "bad board record"))
            }
            None => Ok(None),
        }
    }

    fn bitmap(&self, cf: &'static str, key: &[u8]) -> Result<RoaringBitmap> {
        match self.db.get_pinned_cf(self.cf(cf), key)? {
            Some(v) => bitmap::decode_bitmap(&v).ok_or_else(|| Error::corrupt(cf, key, "bad bitmap")),
            None => Ok(RoaringBitmap::new()),
        }
    }

    fn bitmaps(&self, cf: &'static str, keys: Vec<Vec<u8>>) -> Result<Vec<RoaringBitmap>> {
        let handle = self.cf(cf);
        self.db
            .batched_multi_get_cf(handle, keys.iter(), false)
            .into_iter()
            .zip(&keys)
            .map(|(r, key)| match r? {
                Some(v) => bitmap::decode_bitmap(&v).ok_or_else(|| Error::corrupt(cf, key, "bad bitmap")),
                None => Ok(RoaringBitmap::new()),
            })
            .collect()
    }

    /// `bitmaps` through the cache, in input order; the misses in one batched read.
    fn bitmaps_cached(&self, cf: &'static str, keys: Vec<Vec<u8>>) -> Result<Vec<Arc<RoaringBitmap>>> {
        let cache_keys: Vec<Option<(u8, u64)>> = keys.iter().map(|k| ReadCache::key(cf, k)).collect();
        let cached: Vec<Option<Arc<RoaringBitmap>>> =
            cache_keys.iter().map(|ck| ck.and_then(|ck| self.cache.bitmaps.get(&ck))).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|i| cached[*i].is_none()).collect();
        let fetched = self.cache.read_through(
            || missing.is_empty().then(Vec::new),
            || {
                let fetched = self.bitmaps(cf, missing.iter().map(|i| keys[*i].clone()).collect())?;
                Ok(fetched.into_iter().map(Arc::new).collect::<Vec<_>>())
            },
            |fetched| {
                for (i, bitmap) in missing.iter().zip(fetched) {
                    if let Some(ck) = cache_keys[*i] {
                        self.cache.bitmaps.insert(ck, bitmap.clone());
                    }
                }
            },
        )?;
        let mut fetched = fetched.into_iter();
        Ok(cached.into_iter().map(|c| c.or_else(|| fetched.next()).unwrap_or_default()).collect())
    }

    /// Cached `user_pins` of many users, in input order (the retrieval hot path).
    pub fn user_pins_cached(&self, users: &[UserId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(CF_USER_PINS, users.iter().map(|u| u64_key(u.get()).to_vec()).collect())
    }

    /// Cached `board_pins` of many boards, in input order.
    pub fn board_pins_cached(&self, boards: &[BoardId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(CF_BOARD_PINS, boards.iter().map(|b| u64_key(b.get()).to_vec()).collect())
    }

    /// Cached `topic_pins` of many topics, in input order.
    pub fn topic_pins_cached(&self, topics: &[TopicId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(CF_TOPIC_PINS, topics.iter().map(|t| u32_key(t.get()).to_vec()).collect())
    }

    /// Cached filter bitmaps, in [`FilterKind::ALL`] order.
    pub fn filters_cached(&self) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(CF_FILTERS, FilterKind::ALL.iter().map(|k| k.key().to_vec()).collect())
    }

    /// Ordinals of the pins a user owns (empty for an unknown user).
    pub fn user_pins(&self, user: UserId) -> Result<RoaringBitmap> {
        self.bitmap(CF_USER_PINS, &u64_key(user.get()))
    }

    /// Ordinals of the pins on a board (empty for an unknown board).
    pub fn board_pins(&self, board: BoardId) -> Result<RoaringBitmap> {
        self.bitmap(CF_BOARD_PINS, &u64_key(board.get()))
    }

    /// Ordinals of this shard's pins about a topic.
    pub fn topic_pins(&self, topic: TopicId) -> Result<RoaringBitmap> {
        self.bitmap(CF_TOPIC_PINS, &u32_key(topic.get()))
    }

    /// `user_pins` of many users in one batched read, in input order.
    pub fn user_pins_many(&self, users: &[UserId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(CF_USER_PINS, users.iter().map(|u| u64_key(u.get()).to_vec()).collect())
    }

    /// `board_pins` of many boards in one batched read, in input order.
    pub fn board_pins_many(&self, boards: &[BoardId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(CF_BOARD_PINS, boards.iter().map(|b| u64_key(b.get()).to_vec()).collect())
    }

    /// `topic_pins` of many topics in one batched read, in input order.
    pub fn topic_pins_many(&self, topics: &[TopicId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(CF_TOPIC_PINS, topics.iter().map(|t| u32_key(t.get()).to_vec()).collect())
    }

    /// Ordinals flagged with `kind`.
    pub fn filter(&self, kind: FilterKind) -> Result<RoaringBitmap> {
        self.bitmap(CF_FILTERS, kind.key())
    }

    /// Ordinals of this shard's pins the user has been shown.
    pub fn seen(&self, user: UserId) -> Result<RoaringBitmap> {
        self.bitmap(CF_SEEN, &u64_key(user.get()))
    }

    /// `follows` through the cache (the broker reads this on every feed request).
    pub fn follows_cached(&self, user: UserId) -> Result<Arc<Follows>> {
        self.cache.read_through(
            || self.cache.follows.get(&user),
            || Ok(Arc::new(self.follows(user)?)),
            |f| self.cache.follows.insert(user, f.clone()),
        )
    }

    /// A user's follow and block lists (empty for an unknown user).
    pub fn follows(&self, user: UserId) -> Result<Follows> {
        let prefix = u64_key(user.get());
        let mut out = Follows::default();
        let iter = self.db.iterator_cf(self.cf(CF_FOLLOWS), IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let bad = || Error::corrupt(CF_FOLLOWS, &k, "bad follow entry");
            let (kind, target) = match k.get(8..) {
                Some([kind, rest @ ..]) if rest.len() == 8 => {
                    (*kind, u64::from_be_bytes(rest.try_into().map_err(|_| bad())?))
                }
                _ => return Err(bad()),
            };
            match kind {
                k if k == EdgeKind::User as u8 => out.users.push(UserId::new(target).ok_or_else(bad)?),
                k if k == EdgeKind::Blocked as u8 => out.blocked.push(UserId::new(target).ok_or_else(bad)?),
                k if k == EdgeKind::Topic as u8 => {
                    let t = u32::try_from(target).ok().and_then(TopicId::new).ok_or_else(bad)?;
                    out.topics.push(t);
                }
                k if k == EdgeKind::Board as u8 => {
                    let owner = v
                        .as_ref()
                        .try_into()
                        .ok()
                        .map(u64::from_le_bytes)
                        .and_then(UserId::new)
                        .ok_or_else(bad)?;
                    out.boards.push((BoardId::new(target).ok_or_else(bad)?, owner));
                }
                _ => return Err(bad()),
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- replication

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
            expected = sequence + count;
            bytes += batch.size_in_bytes();
            out.push(WalBatch { sequence, count, data: batch.data().to_vec() });
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

    /// Writes a consistent checkpoint (hard links where possible) into `dir`, which
    /// must not exist, and returns the sequence number it contains. Writes wait while
    /// it is taken, so the returned sequence is exact.
    pub fn checkpoint(&self, dir: impl AsRef<Path>) -> Result<u64> {
        let _writer = self.lock_writer();
        let sequence = self.latest_sequence();
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir.as_ref())?;
        Ok(sequence)
    }

    /// Flushes every column family's memtable to SST files (makes obsolete WAL files
    /// eligible for deletion).
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&ColumnFamily> = PLAIN_CFS.iter().chain(&BITMAP_CFS).map(|n| self.cf(n)).collect();
        self.db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }

    /// Compacts every column family fully (merges operands into stored bitmaps).
    pub fn compact(&self) -> Result<()> {
        for name in PLAIN_CFS.iter().chain(&BITMAP_CFS) {
            self.db.compact_range_cf::<&[u8], &[u8]>(self.cf(name), None, None);
        }
        Ok(())
    }
}

fn follow_entry(follower: UserId, target: FollowTarget) -> ([u8; 17], Vec<u8>) {
    match target {
        FollowTarget::User(u) => (follow_key(follower, EdgeKind::User, u.get()), Vec::new()),
        FollowTarget::Board { board, owner } => {
            (follow_key(follower, EdgeKind::Board, board.get()), owner.get().to_le_bytes().to_vec())
        }
        FollowTarget::Topic(t) => (follow_key(follower, EdgeKind::Topic, u64::from(t.get())), Vec::new()),
    }
}

/// Accumulates one write request into a `WriteBatch`, with an overlay of what the
/// batch itself created so that later mutations see earlier ones.
struct BatchBuilder<'a> {
    shard: &'a Shard,
    batch: WriteBatch,
    /// Bitmap changes, aggregated per key (one merge operand per key per batch).
    deltas: BTreeMap<(&'static str, Vec<u8>), Delta>,
    /// Pins created or changed by this batch, by ordinal.
    records: BTreeMap<u32, PinRecord>,
    new_ordinals: HashMap<PinId, u32>,
    boards: HashMap<BoardId, UserId>,
    next_ordinal: u32,
    unknown_pins: usize,
    /// Users whose follow or block lists this batch changes.
    follow_changes: HashSet<UserId>,
}

impl<'a> BatchBuilder<'a> {
    fn new(shard: &'a Shard, next_ordinal: u32) -> Self {
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
        }
    }

    fn change(&mut self, cf: &'static str, key: Vec<u8>, delta: Delta) {
        let slot = self.deltas.entry((cf, key)).or_default();
        *slot = std::mem::take(slot).then(&delta);
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
            None => Err(Error::corrupt(CF_PINS, &ordinal_key(ordinal), "pin id maps to a missing ordinal")),
        }
    }

    /// Like `existing_pin`, for pin-level mutations: an unknown pin (or one with another
    /// owner, which therefore is not this pin) counts as unknown and is a no-op.
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
        self.batch.put_cf(self.shard.cf(CF_PINS), ordinal_key(ordinal), rec.encode());
        self.records.insert(ordinal, rec);
    }

    fn apply(&mut self, m: &Mutation) -> Result<()> {
        let shard = self.shard;
        let cf = |n| shard.cf(n);
        match m {
            Mutation::UpsertUser(u) => {
                self.batch.put_cf(cf(CF_USERS), u64_key(u.id.get()), u.username.as_bytes());
            }
            Mutation::UpsertBoard(b) => {
                if let Some(owner) = self.board_owner(b.id)? {
                    Error::check_owner(|| format!("board {}", b.id), owner, b.owner)?;
                }
                self.batch.put_cf(cf(CF_BOARDS), u64_key(b.id.get()), encode_board(b.owner, &b.name));
                self.boards.insert(b.id, b.owner);
            }
            Mutation::UpsertPin(p) => self.upsert_pin(p)?,
            Mutation::Follow { follower, target } => {
                let (key, value) = follow_entry(*follower, *target);
                self.batch.put_cf(cf(CF_FOLLOWS), key, value);
                self.follow_changes.insert(*follower);
            }
            Mutation::Unfollow { follower, target } => {
                let (key, _) = follow_entry(*follower, *target);
                self.batch.delete_cf(cf(CF_FOLLOWS), key);
                self.follow_changes.insert(*follower);
            }
            Mutation::BlockUser { user, blocked } => {
                self.batch.put_cf(cf(CF_FOLLOWS), follow_key(*user, EdgeKind::Blocked, blocked.get()), []);
                self.follow_changes.insert(*user);
            }
            Mutation::UnblockUser { user, blocked } => {
                self.batch.delete_cf(cf(CF_FOLLOWS), follow_key(*user, EdgeKind::Blocked, blocked.get()));
                self.follow_changes.insert(*user);
            }
            Mutation::DeletePin(pin) => {
                if let Some((ordinal, mut rec)) = self.referenced_pin(*pin)? {
                    rec.deleted = true;
                    self.put_record(ordinal, rec);
                    self.change(CF_FILTERS, FilterKind::Deleted.key().to_vec(), Delta::add([ordinal]));
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
                    self.change(CF_FILTERS, kind.key().to_vec(), delta);
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
                    self.change(CF_SEEN, u64_key(user.get()).to_vec(), Delta::add(ordinals));
                }
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
                    self.change(CF_BOARD_PINS, u64_key(old.board.get()).to_vec(), Delta::remove([ordinal]));
                    self.change(CF_BOARD_PINS, u64_key(p.board.get()).to_vec(), Delta::add([ordinal]));
                }
                for t in old.topics.iter().filter(|t| !p.topics.contains(t)) {
                    self.change(CF_TOPIC_PINS, u32_key(t.get()).to_vec(), Delta::remove([ordinal]));
                }
                for t in p.topics.iter().filter(|t| !old.topics.contains(t)) {
                    self.change(CF_TOPIC_PINS, u32_key(t.get()).to_vec(), Delta::add([ordinal]));
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
                self.batch.put_cf(self.shard.cf(CF_PIN_IDS), u64_key(p.id.get()), ordinal.to_le_bytes());
                self.change(CF_USER_PINS, u64_key(p.owner.get()).to_vec(), Delta::add([ordinal]));
                self.change(CF_BOARD_PINS, u64_key(p.board.get()).to_vec(), Delta::add([ordinal]));
                for t in &p.topics {
                    self.change(CF_TOPIC_PINS, u32_key(t.get()).to_vec(), Delta::add([ordinal]));
                }
                let rec = PinRecord {
                    id: p.id,
                    owner: p.owner,
                    board: p.board,
                    created_at_ms: p.created_at_ms,
                    topics: p.topics.clone(),
                    signals: p.signals,
                    deleted: false,
                    spam: false,
                    is_unsafe: false,
                };
                self.put_record(ordinal, rec);
            }
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
mod tests {
    use super::*;
    use feedgraph_model::PinSignals;

    pub(crate) fn uid(v: u64) -> UserId {
        UserId::new(v).unwrap()
    }
    fn bid(v: u64) -> BoardId {
        BoardId::new(v).unwrap()
    }
    fn pid(v: u64) -> PinId {
        PinId::new(v).unwrap()
    }
    fn tid(v: u32) -> TopicId {
        TopicId::new(v).unwrap()
    }

    fn pin(id: u64, owner: u64, board: u64, t: i64, topics: &[u32]) -> Mutation {
        Mutation::UpsertPin(Pin {
            id: pid(id),
            owner: uid(owner),
            board: bid(board),
            created_at_ms: t,
            topics: topics.iter().map(|t| tid(*t)).collect(),
            signals: PinSignals { quality: 0.5, saves: 1, clicks: 2, closeups: 3 },
        })
    }

    fn board(id: u64, owner: u64) -> Mutation {
        Mutation::UpsertBoard(Board { id: bid(id), owner: uid(owner), name: format!("b{id}") })
    }

    fn open(dir: &Path) -> Shard {
        Shard::open(dir, &ShardOptions::new(3)).unwrap()
    }

    fn ids(b: &RoaringBitmap) -> Vec<u32> {
        b.iter().collect()
    }

    #[test]
    fn pins_get_dense_ordinals_and_rewrites_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(
            &[board(1, 10), pin(100, 10, 1, 1000, &[7]), pin(101, 10, 1, 2000, &[7, 8])],
            Durability::Sync,
        )
        .unwrap();
        assert_eq!(s.ordinal(pid(100)).unwrap(), Some(0));
        assert_eq!(s.ordinal(pid(101)).unwrap(), Some(1));
        // Re-writing moves the pin to another board and topic, keeping its ordinal.
        s.write(&[board(2, 10), pin(100, 10, 2, 1000, &[8])], Durability::Buffered).unwrap();
        assert_eq!(s.ordinal(pid(100)).unwrap(), Some(0));
        assert_eq!(s.next_ordinal(), 2);
        assert_eq!(ids(&s.board_pins(bid(1)).unwrap()), [1]);
        assert_eq!(ids(&s.board_pins(bid(2)).unwrap()), [0]);
        assert_eq!(ids(&s.topic_pins(tid(7)).unwrap()), [1]);
        assert_eq!(ids(&s.topic_pins(tid(8)).unwrap()), [0, 1]);
        assert_eq!(ids(&s.user_pins(uid(10)).unwrap()), [0, 1]);
        assert_eq!(s.attributes().get(0).unwrap().board, 2);
    }

    #[test]
    fn a_pin_on_a_missing_board_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let before = s.latest_sequence();
        let err =
            s.write(&[board(1, 10), pin(100, 10, 1, 1, &[]), pin(101, 10, 9, 1, &[])], Durability::Sync);
        assert!(matches!(err, Err(Error::BoardNotFound(b)) if b == bid(9)));
        assert_eq!(s.latest_sequence(), before);
        assert_eq!(s.ordinal(pid(100)).unwrap(), None);
        assert!(s.board(bid(1)).unwrap().is_none());
        assert_eq!(s.next_ordinal(), 0);
        // A board of another owner is refused too.
        s.write(&[board(1, 10)], Durability::Sync).unwrap();
        assert!(matches!(
            s.write(&[pin(100, 11, 1, 1, &[])], Durability::Sync),
            Err(Error::OwnerMismatch { .. })
        ));
    }

    #[test]
    fn unknown_ids_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert!(s.user_pins(uid(5)).unwrap().is_empty());
        assert!(s.board_pins(bid(5)).unwrap().is_empty());
        assert!(s.topic_pins(tid(5)).unwrap().is_empty());
        assert!(s.seen(uid(5)).unwrap().is_empty());
        assert!(s.filter(FilterKind::Spam).unwrap().is_empty());
        assert_eq!(s.follows(uid(5)).unwrap(), Follows::default());
        assert!(s.pin(pid(5)).unwrap().is_none());
        assert!(s.user(uid(5)).unwrap().is_none());
        assert_eq!(s.board_pins_many(&[bid(1), bid(2)]).unwrap().len(), 2);
        // Pin-level writes on unknown pins are counted no-ops.
        let out = s
            .write(&[Mutation::DeletePin(PinRef { pin: pid(5), owner: uid(1) })], Durability::Buffered)
            .unwrap();
        assert_eq!(out.unknown_pins, 1);
    }

    #[test]
    fn follows_blocks_filters_and_seen() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let r = |p| PinRef { pin: pid(p), owner: uid(10) };
        s.write(
            &[
                board(1, 10),
                pin(100, 10, 1, 1, &[]),
                pin(101, 10, 1, 2, &[]),
                pin(102, 10, 1, 3, &[]),
                Mutation::Follow { follower: uid(1), target: FollowTarget::User(uid(10)) },
                Mutation::Follow {
                    follower: uid(1),
                    target: FollowTarget::Board { board: bid(1), owner: uid(10) },
                },
                Mutation::Follow { follower: uid(1), target: FollowTarget::Topic(tid(4)) },
                Mutation::Follow { follower: uid(2), target: FollowTarget::User(uid(10)) },
                Mutation::BlockUser { user: uid(1), blocked: uid(66) },
                Mutation::DeletePin(r(100)),
                Mutation::FlagPin { pin: r(101), flag: PinFlag::Spam, on: true },
                Mutation::FlagPin { pin: r(102), flag: PinFlag::Unsafe, on: true },
                Mutation::FlagPin { pin: r(102), flag: PinFlag::Unsafe, on: false },
                Mutation::RecordImpressions { user: uid(1), pins: vec![r(101), r(102), r(999)] },
            ],
            Durability::Sync,
        )
        .unwrap();
        let f = s.follows(uid(1)).unwrap();
        assert_eq!(f.users, [uid(10)]);
        assert_eq!(f.boards, [(bid(1), uid(10))]);
        assert_eq!(f.topics, [tid(4)]);
        assert_eq!(f.blocked, [uid(66)]);
        assert_eq!(ids(&s.filter(FilterKind::Deleted).unwrap()), [0]);
        assert_eq!(ids(&s.filter(FilterKind::Spam).unwrap()), [1]);
        assert!(s.filter(FilterKind::Unsafe).unwrap().is_empty());
        assert_eq!(ids(&s.seen(uid(1)).unwrap()), [1, 2]);
        let a = s.attributes();
        assert!(a.get(0).unwrap().deleted && a.get(1).unwrap().spam && !a.get(2).unwrap().is_unsafe);
        drop(a);
        s.write(
            &[
                Mutation::Unfollow { follower: uid(1), target: FollowTarget::User(uid(10)) },
                Mutation::UnblockUser { user: uid(1), blocked: uid(66) },
            ],
            Durability::Sync,
        )
        .unwrap();
        let f = s.follows(uid(1)).unwrap();
        assert!(f.users.is_empty() && f.blocked.is_empty() && f.boards.len() == 1);
        assert_eq!(s.follows(uid(2)).unwrap().users, [uid(10)]);
    }

    #[test]
    fn reopen_keeps_everything_and_never_reuses_ordinals() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.write(&[board(1, 10), pin(100, 10, 1, 5, &[3]), pin(101, 10, 1, 6, &[3])], Durability::Sync)
                .unwrap();
            s.write(
                &[Mutation::UpdateSignals {
                    pin: PinRef { pin: pid(101), owner: uid(10) },
                    update: feedgraph_model::SignalsUpdate { saves: Some(42), ..Default::default() },
                }],
                Durability::Sync,
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = open(dir.path());
        assert_eq!(s.next_ordinal(), 2);
        assert_eq!(ids(&s.topic_pins(tid(3)).unwrap()), [0, 1]);
        assert_eq!(s.attributes().get(1).unwrap().signals.saves, 42);
        assert_eq!(s.attributes().len(), 2);
        s.write(&[pin(102, 10, 1, 7, &[])], Durability::Sync).unwrap();
        assert_eq!(s.ordinal(pid(102)).unwrap(), Some(2));
        drop(s);
        // A directory of another shard is refused.
        assert!(matches!(
            Shard::open(dir.path(), &ShardOptions::new(4)),
            Err(Error::ShardMismatch { expected: 4, found: 3 })
        ));
    }

    #[test]
    fn bulk_load_sorts_by_time_skips_existing_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(&[board(1, 10), pin(500, 10, 1, 1, &[])], Durability::Sync).unwrap();
        let pins: Vec<Pin> = (0..1000u64)
            .map(|i| Pin {
                id: pid(1000 - i),
                owner: uid(10),
                board: bid(1 + i % 2),
                created_at_ms: 10_000 - i as i64,
                topics: vec![tid(1 + (i % 3) as u32)],
                signals: PinSignals::default(),
            })
            .collect();
        let mut with_dup = pins.clone();
        with_dup.push(pins[0].clone());
        let mut reports = Vec::new();
        let stats = s
            .bulk_load(
                BulkLoad {
                    users: vec![User { id: uid(10), username: "ten".into() }],
                    boards: vec![Board { id: bid(2), owner: uid(10), name: "two".into() }],
                    pins: with_dup,
                    follows: vec![(uid(1), FollowTarget::User(uid(10)))],
                },
                300,
                &mut |p| reports.push(*p),
            )
            .unwrap();
        // pin 500 exists already; one duplicate.
        assert_eq!(stats.pins_loaded, 999);
        assert_eq!(stats.pins_skipped, 2);
        assert_eq!(reports.len(), 4);
        assert_eq!(reports.last().unwrap().pins_done, 1001);
        // Ordinals follow creation time: the oldest pin (id 1, t = 9001) comes first.
        assert_eq!(s.ordinal(pid(1)).unwrap(), Some(1));
        assert_eq!(s.ordinal(pid(1000)).unwrap(), Some(999));
        assert_eq!(s.user_pins(uid(10)).unwrap().len(), 1000);
        assert_eq!(s.follows(uid(1)).unwrap().users, [uid(10)]);
        assert_eq!(s.attributes().len(), 1000);
        // A pin on an unknown board fails the load before anything is written.
        let seq = s.latest_sequence();
        let bad = BulkLoad {
            pins: vec![Pin {
                id: pid(77_777),
                owner: uid(10),
                board: bid(99),
                created_at_ms: 1,
                topics: vec![],
                signals: PinSignals::default(),
            }],
            ..Default::default()
        };
        assert!(matches!(s.bulk_load(bad, 10, &mut |_| {}), Err(Error::BoardNotFound(_))));
        assert_eq!(s.latest_sequence(), seq);
    }

    #[test]
    fn corrupt_values_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(&[board(1, 10), pin(100, 10, 1, 1, &[])], Durability::Sync).unwrap();
        // Corrupt a stored bitmap, a merge operand, a pin record and a follow entry.
        s.db.put_cf(s.cf(CF_BOARD_PINS), u64_key(1), b"garbage").unwrap();
        assert!(matches!(s.board_pins(bid(1)), Err(Error::Corrupt { .. })));
        s.db.merge_cf(s.cf(CF_TOPIC_PINS), u32_key(9), [42u8, 1]).unwrap();
        assert!(s.topic_pins(tid(9)).is_err());
        s.db.put_cf(s.cf(CF_PINS), ordinal_key(0), b"x").unwrap();
        assert!(matches!(s.pin(pid(100)), Err(Error::Corrupt { .. })));
        s.db.put_cf(s.cf(CF_FOLLOWS), [0, 0, 0, 0, 0, 0, 0, 1, 9], b"").unwrap();
        assert!(matches!(s.follows(uid(1)), Err(Error::Corrupt { .. })));
        drop(s);
        // A corrupt pin record refuses the open rather than serving bad attributes.
        assert!(matches!(Shard::open(dir.path(), &ShardOptions::new(3)), Err(Error::Corrupt { .. })));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Add(u8, Vec<u32>),
        Remove(u8, Vec<u32>),
        Flush,
        Compact,
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let ids = proptest::collection::vec(0u32..200_000, 1..40);
        prop_oneof![
            6 => (0u8..4, ids.clone()).prop_map(|(k, v)| Step::Add(k, v)),
            4 => (0u8..4, ids).prop_map(|(k, v)| Step::Remove(k, v)),
            1 => Just(Step::Flush),
            1 => Just(Step::Compact),
            1 => Just(Step::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The merge operator against a model: random add/remove sequences on a few
        /// keys, with flushes (partial merges of memtable operands), compactions (full
        /// merges) and reopens in between, read back equal to a `BTreeSet` per key.
        #[test]
        fn merge_operator_matches_a_set_model(steps in proptest::collection::vec(step(), 1..60)) {
            use std::collections::BTreeSet;
            let dir = tempfile::tempdir().unwrap();
            let mut shard = open(dir.path());
            let mut model: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); 4];
            let key = |k: u8| u64_key(u64::from(k) + 1);
            for step in steps {
                match step {
                    Step::Add(k, ids) => {
                        shard.db.merge_cf(shard.cf(CF_BOARD_PINS), key(k), Delta::add(ids.iter().copied()).encode()).unwrap();
                        model[k as usize].extend(ids);
                    }
                    Step::Remove(k, ids) => {
                        shard.db.merge_cf(shard.cf(CF_BOARD_PINS), key(k), Delta::remove(ids.iter().copied()).encode()).unwrap();
                        for id in ids { model[k as usize].remove(&id); }
                    }
                    Step::Flush => shard.flush().unwrap(),
                    Step::Compact => shard.compact().unwrap(),
                    Step::Reopen => {
                        drop(shard);
                        shard = open(dir.path());
                    }
                }
                for (k, expected) in model.iter().enumerate() {
                    let got: BTreeSet<u32> = shard.board_pins(bid(k as u64 + 1)).unwrap().iter().collect();
                    proptest::prop_assert_eq!(&got, expected);
                }
            }
        }
    }

    #[test]
    fn flushing_many_operands_runs_the_partial_merge() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.db.put_cf(s.cf(CF_BOARD_PINS), u64_key(1), bitmap::encode_bitmap(&(0..10).collect())).unwrap();
        s.flush().unwrap();
        let before = bitmap::PARTIAL_MERGES.load(Ordering::Relaxed);
        for i in 0..20u32 {
            let d = if i % 3 == 0 { Delta::remove([i / 2]) } else { Delta::add([100 + i]) };
            s.db.merge_cf(s.cf(CF_BOARD_PINS), u64_key(1), d.encode()).unwrap();
        }
        s.flush().unwrap();
        assert!(bitmap::PARTIAL_MERGES.load(Ordering::Relaxed) > before);
        let mut expected: RoaringBitmap = (0..10).collect();
        for i in 0..20u32 {
            if i % 3 == 0 {
                expected.remove(i / 2);
            } else {
                expected.insert(100 + i);
            }
        }
        assert_eq!(s.board_pins(bid(1)).unwrap(), expected);
        s.compact().unwrap();
        assert_eq!(s.board_pins(bid(1)).unwrap(), expected);
    }

    #[test]
    fn cached_reads_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let r = |p| PinRef { pin: pid(p), owner: uid(10) };
        s.write(&[board(1, 10), board(2, 10), pin(100, 10, 1, 1, &[5])], Durability::Buffered).unwrap();
        let read = |s: &Shard| {
            (
                ids(&s.board_pins_cached(&[bid(1), bid(2)]).unwrap()[0]),
                ids(&s.board_pins_cached(&[bid(2)]).unwrap()[0]),
                ids(&s.topic_pins_cached(&[tid(5)]).unwrap()[0]),
                ids(&s.user_pins_cached(&[uid(10)]).unwrap()[0]),
                ids(&s.filters_cached().unwrap()[1]),
            )
        };
        assert_eq!(read(&s), (vec![0], vec![], vec![0], vec![0], vec![]));
        // The reads were cached (board 1 is (2, 1)), and this write drops exactly what
        // it changes: boards 1 and 2, topic 5, user 10 — not board 3's entry.
        s.board_pins_cached(&[bid(3)]).unwrap();
        assert!(s.cache.bitmaps.contains_key(&(2, 1)) && s.cache.bitmaps.contains_key(&(2, 3)));
        s.write(&[pin(101, 10, 1, 2, &[5]), pin(100, 10, 2, 1, &[])], Durability::Buffered).unwrap();
        assert!(!s.cache.bitmaps.contains_key(&(2, 1)) && !s.cache.bitmaps.contains_key(&(3, 5)));
        assert!(s.cache.bitmaps.contains_key(&(2, 3)));
        assert_eq!(read(&s), (vec![1], vec![0], vec![1], vec![0, 1], vec![]));
        s.write(&[Mutation::FlagPin { pin: r(101), flag: PinFlag::Spam, on: true }], Durability::Buffered)
            .unwrap();
        assert_eq!(read(&s).4, vec![1]);
        let load = BulkLoad {
            pins: vec![Pin {
                id: pid(102),
                owner: uid(10),
                board: bid(2),
                created_at_ms: 3,
                topics: vec![tid(5)],
                signals: PinSignals::default(),
            }],
            ..Default::default()
        };
        s.bulk_load(load, 10, &mut |_| {}).unwrap();
        assert_eq!(read(&s), (vec![1], vec![0, 2], vec![1, 2], vec![0, 1, 2], vec![1]));

        // Follow lists: cached, and dropped by the follower's own follow and block writes.
        assert!(s.follows_cached(uid(1)).unwrap().users.is_empty());
        assert!(s.cache.follows.contains_key(&uid(1)));
        s.write(
            &[Mutation::Follow { follower: uid(2), target: FollowTarget::User(uid(10)) }],
            Durability::Buffered,
        )
        .unwrap();
        assert!(s.cache.follows.contains_key(&uid(1)), "another user's follow keeps user 1's entry");
        s.write(
            &[Mutation::Follow { follower: uid(1), target: FollowTarget::User(uid(10)) }],
            Durability::Buffered,
        )
        .unwrap();
        assert!(!s.cache.follows.contains_key(&uid(1)));
        assert_eq!(s.follows_cached(uid(1)).unwrap().users, [uid(10)]);
        s.write(&[Mutation::BlockUser { user: uid(1), blocked: uid(66) }], Durability::Buffered).unwrap();
        assert_eq!(s.follows_cached(uid(1)).unwrap().blocked, [uid(66)]);
    }

    #[test]
    fn several_shards_open_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let shards: Vec<Shard> = (0..4)
            .map(|i| Shard::open(dir.path().join(format!("shard-{i}")), &ShardOptions::new(i)).unwrap())
            .collect();
        for (i, s) in shards.iter().enumerate() {
            let owner = 10 + i as u64;
            s.write(&[board(1, owner), pin(100, owner, 1, 1, &[])], Durability::Buffered).unwrap();
        }
        for (i, s) in shards.iter().enumerate() {
            assert_eq!(s.id(), i as u32);
            assert_eq!(s.attributes().get(0).unwrap().owner, 10 + i as u64);
        }
    }
}
