//! The controller: one per cluster (elected through etcd), it drives every shard's
//! replicas toward the assignment it keeps in etcd.
//!
//! Each round reads the cluster state (one range read) and every live node's replica
//! reports (`ListReplicas`), then per shard, in order: place a new shard; fail over a
//! leader that died, lost its lease or left its role (the live replica with the
//! longest log — newest log epoch, then highest applied sequence — under a fresh
//! epoch); hand a draining leader's shard over (fence it, let the best follower catch
//! up, promote it); repoint followers; turn strays offline; add a replica where a
//! shard has fewer than `R` counted members; remove one that is dead past
//! `replace_after`, draining, or surplus, once every other member is caught up. When
//! no shard needed anything, one balancing move: leadership, then replicas.
//!
//! The assignment is written before the transitions it implies, with a transaction
//! that only succeeds while this controller still holds the election key, so a
//! deposed controller changes nothing in etcd; a successor finishes what a dead one
//! began by reading the map and the reports. Epochs are etcd revisions (of a put to
//! the epoch key): unique and increasing across controllers, and the fencing token
//! every replica checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use feedgraph_proto::auth::{AuthChannel as Channel, Credentials};
use feedgraph_proto::pb::internal as ipb;

use super::view::{Assignment, ClusterSpec, ClusterView, Keys};
use crate::service::{list_replicas, transition_request};
use crate::{Error, ReplicaStatus, Result, Role};

/// How the controller paces itself.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// A follower whose node is gone this long is replaced on another node (a node
    /// back sooner catches up from the log instead of copying a checkpoint).
    pub replace_after: Duration,
    /// Followers bootstrapping at once per node (a checkpoint copy is heavy).
    pub max_bootstraps_per_node: usize,
    /// Rounds run at least this often (and at once on any change in etcd).
    pub interval: Duration,
    /// How long a hand-over waits for the follower to catch up with the fenced leader.
    pub handover_wait: Duration,
    /// New shards wait this long for `R` nodes to join before they are placed on
    /// fewer (a cluster's nodes start one after the other).
    pub initial_wait: Duration,
    /// What the controller's calls to nodes carry (the node's admin token and TLS
    /// settings, when the cluster has them).
    pub credentials: Credentials,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            replace_after: Duration::from_secs(30),
            max_bootstraps_per_node: 2,
            interval: Duration::from_millis(500),
            handover_wait: Duration::from_secs(3),
            initial_wait: Duration::from_secs(10),
            credentials: Credentials::none(),
        }
    }
}

/// How long a node has to report its replicas.
pub(crate) const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Replica reports of the live nodes that answered: node → shard → status.
type Reports = BTreeMap<String, BTreeMap<u32, ReplicaStatus>>;

/// What every live node reports of its replicas (`ListReplicas`, all asked at once,
/// each with [`REPORT_TIMEOUT`]), by node: its replicas, or why it did not answer.
pub(super) async fn ask_live_nodes(
    view: &ClusterView,
    mut channel: impl FnMut(&str) -> std::result::Result<Channel, String>,
) -> BTreeMap<String, std::result::Result<Vec<ReplicaStatus>, String>> {
    let mut answers = BTreeMap::new();
    let mut asks = tokio::task::JoinSet::new();
    for (node, address) in &view.live {
        match channel(address) {
            Ok(channel) => {
                let node = node.clone();
                asks.spawn(async move {
                    let answer = list_replicas(channel, REPORT_TIMEOUT).await;
                    (node, answer.map_err(|s| s.message().to_owned()))
                });
            }
            Err(e) => {
                answers.insert(node.clone(), Err(e));
            }
        }
    }
    while let Some(done) = asks.join_next().await {
        if let Ok((node, answer)) = done {
            answers.insert(node, answer);
        }
    }
    answers
}

pub(crate) struct Controller {
    client: Client,
    keys: Keys,
    /// The election key's name and creation revision: every write is guarded by it.
    guard: (Vec<u8>, i64),
    cfg: ControllerConfig,
    channels: HashMap<String, Channel>,
    dead_since: HashMap<String, Instant>,
    /// Shards already warned about having no candidate (until they recover).
    stuck: HashSet<u32>,
    /// Shards whose leader's store failed, with the epoch warned about.
    faulted: HashMap<u32, u64>,
    started: Instant,
}

