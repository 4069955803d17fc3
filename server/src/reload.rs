//! Files a running process reads again without restart (its TLS certificate, its token
//! files): one loop for all of them, so each behaves the same — checked on the blocking
//! pool every interval, a change that loads swapped in, a change that does not load
//! refused (logged and counted once until it changes) while what is in force stays.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What a check of the files found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// Changed and now in force.
    Loaded,
    /// Changed but does not load; what was in force stays.
    Refused(String),
}

/// Runs `check` every `interval` until `stop`. `count` is told `loaded` or `refused`
/// (a metric); `what` names the files in the log.
pub fn spawn(
    what: &'static str,
    interval: Duration,
    check: impl Fn() -> Reload + Send + Sync + 'static,
    count: impl Fn(&str) + Send + 'static,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<()> {
    let check = std::sync::Arc::new(check);
    tokio::spawn(async move {
        let mut last_refusal = String::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = &mut stop => return,
            }
            let c = check.clone();
            let Ok(outcome) = tokio::task::spawn_blocking(move || c()).await else { continue };
            match outcome {
                Reload::Unchanged => {}
                Reload::Loaded => {
                    last_refusal.clear();
                    count("loaded");
                    tracing::info!(what, "reloaded");
                }
                Reload::Refused(reason) => {
                    if reason != last_refusal {
                        count("refused");
                        tracing::error!(what, %reason, "changed but does not load; what was in force stays");
                        last_refusal = reason;
                    }
                }
            }
        }
    })
}
