//! A node's membership in an etcd cluster: its session (lease, liveness, fencing),
//! a watch of the cluster state that keeps the node's view (and so its broker's
//! routing) current, and its candidacy for controller.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::controller::{Controller, ControllerConfig};
use super::session::{self, LeaseState, SessionConfig, SessionFault};
use super::view::{ClusterSpec, ClusterView, Keys};
use crate::{Error, Replicas, Result};

/// How a node joins a cluster.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// etcd endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// Keys live under `/feedgraph/<cluster_name>/`.
    pub cluster_name: String,
    pub node_id: String,
    /// The address other nodes and clients reach this node at.
    pub address: String,
    /// The cluster's shape; the first node writes it, the others must agree.
    pub spec: ClusterSpec,
    /// The node's lease: a dead node's shards fail over about this long after it died.
    pub lease_ttl: Duration,
    pub controller: ControllerConfig,
    /// The etcd user this node authenticates as, if etcd has authentication on.
    pub etcd_credentials: Option<EtcdCredentials>,
}

/// An etcd user and password (`etcdctl user add`). The password is never printed.
#[derive(Clone)]
pub struct EtcdCredentials {
    user: String,
    password: Arc<str>,
}

impl EtcdCredentials {
    pub fn new(user: impl Into<String>, password: &str) -> Self {
        Self { user: user.into(), password: password.into() }
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// Parses `etcd://host:port[,host:port...]`.
pub fn parse_endpoints(url: &str) -> Result<Vec<String>> {
    let rest = url.strip_prefix("etcd://").ok_or_else(|| {
        Error::Coordination(format!("`{url}`: a cluster URL is etcd://host:port[,host:port]"))
    })?;
    let endpoints: Vec<String> =
        rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
    if endpoints.is_empty() || endpoints.iter().any(|e| !e.contains(':')) {
        return Err(Error::Coordination(format!("`{url}`: every endpoint is host:port")));
    }
    Ok(endpoints)
}

/// Connects to etcd (bounded), as `credentials`' user if given. The token etcd issues
/// for them expires (`--auth-token-ttl`, 5 minutes by default, on disuse): the client
/// authenticates again and retries when a call is refused as "invalid auth token", so
/// a long-lived node never has to reconnect. A JWT made stale by a change to etcd's
/// users or roles is renewed by `watch_state`'s next read.
pub async fn connect(endpoints: &[String], credentials: Option<&EtcdCredentials>) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(c) = credentials {
        options = options.with_user(c.user.clone(), c.password.to_string()).with_auto_token_refresh(true);
    }
    tokio::time::timeout(Duration::from_secs(5), Client::connect(endpoints, Some(options)))
        .await
        .map_err(|_| Error::Coordination(format!("etcd at {endpoints:?} did not answer in 5 s")))?
        .map_err(|e| Error::Coordination(format!("connecting to etcd at {endpoints:?}: {e}")))
}

/// A node's membership; [`Member::stop`] leaves the cluster.
pub struct Member {
    keys: Keys,
    fault: SessionFault,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("root", &self.keys.root()).finish()
    }
}

