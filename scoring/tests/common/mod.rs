//! Shared by the scoring tests and benchmarks: the committed models and the training
//! script's reference set.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use feedgraph_scoring::ScoreBatch;

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

#[derive(serde::Deserialize)]
struct Inputs {
    item_features: Vec<String>,
    rows: Vec<Row>,
}

#[derive(serde::Deserialize)]
struct Row {
    item: HashMap<String, f64>,
    user: HashMap<String, f64>,
}

#[derive(serde::Deserialize)]
pub struct Outputs {
    pub model: String,
    pub version: u64,
    pub scores: Vec<f64>,
}

/// One single-item batch per reference row (each row has its own viewer).
pub fn reference_batches(model: &str) -> Vec<ScoreBatch> {
    let text = std::fs::read_to_string(reference_dir().join("inputs.json")).unwrap();
    let inputs: Inputs = serde_json::from_str(&text).unwrap();
    inputs
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| ScoreBatch {
            model: model.to_string(),
            user_features: row.user.iter().map(|(k, v)| (k.clone(), *v as f32)).collect(),
            feature_names: inputs.item_features.clone(),
            item_ids: vec![i as u64],
            values: inputs.item_features.iter().map(|n| row.item[n] as f32).collect(),
        })
        .collect()
}

pub fn reference_outputs(model: &str) -> Outputs {
    let text = std::fs::read_to_string(reference_dir().join(format!("{model}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A batch of `n` items for one viewer, cycling through the reference rows.
pub fn big_batch(model: &str, n: usize) -> ScoreBatch {
    let rows = reference_batches(model);
    let mut batch = rows[0].clone();
    batch.item_ids = (0..n as u64).collect();
    batch.values = (0..n).flat_map(|i| rows[i % rows.len()].values.clone()).collect();
    batch
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
