//! What the broker tells the ML scorer about each candidate: named features, computed
//! once here for serving and for the training export (`feedgraph export-features`), so
//! that a model is trained on exactly what it is served.
//!
//! Item features describe one candidate among the list being scored; context features
//! (`user.*`) describe the viewer and the request. The request's own `user.*` features
//! (sent by the frontend: sessions, tenure, device...) are forwarded; the broker's
//! context features override a request feature of the same name.

use std::collections::{HashMap, HashSet};

use feedgraph_graph_store::Follows;
use feedgraph_model::FeedRequest;
use feedgraph_scoring::ScoreBatch;

use crate::cursor::FeedKind;
use crate::query::{Candidate, Source};

/// Item feature names, in the order of [`item_features`]' values.
pub const ITEM_FEATURES: [&str; 16] = [
    "quality",
    "saves",
    "clicks",
    "closeups",
    "age_hours",
    "click_rate",
    "closeup_rate",
    "light_score",
    "from_user",
    "from_board",
    "from_topic",
    "from_engaged_topic",
    "position",
    "follows_owner",
    "owner_share",
    "board_share",
];

/// Context features the broker computes (request features may add more `user.*`).
pub const CONTEXT_FEATURES: [&str; 5] =
    ["user.follows_users", "user.follows_boards", "user.follows_topics", "user.home", "user.candidates"];

/// The prefix of request features forwarded to the scorer.
pub const USER_PREFIX: &str = "user.";

/// Feature rows of `list` (in list order), for a viewer with `follows` at `now_ms`.
pub fn item_features(list: &[Candidate], follows: &Follows, now_ms: i64) -> Vec<[f32; 16]> {
    let followed: HashSet<u64> = follows.users.iter().map(|u| u.get()).collect();
    let mut per_owner: HashMap<u64, u32> = HashMap::new();
    let mut per_board: HashMap<u64, u32> = HashMap::new();
    for c in list {
        *per_owner.entry(c.owner.get()).or_default() += 1;
        *per_board.entry(c.board.get()).or_default() += 1;
    }
    let n = list.len().max(1) as f64;
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    list.iter()
        .enumerate()
        .map(|(position, c)| {
            let s = &c.signals;
            let saves = f64::from(s.saves);
            let age_hours = ((now_ms - c.created_at_ms) as f64 / 3_600_000.0).max(0.0);
            let share = |m: &HashMap<u64, u32>, k: u64| f64::from(m.get(&k).copied().unwrap_or(0)) / n;
            [
                f64::from(s.quality),
                saves,
                f64::from(s.clicks),
                f64::from(s.closeups),
                age_hours,
                f64::from(s.clicks) / (saves + 1.0),
                f64::from(s.closeups) / (saves + 1.0),
                // A light score can be -inf (NaN expressions sort last): the scorer
                // refuses non-finite values, so clamp.
                c.score.clamp(-1e6, 1e6),
                flag(c.source == Source::FollowedUser),
                flag(c.source == Source::FollowedBoard),
                flag(c.source == Source::FollowedTopic),
                flag(c.source == Source::EngagedTopic),
                position as f64,
                flag(followed.contains(&c.owner.get())),
                share(&per_owner, c.owner.get()),
                share(&per_board, c.board.get()),
            ]
            .map(|v| v as f32)
        })
        .collect()
}

/// The request's `user.*` features plus the broker's context features.
pub fn context_features(
    req: &FeedRequest,
    follows: &Follows,
    kind: FeedKind,
    candidates: usize,
) -> HashMap<String, f32> {
    let mut out: HashMap<String, f32> = req
        .features
        .iter()
        .filter(|(k, _)| k.starts_with(USER_PREFIX))
        .map(|(k, v)| (k.clone(), *v as f32))
        .collect();
    let values = [
        follows.users.len() as f32,
        follows.boards.len() as f32,
        follows.topics.len() as f32,
        if kind == FeedKind::Home { 1.0 } else { 0.0 },
        candidates as f32,
    ];
    for (name, v) in CONTEXT_FEATURES.iter().zip(values) {
        out.insert((*name).to_string(), v);
    }
    out
}

/// A scorer request for `list`.
pub fn score_batch(
    model: &str,
    list: &[Candidate],
    req: &FeedRequest,
    follows: &Follows,
    kind: FeedKind,
    now_ms: i64,
) -> ScoreBatch {
    ScoreBatch {
        model: model.to_string(),
        user_features: context_features(req, follows, kind, list.len()),
        feature_names: ITEM_FEATURES.iter().map(|s| s.to_string()).collect(),
        item_ids: list.iter().map(|c| c.pin.get()).collect(),
        values: item_features(list, follows, now_ms).into_iter().flatten().collect(),
    }
}
