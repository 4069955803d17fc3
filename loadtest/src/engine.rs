//! The load engine: open-loop (fixed arrival rate) and closed-loop (fixed concurrency)
//! drivers, the recorder, and the report.
//!
//! Open loop, without coordinated omission: request `i` is due at `start + i / rate`,
//! and its latency is measured from when it was due, not from when it was sent, so a
//! service (or a load generator) that falls behind shows up in the percentiles instead
//! of silently lowering the rate. At most `max_in_flight` requests are outstanding; a
//! request due while that many are outstanding is *missed*: not sent, counted, and
//! recorded at the timeout (it would have waited at least that long in a queue). So
//! the histogram holds every due request, sent or missed.
//!
//! Requests due during the warm-up are sent but not recorded.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// How load is offered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadModel {
    /// `rate` requests per second, whatever the latency.
    Open { rate: f64, max_in_flight: usize },
    /// `concurrency` workers, each sending its next request when the last answers.
    Closed { concurrency: usize },
}

/// One run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunSpec {
    pub model: LoadModel,
    pub warmup: Duration,
    pub duration: Duration,
    /// A request not answered by then counts as an error (`DeadlineExceeded`).
    pub timeout: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Stop after this many requests (closed loop; ingest sends a finite graph).
    pub limit: Option<u64>,
}

/// What one request did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// `None` when it succeeded; else the gRPC code's name.
    pub error: Option<String>,
    /// Feed built without every shard.
    pub partial: bool,
    /// Feed ranked by light scores because the ML scorer could not.
    pub fallback: bool,
    /// Candidates the feed scanned (0 for writes).
    pub scanned: u64,
    /// Items or edges the request carried (writes), for throughput in edges/s.
    pub units: u64,
}

/// Latency bounds of the histogram: 1 µs to 60 s, 3 significant digits.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 60_000_000;

/// gRPC codes of a request the service shed (overload), as [`Outcome::error`] names them.
pub const SHED_CODES: [&str; 2] = ["ResourceExhausted", "Unavailable"];

#[derive(Debug)]
struct Stats {
    latency_us: Histogram<u64>,
    /// Latency of successful requests only (shed ones are fast and would flatter the
    /// percentiles of the rest).
    ok_latency_us: Histogram<u64>,
    /// Latency of shed requests: how fast overload is answered.
    shed_latency_us: Histogram<u64>,
    shed: u64,
    sent: u64,
    missed: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    partial: u64,
    fallback: u64,
    scanned: Histogram<u64>,
    units: u64,
}

impl Stats {
    // Histogram construction fails only on invalid bounds, which are constants here.
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, 3).expect("valid histogram bounds"),
            ok_latency_us: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, 3)
                .expect("valid histogram bounds"),
            shed_latency_us: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, 3)
                .expect("valid histogram bounds"),
            shed: 0,
            sent: 0,
            missed: 0,
            ok: 0,
            errors: BTreeMap::new(),
            partial: 0,
            fallback: 0,
            scanned: Histogram::new_with_bounds(1, 1 << 40, 3).expect("valid histogram bounds"),
            units: 0,
        }
    }

    fn record(&mut self, outcome: &Outcome, latency: Duration) {
        self.sent += 1;
        let us = latency.as_micros().clamp(1, u128::from(HIGHEST_US)) as u64;
        self.latency_us.saturating_record(us);
        match &outcome.error {
            Some(code) if SHED_CODES.contains(&code.as_str()) => {
                self.shed += 1;
                self.shed_latency_us.saturating_record(us);
                *self.errors.entry(code.clone()).or_default() += 1;
            }
            None => {
                self.ok += 1;
                self.ok_latency_us.saturating_record(us);
                self.units += outcome.units;
                if outcome.scanned > 0 {
                    self.scanned.saturating_record(outcome.scanned);
                }
            }
            Some(code) => *self.errors.entry(code.clone()).or_default() += 1,
        }
        self.partial += u64::from(outcome.partial);
        self.fallback += u64::from(outcome.fallback);
    }

    fn record_missed(&mut self, timeout: Duration) {
        self.missed += 1;
        self.latency_us.saturating_record(timeout.as_micros().clamp(1, u128::from(HIGHEST_US)) as u64);
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The result of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    /// Offered rate (open loop), or 0.
    pub rate: f64,
    /// Workers (closed loop), or 0.
    pub concurrency: usize,
    /// Free parameter of a sweep (the viewer's fanout), or 0.
    pub fanout: u64,
    pub duration_s: f64,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Requests due but not sent (open loop, `max_in_flight` outstanding).
    pub missed: u64,
    pub ok: u64,
    /// Failed requests by gRPC code.
    pub errors: BTreeMap<String, u64>,
    pub partial: u64,
    pub fallback: u64,
    /// Requests the service shed (RESOURCE_EXHAUSTED or UNAVAILABLE).
    pub shed: u64,
    /// Requests answered per second, successfully or not (client-side timeouts and
    /// missed requests are not answers).
    pub throughput: f64,
    /// Successful requests per second.
    pub goodput: f64,
    /// Latency of the successful requests, ms.
    pub ok_latency_ms: Percentiles,
    /// Latency of the shed requests, ms.
    pub shed_latency_ms: Percentiles,
    /// Service CPU per request sent (warm-up included), µs, when the service's metrics
    /// were read before and after the run.
    pub service_cpu_us_per_request: Option<f64>,
    /// Feed requests the service counted during the run (warm-up included), from its
    /// metrics; compare with `issued`.
    pub service_requests: Option<u64>,
    /// Requests sent during the whole run, warm-up included.
    pub issued: u64,
    /// Units (edges, for ingest) per second.
    pub units_per_s: f64,
    /// Latency of every due request (sent and missed), ms.
    pub latency_ms: Percentiles,
    /// Histogram count: every request due in the measured period, sent or missed.
    pub recorded: u64,
    /// Candidates scanned per feed: median and mean.
    pub scanned_p50: u64,
    pub scanned_mean: f64,
}

