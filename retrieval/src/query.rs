//! The shard-local candidate query: OR of the followed users' / boards' / topics'
//! bitmaps → AND-NOT the filter bitmaps and the viewer's seen pins → newest-first scan
//! with a work bound → drop blocked owners and the viewer's own pins → light score →
//! top-K per candidate group.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;

use feedgraph_graph_store::{PinAttributes, Shard};
use feedgraph_model::{BoardId, PinId, TopicId, UserId};
use feedgraph_scoring::{Expr, PIN_VARIABLES};
use roaring::{MultiOps, RoaringBitmap};

/// Where a candidate came from. Following candidates come from followed users and
/// boards; interest candidates from followed topics and topics of recent engagement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    FollowedUser,
    FollowedBoard,
    FollowedTopic,
    EngagedTopic,
}

impl Source {
    pub fn is_following(self) -> bool {
        matches!(self, Source::FollowedUser | Source::FollowedBoard)
    }
}

/// One shard's part of a feed request.
#[derive(Clone, Debug)]
pub struct CandidateQuery {
    /// The viewer: their seen pins on this shard are left out.
    pub viewer: UserId,
    pub users: Vec<UserId>,
    pub boards: Vec<BoardId>,
    pub topics: Vec<TopicId>,
    pub engaged_topics: Vec<TopicId>,
    /// Owners whose pins are left out.
    pub blocked: Vec<UserId>,
    /// Candidates kept per group (following, interest).
    pub top_k: usize,
    /// At most this many candidates are examined (newest first).
    pub scan_limit: usize,
    pub expr: Arc<Expr>,
    /// Values of `expr.request_features()`, in order.
    pub request_values: Vec<f64>,
    /// "Now" for ages; fixed per ranking so that pages score identically.
    pub now_ms: i64,
    /// Only ordinals below this (pins created after a ranking's first page are left
    /// out of its later pages).
    pub ordinal_bound: Option<u32>,
}

/// A scored candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub pin: PinId,
    pub owner: UserId,
    pub board: BoardId,
    pub created_at_ms: i64,
    pub ordinal: u32,
    pub score: f64,
    pub source: Source,
    /// The pin variables the score was computed from (features for the ML scorer).
    pub features: [f32; PIN_VARIABLES.len()],
}

/// What a shard answers.
#[derive(Clone, Debug, Default)]
pub struct ShardAnswer {
    /// Following candidates, best first.
    pub following: Vec<Candidate>,
    /// Interest candidates, best first.
    pub interest: Vec<Candidate>,
    /// Candidates examined.
    pub scanned: u64,
    /// The shard's next ordinal when the query ran.
    pub watermark: u32,
}

/// Runs the query on one shard. Blocks on RocksDB (cached bitmaps aside): call it on a
/// blocking pool.
pub fn run(shard: &Shard, q: &CandidateQuery) -> Result<ShardAnswer, feedgraph_graph_store::Error> {
    let watermark = shard.next_ordinal();
    let users = shard.user_pins_cached(&q.users)?;
    let boards = shard.board_pins_cached(&q.boards)?;
    let topics = shard.topic_pins_cached(&q.topics)?;
    let engaged = shard.topic_pins_cached(&q.engaged_topics)?;
    let union = |v: &[Arc<RoaringBitmap>]| v.iter().map(|b| b.as_ref()).union();
    let (user_set, board_set, topic_set, engaged_set) =
        (union(&users), union(&boards), union(&topics), union(&engaged));

    let mut candidates = [&user_set, &board_set, &topic_set, &engaged_set].into_iter().union();
    if candidates.is_empty() {
        return Ok(ShardAnswer { watermark, ..Default::default() });
    }
    for filter in shard.filters_cached()? {
        candidates -= filter.as_ref();
    }
    candidates -= shard.seen(q.viewer)?;
    if let Some(bound) = q.ordinal_bound {
        candidates.remove_range(bound..);
    }

    let blocked: HashSet<u64> = q.blocked.iter().map(|u| u.get()).collect();
    let attrs = shard.attributes();
    let mut following = TopK::new(q.top_k);
    let mut interest = TopK::new(q.top_k);
    let mut stack = Vec::with_capacity(16);
    let mut scanned = 0u64;
    for ordinal in candidates.iter().rev().take(q.scan_limit) {
        scanned += 1;
        let Some(c) = score(&attrs, ordinal, q, &mut stack) else { continue };
        // Blocked owners, and the viewer's own pins, are not the viewer's feed.
        if blocked.contains(&c.0.owner) || c.0.owner == q.viewer.get() {
            continue;
        }
        let source = if user_set.contains(ordinal) {
            Source::FollowedUser
        } else if board_set.contains(ordinal) {
            Source::FollowedBoard
        } else if topic_set.contains(ordinal) {
            Source::FollowedTopic
        } else {
            Source::EngagedTopic
        };
        let heap = if source.is_following() { &mut following } else { &mut interest };
        heap.offer(c.1, ordinal, || (c.0, c.2, source));
    }
    let to_candidates = |top: TopK| -> Vec<Candidate> {
        top.into_sorted()
            .into_iter()
            .filter_map(|(score, ordinal, (a, features, source))| {
                Some(Candidate {
                    pin: PinId::new(a.pin_id)?,
                    owner: UserId::new(a.owner)?,
                    board: BoardId::new(a.board)?,
                    created_at_ms: a.created_at_ms,
                    ordinal,
                    score,
                    source,
                    features,
                })
            })
            .collect()
    };
    Ok(ShardAnswer {
        following: to_candidates(following),
        interest: to_candidates(interest),
        scanned,
        watermark,
    })
}

type Scored = (feedgraph_graph_store::PinAttrs, f64, [f32; PIN_VARIABLES.len()]);

fn score(attrs: &PinAttributes, ordinal: u32, q: &CandidateQuery, stack: &mut Vec<f64>) -> Option<Scored> {
    let a = attrs.get(ordinal)?;
    // Flags are also filter bitmaps; the in-memory copy guards the instant between a
    // commit and the cache invalidation.
    if a.deleted || a.spam || a.is_unsafe {
        return None;
    }
    let age_hours = ((q.now_ms - a.created_at_ms) as f64 / 3_600_000.0).max(0.0);
    let vars = [
        f64::from(a.signals.quality),
        f64::from(a.signals.saves),
        f64::from(a.signals.clicks),
        f64::from(a.signals.closeups),
        age_hours,
        age_hours / 24.0,
    ];
    let score = q.expr.eval(&vars, &q.request_values, stack);
    Some((a, score, vars.map(|v| v as f32)))
}

/// Keeps the `k` best by (score, ordinal); the payload is built only for kept items.
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Entry>>,
}

struct Entry(f64, u32, Scored2);
type Scored2 = (feedgraph_graph_store::PinAttrs, [f32; PIN_VARIABLES.len()], Source);

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k.min(4096) + 1) }
    }

    fn offer(&mut self, score: f64, ordinal: u32, payload: impl FnOnce() -> Scored2) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Reverse(Entry(score, ordinal, payload())));
        } else if let Some(min) = self.heap.peek()
            && (score, ordinal) > (min.0.0, min.0.1)
        {
            self.heap.pop();
            self.heap.push(Reverse(Entry(score, ordinal, payload())));
        }
    }

    /// Best first; ties broken by newer ordinal first.
    fn into_sorted(self) -> Vec<(f64, u32, Scored2)> {
        let mut v: Vec<Entry> = self.heap.into_iter().map(|r| r.0).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|e| (e.0, e.1, e.2)).collect()
    }
}
