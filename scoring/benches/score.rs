//! `ScoreBatch` of 1,000 items × 32 features on one core, for both committed models:
//! the in-process cost (feature assembly + model). The gRPC round trip is measured by
//! `server/benches/feed.rs` (`scorer_grpc`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use feedgraph_scoring::Registry;

fn score(c: &mut Criterion) {
    let (registry, _) = Registry::open(common::models_dir()).unwrap();
    let mut group = c.benchmark_group("score_batch_1000x32");
    for model in ["engagement_mlp", "engagement_gbdt"] {
        let batch = common::big_batch(model, 1000);
        assert_eq!(registry.score(&batch).unwrap().scores.len(), 1000);
        group.bench_function(model, |b| b.iter(|| registry.score(&batch).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, score);
criterion_main!(benches);
