//! feedgraph's gRPC contract and the edge where wire types become domain types.
//!
//! Owns: the `.proto` files under `proto/` (public: `feedgraph.v1` graph writes and
//! feeds; internal: `feedgraph.internal.v1` shard queries, replication, admin, scorer),
//! the tonic/prost code generated from them at build time by `protox` (no system
//! `protoc`), the encoded descriptor set for gRPC reflection, the conversions
//! between prost messages and `feedgraph-model` types, and the role each RPC needs
//! with the credentials clients present ([`auth`]).
//!
//! Invariants: prost types stop here. Every conversion from the wire is a `TryFrom` that
//! either yields a fully valid domain value or a [`FieldError`] naming the offending
//! field by its path in the request (`mutations[3].upsert_pin.board_id`), so that a
//! server can answer `INVALID_ARGUMENT` without writing anything.

pub mod auth;
pub mod refusal;

use feedgraph_model as model;
use model::{BoardId, PinId, TopicId, UserId};

/// Generated code, one module per protobuf package.
pub mod pb {
    /// `feedgraph.*` packages.
    pub mod feedgraph {
        /// Public API: graph writes and feeds.
        pub mod v1 {
            #![allow(clippy::all, missing_debug_implementations)]
            tonic::include_proto!("feedgraph.v1");
        }
        /// Internal API: shard queries, replication, admin, scorer.
        pub mod internal {
            /// Version 1 of the internal API.
            pub mod v1 {
                #![allow(clippy::all, missing_debug_implementations)]
                tonic::include_proto!("feedgraph.internal.v1");
            }
        }
    }
    pub use feedgraph::internal::v1 as internal;
    pub use feedgraph::v1;
}

/// Encoded `FileDescriptorSet` of every service, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/feedgraph_descriptor.bin"));

/// Upper bound on the mutations of one write request; larger requests are
/// `RESOURCE_EXHAUSTED` (checked by the server, named here so clients can batch).
pub const MAX_MUTATIONS_PER_WRITE: usize = 10_000;

/// A request field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid field `{field}`: {reason}")]
pub struct FieldError {
    /// Path of the field in the request, e.g. `mutations[3].upsert_pin.board_id`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// Prefixes the field path with the enclosing field.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

type Result<T> = std::result::Result<T, FieldError>;

fn user_id(field: &str, raw: u64) -> Result<UserId> {
    UserId::new(raw).ok_or_else(|| FieldError::new(field, "must be a non-zero user id"))
}

fn board_id(field: &str, raw: u64) -> Result<BoardId> {
    BoardId::new(raw).ok_or_else(|| FieldError::new(field, "must be a non-zero board id"))
}

fn pin_id(field: &str, raw: u64) -> Result<PinId> {
    PinId::new(raw).ok_or_else(|| FieldError::new(field, "must be a non-zero pin id"))
}

fn topic_id(field: &str, raw: u32) -> Result<TopicId> {
    TopicId::new(raw).ok_or_else(|| FieldError::new(field, "must be a non-zero topic id"))
}

fn required<T>(field: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| FieldError::new(field, "is required"))
}

fn check_quality(field: &str, q: f32) -> Result<f32> {
    if q.is_finite() && (0.0..=1.0).contains(&q) {
        Ok(q)
    } else {
        Err(FieldError::new(field, format!("must be a number in [0, 1], got {q}")))
    }
}

/// Most request features one feed request may carry.
pub const MAX_REQUEST_FEATURES: usize = 64;
/// Longest user name, board name or request feature name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most topics one pin may carry.
pub const MAX_TOPICS_PER_PIN: usize = 64;
/// Most pins one `RecordImpressions` may name.
pub const MAX_IMPRESSIONS_PER_MUTATION: usize = 10_000;

fn check_name(field: &str, name: String) -> Result<String> {
    if name.len() > MAX_NAME_BYTES {
        return Err(FieldError::new(field, format!("is longer than {MAX_NAME_BYTES} bytes")));
    }
    Ok(name)
}

impl TryFrom<pb::v1::PinRef> for model::PinRef {
    type Error = FieldError;
    fn try_from(p: pb::v1::PinRef) -> Result<Self> {
        Ok(Self { pin: pin_id("pin_id", p.pin_id)?, owner: user_id("owner_id", p.owner_id)? })
    }
}

