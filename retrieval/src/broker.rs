//! The broker: routes writes to shards, and builds feeds — follows of the user (cached)
//! → grouped by owner shard → scatter with a deadline → gather → merge → blend (home) →
//! ML re-ranking of the head (deadline; light-score fallback) → diversified pages →
//! opaque cursor.
//!
//! Pagination serves slices of one ranking: the first page computes the whole ranked
//! list (up to `max_ranked` items) and caches it; later pages read the cache, or
//! recompute from the snapshot in the cursor (same "now", same per-shard ordinal bounds)
//! when the cache no longer has it. So pages concatenate to one ranked list even when
//! pins arrive in between.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use feedgraph_graph_store::{Follows, Shard, WriteOutcome};
use feedgraph_model::{Ack, BoardId, FeedRequest, FollowTarget, Mutation, PinRef, TopicId, UserId, shard_of};
use feedgraph_scoring::{Expr, ScoreBatch, Scorer};
use moka::sync::Cache;

use crate::cursor::{CursorCodec, CursorState, FeedKind};
use crate::features;
use crate::query::{self, Candidate, CandidateQuery, ShardAnswer};
use crate::rank;
use crate::{Error, Result};

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
    pub ranking_cache_entries: u64,
    /// Named light-score expressions.
    pub rankings: BTreeMap<String, Arc<Expr>>,
    /// The ranking used when a request names none.
    pub default_ranking: String,
    /// Fault injection for tests and drills: extra latency per shard.
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

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteResult {
    pub applied: usize,
    pub unknown_pins: usize,
    /// Per shard touched: its latest sequence number after the commit.
    pub commits: Vec<(u32, u64)>,
}

struct Ranking {
    pages: Vec<Vec<Candidate>>,
    stats: FeedStats,
}

