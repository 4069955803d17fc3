//! The shard-local candidate query: OR of the followed users' / boards' / topics'
//! bitmaps (materialized, or merged newest first as the scan goes when the scan limit
//! cannot cut it) → AND-NOT the filter bitmaps and the viewer's seen pins → newest-first scan
//! with a work bound, skipping blocks whose score bound cannot make the top-K → drop
//! blocked owners and the viewer's own pins → light score → top-K per candidate group.
//!
//! Invariant: the answer is exactly the full scan's (every candidate among the newest
//! `scan_limit` scored, the best `top_k` kept), minus candidates that provably cannot
//! make the request's merged list ([`ScanControl`]).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::time::Instant;

use feedgraph_graph_store::{BLOCK_ORDINALS, BlockBounds, HotAttrs, Shard};
use feedgraph_model::{BoardId, PinId, PinSignals, TopicId, UserId};
use feedgraph_scoring::{BoundScratch, Expr, Interval};
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
    /// Examine every candidate up to `scan_limit` rather than skip blocks that cannot
    /// make the top-K: the same answer, slower (for comparisons and measurements).
    pub full_scan: bool,
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

/// What a running scan checks and what the shards of one request share: cancellation
/// (the request's client went away, or its deadline passed — the scan stops using CPU)
/// and, per candidate group, a score *floor*.
///
/// The floor is the `top_k`-th best score some shard of the request has found. When
/// every shard keeps at least as many candidates as the merged list (`share_floors`),
/// a candidate scoring below the floor is beaten by `top_k` others and cannot make the
/// merged list, so every shard may drop it, and skip blocks bounded below it. Exact.
#[derive(Debug)]
pub struct ScanControl {
    cancelled: AtomicBool,
    deadline: Option<Instant>,
    /// Following, interest: the floor's ordered bits ([`ordered`]); 0: none yet.
    floors: [AtomicU64; 2],
    share_floors: bool,
}

impl ScanControl {
    pub fn new(deadline: Option<Instant>, share_floors: bool) -> Self {
        Self { cancelled: AtomicBool::new(false), deadline, floors: Default::default(), share_floors }
    }

    /// Whether the shards of the request may share their floors.
    pub fn shares_floors(&self) -> bool {
        self.share_floors
    }

    /// No deadline, no shared floors: one shard's query on its own.
    pub fn unbounded() -> Self {
        Self::new(None, false)
    }

    /// Stops every scan of the request at its next block.
    pub fn cancel(&self) {
        self.cancelled.store(true, AtomicOrdering::Relaxed);
    }

