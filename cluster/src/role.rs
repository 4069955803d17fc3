//! Replica roles, and the small file in which a replica remembers its role and the
//! newest epoch it accepted (Raft's `currentTerm`): a replica never goes back to an
//! older epoch, also across restarts.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What a replica of a shard does on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds data (or not) but serves nothing and replicates nothing.
    Offline,
    /// Applies its leader's log; serves reads.
    Follower { leader: String, epoch: u64 },
    /// Takes writes at its epoch; serves reads and its log.
    Leader { epoch: u64 },
}

impl Role {
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Role::Offline => None,
            Role::Follower { epoch, .. } | Role::Leader { epoch } => Some(*epoch),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Role::Offline => "offline",
            Role::Follower { .. } => "follower",
            Role::Leader { .. } => "leader",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Offline => f.write_str("offline"),
            Role::Follower { leader, epoch } => write!(f, "follower of {leader} at epoch {epoch}"),
            Role::Leader { epoch } => write!(f, "leader at epoch {epoch}"),
        }
    }
}

/// A role and the newest epoch ever accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RoleState {
    pub(crate) role: Role,
    pub(crate) promised: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    leader: Option<String>,
    epoch: u64,
    promised: u64,
}

impl RoleState {
    /// Reads a state file; `None` when there is none.
    pub(crate) fn load(path: &Path) -> Result<Option<RoleState>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let bad = |why: String| Error::Placement(format!("{}: {why}", path.display()));
        let f: StateFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let role = match (f.role.as_str(), f.leader) {
            ("offline", _) => Role::Offline,
            ("leader", _) => Role::Leader { epoch: f.epoch },
            ("follower", Some(leader)) => Role::Follower { leader, epoch: f.epoch },
            (other, _) => {
                return Err(bad(format!("unknown role `{other}` (or a follower without a leader)")));
            }
        };
        Ok(Some(RoleState { role, promised: f.promised.max(f.epoch) }))
    }

    /// Writes the state durably: a temporary file, fsynced, renamed over the old one.
    pub(crate) fn store(&self, path: &Path) -> Result<(), Error> {
        let (leader, epoch) = match &self.role {
            Role::Offline => (None, self.promised),
            Role::Follower { leader, epoch } => (Some(leader.clone()), *epoch),
            Role::Leader { epoch } => (None, *epoch),
        };
        let file = StateFile { role: self.role.name().into(), leader, epoch, promised: self.promised };
        let text = toml::to_string(&file).map_err(|e| Error::Placement(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let tmp = path.with_extension("tmp");
        let io = |what: &str| {
            let what = format!("{what} {}", tmp.display());
            move |e| Error::io(what, e)
        };
        let mut f = std::fs::File::create(&tmp).map_err(io("creating"))?;
        f.write_all(text.as_bytes()).map_err(io("writing"))?;
        f.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming"))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_keeps_the_promise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replicas/shard-003.toml");
        assert_eq!(RoleState::load(&path).unwrap(), None);
        for state in [
            RoleState { role: Role::Follower { leader: "10.0.0.1:7000".into(), epoch: 3 }, promised: 3 },
            RoleState { role: Role::Leader { epoch: 4 }, promised: 4 },
            RoleState { role: Role::Offline, promised: 9 },
        ] {
            state.store(&path).unwrap();
            assert_eq!(RoleState::load(&path).unwrap(), Some(state));
        }
    }
}
