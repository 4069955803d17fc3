//! `feedgraph.internal.v1.ShardService`: the data plane of the replicas a node holds,
//! for brokers on other nodes. Thin: wire → domain, the replica's fences and freshness
//! checks, the same shard-side code the local broker runs, domain → wire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use feedgraph_cluster::service::store_status;
use feedgraph_cluster::{Error as ClusterError, Replicas};
use feedgraph_graph_store::Shard;
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_proto::{FieldError, MAX_MUTATIONS_PER_WRITE};
use feedgraph_retrieval::query;
use feedgraph_scoring::Expr;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::wire;

/// Compiled light-score expressions, by source (brokers send the source).
const EXPRESSIONS_CACHED: u64 = 1024;
/// Longest expression source accepted.
const MAX_EXPR_BYTES: usize = 4096;

#[derive(Clone)]
pub struct ShardApi {
    pub replicas: Arc<Replicas>,
    pub metrics: Arc<Metrics>,
    /// Fault injection: extra latency per shard's candidate query.
    pub delays: HashMap<u32, Duration>,
    exprs: moka::sync::Cache<String, Arc<Expr>>,
}

impl std::fmt::Debug for ShardApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardApi").field("replicas", &self.replicas).finish()
    }
}

impl ShardApi {
    pub fn new(replicas: Arc<Replicas>, metrics: Arc<Metrics>, delays: HashMap<u32, Duration>) -> Self {
        Self { replicas, metrics, delays, exprs: moka::sync::Cache::new(EXPRESSIONS_CACHED) }
    }

    /// The store of `shard` to read, if this node holds a replica that serves reads and
    /// has applied what `after` asks.
    fn readable(&self, shard: u32, after: Option<ipb::ReadAfter>) -> Result<Arc<Shard>, Status> {
        let replica = self.replicas.get(shard).ok_or_else(|| {
            // Not NOT_FOUND: the broker tries another replica.
            Status::unavailable(format!("shard {shard}: this node holds no replica of it"))
        })?;
        replica.readable(wire::read_after(after)).map_err(feedgraph_cluster::service::status)
    }

    fn expr(&self, source: &str) -> Result<Arc<Expr>, Status> {
        if source.len() > MAX_EXPR_BYTES {
            return Err(Status::resource_exhausted(format!("score_expr: at most {MAX_EXPR_BYTES} bytes")));
        }
        if let Some(e) = self.exprs.get(source) {
            return Ok(e);
        }
        let e = Arc::new(
            Expr::compile(source).map_err(|e| Status::invalid_argument(format!("score_expr: {e}")))?,
        );
        self.exprs.insert(source.to_owned(), e.clone());
        Ok(e)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))?
}

#[tonic::async_trait]
impl ipb::shard_service_server::ShardService for ShardApi {
    async fn candidate_query(
        &self,
        request: Request<ipb::CandidateQueryRequest>,
    ) -> Result<Response<ipb::CandidateQueryResponse>, Status> {
        self.metrics
            .observed("ShardCandidateQuery", async {
                let req = request.into_inner();
                let store = self.readable(req.shard, req.read_after)?;
                let q = wire::query_from_proto(&req, self.expr(&req.score_expr)?)?;
                let delay = self.delays.get(&req.shard).copied();
                // Dropped with this handler (the broker's deadline passed, or it went
                // away): the scan stops at its next block.
                let control = Arc::new(query::ScanControl::unbounded());
                let _cancel = query::CancelOnDrop(control.clone());
                let answer = blocking(move || {
                    if let Some(d) = delay {
                        std::thread::sleep(d);
                    }
                    query::run(&store, &q, &control).map_err(crate::service::status)
                })
                .await?;
                Ok(wire::answer_to_proto(&answer))
            })
            .await
    }

