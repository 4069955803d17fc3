//! Feature schemas: the contract between callers, who send features by name, and a
//! model, which reads a fixed-width row of numbers.
//!
//! A schema (`schema.toml` beside the model file) lists the model's input columns in
//! order. Each column names a feature, says whether it comes from the item or from the
//! request's user features, gives the default used when it is not sent, and the
//! transform applied before the model sees it: `identity` or `log1p` (of `max(v, 0)`),
//! then standardisation `(v - mean) / std`. The training script writes the schema with
//! the model, so serving applies exactly the preprocessing the model was trained with.
//!
//! ```toml
//! [[feature]]
//! name = "saves"
//! source = "item"
//! default = 0.0
//! transform = "log1p"
//! mean = 4.1
//! std = 2.2
//! ```

use std::collections::HashMap;

use serde::Deserialize;

use crate::{Error, Result, ScoreBatch};

/// Where a column's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSource {
    Item,
    User,
}

/// What is applied to a raw value before standardisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    Identity,
    /// `ln(1 + max(v, 0))`: for counters.
    Log1p,
}

/// One input column.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    pub source: FeatureSource,
    #[serde(default)]
    pub default: f64,
    #[serde(default = "identity")]
    pub transform: Transform,
    #[serde(default)]
    pub mean: f64,
    #[serde(default = "one")]
    pub std: f64,
}

fn identity() -> Transform {
    Transform::Identity
}
fn one() -> f64 {
    1.0
}

impl FeatureSpec {
    /// The model's input value for a raw value.
    #[inline]
    pub fn apply(&self, raw: f64) -> f64 {
        let v = match self.transform {
            Transform::Identity => raw,
            Transform::Log1p => raw.max(0.0).ln_1p(),
        };
        (v - self.mean) / self.std
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    feature: Vec<FeatureSpec>,
}

/// A model's input columns, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSchema {
    features: Vec<FeatureSpec>,
    index: HashMap<String, usize>,
}

