//! A node's session with etcd: a lease kept alive by a loop, the node's liveness key
//! under it, and the fence that makes a lost lease safe.
//!
//! etcd expires a lease `ttl` after the last keep-alive it *received*; this node counts
//! from when it *sent* that keep-alive, which is earlier. So when the node's own clock
//! says the lease may have expired (minus a margin), it fences its leaders — before
//! etcd can have expired the lease, and so before any controller can have promoted
//! another replica. A partitioned leader stops taking writes first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;

use super::view::{Keys, node_value};
use crate::{Error, Result};

/// What a session needs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node_id: String,
    pub address: String,
    pub ttl: Duration,
}

/// The lease as the node sees it: `Some(id)` while it holds a lease it believes valid.
pub type LeaseState = watch::Receiver<Option<i64>>;

/// Fault injection for tests: a paused session sends no keep-alives and takes no new
/// lease, as if etcd were unreachable from this node only.
#[derive(Clone, Debug, Default)]
pub struct SessionFault {
    paused: Arc<AtomicBool>,
}

impl SessionFault {
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
}

/// Safety margin between the node's own expiry and etcd's, as a share of the TTL.
const MARGIN_DIVISOR: u32 = 5;

/// Runs the session until `stop`: takes a lease, registers the node, keeps the lease
/// alive; when it may have expired, publishes `None` and calls `on_lost` (which fences
/// the node's leaders), then takes a new lease. On `stop` it revokes the lease, so that
/// the node's shards fail over at once.
pub(crate) async fn run(
    mut client: Client,
    keys: Keys,
    cfg: SessionConfig,
    fault: SessionFault,
    lease: watch::Sender<Option<i64>>,
    on_lost: Arc<dyn Fn() + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    let ttl_secs = cfg.ttl.as_secs().max(1) as i64;
    let ttl = Duration::from_secs(ttl_secs as u64);
    let margin = ttl / MARGIN_DIVISOR;
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        if fault.paused() {
            if sleep_or_stop(Duration::from_millis(50), &mut stop).await {
                return;
            }
            continue;
        }
        let sent = Instant::now();
        let granted = grant_and_register(&mut client, &keys, &cfg, ttl_secs).await;
        let id = match granted {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a lease from etcd; retrying");
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        lease.send_replace(Some(id));
        tracing::info!(node = %cfg.node_id, lease = id, ?ttl, "joined the cluster");
        let ended = keep_alive(&mut client, id, sent + ttl - margin, ttl, margin, &fault, &mut stop).await;
        lease.send_replace(None);
        match ended {
            KeepAliveEnd::Stopped => {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(id)).await;
                return;
            }
            KeepAliveEnd::Lost => {
                tracing::warn!(node = %cfg.node_id, lease = id, "the cluster lease may have expired: fencing this node's leaders");
                on_lost();
            }
        }
    }
}

async fn grant_and_register(
    client: &mut Client,
    keys: &Keys,
    cfg: &SessionConfig,
    ttl_secs: i64,
) -> Result<i64> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: etcd_client::Error| Error::Coordination(format!("{what}: {e}"))
    };
    let id = client.lease_grant(ttl_secs, None).await.map_err(err("granting a lease"))?.id();
    let value = node_value(&cfg.address);
    client.put(keys.member(&cfg.node_id), value.clone(), None).await.map_err(err("registering"))?;
    client
        .put(keys.live(&cfg.node_id), value, Some(PutOptions::new().with_lease(id)))
        .await
        .map_err(err("registering"))?;
    Ok(id)
}

enum KeepAliveEnd {
    Stopped,
    Lost,
}

/// Keeps lease `id` alive until it may have expired (`Lost`) or `stop`.
async fn keep_alive(
    client: &mut Client,
    id: i64,
    mut valid_until: Instant,
    ttl: Duration,
    margin: Duration,
    fault: &SessionFault,
    stop: &mut watch::Receiver<bool>,
) -> KeepAliveEnd {
    let mut channel: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    // Send times of keep-alives not answered yet (answers come in order).
    let mut pending: VecDeque<Instant> = VecDeque::new();
    let mut send = tokio::time::interval(ttl / 6);
    send.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return KeepAliveEnd::Stopped,
            _ = check.tick() => {
                if Instant::now() >= valid_until {
                    return KeepAliveEnd::Lost;
                }
            }
            _ = send.tick() => {
                if fault.paused() {
                    continue;
                }
                if channel.is_none() {
                    // Bounded by the lease's validity too: the check above cannot run
                    // while this waits.
                    let left = valid_until.saturating_duration_since(Instant::now());
                    let reconnected = tokio::time::timeout((ttl / 4).min(left), client.lease_keep_alive(id)).await;
                    if Instant::now() >= valid_until {
                        return KeepAliveEnd::Lost;
                    }
                    match reconnected {
                        Ok(Ok(c)) => { channel = Some(c); pending.clear(); }
                        _ => continue,
                    }
                }
                if let Some((keeper, _)) = channel.as_mut() {
                    let at = Instant::now();
                    match keeper.keep_alive().await {
                        Ok(()) => pending.push_back(at),
                        Err(_) => channel = None,
                    }
                }
            }
            answer = async {
                match channel.as_mut() {
                    Some((_, stream)) => stream.message().await,
                    None => std::future::pending().await,
                }
            } => {
                match answer {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        if let Some(at) = pending.pop_front() {
                            valid_until = valid_until.max(at + ttl - margin);
                        }
                    }
                    // The lease is gone at etcd.
                    Ok(Some(_)) => return KeepAliveEnd::Lost,
                    Ok(None) | Err(_) => channel = None,
                }
            }
        }
    }
}

/// Sleeps; true when stopped meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
