//! Admission control in front of ranking: at most `in_progress` rankings computed at
//! once, at most `queued` waiting for a slot, and none waiting longer than `queue_wait`.
//! Past that a request is shed at once with [`Error::Overloaded`] — answered in
//! microseconds with retry advice — instead of queueing behind work that cannot finish
//! in time, so that under any offered load the service keeps completing what it admits.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{Error, Result};

/// Bounds on rankings in progress and queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Rankings computed at once (each uses one core at a time); 0: one per core.
    pub in_progress: usize,
    /// Rankings waiting for a slot; beyond, a request is shed at once.
    pub queued: usize,
    /// Longest wait for a slot before a queued request is shed.
    pub queue_wait: Duration,
}

/// The gate; see the module docs.
#[derive(Debug)]
pub(super) struct Admission {
    cfg: AdmissionConfig,
    slots: Semaphore,
    waiting: AtomicUsize,
    shed: AtomicU64,
}

/// What the gate holds now, and what it has shed since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    pub in_progress: usize,
    pub queued: usize,
    pub shed_total: u64,
}

/// Decrements the waiting count however the wait ends (admitted, shed, or dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `cores` stands for an `in_progress` of 0.
    pub(super) fn new(cfg: AdmissionConfig, cores: usize) -> Self {
        let in_progress = if cfg.in_progress == 0 { cores } else { cfg.in_progress };
        let cfg = AdmissionConfig { in_progress: in_progress.max(1), ..cfg };
        Self {
            slots: Semaphore::new(cfg.in_progress),
            cfg,
            waiting: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
        }
    }

    /// A slot to compute one ranking, held until the permit drops.
    pub(super) async fn enter(&self) -> Result<SemaphorePermit<'_>> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        if ahead >= self.cfg.queued {
            return Err(self.shed(ahead));
        }
        match tokio::time::timeout(self.cfg.queue_wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(self.shed(ahead)),
        }
    }

    fn shed(&self, queued: usize) -> Error {
        self.shed.fetch_add(1, Ordering::Relaxed);
        Error::Overloaded {
            in_progress: self.cfg.in_progress,
            queued,
            // A slot frees about every queue_wait when the gate is full: retrying
            // sooner is shed again.
            retry_after: self.cfg.queue_wait.max(Duration::from_millis(10)),
        }
    }

    pub(super) fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            in_progress: self.cfg.in_progress - self.slots.available_permits(),
            queued: self.waiting.load(Ordering::Relaxed),
            shed_total: self.shed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sheds_beyond_the_queue_at_once_and_queued_requests_after_the_wait() {
        let long = Duration::from_secs(30);
        let gate = Admission::new(AdmissionConfig { in_progress: 2, queued: 1, queue_wait: long }, 8);
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        assert_eq!(gate.stats().in_progress, 2);
        // The third waits; a fourth finds the queue full and is shed without waiting
        // (it would otherwise wait the 30 s queue_wait).
        let third = gate.enter();
        tokio::pin!(third);
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut third).await.is_err());
        assert_eq!(gate.stats().queued, 1);
        let shed = tokio::time::timeout(Duration::from_secs(5), gate.enter()).await;
        assert!(matches!(shed, Ok(Err(Error::Overloaded { in_progress: 2, queued: 1, .. }))));
        // A slot freed admits the waiting one.
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(gate.stats(), AdmissionStats { in_progress: 2, queued: 0, shed_total: 1 });

        // With every slot held, a queued request is shed once queue_wait has passed.
        let short = Duration::from_millis(20);
        let gate = Admission::new(AdmissionConfig { in_progress: 1, queued: 4, queue_wait: short }, 8);
        let _held = gate.enter().await.unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(gate.enter().await, Err(Error::Overloaded { .. })));
        assert!(started.elapsed() >= short);
        assert_eq!(gate.stats(), AdmissionStats { in_progress: 1, queued: 0, shed_total: 1 });
    }
}
