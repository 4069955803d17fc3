//! The internal shard protocol's messages ⇄ domain types, both directions in one place
//! (the shard service decodes what the remote client encodes). Values from the wire are
//! checked: ids non-zero, enums known, lengths consistent.

use std::sync::Arc;

use feedgraph_graph_store::{Follows, PinRecord};
use feedgraph_model::{BoardId, PinId, TopicId, UserId};
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_retrieval::ReadAfter;
use feedgraph_retrieval::query::{Candidate, CandidateQuery, ShardAnswer, Source};
use feedgraph_scoring::Expr;
use tonic::Status;

fn bad(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(what.to_string())
}

fn ids<T>(raw: &[u64], field: &str, make: impl Fn(u64) -> Option<T>) -> Result<Vec<T>, Status> {
    raw.iter()
        .enumerate()
        .map(|(i, v)| make(*v).ok_or_else(|| bad(format!("{field}[{i}]: must be non-zero"))))
        .collect()
}

fn topics(raw: &[u32], field: &str) -> Result<Vec<TopicId>, Status> {
    raw.iter()
        .enumerate()
        .map(|(i, v)| TopicId::new(*v).ok_or_else(|| bad(format!("{field}[{i}]: must be non-zero"))))
        .collect()
}

pub fn read_after_to_proto(a: ReadAfter) -> Option<ipb::ReadAfter> {
    (a != ReadAfter::default()).then_some(ipb::ReadAfter { epoch: a.epoch, sequence: a.sequence })
}

pub fn read_after(a: Option<ipb::ReadAfter>) -> feedgraph_cluster::ReadAfter {
    a.map(|a| feedgraph_cluster::ReadAfter { epoch: a.epoch, sequence: a.sequence }).unwrap_or_default()
}

pub fn query_to_proto(shard: u32, q: &CandidateQuery, after: ReadAfter) -> ipb::CandidateQueryRequest {
    ipb::CandidateQueryRequest {
        shard,
        viewer_id: q.viewer.get(),
        user_ids: q.users.iter().map(|u| u.get()).collect(),
        board_ids: q.boards.iter().map(|b| b.get()).collect(),
        topic_ids: q.topics.iter().map(|t| t.get()).collect(),
        engaged_topic_ids: q.engaged_topics.iter().map(|t| t.get()).collect(),
        blocked_owner_ids: q.blocked.iter().map(|u| u.get()).collect(),
        top_k: q.top_k.min(u32::MAX as usize) as u32,
        scan_limit: q.scan_limit.min(u32::MAX as usize) as u32,
        score_expr: q.expr.source().to_owned(),
        request_values: q.request_values.clone(),
        now_ms: q.now_ms,
        ordinal_bound: q.ordinal_bound,
        read_after: read_after_to_proto(after),
        full_scan: q.full_scan,
    }
}

/// Most candidates one shard may be asked to return or scan.
const MAX_TOP_K: u32 = 100_000;

/// A request's query, with its expression compiled (by the caller's cache).
pub fn query_from_proto(r: &ipb::CandidateQueryRequest, expr: Arc<Expr>) -> Result<CandidateQuery, Status> {
    let viewer = UserId::new(r.viewer_id).ok_or_else(|| bad("viewer_id: must be non-zero"))?;
    if r.request_values.len() != expr.request_features().len()
        || r.request_values.iter().any(|v| !v.is_finite())
    {
        return Err(bad(format!(
            "request_values: the expression reads {} request features; {} finite values are needed",
            expr.request_features().len(),
            expr.request_features().len()
        )));
    }
    if r.top_k > MAX_TOP_K {
        return Err(Status::resource_exhausted(format!("top_k: at most {MAX_TOP_K}")));
    }
    Ok(CandidateQuery {
        viewer,
        users: ids(&r.user_ids, "user_ids", UserId::new)?,
        boards: ids(&r.board_ids, "board_ids", BoardId::new)?,
        topics: topics(&r.topic_ids, "topic_ids")?,
        engaged_topics: topics(&r.engaged_topic_ids, "engaged_topic_ids")?,
        blocked: ids(&r.blocked_owner_ids, "blocked_owner_ids", UserId::new)?,
        top_k: r.top_k as usize,
        scan_limit: r.scan_limit as usize,
        expr,
        request_values: r.request_values.clone(),
        now_ms: r.now_ms,
        ordinal_bound: r.ordinal_bound,
        full_scan: r.full_scan,
    })
}

