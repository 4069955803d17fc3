//! Scoring for feedgraph.
//!
//! Owns:
//! - the light-score expression language evaluated on shards ([`expr`]: parsed and
//!   checked once, compiled to bytecode, chosen per request by name);
//! - the ML model runtime: ONNX networks through `tract` ([`onnx`]) and LightGBM
//!   gradient-boosted trees through our own evaluator ([`gbdt`]), each behind a feature
//!   schema ([`schema`]) that maps named features to the model's input columns;
//! - the versioned model registry that hot-reloads a model directory ([`registry`]);
//! - the [`Scorer`] interface the broker calls, with its in-process implementation
//!   ([`LocalScorer`]). The gRPC service and client live in `server` (prost stops there).
//!
//! Invariants: scoring is pure; a loaded model is immutable and shared by `Arc`, so a
//! request scores every item with one version and a reload never disturbs requests in
//! flight; nothing here panics on any input (bad inputs are typed errors, NaN light
//! scores become `-inf` and sort last).

pub mod expr;
pub mod gbdt;
pub mod model;
pub mod onnx;
pub mod registry;
pub mod schema;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use expr::{BoundScratch, Expr, Interval, PIN_VARIABLES, ParseError};
pub use model::{LoadedModel, ModelKind};
pub use registry::{ModelInfo, Registry, ReloadReport};
pub use schema::FeatureSchema;

/// A batch of items to score with one model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreBatch {
    pub model: String,
    /// Request-level (viewer) features by name. A model reads those its schema declares
    /// as `user` features and ignores the rest, so one context serves several models.
    pub user_features: HashMap<String, f32>,
    /// Names of the per-item features, in the order of each item's values. Every name
    /// must be an `item` feature of the model's schema.
    pub feature_names: Vec<String>,
    /// One id per item (echoed in errors).
    pub item_ids: Vec<u64>,
    /// Row-major: item `i`'s value of `feature_names[j]` is
    /// `values[i * feature_names.len() + j]`.
    pub values: Vec<f32>,
}

impl ScoreBatch {
    pub fn len(&self) -> usize {
        self.item_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.item_ids.is_empty()
    }

    /// Item `i`'s values.
    pub fn row(&self, i: usize) -> &[f32] {
        let w = self.feature_names.len();
        self.values.get(i * w..(i + 1) * w).unwrap_or(&[])
    }
}

/// Scores in item order, and the model version that produced all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub scores: Vec<f32>,
    pub model: String,
    pub version: u64,
}

/// Everything scoring can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The batch is malformed: `item` (when one item is at fault) and `feature` name it.
    #[error("{}", describe_invalid(*item, feature.as_deref(), reason))]
    InvalidArgument { item: Option<u64>, feature: Option<String>, reason: String },
    /// More items than the scorer accepts in one batch.
    #[error("batch of {items} items exceeds the maximum of {max}")]
    BatchTooLarge { items: usize, max: usize },
    /// No model of that name is served.
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    /// A model file or schema was refused at load.
    #[error("model {path}: {reason}")]
    InvalidModel { path: String, reason: String },
    /// The scorer did not answer in time.
    #[error("scorer deadline of {0:?} exceeded")]
    DeadlineExceeded(std::time::Duration),
    /// The scorer could not be reached or failed.
    #[error("scorer unavailable: {0}")]
    Unavailable(String),
    /// The model runtime failed on valid input; a bug, not the request's fault.
    #[error("internal: {0}")]
    Internal(String),
}

fn describe_invalid(item: Option<u64>, feature: Option<&str>, reason: &str) -> String {
    match (item, feature) {
        (Some(i), Some(f)) => format!("item {i}, feature `{f}`: {reason}"),
        (None, Some(f)) => format!("feature `{f}`: {reason}"),
        (Some(i), None) => format!("item {i}: {reason}"),
        (None, None) => reason.to_string(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed, sendable future (what [`Scorer`] returns, so that it stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Scores batches: in-process ([`LocalScorer`]) or over gRPC (the server's client).
pub trait Scorer: Send + Sync + std::fmt::Debug {
    fn score(&self, batch: ScoreBatch) -> BoxFuture<'_, Result<Scores>>;
}

/// Scores with a registry in this process, on the blocking pool (a 1,000-item batch is
/// ~0.1–1 ms of CPU: too long to run on an async worker).
#[derive(Clone, Debug)]
pub struct LocalScorer {
    registry: Arc<Registry>,
    max_batch: usize,
}

impl LocalScorer {
    pub fn new(registry: Arc<Registry>, max_batch: usize) -> Self {
        Self { registry, max_batch }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Scores on the calling thread.
    pub fn score_blocking(&self, batch: &ScoreBatch) -> Result<Scores> {
        if batch.len() > self.max_batch {
            return Err(Error::BatchTooLarge { items: batch.len(), max: self.max_batch });
        }
        self.registry.score(batch)
    }
}

impl Scorer for LocalScorer {
    fn score(&self, batch: ScoreBatch) -> BoxFuture<'_, Result<Scores>> {
        Box::pin(async move {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.score_blocking(&batch))
                .await
                .map_err(|e| Error::Internal(format!("scoring task failed: {e}")))?
        })
    }
}
