//! Replication and remote shards, measured on real nodes over loopback gRPC:
//!
//! 1. Follower apply throughput: a follower that was offline while its leader took
//!    the demo graph (bulk-load batches), then 1,000-pin writes, catches up; WAL MB/s.
//! 2. Replication lag at half the measured small-batch rate: per write, the time from
//!    the leader's commit to the follower having applied it; average of the per-second
//!    maxima ("average max lag"), p50, p99.
//! 3. Write latency, one pin per write through gRPC: `ACK_ASYNC` against
//!    `ACK_SEMI_SYNC`, interleaved in one run.
//! 4. The following feed through gRPC from a broker whose 16 shards are all remote (two
//!    nodes of eight leaders) against the single-node service, interleaved.
//!
//! Run: `./dev bench --bench replication` (under `cargo test` a small version runs).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use feedgraph_cluster::Role;
use feedgraph_graph_store::Shard;
use feedgraph_loadtest::GraphSpec;
use feedgraph_model::{BoardId, Durability, Mutation, Pin, PinId, PinSignals, UserId, shard_of};
use feedgraph_proto::pb::v1 as pb;
use feedgraph_tests::{Cluster, muts};
use hdrhistogram::Histogram;

const NOW_MS: i64 = 1_800_000_000_000;

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        h.len(),
        ms(h, 0.5),
        ms(h, 0.9),
        ms(h, 0.99),
        h.max() as f64 / 1000.0
    );
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn stores(c: &Cluster, node: &str, shards: std::ops::Range<u32>) -> Vec<Arc<Shard>> {
    shards.map(|s| c.node(node).replicas().get(s).unwrap().store().unwrap()).collect()
}

fn applied_bytes(c: &Cluster, node: &str) -> u64 {
    c.node(node).replicas().status().iter().map(|s| s.applied_bytes_total).sum()
}

async fn follow_all(c: &Cluster, node: &str, shards: u32, epoch: u64) {
    let leader = c.addr("a");
    for s in 0..shards {
        c.transition(node, s, Role::Follower { leader: leader.clone(), epoch }).await.unwrap();
    }
}

async fn pause_all(c: &Cluster, node: &str, shards: u32) {
    for s in 0..shards {
        c.transition(node, s, Role::Offline).await.unwrap();
    }
}

fn rebuilds(c: &Cluster, node: &str) -> u64 {
    c.node(node).replicas().status().iter().map(|s| s.rebuilds).sum()
}

