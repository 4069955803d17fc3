//! The service over real gRPC on 127.0.0.1 (port 0), started in-process through the
//! same `start` entry point as the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::http_get;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use feedgraph_model::{UserId, shard_of};
use feedgraph_proto::pb::v1 as pb;
use feedgraph_server::{Config, Node};
use pb::feed_service_client::FeedServiceClient;
use pb::graph_service_client::GraphServiceClient;
use pb::mutation::Op;
use tonic::transport::Channel;

const SHARDS: u32 = 4;
const NOW: i64 = 1_800_000_000_000;

struct TestNode {
    node: Node,
    graph: GraphServiceClient<Channel>,
    feed: FeedServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: SHARDS,
        ..Config::default()
    };
    tweak(&mut config);
    let node = feedgraph_server::start(config).await.unwrap();
    let url = format!("http://{}", node.grpc_addr());
    let graph = GraphServiceClient::connect(url.clone()).await.unwrap();
    let feed = FeedServiceClient::connect(url).await.unwrap();
    TestNode { node, graph, feed, _dir: dir }
}

/// Diversity caps out of the way, for tests about other things.
fn no_caps(c: &mut Config) {
    c.feed.max_per_owner = 1000;
    c.feed.max_per_board = 1000;
}

fn m(op: Op) -> pb::Mutation {
    pb::Mutation { op: Some(op) }
}

fn board(id: u64, owner: u64) -> pb::Mutation {
    m(Op::UpsertBoard(pb::UpsertBoard { board_id: id, owner_id: owner, name: format!("b{id}") }))
}

fn pin(id: u64, owner: u64, board: u64, created_at_ms: i64, quality: f32) -> pb::Mutation {
    m(Op::UpsertPin(pb::UpsertPin {
        pin_id: id,
        board_id: board,
        owner_id: owner,
        created_at_ms,
        topic_ids: vec![1],
        signals: Some(pb::PinSignals { quality, saves: 0, clicks: 0, closeups: 0 }),
    }))
}

fn follow_user(follower: u64, user: u64) -> pb::Mutation {
    m(Op::Follow(pb::Follow {
        follower_id: follower,
        target: Some(pb::FollowTarget { target: Some(pb::follow_target::Target::UserId(user)) }),
    }))
}

fn pin_ref(pin: u64, owner: u64) -> Option<pb::PinRef> {
    Some(pb::PinRef { pin_id: pin, owner_id: owner })
}

async fn write(n: &mut TestNode, mutations: Vec<pb::Mutation>) -> Result<pb::WriteResponse, tonic::Status> {
    n.graph
        .write(pb::WriteRequest { mutations, ack: pb::Ack::Async as i32, request_id: String::new() })
        .await
        .map(|r| r.into_inner())
}

