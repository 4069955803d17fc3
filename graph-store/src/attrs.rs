//! In-memory pin attributes indexed by ordinal: what scoring reads on the hot path, so
//! that a feed query over thousands of candidates does no RocksDB point reads.
//!
//! Layout: what every scanned candidate needs (owner, age, signals, flags) is one
//! 32-byte [`HotAttrs`] row — two per cache line, never straddling one — because a
//! candidate scan visits sparse, effectively random ordinals: one row costs one cache
//! miss where separate columns cost one per field (measured: see ARCHITECTURE.md).
//! What only the top-K needs (pin id, board, millisecond timestamp) is a separate
//! 24-byte [`ColdAttrs`] row, read once per kept candidate.
//!
//! Per block of [`BLOCK_ORDINALS`] consecutive ordinals, [`BlockBounds`] hold the range of
//! every scored attribute (signals, creation time) over the block's pins, so that a scan
//! can bound the best score a whole block can reach and skip it (pins arrive roughly in
//! creation order, so a block also spans a short stretch of time).
//!
//! Invariants: slot `i` describes the pin whose ordinal is `i`, for every `i < len()`;
//! `len()` may lag the committed `next_ordinal` for an instant after a commit (readers
//! skip ordinals `>= len()`), never lead it. A block's bounds hold every row of the
//! block (they may be wider than needed after an update, never narrower).

use feedgraph_model::PinSignals;

use crate::record::{FLAG_DELETED, FLAG_SPAM, FLAG_UNSAFE, PinRecord};

/// The per-candidate attributes of one pin.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(32))]
pub struct HotAttrs {
    pub owner: u64,
    /// Creation time, seconds since the Unix epoch (saturating to `0..=u32::MAX`).
    pub created_at_s: u32,
    pub quality: f32,
    pub saves: u32,
    pub clicks: u32,
    pub closeups: u32,
    /// Non-zero when the pin is deleted, spam or unsafe.
    pub flags: u8,
}

impl HotAttrs {
    fn of(r: &PinRecord) -> Self {
        HotAttrs {
            owner: r.owner.get(),
            created_at_s: (r.created_at_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32,
            quality: r.signals.quality,
            saves: r.signals.saves,
            clicks: r.signals.clicks,
            closeups: r.signals.closeups,
            flags: r.flags(),
        }
    }

    /// True when the pin is deleted, spam or unsafe.
    pub fn is_hidden(&self) -> bool {
        self.flags != 0
    }
}

/// What only the candidates that make a top-K need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ColdAttrs {
    pin_id: u64,
    board: u64,
    created_at_ms: i64,
}

/// log2 of [`BLOCK_ORDINALS`].
pub const BLOCK_SHIFT: u32 = 8;
/// Ordinals per block of [`BlockBounds`]: small enough that a block's bounds are tight
/// (about three hours of a 62k-pin shard's month), large enough that bounding a block
/// (~50 ns) costs less than scoring its candidates.
pub const BLOCK_ORDINALS: u32 = 1 << BLOCK_SHIFT;

/// The range of each scored attribute over the rows of one block of ordinals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockBounds {
    pub quality: (f32, f32),
    pub saves: (u32, u32),
    pub clicks: (u32, u32),
    pub closeups: (u32, u32),
    pub created_at_s: (u32, u32),
}

impl BlockBounds {
    fn of(h: &HotAttrs) -> Self {
        BlockBounds {
            quality: (h.quality, h.quality),
            saves: (h.saves, h.saves),
            clicks: (h.clicks, h.clicks),
            closeups: (h.closeups, h.closeups),
            created_at_s: (h.created_at_s, h.created_at_s),
        }
    }

    fn hull(&self, other: &BlockBounds) -> BlockBounds {
        fn h<T: PartialOrd + Copy>(a: (T, T), b: (T, T)) -> (T, T) {
            (if b.0 < a.0 { b.0 } else { a.0 }, if b.1 > a.1 { b.1 } else { a.1 })
        }
        BlockBounds {
            quality: h(self.quality, other.quality),
            saves: h(self.saves, other.saves),
            clicks: h(self.clicks, other.clicks),
            closeups: h(self.closeups, other.closeups),
            created_at_s: h(self.created_at_s, other.created_at_s),
        }
    }