/// Lets the follower catch up from the log alone (no checkpoint); returns (WAL bytes
/// applied, seconds).
async fn catch_up(c: &Cluster, shards: u32) -> (u64, f64) {
    let before = applied_bytes(c, "b");
    let rebuilt = rebuilds(c, "b");
    let started = Instant::now();
    follow_all(c, "b", shards, 1).await;
    for s in 0..shards {
        c.caught_up("a", &["b"], s, Duration::from_secs(900)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(rebuilds(c, "b"), rebuilt, "the follower was rebuilt instead of fed the log");
    (applied_bytes(c, "b") - before, secs)
}

fn pin(id: u64, shards: u32, users: u64) -> (u32, Pin) {
    let owner = UserId::new(1 + id % users).unwrap();
    let p = Pin {
        id: PinId::new(id).unwrap(),
        owner,
        board: BoardId::new(1_000_000_000 + owner.get()).unwrap(),
        created_at_ms: NOW_MS - (id as i64 % 86_400_000),
        topics: vec![feedgraph_model::TopicId::new(1 + (id % 50) as u32).unwrap()],
        signals: PinSignals { quality: 0.5, saves: (id % 100) as u32, clicks: 1, closeups: 2 },
    };
    (shard_of(owner, shards), p)
}

/// Replication lag with the leader writing `rate` bytes/s of WAL in writes of 100 pins,
/// open loop: from each write's commit on the leader to the follower's commit of it
/// (its commit notifications; no polling).
async fn lag(
    c: &Cluster,
    leader: &[Arc<Shard>],
    rate: f64,
    bytes_per_pin: f64,
    users: u64,
    first_id: u64,
    duration: Duration,
) {
    const SHARDS: u32 = 4;
    let leader = leader.to_vec();
    let pins_per_write = 100u64;
    let writes_per_sec = (rate / (bytes_per_pin * pins_per_write as f64)).max(1.0);
    // Every commit of the follower, (shard, sequence, when), from its notifications.
    let (applied_tx, mut applied_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut watchers = Vec::new();
    for s in 0..SHARDS as usize {
        let mut commits = c.node("b").replicas().get(s as u32).unwrap().commits();
        let tx = applied_tx.clone();
        watchers.push(tokio::spawn(async move {
            while commits.changed().await.is_ok() {
                let seq = *commits.borrow_and_update();
                let _ = tx.send((s, seq, Instant::now()));
            }
        }));
    }
    let l = leader;
    let written = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut id = first_id;
        let mut out = Vec::new();
        while started.elapsed() < duration {
            let due = started + Duration::from_secs_f64(out.len() as f64 / writes_per_sec);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // One shard per write: every pin of it has the first pin's owner.
            let owner = UserId::new(1 + id % users).unwrap();
            let s = shard_of(owner, SHARDS) as usize;
            let muts: Vec<Mutation> = (0..pins_per_write)
                .map(|i| {
                    let (_, mut p) = pin(id + i, SHARDS, users);
                    p.owner = owner;
                    p.board = BoardId::new(1_000_000_000 + owner.get()).unwrap();
                    Mutation::UpsertPin(p)
                })
                .collect();
            id += pins_per_write;
            let committed = l[s].write(&muts, Durability::Buffered).unwrap();
            out.push((s, committed.sequence, Instant::now()));
        }
        out
    })
    .await
    .unwrap();
    let writes = written.len();
    for s in 0..SHARDS {
        c.caught_up("a", &["b"], s, Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for w in watchers {
        w.abort();
    }
    drop(applied_tx);
    let mut applied: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); SHARDS as usize];
    while let Some((s, seq, at)) = applied_rx.recv().await {
        applied[s].push((seq, at));
    }
    // Each write's lag: to the follower's first commit that reached it.
    let lags: Vec<(Instant, u64)> = written
        .iter()
        .filter_map(|(s, seq, at)| {
            let events = &applied[*s];
            let i = events.partition_point(|(applied, _)| applied < seq);
            events.get(i).map(|(_, done)| (*at, done.saturating_duration_since(*at).as_micros() as u64))
        })
        .collect();
    assert_eq!(lags.len(), writes, "every write reached the follower");
    let mut h = histogram();
    let mut window_max: Vec<u64> = Vec::new();
    let start = lags.iter().map(|l| l.0).min();
    for (at, lag) in &lags {
        h.record((*lag).max(1)).unwrap();
        let w = start.map_or(0, |s| at.duration_since(s).as_secs() as usize);
        if window_max.len() <= w {
            window_max.resize(w + 1, 0);
        }
        window_max[w] = window_max[w].max(*lag);
    }
    let avg_max = window_max.iter().sum::<u64>() as f64 / window_max.len().max(1) as f64 / 1000.0;
    println!(
        "replication lag at {:.1} MB/s ({writes} writes of {pins_per_write} pins in {:.0} s): average max lag {avg_max:.2} ms",
        writes_per_sec * bytes_per_pin * pins_per_write as f64 / 1e6,
        duration.as_secs_f64()
    );
    report("replication lag per write", &h);
}

async fn apply_and_lag(full: bool) {
    const SHARDS: u32 = 4;
    let c = Cluster::start(&["a", "b"], SHARDS, &[("0-3", "a", &["b"], 1)], |_, cfg| {
        cfg.store.block_cache_mb = 256;
        cfg.store.write_buffers_total_mb = 512;
        cfg.replication.poll_wait_ms = 500;
    })
    .await;
    for s in 0..SHARDS {
        c.caught_up("a", &["b"], s, Duration::from_secs(60)).await;
    }
    let leader = stores(&c, "a", 0..SHARDS);

    // 1a. The demo graph, bulk-loaded on the leader while the follower is offline.
    pause_all(&c, "b", SHARDS).await;
    let spec =
        if full { GraphSpec::demo(NOW_MS) } else { GraphSpec { pins: 20_000, ..GraphSpec::demo(NOW_MS) } };
    let users = spec.users;
    let loads = feedgraph_server::demo::split_by_shard(feedgraph_loadtest::generate(&spec), SHARDS);
    let l = leader.clone();
    tokio::task::spawn_blocking(move || {
        for (s, load) in l.iter().zip(loads) {
            s.bulk_load(load, 200_000, &mut |_| {}).unwrap();
        }
    })
    .await
    .unwrap();
    let (bytes, secs) = catch_up(&c, SHARDS).await;
    println!(
        "follower apply, bulk-load batches ({} pins): {:.1} MB of WAL in {secs:.2} s = {:.1} MB/s",
        spec.pins,
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );

    // 1b. Writes of 1,000 pins each (the shape of an ingest over gRPC).
    pause_all(&c, "b", SHARDS).await;
    for o in 1..=users {
        let owner = UserId::new(o).unwrap();
        let s = &leader[shard_of(owner, SHARDS) as usize];
        s.write(
            &[Mutation::UpsertBoard(feedgraph_model::Board {
                id: BoardId::new(1_000_000_000 + o).unwrap(),
                owner,
                name: "b".into(),
            })],
            Durability::Buffered,
        )
        .unwrap();
    }
    let pins = if full { 400_000 } else { 8_000 };
    let base = 10_000_000u64;
    let l = leader.clone();
    let write_secs = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut per_shard: Vec<Vec<Mutation>> = vec![Vec::new(); SHARDS as usize];
        for id in base..base + pins {
            let (s, p) = pin(id, SHARDS, users);
            per_shard[s as usize].push(Mutation::UpsertPin(p));
            if per_shard[s as usize].len() == 1_000 {
                l[s as usize]
                    .write(&std::mem::take(&mut per_shard[s as usize]), Durability::Buffered)
                    .unwrap();
            }
        }
        for (s, m) in per_shard.into_iter().enumerate().filter(|(_, m)| !m.is_empty()) {
            l[s].write(&m, Durability::Buffered).unwrap();
        }
        started.elapsed().as_secs_f64()
    })
    .await
    .unwrap();
    let (bytes, secs) = catch_up(&c, SHARDS).await;
    let leader_rate = bytes as f64 / write_secs;
    let bytes_per_pin = bytes as f64 / pins as f64;
    println!(
        "follower apply, 1,000-pin batches ({pins} pins): {:.1} MB of WAL in {secs:.2} s = {:.1} MB/s (the leader wrote them at {:.1} MB/s)",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs,
        leader_rate / 1e6
    );
    for s in 0..SHARDS {
        assert_eq!(c.digest("a", s).await, c.digest("b", s).await, "shard {s}");
    }

    // 2. Lag at half, and an eighth, of the rate the leader sustains.
    let duration = if full { Duration::from_secs(20) } else { Duration::from_secs(2) };
    lag(&c, &leader, leader_rate / 2.0, bytes_per_pin, users, 20_000_000, duration).await;
    lag(&c, &leader, leader_rate / 8.0, bytes_per_pin, users, 25_000_000, duration).await;

    // 3. Semi-sync against async, one pin per write, interleaved.
    let mut graph = c.graph("a").await;
    let (mut asynchronous, mut semi) = (histogram(), histogram());
    let n = if full { 2_000 } else { 100 };
    for k in 0..n {
        for (ack, h) in [(pb::Ack::Async, &mut asynchronous), (pb::Ack::SemiSync, &mut semi)] {
            let id = 30_000_000 + 2 * k + u64::from(ack == pb::Ack::SemiSync);
            let owner = 1 + id % users;
            let w = muts::write(vec![muts::pin(id, owner, 1_000_000_000 + owner, NOW_MS, vec![], 0.5)], ack);
            let t = Instant::now();
            graph.write(w).await.unwrap();
            h.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    report("write ACK_ASYNC (gRPC, 1 pin)", &asynchronous);
    report("write ACK_SEMI_SYNC (gRPC, 1 pin)", &semi);

    // 4. Failover cost. Promoting a caught-up follower reopens nothing: its rows and
    // caches are current; the promotion writes (and syncs) the epoch's first entry.
    c.caught_up("a", &["b"], 0, Duration::from_secs(60)).await;
    let pins_on_shard = c.node("b").replicas().get(0).unwrap().status().pins;
    c.transition("a", 0, Role::Offline).await.unwrap();
    let t = Instant::now();
    c.transition("b", 0, Role::Leader { epoch: 2 }).await.unwrap();
    println!(
        "promotion of a caught-up follower ({pins_on_shard} pins): {:.1} ms (TransitionReplica over gRPC)",
        t.elapsed().as_secs_f64() * 1e3
    );
    // A restart or a rebuild opens the store, which rebuilds the attribute rows.
    let cp = c.dir.path().join("reopen");
    let s0 = leader[0].clone();
    let p = cp.clone();
    tokio::task::spawn_blocking(move || s0.checkpoint(&p).unwrap()).await.unwrap();
    let t = Instant::now();
    let reopened = tokio::task::spawn_blocking(move || {
        Shard::open_replica(&cp, &feedgraph_graph_store::ShardOptions::new(0)).unwrap().next_ordinal()
    })
    .await
    .unwrap();
    println!(
        "reopen of a shard of {reopened} pins (rows rebuilt from the `pins` family): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(leader);
    c.shutdown().await;
}

async fn remote_feed(full: bool) {
    const VIEWER: u64 = 10_001;
    let spec =
        if full { GraphSpec::demo(NOW_MS) } else { GraphSpec { pins: 20_000, ..GraphSpec::demo(NOW_MS) } };
    let tweak = |_: &str, cfg: &mut feedgraph_server::Config| {
        cfg.store.block_cache_mb = 256;
        cfg.feed.max_per_owner = 3;
        cfg.feed.max_per_board = 3;
    };
    let single = Cluster::start(&["s"], 16, &[("0-15", "s", &[], 1)], tweak).await;
    let cluster =
        Cluster::start(&["a", "b", "c"], 16, &[("0-7", "a", &[], 1), ("8-15", "b", &[], 1)], tweak).await;
    let graph = feedgraph_loadtest::generate(&spec);
    let boards = graph.boards.clone();
    let loads = feedgraph_server::demo::split_by_shard(graph, 16);
    let mut targets = stores(&single, "s", 0..16);
    targets.extend(stores(&cluster, "a", 0..8));
    targets.extend(stores(&cluster, "b", 8..16));
    tokio::task::spawn_blocking(move || {
        for (i, s) in targets.iter().enumerate() {
            s.bulk_load(loads[i % 16].clone(), 200_000, &mut |_| {}).unwrap();
        }
    })
    .await
    .unwrap();
    // The viewer of `feed` bench: 200 users spread over the ids, 100 boards.
    let mut follows: Vec<pb::Mutation> =
        (0..200u64).map(|k| muts::follow_user(VIEWER, 100 + k * 49)).collect();
    for bd in boards.iter().step_by(boards.len() / 100).take(100) {
        follows.push(muts::m(pb::mutation::Op::Follow(pb::Follow {
            follower_id: VIEWER,
            target: Some(pb::FollowTarget {
                target: Some(pb::follow_target::Target::Board(pb::BoardRef {
                    board_id: bd.id.get(),
                    owner_id: bd.owner.get(),
                })),
            }),
        })));
    }
    single.graph("s").await.write(muts::write(follows.clone(), pb::Ack::Async)).await.unwrap();
    cluster.graph("c").await.write(muts::write(follows, pb::Ack::Async)).await.unwrap();
    let (mut local_client, mut remote_client) = (single.feeds("s").await, cluster.feeds("c").await);
    let req = pb::FeedRequest { user_id: VIEWER, page_size: 25, ..Default::default() };
    let first = remote_client.get_following_feed(req.clone()).await.unwrap().into_inner();
    let stats = first.stats.unwrap();
    println!(
        "viewer {VIEWER}: {} candidates on {}/{} shards",
        stats.candidates_scanned, stats.shards_answered, stats.shards_asked
    );
    let (mut local, mut remote) = (histogram(), histogram());
    let n = if full { 2_000 } else { 50 };
    for _ in 0..n {
        for (client, h) in [(&mut local_client, &mut local), (&mut remote_client, &mut remote)] {
            let t = Instant::now();
            let r = client.get_following_feed(req.clone()).await.unwrap().into_inner();
            h.record(t.elapsed().as_micros() as u64).unwrap();
            assert!(!r.stats.unwrap().partial);
        }
    }
    report("following feed, all shards local (gRPC)", &local);
    report("following feed, all 16 shards remote on 2 nodes (gRPC)", &remote);
    single.shutdown().await;
    cluster.shutdown().await;
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        apply_and_lag(full).await;
        remote_feed(full).await;
    });
}
