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
//! Invariant: slot `i` describes the pin whose ordinal is `i`, for every `i < len()`;
//! `len()` may lag the committed `next_ordinal` for an instant after a commit (readers
//! skip ordinals `>= len()`), never lead it.

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

/// Pin attributes by ordinal.
#[derive(Clone, Debug, Default)]
pub struct PinAttributes {
    hot: Vec<HotAttrs>,
    cold: Vec<ColdAttrs>,
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
        if i == self.len() {
            self.hot.push(hot);
            self.cold.push(cold);
        } else {
            self.hot[i] = hot;
            self.cold[i] = cold;
        }
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

    #[test]
    fn a_hot_row_is_half_a_cache_line() {
        assert_eq!(size_of::<HotAttrs>(), 32);
        assert_eq!(align_of::<HotAttrs>(), 32);
    }
}
