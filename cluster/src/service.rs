//! `ReplicationService` (log shipping, checkpoints) and `AdminService` (replica roles,
//! status, checkpoints) over a node's [`Replicas`], and the one mapping of
//! [`Error`] (and of the store's error) to `tonic::Status`.

use std::collections::HashMap;
use std::sync::Arc;

use feedgraph_graph_store::{Divergence, Error as StoreError, LogPosition};
use feedgraph_proto::pb::internal as ipb;
use feedgraph_proto::refusal::{RefusalKind, refuse, with_sequence};
use tonic::{Request, Response, Status};

use crate::leader::now_ms;
use crate::{Error, Replica, ReplicaStatus, Replicas, Role, blocking};

/// Maps a cluster error to the status a peer can act on; refusals carry their
/// metadata (`feedgraph_proto::refusal`).
pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::NotLeader { leader, epoch, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::NotLeader, leader.as_deref(), Some(epoch))
        }
        Error::StaleEpoch { current, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::StaleEpoch, None, Some(current))
        }
        Error::EpochNotNewer { promised, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::StaleEpoch, None, Some(promised))
        }
        Error::Behind { .. } => refuse(Status::failed_precondition(msg), RefusalKind::Behind, None, None),
        Error::NotConfirmed { epoch, sequence, .. } => with_sequence(
            refuse(Status::deadline_exceeded(msg), RefusalKind::NotConfirmed, None, Some(epoch)),
            sequence,
        ),
        Error::Standalone { .. } | Error::NoData { .. } => Status::failed_precondition(msg),
        Error::NoReplica { .. } => Status::not_found(msg),
        Error::Unreadable { .. }
        | Error::Shutdown
        | Error::Remote(_)
        | Error::Coordination(_)
        | Error::Deposed => Status::unavailable(msg),
        Error::Unauthorized(_) => Status::failed_precondition(msg),
        Error::Placement(_) => Status::invalid_argument(msg),
        Error::Store(s) => store_status(s),
        Error::Checkpoint(_) | Error::Io { .. } | Error::Internal(_) => {
            tracing::error!(error = %msg, "replication failed");
            Status::internal(msg)
        }
    }
}

/// Maps a store error to a status: the node's one mapping, shared by the public and
/// internal services, so a refusal reads the same whichever service a client called.
pub fn store_status(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::WalGap { .. } => refuse(Status::out_of_range(msg), RefusalKind::WalGap, None, None),
        StoreError::Diverged(Divergence::Lineage { .. } | Divergence::Layout) => {
            refuse(Status::failed_precondition(msg), RefusalKind::ForeignData, None, None)
        }
        StoreError::Diverged(_) | StoreError::AheadOfLog { .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::Diverged, None, None)
        }
        StoreError::StaleEpoch { current, .. } => {
            refuse(Status::failed_precondition(msg), RefusalKind::StaleEpoch, None, Some(current))
        }
        StoreError::ReadOnlyReplica => {
            refuse(Status::failed_precondition(msg), RefusalKind::NotLeader, None, None)
        }
        StoreError::BoardNotFound(_) => Status::not_found(msg),
        StoreError::OwnerMismatch { .. } | StoreError::InvalidWrite(_) => Status::invalid_argument(msg),
        // A per-user cap, not load: RESOURCE_EXHAUSTED would read as "retry later".
        StoreError::TooMany { .. } => Status::failed_precondition(msg),
        StoreError::WritesStopped { .. } => Status::unavailable(msg),
        StoreError::OrdinalsExhausted { .. } => Status::resource_exhausted(msg),
        StoreError::NotReplica
        | StoreError::SequenceMismatch { .. }
        | StoreError::ReplicatedBatch(_)
        | StoreError::ShardMismatch { .. }
        | StoreError::SchemaVersion { .. }
        | StoreError::Corrupt { .. }
        | StoreError::Rocks(_)
        | StoreError::Io { .. } => {
            tracing::error!(error = %msg, "store error");
            Status::internal(msg)
        }
    }
}

fn replica(replicas: &Replicas, shard: u32) -> Result<Arc<Replica>, Status> {
    replicas.get(shard).ok_or_else(|| status(Error::NoReplica { shard }))
}

/// The leader's checks before it ships anything: it leads, at the follower's epoch.
fn leader_epoch(r: &Replica, follower_epoch: u64) -> Result<u64, Error> {
    let epoch = match r.role() {
        Role::Leader { epoch } => epoch,
        _ => return Err(r.not_leader()),
    };
    if epoch == 0 {
        return Err(Error::Standalone { shard: r.shard() });
    }
    if follower_epoch != epoch {
        if follower_epoch > epoch {
            tracing::warn!(
                shard = r.shard(),
                epoch,
                follower_epoch,
                "a follower knows a newer epoch: this leader has been replaced"
            );
        }
        return Err(Error::StaleEpoch { shard: r.shard(), given: follower_epoch, current: epoch });
    }
    Ok(epoch)
}

