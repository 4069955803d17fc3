//! Point reads, batched bitmap reads (through the read cache on the hot path), and
//! follow lists. Unknown ids read as empty values, never errors.

use std::sync::Arc;

use feedgraph_model::{Board, BoardId, PinId, TopicId, User, UserId};
use roaring::RoaringBitmap;
use rocksdb::{Direction, IteratorMode};

use crate::bitmap;
use crate::record::{
    EdgeKind, FilterKind, PinRecord, decode_board, decode_follow_key, ordinal_key, u32_key, u64_key,
};
use crate::{Error, Result};

use super::cache::ReadCache;
use super::schema::Cf;
use super::{Follows, Shard};

impl Shard {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// The ordinal of a pin, if it exists on this shard.
    pub fn ordinal(&self, pin: PinId) -> Result<Option<u32>> {
        self.observe(self.ordinal_unobserved(pin))
    }

    fn ordinal_unobserved(&self, pin: PinId) -> Result<Option<u32>> {
        let key = u64_key(pin.get());
        match self.db.get_pinned_cf(self.cf(Cf::PinIds), key)? {
            Some(v) => Ok(Some(
                v.as_ref()
                    .try_into()
                    .map(u32::from_le_bytes)
                    .map_err(|_| Error::corrupt(Cf::PinIds, &key, "expected 4 bytes"))?,
            )),
            None => Ok(None),
        }
    }

