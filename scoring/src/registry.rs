//! The model registry: a directory of named, versioned models, reloaded while serving.
//!
//! Layout: `<dir>/<model name>/<version>/` where `<version>` is a positive integer and
//! the version directory holds what [`LoadedModel::load`] reads. For each name the
//! newest version that loads is served. To publish, write the version under another
//! name (say `.tmp-7`) and rename it to `7`: directories whose names are not numbers
//! are ignored, so a half-copied version is never seen. A version that fails to load is
//! refused (logged and reported) and the one already served keeps serving; it is tried
//! again only when its files change (size or modification time).
//!
//! Invariants: a served model is an immutable `Arc<LoadedModel>`; a request takes one
//! `Arc` and scores everything with it, so a swap never changes a request in flight and
//! every answer names the version that produced it. The map's lock is held only to
//! clone or swap an `Arc`, never while loading or scoring.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::model::LoadedModel;
use crate::{Error, ModelKind, Result, ScoreBatch, Scores};

/// What a model directory serves.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    /// Version directories that failed to load, with the state of their files then.
    refused: Mutex<HashMap<PathBuf, Fingerprint>>,
}

/// Names, sizes and modification times of a version directory's files.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// A served model, for listings.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: u64,
    pub kind: ModelKind,
    pub feature_names: Vec<String>,
}

/// What one reload did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReloadReport {
    /// Newly served versions.
    pub loaded: Vec<(String, u64)>,
    /// Versions that failed to load: name, version, why.
    pub refused: Vec<(String, u64, String)>,
    /// Models no longer served (their directory is gone).
    pub removed: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files: Fingerprint = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}

fn subdirectories(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            out.push((name.to_string(), entry.path()));
        }
    }
    Ok(out)
}

impl Registry {
    /// A registry over `dir`, loaded once. Fails when `dir` cannot be read; models that
    /// fail to load are in the report, not an error.
    pub fn open(dir: impl Into<PathBuf>) -> Result<(Arc<Self>, ReloadReport)> {
        let registry = Arc::new(Self {
            dir: dir.into(),
            models: RwLock::new(BTreeMap::new()),
            refused: Mutex::new(HashMap::new()),
        });
        let report = registry.reload()?;
        Ok((registry, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rescans the directory and swaps in new versions (see the module doc). Loading
    /// runs on the calling thread: call it from a background thread.
    pub fn reload(&self) -> Result<ReloadReport> {
        let unreadable = |e: std::io::Error| Error::InvalidModel {
            path: self.dir.display().to_string(),
            reason: e.to_string(),
        };
        let mut report = ReloadReport::default();
        let mut seen = Vec::new();
        for (name, model_dir) in subdirectories(&self.dir).map_err(unreadable)? {
            if !valid_name(&name) {
                continue;
            }
            seen.push(name.clone());
            let mut versions: Vec<(u64, PathBuf)> = match subdirectories(&model_dir) {
                Ok(v) => v.into_iter().filter_map(|(v, p)| Some((v.parse::<u64>().ok()?, p))).collect(),
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "cannot list model versions");
                    continue;
                }
            };
            versions.sort_unstable_by_key(|v| std::cmp::Reverse(v.0));
            let serving = self.get(&name).map(|m| m.version);
            for (version, path) in versions {
                if serving == Some(version) {
                    break;
                }
                let print = fingerprint(&path);
                if self.lock_refused().get(&path) == Some(&print) {
                    continue;
                }
                match LoadedModel::load(&name, version, &path) {
                    Ok(model) => {
                        self.lock_refused().remove(&path);
                        self.write_models().insert(name.clone(), Arc::new(model));
                        report.loaded.push((name.clone(), version));
                        break;
                    }
                    Err(e) => {
                        self.lock_refused().insert(path, print);
                        report.refused.push((name.clone(), version, e.to_string()));
                    }
                }
            }
        }
        let mut models = self.write_models();
        let gone: Vec<String> = models.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for name in gone {
            models.remove(&name);
            report.removed.push(name);
        }
        Ok(report)
    }

    fn lock_refused(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Fingerprint>> {
        // The map holds no invariant a panic could break: recover from poisoning.
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<LoadedModel>>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The version of `name` served now.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Scores with the version of `batch.model` served now.
    pub fn score(&self, batch: &ScoreBatch) -> Result<Scores> {
        let model = self.get(&batch.model).ok_or_else(|| Error::UnknownModel(batch.model.clone()))?;
        model.score(batch)
    }

    /// Served models, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .map(|m| ModelInfo {
                name: m.name.clone(),
                version: m.version,
                kind: m.kind(),
                feature_names: m.schema().names().map(String::from).collect(),
            })
            .collect()
    }
}
