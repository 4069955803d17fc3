//! The following feed through an etcd-managed 3-node cluster against a single node
//! (`feedgraph serve` without `--cluster`) holding the same data.
//!
//! Both are loaded the same way, through gRPC with the load tool's ingest (the demo
//! graph with `FEEDGRAPH_BENCH_PINS` pins, default 200,000), then read with the load
//! tool's open-loop engine at `FEEDGRAPH_BENCH_RATE` feeds/s (default 100) for
//! `FEEDGRAPH_BENCH_SECONDS` per run (default 15), viewers drawn by activity as
//! `feedgraph-load following` draws them. The cluster is read through its three nodes
//! in turn, as a load balancer in front of it would. Runs alternate single, cluster,
//! three times each (this machine's speed drifts between minutes), and the report ends
//! with the median of the cluster's p99s over the median of the single node's.
//!
//! Clusters of replication factor 3 (the default: every node holds every shard, so a
//! broker reads its own replicas) and 1 (two thirds of each feed's shards are on other
//! nodes: the scatter crosses the network) are measured in turn
//! (`FEEDGRAPH_BENCH_REPLICAS`, default `3,1`). Below R = 3 a second cluster, whose
//! brokers ask remote shards one request each (`feed.batch_remote_queries = false`),
//! runs alongside: before and after one request per node, in one run. Every node runs
//! on a runtime of its own with 2 workers, in this process, on this machine's 2 cores.
//!
//! Run: `./dev bench --bench cluster` (under `cargo test` a small version runs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::sync::Arc;
use std::time::Duration;

use feedgraph_loadtest::engine::{self, LoadModel, Report, RunSpec};
use feedgraph_loadtest::scenario::{self, Client, UserPicker};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_tests::managed::{ManagedCluster, start_on_own_runtime};
use feedgraph_tests::{free_ports, node_config};
use rand::SeedableRng;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Settings a user runs with (the test harness lifts the per-owner caps), and a block
/// cache that holds the data.
fn tweak(config: &mut feedgraph_server::Config) {
    let defaults = feedgraph_server::Config::default();
    config.feed = defaults.feed;
    config.replication.poll_wait_ms = defaults.replication.poll_wait_ms;
    config.store.block_cache_mb = 128;
}

async fn connect(addr: &str) -> Client {
    scenario::connect(addr, Duration::from_secs(5), feedgraph_tests::admin_credentials()).await.unwrap()
}

async fn ingest(addr: &str, batches: Vec<(Vec<feedgraph_proto::pb::v1::Mutation>, u64)>) {
    let total = batches.len() as u64;
    let report = scenario::ingest(connect(addr).await, batches, 4, false).await;
    assert_eq!(report.ok, total, "ingest into {addr}: {:?}", report.errors);
}

/// One open-loop run of following-feed reads spread over `addrs`.
async fn read(addrs: &[String], picker: Arc<UserPicker>, rate: f64, seconds: u64) -> Report {
    let mut clients = Vec::new();
    for a in addrs {
        clients.push(connect(a).await);
    }
    let spec = RunSpec {
        model: LoadModel::Open { rate, max_in_flight: 256 },
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(seconds),
        timeout: Duration::from_secs(5),
        progress: false,
        limit: None,
    };
    let report = engine::run(spec, move |i| {
        let user = picker.pick(&mut rand_chacha::ChaCha8Rng::seed_from_u64(i));
        let client = clients[i as usize % clients.len()].clone();
        scenario::read_feed(client, user, false, 25, None)
    })
    .await;
    assert!(report.errors.is_empty() && report.partial == 0, "failed or partial reads: {report:?}");
    report
}

fn line(name: &str, r: &Report) {
    let l = &r.ok_latency_ms;
    println!(
        "  {name:<26} {:>6} ok  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  ({} candidates scanned per feed, median)",
        r.ok, l.p50, l.p90, l.p99, l.max, r.scanned_p50
    );
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let pins = env_or("FEEDGRAPH_BENCH_PINS", if full { 200_000 } else { 10_000 });
    let rate = env_or("FEEDGRAPH_BENCH_RATE", 100.0);
    let seconds = env_or("FEEDGRAPH_BENCH_SECONDS", if full { 15 } else { 1 });
    let factors: Vec<u32> = env_or("FEEDGRAPH_BENCH_REPLICAS", if full { "3,1" } else { "3" }.to_owned())
        .split(',')
        .map(|r| r.trim().parse().expect("FEEDGRAPH_BENCH_REPLICAS: replication factors, e.g. 3,1"))
        .collect();
    let rounds = if full { 3 } else { 1 };
    let shards = 16;
    let driver = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let graph = generate(&GraphSpec { pins, ..GraphSpec::demo(now_ms) });
    let picker = Arc::new(UserPicker::from_graph(&graph).unwrap());
    let batches = scenario::write_batches(graph, 1000);

    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut config = node_config(dir.path(), "single", &listen, shards);
    tweak(&mut config);
    let (single_runtime, single) = start_on_own_runtime(config).unwrap();
    driver.block_on(ingest(&listen, batches.clone()));
    let single_addrs = vec![listen];
    println!("following feed, {pins} demo pins, {rate} feeds/s for {seconds} s per run:");

    for r in factors {
        let ids = ["a", "b", "c"];
        // Batched (the default), then, with remote shards, one request per shard.
        let variants: &[bool] = if r < 3 { &[true, false] } else { &[true] };
        let mut clusters = Vec::new();
        for &batched in variants {
            let cluster = ManagedCluster::start(&ids, shards, r, |_, c| {
                tweak(c);
                c.feed.batch_remote_queries = batched;
            });
            driver.block_on(cluster.converged(Duration::from_secs(120)));
            driver.block_on(ingest(&cluster.addr("a"), batches.clone()));
            driver.block_on(cluster.caught_up(Duration::from_secs(300)));
            let addrs: Vec<String> = ids.iter().map(|n| cluster.addr(n)).collect();
            let name =
                if batched { format!("3-node cluster, R = {r}") } else { "  one request per shard".into() };
            clusters.push((name, addrs, cluster, Vec::new()));
        }
        let mut singles = Vec::new();
        for _ in 0..rounds {
            let s = driver.block_on(read(&single_addrs, picker.clone(), rate, seconds));
            line("single node", &s);
            singles.push(s.ok_latency_ms.p99);
            for (name, addrs, _, p99s) in &mut clusters {
                let c = driver.block_on(read(addrs, picker.clone(), rate, seconds));
                line(name, &c);
                p99s.push(c.ok_latency_ms.p99);
            }
        }
        let s = median(singles);
        for (name, _, mut cluster, p99s) in clusters {
            let c = median(p99s);
            println!("  {}: median p99 {c:.2} ms / single node {s:.2} ms = {:.2}×", name.trim(), c / s);
            for id in ids {
                cluster.stop(id);
            }
        }
    }
    single_runtime.block_on(single.shutdown()).unwrap();
    single_runtime.shutdown_timeout(Duration::from_secs(5));
}
