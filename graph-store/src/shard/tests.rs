use super::*;
use crate::bitmap::{self, Delta};
use crate::record::{EdgeKind, FilterKind, ordinal_key, u32_key, u64_key};
use feedgraph_model::{Board, FollowTarget, Pin, PinFlag, PinId, PinRef, PinSignals, User};
use roaring::RoaringBitmap;

pub(crate) fn uid(v: u64) -> UserId {
    UserId::new(v).unwrap()
}
fn bid(v: u64) -> BoardId {
    BoardId::new(v).unwrap()
}
fn pid(v: u64) -> PinId {
    PinId::new(v).unwrap()
}
fn tid(v: u32) -> TopicId {
    TopicId::new(v).unwrap()
}

fn pin(id: u64, owner: u64, board: u64, t: i64, topics: &[u32]) -> Mutation {
    Mutation::UpsertPin(Pin {
        id: pid(id),
        owner: uid(owner),
        board: bid(board),
        created_at_ms: t,
        topics: topics.iter().map(|t| tid(*t)).collect(),
        signals: PinSignals { quality: 0.5, saves: 1, clicks: 2, closeups: 3 },
    })
}

fn board(id: u64, owner: u64) -> Mutation {
    Mutation::UpsertBoard(Board { id: bid(id), owner: uid(owner), name: format!("b{id}") })
}

fn open(dir: &Path) -> Shard {
    Shard::open(dir, &ShardOptions::new(3)).unwrap()
}

fn ids(b: &RoaringBitmap) -> Vec<u32> {
    b.iter().collect()
}

#[test]
fn pins_get_dense_ordinals_and_rewrites_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write(&[board(1, 10), pin(100, 10, 1, 1000, &[7]), pin(101, 10, 1, 2000, &[7, 8])], Durability::Sync)
        .unwrap();
    assert_eq!(s.ordinal(pid(100)).unwrap(), Some(0));
    assert_eq!(s.ordinal(pid(101)).unwrap(), Some(1));
    // Re-writing moves the pin to another board and topic, keeping its ordinal.
    s.write(&[board(2, 10), pin(100, 10, 2, 1000, &[8])], Durability::Buffered).unwrap();
    assert_eq!(s.ordinal(pid(100)).unwrap(), Some(0));
    assert_eq!(s.next_ordinal(), 2);
    assert_eq!(ids(&s.board_pins(bid(1)).unwrap()), [1]);
    assert_eq!(ids(&s.board_pins(bid(2)).unwrap()), [0]);
    assert_eq!(ids(&s.topic_pins(tid(7)).unwrap()), [1]);
    assert_eq!(ids(&s.topic_pins(tid(8)).unwrap()), [0, 1]);
    assert_eq!(ids(&s.user_pins(uid(10)).unwrap()), [0, 1]);
    assert_eq!(s.attributes().get(0).unwrap().board, 2);
}

#[test]
fn a_pin_on_a_missing_board_fails_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let before = s.latest_sequence();
    let err = s.write(&[board(1, 10), pin(100, 10, 1, 1, &[]), pin(101, 10, 9, 1, &[])], Durability::Sync);
    assert!(matches!(err, Err(Error::BoardNotFound(b)) if b == bid(9)));
    assert_eq!(s.latest_sequence(), before);
    assert_eq!(s.ordinal(pid(100)).unwrap(), None);
    assert!(s.board(bid(1)).unwrap().is_none());
    assert_eq!(s.next_ordinal(), 0);
    // A board of another owner is refused too.
    s.write(&[board(1, 10)], Durability::Sync).unwrap();
    assert!(matches!(
        s.write(&[pin(100, 11, 1, 1, &[])], Durability::Sync),
        Err(Error::OwnerMismatch { .. })
    ));
}

#[test]
fn unknown_ids_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert!(s.user_pins(uid(5)).unwrap().is_empty());
    assert!(s.board_pins(bid(5)).unwrap().is_empty());
    assert!(s.topic_pins(tid(5)).unwrap().is_empty());
    assert!(s.seen(uid(5)).unwrap().is_empty());
    assert!(s.filter(FilterKind::Spam).unwrap().is_empty());
    assert_eq!(s.follows(uid(5)).unwrap(), Follows::default());
    assert!(s.pin(pid(5)).unwrap().is_none());
    assert!(s.user(uid(5)).unwrap().is_none());
    assert_eq!(s.board_pins_many(&[bid(1), bid(2)]).unwrap().len(), 2);
    // Pin-level writes on unknown pins are counted no-ops.
    let out =
        s.write(&[Mutation::DeletePin(PinRef { pin: pid(5), owner: uid(1) })], Durability::Buffered).unwrap();
    assert_eq!(out.unknown_pins, 1);
}

