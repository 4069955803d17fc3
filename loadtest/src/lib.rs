//! `feedgraph-load`: synthetic graphs and load tests.
//!
//! Owns: the reproducible Pinterest-like graph generator ([`generator`], also used by
//! `feedgraph serve --demo`); the load engine ([`engine`]: open loop at a fixed rate
//! without coordinated omission, or closed loop; HDR-histogram reports); what is sent
//! ([`scenario`]: feed reads for users drawn by activity, writes, the graph as write
//! batches over gRPC or to a bulk-load file, viewers of a chosen fanout); and SVG
//! latency charts ([`plot`]). The `feedgraph-load` binary lives in the `server` package
//! (it can start a service in-process, and `server` already depends on this crate).
//!
//! Invariants: an open-loop run records every request that fell due in its measured
//! window, sent or missed (`recorded == sent + missed`), with latency measured from
//! when it was due.

pub mod engine;
pub mod generator;
pub mod plot;
pub mod scenario;

pub use generator::{Graph, GraphSpec, USER_CONTEXT_FEATURES, generate, user_context};
