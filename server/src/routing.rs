//! The node's shard directory, behind the broker's seam: the replicas this node holds
//! (`cluster::Replicas`) and what it knows of the other nodes' — in an etcd cluster,
//! the controller's shard map as the node's watch delivers it; with a placement file,
//! the placement refreshed by asking every node for its replicas (`ListReplicas`);
//! either way corrected at once when a replica redirects a write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use feedgraph_cluster::manager::ClusterView;
use feedgraph_cluster::{Error as ClusterError, Placement, Replica as ClusterReplica, Replicas, Role};
use feedgraph_graph_store::{Shard, WriteOutcome};
use feedgraph_proto::auth::{AuthChannel as Channel, Credentials};
use feedgraph_proto::pb::internal as ipb;
use feedgraph_retrieval::shards::BoxFuture;
use feedgraph_retrieval::{Error, LocalReplica, ReadAfter, Replica, ShardDirectory, ShardWrite};
use tokio::task::JoinHandle;

use crate::remote::RemoteShard;

/// A cluster error, as the broker's.
pub fn broker_error(e: ClusterError) -> Error {
    let msg = e.to_string();
    match e {
        ClusterError::NotLeader { shard, leader, epoch } => Error::NotLeader { shard, leader, epoch },
        ClusterError::StaleEpoch { shard, given, current } => Error::StaleEpoch { shard, given, current },
        ClusterError::Behind { shard } => Error::Behind { shard },
        ClusterError::NotConfirmed { shard, epoch, sequence, .. } => {
            Error::NotConfirmed { shard, epoch, sequence, detail: msg }
        }
        ClusterError::Standalone { .. }
        | ClusterError::NoData { .. }
        | ClusterError::EpochNotNewer { .. } => Error::FailedPrecondition(msg),
        ClusterError::Store(s) => Error::Store(s),
        ClusterError::NoReplica { .. }
        | ClusterError::Unreadable { .. }
        | ClusterError::Remote(_)
        | ClusterError::Unauthorized(_)
        | ClusterError::Coordination(_)
        | ClusterError::Deposed
        | ClusterError::Shutdown => Error::Unavailable(msg),
        ClusterError::Placement(_)
        | ClusterError::Checkpoint(_)
        | ClusterError::Io { .. }
        | ClusterError::Internal(_) => Error::Internal(msg),
    }
}

/// A replica of this node, for the broker.
#[derive(Debug)]
pub struct LocalAdapter(pub Arc<ClusterReplica>);

impl LocalReplica for LocalAdapter {
    fn readable(&self, after: ReadAfter) -> Result<Arc<Shard>, Error> {
        self.0
            .readable(feedgraph_cluster::ReadAfter { epoch: after.epoch, sequence: after.sequence })
            .map_err(broker_error)
    }

    fn write(&self, w: ShardWrite) -> BoxFuture<'_, Result<WriteOutcome, Error>> {
        Box::pin(async move { self.0.write(w.mutations, w.ack, w.epoch).await.map_err(broker_error) })
    }
}

/// A replica on another node, as last heard of.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RemoteEntry {
    address: String,
    leader: bool,
    epoch: u64,
    /// Its node answered the last refresh (unreachable ones are tried last).
    reachable: bool,
}

/// Where every shard's replicas are, seen from this node.
pub struct ClusterDirectory {
    local: Arc<Replicas>,
    self_address: String,
    /// The other nodes of the placement: (id, address).
    nodes: Vec<(String, String)>,
    /// Per shard, its replicas on other nodes.
    view: RwLock<Vec<Vec<RemoteEntry>>>,
    channels: RwLock<HashMap<String, Channel>>,
    remotes: RwLock<HashMap<(String, u32), Arc<RemoteShard>>>,
    locals: RwLock<HashMap<u32, Arc<LocalAdapter>>>,
    rotation: AtomicUsize,
    timeout: Duration,
    semi_sync: Duration,
    /// What this node's calls to other nodes present.
    credentials: Credentials,
}

