//! Decoded hot reads — adjacency and filter bitmaps, follow lists — cached inside the
//! shard, because only the store knows exactly what a write touches.
//!
//! A reader that fetched a value from RocksDB caches it only if no write committed
//! since it started reading (`generation` unchanged), checked under `gate`; a writer
//! bumps `generation` and invalidates under the same gate after its commit. So a value
//! read before a commit is either inserted before the writer's invalidation (and
//! removed by it) or not inserted at all. Leader writes and replicated batches
//! invalidate through the same [`ReadCache::invalidate`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use feedgraph_model::UserId;
use roaring::RoaringBitmap;

use crate::Result;
use crate::record::FilterKind;

use super::schema::Cf;
use super::{Follows, ShardOptions};

/// Cache key of a bitmap: (family tag, id).
pub(crate) type BitmapKey = (u8, u64);

pub(crate) struct ReadCache {
    pub(crate) bitmaps: moka::sync::Cache<BitmapKey, Arc<RoaringBitmap>>,
    pub(crate) follows: moka::sync::Cache<UserId, Arc<Follows>>,
    generation: AtomicU64,
    gate: RwLock<()>,
}

impl ReadCache {
    pub(crate) fn new(opts: &ShardOptions) -> Self {
        let bitmaps = moka::sync::Cache::builder()
            .max_capacity(opts.bitmap_cache_bytes)
            .weigher(|_, v: &Arc<RoaringBitmap>| u32::try_from(v.serialized_size() + 64).unwrap_or(u32::MAX))
            .build();
        let follows = moka::sync::Cache::builder().max_capacity(opts.follows_cache_entries).build();
        Self { bitmaps, follows, generation: AtomicU64::new(0), gate: RwLock::new(()) }
    }

    /// Reads through the cache: `get` on a hit, else `load`, then `insert` only if no
    /// write committed meanwhile.
    pub(crate) fn read_through<V: Clone>(
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

    /// Cache key of a bitmap key, for the cached families (`seen` is not cached: it is
    /// read once per feed, per viewer).
    pub(crate) fn key(cf: Cf, key: &[u8]) -> Option<BitmapKey> {
        let id = match key.len() {
            8 => u64::from_be_bytes(key.try_into().ok()?),
            4 => u64::from(u32::from_be_bytes(key.try_into().ok()?)),
            _ => 0,
        };
        match cf {
            Cf::UserPins => Some((1, id)),
            Cf::BoardPins => Some((2, id)),
            Cf::TopicPins => Some((3, id)),
            Cf::Filters => FilterKind::ALL.iter().position(|k| k.key() == key).map(|i| (4, i as u64)),
            _ => None,
        }
    }

    /// Called after a commit, with the bitmap keys and follow lists it changed.
    pub(crate) fn invalidate<'k>(
        &self,
        keys: impl Iterator<Item = (Cf, &'k [u8])>,
        follows: impl Iterator<Item = UserId>,
    ) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        for (cf, key) in keys {
            if let Some(k) = Self::key(cf, key) {
                self.bitmaps.invalidate(&k);
            }
        }
        for user in follows {
            self.follows.invalidate(&user);
        }
    }
}
