//! Following-feed latency on the demo graph (1M pins, 16 shards) for a viewer who
//! follows 200 users and 100 boards (~30k candidates), light scoring only:
//! - `following_feed/in_process`: the broker called directly;
//! - `following_feed/grpc`: the same through gRPC on 127.0.0.1;
//! - `following_feed/in_process_mlp` and `/in_process_gbdt`: the broker of a second node
//!   over the same shards that re-ranks the best 500 candidates with the bundled model
//!   (embedded scorer): the cost of ML ranking on top of retrieval.
//!
//! Each request is a first page (the whole ranking is computed). Under `cargo bench`
//! a second pass sends 2,000 sequential requests per path and prints p50/p90/p99/max.
//! Run: `./dev bench --bench feed`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use feedgraph_loadtest::GraphSpec;
use feedgraph_model::{BoardId, FeedRequest, FollowTarget, Mutation, UserId};
use feedgraph_proto::pb::v1 as pb;
use feedgraph_retrieval::FeedKind;
use feedgraph_server::{Config, Node};

const VIEWER: u64 = 10_001;
const NOW_MS: i64 = 1_800_000_000_000;

struct Fixture {
    rt: tokio::runtime::Runtime,
    node: Node,
    /// Same shards, re-ranking with a model: (name, node).
    model_nodes: Vec<(&'static str, Node)>,
    client: pb::feed_service_client::FeedServiceClient<tonic::transport::Channel>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let spec = GraphSpec::demo(NOW_MS);
    let shards = feedgraph_server::open_shards(&config).unwrap();
    feedgraph_server::demo::ensure_loaded(&config.data_dir, &shards, &spec, &mut |_, _| {}).unwrap();
    let models = dir.path().join("models");
    feedgraph_server::demo::ensure_models(&models).unwrap();
    let model_nodes = ["engagement_mlp", "engagement_gbdt"]
        .into_iter()
        .map(|model| {
            let mut c = config.clone();
            c.scorer.model_dir = Some(models.clone());
            c.scorer.model = model.into();
            c.scorer.deadline_ms = 1_000;
            (model, rt.block_on(feedgraph_server::start_with(c, shards.clone())).unwrap())
        })
        .collect();
    let node = rt.block_on(feedgraph_server::start_with(config, shards)).unwrap();
    // The viewer follows 200 users spread over the id space and 100 boards.
    let viewer = UserId::new(VIEWER).unwrap();
    let mut follows: Vec<Mutation> = (0..200u64)
        .map(|k| Mutation::Follow {
            follower: viewer,
            target: FollowTarget::User(UserId::new(100 + k * 49).unwrap()),
        })
        .collect();
    let graph = feedgraph_loadtest::generate(&GraphSpec { pins: 0, ..spec });
    for b in graph.boards.iter().step_by(graph.boards.len() / 100).take(100) {
        follows.push(Mutation::Follow {
            follower: viewer,
            target: FollowTarget::Board { board: BoardId::new(b.id.get()).unwrap(), owner: b.owner },
        });
    }
    rt.block_on(node.broker().write(follows, feedgraph_model::Ack::Async)).unwrap();
    let client = rt
        .block_on(pb::feed_service_client::FeedServiceClient::connect(format!("http://{}", node.grpc_addr())))
        .unwrap();
    Fixture { rt, node, model_nodes, client, _dir: dir }
}

fn domain_request() -> FeedRequest {
    FeedRequest {
        user: UserId::new(VIEWER).unwrap(),
        page_size: NonZeroU32::new(25).unwrap(),
        cursor: None,
        ranking: None,
        features: Default::default(),
    }
}

fn grpc_request() -> pb::FeedRequest {
    pb::FeedRequest { user_id: VIEWER, page_size: 25, ..Default::default() }
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

fn bench_feed(c: &mut Criterion) {
    let mut f = fixture();
    let page = f.rt.block_on(f.node.broker().feed(FeedKind::Following, &domain_request())).unwrap();
    println!(
        "viewer {VIEWER}: {} candidates scanned on {}/{} shards, {} items on the first page",
        page.stats.candidates_scanned,
        page.stats.shards_answered,
        page.stats.shards_asked,
        page.items.len()
    );
    assert!(!page.stats.partial && !page.items.is_empty());

    let mut group = c.benchmark_group("following_feed");
    group.sample_size(50).measurement_time(Duration::from_secs(10));
    group.bench_function("in_process", |b| {
        b.iter(|| f.rt.block_on(f.node.broker().feed(FeedKind::Following, &domain_request())).unwrap())
    });
    group.bench_function("grpc", |b| {
        b.iter(|| f.rt.block_on(f.client.get_following_feed(grpc_request())).unwrap())
    });
    for (model, node) in &f.model_nodes {
        let page = f.rt.block_on(node.broker().feed(FeedKind::Following, &domain_request())).unwrap();
        assert_eq!(page.stats.scoring, feedgraph_retrieval::Scoring::Model, "{model}");
        let name = format!("in_process_{}", model.trim_start_matches("engagement_"));
        group.bench_function(name, |b| {
            b.iter(|| f.rt.block_on(node.broker().feed(FeedKind::Following, &domain_request())).unwrap())
        });
    }
    group.finish();

    if std::env::args().any(|a| a == "--bench") {
        let mut in_process = Vec::with_capacity(2_000);
        let mut grpc = Vec::with_capacity(2_000);
        let mut model = Vec::with_capacity(2_000);
        for _ in 0..2_000 {
            let t = Instant::now();
            f.rt.block_on(f.node.broker().feed(FeedKind::Following, &domain_request())).unwrap();
            in_process.push(t.elapsed());
            let t = Instant::now();
            f.rt.block_on(f.client.get_following_feed(grpc_request())).unwrap();
            grpc.push(t.elapsed());
            let t = Instant::now();
            f.rt.block_on(f.model_nodes[0].1.broker().feed(FeedKind::Following, &domain_request())).unwrap();
            model.push(t.elapsed());
        }
        percentiles("following_feed/in_process", in_process);
        percentiles("following_feed/grpc", grpc);
        percentiles("following_feed/in_process_mlp", model);
    }
    let Fixture { rt, node, model_nodes, .. } = f;
    for (_, n) in model_nodes {
        rt.block_on(n.shutdown()).unwrap();
    }
    rt.block_on(node.shutdown()).unwrap();
}

criterion_group!(benches, bench_feed);
criterion_main!(benches);
