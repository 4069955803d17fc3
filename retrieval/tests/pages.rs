//! Pagination under concurrent writes: a first page equals the same ranking recomputed
//! from its snapshot by another broker (no cached ranking), so that later pages —
//! cached or recomputed — never skip or repeat an item. This holds only if a shard
//! publishes its ordinal watermark after the rows and bitmaps it covers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use feedgraph_graph_store::{Shard, ShardOptions};
use feedgraph_model::{
    Board, BoardId, Durability, FeedRequest, FollowTarget, Mutation, Pin, PinId, PinSignals, UserId, shard_of,
};
use feedgraph_retrieval::cursor::{CursorCodec, CursorState};
use feedgraph_retrieval::{Broker, BrokerConfig, FeedKind, FeedPage};
use feedgraph_scoring::Expr;

const KEY: [u8; 32] = [3; 32];
const SHARDS: u32 = 2;
const VIEWER: u64 = 1000;

fn uid(v: u64) -> UserId {
    UserId::new(v).unwrap()
}

fn config() -> BrokerConfig {
    let mut rankings = BTreeMap::new();
    rankings.insert("default".to_owned(), Arc::new(Expr::compile("quality - age_hours/48").unwrap()));
    BrokerConfig {
        max_page_size: 100,
        candidates_per_shard: 200,
        scan_limit: 20_000,
        shard_deadline: Duration::from_secs(5),
        max_ranked: 200,
        max_per_owner: 1000,
        max_per_board: 1000,
        home_interest_share: 0.3,
        engaged_recent_pins: 50,
        engaged_topics: 5,
        ranking_ttl: Duration::from_secs(60),
        ranking_cache_bytes: 64 << 20,
        full_scan: false,
        progressive_ranking: true,
        batch_remote_queries: true,
        admission: feedgraph_retrieval::AdmissionConfig {
            in_progress: 8,
            queued: 64,
            queue_wait: Duration::from_secs(5),
        },
        rankings,
        default_ranking: "default".into(),
        shard_delays: Default::default(),
        model: None,
    }
}

fn request(cursor: Option<String>) -> FeedRequest {
    FeedRequest {
        user: uid(VIEWER),
        page_size: NonZeroU32::new(10).unwrap(),
        cursor,
        ranking: None,
        features: Default::default(),
    }
}

fn ids(p: &FeedPage) -> Vec<PinId> {
    p.items.iter().map(|c| c.pin).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_page_is_exactly_its_snapshot_while_pins_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let shards: Vec<Arc<Shard>> = (0..SHARDS)
        .map(|i| Arc::new(Shard::open(dir.path().join(format!("s{i}")), &ShardOptions::new(i)).unwrap()))
        .collect();
    let shard_for = |o: u64| shards[shard_of(uid(o), SHARDS) as usize].clone();
    for o in 1..=6u64 {
        let board = Board { id: BoardId::new(o).unwrap(), owner: uid(o), name: "b".into() };
        shard_for(o).write(&[Mutation::UpsertBoard(board)], Durability::Buffered).unwrap();
    }
    let follows: Vec<Mutation> = (1..=6u64)
        .map(|o| Mutation::Follow { follower: uid(VIEWER), target: FollowTarget::User(uid(o)) })
        .collect();
    shard_for(VIEWER).write(&follows, Durability::Buffered).unwrap();

    // Pins keep arriving (a bounded number); the newest rank first. The writer stays
    // at most 100 pins per compared page ahead of the reader, so that pins arrive
    // during every comparison however the two threads are scheduled.
    let stop = Arc::new(AtomicBool::new(false));
    let allowance = Arc::new(AtomicU64::new(100));
    let writer = {
        let (shards, stop, allowance) = (shards.clone(), stop.clone(), allowance.clone());
        std::thread::spawn(move || {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as i64;
            let mut id = 1u64;
            while !stop.load(Ordering::Relaxed) && id <= 30_000 {
                if id > allowance.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    continue;
                }
                let o = 1 + id % 6;
                let pin = Pin {
                    id: PinId::new(id).unwrap(),
                    owner: uid(o),
                    board: BoardId::new(o).unwrap(),
                    created_at_ms: now + id as i64,
                    topics: vec![],
                    signals: PinSignals { quality: 0.5, ..Default::default() },
                };
                let shard = &shards[shard_of(uid(o), SHARDS) as usize];
                shard.write(&[Mutation::UpsertPin(pin)], Durability::Buffered).unwrap();
                id += 1;
            }
            id
        })
    };
    let first = Broker::new(shards.clone(), config(), KEY).unwrap();
    let codec = CursorCodec::new(KEY);
    let mut compared = 0;
    while compared < 60 && !writer.is_finished() {
        let page = first.feed(FeedKind::Following, &request(None)).await.unwrap();
        let Some(next) = page.next_cursor.clone() else { continue };
        // Another broker (no cached ranking) recomputes page 0 from the snapshot.
        let again = Broker::new(shards.clone(), config(), KEY).unwrap();
        let page0 = codec.encode(&CursorState { page: 0, ..codec.decode(&next).unwrap() });
        let recomputed = again.feed(FeedKind::Following, &request(Some(page0))).await.unwrap();
        assert_eq!(ids(&page), ids(&recomputed), "a first page differs from its own snapshot");
        compared += 1;
        allowance.fetch_add(100, Ordering::Release);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(compared > 20 && written > 100, "compared {compared} pages while {written} pins were written");
}
