//! Replication between real nodes over gRPC on 127.0.0.1: convergence under every
//! mutation kind, restarts, a purged WAL (rebuild from a checkpoint, resumed after a
//! broken stream), a divergent demoted leader, epoch fencing and redirects, semi-sync
//! acknowledgements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use feedgraph_cluster::Role;
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_proto::refusal::{RefusalKind, refusal};
use feedgraph_tests::muts::{self, board, follow_topic, follow_user, pin, user};
use feedgraph_tests::{Cluster, Group};
use pb::mutation::Op;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NOW: i64 = 1_800_000_000_000;
const OWNERS: u64 = 20;
const CATCH_UP: Duration = Duration::from_secs(30);

fn static_ranking(_: &str, c: &mut feedgraph_server::Config) {
    // Scores that do not move with the clock, so that pages asked at different times
    // of different nodes compare equal.
    c.rankings.insert("static".into(), "quality + 0.001*saves".into());
}

/// Users, and boards `owner * 10 + k` for k in 0..3.
fn setup_writes() -> Vec<pb::Mutation> {
    (1..=OWNERS)
        .flat_map(|o| std::iter::once(user(o)).chain((0..3).map(move |k| board(o * 10 + k, o))))
        .collect()
}

fn pin_ref(rng: &mut ChaCha8Rng, next_pin: u64) -> Option<pb::PinRef> {
    let p = rng.random_range(1..next_pin.max(2));
    Some(pb::PinRef { pin_id: p, owner_id: 1 + p % OWNERS })
}

/// A random write of every mutation kind (pins of owner `1 + id % 20` on its boards).
fn random_write(rng: &mut ChaCha8Rng, next_pin: &mut u64) -> Vec<pb::Mutation> {
    let owner = |rng: &mut ChaCha8Rng| rng.random_range(1..=OWNERS);
    (0..rng.random_range(1..6))
        .map(|_| match rng.random_range(0..14) {
            0..=4 => {
                let id = *next_pin;
                *next_pin += 1;
                let o = 1 + id % OWNERS;
                let topics = (0..rng.random_range(0..3)).map(|_| rng.random_range(1..8)).collect();
                pin(id, o, o * 10 + id % 3, NOW - (id as i64) * 1000, topics, rng.random())
            }
            5 => follow_user(owner(rng), owner(rng)),
            6 => follow_topic(owner(rng), rng.random_range(1..8)),
            7 => muts::m(Op::Unfollow(pb::Unfollow {
                follower_id: owner(rng),
                target: Some(pb::FollowTarget {
                    target: Some(pb::follow_target::Target::UserId(owner(rng))),
                }),
            })),
            8 => {
                let b = owner(rng);
                muts::m(Op::Follow(pb::Follow {
                    follower_id: owner(rng),
                    target: Some(pb::FollowTarget {
                        target: Some(pb::follow_target::Target::Board(pb::BoardRef {
                            board_id: b * 10,
                            owner_id: b,
                        })),
                    }),
                }))
            }
            9 => muts::m(Op::DeletePin(pb::DeletePin { pin: pin_ref(rng, *next_pin) })),
            10 => muts::m(Op::FlagPin(pb::FlagPin {
                pin: pin_ref(rng, *next_pin),
                flag: if rng.random_bool(0.5) { pb::PinFlag::Spam } else { pb::PinFlag::Unsafe } as i32,
                clear: rng.random_bool(0.3),
            })),
            11 => muts::m(Op::RecordImpressions(pb::RecordImpressions {
                user_id: owner(rng),
                pins: (0..3).filter_map(|_| pin_ref(rng, *next_pin)).collect(),
            })),
            12 => {
                let (u, b) = (owner(rng), owner(rng));
                if rng.random_bool(0.6) {
                    muts::m(Op::BlockUser(pb::BlockUser { user_id: u, blocked_user_id: b }))
                } else {
                    muts::m(Op::UnblockUser(pb::UnblockUser { user_id: u, blocked_user_id: b }))
                }
            }
            _ => muts::m(Op::UpdateSignals(pb::UpdateSignals {
                pin: pin_ref(rng, *next_pin),
                update: Some(pb::SignalsUpdate {
                    saves: Some(rng.random_range(0..1000)),
                    ..Default::default()
                }),
            })),
        })
        .collect()
}

