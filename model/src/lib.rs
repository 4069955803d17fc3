//! feedgraph's domain vocabulary: ids, users, boards, pins, follows and the mutations
//! that change them.
//!
//! Owns: the types every other crate speaks, free of storage (RocksDB) and wire
//! (prost) types, so that `graph-store` and `retrieval` never see a protobuf message and
//! `proto` never sees RocksDB.
//!
//! Invariants: an id value of 0 is never valid (protobuf's default would otherwise slip
//! through as a real id); a value of these types has already been validated — code that
//! receives one does not re-check it. Construction from untrusted input goes through
//! `feedgraph-proto`'s `TryFrom` conversions, which name the offending field.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $nz:ty, $raw:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name($nz);

        impl $name {
            /// Returns `None` for 0, which is never a valid id.
            pub const fn new(raw: $raw) -> Option<Self> {
                match <$nz>::new(raw) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// The raw integer, as stored and sent on the wire.
            pub const fn get(self) -> $raw {
                self.0.get()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// A user (also the owner of boards and pins). Content is sharded by owner.
    UserId,
    NonZeroU64,
    u64
);
id_type!(
    /// A board; it lives on its owner's shard.
    BoardId,
    NonZeroU64,
    u64
);
id_type!(
    /// A pin's global id; on its owner's shard it also has a dense `u32` ordinal.
    PinId,
    NonZeroU64,
    u64
);
id_type!(
    /// An interest topic (a few hundred to a few thousand exist).
    TopicId,
    NonZeroU32,
    u32
);

/// The logical shard holding a user's content and follow lists, out of `shard_count`.
/// A fixed function of the id (a 64-bit mix, then modulo), so every node and client
/// computes the same placement.
pub fn shard_of(user: UserId, shard_count: u32) -> u32 {
    // splitmix64's finaliser: consecutive ids spread evenly over the shards.
    let mut z = user.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(shard_count.max(1))) as u32
}

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

/// A user's profile record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
}

/// A board, owned by one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Board {
    pub id: BoardId,
    pub owner: UserId,
    pub name: String,
}

/// Engagement counters and quality signals of a pin. They change often (the streaming
/// signals path); the scoring hot path reads them from memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PinSignals {
    /// Model-estimated quality in `[0, 1]`.
    pub quality: f32,
    pub saves: u32,
    pub clicks: u32,
    pub closeups: u32,
}

/// A partial update of [`PinSignals`]: fields left `None` keep their value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SignalsUpdate {
    pub quality: Option<f32>,
    pub saves: Option<u32>,
    pub clicks: Option<u32>,
    pub closeups: Option<u32>,
}

impl SignalsUpdate {
    /// Applies the fields that are set.
    pub fn apply_to(&self, signals: &mut PinSignals) {
        if let Some(q) = self.quality {
            signals.quality = q;
        }
        if let Some(v) = self.saves {
            signals.saves = v;
        }
        if let Some(v) = self.clicks {
            signals.clicks = v;
        }
        if let Some(v) = self.closeups {
            signals.closeups = v;
        }
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A pin as written by a client.
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    pub id: PinId,
    pub owner: UserId,
    pub board: BoardId,
    pub created_at_ms: TimestampMs,
    /// Sorted, without duplicates.
    pub topics: Vec<TopicId>,
    pub signals: PinSignals,
}

/// A pin reference that carries its owner, so that it can be routed to the owner's
/// shard without a directory lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PinRef {
    pub pin: PinId,
    pub owner: UserId,
}

/// What a user can follow. A board is followed together with its owner: the follow
/// record lives on the follower's shard, and retrieval must know the owner's shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FollowTarget {
    User(UserId),
    Board { board: BoardId, owner: UserId },
    Topic(TopicId),
}

/// Moderation state a pin can be flagged with; flagged pins never appear in feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinFlag {
    Spam,
    Unsafe,
}

/// One change to the graph. A write request is a list of these, validated as a whole.
#[derive(Clone, Debug, PartialEq)]
pub enum Mutation {
    UpsertUser(User),
    UpsertBoard(Board),
    /// Creates a pin or updates it in place (same ordinal, same id).
    UpsertPin(Pin),
    Follow {
        follower: UserId,
        target: FollowTarget,
    },
    Unfollow {
        follower: UserId,
        target: FollowTarget,
    },
    DeletePin(PinRef),
    /// Sets (`on = true`) or clears a moderation flag.
    FlagPin {
        pin: PinRef,
        flag: PinFlag,
        on: bool,
    },
    /// Pins the user has been shown; they are left out of the user's next feeds.
    RecordImpressions {
        user: UserId,
        pins: Vec<PinRef>,
    },
    BlockUser {
        user: UserId,
        blocked: UserId,
    },
    UnblockUser {
        user: UserId,
        blocked: UserId,
    },
    UpdateSignals {
        pin: PinRef,
        update: SignalsUpdate,
    },
}

impl Mutation {
    /// The user whose shard this mutation is applied on: content mutations go to the
    /// owner's shard, follow/block/impression lists to the acting user's shard.
    /// `RecordImpressions` spans its pins' owners; it is split per owner before routing
    /// (see [`Mutation::split_impressions_by_owner`]), and this returns the first owner.
    pub fn routing_user(&self) -> Option<UserId> {
        match self {
            Mutation::UpsertUser(u) => Some(u.id),
            Mutation::UpsertBoard(b) => Some(b.owner),
            Mutation::UpsertPin(p) => Some(p.owner),
            Mutation::Follow { follower, .. } | Mutation::Unfollow { follower, .. } => Some(*follower),
            Mutation::DeletePin(p) => Some(p.owner),
            Mutation::FlagPin { pin, .. } | Mutation::UpdateSignals { pin, .. } => Some(pin.owner),
            Mutation::RecordImpressions { pins, .. } => pins.first().map(|p| p.owner),
            Mutation::BlockUser { user, .. } | Mutation::UnblockUser { user, .. } => Some(*user),
        }
    }

