//! Authentication by role over real gRPC on 127.0.0.1: every service of a node (and of
//! a standalone scorer) without a token, with an unknown token, with a token of each
//! role; refused writes write nothing; refusals are counted; a node's own calls to a
//! scorer carry its admin token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{http_get, metric};

use std::time::Duration;

use feedgraph_proto::auth::{AuthChannel, Bearer, Role, Secret, with_bearer};
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_server::Config;
use feedgraph_server::auth::RoleTokens;
use pb::mutation::Op;
use tonic::Code;

const READ: &str = "read-token-for-tests-0001";
const WRITE: &str = "write-token-for-tests-0001";
const ADMIN: &str = "admin-token-for-tests-0001";
const UNKNOWN: &str = "nobody-configured-this-token";
const NOW: i64 = 1_800_000_000_000;
const SHARDS: u32 = 2;

fn secret(t: &str) -> Secret {
    Secret::new(t).unwrap()
}

fn tokens() -> RoleTokens {
    RoleTokens { read: vec![secret(READ)], write: vec![secret(WRITE)], admin: vec![secret(ADMIN)] }
}

fn channel(addr: std::net::SocketAddr, token: Option<&str>) -> AuthChannel {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    with_bearer(channel, Bearer::new(token.map(secret).as_ref()))
}

/// The clients a test holds, with one token (or none).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    FollowingFeed,
    HomeFeed,
    GetPin,
    GetFollows,
    Write,
    UpsertSignals,
    Reflection,
    ListReplicas,
    TransitionReplica,
    FenceReplica,
    CreateCheckpoint,
    GetUpdates,
    StreamCheckpoint,
    ShardGetPin,
    ApplyWrites,
    ListModels,
    ScoreBatch,
}

impl Call {
    const ALL: [Call; 17] = [
        Call::FollowingFeed,
        Call::HomeFeed,
        Call::GetPin,
        Call::GetFollows,
        Call::Write,
        Call::UpsertSignals,
        Call::Reflection,
        Call::ListReplicas,
        Call::TransitionReplica,
        Call::FenceReplica,
        Call::CreateCheckpoint,
        Call::GetUpdates,
        Call::StreamCheckpoint,
        Call::ShardGetPin,
        Call::ApplyWrites,
        Call::ListModels,
        Call::ScoreBatch,
    ];

    fn needs(self) -> Role {
        match self {
            Call::FollowingFeed | Call::HomeFeed | Call::GetPin | Call::GetFollows | Call::Reflection => {
                Role::Read
            }
            Call::Write | Call::UpsertSignals => Role::Write,
            Call::ListReplicas
            | Call::TransitionReplica
            | Call::FenceReplica
            | Call::CreateCheckpoint
            | Call::GetUpdates
            | Call::StreamCheckpoint
            | Call::ShardGetPin
            | Call::ApplyWrites
            | Call::ListModels
            | Call::ScoreBatch => Role::Admin,
        }
    }

