//! Skipping blocks of candidates that cannot make the top-K, and dropping candidates
//! below another shard's K-th best, change the work and never the feed: on a demo-like
//! graph, every page of many viewers' following and home feeds, under every named
//! ranking (one reading request features), equals what the full scan ranks from the
//! same data and the same "now" — with the scan limit roomy and tight, and with
//! per-shard lists shorter than a ranking (no shared floors). The pruned broker also
//! ranks progressively (only as far as each page needs); the full one ranks all
//! `max_ranked` on the first page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use feedgraph_graph_store::{BulkLoad, Shard, ShardOptions};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_model::{Durability, FeedRequest, Mutation, PinRef, UserId, shard_of};
use feedgraph_retrieval::{AdmissionConfig, Broker, BrokerConfig, FeedKind, FeedPage};
use feedgraph_scoring::Expr;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;

const SHARDS: u32 = 8;
const NOW_MS: i64 = 1_800_000_000_000;
const KEY: [u8; 32] = [9; 32];

const RANKINGS: [(&str, &str); 5] = [
    ("default", "2*quality + 0.3*ln(1 + saves) - age_hours/48"),
    ("fresh", "quality - age_hours/6"),
    ("popular", "ln(1 + saves) + 0.5*ln(1 + closeups) - age_days/7"),
    ("recent", "-age_hours"),
    (
        "contextual",
        "2*quality + req.boost*ln(1 + clicks) - age_hours/(24*max(req.days, 1)) + (req.mobile > 0 ? 0.5*quality : 0)",
    ),
];

fn config(full_scan: bool, scan_limit: usize, per_shard: usize) -> BrokerConfig {
    let rankings: BTreeMap<String, Arc<Expr>> =
        RANKINGS.iter().map(|(n, s)| (n.to_string(), Arc::new(Expr::compile(s).unwrap()))).collect();
    BrokerConfig {
        max_page_size: 100,
        candidates_per_shard: per_shard,
        scan_limit,
        shard_deadline: Duration::from_secs(30),
        max_ranked: 500,
        max_per_owner: 3,
        max_per_board: 3,
        home_interest_share: 0.3,
        engaged_recent_pins: 50,
        engaged_topics: 5,
        ranking_ttl: Duration::from_secs(600),
        ranking_cache_bytes: 256 << 20,
        full_scan,
        progressive_ranking: !full_scan,
        batch_remote_queries: true,
        admission: AdmissionConfig { in_progress: 4, queued: 64, queue_wait: Duration::from_secs(30) },
        rankings,
        default_ranking: "default".into(),
        shard_delays: Default::default(),
        model: None,
    }
}

/// Every page of one ranking, following cursors; and the candidates its first page
/// scanned.
async fn all_pages(broker: &Broker, kind: FeedKind, req: &FeedRequest) -> (Vec<FeedPage>, u64) {
    let mut pages = Vec::new();
    let mut req = req.clone();
    loop {
        let page = broker.feed_at(kind, &req, NOW_MS).await.unwrap();
        assert!(!page.stats.partial, "a shard missed its deadline");
        let next = page.next_cursor.clone();
        pages.push(page);
        match next {
            Some(c) if pages.len() < 50 => req.cursor = Some(c),
            _ => break,
        }
    }
    let scanned = pages[0].stats.candidates_scanned;
    (pages, scanned)
}

