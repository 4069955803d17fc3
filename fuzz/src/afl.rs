//! `feedgraph-fuzz-afl TARGET`: one fuzz target under AFL++, coverage-guided. Built
//! only by `cargo afl build` (the `afl` feature; `./dev fuzz --afl` builds and runs it),
//! which instruments every crate for AFL's edge coverage.
//!
//! Each input goes through [`feedgraph_fuzz::check`], so AFL records as a crash what
//! the mutation runner would report: a panic, an input that took longer than
//! [`feedgraph_fuzz::MAX_MILLIS_PER_INPUT`], or one that allocated more than
//! [`feedgraph_fuzz::MAX_BYTES_PER_INPUT`] at once (measured by the counting allocator,
//! not AFL's memory limit, which counts the address space of the whole process).

#[global_allocator]
static ALLOC: feedgraph_fuzz::CountingAlloc = feedgraph_fuzz::CountingAlloc;

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = feedgraph_fuzz::target(&name) else {
        let names: Vec<&str> = feedgraph_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: feedgraph-fuzz-afl TARGET (one of {})", names.join(", "));
        std::process::exit(2);
    };
    // No panic hook of afl's: `check` catches the panic and reports it with the bounds.
    afl::fuzz(false, |input: &[u8]| {
        if let Err(finding) = feedgraph_fuzz::check(&name, target, input) {
            eprintln!("finding: {finding}");
            std::process::abort();
        }
    });
}
