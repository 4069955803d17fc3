//! Placement: which node holds which replica of which shard, at which epoch. Given by
//! hand in a TOML file every node reads (the cluster manager will compute the same
//! thing and drive it through `TransitionReplica`):
//!
//! ```toml
//! shards = 16
//!
//! [nodes]
//! a = "127.0.0.1:7001"
//! b = "127.0.0.1:7002"
//!
//! [[replicas]]
//! shards = "0-7"
//! leader = "a"
//! followers = ["b"]
//! epoch = 1
//!
//! [[replicas]]
//! shards = "8-15"
//! leader = "b"
//! followers = ["a"]
//! epoch = 1
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Role};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    shards: u32,
    nodes: BTreeMap<String, String>,
    replicas: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    /// Shard numbers and ranges: `"0-7"`, `"0,2,4-6"`.
    shards: String,
    leader: String,
    #[serde(default)]
    followers: Vec<String>,
    epoch: u64,
}

/// The replicas of one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlacement {
    /// Node id of the leader.
    pub leader: String,
    /// Node ids of the followers.
    pub followers: Vec<String>,
    pub epoch: u64,
}

/// A whole cluster's placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub shard_count: u32,
    /// Node id → gRPC address (`host:port`).
    pub nodes: BTreeMap<String, String>,
    /// By shard number.
    pub shards: Vec<ShardPlacement>,
}

impl Placement {
    pub fn from_file(path: &Path) -> Result<Placement, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Placement(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Placement(why) => Error::Placement(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// Parses and checks a placement: every shard placed exactly once, on known
    /// nodes, on distinct nodes, at an epoch of at least 1.
    pub fn parse(text: &str) -> Result<Placement, Error> {
        let file: File = toml::from_str(text).map_err(|e| Error::Placement(e.to_string()))?;
        if file.shards == 0 || file.shards > 4096 {
            return Err(Error::Placement("`shards` must be in 1..=4096".into()));
        }
        for (node, addr) in &file.nodes {
            if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                return Err(Error::Placement(format!("node `{node}`: `{addr}` is not host:port")));
            }
        }
        let mut shards: Vec<Option<ShardPlacement>> = vec![None; file.shards as usize];
        for (i, g) in file.replicas.iter().enumerate() {
            let at = |why: String| Error::Placement(format!("replicas[{i}]: {why}"));
            if g.epoch == 0 {
                return Err(at("`epoch` must be at least 1 (0 is a standalone shard)".into()));
            }
            let mut nodes = BTreeSet::new();
            for n in std::iter::once(&g.leader).chain(&g.followers) {
                if !file.nodes.contains_key(n) {
                    return Err(at(format!("node `{n}` is not in [nodes]")));
                }
                if !nodes.insert(n) {
                    return Err(at(format!("node `{n}` holds two replicas of the same shard")));
                }
            }
            for s in parse_shards(&g.shards, file.shards).map_err(at)? {
                let slot = &mut shards[s as usize];
                if slot.is_some() {
                    return Err(at(format!("shard {s} is placed twice")));
                }
                *slot = Some(ShardPlacement {
                    leader: g.leader.clone(),
                    followers: g.followers.clone(),
                    epoch: g.epoch,
                });
            }
        }
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(s, p)| p.ok_or_else(|| Error::Placement(format!("shard {s} is not placed"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Placement { shard_count: file.shards, nodes: file.nodes, shards })
    }

    /// The address of a node.
    pub fn address(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(String::as_str)
    }

    /// The role `node` has for `shard`, or `None` when it holds no replica of it.
    pub fn role_of(&self, node: &str, shard: u32) -> Option<Role> {
        let p = self.shards.get(shard as usize)?;
        if p.leader == node {
            Some(Role::Leader { epoch: p.epoch })
        } else if p.followers.iter().any(|f| f == node) {
            Some(Role::Follower { leader: self.address(&p.leader)?.to_owned(), epoch: p.epoch })
        } else {
            None
        }
    }
}

/// `"0-7,9"` → `[0, …, 7, 9]`, each below `count`.
fn parse_shards(spec: &str, count: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse =
            |v: &str| v.parse::<u32>().map_err(|_| format!("`{part}` is not a shard number or range"));
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi || hi >= count {
            return Err(format!("`{part}` is outside 0..{count}"));
        }
        out.extend(lo..=hi);
    }
    if out.is_empty() {
        return Err("`shards` names no shard".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_NODES: &str = r#"
        shards = 4
        [nodes]
        a = "127.0.0.1:7001"
        b = "127.0.0.1:7002"
        [[replicas]]
        shards = "0-1"
        leader = "a"
        followers = ["b"]
        epoch = 1
        [[replicas]]
        shards = "2,3"
        leader = "b"
        epoch = 4
    "#;

    #[test]
    fn roles_come_from_the_placement() {
        let p = Placement::parse(TWO_NODES).unwrap();
        assert_eq!(p.role_of("a", 0), Some(Role::Leader { epoch: 1 }));
        assert_eq!(p.role_of("b", 1), Some(Role::Follower { leader: "127.0.0.1:7001".into(), epoch: 1 }));
        assert_eq!(p.role_of("a", 3), None);
        assert_eq!(p.role_of("b", 3), Some(Role::Leader { epoch: 4 }));
        assert_eq!(p.role_of("c", 0), None);
    }

    #[test]
    fn bad_placements_say_what_is_wrong() {
        let bad = |text: &str, expect: &str| match Placement::parse(text) {
            Err(Error::Placement(why)) => assert!(why.contains(expect), "{why}"),
            other => panic!("{other:?}"),
        };
        bad(&TWO_NODES.replace("\"2,3\"", "\"2\""), "shard 3 is not placed");
        bad(&TWO_NODES.replace("\"2,3\"", "\"1-3\""), "shard 1 is placed twice");
        bad(&TWO_NODES.replace("\"2,3\"", "\"2-9\""), "outside 0..4");
        bad(&TWO_NODES.replace("epoch = 4", "epoch = 0"), "at least 1");
        bad(&TWO_NODES.replace("followers = [\"b\"]", "followers = [\"a\"]"), "two replicas");
        bad(&TWO_NODES.replace("followers = [\"b\"]", "followers = [\"z\"]"), "`z` is not in [nodes]");
        bad(&TWO_NODES.replace("\"0-1\"", "\"x\""), "not a shard number");
    }
}
