//! The replicas one node holds, how they come up (standalone, or from a placement and
//! what each replica remembers), and node-wide operations.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use feedgraph_graph_store::{Shard, ShardOptions, StoreMemory};
use tokio::sync::watch;

use crate::checkpoint::Checkpoints;
use crate::replica::{Replica, ReplicaSetup, ReplicaStatus, ShardPaths};
use crate::role::{Role, RoleState};
use crate::{Error, Placement, ReplicationConfig, Result, blocking};

/// Shard options by shard number (the node's configuration).
pub type StoreOptions = Arc<dyn Fn(u32) -> ShardOptions + Send + Sync>;

/// The replicas of one node.
pub struct Replicas {
    node_id: String,
    address: String,
    shard_count: u32,
    data_dir: PathBuf,
    cfg: Arc<ReplicationConfig>,
    options: StoreOptions,
    memory: StoreMemory,
    replicas: RwLock<BTreeMap<u32, Arc<Replica>>>,
    checkpoints: Arc<Checkpoints>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas").field("node", &self.node_id).field("shards", &self.shard_ids()).finish()
    }
}

/// What a node needs to bring its replicas up.
pub struct NodeSetup {
    pub node_id: String,
    /// The address other nodes reach this node at.
    pub address: String,
    pub shard_count: u32,
    pub data_dir: PathBuf,
    pub options: StoreOptions,
    pub memory: StoreMemory,
    pub replication: ReplicationConfig,
}

impl std::fmt::Debug for NodeSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSetup").field("node_id", &self.node_id).field("address", &self.address).finish()
    }
}

impl Replicas {
    fn new(setup: NodeSetup) -> Result<Self> {
        let cfg = Arc::new(setup.replication);
        let checkpoints = Checkpoints::new(
            setup.data_dir.join("checkpoints"),
            cfg.checkpoint_ttl,
            cfg.break_checkpoint_after_bytes,
        )?;
        Ok(Self {
            node_id: setup.node_id,
            address: setup.address,
            shard_count: setup.shard_count,
            data_dir: setup.data_dir,
            cfg,
            options: setup.options,
            memory: setup.memory,
            replicas: RwLock::new(BTreeMap::new()),
            checkpoints: Arc::new(checkpoints),
            shutdown: watch::Sender::new(false),
        })
    }

    /// A node without a placement: every shard given (opened as leaders) is a leader at
    /// the newest epoch of its history — 0 for a shard that never replicated — unless
    /// the replica remembers another role from an earlier transition. The shards in
    /// `unopened` (with why their stores failed to open) are held offline without
    /// data, so the node serves the others and reports them.
    pub async fn standalone(
        setup: NodeSetup,
        shards: Vec<Arc<Shard>>,
        unopened: Vec<(u32, String)>,
    ) -> Result<Arc<Replicas>> {
        let this = Arc::new(blocking(move || Replicas::new(setup)).await?);
        for (shard, reason) in unopened {
            let paths = ShardPaths::new(&this.data_dir, shard);
            this.add(shard, paths, None, Role::Offline, 0, Some(reason)).await?;
        }
        for store in shards {
            let shard = store.id();
            let paths = ShardPaths::new(&this.data_dir, shard);
            let state_path = paths.state.clone();
            let remembered = blocking(move || RoleState::load(&state_path)).await?;
            let (role, promised) = match remembered {
                Some(s) => (s.role, s.promised),
                None => {
                    let epoch = store.epoch_history().current();
                    (Role::Leader { epoch }, epoch)
                }
            };
            this.add(shard, paths, Some(store), role, promised, None).await?;
        }
        Ok(this)
    }

