//! One feedgraph shard: a RocksDB instance holding a slice of the graph.
//!
//! Owns: the on-disk schema (column families, key and record layouts), the roaring
//! bitmap merge operator, pin ordinals, the in-memory pin attributes, the bulk
//! loader, and the primitives replication is built from: sequence numbers, WAL updates
//! with gap detection, applying a shipped batch with the leader's in-memory effects,
//! leadership epochs with write fences, the log-prefix check, exact checkpoints, WAL
//! retention and digests.
//!
//! Invariants:
//! - Every pin on a shard has a dense `u32` ordinal, assigned by the shard's leader in
//!   arrival order (the bulk loader sorts by creation time first) and written in the
//!   same `WriteBatch` as the pin, so replicas are identical. Ordinals are never reused,
//!   also across reopen and crashes: the next ordinal is recovered from the highest
//!   stored pin.
//! - Every write request is one `WriteBatch`: all of it or none of it. Leader writes and
//!   replicated batches take the same path ([`Shard::apply_replicated`] recovers a
//!   batch's in-memory effects from the batch itself), and the ordinal watermark
//!   readers bound their scans by is published last.
//! - A replica never writes anything of its own: its sequence numbers are the leader's.
//!   A leader writes only at its epoch; the history of epochs is replicated data.
//! - Bitmaps (`user_pins`, `board_pins`, `topic_pins`, `filters`, `seen`) are changed
//!   only by merge operands, so edge writes are blind; the one exception is the `seen`
//!   window, whose expired periods the write path deletes (in the WAL, like any write,
//!   so replicas drop what their leader dropped).
//! - Unknown ids read as empty values, not errors. A stored value that does not decode
//!   is [`Error::Corrupt`], never a panic.
//! - All calls block on disk: async callers run them on a blocking pool.

mod attrs;
pub mod bitmap;
mod error;
#[doc(hidden)]
pub mod fuzz_targets;
mod record;
mod shard;

pub use attrs::{BLOCK_ORDINALS, BLOCK_SHIFT, BlockBounds, HotAttrs, PinAttributes, PinAttrs};
pub use error::{Error, Result};
pub use record::{FilterKind, PinRecord};
pub use shard::{
    BulkLoad, BulkLoadStats, BulkProgress, CacheUsage, CommitListener, Digest, Divergence, EpochHistory,
    EpochStart, Follows, LogPosition, SeenStats, SeenSweep, SeenWindow, Shard, ShardOptions, StoreMemory,
    WalBatch, WriteOutcome, wall_clock_ms,
};

/// Version of the on-disk schema; a shard written by another version refuses to open.
pub const SCHEMA_VERSION: u32 = 1;