fn source_to_proto(s: Source) -> pb::FeedSource {
    match s {
        Source::FollowedUser => pb::FeedSource::FollowedUser,
        Source::FollowedBoard => pb::FeedSource::FollowedBoard,
        Source::FollowedTopic => pb::FeedSource::FollowedTopic,
        Source::EngagedTopic => pb::FeedSource::EngagedTopic,
    }
}

fn candidate_to_proto(c: &Candidate) -> ipb::Candidate {
    ipb::Candidate {
        pin_id: c.pin.get(),
        owner_id: c.owner.get(),
        board_id: c.board.get(),
        created_at_ms: c.created_at_ms,
        score: c.score,
        source: source_to_proto(c.source) as i32,
        signals: Some(c.signals.into()),
    }
}

fn candidate_from_proto(c: ipb::Candidate) -> Result<Candidate, Status> {
    let source = match pb::FeedSource::try_from(c.source) {
        Ok(pb::FeedSource::FollowedUser) => Source::FollowedUser,
        Ok(pb::FeedSource::FollowedBoard) => Source::FollowedBoard,
        Ok(pb::FeedSource::FollowedTopic) => Source::FollowedTopic,
        Ok(pb::FeedSource::EngagedTopic) => Source::EngagedTopic,
        _ => return Err(bad(format!("candidate {}: unknown source {}", c.pin_id, c.source))),
    };
    let s = c.signals.unwrap_or_default();
    Ok(Candidate {
        pin: PinId::new(c.pin_id).ok_or_else(|| bad("candidate pin_id: must be non-zero"))?,
        owner: UserId::new(c.owner_id).ok_or_else(|| bad("candidate owner_id: must be non-zero"))?,
        board: BoardId::new(c.board_id).ok_or_else(|| bad("candidate board_id: must be non-zero"))?,
        created_at_ms: c.created_at_ms,
        score: c.score,
        source,
        signals: feedgraph_model::PinSignals {
            quality: s.quality,
            saves: s.saves,
            clicks: s.clicks,
            closeups: s.closeups,
        },
    })
}

pub fn answer_to_proto(a: &ShardAnswer) -> ipb::CandidateQueryResponse {
    ipb::CandidateQueryResponse {
        following: a.following.iter().map(candidate_to_proto).collect(),
        interest: a.interest.iter().map(candidate_to_proto).collect(),
        scanned: a.scanned,
        watermark: a.watermark,
    }
}

pub fn answer_from_proto(r: ipb::CandidateQueryResponse) -> Result<ShardAnswer, Status> {
    Ok(ShardAnswer {
        following: r.following.into_iter().map(candidate_from_proto).collect::<Result<_, _>>()?,
        interest: r.interest.into_iter().map(candidate_from_proto).collect::<Result<_, _>>()?,
        scanned: r.scanned,
        watermark: r.watermark,
    })
}

/// A query's failure inside a `CandidateQueries` answer: the status `CandidateQuery`
/// would have answered with, metadata (typed refusals) included.
pub fn refusal_to_proto(s: &Status) -> ipb::QueryRefusal {
    let metadata = s
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    ipb::QueryRefusal { code: s.code() as i32, message: s.message().to_owned(), metadata }
}

/// The status a refusal stands for (a bad metadata entry is dropped: the code and
/// message remain).
pub fn refusal_from_proto(r: ipb::QueryRefusal) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &r.metadata {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(v.as_str()),
        ) {
            metadata.insert(k, v);
        }
    }
    Status::with_metadata(tonic::Code::from_i32(r.code), r.message, metadata)
}

pub fn follows_to_proto(f: &Follows) -> pb::GetFollowsResponse {
    pb::GetFollowsResponse {
        user_ids: f.users.iter().map(|u| u.get()).collect(),
        boards: f.boards.iter().map(|(b, o)| pb::BoardRef { board_id: b.get(), owner_id: o.get() }).collect(),
        topic_ids: f.topics.iter().map(|t| t.get()).collect(),
        blocked_user_ids: f.blocked.iter().map(|u| u.get()).collect(),
    }
}

