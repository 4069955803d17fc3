//! Cross-crate integration tests for feedgraph (filled from the issue "Following and
//! home feeds end to end" on).
//!
//! Will own: in-process clusters of real nodes started through `server::run` on
//! 127.0.0.1 (and a real etcd, started by the tests), exercising end-to-end feeds,
//! replication and failover. Every test stops what it started.
