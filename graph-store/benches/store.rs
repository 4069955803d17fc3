//! Shard store benchmarks (release profile):
//! - `bulk_load`: edges written per second by the chunked bulk loader;
//! - `union_500`: a 500-way union of board bitmaps of 1,000 time-ordered ordinals each
//!   (roaring `MultiOps` against a `|=` fold);
//! - `read_300_bitmaps`: the board bitmaps of 300 followed boards, from RocksDB and
//!   through the decoded-bitmap cache;
//! - `replicate_100k_pins`: WAL bytes per second of 100 writes of 1,000 pins, written by
//!   a leader (`leader_write`) and applied by a replica from the shipped batches
//!   (`follower_apply`: header checks, effects decoded from the batch, commit, rows).
//!
//! The shard-side scan (filters, newest-first, light score, top-K) is benchmarked where
//! it lives: `retrieval/benches/query.rs`. Run: `./dev bench --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use feedgraph_graph_store::{BulkLoad, Shard, ShardOptions, WalBatch};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId, PinSignals, TopicId, UserId};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use roaring::{MultiOps, RoaringBitmap};

/// One shard's worth of the generator's graph.
fn shard_population(users: u64, boards: u64, pins: u64) -> BulkLoad {
    let g =
        generate(&GraphSpec { users, boards, pins, celebrities: 5, ..GraphSpec::demo(1_800_000_000_000) });
    BulkLoad { users: g.users, boards: g.boards, pins: g.pins, follows: g.follows }
}

fn edges_of(load: &BulkLoad) -> u64 {
    load.pins.iter().map(|p| 2 + p.topics.len() as u64).sum::<u64>() + load.follows.len() as u64
}

fn bench_bulk_load(c: &mut Criterion) {
    let load = shard_population(1_000, 4_000, 200_000);
    let edges = edges_of(&load);
    let mut group = c.benchmark_group("bulk_load");
    group.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(Throughput::Elements(edges));
    group.bench_function("200k_pins", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
                let input = load.clone();
                let start = Instant::now();
                let stats = shard.bulk_load(input, 20_000, &mut |_| {}).unwrap();
                total += start.elapsed();
                assert_eq!(stats.edges_written, edges);
            }
            total
        })
    });
    group.finish();
}

/// 500 boards × 1,000 ordinals: ordinal `i` (time order) is assigned to a board at
/// random, so every board's ordinals interleave with the others' as in a real shard.
fn board_bitmaps_500() -> Vec<RoaringBitmap> {
    let mut owners: Vec<usize> = (0..500).flat_map(|b| std::iter::repeat_n(b, 1_000)).collect();
    owners.shuffle(&mut ChaCha8Rng::seed_from_u64(2));
    let mut bitmaps = vec![RoaringBitmap::new(); 500];
    for (ordinal, board) in owners.into_iter().enumerate() {
        bitmaps[board].try_push(ordinal as u32).expect("ordinals ascend");
    }
    bitmaps
}

fn bench_union(c: &mut Criterion) {
    let bitmaps = board_bitmaps_500();
    let ids: u64 = bitmaps.iter().map(RoaringBitmap::len).sum();
    let mut group = c.benchmark_group("union_500");
    group.throughput(Throughput::Elements(ids));
    group.bench_function("multiops", |b| b.iter(|| black_box(bitmaps.iter().union())));
    group.bench_function("fold_or", |b| {
        b.iter(|| {
            let mut acc = RoaringBitmap::new();
            for bm in &bitmaps {
                acc |= bm;
            }
            black_box(acc)
        })
    });
    group.finish();
}

fn bench_bitmap_reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    shard.bulk_load(shard_population(750, 3_000, 300_000), 100_000, &mut |_| {}).unwrap();
    shard.flush().unwrap();
    let mut boards: Vec<BoardId> = (1..=3_000).map(|b| BoardId::new(b).unwrap()).collect();
    boards.shuffle(&mut ChaCha8Rng::seed_from_u64(4));
    boards.truncate(300);
    let ids: u64 = shard.board_pins_many(&boards).unwrap().iter().map(RoaringBitmap::len).sum();
    let mut group = c.benchmark_group("read_300_bitmaps");
    group.throughput(Throughput::Elements(ids));
    group.bench_function("rocksdb", |b| b.iter(|| black_box(shard.board_pins_many(&boards).unwrap())));
    group.bench_function("cached", |b| b.iter(|| black_box(shard.board_pins_cached(&boards).unwrap())));
    group.finish();
}

/// 100 writes of 1,000 pins (owners 1..=500, each with a board, one to three topics).
fn replication_writes() -> (Vec<Mutation>, Vec<Vec<Mutation>>) {
    let uid = |o: u64| UserId::new(o).unwrap();
    let boards = (1..=500u64)
        .map(|o| {
            Mutation::UpsertBoard(Board { id: BoardId::new(o).unwrap(), owner: uid(o), name: "b".into() })
        })
        .collect();
    let writes = (0..100u64)
        .map(|w| {
            (0..1_000u64)
                .map(|i| {
                    let id = 1 + w * 1_000 + i;
                    let o = 1 + id % 500;
                    Mutation::UpsertPin(Pin {
                        id: PinId::new(id).unwrap(),
                        owner: uid(o),
                        board: BoardId::new(o).unwrap(),
                        created_at_ms: 1_800_000_000_000 - id as i64 * 1000,
                        topics: (0..1 + id % 3)
                            .map(|t| TopicId::new(1 + ((id + t) % 50) as u32).unwrap())
                            .collect(),
                        signals: PinSignals { quality: 0.5, saves: (id % 90) as u32, clicks: 1, closeups: 2 },
                    })
                })
                .collect()
        })
        .collect();
    (boards, writes)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn bench_replicate(c: &mut Criterion) {
    let (boards, writes) = replication_writes();
    // The leader's log of the writes, and a replica's starting point (a checkpoint
    // taken before them).
    let dir = tempfile::tempdir().unwrap();
    let leader = Shard::open(dir.path().join("leader"), &ShardOptions::new(0)).unwrap();
    leader.lead(1).unwrap();
    leader.write(&boards, Durability::Buffered).unwrap();
    leader.checkpoint(dir.path().join("base")).unwrap();
    let since = leader.latest_sequence();
    for w in &writes {
        leader.write(w, Durability::Buffered).unwrap();
    }
    let batches: Vec<WalBatch> = leader.updates_since(since, usize::MAX).unwrap();
    let bytes: u64 = batches.iter().map(|b| b.data.len() as u64).sum();
    assert_eq!(batches.len(), writes.len());
    drop(leader);

    let mut group = c.benchmark_group("replicate_100k_pins");
    group.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Bytes(bytes));
    group.bench_function("follower_apply", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let copy = tempfile::tempdir().unwrap();
                copy_dir(&dir.path().join("base"), copy.path());
                let replica = Shard::open_replica(copy.path(), &ShardOptions::new(0)).unwrap();
                let start = Instant::now();
                // As a follower receives them: about 4 MiB (32 batches) per answer.
                for answer in batches.chunks(32) {
                    replica.apply_replicated(answer).unwrap();
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.bench_function("leader_write", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let copy = tempfile::tempdir().unwrap();
                copy_dir(&dir.path().join("base"), copy.path());
                let shard = Shard::open(copy.path(), &ShardOptions::new(0)).unwrap();
                let start = Instant::now();
                for w in &writes {
                    shard.write(w, Durability::Buffered).unwrap();
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench_union, bench_bitmap_reads, bench_bulk_load, bench_replicate);
criterion_main!(benches);
