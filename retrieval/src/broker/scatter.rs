//! Scatter and gather of candidate queries. Shards with a readable local replica run
//! on the broker's scan *lanes*, one thread per core (on few cores, waking a thread per
//! shard costs more than it overlaps), split into one group per lane. Shards served
//! elsewhere are one request per node (`batch_remote_queries`; else one per shard),
//! each shard failing over to its next replica on error. Every shard's answer is
//! there for the broker the moment it is done (a lane wakes the broker once, for its
//! whole group); the broker collects until the deadline and leaves out (and flags)
//! what did not answer.

use std::sync::{Arc, Mutex};

use feedgraph_graph_store::{Follows, Shard};
use feedgraph_model::{FeedRequest, shard_of};
use feedgraph_scoring::Expr;

use super::{Broker, FeedStats, Scoring, cpu_work};
use crate::cursor::FeedKind;
use crate::query::{self, CancelOnDrop, Candidate, CandidateQuery, ScanControl, ShardAnswer};
use crate::rank;
use crate::shards::{RemoteReplica, Replica};
use crate::{Error, Result};

/// A light-ranked list and what made it.
pub(super) struct Gathered {
    pub(super) list: Vec<Candidate>,
    pub(super) follows: Arc<Follows>,
    pub(super) stats: FeedStats,
    /// Per shard, the ordinal bound its answer used (0: not asked or not answered).
    pub(super) watermarks: Vec<u32>,
}

type Report = (usize, Result<ShardAnswer>);

/// Where the lanes put shard answers. A lane puts each answer here as soon as it is
/// done but wakes the request only once, when its group is done: one wake-up per lane,
/// not per shard (per-shard wake-ups measured ~14% of a recency feed's CPU in context
/// switches). At the deadline the request takes whatever is here.
#[derive(Default)]
struct Inbox {
    reports: Mutex<Vec<Report>>,
    ready: tokio::sync::Notify,
}

