//! Thin gRPC adapters: proto → domain (validated at the edge), call the broker, domain →
//! proto; errors → `tonic::Status` in one exhaustive mapping.

use std::sync::Arc;
use std::time::Instant;

use feedgraph_cluster::service::store_status;
use feedgraph_model as model;
use feedgraph_proto::pb::v1 as pb;
use feedgraph_proto::refusal::{RefusalKind, refuse, with_sequence};
use feedgraph_proto::{FieldError, MAX_MUTATIONS_PER_WRITE};
use feedgraph_retrieval::{Broker, Error, FeedKind, FeedPage, Scoring, Source};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::metrics::Metrics;

/// Maps a broker error to the status a client can act on. Refusals that tell a client
/// where to go (not the leader, another epoch) carry `feedgraph_proto::refusal`
/// metadata.
pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument { field, reason } if field.is_empty() => Status::invalid_argument(reason),
        Error::InvalidArgument { field, reason } => Status::invalid_argument(format!("{field}: {reason}")),
        Error::NotFound(what) => Status::not_found(what),
        Error::FailedPrecondition(why) => Status::failed_precondition(why),
        Error::NotLeader { leader, epoch, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::NotLeader, leader.as_deref(), Some(epoch))
        }
        Error::StaleEpoch { current, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::StaleEpoch, None, Some(current))
        }
        Error::Behind { .. } => refuse(Status::failed_precondition(msg), RefusalKind::Behind, None, None),
        Error::Unavailable(why) => Status::unavailable(why),
        Error::NotConfirmed { epoch, sequence, .. } => with_sequence(
            refuse(Status::deadline_exceeded(msg), RefusalKind::NotConfirmed, None, Some(epoch)),
            sequence,
        ),
        Error::Overloaded { retry_after, .. } => {
            let mut status = Status::resource_exhausted(msg);
            // gRPC's retry pushback: clients with a retry policy wait this long.
            if let Ok(v) = retry_after.as_millis().to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            status
        }
        Error::Cancelled(why) => Status::cancelled(why),
        Error::Internal(why) => Status::internal(why),
        Error::Store(e) => store_status(e),
    }
}

fn field_status(e: FieldError) -> Status {
    Status::invalid_argument(format!("{}: {}", e.field, e.reason))
}

fn request_id(given: &str) -> String {
    if given.is_empty() { format!("{:016x}", rand::random::<u64>()) } else { given.to_owned() }
}

/// `feedgraph.v1.GraphService`.
#[derive(Debug, Clone)]
pub struct GraphApi {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl pb::graph_service_server::GraphService for GraphApi {
    async fn write(&self, request: Request<pb::WriteRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        let span = tracing::debug_span!("write", request_id = %request_id(&req.request_id), mutations = req.mutations.len());
        self.metrics
            .observed(
                "Write",
                async {
                    if req.mutations.len() > MAX_MUTATIONS_PER_WRITE {
                        return Err(Status::resource_exhausted(format!(
                            "mutations: {} in one request, at most {MAX_MUTATIONS_PER_WRITE}",
                            req.mutations.len()
                        )));
                    }
                    let w = feedgraph_proto::WriteRequest::try_from(req).map_err(field_status)?;
                    let out = self.broker.write(w.mutations, w.ack).await.map_err(status)?;
                    Ok(pb::WriteResponse {
                        applied: out.applied as u32,
                        commits: out
                            .commits
                            .into_iter()
                            .map(|(shard, epoch, sequence)| pb::ShardCommit { shard, sequence, epoch })
                            .collect(),
                    })
                }
                .instrument(span),
            )
            .await
    }

    async fn upsert_signals(
        &self,
        request: Request<tonic::Streaming<pb::UpsertSignalsRequest>>,
    ) -> Result<Response<pb::UpsertSignalsResponse>, Status> {
        let mut stream = request.into_inner();
        self.metrics
            .observed("UpsertSignals", async {
                let (mut applied, mut unknown_pins) = (0u64, 0u64);
                while let Some(msg) = stream.message().await? {
                    let mutations = msg
                        .updates
                        .into_iter()
                        .enumerate()
                        .map(|(i, u)| {
                            <(model::PinRef, model::SignalsUpdate)>::try_from(u)
                                .map(|(pin, update)| model::Mutation::UpdateSignals { pin, update })
                                .map_err(|e| field_status(e.within(&format!("updates[{i}]"))))
                        })
                        .collect::<Result<Vec<_>, Status>>()?;
                    if mutations.len() > MAX_MUTATIONS_PER_WRITE {
                        return Err(Status::resource_exhausted(format!(
                            "updates: at most {MAX_MUTATIONS_PER_WRITE} per message"
                        )));
                    }
                    let out = self.broker.write(mutations, model::Ack::Async).await.map_err(status)?;
                    applied += (out.applied - out.unknown_pins) as u64;
                    unknown_pins += out.unknown_pins as u64;
                }
                Ok(pb::UpsertSignalsResponse { applied, unknown_pins })
            })
            .await
    }

