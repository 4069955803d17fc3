//! Shard store benchmarks (release profile):
//! - `bulk_load`: edges written per second by the chunked bulk loader;
//! - `union_500`: a 500-way union of board bitmaps of 1,000 time-ordered ordinals each
//!   (roaring `MultiOps` against a `|=` fold);
//! - `read_300_bitmaps`: the board bitmaps of 300 followed boards, from RocksDB and
//!   through the decoded-bitmap cache.
//!
//! The shard-side scan (filters, newest-first, light score, top-K) is benchmarked where
//! it lives: `retrieval/benches/query.rs`. Run: `./dev bench --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use feedgraph_graph_store::{BulkLoad, Shard, ShardOptions};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_model::BoardId;
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

criterion_group!(benches, bench_union, bench_bitmap_reads, bench_bulk_load);
criterion_main!(benches);
