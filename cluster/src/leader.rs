//! A leader's side of replication: commit notifications (wake long polls) and what
//! each follower has applied (semi-sync acknowledgements).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A follower that has not asked for this long is not listed as one.
pub(crate) const FOLLOWER_FORGET: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) applied: u64,
    pub(crate) seen: Instant,
}

#[derive(Debug)]
pub(crate) struct LeaderState {
    /// The latest committed sequence number.
    commits: watch::Sender<u64>,
    /// By follower node id.
    followers: Mutex<HashMap<String, Progress>>,
    /// The highest sequence some follower of the current term has applied.
    acked: watch::Sender<u64>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl LeaderState {
    pub(crate) fn new(latest: u64) -> Self {
        Self {
            commits: watch::Sender::new(latest),
            followers: Mutex::new(HashMap::new()),
            acked: watch::Sender::new(0),
        }
    }

    /// The shard's commit listener (runs under its writer lock: cheap).
    pub(crate) fn on_commit(&self, sequence: u64) {
        self.commits.send_replace(sequence);
    }

    /// Every commit of this replica's store (leader writes and applied batches), as its
    /// latest sequence.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Waits until a commit goes past `since`, at most `wait` (or until `stop` fires).
    pub(crate) async fn wait_commit_after(
        &self,
        since: u64,
        wait: Duration,
        stop: &mut watch::Receiver<bool>,
    ) {
        let mut rx = self.commits.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|s| *s > since)) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// A follower asked for updates after `applied`: it has applied that much.
    pub(crate) fn record(&self, node: &str, applied: u64) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if followers.len() >= 64 && !followers.contains_key(node) {
            // Names are the callers' own: forget the silent ones so the map stays small.
            followers.retain(|_, p| p.seen.elapsed() < FOLLOWER_FORGET);
        }
        followers.insert(node.to_owned(), Progress { applied, seen: Instant::now() });
        self.acked.send_if_modified(|a| {
            let changed = applied > *a;
            *a = (*a).max(applied);
            changed
        });
    }

    /// A new term: acknowledgements of the previous one do not count.
    pub(crate) fn new_term(&self) {
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.acked.send_replace(0);
    }

    /// Waits until some follower has applied `sequence`; false after `timeout`.
    pub(crate) async fn wait_acked(&self, sequence: u64, timeout: Duration) -> bool {
        let mut rx = self.acked.subscribe();
        matches!(tokio::time::timeout(timeout, rx.wait_for(|a| *a >= sequence)).await, Ok(Ok(_)))
    }

    /// Followers heard from recently: (node, applied, time since).
    pub(crate) fn followers(&self) -> Vec<(String, u64, Duration)> {
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = followers
            .iter()
            .filter(|(_, p)| p.seen.elapsed() < FOLLOWER_FORGET)
            .map(|(n, p)| (n.clone(), p.applied, p.seen.elapsed()))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acknowledgements_wake_semi_sync_waiters() {
        let l = std::sync::Arc::new(LeaderState::new(10));
        assert!(!l.wait_acked(11, Duration::from_millis(20)).await);
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.wait_acked(12, Duration::from_secs(10)).await })
        };
        l.record("b", 11);
        l.record("c", 12);
        assert!(waiter.await.unwrap());
        l.new_term();
        assert!(!l.wait_acked(12, Duration::from_millis(20)).await);
    }
}
