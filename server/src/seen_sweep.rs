//! The seen sweep: a viewer's impressions leave the `seen` window when the viewer is
//! next shown something (the write path applies the window), but a viewer who is never
//! shown anything again would keep them. Every `store.seen_sweep_interval_s`, each
//! leader replica of this node finds the viewers with expired periods and sends them
//! empty `RecordImpressions` through its own write path, so the deletes are in the WAL
//! and its followers drop the same periods.

use std::sync::Arc;
use std::time::Duration;

use feedgraph_cluster::{Replica, Replicas, Role};
use feedgraph_model::{Ack, Mutation, UserId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Viewers swept by one write, and keys read per page of the scan (both bound the time
/// the shard's writer and the blocking pool are held at once).
const USERS_PER_WRITE: usize = 256;
const KEYS_PER_PAGE: usize = 20_000;

/// Runs the sweep every `interval` until `stop` fires (or is dropped).
pub(crate) fn spawn(
    replicas: Arc<Replicas>,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick fires at once: a node starts by sweeping what expired while
        // it was down.
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            for replica in replicas.all() {
                tokio::select! {
                    _ = &mut stop => return,
                    swept = sweep(&replica) => match swept {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(shard = replica.shard(), viewers = n, "seen sweep"),
                        Err(e) => tracing::debug!(shard = replica.shard(), error = %e, "seen sweep stopped"),
                    },
                }
            }
        }
    })
}

/// Sweeps one replica if it leads its shard: the number of viewers whose expired
/// impressions it deleted.
pub async fn sweep(replica: &Replica) -> Result<usize, feedgraph_cluster::Error> {
    let Role::Leader { epoch } = replica.role() else { return Ok(0) };
    let Some(store) = replica.store() else { return Ok(0) };
    let mut from: Option<UserId> = None;
    let mut swept = 0;
    loop {
        let now_ms = feedgraph_graph_store::wall_clock_ms();
        let s = store.clone();
        let page =
            tokio::task::spawn_blocking(move || s.seen_sweep(from, now_ms, USERS_PER_WRITE, KEYS_PER_PAGE))
                .await
                .map_err(|e| feedgraph_cluster::Error::Internal(format!("seen sweep: {e}")))??;
        if !page.users.is_empty() {
            swept += page.users.len();
            let writes = page
                .users
                .into_iter()
                .map(|user| Mutation::RecordImpressions { user, pins: Vec::new() })
                .collect();
            replica.write(writes, Ack::Async, epoch).await?;
        }
        match page.next {
            // A page that ends inside the viewer it started from (more keys than a
            // page) moves on to the next viewer rather than read the same keys again.
            Some(next) if Some(next) == from => match UserId::new(next.get().saturating_add(1)) {
                Some(after) if after != next => from = Some(after),
                _ => return Ok(swept),
            },
            Some(next) => from = Some(next),
            None => return Ok(swept),
        }
    }
}
