//! Fuzzing feedgraph's decoders of outside bytes: what a client sends (every request's
//! wire → domain conversion, cursors), what a disk holds (pin records, bitmaps, merge
//! operands, the epoch history, model files, checkpoint manifests), what another node
//! sends (WAL batches as a follower applies them, candidate queries), and what an
//! operator writes (ranking expressions, placements, token files).
//!
//! Owns: the table of targets ([`TARGETS`]); the committed corpora
//! (`fuzz/corpus/<target>/`, seeds from each crate's valid encodings, and regressions
//! found by fuzzing, each with the finding in its name); a counting allocator that
//! measures what one input allocates; and a mutation runner on the stable toolchain
//! (`feedgraph-fuzz mutate`).
//!
//! Invariants: a target returns for every input, within [`MAX_MILLIS_PER_INPUT`] and
//! allocating at most [`MAX_BYTES_PER_INPUT`] at once; where a decoder accepts an
//! input, what it decoded survives its own encoding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub mod targets;

/// A target: bytes in, nothing out; a panic is a finding.
pub type Target = fn(&[u8]);

/// Every target, by name (the name is the corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("pin_record", feedgraph_graph_store::fuzz_targets::pin_record),
    ("bitmap", feedgraph_graph_store::fuzz_targets::bitmap),
    ("merge_operands", feedgraph_graph_store::fuzz_targets::merge_operands),
    ("epoch_history", feedgraph_graph_store::fuzz_targets::epoch_history),
    ("wal_batch", feedgraph_graph_store::fuzz_targets::wal_batch),
    ("cursor", targets::cursor),
    ("feed_request", targets::feed_request),
    ("write_request", targets::write_request),
    ("signals_request", targets::signals_request),
    ("candidate_query", targets::candidate_query),
    ("shard_answer", targets::shard_answer),
    ("checkpoint_manifest", feedgraph_cluster::fuzz_targets::checkpoint_manifest),
    ("placement", targets::placement),
    ("expression", targets::expression),
    ("gbdt_model", targets::gbdt_model),
    ("model_schema", targets::model_schema),
    ("onnx_model", targets::onnx_model),
    ("tokens", targets::tokens),
];

/// Longest one input may take (a hang is a finding).
pub const MAX_MILLIS_PER_INPUT: u64 = 1_000;
/// Most one input may have allocated at once, beyond what was live before it (an
/// allocation driven by a length field in the input is a finding).
pub const MAX_BYTES_PER_INPUT: usize = 64 << 20;

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Counts live heap bytes and their high-water mark, so a runner can measure what one
/// input allocated. Install it with `#[global_allocator]` in a binary or test.
#[derive(Debug)]
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// only arithmetic on the sizes. The one unsafe code of the workspace: a global
// allocator cannot be written without it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live =
                    LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// What running one input cost.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    pub millis: u64,
    /// Peak heap bytes above what was live when the input started (0 without
    /// [`CountingAlloc`] installed).
    pub peak_bytes: usize,
}

/// Runs `target` on `input`, measuring it; a panic propagates.
pub fn measure(target: Target, input: &[u8]) -> Cost {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let started = std::time::Instant::now();
    target(input);
    Cost {
        millis: started.elapsed().as_millis() as u64,
        peak_bytes: PEAK.load(Ordering::Relaxed).saturating_sub(base),
    }
}

thread_local! {
    /// The last panic inside [`check`] on this thread, as the hook recorded it.
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    static IN_CHECK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook (once per process): inside [`check`] it records the message and
/// location for the report (the default hook may capture and symbolize a backtrace,
/// whose allocations would be charged to the input); elsewhere the previous hook runs,
/// so a test's own failures still print.
fn quiet_panics_in_check() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CHECK.with(|c| c.get()) {
                LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
            } else {
                previous(info);
            }
        }));
    });
}

/// Checks one input: no panic, and within the time and memory bounds. One input at a
/// time in the process: the heap counters are process-wide.
pub fn check(name: &str, target: Target, input: &[u8]) -> Result<Cost, String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    quiet_panics_in_check();
    IN_CHECK.with(|c| c.set(true));
    let result = std::panic::catch_unwind(|| measure(target, input));
    IN_CHECK.with(|c| c.set(false));
    let cost = result.map_err(|_| format!("{name}: {}", LAST_PANIC.with(|p| p.borrow().clone())))?;
    if cost.millis > MAX_MILLIS_PER_INPUT {
        return Err(format!("{name}: took {} ms (at most {MAX_MILLIS_PER_INPUT})", cost.millis));
    }
    if cost.peak_bytes > MAX_BYTES_PER_INPUT {
        return Err(format!(
            "{name}: allocated {} bytes at once (at most {MAX_BYTES_PER_INPUT})",
            cost.peak_bytes
        ));
    }
    Ok(cost)
}

/// The corpus directory of a target (committed under `fuzz/corpus/`).
pub fn corpus_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name)
}

/// A target's committed corpus entries (files of its corpus directory), in name order.
pub fn read_corpus(name: &str) -> std::io::Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(corpus_dir(name))? {
        let path = entry?.path();
        if path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths.into_iter().map(|p| std::fs::read(&p).map(|bytes| (p, bytes))).collect()
}

/// Changes `input` the way byte-level fuzzers do: flips, interesting values, inserted
/// and removed runs, splices with another corpus entry.
pub fn mutate(rng: &mut impl rand::Rng, input: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u32; 10] = [0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 64];
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] = rng.random();
            }
            2 if len >= 4 => {
                let i = rng.random_range(0..=len - 4);
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(16));
                input.drain(i..i + n);
            }
            4 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(i..i, bytes);
            }
            5 if !other.is_empty() => {
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 if len > 1 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(0..len);
                input.swap(i, j);
            }
            _ => input.push(rng.random()),
        }
    }
    input.truncate(1 << 16);
}
