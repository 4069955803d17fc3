//! The shard-side candidate query (`query::run`) on one shard of 300k pins on 3,000
//! boards (the `feedgraph-load` generator): the viewer follows 300 boards (~30k
//! candidates); 1% of pins deleted, 1% spam, 1,000 seen. OR of the bitmaps, AND-NOT
//! filters and seen, newest-first scan bounded at 20k, the default light score, top 500.
//! - `following`: followed boards only;
//! - `home`: plus 5 followed topics (interest candidates in their own top-K);
//! - `recent_top100`: newest first (`-age_hours`), top 100 (a progressive first page);
//! - `following_20_boards`, `recent_top100_20_boards`: the same with 20 followed boards,
//!   a shard's part of a demo viewer's feed (~2k candidates), merged as the scan goes;
//! - `recent_top100_20_boards_union`: the same page from the materialized union.
//!
//! Run: `./dev bench --bench query`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use feedgraph_graph_store::{BulkLoad, Shard, ShardOptions};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_model::{BoardId, Durability, Mutation, PinFlag, PinRef, TopicId, UserId};
use feedgraph_retrieval::query::{self, CandidateQuery};
use feedgraph_scoring::Expr;
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand_chacha::ChaCha8Rng;

const NOW_MS: i64 = 1_800_000_000_000;

fn bench_query(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    let g = generate(&GraphSpec {
        users: 750,
        boards: 3_000,
        pins: 300_000,
        celebrities: 5,
        ..GraphSpec::demo(NOW_MS)
    });
    let refs: Vec<PinRef> = g.pins.iter().map(|p| PinRef { pin: p.id, owner: p.owner }).collect();
    shard
        .bulk_load(
            BulkLoad { users: g.users, boards: g.boards, pins: g.pins, follows: g.follows },
            100_000,
            &mut |_| {},
        )
        .unwrap();
    let viewer = UserId::new(999_999).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut muts: Vec<Mutation> = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        match i % 100 {
            0 => muts.push(Mutation::DeletePin(*r)),
            1 => muts.push(Mutation::FlagPin { pin: *r, flag: PinFlag::Spam, on: true }),
            _ => {}
        }
    }
    muts.push(Mutation::RecordImpressions {
        user: viewer,
        pins: refs.choose_multiple(&mut rng, 1_000).copied().collect(),
    });
    shard.write(&muts, Durability::Buffered).unwrap();
    shard.flush().unwrap();
    let mut boards: Vec<BoardId> = (1..=3_000).map(|b| BoardId::new(b).unwrap()).collect();
    boards.shuffle(&mut rng);
    boards.truncate(300);

    let expr = Arc::new(Expr::compile("2*quality + 0.3*ln(1 + saves) - age_hours/48").unwrap());
    let following = CandidateQuery {
        viewer,
        users: vec![],
        boards,
        topics: vec![],
        engaged_topics: vec![],
        blocked: vec![],
        top_k: 500,
        scan_limit: 20_000,
        expr,
        request_values: vec![],
        now_ms: NOW_MS,
        ordinal_bound: None,
        full_scan: false,
    };
    let home =
        CandidateQuery { topics: (1..=5).map(|t| TopicId::new(t).unwrap()).collect(), ..following.clone() };
    let run = |q: &CandidateQuery| query::run(&shard, q, &query::ScanControl::unbounded()).unwrap();
    let full = CandidateQuery { full_scan: true, ..following.clone() };
    let recent = CandidateQuery {
        top_k: 100,
        expr: Arc::new(Expr::compile("-age_hours").unwrap()),
        ..following.clone()
    };
    let home_full = CandidateQuery { full_scan: true, ..home.clone() };
    // A shard's part of a demo feed: ~20 followed sources there, ~2k candidates
    // (merged as the scan goes, not materialized).
    let few = CandidateQuery { boards: following.boards[..20].to_vec(), ..following.clone() };
    let few_recent = CandidateQuery { boards: few.boards.clone(), ..recent.clone() };
    // The same page from the materialized union: a scan limit below the sources' ~2k
    // candidates rules the merge out, and the newest 100 are well within it.
    let few_recent_union = CandidateQuery { scan_limit: 1_500, ..few_recent.clone() };
    assert_eq!(run(&few_recent).following, run(&few_recent_union).following);
    let answer = run(&following);
    assert_eq!(answer.following.len(), 500);
    // Skipping blocks changes the work, never the answer.
    assert_eq!(answer.following, run(&full).following);
    assert_eq!(run(&home).interest, run(&home_full).interest);

    let mut group = c.benchmark_group("query_top500");
    for (name, q) in [
        ("following", &following),
        ("following_full_scan", &full),
        ("home", &home),
        ("home_full_scan", &home_full),
        ("recent_top100", &recent),
        ("following_20_boards", &few),
        ("recent_top100_20_boards", &few_recent),
        ("recent_top100_20_boards_union", &few_recent_union),
    ] {
        group.bench_function(name, |b| b.iter(|| black_box(run(q))));
        println!("{name}: {} candidates scored", run(q).scanned);
    }
    group.finish();
}

criterion_group!(benches, bench_query);
criterion_main!(benches);