impl Report {
    fn from_stats(s: &Stats, duration: Duration) -> Self {
        let secs = duration.as_secs_f64().max(1e-9);
        let percentiles = |h: &Histogram<u64>| {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            Percentiles {
                p50: ms(0.5),
                p90: ms(0.9),
                p99: ms(0.99),
                p999: ms(0.999),
                max: h.max() as f64 / 1000.0,
            }
        };
        let timed_out = s.errors.get("DeadlineExceeded").copied().unwrap_or(0);
        Report {
            duration_s: duration.as_secs_f64(),
            sent: s.sent,
            missed: s.missed,
            ok: s.ok,
            errors: s.errors.clone(),
            partial: s.partial,
            fallback: s.fallback,
            shed: s.shed,
            throughput: s.sent.saturating_sub(timed_out) as f64 / secs,
            goodput: s.ok as f64 / secs,
            ok_latency_ms: percentiles(&s.ok_latency_us),
            shed_latency_ms: percentiles(&s.shed_latency_us),
            units_per_s: s.units as f64 / secs,
            latency_ms: percentiles(&s.latency_us),
            recorded: s.latency_us.len(),
            scanned_p50: s.scanned.value_at_quantile(0.5),
            scanned_mean: s.scanned.mean(),
            ..Report::default()
        }
    }

