//! What each viewer has been shown, kept within a window.
//!
//! A viewer's impressions of this shard's pins are stored as one bitmap per period
//! (`seen` key: user, BE u64, then the period's first hour since the Unix epoch, BE
//! u32). A feed leaves out the union of the periods still inside the window.
//!
//! The window is applied by the write path, so that it travels through the WAL and
//! every replica drops exactly what its leader dropped (a compaction filter would trim
//! replicas at different times, and their digests would differ):
//! - every `RecordImpressions` (an empty one too) deletes the viewer's periods that
//!   have left the window, and past [`SeenWindow::max_entries`] the oldest periods, then
//!   the lowest ordinals (the oldest pins) of the oldest period left;
//! - the node's sweep sends empty `RecordImpressions` to the viewers whose expired
//!   periods [`Shard::seen_sweep`] finds, so viewers who are no longer shown anything
//!   do not keep their impressions forever.
//!
//! Reads leave out expired periods even before they are deleted. A key of the layout
//! before periods (the user alone) has no time: it reads as expired and is deleted the
//! same way.

use std::sync::atomic::{AtomicU64, Ordering};

use feedgraph_model::UserId;
use roaring::{MultiOps, RoaringBitmap};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::bitmap::{self, Delta};
use crate::record::u64_key;
use crate::{Error, Result};

use super::schema::Cf;
use super::{Shard, wall_clock_ms};

const HOUR_MS: u64 = 3_600_000;

/// How long, and how many, impressions a shard keeps per viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenWindow {
    /// Impressions are left out of feeds, and then deleted, once they are older than
    /// this (in hours; kept at least this long, at most one period longer).
    pub window_hours: u32,
    /// Impressions are kept in one bitmap per viewer per period of this many hours;
    /// expiry drops whole periods.
    pub period_hours: u32,
    /// Most impressions kept per viewer on this shard (a pin seen in two periods
    /// counts twice). Past it the oldest periods go first, then the oldest pins of
    /// the oldest period left.
    pub max_entries: u32,
}

impl Default for SeenWindow {
    /// 30 days in daily periods, at most 10,000 per viewer per shard.
    fn default() -> Self {
        Self { window_hours: 30 * 24, period_hours: 24, max_entries: 10_000 }
    }
}

impl SeenWindow {
    /// The first hour of the period holding `now_ms`.
    pub(crate) fn period_start(&self, now_ms: u64) -> u32 {
        let hour = now_ms / HOUR_MS;
        let period = u64::from(self.period_hours.max(1));
        u32::try_from(hour - hour % period).unwrap_or(u32::MAX)
    }

    /// Whether every impression a period starting at `start` can hold is older than
    /// the window (`None`: a key without a period, from before periods existed).
    fn expired(&self, start: Option<u32>, now_ms: u64) -> bool {
        match start {
            None => true,
            Some(start) => {
                u64::from(start) + u64::from(self.period_hours) + u64::from(self.window_hours)
                    <= now_ms / HOUR_MS
            }
        }
    }
}

/// Counters of what the window dropped, on the leader that wrote the drops.
#[derive(Debug, Default)]
pub(crate) struct SeenCounters {
    periods_expired: AtomicU64,
    entries_trimmed: AtomicU64,
}

/// What [`Shard::seen_stats`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeenStats {
    /// Viewer periods deleted because they left the window (or had no period).
    pub periods_expired: u64,
    /// Impressions dropped because a viewer held more than `max_entries`.
    pub entries_trimmed: u64,
}

impl SeenStats {
    pub(crate) fn plus(self, other: SeenStats) -> SeenStats {
        SeenStats {
            periods_expired: self.periods_expired + other.periods_expired,
            entries_trimmed: self.entries_trimmed + other.entries_trimmed,
        }
    }
}

impl SeenCounters {
    pub(crate) fn add(&self, d: SeenStats) {
        self.periods_expired.fetch_add(d.periods_expired, Ordering::Relaxed);
        self.entries_trimmed.fetch_add(d.entries_trimmed, Ordering::Relaxed);
    }
}

