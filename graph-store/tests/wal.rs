//! Replication primitives: WAL updates since a sequence number (exact batches, gaps
//! reported instead of skipped), and checkpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use feedgraph_graph_store::{Error, Shard, ShardOptions};
use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId, PinSignals, UserId};

fn board() -> Mutation {
    Mutation::UpsertBoard(Board {
        id: BoardId::new(1).unwrap(),
        owner: UserId::new(9).unwrap(),
        name: "b".into(),
    })
}

fn pin(id: u64) -> Mutation {
    Mutation::UpsertPin(Pin {
        id: PinId::new(id).unwrap(),
        owner: UserId::new(9).unwrap(),
        board: BoardId::new(1).unwrap(),
        created_at_ms: id as i64,
        topics: vec![],
        signals: PinSignals::default(),
    })
}

#[test]
fn updates_since_returns_exactly_the_later_batches() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::open(dir.path(), &ShardOptions::new(1)).unwrap();
    shard.write(&[board()], Durability::Buffered).unwrap();
    // Positions after each write: a follower's applied sequence is always one of them.
    let mut positions = vec![shard.latest_sequence()];
    for i in 0..10 {
        shard.write(&[pin(100 + i), pin(200 + i)], Durability::Buffered).unwrap();
        positions.push(shard.latest_sequence());
    }
    for (i, &since) in positions.iter().enumerate() {
        let batches = shard.updates_since(since, usize::MAX).unwrap();
        assert_eq!(batches.len(), positions.len() - 1 - i, "since {since}");
        let mut expected = since + 1;
        for (b, &end) in batches.iter().zip(&positions[i + 1..]) {
            assert_eq!(b.sequence, expected);
            assert_eq!(b.sequence + b.count - 1, end);
            expected = end + 1;
        }
    }
    // max_bytes bounds the answer but always returns at least one batch.
    assert_eq!(shard.updates_since(positions[0], 1).unwrap().len(), 1);
    // A position beyond the log is a diverged follower, not an empty answer.
    let latest = shard.latest_sequence();
    assert!(matches!(shard.updates_since(latest + 5, 1 << 20), Err(Error::AheadOfLog { .. })));
}

#[test]
fn purged_wal_is_reported_as_a_gap_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    // No WAL retention: obsolete logs are deleted right after a flush.
    // (And no batches in memory: they would serve the position.)
    let opts = ShardOptions {
        wal_ttl_seconds: 0,
        wal_size_limit_mb: 0,
        recent_batches_bytes: 0,
        ..ShardOptions::new(1)
    };
    let shard = Shard::open(dir.path(), &opts).unwrap();
    shard.write(&[board(), pin(1)], Durability::Sync).unwrap();
    let old_position = shard.latest_sequence();
    shard.write(&[pin(2)], Durability::Sync).unwrap();
    shard.flush().unwrap();
    shard.write(&[pin(3)], Durability::Sync).unwrap();
    // Deletion of obsolete logs may trail the flush: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match shard.updates_since(old_position, usize::MAX) {
            Err(Error::WalGap { since, .. }) => {
                assert_eq!(since, old_position);
                break;
            }
            Ok(batches) => {
                assert_eq!(batches[0].sequence, old_position + 1, "never skips silently");
                assert!(Instant::now() < deadline, "obsolete WAL was never purged");
                std::thread::sleep(Duration::from_millis(100));
                shard.flush().unwrap();
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // The newest write is still readable from its own position onwards.
    let pos = shard.latest_sequence();
    shard.write(&[pin(4)], Durability::Sync).unwrap();
    assert_eq!(shard.updates_since(pos, usize::MAX).unwrap()[0].sequence, pos + 1);
}

#[test]
fn checkpoint_opens_as_a_shard_at_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::open(dir.path().join("live"), &ShardOptions::new(5)).unwrap();
    shard.write(&[board(), pin(1), pin(2)], Durability::Buffered).unwrap();
    let seq = shard.checkpoint(dir.path().join("cp")).unwrap();
    assert_eq!(seq, shard.latest_sequence());
    shard.write(&[pin(3)], Durability::Buffered).unwrap();

    let copy = Shard::open(dir.path().join("cp"), &ShardOptions::new(5)).unwrap();
    assert_eq!(copy.latest_sequence(), seq);
    assert_eq!(copy.next_ordinal(), 2);
    assert!(copy.ordinal(PinId::new(3).unwrap()).unwrap().is_none());
    assert_eq!(copy.board_pins(BoardId::new(1).unwrap()).unwrap().len(), 2);
}

#[test]
fn epoch_history_is_durable_and_replicated_data() {
    let dir = tempfile::tempdir().unwrap();
    let start;
    {
        let shard = Shard::open(dir.path(), &ShardOptions::new(2)).unwrap();
        assert_eq!(shard.epoch_history().current(), 0);
        assert_eq!(shard.writable_epoch(), Some(0));
        shard.write(&[board()], Durability::Buffered).unwrap();
        start = shard.latest_sequence() + 1;
        shard.lead(17).unwrap();
        // The epoch's start is its first write, in the log like any other.
        assert_eq!(shard.latest_sequence(), start);
        assert_eq!(shard.updates_since(start - 1, usize::MAX).unwrap().len(), 1);
    }
    let shard = Shard::open(dir.path(), &ShardOptions::new(2)).unwrap();
    let h = shard.epoch_history();
    assert_eq!(h.current(), 17);
    assert_eq!((h.epoch_at(start - 1), h.epoch_at(start)), (0, 17));
    assert_eq!(shard.writable_epoch(), Some(17));
}

#[test]
fn batches_kept_in_memory_are_the_wal_batches_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let since;
    let from_memory;
    {
        let shard = Shard::open(dir.path(), &ShardOptions::new(1)).unwrap();
        shard.write(&[board()], Durability::Buffered).unwrap();
        since = shard.latest_sequence();
        for i in 0..20 {
            shard.write(&[pin(100 + i), pin(200 + i)], Durability::Buffered).unwrap();
        }
        shard.lead(3).unwrap();
        from_memory = shard.recent_updates_since(since, usize::MAX).expect("held in memory");
        assert_eq!(from_memory.len(), 21);
        assert!(from_memory.iter().all(|b| b.commit_ms > 0));
        // Not at a batch boundary, or before what is held: not served from memory.
        assert!(shard.recent_updates_since(since + 1, usize::MAX).is_none());
    }
    // Reopened, nothing is in memory: the same batches come from the WAL.
    let shard = Shard::open(dir.path(), &ShardOptions::new(1)).unwrap();
    assert!(shard.recent_updates_since(since, usize::MAX).is_none());
    let from_wal = shard.updates_since(since, usize::MAX).unwrap();
    assert_eq!(from_wal.len(), from_memory.len());
    for (m, w) in from_memory.iter().zip(&from_wal) {
        assert_eq!((m.sequence, m.count, &m.data), (w.sequence, w.count, &w.data));
    }
}
