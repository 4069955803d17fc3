//! A follower's replication loop: pull the leader's log after the replica's position
//! (the leader checks it is a prefix of its own), apply each batch at the leader's
//! sequence numbers, and rebuild from a checkpoint when the position left the leader's
//! WAL or the logs diverged. Epochs fence the exchange both ways.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use feedgraph_graph_store::{Error as StoreError, LogPosition, WalBatch};
use feedgraph_proto::pb::internal as ipb;
use feedgraph_proto::refusal::{RefusalKind, refusal};
use tokio::sync::watch;

use crate::leader::now_ms;
use crate::replica::Replica;
use crate::{Error, blocking, checkpoint, net};

type Client = ipb::replication_service_client::ReplicationServiceClient<feedgraph_proto::auth::AuthChannel>;

/// Exponential backoff between failed attempts.
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

/// Sleeps `d`, or less if `stop` fires; true when stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// What one `GetUpdates` round did.
enum Step {
    /// Applied (or nothing new): continue at once.
    Continue,
    /// Rebuild from a checkpoint first.
    Rebuild,
    /// Wait, then retry.
    Retry,
    Stop,
}

pub(crate) async fn run(
    replica: Arc<Replica>,
    leader: String,
    mut epoch: u64,
    mut stop: watch::Receiver<bool>,
) {
    let shard = replica.shard();
    let mut client = match net::channel(&leader, &replica.cfg.credentials) {
        Ok(channel) => Client::new(channel).max_decoding_message_size(net::MAX_MESSAGE_BYTES),
        Err(e) => {
            tracing::error!(shard, %leader, error = %e, "cannot replicate from this address");
            replica.stats.set_state(format!("bad leader address: {e}"));
            return;
        }
    };
    let mut shutdown = replica.shutdown.clone();
    let mut backoff = Backoff(Backoff::MIN);
    // No data, or data marked diverged (maybe before a restart): rebuild first.
    let mut rebuild = replica.store().is_none() || replica.is_diverged();
    let mut lagging = false;
    // The replica's log position, as of its last apply (`None`: ask the store).
    let mut position: Option<LogPosition> = None;
    loop {
        if *stop.borrow() || *shutdown.borrow() {
            return;
        }
        if rebuild {
            position = None;
            match bootstrap(&replica, &mut client, &leader, epoch, &mut stop).await {
                Ok(()) => {
                    rebuild = false;
                    backoff.reset();
                }
                Err(Error::Shutdown) => return,
                Err(e @ Error::Unauthorized(_)) => {
                    let state = format!("bootstrap from {leader} {e}");
                    if replica.stats.state() != state {
                        tracing::error!(shard, %leader, error = %e, "the leader refuses this node's token; not replicating");
                        replica.stats.set_state(state);
                    }
                    if pause(backoff.next(), &mut stop).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(shard, %leader, error = %e, "bootstrap from a checkpoint failed; retrying");
                    replica.stats.set_state(format!("bootstrap failed: {e}"));
                    if pause(backoff.next(), &mut stop).await {
                        return;
                    }
                }
            }
            continue;
        }
        // Only the long poll is interrupted by a stop, never an apply: a batch is
        // applied whole, and no detached task keeps the store open.
        let stopping = async {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        };
        let step =
            round(&replica, &mut client, &leader, &mut epoch, &mut lagging, &mut position, stopping).await;
        if !matches!(step, Step::Continue) {
            position = None;
        }
        match step {
            Step::Continue => backoff.reset(),
            Step::Rebuild => rebuild = true,
            Step::Retry => {
                if pause(backoff.next(), &mut stop).await {
                    return;
                }
            }
            Step::Stop => return,
        }
    }
}

