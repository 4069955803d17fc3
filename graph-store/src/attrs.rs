//! In-memory, columnar pin attributes indexed by ordinal: what scoring reads on the hot
//! path, so that a feed query over thousands of candidates does no RocksDB point reads.
//!
//! Invariant: slot `i` describes the pin whose ordinal is `i`, for every `i < len()`;
//! `len()` may lag the committed `next_ordinal` for an instant after a commit (readers
//! skip ordinals `>= len()`), never lead it.

use feedgraph_model::PinSignals;

use crate::record::{FLAG_DELETED, FLAG_SPAM, FLAG_UNSAFE, PinRecord};

/// Columns of pin attributes, one entry per ordinal.
#[derive(Clone, Debug, Default)]
pub struct PinAttributes {
    pin_id: Vec<u64>,
    owner: Vec<u64>,
    board: Vec<u64>,
    created_at_ms: Vec<i64>,
    quality: Vec<f32>,
    saves: Vec<u32>,
    clicks: Vec<u32>,
    closeups: Vec<u32>,
    flags: Vec<u8>,
}

/// One pin's attributes, copied out of the columns.
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
        self.pin_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pin_id.is_empty()
    }

    /// Bytes held by the columns (capacity, not length: what the process pays).
    pub fn memory_bytes(&self) -> usize {
        self.pin_id.capacity() * 8
            + self.owner.capacity() * 8
            + self.board.capacity() * 8
            + self.created_at_ms.capacity() * 8
            + self.quality.capacity() * 4
            + self.saves.capacity() * 4
            + self.clicks.capacity() * 4
            + self.closeups.capacity() * 4
            + self.flags.capacity()
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.pin_id.reserve(additional);
        self.owner.reserve(additional);
        self.board.reserve(additional);
        self.created_at_ms.reserve(additional);
        self.quality.reserve(additional);
        self.saves.reserve(additional);
        self.clicks.reserve(additional);
        self.closeups.reserve(additional);
        self.flags.reserve(additional);
    }

    /// Sets the slot of `ordinal`; ordinals arrive densely (`ordinal <= len()`).
    pub(crate) fn set(&mut self, ordinal: u32, r: &PinRecord) {
        let i = ordinal as usize;
        if i == self.len() {
            self.pin_id.push(r.id.get());
            self.owner.push(r.owner.get());
            self.board.push(r.board.get());
            self.created_at_ms.push(r.created_at_ms);
            self.quality.push(r.signals.quality);
            self.saves.push(r.signals.saves);
            self.clicks.push(r.signals.clicks);
            self.closeups.push(r.signals.closeups);
            self.flags.push(r.flags());
        } else if i < self.len() {
            self.pin_id[i] = r.id.get();
            self.owner[i] = r.owner.get();
            self.board[i] = r.board.get();
            self.created_at_ms[i] = r.created_at_ms;
            self.quality[i] = r.signals.quality;
            self.saves[i] = r.signals.saves;
            self.clicks[i] = r.signals.clicks;
            self.closeups[i] = r.signals.closeups;
            self.flags[i] = r.flags();
        } else {
            // Ordinals are committed densely, so a hole means the caller broke the
            // ordering; fill the hole with placeholders rather than panic. They are
            // never referenced by a bitmap.
            tracing::error!(ordinal, len = self.len(), "pin attributes: ordinal beyond end");
            while self.len() < i {
                self.push_placeholder();
            }
            self.set(ordinal, r);
        }
    }

    fn push_placeholder(&mut self) {
        self.pin_id.push(0);
        self.owner.push(0);
        self.board.push(0);
        self.created_at_ms.push(0);
        self.quality.push(0.0);
        self.saves.push(0);
        self.clicks.push(0);
        self.closeups.push(0);
        self.flags.push(FLAG_DELETED);
    }

    pub fn get(&self, ordinal: u32) -> Option<PinAttrs> {
        let i = ordinal as usize;
        if i >= self.len() {
            return None;
        }
        let flags = self.flags[i];
        Some(PinAttrs {
            pin_id: self.pin_id[i],
            owner: self.owner[i],
            board: self.board[i],
            created_at_ms: self.created_at_ms[i],
            signals: PinSignals {
                quality: self.quality[i],
                saves: self.saves[i],
                clicks: self.clicks[i],
                closeups: self.closeups[i],
            },
            deleted: flags & FLAG_DELETED != 0,
            spam: flags & FLAG_SPAM != 0,
            is_unsafe: flags & FLAG_UNSAFE != 0,
        })
    }

    /// Column slices for vectorised scoring: index by ordinal.
    pub fn created_at_ms(&self) -> &[i64] {
        &self.created_at_ms
    }
    pub fn owner(&self) -> &[u64] {
        &self.owner
    }
    pub fn board(&self) -> &[u64] {
        &self.board
    }
    pub fn pin_id(&self) -> &[u64] {
        &self.pin_id
    }
    pub fn quality(&self) -> &[f32] {
        &self.quality
    }
    pub fn saves(&self) -> &[u32] {
        &self.saves
    }
    pub fn clicks(&self) -> &[u32] {
        &self.clicks
    }
    pub fn closeups(&self) -> &[u32] {
        &self.closeups
    }
}
