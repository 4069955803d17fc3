//! One replica of a shard on this node: its store, its role and epoch (persisted), the
//! leader's replication state, the follower task, and what it is doing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use feedgraph_graph_store::{Shard, ShardOptions, WriteOutcome};
use feedgraph_model::{Ack, Mutation};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::checkpoint::Manifest;
use crate::leader::LeaderState;
use crate::role::{Role, RoleState};
use crate::{Error, ReadAfter, ReplicationConfig, Result, blocking};

/// How long a checkpoint install waits for reads of the data it replaces.
const INSTALL_READERS_WAIT: Duration = Duration::from_secs(30);

/// Where a replica keeps its files, under the node's data directory.
#[derive(Clone, Debug)]
pub(crate) struct ShardPaths {
    /// The live RocksDB directory (`shard-NNN`).
    pub(crate) live: PathBuf,
    /// The previous live directory while a checkpoint is swapped in.
    pub(crate) old: PathBuf,
    /// Where a checkpoint is downloaded.
    pub(crate) staging: PathBuf,
    /// The persisted role.
    pub(crate) state: PathBuf,
    /// Present while the data diverged from its leader's and awaits a rebuild: such a
    /// replica serves no reads and cannot lead, also after a restart.
    pub(crate) rebuild: PathBuf,
}

impl ShardPaths {
    pub(crate) fn new(data_dir: &Path, shard: u32) -> Self {
        let name = format!("shard-{shard:03}");
        Self {
            live: data_dir.join(&name),
            old: data_dir.join(format!("{name}.old")),
            staging: data_dir.join("staging").join(&name),
            state: data_dir.join("replicas").join(format!("{name}.toml")),
            rebuild: data_dir.join("replicas").join(format!("{name}.rebuild")),
        }
    }

    /// The shard's data, if it has any: [`Self::recover`]ed, then opened as a replica.
    /// Blocking.
    pub(crate) fn open_existing(&self, opts: &ShardOptions) -> Result<Option<Arc<Shard>>> {
        self.recover()?;
        Ok(if self.live.exists() { Some(Arc::new(Shard::open_replica(&self.live, opts)?)) } else { None })
    }

    /// Finishes or undoes a checkpoint swap a crash interrupted, and drops partial
    /// downloads. Blocking.
    pub(crate) fn recover(&self) -> Result<()> {
        let io = |what: String| move |e| Error::io(what, e);
        match (self.live.exists(), self.old.exists()) {
            (false, true) => std::fs::rename(&self.old, &self.live)
                .map_err(io(format!("restoring {}", self.old.display())))?,
            (true, true) => {
                std::fs::remove_dir_all(&self.old).map_err(io(format!("removing {}", self.old.display())))?
            }
            _ => {}
        }
        if self.staging.exists() {
            std::fs::remove_dir_all(&self.staging)
                .map_err(io(format!("removing {}", self.staging.display())))?;
        }
        Ok(())
    }
}

/// Counters and gauges of a replica, read by `status()`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) leader_sequence: AtomicU64,
    pub(crate) lag_ms: AtomicU64,
    pub(crate) applied_bytes: AtomicU64,
    pub(crate) wal_gaps: AtomicU64,
    pub(crate) rebuilds: AtomicU64,
    pub(crate) stale_refusals: AtomicU64,
    pub(crate) checkpoint_resumes: AtomicU64,
    pub(crate) semi_sync_timeouts: AtomicU64,
    rate: Mutex<RateWindow>,
    state: Mutex<String>,
}

/// Bytes applied per second, over windows of about a second.
#[derive(Debug)]
struct RateWindow {
    start: Instant,
    bytes: u64,
    last_rate: f64,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self { start: Instant::now(), bytes: 0, last_rate: 0.0 }
    }
}

impl Stats {
    pub(crate) fn applied(&self, bytes: u64) {
        self.applied_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut w = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        w.bytes += bytes;
        let elapsed = w.start.elapsed();
        if elapsed >= Duration::from_secs(1) {
            w.last_rate = w.bytes as f64 / elapsed.as_secs_f64();
            w.start = Instant::now();
            w.bytes = 0;
        }
    }

    fn rate(&self) -> f64 {
        let w = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        // A window that has been open for long saw little: report what it saw.
        let elapsed = w.start.elapsed();
        if elapsed >= Duration::from_secs(2) { w.bytes as f64 / elapsed.as_secs_f64() } else { w.last_rate }
    }

