//! Key layouts and the compact binary records stored in the column families.
//!
//! Keys are big-endian so that RocksDB's byte order is numeric order (prefix scans of a
//! user's follows, `seek_to_last` on ordinals). Records start with a format version;
//! decoding checks lengths and never panics — a bad value is a `None` that the caller
//! turns into [`crate::Error::Corrupt`].

use feedgraph_model::{BoardId, Pin, PinId, PinSignals, TopicId, UserId};

/// Version byte of the pin record format.
const PIN_RECORD_V1: u8 = 1;

/// Flag bits of a pin record.
pub(crate) const FLAG_DELETED: u8 = 1;
pub(crate) const FLAG_SPAM: u8 = 2;
pub(crate) const FLAG_UNSAFE: u8 = 4;

/// A pin as stored on its owner's shard, keyed by its ordinal.
#[derive(Clone, Debug, PartialEq)]
pub struct PinRecord {
    pub id: PinId,
    pub owner: UserId,
    pub board: BoardId,
    pub created_at_ms: i64,
    pub topics: Vec<TopicId>,
    pub signals: PinSignals,
    pub deleted: bool,
    pub spam: bool,
    pub is_unsafe: bool,
}

impl PinRecord {
    /// The record of a pin as first written: live, no moderation flags.
    pub(crate) fn new_live(p: &Pin) -> PinRecord {
        PinRecord {
            id: p.id,
            owner: p.owner,
            board: p.board,
            created_at_ms: p.created_at_ms,
            topics: p.topics.clone(),
            signals: p.signals,
            deleted: false,
            spam: false,
            is_unsafe: false,
        }
    }

    pub(crate) fn flags(&self) -> u8 {
        (if self.deleted { FLAG_DELETED } else { 0 })
            | (if self.spam { FLAG_SPAM } else { 0 })
            | (if self.is_unsafe { FLAG_UNSAFE } else { 0 })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 * 4 + 1 + 16 + 2 + 4 * self.topics.len());
        out.push(PIN_RECORD_V1);
        out.extend_from_slice(&self.id.get().to_le_bytes());
        out.extend_from_slice(&self.owner.get().to_le_bytes());
        out.extend_from_slice(&self.board.get().to_le_bytes());
        out.extend_from_slice(&self.created_at_ms.to_le_bytes());
        out.push(self.flags());
        out.extend_from_slice(&self.signals.quality.to_le_bytes());
        out.extend_from_slice(&self.signals.saves.to_le_bytes());
        out.extend_from_slice(&self.signals.clicks.to_le_bytes());
        out.extend_from_slice(&self.signals.closeups.to_le_bytes());
        // At most 64 topics per pin (checked at the edge); u16 leaves room.
        out.extend_from_slice(&(self.topics.len() as u16).to_le_bytes());
        for t in &self.topics {
            out.extend_from_slice(&t.get().to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<PinRecord> {
        let mut r = Reader(bytes);
        if r.u8()? != PIN_RECORD_V1 {
            return None;
        }
        let id = PinId::new(r.u64()?)?;
        let owner = UserId::new(r.u64()?)?;
        let board = BoardId::new(r.u64()?)?;
        let created_at_ms = r.u64()? as i64;
        let flags = r.u8()?;
        let signals = PinSignals {
            quality: f32::from_bits(r.u32()?),
            saves: r.u32()?,
            clicks: r.u32()?,
            closeups: r.u32()?,
        };
        let n = r.u16()? as usize;
        let topics = (0..n).map(|_| TopicId::new(r.u32()?)).collect::<Option<Vec<_>>>()?;
        if !r.0.is_empty() {
            return None;
        }
        Some(PinRecord {
            id,
            owner,
            board,
            created_at_ms,
            topics,
            signals,
            deleted: flags & FLAG_DELETED != 0,
            spam: flags & FLAG_SPAM != 0,
            is_unsafe: flags & FLAG_UNSAFE != 0,
        })
    }
}

/// A little-endian cursor that returns `None` instead of panicking on short input.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// Board record: owner id (LE u64) then the UTF-8 name.
pub(crate) fn encode_board(owner: UserId, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + name.len());
    out.extend_from_slice(&owner.get().to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

pub(crate) fn decode_board(bytes: &[u8]) -> Option<(UserId, String)> {
    let (owner, name) = bytes.split_first_chunk::<8>()?;
    let owner = UserId::new(u64::from_le_bytes(*owner))?;
    Some((owner, String::from_utf8(name.to_vec()).ok()?))
}

pub(crate) fn ordinal_key(ordinal: u32) -> [u8; 4] {
    ordinal.to_be_bytes()
}

pub(crate) fn decode_ordinal(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn u64_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub(crate) fn u32_key(id: u32) -> [u8; 4] {
    id.to_be_bytes()
}

/// Kinds of follow-list entries; the byte after the user id in a `follows` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum EdgeKind {
    User = 1,
    Board = 2,
    Topic = 3,
    Blocked = 4,
}

/// `follows` key: user (BE u64), kind byte, target (BE u64; topics widened).
pub(crate) fn follow_key(user: UserId, kind: EdgeKind, target: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&user.get().to_be_bytes());
    k[8] = kind as u8;
    k[9..].copy_from_slice(&target.to_be_bytes());
    k
}

/// The user, kind byte and target of a `follows` key (the shard's reader and a
/// follower's batch check both decode it here).
pub(crate) fn decode_follow_key(key: &[u8]) -> Option<(UserId, u8, u64)> {
    let (user, rest) = key.split_first_chunk::<8>()?;
    let (&kind, target) = rest.split_first()?;
    let target = u64::from_be_bytes(target.try_into().ok()?);
    let known = [EdgeKind::User, EdgeKind::Board, EdgeKind::Topic, EdgeKind::Blocked];
    if !known.iter().any(|k| *k as u8 == kind) || target == 0 {
        return None;
    }
    Some((UserId::new(u64::from_be_bytes(*user))?, kind, target))
}

/// Filter bitmaps, keyed by kind in the `filters` column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterKind {
    Deleted,
    Spam,
    Unsafe,
}

impl FilterKind {
    pub const ALL: [FilterKind; 3] = [FilterKind::Deleted, FilterKind::Spam, FilterKind::Unsafe];

    pub(crate) fn key(self) -> &'static [u8] {
        match self {
            FilterKind::Deleted => b"deleted",
            FilterKind::Spam => b"spam",
            FilterKind::Unsafe => b"unsafe",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PinRecord {
        PinRecord {
            id: PinId::new(99).unwrap(),
            owner: UserId::new(7).unwrap(),
            board: BoardId::new(3).unwrap(),
            created_at_ms: 1_700_000_000_123,
            topics: vec![TopicId::new(4).unwrap(), TopicId::new(40).unwrap()],
            signals: PinSignals { quality: 0.25, saves: 10, clicks: 20, closeups: 30 },
            deleted: false,
            spam: true,
            is_unsafe: false,
        }
    }

    #[test]
    fn pin_record_round_trips() {
        let r = sample();
        assert_eq!(PinRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn truncated_or_extended_records_are_refused() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(PinRecord::decode(&bytes[..len]).is_none(), "len {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(PinRecord::decode(&longer).is_none());
        let mut wrong_version = bytes;
        wrong_version[0] = 77;
        assert!(PinRecord::decode(&wrong_version).is_none());
    }

    #[test]
    fn board_record_round_trips() {
        let owner = UserId::new(5).unwrap();
        assert_eq!(decode_board(&encode_board(owner, "recipes")).unwrap(), (owner, "recipes".into()));
        assert!(decode_board(&[1, 2]).is_none());
    }
}