/// What one shard's reconciliation did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    Acted,
}

impl Controller {
    pub(crate) fn new(client: Client, keys: Keys, guard: (Vec<u8>, i64), cfg: ControllerConfig) -> Self {
        Self {
            client,
            keys,
            guard,
            cfg,
            channels: HashMap::new(),
            dead_since: HashMap::new(),
            stuck: HashSet::new(),
            faulted: HashMap::new(),
            started: Instant::now(),
        }
    }

    /// One round. `Err(Deposed)` when this controller no longer holds the election.
    pub(crate) async fn round(&mut self) -> Result<()> {
        let view = ClusterView::read(&mut self.client, &self.keys).await?;
        let spec = view.spec.ok_or_else(|| Error::Coordination("the cluster has no spec yet".into()))?;
        let now = Instant::now();
        for node in view.members.keys() {
            if view.is_live(node) {
                self.dead_since.remove(node);
            } else {
                self.dead_since.entry(node.clone()).or_insert(now);
            }
        }
        // Channels of nodes that are neither live nor named by the map are dropped
        // (`members/` keeps every node that ever joined).
        let named = view.shards.iter().flatten().flat_map(|a| a.members()).filter_map(|m| view.address(m));
        let known: HashSet<&str> = view.live.values().map(String::as_str).chain(named).collect();
        self.channels.retain(|address, _| known.contains(address.as_str()));
        let reports = self.reports(&view).await;
        let mut acted = false;
        // New shards, one after the other on the view each placement updates, so that
        // they spread.
        let mut view = view;
        let enough = view.placeable().count() >= spec.replicas as usize;
        // Placed now: the reports, read before, know nothing of them yet.
        let mut placed = HashSet::new();
        for shard in 0..spec.shards {
            if view.shards[shard as usize].is_some()
                || !(enough || self.started.elapsed() >= self.cfg.initial_wait)
            {
                continue;
            }
            let nodes = place_new(&view, spec.replicas as usize);
            let Some((leader, followers)) = nodes.split_first() else { break };
            let a = self.promote(&view, shard, leader, followers.to_vec(), true).await?;
            view.shards[shard as usize] = Some(a);
            placed.insert(shard);
            acted = true;
        }
        for shard in (0..spec.shards).filter(|s| !placed.contains(s)) {
            if self.reconcile(&view, &reports, spec, shard).await? == Step::Acted {
                acted = true;
            }
        }
        if !acted {
            self.balance(&view, &reports).await?;
        }
        Ok(())
    }

    fn channel(&mut self, address: &str) -> Option<Channel> {
        if let Some(c) = self.channels.get(address) {
            return Some(c.clone());
        }
        let c = crate::net::channel(address, &self.cfg.credentials).ok()?;
        self.channels.insert(address.to_owned(), c.clone());
        Some(c)
    }

    async fn reports(&mut self, view: &ClusterView) -> Reports {
        let answers = ask_live_nodes(view, |address| {
            self.channel(address).ok_or_else(|| format!("`{address}` is not an address"))
        })
        .await;
        let mut reports = Reports::new();
        for (node, answer) in answers {
            match answer {
                Ok(statuses) => {
                    reports.insert(node, statuses.into_iter().map(|r| (r.shard, r)).collect());
                }
                Err(e) => tracing::debug!(%node, error = %e, "a live node did not report"),
            }
        }
        reports
    }

    // ------------------------------------------------------------------ per shard

