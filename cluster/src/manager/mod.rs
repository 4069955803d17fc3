//! The cluster manager on etcd: shard placement, failover with fencing, drains and
//! rebalancing, after Helix's model (a state machine per replica, a controller that
//! drives transitions toward an ideal state) made safe with leases and epochs.
//!
//! - [`view`]: the keys under `/feedgraph/<cluster>/` and the state they hold — the
//!   spec (shards, replicas), live nodes (under their leases), members, the shard map
//!   (leader, followers, epoch per shard), drains.
//! - [`session`]: a node's lease and liveness key, and the fence: a node that may have
//!   lost its lease fences its leaders before etcd can expire it.
//! - [`controller`]: the elected controller's rounds.
//! - [`member`]: a node's membership — session, state watch, candidacy.
//!
//! Invariants: a shard's epoch only grows and each is an etcd revision, allocated by
//! the controller holding the election; the map is written before the transitions it
//! implies; a replica is promoted only with the longest log among the live replicas,
//! so every acknowledged semi-sync write (applied by some follower) survives a
//! failover.

pub mod controller;
pub mod member;
pub mod session;
pub mod view;

pub use controller::ControllerConfig;
pub use member::{ClusterStatus, EtcdCredentials, Member, MemberConfig, connect, parse_endpoints, set_drain};
pub use session::SessionFault;
pub use view::{Assignment, ClusterSpec, ClusterView, Keys};