/// `feedgraph.internal.v1.ReplicationService`.
#[derive(Clone, Debug)]
pub struct ReplicationApi {
    pub replicas: Arc<Replicas>,
}

#[tonic::async_trait]
impl ipb::replication_service_server::ReplicationService for ReplicationApi {
    async fn get_updates(
        &self,
        request: Request<ipb::GetUpdatesRequest>,
    ) -> Result<Response<ipb::GetUpdatesResponse>, Status> {
        let req = request.into_inner();
        // A stopping node answers no polls: its followers back off instead of
        // polling it in a loop until its port closes.
        if *self.replicas.stopping().borrow() {
            return Err(status(Error::Shutdown));
        }
        let r = replica(&self.replicas, req.shard)?;
        let epoch = leader_epoch(&r, req.epoch).map_err(status)?;
        let store = r.store().ok_or_else(|| status(Error::NoData { shard: req.shard }))?;
        let follower = LogPosition {
            lineage: req.lineage,
            layout: req.layout,
            sequence: req.since_sequence,
            epoch: req.since_epoch,
        };
        // The prefix check reads memory only (the history and the latest sequence).
        store.check_follower(&follower).map_err(|e| {
            tracing::warn!(shard = req.shard, follower = %req.follower_node, error = %e, "a follower's log diverged from this leader's");
            status(Error::from(e))
        })?;
        r.leader.record(&req.follower_node, req.since_sequence);
        let cfg = self.replicas.config();
        if store.latest_sequence() <= req.since_sequence {
            let wait = std::time::Duration::from_millis(u64::from(req.wait_ms)).min(cfg.poll_wait * 4);
            let mut stopping = self.replicas.stopping();
            r.leader.wait_commit_after(req.since_sequence, wait, &mut stopping).await;
            if *stopping.borrow() {
                return Err(status(Error::Shutdown));
            }
        }
        let max_bytes = (req.max_bytes as usize).clamp(1, cfg.max_batch_bytes.max(1));
        let since = req.since_sequence;
        // Caught-up followers are served from the batches the shard keeps in memory; a
        // follower further behind reads the WAL, on the blocking pool.
        let batches = match store.recent_updates_since(since, max_bytes) {
            Some(b) => b,
            None => {
                let s = store.clone();
                blocking(move || s.updates_since(since, max_bytes).map_err(Error::from)).await.map_err(|e| {
                    if matches!(e, Error::Store(StoreError::WalGap { .. })) {
                        tracing::warn!(shard = req.shard, follower = %req.follower_node, error = %e, "a follower's position has left the WAL; it must re-bootstrap");
                    }
                    status(e)
                })?
            }
        };
        let batches = batches
            .into_iter()
            .map(|b| ipb::WalBatch {
                sequence: b.sequence,
                count: b.count as u32,
                crc32c: crc32c::crc32c(&b.data),
                commit_time_ms: b.commit_ms,
                data: b.data,
            })
            .collect();
        Ok(Response::new(ipb::GetUpdatesResponse {
            batches,
            leader_sequence: store.latest_sequence(),
            epoch,
            leader_time_ms: now_ms(),
        }))
    }

    type StreamCheckpointStream =
        tokio_stream::wrappers::ReceiverStream<Result<ipb::CheckpointChunk, Status>>;