    async fn reconcile(
        &mut self,
        view: &ClusterView,
        reports: &Reports,
        spec: ClusterSpec,
        shard: u32,
    ) -> Result<Step> {
        let report = |node: &str| reports.get(node).and_then(|m| m.get(&shard));
        let Some(a) = view.shards.get(shard as usize).cloned().flatten() else {
            return Ok(Step::Nothing); // placed by the round
        };
        // The leader.
        if view.is_live(&a.leader) && !reports.contains_key(&a.leader) {
            return Ok(Step::Nothing); // it holds its lease but did not answer: wait
        }
        let leading = report(&a.leader).is_some_and(|r| {
            r.role == Role::Leader { epoch: a.epoch } && !r.fenced && view.is_live(&a.leader)
        });
        if !leading {
            if let Some(r) = report(&a.leader)
                && view.is_live(&a.leader)
                && r.epoch < a.epoch
            {
                // Assigned but never told (its controller died between the two).
                self.transition(view, &a.leader, shard, Role::Leader { epoch: a.epoch }, a.new).await;
                return Ok(Step::Acted);
            }
            return self.fail_over(view, reports, shard, &a).await;
        }
        self.stuck.remove(&shard);
        if a.new {
            self.write(shard, &Assignment { new: false, ..a.clone() }).await?;
        }
        if view.draining.contains(&a.leader) {
            return self.hand_over(view, reports, shard, &a, None).await;
        }
        if let Some(fault) = report(&a.leader).and_then(|r| r.fault.as_deref()) {
            // Its store failed: it serves reads but takes no writes until restarted on a
            // sound disk. A caught-up follower without a fault takes over; until one
            // is, the shard is read-only and the rest of the round goes on (followers'
            // roles, membership), trying again next round.
            if self.faulted.insert(shard, a.epoch) != Some(a.epoch) {
                tracing::warn!(shard, leader = %a.leader, fault, "the leader's store failed; handing leadership to a sound follower");
            }
            // A faulted leader cannot write, so its log is final: hand over only to a
            // follower that already holds all of it (the hand-over's bounded wait must
            // not decide here: a write acknowledged only by this leader would be lost).
            let leader_log = report(&a.leader).map(|r| (r.log_epoch, r.applied_sequence));
            let whole = a.followers.iter().find(|f| {
                view.is_live(f)
                    && report(f).is_some_and(|r| {
                        r.is_ready() && Some((r.log_epoch, r.applied_sequence)) == leader_log
                    })
            });
            if let Some(to) = whole.cloned()
                && self.hand_over(view, reports, shard, &a, Some(&to)).await? == Step::Acted
            {
                return Ok(Step::Acted);
            }
        } else {
            self.faulted.remove(&shard);
        }
        let Some(leader_address) = view.address(&a.leader).map(str::to_owned) else {
            return Ok(Step::Nothing);
        };
        let mut step = Step::Nothing;
        // Followers follow the leader at its epoch.
        let want = Role::Follower { leader: leader_address.clone(), epoch: a.epoch };
        for f in &a.followers {
            if view.is_live(f) && reports.contains_key(f) && report(f).map(|r| &r.role) != Some(&want) {
                self.transition(view, f, shard, want.clone(), false).await;
                step = Step::Acted;
            }
        }
        // Replicas the map does not name leave.
        for (node, held) in reports {
            if !a.holds(node) && held.get(&shard).is_some_and(|r| r.role != Role::Offline) {
                self.transition(view, node, shard, Role::Offline, false).await;
                step = Step::Acted;
            }
        }
        if step == Step::Acted {
            return Ok(step);
        }
        // Membership: members that count are live (or not dead for long) and not
        // draining.
        let faulted = |m: &String| report(m).is_some_and(|r| r.fault.is_some());
        let counted = a
            .members()
            .filter(|m| !view.draining.contains(*m))
            // A replica whose store failed holds a copy but takes no writes until an
            // operator restarts it: a replacement is placed meanwhile.
            .filter(|m| !faulted(m))
            .filter(|m| {
                view.is_live(m)
                    || self.dead_since.get(*m).is_none_or(|t| t.elapsed() < self.cfg.replace_after)
            })
            .count();
        let wanted = (spec.replicas as usize).min(view.placeable().count()).max(1);
        if counted < wanted {
            if let Some(node) = self.addition(view, reports, &a) {
                self.add_follower(view, shard, &a, &node, want).await?;
                return Ok(Step::Acted);
            }
            return Ok(Step::Nothing);
        }
        let caught_up = |m: &String| view.is_live(m) && report(m).is_some_and(ReplicaStatus::is_ready);
        let surplus = a.followers.len() + 1 > spec.replicas as usize;
        let removable = a
            .followers
            .iter()
            .find(|f| {
                !view.is_live(f)
                    && self.dead_since.get(*f).is_some_and(|t| t.elapsed() >= self.cfg.replace_after)
            })
            .or_else(|| a.followers.iter().find(|f| view.draining.contains(*f)))
            .or_else(|| if surplus { a.followers.iter().find(|f| faulted(f)) } else { None })
            .or_else(|| if surplus { a.followers.iter().find(|f| !view.is_live(f)) } else { None })
            .or_else(|| {
                if !surplus {
                    return None;
                }
                // The follower on the most loaded node.
                let load = view.load();
                a.followers.iter().max_by_key(|f| load.get(f.as_str()).map_or(0, |l| l.0))
            })
            .cloned();
        if let Some(gone) = removable {
            let rest_caught_up = a
                .members()
                .filter(|m| **m != gone && !view.draining.contains(*m) && !faulted(m))
                .all(caught_up);
            if rest_caught_up {
                let next = Assignment {
                    followers: a.followers.iter().filter(|f| **f != gone).cloned().collect(),
                    ..a.clone()
                };
                self.write(shard, &next).await?;
                if view.is_live(&gone) {
                    self.transition(view, &gone, shard, Role::Offline, false).await;
                }
                tracing::info!(shard, node = %gone, "replica removed from the shard");
                return Ok(Step::Acted);
            }
        }
        Ok(Step::Nothing)
    }