#[test]
fn follows_blocks_filters_and_seen() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let r = |p| PinRef { pin: pid(p), owner: uid(10) };
    s.write(
        &[
            board(1, 10),
            pin(100, 10, 1, 1, &[]),
            pin(101, 10, 1, 2, &[]),
            pin(102, 10, 1, 3, &[]),
            Mutation::Follow { follower: uid(1), target: FollowTarget::User(uid(10)) },
            Mutation::Follow {
                follower: uid(1),
                target: FollowTarget::Board { board: bid(1), owner: uid(10) },
            },
            Mutation::Follow { follower: uid(1), target: FollowTarget::Topic(tid(4)) },
            Mutation::Follow { follower: uid(2), target: FollowTarget::User(uid(10)) },
            Mutation::BlockUser { user: uid(1), blocked: uid(66) },
            Mutation::DeletePin(r(100)),
            Mutation::FlagPin { pin: r(101), flag: PinFlag::Spam, on: true },
            Mutation::FlagPin { pin: r(102), flag: PinFlag::Unsafe, on: true },
            Mutation::FlagPin { pin: r(102), flag: PinFlag::Unsafe, on: false },
            Mutation::RecordImpressions { user: uid(1), pins: vec![r(101), r(102), r(999)] },
        ],
        Durability::Sync,
    )
    .unwrap();
    let f = s.follows(uid(1)).unwrap();
    assert_eq!(f.users, [uid(10)]);
    assert_eq!(f.boards, [(bid(1), uid(10))]);
    assert_eq!(f.topics, [tid(4)]);
    assert_eq!(f.blocked, [uid(66)]);
    assert_eq!(ids(&s.filter(FilterKind::Deleted).unwrap()), [0]);
    assert_eq!(ids(&s.filter(FilterKind::Spam).unwrap()), [1]);
    assert!(s.filter(FilterKind::Unsafe).unwrap().is_empty());
    assert_eq!(ids(&s.seen(uid(1)).unwrap()), [1, 2]);
    let a = s.attributes();
    assert!(a.get(0).unwrap().deleted && a.get(1).unwrap().spam && !a.get(2).unwrap().is_unsafe);
    drop(a);
    s.write(
        &[
            Mutation::Unfollow { follower: uid(1), target: FollowTarget::User(uid(10)) },
            Mutation::UnblockUser { user: uid(1), blocked: uid(66) },
        ],
        Durability::Sync,
    )
    .unwrap();
    let f = s.follows(uid(1)).unwrap();
    assert!(f.users.is_empty() && f.blocked.is_empty() && f.boards.len() == 1);
    assert_eq!(s.follows(uid(2)).unwrap().users, [uid(10)]);
}

#[test]
fn reopen_keeps_everything_and_never_reuses_ordinals() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.write(&[board(1, 10), pin(100, 10, 1, 5, &[3]), pin(101, 10, 1, 6, &[3])], Durability::Sync)
            .unwrap();
        s.write(
            &[Mutation::UpdateSignals {
                pin: PinRef { pin: pid(101), owner: uid(10) },
                update: feedgraph_model::SignalsUpdate { saves: Some(42), ..Default::default() },
            }],
            Durability::Sync,
        )
        .unwrap();
        s.flush().unwrap();
    }
    let s = open(dir.path());
    assert_eq!(s.next_ordinal(), 2);
    assert_eq!(ids(&s.topic_pins(tid(3)).unwrap()), [0, 1]);
    assert_eq!(s.attributes().get(1).unwrap().signals.saves, 42);
    assert_eq!(s.attributes().len(), 2);
    s.write(&[pin(102, 10, 1, 7, &[])], Durability::Sync).unwrap();
    assert_eq!(s.ordinal(pid(102)).unwrap(), Some(2));
    drop(s);
    // A directory of another shard is refused.
    assert!(matches!(
        Shard::open(dir.path(), &ShardOptions::new(4)),
        Err(Error::ShardMismatch { expected: 4, found: 3 })
    ));
}

#[test]
fn bulk_load_sorts_by_time_skips_existing_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write(&[board(1, 10), pin(500, 10, 1, 1, &[])], Durability::Sync).unwrap();
    let pins: Vec<Pin> = (0..1000u64)
        .map(|i| Pin {
            id: pid(1000 - i),
            owner: uid(10),
            board: bid(1 + i % 2),
            created_at_ms: 10_000 - i as i64,
            topics: vec![tid(1 + (i % 3) as u32)],
            signals: PinSignals::default(),
        })
        .collect();
    let mut with_dup = pins.clone();
    with_dup.push(pins[0].clone());
    let mut reports = Vec::new();
    let stats = s
        .bulk_load(
            BulkLoad {
                users: vec![User { id: uid(10), username: "ten".into() }],
                boards: vec![Board { id: bid(2), owner: uid(10), name: "two".into() }],
                pins: with_dup,
                follows: vec![(uid(1), FollowTarget::User(uid(10)))],
            },
            300,
            &mut |p| reports.push(*p),
        )
        .unwrap();
    // pin 500 exists already; one duplicate.
    assert_eq!(stats.pins_loaded, 999);
    assert_eq!(stats.pins_skipped, 2);
    assert_eq!(reports.len(), 4);
    assert_eq!(reports.last().unwrap().pins_done, 1001);
    // Ordinals follow creation time: the oldest pin (id 1, t = 9001) comes first.
    assert_eq!(s.ordinal(pid(1)).unwrap(), Some(1));
    assert_eq!(s.ordinal(pid(1000)).unwrap(), Some(999));
    assert_eq!(s.user_pins(uid(10)).unwrap().len(), 1000);
    assert_eq!(s.follows(uid(1)).unwrap().users, [uid(10)]);
    assert_eq!(s.attributes().len(), 1000);
    // A pin on an unknown board fails the load before anything is written.
    let seq = s.latest_sequence();
    let bad = BulkLoad {
        pins: vec![Pin {
            id: pid(77_777),
            owner: uid(10),
            board: bid(99),
            created_at_ms: 1,
            topics: vec![],
            signals: PinSignals::default(),
        }],
        ..Default::default()
    };
    assert!(matches!(s.bulk_load(bad, 10, &mut |_| {}), Err(Error::BoardNotFound(_))));
    assert_eq!(s.latest_sequence(), seq);
}

