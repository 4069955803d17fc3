//! Scoring for feedgraph.
//!
//! Owns: the light-score expression language evaluated on shards ([`expr`]: parsed and
//! checked once, compiled to bytecode, chosen per request by name). Will also own (issue
//! "The ML scorer") the ML model runtime (ONNX MLPs through `tract`, gradient-boosted
//! trees through our own evaluator) with a versioned, hot-reloaded model registry, the
//! `ScoreBatch` gRPC service, and the scorer client the broker calls with a deadline and
//! a light-score fallback.
//!
//! Invariants: scoring is pure and allocation-free per candidate; a compiled expression
//! never panics on any input (NaN scores become `-inf` and sort last).

pub mod expr;

pub use expr::{Expr, PIN_VARIABLES, ParseError};
