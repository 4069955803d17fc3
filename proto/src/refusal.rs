//! Typed refusals between nodes: a `tonic::Status` with metadata saying why, so that a
//! broker or follower acts on the reason (re-route to the leader, adopt a newer epoch,
//! try another replica, re-bootstrap) without parsing messages.

use tonic::Status;
use tonic::metadata::MetadataValue;

/// Metadata key naming the [`Refusal`] kind.
pub const KIND_KEY: &str = "feedgraph-error";
/// Metadata key with the current leader's address, when known.
pub const LEADER_KEY: &str = "feedgraph-leader";
/// Metadata key with the replica's current epoch.
pub const EPOCH_KEY: &str = "feedgraph-epoch";
/// Metadata key with the sequence number a `not-confirmed` write committed at.
pub const SEQUENCE_KEY: &str = "feedgraph-sequence";

/// Why a replica refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// Not the leader: writes and log shipping go to `leader`.
    NotLeader,
    /// The request named another epoch than the replica's `epoch`.
    StaleEpoch,
    /// The replica has not applied what the read must see; try another.
    Behind,
    /// The WAL no longer reaches the follower's position: re-bootstrap.
    WalGap,
    /// The follower's log is not a prefix of the leader's: rebuild.
    Diverged,
    /// The follower holds another database than the leader (another lineage or
    /// column-family layout): not the same shard's history, so nothing is rebuilt
    /// without an operator.
    ForeignData,
    /// A semi-sync write committed on the leader but no follower confirmed it in time.
    NotConfirmed,
}

impl RefusalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NotLeader => "not-leader",
            RefusalKind::StaleEpoch => "stale-epoch",
            RefusalKind::Behind => "behind",
            RefusalKind::WalGap => "wal-gap",
            RefusalKind::Diverged => "diverged",
            RefusalKind::ForeignData => "foreign-data",
            RefusalKind::NotConfirmed => "not-confirmed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            RefusalKind::NotLeader,
            RefusalKind::StaleEpoch,
            RefusalKind::Behind,
            RefusalKind::WalGap,
            RefusalKind::Diverged,
            RefusalKind::ForeignData,
            RefusalKind::NotConfirmed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A typed refusal read back from a status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub leader: Option<String>,
    pub epoch: Option<u64>,
    /// Where the refused write committed (`not-confirmed`), so a broker's
    /// read-your-writes position survives a hop.
    pub sequence: Option<u64>,
}

/// Attaches the refusal's metadata to `status`.
pub fn refuse(mut status: Status, kind: RefusalKind, leader: Option<&str>, epoch: Option<u64>) -> Status {
    let md = status.metadata_mut();
    md.insert(KIND_KEY, MetadataValue::from_static(kind.as_str()));
    if let Some(leader) = leader.and_then(|l| MetadataValue::try_from(l).ok()) {
        md.insert(LEADER_KEY, leader);
    }
    if let Some(epoch) = epoch {
        md.insert(EPOCH_KEY, MetadataValue::from(epoch));
    }
    status
}

/// Adds the sequence number a write committed at to a refusal.
pub fn with_sequence(mut status: Status, sequence: u64) -> Status {
    status.metadata_mut().insert(SEQUENCE_KEY, MetadataValue::from(sequence));
    status
}

/// The refusal a status carries, if it is one.
pub fn refusal(status: &Status) -> Option<Refusal> {
    let md = status.metadata();
    let kind = RefusalKind::parse(md.get(KIND_KEY)?.to_str().ok()?)?;
    let leader =
        md.get(LEADER_KEY).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_owned);
    let number = |key| md.get(key).and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok());
    Some(Refusal { kind, leader, epoch: number(EPOCH_KEY), sequence: number(SEQUENCE_KEY) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_round_trip_through_a_status() {
        let s =
            refuse(Status::failed_precondition("x"), RefusalKind::NotLeader, Some("127.0.0.1:7001"), Some(3));
        assert_eq!(
            refusal(&s),
            Some(Refusal {
                kind: RefusalKind::NotLeader,
                leader: Some("127.0.0.1:7001".into()),
                epoch: Some(3),
                sequence: None,
            })
        );
        let s = with_sequence(
            refuse(Status::deadline_exceeded("late"), RefusalKind::NotConfirmed, None, Some(2)),
            41,
        );
        assert_eq!(refusal(&s).map(|r| (r.epoch, r.sequence)), Some((Some(2), Some(41))));
        let s = refuse(Status::out_of_range("gap"), RefusalKind::WalGap, None, None);
        assert_eq!(refusal(&s).map(|r| r.kind), Some(RefusalKind::WalGap));
        assert_eq!(refusal(&Status::internal("plain")), None);
    }
}
