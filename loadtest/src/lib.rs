//! `feedgraph-load` (filled by the issue "feedgraph-load: synthetic graphs, bulk ingest
//! and open-loop fanout load tests").
//!
//! Will own: the reproducible Pinterest-like graph generator, bulk ingest over gRPC or
//! to a file, the open- and closed-loop load scenarios (ingest, following, home, mixed,
//! fanout sweep) without coordinated omission, and the HDR-histogram reports.