/// `seen` key of a viewer's period.
pub(crate) fn seen_key(user: UserId, period_start: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.extend_from_slice(&u64_key(user.get()));
    k.extend_from_slice(&period_start.to_be_bytes());
    k
}

/// The viewer and period of a `seen` key (`None` period: the key is the viewer alone).
pub(crate) fn decode_seen_key(key: &[u8]) -> Option<(UserId, Option<u32>)> {
    let (user, rest) = key.split_first_chunk::<8>()?;
    let user = UserId::new(u64::from_be_bytes(*user))?;
    match rest {
        [] => Some((user, None)),
        rest => Some((user, Some(u32::from_be_bytes(rest.try_into().ok()?)))),
    }
}

/// One stored period of a viewer.
pub(crate) struct Period {
    pub(crate) key: Vec<u8>,
    pub(crate) start: Option<u32>,
    pub(crate) ordinals: RoaringBitmap,
}

/// A page of viewers with expired periods (see [`Shard::seen_sweep`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeenSweep {
    pub users: Vec<UserId>,
    /// Where the next page starts; `None` once the whole family was read.
    pub next: Option<UserId>,
}

impl Shard {
    /// The window this shard keeps impressions in.
    pub fn seen_window(&self) -> SeenWindow {
        self.seen_window
    }

    /// What the window dropped on this shard as its leader, since it was opened.
    pub fn seen_stats(&self) -> SeenStats {
        SeenStats {
            periods_expired: self.seen_counters.periods_expired.load(Ordering::Relaxed),
            entries_trimmed: self.seen_counters.entries_trimmed.load(Ordering::Relaxed),
        }
    }

    /// Ordinals of this shard's pins the viewer has been shown within the window.
    pub fn seen(&self, user: UserId) -> Result<RoaringBitmap> {
        self.seen_at(user, wall_clock_ms())
    }

    /// [`Shard::seen`] as of `now_ms`.
    pub fn seen_at(&self, user: UserId, now_ms: u64) -> Result<RoaringBitmap> {
        let window = self.seen_window;
        let mut live = self.seen_periods(user)?.into_iter().filter(|p| !window.expired(p.start, now_ms));
        // One period (the usual case) needs no union.
        match (live.next(), live.next()) {
            (None, _) => Ok(RoaringBitmap::new()),
            (Some(p), None) => Ok(p.ordinals),
            (Some(a), Some(b)) => {
                Ok([a.ordinals, b.ordinals].into_iter().chain(live.map(|p| p.ordinals)).union())
            }
        }
    }

    /// Every stored period of a viewer, oldest first (a key without a period first).
    pub(crate) fn seen_periods(&self, user: UserId) -> Result<Vec<Period>> {
        self.observe(self.seen_periods_unobserved(user))
    }

    fn seen_periods_unobserved(&self, user: UserId) -> Result<Vec<Period>> {
        let prefix = u64_key(user.get());
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(Cf::Seen), IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (_, start) =
                decode_seen_key(&key).ok_or_else(|| Error::corrupt(Cf::Seen, &key, "bad seen key"))?;
            let ordinals =
                bitmap::decode_bitmap(&value).ok_or_else(|| Error::corrupt(Cf::Seen, &key, "bad bitmap"))?;
            out.push(Period { key: key.to_vec(), start, ordinals });
        }
        Ok(out)
    }

    /// Up to `max_users` viewers with a period outside the window as of `now_ms`,
    /// reading keys from `from` on (at most `max_keys` of them). Reads keys only.
    pub fn seen_sweep(
        &self,
        from: Option<UserId>,
        now_ms: u64,
        max_users: usize,
        max_keys: usize,
    ) -> Result<SeenSweep> {
        let window = self.seen_window;
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(Cf::Seen), ro);
        match from {
            Some(u) => it.seek(u64_key(u.get())),
            None => it.seek_to_first(),
        }
        let mut out = SeenSweep::default();
        let mut read = 0usize;
        while let Some(key) = it.key() {
            let (user, start) =
                decode_seen_key(key).ok_or_else(|| Error::corrupt(Cf::Seen, key, "bad seen key"))?;
            if read >= max_keys || out.users.len() >= max_users {
                // Resume at this viewer (it may be listed twice; a sweep is idempotent).
                out.next = Some(user);
                return Ok(out);
            }
            read += 1;
            if window.expired(start, now_ms) && out.users.last() != Some(&user) {
                out.users.push(user);
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }
}