#[test]
fn corrupt_values_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write(&[board(1, 10), pin(100, 10, 1, 1, &[])], Durability::Sync).unwrap();
    // Corrupt a stored bitmap, a merge operand, a pin record and a follow entry.
    s.db.put_cf(s.cf(Cf::BoardPins), u64_key(1), b"garbage").unwrap();
    assert!(matches!(s.board_pins(bid(1)), Err(Error::Corrupt { .. })));
    s.db.merge_cf(s.cf(Cf::TopicPins), u32_key(9), [42u8, 1]).unwrap();
    assert!(s.topic_pins(tid(9)).is_err());
    s.db.put_cf(s.cf(Cf::Pins), ordinal_key(0), b"x").unwrap();
    assert!(matches!(s.pin(pid(100)), Err(Error::Corrupt { .. })));
    s.db.put_cf(s.cf(Cf::Follows), [0, 0, 0, 0, 0, 0, 0, 1, 9], b"").unwrap();
    assert!(matches!(s.follows(uid(1)), Err(Error::Corrupt { .. })));
    drop(s);
    // A corrupt pin record refuses the open rather than serving bad attributes.
    assert!(matches!(Shard::open(dir.path(), &ShardOptions::new(3)), Err(Error::Corrupt { .. })));
}

#[derive(Clone, Debug)]
enum Step {
    Add(u8, Vec<u32>),
    Remove(u8, Vec<u32>),
    Flush,
    Compact,
    Reopen,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let ids = proptest::collection::vec(0u32..200_000, 1..40);
    prop_oneof![
        6 => (0u8..4, ids.clone()).prop_map(|(k, v)| Step::Add(k, v)),
        4 => (0u8..4, ids).prop_map(|(k, v)| Step::Remove(k, v)),
        1 => Just(Step::Flush),
        1 => Just(Step::Compact),
        1 => Just(Step::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// The merge operator against a model: random add/remove sequences on a few
    /// keys, with flushes (partial merges of memtable operands), compactions (full
    /// merges) and reopens in between, read back equal to a `BTreeSet` per key.
    #[test]
    fn merge_operator_matches_a_set_model(steps in proptest::collection::vec(step(), 1..60)) {
        use std::collections::BTreeSet;
        let dir = tempfile::tempdir().unwrap();
        let mut shard = open(dir.path());
        let mut model: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); 4];
        let key = |k: u8| u64_key(u64::from(k) + 1);
        for step in steps {
            match step {
                Step::Add(k, ids) => {
                    shard.db.merge_cf(shard.cf(Cf::BoardPins), key(k), Delta::add(ids.iter().copied()).encode()).unwrap();
                    model[k as usize].extend(ids);
                }
                Step::Remove(k, ids) => {
                    shard.db.merge_cf(shard.cf(Cf::BoardPins), key(k), Delta::remove(ids.iter().copied()).encode()).unwrap();
                    for id in ids { model[k as usize].remove(&id); }
                }
                Step::Flush => shard.flush().unwrap(),
                Step::Compact => shard.compact().unwrap(),
                Step::Reopen => {
                    drop(shard);
                    shard = open(dir.path());
                }
            }
            for (k, expected) in model.iter().enumerate() {
                let got: BTreeSet<u32> = shard.board_pins(bid(k as u64 + 1)).unwrap().iter().collect();
                proptest::prop_assert_eq!(&got, expected);
            }
        }
    }
}

#[test]
fn flushing_many_operands_runs_the_partial_merge() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.db.put_cf(s.cf(Cf::BoardPins), u64_key(1), bitmap::encode_bitmap(&(0..10).collect())).unwrap();
    s.flush().unwrap();
    let before = bitmap::PARTIAL_MERGES.load(Ordering::Relaxed);
    for i in 0..20u32 {
        let d = if i % 3 == 0 { Delta::remove([i / 2]) } else { Delta::add([100 + i]) };
        s.db.merge_cf(s.cf(Cf::BoardPins), u64_key(1), d.encode()).unwrap();
    }
    s.flush().unwrap();
    assert!(bitmap::PARTIAL_MERGES.load(Ordering::Relaxed) > before);
    let mut expected: RoaringBitmap = (0..10).collect();
    for i in 0..20u32 {
        if i % 3 == 0 {
            expected.remove(i / 2);
        } else {
            expected.insert(100 + i);
        }
    }
    assert_eq!(s.board_pins(bid(1)).unwrap(), expected);
    s.compact().unwrap();
    assert_eq!(s.board_pins(bid(1)).unwrap(), expected);
}