    /// A node to take a new follower of `a`: live, not draining, not a member, few
    /// replicas, not already bootstrapping too many.
    fn addition(&self, view: &ClusterView, reports: &Reports, a: &Assignment) -> Option<String> {
        let load = view.load();
        view.placeable()
            .filter(|n| !a.holds(n))
            .filter(|n| bootstrapping(reports, n) < self.cfg.max_bootstraps_per_node)
            .min_by_key(|n| (load.get(n.as_str()).map_or(0, |l| l.0), (*n).clone()))
            .cloned()
    }

    async fn fail_over(
        &mut self,
        view: &ClusterView,
        reports: &Reports,
        shard: u32,
        a: &Assignment,
    ) -> Result<Step> {
        let best = a
            .members()
            .filter(|m| view.is_live(m))
            .filter_map(|m| {
                let r = reports.get(m)?.get(&shard)?;
                r.has_sound_data().then_some((m, r))
            })
            .max_by_key(|(m, r)| {
                (r.log_epoch, r.applied_sequence, r.fault.is_none(), !view.draining.contains(*m))
            })
            // A replica whose store failed cannot lead (its first write, the epoch's,
            // would fail); if only it holds the longest log, the shard waits for it
            // to be served to the others (it still answers `GetUpdates`).
            .filter(|(_, r)| r.fault.is_none())
            .map(|(m, _)| m.clone());
        let Some(best) = best else {
            if self.stuck.insert(shard) {
                tracing::warn!(shard, leader = %a.leader, "the shard has no leader and no live replica with data to promote; waiting");
            }
            return Ok(Step::Nothing);
        };
        let others: Vec<String> = a.members().filter(|m| **m != best).cloned().collect();
        tracing::info!(shard, old = %a.leader, new = %best, "failing over");
        self.promote(view, shard, &best, others, false).await?;
        Ok(Step::Acted)
    }

    /// Adds `node` to the followers of `a` in the map, then has it take `role` (to
    /// follow; it bootstraps by checkpoint if it has no data).
    async fn add_follower(
        &mut self,
        view: &ClusterView,
        shard: u32,
        a: &Assignment,
        node: &str,
        role: Role,
    ) -> Result<()> {
        let mut next = a.clone();
        next.followers.push(node.to_owned());
        self.write(shard, &next).await?;
        self.transition(view, node, shard, role, false).await;
        Ok(())
    }