    async fn candidate_queries(
        &self,
        request: Request<ipb::CandidateQueriesRequest>,
    ) -> Result<Response<ipb::CandidateQueriesResponse>, Status> {
        self.metrics
            .observed("ShardCandidateQueries", async {
                let req = request.into_inner();
                if req.queries.len() > self.replicas.shard_count() as usize {
                    return Err(Status::resource_exhausted(format!(
                        "queries: at most one per shard ({})",
                        self.replicas.shard_count()
                    )));
                }
                let mut results: Vec<Option<Result<query::ShardAnswer, Status>>> =
                    (0..req.queries.len()).map(|_| None).collect();
                let mut work = Vec::with_capacity(req.queries.len());
                for (k, r) in req.queries.iter().enumerate() {
                    let prepared = self
                        .readable(r.shard, r.read_after)
                        .and_then(|store| Ok((store, wire::query_from_proto(r, self.expr(&r.score_expr)?)?)));
                    match prepared {
                        Ok((store, q)) => work.push((k, self.delays.get(&r.shard).copied(), store, q)),
                        Err(s) => results[k] = Some(Err(s)),
                    }
                }
                // As the broker's local scatter: one group per core, every group under
                // one control (shared floors; the scans stop when this handler is
                // dropped).
                let control = Arc::new(query::ScanControl::new(None, req.share_floors));
                let _cancel = query::CancelOnDrop(control.clone());
                let groups =
                    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, work.len().max(1));
                let mut lanes: Vec<Vec<_>> = (0..groups).map(|_| Vec::new()).collect();
                for (k, item) in work.into_iter().enumerate() {
                    lanes[k % groups].push(item);
                }
                let mut tasks = tokio::task::JoinSet::new();
                for lane in lanes.into_iter().filter(|l| !l.is_empty()) {
                    let control = control.clone();
                    tasks.spawn_blocking(move || {
                        lane.into_iter()
                            .map(|(k, delay, store, q)| {
                                if let Some(d) = delay {
                                    std::thread::sleep(d);
                                }
                                (k, query::run(&store, &q, &control).map_err(crate::service::status))
                            })
                            .collect::<Vec<_>>()
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    let done = done.map_err(|e| Status::internal(format!("blocking task failed: {e}")))?;
                    for (k, answer) in done {
                        results[k] = Some(answer);
                    }
                }
                let results = results
                    .into_iter()
                    .map(|r| {
                        let result = match r {
                            Some(Ok(answer)) => {
                                ipb::candidate_query_result::Result::Answer(wire::answer_to_proto(&answer))
                            }
                            Some(Err(status)) => {
                                ipb::candidate_query_result::Result::Refusal(wire::refusal_to_proto(&status))
                            }
                            None => ipb::candidate_query_result::Result::Refusal(wire::refusal_to_proto(
                                &Status::internal("query not run"),
                            )),
                        };
                        ipb::CandidateQueryResult { result: Some(result) }
                    })
                    .collect();
                Ok(ipb::CandidateQueriesResponse { results })
            })
            .await
    }

    async fn apply_writes(
        &self,
        request: Request<ipb::ApplyWritesRequest>,
    ) -> Result<Response<ipb::ApplyWritesResponse>, Status> {
        self.metrics
            .observed("ShardApplyWrites", async {
                let req = request.into_inner();
                if req.mutations.len() > MAX_MUTATIONS_PER_WRITE {
                    return Err(Status::resource_exhausted(format!(
                        "mutations: at most {MAX_MUTATIONS_PER_WRITE} per request"
                    )));
                }
                let w = feedgraph_proto::WriteRequest::try_from(pb::WriteRequest {
                    mutations: req.mutations,
                    ack: req.ack,
                    request_id: String::new(),
                })
                .map_err(|e: FieldError| Status::invalid_argument(format!("{}: {}", e.field, e.reason)))?;
                let replica = self.replicas.get(req.shard).ok_or_else(|| {
                    feedgraph_cluster::service::status(ClusterError::NotLeader {
                        shard: req.shard,
                        leader: None,
                        epoch: 0,
                    })
                })?;
                let applied = w.mutations.len() as u32;
                let outcome = replica
                    .write(w.mutations, w.ack, req.epoch)
                    .await
                    .map_err(feedgraph_cluster::service::status)?;
                Ok(ipb::ApplyWritesResponse {
                    commit: Some(pb::ShardCommit {
                        shard: req.shard,
                        sequence: outcome.sequence,
                        epoch: outcome.epoch,
                    }),
                    applied,
                    unknown_pins: outcome.unknown_pins as u32,
                })
            })
            .await
    }

    async fn get_follows(
        &self,
        request: Request<ipb::ShardGetFollowsRequest>,
    ) -> Result<Response<pb::GetFollowsResponse>, Status> {
        self.metrics
            .observed("ShardGetFollows", async {
                let req = request.into_inner();
                let user = feedgraph_model::UserId::new(req.user_id)
                    .ok_or_else(|| Status::invalid_argument("user_id: must be non-zero"))?;
                let store = self.readable(req.shard, req.read_after)?;
                let follows = blocking(move || store.follows_cached(user).map_err(store_status)).await?;
                Ok(wire::follows_to_proto(&follows))
            })
            .await
    }

    async fn get_pin(
        &self,
        request: Request<ipb::ShardGetPinRequest>,
    ) -> Result<Response<pb::GetPinResponse>, Status> {
        self.metrics
            .observed("ShardGetPin", async {
                let req = request.into_inner();
                let pin = req.pin.ok_or_else(|| Status::invalid_argument("pin: is required"))?;
                let pin = feedgraph_model::PinRef::try_from(pin)
                    .map_err(|e| Status::invalid_argument(format!("pin.{}: {}", e.field, e.reason)))?;
                let store = self.readable(req.shard, req.read_after)?;
                let found = blocking(move || {
                    Ok(store
                        .pin(pin.pin)
                        .map_err(store_status)?
                        .map(|(_, r)| r)
                        .filter(|r| r.owner == pin.owner))
                })
                .await?;
                Ok(pb::GetPinResponse { found: found.is_some(), pin: found.as_ref().map(wire::pin_to_proto) })
            })
            .await
    }

    async fn get_board_owners(
        &self,
        request: Request<ipb::GetBoardOwnersRequest>,
    ) -> Result<Response<ipb::GetBoardOwnersResponse>, Status> {
        self.metrics
            .observed("ShardGetBoardOwners", async {
                let req = request.into_inner();
                if req.board_ids.len() > MAX_MUTATIONS_PER_WRITE {
                    return Err(Status::resource_exhausted(format!(
                        "board_ids: at most {MAX_MUTATIONS_PER_WRITE}"
                    )));
                }
                let boards = req
                    .board_ids
                    .iter()
                    .map(|b| feedgraph_model::BoardId::new(*b))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Status::invalid_argument("board_ids: must be non-zero"))?;
                let store = self.readable(req.shard, req.read_after)?;
                let owner_ids = blocking(move || {
                    boards
                        .iter()
                        .map(|b| Ok(store.board(*b).map_err(store_status)?.map_or(0, |b| b.owner.get())))
                        .collect()
                })
                .await?;
                Ok(ipb::GetBoardOwnersResponse { owner_ids })
            })
            .await
    }

    async fn engaged_topics(
        &self,
        request: Request<ipb::EngagedTopicsRequest>,
    ) -> Result<Response<ipb::EngagedTopicsResponse>, Status> {
        self.metrics
            .observed("ShardEngagedTopics", async {
                let req = request.into_inner();
                let user = feedgraph_model::UserId::new(req.user_id)
                    .ok_or_else(|| Status::invalid_argument("user_id: must be non-zero"))?;
                let recent = (req.recent_pins as usize).min(10_000);
                let store = self.readable(req.shard, req.read_after)?;
                let counts = blocking(move || {
                    query::engaged_topic_counts(&store, user, recent).map_err(crate::service::status)
                })
                .await?;
                Ok(ipb::EngagedTopicsResponse {
                    topics: counts
                        .into_iter()
                        .map(|(t, count)| ipb::TopicCount { topic_id: t.get(), count })
                        .collect(),
                })
            })
            .await
    }
}
