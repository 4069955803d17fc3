//! A fixed pool of scan threads — *lanes*, one per core — for local shard queries, run
//! at a lower scheduling priority than the async executor. The executor only parses,
//! admits, sheds and answers; the lanes do the scanning. Under overload the lanes keep
//! the cores busy with admitted work, and a request to be shed still gets a core at once
//! instead of waiting its turn behind scans (measured: shed answers waited 13–17 ms p99
//! with scans on the shared blocking pool at the same priority).
//!
//! The pool is fixed (it does not grow with load, as `spawn_blocking` does up to 512
//! threads); its queue is bounded by admission control (rankings in progress × lanes).

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// How much lower than normal the lanes run (a Unix nice value: 0 normal, 19 lowest).
const LANE_NICE: i32 = 10;

/// The pool; dropping it lets the threads finish their queued jobs and exit.
#[derive(Debug)]
pub(super) struct Lanes {
    jobs: Mutex<Sender<Job>>,
    count: usize,
}

impl Lanes {
    pub(super) fn new(count: usize) -> std::io::Result<Self> {
        let count = count.max(1);
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..count {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("feedgraph-lane-{i}")).spawn(move || {
                lower_priority(LANE_NICE);
                while let Some(job) = next(&rx) {
                    job();
                }
            })?;
        }
        Ok(Self { jobs: Mutex::new(tx), count })
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Queues `job` for the next free lane.
    pub(super) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        // Fails only once every lane has exited, which only dropping the pool does.
        if jobs.send(Box::new(job)).is_err() {
            tracing::error!("scan lanes are gone; a shard query was not run");
        }
    }
}

fn next(rx: &Mutex<Receiver<Job>>) -> Option<Job> {
    rx.lock().unwrap_or_else(|e| e.into_inner()).recv().ok()
}

/// Lowers the calling thread's priority (on Linux, nice is per thread). Best effort: a
/// failure leaves the lane at normal priority.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority(nice: i32) {
    // SAFETY: setpriority takes plain integers and touches no memory of ours; `who` 0
    // with PRIO_PROCESS is the calling thread on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower a scan lane's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queued_job_runs_on_a_lane() {
        let lanes = Lanes::new(2).unwrap();
        let (tx, rx) = channel();
        for i in 0..50 {
            let tx = tx.clone();
            lanes.run(move || {
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                tx.send((i, name)).unwrap();
            });
        }
        let mut got: Vec<(i32, String)> =
            (0..50).map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap()).collect();
        got.sort();
        assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
        assert!(got.iter().all(|(_, name)| name.starts_with("feedgraph-lane-")));
    }
}