/// Shard 0 led by `a` at epoch 1 and followed by `b`, with the users and boards of
/// `setup_writes` and, when `topics` is given, pin 1 with those topics; `b` caught up.
async fn replicated_pair(first_pin_topics: Option<Vec<u32>>) -> Cluster {
    let groups: &[Group] = &[("0", "a", &["b"], 1)];
    let c = Cluster::start(&["a", "b"], 1, groups, |_, _| {}).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    if let Some(topics) = first_pin_topics {
        write(&c, "a", vec![pin(1, 1, 10, NOW, topics, 0.5)], pb::Ack::Async).await.unwrap();
    }
    c.caught_up("a", &["b"], 0, CATCH_UP).await;
    c
}

async fn write(
    c: &Cluster,
    node: &str,
    mutations: Vec<pb::Mutation>,
    ack: pb::Ack,
) -> Result<pb::WriteResponse, tonic::Status> {
    c.graph(node).await.write(muts::write(mutations, ack)).await.map(|r| r.into_inner())
}

async fn feed_pages(c: &Cluster, node: &str, user: u64, home: bool) -> Vec<(u64, u32)> {
    let mut client = c.feeds(node).await;
    let mut out = Vec::new();
    let mut cursor = String::new();
    for _ in 0..50 {
        let req = pb::FeedRequest {
            user_id: user,
            page_size: 7,
            cursor: cursor.clone(),
            ranking: "static".into(),
            ..Default::default()
        };
        let r = if home { client.get_home_feed(req).await } else { client.get_following_feed(req).await }
            .unwrap()
            .into_inner();
        assert!(!r.stats.unwrap().partial, "node {node}: partial page");
        out.extend(r.items.iter().map(|i| (i.pin_id, i.score.to_bits())));
        if r.next_cursor.is_empty() {
            return out;
        }
        cursor = r.next_cursor;
    }
    panic!("more than 50 pages")
}