#[test]
fn cached_reads_follow_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let r = |p| PinRef { pin: pid(p), owner: uid(10) };
    s.write(&[board(1, 10), board(2, 10), pin(100, 10, 1, 1, &[5])], Durability::Buffered).unwrap();
    let read = |s: &Shard| {
        (
            ids(&s.board_pins_cached(&[bid(1), bid(2)]).unwrap()[0]),
            ids(&s.board_pins_cached(&[bid(2)]).unwrap()[0]),
            ids(&s.topic_pins_cached(&[tid(5)]).unwrap()[0]),
            ids(&s.user_pins_cached(&[uid(10)]).unwrap()[0]),
            ids(&s.filters_cached().unwrap()[1]),
        )
    };
    assert_eq!(read(&s), (vec![0], vec![], vec![0], vec![0], vec![]));
    // The reads were cached (board 1 is (2, 1)), and this write drops exactly what
    // it changes: boards 1 and 2, topic 5, user 10 — not board 3's entry.
    s.board_pins_cached(&[bid(3)]).unwrap();
    assert!(s.cache.bitmaps.contains_key(&(2, 1)) && s.cache.bitmaps.contains_key(&(2, 3)));
    s.write(&[pin(101, 10, 1, 2, &[5]), pin(100, 10, 2, 1, &[])], Durability::Buffered).unwrap();
    assert!(!s.cache.bitmaps.contains_key(&(2, 1)) && !s.cache.bitmaps.contains_key(&(3, 5)));
    assert!(s.cache.bitmaps.contains_key(&(2, 3)));
    assert_eq!(read(&s), (vec![1], vec![0], vec![1], vec![0, 1], vec![]));
    s.write(&[Mutation::FlagPin { pin: r(101), flag: PinFlag::Spam, on: true }], Durability::Buffered)
        .unwrap();
    assert_eq!(read(&s).4, vec![1]);
    let load = BulkLoad {
        pins: vec![Pin {
            id: pid(102),
            owner: uid(10),
            board: bid(2),
            created_at_ms: 3,
            topics: vec![tid(5)],
            signals: PinSignals::default(),
        }],
        ..Default::default()
    };
    s.bulk_load(load, 10, &mut |_| {}).unwrap();
    assert_eq!(read(&s), (vec![1], vec![0, 2], vec![1, 2], vec![0, 1, 2], vec![1]));

    // Follow lists: cached, and dropped by the follower's own follow and block writes.
    assert!(s.follows_cached(uid(1)).unwrap().users.is_empty());
    assert!(s.cache.follows.contains_key(&uid(1)));
    s.write(
        &[Mutation::Follow { follower: uid(2), target: FollowTarget::User(uid(10)) }],
        Durability::Buffered,
    )
    .unwrap();
    assert!(s.cache.follows.contains_key(&uid(1)), "another user's follow keeps user 1's entry");
    s.write(
        &[Mutation::Follow { follower: uid(1), target: FollowTarget::User(uid(10)) }],
        Durability::Buffered,
    )
    .unwrap();
    assert!(!s.cache.follows.contains_key(&uid(1)));
    assert_eq!(s.follows_cached(uid(1)).unwrap().users, [uid(10)]);
    s.write(&[Mutation::BlockUser { user: uid(1), blocked: uid(66) }], Durability::Buffered).unwrap();
    assert_eq!(s.follows_cached(uid(1)).unwrap().blocked, [uid(66)]);
}

#[test]
fn several_shards_open_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Shard> = (0..4)
        .map(|i| Shard::open(dir.path().join(format!("shard-{i}")), &ShardOptions::new(i)).unwrap())
        .collect();
    for (i, s) in shards.iter().enumerate() {
        let owner = 10 + i as u64;
        s.write(&[board(1, owner), pin(100, owner, 1, 1, &[])], Durability::Buffered).unwrap();
    }
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(s.id(), i as u32);
        assert_eq!(s.attributes().get(0).unwrap().owner, 10 + i as u64);
    }
}

/// A follower recovers from the shipped batch exactly the effects the leader prepared
/// (attribute rows, next ordinal, cache keys, follow lists), for every mutation kind.
#[test]
fn a_batch_carries_the_effects_its_writer_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write(
        &[board(1, 10), board(2, 10), pin(100, 10, 1, 1, &[3]), pin(101, 10, 1, 2, &[4])],
        Durability::Buffered,
    )
    .unwrap();
    let r = |p| PinRef { pin: pid(p), owner: uid(10) };
    let writes: Vec<Vec<Mutation>> = vec![
        vec![pin(102, 10, 2, 3, &[3, 5]), pin(100, 10, 2, 1, &[5])],
        vec![Mutation::UpsertUser(User { id: uid(10), username: "ten".into() }), board(3, 10)],
        vec![
            Mutation::Follow { follower: uid(1), target: FollowTarget::User(uid(10)) },
            Mutation::Unfollow { follower: uid(2), target: FollowTarget::Topic(tid(3)) },
            Mutation::BlockUser { user: uid(3), blocked: uid(4) },
            Mutation::UnblockUser { user: uid(5), blocked: uid(4) },
        ],
        vec![Mutation::DeletePin(r(101)), Mutation::FlagPin { pin: r(100), flag: PinFlag::Spam, on: true }],
        vec![
            Mutation::RecordImpressions { user: uid(7), pins: vec![r(100), r(102), r(999)] },
            Mutation::UpdateSignals {
                pin: r(102),
                update: feedgraph_model::SignalsUpdate { quality: Some(0.9), ..Default::default() },
            },
            Mutation::FlagPin { pin: r(100), flag: PinFlag::Spam, on: false },
        ],
    ];
    for muts in writes {
        let next = s.lock_writer().next_ordinal;
        let now = wall_clock_ms();
        let prepared = write::prepare(&s, next, &muts, now).unwrap();
        let decoded =
            write::Effects::decode(&prepared.batch, &s.cf_ids, prepared.batch.len() as u64).unwrap();
        assert_eq!(decoded, prepared.effects, "{muts:?}");
        s.write_as_of(None, &muts, Durability::Buffered, now).unwrap();
    }
    // An epoch start carries the new history.
    s.lead(9).unwrap();
    let batch = s.updates_since(s.latest_sequence() - 1, usize::MAX).unwrap().pop().unwrap();
    let effects =
        write::Effects::decode(&rocksdb::WriteBatch::from_data(&batch.data), &s.cf_ids, batch.count).unwrap();
    assert_eq!(effects.epochs.unwrap().current(), 9);
}

