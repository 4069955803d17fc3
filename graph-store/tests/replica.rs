//! Replicas at the store level: batches shipped from a leader's WAL and applied on a
//! replica give an identical shard (digest over every column family and the attribute
//! rows, cached reads); fences refuse what a replica or a stale writer must not do; a
//! divergent log is detected by the prefix check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use feedgraph_graph_store::{Divergence, Error, Shard, ShardOptions, WalBatch};
use feedgraph_model::{
    Board, BoardId, Durability, FollowTarget, Mutation, Pin, PinFlag, PinId, PinRef, PinSignals,
    SignalsUpdate, TopicId, User, UserId,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHARD: u32 = 3;

fn uid(v: u64) -> UserId {
    UserId::new(v).unwrap()
}

fn open_leader(dir: &Path) -> Shard {
    Shard::open(dir, &ShardOptions::new(SHARD)).unwrap()
}

/// A replica made the way a follower is: from a checkpoint of the leader.
fn replica_of(leader: &Shard, dir: &Path) -> Shard {
    leader.checkpoint(dir).unwrap();
    Shard::open_replica(dir, &ShardOptions::new(SHARD)).unwrap()
}

/// Ships everything the follower lacks, in batches of about `max_bytes`.
fn ship(leader: &Shard, follower: &Shard, max_bytes: usize) -> usize {
    let mut shipped = 0;
    loop {
        let batches = leader.updates_since(follower.latest_sequence(), max_bytes).unwrap();
        if batches.is_empty() {
            return shipped;
        }
        for b in &batches {
            follower.apply_replicated(std::slice::from_ref(b)).unwrap();
            shipped += 1;
        }
    }
}

/// A random write of every mutation kind over a small id space (so that updates,
/// deletes and unfollows hit existing things).
fn random_write(rng: &mut ChaCha8Rng, next_pin: &mut u64) -> Vec<Mutation> {
    let owner = |rng: &mut ChaCha8Rng| uid(rng.random_range(1..=4));
    let pin_ref = |rng: &mut ChaCha8Rng, next: u64| {
        let pin = rng.random_range(1..next.max(2));
        // Pins are made with owner = 1 + pin % 4 (below).
        PinRef { pin: PinId::new(pin).unwrap(), owner: uid(1 + pin % 4) }
    };
    let n = rng.random_range(1..8);
    let mut out = Vec::new();
    for _ in 0..n {
        let m = match rng.random_range(0..12) {
            0 => Mutation::UpsertUser(User { id: owner(rng), username: format!("u{}", rng.random::<u16>()) }),
            1..=3 => {
                let id = if rng.random_bool(0.8) {
                    *next_pin += 1;
                    *next_pin - 1
                } else {
                    rng.random_range(1..(*next_pin).max(2))
                };
                let o = 1 + id % 4;
                Mutation::UpsertPin(Pin {
                    id: PinId::new(id).unwrap(),
                    owner: uid(o),
                    board: BoardId::new(o * 10 + rng.random_range(0..2)).unwrap(),
                    created_at_ms: 1_700_000_000_000 + id as i64 * 1000,
                    topics: {
                        let mut t: Vec<TopicId> = (0..rng.random_range(0..3))
                            .map(|_| TopicId::new(rng.random_range(1..6)).unwrap())
                            .collect();
                        t.sort_unstable();
                        t.dedup();
                        t
                    },
                    signals: PinSignals {
                        quality: rng.random(),
                        saves: rng.random_range(0..100),
                        clicks: 1,
                        closeups: 2,
                    },
                })
            }
            4 => Mutation::Follow { follower: owner(rng), target: FollowTarget::User(owner(rng)) },
            5 => Mutation::Unfollow { follower: owner(rng), target: FollowTarget::User(owner(rng)) },
            6 => Mutation::Follow {
                follower: owner(rng),
                target: FollowTarget::Board { board: BoardId::new(10).unwrap(), owner: uid(1) },
            },
            7 => Mutation::DeletePin(pin_ref(rng, *next_pin)),
            8 => Mutation::FlagPin {
                pin: pin_ref(rng, *next_pin),
                flag: if rng.random_bool(0.5) { PinFlag::Spam } else { PinFlag::Unsafe },
                on: rng.random_bool(0.7),
            },
            9 => Mutation::RecordImpressions {
                user: owner(rng),
                pins: (0..3).map(|_| pin_ref(rng, *next_pin)).collect(),
            },
            10 => {
                let (user, blocked) = (owner(rng), owner(rng));
                if rng.random_bool(0.6) {
                    Mutation::BlockUser { user, blocked }
                } else {
                    Mutation::UnblockUser { user, blocked }
                }
            }
            _ => Mutation::UpdateSignals {
                pin: pin_ref(rng, *next_pin),
                update: SignalsUpdate { saves: Some(rng.random_range(0..1000)), ..Default::default() },
            },
        };
        out.push(m);
    }
    out
}

fn boards() -> Vec<Mutation> {
    (1..=4u64)
        .flat_map(|o| {
            (0..2).map(move |k| {
                Mutation::UpsertBoard(Board {
                    id: BoardId::new(o * 10 + k).unwrap(),
                    owner: uid(o),
                    name: format!("b{o}{k}"),
                })
            })
        })
        .collect()
}

#[test]
fn a_replica_fed_the_leaders_log_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let leader = open_leader(&dir.path().join("leader"));
    leader.lead(1).unwrap();
    leader.write(&boards(), Durability::Buffered).unwrap();
    // One replica from a checkpoint taken early, one taken late: both must converge.
    let early = replica_of(&leader, &dir.path().join("early"));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut next_pin = 1;
    for round in 0..300 {
        let muts = random_write(&mut rng, &mut next_pin);
        match leader.write(&muts, Durability::Buffered) {
            // Pins re-written under a board of another owner are refused as a whole.
            Ok(_) | Err(Error::OwnerMismatch { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        if round % 37 == 0 {
            // Reads through the replica's caches, so that the shipped batches must
            // invalidate them.
            let _ = early.follows_cached(uid(1)).unwrap();
            let _ = early.board_pins_cached(&[BoardId::new(10).unwrap(), BoardId::new(21).unwrap()]).unwrap();
            let _ = early.filters_cached().unwrap();
            ship(&leader, &early, 1 + rng.random_range(0..4096));
        }
    }
    let late = replica_of(&leader, &dir.path().join("late"));
    ship(&leader, &early, 1 << 20);
    assert_eq!(early.latest_sequence(), leader.latest_sequence());
    assert_eq!(late.latest_sequence(), leader.latest_sequence());
    let digest = leader.digest().unwrap();
    assert_eq!(early.digest().unwrap(), digest);
    assert_eq!(late.digest().unwrap(), digest);
    assert_eq!(early.next_ordinal(), leader.next_ordinal());
    assert_eq!(early.epoch_history(), leader.epoch_history());
    // The replica's caches followed every shipped batch.
    assert_eq!(early.follows_cached(uid(1)).unwrap(), leader.follows_cached(uid(1)).unwrap());
    let b = [BoardId::new(10).unwrap(), BoardId::new(21).unwrap()];
    assert_eq!(early.board_pins_cached(&b).unwrap(), leader.board_pins_cached(&b).unwrap());
    assert_eq!(early.filters_cached().unwrap(), leader.filters_cached().unwrap());

    // A replica restarted mid-stream continues from where it stopped.
    let path = early.path().to_path_buf();
    drop(early);
    leader.write(&random_write(&mut rng, &mut next_pin), Durability::Buffered).ok();
    let early = Shard::open_replica(&path, &ShardOptions::new(SHARD)).unwrap();
    ship(&leader, &early, 1 << 20);
    assert_eq!(early.digest().unwrap(), leader.digest().unwrap());
}

#[test]
fn fences_refuse_what_a_replica_or_a_stale_writer_must_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let leader = open_leader(&dir.path().join("leader"));
    leader.lead(4).unwrap();
    let replica = replica_of(&leader, &dir.path().join("replica"));
    leader.write(&boards(), Durability::Buffered).unwrap();

    assert!(matches!(replica.write(&boards(), Durability::Buffered), Err(Error::ReadOnlyReplica)));
    assert!(matches!(replica.bulk_load(Default::default(), 10, &mut |_| {}), Err(Error::ReadOnlyReplica)));
    assert!(matches!(
        leader.write_at(3, &boards(), Durability::Buffered),
        Err(Error::StaleEpoch { given: 3, current: 4 })
    ));
    assert_eq!(leader.write_at(4, &boards(), Durability::Buffered).unwrap().epoch, 4);
    assert!(matches!(leader.lead(2), Err(Error::StaleEpoch { given: 2, current: 4 })));

    let batches = leader.updates_since(replica.latest_sequence(), usize::MAX).unwrap();
    assert!(matches!(leader.apply_replicated(&batches[..1]), Err(Error::NotReplica)));
    // Out of order, or tampered with: refused before anything is written.
    assert!(matches!(replica.apply_replicated(&batches[1..2]), Err(Error::SequenceMismatch { .. })));
    let mut forged = batches[0].clone();
    forged.count += 1;
    assert!(matches!(
        replica.apply_replicated(std::slice::from_ref(&forged)),
        Err(Error::ReplicatedBatch(_))
    ));
    let short = WalBatch { data: vec![1, 2, 3], ..batches[0].clone() };
    assert!(matches!(replica.apply_replicated(std::slice::from_ref(&short)), Err(Error::ReplicatedBatch(_))));
    assert_eq!(replica.latest_sequence() + 1, batches[0].sequence);
    // Several at once: one write.
    replica.apply_replicated(&batches).unwrap();
    assert_eq!(replica.digest().unwrap(), leader.digest().unwrap());
}

#[test]
fn a_demoted_leader_with_writes_nobody_has_is_found_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let old = open_leader(&dir.path().join("old"));
    old.lead(1).unwrap();
    old.write(&boards(), Durability::Buffered).unwrap();
    let new = replica_of(&old, &dir.path().join("new"));
    let pin = |id| {
        Mutation::UpsertPin(Pin {
            id: PinId::new(id).unwrap(),
            owner: uid(1),
            board: BoardId::new(10).unwrap(),
            created_at_ms: 1,
            topics: vec![],
            signals: PinSignals::default(),
        })
    };
    old.write(&[pin(1)], Durability::Buffered).unwrap();
    ship(&old, &new, 1 << 20);
    // Replicated so far: either position checks out against the other.
    new.check_follower(&old.log_position()).unwrap();
    old.check_follower(&new.log_position()).unwrap();
    // A third replica stops here (it will only lag).
    let lagging = replica_of(&old, &dir.path().join("lagging"));
    // The old leader takes a write nobody replicates, then loses leadership.
    old.write(&[pin(2)], Durability::Buffered).unwrap();
    new.lead(2).unwrap();
    new.write(&[pin(3)], Durability::Buffered).unwrap();
    old.follow();
    match new.check_follower(&old.log_position()) {
        Err(Error::Diverged(Divergence::Epoch { follower_epoch: 1, leader_epoch: 2, .. })) => {}
        other => panic!("expected divergence, got {other:?}"),
    }
    // A replica that only lags (no writes of its own) checks out, and catches up.
    new.check_follower(&lagging.log_position()).unwrap();
    ship(&new, &lagging, 1 << 20);
    assert_eq!(lagging.digest().unwrap(), new.digest().unwrap());
    // An unrelated database is never taken for a replica.
    let stranger = open_leader(&dir.path().join("stranger"));
    assert!(matches!(
        new.check_follower(&stranger.log_position()),
        Err(Error::Diverged(Divergence::Lineage { .. }))
    ));
}

#[test]
fn a_bulk_load_replicates_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let leader = open_leader(&dir.path().join("leader"));
    leader.lead(1).unwrap();
    let replica = replica_of(&leader, &dir.path().join("replica"));
    let pins: Vec<Pin> = (1..=5_000u64)
        .map(|id| Pin {
            id: PinId::new(id).unwrap(),
            owner: uid(1 + id % 4),
            board: BoardId::new((1 + id % 4) * 10).unwrap(),
            created_at_ms: id as i64,
            topics: vec![TopicId::new(1 + (id % 3) as u32).unwrap()],
            signals: PinSignals::default(),
        })
        .collect();
    let boards =
        (1..=4u64).map(|o| Board { id: BoardId::new(o * 10).unwrap(), owner: uid(o), name: "b".into() });
    let load = feedgraph_graph_store::BulkLoad {
        users: vec![User { id: uid(1), username: "one".into() }],
        boards: boards.collect(),
        pins,
        follows: vec![(uid(2), FollowTarget::User(uid(1)))],
    };
    leader.bulk_load(load, 1_000, &mut |_| {}).unwrap();
    // Every shipped batch has operations (a bulk load's closing sync is not a record).
    let batches = leader.updates_since(replica.latest_sequence(), usize::MAX).unwrap();
    assert!(batches.iter().all(|b| b.count > 0));
    ship(&leader, &replica, 1 << 16);
    assert_eq!(replica.digest().unwrap(), leader.digest().unwrap());
    assert_eq!(replica.attributes().len(), 5_000);
}