impl From<model::PinRef> for pb::v1::PinRef {
    fn from(p: model::PinRef) -> Self {
        Self { pin_id: p.pin.get(), owner_id: p.owner.get() }
    }
}

fn pin_ref(field: &str, p: Option<pb::v1::PinRef>) -> Result<model::PinRef> {
    model::PinRef::try_from(required(field, p)?).map_err(|e| e.within(field))
}

impl TryFrom<pb::v1::FollowTarget> for model::FollowTarget {
    type Error = FieldError;
    fn try_from(t: pb::v1::FollowTarget) -> Result<Self> {
        use pb::v1::follow_target::Target;
        match t.target {
            Some(Target::UserId(u)) => Ok(Self::User(user_id("user_id", u)?)),
            Some(Target::Board(b)) => Ok(Self::Board {
                board: board_id("board.board_id", b.board_id)?,
                owner: user_id("board.owner_id", b.owner_id)?,
            }),
            Some(Target::TopicId(t)) => Ok(Self::Topic(topic_id("topic_id", t)?)),
            None => Err(FieldError::new("target", "one of user_id, board, topic_id is required")),
        }
    }
}

impl From<model::FollowTarget> for pb::v1::FollowTarget {
    fn from(t: model::FollowTarget) -> Self {
        use pb::v1::follow_target::Target;
        let target = match t {
            model::FollowTarget::User(u) => Target::UserId(u.get()),
            model::FollowTarget::Board { board, owner } => {
                Target::Board(pb::v1::BoardRef { board_id: board.get(), owner_id: owner.get() })
            }
            model::FollowTarget::Topic(t) => Target::TopicId(t.get()),
        };
        Self { target: Some(target) }
    }
}

fn follow_target(t: Option<pb::v1::FollowTarget>) -> Result<model::FollowTarget> {
    model::FollowTarget::try_from(required("target", t)?).map_err(|e| e.within("target"))
}

impl TryFrom<pb::v1::SignalsUpdate> for model::SignalsUpdate {
    type Error = FieldError;
    fn try_from(u: pb::v1::SignalsUpdate) -> Result<Self> {
        Ok(Self {
            quality: u.quality.map(|q| check_quality("quality", q)).transpose()?,
            saves: u.saves,
            clicks: u.clicks,
            closeups: u.closeups,
        })
    }
}

impl From<model::SignalsUpdate> for pb::v1::SignalsUpdate {
    fn from(u: model::SignalsUpdate) -> Self {
        Self { quality: u.quality, saves: u.saves, clicks: u.clicks, closeups: u.closeups }
    }
}

impl TryFrom<pb::v1::PinSignals> for model::PinSignals {
    type Error = FieldError;
    fn try_from(s: pb::v1::PinSignals) -> Result<Self> {
        Ok(Self {
            quality: check_quality("quality", s.quality)?,
            saves: s.saves,
            clicks: s.clicks,
            closeups: s.closeups,
        })
    }
}

impl From<model::PinSignals> for pb::v1::PinSignals {
    fn from(s: model::PinSignals) -> Self {
        Self { quality: s.quality, saves: s.saves, clicks: s.clicks, closeups: s.closeups }
    }
}

impl TryFrom<pb::v1::UpsertPin> for model::Pin {
    type Error = FieldError;
    fn try_from(p: pb::v1::UpsertPin) -> Result<Self> {
        if p.created_at_ms <= 0 {
            return Err(FieldError::new("created_at_ms", "must be a positive Unix time in ms"));
        }
        if p.topic_ids.len() > MAX_TOPICS_PER_PIN {
            return Err(FieldError::new("topic_ids", format!("at most {MAX_TOPICS_PER_PIN} topics per pin")));
        }
        let mut topics = p
            .topic_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| topic_id(&format!("topic_ids[{i}]"), t))
            .collect::<Result<Vec<_>>>()?;
        topics.sort_unstable();
        topics.dedup();
        let signals = match p.signals {
            Some(s) => model::PinSignals::try_from(s).map_err(|e| e.within("signals"))?,
            None => model::PinSignals::default(),
        };
        Ok(Self {
            id: pin_id("pin_id", p.pin_id)?,
            owner: user_id("owner_id", p.owner_id)?,
            board: board_id("board_id", p.board_id)?,
            created_at_ms: p.created_at_ms,
            topics,
            signals,
        })
    }
}

