//! The broker: routes writes to shard leaders, and builds feeds — follows of the user
//! → grouped by owner shard → scatter to a replica of each shard with a deadline →
//! gather → merge → blend (home) → ML re-ranking of the head (deadline; light-score
//! fallback) → diversified pages → opaque cursor.
//!
//! Split by concept: [`writes`] (routing to leaders, redirects, board checks),
//! [`reads`] (the viewer's context and point reads, from any caught-up replica with
//! failover), [`scatter`] (candidate queries: local shards in lanes, remote shards one
//! RPC each, gathered until the deadline), [`rerank`] (the ML scorer). This module holds
//! the ranking lifecycle: pagination serves slices of one ranking. The first page
//! computes the whole ranked list (up to `max_ranked` items) and caches it; later pages
//! read the cache, or recompute from the snapshot in the cursor (same "now", same
//! per-shard ordinal bounds) when the cache no longer has it. So pages concatenate to
//! one ranked list even when pins arrive in between.

mod admission;
mod lanes;
mod reads;
mod rerank;
mod scatter;
mod writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use feedgraph_graph_store::{Follows, Shard};
use feedgraph_model::FeedRequest;
use feedgraph_scoring::{Expr, ScoreBatch, Scorer};
use moka::sync::Cache;

use crate::cursor::{CursorCodec, CursorState, FeedKind};
use crate::features;
use crate::query::Candidate;
use crate::rank;
use crate::shards::{LocalShards, ReadAfter, ShardDirectory};
use crate::{Error, Result};

pub use admission::{AdmissionConfig, AdmissionStats};
pub use writes::WriteResult;

/// Broker settings (validated by the server's configuration layer).
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Largest `page_size` accepted.
    pub max_page_size: u32,
    /// Candidates each shard returns per group (following, interest).
    pub candidates_per_shard: usize,
    /// Candidates each shard examines at most, newest first.
    pub scan_limit: usize,
    /// How long the broker waits for a shard; later answers are dropped and the
    /// response is flagged partial.
    pub shard_deadline: Duration,
    /// Length of a ranking (items over all its pages).
    pub max_ranked: usize,
    /// At most this many items of one owner on a page.
    pub max_per_owner: usize,
    /// At most this many items of one board on a page.
    pub max_per_board: usize,
    /// Share of home-feed positions given to interest candidates.
    pub home_interest_share: f64,
    /// How many of the user's newest own pins (saves) define their engaged topics.
    pub engaged_recent_pins: usize,
    /// How many engaged topics the home feed draws from.
    pub engaged_topics: usize,
    /// How long a computed ranking stays cached for its later pages.
    pub ranking_ttl: Duration,
    /// Bytes the cached rankings may take (each weighed by its candidates).
    pub ranking_cache_bytes: u64,
    /// Examine every candidate up to `scan_limit` instead of skipping blocks that
    /// cannot make the top-K: the same rankings, slower (for comparisons).
    pub full_scan: bool,
    /// Rank only as far as the asked page needs, when no ML model re-ranks the head:
    /// a first page of 25 merges the best ~50, not `max_ranked`; a later page the
    /// prefix does not settle extends the ranking from the same snapshot. The same
    /// pages either way; off, the first page ranks all `max_ranked` up front.
    pub progressive_ranking: bool,
    /// Remote shards served by one node are asked in one request
    /// ([`crate::RemoteReplica::node_candidates`]) rather than one request each.
    pub batch_remote_queries: bool,
    /// Bounds on rankings computed at once and queued.
    pub admission: AdmissionConfig,
    /// Named light-score expressions.
    pub rankings: BTreeMap<String, Arc<Expr>>,
    /// The ranking used when a request names none.
    pub default_ranking: String,
    /// Fault injection for tests and drills: extra latency per local shard query.
    pub shard_delays: HashMap<u32, Duration>,
    /// Re-rank the head of every ranking with this ML model (none: light scores only).
    pub model: Option<ModelRanking>,
}