/// A body cut short (its header intact) holds fewer operations than the header says:
/// refused, not half-applied.
#[test]
fn a_truncated_batch_body_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write(&[board(1, 10), pin(100, 10, 1, 1, &[3])], Durability::Buffered).unwrap();
    let batch = s.updates_since(0, usize::MAX).unwrap().pop().unwrap();
    let cut = &batch.data[..batch.data.len() - 3];
    let err =
        write::Effects::decode(&rocksdb::WriteBatch::from_data(cut), &s.cf_ids, batch.count).unwrap_err();
    assert!(matches!(err, Error::ReplicatedBatch(_)), "{err}");
}

/// A shipped batch RocksDB would take and then fail on — bytes after its last
/// operation, a merge into a family without a merge operator, a value its reader cannot
/// decode, shard metadata — is refused as a malformed batch (the follower rebuilds from
/// its leader), and leaves the replica sound: not fenced, at the same position, and
/// applying its leader's next batch.
#[test]
fn a_batch_rocksdb_would_fail_on_is_refused_and_the_replica_stays_sound() {
    let dir = tempfile::tempdir().unwrap();
    let leader = open(&dir.path().join("leader"));
    leader.write(&[board(1, 10), pin(100, 10, 1, 1, &[3])], Durability::Buffered).unwrap();
    let start = leader.checkpoint(dir.path().join("replica")).unwrap();
    let replica = Shard::open_replica(dir.path().join("replica"), &ShardOptions::new(3)).unwrap();
    leader
        .write(
            &[
                pin(101, 10, 1, 2, &[3]),
                Mutation::Follow { follower: uid(2), target: FollowTarget::User(uid(10)) },
            ],
            Durability::Buffered,
        )
        .unwrap();
    let good = leader.updates_since(start, usize::MAX).unwrap();
    assert_eq!(good.len(), 1);

    let shipped = |data: Vec<u8>, count: u64| {
        let sequence = replica.latest_sequence() + 1;
        let mut data = data;
        data[..8].copy_from_slice(&sequence.to_le_bytes());
        WalBatch { sequence, count, data, commit_ms: 0 }
    };
    let one_op = |f: &dyn Fn(&mut rocksdb::WriteBatch)| {
        let mut b = rocksdb::WriteBatch::default();
        f(&mut b);
        shipped(b.data().to_vec(), 1)
    };
    let with_tail = |tail: &[u8]| {
        let mut data = good[0].data.clone();
        data.extend_from_slice(tail);
        shipped(data, good[0].count)
    };
    let user_pins = replica.cf(Cf::UserPins);
    let record = leader.pin_at(0).unwrap().unwrap().encode();
    let next_ordinal = |n: u64| n.to_le_bytes();
    let bad = [
        // Ordinals a leader never assigns (fuzzing found the first: 1.9 GB of rows).
        (
            "a record far past the next ordinal",
            one_op(&|b| b.put_cf(replica.cf(Cf::Pins), ordinal_key(16_000_000), &record)),
        ),
        (
            "the next ordinal moved back",
            one_op(&|b| b.put_cf(replica.cf(Cf::Meta), schema::META_NEXT_ORDINAL, next_ordinal(0))),
        ),
        (
            "the next ordinal moved past records",
            one_op(&|b| b.put_cf(replica.cf(Cf::Meta), schema::META_NEXT_ORDINAL, next_ordinal(1_000))),
        ),
        ("a byte that is no record", with_tail(&[0xee])),
        ("a cut record", with_tail(&[1, 5, 1])),
        // A log-data record: well formed, not counted, never written by a leader.
        ("an uncounted record", with_tail(&[3, 1, 0])),
        ("a merge into pin ids", one_op(&|b| b.merge_cf(replica.cf(Cf::PinIds), u64_key(5), [0; 4]))),
        (
            "a merge into follows",
            one_op(&|b| {
                b.merge_cf(replica.cf(Cf::Follows), crate::record::follow_key(uid(5), EdgeKind::User, 6), [])
            }),
        ),
        ("a bad merge operand", one_op(&|b| b.merge_cf(user_pins, u64_key(10), [0xff, 1]))),
        ("a bad bitmap", one_op(&|b| b.put_cf(user_pins, u64_key(10), [1, 2, 3]))),
        (
            "a bad seen key",
            one_op(&|b| b.put_cf(replica.cf(Cf::Seen), [1], bitmap::encode_bitmap(&RoaringBitmap::new()))),
        ),
        ("a bad follow key", one_op(&|b| b.put_cf(replica.cf(Cf::Follows), u64_key(5), []))),
        ("a bad user name", one_op(&|b| b.put_cf(replica.cf(Cf::Users), u64_key(5), [0xff]))),
        (
            "the shard's identity",
            one_op(&|b| b.put_cf(replica.cf(Cf::Meta), schema::META_SHARD_ID, 9u64.to_le_bytes())),
        ),
        ("a deleted epoch history", one_op(&|b| b.delete_cf(replica.cf(Cf::Meta), schema::META_EPOCHS))),
    ];
    let before = replica.latest_sequence();
    for (what, batch) in bad {
        let e = replica.apply_replicated(&[batch]).unwrap_err();
        assert!(matches!(e, Error::ReplicatedBatch(_)), "{what}: {e}");
        assert_eq!(replica.latest_sequence(), before, "{what}");
        assert_eq!(replica.fault(), None, "{what}");
    }
    replica.apply_replicated(&good).unwrap();
    assert_eq!(leader.digest().unwrap(), replica.digest().unwrap());
    assert_eq!(replica.follows(uid(2)).unwrap().users, [uid(10)]);
}