impl From<model::Pin> for pb::v1::UpsertPin {
    fn from(p: model::Pin) -> Self {
        Self {
            pin_id: p.id.get(),
            board_id: p.board.get(),
            owner_id: p.owner.get(),
            created_at_ms: p.created_at_ms,
            topic_ids: p.topics.iter().map(|t| t.get()).collect(),
            signals: Some(p.signals.into()),
        }
    }
}

impl TryFrom<pb::v1::UpdateSignals> for (model::PinRef, model::SignalsUpdate) {
    type Error = FieldError;
    fn try_from(u: pb::v1::UpdateSignals) -> Result<Self> {
        let pin = pin_ref("pin", u.pin)?;
        let update =
            model::SignalsUpdate::try_from(required("update", u.update)?).map_err(|e| e.within("update"))?;
        Ok((pin, update))
    }
}

impl TryFrom<pb::v1::Mutation> for model::Mutation {
    type Error = FieldError;
    fn try_from(m: pb::v1::Mutation) -> Result<Self> {
        use pb::v1::mutation::Op;
        let op = required("op", m.op)?;
        let (name, converted) = match op {
            Op::UpsertUser(u) => (
                "upsert_user",
                (|| {
                    Ok(model::Mutation::UpsertUser(model::User {
                        id: user_id("user_id", u.user_id)?,
                        username: check_name("username", u.username)?,
                    }))
                })(),
            ),
            Op::UpsertBoard(b) => (
                "upsert_board",
                (|| {
                    Ok(model::Mutation::UpsertBoard(model::Board {
                        id: board_id("board_id", b.board_id)?,
                        owner: user_id("owner_id", b.owner_id)?,
                        name: check_name("name", b.name)?,
                    }))
                })(),
            ),
            Op::UpsertPin(p) => ("upsert_pin", model::Pin::try_from(p).map(model::Mutation::UpsertPin)),
            Op::Follow(f) => (
                "follow",
                (|| {
                    Ok(model::Mutation::Follow {
                        follower: user_id("follower_id", f.follower_id)?,
                        target: follow_target(f.target)?,
                    })
                })(),
            ),
            Op::Unfollow(f) => (
                "unfollow",
                (|| {
                    Ok(model::Mutation::Unfollow {
                        follower: user_id("follower_id", f.follower_id)?,
                        target: follow_target(f.target)?,
                    })
                })(),
            ),
            Op::DeletePin(d) => ("delete_pin", pin_ref("pin", d.pin).map(model::Mutation::DeletePin)),
            Op::FlagPin(f) => (
                "flag_pin",
                (|| {
                    let flag = match pb::v1::PinFlag::try_from(f.flag) {
                        Ok(pb::v1::PinFlag::Spam) => model::PinFlag::Spam,
                        Ok(pb::v1::PinFlag::Unsafe) => model::PinFlag::Unsafe,
                        Ok(pb::v1::PinFlag::Unspecified) | Err(_) => {
                            return Err(FieldError::new("flag", "must be SPAM or UNSAFE"));
                        }
                    };
                    Ok(model::Mutation::FlagPin { pin: pin_ref("pin", f.pin)?, flag, on: !f.clear })
                })(),
            ),
            Op::RecordImpressions(r) => (
                "record_impressions",
                (|| {
                    if r.pins.len() > MAX_IMPRESSIONS_PER_MUTATION {
                        return Err(FieldError::new(
                            "pins",
                            format!("at most {MAX_IMPRESSIONS_PER_MUTATION} pins"),
                        ));
                    }
                    let pins = r
                        .pins
                        .into_iter()
                        .enumerate()
                        .map(|(i, p)| model::PinRef::try_from(p).map_err(|e| e.within(&format!("pins[{i}]"))))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(model::Mutation::RecordImpressions { user: user_id("user_id", r.user_id)?, pins })
                })(),
            ),
            Op::BlockUser(b) => (
                "block_user",
                (|| {
                    Ok(model::Mutation::BlockUser {
                        user: user_id("user_id", b.user_id)?,
                        blocked: user_id("blocked_user_id", b.blocked_user_id)?,
                    })
                })(),
            ),
            Op::UnblockUser(b) => (
                "unblock_user",
                (|| {
                    Ok(model::Mutation::UnblockUser {
                        user: user_id("user_id", b.user_id)?,
                        blocked: user_id("blocked_user_id", b.blocked_user_id)?,
                    })
                })(),
            ),
            Op::UpdateSignals(u) => (
                "update_signals",
                <(model::PinRef, model::SignalsUpdate)>::try_from(u)
                    .map(|(pin, update)| model::Mutation::UpdateSignals { pin, update }),
            ),
        };
        converted.map_err(|e| e.within(name))
    }
}