impl Member {
    /// Joins: checks (or writes) the cluster spec, takes a lease and registers, then
    /// watches the cluster state — calling `on_view` with every new view — and runs
    /// for controller. Returns once the node is registered and has a first view.
    pub async fn join(
        cfg: MemberConfig,
        replicas: Arc<Replicas>,
        on_view: Arc<dyn Fn(&ClusterView) + Send + Sync>,
    ) -> Result<Member> {
        let mut client = connect(&cfg.endpoints, cfg.etcd_credentials.as_ref()).await?;
        let keys = Keys::new(&cfg.cluster_name);
        ensure_spec(&mut client, &keys, cfg.spec).await?;
        let (stop, stopped) = watch::channel(false);
        let (lease_tx, lease) = watch::channel(None);
        let fault = SessionFault::default();
        let fence: Arc<dyn Fn() + Send + Sync> = {
            let replicas = replicas.clone();
            Arc::new(move || replicas.fence_leaders())
        };
        let session_cfg =
            SessionConfig { node_id: cfg.node_id.clone(), address: cfg.address.clone(), ttl: cfg.lease_ttl };
        let mut tasks = vec![tokio::spawn(session::run(
            client.clone(),
            keys.clone(),
            session_cfg,
            fault.clone(),
            lease_tx,
            fence,
            stopped.clone(),
        ))];
        // Registered (bounded): the view should include this node.
        let mut l = lease.clone();
        tokio::time::timeout(Duration::from_secs(10), l.wait_for(Option::is_some))
            .await
            .map_err(|_| Error::Coordination("no lease from etcd in 10 s".into()))?
            .map_err(|_| Error::Shutdown)?;
        let first = ClusterView::read(&mut client, &keys).await?;
        on_view(&first);
        let (view_tx, _) = watch::channel(first);
        let wake = Arc::new(Notify::new());
        tasks.push(tokio::spawn(watch_state(
            client.clone(),
            keys.clone(),
            view_tx,
            on_view,
            wake.clone(),
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(campaign(
            client.clone(),
            keys.clone(),
            cfg.node_id.clone(),
            cfg.controller.clone(),
            lease,
            wake,
            stopped,
        )));
        Ok(Member { keys, fault, stop, tasks })
    }

    /// Fault injection (tests): cut this node's session from etcd, or restore it.
    pub fn fault(&self) -> &SessionFault {
        &self.fault
    }

    /// Leaves the cluster: stops campaigning, revokes the lease (the node's shards
    /// fail over at once), stops watching.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), t).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Writes the spec if the cluster has none; else checks that it is this node's.
async fn ensure_spec(client: &mut Client, keys: &Keys, spec: ClusterSpec) -> Result<()> {
    let value = serde_json::to_string(&spec).map_err(|e| Error::Internal(e.to_string()))?;
    let txn = Txn::new()
        .when([Compare::create_revision(keys.spec(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(keys.spec(), value, None)]);
    let answer =
        client.txn(txn).await.map_err(|e| Error::Coordination(format!("writing the cluster spec: {e}")))?;
    if answer.succeeded() {
        tracing::info!(shards = spec.shards, replicas = spec.replicas, "new cluster");
        return Ok(());
    }
    let view = ClusterView::read(client, keys).await?;
    match view.spec {
        Some(s) if s.shards == spec.shards => {
            if s.replicas != spec.replicas {
                tracing::warn!(
                    cluster = s.replicas,
                    node = spec.replicas,
                    "the cluster's replica count differs from this node's; the cluster's holds"
                );
            }
            Ok(())
        }
        Some(s) => Err(Error::Coordination(format!(
            "the cluster at {} has {} shards, this node is configured with {}",
            keys.root(),
            s.shards,
            spec.shards
        ))),
        None => Err(Error::Coordination("the cluster spec vanished".into())),
    }
}

/// Keeps `view` current: re-reads the state on every change under the cluster's
/// prefix (and every second, in case a watch broke), and wakes the controller.
async fn watch_state(
    mut client: Client,
    keys: Keys,
    view: watch::Sender<ClusterView>,
    on_view: Arc<dyn Fn(&ClusterView) + Send + Sync>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = None;
    // A watch is (re)opened at most once per tick: one etcd cancels at once (a role
    // without read on the prefix, a stale token) must not become a busy loop.
    let mut may_open = true;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stream.is_none() && may_open {
            may_open = false;
            stream = client.watch(keys.root(), Some(WatchOptions::new().with_prefix())).await.ok();
        }
        let changed = tokio::select! {
            _ = stop.changed() => return,
            _ = every.tick() => { may_open = true; true }
            m = async {
                match stream.as_mut() {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            } => match m {
                Ok(Some(r)) if r.canceled() => {
                    tracing::warn!(reason = r.cancel_reason(), "etcd cancelled the watch on the cluster's keys");
                    stream = None;
                    true
                }
                Ok(Some(r)) => !r.events().is_empty(),
                _ => { stream = None; false }
            },
        };
        if !changed {
            continue;
        }
        match ClusterView::read(&mut client, &keys).await {
            Ok(v) if *view.borrow() != v => {
                on_view(&v);
                view.send_replace(v);
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading the cluster state failed");
                refresh_if_auth_refused(&client, &e.to_string()).await;
            }
        }
    }
}

/// etcd-client renews an expired token by itself only when etcd answers "invalid auth
/// token"; a JWT issued before any change to etcd's users or roles is refused as
/// "revision of auth store is old" instead, which it does not renew. This loop reads
/// every second, and the token is shared by every clone of the node's client, so
/// renewing it here heals the session's and the controller's calls too.
async fn refresh_if_auth_refused(client: &Client, error: &str) {
    const REFUSALS: [&str; 2] = ["revision of auth store is old", "invalid auth token"];
    if REFUSALS.iter().any(|r| error.contains(r))
        && let Err(e) = client.refresh_token().await
    {
        tracing::warn!(error = %e, "authenticating to etcd again failed");
    }
}

/// Runs for controller while the node holds a lease; controls while elected.
#[allow(clippy::too_many_arguments)]
async fn campaign(
    mut client: Client,
    keys: Keys,
    node_id: String,
    cfg: ControllerConfig,
    mut lease: LeaseState,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(id) = *lease.borrow_and_update() else {
            tokio::select! {
                _ = lease.changed() => continue,
                _ = stop.changed() => return,
            }
        };
        let elected = tokio::select! {
            r = client.campaign(keys.election(), node_id.clone(), id) => r,
            _ = lease.changed() => continue,
            _ = stop.changed() => return,
        };
        let leader = match elected.map(|mut r| r.take_leader()) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tracing::info!(node = %node_id, "elected controller");
        let mut c =
            Controller::new(client.clone(), keys.clone(), (leader.key().to_vec(), leader.rev()), cfg.clone());
        let resign = loop {
            if *lease.borrow() != Some(id) {
                break false;
            }
            match c.round().await {
                Ok(()) => {}
                Err(Error::Deposed) => break false,
                Err(e) => tracing::warn!(error = %e, "controller round failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = wake.notified() => {}
                _ = lease.changed() => {}
                _ = stop.changed() => break true,
            }
        };
        tracing::info!(node = %node_id, "no longer the controller");
        if resign {
            let options = etcd_client::ResignOptions::new().with_leader(leader);
            let _ = tokio::time::timeout(Duration::from_secs(1), client.resign(Some(options))).await;
            return;
        }
    }
}

/// The cluster as an operator sees it: the state in etcd, the controller, and what
/// every live node reports of its replicas.
#[derive(Clone, Debug)]
pub struct ClusterStatus {
    pub view: ClusterView,
    /// The controller's node id, when one is elected.
    pub controller: Option<String>,
    /// Live nodes' reports, by node id (`Err`: the node did not answer).
    pub reports: std::collections::BTreeMap<String, std::result::Result<Vec<crate::ReplicaStatus>, String>>,
}

impl ClusterStatus {
    /// Reads it (bounded: each node has a second to answer).
    /// Nodes are asked with `credentials` (an admin token, and TLS settings, when the
    /// cluster has them).
    pub async fn read(
        client: &mut Client,
        keys: &Keys,
        credentials: &feedgraph_proto::auth::Credentials,
    ) -> Result<ClusterStatus> {
        let view = ClusterView::read(client, keys).await?;
        let controller = match client.leader(keys.election()).await {
            Ok(r) => r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_owned),
            Err(_) => None,
        };
        let reports = super::controller::ask_live_nodes(&view, |address| {
            crate::net::channel(address, credentials).map_err(|e| e.to_string())
        })
        .await;
        Ok(ClusterStatus { view, controller, reports })
    }

    /// What `node` reported of its replica of `shard`, if it answered and holds one.
    pub fn report(&self, node: &str, shard: u32) -> Option<&crate::ReplicaStatus> {
        self.reports.get(node)?.as_ref().ok()?.iter().find(|s| s.shard == shard)
    }

    /// Every shard has a live leader that reports leading at the map's epoch and
    /// `replicas` members that report following it, readable; and no balancing move
    /// is left.
    pub fn converged(&self) -> bool {
        if super::controller::balance_move(&self.view).is_some() {
            return false;
        }
        let Some(spec) = self.view.spec else { return false };
        let want = (spec.replicas as usize).min(self.view.placeable().count());
        self.view.shards.iter().enumerate().all(|(shard, a)| {
            let Some(a) = a else { return false };
            let report = |node: &str| self.report(node, shard as u32);
            let Some(leader_address) = self.view.address(&a.leader) else { return false };
            let leading = report(&a.leader)
                .is_some_and(|r| r.role == crate::Role::Leader { epoch: a.epoch } && !r.fenced);
            let following = a
                .followers
                .iter()
                .filter(|f| {
                    report(f).is_some_and(|r| {
                        r.role == crate::Role::Follower { leader: leader_address.to_owned(), epoch: a.epoch }
                            && r.readable
                    })
                })
                .count();
            leading && following + 1 == want && a.followers.len() + 1 == want
        })
    }
}

/// Starts draining `node` (its replicas move to other nodes, leaderships first), or
/// stops a drain.
pub async fn set_drain(client: &mut Client, keys: &Keys, node: &str, drain: bool) -> Result<()> {
    let key = keys.drain(node);
    let done = if drain {
        client.put(key, "", None).await.map(|_| ())
    } else {
        client.delete(key, None).await.map(|_| ())
    };
    done.map_err(|e| {
        Error::Coordination(format!("{}: {e}", if drain { "starting the drain" } else { "ending the drain" }))
    })
}
