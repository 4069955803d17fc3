//! `ScoreBatch` of 1,000 items × 32 features (16 item + 16 user) for the two bundled
//! models, through the standalone scorer's gRPC on 127.0.0.1 and in-process (the same
//! registry the service uses). Scoring runs on one blocking thread per request. Under
//! `cargo bench` a second pass sends 2,000 sequential requests per path and prints
//! p50/p90/p99/max. Run: `./dev bench --bench scorer`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use feedgraph_proto::pb::internal as ipb;
use feedgraph_retrieval::features::ITEM_FEATURES;
use feedgraph_scoring::{LocalScorer, ScoreBatch};
use rand::{Rng, SeedableRng};

fn batch(model: &str) -> ScoreBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let user_features = feedgraph_loadtest::user_context(feedgraph_model::UserId::new(1).unwrap(), 1)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as f32))
        .chain(
            feedgraph_retrieval::features::CONTEXT_FEATURES
                .iter()
                .map(|k| (k.to_string(), rng.random_range(0.0..300.0f32))),
        )
        .collect();
    let item_ids: Vec<u64> = (0..1000).collect();
    let values = item_ids
        .iter()
        .flat_map(|&id| {
            (0..ITEM_FEATURES.len())
                .map(|k| match k {
                    0 => rng.random::<f32>(),
                    8..=11 | 13 => f32::from(u8::from(rng.random::<bool>())),
                    12 => id as f32,
                    _ => rng.random_range(0.0..2000.0),
                })
                .collect::<Vec<f32>>()
        })
        .collect();
    ScoreBatch {
        model: model.into(),
        user_features,
        feature_names: ITEM_FEATURES.iter().map(|s| s.to_string()).collect(),
        item_ids,
        values,
    }
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at =
        |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        samples.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

fn bench_scorer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    feedgraph_server::demo::ensure_models(dir.path()).unwrap();
    let node = rt
        .block_on(feedgraph_server::scorer::start_scorer(feedgraph_server::ScorerServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            model_dir: dir.path().to_path_buf(),
            ..Default::default()
        }))
        .unwrap();
    // The client the broker uses (flow-control windows sized for 1,000-item batches).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr()))
        .unwrap()
        .tcp_nodelay(true)
        .initial_stream_window_size(feedgraph_server::STREAM_WINDOW)
        .initial_connection_window_size(feedgraph_server::CONNECTION_WINDOW);
    let mut client =
        ipb::scorer_service_client::ScorerServiceClient::new(rt.block_on(channel.connect()).unwrap());
    let local = LocalScorer::new(node.registry().clone(), 2000);
    let mut group = c.benchmark_group("score_batch_1000x32");
    let models = ["engagement_mlp", "engagement_gbdt"];
    for model in models {
        let b = batch(model);
        let p = feedgraph_server::scorer::to_proto(b.clone());
        assert_eq!(local.score_blocking(&b).unwrap().scores.len(), 1000);
        group.bench_function(format!("{model}/in_process"), |bench| {
            bench.iter(|| local.score_blocking(&b).unwrap())
        });
        group.bench_function(format!("{model}/grpc"), |bench| {
            bench.iter(|| rt.block_on(client.score_batch(p.clone())).unwrap())
        });
    }
    group.finish();

    if std::env::args().any(|a| a == "--bench") {
        // The transport alone: the same request to a model that is not served is
        // decoded and refused without scoring.
        let mut absent = feedgraph_server::scorer::to_proto(batch("absent"));
        let mut transport = Vec::with_capacity(2_000);
        for _ in 0..2_000 {
            let t = Instant::now();
            assert!(rt.block_on(client.score_batch(absent.clone())).is_err());
            transport.push(t.elapsed());
        }
        percentiles("score_batch_1000x32/transport_only", transport);
        absent.item_ids.truncate(1);
        absent.values.truncate(ITEM_FEATURES.len());
        let mut transport = Vec::with_capacity(2_000);
        for _ in 0..2_000 {
            let t = Instant::now();
            assert!(rt.block_on(client.score_batch(absent.clone())).is_err());
            transport.push(t.elapsed());
        }
        percentiles("score_batch_1x32/transport_only", transport);
        for model in models {
            let b = batch(model);
            let p = feedgraph_server::scorer::to_proto(b.clone());
            let (mut local_t, mut grpc_t) = (Vec::with_capacity(2_000), Vec::with_capacity(2_000));
            for _ in 0..2_000 {
                let t = Instant::now();
                local.score_blocking(&b).unwrap();
                local_t.push(t.elapsed());
                let t = Instant::now();
                rt.block_on(client.score_batch(p.clone())).unwrap();
                grpc_t.push(t.elapsed());
            }
            percentiles(&format!("score_batch_1000x32/{model}/in_process"), local_t);
            percentiles(&format!("score_batch_1000x32/{model}/grpc"), grpc_t);
        }
    }
    rt.block_on(node.shutdown()).unwrap();
}

criterion_group!(benches, bench_scorer);
criterion_main!(benches);