    /// Splits a `RecordImpressions` into one mutation per pin owner (impressions are
    /// stored as ordinal bitmaps on the pins' shards, next to the candidates they
    /// filter). Other mutations are returned unchanged.
    pub fn split_impressions_by_owner(self) -> Vec<Mutation> {
        match self {
            Mutation::RecordImpressions { user, pins } => {
                // Linear in the pins (owners in order of first appearance): a search of
                // the owners so far per pin was quadratic in a request's size.
                let mut slot: std::collections::HashMap<UserId, usize> = std::collections::HashMap::new();
                let mut by_owner: Vec<Vec<PinRef>> = Vec::new();
                for p in pins {
                    let i = *slot.entry(p.owner).or_insert_with(|| {
                        by_owner.push(Vec::new());
                        by_owner.len() - 1
                    });
                    by_owner[i].push(p);
                }
                by_owner.into_iter().map(|pins| Mutation::RecordImpressions { user, pins }).collect()
            }
            other => vec![other],
        }
    }
}

/// How a write is acknowledged to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ack {
    /// After the leader committed.
    #[default]
    Async,
    /// After the leader's WAL was fsync'ed.
    Sync,
    /// After at least one follower applied the write (the leader also syncs).
    SemiSync,
}

impl Ack {
    /// The durability the leader's own commit needs.
    pub fn local_durability(self) -> Durability {
        match self {
            Ack::Async => Durability::Buffered,
            Ack::Sync | Ack::SemiSync => Durability::Sync,
        }
    }
}

/// A validated feed request. The page-size maximum is the server's configuration and
/// is checked by the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedRequest {
    pub user: UserId,
    pub page_size: NonZeroU32,
    /// Opaque cursor from the previous page; `None` for the first page.
    pub cursor: Option<String>,
    /// Name of a configured ranking expression; `None` for the default.
    pub ranking: Option<String>,
    /// Request features (`req.<name>` in ranking expressions), all finite.
    pub features: std::collections::BTreeMap<String, f64>,
}

/// How the leader commits a write locally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged once in the leader's memtable and WAL buffer (fastest; a machine
    /// crash may lose the last writes, a process crash does not).
    #[default]
    Buffered,
    /// Acknowledged after the leader's WAL is fsync'ed.
    Sync,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_spreads() {
        let mut counts = [0u32; 16];
        for u in 1..=16_000u64 {
            counts[shard_of(UserId::new(u).unwrap(), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(shard_of(UserId::new(42).unwrap(), 16), shard_of(UserId::new(42).unwrap(), 16));
        assert_eq!(shard_of(UserId::new(42).unwrap(), 1), 0);
    }

    #[test]
    fn zero_is_not_an_id() {
        assert!(UserId::new(0).is_none());
        assert!(TopicId::new(0).is_none());
        assert_eq!(PinId::new(7).map(PinId::get), Some(7));
    }

    #[test]
    fn impressions_split_per_owner_keeps_order() {
        let u = |v| UserId::new(v).unwrap();
        let p = |v| PinId::new(v).unwrap();
        let m = Mutation::RecordImpressions {
            user: u(1),
            pins: vec![
                PinRef { pin: p(10), owner: u(2) },
                PinRef { pin: p(11), owner: u(3) },
                PinRef { pin: p(12), owner: u(2) },
            ],
        };
        let parts = m.split_impressions_by_owner();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].routing_user(), Some(u(2)));
        match &parts[0] {
            Mutation::RecordImpressions { pins, .. } => {
                assert_eq!(pins.iter().map(|p| p.pin.get()).collect::<Vec<_>>(), [10, 12]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(parts[1].routing_user(), Some(u(3)));
    }

    /// 200k impressions of 100k owners: one part per owner, in order of first
    /// appearance, every pin once. (The split was quadratic: 10^10 steps here.)
    #[test]
    fn splits_many_owners_in_linear_time() {
        let u = |v| UserId::new(v).unwrap();
        let pins: Vec<PinRef> = (0..200_000u64)
            .map(|i| PinRef { pin: PinId::new(i + 1).unwrap(), owner: u(i % 100_000 + 1) })
            .collect();
        let parts = Mutation::RecordImpressions { user: u(1), pins }.split_impressions_by_owner();
        assert_eq!(parts.len(), 100_000);
        for (k, part) in parts.iter().enumerate() {
            match part {
                Mutation::RecordImpressions { pins, .. } => {
                    let ids: Vec<u64> = pins.iter().map(|p| p.pin.get()).collect();
                    assert_eq!(ids, [k as u64 + 1, k as u64 + 100_001]);
                    assert!(pins.iter().all(|p| p.owner == u(k as u64 + 1)));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn signals_update_applies_only_set_fields() {
        let mut s = PinSignals { quality: 0.5, saves: 3, clicks: 4, closeups: 5 };
        SignalsUpdate { saves: Some(9), ..Default::default() }.apply_to(&mut s);
        assert_eq!(s, PinSignals { quality: 0.5, saves: 9, clicks: 4, closeups: 5 });
        assert!(SignalsUpdate::default().is_empty());
    }
}