    /// A node of a placement: it holds the replicas the placement gives it (a replica
    /// that remembers a newer epoch than the placement keeps what it remembers). A
    /// leader without data starts an empty shard only if it never held the shard; a
    /// follower without data bootstraps from its leader. A leader placed at an epoch
    /// its data already holds from another leader is refused (two leaders of one
    /// epoch). Opens stores on the blocking pool.
    pub async fn placed(setup: NodeSetup, placement: &Placement) -> Result<Arc<Replicas>> {
        if placement.shard_count != setup.shard_count {
            return Err(Error::Placement(format!(
                "the placement has {} shards, the node {}",
                placement.shard_count, setup.shard_count
            )));
        }
        if placement.address(&setup.node_id).is_none() {
            return Err(Error::Placement(format!(
                "node `{}` is not in the placement's [nodes]",
                setup.node_id
            )));
        }
        let this = Arc::new(blocking(move || Replicas::new(setup)).await?);
        for shard in 0..this.shard_count {
            let placed = placement.role_of(&this.node_id, shard);
            let paths = ShardPaths::new(&this.data_dir, shard);
            let state_path = paths.state.clone();
            let remembered = blocking(move || RoleState::load(&state_path)).await?;
            let remembered_state = remembered.clone();
            let state = match (placed, remembered) {
                (None, None) => continue,
                (None, Some(s)) => s,
                (Some(p), Some(s)) if s.promised > p.epoch().unwrap_or(0) => {
                    tracing::info!(shard, remembered = %s.role, placement = %p, "the replica remembers a newer epoch than the placement; keeping it");
                    s
                }
                (Some(p), s) => {
                    let promised = p.epoch().unwrap_or(0).max(s.map_or(0, |s| s.promised));
                    RoleState { role: p, promised }
                }
            };
            let (p, opts) = (paths.clone(), (this.options)(shard));
            let (role, known_before) = (state.role.clone(), remembered_state.is_some());
            let opened = blocking(move || {
                p.recover()?;
                Ok(match (p.live.exists(), role) {
                    (true, Role::Leader { .. }) => Some(Arc::new(Shard::open(&p.live, &opts)?)),
                    // Only a new replica starts an empty shard. One that held the shard
                    // before and lost its data would lead an empty shard under a new
                    // lineage (its followers refuse it, but writes would go to it).
                    (false, Role::Leader { epoch }) if known_before => {
                        return Err(Error::Placement(format!(
                            "shard {shard}: placed as leader at epoch {epoch}, but its data is missing here ({} does not exist, {} does): lead from a replica that holds the data, at a higher epoch, or restore it",
                            p.live.display(),
                            p.state.display()
                        )));
                    }
                    (false, Role::Leader { .. }) => Some(Arc::new(Shard::open(&p.live, &opts)?)),
                    // A follower whose store does not open (a bad disk, corruption) is
                    // held without data, so it bootstraps from its leader.
                    (true, _) => match Shard::open_replica(&p.live, &opts) {
                        Ok(store) => Some(Arc::new(store)),
                        Err(e) if e.is_corruption() => return Ok((None, Some(e.to_string()))),
                        Err(e) => return Err(e.into()),
                    },
                    (false, _) => None,
                })
                .map(|store| (store, None))
            })
            .await?;
            let (store, open_fault): (Option<Arc<Shard>>, Option<String>) = opened;
            // A term is begun once: a replica whose data already holds the placed
            // epoch, and that did not lead it, would be a second leader of that epoch.
            if let (Role::Leader { epoch }, Some(store)) = (&state.role, &store)
                && *epoch > 0
                && store.epoch_history().current() == *epoch
                && remembered_state.as_ref().map(|s| &s.role) != Some(&state.role)
            {
                return Err(Error::Placement(format!(
                    "shard {shard}: placed as leader at epoch {epoch}, but this replica's data already holds epoch {epoch} of another leader's term; a new leader needs a higher epoch"
                )));
            }
            if remembered_state.as_ref() != Some(&state) {
                let (s, path) = (state.clone(), paths.state.clone());
                blocking(move || s.store(&path)).await?;
            }
            this.add(shard, paths, store, state.role, state.promised, open_fault).await.map_err(|e| match e {
                Error::StaleEpoch { given, current, .. } => Error::Placement(format!(
                    "shard {shard}: the placement says epoch {given} but the data is already at epoch {current}; raise the epoch"
                )),
                other => other,
            })?;
        }
        Ok(this)
    }

    /// A node of a managed cluster: it holds what it remembers, and the controller
    /// tells it the rest. A remembered leader comes back offline (with its data and
    /// its promise): while it was down another replica may have been made leader, and
    /// only the controller knows; it re-promotes under a new epoch if not. A follower
    /// resumes following (its leader's epoch fences it).
    pub async fn remembered(setup: NodeSetup) -> Result<Arc<Replicas>> {
        let this = Arc::new(blocking(move || Replicas::new(setup)).await?);
        for shard in 0..this.shard_count {
            let paths = ShardPaths::new(&this.data_dir, shard);
            let (p, opts) = (paths.clone(), (this.options)(shard));
            let opened = blocking(move || {
                // A store that does not open (a bad disk, corruption) is held without
                // data: the controller makes it a follower, which bootstraps.
                let (store, open_fault) = match p.open_existing(&opts) {
                    Ok(store) => (store, None),
                    Err(Error::Store(e)) if e.is_corruption() => (None, Some(e.to_string())),
                    Err(e) => return Err(e),
                };
                let remembered = RoleState::load(&p.state)?;
                if remembered.is_none() && store.is_none() && open_fault.is_none() {
                    return Ok(None);
                }
                Ok(Some((remembered, store, open_fault)))
            })
            .await?;
            let Some((remembered, store, open_fault)) = opened else { continue };
            let state = match &remembered {
                Some(RoleState { role: Role::Leader { .. }, promised }) => {
                    RoleState { role: Role::Offline, promised: *promised }
                }
                Some(s) => s.clone(),
                None => RoleState { role: Role::Offline, promised: 0 },
            };
            if remembered.as_ref() != Some(&state) {
                let (s, path) = (state.clone(), paths.state.clone());
                blocking(move || s.store(&path)).await?;
            }
            if let Some(reason) = &open_fault {
                tracing::error!(shard, error = %reason, "the replica's store did not open; holding it without data");
            }
            this.add(shard, paths, store, state.role, state.promised, open_fault).await?;
        }
        Ok(this)
    }

