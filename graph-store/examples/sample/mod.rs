//! A small synthetic graph for the store demo and benchmarks (shared with
//! `benches/store.rs` through `#[path]`). The full Pinterest-like generator with
//! heavy-tailed follows belongs to `feedgraph-load`.
#![allow(dead_code)]

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use feedgraph_graph_store::{BulkLoad, PinAttributes};
use feedgraph_model::{Board, BoardId, FollowTarget, Pin, PinId, PinSignals, TopicId, User, UserId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use roaring::RoaringBitmap;

/// "Now" for generated data (pins are spread over the 30 days before it).
pub const NOW_MS: i64 = 1_800_000_000_000;

/// Owners are `1 ..= boards / 4` (at least 1); board `b` belongs to owner
/// `1 + (b - 1) % owners`.
pub fn owner_of(board: u64, boards: u64) -> UserId {
    let owners = (boards / 4).max(1);
    UserId::new(1 + (board - 1) % owners).expect("non-zero")
}

/// `boards` boards over `boards / 4` owners; `pins` pins on boards drawn with a heavy
/// tail (a few boards get many pins), created over the last 30 days, 1–3 of 200 topics
/// each, random engagement counters; each of the first 1,000 owners follows 20 others.
/// Deterministic for a seed.
pub fn population(pins: usize, boards: u64, seed: u64) -> BulkLoad {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let owners = (boards / 4).max(1);
    let users = (1..=owners)
        .map(|u| User { id: UserId::new(u).expect("non-zero"), username: format!("user{u}") })
        .collect();
    let board_list = (1..=boards)
        .map(|b| Board {
            id: BoardId::new(b).expect("non-zero"),
            owner: owner_of(b, boards),
            name: format!("board{b}"),
        })
        .collect();
    let pin_list = (0..pins as u64)
        .map(|i| {
            // Squaring a uniform draw skews pins towards low board ids.
            let u: f64 = rng.random();
            let b = 1 + ((u * u) * boards as f64) as u64 % boards;
            let mut topics: Vec<TopicId> = (0..rng.random_range(1..=3))
                .map(|_| TopicId::new(rng.random_range(1..=200)).expect("non-zero"))
                .collect();
            topics.sort_unstable();
            topics.dedup();
            Pin {
                id: PinId::new(1 + i).expect("non-zero"),
                owner: owner_of(b, boards),
                board: BoardId::new(b).expect("non-zero"),
                created_at_ms: NOW_MS - rng.random_range(0..30 * 86_400_000),
                topics,
                signals: PinSignals {
                    quality: rng.random(),
                    saves: rng.random_range(0..1_000),
                    clicks: rng.random_range(0..5_000),
                    closeups: rng.random_range(0..2_000),
                },
            }
        })
        .collect();
    let follows = (1..=owners.min(1_000))
        .flat_map(|u| {
            (1..=20).map(move |k| {
                let followee = UserId::new(1 + (u + k * 7) % owners).expect("non-zero");
                (UserId::new(u).expect("non-zero"), FollowTarget::User(followee))
            })
        })
        .collect();
    BulkLoad { users, boards: board_list, pins: pin_list, follows }
}

/// A candidate's light score and ordinal, ordered by score.
#[derive(PartialEq)]
pub struct Scored(pub f32, pub u32);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Newest-first scan of `candidates` within `scan_limit`, scoring
/// `2*quality + 0.3*ln(1+saves) - age_hours/48`, keeping the best `k`.
pub fn scan_top_k(
    candidates: &RoaringBitmap,
    attrs: &PinAttributes,
    scan_limit: usize,
    k: usize,
) -> Vec<Scored> {
    let (quality, saves, created) = (attrs.quality(), attrs.saves(), attrs.created_at_ms());
    let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
    for ordinal in candidates.iter().rev().take(scan_limit) {
        let i = ordinal as usize;
        if i >= quality.len() {
            continue;
        }
        let age_hours = (NOW_MS - created[i]) as f32 / 3_600_000.0;
        let score = 2.0 * quality[i] + 0.3 * (saves[i] as f32).ln_1p() - age_hours / 48.0;
        if heap.len() < k {
            heap.push(Reverse(Scored(score, ordinal)));
        } else if heap.peek().is_some_and(|min| score > min.0.0) {
            heap.pop();
            heap.push(Reverse(Scored(score, ordinal)));
        }
    }
    let mut out: Vec<Scored> = heap.into_iter().map(|r| r.0).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out
}