/// How the broker uses the ML scorer.
#[derive(Clone, Debug)]
pub struct ModelRanking {
    /// The model's name in the scorer's registry.
    pub name: String,
    /// How many of the best light-scored candidates the model re-ranks.
    pub candidates: usize,
    /// How long the broker waits for the scorer before falling back to light scores.
    pub deadline: Duration,
}

/// One page of a feed.
#[derive(Clone, Debug)]
pub struct FeedPage {
    pub items: Vec<Candidate>,
    pub next_cursor: Option<String>,
    pub stats: FeedStats,
}

/// How a page was made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedStats {
    pub candidates_scanned: u64,
    pub shards_asked: u32,
    pub shards_answered: u32,
    /// Some shard did not answer in time (or failed): built from the others.
    pub partial: bool,
    pub scoring: Scoring,
    /// `name@version` of the model that ranked the page, when `scoring` is `Model`.
    pub model: Option<String>,
    /// The page came from a cached ranking (no shard was asked for it).
    pub from_cache: bool,
}

/// Which scorer ranked a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scoring {
    /// Light-score expression only (no model configured).
    #[default]
    Light,
    /// The ML model re-ranked the head of the list.
    Model,
    /// A model is configured but could not score: light scores, and why.
    LightFallback(FallbackReason),
}

/// Why the ML scorer was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// No answer within the deadline.
    Deadline,
    /// Not reachable, not configured, or failed.
    Unavailable,
    /// It refused the request (unknown model, feature mismatch, batch too large).
    Refused,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Deadline => "deadline",
            FallbackReason::Unavailable => "unavailable",
            FallbackReason::Refused => "refused",
        }
    }
}

/// A computed ranking, cut into pages, with the snapshot it was computed from: the
/// whole ranked list, or a prefix of it (the best `limit` items).
struct Ranking {
    pages: Vec<Vec<Candidate>>,
    stats: FeedStats,
    /// Per shard, the ordinal bound its candidates came from (0: not asked).
    watermarks: Vec<u32>,
    page_size: usize,
    /// The list held every item of the whole ranking; else only its best `limit`.
    complete: bool,
    /// How many of the best items the list was asked for.
    limit: usize,
}

impl Ranking {
    /// Page `index` of the whole ranking and whether another page follows it, when
    /// this list settles them; `None` when only a longer prefix would.
    ///
    /// Pagination places each item, in rank order, on the earliest page with room
    /// ([`rank::paginate`]), so a full page takes nothing more from items further down:
    /// it is final. An item of the prefix on a later page is on a later page of the
    /// whole ranking too, so a page follows.
    fn settled_page(&self, index: usize) -> Option<(&[Candidate], bool)> {
        if self.complete {
            let page = self.pages.get(index).map_or(&[][..], Vec::as_slice);
            return Some((page, index + 1 < self.pages.len()));
        }
        let page = self.pages.get(index).filter(|p| p.len() >= self.page_size)?;
        let more = self.pages.get(index + 1..).is_some_and(|later| later.iter().any(|p| !p.is_empty()));
        more.then_some((page.as_slice(), true))
    }

    /// Bytes held, for the cache's budget.
    fn weight(&self) -> u32 {
        let items: usize = self.pages.iter().map(|p| p.capacity()).sum();
        let bytes = size_of::<Ranking>()
            + items * size_of::<Candidate>()
            + self.pages.capacity() * size_of::<Vec<Candidate>>()
            + self.watermarks.capacity() * size_of::<u32>()
            + self.stats.model.as_ref().map_or(0, String::capacity);
        bytes.min(u32::MAX as usize) as u32
    }
}

