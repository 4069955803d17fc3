//! Cluster management for feedgraph (filled by the replication and cluster issues).
//!
//! Will own: the shard map and routing table, the replica state model
//! (`OFFLINE → FOLLOWER → LEADER`), leader → follower log shipping built on
//! `graph-store`'s WAL primitives (long-poll pull, gap → checkpoint re-bootstrap,
//! epochs as fencing tokens), the controller that places replicas and promotes the most
//! caught-up follower, and the coordination backends (embedded, etcd).