    /// Makes the call; `Write` adds pin `pin` (owner 1, board 10), `ApplyWrites` pin
    /// `pin + 1000`, `UpsertSignals` sets pin 1001's quality to `quality`; the admin
    /// calls that would change a replica name a shard that does not exist. The code of
    /// the answer, `Ok` for success.
    async fn run(self, ch: AuthChannel, pin: u64, quality: f32) -> Code {
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        let feed = pb::FeedRequest { user_id: 5, page_size: 10, ..Default::default() };
        let pin_ref = Some(pb::PinRef { pin_id: 1001, owner_id: 1 });
        match self {
            Call::FollowingFeed => code(
                pb::feed_service_client::FeedServiceClient::new(ch).get_following_feed(feed).await.map(drop),
            ),
            Call::HomeFeed => {
                code(pb::feed_service_client::FeedServiceClient::new(ch).get_home_feed(feed).await.map(drop))
            }
            Call::GetPin => code(
                pb::graph_service_client::GraphServiceClient::new(ch)
                    .get_pin(pb::GetPinRequest { pin: pin_ref })
                    .await
                    .map(drop),
            ),
            Call::GetFollows => code(
                pb::graph_service_client::GraphServiceClient::new(ch)
                    .get_follows(pb::GetFollowsRequest { user_id: 5 })
                    .await
                    .map(drop),
            ),
            Call::Write => code(
                pb::graph_service_client::GraphServiceClient::new(ch).write(write_pin(pin)).await.map(drop),
            ),
            Call::UpsertSignals => {
                let update = pb::UpsertSignalsRequest {
                    updates: vec![pb::UpdateSignals {
                        pin: pin_ref,
                        update: Some(pb::SignalsUpdate { quality: Some(quality), ..Default::default() }),
                    }],
                };
                code(
                    pb::graph_service_client::GraphServiceClient::new(ch)
                        .upsert_signals(tokio_stream::iter([update]))
                        .await
                        .map(drop),
                )
            }
            Call::Reflection => {
                use tonic_reflection::pb::v1 as rpb;
                let ask = rpb::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(rpb::server_reflection_request::MessageRequest::ListServices(
                        String::new(),
                    )),
                };
                let mut client = rpb::server_reflection_client::ServerReflectionClient::new(ch);
                match client.server_reflection_info(tokio_stream::iter([ask])).await {
                    Ok(r) => code(r.into_inner().message().await.map(drop)),
                    Err(s) => s.code(),
                }
            }
            Call::ListReplicas => code(
                ipb::admin_service_client::AdminServiceClient::new(ch)
                    .list_replicas(ipb::ListReplicasRequest {})
                    .await
                    .map(drop),
            ),
            Call::TransitionReplica => code(
                ipb::admin_service_client::AdminServiceClient::new(ch)
                    .transition_replica(ipb::TransitionReplicaRequest {
                        shard: 999,
                        target: ipb::ReplicaRole::Offline as i32,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            Call::FenceReplica => code(
                ipb::admin_service_client::AdminServiceClient::new(ch)
                    .fence_replica(ipb::FenceReplicaRequest { shard: 999, epoch: 1 })
                    .await
                    .map(drop),
            ),
            Call::CreateCheckpoint => code(
                ipb::admin_service_client::AdminServiceClient::new(ch)
                    .create_checkpoint(ipb::CreateCheckpointRequest {
                        shard: 999,
                        directory: format!("b{pin}"),
                    })
                    .await
                    .map(drop),
            ),
            Call::StreamCheckpoint => {
                let r = ipb::replication_service_client::ReplicationServiceClient::new(ch)
                    .stream_checkpoint(ipb::StreamCheckpointRequest { shard: 999, ..Default::default() })
                    .await;
                match r {
                    Ok(s) => code(s.into_inner().message().await.map(drop)),
                    Err(s) => s.code(),
                }
            }
            Call::ApplyWrites => {
                let shard = feedgraph_model::shard_of(feedgraph_model::UserId::new(1).unwrap(), SHARDS);
                code(
                    ipb::shard_service_client::ShardServiceClient::new(ch)
                        .apply_writes(ipb::ApplyWritesRequest {
                            shard,
                            epoch: 0,
                            mutations: write_pin(pin + 1000).mutations,
                            ack: pb::Ack::Async as i32,
                        })
                        .await
                        .map(drop),
                )
            }
            Call::ScoreBatch => code(
                ipb::scorer_service_client::ScorerServiceClient::new(ch)
                    .score_batch(ipb::ScoreBatchRequest { model: "nope".into(), ..Default::default() })
                    .await
                    .map(drop),
            ),
            Call::GetUpdates => code(
                ipb::replication_service_client::ReplicationServiceClient::new(ch)
                    .get_updates(ipb::GetUpdatesRequest { shard: 0, wait_ms: 0, ..Default::default() })
                    .await
                    .map(drop),
            ),
            Call::ShardGetPin => code(
                ipb::shard_service_client::ShardServiceClient::new(ch)
                    .get_pin(ipb::ShardGetPinRequest { shard: 0, pin: pin_ref, read_after: None })
                    .await
                    .map(drop),
            ),
            Call::ListModels => code(
                ipb::scorer_service_client::ScorerServiceClient::new(ch)
                    .list_models(ipb::ListModelsRequest {})
                    .await
                    .map(drop),
            ),
        }
    }
}

fn write_pin(pin: u64) -> pb::WriteRequest {
    let pin = pb::Mutation {
        op: Some(Op::UpsertPin(pb::UpsertPin {
            pin_id: pin,
            board_id: 10,
            owner_id: 1,
            created_at_ms: NOW,
            signals: Some(pb::PinSignals { quality: 0.5, ..Default::default() }),
            topic_ids: vec![],
        })),
    };
    pb::WriteRequest { mutations: vec![pin], ack: pb::Ack::Async as i32, request_id: String::new() }
}

async fn start_node(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> feedgraph_server::Node {
    let models = dir.join("models");
    feedgraph_server::demo::ensure_models(&models).unwrap();
    let mut config = Config {
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: SHARDS,
        ..Config::default()
    };
    config.scorer.model_dir = Some(models);
    config.auth.env_tokens = tokens();
    tweak(&mut config);
    feedgraph_server::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_checks_the_token_and_its_role() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), |_| {}).await;
    let addr = node.grpc_addr();
    let admin = channel(addr, Some(ADMIN));
    // The board the writes go to.
    let board = pb::Mutation {
        op: Some(Op::UpsertBoard(pb::UpsertBoard { board_id: 10, owner_id: 1, name: "b".into() })),
    };
    pb::graph_service_client::GraphServiceClient::new(admin.clone())
        .write(pb::WriteRequest {
            mutations: vec![board],
            ack: pb::Ack::Async as i32,
            request_id: String::new(),
        })
        .await
        .unwrap();
    pb::graph_service_client::GraphServiceClient::new(admin.clone()).write(write_pin(1001)).await.unwrap();

    let presented: [(Option<&str>, Option<Role>); 5] = [
        (None, None),
        (Some(UNKNOWN), None),
        (Some(READ), Some(Role::Read)),
        (Some(WRITE), Some(Role::Write)),
        (Some(ADMIN), Some(Role::Admin)),
    ];
    let (mut unauthenticated, mut denied) = (0u64, 0u64);
    let mut graph = pb::graph_service_client::GraphServiceClient::new(admin.clone());
    let mut quality = 0.5;
    for (k, (token, role)) in presented.iter().enumerate() {
        let ch = channel(addr, *token);
        let asked = k as f32 / 100.0;
        for call in Call::ALL {
            let got = call.run(ch.clone(), 2000 + k as u64, asked).await;
            match role {
                None => {
                    assert_eq!(got, Code::Unauthenticated, "{call:?} with {token:?}");
                    unauthenticated += 1;
                }
                Some(r) if *r < call.needs() => {
                    assert_eq!(got, Code::PermissionDenied, "{call:?} with a {r} token");
                    denied += 1;
                }
                Some(r) => assert!(
                    !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                    "{call:?} with a {r} token: {got:?}"
                ),
            }
        }
        // A refused signal upsert changed nothing; an allowed one set its value.
        if role.is_some_and(|r| r >= Role::Write) {
            quality = asked;
        }
        let pin =
            graph.get_pin(pb::GetPinRequest { pin: Some(pb::PinRef { pin_id: 1001, owner_id: 1 }) }).await;
        assert_eq!(
            pin.unwrap().into_inner().pin.unwrap().signals.unwrap().quality,
            quality,
            "after token #{k}"
        );
    }
    // Only the writes made with a role allowed to make them landed.
    for (k, (_, role)) in presented.iter().enumerate() {
        let found = |pin_id| {
            let mut graph = graph.clone();
            async move {
                let pin = Some(pb::PinRef { pin_id, owner_id: 1 });
                graph.get_pin(pb::GetPinRequest { pin }).await.unwrap().into_inner().found
            }
        };
        assert_eq!(found(2000 + k as u64).await, role.is_some_and(|r| r >= Role::Write), "Write, token #{k}");
        assert_eq!(found(3000 + k as u64).await, role == &Some(Role::Admin), "ApplyWrites, token #{k}");
    }

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr, None));
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    let body = http_get(node.metrics_addr(), "/metrics").await;
    let counted = |code: &str| -> u64 {
        ["read", "write", "admin"]
            .iter()
            .map(|needs| {
                metric(&body, &format!("feedgraph_auth_rejected_total{{code=\"{code}\",needs=\"{needs}\"}}"))
            })
            .sum()
    };
    assert_eq!(
        (counted("unauthenticated"), counted("permission_denied")),
        (unauthenticated, denied),
        "{body}"
    );
    // 17 methods × (no token, an unknown one); a read token on 2 write and 10 admin
    // methods, a write token on the 10 admin ones.
    assert_eq!((unauthenticated, denied), (34, 12 + 10));
    assert!(!body.contains(ADMIN) && !body.contains(READ), "a token in the metrics");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sends_its_scorer_token_or_else_its_admin_token_to_a_scorer() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("scorer-models");
    feedgraph_server::demo::ensure_models(&models).unwrap();
    let scorer = feedgraph_server::scorer::start_scorer(feedgraph_server::ScorerServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        model_dir: models,
        log: "warn".into(),
        auth: feedgraph_server::config::AuthConfig { env_tokens: tokens(), ..Default::default() },
        ..Default::default()
    })
    .await
    .unwrap();
    let endpoint = format!("http://{}", scorer.grpc_addr());
    let list = |token| {
        let mut c = ipb::scorer_service_client::ScorerServiceClient::new(channel(scorer.grpc_addr(), token));
        async move { c.list_models(ipb::ListModelsRequest {}).await.map_err(|s| s.code()).map(drop) }
    };
    assert_eq!(list(None).await, Err(Code::Unauthenticated));
    assert_eq!(list(Some(UNKNOWN)).await, Err(Code::Unauthenticated));
    assert_eq!(list(Some(WRITE)).await, Err(Code::PermissionDenied));
    assert_eq!(list(Some(ADMIN)).await, Ok(()));

    // Nodes use the scorer: one holds the scorer's admin token, one another, and one
    // another with the scorer's token configured as its scorer token (so that the
    // scorer needs no credential of the cluster's).
    let scoring_of = |other_admin: bool, scorer_token: bool| {
        let endpoint = endpoint.clone();
        let dir = dir.path().join(format!("{other_admin}-{scorer_token}"));
        async move {
            let node = start_node(&dir, |c| {
                c.scorer.model_dir = None;
                c.scorer.endpoint = Some(endpoint);
                c.scorer.model = "engagement_mlp".into();
                c.scorer.deadline_ms = 2_000;
                c.feed.max_per_owner = 1000;
                c.feed.max_per_board = 1000;
                if other_admin {
                    c.auth.env_tokens.admin = vec![secret("another-admin-token-0001")];
                }
                if scorer_token {
                    c.scorer.env_token = feedgraph_server::config::EnvSecret(Some(ADMIN.into()));
                }
            })
            .await;
            let admin =
                channel(node.grpc_addr(), Some(if other_admin { "another-admin-token-0001" } else { ADMIN }));
            let mut graph = pb::graph_service_client::GraphServiceClient::new(admin.clone());
            let mut muts = vec![pb::Mutation {
                op: Some(Op::UpsertBoard(pb::UpsertBoard { board_id: 10, owner_id: 1, name: "b".into() })),
            }];
            muts.extend((0..5).flat_map(|p| write_pin(3000 + p).mutations));
            muts.push(pb::Mutation {
                op: Some(Op::Follow(pb::Follow {
                    follower_id: 5,
                    target: Some(pb::FollowTarget { target: Some(pb::follow_target::Target::UserId(1)) }),
                })),
            });
            graph
                .write(pb::WriteRequest {
                    mutations: muts,
                    ack: pb::Ack::Async as i32,
                    request_id: String::new(),
                })
                .await
                .unwrap();
            let r = pb::feed_service_client::FeedServiceClient::new(admin)
                .get_following_feed(pb::FeedRequest { user_id: 5, page_size: 5, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            node.shutdown().await.unwrap();
            assert_eq!(r.items.len(), 5);
            pb::Scoring::try_from(r.stats.unwrap_or_default().scoring).unwrap()
        }
    };
    assert_eq!(scoring_of(false, false).await, pb::Scoring::Model);
    assert_eq!(scoring_of(true, false).await, pb::Scoring::LightFallback);
    assert_eq!(scoring_of(true, true).await, pb::Scoring::Model);
    let body = http_get(scorer.metrics_addr(), "/metrics").await;
    assert!(
        metric(&body, r#"feedgraph_auth_rejected_total{code="unauthenticated",needs="admin"}"#) >= 2,
        "{body}"
    );
    scorer.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_added_and_revoked_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (read_file, admin_file) = (dir.path().join("read.tokens"), dir.path().join("admin.tokens"));
    std::fs::write(&read_file, format!("{READ}\n")).unwrap();
    std::fs::write(&admin_file, format!("{ADMIN}\n")).unwrap();
    let node = start_node(dir.path(), |c| {
        c.auth.env_tokens = RoleTokens::default();
        c.auth.read_tokens_file = Some(read_file.clone());
        c.auth.admin_tokens_file = Some(admin_file.clone());
        c.auth.reload_interval_ms = 50;
    })
    .await;
    let addr = node.grpc_addr();
    let feed = |token: &'static str| {
        let mut client = pb::feed_service_client::FeedServiceClient::new(channel(addr, Some(token)));
        async move {
            let r = pb::FeedRequest { user_id: 5, page_size: 5, ..Default::default() };
            client.get_following_feed(r).await.map(drop).map_err(|s| s.code())
        }
    };
    // Waits (bounded) until `token` gets `expected`.
    let until = |token: &'static str, expected: Result<(), Code>| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = feed(token).await;
            if got == expected {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{token}: {got:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    const ROTATED: &str = "read-token-rotated-0002";
    assert_eq!(feed(ROTATED).await, Err(Code::Unauthenticated));
    // A rotation: the new token is added, then the old one removed.
    std::fs::write(&read_file, format!("{READ}\n{ROTATED}\n")).unwrap();
    until(ROTATED, Ok(())).await;
    assert_eq!(feed(READ).await, Ok(()));
    std::fs::write(&read_file, format!("{ROTATED}\n")).unwrap();
    until(READ, Err(Code::Unauthenticated)).await;
    // An emptied file does not load: the tokens in force stay, and it is counted.
    std::fs::write(&read_file, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = http_get(node.metrics_addr(), "/metrics").await;
        if metric(&body, r#"feedgraph_auth_token_reloads_total{result="refused"}"#) >= 1 {
            assert!(metric(&body, r#"feedgraph_auth_token_reloads_total{result="loaded"}"#) >= 2, "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(feed(ROTATED).await, Ok(()));
    node.shutdown().await.unwrap();
}