/// The ordinal watermark is published after the rows and bitmaps it covers: a reader
/// that takes the watermark first never meets an ordinal without its row.
#[test]
fn the_watermark_never_runs_ahead_of_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(dir.path()));
    s.write(&[board(1, 10)], Durability::Buffered).unwrap();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 0..2_000u64 {
                s.write(&[pin(1_000 + i, 10, 1, i as i64, &[])], Durability::Buffered).unwrap();
            }
        })
    };
    let mut checks = 0u64;
    while !writer.is_finished() {
        let watermark = s.next_ordinal();
        let rows = s.attributes().len() as u32;
        let bitmap = s.board_pins_cached(&[bid(1)]).unwrap()[0].clone();
        assert!(rows >= watermark, "watermark {watermark} ahead of {rows} rows");
        assert!(
            bitmap.range_cardinality(..watermark) == u64::from(watermark),
            "bitmap lacks ordinals below {watermark}"
        );
        checks += 1;
    }
    writer.join().unwrap();
    assert!(checks > 0);
}

// ------------------------------------------------------------------ the seen window

const HOUR: u64 = 3_600_000;

fn open_with_window(dir: &Path, window: SeenWindow) -> Shard {
    Shard::open(dir, &ShardOptions { seen: window, ..ShardOptions::new(3) }).unwrap()
}

/// Pins 1..=n of user 10 on board 1 (ordinals 0..n).
fn pins(s: &Shard, n: u64) {
    let mut muts = vec![board(1, 10)];
    muts.extend((1..=n).map(|p| pin(p, 10, 1, p as i64, &[])));
    s.write(&muts, Durability::Buffered).unwrap();
}

fn impressions(s: &Shard, user: u64, pins: impl IntoIterator<Item = u64>, now_ms: u64) {
    let pins = pins.into_iter().map(|p| PinRef { pin: pid(p), owner: uid(10) }).collect();
    s.write_as_of(
        None,
        &[Mutation::RecordImpressions { user: uid(user), pins }],
        Durability::Buffered,
        now_ms,
    )
    .unwrap();
}

/// Stored periods of a viewer: (first hour, entries).
fn periods(s: &Shard, user: u64) -> Vec<(Option<u32>, u64)> {
    s.seen_periods(uid(user)).unwrap().into_iter().map(|p| (p.start, p.ordinals.len())).collect()
}

#[test]
fn seen_leaves_out_and_deletes_periods_older_than_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let s =
        open_with_window(dir.path(), SeenWindow { window_hours: 48, period_hours: 24, max_entries: 1000 });
    pins(&s, 10);
    let t0 = 1000 * 24 * HOUR; // the start of a day
    impressions(&s, 1, [1, 2], t0 + HOUR);
    impressions(&s, 1, [3], t0 + 30 * HOUR);
    assert_eq!(periods(&s, 1), [(Some(24_000), 2), (Some(24_024), 1)]);
    assert_eq!(ids(&s.seen_at(uid(1), t0 + 30 * HOUR).unwrap()), [0, 1, 2]);
    // Day 0's impressions are all older than 48 hours at hour 72: left out of reads at
    // once, deleted by the viewer's next write.
    assert_eq!(ids(&s.seen_at(uid(1), t0 + 72 * HOUR).unwrap()), [2]);
    assert_eq!(periods(&s, 1).len(), 2);
    impressions(&s, 1, [4], t0 + 72 * HOUR);
    assert_eq!(periods(&s, 1), [(Some(24_024), 1), (Some(24_072), 1)]);
    assert_eq!(ids(&s.seen_at(uid(1), t0 + 72 * HOUR).unwrap()), [2, 3]);
    assert_eq!(s.seen_stats(), SeenStats { periods_expired: 1, entries_trimmed: 0 });
    // An empty `RecordImpressions` applies the window and records nothing.
    impressions(&s, 1, [], t0 + 200 * HOUR);
    assert!(periods(&s, 1).is_empty());
    assert_eq!(s.seen_stats().periods_expired, 3);
}

/// The long run of the issue: a viewer shown pins for weeks stays within its cap, and
/// keeps the newest impressions.
#[test]
fn seen_stays_within_its_cap_under_a_long_run_of_impressions() {
    let dir = tempfile::tempdir().unwrap();
    let window = SeenWindow { window_hours: 24 * 365, period_hours: 6, max_entries: 100 };
    let s = open_with_window(dir.path(), window);
    pins(&s, 1000);
    let t0 = 500_000 * HOUR;
    let mut shown = 0u64;
    for round in 0..400u64 {
        let now = t0 + round * HOUR;
        // 7 pins a round, cycling through the 1,000 (some are seen twice).
        let batch: Vec<u64> = (0..7).map(|i| (round * 7 + i) % 1000 + 1).collect();
        impressions(&s, 1, batch.clone(), now);
        shown += 7;
        let stored: u64 = periods(&s, 1).iter().map(|(_, n)| n).sum();
        assert!(stored <= 100, "round {round}: {stored} stored");
        let seen = s.seen_at(uid(1), now).unwrap();
        for p in &batch {
            assert!(seen.contains((*p - 1) as u32), "round {round}: pin {p} just shown is not seen");
        }
    }
    assert!(s.seen_stats().entries_trimmed >= shown - 100);
    // Only the last few periods are left.
    assert!(periods(&s, 1).len() <= 5, "{:?}", periods(&s, 1));
}