    pub(crate) fn set_state(&self, state: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state.into();
    }

    pub(crate) fn state(&self) -> String {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A replica's status, as `ListReplicas` and metrics report it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaStatus {
    pub shard: u32,
    pub role: Role,
    /// The newest epoch the replica accepted.
    pub epoch: u64,
    pub applied_sequence: u64,
    pub pins: u64,
    /// Follower: the leader's latest sequence as last seen.
    pub leader_sequence: u64,
    pub lag_sequences: u64,
    /// Follower: how long ago the newest applied batch was committed on the leader.
    pub lag_ms: u64,
    pub applied_bytes_per_sec: f64,
    pub applied_bytes_total: u64,
    pub readable: bool,
    pub state: String,
    /// Leader: followers heard from recently (node, applied sequence, time since).
    pub followers: Vec<(String, u64, Duration)>,
    pub wal_gaps: u64,
    pub rebuilds: u64,
    pub stale_epoch_refusals: u64,
    pub checkpoint_resumes: u64,
    pub semi_sync_timeouts: u64,
    /// The epoch that wrote `applied_sequence`.
    pub log_epoch: u64,
    /// A leader that takes no more writes ([`Replica::fence`]).
    pub fenced: bool,
    pub has_data: bool,
    pub diverged: bool,
    /// Why the store stopped taking writes (no space, an I/O error, corruption), if it
    /// did: it still serves reads.
    pub fault: Option<String>,
}

impl ReplicaStatus {
    /// Data that may lead: present and not diverged from its leader's.
    pub fn has_sound_data(&self) -> bool {
        self.has_data && !self.diverged
    }

    /// Serving reads with sound data: a member that counts towards `R`, or a
    /// hand-over target.
    pub fn is_ready(&self) -> bool {
        self.readable && self.has_sound_data() && self.fault.is_none()
    }
}

/// Where and how a replica lives (everything but its data and role).
pub(crate) struct ReplicaSetup {
    pub(crate) shard: u32,
    pub(crate) node_id: String,
    pub(crate) paths: ShardPaths,
    pub(crate) opts: ShardOptions,
    pub(crate) cfg: Arc<ReplicationConfig>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Why the store did not open at start, if it did not.
    pub(crate) open_fault: Option<String>,
}

struct FollowerTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// One replica of a shard on this node.
pub struct Replica {
    shard: u32,
    node_id: String,
    pub(crate) paths: ShardPaths,
    pub(crate) opts: ShardOptions,
    pub(crate) cfg: Arc<ReplicationConfig>,
    /// `None` while the replica has no data (a new follower) or a checkpoint is being
    /// swapped in.
    store: RwLock<Option<Arc<Shard>>>,
    role: Mutex<RoleState>,
    /// Serializes transitions.
    transitions: tokio::sync::Mutex<()>,
    pub(crate) leader: Arc<LeaderState>,
    follower: Mutex<Option<FollowerTask>>,
    pub(crate) stats: Stats,
    /// The data holds writes its leader never had: no reads until it is rebuilt.
    diverged: AtomicBool,
    /// A leader that takes no more writes (its node lost its lease, or a hand-over is
    /// under way) but still serves its log. Cleared by the next transition.
    fenced: AtomicBool,
    /// Fences so far: a transition clears `fenced` only if none came while it ran.
    fences: AtomicU64,
    /// Why the store could not be opened at start (corruption, an I/O error): the
    /// replica stays offline without data until the node is restarted on a sound copy.
    open_fault: Mutex<Option<String>>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("shard", &self.shard).field("role", &self.role()).finish()
    }
}