/// Routes writes and builds feeds over the shards of a [`ShardDirectory`].
pub struct Broker {
    shards: Arc<dyn ShardDirectory>,
    cfg: BrokerConfig,
    rankings: Cache<u64, Arc<Ranking>>,
    cursors: CursorCodec,
    scorer: Option<Arc<dyn Scorer>>,
    /// Per shard, the newest write this broker committed there: its reads of the shard
    /// go to replicas that have applied it.
    written: Vec<Mutex<ReadAfter>>,
    /// Held by every shard query still running (lanes and RPCs may outlive their
    /// request's deadline).
    busy: Arc<()>,
    admission: admission::Admission,
    /// Scan threads for local shards, one per core, below the executor's priority.
    lanes: lanes::Lanes,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("shards", &self.shards).finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// Merging or paginating at most this many candidates runs on the executor (tens of
/// µs); more goes to the blocking pool, whose round trip costs two thread wake-ups —
/// more than the work itself for a page-sized list.
const INLINE_CANDIDATES: usize = 2048;

/// `f`, CPU work over `candidates` items: inline when small, else on the blocking pool.
async fn cpu_work<T: Send + 'static>(
    candidates: usize,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if candidates <= INLINE_CANDIDATES { f() } else { blocking(f).await }
}

impl Broker {
    /// A broker over every shard in this process (`shards[i]` holds shard `i`), with no
    /// replication. `cursor_key` authenticates cursors: keep it across restarts so that
    /// cursors stay valid.
    pub fn new(shards: Vec<Arc<Shard>>, cfg: BrokerConfig, cursor_key: [u8; 32]) -> Result<Self> {
        Self::with_directory(Arc::new(LocalShards::new(shards)?), cfg, cursor_key)
    }

    /// A broker over the shards of `directory` (local or remote replicas).
    pub fn with_directory(
        directory: Arc<dyn ShardDirectory>,
        cfg: BrokerConfig,
        cursor_key: [u8; 32],
    ) -> Result<Self> {
        if directory.shard_count() == 0 {
            return Err(Error::FailedPrecondition("a broker needs at least one shard".into()));
        }
        if !cfg.rankings.contains_key(&cfg.default_ranking) {
            return Err(Error::FailedPrecondition(format!(
                "default ranking `{}` is not defined",
                cfg.default_ranking
            )));
        }
        let rankings = Cache::builder()
            .max_capacity(cfg.ranking_cache_bytes)
            .weigher(|_, r: &Arc<Ranking>| r.weight())
            .time_to_live(cfg.ranking_ttl)
            .build();
        let written = (0..directory.shard_count()).map(|_| Mutex::new(ReadAfter::default())).collect();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let admission = admission::Admission::new(cfg.admission, cores);
        let lanes =
            lanes::Lanes::new(cores).map_err(|e| Error::Internal(format!("starting scan lanes: {e}")))?;
        Ok(Self {
            shards: directory,
            cfg,
            rankings,
            cursors: CursorCodec::new(cursor_key),
            scorer: None,
            written,
            busy: Arc::new(()),
            admission,
            lanes,
        })
    }

    /// Sets the ML scorer that `BrokerConfig::model` names a model of.
    pub fn with_scorer(mut self, scorer: Arc<dyn Scorer>) -> Self {
        self.scorer = Some(scorer);
        self
    }

    /// No shard query of this broker is still running (lanes that outlived their
    /// request's deadline finish on the blocking pool).
    pub fn shards_idle(&self) -> bool {
        Arc::strong_count(&self.busy) == 1
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.shard_count()
    }

    /// Rankings in progress and queued now, and shed since start.
    pub fn admission_stats(&self) -> AdmissionStats {
        self.admission.stats()
    }

    /// Cached rankings: (entries, bytes). Approximate (the cache settles lazily).
    pub fn ranking_cache_usage(&self) -> (u64, u64) {
        (self.rankings.entry_count(), self.rankings.weighted_size())
    }