impl From<model::Mutation> for pb::v1::Mutation {
    fn from(m: model::Mutation) -> Self {
        use pb::v1 as p;
        use pb::v1::mutation::Op;
        let op = match m {
            model::Mutation::UpsertUser(u) => {
                Op::UpsertUser(p::UpsertUser { user_id: u.id.get(), username: u.username })
            }
            model::Mutation::UpsertBoard(b) => Op::UpsertBoard(p::UpsertBoard {
                board_id: b.id.get(),
                owner_id: b.owner.get(),
                name: b.name,
            }),
            model::Mutation::UpsertPin(pin) => Op::UpsertPin(pin.into()),
            model::Mutation::Follow { follower, target } => {
                Op::Follow(p::Follow { follower_id: follower.get(), target: Some(target.into()) })
            }
            model::Mutation::Unfollow { follower, target } => {
                Op::Unfollow(p::Unfollow { follower_id: follower.get(), target: Some(target.into()) })
            }
            model::Mutation::DeletePin(pin) => Op::DeletePin(p::DeletePin { pin: Some(pin.into()) }),
            model::Mutation::FlagPin { pin, flag, on } => Op::FlagPin(p::FlagPin {
                pin: Some(pin.into()),
                flag: match flag {
                    model::PinFlag::Spam => p::PinFlag::Spam,
                    model::PinFlag::Unsafe => p::PinFlag::Unsafe,
                } as i32,
                clear: !on,
            }),
            model::Mutation::RecordImpressions { user, pins } => {
                Op::RecordImpressions(p::RecordImpressions {
                    user_id: user.get(),
                    pins: pins.into_iter().map(Into::into).collect(),
                })
            }
            model::Mutation::BlockUser { user, blocked } => {
                Op::BlockUser(p::BlockUser { user_id: user.get(), blocked_user_id: blocked.get() })
            }
            model::Mutation::UnblockUser { user, blocked } => {
                Op::UnblockUser(p::UnblockUser { user_id: user.get(), blocked_user_id: blocked.get() })
            }
            model::Mutation::UpdateSignals { pin, update } => {
                Op::UpdateSignals(p::UpdateSignals { pin: Some(pin.into()), update: Some(update.into()) })
            }
        };
        Self { op: Some(op) }
    }
}

/// A validated write request.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRequest {
    pub mutations: Vec<model::Mutation>,
    pub ack: model::Ack,
    pub request_id: String,
}

fn ack(raw: i32) -> Result<model::Ack> {
    match pb::v1::Ack::try_from(raw) {
        Ok(pb::v1::Ack::Unspecified | pb::v1::Ack::Async) => Ok(model::Ack::Async),
        Ok(pb::v1::Ack::Sync) => Ok(model::Ack::Sync),
        Ok(pb::v1::Ack::SemiSync) => Ok(model::Ack::SemiSync),
        Err(_) => Err(FieldError::new("ack", format!("unknown value {raw}"))),
    }
}