/// One request naming more pins than the cap keeps the cap (of its newest ordinals).
#[test]
fn one_write_above_the_cap_is_trimmed_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_with_window(dir.path(), SeenWindow { window_hours: 48, period_hours: 24, max_entries: 5 });
    pins(&s, 10);
    impressions(&s, 1, 1..=8, 24 * HOUR);
    assert_eq!(ids(&s.seen_at(uid(1), 24 * HOUR).unwrap()), [3, 4, 5, 6, 7]);
    assert_eq!(s.seen_stats().entries_trimmed, 3);
}

/// After a clock went back (a new leader's behind the old one's), what is shown now is
/// still trimmed last: periods stamped later by the faster clock go first.
#[test]
fn the_cap_trims_what_was_shown_now_last_after_a_clock_went_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_with_window(dir.path(), SeenWindow { window_hours: 96, period_hours: 24, max_entries: 5 });
    pins(&s, 10);
    impressions(&s, 1, 1..=5, 72 * HOUR);
    // The clock now reads a day earlier: the current period sorts before the stored one.
    impressions(&s, 1, [6, 7, 8], 48 * HOUR);
    assert_eq!(periods(&s, 1), [(Some(48), 3), (Some(72), 2)]);
    let seen = ids(&s.seen_at(uid(1), 48 * HOUR).unwrap());
    assert_eq!(seen, [3, 4, 5, 6, 7], "the newest impressions (ordinals 5..=7) must all be kept");
    // Already stored, the current period still goes last.
    impressions(&s, 1, [9, 10], 48 * HOUR);
    assert_eq!(periods(&s, 1), [(Some(48), 5)]);
}

/// A key of the layout before periods has no time: read as expired, found by the
/// sweep, deleted by the viewer's next write.
#[test]
fn a_seen_key_without_a_period_reads_as_expired() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    pins(&s, 3);
    let legacy = Delta::add([0u32, 1]).encode();
    s.db.merge_cf(s.cf(Cf::Seen), u64_key(1), legacy).unwrap();
    assert_eq!(periods(&s, 1), [(None, 2)]);
    assert!(s.seen(uid(1)).unwrap().is_empty());
    let sweep = s.seen_sweep(None, wall_clock_ms(), 10, 100).unwrap();
    assert_eq!(sweep, SeenSweep { users: vec![uid(1)], next: None });
    impressions(&s, 1, [3], wall_clock_ms());
    assert_eq!(periods(&s, 1).len(), 1);
    assert_eq!(ids(&s.seen(uid(1)).unwrap()), [2]);
}

#[test]
fn the_seen_sweep_pages_through_viewers_with_expired_periods() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_with_window(dir.path(), SeenWindow { window_hours: 24, period_hours: 24, max_entries: 100 });
    pins(&s, 3);
    let day = 24 * HOUR;
    for user in 1..=20 {
        // Even viewers were shown pins on day 1 only; odd ones on day 1 and day 5.
        impressions(&s, user, [1], day);
        if user % 2 == 1 {
            impressions(&s, user, [2], 5 * day);
        }
    }
    // Odd viewers' day-1 periods went with their day-5 writes.
    let now = 5 * day + HOUR;
    let mut found = Vec::new();
    let mut from = None;
    for page in 0.. {
        assert!(page < 50, "the sweep does not end");
        let sweep = s.seen_sweep(from, now, 3, 4).unwrap();
        found.extend(sweep.users);
        match sweep.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    found.dedup();
    assert_eq!(found, (2..=20).step_by(2).map(uid).collect::<Vec<_>>());
    // Sweeping them (empty impressions) leaves nothing expired.
    for u in &found {
        impressions(&s, u.get(), [], now);
    }
    assert!(s.seen_sweep(None, now, 100, 1000).unwrap().users.is_empty());
    assert!(periods(&s, 2).is_empty());
    assert_eq!(periods(&s, 3).len(), 1);
}

/// What the window drops travels in the WAL: a replica applying the leader's batches
/// holds the same impressions (and digest).
#[test]
fn a_replica_drops_what_its_leader_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let window = SeenWindow { window_hours: 24, period_hours: 12, max_entries: 3 };
    let leader = open_with_window(&dir.path().join("leader"), window);
    pins(&leader, 20);
    let start = leader.checkpoint(dir.path().join("replica")).unwrap();
    let replica = Shard::open_replica(
        dir.path().join("replica"),
        &ShardOptions { seen: window, ..ShardOptions::new(3) },
    )
    .unwrap();
    for round in 0..30u64 {
        impressions(&leader, 1 + round % 3, [round % 20 + 1, (round * 7) % 20 + 1], round * 5 * HOUR);
    }
    replica.apply_replicated(&leader.updates_since(start, usize::MAX).unwrap()).unwrap();
    assert_eq!(leader.digest().unwrap(), replica.digest().unwrap());
    let now = 29 * 5 * HOUR;
    for user in 1..=3 {
        assert_eq!(leader.seen_at(uid(user), now).unwrap(), replica.seen_at(uid(user), now).unwrap());
        assert_eq!(periods(&leader, user), periods(&replica, user));
    }
    let stats = leader.seen_stats();
    assert!(stats.periods_expired > 0 && stats.entries_trimmed > 0, "{stats:?}");
}

