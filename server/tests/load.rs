//! `feedgraph-load`'s engine and scenarios against a real service started in-process
//! on 127.0.0.1 (port 0), loaded with a small generated graph.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use feedgraph_loadtest::engine::{self, LoadModel, RunSpec};
use feedgraph_loadtest::scenario::{self, UserPicker};
use feedgraph_loadtest::{GraphSpec, generate};
use rand::SeedableRng;

fn small() -> GraphSpec {
    GraphSpec { users: 1_000, boards: 3_000, pins: 30_000, ..GraphSpec::demo(1_800_000_000_000) }
}

async fn service(spec: &GraphSpec) -> (feedgraph_server::Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = feedgraph_server::Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 4,
        ..Default::default()
    };
    // These tests check the tool's accounting, not the service's capacity: on a
    // shared machine admission control would rightly shed some requests.
    config.feed.max_rankings_queued = 1_000;
    config.feed.queue_wait_ms = 5_000;
    let shards = feedgraph_server::open_shards(&config).unwrap();
    feedgraph_server::demo::ensure_loaded(&config.data_dir, &shards, spec, &mut |_, _| {}).unwrap();
    (feedgraph_server::start_with(config, shards).await.unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_accounts_for_every_due_request() {
    let spec = small();
    let (node, _dir) = service(&spec).await;
    let client = scenario::connect(
        &node.grpc_addr().to_string(),
        Duration::from_secs(3),
        feedgraph_proto::auth::Credentials::none(),
    )
    .await
    .unwrap();
    let picker = Arc::new(UserPicker::from_graph(&generate(&spec)).unwrap());
    let run = RunSpec {
        model: LoadModel::Open { rate: 200.0, max_in_flight: 64 },
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        progress: false,
        limit: None,
    };
    let metrics = node.metrics_addr().to_string();
    let before = scenario::ServiceCounters::scrape(&metrics).await.unwrap();
    let report = engine::run(run, move |i| {
        let user = picker.pick(&mut rand_chacha::ChaCha8Rng::seed_from_u64(i));
        scenario::read_feed(client.clone(), user, i % 2 == 0, 25, None)
    })
    .await;
    let after = scenario::ServiceCounters::scrape(&metrics).await.unwrap();
    // The service answered exactly the requests the tool issued (warm-up included),
    // and used CPU doing so.
    assert_eq!(after.feed_requests - before.feed_requests, report.issued, "{report:?}");
    assert!(after.cpu_seconds > before.cpu_seconds, "{before:?} {after:?}");
    // Every request due in the measured second (200/s × 1 s) is in the histogram.
    assert!((198..=202).contains(&report.recorded), "{report:?}");
    assert_eq!(report.ok + report.errors.values().sum::<u64>(), report.sent, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.scanned_p50 > 0 && report.latency_ms.p50 > 0.0, "{report:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_viewer_with_a_larger_fanout_scans_more() {
    let spec = small();
    let (node, _dir) = service(&spec).await;
    let client = scenario::connect(
        &node.grpc_addr().to_string(),
        Duration::from_secs(3),
        feedgraph_proto::auth::Credentials::none(),
    )
    .await
    .unwrap();
    let mut scanned = Vec::new();
    for fanout in [10, 500] {
        let viewer = 1_000_000_000 + fanout;
        scenario::set_fanout(&client, viewer, fanout, spec.users).await.unwrap();
        let outcome = scenario::read_feed(client.clone(), viewer, false, 10, None).await;
        assert!(outcome.error.is_none(), "{outcome:?}");
        scanned.push(outcome.scanned);
    }
    println!("scanned at fanout 10 and 500: {scanned:?}");
    assert!(scanned[1] > 5 * scanned[0], "{scanned:?}");
    assert!(scenario::set_fanout(&client, 7, 5_000, spec.users).await.is_err(), "more follows than users");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_target_is_a_clear_error_before_any_load() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = scenario::connect(
        &format!("127.0.0.1:{port}"),
        Duration::from_secs(2),
        feedgraph_proto::auth::Credentials::none(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("cannot reach a feedgraph service"), "{err:#}");
}
