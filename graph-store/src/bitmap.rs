//! Roaring-bitmap values and the RocksDB merge operator that keeps them.
//!
//! A stored value is a roaring bitmap in its portable serialization. A merge operand is
//! a [`Delta`]: "remove these, then add those". Deltas compose, so the partial merge
//! (operand + operand → operand) is exact even though add and remove do not commute:
//! applying `d1` then `d2` equals applying `d1.then(d2)`.
//!
//! Operand encodings (first byte is the tag):
//! - `1` add-list: `u32` LE ordinals to add (the common single-edge write: 5 bytes);
//! - `2` remove-list: `u32` LE ordinals to remove;
//! - `3` delta: `u32` LE length of the `add` bitmap, `add` bitmap, `remove` bitmap.
//!
//! The merge functions never panic (a panic would cross the FFI boundary): an
//! undecodable input makes them return `None`, which RocksDB reports as a corruption
//! error on the read, which the store maps to [`crate::Error::Corrupt`].

use roaring::RoaringBitmap;

const TAG_ADD_LIST: u8 = 1;
const TAG_REMOVE_LIST: u8 = 2;
const TAG_DELTA: u8 = 3;

/// Name under which the operator is registered; changing it makes existing databases
/// refuse to open, which is the point (a different operator may not read old operands).
pub const MERGE_OPERATOR_NAME: &str = "feedgraph.roaring_delta.v1";

/// A change to a bitmap: remove `remove`, then add `add`. Invariant: the two sets are
/// disjoint (an id in both would be ambiguous; `add` wins, as it is applied last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    pub add: RoaringBitmap,
    pub remove: RoaringBitmap,
}

impl Delta {
    pub fn add(ids: impl IntoIterator<Item = u32>) -> Self {
        Self { add: ids.into_iter().collect(), remove: RoaringBitmap::new() }
    }

    pub fn remove(ids: impl IntoIterator<Item = u32>) -> Self {
        Self { add: RoaringBitmap::new(), remove: ids.into_iter().collect() }
    }

    /// The delta equivalent to applying `self`, then `next`.
    pub fn then(mut self, next: &Delta) -> Delta {
        self.add -= &next.remove;
        self.add |= &next.add;
        self.remove -= &next.add;
        self.remove |= &next.remove;
        self
    }

    pub fn apply_to(&self, base: &mut RoaringBitmap) {
        *base -= &self.remove;
        *base |= &self.add;
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Encodes as a merge operand, choosing the compact list form when one side is
    /// empty and small.
    pub fn encode(&self) -> Vec<u8> {
        const LIST_LIMIT: u64 = 64;
        if self.remove.is_empty() && self.add.len() <= LIST_LIMIT {
            return encode_list(TAG_ADD_LIST, &self.add);
        }
        if self.add.is_empty() && self.remove.len() <= LIST_LIMIT {
            return encode_list(TAG_REMOVE_LIST, &self.remove);
        }
        let mut out = Vec::with_capacity(1 + 4 + self.add.serialized_size() + self.remove.serialized_size());
        out.push(TAG_DELTA);
        out.extend_from_slice(&(self.add.serialized_size() as u32).to_le_bytes());
        // Writing into a Vec cannot fail.
        let _ = self.add.serialize_into(&mut out);
        let _ = self.remove.serialize_into(&mut out);
        out
    }

    /// Decodes a merge operand; `None` if it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<Delta> {
        let (&tag, rest) = bytes.split_first()?;
        match tag {
            TAG_ADD_LIST => Some(Delta { add: decode_list(rest)?, remove: RoaringBitmap::new() }),
            TAG_REMOVE_LIST => Some(Delta { add: RoaringBitmap::new(), remove: decode_list(rest)? }),
            TAG_DELTA => {
                let len_bytes: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                let add_len = u32::from_le_bytes(len_bytes) as usize;
                let add_bytes = rest.get(4..4usize.checked_add(add_len)?)?;
                let remove_bytes = rest.get(4 + add_len..)?;
                Some(Delta { add: decode_bitmap(add_bytes)?, remove: decode_bitmap(remove_bytes)? })
            }
            _ => None,
        }
    }
}

/// Whether `bytes` is a merge operand [`Delta::decode`] accepts, without building it
/// where the form allows (a follower checks every operand it is shipped; the list
/// forms, which single edges and bulk loads use, are any multiple of 4 bytes).
pub(crate) fn is_valid_operand(bytes: &[u8]) -> bool {
    match bytes.split_first() {
        Some((&(TAG_ADD_LIST | TAG_REMOVE_LIST), ids)) => ids.len().is_multiple_of(4),
        _ => Delta::decode(bytes).is_some(),
    }
}

/// Encodes "add these ordinals" (sorted, distinct) as a merge operand without building
/// a bitmap for short lists (the bulk loader's common case).
pub fn encode_sorted_additions(ids: &[u32]) -> Vec<u8> {
    if ids.len() <= 64 {
        let mut out = Vec::with_capacity(1 + 4 * ids.len());
        out.push(TAG_ADD_LIST);
        for id in ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
        return out;
    }
    let mut add = RoaringBitmap::new();
    // Sorted input appends; anything else still lands in the set.
    for &id in ids {
        if add.try_push(id).is_err() {
            add.insert(id);
        }
    }
    Delta { add, remove: RoaringBitmap::new() }.encode()
}

