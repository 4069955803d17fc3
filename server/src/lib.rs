//! The `feedgraph` service (filled by the issue "Following and home feeds end to end").
//!
//! Will own: configuration (TOML file → env → CLI, validated at start-up), wiring of
//! shards, broker and scorer into `run(config, shutdown)`, the thin gRPC adapters (proto
//! ↔ domain, errors ↔ `tonic::Status` in one exhaustive mapping), health, reflection,
//! Prometheus metrics and the CLI client. `main` only parses and calls `run`.