impl Inbox {
    fn put(&self, report: Report) {
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).push(report);
    }

    fn take(&self) -> Vec<Report> {
        std::mem::take(&mut *self.reports.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What the shards answered so far.
struct Collected {
    answers: Vec<ShardAnswer>,
    /// Per shard, the ordinal bound its answer used (0: not answered).
    watermarks: Vec<u32>,
    /// Reports taken, answers or errors.
    received: u32,
}

impl Collected {
    fn take(&mut self, report: Report) {
        self.received += 1;
        match report {
            (i, Ok(answer)) => {
                if let Some(w) = self.watermarks.get_mut(i) {
                    *w = answer.watermark;
                }
                self.answers.push(answer);
            }
            (i, Err(Error::Cancelled(_))) => {
                tracing::debug!(shard = i, "candidate query stopped at the deadline");
            }
            (i, Err(e)) => tracing::warn!(shard = i, error = %e, "candidate query failed"),
        }
    }
}

/// Wakes the request when a lane's job ends, however it ends.
struct WakeOnDrop(Arc<Inbox>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        // A permit is kept if the request is not waiting yet: no wake-up is lost.
        self.0.ready.notify_one();
    }
}

/// A shard to ask elsewhere: its query, the freshness it needs, its replicas in the
/// order to try them.
struct RemoteWork {
    shard: usize,
    query: CandidateQuery,
    after: crate::shards::ReadAfter,
    replicas: Vec<Arc<dyn RemoteReplica>>,
}

impl Broker {
    /// The best `limit` candidates from every shard the user's follows and interests
    /// live on, merged (and blended, for home) by light score. `bounds`: a ranking's
    /// per-shard ordinal snapshot (a shard bounded at 0 had nothing then and is not
    /// asked). `follows`: the user's follow lists ([`Broker::follows_of`]), read once
    /// per ranking however many rounds it takes.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn gather(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        follows: Arc<Follows>,
        expr: Arc<Expr>,
        now_ms: i64,
        bounds: Option<Vec<u32>>,
        limit: usize,
    ) -> Result<Gathered> {
        let user = req.user;
        let count = self.shard_count();
        let n = count as usize;
        let template = CandidateQuery {
            viewer: user,
            users: Vec::new(),
            boards: Vec::new(),
            topics: Vec::new(),
            engaged_topics: Vec::new(),
            blocked: follows.blocked.clone(),
            // The best `limit` of the merged list are among each shard's best `limit`.
            top_k: self.cfg.candidates_per_shard.min(limit),
            scan_limit: self.cfg.scan_limit,
            request_values: expr
                .request_features()
                .iter()
                .map(|f| req.features.get(f).copied().unwrap_or(0.0))
                .collect(),
            expr,
            now_ms,
            ordinal_bound: None,
            full_scan: self.cfg.full_scan,
        };
        let mut queries: Vec<Option<CandidateQuery>> = vec![None; n];
        let slot = |queries: &mut Vec<Option<CandidateQuery>>, shard: u32| -> usize {
            let i = shard as usize;
            if queries[i].is_none() {
                let ordinal_bound = bounds.as_ref().map(|b| b.get(i).copied().unwrap_or(0));
                queries[i] = Some(CandidateQuery { ordinal_bound, ..template.clone() });
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
        // A shard bounded at 0 held nothing of this ranking: nothing to ask.
        let work: Vec<(usize, CandidateQuery)> = queries
            .into_iter()
            .enumerate()
            .filter_map(|(i, q)| q.filter(|q| q.ordinal_bound != Some(0)).map(|q| (i, q)))
            .collect();
        let asked = work.len() as u32;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
        let deadline = tokio::time::Instant::now() + self.cfg.shard_deadline;
        // Local scans stop at the deadline, or as soon as this request is done with them
        // or dropped (its client went away or its gRPC deadline passed). Floors are
        // shared when every shard keeps at least the merged list's worth.
        let control =
            Arc::new(ScanControl::new(Some(deadline.into_std()), self.cfg.candidates_per_shard >= limit));
        let _cancel = CancelOnDrop(control.clone());
        let mut local: Vec<(usize, CandidateQuery, Arc<Shard>)> = Vec::new();
        let mut remote: Vec<RemoteWork> = Vec::new();
        for (i, q) in work {
            let after = self.read_after(i as u32);
            let mut remotes: Vec<Arc<dyn RemoteReplica>> = Vec::new();
            let mut store = None;
            for replica in self.shards.readers(i as u32) {
                match replica {
                    Replica::Local(l) if store.is_none() && remotes.is_empty() => {
                        // A later page needs the ordinals its first page saw: a local
                        // follower that has not applied them yet gives way to a replica
                        // that has.
                        if let Ok(s) = l.readable(after)
                            && q.ordinal_bound.is_none_or(|b| b <= s.next_ordinal())
                        {
                            store = Some(s);
                        }
                    }
                    Replica::Local(_) => {}
                    Replica::Remote(r) => remotes.push(r),
                }
            }
            match store {
                Some(s) => local.push((i, q, s)),
                None => remote.push(RemoteWork { shard: i, query: q, after, replicas: remotes }),
            }
        }
        self.spawn_remotes(remote, control.shares_floors(), deadline, &tx);
        drop(tx);
        let inbox = Arc::new(Inbox::default());
        self.spawn_lanes(local, &control, &inbox);

        let mut got =
            Collected { answers: Vec::with_capacity(asked as usize), watermarks: vec![0u32; n], received: 0 };
        let mut remotes_open = true;
        loop {
            inbox.take().into_iter().for_each(|r| got.take(r));
            if got.received >= asked {
                break;
            }
            tokio::select! {
                report = rx.recv(), if remotes_open => match report {
                    Some(report) => got.take(report),
                    None => remotes_open = false,
                },
                () = inbox.ready.notified() => {}
                () = tokio::time::sleep_until(deadline) => {
                    // What the lanes finished in time counts, even with their group unfinished.
                    inbox.take().into_iter().for_each(|r| got.take(r));
                    tracing::debug!(received = got.received, asked, "candidate queries missed the deadline");
                    break;
                }
            }
        }
        let Collected { answers, mut watermarks, .. } = got;
        // A later page is bounded by its first page's watermarks, whatever answered now.
        if let Some(b) = bounds {
            watermarks = b;
        }
        let answered = answers.len() as u32;
        let scanned = answers.iter().map(|a| a.scanned).sum();
        let (mut following, mut interest) = (Vec::new(), Vec::new());
        for a in answers {
            following.push(a.following);
            interest.push(a.interest);
        }
        let share = self.cfg.home_interest_share;
        // Merging thousands of candidates is CPU work: off the async executor.
        let total = following.iter().chain(&interest).map(Vec::len).sum();
        let list = cpu_work(total, move || {
            let following = rank::merge(following, limit);
            Ok(match kind {
                FeedKind::Following => following,
                FeedKind::Home => rank::blend(following, rank::merge(interest, limit), share, limit),
            })
        })
        .await?;
        let stats = FeedStats {
            candidates_scanned: scanned,
            shards_asked: asked,
            shards_answered: answered,
            partial: answered < asked,
            scoring: Scoring::Light,
            model: None,
            from_cache: false,
        };
        Ok(Gathered { list, follows, stats, watermarks })
    }

    /// Local shard queries, spread over one blocking lane per core; each lane puts
    /// every answer in `inbox` as soon as it is done, and wakes the request when its
    /// group is done.
    fn spawn_lanes(
        &self,
        work: Vec<(usize, CandidateQuery, Arc<Shard>)>,
        control: &Arc<ScanControl>,
        inbox: &Arc<Inbox>,
    ) {
        if work.is_empty() {
            return;
        }
        let lanes = self.lanes.count().clamp(1, work.len());
        let mut lane_work: Vec<Vec<(usize, CandidateQuery, Arc<Shard>)>> =
            (0..lanes).map(|_| Vec::new()).collect();
        for (k, item) in work.into_iter().enumerate() {
            lane_work[k % lanes].push(item);
        }
        for queries in lane_work {
            let delays = self.cfg.shard_delays.clone();
            let busy = self.busy.clone();
            let control = control.clone();
            let inbox = WakeOnDrop(inbox.clone());
            self.lanes.run(move || {
                let _busy = busy;
                for (i, q, shard) in queries {
                    if control.is_stopped() {
                        return;
                    }
                    if let Some(d) = delays.get(&(i as u32)) {
                        std::thread::sleep(*d);
                    }
                    inbox.0.put((i, query::run(&shard, &q, &control)));
                }
            });
        }
    }

    /// Shards served elsewhere: grouped by the node of their first replica, one
    /// request per node (or per shard, without `batch_remote_queries`).
    fn spawn_remotes(
        &self,
        work: Vec<RemoteWork>,
        share_floors: bool,
        deadline: tokio::time::Instant,
        tx: &tokio::sync::mpsc::UnboundedSender<Report>,
    ) {
        // Shards with no replica to try, or when not batching, are groups of one.
        let node_of = |w: &RemoteWork| {
            w.replicas.first().filter(|_| self.cfg.batch_remote_queries).map(|r| r.address().to_owned())
        };
        let mut by_node: Vec<(Option<String>, Vec<RemoteWork>)> = Vec::new();
        for w in work {
            let node = node_of(&w);
            match by_node.iter_mut().find(|(n, _)| node.is_some() && *n == node) {
                Some((_, group)) => group.push(w),
                None => by_node.push((node, vec![w])),
            }
        }
        for (_, group) in by_node {
            let busy = self.busy.clone();
            let tx = tx.clone();
            if group.len() == 1 {
                let w = group.into_iter().next().expect("a group of one");
                let last = Error::Unavailable(format!("shard {}: no replica serves reads", w.shard));
                tokio::spawn(async move {
                    let _busy = busy;
                    remote_with_failover(w, 0, last, deadline, tx).await;
                });
            } else {
                tokio::spawn(async move {
                    let _busy = busy;
                    node_with_failover(group, share_floors, deadline, tx).await;
                });
            }
        }
    }
}

/// Several shards on one node in one request; a shard whose query failed (or all of
/// them, if the request did) goes on to its next replicas, one request each.
async fn node_with_failover(
    group: Vec<RemoteWork>,
    share_floors: bool,
    deadline: tokio::time::Instant,
    tx: tokio::sync::mpsc::UnboundedSender<Report>,
) {
    let node = group[0].replicas[0].clone();
    let queries = group.iter().map(|w| (w.shard as u32, w.query.clone(), w.after)).collect();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // The request is done with these shards (deadline, or dropped): stop.
    let answers = tokio::select! {
        _ = tx.closed() => return,
        answers = node.node_candidates(queries, share_floors, left) => answers,
    };
    let answers: Vec<Result<ShardAnswer>> = match answers {
        Ok(answers) => answers,
        Err(e) => {
            tracing::debug!(replica = node.address(), error = %e, "remote candidate queries failed; trying the next replicas");
            group.iter().map(|_| Err(Error::Unavailable(e.to_string()))).collect()
        }
    };
    let mut retries = tokio::task::JoinSet::new();
    for (w, answer) in group.into_iter().zip(answers) {
        match answer {
            Ok(answer) => {
                let _ = tx.send((w.shard, Ok(answer)));
            }
            Err(e) => {
                tracing::debug!(shard = w.shard, replica = node.address(), error = %e, "remote candidate query failed; trying the next replica");
                retries.spawn(remote_with_failover(w, 1, e, deadline, tx.clone()));
            }
        }
    }
    while retries.join_next().await.is_some() {}
}

/// One shard served elsewhere: its replicas from `first` on in turn, each with the time
/// left; `last` is reported if none answers.
async fn remote_with_failover(
    w: RemoteWork,
    first: usize,
    mut last: Error,
    deadline: tokio::time::Instant,
    tx: tokio::sync::mpsc::UnboundedSender<Report>,
) {
    for r in w.replicas.iter().skip(first) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // The request is done with this shard (deadline, or dropped): stop.
        let answer = tokio::select! {
            _ = tx.closed() => return,
            answer = r.candidates(w.query.clone(), w.after, left) => answer,
        };
        match answer {
            Ok(answer) => {
                let _ = tx.send((w.shard, Ok(answer)));
                return;
            }
            Err(e) => {
                tracing::debug!(shard = w.shard, replica = r.address(), error = %e, "remote candidate query failed; trying the next replica");
                last = e;
            }
        }
    }
    let _ = tx.send((w.shard, Err(last)));
}
