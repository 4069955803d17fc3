//! `feedgraph-fuzz`: writes the seed corpora, replays inputs, and runs the mutation
//! fuzzer on the stable toolchain (see the crate docs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use feedgraph_fuzz::{TARGETS, Target, check, corpus_dir, mutate, target};
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOC: feedgraph_fuzz::CountingAlloc = feedgraph_fuzz::CountingAlloc;

#[derive(Parser)]
#[command(about = "Fuzz feedgraph's decoders of outside bytes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the targets and their corpus sizes.
    List,
    /// Writes each target's seeds (valid encodings) into its corpus directory.
    Seed,
    /// Runs files (or every corpus entry of the target) through a target.
    Run { target: String, files: Vec<PathBuf> },
    /// Mutates corpus entries and runs them, for `--seconds` split over the targets;
    /// a panic, a hang or an allocation past the bound is written to `--findings` and
    /// fails the run.
    Mutate {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        #[arg(long = "target")]
        targets: Vec<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "fuzz/findings")]
        findings: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::List => {
            for (name, _) in TARGETS {
                println!("{name:<22} {} inputs", corpus(name)?.len());
            }
            Ok(())
        }
        Command::Seed => seed(),
        Command::Run { target: name, files } => {
            let t = target(&name).with_context(|| format!("no target `{name}`"))?;
            let inputs = if files.is_empty() {
                corpus(&name)?
            } else {
                files.iter().map(|f| read(f)).collect::<anyhow::Result<_>>()?
            };
            for (path, bytes) in &inputs {
                let cost = check(&name, t, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                println!("{}: ok, {} ms, {} bytes at most", path.display(), cost.millis, cost.peak_bytes);
            }
            Ok(())
        }
        Command::Mutate { seconds, targets, seed, findings } => {
            let chosen: Vec<(&str, Target)> = if targets.is_empty() {
                TARGETS.to_vec()
            } else {
                targets
                    .iter()
                    .map(|n| {
                        target(n).map(|t| (TARGETS.iter().find(|(m, _)| m == n).map_or("", |(m, _)| m), t))
                    })
                    .collect::<Option<_>>()
                    .context("unknown target")?
            };
            let each = Duration::from_secs(seconds) / chosen.len().max(1) as u32;
            let mut failed = 0;
            for (name, t) in chosen {
                let (runs, found) = mutate_target(name, t, each, seed, &findings)?;
                println!("{name:<22} {runs:>9} inputs, {found} findings");
                failed += found;
            }
            if failed > 0 {
                bail!("{failed} findings, written to {}", findings.display());
            }
            Ok(())
        }
    }
}

fn read(path: &Path) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    Ok((path.to_path_buf(), std::fs::read(path).with_context(|| format!("reading {}", path.display()))?))
}

/// A target's corpus entries, in name order (none before `seed` wrote them).
fn corpus(name: &str) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    match feedgraph_fuzz::read_corpus(name) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        r => r.with_context(|| format!("reading the corpus of {name}")),
    }
}

fn seed() -> anyhow::Result<()> {
    let mut seeds = feedgraph_graph_store::fuzz_targets::seeds();
    seeds.extend(feedgraph_retrieval::fuzz_targets::seeds());
    seeds.extend(feedgraph_fuzz::targets::seeds()?);
    for (name, bytes) in seeds {
        anyhow::ensure!(target(name).is_some(), "a seed for unknown target `{name}`");
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("seed-{:016x}", fnv(&bytes)));
        std::fs::write(&path, &bytes)?;
    }
    for (name, _) in TARGETS {
        println!("{name:<22} {} inputs", corpus(name)?.len());
    }
    Ok(())
}

/// FNV-1a: stable file names for inputs.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Mutates `name`'s corpus for `budget`; the inputs run and the findings written.
fn mutate_target(
    name: &str,
    t: Target,
    budget: Duration,
    seed: u64,
    findings: &Path,
) -> anyhow::Result<(u64, u64)> {
    let corpus: Vec<Vec<u8>> = corpus(name)?.into_iter().map(|(_, b)| b).collect();
    let corpus = if corpus.is_empty() { vec![Vec::new()] } else { corpus };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ fnv(name.as_bytes()));
    std::fs::create_dir_all(findings)?;
    // A hang never returns to be checked: a watchdog writes the input in progress and
    // stops the process.
    let current = findings.join(format!("{name}-in-progress"));
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let watchdog = {
        let (progress, done, current) = (progress.clone(), done.clone(), current.clone());
        let name = name.to_owned();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            while done.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(200));
                let now = progress.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(10) {
                    eprintln!("{name}: an input hangs (> 10 s): {}", current.display());
                    std::process::exit(2);
                }
            }
        })
    };
    let (started, mut runs, mut found) = (Instant::now(), 0u64, 0u64);
    while started.elapsed() < budget {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let other = &corpus[rng.random_range(0..corpus.len())];
        let mut input = base.clone();
        mutate(&mut rng, &mut input, other);
        std::fs::write(&current, &input)?;
        if let Err(why) = check(name, t, &input) {
            found += 1;
            let path = findings.join(format!("{name}-{:016x}", fnv(&input)));
            std::fs::write(&path, &input)?;
            eprintln!("{why}\n  input: {}", path.display());
        }
        runs += 1;
        progress.store(runs, Ordering::Relaxed);
    }
    done.store(1, Ordering::Relaxed);
    let _ = watchdog.join();
    let _ = std::fs::remove_file(&current);
    Ok((runs, found))
}