impl std::fmt::Debug for ClusterDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDirectory")
            .field("node", &self.local.node_id())
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl ClusterDirectory {
    pub fn new(
        local: Arc<Replicas>,
        placement: Option<&Placement>,
        timeout: Duration,
        semi_sync: Duration,
        credentials: Credentials,
    ) -> Self {
        let self_id = local.node_id().to_owned();
        let self_address = local.address().to_owned();
        let count = local.shard_count() as usize;
        let mut view = vec![Vec::new(); count];
        let mut nodes = Vec::new();
        if let Some(p) = placement {
            nodes = p
                .nodes
                .iter()
                .filter(|(id, _)| **id != self_id)
                .map(|(i, a)| (i.clone(), a.clone()))
                .collect();
            for (shard, sp) in p.shards.iter().enumerate() {
                let entries = std::iter::once((&sp.leader, true))
                    .chain(sp.followers.iter().map(|f| (f, false)))
                    .filter(|(node, _)| **node != self_id)
                    .filter_map(|(node, leader)| {
                        Some(RemoteEntry {
                            address: p.address(node)?.to_owned(),
                            leader,
                            epoch: sp.epoch,
                            reachable: true,
                        })
                    });
                view[shard] = entries.collect();
            }
        }
        Self {
            local,
            self_address,
            nodes,
            view: RwLock::new(view),
            channels: RwLock::new(HashMap::new()),
            remotes: RwLock::new(HashMap::new()),
            locals: RwLock::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            timeout,
            semi_sync,
            credentials,
        }
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        if let Some(c) = self.channels.read().unwrap_or_else(|e| e.into_inner()).get(address) {
            return Some(c.clone());
        }
        let c = feedgraph_cluster::net::channel(address, &self.credentials).ok()?;
        self.channels.write().unwrap_or_else(|e| e.into_inner()).insert(address.to_owned(), c.clone());
        Some(c)
    }

    fn remote(&self, address: &str, shard: u32) -> Option<Arc<RemoteShard>> {
        let key = (address.to_owned(), shard);
        if let Some(r) = self.remotes.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Some(r.clone());
        }
        let r = Arc::new(RemoteShard::new(
            address.to_owned(),
            shard,
            self.channel(address)?,
            self.timeout,
            self.semi_sync,
        ));
        self.remotes.write().unwrap_or_else(|e| e.into_inner()).insert(key, r.clone());
        Some(r)
    }

    fn local(&self, shard: u32) -> Option<Arc<LocalAdapter>> {
        if let Some(a) = self.locals.read().unwrap_or_else(|e| e.into_inner()).get(&shard) {
            return Some(a.clone());
        }
        // A replica added at runtime (a transition on a shard the node did not hold).
        let a = Arc::new(LocalAdapter(self.local.get(shard)?));
        self.locals.write().unwrap_or_else(|e| e.into_inner()).insert(shard, a.clone());
        Some(a)
    }

    /// Takes the shard map of an etcd cluster (the controller's assignment) as this
    /// node's view of the other nodes' replicas; replaces the `ListReplicas` polling.
    pub fn apply_view(&self, cluster: &ClusterView) {
        let self_id = self.local.node_id();
        let mut next = vec![Vec::new(); self.local.shard_count() as usize];
        for (shard, a) in cluster.shards.iter().enumerate() {
            let (Some(a), Some(entries)) = (a, next.get_mut(shard)) else { continue };
            let members = std::iter::once((&a.leader, true)).chain(a.followers.iter().map(|f| (f, false)));
            for (node, leader) in members.filter(|(n, _)| n.as_str() != self_id) {
                let Some(address) = cluster.address(node) else { continue };
                if address == self.self_address {
                    continue;
                }
                entries.push(RemoteEntry {
                    address: address.to_owned(),
                    leader,
                    epoch: a.epoch,
                    reachable: cluster.is_live(node),
                });
            }
        }
        // Channels and remote shards of nodes that left the map are dropped (requests
        // in flight keep theirs): with nodes replaced over months, they would pile up.
        let addresses: HashSet<&str> = next
            .iter()
            .flatten()
            .map(|e| e.address.as_str())
            .chain(self.nodes.iter().map(|(_, a)| a.as_str()))
            .collect();
        self.channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, _| addresses.contains(a.as_str()));
        self.remotes.write().unwrap_or_else(|e| e.into_inner()).retain(|(a, shard), _| {
            next.get(*shard as usize).is_some_and(|entries| entries.iter().any(|e| e.address == *a))
        });
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Asks every other node for its replicas every `interval`, until `stop`.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> Option<JoinHandle<()>> {
        if self.nodes.is_empty() {
            return None;
        }
        let this = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => this.refresh_once(interval.min(Duration::from_secs(2))).await,
                    _ = &mut stop => return,
                }
            }
        }))
    }

    /// One round of `ListReplicas` to every other node.
    pub async fn refresh_once(&self, timeout: Duration) {
        for (id, address) in &self.nodes {
            let Some(channel) = self.channel(address) else { continue };
            let mut client = ipb::admin_service_client::AdminServiceClient::new(channel);
            let mut request = tonic::Request::new(ipb::ListReplicasRequest {});
            request.set_timeout(timeout);
            let answer = client.list_replicas(request).await.map(|r| r.into_inner());
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            match answer {
                Ok(list) => {
                    for entries in view.iter_mut() {
                        entries.retain(|e| e.address != *address);
                    }
                    for r in list.replicas {
                        let Some(entries) = view.get_mut(r.shard as usize) else { continue };
                        let leader = match ipb::ReplicaRole::try_from(r.role) {
                            Ok(ipb::ReplicaRole::Leader) => true,
                            Ok(ipb::ReplicaRole::Follower) => false,
                            _ => continue,
                        };
                        entries.push(RemoteEntry {
                            address: address.clone(),
                            leader,
                            epoch: r.epoch,
                            reachable: true,
                        });
                    }
                }
                Err(status) => {
                    tracing::debug!(node = %id, %address, error = %status.message(), "node did not answer ListReplicas");
                    for e in view.iter_mut().flatten().filter(|e| e.address == *address) {
                        e.reachable = false;
                    }
                }
            }
        }
        self.step_down_if_deposed().await;
    }

    /// A local leader whose shard another node leads at a newer epoch has been deposed
    /// without hearing of it (it was down during a failover, say): it follows the new
    /// leader. A newer epoch is never stale; if this replica wrote what the new leader
    /// never had, the prefix check makes it rebuild.
    async fn step_down_if_deposed(&self) {
        let deposed: Vec<(u32, String, u64, u64)> = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.iter()
                .enumerate()
                .filter_map(|(shard, entries)| {
                    let Role::Leader { epoch: mine } = self.local.get(shard as u32)?.role() else {
                        return None;
                    };
                    let newer = entries
                        .iter()
                        .filter(|e| e.leader && e.reachable && e.epoch > mine)
                        .max_by_key(|e| e.epoch)?;
                    Some((shard as u32, newer.address.clone(), newer.epoch, mine))
                })
                .collect()
        };
        for (shard, leader, epoch, mine) in deposed {
            tracing::warn!(shard, %leader, epoch, mine, "another node leads this shard at a newer epoch: stepping down to follow it");
            let target = Role::Follower { leader: leader.clone(), epoch };
            if let Err(e) = self.local.transition(shard, target).await {
                tracing::warn!(shard, %leader, error = %e, "stepping down failed");
            }
        }
    }
}