    /// Cancelled, or past the deadline.
    pub fn is_stopped(&self) -> bool {
        self.cancelled.load(AtomicOrdering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn floor(&self, group: usize) -> f64 {
        if !self.share_floors {
            return f64::NEG_INFINITY;
        }
        from_ordered(self.floors[group].load(AtomicOrdering::Relaxed))
    }

    fn raise_floor(&self, group: usize, score: f64) {
        if self.share_floors {
            self.floors[group].fetch_max(ordered(score), AtomicOrdering::Relaxed);
        }
    }
}

/// Cancels its [`ScanControl`] when dropped: held by whatever waits for the scans (a
/// request handler), so that scans stop when it is dropped (the client went away, or
/// its deadline passed) or done with them.
#[derive(Debug)]
pub struct CancelOnDrop(pub Arc<ScanControl>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A score's bits, ordered like the score (scores are never NaN); never 0.
fn ordered(score: f64) -> u64 {
    let bits = score.to_bits();
    if bits >> 63 == 1 { !bits } else { bits | (1 << 63) }
}

fn from_ordered(key: u64) -> f64 {
    match key {
        0 => f64::NEG_INFINITY,
        k if k >> 63 == 1 => f64::from_bits(k & !(1 << 63)),
        k => f64::from_bits(!k),
    }
}

const FOLLOWING: usize = 0;
const INTEREST: usize = 1;

/// Runs the query on one shard. Blocks on RocksDB (cached bitmaps aside): call it on a
/// blocking pool. A replica whose watermark is below the query's bound has not applied
/// what the ranking's snapshot holds: [`Error::Behind`]. A stopped `control` ends the
/// scan at its next block with [`Error::Cancelled`].
///
/// The scan walks candidates newest first, one block of ordinals
/// ([`feedgraph_graph_store::BLOCK_ORDINALS`]) at a time. Unless `full_scan`, a block
/// whose score bound ([`Expr::upper_bound`] over the block's attribute ranges) is below
/// what the top-K already holds is skipped whole — its candidates still count against
/// `scan_limit`, so the answer is exactly the full scan's.
pub fn run(shard: &Shard, q: &CandidateQuery, control: &ScanControl) -> Result<ShardAnswer> {
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
    let following_sources = users.len() + boards.len();
    let sources: Vec<&RoaringBitmap> =
        users.iter().chain(&boards).chain(&topics).chain(&engaged).map(|b| b.as_ref()).collect();
    let has_interest = sources[following_sources..].iter().any(|b| !b.is_empty());
    let seen = shard.seen(q.viewer)?;
    // At most this many candidates: when it is within `scan_limit`, the limit cannot
    // cut the scan short, and the sources can be merged as the scan goes.
    let most: u64 = sources.iter().map(|b| b.len()).sum();
    if most == 0 {
        return Ok(ShardAnswer { watermark, ..ShardAnswer::default() });
    }
    // The full scan examines the newest `scan_limit` candidates: those at or above
    // `oldest`. Skipping blocks must not move that line.
    let (mut ordinals, oldest) = if most <= q.scan_limit as u64 && sources.len() <= MERGE_MAX_SOURCES {
        let merge = SourceMerge::new(&sources, following_sources, &seen, watermark);
        (Newest::Merge { merge, budget: MERGE_BUDGET, upper: watermark }, 0)
    } else {
        let (mut candidates, following_set) = union(&sources, following_sources);
        for filter in shard.filters_cached()? {
            candidates -= filter.as_ref();
        }
        candidates -= &seen;
        candidates.remove_range(watermark..);
        let oldest = match candidates.len().checked_sub(q.scan_limit as u64) {
            Some(0) | None => 0,
            Some(below) => candidates.select(below as u32).unwrap_or(0),
        };
        (Newest::Union { iter: candidates.into_iter(), following: following_set, filtered: true }, oldest)
    };

    let blocked: HashSet<u64> = q.blocked.iter().map(|u| u.get()).collect();
    let viewer = q.viewer.get();
    let attrs = shard.attributes();
    let rows = attrs.hot();
    let now_s = q.now_ms as f64 / 1000.0;
    let age_hours_at = |created_at_s: u32| ((now_s - f64::from(created_at_s)) / 3600.0).max(0.0);
    let mut heaps = [TopK::new(q.top_k), TopK::new(q.top_k)];
    let mut stack = Vec::with_capacity(16);
    let mut bound_scratch = BoundScratch::default();
    // The best score any candidate within `b`'s ranges can reach.
    let mut bound_of = |b: &BlockBounds| -> f64 {
        let iv = |lo: f64, hi: f64| Interval::new(lo, hi);
        let (age_lo, age_hi) = (age_hours_at(b.created_at_s.1), age_hours_at(b.created_at_s.0));
        match [
            iv(f64::from(b.quality.0), f64::from(b.quality.1)),
            iv(f64::from(b.saves.0), f64::from(b.saves.1)),
            iv(f64::from(b.clicks.0), f64::from(b.clicks.1)),
            iv(f64::from(b.closeups.0), f64::from(b.closeups.1)),
            iv(age_lo, age_hi),
            iv(age_lo / 24.0, age_hi / 24.0),
        ] {
            [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)] => {
                q.expr.upper_bound(&[a, b, c, d, e, f], &q.request_values, &mut bound_scratch)
            }
            _ => f64::INFINITY,
        }
    };
    let mut scanned = 0u64;
    // Rows are loaded a batch at a time in a loop of independent loads, so the CPU
    // keeps many cache misses in flight instead of one per candidate (the scan is
    // memory-latency bound: measured 93% of its time on the row load).
    const BATCH: usize = 32;
    let hidden = HotAttrs { flags: 1, ..HotAttrs::default() };
    let mut batch = [(0u32, false); BATCH];
    let mut loaded = [hidden; BATCH];
    let mut next = ordinals.next_back().filter(|(o, _)| *o >= oldest && q.scan_limit > 0);
    while let Some((first, _)) = next {
        if control.is_stopped() {
            return Err(Error::Cancelled(format!("shard {}: the request was cancelled", shard.id())));
        }
        let block_start = first & !(BLOCK_ORDINALS - 1);
        // What a candidate must beat to be kept, per group: the shard's own K-th best
        // once it holds K, or the request's shared floor.
        let floors = [0, 1].map(|g| heaps[g].floor().max(control.floor(g)));
        if !q.full_scan && q.top_k > 0 {
            // A block is skipped only when no group could take any of its candidates.
            let threshold = if has_interest { floors[0].min(floors[1]) } else { floors[FOLLOWING] };
            if threshold > f64::NEG_INFINITY {
                // Nothing at or below this block can compete: done.
                if attrs.bounds_at_or_below(block_start).is_some_and(|b| bound_of(b) < threshold) {
                    break;
                }
                if attrs.block_bounds(block_start).is_some_and(|b| bound_of(b) < threshold) {
                    if block_start == 0 {
                        break;
                    }
                    ordinals.advance_back_to(block_start - 1);
                    next = ordinals.next_back().filter(|(o, _)| *o >= oldest);
                    continue;
                }
            }
        }
        // Score the block's candidates.
        loop {
            let mut n = 0;
            while n < BATCH {
                match next {
                    Some(c) if c.0 >= block_start => {
                        batch[n] = c;
                        n += 1;
                        next = ordinals.next_back().filter(|(o, _)| *o >= oldest);
                    }
                    _ => break,
                }
            }
            if n == 0 {
                break;
            }
            scanned += n as u64;
            for (row, (ordinal, _)) in loaded.iter_mut().zip(&batch[..n]) {
                // Ordinals beyond the rows were committed an instant ago: skipped.
                *row = rows.get(*ordinal as usize).copied().unwrap_or(hidden);
            }
            for (r, &(ordinal, is_following)) in loaded.iter().zip(&batch[..n]) {
                // Flags are also filter bitmaps; this guards the instant before the
                // bitmap cache is invalidated.
                if r.is_hidden() {
                    // Merged candidates include the filtered pins (the rows' flags drop
                    // them here): not counted as scanned, as with the filtered union.
                    scanned -= u64::from(!ordinals.filtered());
                    continue;
                }
                // Blocked owners, and the viewer's own pins, are not the viewer's feed.
                if r.owner == viewer || (!blocked.is_empty() && blocked.contains(&r.owner)) {
                    continue;
                }
                let age_hours = age_hours_at(r.created_at_s);
                let vars = [
                    f64::from(r.quality),
                    f64::from(r.saves),
                    f64::from(r.clicks),
                    f64::from(r.closeups),
                    age_hours,
                    age_hours / 24.0,
                ];
                let score = q.expr.eval(&vars, &q.request_values, &mut stack);
                let group = if is_following { FOLLOWING } else { INTEREST };
                // Below another shard's K-th best: cannot make the merged list.
                if score < floors[group] && !heaps[group].is_full() {
                    continue;
                }
                heaps[group].offer(score, ordinal);
            }
            if next.is_none_or(|(o, _)| o < block_start) {
                break;
            }
        }
        for (g, heap) in heaps.iter().enumerate() {
            if heap.is_full() {
                control.raise_floor(g, heap.floor());
            }
        }
    }
    let [following, interest] = heaps;
    // The source is worked out only for the kept candidates. A following candidate is
    // in a followed user's pins exactly when its owner is followed (`user_pins` holds
    // a user's own pins), else it came from a followed board.
    let mut followed_users: Vec<u64> = q.users.iter().map(|u| u.get()).collect();
    followed_users.sort_unstable();
    let source_of = |group: usize, ordinal: u32, owner: u64| match group {
        FOLLOWING if followed_users.binary_search(&owner).is_ok() => Source::FollowedUser,
        FOLLOWING => Source::FollowedBoard,
        _ if topics.iter().any(|t| t.contains(ordinal)) => Source::FollowedTopic,
        _ => Source::EngagedTopic,
    };
    let to_candidates = |top: TopK, group: usize| -> Vec<Candidate> {
        // What other shards found since may leave some of these out of the merge.
        let floor = control.floor(group);
        top.into_sorted()
            .into_iter()
            .take_while(|(score, _)| *score >= floor)
            .filter_map(|(score, ordinal)| {
                let a = attrs.get(ordinal)?;
                let source = source_of(group, ordinal, a.owner);
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
        following: to_candidates(following, FOLLOWING),
        interest: to_candidates(interest, INTEREST),
        scanned,
        watermark,
    })
}

/// Merging the sources as the scan goes looks at every source per block of ordinals
/// it visits: beyond this many sources, the union is materialized.
const MERGE_MAX_SOURCES: usize = 256;

/// What a merge may spend before the rest of its candidates is materialized: a
/// candidate handed out costs 1, a skip [`MERGE_SKIP_COST`] (each source seeks). A
/// recency page visits ~50 candidates of a shard; a ranking that visits and skips
/// many is cheaper from the union (`benches/query.rs`: `recent_top100_20_boards`
/// against its `_union` twin; merging a default-ranked feed all the way measured
/// slower than the union while this was built).
const MERGE_BUDGET: u32 = 256;
const MERGE_SKIP_COST: u32 = 8;

/// The union of the sources (the first `following` of them following sources), and
/// when there is an interest group, the following group's union. One union per group:
/// a union materializes its result (roaring's containers become bitsets and back).
fn union(sources: &[&RoaringBitmap], following: usize) -> (RoaringBitmap, Option<RoaringBitmap>) {
    let following_set = sources[..following].iter().copied().union();
    let interest_set = sources[following..].iter().copied().union();
    if interest_set.is_empty() {
        (following_set, None)
    } else {
        ([&following_set, &interest_set].into_iter().union(), Some(following_set))
    }
}

/// A shard's candidates, newest first, each with whether it is a following candidate:
/// the union of the sources minus the viewer's seen pins (and the filters, when
/// `filtered`; else the scan drops filtered pins by their rows' flags), below the
/// watermark.
enum Newest<'a> {
    /// Iterated from the materialized union (`following`: the following group's
    /// union, when there is an interest group).
    Union { iter: roaring::bitmap::IntoIter, following: Option<RoaringBitmap>, filtered: bool },
    /// Merged from the sources as the scan goes, until `budget` is spent; every
    /// candidate not yet handed out is below `upper`.
    Merge { merge: SourceMerge<'a>, budget: u32, upper: u32 },
}

impl Newest<'_> {
    fn next_back(&mut self) -> Option<(u32, bool)> {
        match self {
            Newest::Union { iter, following, .. } => {
                iter.next_back().map(|o| (o, following.as_ref().is_none_or(|f| f.contains(o))))
            }
            Newest::Merge { budget: 0, .. } => {
                self.materialize();
                self.next_back()
            }
            Newest::Merge { merge, budget, upper, .. } => {
                *budget -= 1;
                let next = merge.next_back();
                if let Some((o, _)) = next {
                    *upper = o;
                }
                next
            }
        }
    }

    /// What follows is at most `n`.
    fn advance_back_to(&mut self, n: u32) {
        match self {
            Newest::Union { iter, .. } => iter.advance_back_to(n),
            Newest::Merge { merge, budget, upper, .. } => {
                *budget = budget.saturating_sub(MERGE_SKIP_COST);
                *upper = (*upper).min(n.saturating_add(1));
                merge.advance_back_to(n);
            }
        }
    }

    /// Whether the filters are left out already.
    fn filtered(&self) -> bool {
        matches!(self, Newest::Union { filtered: true, .. })
    }

    /// A merge whose budget is spent goes on from the union of what it has not
    /// handed out.
    fn materialize(&mut self) {
        if let Newest::Merge { merge, upper, .. } = self {
            let (mut rest, following) = union(merge.sources, merge.following_sources);
            rest -= merge.seen;
            rest.remove_range(*upper..);
            *self = Newest::Union { iter: rest.into_iter(), following, filtered: false };
        }
    }
}

/// The union of the sources, newest first, merged from the sources' own iterators a
/// block of [`MERGE_BLOCK`] ordinals at a time: work in proportion to what the scan
/// visits rather than to the followed graph (a recency feed visits ~50 candidates of
/// a shard's thousands; materializing the union took 16% of its CPU).
struct SourceMerge<'a> {
    /// Per source: its newest ordinal not yet merged, the rest, and whether it is a
    /// following source.
    heads: Vec<(Option<u32>, roaring::bitmap::Iter<'a>, bool)>,
    /// The sources, the first `following_sources` of them following sources.
    sources: &'a [&'a RoaringBitmap],
    following_sources: usize,
    seen: &'a RoaringBitmap,
    /// The block being handed out: its first ordinal, and as bitsets its candidates
    /// not yet handed out and those of them from a following source.
    block_start: u32,
    block: [u64; MERGE_WORDS],
    following: [u64; MERGE_WORDS],
}

const MERGE_BLOCK: u32 = 256;
const MERGE_WORDS: usize = (MERGE_BLOCK / 64) as usize;

impl<'a> SourceMerge<'a> {
    /// The first `following` sources are following sources; only ordinals below
    /// `watermark` are merged.
    fn new(
        sources: &'a [&'a RoaringBitmap],
        following: usize,
        seen: &'a RoaringBitmap,
        watermark: u32,
    ) -> Self {
        let heads = sources
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, b)| {
                let mut iter = b.iter();
                let mut head = iter.next_back();
                // Ordinals at or above the watermark are being committed: not yet.
                if head.is_some_and(|o| o >= watermark) {
                    head = watermark.checked_sub(1).and_then(|last| {
                        iter.advance_back_to(last);
                        iter.next_back()
                    });
                }
                (head, iter, i < following)
            })
            .collect();
        Self {
            heads,
            sources,
            following_sources: following,
            seen,
            block_start: 0,
            block: [0; MERGE_WORDS],
            following: [0; MERGE_WORDS],
        }
    }

    /// Moves the sources' ordinals of the newest block left into the bitsets; false
    /// when none is left.
    fn fill(&mut self) -> bool {
        let Some(newest) = self.heads.iter().filter_map(|h| h.0).max() else {
            return false;
        };
        self.block_start = newest & !(MERGE_BLOCK - 1);
        self.following = [0; MERGE_WORDS];
        for (head, iter, is_following) in &mut self.heads {
            while let Some(o) = *head
                && o >= self.block_start
            {
                let (word, bit) = (((o - self.block_start) / 64) as usize, (o % 64) as u64);
                self.block[word] |= 1 << bit;
                if *is_following {
                    self.following[word] |= 1 << bit;
                }
                *head = iter.next_back();
            }
        }
        true
    }

    fn next_back(&mut self) -> Option<(u32, bool)> {
        loop {
            let Some(word) = self.block.iter().rposition(|w| *w != 0) else {
                if !self.fill() {
                    return None;
                }
                continue;
            };
            let bit = 63 - self.block[word].leading_zeros();
            self.block[word] &= !(1 << bit);
            let ordinal = self.block_start + word as u32 * 64 + bit;
            if !self.seen.contains(ordinal) {
                return Some((ordinal, self.following[word] >> bit & 1 == 1));
            }
        }
    }

    /// What follows is at most `n`.
    fn advance_back_to(&mut self, n: u32) {
        if n < self.block_start {
            self.block = [0; MERGE_WORDS];
        } else {
            // Keep the bits at or below `n` in the current block.
            let offset = n - self.block_start;
            for (word, bits) in self.block.iter_mut().enumerate() {
                let first = word as u32 * 64;
                if first > offset {
                    *bits = 0;
                } else if offset - first < 63 {
                    *bits &= (1u64 << (offset - first + 1)) - 1;
                }
            }
        }
        for (head, iter, _) in &mut self.heads {
            if head.is_some_and(|o| o > n) {
                iter.advance_back_to(n);
                *head = iter.next_back();
            }
        }
    }
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

