//! Entry points for the fuzzers (`fuzz/`), one per decoder of bytes that come from
//! outside the process: the disk (pin records, bitmaps, merge operands, the epoch
//! history) and a leader (WAL batches as a follower applies them). Each must return
//! for any input without panicking, hanging or allocating without bound; where a
//! decoder accepts an input, what it decoded must survive its own encoding.
//! Not an API: the fuzz crate calls these.

use std::sync::{Mutex, OnceLock};

use roaring::RoaringBitmap;

use crate::bitmap::{Delta, decode_bitmap, encode_bitmap};
use crate::record::PinRecord;
use crate::shard::EpochHistory;
use crate::{Shard, ShardOptions, WalBatch};

/// A stored pin record.
pub fn pin_record(data: &[u8]) {
    if let Some(r) = PinRecord::decode(data) {
        // Re-encoding is canonical (flag bits the decoder ignores are dropped), and
        // stable from there on. Compared as bytes: a NaN quality is not equal to itself.
        let once = r.encode();
        let again = PinRecord::decode(&once).map(|r| r.encode());
        assert_eq!(again.as_deref(), Some(once.as_slice()), "a decoded pin record does not round-trip");
    }
}

/// A stored bitmap (an adjacency list, a filter, a viewer's period of impressions).
pub fn bitmap(data: &[u8]) {
    if let Some(b) = decode_bitmap(data) {
        assert_eq!(
            decode_bitmap(&encode_bitmap(&b)).as_ref(),
            Some(&b),
            "a decoded bitmap does not round-trip"
        );
    }
}

/// A sequence of merge operands, as RocksDB hands them to the merge operator: a base
/// value and deltas, each prefixed by its length (u16 LE). Checks what the partial
/// merge relies on: applying the deltas one by one equals applying their composition.
pub fn merge_operands(data: &[u8]) {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        parts.push(&tail[..len]);
        rest = &tail[len..];
    }
    let Some((base, operands)) = parts.split_first() else { return };
    let mut one_by_one = decode_bitmap(base).unwrap_or_default();
    let mut composed = Delta::default();
    for op in operands {
        let Some(d) = Delta::decode(op) else { return };
        d.apply_to(&mut one_by_one);
        composed = composed.then(&d);
        // An operand survives its own encoding.
        assert_eq!(Delta::decode(&d.encode()).as_ref(), Some(&d), "a decoded operand does not round-trip");
    }
    let mut at_once = decode_bitmap(base).unwrap_or_default();
    composed.apply_to(&mut at_once);
    assert_eq!(one_by_one, at_once, "composed deltas differ from the deltas applied in turn");
}

/// The replicated epoch history (meta family).
pub fn epoch_history(data: &[u8]) {
    if let Some(h) = EpochHistory::decode(data) {
        assert_eq!(
            EpochHistory::decode(&h.encode()).as_ref(),
            Some(&h),
            "a decoded history does not round-trip"
        );
    }
}

/// A WAL batch as a follower receives it from its leader, applied to a replica: the
/// first 4 bytes are the batch's operation count, the rest its body (the header's
/// sequence is the replica's next, so every input reaches the decoder). A batch the
/// replica refuses must leave it as it was.
pub fn wal_batch(data: &[u8]) {
    static REPLICA: OnceLock<Option<Mutex<Shard>>> = OnceLock::new();
    let Some(replica) = REPLICA.get_or_init(open_scratch_replica) else { return };
    let replica = replica.lock().unwrap_or_else(|e| e.into_inner());
    let Some((count, body)) = data.split_first_chunk::<4>() else { return };
    let sequence = replica.latest_sequence() + 1;
    let mut bytes = Vec::with_capacity(12 + body.len());
    bytes.extend_from_slice(&sequence.to_le_bytes());
    bytes.extend_from_slice(count);
    bytes.extend_from_slice(body);
    let before = replica.latest_sequence();
    let batch =
        WalBatch { sequence, count: u64::from(u32::from_le_bytes(*count)), data: bytes, commit_ms: 0 };
    if replica.apply_replicated(&[batch]).is_err() {
        assert_eq!(replica.latest_sequence(), before, "a refused batch moved the replica");
    }
    // A batch is refused or applied; neither may fence the replica as a bad disk (it
    // would stop replicating until restarted, where a refused batch has it rebuilt).
    assert_eq!(replica.fault(), None, "a shipped batch fenced the replica");
}

