//! Targets over public decoders (the stores' own are in `graph_store::fuzz_targets` and
//! `cluster::fuzz_targets`, next to the private code they reach).

use std::sync::Arc;

use feedgraph_proto::pb::internal as ipb;
use feedgraph_proto::pb::v1 as pb;
use prost::Message;

/// Text inputs are taken as UTF-8, lossily: the parsers read files and config strings.
fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A cursor as a client sends it back, and a cursor body behind a valid MAC.
pub fn cursor(data: &[u8]) {
    feedgraph_retrieval::fuzz_targets::cursor(data);
}

/// `GetFollowingFeed` / `GetHomeFeed` request → domain.
pub fn feed_request(data: &[u8]) {
    if let Ok(r) = pb::FeedRequest::decode(data) {
        let _ = feedgraph_model::FeedRequest::try_from(r);
    }
}

/// `Write` request → domain (every mutation kind).
pub fn write_request(data: &[u8]) {
    if let Ok(r) = pb::WriteRequest::decode(data) {
        let _ = feedgraph_proto::WriteRequest::try_from(r);
    }
}

/// One message of the `UpsertSignals` stream → domain.
pub fn signals_request(data: &[u8]) {
    if let Ok(r) = pb::UpsertSignalsRequest::decode(data) {
        for u in r.updates {
            let _ = <(feedgraph_model::PinRef, feedgraph_model::SignalsUpdate)>::try_from(u);
        }
    }
}

/// A candidate query from another node's broker → domain (the shard service).
pub fn candidate_query(data: &[u8]) {
    if let Ok(r) = ipb::CandidateQueryRequest::decode(data)
        && let Ok(expr) = feedgraph_scoring::Expr::compile("quality")
    {
        let _ = feedgraph_server::wire::query_from_proto(&r, Arc::new(expr));
    }
}

/// A shard's answer to a candidate query, as the broker receives it from another node.
pub fn shard_answer(data: &[u8]) {
    if let Ok(r) = ipb::CandidateQueryResponse::decode(data) {
        let _ = feedgraph_server::wire::answer_from_proto(r);
    }
}

/// A placement file (TOML).
pub fn placement(data: &[u8]) {
    let _ = feedgraph_cluster::Placement::parse(&text(data));
}

/// A ranking expression (configuration, and the shard service's queries); compiled,
/// then evaluated and bounded once.
pub fn expression(data: &[u8]) {
    if let Ok(e) = feedgraph_scoring::Expr::compile(&text(data)) {
        let vars = [0.5; feedgraph_scoring::PIN_VARIABLES.len()];
        let req = vec![1.0; e.request_features().len()];
        let _ = e.eval(&vars, &req, &mut Vec::new());
    }
}

/// A LightGBM text model (`model.txt`), parsed and scored on two rows.
pub fn gbdt_model(data: &[u8]) {
    if let Ok(m) = feedgraph_scoring::gbdt::Ensemble::parse(&text(data), "fuzz") {
        let rows = vec![0.25; 2 * m.features().min(4096)];
        let _ = m.predict(&rows);
    }
}

/// A model's feature schema (`schema.toml`).
pub fn model_schema(data: &[u8]) {
    let _ = feedgraph_scoring::FeatureSchema::parse(&text(data), "fuzz");
}

/// An ONNX model (`model.onnx`) taking 4 features, scored on two rows.
pub fn onnx_model(data: &[u8]) {
    if let Ok(m) = feedgraph_scoring::onnx::Network::load(data, 4, "fuzz") {
        let _ = m.predict(&[0.5; 8]);
    }
}

/// A token file (one token per line).
pub fn tokens(data: &[u8]) {
    let _ = feedgraph_proto::auth::Secret::parse_list(&text(data));
}