/// Applies the window to `user`'s impressions as one write leaves them: `pending` is
/// the change the write makes to the current period (`current_key`). Deletes go
/// straight into `batch`; trims of stored periods are returned as deltas to merge.
pub(crate) fn apply_window(
    shard: &Shard,
    user: UserId,
    now_ms: u64,
    pending: Option<&Delta>,
    batch: &mut WriteBatch,
    changes: &mut Vec<(Vec<u8>, Delta)>,
    deleted: &mut Vec<Vec<u8>>,
) -> Result<SeenStats> {
    let window = shard.seen_window;
    let current_key = seen_key(user, window.period_start(now_ms));
    let mut dropped = SeenStats::default();
    let mut live: Vec<Period> = Vec::new();
    let mut current_stored = false;
    for mut p in shard.seen_periods(user)? {
        if window.expired(p.start, now_ms) {
            batch.delete_cf(shard.cf(Cf::Seen), &p.key);
            deleted.push(p.key);
            dropped.periods_expired += 1;
            continue;
        }
        if p.key == current_key {
            current_stored = true;
            if let Some(d) = pending {
                d.apply_to(&mut p.ordinals);
            }
        }
        live.push(p);
    }
    if let (false, Some(d)) = (current_stored, pending) {
        let mut ordinals = RoaringBitmap::new();
        d.apply_to(&mut ordinals);
        live.push(Period { key: current_key.clone(), start: Some(window.period_start(now_ms)), ordinals });
    } else if let Some(i) = live.iter().position(|p| p.key == current_key) {
        // Stored keys sort by period, so the current one is last unless a clock went
        // back (a new leader's behind the old one's) and later periods exist: it goes
        // last anyway, so that what was just shown is trimmed last.
        let current = live.remove(i);
        live.push(current);
    }
    let total: u64 = live.iter().map(|p| p.ordinals.len()).sum();
    let mut excess = total.saturating_sub(u64::from(window.max_entries));
    for p in live {
        if excess == 0 {
            break;
        }
        let len = p.ordinals.len();
        if len <= excess && p.key != current_key {
            batch.delete_cf(shard.cf(Cf::Seen), &p.key);
            deleted.push(p.key);
            dropped.entries_trimmed += len;
            excess -= len;
        } else {
            // `max_entries` ≥ 1, so the current period is never emptied entirely.
            let take = excess.min(len);
            let oldest: Vec<u32> = p.ordinals.iter().take(take as usize).collect();
            changes.push((p.key, Delta::remove(oldest)));
            dropped.entries_trimmed += take;
            excess -= take;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_expiry() {
        let w = SeenWindow { window_hours: 48, period_hours: 24, max_entries: 10 };
        let h = |hours: u64| hours * HOUR_MS;
        assert_eq!(w.period_start(h(100)), 96);
        assert_eq!(w.period_start(h(96)), 96);
        // A period [96, 120) holds impressions up to hour 120; they leave a 48-hour
        // window at hour 168.
        assert!(!w.expired(Some(96), h(167)));
        assert!(w.expired(Some(96), h(168)));
        assert!(w.expired(None, 0));
    }

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        let u = UserId::new(7).unwrap();
        assert_eq!(decode_seen_key(&seen_key(u, 96)), Some((u, Some(96))));
        assert_eq!(decode_seen_key(&u64_key(7)), Some((u, None)));
        assert_eq!(decode_seen_key(&[0; 12]), None);
        assert_eq!(decode_seen_key(&[0, 0, 0, 0, 0, 0, 0, 7, 1]), None);
        assert_eq!(decode_seen_key(&[1, 2]), None);
    }
}
