//! The shard store on its own: loads a sample graph into one shard (with progress; a
//! second run reuses the directory), then answers a following-feed query for a user —
//! OR of followed users' and boards' bitmaps, AND-NOT filters and seen pins,
//! newest-first scan, light score, top 10 — and prints how it was made.
//!
//! `./dev demo` runs it; flags: `--dir DIR` (default `data/store-demo`), `--pins N`
//! (default 1,000,000), `--user ID` (default 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::time::Instant;

use feedgraph_graph_store::{FilterKind, Shard, ShardOptions};
use feedgraph_model::{BoardId, Durability, FollowTarget, Mutation, PinId, PinRef, UserId};
use roaring::{MultiOps, RoaringBitmap};

mod sample;

const BOARDS: u64 = 50_000;

struct Args {
    dir: String,
    pins: usize,
    user: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { dir: "data/store-demo".into(), pins: 1_000_000, user: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = value()?,
            "--pins" => args.pins = value()?.parse().map_err(|e| format!("--pins: {e}"))?,
            "--user" => args.user = value()?.parse().map_err(|e| format!("--user: {e}"))?,
            other => return Err(format!("unknown flag {other} (flags: --dir, --pins, --user)")),
        }
    }
    if args.user == 0 || args.user > BOARDS / 4 {
        return Err(format!("--user must be in 1..={}", BOARDS / 4));
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("store_demo: {e}");
            std::process::exit(2);
        }
    };
    let shard = Shard::open(&args.dir, &ShardOptions::new(0)).expect("open shard");
    if shard.next_ordinal() == 0 {
        load(&shard, args.pins);
    } else {
        eprintln!("reusing {} pins in {} (delete the directory to reload)", shard.next_ordinal(), args.dir);
    }
    query(&shard, UserId::new(args.user).expect("checked non-zero"));
}

fn load(shard: &Shard, pins: usize) {
    eprintln!("generating a sample graph: {} users, {BOARDS} boards, {pins} pins, 200 topics", BOARDS / 4);
    let data = sample::population(pins, BOARDS, 42);
    let started = Instant::now();
    let stats = shard
        .bulk_load(data, 200_000, &mut |p| {
            let pct = (p.pins_done * 100).checked_div(p.pins_total).unwrap_or(100);
            let bar = "#".repeat(pct as usize / 4);
            eprint!("\rloading [{bar:<25}] {pct:>3}%  {} pins  {} edges", p.pins_done, p.edges_written);
            let _ = std::io::stderr().flush();
        })
        .expect("bulk load");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "\nloaded {} pins, {} edges in {secs:.1} s ({:.0} edges/s)",
        stats.pins_loaded,
        stats.edges_written,
        stats.edges_written as f64 / secs
    );
    // Every user also follows 280 boards of other users, and has seen a few pins.
    let mut muts = Vec::new();
    for u in 1..=200u64 {
        let follower = UserId::new(u).expect("non-zero");
        for k in 0..280u64 {
            let b = 1 + (u * 7_919 + k * 104_729) % BOARDS;
            let board = BoardId::new(b).expect("non-zero");
            muts.push(Mutation::Follow {
                follower,
                target: FollowTarget::Board { board, owner: sample::owner_of(b, BOARDS) },
            });
        }
    }
    shard.write(&muts, Durability::Sync).expect("write follows");
    if let Some((_, rec)) = shard.pin(PinId::new(1).expect("non-zero")).expect("read pin") {
        let seen = Mutation::RecordImpressions {
            user: UserId::new(1).expect("non-zero"),
            pins: vec![PinRef { pin: rec.id, owner: rec.owner }],
        };
        shard.write(&[seen], Durability::Sync).expect("write impression");
    }
}

fn query(shard: &Shard, user: UserId) {
    let started = Instant::now();
    let follows = shard.follows(user).expect("follows");
    let boards: Vec<BoardId> = follows.boards.iter().map(|(b, _)| *b).collect();
    let mut bitmaps = shard.user_pins_many(&follows.users).expect("user pins");
    bitmaps.extend(shard.board_pins_many(&boards).expect("board pins"));
    let mut candidates: RoaringBitmap = bitmaps.iter().union();
    let union = candidates.len();
    for kind in FilterKind::ALL {
        candidates -= shard.filter(kind).expect("filter");
    }
    candidates -= shard.seen(user).expect("seen");
    let attrs = shard.attributes();
    let top = sample::scan_top_k(&candidates, &attrs, 20_000, 10);
    let elapsed = started.elapsed();

    println!(
        "\nfollowing feed of user {user}: follows {} users and {} boards -> {union} candidates, {} after filters",
        follows.users.len(),
        boards.len(),
        candidates.len()
    );
    println!(
        "{:>4}  {:>9}  {:>7}  {:>6}  {:>7}  {:>5}  {:>7}  {:>6}",
        "rank", "pin", "board", "owner", "age_h", "saves", "quality", "score"
    );
    for (rank, s) in top.iter().enumerate() {
        let a = attrs.get(s.1).expect("scored ordinals exist");
        let age_h = (sample::NOW_MS - a.created_at_ms) as f64 / 3.6e6;
        println!(
            "{:>4}  {:>9}  {:>7}  {:>6}  {:>7.1}  {:>5}  {:>7.3}  {:>6.3}",
            rank + 1,
            a.pin_id,
            a.board,
            a.owner,
            age_h,
            a.signals.saves,
            a.signals.quality,
            s.0
        );
    }
    println!(
        "answered in {:.2} ms on one shard of {} pins (score: 2*quality + 0.3*ln(1+saves) - age_hours/48)",
        elapsed.as_secs_f64() * 1e3,
        attrs.len()
    );
}