    async fn add(
        &self,
        shard: u32,
        paths: ShardPaths,
        store: Option<Arc<Shard>>,
        role: Role,
        promised: u64,
        open_fault: Option<String>,
    ) -> Result<Arc<Replica>> {
        let setup = ReplicaSetup {
            shard,
            node_id: self.node_id.clone(),
            paths,
            opts: (self.options)(shard),
            cfg: self.cfg.clone(),
            shutdown: self.shutdown.subscribe(),
            open_fault,
        };
        let replica = Replica::start(setup, store, role, promised).await?;
        self.replicas.write().unwrap_or_else(|e| e.into_inner()).insert(shard, replica.clone());
        Ok(replica)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn memory(&self) -> &StoreMemory {
        &self.memory
    }

    pub(crate) fn checkpoints(&self) -> &Arc<Checkpoints> {
        &self.checkpoints
    }

    pub fn get(&self, shard: u32) -> Option<Arc<Replica>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner()).get(&shard).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn shard_ids(&self) -> Vec<u32> {
        self.replicas.read().unwrap_or_else(|e| e.into_inner()).keys().copied().collect()
    }

    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.all().iter().map(|r| r.status()).collect()
    }

    /// Moves the node's replica of `shard` to `target`; a node without one takes one
    /// (with the data it may still have on disk, else none: a follower bootstraps).
    pub async fn transition(&self, shard: u32, target: Role) -> Result<ReplicaStatus> {
        self.transition_with(shard, target, false).await
    }

    /// [`Replicas::transition`]; with `create_empty`, a leader of a new shard that this
    /// node never held starts it empty. A replica that held the shard (it accepted an
    /// epoch) and lost its data still refuses: it would lead an empty shard under a
    /// new lineage.
    pub async fn transition_with(
        &self,
        shard: u32,
        target: Role,
        create_empty: bool,
    ) -> Result<ReplicaStatus> {
        if shard >= self.shard_count {
            return Err(Error::NoReplica { shard });
        }
        let replica = match self.get(shard) {
            Some(r) => r,
            None => {
                let paths = ShardPaths::new(&self.data_dir, shard);
                let (p, opts) = (paths.clone(), (self.options)(shard));
                let store = blocking(move || p.open_existing(&opts)).await?;
                self.add(shard, paths, store, Role::Offline, 0, None).await?
            }
        };
        if create_empty
            && matches!(target, Role::Leader { .. })
            && replica.store().is_none()
            && replica.role_state().promised == 0
        {
            let (live, opts) = (replica.paths.live.clone(), (self.options)(shard));
            let store = blocking(move || {
                if live.exists() {
                    return Err(Error::Placement(format!("shard {shard}: {} appeared", live.display())));
                }
                Ok(Arc::new(Shard::open(&live, &opts)?))
            })
            .await?;
            replica.put_store(store);
            tracing::info!(shard, "new shard started empty");
        }
        replica.transition(target).await
    }

    /// Fences every leader of this node at once: the node lost its cluster lease, and
    /// another node may be made leader of its shards when the lease expires.
    pub fn fence_leaders(&self) {
        for r in self.all() {
            r.fence_now();
        }
    }

    /// Stops every follower loop and long poll (the node is stopping).
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        for r in self.all() {
            r.stop().await;
        }
    }

    /// No work outside the registry holds a store.
    pub fn idle(&self) -> bool {
        self.all().iter().all(|r| r.idle())
    }

    /// Where `CreateCheckpoint` writes: `<data_dir>/backups`.
    pub(crate) fn backups_dir(&self) -> PathBuf {
        self.data_dir.join("backups")
    }

    pub(crate) fn config(&self) -> &ReplicationConfig {
        &self.cfg
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}
