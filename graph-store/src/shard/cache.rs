//! Decoded hot reads — adjacency and filter bitmaps, follow lists — cached inside the
//! shard, because only the store knows exactly what a write touches.
//!
//! A reader that fetched a value from RocksDB caches it only if no write committed
//! since it started reading (`generation` unchanged), checked under `gate`; a writer
//! bumps `generation` and invalidates under the same gate after its commit. So a value
//! read before a commit is either inserted before the writer's invalidation (and
//! removed by it) or not inserted at all. Leader writes and replicated batches
//! invalidate through the same [`ReadCache::invalidate`].
//!
//! The caches are `quick_cache` (sharded hash tables, CLOCK-Pro eviction, no
//! background work): a feed request looks up every followed source on every shard it
//! asks, and moka's lookups (with their access-order bookkeeping) took 9% of a
//! recency feed's CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use feedgraph_model::UserId;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use roaring::RoaringBitmap;

use crate::Result;
use crate::record::FilterKind;

use super::schema::Cf;
use super::{Follows, ShardOptions};

/// Cache key of a bitmap: (family tag, id).
pub(crate) type BitmapKey = (u8, u64);

const FILTERS: u8 = 4;

/// A cached bitmap weighs its serialized bytes plus the entry's overhead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BitmapWeight;

impl Weighter<BitmapKey, Arc<RoaringBitmap>> for BitmapWeight {
    fn weight(&self, _key: &BitmapKey, bitmap: &Arc<RoaringBitmap>) -> u64 {
        bitmap.serialized_size() as u64 + 64
    }
}

/// A cached follow list weighs its ids plus the entry's overhead.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FollowsWeight;

impl Weighter<UserId, Arc<Follows>> for FollowsWeight {
    fn weight(&self, _key: &UserId, f: &Arc<Follows>) -> u64 {
        (96 + 8 * f.users.len() + 16 * f.boards.len() + 4 * f.topics.len() + 8 * f.blocked.len()) as u64
    }
}

/// What a shard's read caches hold now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    pub bitmap_bytes: u64,
    pub bitmap_entries: u64,
    pub follows_bytes: u64,
    pub follows_entries: u64,
}

pub(crate) struct ReadCache {
    pub(crate) bitmaps: Cache<BitmapKey, Arc<RoaringBitmap>, BitmapWeight>,
    pub(crate) follows: Cache<UserId, Arc<Follows>, FollowsWeight>,
    generation: AtomicU64,
    gate: RwLock<()>,
}

impl ReadCache {
    pub(crate) fn new(opts: &ShardOptions) -> Self {
        // The item estimate only sizes the tables up front.
        let estimated = (opts.bitmap_cache_bytes / 1024).clamp(1, 1 << 20) as usize;
        let bitmaps = Cache::with_weighter(estimated, opts.bitmap_cache_bytes.max(1), BitmapWeight);
        let estimated = (opts.follows_cache_bytes / 512).clamp(1, 1 << 20) as usize;
        let follows = Cache::with_weighter(estimated, opts.follows_cache_bytes.max(1), FollowsWeight);
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

    pub(crate) fn usage(&self) -> CacheUsage {
        CacheUsage {
            bitmap_bytes: self.bitmaps.weight(),
            bitmap_entries: self.bitmaps.len() as u64,
            follows_bytes: self.follows.weight(),
            follows_entries: self.follows.len() as u64,
        }
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
            Cf::Filters => FilterKind::ALL.iter().position(|k| k.key() == key).map(|i| (FILTERS, i as u64)),
            cf => Self::tag(cf).map(|tag| (tag, id)),
        }
    }

    /// The family tag of cache keys of `cf`'s bitmaps (ids of users, boards, topics;
    /// positions in [`FilterKind::ALL`]), if they are cached.
    pub(crate) fn tag(cf: Cf) -> Option<u8> {
        match cf {
            Cf::UserPins => Some(1),
            Cf::BoardPins => Some(2),
            Cf::TopicPins => Some(3),
            Cf::Filters => Some(FILTERS),
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
                self.bitmaps.remove(&k);
            }
        }
        for user in follows {
            self.follows.remove(&user);
        }
    }
}