    /// The newest write this broker committed on `shard`.
    fn read_after(&self, shard: u32) -> ReadAfter {
        self.written
            .get(shard as usize)
            .map(|w| *w.lock().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_default()
    }

    // ------------------------------------------------------------------ feeds

    /// One page of the user's following or home feed.
    pub async fn feed(&self, kind: FeedKind, req: &FeedRequest) -> Result<FeedPage> {
        self.feed_at(kind, req, now_ms()).await
    }

    /// [`Broker::feed`] with "now" given: a first page ranks as of `now_ms` (a later
    /// page keeps its cursor's). For replays and comparisons on one snapshot.
    pub async fn feed_at(&self, kind: FeedKind, req: &FeedRequest, now_ms: i64) -> Result<FeedPage> {
        if req.page_size.get() > self.cfg.max_page_size {
            return Err(Error::InvalidArgument {
                field: "page_size".into(),
                reason: format!("must be at most {}", self.cfg.max_page_size),
            });
        }
        let bad_cursor = |reason: String| Error::InvalidArgument { field: "cursor".into(), reason };
        let cursor = match &req.cursor {
            Some(c) => Some(self.cursors.decode(c).map_err(|r| bad_cursor(format!("cursor {r}")))?),
            None => None,
        };
        // A later page follows its cursor's ranking unless the request names another.
        let ranking_name = match (&req.ranking, &cursor) {
            (Some(name), _) => name.clone(),
            (None, Some(st)) => st.ranking.clone(),
            (None, None) => self.cfg.default_ranking.clone(),
        };
        let Some(expr) = self.cfg.rankings.get(&ranking_name).cloned() else {
            return Err(Error::InvalidArgument {
                field: "ranking".into(),
                reason: format!(
                    "unknown ranking `{ranking_name}` (configured: {})",
                    self.cfg.rankings.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        let first_page = cursor.is_none();
        let (mut state, cached) = match cursor {
            Some(st) => {
                if st.user != req.user.get() || st.kind != kind {
                    return Err(bad_cursor("cursor was issued for another user or feed".into()));
                }
                if st.ranking != ranking_name {
                    return Err(bad_cursor(format!("cursor was issued for ranking `{}`", st.ranking)));
                }
                if st.watermarks.len() != self.shard_count() as usize {
                    return Err(bad_cursor("cursor was issued by a service with another shard count".into()));
                }
                let cached = self.rankings.get(&st.ranking_id);
                (st, cached)
            }
            None => {
                let st = CursorState {
                    kind,
                    user: req.user.get(),
                    ranking: ranking_name,
                    ranking_id: rand::random::<u64>(),
                    page: 0,
                    page_size: req.page_size.get(),
                    now_ms,
                    // Set from the ranking's snapshot below.
                    watermarks: Vec::new(),
                };
                (st, None)
            }
        };
        let index = state.page as usize;
        let (ranking, from_cache) = match cached {
            Some(r) if r.settled_page(index).is_some() => (r, true),
            cached => {
                // A later page is computed from its first page's snapshot (the cached
                // prefix was too short for it, or the cache no longer has it).
                let bounds = (!first_page).then(|| state.watermarks.clone());
                let shorter = cached.map(|r| r.limit);
                let r = self
                    .compute(kind, req, expr, state.now_ms, bounds, state.page_size as usize, index, shorter)
                    .await?;
                self.rankings.insert(state.ranking_id, r.clone());
                (r, false)
            }
        };
        if first_page {
            state.watermarks = ranking.watermarks.clone();
        }
        let (items, more) = ranking.settled_page(index).ok_or_else(|| {
            Error::Internal(format!("a ranking computed for page {index} does not settle it"))
        })?;
        let items = items.to_vec();
        let next_cursor =
            more.then(|| self.cursors.encode(&CursorState { page: state.page + 1, ..state.clone() }));
        let stats = FeedStats { from_cache, ..ranking.stats.clone() };
        Ok(FeedPage { items, next_cursor, stats })
    }

    /// Computes a ranking from a snapshot — `now_ms` and, for a later page, the
    /// per-shard ordinal bounds of its first page (`None`: each shard's own watermark,
    /// recorded in the ranking) — far enough to settle page `index`
    /// ([`Ranking::settled_page`]): the whole ranking, or with `progressive_ranking`
    /// and no model, the best items the pages up to it and one more hold (at least
    /// twice a `shorter` prefix computed before), and the whole ranking if they do not
    /// settle it. The request's features
    /// are bound to the expression here (a ranking recomputed for a later page uses that
    /// request's features).
    #[allow(clippy::too_many_arguments)]
    async fn compute(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        expr: Arc<Expr>,
        now_ms: i64,
        mut bounds: Option<Vec<u32>>,
        page_size: usize,
        index: usize,
        shorter: Option<usize>,
    ) -> Result<Arc<Ranking>> {
        let _slot = self.admission.enter().await?;
        let whole = self.cfg.max_ranked;
        // Pages up to this one and one more: room for items the caps push down.
        let needed = index.saturating_add(2).saturating_mul(page_size);
        let mut limit = if self.cfg.progressive_ranking && self.cfg.model.is_none() {
            needed.max(shorter.map_or(0, |l| l.saturating_mul(2))).min(whole)
        } else {
            whole
        };
        let follows = self.follows_of(req.user).await?;
        // A prefix settles a page only by filling it; when the per-owner cap leaves no
        // page fillable, only the whole ranking settles one: skip the doomed round.
        if limit < whole
            && kind == FeedKind::Following
            && !pages_can_fill(&follows, page_size, self.cfg.max_per_owner)
        {
            limit = whole;
        }
        let mut scanned = 0;
        loop {
            let gathered =
                self.gather(kind, req, follows.clone(), expr.clone(), now_ms, bounds.clone(), limit).await?;
            // Fewer than asked: every candidate was in reach, the list is the whole ranking.
            let complete = limit >= whole || gathered.list.len() < limit;
            let watermarks = gathered.watermarks.clone();
            let (list, mut stats) = self.rerank(kind, req, gathered, now_ms).await;
            scanned += stats.candidates_scanned;
            stats.candidates_scanned = scanned;
            let (per_owner, per_board) = (self.cfg.max_per_owner, self.cfg.max_per_board);
            let pages =
                cpu_work(list.len(), move || Ok(rank::paginate(list, page_size, per_owner, per_board)))
                    .await?;
            let ranking = Ranking { pages, stats, watermarks, page_size, complete, limit };
            if ranking.settled_page(index).is_some() {
                return Ok(Arc::new(ranking));
            }
            // The whole ranking, from the same snapshot. (A page the prefix does not
            // fill is mostly held back by the per-owner and per-board caps, which a
            // longer prefix may never get past; every round costs a scan, so two at
            // most.)
            bounds.get_or_insert(ranking.watermarks);
            limit = whole;
        }
    }

    /// The scorer request the broker would send for the user's feed now, whatever the
    /// configured model (its `model` field is the configured one, or empty): what
    /// `feedgraph export-features` writes for training.
    pub async fn model_inputs(&self, kind: FeedKind, req: &FeedRequest) -> Result<ScoreBatch> {
        let expr = self.cfg.rankings.get(&self.cfg.default_ranking).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "default ranking `{}` is not defined",
                self.cfg.default_ranking
            ))
        })?;
        let now = now_ms();
        let follows = self.follows_of(req.user).await?;
        let g = self.gather(kind, req, follows, expr, now, None, self.cfg.max_ranked).await?;
        let take = self.cfg.model.as_ref().map_or(self.cfg.max_ranked, |m| m.candidates).min(g.list.len());
        let model = self.cfg.model.as_ref().map_or("", |m| m.name.as_str());
        Ok(features::score_batch(model, &g.list[..take], req, &g.follows, kind, now))
    }
}

/// Whether a following-feed page could be full: its candidates' owners are among the
/// followed users and the followed boards' owners, each with at most `max_per_owner`
/// items on a page. (A viewer following 10 accounts never fills a page of 50 under a
/// cap of 3.)
fn pages_can_fill(follows: &Follows, page_size: usize, max_per_owner: usize) -> bool {
    let mut owners: Vec<u64> =
        follows.users.iter().chain(follows.boards.iter().map(|(_, owner)| owner)).map(|u| u.get()).collect();
    owners.sort_unstable();
    owners.dedup();
    owners.len().saturating_mul(max_per_owner.max(1)) >= page_size
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Broker>();
}
