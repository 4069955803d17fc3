//! ONNX networks through `tract` (pure Rust, nothing downloaded or linked at run time).
//!
//! A model must take one `float32 [N, F]` input and give one output of `N` scores
//! (`[N]` or `[N, 1]`). The batch axis is a symbol, so one optimised plan serves every
//! batch size. The plan is immutable and `run(&self)` keeps its state per call, so one
//! loaded network is shared by concurrent requests without locks.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::dims;

use crate::{Error, Result};

/// A loaded, optimised network.
pub struct Network {
    plan: Arc<TypedRunnableModel>,
    features: usize,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("features", &self.features).finish()
    }
}

impl Network {
    /// Loads an ONNX model taking `features` inputs per row; `origin` names it in errors.
    pub fn load(bytes: &[u8], features: usize, origin: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidModel { path: origin.to_string(), reason };
        let build = || -> TractResult<Arc<TypedRunnableModel>> {
            let model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
            let batch = model.sym("N");
            model
                .with_input_fact(0, f32::fact(dims!(batch, features)).into())?
                .with_output_fact(0, InferenceFact::default())?
                .into_optimized()?
                .into_runnable()
        };
        // tract panics on some malformed graphs (an input naming no node: found by
        // fuzzing, fuzz/corpus/onnx_model/regression-*): a bad file is refused, not a
        // crash of the reload loop.
        let plan = std::panic::catch_unwind(build)
            .map_err(|_| invalid("onnx: the model is malformed (the ONNX loader panicked on it)".into()))?
            .map_err(|e| invalid(format!("onnx: {e:#}")))?;
        let network = Network { plan, features };
        // A probe row proves the output has one score per row.
        let probe = network.predict(&vec![0.0; features * 2]).map_err(|e| invalid(e.to_string()))?;
        if probe.len() != 2 {
            return Err(invalid(format!(
                "gives {} outputs for 2 rows; expected one score per row",
                probe.len()
            )));
        }
        Ok(network)
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// Scores `rows` (row-major, `features()` values each).
    pub fn predict(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let n = rows.len().checked_div(self.features).unwrap_or(0);
        if n == 0 {
            return Ok(Vec::new());
        }
        let run = || -> TractResult<Vec<f32>> {
            let input = Tensor::from_shape(&[n, self.features], rows)?;
            let outputs = self.plan.run(tvec!(input.into()))?;
            let out = outputs.first().ok_or_else(|| TractError::msg("model gave no output"))?;
            Ok(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
        };
        // The plan is only read by a run (its state is made per call), so a panic
        // leaves nothing half-changed behind.
        let scores = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|_| Error::Internal("onnx run: the runtime panicked on this model".into()))?
            .map_err(|e| Error::Internal(format!("onnx run: {e:#}")))?;
        if scores.len() != n {
            return Err(Error::Internal(format!("model gave {} scores for {n} rows", scores.len())));
        }
        Ok(scores)
    }
}