/// One `GetUpdates` and the apply of what it returned.
async fn round(
    replica: &Arc<Replica>,
    client: &mut Client,
    leader: &str,
    epoch: &mut u64,
    lagging: &mut bool,
    cached: &mut Option<LogPosition>,
    stopping: impl std::future::Future<Output = ()>,
) -> Step {
    let shard = replica.shard();
    let position = match *cached {
        Some(p) => p,
        None => {
            let Some(store) = replica.store() else { return Step::Rebuild };
            match blocking(move || Ok(store.log_position())).await {
                Ok(p) => p,
                Err(_) => return Step::Retry,
            }
        }
    };
    let cfg = &replica.cfg;
    let request = ipb::GetUpdatesRequest {
        shard,
        since_sequence: position.sequence,
        since_epoch: position.epoch,
        lineage: position.lineage,
        layout: position.layout,
        max_bytes: cfg.max_batch_bytes as u64,
        wait_ms: cfg.poll_wait.as_millis() as u32,
        epoch: *epoch,
        follower_node: replica.node_id().to_owned(),
    };
    let mut request = tonic::Request::new(request);
    request.set_timeout(cfg.poll_wait + Duration::from_secs(10));
    let answer = tokio::select! {
        a = client.get_updates(request) => a,
        _ = stopping => return Step::Stop,
    };
    let response = match answer {
        Ok(r) => r.into_inner(),
        Err(status) => return refused(replica, leader, epoch, &status).await,
    };
    replica.stats.leader_sequence.store(response.leader_sequence, Ordering::Relaxed);
    if response.batches.is_empty() {
        *cached = Some(position);
        replica.stats.lag_ms.store(0, Ordering::Relaxed);
        replica.stats.set_state("shipping (caught up)");
        return Step::Continue;
    }
    let Some(store) = replica.store() else { return Step::Rebuild };
    let batches = response.batches;
    let counter = replica.clone();
    let applied = blocking(move || {
        let (mut bytes, mut last_commit) = (0u64, 0i64);
        let mut shipped = Vec::with_capacity(batches.len());
        for b in batches {
            if crc32c::crc32c(&b.data) != b.crc32c {
                // Damaged in transit, nothing applied: asked for again, not rebuilt.
                return Err(Error::Remote(format!("the shipped batch at {} fails its checksum", b.sequence)));
            }
            bytes += b.data.len() as u64;
            last_commit = b.commit_time_ms;
            shipped.push(WalBatch {
                sequence: b.sequence,
                count: u64::from(b.count),
                data: b.data,
                commit_ms: 0,
            });
        }
        let position = store.apply_replicated(&shipped)?;
        // Counted as the batches become visible, not after this task is collected.
        counter.stats.applied(bytes);
        Ok((last_commit, position))
    })
    .await;
    match applied {
        Ok((last_commit, position)) => {
            *cached = Some(position);
            let applied = position.sequence;
            let lag = if applied >= response.leader_sequence || last_commit == 0 {
                0
            } else {
                (now_ms() - last_commit).max(0) as u64
            };
            replica.stats.lag_ms.store(lag, Ordering::Relaxed);
            replica.stats.set_state("shipping");
            let warn_after = cfg.lag_warn.as_millis() as u64;
            if lag > warn_after && !*lagging {
                *lagging = true;
                tracing::warn!(shard, %leader, lag_ms = lag, behind = response.leader_sequence - applied, "follower is falling behind its leader");
            } else if lag <= warn_after / 2 && *lagging {
                *lagging = false;
                tracing::info!(shard, %leader, "follower caught up with its leader");
            }
            Step::Continue
        }
        Err(Error::Store(
            e @ (StoreError::SequenceMismatch { .. }
            | StoreError::ReplicatedBatch(_)
            | StoreError::Diverged(_)),
        )) => {
            tracing::warn!(shard, %leader, error = %e, "a shipped batch cannot be applied here; rebuilding from a checkpoint");
            mark_diverged(replica).await;
            Step::Rebuild
        }
        Err(Error::Store(e @ StoreError::WritesStopped { .. }))
            if replica.store().is_some_and(|s| s.fault_is_damaged_file()) =>
        {
            // The copy is bad, not the disk: replaced by the leader's (marked first, so
            // a restart before the rebuild ends rebuilds too).
            tracing::warn!(shard, %leader, error = %e, "this replica's files are damaged; rebuilding from a checkpoint");
            mark_diverged(replica).await;
            Step::Rebuild
        }
        Err(Error::Store(e @ StoreError::WritesStopped { .. })) => {
            // A full or failing disk: the store logged its fault once; retried quietly,
            // since nothing here changes until the node is restarted on a sound disk.
            replica.stats.set_state(format!("not applying: {e}"));
            Step::Retry
        }
        Err(e) => {
            tracing::error!(shard, %leader, error = %e, "applying shipped batches failed");
            replica.stats.set_state(format!("apply failed: {e}"));
            Step::Retry
        }
    }
}

