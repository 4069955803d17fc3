//! The shard-local candidate query: OR of the followed users' / boards' / topics'
//! bitmaps → AND-NOT the filter bitmaps and the viewer's seen pins → newest-first scan
//! with a work bound → drop blocked owners and the viewer's own pins → light score →
//! top-K per candidate group.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use feedgraph_graph_store::{HotAttrs, Shard};
use feedgraph_model::{BoardId, PinId, PinSignals, TopicId, UserId};
use feedgraph_scoring::Expr;
use roaring::{MultiOps, RoaringBitmap};

use crate::{Error, Result};

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
    /// out of its later pages); `None`: below the shard's published watermark.
    pub ordinal_bound: Option<u32>,
}

/// A scored candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub pin: PinId,
    pub owner: UserId,
    pub board: BoardId,
    pub created_at_ms: i64,
    /// The light score; after ML scoring, the model's score.
    pub score: f64,
    pub source: Source,
    /// The signals it was scored with (features for the ML scorer).
    pub signals: PinSignals,
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
    /// The ordinal bound the scan used: the query's, or the shard's published
    /// watermark when the query had none (the ranking's snapshot of this shard).
    pub watermark: u32,
}

/// Runs the query on one shard. Blocks on RocksDB (cached bitmaps aside): call it on a
/// blocking pool. A replica whose watermark is below the query's bound has not applied
/// what the ranking's snapshot holds: [`Error::Behind`].
pub fn run(shard: &Shard, q: &CandidateQuery) -> Result<ShardAnswer> {
    // The watermark first: every ordinal below it has its row and bitmap entries in
    // place (the store publishes it last), so the scan never meets a half-visible pin.
    let published = shard.next_ordinal();
    let watermark = match q.ordinal_bound {
        Some(bound) if bound > published => return Err(Error::Behind { shard: shard.id() }),
        Some(bound) => bound,
        None => published,
    };
    let users = shard.user_pins_cached(&q.users)?;
    let boards = shard.board_pins_cached(&q.boards)?;
    let topics = shard.topic_pins_cached(&q.topics)?;
    let engaged = shard.topic_pins_cached(&q.engaged_topics)?;
    let union = |v: &[Arc<RoaringBitmap>]| v.iter().map(|b| b.as_ref()).union();
    let (user_set, board_set, topic_set, engaged_set) =
        (union(&users), union(&boards), union(&topics), union(&engaged));

    let mut candidates = [&user_set, &board_set, &topic_set, &engaged_set].into_iter().union();
    if candidates.is_empty() {
        return Ok(ShardAnswer { watermark, ..ShardAnswer::default() });
    }
    for filter in shard.filters_cached()? {
        candidates -= filter.as_ref();
    }
    candidates -= shard.seen(q.viewer)?;
    candidates.remove_range(watermark..);

    let blocked: HashSet<u64> = q.blocked.iter().map(|u| u.get()).collect();
    let viewer = q.viewer.get();
    let attrs = shard.attributes();
    let rows = attrs.hot();
    let now_s = q.now_ms as f64 / 1000.0;
    // Without interest sets every candidate is a following candidate: skip the lookups.
    let has_interest = !(topic_set.is_empty() && engaged_set.is_empty());
    let mut following = TopK::new(q.top_k);
    let mut interest = TopK::new(q.top_k);
    let mut stack = Vec::with_capacity(16);
    let mut scanned = 0u64;
    // Rows are loaded a batch at a time in a loop of independent loads, so the CPU
    // keeps many cache misses in flight instead of one per candidate (the scan is
    // memory-latency bound: measured 93% of its time on the row load).
    const BATCH: usize = 32;
    let hidden = HotAttrs { flags: 1, ..HotAttrs::default() };
    let mut ordinals = candidates.iter().rev().take(q.scan_limit);
    let mut batch = [0u32; BATCH];
    let mut loaded = [hidden; BATCH];
    loop {
        let mut n = 0;
        for (slot, ordinal) in batch.iter_mut().zip(ordinals.by_ref()) {
            *slot = ordinal;
            n += 1;
        }
        if n == 0 {
            break;
        }
        scanned += n as u64;
        for (row, ordinal) in loaded.iter_mut().zip(&batch[..n]) {
            // Ordinals beyond the rows were committed an instant ago: skipped.
            *row = rows.get(*ordinal as usize).copied().unwrap_or(hidden);
        }
        for (r, &ordinal) in loaded.iter().zip(&batch[..n]) {
            // Flags are also filter bitmaps; this guards the instant before the
            // bitmap cache is invalidated.
            if r.is_hidden() {
                continue;
            }
            // Blocked owners, and the viewer's own pins, are not the viewer's feed.
            if r.owner == viewer || (!blocked.is_empty() && blocked.contains(&r.owner)) {
                continue;
            }
            let age_hours = ((now_s - f64::from(r.created_at_s)) / 3600.0).max(0.0);
            let vars = [
                f64::from(r.quality),
                f64::from(r.saves),
                f64::from(r.clicks),
                f64::from(r.closeups),
                age_hours,
                age_hours / 24.0,
            ];
            let score = q.expr.eval(&vars, &q.request_values, &mut stack);
            let is_following = !has_interest || user_set.contains(ordinal) || board_set.contains(ordinal);
            let heap = if is_following { &mut following } else { &mut interest };
            // The source is worked out only for candidates that make the top-K.
            heap.offer(score, ordinal, || {
                if user_set.contains(ordinal) {
                    Source::FollowedUser
                } else if board_set.contains(ordinal) {
                    Source::FollowedBoard
                } else if topic_set.contains(ordinal) {
                    Source::FollowedTopic
                } else {
                    Source::EngagedTopic
                }
            });
        }
    }
    let to_candidates = |top: TopK| -> Vec<Candidate> {
        top.into_sorted()
            .into_iter()
            .filter_map(|(score, ordinal, source)| {
                let a = attrs.get(ordinal)?;
                Some(Candidate {
                    pin: PinId::new(a.pin_id)?,
                    owner: UserId::new(a.owner)?,
                    board: BoardId::new(a.board)?,
                    created_at_ms: a.created_at_ms,
                    score,
                    source,
                    signals: a.signals,
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

/// How often each topic appears on the user's `recent` newest own pins (their saves),
/// from the user's shard. Blocking.
pub fn engaged_topic_counts(shard: &Shard, user: UserId, recent: usize) -> Result<Vec<(TopicId, u32)>> {
    let mut counts: HashMap<TopicId, u32> = HashMap::new();
    for ordinal in shard.user_pins(user)?.iter().rev().take(recent) {
        if let Some(rec) = shard.pin_at(ordinal)? {
            for t in rec.topics {
                *counts.entry(t).or_default() += 1;
            }
        }
    }
    let mut out: Vec<(TopicId, u32)> = counts.into_iter().collect();
    out.sort_unstable();
    Ok(out)
}

/// Keeps the `k` best by (score, ordinal); the payload is built only for kept items.
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Entry>>,
}

/// Score, ordinal, and the source (worked out only for entries that are kept).
struct Entry(f64, u32, Source);

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

    fn offer(&mut self, score: f64, ordinal: u32, payload: impl FnOnce() -> Source) {
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
    fn into_sorted(self) -> Vec<(f64, u32, Source)> {
        let mut v: Vec<Entry> = self.heap.into_iter().map(|r| r.0).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|e| (e.0, e.1, e.2)).collect()
    }
}