impl Replica {
    /// A replica with `store` (if it has data) in `role`; `promised` is the newest
    /// epoch it accepted before. A leader role starts (or resumes) its epoch on the
    /// store; a follower role starts replicating. Call on a runtime.
    pub(crate) async fn start(
        setup: ReplicaSetup,
        store: Option<Arc<Shard>>,
        role: Role,
        promised: u64,
    ) -> Result<Arc<Replica>> {
        let ReplicaSetup { shard, node_id, paths, opts, cfg, shutdown, open_fault } = setup;
        let latest = store.as_ref().map_or(0, |s| s.latest_sequence());
        let marker = paths.rebuild.clone();
        let diverged = blocking(move || Ok(marker.exists())).await?;
        if diverged && matches!(role, Role::Leader { .. }) {
            return Err(Error::Placement(format!(
                "shard {shard}: this replica's data diverged from its last leader's and awaits a rebuild ({} exists); it cannot lead",
                paths.rebuild.display()
            )));
        }
        let replica = Arc::new(Replica {
            shard,
            node_id,
            paths,
            opts,
            cfg,
            store: RwLock::new(None),
            role: Mutex::new(RoleState {
                role: Role::Offline,
                promised: promised.max(role.epoch().unwrap_or(0)),
            }),
            transitions: tokio::sync::Mutex::new(()),
            leader: Arc::new(LeaderState::new(latest)),
            follower: Mutex::new(None),
            stats: Stats::default(),
            diverged: AtomicBool::new(diverged),
            fenced: AtomicBool::new(false),
            fences: AtomicU64::new(0),
            open_fault: Mutex::new(None),
            shutdown,
        });
        if let Some(store) = store {
            replica.put_store(store);
        }
        let fence_role = role.clone();
        match &role {
            Role::Leader { epoch } => {
                let store = replica.store().ok_or(Error::NoData { shard })?;
                let epoch = *epoch;
                blocking(move || store.lead(epoch).map_err(Error::from))
                    .await
                    .map_err(|e| replica.epoch_error(e))?;
                replica.stats.set_state("serving");
            }
            Role::Follower { .. } | Role::Offline => {
                if let Some(store) = replica.store() {
                    blocking(move || {
                        store.follow();
                        Ok(())
                    })
                    .await?;
                }
                replica.stats.set_state(if role == Role::Offline { "offline" } else { "starting" });
            }
        }
        // Before the follower starts: its bootstrap installs data, which ends the fault.
        if let Some(reason) = open_fault {
            replica.set_open_fault(reason);
        }
        replica.role.lock().unwrap_or_else(|e| e.into_inner()).role = fence_role;
        if let Role::Follower { leader, epoch } = role {
            replica.start_follower(leader, epoch);
        }
        Ok(replica)
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The store, when the replica has data.
    pub fn store(&self) -> Option<Arc<Shard>> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn put_store(&self, store: Arc<Shard>) {
        // New data (a checkpoint installed over a store that did not open) ends the
        // open fault.
        *self.open_fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let leader = self.leader.clone();
        store.set_commit_listener(Some(Arc::new(move |seq| leader.on_commit(seq))));
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    pub fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|e| e.into_inner()).role.clone()
    }

    pub(crate) fn role_state(&self) -> RoleState {
        self.role.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The store's latest sequence after every commit (a leader's writes, a follower's
    /// applied batches): for waiting on replication without polling.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.leader.subscribe()
    }

    /// A store error about epochs or fences, as this replica's typed error.
    pub(crate) fn epoch_error(&self, e: Error) -> Error {
        use feedgraph_graph_store::Error as S;
        match e {
            Error::Store(S::StaleEpoch { given, current }) => {
                Error::StaleEpoch { shard: self.shard, given, current }
            }
            Error::Store(S::ReadOnlyReplica) => self.not_leader(),
            other => other,
        }
    }

    pub(crate) fn not_leader(&self) -> Error {
        let state = self.role_state();
        let leader = match state.role {
            Role::Follower { leader, .. } => Some(leader),
            _ => None,
        };
        Error::NotLeader { shard: self.shard, leader, epoch: state.promised }
    }

    // ------------------------------------------------------------------ writes

    /// A write for this shard by a writer that believes `epoch` is the leader's. With
    /// `SEMI_SYNC` it returns once a follower has applied it (or
    /// [`Error::NotConfirmed`]: committed here, not confirmed there).
    pub async fn write(&self, mutations: Vec<Mutation>, ack: Ack, epoch: u64) -> Result<WriteOutcome> {
        let current = match self.role() {
            Role::Leader { epoch } => epoch,
            _ => return Err(self.not_leader()),
        };
        if epoch != current {
            return Err(Error::StaleEpoch { shard: self.shard, given: epoch, current });
        }
        if self.is_fenced() {
            return Err(Error::NotLeader { shard: self.shard, leader: None, epoch: current });
        }
        if ack == Ack::SemiSync && current == 0 {
            return Err(Error::Standalone { shard: self.shard });
        }
        let store = self.store().ok_or(Error::NoData { shard: self.shard })?;
        let durability = ack.local_durability();
        let outcome = blocking(move || store.write_at(epoch, &mutations, durability).map_err(Error::from))
            .await
            .map_err(|e| self.epoch_error(e))?;
        if ack == Ack::SemiSync && !self.leader.wait_acked(outcome.sequence, self.cfg.semi_sync_timeout).await
        {
            self.stats.semi_sync_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(Error::NotConfirmed {
                shard: self.shard,
                epoch,
                sequence: outcome.sequence,
                waited: self.cfg.semi_sync_timeout,
            });
        }
        // Fenced while this write was in flight: whoever takes over was chosen from
        // what followers had applied when the fence went up, so this write may not be
        // there. It is not acknowledged.
        if self.is_fenced() {
            return Err(Error::NotConfirmed {
                shard: self.shard,
                epoch,
                sequence: outcome.sequence,
                waited: Duration::ZERO,
            });
        }
        Ok(outcome)
    }

