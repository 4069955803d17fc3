//! What the cluster state in etcd says: its keys, the shard map (one assignment per
//! shard), the live nodes, the drains; read in one range request.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Client, GetOptions};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The keys of one cluster, all under `/feedgraph/<name>/`.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster_name: &str) -> Self {
        Self { root: format!("/feedgraph/{cluster_name}/") }
    }

    /// Everything of the cluster (one range read, one watch).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `{"shards": 16, "replicas": 3}`, written once by the first node.
    pub fn spec(&self) -> String {
        format!("{}spec", self.root)
    }

    /// A live node: its address, under the node's lease.
    pub fn live(&self, node: &str) -> String {
        format!("{}live/{node}", self.root)
    }

    /// Every node that ever joined, and its address (kept when the node dies, so the
    /// map's dead replicas can still be named and reached when they return).
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.root)
    }

    /// A shard's assignment.
    pub fn shard(&self, shard: u32) -> String {
        format!("{}shards/{shard:05}", self.root)
    }

    /// A node being drained.
    pub fn drain(&self, node: &str) -> String {
        format!("{}drain/{node}", self.root)
    }

    /// Epochs are revisions of puts to this key.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.root)
    }

    /// The controller election.
    pub fn election(&self) -> String {
        format!("{}controller", self.root)
    }
}

/// The cluster's fixed shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub shards: u32,
    /// Replicas per shard (a leader and `replicas - 1` followers).
    pub replicas: u32,
}

/// Where one shard's replicas are, and the epoch of its leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub leader: String,
    pub followers: Vec<String>,
    pub epoch: u64,
    /// The shard has never had data: its leader may start it empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new: bool,
}

impl Assignment {
    /// Leader first.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.leader).chain(&self.followers)
    }

    pub fn holds(&self, node: &str) -> bool {
        self.members().any(|m| m == node)
    }
}

#[derive(Serialize, Deserialize)]
struct NodeValue {
    address: String,
}

pub(crate) fn node_value(address: &str) -> String {
    serde_json::to_string(&NodeValue { address: address.to_owned() }).unwrap_or_default()
}

/// The cluster as etcd has it at one revision (not kept: views compare equal when the
/// cluster is the same, whatever else was written to etcd in between).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    pub spec: Option<ClusterSpec>,
    /// Live nodes (holding a lease): id → address.
    pub live: BTreeMap<String, String>,
    /// Every node that ever joined: id → address.
    pub members: BTreeMap<String, String>,
    /// By shard number; `None` until the controller places the shard.
    pub shards: Vec<Option<Assignment>>,
    pub draining: BTreeSet<String>,
}

impl ClusterView {
    /// Reads the whole cluster state in one request.
    pub async fn read(client: &mut Client, keys: &Keys) -> Result<ClusterView> {
        let answer = client
            .get(keys.root(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| Error::Coordination(format!("reading the cluster state: {e}")))?;
        let mut view = ClusterView::default();
        let mut shards = BTreeMap::new();
        for kv in answer.kvs() {
            let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else { continue };
            let Some(rest) = key.strip_prefix(keys.root()) else { continue };
            let bad = |e: serde_json::Error| Error::Coordination(format!("{key}: {e}"));
            if rest == "spec" {
                view.spec = Some(serde_json::from_str(value).map_err(bad)?);
            } else if let Some(node) = rest.strip_prefix("live/") {
                let v: NodeValue = serde_json::from_str(value).map_err(bad)?;
                view.live.insert(node.to_owned(), v.address);
            } else if let Some(node) = rest.strip_prefix("members/") {
                let v: NodeValue = serde_json::from_str(value).map_err(bad)?;
                view.members.insert(node.to_owned(), v.address);
            } else if let Some(node) = rest.strip_prefix("drain/") {
                view.draining.insert(node.to_owned());
            } else if let Some(shard) = rest.strip_prefix("shards/") {
                let shard: u32 =
                    shard.parse().map_err(|_| Error::Coordination(format!("{key}: not a shard key")))?;
                let a: Assignment = serde_json::from_str(value).map_err(bad)?;
                shards.insert(shard, a);
            }
        }
        let count = view.spec.map_or(0, |s| s.shards);
        view.shards = (0..count).map(|s| shards.remove(&s)).collect();
        Ok(view)
    }

    pub fn is_live(&self, node: &str) -> bool {
        self.live.contains_key(node)
    }

    /// A node's address, live or not.
    pub fn address(&self, node: &str) -> Option<&str> {
        self.live.get(node).or_else(|| self.members.get(node)).map(String::as_str)
    }

    /// Live nodes that take new replicas (not draining).
    pub fn placeable(&self) -> impl Iterator<Item = &String> {
        self.live.keys().filter(|n| !self.draining.contains(*n))
    }

    /// Replicas and leaders per node, by the map.
    pub fn load(&self) -> BTreeMap<&str, (usize, usize)> {
        let mut load: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for a in self.shards.iter().flatten() {
            load.entry(a.leader.as_str()).or_default().1 += 1;
            for m in a.members() {
                load.entry(m.as_str()).or_default().0 += 1;
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_round_trip_and_name_their_members() {
        let a =
            Assignment { leader: "a".into(), followers: vec!["b".into(), "c".into()], epoch: 7, new: false };
        let text = serde_json::to_string(&a).unwrap();
        assert!(!text.contains("new"), "{text}");
        assert_eq!(serde_json::from_str::<Assignment>(&text).unwrap(), a);
        assert!(a.holds("c") && !a.holds("d"));
        assert_eq!(a.members().cloned().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn load_counts_replicas_and_leaders() {
        let view = ClusterView {
            shards: vec![
                Some(Assignment { leader: "a".into(), followers: vec!["b".into()], epoch: 1, new: false }),
                Some(Assignment { leader: "b".into(), followers: vec!["a".into()], epoch: 1, new: false }),
                Some(Assignment { leader: "a".into(), followers: vec![], epoch: 1, new: false }),
                None,
            ],
            ..ClusterView::default()
        };
        let load = view.load();
        assert_eq!(load["a"], (3, 2));
        assert_eq!(load["b"], (2, 1));
    }
}