impl FeatureSchema {
    /// Parses and validates a schema; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidModel { path: origin.to_string(), reason };
        let file: SchemaFile = toml::from_str(text).map_err(|e| invalid(format!("schema: {e}")))?;
        Self::new(file.feature).map_err(invalid)
    }

    /// Validates a list of columns.
    pub fn new(features: Vec<FeatureSpec>) -> std::result::Result<Self, String> {
        if features.is_empty() {
            return Err("schema has no features".into());
        }
        let mut index = HashMap::new();
        for (i, f) in features.iter().enumerate() {
            if f.name.is_empty() {
                return Err(format!("feature {i} has an empty name"));
            }
            if index.insert(f.name.clone(), i).is_some() {
                return Err(format!("feature `{}` is declared twice", f.name));
            }
            if !f.default.is_finite() || !f.mean.is_finite() {
                return Err(format!("feature `{}`: default and mean must be finite", f.name));
            }
            if !(f.std.is_finite() && f.std > 0.0) {
                return Err(format!("feature `{}`: std must be finite and positive", f.name));
            }
        }
        Ok(Self { features, index })
    }

    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    pub fn features(&self) -> &[FeatureSpec] {
        &self.features
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|f| f.name.as_str())
    }

    /// The model input for a batch: `items × len()` values, row-major, transformed.
    /// Checks every name and value; errors name the item and the feature.
    pub fn assemble(&self, batch: &ScoreBatch) -> Result<Vec<f64>> {
        let bad = |item: Option<u64>, feature: &str, reason: String| Error::InvalidArgument {
            item,
            feature: Some(feature.to_string()),
            reason,
        };
        let mut position: Vec<Option<usize>> = vec![None; self.features.len()];
        for (k, name) in batch.feature_names.iter().enumerate() {
            match self.index.get(name) {
                Some(&i) if self.features[i].source == FeatureSource::Item => {
                    if position[i].replace(k).is_some() {
                        return Err(bad(None, name, "named twice in feature_names".into()));
                    }
                }
                Some(_) => {
                    return Err(bad(None, name, format!("is a user feature of model `{}`", batch.model)));
                }
                None => {
                    return Err(bad(None, name, format!("is not a feature of model `{}`", batch.model)));
                }
            }
        }
        // Constant columns (defaults, user features) are computed once into a template
        // row; per item only its own columns are transformed.
        let mut template = Vec::with_capacity(self.features.len());
        let mut item_columns: Vec<(usize, usize)> = Vec::new();
        for (i, (f, pos)) in self.features.iter().zip(&position).enumerate() {
            template.push(match (f.source, pos) {
                (FeatureSource::Item, Some(k)) => {
                    item_columns.push((i, *k));
                    0.0
                }
                (FeatureSource::Item, None) => f.apply(f.default),
                (FeatureSource::User, _) => {
                    let raw = match batch.user_features.get(&f.name) {
                        Some(v) if !v.is_finite() => {
                            return Err(bad(None, &f.name, format!("user feature is {v}")));
                        }
                        Some(v) => f64::from(*v),
                        None => f.default,
                    };
                    f.apply(raw)
                }
            });
        }
        let width = batch.feature_names.len();
        let items = batch.item_ids.len();
        if batch.values.len() != items * width {
            return Err(Error::InvalidArgument {
                item: None,
                feature: None,
                reason: format!(
                    "{} values for {items} items × {width} features (expected {})",
                    batch.values.len(),
                    items * width
                ),
            });
        }
        if let Some(at) = batch.values.iter().position(|v| !v.is_finite()) {
            let (i, k) = (at.checked_div(width).unwrap_or(0), at.checked_rem(width).unwrap_or(0));
            return Err(bad(
                Some(batch.item_ids[i]),
                &batch.feature_names[k],
                format!("value is {}", batch.values[at]),
            ));
        }
        let mut out = Vec::with_capacity(items * self.features.len());
        for i in 0..items {
            let values = &batch.values[i * width..(i + 1) * width];
            let start = out.len();
            out.extend_from_slice(&template);
            let row = &mut out[start..];
            for &(j, k) in &item_columns {
                row[j] = self.features[j].apply(f64::from(values[k]));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> FeatureSchema {
        FeatureSchema::parse(
            r#"
            [[feature]]
            name = "saves"
            source = "item"
            transform = "log1p"
            mean = 1.0
            std = 2.0
            [[feature]]
            name = "quality"
            source = "item"
            default = 0.5
            [[feature]]
            name = "user.sessions"
            source = "user"
            default = 3.0
            "#,
            "test",
        )
        .unwrap()
    }

    fn batch(names: &[&str], items: Vec<Vec<f32>>) -> ScoreBatch {
        ScoreBatch {
            model: "m".into(),
            user_features: HashMap::new(),
            feature_names: names.iter().map(|s| s.to_string()).collect(),
            item_ids: (0..items.len() as u64).map(|i| i + 10).collect(),
            values: items.into_iter().flatten().collect(),
        }
    }

    #[test]
    fn assembles_in_schema_order_with_defaults_and_transforms() {
        let s = schema();
        let mut b = batch(&["quality", "saves"], vec![vec![0.25, 7.0], vec![1.0, 0.0]]);
        b.user_features.insert("user.sessions".into(), 9.0);
        b.user_features.insert("user.unrelated".into(), 1.0);
        let x = s.assemble(&b).unwrap();
        let saves = |v: f64| (v.ln_1p() - 1.0) / 2.0;
        assert_eq!(x, vec![saves(7.0), 0.25, 9.0, saves(0.0), 1.0, 9.0]);
        let x = s.assemble(&batch(&["saves"], vec![vec![3.0]])).unwrap();
        assert_eq!(x, vec![saves(3.0), 0.5, 3.0]);
    }

    #[test]
    fn rejects_bad_batches_naming_item_and_feature() {
        let s = schema();
        let err = s.assemble(&batch(&["saves", "colour"], vec![vec![1.0, 2.0]])).unwrap_err().to_string();
        assert!(err.contains("`colour`") && err.contains("not a feature"), "{err}");
        let err = s.assemble(&batch(&["saves"], vec![vec![1.0], vec![1.0, 2.0]])).unwrap_err().to_string();
        assert!(err.contains("3 values for 2 items × 1 features"), "{err}");
        let nan = vec![vec![0.1, 1.0], vec![0.1, f32::NAN]];
        let err = s.assemble(&batch(&["quality", "saves"], nan)).unwrap_err().to_string();
        assert!(err.contains("item 11") && err.contains("`saves`") && err.contains("NaN"), "{err}");
        let err = s.assemble(&batch(&["user.sessions"], vec![vec![1.0]])).unwrap_err().to_string();
        assert!(err.contains("user feature"), "{err}");
        let mut b = batch(&["saves"], vec![vec![1.0]]);
        b.user_features.insert("user.sessions".into(), f32::INFINITY);
        assert!(s.assemble(&b).unwrap_err().to_string().contains("user.sessions"));
    }

    #[test]
    fn refuses_bad_schemas() {
        for text in [
            "",
            "[[feature]]\nname = \"a\"\nsource = \"item\"\n[[feature]]\nname = \"a\"\nsource = \"user\"",
            "[[feature]]\nname = \"a\"\nsource = \"item\"\nstd = 0.0",
            "[[feature]]\nname = \"a\"\nsource = \"elsewhere\"",
            "[[feature]]\nname = \"a\"\nsource = \"item\"\ntransform = \"sqrt\"",
        ] {
            assert!(FeatureSchema::parse(text, "t").is_err(), "{text}");
        }
    }
}
