//! A reproducible, Pinterest-like synthetic graph.
//!
//! - users own boards: each board's owner is drawn with a heavy tail (a few users own
//!   many boards);
//! - pins land on boards with a heavy tail, created uniformly over `days` before `now`
//!   in pin-id order (oldest first),
//!   with 1–3 of `topics` topics (popular topics more likely) and heavy-tailed counters;
//! - each user follows a log-normal number of accounts (median `median_follows`, capped
//!   at `max_follows`): 70% users, 30% boards, chosen by Zipf-like popularity, so the
//!   first `celebrities` user ids collect a large share of all follows; plus 0–5 topics.
//!
//! Same spec and seed, same graph.

use feedgraph_model::{Board, BoardId, FollowTarget, Pin, PinId, PinSignals, TopicId, User, UserId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sizes and shape of a generated graph.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphSpec {
    pub users: u64,
    pub boards: u64,
    pub pins: u64,
    pub topics: u32,
    /// Users with outsized follower counts (ids `1..=celebrities`).
    pub celebrities: u64,
    pub median_follows: f64,
    pub max_follows: u64,
    /// Pins are created over this many days before `now_ms`.
    pub days: u32,
    pub now_ms: i64,
    pub seed: u64,
}

impl GraphSpec {
    /// The demo graph: 10k users, 50k boards, 1M pins, 200 topics.
    pub fn demo(now_ms: i64) -> Self {
        Self {
            users: 10_000,
            boards: 50_000,
            pins: 1_000_000,
            topics: 200,
            celebrities: 20,
            median_follows: 40.0,
            max_follows: 2_000,
            days: 30,
            now_ms,
            seed: 42,
        }
    }
}

/// A generated graph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub users: Vec<User>,
    pub boards: Vec<Board>,
    pub pins: Vec<Pin>,
    pub follows: Vec<(UserId, FollowTarget)>,
}

fn id<T>(v: u64, f: impl Fn(u64) -> Option<T>) -> T {
    // Generated ids start at 1.
    #[allow(clippy::expect_used)]
    f(v.max(1)).expect("generated ids are non-zero")
}

/// A draw from `1..=n` with P(k) roughly proportional to 1/k (log-uniform).
fn zipf(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let u: f64 = rng.random();
    ((n as f64 + 1.0).powf(u) as u64).clamp(1, n.max(1))
}