    async fn get_pin(
        &self,
        request: Request<pb::GetPinRequest>,
    ) -> Result<Response<pb::GetPinResponse>, Status> {
        self.metrics
            .observed("GetPin", async {
                let pin =
                    request.into_inner().pin.ok_or_else(|| Status::invalid_argument("pin: is required"))?;
                let pin = model::PinRef::try_from(pin).map_err(|e| field_status(e.within("pin")))?;
                let found = self.broker.pin(pin).await.map_err(status)?;
                Ok(pb::GetPinResponse {
                    found: found.is_some(),
                    pin: found.as_ref().map(crate::wire::pin_to_proto),
                })
            })
            .await
    }

    async fn get_follows(
        &self,
        request: Request<pb::GetFollowsRequest>,
    ) -> Result<Response<pb::GetFollowsResponse>, Status> {
        self.metrics
            .observed("GetFollows", async {
                let user = model::UserId::new(request.into_inner().user_id)
                    .ok_or_else(|| Status::invalid_argument("user_id: must be a non-zero user id"))?;
                let f = self.broker.follows_of(user).await.map_err(status)?;
                Ok(pb::GetFollowsResponse {
                    user_ids: f.users.iter().map(|u| u.get()).collect(),
                    boards: f
                        .boards
                        .iter()
                        .map(|(b, o)| pb::BoardRef { board_id: b.get(), owner_id: o.get() })
                        .collect(),
                    topic_ids: f.topics.iter().map(|t| t.get()).collect(),
                    blocked_user_ids: f.blocked.iter().map(|u| u.get()).collect(),
                })
            })
            .await
    }
}

/// `feedgraph.v1.FeedService`.
#[derive(Debug, Clone)]
pub struct FeedApi {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
}

impl FeedApi {
    async fn feed(
        &self,
        kind: FeedKind,
        request: Request<pb::FeedRequest>,
    ) -> Result<Response<pb::FeedResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let method = match kind {
            FeedKind::Following => "GetFollowingFeed",
            FeedKind::Home => "GetHomeFeed",
        };
        let span = tracing::debug_span!("feed", request_id = %request_id(&req.request_id), user = req.user_id, kind = method);
        let result = async {
            let feed_request = model::FeedRequest::try_from(req).map_err(field_status)?;
            let page = self.broker.feed(kind, &feed_request).await.map_err(status)?;
            Ok(page)
        }
        .instrument(span)
        .await;
        if let Ok(page) = &result {
            self.metrics.observe_feed(page);
        }
        let result = result.map(|page| to_response(page, started));
        self.metrics.observe(method, started, &result);
        result.map(Response::new)
    }
}

fn to_response(page: FeedPage, started: Instant) -> pb::FeedResponse {
    let items = page
        .items
        .iter()
        .map(|c| pb::FeedItem {
            pin_id: c.pin.get(),
            owner_id: c.owner.get(),
            board_id: c.board.get(),
            created_at_ms: c.created_at_ms,
            score: c.score as f32,
            source: match c.source {
                Source::FollowedUser => pb::FeedSource::FollowedUser,
                Source::FollowedBoard => pb::FeedSource::FollowedBoard,
                Source::FollowedTopic => pb::FeedSource::FollowedTopic,
                Source::EngagedTopic => pb::FeedSource::EngagedTopic,
            } as i32,
        })
        .collect();
    let s = page.stats;
    pb::FeedResponse {
        items,
        next_cursor: page.next_cursor.unwrap_or_default(),
        stats: Some(pb::FeedStats {
            candidates_scanned: s.candidates_scanned,
            shards_asked: s.shards_asked,
            shards_answered: s.shards_answered,
            partial: s.partial,
            scoring: match s.scoring {
                Scoring::Light => pb::Scoring::Light,
                Scoring::Model => pb::Scoring::Model,
                Scoring::LightFallback(_) => pb::Scoring::LightFallback,
            } as i32,
            model: s.model.unwrap_or_default(),
            server_latency_us: started.elapsed().as_micros() as u64,
        }),
    }
}

#[tonic::async_trait]
impl pb::feed_service_server::FeedService for FeedApi {
    async fn get_following_feed(
        &self,
        request: Request<pb::FeedRequest>,
    ) -> Result<Response<pb::FeedResponse>, Status> {
        self.feed(FeedKind::Following, request).await
    }

    async fn get_home_feed(
        &self,
        request: Request<pb::FeedRequest>,
    ) -> Result<Response<pb::FeedResponse>, Status> {
        self.feed(FeedKind::Home, request).await
    }
}