    /// Moves leadership of `a` to a caught-up follower (`to` if given): fences the
    /// leader, waits for the follower to apply everything it committed, promotes the
    /// follower with the longest log.
    async fn hand_over(
        &mut self,
        view: &ClusterView,
        reports: &Reports,
        shard: u32,
        a: &Assignment,
        to: Option<&str>,
    ) -> Result<Step> {
        let ready = |f: &&String| {
            view.is_live(f)
                && !view.draining.contains(*f)
                && reports.get(*f).and_then(|m| m.get(&shard)).is_some_and(ReplicaStatus::is_ready)
        };
        let Some(target) =
            a.followers.iter().filter(ready).find(|f| to.is_none_or(|t| t == f.as_str())).cloned()
        else {
            return Ok(Step::Nothing);
        };
        let Some(address) = view.address(&a.leader).map(str::to_owned) else { return Ok(Step::Nothing) };
        let Some(channel) = self.channel(&address) else { return Ok(Step::Nothing) };
        let mut admin = ipb::admin_service_client::AdminServiceClient::new(channel);
        let mut request = tonic::Request::new(ipb::FenceReplicaRequest { shard, epoch: a.epoch });
        request.set_timeout(Duration::from_secs(5));
        let fenced = match admin.fence_replica(request).await {
            Ok(r) => r.into_inner().status.map_or(0, |s| s.applied_sequence),
            Err(e) => {
                tracing::warn!(shard, leader = %a.leader, error = %e.message(), "could not fence the leader for a hand-over");
                return Ok(Step::Nothing);
            }
        };
        // Wait (bounded) for the target to apply what the fenced leader committed.
        let deadline = Instant::now() + self.cfg.handover_wait;
        loop {
            let target_status = self.replica_status(view, &target, shard).await;
            if target_status.is_some_and(|s| s.applied_sequence >= fenced) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut statuses = BTreeMap::new();
        for f in a.followers.iter().filter(|f| view.is_live(f)) {
            if let Some(s) = self.replica_status(view, f, shard).await {
                statuses.insert(f.clone(), s);
            }
        }
        // The longest log among the followers (the target, normally): every write
        // acknowledged before the fence is on some follower, so on this one.
        let best = statuses
            .iter()
            .filter(|(_, s)| s.has_sound_data())
            .max_by_key(|(f, s)| {
                (
                    s.log_epoch,
                    s.applied_sequence,
                    s.fault.is_none(),
                    **f == target,
                    !view.draining.contains(*f),
                )
            })
            .map(|(f, s)| (f.clone(), s.fault.is_some()));
        let best = match best {
            // The leader is fenced: it is failed over next round, which waits for a
            // sound replica to hold the longest log.
            Some((_, true)) => return Ok(Step::Acted),
            Some((f, false)) => f,
            None => target,
        };
        let others: Vec<String> = a.members().filter(|m| **m != best).cloned().collect();
        tracing::info!(shard, from = %a.leader, to = %best, "handing leadership over");
        self.promote(view, shard, &best, others, false).await?;
        Ok(Step::Acted)
    }

    async fn replica_status(&mut self, view: &ClusterView, node: &str, shard: u32) -> Option<ReplicaStatus> {
        let channel = self.channel(view.address(node)?)?;
        list_replicas(channel, REPORT_TIMEOUT).await.ok()?.into_iter().find(|r| r.shard == shard)
    }

    /// A fresh epoch, the assignment written, then the leader told, then the
    /// followers.
    async fn promote(
        &mut self,
        view: &ClusterView,
        shard: u32,
        leader: &str,
        followers: Vec<String>,
        new: bool,
    ) -> Result<Assignment> {
        let epoch = self.new_epoch().await?;
        let a = Assignment { leader: leader.to_owned(), followers, epoch, new };
        self.write(shard, &a).await?;
        if !self.transition(view, leader, shard, Role::Leader { epoch }, new).await {
            return Ok(a); // the next round sees it and picks again
        }
        let Some(address) = view.address(leader).map(str::to_owned) else { return Ok(a) };
        let mut tells = tokio::task::JoinSet::new();
        for f in a.followers.iter().filter(|f| view.is_live(f)) {
            let Some(channel) = view.address(f).and_then(|addr| self.channel(addr)) else { continue };
            let target = Role::Follower { leader: address.clone(), epoch };
            let node = f.clone();
            tells.spawn(async move { (node, transition_rpc(channel, shard, &target, false).await) });
        }
        while let Some(done) = tells.join_next().await {
            if let Ok((node, Err(e))) = done {
                tracing::warn!(shard, %node, error = %e, "could not repoint a follower");
            }
        }
        Ok(a)
    }

    /// Tells `node` to take `role` for `shard`; false (logged) when it refused or
    /// could not be reached.
    async fn transition(
        &mut self,
        view: &ClusterView,
        node: &str,
        shard: u32,
        role: Role,
        create: bool,
    ) -> bool {
        let Some(channel) = view.address(node).and_then(|a| self.channel(a)) else { return false };
        match transition_rpc(channel, shard, &role, create).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(shard, %node, %role, error = %e, "transition refused or failed");
                false
            }
        }
    }

    // ------------------------------------------------------------------ balance

    /// One balancing move when the cluster is otherwise settled ([`balance_move`]).
    async fn balance(&mut self, view: &ClusterView, reports: &Reports) -> Result<()> {
        match balance_move(view) {
            Some(Move::Leadership { shard, to }) => {
                if let Some(a) = view.shards[shard as usize].clone() {
                    self.hand_over(view, reports, shard, &a, Some(to.as_str())).await?;
                }
            }
            Some(Move::Replica { shard, from, to }) => {
                if bootstrapping(reports, &to) >= self.cfg.max_bootstraps_per_node {
                    return Ok(());
                }
                let Some(a) = view.shards[shard as usize].clone() else { return Ok(()) };
                let Some(leader) = view.address(&a.leader).map(str::to_owned) else { return Ok(()) };
                tracing::info!(shard, %from, %to, "moving a replica");
                self.add_follower(view, shard, &a, &to, Role::Follower { leader, epoch: a.epoch }).await?;
            }
            None => {}
        }
        Ok(())
    }

    // ------------------------------------------------------------------ etcd

    fn guarded(&self, op: TxnOp) -> Txn {
        Txn::new()
            .when([Compare::create_revision(self.guard.0.clone(), CompareOp::Equal, self.guard.1)])
            .and_then([op])
    }

    /// Writes an assignment, if this controller still holds the election.
    async fn write(&mut self, shard: u32, a: &Assignment) -> Result<()> {
        let value = serde_json::to_string(a).map_err(|e| Error::Internal(e.to_string()))?;
        let txn = self.guarded(TxnOp::put(self.keys.shard(shard), value, None));
        let answer = self
            .client
            .txn(txn)
            .await
            .map_err(|e| Error::Coordination(format!("writing shard {shard}: {e}")))?;
        if !answer.succeeded() {
            return Err(Error::Deposed);
        }
        Ok(())
    }

    /// A new epoch: the revision of a guarded put.
    async fn new_epoch(&mut self) -> Result<u64> {
        let txn = self.guarded(TxnOp::put(self.keys.epoch(), "", None));
        let answer =
            self.client.txn(txn).await.map_err(|e| Error::Coordination(format!("new epoch: {e}")))?;
        if !answer.succeeded() {
            return Err(Error::Deposed);
        }
        let revision = answer.header().map_or(0, |h| h.revision());
        u64::try_from(revision)
            .ok()
            .filter(|r| *r > 0)
            .ok_or_else(|| Error::Coordination("etcd gave no revision".into()))
    }
}