/// Valid inputs to start from, for the targets in this file: requests as clients and
/// nodes encode them, the demo's model files (the LightGBM model cut to two trees),
/// the example placement, the default rankings.
pub fn seeds() -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |path: &str| std::fs::read(root.join(path));
    let pin_ref = |pin| Some(pb::PinRef { pin_id: pin, owner_id: 7 });
    let target = |t| Some(pb::FollowTarget { target: Some(t) });
    use pb::follow_target::Target as T;
    use pb::mutation::Op;
    let ops = vec![
        Op::UpsertUser(pb::UpsertUser { user_id: 7, username: "ann".into() }),
        Op::UpsertBoard(pb::UpsertBoard { board_id: 3, owner_id: 7, name: "b".into() }),
        Op::UpsertPin(pb::UpsertPin {
            pin_id: 42,
            board_id: 3,
            owner_id: 7,
            created_at_ms: 1_800_000_000_000,
            topic_ids: vec![5, 9],
            signals: Some(pb::PinSignals { quality: 0.7, saves: 3, clicks: 2, closeups: 1 }),
        }),
        Op::Follow(pb::Follow { follower_id: 1, target: target(T::UserId(7)) }),
        Op::Follow(pb::Follow {
            follower_id: 1,
            target: target(T::Board(pb::BoardRef { board_id: 3, owner_id: 7 })),
        }),
        Op::Unfollow(pb::Unfollow { follower_id: 1, target: target(T::TopicId(5)) }),
        Op::DeletePin(pb::DeletePin { pin: pin_ref(42) }),
        Op::FlagPin(pb::FlagPin { pin: pin_ref(42), flag: pb::PinFlag::Spam as i32, clear: false }),
        Op::RecordImpressions(pb::RecordImpressions {
            user_id: 1,
            pins: vec![pin_ref(42).unwrap_or_default()],
        }),
        Op::BlockUser(pb::BlockUser { user_id: 1, blocked_user_id: 9 }),
        Op::UnblockUser(pb::UnblockUser { user_id: 1, blocked_user_id: 9 }),
        Op::UpdateSignals(pb::UpdateSignals {
            pin: pin_ref(42),
            update: Some(pb::SignalsUpdate { quality: Some(0.9), saves: Some(4), ..Default::default() }),
        }),
    ];
    let write = pb::WriteRequest {
        mutations: ops.into_iter().map(|op| pb::Mutation { op: Some(op) }).collect(),
        ack: pb::Ack::Sync as i32,
        request_id: "r1".into(),
    };
    let feed = pb::FeedRequest {
        user_id: 1,
        page_size: 25,
        cursor: String::new(),
        ranking: "default".into(),
        features: [("boost".to_owned(), 1.5f32)].into_iter().collect(),
        request_id: "r2".into(),
    };
    let signals = pb::UpsertSignalsRequest {
        updates: vec![pb::UpdateSignals {
            pin: pin_ref(42),
            update: Some(pb::SignalsUpdate { quality: Some(0.5), clicks: Some(2), ..Default::default() }),
        }],
    };
    let query = ipb::CandidateQueryRequest {
        shard: 1,
        viewer_id: 1,
        user_ids: vec![7, 8],
        board_ids: vec![3],
        topic_ids: vec![5],
        engaged_topic_ids: vec![9],
        blocked_owner_ids: vec![66],
        top_k: 50,
        scan_limit: 10_000,
        score_expr: "quality".into(),
        request_values: Vec::new(),
        now_ms: 1_800_000_000_000,
        ordinal_bound: Some(100),
        read_after: None,
        full_scan: false,
    };
    let candidate = |pin| ipb::Candidate {
        pin_id: pin,
        owner_id: 7,
        board_id: 3,
        created_at_ms: 1_800_000_000_000,
        score: 0.75,
        source: pb::FeedSource::FollowedUser as i32,
        signals: Some(pb::PinSignals { quality: 0.7, saves: 3, clicks: 2, closeups: 1 }),
    };
    let answer = ipb::CandidateQueryResponse {
        following: vec![candidate(42), candidate(43)],
        interest: vec![candidate(44)],
        scanned: 120,
        watermark: 100,
    };
    let manifest = ipb::CheckpointManifest {
        checkpoint_id: "c-1".into(),
        sequence: 1234,
        epoch: 2,
        files: ["000012.sst", "MANIFEST-000005", "CURRENT", "OPTIONS-000007"]
            .iter()
            .enumerate()
            .map(|(i, name)| ipb::CheckpointFile { name: (*name).into(), size: 100 + i as u64, crc32c: 7 })
            .collect(),
        total_bytes: 406,
    };
    let gbdt = String::from_utf8_lossy(&read("scoring/models/engagement_gbdt/1/model.txt")?).into_owned();
    let two_trees: Vec<&str> = gbdt.lines().take_while(|l| !l.starts_with("Tree=2")).collect();
    let mut seeds = vec![
        ("write_request", write.encode_to_vec()),
        ("feed_request", feed.encode_to_vec()),
        ("signals_request", signals.encode_to_vec()),
        ("candidate_query", query.encode_to_vec()),
        ("shard_answer", answer.encode_to_vec()),
        ("checkpoint_manifest", manifest.encode_to_vec()),
        ("gbdt_model", format!("{}\nend of trees\n", two_trees.join("\n")).into_bytes()),
        ("model_schema", read("scoring/models/engagement_gbdt/1/schema.toml")?),
        ("onnx_model", read("scoring/models/engagement_mlp/1/model.onnx")?),
        ("placement", read("docs/placement.example.toml")?),
        ("tokens", b"# rotation\nfirst-token-0123456789\nsecond-token-abcdefghij\n".to_vec()),
    ];
    for expr in [
        "2*quality + 0.3*ln(1 + saves) - age_hours/48",
        "ln(1 + saves) + 0.5*ln(1 + closeups) - age_days/7",
        "max(quality, req.boost) * exp(-age_hours / 24) + min(1, clicks / (1 + closeups))",
    ] {
        seeds.push(("expression", expr.as_bytes().to_vec()));
    }
    Ok(seeds)
}
