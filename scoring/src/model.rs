//! One loaded model version: its schema and its runtime.
//!
//! On disk a version is a directory holding `schema.toml` and exactly one model file:
//! `model.onnx` (a network, run by `tract`) or `model.txt` (LightGBM trees, run by
//! [`crate::gbdt`]). Loading validates both and that they agree (input width; for
//! trees, the feature names stored in the model file).

use std::path::Path;

use crate::gbdt::Ensemble;
use crate::onnx::Network;
use crate::schema::FeatureSchema;
use crate::{Error, Result, ScoreBatch, Scores};

/// The model file names a version directory may hold.
pub const ONNX_FILE: &str = "model.onnx";
pub const LIGHTGBM_FILE: &str = "model.txt";
pub const SCHEMA_FILE: &str = "schema.toml";

/// Which runtime scores a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    Onnx,
    LightGbm,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Onnx => "onnx",
            ModelKind::LightGbm => "lightgbm",
        }
    }
}

#[derive(Debug)]
enum Runtime {
    Onnx(Network),
    LightGbm(Ensemble),
}

/// A validated model version, immutable once loaded.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    schema: FeatureSchema,
    runtime: Runtime,
}

impl LoadedModel {
    /// Loads the version in `dir`.
    pub fn load(name: &str, version: u64, dir: &Path) -> Result<Self> {
        let origin = dir.display().to_string();
        let invalid = |reason: String| Error::InvalidModel { path: origin.clone(), reason };
        let read = |file: &str| -> Result<Option<Vec<u8>>> {
            match std::fs::read(dir.join(file)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(invalid(format!("cannot read {file}: {e}"))),
            }
        };
        let schema_text = read(SCHEMA_FILE)?.ok_or_else(|| invalid(format!("no {SCHEMA_FILE}")))?;
        let schema_text =
            String::from_utf8(schema_text).map_err(|_| invalid(format!("{SCHEMA_FILE} is not UTF-8")))?;
        let schema = FeatureSchema::parse(&schema_text, &origin)?;
        let runtime = match (read(ONNX_FILE)?, read(LIGHTGBM_FILE)?) {
            (Some(bytes), None) => Runtime::Onnx(Network::load(&bytes, schema.len(), &origin)?),
            (None, Some(bytes)) => {
                let text =
                    String::from_utf8(bytes).map_err(|_| invalid(format!("{LIGHTGBM_FILE} is not UTF-8")))?;
                let trees = Ensemble::parse(&text, &origin)?;
                if trees.features() != schema.len() {
                    return Err(invalid(format!(
                        "trees read {} features, schema declares {}",
                        trees.features(),
                        schema.len()
                    )));
                }
                let names = trees.feature_names();
                if !names.is_empty() && !names.iter().map(String::as_str).eq(schema.names()) {
                    return Err(invalid("feature names in model.txt differ from the schema's".into()));
                }
                Runtime::LightGbm(trees)
            }
            (Some(_), Some(_)) => return Err(invalid(format!("holds both {ONNX_FILE} and {LIGHTGBM_FILE}"))),
            (None, None) => return Err(invalid(format!("holds neither {ONNX_FILE} nor {LIGHTGBM_FILE}"))),
        };
        Ok(Self { name: name.to_string(), version, schema, runtime })
    }

    pub fn kind(&self) -> ModelKind {
        match self.runtime {
            Runtime::Onnx(_) => ModelKind::Onnx,
            Runtime::LightGbm(_) => ModelKind::LightGbm,
        }
    }

    pub fn schema(&self) -> &FeatureSchema {
        &self.schema
    }

    /// Scores a batch (its `model` field is not checked here).
    pub fn score(&self, batch: &ScoreBatch) -> Result<Scores> {
        let rows = self.schema.assemble(batch)?;
        let scores = match &self.runtime {
            Runtime::Onnx(net) => {
                let rows: Vec<f32> = rows.iter().map(|v| *v as f32).collect();
                net.predict(&rows)?
            }
            Runtime::LightGbm(trees) => trees.predict(&rows).into_iter().map(|v| v as f32).collect(),
        };
        Ok(Scores { scores, model: self.name.clone(), version: self.version })
    }
}