/// `TransitionReplica` with a timeout.
pub(crate) async fn transition_rpc(
    channel: Channel,
    shard: u32,
    role: &Role,
    create: bool,
) -> Result<(), String> {
    let mut client = ipb::admin_service_client::AdminServiceClient::new(channel);
    let mut request = tonic::Request::new(transition_request(shard, role, create));
    request.set_timeout(Duration::from_secs(10));
    client.transition_replica(request).await.map(|_| ()).map_err(|e| e.message().to_owned())
}

/// Followers of `node` still bootstrapping (no data yet), by its report; unknown
/// (a node that did not report) counts as full.
fn bootstrapping(reports: &Reports, node: &str) -> usize {
    reports.get(node).map_or(usize::MAX, |held| {
        held.values().filter(|r| matches!(r.role, Role::Follower { .. }) && !r.has_data).count()
    })
}

/// A balancing move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// Hand the shard's leadership to its follower on `to`.
    Leadership { shard: u32, to: String },
    /// `to` joins the shard as a follower; the surplus rule then removes `from`'s
    /// follower once `to` has caught up.
    Replica { shard: u32, from: String, to: String },
}

/// The next balancing move, if any: leadership from the node with the most leaders to
/// a follower on the one with the fewest (when they differ by 2 or more); else a
/// replica from the node with the most replicas to the one with the fewest.
pub fn balance_move(view: &ClusterView) -> Option<Move> {
    let replicas = view.spec?.replicas as usize;
    let nodes: Vec<&String> = view.placeable().collect();
    if nodes.len() < 2 || view.shards.iter().any(Option::is_none) {
        return None;
    }
    let load = view.load();
    let of = |n: &str| load.get(n).copied().unwrap_or((0, 0));
    let most = nodes.iter().max_by_key(|n| (of(n).1, (**n).clone()))?;
    let fewest = nodes.iter().min_by_key(|n| (of(n).1, (**n).clone()))?;
    if of(most).1 >= of(fewest).1 + 2 {
        let shard = view.shards.iter().enumerate().find_map(|(s, a)| {
            let a = a.as_ref()?;
            (a.leader == **most && a.followers.contains(*fewest)).then_some(s as u32)
        });
        if let Some(shard) = shard {
            return Some(Move::Leadership { shard, to: (*fewest).clone() });
        }
    }
    let most = nodes.iter().max_by_key(|n| (of(n).0, (**n).clone()))?;
    let fewest = nodes.iter().min_by_key(|n| (of(n).0, (**n).clone()))?;
    if of(most).0 < of(fewest).0 + 2 {
        return None;
    }
    view.shards.iter().enumerate().find_map(|(s, a)| {
        let a = a.as_ref()?;
        (a.followers.contains(*most) && !a.holds(fewest) && a.followers.len() + 1 == replicas)
            .then(|| Move::Replica { shard: s as u32, from: (*most).clone(), to: (*fewest).clone() })
    })
}

