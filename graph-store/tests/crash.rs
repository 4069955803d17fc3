//! Crash safety: a child process writing to a shard is killed with SIGKILL; the shard
//! reopens cleanly, every write acknowledged with `sync` is there, and the store is
//! consistent (dense ordinals, bitmaps agree with the pin records).
//!
//! The child is this test binary re-executed with `FEEDGRAPH_CRASH_CHILD` set, so no
//! helper binary is needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use feedgraph_graph_store::{BulkLoad, Shard, ShardOptions};
use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId, PinSignals, TopicId, UserId};

const CHILD_ENV: &str = "FEEDGRAPH_CRASH_CHILD";
const OWNER: u64 = 7;
const PINS_PER_WRITE: u64 = 10;

fn pin(id: u64) -> Pin {
    Pin {
        id: PinId::new(id).unwrap(),
        owner: UserId::new(OWNER).unwrap(),
        board: BoardId::new(1 + id % 3).unwrap(),
        created_at_ms: id as i64,
        topics: vec![TopicId::new(1 + (id % 5) as u32).unwrap()],
        signals: PinSignals::default(),
    }
}

fn boards() -> Vec<Board> {
    (1..=3)
        .map(|b| Board {
            id: BoardId::new(b).unwrap(),
            owner: UserId::new(OWNER).unwrap(),
            name: format!("b{b}"),
        })
        .collect()
}

/// The child: writes forever (until killed), printing each acknowledged batch.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (mode, dir) = spec.split_once(':').unwrap();
    let shard = Shard::open(dir, &ShardOptions::new(0)).unwrap();
    let mut out = std::io::stdout().lock();
    match mode {
        "writes" => {
            let setup: Vec<Mutation> = boards().into_iter().map(Mutation::UpsertBoard).collect();
            shard.write(&setup, Durability::Sync).unwrap();
            for batch in 0u64.. {
                let muts: Vec<Mutation> = (0..PINS_PER_WRITE)
                    .map(|i| Mutation::UpsertPin(pin(1 + batch * PINS_PER_WRITE + i)))
                    .collect();
                shard.write(&muts, Durability::Sync).unwrap();
                writeln!(out, "acked {batch}").unwrap();
                out.flush().unwrap();
            }
        }
        "bulk" => {
            // An endless sequence of bulk loads; the parent kills one mid-way.
            for round in 0u64.. {
                let pins = (0..50_000).map(|i| pin(1 + round * 50_000 + i)).collect();
                let load = BulkLoad { boards: boards(), pins, ..Default::default() };
                shard.bulk_load(load, 1_000, &mut |_| {}).unwrap();
                writeln!(out, "acked {round}").unwrap();
                out.flush().unwrap();
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Runs the child until it has acknowledged `min_acks` batches (or `limit` passes),
/// then SIGKILLs it; returns the highest acknowledged batch.
fn run_and_kill(mode: &str, dir: &Path, min_acks: u64, limit: Duration) -> Option<u64> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("acked ").and_then(|n| n.parse::<u64>().ok())
                && tx.send(n).is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(n) => {
                last = Some(n);
                if n + 1 >= min_acks {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Let it get into the middle of the next write, then kill without warning.
    std::thread::sleep(Duration::from_millis(30));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    // Acks printed before the kill but not yet read still count as acknowledged.
    reader.join().unwrap();
    while let Ok(n) = rx.try_recv() {
        last = Some(n);
    }
    last
}

/// Every stored pin's ordinal is dense and present in its user, board and topic
/// bitmaps; attributes agree with records.
fn check_consistent(shard: &Shard) -> u32 {
    let next = shard.next_ordinal();
    let attrs = shard.attributes();
    assert_eq!(attrs.len() as u32, next);
    let user_pins = shard.user_pins(UserId::new(OWNER).unwrap()).unwrap();
    assert_eq!(user_pins.len(), u64::from(next));
    for ordinal in 0..next {
        let rec = shard.pin_at(ordinal).unwrap().expect("dense ordinals");
        assert_eq!(shard.ordinal(rec.id).unwrap(), Some(ordinal));
        assert_eq!(attrs.get(ordinal).unwrap().pin_id, rec.id.get());
        assert!(shard.board_pins(rec.board).unwrap().contains(ordinal));
        for t in &rec.topics {
            assert!(shard.topic_pins(*t).unwrap().contains(ordinal));
        }
    }
    next
}

#[test]
fn killed_writer_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let acked = run_and_kill("writes", dir.path(), 200, Duration::from_secs(60))
        .expect("the child acknowledged at least one write");
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    let pins = check_consistent(&shard);
    let acked_pins = (acked + 1) * PINS_PER_WRITE;
    assert!(u64::from(pins) >= acked_pins, "{pins} pins stored, {acked_pins} acknowledged");
    for id in 1..=acked_pins {
        assert!(shard.ordinal(PinId::new(id).unwrap()).unwrap().is_some(), "acknowledged pin {id} lost");
    }
    // New writes continue after the last ordinal.
    let next = shard.next_ordinal();
    shard.write(&[Mutation::UpsertPin(pin(10_000_000))], Durability::Sync).unwrap();
    assert_eq!(shard.ordinal(PinId::new(10_000_000).unwrap()).unwrap(), Some(next));
}

#[test]
fn killed_bulk_load_reopens_to_a_consistent_prefix() {
    let dir = tempfile::tempdir().unwrap();
    // The test is of acknowledged loads: without one before the kill it proves nothing.
    let round = run_and_kill("bulk", dir.path(), 2, Duration::from_secs(120))
        .expect("the child acknowledged at least one bulk load before it was killed");
    let shard = Shard::open(dir.path(), &ShardOptions::new(0)).unwrap();
    let pins = check_consistent(&shard);
    assert!(u64::from(pins) >= (round + 1) * 50_000, "acknowledged bulk load lost");
}