/// Routes writes and builds feeds over a set of local shards.
pub struct Broker {
    shards: Arc<Vec<Arc<Shard>>>,
    cfg: BrokerConfig,
    rankings: Cache<u64, Arc<Ranking>>,
    cursors: CursorCodec,
    scorer: Option<Arc<dyn Scorer>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("shards", &self.shards.len()).finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

impl Broker {
    /// `shards[i]` must hold logical shard `i`. `cursor_key` authenticates cursors: keep
    /// it across restarts so that cursors stay valid.
    pub fn new(shards: Vec<Arc<Shard>>, cfg: BrokerConfig, cursor_key: [u8; 32]) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::FailedPrecondition("a broker needs at least one shard".into()));
        }
        if let Some((i, s)) = shards.iter().enumerate().find(|(i, s)| s.id() as usize != *i) {
            return Err(Error::FailedPrecondition(format!("shard at position {i} holds shard {}", s.id())));
        }
        if !cfg.rankings.contains_key(&cfg.default_ranking) {
            return Err(Error::FailedPrecondition(format!(
                "default ranking `{}` is not defined",
                cfg.default_ranking
            )));
        }
        let rankings =
            Cache::builder().max_capacity(cfg.ranking_cache_entries).time_to_live(cfg.ranking_ttl).build();
        Ok(Self {
            shards: Arc::new(shards),
            cfg,
            rankings,
            cursors: CursorCodec::new(cursor_key),
            scorer: None,
        })
    }

    /// Sets the ML scorer that `BrokerConfig::model` names a model of.
    pub fn with_scorer(mut self, scorer: Arc<dyn Scorer>) -> Self {
        self.scorer = Some(scorer);
        self
    }

    /// No query task still holds the shards (lanes that outlived their request's
    /// deadline finish on the blocking pool).
    pub fn shards_idle(&self) -> bool {
        Arc::strong_count(&self.shards) == 1
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn shard_for(&self, user: UserId) -> Arc<Shard> {
        self.shards[shard_of(user, self.shard_count()) as usize].clone()
    }

    // ------------------------------------------------------------------ writes

    /// Applies a validated batch: boards named by pins and board follows are checked
    /// first (nothing is written if one is missing), then each shard's part is
    /// committed atomically. A failure on one shard after another committed is
    /// reported as an error; the committed part stays (no cross-shard transactions).
    pub async fn write(&self, mutations: Vec<Mutation>, ack: Ack) -> Result<WriteResult> {
        if ack == Ack::SemiSync {
            return Err(Error::FailedPrecondition(
                "ack SEMI_SYNC needs follower replicas; this node serves without replication".into(),
            ));
        }
        let mutations: Vec<Mutation> =
            mutations.into_iter().flat_map(Mutation::split_impressions_by_owner).collect();
        self.check_boards(&mutations).await?;

        let mut per_shard: BTreeMap<u32, Vec<Mutation>> = BTreeMap::new();
        for m in mutations {
            // Every mutation left after the split names a user (an empty impression
            // list has nothing to route and nothing to do).
            let Some(user) = m.routing_user() else { continue };
            per_shard.entry(shard_of(user, self.shard_count())).or_default().push(m);
        }
        let durability = ack.local_durability();
        let mut tasks = tokio::task::JoinSet::new();
        for (shard_id, muts) in per_shard {
            let shard = self.shards[shard_id as usize].clone();
            tasks.spawn_blocking(move || -> Result<(u32, WriteOutcome)> {
                Ok((shard_id, shard.write(&muts, durability)?))
            });
        }
        let mut result = WriteResult::default();
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(|e| Error::Internal(format!("write task failed: {e}"))).and_then(|r| r) {
                Ok((shard, outcome)) => {
                    result.applied += outcome.applied;
                    result.unknown_pins += outcome.unknown_pins;
                    result.commits.push((shard, outcome.sequence));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        result.commits.sort_unstable();
        Ok(result)
    }

    /// Every pin's board and every followed board must exist on its owner's shard (or
    /// be created earlier in the same request), with that owner.
    async fn check_boards(&self, mutations: &[Mutation]) -> Result<()> {
        let mut created: HashMap<BoardId, UserId> = HashMap::new();
        let mut to_check: Vec<(BoardId, UserId, String)> = Vec::new();
        for (i, m) in mutations.iter().enumerate() {
            match m {
                Mutation::UpsertBoard(b) => {
                    created.insert(b.id, b.owner);
                }
                Mutation::UpsertPin(p) => {
                    to_check.push((p.board, p.owner, format!("mutations[{i}].upsert_pin.board_id")))
                }
                Mutation::Follow { target: FollowTarget::Board { board, owner }, .. } => {
                    to_check.push((*board, *owner, format!("mutations[{i}].follow.target.board")))
                }
                _ => {}
            }
        }
        to_check.retain(|(board, owner, _)| created.get(board) != Some(owner));
        if to_check.is_empty() {
            return Ok(());
        }
        let shards = self.shards.clone();
        let count = self.shard_count();
        blocking(move || {
            let mut known: HashMap<BoardId, Option<UserId>> = HashMap::new();
            for (board, owner, field) in to_check {
                if let Some(claimed) = created.get(&board) {
                    return Err(Error::InvalidArgument {
                        field,
                        reason: format!(
                            "board {board} is created in this request for user {claimed}, not {owner}"
                        ),
                    });
                }
                let stored = match known.get(&board) {
                    Some(o) => *o,
                    None => {
                        let o = shards[shard_of(owner, count) as usize].board(board)?.map(|b| b.owner);
                        known.insert(board, o);
                        o
                    }
                };
                match stored {
                    None => return Err(Error::NotFound(format!("board {board} of user {owner} ({field})"))),
                    Some(actual) if actual != owner => {
                        return Err(Error::InvalidArgument {
                            field,
                            reason: format!("board {board} belongs to user {actual}, not {owner}"),
                        });
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        })
        .await
    }

    // ------------------------------------------------------------------ reads

    /// A user's follow lists (cached by the user's shard until their next follow or
    /// block change).
    pub async fn follows_of(&self, user: UserId) -> Result<Arc<Follows>> {
        let shard = self.shard_for(user);
        blocking(move || Ok(shard.follows_cached(user)?)).await
    }

    /// A pin with its flags; `None` when its owner's shard does not hold it.
    pub async fn pin(&self, pin: PinRef) -> Result<Option<feedgraph_graph_store::PinRecord>> {
        let shard = self.shard_for(pin.owner);
        blocking(move || Ok(shard.pin(pin.pin)?.map(|(_, r)| r).filter(|r| r.owner == pin.owner))).await
    }

    /// Topics of the user's newest own pins (their saves), most frequent first,
    /// excluding `exclude`.
    async fn engaged_topics(&self, user: UserId, exclude: &[TopicId]) -> Result<Vec<TopicId>> {
        let shard = self.shard_for(user);
        let (recent, wanted) = (self.cfg.engaged_recent_pins, self.cfg.engaged_topics);
        let exclude: HashSet<TopicId> = exclude.iter().copied().collect();
        blocking(move || {
            let mut counts: HashMap<TopicId, usize> = HashMap::new();
            for ordinal in shard.user_pins(user)?.iter().rev().take(recent) {
                if let Some(rec) = shard.pin_at(ordinal)? {
                    for t in rec.topics {
                        *counts.entry(t).or_default() += 1;
                    }
                }
            }
            let mut topics: Vec<(TopicId, usize)> =
                counts.into_iter().filter(|(t, _)| !exclude.contains(t)).collect();
            topics.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            Ok(topics.into_iter().take(wanted).map(|(t, _)| t).collect())
        })
        .await
    }

    // ------------------------------------------------------------------ feeds

    /// One page of the user's following or home feed.
    pub async fn feed(&self, kind: FeedKind, req: &FeedRequest) -> Result<FeedPage> {
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
        let mut from_cache = false;
        let (state, ranking) = match cursor {
            Some(st) => {
                if st.user != req.user.get() || st.kind != kind {
                    return Err(bad_cursor("cursor was issued for another user or feed".into()));
                }
                if st.ranking != ranking_name {
                    return Err(bad_cursor(format!("cursor was issued for ranking `{}`", st.ranking)));
                }
                if st.watermarks.len() != self.shards.len() {
                    return Err(bad_cursor("cursor was issued by a service with another shard count".into()));
                }
                let ranking = match self.rankings.get(&st.ranking_id) {
                    Some(r) => {
                        from_cache = true;
                        r
                    }
                    None => {
                        let r = self
                            .compute(kind, req, expr, st.now_ms, st.watermarks.clone(), st.page_size as usize)
                            .await?;
                        self.rankings.insert(st.ranking_id, r.clone());
                        r
                    }
                };
                (st, ranking)
            }
            None => {
                let watermarks: Vec<u32> = self.shards.iter().map(|s| s.next_ordinal()).collect();
                let now = now_ms();
                let page_size = req.page_size.get() as usize;
                let ranking = self.compute(kind, req, expr, now, watermarks.clone(), page_size).await?;
                let ranking_id = rand::random::<u64>();
                self.rankings.insert(ranking_id, ranking.clone());
                let st = CursorState {
                    kind,
                    user: req.user.get(),
                    ranking: ranking_name,
                    ranking_id,
                    page: 0,
                    page_size: req.page_size.get(),
                    now_ms: now,
                    watermarks,
                };
                (st, ranking)
            }
        };
        let index = state.page as usize;
        let items = ranking.pages.get(index).cloned().unwrap_or_default();
        let next_cursor = (index + 1 < ranking.pages.len())
            .then(|| self.cursors.encode(&CursorState { page: state.page + 1, ..state.clone() }));
        let stats = FeedStats { from_cache, ..ranking.stats.clone() };
        Ok(FeedPage { items, next_cursor, stats })
    }

    /// Computes a whole ranking from a snapshot: `now_ms` and per-shard ordinal bounds.
    /// The request's features are bound to the expression here (a ranking recomputed
    /// for a later page uses that request's features).
    async fn compute(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        expr: Arc<Expr>,
        now_ms: i64,
        watermarks: Vec<u32>,
        page_size: usize,
    ) -> Result<Arc<Ranking>> {
        let gathered = self.gather(kind, req, expr, now_ms, watermarks).await?;
        let (list, stats) = self.rerank(kind, req, gathered, now_ms).await;
        let pages = rank::paginate(list, page_size, self.cfg.max_per_owner, self.cfg.max_per_board);
        Ok(Arc::new(Ranking { pages, stats }))
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
        let watermarks: Vec<u32> = self.shards.iter().map(|s| s.next_ordinal()).collect();
        let g = self.gather(kind, req, expr, now, watermarks).await?;
        let take = self.cfg.model.as_ref().map_or(self.cfg.max_ranked, |m| m.candidates).min(g.list.len());
        let model = self.cfg.model.as_ref().map_or("", |m| m.name.as_str());
        Ok(features::score_batch(model, &g.list[..take], req, &g.follows, kind, now))
    }

    /// Re-ranks the head of the list with the ML model, if one is configured; on any
    /// failure the light-score order stands and the stats say why.
    async fn rerank(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        g: Gathered,
        now_ms: i64,
    ) -> (Vec<Candidate>, FeedStats) {
        let Gathered { mut list, follows, mut stats } = g;
        let Some(model) = &self.cfg.model else { return (list, stats) };
        let take = model.candidates.min(list.len());
        if take == 0 {
            stats.scoring = Scoring::Model;
            return (list, stats);
        }
        let Some(scorer) = &self.scorer else {
            stats.scoring = Scoring::LightFallback(FallbackReason::Unavailable);
            return (list, stats);
        };
        let batch = features::score_batch(&model.name, &list[..take], req, &follows, kind, now_ms);
        let scored = match tokio::time::timeout(model.deadline, scorer.score(batch)).await {
            Err(_) => Err(FallbackReason::Deadline),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "scorer failed; light-score fallback");
                Err(match e {
                    feedgraph_scoring::Error::DeadlineExceeded(_) => FallbackReason::Deadline,
                    feedgraph_scoring::Error::Unavailable(_) | feedgraph_scoring::Error::Internal(_) => {
                        FallbackReason::Unavailable
                    }
                    _ => FallbackReason::Refused,
                })
            }
            Ok(Ok(s)) if s.scores.len() != take => {
                tracing::warn!(
                    got = s.scores.len(),
                    sent = take,
                    "scorer answered the wrong number of scores"
                );
                Err(FallbackReason::Refused)
            }
            Ok(Ok(s)) => Ok(s),
        };
        let scores = match scored {
            Ok(s) => s,
            Err(reason) => {
                stats.scoring = Scoring::LightFallback(reason);
                return (list, stats);
            }
        };
        let tail = list.split_off(take);
        for (c, score) in list.iter_mut().zip(&scores.scores) {
            // A NaN score sorts last rather than poisoning the order.
            c.score = if score.is_nan() { f64::NEG_INFINITY } else { f64::from(*score) };
        }
        let by_model = |v: &mut Vec<Candidate>| v.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut head = match kind {
            FeedKind::Following => {
                by_model(&mut list);
                list
            }
            // The blend's share of interest positions stands: re-rank each side, then
            // blend them again.
            FeedKind::Home => {
                let (mut following, mut interest): (Vec<_>, Vec<_>) =
                    list.into_iter().partition(|c| c.source.is_following());
                by_model(&mut following);
                by_model(&mut interest);
                rank::blend(following, interest, self.cfg.home_interest_share, take)
            }
        };
        head.extend(tail);
        stats.scoring = Scoring::Model;
        stats.model = Some(format!("{}@{}", scores.model, scores.version));
        (head, stats)
    }

    /// Candidates from every shard the user's follows and interests live on, merged
    /// (and blended, for home) by light score.
    async fn gather(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        expr: Arc<Expr>,
        now_ms: i64,
        watermarks: Vec<u32>,
    ) -> Result<Gathered> {
        let user = req.user;
        let follows = self.follows_of(user).await?;
        let n = self.shards.len();
        let template = CandidateQuery {
            viewer: user,
            users: Vec::new(),
            boards: Vec::new(),
            topics: Vec::new(),
            engaged_topics: Vec::new(),
            blocked: follows.blocked.clone(),
            top_k: self.cfg.candidates_per_shard,
            scan_limit: self.cfg.scan_limit,
            request_values: expr
                .request_features()
                .iter()
                .map(|f| req.features.get(f).copied().unwrap_or(0.0))
                .collect(),
            expr,
            now_ms,
            ordinal_bound: None,
        };
        let mut queries: Vec<Option<CandidateQuery>> = vec![None; n];
        let count = self.shard_count();
        let slot = |queries: &mut Vec<Option<CandidateQuery>>, shard: u32| -> usize {
            let i = shard as usize;
            if queries[i].is_none() {
                queries[i] = Some(CandidateQuery { ordinal_bound: Some(watermarks[i]), ..template.clone() });
            }
            i
        };
        for u in &follows.users {
            let i = slot(&mut queries, shard_of(*u, count));
            if let Some(q) = queries[i].as_mut() {
                q.users.push(*u);
            }
        }
        for (b, owner) in &follows.boards {
            let i = slot(&mut queries, shard_of(*owner, count));
            if let Some(q) = queries[i].as_mut() {
                q.boards.push(*b);
            }
        }
        if kind == FeedKind::Home {
            let engaged = self.engaged_topics(user, &follows.topics).await?;
            if !follows.topics.is_empty() || !engaged.is_empty() {
                // Each shard indexes its own pins' topics: interest scatters to all.
                for s in 0..count {
                    let i = slot(&mut queries, s);
                    if let Some(q) = queries[i].as_mut() {
                        q.topics = follows.topics.clone();
                        q.engaged_topics = engaged.clone();
                    }
                }
            }
        }

        // Local shard queries run in one blocking "lane" per core rather than one
        // thread per shard: on few cores, waking 16 threads per request costs more
        // than it overlaps. Each lane reports every shard as soon as it is done, so a
        // shard that misses the deadline is left out without holding up the others
        // already answered.
        let work: Vec<(usize, CandidateQuery)> =
            queries.into_iter().enumerate().filter_map(|(i, q)| q.map(|q| (i, q))).collect();
        let asked = work.len() as u32;
        let lanes = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, work.len().max(1));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut lane_work: Vec<Vec<(usize, CandidateQuery)>> = (0..lanes).map(|_| Vec::new()).collect();
        for (k, item) in work.into_iter().enumerate() {
            lane_work[k % lanes].push(item);
        }
        for queries in lane_work {
            let shards = self.shards.clone();
            let delays = self.cfg.shard_delays.clone();
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || {
                for (i, q) in queries {
                    if let Some(d) = delays.get(&(i as u32)) {
                        std::thread::sleep(*d);
                    }
                    // The receiver may be gone (deadline passed): nothing to do then.
                    if tx.send((i, query::run(&shards[i], &q))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let deadline = tokio::time::Instant::now() + self.cfg.shard_deadline;
        let mut answers: Vec<ShardAnswer> = Vec::with_capacity(asked as usize);
        while (answers.len() as u32) < asked {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((_, Ok(answer)))) => answers.push(answer),
                Ok(Some((i, Err(e)))) => tracing::warn!(shard = i, error = %e, "candidate query failed"),
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(answered = answers.len(), asked, "candidate queries missed the deadline");
                    break;
                }
            }
        }
        let answered = answers.len() as u32;
        let scanned = answers.iter().map(|a| a.scanned).sum();
        let (mut following, mut interest) = (Vec::new(), Vec::new());
        for a in answers {
            following.push(a.following);
            interest.push(a.interest);
        }
        let limit = self.cfg.max_ranked;
        let following = rank::merge(following, limit);
        let list = match kind {
            FeedKind::Following => following,
            FeedKind::Home => {
                rank::blend(following, rank::merge(interest, limit), self.cfg.home_interest_share, limit)
            }
        };
        let stats = FeedStats {
            candidates_scanned: scanned,
            shards_asked: asked,
            shards_answered: answered,
            partial: answered < asked,
            scoring: Scoring::Light,
            model: None,
            from_cache: false,
        };
        Ok(Gathered { list, follows, stats })
    }
}

/// A light-ranked list and what made it.
struct Gathered {
    list: Vec<Candidate>,
    follows: Arc<Follows>,
    stats: FeedStats,
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Broker>();
}