/// A replica in a scratch directory of this process's own. A fuzzer is killed, not
/// stopped, so it cannot remove its directory: each start removes those of processes
/// that are gone.
fn open_scratch_replica() -> Option<Mutex<Shard>> {
    const PREFIX: &str = "feedgraph-fuzz-wal-";
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(PREFIX).and_then(|p| p.parse::<u32>().ok())
                && pid != std::process::id()
                && std::path::Path::new("/proc/self").exists()
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = ShardOptions { wal_ttl_seconds: 0, wal_size_limit_mb: 0, ..ShardOptions::new(0) };
    let leader = Shard::open(dir.join("leader"), &opts).ok()?;
    leader.checkpoint(dir.join("replica")).ok()?;
    drop(leader);
    Shard::open_replica(dir.join("replica"), &opts).ok().map(Mutex::new)
}

/// Valid inputs to start from: one of each kind a store writes.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use feedgraph_model::{BoardId, Pin, PinId, PinSignals, TopicId, UserId};
    let mut seeds = Vec::new();
    if let (Some(id), Some(owner), Some(board)) = (PinId::new(42), UserId::new(7), BoardId::new(3)) {
        let pin = Pin {
            id,
            owner,
            board,
            created_at_ms: 1_800_000_000_000,
            topics: [5, 9].into_iter().filter_map(TopicId::new).collect(),
            signals: PinSignals { quality: 0.7, saves: 3, clicks: 2, closeups: 1 },
        };
        seeds.push(("pin_record", PinRecord::new_live(&pin).encode()));
    }
    let dense: RoaringBitmap = (0..5000).collect();
    let sparse: RoaringBitmap = [1, 70_000, 1 << 30].into_iter().collect();
    let delta = Delta { add: (10..80).collect(), remove: (0..5).collect() };
    let framed = |parts: &[Vec<u8>]| {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    };
    let history = EpochHistory::default().with(1, 0).and_then(|h| h.with(4, 120));
    seeds.extend([
        ("bitmap", encode_bitmap(&dense)),
        ("bitmap", encode_bitmap(&sparse)),
        (
            "merge_operands",
            framed(&[
                encode_bitmap(&sparse),
                Delta::add([3, 4]).encode(),
                delta.encode(),
                Delta::remove([1]).encode(),
            ]),
        ),
    ]);
    if let Some(h) = history {
        seeds.push(("epoch_history", h.encode()));
    }
    seeds.extend(wal_seeds());
    seeds
}

/// The bodies of batches a leader writes (an upsert of a pin, impressions), framed as
/// [`wal_batch`] reads them.
fn wal_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId, PinRef, PinSignals, UserId};
    let dir = std::env::temp_dir().join(format!("feedgraph-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Ok(shard) = Shard::open(&dir, &ShardOptions::new(0)) else { return Vec::new() };
    let (Some(u), Some(b), Some(p)) = (UserId::new(7), BoardId::new(3), PinId::new(42)) else {
        return Vec::new();
    };
    let writes = [
        vec![
            Mutation::UpsertBoard(Board { id: b, owner: u, name: "b".into() }),
            Mutation::UpsertPin(Pin {
                id: p,
                owner: u,
                board: b,
                created_at_ms: 1,
                topics: Vec::new(),
                signals: PinSignals::default(),
            }),
        ],
        vec![Mutation::RecordImpressions { user: u, pins: vec![PinRef { pin: p, owner: u }] }],
    ];
    let mut out = Vec::new();
    for w in writes {
        let since = shard.latest_sequence();
        if shard.write(&w, Durability::Buffered).is_err() {
            continue;
        }
        for batch in shard.updates_since(since, usize::MAX).unwrap_or_default() {
            if let Some(body) = batch.data.get(8..) {
                out.push(("wal_batch", body.to_vec()));
            }
        }
    }
    drop(shard);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
