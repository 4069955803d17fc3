//! Scoring for feedgraph (filled by the issues "Following and home feeds end to end" and
//! "The ML scorer").
//!
//! Will own: the light-score expression language evaluated on shards (parsed and
//! checked once, compiled, chosen per request by name); the ML model runtime (ONNX MLPs
//! through `tract`, gradient-boosted trees through our own evaluator) with a versioned,
//! hot-reloaded model registry; the `ScoreBatch` gRPC service; and the scorer client the
//! broker calls with a deadline and a light-score fallback.
