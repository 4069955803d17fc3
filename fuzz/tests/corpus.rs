//! The fuzz corpora in `./dev test`: every committed input (seeds, and each finding
//! fixed, named after it) runs through its target within the time and memory bounds,
//! then a short mutation pass per target (CI's short pass; `./dev fuzz` runs long).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use feedgraph_fuzz::{TARGETS, check, mutate, read_corpus};
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOC: feedgraph_fuzz::CountingAlloc = feedgraph_fuzz::CountingAlloc;

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    read_corpus(name)
        .unwrap_or_else(|e| panic!("{name} has no corpus ({e}): run `feedgraph-fuzz seed`"))
        .into_iter()
        .map(|(p, bytes)| (p.display().to_string(), bytes))
        .collect()
}

#[test]
fn every_committed_input_passes_its_target() {
    let mut failures = Vec::new();
    for (name, t) in TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for (path, bytes) in inputs {
            if let Err(e) = check(name, *t, &bytes) {
                failures.push(format!("{path}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// 400 mutations of each target's corpus, from a fixed seed (the same inputs every
/// run; `feedgraph-fuzz mutate --seed N` explores others).
#[test]
fn a_short_mutation_pass_finds_nothing() {
    let mut failures = Vec::new();
    for (name, t) in TARGETS {
        let inputs: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, b)| b).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..400 {
            let mut input = inputs[rng.random_range(0..inputs.len())].clone();
            let other = &inputs[rng.random_range(0..inputs.len())];
            mutate(&mut rng, &mut input, other);
            if let Err(e) = check(name, *t, &input) {
                // The input itself, for `feedgraph-fuzz run`, rather than in the message.
                let path = std::env::temp_dir().join(format!("feedgraph-fuzz-{name}-{}", failures.len()));
                std::fs::write(&path, &input).unwrap();
                failures.push(format!("{e} (input of {} bytes: {})", input.len(), path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{:#?}", &failures[..failures.len().min(5)]);
}