async fn assert_replicas_equal(c: &Cluster, leader: &str, followers: &[&str], shards: u32) {
    for shard in 0..shards {
        c.caught_up(leader, followers, shard, CATCH_UP).await;
        let d = c.digest(leader, shard).await;
        for f in followers {
            assert_eq!(c.digest(f, shard).await, d, "shard {shard}: {f} differs from {leader}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_converge_and_answer_feeds_as_the_leader_does() {
    let groups: &[Group] = &[("0-3", "a", &["b", "c"], 1)];
    let c = Cluster::start(&["a", "b", "c"], 4, groups, static_ranking).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut next_pin = 1;
    for round in 0..200 {
        // Writes to a follower's node are routed to the leader.
        let node = ["a", "a", "b", "c"][round % 4];
        match write(&c, node, random_write(&mut rng, &mut next_pin), pb::Ack::Async).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => panic!("write through {node}: {s:?}"),
        }
    }
    assert_replicas_equal(&c, "a", &["b", "c"], 4).await;
    // A caught-up follower answers every feed exactly as the leader does (node b reads
    // its local followers; node a its leaders).
    for viewer in 1..=OWNERS {
        for home in [false, true] {
            assert_eq!(
                feed_pages(&c, "b", viewer, home).await,
                feed_pages(&c, "a", viewer, home).await,
                "viewer {viewer} home {home}"
            );
        }
    }
    // The replicas say what they are.
    let status = c.admin("b").await.list_replicas(ipb::ListReplicasRequest {}).await.unwrap().into_inner();
    assert_eq!(status.replicas.len(), 4);
    for r in &status.replicas {
        assert_eq!(
            (r.role, r.epoch, r.leader.as_str()),
            (ipb::ReplicaRole::Follower as i32, 1, c.addr("a").as_str())
        );
        assert!(r.readable && r.applied_bytes_total > 0, "{r:?}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_clusters_admin_token_replicates_and_writes_nothing() {
    let groups: &[Group] = &[("0-1", "a", &["b"], 1)];
    let c = Cluster::start(&["a", "b"], 2, groups, |id, cfg| {
        static_ranking(id, cfg);
        if id == "b" {
            // b accepts the harness's token (so the test can ask it) but sends another.
            let file = cfg.data_dir.join("own-admin.tokens");
            std::fs::write(&file, format!("another-admin-token-0001\n{}\n", feedgraph_tests::ADMIN_TOKEN))
                .unwrap();
            cfg.auth.admin_tokens_file = Some(file);
        }
    })
    .await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    // A write through b reaches the leader with b's token: refused, nothing written.
    let through_b = write(&c, "b", vec![follow_user(999, 1)], pb::Ack::Async).await;
    assert!(through_b.is_err(), "{through_b:?}");
    let mut states = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let status =
            c.admin("b").await.list_replicas(ipb::ListReplicasRequest {}).await.unwrap().into_inner();
        states = status.replicas.iter().map(|r| (r.applied_sequence, r.readable, r.state.clone())).collect();
        if states.len() == 2
            && states.iter().all(|(_, _, s)| s.contains("admin token is not one the other node accepts"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(states.len(), 2);
    for (applied, readable, state) in &states {
        assert!(state.contains("admin token is not one the other node accepts"), "{states:?}");
        assert_eq!((*applied, *readable), (0, false), "{states:?}");
    }
    let body = feedgraph_tests::metrics_text(c.node("a").metrics_addr()).await;
    assert!(
        body.contains(r#"feedgraph_auth_rejected_total{code="unauthenticated",needs="admin"}"#),
        "{body}"
    );
    let mut graph = c.graph("a").await;
    let follows = graph.get_follows(pb::GetFollowsRequest { user_id: 999 }).await.unwrap().into_inner();
    assert_eq!(follows, pb::GetFollowsResponse::default());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_and_a_restarted_leader_converge() {
    let groups: &[Group] = &[("0-1", "a", &["b"], 1)];
    let mut c = Cluster::start(&["a", "b"], 2, groups, static_ranking).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    // Writes keep coming while the follower stops and starts again.
    let mut graph = c.graph("a").await;
    let writer = tokio::spawn(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut next_pin = 1;
        for _ in 0..300 {
            let w = muts::write(random_write(&mut rng, &mut next_pin), pb::Ack::Async);
            match graph.write(w).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::InvalidArgument => {}
                Err(s) => panic!("{s:?}"),
            }
        }
        next_pin
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.stop("b").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.restart("b").await;
    let mut next_pin = writer.await.unwrap();
    assert_replicas_equal(&c, "a", &["b"], 2).await;

    // The leader restarts at its epoch and the follower goes on from where it was.
    c.stop("a").await;
    c.restart("a").await;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut written = 0;
    for _ in 0..50 {
        match write(&c, "a", random_write(&mut rng, &mut next_pin), pb::Ack::Async).await {
            Ok(_) => written += 1,
            Err(s) if s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(written >= 10, "only {written} writes after the leader's restart");
    assert_replicas_equal(&c, "a", &["b"], 2).await;
    let status = c.node("a").replicas().get(0).unwrap().status();
    assert_eq!((status.role, status.epoch), (Role::Leader { epoch: 1 }, 1));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_left_the_wal_is_rebuilt_from_a_resumed_checkpoint() {
    let groups: &[Group] = &[("0", "a", &["b"], 1)];
    let mut c = Cluster::start(&["a", "b"], 1, groups, |id, cfg| {
        if id == "a" {
            // No WAL retention: obsolete logs go at the next flush.
            cfg.store.wal_ttl_seconds = 0;
            cfg.store.wal_size_limit_mb = 0;
            // Nor batches in memory, which would serve the follower's position.
            cfg.replication.recent_batches_kb = 0;
            cfg.replication.checkpoint_chunk_kb = 4;
            // The first checkpoint stream longer than 128 KiB breaks there (the
            // follower's first, of an empty shard, is about 75 KB).
            cfg.debug.break_checkpoint_after_bytes = Some(128 << 10);
        }
    })
    .await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    c.caught_up("a", &["b"], 0, CATCH_UP).await;
    let position = c.sequence("b", 0);
    c.stop("b").await;
    // A few thousand pins, so that the next checkpoint is well over the break.
    for k in 0..20u64 {
        let batch = (0..200u64)
            .map(|i| {
                let id = 100_000 + k * 200 + i;
                let o = 1 + id % OWNERS;
                pin(id, o, o * 10, NOW - id as i64, (1..=8).collect(), (i % 100) as f32 / 100.0)
            })
            .collect();
        write(&c, "a", batch, pb::Ack::Async).await.unwrap();
    }
    // Enough writes that the checkpoint is large, and flushes until the follower's
    // position has left the leader's WAL.
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let mut next_pin = 1;
    let leader = c.node("a").replicas().get(0).unwrap().store().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..100 {
            let _ = write(&c, "a", random_write(&mut rng, &mut next_pin), pb::Ack::Async).await;
        }
        let l = leader.clone();
        let gap = tokio::task::spawn_blocking(move || {
            l.flush().unwrap();
            matches!(l.updates_since(position, usize::MAX), Err(feedgraph_graph_store::Error::WalGap { .. }))
        })
        .await
        .unwrap();
        if gap {
            break;
        }
        assert!(Instant::now() < deadline, "the WAL was never purged");
    }
    drop(leader);
    c.restart("b").await;
    assert_replicas_equal(&c, "a", &["b"], 1).await;
    let s = c.node("b").replicas().get(0).unwrap().status();
    assert!(s.wal_gaps >= 1, "gap not reported: {s:?}");
    assert!(s.rebuilds >= 1, "not rebuilt: {s:?}");
    assert!(s.checkpoint_resumes >= 1, "the broken stream was not resumed: {s:?}");
    // The metrics say the same.
    let text = feedgraph_tests::metrics_text(c.node("b").metrics_addr()).await;
    for name in ["feedgraph_replica_wal_gaps_total", "feedgraph_replica_checkpoint_resumes_total"] {
        assert!(metric(&text, &format!("{name}{{shard=\"0\"}}")) >= 1.0, "{name}: {text}");
    }
    c.shutdown().await;
}

/// The value of the series `series` (name and labels) in a Prometheus text page.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series}"))
}

async fn found(c: &Cluster, node: &str, pin_id: u64, owner: u64) -> bool {
    let r = c
        .graph(node)
        .await
        .get_pin(pb::GetPinRequest { pin: Some(pb::PinRef { pin_id, owner_id: owner }) })
        .await;
    r.unwrap().into_inner().found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_leader_with_unreplicated_writes_is_rebuilt_not_merged() {
    let c = replicated_pair(Some(vec![])).await;
    // The follower stops replicating; the leader takes writes nobody else has.
    c.transition("b", 0, Role::Offline).await.unwrap();
    for id in 2..=5 {
        write(&c, "a", vec![pin(id, 1, 10, NOW, vec![], 0.5)], pb::Ack::Async).await.unwrap();
    }
    // Failover: the old leader is demoted, the follower promoted under epoch 2 and
    // written to.
    c.transition("a", 0, Role::Offline).await.unwrap();
    c.transition("b", 0, Role::Leader { epoch: 2 }).await.unwrap();
    write(&c, "b", vec![pin(100, 1, 10, NOW, vec![], 0.9)], pb::Ack::Async).await.unwrap();
    // The old leader rejoins as a follower of the new one: its log ran past the point
    // where epoch 2 began, so it is rebuilt from b's checkpoint.
    c.transition("a", 0, Role::Follower { leader: c.addr("b"), epoch: 2 }).await.unwrap();
    assert_replicas_equal(&c, "b", &["a"], 1).await;
    let status = c.node("a").replicas().get(0).unwrap().status();
    assert!(status.rebuilds >= 1, "{status:?}");
    for node in ["a", "b"] {
        assert!(found(&c, node, 1, 1).await && found(&c, node, 100, 1).await, "{node}");
        for id in 2..=5 {
            assert!(!found(&c, node, id, 1).await, "node {node} kept unreplicated pin {id}");
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_and_followers_name_their_leader() {
    let groups: &[Group] = &[("0-1", "a", &["b"], 3)];
    let c = Cluster::start(&["a", "b"], 2, groups, |_, _| {}).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    let shard_of = |user| feedgraph_model::shard_of(feedgraph_model::UserId::new(user).unwrap(), 2);
    let apply = |epoch| ipb::ApplyWritesRequest {
        shard: shard_of(1),
        epoch,
        mutations: vec![pin(9, 1, 10, NOW, vec![], 0.5)],
        ack: pb::Ack::Async as i32,
    };
    // A write at an older (or newer) epoch than the leader's is refused, naming it.
    for epoch in [2, 4] {
        let e = c.shard_client("a").await.apply_writes(apply(epoch)).await.unwrap_err();
        let r = refusal(&e).unwrap();
        assert_eq!(
            (e.code(), r.kind, r.epoch),
            (tonic::Code::FailedPrecondition, RefusalKind::StaleEpoch, Some(3)),
            "{e:?}"
        );
    }
    c.shard_client("a").await.apply_writes(apply(3)).await.unwrap();
    // A write sent to a follower names the leader.
    let e = c.shard_client("b").await.apply_writes(apply(3)).await.unwrap_err();
    let r = refusal(&e).unwrap();
    assert_eq!(
        (e.code(), r.kind, r.leader.as_deref()),
        (tonic::Code::FailedPrecondition, RefusalKind::NotLeader, Some(c.addr("a").as_str()))
    );
    // Log shipping at a stale epoch is refused too.
    let e = ipb::replication_service_client::ReplicationServiceClient::new(c.channel("a").await)
        .get_updates(ipb::GetUpdatesRequest {
            shard: 0,
            epoch: 2,
            follower_node: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(&e).map(|r| (r.kind, r.epoch)), Some((RefusalKind::StaleEpoch, Some(3))));
    // A transition to an older epoch than the replica accepted is refused.
    let e = c.transition("a", 0, Role::Leader { epoch: 2 }).await.unwrap_err();
    assert_eq!(refusal(&e).map(|r| r.kind), Some(RefusalKind::StaleEpoch), "{e:?}");
    // Through the public API a follower's node routes the write to the leader.
    let r = write(&c, "b", vec![pin(10, 1, 10, NOW, vec![], 0.5)], pb::Ack::Async).await.unwrap();
    assert_eq!(r.commits[0].epoch, 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semi_sync_ack_means_a_follower_has_the_write() {
    let groups: &[Group] = &[("0", "a", &["b"], 1)];
    let c = Cluster::start(&["a", "b"], 1, groups, |_, cfg| cfg.replication.semi_sync_timeout_ms = 500).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    let follower = c.node("b").replicas().get(0).unwrap();
    for id in 1..=50u64 {
        let r = write(
            &c,
            "a",
            vec![pin(id, 1 + id % OWNERS, (1 + id % OWNERS) * 10, NOW, vec![], 0.5)],
            pb::Ack::SemiSync,
        )
        .await
        .unwrap();
        // At the moment of the ack the follower holds it (read on the follower itself).
        let store = follower.store().unwrap();
        assert!(store.latest_sequence() >= r.commits[0].sequence);
        assert!(
            store.pin(feedgraph_model::PinId::new(id).unwrap()).unwrap().is_some(),
            "pin {id} not on the follower"
        );
    }
    // No follower: the write is committed on the leader, and the error says so.
    c.transition("b", 0, Role::Offline).await.unwrap();
    let e = write(
        &c,
        "a",
        vec![pin(77, 1 + 77 % OWNERS, (1 + 77 % OWNERS) * 10, NOW, vec![], 0.5)],
        pb::Ack::SemiSync,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("committed on the leader"), "{}", e.message());
    assert!(found(&c, "a", 77, 1 + 77 % OWNERS).await);
    let timeouts = c.node("a").replicas().get(0).unwrap().status().semi_sync_timeouts;
    assert_eq!(timeouts, 1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_sync_on_a_standalone_node_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let config = feedgraph_server::Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        ..feedgraph_server::Config::default()
    };
    let node = feedgraph_server::start(config).await.unwrap();
    let mut g = pb::graph_service_client::GraphServiceClient::connect(format!("http://{}", node.grpc_addr()))
        .await
        .unwrap();
    g.write(muts::write(vec![board(10, 1)], pb::Ack::Async)).await.unwrap();
    let e = g.write(muts::write(vec![pin(1, 1, 10, NOW, vec![], 0.5)], pb::Ack::SemiSync)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let found = g
        .get_pin(pb::GetPinRequest { pin: Some(pb::PinRef { pin_id: 1, owner_id: 1 }) })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(!found);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_that_restarts_steps_down_to_the_newer_epoch() {
    let mut c = replicated_pair(None).await;
    // The leader crashes; the follower is promoted at epoch 2 and written to.
    c.stop("a").await;
    c.transition("b", 0, Role::Leader { epoch: 2 }).await.unwrap();
    write(&c, "b", vec![pin(1, 1, 10, NOW, vec![], 0.5)], pb::Ack::Async).await.unwrap();
    // The old leader comes back with the placement's role (leader at epoch 1), learns
    // from its directory that b leads at epoch 2, and follows it.
    c.restart("a").await;
    let deadline = Instant::now() + CATCH_UP;
    while c.node("a").replicas().get(0).unwrap().role() != (Role::Follower { leader: c.addr("b"), epoch: 2 })
    {
        assert!(
            Instant::now() < deadline,
            "a did not step down: {:?}",
            c.node("a").replicas().get(0).unwrap().status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_replicas_equal(&c, "b", &["a"], 1).await;
    assert!(found(&c, "a", 1, 1).await);
    c.shutdown().await;
}

/// A term has one leader: a follower is not promoted at the epoch of the leader it
/// followed, by RPC or by a placement that forgot to raise the epoch. A leader's
/// `CreateCheckpoint` writes an exact copy under its backups directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_has_one_leader() {
    let mut c = replicated_pair(Some(vec![2])).await;

    let mut admin = c.admin("a").await;
    for bad in ["../escape", "/tmp/x", "a/b", "..", ""] {
        let e = admin
            .create_checkpoint(ipb::CreateCheckpointRequest { shard: 0, directory: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
    }
    let r = admin
        .create_checkpoint(ipb::CreateCheckpointRequest { shard: 0, directory: "snap".into() })
        .await
        .unwrap()
        .into_inner();
    let path = c.data_dir("a").join("backups").join("snap");
    assert_eq!((r.sequence, r.directory.as_str()), (c.sequence("a", 0), path.to_str().unwrap()));
    let copy =
        feedgraph_graph_store::Shard::open_replica(&path, &feedgraph_graph_store::ShardOptions::new(0))
            .unwrap();
    assert_eq!(copy.digest().unwrap(), c.digest("a", 0).await);
    drop(copy);

    let e = c.transition("b", 0, Role::Leader { epoch: 1 }).await.unwrap_err();
    assert_eq!(refusal(&e).map(|r| (r.kind, r.epoch)), Some((RefusalKind::StaleEpoch, Some(1))), "{e:?}");
    assert_eq!(
        c.node("b").replicas().get(0).unwrap().role(),
        Role::Follower { leader: c.addr("a"), epoch: 1 }
    );

    c.stop("b").await;
    c.stop("a").await;
    c.set_placement(&[("0", "b", &["a"], 1)]);
    let e = c.try_restart("b").await.unwrap_err();
    assert!(e.contains("a new leader needs a higher epoch"), "{e}");
    c.set_placement(&[("0", "b", &["a"], 2)]);
    c.restart("b").await;
    c.restart("a").await;
    write(&c, "b", vec![pin(2, 2, 20, NOW, vec![], 0.5)], pb::Ack::Async).await.unwrap();
    assert_replicas_equal(&c, "b", &["a"], 1).await;
    assert!(found(&c, "a", 2, 2).await);
    c.shutdown().await;
}

/// A leader whose disk was replaced comes back with an empty shard of another lineage:
/// its follower keeps its data, goes on serving it and does not follow — never wipes
/// itself to copy an empty leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_its_data_when_its_leader_comes_back_empty() {
    let mut c = replicated_pair(Some(vec![])).await;
    let before = c.digest("b", 0).await;
    let follower = c.node("b").replicas().get(0).unwrap();
    let rebuilds = follower.status().rebuilds;

    c.stop("a").await;
    for lost in ["shard-000", "replicas"] {
        std::fs::remove_dir_all(c.data_dir("a").join(lost)).unwrap();
    }
    c.restart("a").await;
    let deadline = Instant::now() + CATCH_UP;
    while !follower.status().state.contains("another database") {
        assert!(Instant::now() < deadline, "b did not refuse the empty leader: {:?}", follower.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.digest("b", 0).await, before);
    assert!(follower.status().readable);
    assert_eq!(follower.status().rebuilds, rebuilds);
    c.shutdown().await;
}

/// A replica found diverged stays out of reads and leadership across a restart, and is
/// rebuilt from its leader as soon as it can reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divergence_survives_a_restart_until_the_rebuild() {
    let mut c = replicated_pair(None).await;
    // As the follower loop records a divergence, with the leader down meanwhile.
    c.stop("a").await;
    c.stop("b").await;
    let marker = c.data_dir("b").join("replicas").join("shard-000.rebuild");
    std::fs::write(&marker, b"").unwrap();
    c.restart("b").await;
    let follower = c.node("b").replicas().get(0).unwrap();
    assert!(!follower.status().readable);
    let e = c.transition("b", 0, Role::Leader { epoch: 2 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    c.restart("a").await;
    let deadline = Instant::now() + CATCH_UP;
    while marker.exists() || !follower.status().readable {
        assert!(Instant::now() < deadline, "b was not rebuilt: {:?}", follower.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(follower.status().rebuilds, 1);
    assert_replicas_equal(&c, "a", &["b"], 1).await;
    c.shutdown().await;
}

/// Every replica keeps the leader's batch boundaries in its WAL: after a failover, a
/// follower whose position fell between batches the new leader received in one
/// response is served from the new leader's WAL, not rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_follower_serves_every_other_followers_position() {
    let groups: &[Group] = &[("0", "a", &["b", "c"], 1)];
    // No batches kept in memory: positions are served from the WAL alone.
    let mut c =
        Cluster::start(&["a", "b", "c"], 1, groups, |_, cfg| cfg.replication.recent_batches_kb = 0).await;
    write(&c, "a", setup_writes(), pb::Ack::Async).await.unwrap();
    c.caught_up("a", &["b", "c"], 0, CATCH_UP).await;
    c.stop("b").await;
    c.stop("c").await;
    // Ten writes of one pin each, pins `first..first + 10`.
    let writes = |first: u64| {
        (first..first + 10).map(|id| vec![pin(id, 1 + id % OWNERS, (1 + id % OWNERS) * 10, NOW, vec![], 0.5)])
    };
    for w in writes(1) {
        write(&c, "a", w, pb::Ack::Async).await.unwrap();
    }
    // c catches up to here, then stops between batches.
    c.restart("c").await;
    c.caught_up("a", &["c"], 0, CATCH_UP).await;
    c.stop("c").await;
    for w in writes(11) {
        write(&c, "a", w, pb::Ack::Async).await.unwrap();
    }
    // b receives all twenty batches at once.
    c.restart("b").await;
    c.caught_up("a", &["b"], 0, CATCH_UP).await;
    // a fails; b leads at epoch 2; c comes back as its follower.
    c.stop("a").await;
    c.set_placement(&[("0", "b", &["a", "c"], 2)]);
    c.transition("b", 0, Role::Leader { epoch: 2 }).await.unwrap();
    c.restart("c").await;
    c.caught_up("b", &["c"], 0, CATCH_UP).await;
    let status = c.node("c").replicas().get(0).unwrap().status();
    assert_eq!((status.rebuilds, status.wal_gaps), (0, 0), "{status:?}");
    assert_replicas_equal(&c, "b", &["c"], 1).await;
    c.shutdown().await;
}
