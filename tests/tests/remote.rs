//! Remote shards: a broker that holds no shard (two other nodes hold eight leaders
//! each) gives the same pages as the single-node service on the same data — following
//! and home, every page, light and ML-ranked, with cursors moved between brokers —
//! whether it asks a node for all its shards in one request or for each shard alone;
//! and when a node dies between two feeds, its shards are read from their other
//! replicas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use feedgraph_proto::auth::AuthChannel as Channel;
use feedgraph_proto::pb::v1 as pb;
use feedgraph_retrieval::cursor::{CursorCodec, CursorState, FeedKind};
use feedgraph_tests::muts::{self, board, follow_topic, follow_user, pin, user};
use feedgraph_tests::{Cluster, Group};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NOW: i64 = 1_800_000_000_000;
const USERS: u64 = 60;
const PINS: u64 = 3_000;
/// The harness's cursor key (every node of a cluster shares one).
const KEY: [u8; 32] = [7; 32];

/// The same writes, in the same order, for every service under test.
fn graph() -> Vec<Vec<pb::Mutation>> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut setup = Vec::new();
    for u in 1..=USERS {
        setup.push(user(u));
        for k in 0..3 {
            setup.push(board(u * 10 + k, u));
        }
    }
    let mut batches = vec![setup];
    let pins: Vec<pb::Mutation> = (1..=PINS)
        .map(|id| {
            let o = 1 + rng.random_range(0..USERS);
            let topics = (0..rng.random_range(0..3)).map(|_| rng.random_range(1..10)).collect();
            pin(
                id,
                o,
                o * 10 + rng.random_range(0..3),
                NOW - rng.random_range(0..30 * 86_400_000),
                topics,
                rng.random(),
            )
        })
        .collect();
    batches.extend(pins.chunks(500).map(|c| c.to_vec()));
    let mut follows = Vec::new();
    for u in 1..=USERS {
        for _ in 0..15 {
            follows.push(follow_user(u, 1 + rng.random_range(0..USERS)));
        }
        let b = 1 + rng.random_range(0..USERS);
        follows.push(muts::m(pb::mutation::Op::Follow(pb::Follow {
            follower_id: u,
            target: Some(pb::FollowTarget {
                target: Some(pb::follow_target::Target::Board(pb::BoardRef {
                    board_id: b * 10,
                    owner_id: b,
                })),
            }),
        })));
        follows.push(follow_topic(u, rng.random_range(1..10)));
    }
    batches.push(follows);
    batches
}

fn tweak(models: &Path) -> impl Fn(&str, &mut feedgraph_server::Config) + '_ {
    move |id, c| {
        // Node a asks b one shard at a time; the others batch a node's shards.
        c.feed.batch_remote_queries = id != "a";
        c.rankings.insert("static".into(), "quality + 0.001*saves".into());
        c.feed.max_per_owner = 2;
        c.scorer.model_dir = Some(models.to_path_buf());
        c.scorer.model = feedgraph_server::demo::DEMO_MODEL.into();
        // Never a fallback because the machine is busy: this compares rankings.
        c.scorer.deadline_ms = 5_000;
        c.feed.shard_deadline_ms = 5_000;
    }
}

type Feeds = pb::feed_service_client::FeedServiceClient<Channel>;

async fn page(client: &mut Feeds, user: u64, home: bool, cursor: &str, ranking: &str) -> pb::FeedResponse {
    let req = pb::FeedRequest {
        user_id: user,
        page_size: 9,
        cursor: cursor.into(),
        ranking: ranking.into(),
        ..Default::default()
    };
    let r = if home { client.get_home_feed(req).await } else { client.get_following_feed(req).await };
    let r = r.unwrap().into_inner();
    let stats = r.stats.clone().unwrap();
    assert!(!stats.partial, "partial page");
    assert_eq!(stats.scoring, pb::Scoring::Model as i32, "not ranked by the model");
    r
}

fn items(r: &pb::FeedResponse) -> Vec<(u64, u32)> {
    r.items.iter().map(|i| (i.pin_id, i.score.to_bits())).collect()
}