/// A draw from `1..=n` skewed to low values, but much softer than `zipf`.
fn skewed(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let u: f64 = rng.random();
    (1 + (u * u * n as f64) as u64).min(n.max(1))
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Generates the graph described by `spec`.
pub fn generate(spec: &GraphSpec) -> Graph {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let users: Vec<User> =
        (1..=spec.users).map(|u| User { id: id(u, UserId::new), username: format!("user{u}") }).collect();
    let board_owner: Vec<u64> = (0..spec.boards).map(|_| skewed(&mut rng, spec.users)).collect();
    let boards: Vec<Board> = board_owner
        .iter()
        .enumerate()
        .map(|(i, owner)| Board {
            id: id(i as u64 + 1, BoardId::new),
            owner: id(*owner, UserId::new),
            name: format!("board{}", i + 1),
        })
        .collect();
    let span_ms = i64::from(spec.days) * 86_400_000;
    let pins: Vec<Pin> = (1..=spec.pins)
        .map(|p| {
            let b = skewed(&mut rng, spec.boards);
            let mut topics: Vec<TopicId> = (0..rng.random_range(1..=3u32))
                .map(|_| id(zipf(&mut rng, u64::from(spec.topics)), |t| TopicId::new(t as u32)))
                .collect();
            topics.sort_unstable();
            topics.dedup();
            let saves = (rng.random::<f64>() * 8.0).exp() as u32;
            Pin {
                id: id(p, PinId::new),
                owner: id(board_owner[(b - 1) as usize], UserId::new),
                board: id(b, BoardId::new),
                created_at_ms: spec.now_ms - rng.random_range(0..span_ms.max(1)),
                topics,
                signals: PinSignals {
                    quality: rng.random(),
                    saves,
                    clicks: saves.saturating_mul(rng.random_range(1..6)),
                    closeups: saves.saturating_mul(rng.random_range(1..4)),
                },
            }
        })
        .collect::<Vec<Pin>>();
    // Pins are created in id order, as a service assigns them: the same creation times,
    // oldest first (what a newest-first scan of ordinals relies on).
    let mut times: Vec<i64> = pins.iter().map(|p| p.created_at_ms).collect();
    times.sort_unstable();
    let pins: Vec<Pin> =
        pins.into_iter().zip(times).map(|(p, created_at_ms)| Pin { created_at_ms, ..p }).collect();
    let mut follows = Vec::new();
    for u in 1..=spec.users {
        let follower = id(u, UserId::new);
        let n = (spec.median_follows.ln() + standard_normal(&mut rng)).exp().round() as u64;
        let n = n.clamp(1, spec.max_follows.min(spec.users.saturating_sub(1).max(1)));
        let mut chosen = std::collections::HashSet::new();
        for _ in 0..n {
            let target = if rng.random::<f64>() < 0.7 {
                // Celebrities first: a tenth of user follows go to them.
                let f = if spec.celebrities > 0 && rng.random::<f64>() < 0.1 {
                    rng.random_range(1..=spec.celebrities.min(spec.users))
                } else {
                    zipf(&mut rng, spec.users)
                };
                if f == u {
                    continue;
                }
                FollowTarget::User(id(f, UserId::new))
            } else {
                let b = zipf(&mut rng, spec.boards);
                FollowTarget::Board {
                    board: id(b, BoardId::new),
                    owner: id(board_owner[(b - 1) as usize], UserId::new),
                }
            };
            if chosen.insert(target) {
                follows.push((follower, target));
            }
        }
        for _ in 0..rng.random_range(0..=5) {
            let t =
                FollowTarget::Topic(id(zipf(&mut rng, u64::from(spec.topics)), |t| TopicId::new(t as u32)));
            if chosen.insert(t) {
                follows.push((follower, t));
            }
        }
    }
    Graph { users, boards, pins, follows }
}

/// Names of the request features a frontend sends about its viewer (see
/// [`user_context`]), in a fixed order.
pub const USER_CONTEXT_FEATURES: [&str; 11] = [
    "user.sessions_7d",
    "user.tenure_days",
    "user.mobile",
    "user.saves_30d",
    "user.clicks_30d",
    "user.hour",
    "user.weekday",
    "user.notifications",
    "user.country_us",
    "user.age_bucket",
    "user.followers",
];

/// Synthetic viewer context for `user` (what a frontend would send as `user.*` request
/// features): reproducible from the user id and `seed`, heavy-tailed activity.
pub fn user_context(user: UserId, seed: u64) -> Vec<(&'static str, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ user.get().wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let activity = (1.5 + standard_normal(&mut rng)).exp();
    let values = [
        activity.round(),
        rng.random_range(1..3_000) as f64,
        f64::from(u8::from(rng.random::<f64>() < 0.7)),
        (activity * rng.random_range(0.5..4.0)).round(),
        (activity * rng.random_range(1.0..8.0)).round(),
        rng.random_range(0..24) as f64,
        rng.random_range(0..7) as f64,
        f64::from(u8::from(rng.random::<f64>() < 0.5)),
        f64::from(u8::from(rng.random::<f64>() < 0.4)),
        rng.random_range(0..6) as f64,
        (rng.random::<f64>() * 9.0).exp().round(),
    ];
    USER_CONTEXT_FEATURES.into_iter().zip(values).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GraphSpec {
        GraphSpec { users: 2_000, boards: 5_000, pins: 50_000, ..GraphSpec::demo(1_800_000_000_000) }
    }

    #[test]
    fn user_context_is_reproducible() {
        let u = UserId::new(7).unwrap();
        assert_eq!(user_context(u, 1), user_context(u, 1));
        assert_ne!(user_context(u, 1), user_context(UserId::new(8).unwrap(), 1));
        assert!(user_context(u, 1).iter().all(|(_, v)| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn same_seed_same_graph() {
        let (a, b) = (generate(&small()), generate(&small()));
        assert_eq!(a.pins, b.pins);
        assert_eq!(a.follows, b.follows);
        assert_eq!(a.boards, b.boards);
        let c = generate(&GraphSpec { seed: 7, ..small() });
        assert_ne!(a.pins, c.pins);
    }

    #[test]
    fn shapes_are_heavy_tailed_and_consistent() {
        let g = generate(&small());
        assert_eq!(g.pins.len(), 50_000);
        // Every pin's owner owns its board.
        let owner: std::collections::HashMap<_, _> = g.boards.iter().map(|b| (b.id, b.owner)).collect();
        assert!(g.pins.iter().all(|p| owner[&p.board] == p.owner));
        // Followers per user: celebrities far above the median user.
        let mut followers = vec![0u64; 2_001];
        for (_, t) in &g.follows {
            if let FollowTarget::User(u) = t {
                followers[u.get() as usize] += 1;
            }
        }
        let mut sorted = followers[1..].to_vec();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let top = sorted[sorted.len() - 1];
        assert!(top > 20 * median.max(1), "top {top}, median {median}");
        // Follow counts per user have a tail.
        let mut per_user = vec![0u64; 2_001];
        for (f, _) in &g.follows {
            per_user[f.get() as usize] += 1;
        }
        let max = per_user.iter().max().copied().unwrap_or(0);
        let mut counts = per_user[1..].to_vec();
        counts.sort_unstable();
        assert!(max > 5 * counts[counts.len() / 2], "max {max}, median {}", counts[counts.len() / 2]);
    }
}