impl TryFrom<pb::v1::WriteRequest> for WriteRequest {
    type Error = FieldError;
    fn try_from(r: pb::v1::WriteRequest) -> Result<Self> {
        if r.mutations.is_empty() {
            return Err(FieldError::new("mutations", "must not be empty"));
        }
        let mutations = r
            .mutations
            .into_iter()
            .enumerate()
            .map(|(i, m)| model::Mutation::try_from(m).map_err(|e| e.within(&format!("mutations[{i}]"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { mutations, ack: ack(r.ack)?, request_id: r.request_id })
    }
}

impl TryFrom<pb::v1::FeedRequest> for model::FeedRequest {
    type Error = FieldError;
    fn try_from(r: pb::v1::FeedRequest) -> Result<Self> {
        let page_size = std::num::NonZeroU32::new(r.page_size)
            .ok_or_else(|| FieldError::new("page_size", "must be at least 1"))?;
        if r.features.len() > MAX_REQUEST_FEATURES {
            return Err(FieldError::new("features", format!("at most {MAX_REQUEST_FEATURES} features")));
        }
        let mut features = std::collections::BTreeMap::new();
        for (name, value) in r.features {
            if name.len() > MAX_NAME_BYTES {
                return Err(FieldError::new(
                    "features",
                    format!("a name is longer than {MAX_NAME_BYTES} bytes"),
                ));
            }
            if !value.is_finite() {
                return Err(FieldError::new(format!("features[{name}]"), "must be a finite number"));
            }
            features.insert(name, f64::from(value));
        }
        if r.ranking.len() > MAX_NAME_BYTES {
            return Err(FieldError::new("ranking", format!("is longer than {MAX_NAME_BYTES} bytes")));
        }
        Ok(Self {
            user: user_id("user_id", r.user_id)?,
            page_size,
            cursor: Some(r.cursor).filter(|c| !c.is_empty()),
            ranking: Some(r.ranking).filter(|c| !c.is_empty()),
            features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::v1 as p;

    fn pin_mutation(board_id: u64, topics: Vec<u32>) -> p::Mutation {
        p::Mutation {
            op: Some(p::mutation::Op::UpsertPin(p::UpsertPin {
                pin_id: 5,
                board_id,
                owner_id: 2,
                created_at_ms: 1_700_000_000_000,
                topic_ids: topics,
                signals: None,
            })),
        }
    }

    #[test]
    fn bad_field_is_named_by_its_path() {
        let req = p::WriteRequest {
            mutations: vec![pin_mutation(3, vec![1]), pin_mutation(0, vec![1])],
            ack: 0,
            request_id: String::new(),
        };
        let err = WriteRequest::try_from(req).unwrap_err();
        assert_eq!(err.field, "mutations[1].upsert_pin.board_id");

        let req = p::WriteRequest {
            mutations: vec![pin_mutation(3, vec![1, 0])],
            ack: 0,
            request_id: String::new(),
        };
        let err = WriteRequest::try_from(req).unwrap_err();
        assert_eq!(err.field, "mutations[0].upsert_pin.topic_ids[1]");
    }

    #[test]
    fn nested_refs_and_enums_are_checked() {
        let m = p::Mutation {
            op: Some(p::mutation::Op::FlagPin(p::FlagPin {
                pin: Some(p::PinRef { pin_id: 1, owner_id: 0 }),
                flag: p::PinFlag::Spam as i32,
                clear: false,
            })),
        };
        assert_eq!(model::Mutation::try_from(m).unwrap_err().field, "flag_pin.pin.owner_id");
        let m = p::Mutation {
            op: Some(p::mutation::Op::FlagPin(p::FlagPin {
                pin: Some(p::PinRef { pin_id: 1, owner_id: 1 }),
                flag: 0,
                clear: false,
            })),
        };
        assert_eq!(model::Mutation::try_from(m).unwrap_err().field, "flag_pin.flag");
        let m = p::Mutation { op: Some(p::mutation::Op::Follow(p::Follow { follower_id: 1, target: None })) };
        assert_eq!(model::Mutation::try_from(m).unwrap_err().field, "follow.target");
        let m = p::Mutation {
            op: Some(p::mutation::Op::RecordImpressions(p::RecordImpressions {
                user_id: 1,
                pins: vec![p::PinRef { pin_id: 1, owner_id: 1 }, p::PinRef { pin_id: 0, owner_id: 1 }],
            })),
        };
        assert_eq!(model::Mutation::try_from(m).unwrap_err().field, "record_impressions.pins[1].pin_id");
        assert_eq!(model::Mutation::try_from(p::Mutation { op: None }).unwrap_err().field, "op");
    }

    #[test]
    fn quality_out_of_range_is_rejected() {
        let m = p::Mutation {
            op: Some(p::mutation::Op::UpsertPin(p::UpsertPin {
                pin_id: 5,
                board_id: 1,
                owner_id: 2,
                created_at_ms: 1,
                topic_ids: vec![],
                signals: Some(p::PinSignals { quality: f32::NAN, ..Default::default() }),
            })),
        };
        assert_eq!(model::Mutation::try_from(m).unwrap_err().field, "upsert_pin.signals.quality");
    }

    #[test]
    fn topics_are_sorted_and_deduplicated() {
        match model::Mutation::try_from(pin_mutation(3, vec![9, 2, 9])).unwrap() {
            model::Mutation::UpsertPin(pin) => {
                assert_eq!(pin.topics.iter().map(|t| t.get()).collect::<Vec<_>>(), [2, 9]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_mutation_round_trips() {
        let u = |v| UserId::new(v).unwrap();
        let pr = model::PinRef { pin: PinId::new(9).unwrap(), owner: u(2) };
        let all = vec![
            model::Mutation::UpsertUser(model::User { id: u(1), username: "ann".into() }),
            model::Mutation::UpsertBoard(model::Board {
                id: BoardId::new(4).unwrap(),
                owner: u(1),
                name: "b".into(),
            }),
            model::Mutation::UpsertPin(model::Pin {
                id: PinId::new(9).unwrap(),
                owner: u(2),
                board: BoardId::new(4).unwrap(),
                created_at_ms: 10,
                topics: vec![TopicId::new(3).unwrap()],
                signals: model::PinSignals { quality: 0.5, saves: 1, clicks: 2, closeups: 3 },
            }),
            model::Mutation::Follow { follower: u(1), target: model::FollowTarget::User(u(2)) },
            model::Mutation::Unfollow {
                follower: u(1),
                target: model::FollowTarget::Board { board: BoardId::new(4).unwrap(), owner: u(2) },
            },
            model::Mutation::Follow {
                follower: u(1),
                target: model::FollowTarget::Topic(TopicId::new(8).unwrap()),
            },
            model::Mutation::DeletePin(pr),
            model::Mutation::FlagPin { pin: pr, flag: model::PinFlag::Unsafe, on: false },
            model::Mutation::RecordImpressions { user: u(1), pins: vec![pr] },
            model::Mutation::BlockUser { user: u(1), blocked: u(3) },
            model::Mutation::UnblockUser { user: u(1), blocked: u(3) },
            model::Mutation::UpdateSignals {
                pin: pr,
                update: model::SignalsUpdate { saves: Some(4), ..Default::default() },
            },
        ];
        for m in all {
            let wire = p::Mutation::from(m.clone());
            assert_eq!(model::Mutation::try_from(wire).unwrap(), m);
        }
    }

    #[test]
    fn feed_request_checks_page_size_and_user() {
        let r = p::FeedRequest { user_id: 1, page_size: 0, ..Default::default() };
        assert_eq!(model::FeedRequest::try_from(r).unwrap_err().field, "page_size");
        let r = p::FeedRequest { user_id: 0, page_size: 5, ..Default::default() };
        assert_eq!(model::FeedRequest::try_from(r).unwrap_err().field, "user_id");
        let mut r = p::FeedRequest { user_id: 1, page_size: 5, ..Default::default() };
        r.features.insert("boost".into(), f32::INFINITY);
        assert_eq!(model::FeedRequest::try_from(r).unwrap_err().field, "features[boost]");
        let r = p::FeedRequest { user_id: 1, page_size: 5, ..Default::default() };
        let f = model::FeedRequest::try_from(r).unwrap();
        assert_eq!(f.cursor, None);
        assert_eq!(f.ranking, None);
    }

    #[test]
    fn descriptor_set_is_embedded() {
        assert!(FILE_DESCRIPTOR_SET.len() > 1000);
    }
}