    /// A human-readable block.
    pub fn render(&self) -> String {
        let l = &self.latency_ms;
        let load = if self.rate > 0.0 {
            format!("open loop at {:.0}/s", self.rate)
        } else {
            format!("closed loop, {} workers", self.concurrency)
        };
        let mut out = format!(
            "{}{} — {load}, {:.1} s\n  sent {}  missed {}  ok {}  throughput {:.1}/s  goodput {:.1}/s{}\n  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.scenario,
            if self.fanout > 0 { format!(" (fanout {})", self.fanout) } else { String::new() },
            self.duration_s,
            self.sent,
            self.missed,
            self.ok,
            self.throughput,
            self.goodput,
            if self.units_per_s > 0.0 {
                format!("  ({:.0} edges/s)", self.units_per_s)
            } else {
                String::new()
            },
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        if self.scanned_p50 > 0 {
            out += &format!(
                "  candidates scanned per feed: median {}  mean {:.0}\n",
                self.scanned_p50, self.scanned_mean
            );
        }
        if self.shed > 0 {
            let (o, sh) = (&self.ok_latency_ms, &self.shed_latency_ms);
            out += &format!(
                "  successful ms: p50 {:.2}  p99 {:.2}; shed {} ms: p50 {:.2}  p99 {:.2}  max {:.2}\n",
                o.p50, o.p99, self.shed, sh.p50, sh.p99, sh.max
            );
        }
        if let (Some(cpu), Some(n)) = (self.service_cpu_us_per_request, self.service_requests) {
            out += &format!(
                "  service CPU per request: {cpu:.0} µs  (the service counted {n} feed requests; {} were sent)\n",
                self.issued
            );
        }
        out += &format!("  partial {}  model fallback {}", self.partial, self.fallback);
        if !self.errors.is_empty() {
            let errors: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("  errors: {}", errors.join(", "));
        }
        out.push('\n');
        out
    }
}

/// Runs `call(i)` under `spec` and reports. `call` gets the request's sequence number.
pub async fn run<F, Fut>(spec: RunSpec, call: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let stats = Arc::new(Mutex::new(Stats::new()));
    let call = Arc::new(call);
    let started = Instant::now();
    let measure_from = started + spec.warmup;
    let end = measure_from + spec.duration;
    let done = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let progress = spec.progress.then(|| spawn_progress(done.clone(), stats.clone(), started, spec));
    let timeout = spec.timeout;
    let record = {
        let stats = stats.clone();
        let done = done.clone();
        move |due: Instant, outcome: Outcome| {
            done.fetch_add(1, Ordering::Relaxed);
            if due >= measure_from {
                let latency = Instant::now().saturating_duration_since(due);
                lock(&stats).record(&outcome, latency);
            }
        }
    };
    let timed = {
        let call = call.clone();
        let issued = issued.clone();
        move |i: u64| {
            issued.fetch_add(1, Ordering::Relaxed);
            let fut = call(i);
            async move {
                match tokio::time::timeout(timeout, fut).await {
                    Ok(o) => o,
                    Err(_) => Outcome { error: Some("DeadlineExceeded".into()), ..Outcome::default() },
                }
            }
        }
    };
    match spec.model {
        LoadModel::Open { rate, max_in_flight } => {
            let in_flight = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
            for i in 0u64.. {
                let due = started + interval.mul_f64(i as f64);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                // Reap finished tasks so that the set does not grow with the run.
                while tasks.try_join_next().is_some() {}
                if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                    done.fetch_add(1, Ordering::Relaxed);
                    if due >= measure_from {
                        lock(&stats).record_missed(timeout);
                    }
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (in_flight, record, fut) = (in_flight.clone(), record.clone(), timed(i));
                tasks.spawn(async move {
                    let outcome = fut.await;
                    record(due, outcome);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        LoadModel::Closed { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency.max(1) {
                let (next, record, timed) = (next.clone(), record.clone(), timed.clone());
                let limit = spec.limit.unwrap_or(u64::MAX);
                workers.spawn(async move {
                    while Instant::now() < end {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= limit {
                            break;
                        }
                        let due = Instant::now();
                        let outcome = timed(i).await;
                        record(due, outcome);
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    // A limited run can end before its duration: rates are over the measured window.
    let measured = Instant::now().saturating_duration_since(measure_from).min(spec.duration);
    let mut report = Report::from_stats(&lock(&stats), measured);
    report.issued = issued.load(Ordering::Relaxed);
    match spec.model {
        LoadModel::Open { rate, .. } => report.rate = rate,
        LoadModel::Closed { concurrency } => report.concurrency = concurrency,
    }
    report
}

fn lock(stats: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    // Counters only: a panicked recorder leaves nothing half-updated worth refusing.
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_progress(
    done: Arc<AtomicU64>,
    stats: Arc<Mutex<Stats>>,
    started: Instant,
    spec: RunSpec,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let total = (spec.warmup + spec.duration).as_secs_f64();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let elapsed = started.elapsed().as_secs_f64();
            let (p99, errors, missed) = {
                let s = lock(&stats);
                (
                    s.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
                    s.errors.values().sum::<u64>(),
                    s.missed,
                )
            };
            let phase = if elapsed < spec.warmup.as_secs_f64() { "warm-up" } else { "measuring" };
            let pct = match spec.limit {
                Some(limit) => done.load(Ordering::Relaxed) as f64 / limit.max(1) as f64 * 100.0,
                None => elapsed / total * 100.0,
            }
            .min(100.0);
            eprint!(
                "\r[{:<25}] {pct:>3.0}% {phase:<9} {} done  p99 {p99:.2} ms  errors {errors}  missed {missed}   ",
                "#".repeat((pct / 4.0) as usize),
                done.load(Ordering::Relaxed),
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: LoadModel) -> RunSpec {
        RunSpec {
            model,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(400),
            timeout: Duration::from_millis(200),
            progress: false,
            limit: None,
        }
    }

    #[tokio::test]
    async fn open_loop_records_every_due_request_and_measures_from_the_schedule() {
        // 500/s for 0.4 s measured = 200 due; each takes 30 ms; at most 5 in flight, so
        // about 5 / 0.03 = 166/s get through and the rest are missed.
        // The calls are counted here, independently of the engine's own counters.
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = calls.clone();
        let report = run(spec(LoadModel::Open { rate: 500.0, max_in_flight: 5 }), move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Outcome::default()
            }
        })
        .await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), report.issued, "{report:?}");
        // Every request due by the schedule (500/s × 0.4 s) is in the histogram.
        assert!((195..=205).contains(&report.recorded), "{report:?}");
        assert!(report.missed > 50 && report.sent > 30, "{report:?}");
        // Missed requests are recorded at the timeout.
        assert!(report.latency_ms.max >= 199.0, "{report:?}");
        assert!(report.latency_ms.p50 >= 29.0, "{report:?}");
    }

    #[tokio::test]
    async fn errors_and_timeouts_are_counted_by_code() {
        let report = run(spec(LoadModel::Closed { concurrency: 2 }), |i| async move {
            if i % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if i % 4 == 1 {
                return Outcome { error: Some("Unavailable".into()), ..Outcome::default() };
            }
            Outcome { partial: i % 4 == 2, scanned: 25_000, ..Outcome::default() }
        })
        .await;
        assert_eq!(report.missed, 0);
        assert!(report.errors.get("DeadlineExceeded").copied().unwrap_or(0) >= 1, "{report:?}");
        assert!(report.errors.get("Unavailable").copied().unwrap_or(0) >= 1, "{report:?}");
        assert_eq!(report.ok + report.errors.values().sum::<u64>(), report.sent);
        // Scanned counts are recorded at the histogram's precision (3 digits).
        assert!(report.partial >= 1 && report.scanned_p50.abs_diff(25_000) < 25, "{report:?}");
    }
}
