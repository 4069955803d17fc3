//! `feedgraph-load`: synthetic graphs and load tests.
//!
//! Owns: the reproducible Pinterest-like graph generator ([`generator`], also used by
//! `feedgraph serve --demo`). Will own (issue "feedgraph-load"): bulk ingest over gRPC
//! or to a file, the open- and closed-loop load scenarios (ingest, following, home,
//! mixed, fanout sweep) without coordinated omission, and HDR-histogram reports.

pub mod engine;
pub mod generator;
pub mod plot;
pub mod scenario;

pub use generator::{Graph, GraphSpec, USER_CONTEXT_FEATURES, generate, user_context};