pub fn follows_from_proto(r: pb::GetFollowsResponse) -> Result<Follows, Status> {
    Ok(Follows {
        users: ids(&r.user_ids, "user_ids", UserId::new)?,
        boards: r
            .boards
            .iter()
            .map(|b| BoardId::new(b.board_id).zip(UserId::new(b.owner_id)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("boards: ids must be non-zero"))?,
        topics: topics(&r.topic_ids, "topic_ids")?,
        blocked: ids(&r.blocked_user_ids, "blocked_user_ids", UserId::new)?,
    })
}

pub fn pin_to_proto(r: &PinRecord) -> pb::Pin {
    pb::Pin {
        pin_id: r.id.get(),
        owner_id: r.owner.get(),
        board_id: r.board.get(),
        created_at_ms: r.created_at_ms,
        topic_ids: r.topics.iter().map(|t| t.get()).collect(),
        signals: Some(r.signals.into()),
        deleted: r.deleted,
        spam: r.spam,
        r#unsafe: r.is_unsafe,
    }
}

pub fn pin_from_proto(p: pb::Pin) -> Result<PinRecord, Status> {
    let s = p.signals.unwrap_or_default();
    Ok(PinRecord {
        id: PinId::new(p.pin_id).ok_or_else(|| bad("pin_id: must be non-zero"))?,
        owner: UserId::new(p.owner_id).ok_or_else(|| bad("owner_id: must be non-zero"))?,
        board: BoardId::new(p.board_id).ok_or_else(|| bad("board_id: must be non-zero"))?,
        created_at_ms: p.created_at_ms,
        topics: topics(&p.topic_ids, "topic_ids")?,
        signals: feedgraph_model::PinSignals {
            quality: s.quality,
            saves: s.saves,
            clicks: s.clicks,
            closeups: s.closeups,
        },
        deleted: p.deleted,
        spam: p.spam,
        is_unsafe: p.r#unsafe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_in_a_batch_keep_their_code_and_typed_metadata() {
        use feedgraph_proto::refusal::{RefusalKind, refusal};
        let status = feedgraph_cluster::service::status(feedgraph_cluster::Error::NotLeader {
            shard: 3,
            leader: Some("127.0.0.1:7001".into()),
            epoch: 7,
        });
        let back = refusal_from_proto(refusal_to_proto(&status));
        assert_eq!(back.code(), status.code());
        assert_eq!(back.message(), status.message());
        let r = refusal(&back).expect("a typed refusal");
        assert_eq!(r.kind, RefusalKind::NotLeader);
        assert_eq!(r.leader.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(r.epoch, Some(7));
        // A status without metadata stays a plain status.
        let plain = refusal_from_proto(refusal_to_proto(&Status::unavailable("gone")));
        assert_eq!((plain.code(), plain.message()), (tonic::Code::Unavailable, "gone"));
        assert!(refusal(&plain).is_none());
    }

    #[test]
    fn queries_and_answers_survive_the_wire() {
        let expr = Arc::new(Expr::compile("quality + req.boost").unwrap());
        let uid = |v| UserId::new(v).unwrap();
        let q = CandidateQuery {
            viewer: uid(1),
            users: vec![uid(2), uid(3)],
            boards: vec![BoardId::new(4).unwrap()],
            topics: vec![TopicId::new(5).unwrap()],
            engaged_topics: vec![TopicId::new(6).unwrap()],
            blocked: vec![uid(7)],
            top_k: 500,
            scan_limit: 20_000,
            expr: expr.clone(),
            request_values: vec![0.25],
            now_ms: 1_800_000_000_000,
            ordinal_bound: Some(77),
            full_scan: true,
        };
        let wire = query_to_proto(3, &q, ReadAfter { epoch: 2, sequence: 9 });
        let back = query_from_proto(&wire, expr.clone()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{q:?}"));
        assert_eq!(read_after(wire.read_after), feedgraph_cluster::ReadAfter { epoch: 2, sequence: 9 });
        let mut short = wire.clone();
        short.request_values.clear();
        assert!(query_from_proto(&short, expr).is_err());

        let c = Candidate {
            pin: PinId::new(10).unwrap(),
            owner: uid(2),
            board: BoardId::new(4).unwrap(),
            created_at_ms: 5,
            // Not representable as f32: the wire keeps full precision.
            score: 0.1 + 0.2,
            source: Source::FollowedBoard,
            signals: feedgraph_model::PinSignals { quality: 0.5, saves: 1, clicks: 2, closeups: 3 },
        };
        let a = ShardAnswer { following: vec![c.clone()], interest: vec![], scanned: 9, watermark: 44 };
        let back = answer_from_proto(answer_to_proto(&a)).unwrap();
        assert_eq!(back.following, vec![c]);
        assert_eq!((back.scanned, back.watermark), (9, 44));
    }
}