    /// The stored record of the pin with this ordinal.
    pub fn pin_at(&self, ordinal: u32) -> Result<Option<PinRecord>> {
        let key = ordinal_key(ordinal);
        match self.observe(self.get(Cf::Pins, &key))? {
            Some(v) => PinRecord::decode(&v)
                .map(Some)
                .ok_or_else(|| Error::corrupt(Cf::Pins, &key, "bad pin record")),
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
        match self.get(Cf::Users, &key)? {
            Some(v) => {
                let username =
                    String::from_utf8(v).map_err(|_| Error::corrupt(Cf::Users, &key, "bad utf-8"))?;
                Ok(Some(User { id: user, username }))
            }
            None => Ok(None),
        }
    }

    pub fn board(&self, board: BoardId) -> Result<Option<Board>> {
        Ok(self.board_record(board)?.map(|(owner, name)| Board { id: board, owner, name }))
    }

    pub(crate) fn board_record(&self, board: BoardId) -> Result<Option<(UserId, String)>> {
        let key = u64_key(board.get());
        match self.get(Cf::Boards, &key)? {
            Some(v) => {
                decode_board(&v).map(Some).ok_or_else(|| Error::corrupt(Cf::Boards, &key, "bad board record"))
            }
            None => Ok(None),
        }
    }

    fn bitmap(&self, cf: Cf, key: &[u8]) -> Result<RoaringBitmap> {
        self.observe(match self.db.get_pinned_cf(self.cf(cf), key) {
            Ok(Some(v)) => bitmap::decode_bitmap(&v).ok_or_else(|| Error::corrupt(cf, key, "bad bitmap")),
            Ok(None) => Ok(RoaringBitmap::new()),
            Err(e) => Err(e.into()),
        })
    }

    fn bitmaps(&self, cf: Cf, keys: Vec<Vec<u8>>) -> Result<Vec<RoaringBitmap>> {
        let handle = self.cf(cf);
        let read = self
            .db
            .batched_multi_get_cf(handle, keys.iter(), false)
            .into_iter()
            .zip(&keys)
            .map(|(r, key)| match r? {
                Some(v) => bitmap::decode_bitmap(&v).ok_or_else(|| Error::corrupt(cf, key, "bad bitmap")),
                None => Ok(RoaringBitmap::new()),
            })
            .collect();
        self.observe(read)
    }

    /// `bitmaps` of `ids` through the cache, in input order; the misses in one
    /// batched read. `db_key` is an id's stored key (and [`ReadCache::key`] of it is
    /// the id's cache key, so writes invalidate what is read here).
    fn bitmaps_cached(
        &self,
        cf: Cf,
        ids: impl ExactSizeIterator<Item = u64>,
        db_key: impl Fn(u64) -> Vec<u8>,
    ) -> Result<Vec<Arc<RoaringBitmap>>> {
        let tag = ReadCache::tag(cf);
        let mut out: Vec<Option<Arc<RoaringBitmap>>> = Vec::with_capacity(ids.len());
        let mut missing: Vec<(usize, u64)> = Vec::new();
        for (i, id) in ids.enumerate() {
            let hit = tag.and_then(|tag| self.cache.bitmaps.get(&(tag, id)));
            if hit.is_none() {
                missing.push((i, id));
            }
            out.push(hit);
        }
        if !missing.is_empty() {
            let fetched = self.cache.read_through(
                || None,
                || {
                    let keys = missing.iter().map(|(_, id)| db_key(*id)).collect();
                    Ok(self.bitmaps(cf, keys)?.into_iter().map(Arc::new).collect::<Vec<_>>())
                },
                |fetched| {
                    if let Some(tag) = tag {
                        for ((_, id), bitmap) in missing.iter().zip(fetched) {
                            self.cache.bitmaps.insert((tag, *id), bitmap.clone());
                        }
                    }
                },
            )?;
            for ((i, _), bitmap) in missing.iter().zip(fetched) {
                out[*i] = Some(bitmap);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Cached `user_pins` of many users, in input order (the retrieval hot path).
    pub fn user_pins_cached(&self, users: &[UserId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(Cf::UserPins, users.iter().map(|u| u.get()), |id| u64_key(id).to_vec())
    }

    /// Cached `board_pins` of many boards, in input order.
    pub fn board_pins_cached(&self, boards: &[BoardId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(Cf::BoardPins, boards.iter().map(|b| b.get()), |id| u64_key(id).to_vec())
    }

    /// Cached `topic_pins` of many topics, in input order.
    pub fn topic_pins_cached(&self, topics: &[TopicId]) -> Result<Vec<Arc<RoaringBitmap>>> {
        // Topic ids are u32: the cast back is exact.
        self.bitmaps_cached(Cf::TopicPins, topics.iter().map(|t| u64::from(t.get())), |id| {
            u32_key(id as u32).to_vec()
        })
    }

    /// Cached filter bitmaps, in [`FilterKind::ALL`] order.
    pub fn filters_cached(&self) -> Result<Vec<Arc<RoaringBitmap>>> {
        self.bitmaps_cached(Cf::Filters, (0..FilterKind::ALL.len()).map(|i| i as u64), |i| {
            FilterKind::ALL.get(i as usize).map_or_else(Vec::new, |k| k.key().to_vec())
        })
    }

    /// Ordinals of the pins a user owns (empty for an unknown user).
    pub fn user_pins(&self, user: UserId) -> Result<RoaringBitmap> {
        self.bitmap(Cf::UserPins, &u64_key(user.get()))
    }

    /// Ordinals of the pins on a board (empty for an unknown board).
    pub fn board_pins(&self, board: BoardId) -> Result<RoaringBitmap> {
        self.bitmap(Cf::BoardPins, &u64_key(board.get()))
    }

    /// Ordinals of this shard's pins about a topic.
    pub fn topic_pins(&self, topic: TopicId) -> Result<RoaringBitmap> {
        self.bitmap(Cf::TopicPins, &u32_key(topic.get()))
    }

    /// `user_pins` of many users in one batched read, in input order.
    pub fn user_pins_many(&self, users: &[UserId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(Cf::UserPins, users.iter().map(|u| u64_key(u.get()).to_vec()).collect())
    }

    /// `board_pins` of many boards in one batched read, in input order.
    pub fn board_pins_many(&self, boards: &[BoardId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(Cf::BoardPins, boards.iter().map(|b| u64_key(b.get()).to_vec()).collect())
    }

    /// `topic_pins` of many topics in one batched read, in input order.
    pub fn topic_pins_many(&self, topics: &[TopicId]) -> Result<Vec<RoaringBitmap>> {
        self.bitmaps(Cf::TopicPins, topics.iter().map(|t| u32_key(t.get()).to_vec()).collect())
    }

    /// Ordinals flagged with `kind`.
    pub fn filter(&self, kind: FilterKind) -> Result<RoaringBitmap> {
        self.bitmap(Cf::Filters, kind.key())
    }

    /// `follows` through the cache (the broker reads this on every feed request).
    pub fn follows_cached(&self, user: UserId) -> Result<Arc<Follows>> {
        self.cache.read_through(
            || self.cache.follows.get(&user),
            || Ok(Arc::new(self.follows(user)?)),
            |f| self.cache.follows.insert(user, f.clone()),
        )
    }

    /// `follows` if the cache holds it: a lookup in memory, never a disk read (for
    /// callers that must not block).
    pub fn follows_if_cached(&self, user: UserId) -> Option<Arc<Follows>> {
        self.cache.follows.get(&user)
    }

    /// A user's follow and block lists (empty for an unknown user).
    pub fn follows(&self, user: UserId) -> Result<Follows> {
        self.observe(self.follows_unobserved(user))
    }

    fn follows_unobserved(&self, user: UserId) -> Result<Follows> {
        let prefix = u64_key(user.get());
        let mut out = Follows::default();
        let iter = self.db.iterator_cf(self.cf(Cf::Follows), IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let bad = || Error::corrupt(Cf::Follows, &k, "bad follow entry");
            let (_, kind, target) = decode_follow_key(&k).ok_or_else(bad)?;
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
}
