//! Leadership epochs and the log-matching check replicas use to prove that one log is
//! a prefix of another (Kafka's leader-epoch cache; Raft's log-matching property).
//!
//! Every leadership term has an epoch. A leader starting epoch `E` at sequence `S + 1`
//! writes the history entry `(E, S + 1)` as its first write: the history is replicated
//! data like any other, so a follower's history is always a prefix of its leader's.
//! Within an epoch one leader writes one linear log, so two replicas of the same lineage
//! whose histories name the same epoch for sequence `s` hold identical logs up to `s`.

use crate::record::Reader;

/// The start of one leadership term: sequences from `start_sequence` on (until the next
/// entry) were written by the leader of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: u64,
    pub start_sequence: u64,
}

/// Which epoch wrote which sequence numbers, oldest first. Empty for a shard that never
/// had a leader epoch (a standalone shard: epoch 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochHistory {
    starts: Vec<EpochStart>,
}

const HISTORY_V1: u8 = 1;

impl EpochHistory {
    /// The newest epoch (0 when there is none).
    pub fn current(&self) -> u64 {
        self.starts.last().map_or(0, |s| s.epoch)
    }

    /// The epoch that wrote sequence `sequence` (0 before the first entry).
    pub fn epoch_at(&self, sequence: u64) -> u64 {
        self.starts.iter().rev().find(|s| s.start_sequence <= sequence).map_or(0, |s| s.epoch)
    }

    /// The history with `epoch` starting at `start_sequence`; `None` unless `epoch` is
    /// newer than every epoch here and starts after them.
    pub(crate) fn with(&self, epoch: u64, start_sequence: u64) -> Option<EpochHistory> {
        if let Some(last) = self.starts.last()
            && (epoch <= last.epoch || start_sequence <= last.start_sequence)
        {
            return None;
        }
        let mut starts = self.starts.clone();
        starts.push(EpochStart { epoch, start_sequence });
        Some(EpochHistory { starts })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 4 + 16 * self.starts.len());
        out.push(HISTORY_V1);
        out.extend_from_slice(&(self.starts.len() as u32).to_le_bytes());
        for s in &self.starts {
            out.extend_from_slice(&s.epoch.to_le_bytes());
            out.extend_from_slice(&s.start_sequence.to_le_bytes());
        }
        out
    }

    /// `None` for bytes that are not a well-formed, strictly increasing history.
    pub(crate) fn decode(bytes: &[u8]) -> Option<EpochHistory> {
        let mut r = Reader(bytes);
        if r.u8()? != HISTORY_V1 {
            return None;
        }
        let n = r.u32()? as usize;
        if n > bytes.len() / 16 {
            return None;
        }
        let mut history = EpochHistory::default();
        for _ in 0..n {
            let (epoch, start) = (r.u64()?, r.u64()?);
            history = history.with(epoch, start)?;
        }
        r.0.is_empty().then_some(history)
    }
}

/// Where a replica's log stands: what a follower sends its leader so that the leader can
/// check the follower's log is a prefix of its own before shipping the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    /// The database's lineage (see the `lineage` meta key).
    pub lineage: u64,
    /// Fingerprint of the column-family numbering (batches are applied by number).
    pub layout: u64,
    /// The last sequence number applied.
    pub sequence: u64,
    /// The epoch that wrote `sequence`.
    pub epoch: u64,
}

/// Why a follower's log is not a prefix of its leader's: it must be rebuilt from the
/// leader's checkpoint (never merged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error("the replicas descend from different databases (lineage {follower:#x} vs {leader:#x})")]
    Lineage { follower: u64, leader: u64 },
    #[error("the replicas number their column families differently")]
    Layout,
    #[error("the follower is at sequence {follower} but the leader's log ends at {leader}")]
    Ahead { follower: u64, leader: u64 },
    #[error(
        "sequence {sequence} was written in epoch {follower_epoch} on the follower but in epoch {leader_epoch} on the leader"
    )]
    Epoch { sequence: u64, follower_epoch: u64, leader_epoch: u64 },
}

/// The log-matching check: `Ok` when the follower at `follower` holds a prefix of the
/// log of the leader at `leader` with history `history`.
pub fn check_prefix(
    leader: &LogPosition,
    history: &EpochHistory,
    follower: &LogPosition,
) -> Result<(), Divergence> {
    if follower.lineage != leader.lineage {
        return Err(Divergence::Lineage { follower: follower.lineage, leader: leader.lineage });
    }
    if follower.layout != leader.layout {
        return Err(Divergence::Layout);
    }
    if follower.sequence > leader.sequence {
        return Err(Divergence::Ahead { follower: follower.sequence, leader: leader.sequence });
    }
    let leader_epoch = history.epoch_at(follower.sequence);
    if leader_epoch != follower.epoch {
        return Err(Divergence::Epoch {
            sequence: follower.sequence,
            follower_epoch: follower.epoch,
            leader_epoch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(entries: &[(u64, u64)]) -> EpochHistory {
        entries.iter().fold(EpochHistory::default(), |h, (e, s)| h.with(*e, *s).unwrap())
    }

    #[test]
    fn epoch_at_and_round_trip() {
        let h = history(&[(1, 5), (3, 20), (4, 21)]);
        assert_eq!(h.current(), 4);
        assert_eq!(
            [h.epoch_at(0), h.epoch_at(4), h.epoch_at(5), h.epoch_at(19), h.epoch_at(20), h.epoch_at(99)],
            [0, 0, 1, 1, 3, 4]
        );
        assert_eq!(EpochHistory::decode(&h.encode()), Some(h.clone()));
        // Not newer, or not later: refused.
        assert!(h.with(4, 30).is_none() && h.with(5, 21).is_none());
        let bytes = h.encode();
        for len in 0..bytes.len() {
            assert!(EpochHistory::decode(&bytes[..len]).is_none(), "len {len}");
        }
        let decreasing = [
            HISTORY_V1, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(EpochHistory::decode(&decreasing).is_none());
    }

    #[test]
    fn the_prefix_check_finds_every_kind_of_divergence() {
        // The leader took over epoch 2 at sequence 11: it had 1..=10 from epoch 1.
        let leader_history = history(&[(1, 3), (2, 11)]);
        let leader = LogPosition { lineage: 7, layout: 1, sequence: 40, epoch: 2 };
        let at = |sequence, epoch| LogPosition { lineage: 7, layout: 1, sequence, epoch };
        assert_eq!(check_prefix(&leader, &leader_history, &at(10, 1)), Ok(()));
        assert_eq!(check_prefix(&leader, &leader_history, &at(25, 2)), Ok(()));
        assert_eq!(check_prefix(&leader, &leader_history, &at(0, 0)), Ok(()));
        // The old leader wrote 11..=14 in epoch 1 that nobody else has.
        assert!(matches!(check_prefix(&leader, &leader_history, &at(14, 1)), Err(Divergence::Epoch { .. })));
        assert!(matches!(check_prefix(&leader, &leader_history, &at(41, 2)), Err(Divergence::Ahead { .. })));
        let other = LogPosition { lineage: 8, ..at(5, 1) };
        assert!(matches!(check_prefix(&leader, &leader_history, &other), Err(Divergence::Lineage { .. })));
        let relaid = LogPosition { layout: 2, ..at(5, 1) };
        assert_eq!(check_prefix(&leader, &leader_history, &relaid), Err(Divergence::Layout));
    }
}
