//! A shard replica on another node, as the broker reaches it: one `ShardService` RPC
//! per call, with its own timeout; typed refusals become the broker's typed errors
//! (so that it re-routes or fails over at once).

use std::sync::Arc;
use std::time::Duration;

use feedgraph_graph_store::{Follows, PinRecord, WriteOutcome};
use feedgraph_model::{BoardId, PinRef, TopicId, UserId};
use feedgraph_proto::auth::AuthChannel as Channel;
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_proto::refusal::{RefusalKind, refusal};
use feedgraph_retrieval::query::{CandidateQuery, ShardAnswer};
use feedgraph_retrieval::shards::BoxFuture;
use feedgraph_retrieval::{Error, ReadAfter, RemoteReplica, ShardWrite};
use tonic::{Code, Status};

use crate::wire;

type Client = ipb::shard_service_client::ShardServiceClient<Channel>;

/// One shard's replica on the node at `address`.
#[derive(Debug)]
pub struct RemoteShard {
    address: String,
    shard: u32,
    client: Client,
    /// Point reads and writes (a semi-sync write waits this plus its own timeout).
    timeout: Duration,
    write_timeout: Duration,
}

impl RemoteShard {
    pub fn new(
        address: String,
        shard: u32,
        channel: Channel,
        timeout: Duration,
        semi_sync: Duration,
    ) -> Self {
        let client =
            Client::new(channel).max_decoding_message_size(feedgraph_cluster::net::MAX_MESSAGE_BYTES);
        Self { address, shard, client, timeout, write_timeout: timeout + semi_sync }
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// A refusal or failure of the remote replica, as the broker's error.
    fn error(&self, s: Status) -> Error {
        self.error_of(self.shard, s)
    }

    /// A refusal or failure of the node's replica of `shard`, as the broker's error.
    fn error_of(&self, shard: u32, s: Status) -> Error {
        if let Some(r) = refusal(&s) {
            let epoch = r.epoch.unwrap_or(0);
            return match r.kind {
                RefusalKind::NotLeader => Error::NotLeader { shard, leader: r.leader, epoch },
                RefusalKind::StaleEpoch => Error::StaleEpoch { shard, given: 0, current: epoch },
                RefusalKind::Behind => Error::Behind { shard },
                RefusalKind::NotConfirmed => Error::NotConfirmed {
                    shard,
                    epoch,
                    sequence: r.sequence.unwrap_or(0),
                    detail: s.message().to_owned(),
                },
                RefusalKind::WalGap | RefusalKind::Diverged | RefusalKind::ForeignData => {
                    Error::Internal(s.message().to_owned())
                }
            };
        }
        let msg = format!("{} (shard {shard} on {})", s.message(), self.address);
        match s.code() {
            Code::InvalidArgument => {
                Error::InvalidArgument { field: String::new(), reason: s.message().to_owned() }
            }
            Code::NotFound => Error::NotFound(s.message().to_owned()),
            Code::FailedPrecondition => Error::FailedPrecondition(s.message().to_owned()),
            Code::Internal | Code::DataLoss => Error::Internal(msg),
            _ => Error::Unavailable(format!("{:?}: {msg}", s.code())),
        }
    }

    fn decoded(&self, s: Status) -> Error {
        Error::Internal(format!(
            "shard {} on {} sent a bad answer: {}",
            self.shard,
            self.address,
            s.message()
        ))
    }
}

impl RemoteReplica for RemoteShard {
    fn address(&self) -> &str {
        &self.address
    }