async fn feed_page(
    n: &mut TestNode,
    user: u64,
    page_size: u32,
    cursor: &str,
) -> Result<pb::FeedResponse, tonic::Status> {
    n.feed
        .get_following_feed(pb::FeedRequest {
            user_id: user,
            page_size,
            cursor: cursor.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn pins_of(r: &pb::FeedResponse) -> Vec<u64> {
    r.items.iter().map(|i| i.pin_id).collect()
}

/// Owners with one board each (board id = owner * 100), `per_owner` pins each.
async fn seed(n: &mut TestNode, owners: &[u64], per_owner: u64) {
    let mut muts = Vec::new();
    for &o in owners {
        muts.push(board(o * 100, o));
        for k in 0..per_owner {
            muts.push(pin(o * 1000 + k, o, o * 100, NOW - (k as i64) * 60_000, 0.5));
        }
    }
    write(n, muts).await.unwrap();
}

#[tokio::test]
async fn a_write_is_visible_in_the_next_read() {
    let mut n = start(|_| {}).await;
    seed(&mut n, &[10, 11], 2).await;
    write(&mut n, vec![follow_user(1, 10)]).await.unwrap();
    let r = feed_page(&mut n, 1, 50, "").await.unwrap();
    assert_eq!(pins_of(&r).into_iter().collect::<HashSet<_>>(), HashSet::from([10_000, 10_001]));
    // A new pin, a new follow: both show in the very next read.
    write(&mut n, vec![pin(10_005, 10, 1000, NOW, 0.9), follow_user(1, 11)]).await.unwrap();
    let r = feed_page(&mut n, 1, 50, "").await.unwrap();
    let got: HashSet<u64> = pins_of(&r).into_iter().collect();
    assert_eq!(got, HashSet::from([10_000, 10_001, 10_005, 11_000, 11_001]));
    let stats = r.stats.unwrap();
    assert_eq!(stats.scoring, pb::Scoring::Light as i32);
    assert!(!stats.partial);
    // Health is served.
    let channel =
        Channel::from_shared(format!("http://{}", n.node.grpc_addr())).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "feedgraph.v1.FeedService".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    // Reflection lists every service (what grpcurl relies on).
    use tonic_reflection::pb::v1 as refl;
    let mut reflection = refl::server_reflection_client::ServerReflectionClient::new(channel);
    let request = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(refl::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("unexpected reflection answer {answer:?}")
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["feedgraph.v1.FeedService", "feedgraph.v1.GraphService", "grpc.health.v1.Health"] {
        assert!(names.contains(service), "{service} missing from {names:?}");
    }
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn each_filter_removes_what_it_should_and_nothing_else() {
    let mut n = start(no_caps).await;
    // Owner 10's pins 10000..10005; owner 20 will be blocked.
    seed(&mut n, &[10, 20], 6).await;
    write(&mut n, vec![follow_user(1, 10), follow_user(1, 20), follow_user(2, 10)]).await.unwrap();
    write(
        &mut n,
        vec![
            m(Op::RecordImpressions(pb::RecordImpressions {
                user_id: 1,
                pins: vec![pb::PinRef { pin_id: 10_000, owner_id: 10 }],
            })),
            m(Op::BlockUser(pb::BlockUser { user_id: 1, blocked_user_id: 20 })),
            m(Op::DeletePin(pb::DeletePin { pin: pin_ref(10_001, 10) })),
            m(Op::FlagPin(pb::FlagPin {
                pin: pin_ref(10_002, 10),
                flag: pb::PinFlag::Spam as i32,
                clear: false,
            })),
            m(Op::FlagPin(pb::FlagPin {
                pin: pin_ref(10_003, 10),
                flag: pb::PinFlag::Unsafe as i32,
                clear: false,
            })),
        ],
    )
    .await
    .unwrap();
    let got: HashSet<u64> = pins_of(&feed_page(&mut n, 1, 50, "").await.unwrap()).into_iter().collect();
    assert_eq!(got, HashSet::from([10_004, 10_005]));
    // Seen and blocks are per viewer: user 2 still sees the seen pin.
    let got: HashSet<u64> = pins_of(&feed_page(&mut n, 2, 50, "").await.unwrap()).into_iter().collect();
    assert_eq!(got, HashSet::from([10_000, 10_004, 10_005]));
    // Clearing a flag brings the pin back; unblocking brings the owner back.
    write(
        &mut n,
        vec![
            m(Op::FlagPin(pb::FlagPin {
                pin: pin_ref(10_002, 10),
                flag: pb::PinFlag::Spam as i32,
                clear: true,
            })),
            m(Op::UnblockUser(pb::UnblockUser { user_id: 1, blocked_user_id: 20 })),
        ],
    )
    .await
    .unwrap();
    let got: HashSet<u64> = pins_of(&feed_page(&mut n, 1, 50, "").await.unwrap()).into_iter().collect();
    let mut want: HashSet<u64> = HashSet::from([10_002, 10_004, 10_005]);
    want.extend(20_000..20_006);
    assert_eq!(got, want);
    n.node.shutdown().await.unwrap();
}

/// Walks every page from the first, writing new pins for followed owners between
/// pages; returns the pages.
async fn walk(
    n: &mut TestNode,
    user: u64,
    page_size: u32,
    owners: &[u64],
    next_pin: &mut u64,
) -> Vec<Vec<pb::FeedItem>> {
    let mut pages = Vec::new();
    let mut cursor = String::new();
    for _ in 0..200 {
        let r = feed_page(n, user, page_size, &cursor).await.unwrap();
        pages.push(r.items.clone());
        // New pins, newer and better than everything: they must not leak into this ranking.
        let o = owners[(*next_pin as usize) % owners.len()];
        write(n, vec![pin(*next_pin, o, o * 100, NOW + 1_000_000, 1.0)]).await.unwrap();
        *next_pin += 1;
        if r.next_cursor.is_empty() {
            return pages;
        }
        cursor = r.next_cursor;
    }
    panic!("pagination did not end");
}

#[tokio::test]
async fn pages_concatenate_to_one_ranked_list_while_pins_arrive() {
    // No caps here: pages must concatenate to one list in score order.
    let mut n = start(no_caps).await;
    let owners = [10, 11, 12, 13, 14, 15, 16];
    let mut muts = Vec::new();
    let mut rng = 0x2545_f491_u64;
    let mut existing = HashSet::new();
    for &o in &owners {
        muts.push(board(o * 100, o));
        for k in 0..20u64 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = o * 1000 + k;
            muts.push(pin(id, o, o * 100, NOW - (rng >> 40) as i64, ((rng >> 33) % 1000) as f32 / 1000.0));
            existing.insert(id);
        }
        muts.push(follow_user(1, o));
    }
    write(&mut n, muts).await.unwrap();
    let mut next_pin = 900_000;
    for page_size in [1u32, 3, 7, 16, 50, 100] {
        let pages = walk(&mut n, 1, page_size, &owners, &mut next_pin).await;
        let all: Vec<&pb::FeedItem> = pages.iter().flatten().collect();
        let ids: Vec<u64> = all.iter().map(|i| i.pin_id).collect();
        let unique: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "duplicates at page size {page_size}");
        assert_eq!(unique, existing, "gaps or intruders at page size {page_size}");
        assert!(all.windows(2).all(|w| w[0].score >= w[1].score), "not one ranked list at {page_size}");
        assert!(pages.iter().all(|p| p.len() <= page_size as usize));
        // The pins written during this walk belong to the next walk's ranking.
        existing.extend(900_000..next_pin);
    }
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn diversity_caps_hold_on_every_page() {
    let mut n = start(|c| {
        c.feed.max_per_owner = 2;
        c.feed.max_per_board = 1;
    })
    .await;
    // Owner 10 dominates with three boards; two small owners.
    let mut muts = vec![board(1000, 10), board(1001, 10), board(1002, 10), board(2000, 20), board(3000, 30)];
    for k in 0..60u64 {
        muts.push(pin(10_000 + k, 10, 1000 + k % 3, NOW - k as i64, 0.9));
    }
    for k in 0..5u64 {
        muts.push(pin(20_000 + k, 20, 2000, NOW - k as i64, 0.1));
        muts.push(pin(30_000 + k, 30, 3000, NOW - k as i64, 0.1));
    }
    muts.extend([follow_user(1, 10), follow_user(1, 20), follow_user(1, 30)]);
    write(&mut n, muts).await.unwrap();
    let mut next_pin = 500_000;
    let pages = walk(&mut n, 1, 5, &[10, 20, 30], &mut next_pin).await;
    assert_eq!(pages.iter().map(Vec::len).sum::<usize>(), 70);
    for page in &pages {
        let mut owners: HashMap<u64, usize> = HashMap::new();
        let mut boards: HashMap<u64, usize> = HashMap::new();
        for i in page {
            *owners.entry(i.owner_id).or_default() += 1;
            *boards.entry(i.board_id).or_default() += 1;
        }
        assert!(owners.values().all(|c| *c <= 2), "{owners:?}");
        assert!(boards.values().all(|c| *c <= 1), "{boards:?}");
    }
    // The small owners' pins are not starved behind the dominant owner.
    let first_two: HashSet<u64> = pages[..2].iter().flatten().map(|i| i.owner_id).collect();
    assert!(first_two.contains(&20) && first_two.contains(&30));
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_shard_missing_its_deadline_gives_a_flagged_partial_page() {
    let slow_owner = (10..).find(|u| shard_of(UserId::new(*u).unwrap(), SHARDS) == 1).unwrap();
    let fast_owner = (10..).find(|u| shard_of(UserId::new(*u).unwrap(), SHARDS) == 2).unwrap();
    let mut n = start(|c| {
        c.feed.shard_deadline_ms = 50;
        c.debug.shard_delays_ms = BTreeMap::from([("1".to_owned(), 1_000)]);
    })
    .await;
    seed(&mut n, &[slow_owner, fast_owner], 3).await;
    write(&mut n, vec![follow_user(1, slow_owner), follow_user(1, fast_owner)]).await.unwrap();
    let r = feed_page(&mut n, 1, 10, "").await.unwrap();
    let stats = r.stats.unwrap();
    assert!(stats.partial);
    assert_eq!((stats.shards_asked, stats.shards_answered), (2, 1));
    assert!(r.items.iter().all(|i| i.owner_id == fast_owner));
    assert_eq!(r.items.len(), 3);
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_writes_nothing() {
    let mut n = start(|_| {}).await;
    seed(&mut n, &[10], 3).await;
    write(&mut n, vec![follow_user(1, 10)]).await.unwrap();
    let code_and_message = |e: tonic::Status| (e.code(), e.message().to_owned());

    let (code, msg) = code_and_message(feed_page(&mut n, 1, 0, "").await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("page_size"), "{msg}");
    let (code, msg) = code_and_message(feed_page(&mut n, 1, 101, "").await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("page_size"), "{msg}");

    // A forged cursor, and a real one altered by one character.
    let (code, msg) = code_and_message(feed_page(&mut n, 1, 1, "bm90LWEtY3Vyc29y").await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("cursor"), "{msg}");
    let real = feed_page(&mut n, 1, 1, "").await.unwrap().next_cursor;
    let mut altered: Vec<char> = real.chars().collect();
    altered[10] = if altered[10] == 'x' { 'y' } else { 'x' };
    let altered: String = altered.into_iter().collect();
    assert_eq!(feed_page(&mut n, 1, 1, &altered).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Someone else's cursor.
    assert_eq!(feed_page(&mut n, 2, 1, &real).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    let err = n
        .feed
        .get_following_feed(pb::FeedRequest {
            user_id: 1,
            page_size: 5,
            ranking: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("ranking"), "{}", err.message());

    // A later page follows its cursor's ranking; naming another one is refused.
    let fresh = n
        .feed
        .get_following_feed(pb::FeedRequest {
            user_id: 1,
            page_size: 1,
            ranking: "fresh".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    feed_page(&mut n, 1, 1, &fresh.next_cursor).await.unwrap();
    let err = n
        .feed
        .get_following_feed(pb::FeedRequest {
            user_id: 1,
            page_size: 1,
            cursor: fresh.next_cursor,
            ranking: "popular".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("cursor"), "{}", err.message());

    // An unknown user has an empty feed.
    let r = feed_page(&mut n, 424_242, 10, "").await.unwrap();
    assert!(r.items.is_empty() && r.next_cursor.is_empty());

    // A pin on a board that does not exist: NOT_FOUND, and the valid pin before it in
    // the same request is not written either.
    let err =
        write(&mut n, vec![pin(77, 10, 1000, NOW, 0.5), pin(78, 10, 999_999, NOW, 0.5)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let got = n.graph.get_pin(pb::GetPinRequest { pin: pin_ref(77, 10) }).await.unwrap().into_inner();
    assert!(!got.found);
    // A bad field is named by its path.
    let err = write(&mut n, vec![pin(79, 10, 1000, NOW, 0.5), pin(80, 0, 1000, NOW, 0.5)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("mutations[1].upsert_pin.owner_id"), "{}", err.message());
    // Semi-sync without replicas is refused, not silently downgraded.
    let err = n
        .graph
        .write(pb::WriteRequest {
            mutations: vec![follow_user(1, 11)],
            ack: pb::Ack::SemiSync as i32,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn home_feed_blends_interest_candidates_and_says_where_each_came_from() {
    let mut n = start(|c| {
        no_caps(c);
        c.feed.home_interest_share = 0.5;
    })
    .await;
    // User 1 follows owner 10; saved pins (own pins) about topic 7; owner 30 posts on topic 7.
    let mut muts = vec![board(1000, 10), board(100, 1), board(3000, 30), follow_user(1, 10)];
    for k in 0..10u64 {
        muts.push(pin(10_000 + k, 10, 1000, NOW - k as i64, 0.5));
        muts.push(m(Op::UpsertPin(pb::UpsertPin {
            pin_id: 30_000 + k,
            board_id: 3000,
            owner_id: 30,
            created_at_ms: NOW - k as i64,
            topic_ids: vec![7],
            signals: Some(pb::PinSignals { quality: 0.5, ..Default::default() }),
        })));
    }
    muts.push(m(Op::UpsertPin(pb::UpsertPin {
        pin_id: 1_000,
        board_id: 100,
        owner_id: 1,
        created_at_ms: NOW,
        topic_ids: vec![7],
        signals: None,
    })));
    write(&mut n, muts).await.unwrap();
    let r = n
        .feed
        .get_home_feed(pb::FeedRequest { user_id: 1, page_size: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let following = r.items.iter().filter(|i| i.source == pb::FeedSource::FollowedUser as i32).count();
    let engaged = r.items.iter().filter(|i| i.source == pb::FeedSource::EngagedTopic as i32).count();
    assert_eq!((following, engaged), (5, 5), "{:?}", r.items);
    assert!(
        r.items.iter().filter(|i| i.source == pb::FeedSource::EngagedTopic as i32).all(|i| i.owner_id == 30)
    );
    // The following feed has no interest candidates.
    let f = feed_page(&mut n, 1, 20, "").await.unwrap();
    assert!(f.items.iter().all(|i| i.owner_id == 10));
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_data_and_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: SHARDS,
        ..Config::default()
    };
    let node = feedgraph_server::start(config.clone()).await.unwrap();
    let url = format!("http://{}", node.grpc_addr());
    let mut n = TestNode {
        node,
        graph: GraphServiceClient::connect(url.clone()).await.unwrap(),
        feed: FeedServiceClient::connect(url).await.unwrap(),
        _dir: tempfile::tempdir().unwrap(),
    };
    seed(&mut n, &[10, 11], 5).await;
    write(&mut n, vec![follow_user(1, 10), follow_user(1, 11)]).await.unwrap();
    let first = feed_page(&mut n, 1, 4, "").await.unwrap();
    let second_before = feed_page(&mut n, 1, 4, &first.next_cursor).await.unwrap();
    n.node.shutdown().await.unwrap();
    // The restarted node has no cached ranking: it recomputes it from the cursor's snapshot.
    let node = feedgraph_server::start(config).await.unwrap();
    let mut feed = FeedServiceClient::connect(format!("http://{}", node.grpc_addr())).await.unwrap();
    let second_after = feed
        .get_following_feed(pb::FeedRequest {
            user_id: 1,
            page_size: 4,
            cursor: first.next_cursor.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pins_of(&second_after), pins_of(&second_before));
    // Metrics are served.
    let body = http_get(node.metrics_addr(), "/metrics").await;
    assert!(body.contains("feedgraph_grpc_requests_total"), "{body}");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_features_steer_the_ranking_expression() {
    let mut n = start(|c| {
        c.rankings.insert("steerable".into(), "quality + req.w * ln(1 + saves)".into());
    })
    .await;
    let pin_with = |id: u64, quality: f32, saves: u32| {
        m(Op::UpsertPin(pb::UpsertPin {
            pin_id: id,
            board_id: 1000,
            owner_id: 10,
            created_at_ms: NOW,
            topic_ids: vec![],
            signals: Some(pb::PinSignals { quality, saves, ..Default::default() }),
        }))
    };
    write(&mut n, vec![board(1000, 10), pin_with(1, 0.9, 0), pin_with(2, 0.1, 100), follow_user(5, 10)])
        .await
        .unwrap();
    let order = |w: f32| pb::FeedRequest {
        user_id: 5,
        page_size: 2,
        ranking: "steerable".into(),
        features: [("w".to_owned(), w)].into_iter().collect(),
        ..Default::default()
    };
    let first = |r: pb::FeedResponse| r.items.first().map(|i| i.pin_id);
    assert_eq!(first(n.feed.get_following_feed(order(0.0)).await.unwrap().into_inner()), Some(1));
    assert_eq!(first(n.feed.get_following_feed(order(1.0)).await.unwrap().into_inner()), Some(2));
    let err = n.feed.get_following_feed(order(f32::NAN)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("features[w]"), "{}", err.message());
    n.node.shutdown().await.unwrap();
}

// ------------------------------------------------------------------ the ML scorer

use feedgraph_proto::pb::internal as ipb;
use ipb::scorer_service_client::ScorerServiceClient;

/// A standalone scorer over a temporary copy of the bundled models.
async fn start_scorer(dir: &std::path::Path) -> feedgraph_server::scorer::ScorerNode {
    feedgraph_server::demo::ensure_models(dir).unwrap();
    feedgraph_server::scorer::start_scorer(feedgraph_server::ScorerServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        model_dir: dir.to_path_buf(),
        max_batch: 1000,
        reload_interval_ms: 50,
        log: "warn".into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

fn score_request(model: &str, items: usize) -> ipb::ScoreBatchRequest {
    ipb::ScoreBatchRequest {
        model: model.into(),
        user_features: [("user.mobile".to_owned(), 1.0)].into_iter().collect(),
        feature_names: vec!["quality".into(), "saves".into(), "age_hours".into()],
        item_ids: (0..items as u64).map(|i| 100 + i).collect(),
        values: (0..items).flat_map(|i| [(i % 10) as f32 / 10.0, 50.0, 3.0]).collect(),
    }
}

#[tokio::test]
async fn scorer_service_scores_reloads_and_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let scorer = start_scorer(dir.path()).await;
    let mut client = ScorerServiceClient::connect(format!("http://{}", scorer.grpc_addr())).await.unwrap();
    let models = client.list_models(ipb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<(&str, &str, &str)> =
        models.iter().map(|m| (m.name.as_str(), m.version.as_str(), m.kind.as_str())).collect();
    assert_eq!(names, [("engagement_gbdt", "1", "lightgbm"), ("engagement_mlp", "1", "onnx")]);
    assert_eq!(models[0].feature_names.len(), 32);

    for model in ["engagement_mlp", "engagement_gbdt"] {
        let r = client.score_batch(score_request(model, 10)).await.unwrap().into_inner();
        assert_eq!((r.scores.len(), r.model.as_str(), r.model_version.as_str()), (10, model, "1"));
        assert!(r.scores.iter().all(|s| s.is_finite()));
        // Higher quality, all else equal, scores higher for this simulated engagement.
        assert!(r.scores[9] > r.scores[0], "{model}: {:?}", r.scores);
    }

    let code_and_message = |r: Result<tonic::Response<ipb::ScoreBatchResponse>, tonic::Status>| {
        let s = r.unwrap_err();
        (s.code(), s.message().to_owned())
    };
    let mut nan = score_request("engagement_mlp", 3);
    nan.values[3 + 2] = f32::NAN;
    let (code, msg) = code_and_message(client.score_batch(nan).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("item 101") && msg.contains("`age_hours`"), "{msg}");
    let mut unknown = score_request("engagement_mlp", 3);
    unknown.feature_names[0] = "colour".into();
    let (code, msg) = code_and_message(client.score_batch(unknown).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("`colour`"), "{msg}");
    let mut short = score_request("engagement_gbdt", 3);
    short.values.pop();
    let (code, msg) = code_and_message(client.score_batch(short).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("8 values for 3 items × 3 features"), "{msg}");
    let (code, _) = code_and_message(client.score_batch(score_request("engagement_mlp", 1001)).await);
    assert_eq!(code, tonic::Code::ResourceExhausted);
    let (code, msg) = code_and_message(client.score_batch(score_request("nope", 1)).await);
    assert_eq!((code, msg.contains("nope")), (tonic::Code::NotFound, true));

    // A new version dropped in (written aside, then renamed) is picked up by the reload
    // loop; a broken one is refused, counted, and the good one keeps serving.
    let model_dir = dir.path().join("engagement_gbdt");
    let staging = model_dir.join(".tmp-2");
    std::fs::create_dir_all(&staging).unwrap();
    for f in ["model.txt", "schema.toml"] {
        std::fs::copy(model_dir.join("1").join(f), staging.join(f)).unwrap();
    }
    std::fs::rename(&staging, model_dir.join("2")).unwrap();
    std::fs::create_dir_all(model_dir.join("3")).unwrap();
    std::fs::write(model_dir.join("3/model.txt"), "not a model").unwrap();
    std::fs::copy(model_dir.join("1/schema.toml"), model_dir.join("3/schema.toml")).unwrap();
    let mut served = String::new();
    for _ in 0..100 {
        let r = client.score_batch(score_request("engagement_gbdt", 1)).await.unwrap().into_inner();
        served = r.model_version;
        let body = http_get(scorer.metrics_addr(), "/metrics").await;
        if served == "2"
            && body.contains(r#"scorer_model_loads_total{model="engagement_gbdt",result="refused"} 1"#)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, "2");
    let body = http_get(scorer.metrics_addr(), "/metrics").await;
    assert!(body.contains(r#"scorer_model_version{model="engagement_gbdt"} 2"#), "{body}");
    assert!(
        body.contains(r#"scorer_model_loads_total{model="engagement_gbdt",result="refused"} 1"#),
        "{body}"
    );
    scorer.shutdown().await.unwrap();
}

fn stats_of(r: &pb::FeedResponse) -> (pb::Scoring, String) {
    let s = r.stats.clone().unwrap_or_default();
    (pb::Scoring::try_from(s.scoring).unwrap(), s.model)
}

#[tokio::test]
async fn feeds_are_model_ranked_and_fall_back_to_light_scores_when_the_scorer_stops() {
    let models = tempfile::tempdir().unwrap();
    let scorer = start_scorer(models.path()).await;
    let endpoint = format!("http://{}", scorer.grpc_addr());
    let mut n = start(|c| {
        no_caps(c);
        c.scorer.endpoint = Some(endpoint);
        c.scorer.model = "engagement_mlp".into();
        // Generous on a loaded CI machine; the fallback below is by unavailability.
        c.scorer.deadline_ms = 2_000;
    })
    .await;
    seed(&mut n, &[11, 12, 13], 20).await;
    write(&mut n, vec![follow_user(5, 11), follow_user(5, 12), follow_user(5, 13)]).await.unwrap();

    let r = feed_page(&mut n, 5, 30, "").await.unwrap();
    assert_eq!(stats_of(&r), (pb::Scoring::Model, "engagement_mlp@1".to_owned()));
    assert_eq!(r.items.len(), 30);
    // The head is in model-score order (scores are the model's, not light scores).
    assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score), "{:?}", r.items);
    // Later pages of that ranking say how it was made too.
    let r2 = feed_page(&mut n, 5, 30, &r.next_cursor).await.unwrap();
    assert_eq!(stats_of(&r2).0, pb::Scoring::Model);

    scorer.shutdown().await.unwrap();
    for _ in 0..3 {
        let r = feed_page(&mut n, 5, 30, "").await.expect("feeds keep coming without the scorer");
        assert_eq!(stats_of(&r), (pb::Scoring::LightFallback, String::new()));
        assert_eq!(r.items.len(), 30);
    }
    let body = http_get(n.node.metrics_addr(), "/metrics").await;
    // Refused connections fail at once (`unavailable`); a machine slow enough to hit the
    // 2 s deadline first would count `deadline`: either way, three fallbacks.
    let fallbacks: u64 = body
        .lines()
        .filter(|l| l.starts_with(r#"feedgraph_feed_rankings_total{scoring="fallback_"#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(fallbacks, 3, "{body}");
    assert!(body.contains(r#"feedgraph_feed_rankings_total{scoring="model"} 1"#), "{body}");
    n.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_scorer_embeds_in_the_feed_node() {
    let models = tempfile::tempdir().unwrap();
    feedgraph_server::demo::ensure_models(models.path()).unwrap();
    let dir = models.path().to_path_buf();
    let mut n = start(move |c| {
        c.scorer.model_dir = Some(dir);
        c.scorer.model = "engagement_gbdt".into();
        c.scorer.deadline_ms = 2_000;
    })
    .await;
    seed(&mut n, &[11], 5).await;
    write(&mut n, vec![follow_user(5, 11)]).await.unwrap();
    let r = feed_page(&mut n, 5, 10, "").await.unwrap();
    assert_eq!(stats_of(&r), (pb::Scoring::Model, "engagement_gbdt@1".to_owned()));
    // The node also answers ScorerService on its own port.
    let mut client = ScorerServiceClient::connect(format!("http://{}", n.node.grpc_addr())).await.unwrap();
    let r = client.score_batch(score_request("engagement_gbdt", 2)).await.unwrap().into_inner();
    assert_eq!(r.scores.len(), 2);
    n.node.shutdown().await.unwrap();

    // A configured model the registry does not have: refused, light-score fallback.
    let dir = models.path().to_path_buf();
    let mut n = start(move |c| {
        no_caps(c);
        c.scorer.model_dir = Some(dir);
        c.scorer.model = "engagement_typo".into();
    })
    .await;
    seed(&mut n, &[11], 5).await;
    write(&mut n, vec![follow_user(5, 11)]).await.unwrap();
    let r = feed_page(&mut n, 5, 10, "").await.unwrap();
    assert_eq!((stats_of(&r).0, r.items.len()), (pb::Scoring::LightFallback, 5));
    let body = http_get(n.node.metrics_addr(), "/metrics").await;
    assert!(body.contains(r#"feedgraph_feed_rankings_total{scoring="fallback_refused"} 1"#), "{body}");
    n.node.shutdown().await.unwrap();
}

/// Impressions older than the seen window are deleted by the node's sweep, also for a
/// viewer who is never shown anything again (nothing else would ever write to their
/// key); newer impressions stay.
#[tokio::test]
async fn the_seen_sweep_deletes_impressions_that_left_the_window() {
    use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId, PinRef};
    const HOUR: u64 = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        ..Config::default()
    };
    config.store.seen_window_hours = 24;
    config.store.seen_period_hours = 24;
    config.store.seen_sweep_interval_s = 1;
    let shards = feedgraph_server::open_shards(&config).unwrap();
    let shard = shards[0].clone();
    let (u, p) = (|v| UserId::new(v).unwrap(), |v| PinId::new(v).unwrap());
    let board = BoardId::new(1).unwrap();
    let mut content = vec![Mutation::UpsertBoard(Board { id: board, owner: u(10), name: "b".into() })];
    content.extend((1..=2).map(|id| {
        Mutation::UpsertPin(Pin {
            id: p(id),
            owner: u(10),
            board,
            created_at_ms: NOW,
            topics: Vec::new(),
            signals: Default::default(),
        })
    }));
    shard.write(&content, Durability::Sync).unwrap();
    let seen = |viewer, pin| Mutation::RecordImpressions {
        user: u(viewer),
        pins: vec![PinRef { pin: p(pin), owner: u(10) }],
    };
    let now = feedgraph_graph_store::wall_clock_ms();
    // Viewer 7 was last shown a pin four days ago; viewer 8 just now.
    shard.write_as_of(None, &[seen(7, 1)], Durability::Sync, now - 100 * HOUR).unwrap();
    shard.write_as_of(None, &[seen(8, 2)], Durability::Sync, now).unwrap();
    assert_eq!(shard.seen_sweep(None, now, 10, 100).unwrap().users, [u(7)]);

    let node = feedgraph_server::start_with(config, shards).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = http_get(node.metrics_addr(), "/metrics").await;
        if common::metric(&body, "feedgraph_store_seen_periods_expired_total{shard=\"0\"}") >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no sweep within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = feedgraph_graph_store::wall_clock_ms();
    assert!(shard.seen_sweep(None, now, 10, 100).unwrap().users.is_empty());
    assert_eq!(shard.seen(u(8)).unwrap().len(), 1);
    drop(shard);
    node.shutdown().await.unwrap();
}

/// A follow past `store.max_follows_per_user` is refused with FAILED_PRECONDITION
/// naming the cap, and the request writes nothing; unfollowing makes room again.
#[tokio::test]
async fn follows_past_the_per_user_cap_are_refused() {
    let mut n = start(|c| c.store.max_follows_per_user = 2).await;
    let follows = |n: &mut TestNode| {
        let mut g = n.graph.clone();
        async move { g.get_follows(pb::GetFollowsRequest { user_id: 1 }).await.unwrap().into_inner().user_ids }
    };
    write(&mut n, vec![follow_user(1, 10), follow_user(1, 11)]).await.unwrap();
    // Following someone already followed takes no room.
    write(&mut n, vec![follow_user(1, 10)]).await.unwrap();
    let err = write(&mut n, vec![follow_user(1, 12), follow_user(1, 13)]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("max_follows_per_user"), "{}", err.message());
    let mut got = follows(&mut n).await;
    got.sort();
    assert_eq!(got, [10, 11]);
    let unfollow = m(Op::Unfollow(pb::Unfollow {
        follower_id: 1,
        target: Some(pb::FollowTarget { target: Some(pb::follow_target::Target::UserId(10)) }),
    }));
    write(&mut n, vec![unfollow, follow_user(1, 12)]).await.unwrap();
    let mut got = follows(&mut n).await;
    got.sort();
    assert_eq!(got, [11, 12]);
}
