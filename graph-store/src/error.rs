use feedgraph_model::{BoardId, UserId};

/// Everything a shard operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB reported an error (I/O, or a failed merge on a corrupt operand).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),

    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A stored value could not be decoded.
    #[error("corrupt value in column family `{cf}` at key {key}: {what}")]
    Corrupt { cf: &'static str, key: String, what: &'static str },

    /// A write names a board that does not exist on this shard.
    #[error("board {0} not found")]
    BoardNotFound(BoardId),

    /// A write names a pin or board whose stored owner is another user.
    #[error("{what} belongs to user {actual}, not {claimed}")]
    OwnerMismatch { what: String, actual: UserId, claimed: UserId },

    /// A pin appears twice as new in one write batch with different content.
    #[error("invalid write: {0}")]
    InvalidWrite(String),

    /// A follow or block would take a user past the per-user cap.
    #[error(
        "user {user} would have {count} {what}, above the cap of {limit} (store.max_{what}_per_user): remove some first"
    )]
    TooMany { user: UserId, what: &'static str, count: usize, limit: u32 },

    /// The shard stopped taking writes after its store failed (no space left, an I/O
    /// error, corruption); it keeps serving reads. A restart, once the disk is sound,
    /// clears it.
    #[error(
        "shard {shard} stopped taking writes: {reason}; it still serves reads (restart the node once the disk is sound)"
    )]
    WritesStopped { shard: u32, reason: String },

    /// The shard holds 2^32 - 1 pins: no ordinal is left.
    #[error("ordinal space exhausted on shard {shard}")]
    OrdinalsExhausted { shard: u32 },

    /// The directory holds another shard's data.
    #[error("directory holds shard {found}, expected shard {expected}")]
    ShardMismatch { expected: u32, found: u32 },

    /// The directory was written by an incompatible schema version.
    #[error("schema version {found} is not supported (this build reads {supported})")]
    SchemaVersion { found: u32, supported: u32 },

    /// The WAL no longer reaches the requested sequence number (it was purged, or a
    /// bulk ingestion bypassed it). The follower must re-bootstrap from a checkpoint.
    #[error(
        "wal gap: updates after sequence {since} were requested but the log continues at {next_available:?}"
    )]
    WalGap { since: u64, next_available: Option<u64> },

    /// A follower asked for updates after a sequence number the shard never reached:
    /// its history diverged (for example a demoted leader) and it must be rebuilt.
    #[error("sequence {since} is ahead of this shard's latest sequence {latest}")]
    AheadOfLog { since: u64, latest: u64 },

    /// A write or transition names an epoch that is not this shard's leader epoch.
    #[error("epoch {given} is not the current leader epoch {current}")]
    StaleEpoch { given: u64, current: u64 },

    /// A local write on a replica: replicas apply only batches shipped by their leader.
    #[error("this shard is a replica: it takes writes only from its leader's log")]
    ReadOnlyReplica,

    /// A shipped batch offered to a shard that is not a replica.
    #[error("this shard is a leader: it does not apply shipped batches")]
    NotReplica,

    /// A shipped batch does not start right after the replica's latest sequence (or
    /// applying it did not end where the leader's did).
    #[error("replicated batch: expected sequence {expected}, got {got}")]
    SequenceMismatch { expected: u64, got: u64 },

    /// A shipped batch is malformed.
    #[error("replicated batch {0}")]
    ReplicatedBatch(String),

    /// A follower's log is not a prefix of its leader's: it must be rebuilt.
    #[error("diverged: {0}")]
    Diverged(crate::Divergence),
}

impl Error {
    pub(crate) fn corrupt(cf: impl CfName, key: &[u8], what: &'static str) -> Self {
        let key = key.iter().map(|b| format!("{b:02x}")).collect();
        Error::Corrupt { cf: cf.cf_name(), key, what }
    }

    /// Whether this is the store failing — corrupted data, or a disk that is full,
    /// failing or read-only — rather than a request, a replication position, or the
    /// process's own resources (a lock another process holds, open files, permissions)
    /// being wrong.
    pub fn is_storage_fault(&self) -> bool {
        const DISK: [&str; 3] = ["No space left on device", "Input/output error", "Read-only file system"];
        match self {
            Error::Rocks(e) => match e.kind() {
                rocksdb::ErrorKind::Corruption => true,
                rocksdb::ErrorKind::IOError => DISK.iter().any(|d| e.as_ref().contains(d)),
                _ => false,
            },
            Error::Corrupt { .. } => true,
            _ => false,
        }
    }

    /// Whether the data itself is corrupted: the one fault for which a store that does
    /// not open may be replaced (a follower bootstraps over it). A full disk or a lock
    /// held by another process must not cost a good copy.
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::Rocks(e) => e.kind() == rocksdb::ErrorKind::Corruption,
            Error::Corrupt { .. } => true,
            _ => false,
        }
    }

    /// Whether the store's files are damaged (RocksDB found a checksum mismatch or a
    /// broken block, table or manifest), as opposed to a value that is wrong in every
    /// copy (a merge operand our merge operator refuses, a record our decoders refuse):
    /// only the former is cured by another replica's copy.
    pub fn is_damaged_file(&self) -> bool {
        match self {
            Error::Rocks(e) => {
                e.kind() == rocksdb::ErrorKind::Corruption && !e.as_ref().contains("Merge operator failed")
            }
            _ => false,
        }
    }

    /// `Ok` when the stored owner is the claimed one; `what` names the object.
    pub(crate) fn check_owner(what: impl FnOnce() -> String, actual: UserId, claimed: UserId) -> Result<()> {
        if actual == claimed { Ok(()) } else { Err(Error::OwnerMismatch { what: what(), actual, claimed }) }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A column family named in an error.
pub(crate) trait CfName {
    fn cf_name(self) -> &'static str;
}

impl CfName for &'static str {
    fn cf_name(self) -> &'static str {
        self
    }
}

impl CfName for crate::shard::schema::Cf {
    fn cf_name(self) -> &'static str {
        self.name()
    }
}