    /// Stops this leader taking writes at `epoch` while it keeps serving its log (a
    /// hand-over: its follower catches up, then is promoted). The next transition
    /// lifts it.
    pub async fn fence(&self, epoch: u64) -> Result<ReplicaStatus> {
        let _serial = self.transitions.lock().await;
        match self.role() {
            Role::Leader { epoch: current } if current == epoch => {
                self.fence_now();
                // Writes that passed the check before the fence finish under the
                // writer lock; after it the applied sequence is final.
                if let Some(store) = self.store() {
                    blocking(move || Ok(store.log_position())).await?;
                }
                Ok(self.status())
            }
            Role::Leader { epoch: current } => {
                Err(Error::StaleEpoch { shard: self.shard, given: epoch, current })
            }
            _ => Err(self.not_leader()),
        }
    }

    /// Fences a leader at once (its node lost its cluster lease); no-op otherwise. A
    /// transition under way is fenced too: it may be making this replica a leader, and
    /// the fence must outlive it (see `fences`).
    pub fn fence_now(&self) {
        let transitioning = self.transitions.try_lock().is_err();
        if !matches!(self.role(), Role::Leader { .. }) && !transitioning {
            return;
        }
        self.fences.fetch_add(1, Ordering::AcqRel);
        if !self.fenced.swap(true, Ordering::AcqRel) {
            self.stats.set_state("fenced");
            tracing::warn!(shard = self.shard, "leader fenced: no more writes at this epoch");
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    // ------------------------------------------------------------------ reads

    /// The store to read from, when this replica serves reads and has applied what
    /// `after` asks.
    pub fn readable(&self, after: ReadAfter) -> Result<Arc<Shard>> {
        if matches!(self.role.lock().unwrap_or_else(|e| e.into_inner()).role, Role::Offline) {
            return Err(Error::Unreadable { shard: self.shard, state: "offline".into() });
        }
        if self.diverged.load(Ordering::Acquire) {
            return Err(Error::Unreadable { shard: self.shard, state: "rebuilding".into() });
        }
        let store = self
            .store()
            .ok_or_else(|| Error::Unreadable { shard: self.shard, state: "no data yet".into() })?;
        if after.sequence > 0 {
            let epoch = store.epoch_history().current();
            if epoch < after.epoch || (epoch == after.epoch && store.latest_sequence() < after.sequence) {
                return Err(Error::Behind { shard: self.shard });
            }
        }
        Ok(store)
    }

    // ------------------------------------------------------------------ transitions

    /// Moves the replica to `target`. An epoch older than one it accepted is refused.
    /// The new role and epoch are persisted before they take effect.
    pub async fn transition(self: &Arc<Self>, target: Role) -> Result<ReplicaStatus> {
        let _serial = self.transitions.lock().await;
        let fences_before = self.fences.load(Ordering::Acquire);
        let current = self.role_state();
        if let Some(e) = target.epoch()
            && e < current.promised
        {
            return Err(Error::StaleEpoch { shard: self.shard, given: e, current: current.promised });
        }
        if current.role == target && !self.is_fenced() {
            return Ok(self.status());
        }
        if let Role::Leader { epoch } = target
            && epoch <= current.promised
        {
            return Err(Error::EpochNotNewer { shard: self.shard, given: epoch, promised: current.promised });
        }
        if matches!(target, Role::Leader { .. })
            && (self.store().is_none() || self.diverged.load(Ordering::Acquire))
        {
            return Err(Error::NoData { shard: self.shard });
        }
        let promised = current.promised.max(target.epoch().unwrap_or(0));
        let next = RoleState { role: target.clone(), promised };
        let path = self.paths.state.clone();
        let persisted = next.clone();
        blocking(move || persisted.store(&path)).await?;
        self.role.lock().unwrap_or_else(|e| e.into_inner()).promised = promised;

        self.stop_follower().await;
        // While the change is made the replica is offline: no writes are accepted.
        self.role.lock().unwrap_or_else(|e| e.into_inner()).role = Role::Offline;
        let result = match &target {
            Role::Leader { epoch } => {
                let store = self.store().ok_or(Error::NoData { shard: self.shard })?;
                let epoch = *epoch;
                let led = blocking(move || store.lead(epoch).map_err(Error::from)).await;
                led.map(|()| {
                    self.leader.new_term();
                    self.stats.set_state("serving");
                })
            }
            Role::Follower { .. } | Role::Offline => {
                if let Some(store) = self.store() {
                    blocking(move || {
                        store.follow();
                        Ok(())
                    })
                    .await?;
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            // The store refused (an epoch older than its history): stay offline, and
            // come back offline after a restart, not in the role that failed.
            self.stats.set_state("offline (transition failed)");
            let (offline, path) = (RoleState { role: Role::Offline, promised }, self.paths.state.clone());
            if let Err(persist) = blocking(move || offline.store(&path)).await {
                tracing::error!(shard = self.shard, error = %persist, "could not record the failed transition");
            }
            return Err(self.epoch_error(e));
        }
        self.role.lock().unwrap_or_else(|e| e.into_inner()).role = target.clone();
        // A new role lifts an earlier fence, not one that came during this transition.
        if self.fences.load(Ordering::Acquire) == fences_before {
            self.fenced.store(false, Ordering::Release);
        }
        match target {
            Role::Follower { leader, epoch } => self.start_follower(leader, epoch),
            Role::Offline => self.stats.set_state("offline"),
            Role::Leader { .. } => {}
        }
        tracing::info!(shard = self.shard, role = %self.role(), "replica transitioned");
        Ok(self.status())
    }

    /// A follower adopts a newer epoch its leader reports (a newer epoch is never
    /// stale; the leader of it is the leader this replica was told to follow).
    pub(crate) fn adopt_epoch(&self, leader: &str, epoch: u64) -> Result<bool> {
        let mut state = self.role.lock().unwrap_or_else(|e| e.into_inner());
        match &state.role {
            Role::Follower { leader: l, epoch: e } if l == leader && *e < epoch => {
                let next =
                    RoleState { role: Role::Follower { leader: leader.to_owned(), epoch }, promised: epoch };
                next.store(&self.paths.state)?;
                *state = next;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn start_follower(self: &Arc<Self>, leader: String, epoch: u64) {
        let (stop, stopped) = watch::channel(false);
        let handle = tokio::spawn(crate::follower::run(self.clone(), leader, epoch, stopped));
        if let Some(old) =
            self.follower.lock().unwrap_or_else(|e| e.into_inner()).replace(FollowerTask { stop, handle })
        {
            old.handle.abort();
        }
    }

    /// Stops the follower task and waits for it: a long poll or a download stops at
    /// once, an apply finishes its batch, and a checkpoint install finishes its swap
    /// (it waits up to [`INSTALL_READERS_WAIT`] for reads of the old data), so the
    /// transition that follows never races an install.
    pub(crate) async fn stop_follower(&self) {
        let task = self.follower.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.stop.send(true);
            let abort = task.handle.abort_handle();
            let bound = INSTALL_READERS_WAIT + self.cfg.poll_wait + Duration::from_secs(30);
            if tokio::time::timeout(bound, task.handle).await.is_err() {
                tracing::error!(shard = self.shard, "the follower task did not stop; aborting it");
                abort.abort();
            }
        }
    }

    pub(crate) fn is_diverged(&self) -> bool {
        self.diverged.load(Ordering::Acquire)
    }

    /// Records that the data diverged from the leader's (or, after a rebuild, no
    /// longer does), durably: a restart keeps the replica out of reads and leadership
    /// until it is rebuilt. Blocking.
    pub(crate) fn mark_diverged(&self, diverged: bool) -> Result<()> {
        self.diverged.store(diverged, Ordering::Release);
        let path = &self.paths.rebuild;
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |e| Error::io(what, e)
        };
        if diverged {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
            }
            std::fs::File::create(path).and_then(|f| f.sync_all()).map_err(io("creating"))?;
        } else if path.exists() {
            std::fs::remove_file(path).map_err(io("removing"))?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ rebuild

    /// Swaps a downloaded, verified checkpoint in for the current data: readers are
    /// turned away while the old store is closed (waiting, bounded, for reads in
    /// flight), the directories are swapped, and the checkpoint opens as a replica at
    /// exactly its sequence. Blocking.
    pub(crate) fn install(&self, manifest: &Manifest) -> Result<()> {
        let old = self.store.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(old) = old {
            let deadline = Instant::now() + INSTALL_READERS_WAIT;
            while Arc::strong_count(&old) > 1 {
                if Instant::now() > deadline {
                    self.put_store(old);
                    return Err(Error::Checkpoint(format!(
                        "reads of the old data did not finish in {INSTALL_READERS_WAIT:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            old.set_commit_listener(None);
            drop(old);
        }
        let p = &self.paths;
        let io = |what: String| move |e| Error::io(what, e);
        if p.live.exists() {
            std::fs::rename(&p.live, &p.old).map_err(io(format!("moving {} aside", p.live.display())))?;
        }
        std::fs::rename(&p.staging, &p.live).map_err(io(format!("installing {}", p.live.display())))?;
        if let Some(parent) = p.live.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        if p.old.exists() {
            std::fs::remove_dir_all(&p.old).map_err(io(format!("removing {}", p.old.display())))?;
        }
        let store = Shard::open_replica(&p.live, &self.opts)?;
        if store.latest_sequence() != manifest.sequence {
            return Err(Error::Checkpoint(format!(
                "the installed checkpoint is at sequence {}, its manifest says {}",
                store.latest_sequence(),
                manifest.sequence
            )));
        }
        self.put_store(Arc::new(store));
        // Counted before the replica turns readable: whoever sees it rebuilt sees the
        // count too.
        self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.mark_diverged(false)
    }

    // ------------------------------------------------------------------ status

    pub fn status(&self) -> ReplicaStatus {
        let state = self.role_state();
        let store = self.store();
        let applied = store.as_ref().map_or(0, |s| s.latest_sequence());
        let leader_sequence = match state.role {
            Role::Leader { .. } => applied,
            _ => self.stats.leader_sequence.load(Ordering::Relaxed),
        };
        let follower = matches!(state.role, Role::Follower { .. });
        ReplicaStatus {
            shard: self.shard,
            role: state.role.clone(),
            epoch: state.promised,
            applied_sequence: applied,
            pins: store.as_ref().map_or(0, |s| u64::from(s.next_ordinal())),
            leader_sequence,
            lag_sequences: if follower { leader_sequence.saturating_sub(applied) } else { 0 },
            lag_ms: if follower { self.stats.lag_ms.load(Ordering::Relaxed) } else { 0 },
            applied_bytes_per_sec: self.stats.rate(),
            applied_bytes_total: self.stats.applied_bytes.load(Ordering::Relaxed),
            readable: self.readable(ReadAfter::default()).is_ok(),
            state: self.stats.state(),
            followers: if matches!(state.role, Role::Leader { .. }) {
                self.leader.followers()
            } else {
                Vec::new()
            },
            wal_gaps: self.stats.wal_gaps.load(Ordering::Relaxed),
            rebuilds: self.stats.rebuilds.load(Ordering::Relaxed),
            stale_epoch_refusals: self.stats.stale_refusals.load(Ordering::Relaxed),
            checkpoint_resumes: self.stats.checkpoint_resumes.load(Ordering::Relaxed),
            semi_sync_timeouts: self.stats.semi_sync_timeouts.load(Ordering::Relaxed),
            log_epoch: store.as_ref().map_or(0, |s| s.epoch_history().epoch_at(applied)),
            fenced: self.is_fenced(),
            has_data: store.is_some(),
            diverged: self.is_diverged(),
            fault: store
                .as_ref()
                .and_then(|s| s.fault())
                .or_else(|| self.open_fault.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        }
    }

    /// Records that the store failed to open: the replica stays offline, and says why.
    pub(crate) fn set_open_fault(&self, reason: String) {
        self.stats.set_state(format!("offline: the store did not open: {reason}"));
        *self.open_fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// No work outside this replica holds its store (a restart can reopen it).
    pub fn idle(&self) -> bool {
        self.store().is_none_or(|s| Arc::strong_count(&s) <= 2)
    }

    /// Stops replicating (the node is stopping).
    pub(crate) async fn stop(&self) {
        self.stop_follower().await;
        if let Some(store) = self.store() {
            store.set_commit_listener(None);
        }
    }
}
