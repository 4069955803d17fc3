//! The on-disk layout of a shard: column families, `meta` keys, RocksDB options (with
//! the node-wide memory budget), and the map from the column-family ids a write batch
//! carries back to our families.

use std::collections::HashMap;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteBufferManager,
};

use crate::bitmap;

use super::ShardOptions;

/// A column family of a shard. Bitmap families carry the roaring merge operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Cf {
    Meta,
    Pins,
    PinIds,
    Users,
    Boards,
    Follows,
    UserPins,
    BoardPins,
    TopicPins,
    Filters,
    Seen,
}

impl Cf {
    /// Every family, in creation order (RocksDB numbers them in this order on a new
    /// database; checkpoints and replicas keep those numbers).
    pub(crate) const ALL: [Cf; 11] = [
        Cf::Meta,
        Cf::Pins,
        Cf::PinIds,
        Cf::Users,
        Cf::Boards,
        Cf::Follows,
        Cf::UserPins,
        Cf::BoardPins,
        Cf::TopicPins,
        Cf::Filters,
        Cf::Seen,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Pins => "pins",
            Cf::PinIds => "pin_ids",
            Cf::Users => "users",
            Cf::Boards => "boards",
            Cf::Follows => "follows",
            Cf::UserPins => "user_pins",
            Cf::BoardPins => "board_pins",
            Cf::TopicPins => "topic_pins",
            Cf::Filters => "filters",
            Cf::Seen => "seen",
        }
    }

    pub(crate) fn is_bitmap(self) -> bool {
        matches!(self, Cf::UserPins | Cf::BoardPins | Cf::TopicPins | Cf::Filters | Cf::Seen)
    }
}

pub(crate) const META_SHARD_ID: &[u8] = b"shard_id";
pub(crate) const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub(crate) const META_NEXT_ORDINAL: &[u8] = b"next_ordinal";
/// The epoch history: which leadership term wrote which sequence numbers.
pub(crate) const META_EPOCHS: &[u8] = b"epochs";
/// A random id given to a database when it is created; replicas of one shard share it
/// (they descend from it by log shipping or checkpoints), unrelated databases do not.
pub(crate) const META_LINEAGE: &[u8] = b"lineage";

/// RocksDB memory shared by every shard of a process: one block cache and one
/// write-buffer manager, so that memory is budgeted per node, not per shard (16 shards
/// with their own caches and memtables could reach several GB).
#[derive(Clone)]
pub struct StoreMemory {
    block_cache: Cache,
    write_buffers: WriteBufferManager,
    block_cache_bytes: usize,
    write_buffers_bytes: usize,
}

impl std::fmt::Debug for StoreMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreMemory")
            .field("block_cache_bytes", &self.block_cache_bytes)
            .field("write_buffers_bytes", &self.write_buffers_bytes)
            .finish()
    }
}

impl StoreMemory {
    /// A block cache of `block_cache_bytes` and a cap of `write_buffers_bytes` on all
    /// memtables together (past it, the largest memtables are flushed early).
    pub fn new(block_cache_bytes: usize, write_buffers_bytes: usize) -> Self {
        Self {
            block_cache: Cache::new_lru_cache(block_cache_bytes),
            write_buffers: WriteBufferManager::new_write_buffer_manager(write_buffers_bytes, false),
            block_cache_bytes,
            write_buffers_bytes,
        }
    }

    /// Bytes the block cache holds now.
    pub fn block_cache_usage(&self) -> usize {
        self.block_cache.get_usage()
    }

    /// Bytes every memtable of every shard holds now.
    pub fn write_buffer_usage(&self) -> usize {
        self.write_buffers.get_usage()
    }

    pub fn block_cache_capacity(&self) -> usize {
        self.block_cache_bytes
    }

    pub fn write_buffer_capacity(&self) -> usize {
        self.write_buffers_bytes
    }
}

pub(crate) fn db_options(opts: &ShardOptions, create: bool) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(create);
    db_opts.create_missing_column_families(create);
    db_opts.set_wal_ttl_seconds(opts.wal_ttl_seconds);
    db_opts.set_wal_size_limit_mb(opts.wal_size_limit_mb);
    db_opts.set_max_background_jobs(opts.background_jobs);
    db_opts.set_keep_log_file_num(4);
    db_opts.set_write_buffer_manager(&opts.memory.write_buffers);

    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&opts.memory.block_cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);

    let cfs = Cf::ALL
        .iter()
        .map(|cf| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_write_buffer_size(opts.write_buffer_bytes);
            if cf.is_bitmap() {
                o.set_merge_operator(bitmap::MERGE_OPERATOR_NAME, bitmap::full_merge, bitmap::partial_merge);
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        })
        .collect();
    (db_opts, cfs)
}

/// The numbers RocksDB gave our column families in this database, as a shipped write
/// batch names them. Learned by encoding one operation per family into a batch that is
/// never written and reading the ids back (rust-rocksdb has no safe id accessor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CfIds {
    by_id: HashMap<u32, Cf>,
    /// A fingerprint of the (id, family) pairs: replicas must agree on it, since a
    /// shipped batch is applied by number.
    layout: u64,
}

impl CfIds {
    pub(crate) fn learn(db: &DB) -> Option<CfIds> {
        let mut batch = WriteBatch::default();
        for cf in Cf::ALL {
            batch.put_cf(db.cf_handle(cf.name())?, [], []);
        }
        struct Collect(Vec<u32>);
        impl rocksdb::WriteBatchIteratorCf for Collect {
            fn put_cf(&mut self, cf_id: u32, _: &[u8], _: &[u8]) {
                self.0.push(cf_id);
            }
            fn delete_cf(&mut self, _: u32, _: &[u8]) {}
            fn merge_cf(&mut self, _: u32, _: &[u8], _: &[u8]) {}
        }
        let mut ids = Collect(Vec::new());
        batch.iterate_cf(&mut ids);
        if ids.0.len() != Cf::ALL.len() {
            return None;
        }
        let by_id: HashMap<u32, Cf> = ids.0.iter().copied().zip(Cf::ALL).collect();
        // FNV-1a over (id, name) in family order: stable across builds and platforms.
        let mut layout: u64 = 0xcbf2_9ce4_8422_2325;
        for (id, cf) in ids.0.iter().zip(Cf::ALL) {
            for b in id.to_le_bytes().iter().chain(cf.name().as_bytes()) {
                layout = (layout ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Some(CfIds { by_id, layout })
    }

    pub(crate) fn get(&self, id: u32) -> Option<Cf> {
        self.by_id.get(&id).copied()
    }

    pub(crate) fn layout(&self) -> u64 {
        self.layout
    }
}