fn listing(pages: &[FeedPage]) -> Vec<Vec<(u64, u64)>> {
    pages.iter().map(|p| p.items.iter().map(|c| (c.pin.get(), c.score.to_bits())).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_rankings_equal_the_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let g = generate(&GraphSpec { users: 2_000, boards: 10_000, pins: 200_000, ..GraphSpec::demo(NOW_MS) });
    let mut follow_counts: HashMap<u64, usize> = HashMap::new();
    for (follower, _) in &g.follows {
        *follow_counts.entry(follower.get()).or_default() += 1;
    }
    let refs: Vec<PinRef> = g.pins.iter().map(|p| PinRef { pin: p.id, owner: p.owner }).collect();
    let loads = BulkLoad { users: g.users, boards: g.boards, pins: g.pins, follows: g.follows }
        .split_by_shard(SHARDS);
    let shards: Vec<Arc<Shard>> = loads
        .into_iter()
        .enumerate()
        .map(|(i, load)| {
            let s = Shard::open(dir.path().join(format!("s{i}")), &ShardOptions::new(i as u32)).unwrap();
            s.bulk_load(load, 50_000, &mut |_| {}).unwrap();
            Arc::new(s)
        })
        .collect();

    // Viewers: the heaviest followers and a random sample; some have seen pins, some
    // block an account; some pins are deleted.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut by_follows: Vec<(u64, usize)> = follow_counts.into_iter().collect();
    by_follows.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut viewers: Vec<u64> = by_follows.iter().take(10).map(|(u, _)| *u).collect();
    viewers.extend(by_follows.choose_multiple(&mut rng, 20).map(|(u, _)| *u));
    let mut writes: HashMap<u32, Vec<Mutation>> = HashMap::new();
    for (i, v) in viewers.iter().enumerate() {
        let user = UserId::new(*v).unwrap();
        if i % 3 == 0 {
            let seen: Vec<PinRef> = refs.choose_multiple(&mut rng, 3_000).copied().collect();
            let mut by_shard: HashMap<u32, Vec<PinRef>> = HashMap::new();
            for r in seen {
                by_shard.entry(shard_of(r.owner, SHARDS)).or_default().push(r);
            }
            for (s, pins) in by_shard {
                writes.entry(s).or_default().push(Mutation::RecordImpressions { user, pins });
            }
        }
        if i % 4 == 1 {
            writes
                .entry(shard_of(user, SHARDS))
                .or_default()
                .push(Mutation::BlockUser { user, blocked: UserId::new(1 + (i as u64 % 20)).unwrap() });
        }
    }
    for r in refs.choose_multiple(&mut rng, 2_000) {
        writes.entry(shard_of(r.owner, SHARDS)).or_default().push(Mutation::DeletePin(*r));
    }
    for (s, muts) in writes {
        shards[s as usize].write(&muts, Durability::Buffered).unwrap();
    }

    let mut compared = 0;
    for (scan_limit, per_shard) in [(20_000, 500), (1_500, 500), (20_000, 100)] {
        let pruned = Broker::new(shards.clone(), config(false, scan_limit, per_shard), KEY).unwrap();
        let full = Broker::new(shards.clone(), config(true, scan_limit, per_shard), KEY).unwrap();
        let (mut scanned_pruned, mut scanned_full) = (0u64, 0u64);
        let mut costlier = 0;
        let mut per_ranking: BTreeMap<(&str, String), (u64, u64)> = BTreeMap::new();
        for (i, v) in viewers.iter().enumerate() {
            for (ranking, _) in RANKINGS {
                for kind in [FeedKind::Following, FeedKind::Home] {
                    let features: BTreeMap<String, f64> = [
                        ("boost".to_owned(), (i % 5) as f64 * 0.2),
                        ("days".to_owned(), (i % 3) as f64 * 2.0),
                        ("mobile".to_owned(), (i % 2) as f64),
                    ]
                    .into();
                    let req = FeedRequest {
                        user: UserId::new(*v).unwrap(),
                        page_size: NonZeroU32::new([25, 50, 7][i % 3]).unwrap(),
                        cursor: None,
                        ranking: Some(ranking.to_owned()),
                        features,
                    };
                    let (a, sa) = all_pages(&pruned, kind, &req).await;
                    let (b, sb) = all_pages(&full, kind, &req).await;
                    assert_eq!(
                        listing(&a),
                        listing(&b),
                        "viewer {v}, {kind:?}, ranking {ranking}, scan_limit {scan_limit}, per shard {per_shard}"
                    );
                    // A progressive first page may take more than one round (the caps
                    // keep a page from filling): at worst a short round and the whole.
                    assert!(sa <= 2 * sb, "viewer {v}, {kind:?}, {ranking}: {sa} scored, the full scan {sb}");
                    costlier += usize::from(sa > sb);
                    scanned_pruned += sa;
                    scanned_full += sb;
                    let e = per_ranking.entry((ranking, format!("{kind:?}"))).or_default();
                    e.0 += sa;
                    e.1 += sb;
                    compared += 1;
                }
            }
        }
        println!(
            "scan_limit {scan_limit}, {per_shard} per shard: {scanned_pruned} candidates scored pruned, \
             {scanned_full} full ({:.1}x fewer); {costlier} first pages scored more than the full scan",
            scanned_full as f64 / scanned_pruned.max(1) as f64
        );
        for ((ranking, kind), (p, f)) in per_ranking {
            println!("  {ranking:>10} {kind:>9}: {:.1}x fewer", f as f64 / p.max(1) as f64);
        }
        assert!(scanned_pruned < scanned_full, "pruning skipped nothing");
    }
    assert_eq!(compared, 3 * 30 * RANKINGS.len() * 2);
}

/// A scan whose request is gone (cancelled, or past its deadline) stops at its next
/// block with `Cancelled` instead of running to the end.
#[test]
fn a_cancelled_or_late_scan_stops() {
    use feedgraph_retrieval::Error;
    use feedgraph_retrieval::query::{self, CandidateQuery, ScanControl};

    let dir = tempfile::tempdir().unwrap();
    let g = generate(&GraphSpec { users: 300, boards: 1_000, pins: 20_000, ..GraphSpec::demo(NOW_MS) });
    let boards: Vec<_> = g.boards.iter().map(|b| b.id).collect();
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    shard
        .bulk_load(
            BulkLoad { users: g.users, boards: g.boards, pins: g.pins, follows: g.follows },
            50_000,
            &mut |_| {},
        )
        .unwrap();
    let q = CandidateQuery {
        viewer: UserId::new(999_999).unwrap(),
        users: vec![],
        boards,
        topics: vec![],
        engaged_topics: vec![],
        blocked: vec![],
        top_k: 500,
        scan_limit: 20_000,
        expr: Arc::new(Expr::compile(RANKINGS[0].1).unwrap()),
        request_values: vec![],
        now_ms: NOW_MS,
        ordinal_bound: None,
        full_scan: true,
    };
    let done = query::run(&shard, &q, &ScanControl::unbounded()).unwrap();
    assert_eq!(done.scanned, 20_000);
    let cancelled = ScanControl::unbounded();
    cancelled.cancel();
    assert!(matches!(query::run(&shard, &q, &cancelled), Err(Error::Cancelled(_))));
    let late = ScanControl::new(Some(std::time::Instant::now()), false);
    assert!(matches!(query::run(&shard, &q, &late), Err(Error::Cancelled(_))));
}