/// Keeps the `k` best by (score, ordinal).
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Entry>>,
}

/// Score and ordinal.
struct Entry(f64, u32);

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

    fn is_full(&self) -> bool {
        self.k > 0 && self.heap.len() >= self.k
    }

    /// The K-th best score once K are held (a candidate must beat it), else `-inf`.
    fn floor(&self) -> f64 {
        match self.heap.peek() {
            Some(min) if self.is_full() => min.0.0,
            _ => f64::NEG_INFINITY,
        }
    }

    fn offer(&mut self, score: f64, ordinal: u32) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Reverse(Entry(score, ordinal)));
        } else if let Some(min) = self.heap.peek()
            && (score, ordinal) > (min.0.0, min.0.1)
        {
            self.heap.pop();
            self.heap.push(Reverse(Entry(score, ordinal)));
        }
    }

    /// Best first; ties broken by newer ordinal first.
    fn into_sorted(self) -> Vec<(f64, u32)> {
        let mut v: Vec<Entry> = self.heap.into_iter().map(|r| r.0).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|e| (e.0, e.1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The merge hands out exactly the materialized union's candidates, newest first,
    /// with their group, through watermarks, seen pins, skips and a spent budget.
    #[test]
    fn source_merge_equals_the_materialized_union() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..300 {
            let span = if round % 3 == 0 { 200_000 } else { 3_000 };
            let sources: Vec<RoaringBitmap> = (0..rng.random_range(0..12))
                .map(|_| (0..rng.random_range(0..400)).map(|_| rng.random_range(0..span)).collect())
                .collect();
            let following = rng.random_range(0..=sources.len());
            let seen: RoaringBitmap =
                (0..rng.random_range(0..200)).map(|_| rng.random_range(0..span)).collect();
            let watermark = rng.random_range(0..=span);
            let refs: Vec<&RoaringBitmap> = sources.iter().collect();
            let following_set = refs[..following].iter().copied().union();
            let mut union = refs.iter().copied().union();
            union -= &seen;
            union.remove_range(watermark..);

            let has_interest = refs[following..].iter().any(|b| !b.is_empty());
            // Some merges run out of budget on the way and go on from the union.
            let budget = rng.random_range(0..400);
            let merge = SourceMerge::new(&refs, following, &seen, watermark);
            let mut merge = Newest::Merge { merge, budget, upper: watermark };
            let mut expected = union.iter();
            for _ in 0..10_000 {
                if rng.random_ratio(1, 20) {
                    let n = rng.random_range(0..span);
                    merge.advance_back_to(n);
                    expected.advance_back_to(n);
                }
                let want = expected.next_back().map(|o| (o, !has_interest || following_set.contains(o)));
                assert_eq!(merge.next_back(), want, "round {round}");
                if want.is_none() {
                    break;
                }
            }
        }
    }
}