    async fn stream_checkpoint(
        &self,
        request: Request<ipb::StreamCheckpointRequest>,
    ) -> Result<Response<Self::StreamCheckpointStream>, Status> {
        let req = request.into_inner();
        let r = replica(&self.replicas, req.shard)?;
        let epoch = leader_epoch(&r, req.epoch).map_err(status)?;
        let store = r.store().ok_or_else(|| status(Error::NoData { shard: req.shard }))?;
        if store.fault_is_damaged_file() {
            // A copy of damaged files would damage the follower too (which keeps what
            // it has until a checkpoint arrives, retrying after the hand-over).
            return Err(status(Error::Checkpoint(format!(
                "shard {}: this copy's files are damaged ({}); it serves no checkpoint",
                req.shard,
                store.fault().unwrap_or_default()
            ))));
        }
        let resume_id = req.resume.as_ref().map(|r| r.checkpoint_id.as_str()).filter(|id| !id.is_empty());
        let checkpoints = self.replicas.checkpoints().clone();
        let (path, manifest) =
            checkpoints.get_or_take(req.shard, store, epoch, resume_id).await.map_err(status)?;
        let have: HashMap<String, u64> = match req.resume {
            Some(resume) if resume.checkpoint_id == manifest.id => resume.have.into_iter().collect(),
            _ => HashMap::new(),
        };
        let chunk = if req.chunk_bytes == 0 {
            self.replicas.config().checkpoint_chunk_bytes
        } else {
            req.chunk_bytes as usize
        };
        let rx = checkpoints.stream(path, manifest, have, chunk);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// A replica's status on the wire.
pub(crate) fn status_to_proto(s: &ReplicaStatus) -> ipb::ReplicaStatus {
    let (role, leader) = match &s.role {
        Role::Offline => (ipb::ReplicaRole::Offline, String::new()),
        Role::Follower { leader, .. } => (ipb::ReplicaRole::Follower, leader.clone()),
        Role::Leader { .. } => (ipb::ReplicaRole::Leader, String::new()),
    };
    ipb::ReplicaStatus {
        shard: s.shard,
        role: role as i32,
        epoch: s.epoch,
        applied_sequence: s.applied_sequence,
        pins: s.pins,
        leader,
        leader_sequence: s.leader_sequence,
        lag_sequences: s.lag_sequences,
        lag_ms: s.lag_ms,
        applied_bytes_per_sec: s.applied_bytes_per_sec,
        applied_bytes_total: s.applied_bytes_total,
        readable: s.readable,
        state: s.state.clone(),
        followers: s
            .followers
            .iter()
            .map(|(node, applied, ago)| ipb::FollowerProgress {
                node: node.clone(),
                applied_sequence: *applied,
                last_seen_ms_ago: ago.as_millis() as u64,
            })
            .collect(),
        wal_gaps: s.wal_gaps,
        rebuilds: s.rebuilds,
        stale_epoch_refusals: s.stale_epoch_refusals,
        checkpoint_resumes: s.checkpoint_resumes,
        semi_sync_timeouts: s.semi_sync_timeouts,
        log_epoch: s.log_epoch,
        fenced: s.fenced,
        has_data: s.has_data,
        diverged: s.diverged,
        fault: s.fault.clone().unwrap_or_default(),
    }
}

/// Asks the node behind `channel` for the status of its replicas, within `timeout`.
pub async fn list_replicas(
    channel: feedgraph_proto::auth::AuthChannel,
    timeout: std::time::Duration,
) -> Result<Vec<ReplicaStatus>, Status> {
    let mut client = ipb::admin_service_client::AdminServiceClient::new(channel);
    let mut request = Request::new(ipb::ListReplicasRequest {});
    request.set_timeout(timeout);
    let list = client.list_replicas(request).await?.into_inner();
    Ok(list.replicas.iter().map(status_from_proto).collect())
}

/// The `TransitionReplica` request that moves a node's replica of `shard` to `role`.
pub fn transition_request(shard: u32, role: &Role, create_empty: bool) -> ipb::TransitionReplicaRequest {
    let (target, epoch, leader) = match role {
        Role::Offline => (ipb::ReplicaRole::Offline, 0, String::new()),
        Role::Follower { leader, epoch } => (ipb::ReplicaRole::Follower, *epoch, leader.clone()),
        Role::Leader { epoch } => (ipb::ReplicaRole::Leader, *epoch, String::new()),
    };
    ipb::TransitionReplicaRequest { shard, target: target as i32, epoch, leader, create_empty }
}

/// A replica's status from the wire (the controller and the CLI read other nodes').
pub fn status_from_proto(p: &ipb::ReplicaStatus) -> ReplicaStatus {
    let role = match ipb::ReplicaRole::try_from(p.role) {
        Ok(ipb::ReplicaRole::Leader) => Role::Leader { epoch: p.epoch },
        Ok(ipb::ReplicaRole::Follower) => Role::Follower { leader: p.leader.clone(), epoch: p.epoch },
        _ => Role::Offline,
    };
    ReplicaStatus {
        shard: p.shard,
        role,
        epoch: p.epoch,
        applied_sequence: p.applied_sequence,
        pins: p.pins,
        leader_sequence: p.leader_sequence,
        lag_sequences: p.lag_sequences,
        lag_ms: p.lag_ms,
        applied_bytes_per_sec: p.applied_bytes_per_sec,
        applied_bytes_total: p.applied_bytes_total,
        readable: p.readable,
        state: p.state.clone(),
        followers: p
            .followers
            .iter()
            .map(|f| {
                (f.node.clone(), f.applied_sequence, std::time::Duration::from_millis(f.last_seen_ms_ago))
            })
            .collect(),
        wal_gaps: p.wal_gaps,
        rebuilds: p.rebuilds,
        stale_epoch_refusals: p.stale_epoch_refusals,
        checkpoint_resumes: p.checkpoint_resumes,
        semi_sync_timeouts: p.semi_sync_timeouts,
        log_epoch: p.log_epoch,
        fenced: p.fenced,
        has_data: p.has_data,
        diverged: p.diverged,
        fault: Some(p.fault.clone()).filter(|f| !f.is_empty()),
    }
}

/// `feedgraph.internal.v1.AdminService`.
#[derive(Clone, Debug)]
pub struct AdminApi {
    pub replicas: Arc<Replicas>,
}

#[tonic::async_trait]
impl ipb::admin_service_server::AdminService for AdminApi {
    async fn list_replicas(
        &self,
        _request: Request<ipb::ListReplicasRequest>,
    ) -> Result<Response<ipb::ListReplicasResponse>, Status> {
        let memory = self.replicas.memory();
        Ok(Response::new(ipb::ListReplicasResponse {
            node: self.replicas.node_id().to_owned(),
            address: self.replicas.address().to_owned(),
            shard_count: self.replicas.shard_count(),
            replicas: self.replicas.status().iter().map(status_to_proto).collect(),
            block_cache_bytes: memory.block_cache_usage() as u64,
            block_cache_capacity: memory.block_cache_capacity() as u64,
            write_buffer_bytes: memory.write_buffer_usage() as u64,
            write_buffer_capacity: memory.write_buffer_capacity() as u64,
        }))
    }

    async fn transition_replica(
        &self,
        request: Request<ipb::TransitionReplicaRequest>,
    ) -> Result<Response<ipb::TransitionReplicaResponse>, Status> {
        let req = request.into_inner();
        let target = match ipb::ReplicaRole::try_from(req.target) {
            Ok(ipb::ReplicaRole::Offline) => Role::Offline,
            Ok(ipb::ReplicaRole::Leader) if req.epoch > 0 => Role::Leader { epoch: req.epoch },
            Ok(ipb::ReplicaRole::Follower) if req.epoch > 0 && !req.leader.is_empty() => {
                if req.leader == self.replicas.address() {
                    return Err(Status::invalid_argument("leader: a replica cannot follow its own node"));
                }
                Role::Follower { leader: req.leader, epoch: req.epoch }
            }
            Ok(ipb::ReplicaRole::Leader | ipb::ReplicaRole::Follower) => {
                return Err(Status::invalid_argument(
                    "epoch: must be at least 1 (and a FOLLOWER needs `leader`, the leader's host:port)",
                ));
            }
            Ok(ipb::ReplicaRole::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument("target: must be OFFLINE, FOLLOWER or LEADER"));
            }
        };
        let status =
            self.replicas.transition_with(req.shard, target, req.create_empty).await.map_err(status)?;
        Ok(Response::new(ipb::TransitionReplicaResponse { status: Some(status_to_proto(&status)) }))
    }

    async fn fence_replica(
        &self,
        request: Request<ipb::FenceReplicaRequest>,
    ) -> Result<Response<ipb::FenceReplicaResponse>, Status> {
        let req = request.into_inner();
        let r = replica(&self.replicas, req.shard)?;
        let status = r.fence(req.epoch).await.map_err(status)?;
        Ok(Response::new(ipb::FenceReplicaResponse { status: Some(status_to_proto(&status)) }))
    }

    async fn create_checkpoint(
        &self,
        request: Request<ipb::CreateCheckpointRequest>,
    ) -> Result<Response<ipb::CreateCheckpointResponse>, Status> {
        let req = request.into_inner();
        // A name, not a path: a caller writes only under the node's backups directory.
        if !crate::checkpoint::plain_name(&req.directory) {
            return Err(Status::invalid_argument(
                "directory: a plain name (no `/`), created under the node's <data_dir>/backups",
            ));
        }
        let r = replica(&self.replicas, req.shard)?;
        let store = r.store().ok_or_else(|| status(Error::NoData { shard: req.shard }))?;
        let dir = self.replicas.backups_dir().join(&req.directory);
        let (d, parent) = (dir.clone(), self.replicas.backups_dir());
        let sequence = blocking(move || {
            std::fs::create_dir_all(&parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            store.checkpoint(&d).map_err(Error::from)
        })
        .await
        .map_err(status)?;
        Ok(Response::new(ipb::CreateCheckpointResponse { sequence, directory: dir.display().to_string() }))
    }
}