    fn candidates(
        &self,
        q: CandidateQuery,
        after: ReadAfter,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ShardAnswer, Error>> {
        let mut client = self.client.clone();
        let request = self.request(wire::query_to_proto(self.shard, &q, after), timeout);
        Box::pin(async move {
            let r = client.candidate_query(request).await.map_err(|s| self.error(s))?.into_inner();
            wire::answer_from_proto(r).map_err(|s| self.decoded(s))
        })
    }

    fn node_candidates(
        &self,
        queries: Vec<(u32, CandidateQuery, ReadAfter)>,
        share_floors: bool,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Vec<Result<ShardAnswer, Error>>, Error>> {
        let mut client = self.client.clone();
        let shards: Vec<u32> = queries.iter().map(|(shard, _, _)| *shard).collect();
        let request = self.request(
            ipb::CandidateQueriesRequest {
                queries: queries
                    .iter()
                    .map(|(shard, q, after)| wire::query_to_proto(*shard, q, *after))
                    .collect(),
                share_floors,
            },
            timeout,
        );
        Box::pin(async move {
            let r = client.candidate_queries(request).await.map_err(|s| self.error(s))?.into_inner();
            if r.results.len() != shards.len() {
                return Err(self.decoded(Status::internal(format!(
                    "{} answers to {} queries",
                    r.results.len(),
                    shards.len()
                ))));
            }
            Ok(shards
                .into_iter()
                .zip(r.results)
                .map(|(shard, result)| match result.result {
                    Some(ipb::candidate_query_result::Result::Answer(a)) => {
                        wire::answer_from_proto(a).map_err(|s| self.decoded(s))
                    }
                    Some(ipb::candidate_query_result::Result::Refusal(refusal)) => {
                        Err(self.error_of(shard, wire::refusal_from_proto(refusal)))
                    }
                    None => Err(self.decoded(Status::internal("an empty result"))),
                })
                .collect())
        })
    }

    fn write(&self, w: ShardWrite) -> BoxFuture<'_, Result<WriteOutcome, Error>> {
        let mut client = self.client.clone();
        let applied = w.mutations.len();
        let request = self.request(
            ipb::ApplyWritesRequest {
                shard: self.shard,
                epoch: w.epoch,
                mutations: w.mutations.into_iter().map(Into::into).collect(),
                ack: match w.ack {
                    feedgraph_model::Ack::Async => pb::Ack::Async,
                    feedgraph_model::Ack::Sync => pb::Ack::Sync,
                    feedgraph_model::Ack::SemiSync => pb::Ack::SemiSync,
                } as i32,
            },
            self.write_timeout,
        );
        Box::pin(async move {
            let r = client.apply_writes(request).await.map_err(|s| self.error(s))?.into_inner();
            let commit = r.commit.ok_or_else(|| self.decoded(Status::internal("no commit")))?;
            Ok(WriteOutcome {
                sequence: commit.sequence,
                epoch: commit.epoch,
                applied,
                unknown_pins: r.unknown_pins as usize,
            })
        })
    }

    fn follows(&self, user: UserId, after: ReadAfter) -> BoxFuture<'_, Result<Arc<Follows>, Error>> {
        let mut client = self.client.clone();
        let request = self.request(
            ipb::ShardGetFollowsRequest {
                shard: self.shard,
                user_id: user.get(),
                read_after: wire::read_after_to_proto(after),
            },
            self.timeout,
        );
        Box::pin(async move {
            let r = client.get_follows(request).await.map_err(|s| self.error(s))?.into_inner();
            Ok(Arc::new(wire::follows_from_proto(r).map_err(|s| self.decoded(s))?))
        })
    }

    fn pin(&self, pin: PinRef, after: ReadAfter) -> BoxFuture<'_, Result<Option<PinRecord>, Error>> {
        let mut client = self.client.clone();
        let request = self.request(
            ipb::ShardGetPinRequest {
                shard: self.shard,
                pin: Some(pin.into()),
                read_after: wire::read_after_to_proto(after),
            },
            self.timeout,
        );
        Box::pin(async move {
            let r = client.get_pin(request).await.map_err(|s| self.error(s))?.into_inner();
            match r.pin.filter(|_| r.found) {
                Some(p) => Ok(Some(wire::pin_from_proto(p).map_err(|s| self.decoded(s))?)),
                None => Ok(None),
            }
        })
    }

    fn board_owners(
        &self,
        boards: Vec<BoardId>,
        after: ReadAfter,
    ) -> BoxFuture<'_, Result<Vec<Option<UserId>>, Error>> {
        let mut client = self.client.clone();
        let n = boards.len();
        let request = self.request(
            ipb::GetBoardOwnersRequest {
                shard: self.shard,
                board_ids: boards.iter().map(|b| b.get()).collect(),
                read_after: wire::read_after_to_proto(after),
            },
            self.timeout,
        );
        Box::pin(async move {
            let r = client.get_board_owners(request).await.map_err(|s| self.error(s))?.into_inner();
            if r.owner_ids.len() != n {
                return Err(
                    self.decoded(Status::internal(format!("{} owners for {n} boards", r.owner_ids.len())))
                );
            }
            Ok(r.owner_ids.into_iter().map(UserId::new).collect())
        })
    }

    fn engaged_topics(
        &self,
        user: UserId,
        recent: usize,
        after: ReadAfter,
    ) -> BoxFuture<'_, Result<Vec<(TopicId, u32)>, Error>> {
        let mut client = self.client.clone();
        let request = self.request(
            ipb::EngagedTopicsRequest {
                shard: self.shard,
                user_id: user.get(),
                recent_pins: recent.min(u32::MAX as usize) as u32,
                read_after: wire::read_after_to_proto(after),
            },
            self.timeout,
        );
        Box::pin(async move {
            let r = client.engaged_topics(request).await.map_err(|s| self.error(s))?.into_inner();
            r.topics
                .into_iter()
                .map(|t| TopicId::new(t.topic_id).map(|id| (id, t.count)))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.decoded(Status::internal("a topic id of 0")))
        })
    }
}