    fn widen(&mut self, h: &HotAttrs) {
        *self = self.hull(&BlockBounds::of(h));
    }

    /// The bounds of `rows` (`None` when empty).
    fn over(rows: &[HotAttrs]) -> Option<Self> {
        let mut it = rows.iter();
        let mut b = BlockBounds::of(it.next()?);
        for h in it {
            b.widen(h);
        }
        Some(b)
    }
}

/// Pin attributes by ordinal.
#[derive(Clone, Debug, Default)]
pub struct PinAttributes {
    hot: Vec<HotAttrs>,
    cold: Vec<ColdAttrs>,
    /// Bounds of block `b` = ordinals `b << BLOCK_SHIFT ..`; one per started block.
    blocks: Vec<BlockBounds>,
    /// `older[b]`: the hull of blocks `0..=b` — bounds of everything at or below a
    /// block, so that a newest-first scan can stop once nothing older can compete.
    older: Vec<BlockBounds>,
}

/// One pin's attributes, copied out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PinAttrs {
    pub pin_id: u64,
    pub owner: u64,
    pub board: u64,
    pub created_at_ms: i64,
    pub signals: PinSignals,
    pub deleted: bool,
    pub spam: bool,
    pub is_unsafe: bool,
}

impl PinAttributes {
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.hot.reserve(additional);
        self.cold.reserve(additional);
    }

    /// Sets the slot of `ordinal`; ordinals arrive densely (`ordinal <= len()`).
    pub(crate) fn set(&mut self, ordinal: u32, r: &PinRecord) {
        let i = ordinal as usize;
        if i > self.len() {
            // Ordinals are committed densely, so a hole means the caller broke the
            // ordering; fill it with hidden placeholders (never referenced by a
            // bitmap) rather than panic.
            tracing::error!(ordinal, len = self.len(), "pin attributes: ordinal beyond end");
            let placeholder = HotAttrs { flags: FLAG_DELETED, ..HotAttrs::default() };
            self.hot.resize(i, placeholder);
            self.cold.resize(i, ColdAttrs::default());
        }
        let hot = HotAttrs::of(r);
        let cold = ColdAttrs { pin_id: r.id.get(), board: r.board.get(), created_at_ms: r.created_at_ms };
        let appended = i == self.len();
        if appended {
            self.hot.push(hot);
            self.cold.push(cold);
        } else {
            self.hot[i] = hot;
            self.cold[i] = cold;
        }
        self.update_block(ordinal >> BLOCK_SHIFT, appended.then_some(&hot));
    }

    /// Keeps block `b`'s bounds holding its rows: an appended row widens them; an
    /// overwritten one (a signal update, a flag) recomputes the block from its rows, so
    /// that bounds do not only ever grow.
    fn update_block(&mut self, b: u32, appended: Option<&HotAttrs>) {
        let b = b as usize;
        let start = b << BLOCK_SHIFT;
        let end = (start + BLOCK_ORDINALS as usize).min(self.hot.len());
        while self.blocks.len() <= b {
            // Blocks start in order; a new block starts from its first row.
            let first = self.blocks.len() << BLOCK_SHIFT;
            let Some(bounds) =
                BlockBounds::over(&self.hot[first..(first + BLOCK_ORDINALS as usize).min(self.hot.len())])
            else {
                return;
            };
            self.blocks.push(bounds);
        }
        match appended {
            Some(h) => self.blocks[b].widen(h),
            None => {
                if let Some(bounds) = BlockBounds::over(&self.hot[start..end]) {
                    self.blocks[b] = bounds;
                }
            }
        }
        // The hulls from block b up: O(1) for an appended row (the last block), O(blocks
        // above b) for an update of an older pin.
        let from = b.min(self.older.len());
        self.older.truncate(from);
        for i in from..self.blocks.len() {
            let hull = match i.checked_sub(1).and_then(|p| self.older.get(p)) {
                Some(below) => below.hull(&self.blocks[i]),
                None => self.blocks[i],
            };
            self.older.push(hull);
        }
    }

    /// Bounds of every row at or below the block holding `ordinal` (`None` beyond the
    /// rows).
    pub fn bounds_at_or_below(&self, ordinal: u32) -> Option<&BlockBounds> {
        self.older.get((ordinal >> BLOCK_SHIFT) as usize)
    }

    /// Bounds of the block holding `ordinal` (`None` beyond the rows).
    pub fn block_bounds(&self, ordinal: u32) -> Option<&BlockBounds> {
        self.blocks.get((ordinal >> BLOCK_SHIFT) as usize)
    }

    /// The hot rows, indexed by ordinal (the scan reads these).
    pub fn hot(&self) -> &[HotAttrs] {
        &self.hot
    }

    /// True when the pin is deleted, spam or unsafe (or the ordinal is unknown).
    pub fn is_hidden(&self, ordinal: u32) -> bool {
        self.hot.get(ordinal as usize).is_none_or(HotAttrs::is_hidden)
    }

    pub fn get(&self, ordinal: u32) -> Option<PinAttrs> {
        let i = ordinal as usize;
        let (h, c) = (self.hot.get(i)?, self.cold.get(i)?);
        Some(PinAttrs {
            pin_id: c.pin_id,
            owner: h.owner,
            board: c.board,
            created_at_ms: c.created_at_ms,
            signals: PinSignals {
                quality: h.quality,
                saves: h.saves,
                clicks: h.clicks,
                closeups: h.closeups,
            },
            deleted: h.flags & FLAG_DELETED != 0,
            spam: h.flags & FLAG_SPAM != 0,
            is_unsafe: h.flags & FLAG_UNSAFE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ordinal: u64, quality: f32, saves: u32, created_s: i64) -> PinRecord {
        use feedgraph_model::{BoardId, PinId, UserId};
        PinRecord {
            id: PinId::new(ordinal + 1).unwrap(),
            owner: UserId::new(1).unwrap(),
            board: BoardId::new(1).unwrap(),
            created_at_ms: created_s * 1000,
            topics: vec![],
            signals: PinSignals { quality, saves, clicks: saves, closeups: 0 },
            deleted: false,
            spam: false,
            is_unsafe: false,
        }
    }

    #[test]
    fn block_bounds_hold_every_row_and_follow_updates() {
        let mut a = PinAttributes::default();
        let n = BLOCK_ORDINALS * 2 + 10;
        for o in 0..n {
            a.set(o, &record(u64::from(o), (o % 7) as f32 / 10.0, o, i64::from(1_000 + o)));
        }
        for o in 0..n {
            let (h, b) = (&a.hot()[o as usize], a.block_bounds(o).unwrap());
            assert!(b.quality.0 <= h.quality && h.quality <= b.quality.1);
            assert!(b.saves.0 <= h.saves && h.saves <= b.saves.1);
            assert!(b.created_at_s.0 <= h.created_at_s && h.created_at_s <= b.created_at_s.1);
        }
        let first = *a.block_bounds(0).unwrap();
        assert_eq!(first.saves, (0, BLOCK_ORDINALS - 1));
        assert_eq!(first.created_at_s, (1_000, 1_000 + BLOCK_ORDINALS - 1));
        assert!(a.block_bounds(BLOCK_ORDINALS * 3).is_none());
        let all = a.bounds_at_or_below(n - 1).unwrap();
        assert_eq!((all.saves, all.created_at_s), ((0, n - 1), (1_000, 1_000 + n - 1)));
        assert_eq!(a.bounds_at_or_below(0), Some(&first));
        // An update widens, and a later one narrows again: the block is recomputed.
        a.set(3, &record(3, 0.3, 1_000_000, 1_003));
        assert_eq!(a.block_bounds(3).unwrap().saves.1, 1_000_000);
        assert_eq!(a.bounds_at_or_below(n - 1).unwrap().saves.1, 1_000_000);
        a.set(3, &record(3, 0.3, 3, 1_003));
        assert_eq!(*a.block_bounds(3).unwrap(), first);
        assert_eq!(a.bounds_at_or_below(n - 1).unwrap().saves.1, n - 1);
    }

    #[test]
    fn a_hot_row_is_half_a_cache_line() {
        assert_eq!(size_of::<HotAttrs>(), 32);
        assert_eq!(align_of::<HotAttrs>(), 32);
    }
}
