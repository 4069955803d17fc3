//! Shard store benchmarks (release profile):
//! - `bulk_load`: edges written per second by the chunked bulk loader;
//! - `union_500`: a 500-way union of board bitmaps of 1,000 time-ordered ordinals each
//!   (roaring `MultiOps` against a `|=` fold);
//! - `scan_top500`: OR of 300 followed boards' bitmaps (~30k candidates), AND-NOT the
//!   filter and seen bitmaps, newest-first scan with a work bound, light score from the
//!   in-memory attributes, top 500 — with and without the RocksDB bitmap reads.
//!
//! Run: `cargo bench --workspace --bench store` (see README, Performance).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use feedgraph_graph_store::{BulkLoad, FilterKind, Shard, ShardOptions};
use feedgraph_model::{BoardId, Durability, Mutation, PinFlag, PinId, PinRef, UserId};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;
use roaring::{MultiOps, RoaringBitmap};

#[path = "../examples/sample/mod.rs"]
mod sample;
use sample::{population, scan_top_k};

fn edges_of(load: &BulkLoad) -> u64 {
    load.pins.iter().map(|p| 2 + p.topics.len() as u64).sum::<u64>() + load.follows.len() as u64
}

fn bench_bulk_load(c: &mut Criterion) {
    let load = population(200_000, 4_000, 1);
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

struct QueryFixture {
    _dir: tempfile::TempDir,
    shard: Shard,
    followed: Vec<BoardId>,
    viewer: UserId,
}

/// 300k pins on 3,000 boards (~100 each); the viewer follows 300 boards (~30k
/// candidates); 1% deleted, 1% spam, 1,000 pins seen.
fn query_fixture() -> QueryFixture {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    let load = population(300_000, 3_000, 3);
    let pins: Vec<(PinId, UserId)> = load.pins.iter().map(|p| (p.id, p.owner)).collect();
    shard.bulk_load(load, 50_000, &mut |_| {}).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let viewer = UserId::new(999_999).unwrap();
    let mut muts = Vec::new();
    for (i, (pin, owner)) in pins.iter().enumerate() {
        let r = PinRef { pin: *pin, owner: *owner };
        match i % 100 {
            0 => muts.push(Mutation::DeletePin(r)),
            1 => muts.push(Mutation::FlagPin { pin: r, flag: PinFlag::Spam, on: true }),
            _ => {}
        }
    }
    let seen: Vec<PinRef> = pins
        .choose_multiple(&mut rng, 1_000)
        .map(|(pin, owner)| PinRef { pin: *pin, owner: *owner })
        .collect();
    muts.push(Mutation::RecordImpressions { user: viewer, pins: seen });
    shard.write(&muts, Durability::Buffered).unwrap();
    shard.flush().unwrap();
    let mut boards: Vec<u64> = (1..=3_000).collect();
    boards.shuffle(&mut rng);
    let followed = boards[..300].iter().map(|b| BoardId::new(*b).unwrap()).collect();
    QueryFixture { _dir: dir, shard, followed, viewer }
}

fn candidates(f: &QueryFixture) -> RoaringBitmap {
    let s = &f.shard;
    let mut candidates = s.board_pins_many(&f.followed).unwrap().iter().union();
    for kind in FilterKind::ALL {
        candidates -= s.filter(kind).unwrap();
    }
    candidates -= s.seen(f.viewer).unwrap();
    candidates
}

fn bench_scan(c: &mut Criterion) {
    let f = query_fixture();
    let union_len = f.shard.board_pins_many(&f.followed).unwrap().iter().union().len();
    let mut group = c.benchmark_group("scan_top500");
    group.throughput(Throughput::Elements(union_len));
    group.bench_function("in_memory", |b| {
        b.iter_batched(
            || {
                let filters: Vec<RoaringBitmap> =
                    FilterKind::ALL.iter().map(|k| f.shard.filter(*k).unwrap()).collect();
                (f.shard.board_pins_many(&f.followed).unwrap(), filters, f.shard.seen(f.viewer).unwrap())
            },
            |(bitmaps, filters, seen)| {
                let mut cand = bitmaps.iter().union();
                for filter in &filters {
                    cand -= filter;
                }
                cand -= seen;
                let attrs = f.shard.attributes();
                black_box(scan_top_k(&cand, &attrs, 20_000, 500))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("with_store_reads", |b| {
        b.iter(|| {
            let cand = candidates(&f);
            let attrs = f.shard.attributes();
            black_box(scan_top_k(&cand, &attrs, 20_000, 500))
        })
    });
    group.finish();
    let top = scan_top_k(&candidates(&f), &f.shard.attributes(), 20_000, 500);
    assert_eq!(top.len(), 500);
}

criterion_group!(benches, bench_union, bench_scan, bench_bulk_load);
criterion_main!(benches);