fn encode_list(tag: u8, ids: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 * ids.len() as usize);
    out.push(tag);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

fn decode_list(bytes: &[u8]) -> Option<RoaringBitmap> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut ids: Vec<u32> =
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    ids.sort_unstable();
    ids.dedup();
    RoaringBitmap::from_sorted_iter(ids).ok()
}

/// Serializes a stored bitmap value.
pub fn encode_bitmap(bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(bitmap.serialized_size());
    let _ = bitmap.serialize_into(&mut out);
    out
}

/// Deserializes a stored bitmap value, validating it; `None` if it is malformed.
pub fn decode_bitmap(bytes: &[u8]) -> Option<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes).ok()
}

/// Partial merges run so far (tests check that flushes exercise them).
#[cfg(test)]
pub(crate) static PARTIAL_MERGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Full merge: the stored bitmap (if any) with all operands applied in order.
pub(crate) fn full_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut bitmap = match existing {
        Some(bytes) => decode_bitmap(bytes)?,
        None => RoaringBitmap::new(),
    };
    for op in operands {
        Delta::decode(op)?.apply_to(&mut bitmap);
    }
    bitmap.optimize();
    Some(encode_bitmap(&bitmap))
}

/// Partial merge: consecutive operands composed into one delta operand.
pub(crate) fn partial_merge(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    // RocksDB passes no existing value to a partial merge; if it ever did, folding it
    // in would be a full merge, which is not what this call may return.
    if existing.is_some() {
        return None;
    }
    #[cfg(test)]
    PARTIAL_MERGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut acc = Delta::default();
    for op in operands {
        acc = acc.then(&Delta::decode(op)?);
    }
    Some(acc.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn operands_are_valid_exactly_when_they_decode() {
        let list = Delta::add([1u32, 5, 9]).encode();
        let delta = Delta { add: (0..100).collect(), remove: (200..300).collect() }.encode();
        for bytes in [
            list.clone(),
            delta.clone(),
            list[..list.len() - 1].to_vec(),
            delta[..delta.len() - 3].to_vec(),
            vec![],
            vec![TAG_ADD_LIST],
            vec![99, 0, 0, 0, 0],
        ] {
            assert_eq!(is_valid_operand(&bytes), Delta::decode(&bytes).is_some(), "{bytes:?}");
        }
    }

    #[test]
    fn encodings_round_trip() {
        for d in [
            Delta::add([1, 5, 9]),
            Delta::remove([3]),
            Delta { add: (0..1000).collect(), remove: (2000..2100).collect() },
            Delta::default(),
        ] {
            assert_eq!(Delta::decode(&d.encode()).unwrap(), d);
        }
    }

    #[test]
    fn sorted_additions_decode_to_the_same_set() {
        for n in [0u32, 1, 64, 65, 5000] {
            let ids: Vec<u32> = (0..n).map(|i| i * 3).collect();
            let d = Delta::decode(&encode_sorted_additions(&ids)).unwrap();
            assert_eq!(d, Delta::add(ids.iter().copied()));
        }
    }

    #[test]
    fn malformed_operands_are_refused_not_panicked_on() {
        for bad in [&[][..], &[9][..], &[1, 2, 3][..], &[3, 255, 255, 255, 255][..], &[3, 0, 0, 0, 0, 7][..]]
        {
            assert!(Delta::decode(bad).is_none(), "{bad:?}");
        }
        assert!(decode_bitmap(&[1, 2, 3]).is_none());
    }

    proptest! {
        /// Composition is exact: applying deltas one by one equals applying their
        /// composition, for any grouping (what partial merges rely on).
        #[test]
        fn composition_matches_sequential_application(
            base in proptest::collection::btree_set(0u32..64, 0..20),
            ops in proptest::collection::vec((any::<bool>(), proptest::collection::vec(0u32..64, 1..6)), 1..12),
            split in 0usize..12,
        ) {
            let deltas: Vec<Delta> = ops.iter().map(|(add, ids)| if *add { Delta::add(ids.clone()) } else { Delta::remove(ids.clone()) }).collect();
            let mut sequential: RoaringBitmap = base.iter().copied().collect();
            for d in &deltas { d.apply_to(&mut sequential); }

            let split = split.min(deltas.len());
            let left = deltas[..split].iter().fold(Delta::default(), |acc, d| acc.then(d));
            let right = deltas[split..].iter().fold(Delta::default(), |acc, d| acc.then(d));
            let combined = Delta::decode(&left.then(&right).encode()).unwrap();
            let mut grouped: RoaringBitmap = base.iter().copied().collect();
            combined.apply_to(&mut grouped);
            prop_assert_eq!(sequential, grouped);
        }
    }
}
