//! One feedgraph shard: a RocksDB instance holding a slice of the graph.
//!
//! Owns: the on-disk schema (column families, key and record layouts), the roaring
//! bitmap merge operator, pin ordinals, the in-memory pin attributes, the bulk
//! loader, and the primitives replication is built from (sequence numbers, WAL updates
//! with gap detection, checkpoints, WAL retention).
//!
//! Invariants:
//! - Every pin on a shard has a dense `u32` ordinal, assigned by the shard's single
//!   writer in arrival order (the bulk loader sorts by creation time first) and written
//!   in the same `WriteBatch` as the pin. Ordinals are never reused, also across reopen
//!   and crashes: the next ordinal is recovered from the highest stored pin.
//! - Every write request is one `WriteBatch`: all of it or none of it.
//! - Bitmaps (`user_pins`, `board_pins`, `topic_pins`, `filters`, `seen`) are changed
//!   only by merge operands, so edge writes are blind.
//! - Unknown ids read as empty values, not errors. A stored value that does not decode
//!   is [`Error::Corrupt`], never a panic.
//! - All calls block on disk: async callers run them on a blocking pool.

mod attrs;
pub mod bitmap;
mod error;
mod record;
mod shard;

pub use attrs::{HotAttrs, PinAttributes, PinAttrs};
pub use error::{Error, Result};
pub use record::{FilterKind, PinRecord};
pub use shard::{
    BulkLoad, BulkLoadStats, BulkProgress, Follows, Shard, ShardOptions, WalBatch, WriteOutcome,
};

/// Version of the on-disk schema; a shard written by another version refuses to open.
pub const SCHEMA_VERSION: u32 = 1;