/// Acts on a refusal of `GetUpdates`.
async fn refused(replica: &Arc<Replica>, leader: &str, epoch: &mut u64, status: &tonic::Status) -> Step {
    let shard = replica.shard();
    if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
        // Not a network fault: this node's admin token is not one the leader accepts.
        let state = format!("{leader} {}", Error::remote(status));
        if replica.stats.state() != state {
            tracing::error!(shard, %leader, reason = status.message(), "the leader refuses this node's token; not replicating");
            replica.stats.set_state(state);
        }
        return Step::Retry;
    }
    let Some(r) = refusal(status) else {
        tracing::debug!(shard, %leader, code = ?status.code(), message = status.message(), "leader unreachable");
        replica.stats.set_state(format!("leader unreachable: {}", status.message()));
        return Step::Retry;
    };
    match r.kind {
        RefusalKind::WalGap => {
            tracing::warn!(shard, %leader, since = replica.store().map(|s| s.latest_sequence()), "position has left the leader's WAL; rebuilding from a checkpoint");
            replica.stats.wal_gaps.fetch_add(1, Ordering::Relaxed);
            Step::Rebuild
        }
        RefusalKind::Diverged => {
            tracing::warn!(shard, %leader, reason = status.message(), "this replica's log diverged from the leader's; rebuilding from a checkpoint (its own writes are dropped)");
            mark_diverged(replica).await;
            Step::Rebuild
        }
        RefusalKind::ForeignData => {
            // Another database than this replica's: a leader that lost its data, or a
            // wrong address. Rebuilding would wipe what may be the only copy, so the
            // replica keeps its data and waits for an operator (who deletes the
            // shard's directory to have it rebuilt, or fixes the placement).
            let state = format!("refusing {leader}: it holds another database ({})", status.message());
            if replica.stats.state() != state {
                tracing::error!(shard, %leader, reason = status.message(), "the leader holds another database than this replica; keeping this replica's data, not following");
                replica.stats.set_state(state);
            }
            Step::Retry
        }
        RefusalKind::StaleEpoch => match r.epoch {
            Some(theirs) if theirs > *epoch => {
                let (rep, l) = (replica.clone(), leader.to_owned());
                match blocking(move || rep.adopt_epoch(&l, theirs)).await {
                    Ok(true) => {
                        tracing::info!(shard, %leader, epoch = theirs, "following the leader's newer epoch");
                        *epoch = theirs;
                        Step::Continue
                    }
                    // The replica was moved on meanwhile; its new task takes over.
                    _ => Step::Retry,
                }
            }
            theirs => {
                tracing::warn!(shard, %leader, leader_epoch = ?theirs, epoch = *epoch, "refusing the log of a leader at an older epoch");
                replica.stats.stale_refusals.fetch_add(1, Ordering::Relaxed);
                replica
                    .stats
                    .set_state(format!("refusing {leader}: its epoch {theirs:?} is older than {epoch}"));
                Step::Retry
            }
        },
        RefusalKind::NotLeader => {
            replica.stats.set_state(format!(
                "waiting: {leader} is not the leader{}",
                r.leader.map(|l| format!(" (it names {l})")).unwrap_or_default()
            ));
            Step::Retry
        }
        RefusalKind::Behind | RefusalKind::NotConfirmed => Step::Retry,
    }
}

/// Downloads a checkpoint from the leader and swaps it in.
async fn bootstrap(
    replica: &Arc<Replica>,
    client: &mut Client,
    leader: &str,
    epoch: u64,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Error> {
    let shard = replica.shard();
    let started = std::time::Instant::now();
    tracing::info!(shard, %leader, "bootstrapping from a checkpoint of the leader");
    replica.stats.set_state("bootstrapping");
    let stats = &replica.stats;
    let progress = |done: u64, total: u64| {
        stats.set_state(format!("bootstrapping {}%", done * 100 / total.max(1)));
    };
    let resumed = || {
        stats.checkpoint_resumes.fetch_add(1, Ordering::Relaxed);
    };
    let fetch = checkpoint::Fetch {
        shard,
        epoch,
        staging: &replica.paths.staging,
        chunk_bytes: replica.cfg.checkpoint_chunk_bytes,
        on_progress: &progress,
        on_resume: &resumed,
    };
    let manifest = checkpoint::download(client, fetch, stop).await?;
    let (rep, m) = (replica.clone(), manifest.clone());
    blocking(move || rep.install(&m)).await?;
    tracing::info!(
        shard,
        %leader,
        sequence = manifest.sequence,
        mb = manifest.total_bytes() as f64 / 1e6,
        seconds = started.elapsed().as_secs_f64(),
        "checkpoint installed; shipping resumes from its sequence"
    );
    Ok(())
}

/// Marks the replica diverged (durably, so a restart does not serve or promote it).
async fn mark_diverged(replica: &Arc<Replica>) {
    let r = replica.clone();
    if let Err(e) = blocking(move || r.mark_diverged(true)).await {
        tracing::error!(shard = replica.shard(), error = %e, "could not record the divergence on disk");
    }
}