impl ShardDirectory for ClusterDirectory {
    fn shard_count(&self) -> u32 {
        self.local.shard_count()
    }

    fn readers(&self, shard: u32) -> Vec<Replica> {
        let mut out = Vec::with_capacity(3);
        if let Some(l) = self.local(shard).filter(|l| l.0.role() != Role::Offline) {
            out.push(Replica::Local(l));
        }
        let mut entries: Vec<RemoteEntry> = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.get(shard as usize).cloned().unwrap_or_default()
        };
        if entries.len() > 1 {
            let k = self.rotation.fetch_add(1, Ordering::Relaxed) % entries.len();
            entries.rotate_left(k);
            // Stable: the rotation spreads reads; unreachable nodes go last.
            entries.sort_by_key(|e| !e.reachable);
        }
        out.extend(
            entries
                .iter()
                .filter(|e| e.address != self.self_address)
                .filter_map(|e| self.remote(&e.address, shard))
                .map(|r| Replica::Remote(r as Arc<dyn feedgraph_retrieval::RemoteReplica>)),
        );
        out
    }

    /// Where writes go: the leader of the newest epoch known, reachable or not — a
    /// leader of an older epoch would accept writes its successor never sees (an
    /// unreachable newest leader fails the write instead, and the client retries).
    fn leader(&self, shard: u32) -> Option<(Replica, u64)> {
        let local = self.local(shard);
        let known = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.get(shard as usize).and_then(|entries| {
                entries
                    .iter()
                    .filter(|e| e.leader && e.address != self.self_address)
                    .max_by_key(|e| (e.epoch, e.reachable))
                    .cloned()
            })
        };
        if let Some(l) = &local
            && let Role::Leader { epoch } = l.0.role()
            && known.as_ref().is_none_or(|k| k.epoch <= epoch)
        {
            return Some((Replica::Local(l.clone()), epoch));
        }
        if let Some(e) = known {
            let r = self.remote(&e.address, shard)?;
            return Some((Replica::Remote(r), e.epoch));
        }
        // A local follower knows whom it follows.
        if let Some(l) = local
            && let Role::Follower { leader, epoch } = l.0.role()
        {
            let r = self.remote(&leader, shard)?;
            return Some((Replica::Remote(r), epoch));
        }
        None
    }

    fn redirect(&self, shard: u32, leader: Option<&str>, epoch: u64) {
        let Some(leader) = leader.filter(|l| *l != self.self_address) else { return };
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        let Some(entries) = view.get_mut(shard as usize) else { return };
        for e in entries.iter_mut() {
            if e.address == leader {
                e.leader = true;
                e.epoch = e.epoch.max(epoch);
                e.reachable = true;
            } else if e.leader && e.epoch <= epoch {
                e.leader = false;
            }
        }
        if !entries.iter().any(|e| e.address == leader) {
            entries.push(RemoteEntry { address: leader.to_owned(), leader: true, epoch, reachable: true });
        }
        tracing::debug!(shard, %leader, epoch, "leader redirect");
    }

    fn idle(&self) -> bool {
        self.local.idle()
    }
}