// ------------------------------------------------------------------ per-user caps

#[test]
fn follows_and_blocks_past_the_caps_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Shard::open(dir.path(), &ShardOptions { max_follows: 3, max_blocks: 1, ..ShardOptions::new(3) })
        .unwrap();
    let follow = |target| Mutation::Follow { follower: uid(1), target };
    let unfollow = |target| Mutation::Unfollow { follower: uid(1), target };
    let (u, t) = (|v| FollowTarget::User(uid(v)), |v| FollowTarget::Topic(tid(v)));
    let b = FollowTarget::Board { board: bid(5), owner: uid(9) };
    s.write(&[follow(u(10)), follow(t(4)), follow(b), follow(u(10))], Durability::Buffered).unwrap();
    // One more of any kind is too many; the request's other mutations are not written.
    let before = s.latest_sequence();
    let e = s.write(&[board(7, 1), follow(u(11))], Durability::Buffered).unwrap_err();
    assert!(matches!(e, Error::TooMany { what: "follows", count: 4, limit: 3, .. }), "{e:?}");
    assert_eq!(s.latest_sequence(), before);
    assert!(s.board(bid(7)).unwrap().is_none());
    // Room made in the same request counts.
    s.write(&[unfollow(t(4)), follow(u(11))], Durability::Buffered).unwrap();
    let f = s.follows(uid(1)).unwrap();
    assert_eq!((f.users.len(), f.boards.len(), f.topics.len()), (2, 1, 0));
    // Blocks have their own cap, and do not count as follows.
    s.write(&[Mutation::BlockUser { user: uid(1), blocked: uid(66) }], Durability::Buffered).unwrap();
    let e =
        s.write(&[Mutation::BlockUser { user: uid(1), blocked: uid(67) }], Durability::Buffered).unwrap_err();
    assert!(matches!(e, Error::TooMany { what: "blocks", .. }), "{e:?}");
    s.write(
        &[
            Mutation::UnblockUser { user: uid(1), blocked: uid(66) },
            Mutation::BlockUser { user: uid(1), blocked: uid(67) },
        ],
        Durability::Buffered,
    )
    .unwrap();
    assert_eq!(s.follows(uid(1)).unwrap().blocked, [uid(67)]);
    // What counts is what the request leaves: a follow before the unfollow that makes
    // room for it fits too.
    s.write(&[follow(u(12)), unfollow(u(11))], Durability::Buffered).unwrap();
    assert_eq!(s.follows(uid(1)).unwrap().users, [uid(10), uid(12)]);
    // Under a lowered cap, a list already past it may shrink or swap, not grow.
    drop(s);
    let s = Shard::open(dir.path(), &ShardOptions { max_follows: 1, ..ShardOptions::new(3) }).unwrap();
    s.write(&[unfollow(u(12)), follow(u(13))], Durability::Buffered).unwrap();
    let e = s.write(&[follow(u(14))], Durability::Buffered).unwrap_err();
    assert!(matches!(e, Error::TooMany { what: "follows", count: 4, limit: 1, .. }), "{e:?}");
    s.write(&[unfollow(u(13))], Durability::Buffered).unwrap();
    assert_eq!(s.follows(uid(1)).unwrap().users, [uid(10)]);
}

// ------------------------------------------------------------------ a bad disk

/// A corrupted file: a read that meets it fails with a typed error (no panic) and
/// stops the shard's writes; what the corruption does not touch is still served.
#[test]
fn a_corrupted_file_stops_writes_and_keeps_other_reads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let mut muts = vec![board(1, 10)];
        muts.extend((1..=2000).map(|p| pin(p, 10, 1, p as i64, &[])));
        s.write(&muts, Durability::Sync).unwrap();
        // Only `user_pins` goes to an SST file; everything else stays in the WAL.
        s.db.flush_cf(s.cf(Cf::UserPins)).unwrap();
    }
    let ssts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .collect();
    assert_eq!(ssts.len(), 1, "{ssts:?}");
    // Flip bytes inside the first data block (the index and footer, at the end, stay
    // intact, so the file still opens).
    let mut bytes = std::fs::read(&ssts[0]).unwrap();
    for b in &mut bytes[8..40] {
        *b ^= 0x5a;
    }
    std::fs::write(&ssts[0], bytes).unwrap();

    let s = open(dir.path());
    assert!(s.fault().is_none());
    let e = s.user_pins(uid(10)).unwrap_err();
    assert!(e.is_storage_fault(), "{e:?}");
    assert!(s.fault().unwrap().contains("orruption"), "{:?}", s.fault());
    assert!(s.fault_is_damaged_file());
    // Other families still serve; writes are refused, with the reason.
    assert!(s.pin(pid(5)).unwrap().is_some());
    assert_eq!(s.board_pins(bid(1)).unwrap().len(), 2000);
    let e = s.write(&[pin(5000, 10, 1, 1, &[])], Durability::Sync).unwrap_err();
    assert!(matches!(&e, Error::WritesStopped { shard: 3, reason } if reason.contains("orruption")), "{e:?}");
    // Reopened on a sound copy (here: the same files, the corruption left in place),
    // the fence is gone until a read meets it again.
    drop(s);
    assert!(open(dir.path()).fault().is_none());
}