/// Every page from `first` on.
async fn walk(client: &mut Feeds, user: u64, home: bool, first: &str) -> Vec<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    let mut cursor = first.to_owned();
    for _ in 0..100 {
        let r = page(client, user, home, &cursor, "").await;
        out.push(items(&r));
        if r.next_cursor.is_empty() {
            return out;
        }
        cursor = r.next_cursor;
    }
    panic!("more than 100 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_remote_broker_pages_like_the_single_node_service() {
    let models = tempfile::tempdir().unwrap();
    feedgraph_server::demo::ensure_models(models.path()).unwrap();
    // The single-node service.
    let single = Cluster::start(&["s"], 16, &[("0-15", "s", &[], 1)], tweak(models.path())).await;
    // Two nodes with eight leaders each, and a broker that holds nothing.
    let groups: &[Group] = &[("0-7", "a", &[], 1), ("8-15", "b", &[], 1)];
    let cluster = Cluster::start(&["a", "b", "c"], 16, groups, tweak(models.path())).await;
    assert!(cluster.node("c").replicas().shard_ids().is_empty());
    for batch in graph() {
        for (svc, node) in [(&single, "s"), (&cluster, "c")] {
            svc.graph(node).await.write(muts::write(batch.clone(), pb::Ack::Async)).await.unwrap();
        }
    }
    let mut s = single.feeds("s").await;
    let mut c = cluster.feeds("c").await;
    let mut a = cluster.feeds("a").await;
    let codec = CursorCodec::new(KEY);
    let mut compared = 0;
    for user in (1..=USERS).step_by(7) {
        for home in [false, true] {
            // A ranking that does not move with the clock: first pages compare as asked.
            let (ps, pc) =
                (page(&mut s, user, home, "", "static").await, page(&mut c, user, home, "", "static").await);
            assert_eq!(items(&ps), items(&pc), "user {user} home {home}: first page");
            let (rest_s, rest_c) = (
                walk(&mut s, user, home, &ps.next_cursor).await,
                walk(&mut c, user, home, &pc.next_cursor).await,
            );
            assert_eq!(rest_s, rest_c, "user {user} home {home}: later pages");
            compared += 1 + rest_s.len();

            // The default ranking reads the clock (and the model the pins' ages): compare
            // one snapshot. The single node's first page names it; the all-remote broker
            // recomputes that ranking from the snapshot (its first page too, through a
            // cursor for page 0), and so does node a (eight local shards, eight remote
            // ones asked one by one).
            let first = page(&mut s, user, home, "", "").await;
            if first.next_cursor.is_empty() {
                continue;
            }
            let later = codec.decode(&first.next_cursor).unwrap();
            let page0 = codec.encode(&CursorState { page: 0, ..later.clone() });
            assert_eq!(later.kind, if home { FeedKind::Home } else { FeedKind::Following });
            let expected: Vec<_> = std::iter::once(items(&first))
                .chain(walk(&mut s, user, home, &first.next_cursor).await)
                .collect();
            assert_eq!(
                walk(&mut c, user, home, &page0).await,
                expected,
                "user {user} home {home}: remote recompute"
            );
            assert_eq!(
                walk(&mut a, user, home, &page0).await,
                expected,
                "user {user} home {home}: mixed recompute"
            );
            compared += 2 * expected.len();
        }
    }
    assert!(compared > 100, "only {compared} pages compared");
    single.shutdown().await;
    cluster.shutdown().await;
}

/// Node a leads every shard and b follows; broker c holds none and sends each node one
/// request for the shards it reads there (b first for half of them). b stops: the next
/// feeds read b's shards from a, whole and identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_of_a_dead_node_are_read_from_their_other_replicas() {
    let models = tempfile::tempdir().unwrap();
    feedgraph_server::demo::ensure_models(models.path()).unwrap();
    let base = tweak(models.path());
    let groups: &[Group] = &[("0-15", "a", &["b"], 1)];
    let mut cluster = Cluster::start(&["a", "b", "c"], 16, groups, |id, c| {
        base(id, c);
        // The broker keeps its map: b stays first for half the shards after it dies.
        c.replication.map_refresh_ms = 600_000;
    })
    .await;
    for batch in graph() {
        cluster.graph("c").await.write(muts::write(batch, pb::Ack::Async)).await.unwrap();
    }
    for shard in 0..16 {
        cluster.caught_up("a", &["b"], shard, std::time::Duration::from_secs(30)).await;
    }
    let mut c = cluster.feeds("c").await;
    let users: Vec<u64> = (1..=USERS).step_by(6).collect();
    let mut before = Vec::new();
    for &user in &users {
        before.push(items(&page(&mut c, user, false, "", "static").await));
    }
    cluster.stop("b").await;
    for (&user, expected) in users.iter().zip(&before) {
        // `page` asserts the page is whole (not partial).
        let after = items(&page(&mut c, user, false, "", "static").await);
        assert_eq!(&after, expected, "user {user}: a page without b");
    }
    cluster.shutdown().await;
}