/// Nodes for a new shard: the `r` placeable nodes with the fewest replicas, the one
/// with the fewest leaders first.
pub(crate) fn place_new(view: &ClusterView, r: usize) -> Vec<String> {
    let load = view.load();
    let of = |n: &str| load.get(n).copied().unwrap_or((0, 0));
    let mut nodes: Vec<&String> = view.placeable().collect();
    nodes.sort_by_key(|n| (of(n).0, of(n).1, (*n).clone()));
    nodes.truncate(r);
    nodes.sort_by_key(|n| (of(n).1, of(n).0, (*n).clone()));
    nodes.into_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(live: &[&str], shards: Vec<Option<Assignment>>) -> ClusterView {
        ClusterView {
            spec: Some(ClusterSpec { shards: shards.len() as u32, replicas: 3 }),
            live: live.iter().map(|n| (n.to_string(), format!("{n}:1"))).collect(),
            members: live.iter().map(|n| (n.to_string(), format!("{n}:1"))).collect(),
            shards,
            ..ClusterView::default()
        }
    }

    #[test]
    fn new_shards_spread_replicas_and_leaders() {
        let mut v = view(&["a", "b", "c", "d"], vec![None; 8]);
        for s in 0..8 {
            let nodes = place_new(&v, 3);
            assert_eq!(nodes.len(), 3);
            let (leader, followers) = nodes.split_first().unwrap();
            v.shards[s] = Some(Assignment {
                leader: leader.clone(),
                followers: followers.to_vec(),
                epoch: 1,
                new: true,
            });
        }
        let load = v.load();
        let replicas: Vec<usize> = load.values().map(|l| l.0).collect();
        let leaders: Vec<usize> = load.values().map(|l| l.1).collect();
        assert_eq!(replicas, [6, 6, 6, 6], "{load:?}");
        assert_eq!(leaders, [2, 2, 2, 2], "{load:?}");
        for a in v.shards.iter().flatten() {
            let distinct: std::collections::BTreeSet<_> = a.members().collect();
            assert_eq!(distinct.len(), 3);
        }
    }

    #[test]
    fn draining_and_dead_nodes_take_no_new_shards() {
        let mut v = view(&["a", "b", "c"], vec![None]);
        v.draining.insert("b".into());
        v.members.insert("z".into(), "z:1".into());
        assert_eq!(place_new(&v, 3), ["a", "c"]);
    }
}
