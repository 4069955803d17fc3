//! A cluster managed through a real etcd: [`Etcd`] (a child process on free loopback
//! ports and a temporary directory, killed on drop) and [`ManagedCluster`], whose nodes
//! are either started through `feedgraph_server::start` with `cluster.etcd`, each on
//! its own runtime, so that a test can kill one by aborting its runtime — a crash, as
//! far as the rest of the cluster can tell — or are `feedgraph serve` child processes
//! ([`NodeKind::Process`]) that a test kills with SIGKILL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedgraph_cluster::manager::{self, ClusterStatus, EtcdCredentials, Keys};

/// The root password of [`Etcd::start_with_auth`] in these tests.
pub const ETCD_TEST_PASSWORD: &str = "etcd-root-password-for-tests";
use feedgraph_graph_store::Shard;
use feedgraph_server::{Config, Node};

use crate::{free_ports, node_config};

/// etcd on 127.0.0.1, stopped on drop.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    /// The root user's, once [`Etcd::start_with_auth`] turned authentication on.
    pub credentials: Option<EtcdCredentials>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd (Debian's `etcd-server`, installed by `scripts/setup.sh`) and waits
    /// (bounded) until it answers.
    pub fn start() -> Etcd {
        Self::start_with(&[])
    }

    /// Starts etcd with authentication on: a `root` user with [`ETCD_TEST_PASSWORD`] and
    /// the root role, and auth tokens that expire after `token_ttl_s` seconds unused
    /// (etcd's default is 300), so that tests meet expired tokens.
    pub fn start_with_auth(token_ttl_s: u32) -> Etcd {
        let password = ETCD_TEST_PASSWORD;
        let mut etcd = Self::start_with(&["--auth-token-ttl", &token_ttl_s.to_string()]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut c = manager::connect(std::slice::from_ref(&etcd.endpoint), None).await.unwrap();
            c.user_add("root", password, None).await.unwrap();
            c.user_grant_role("root", "root").await.unwrap();
            c.auth_enable().await.unwrap();
        });
        etcd.credentials = Some(EtcdCredentials::new("root", password));
        etcd
    }

    fn start_with(extra_args: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2);
        let (client, peer) =
            (format!("http://127.0.0.1:{}", ports[0]), format!("http://127.0.0.1:{}", ports[1]));
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/setup.sh installs it)");
        let etcd = Etcd { child, endpoint: format!("127.0.0.1:{}", ports[0]), credentials: None, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        loop {
            let ready = rt.block_on(async {
                let mut c = manager::connect(std::slice::from_ref(&etcd.endpoint), None).await.ok()?;
                c.get("/", None).await.ok()
            });
            if ready.is_some() {
                return etcd;
            }
            assert!(Instant::now() < deadline, "etcd did not answer in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a [`ManagedCluster`] runs its nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// In this process, each on its own runtime; killed by dropping the runtime.
    InProcess,
    /// `feedgraph serve --config <file>` child processes (the binary cargo built next
    /// to the test); killed with SIGKILL, stopped with SIGTERM.
    Process,
}

enum Running {
    InProcess { runtime: tokio::runtime::Runtime, node: Box<Node> },
    Process(Child),
}

/// Starts a node through `feedgraph_server::start` on a runtime of its own (2 workers,
/// as many as this machine has cores), as if in a process of its own: dropping the
/// runtime kills it.
pub fn start_on_own_runtime(config: Config) -> Result<(tokio::runtime::Runtime, Node), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("node-{}", config.node_id))
        .enable_all()
        .build()
        .unwrap();
    let (runtime, started) = std::thread::spawn(move || {
        let started = runtime.block_on(feedgraph_server::start(config));
        (runtime, started)
    })
    .join()
    .unwrap();
    match started {
        Ok(node) => Ok((runtime, node)),
        Err(e) => {
            runtime.shutdown_background();
            Err(e.to_string())
        }
    }
}

/// Nodes of one etcd cluster, each on its own runtime (or process) and fixed loopback
/// port.
pub struct ManagedCluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub shards: u32,
    kind: NodeKind,
    configs: BTreeMap<String, Config>,
    running: BTreeMap<String, Running>,
}

/// The `feedgraph` binary cargo built with this test: `target/<profile>/feedgraph`, next
/// to the `deps` directory holding the test executable. `cargo test --workspace` (the
/// README's `./dev test`) builds it, as the server package has integration tests.
pub fn feedgraph_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("test executable in target/<profile>/deps");
    let bin = dir.join(format!("feedgraph{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: build the workspace (./dev test) first", bin.display());
    bin
}

impl ManagedCluster {
    /// Nodes `ids` of a new cluster of `shards` shards × `replicas`, each configured by
    /// `tweak`; started in this process one after the other.
    pub fn start(
        ids: &[&str],
        shards: u32,
        replicas: u32,
        tweak: impl Fn(&str, &mut Config),
    ) -> ManagedCluster {
        Self::start_as(NodeKind::InProcess, ids, shards, replicas, tweak)
    }

    /// As [`ManagedCluster::start`], with nodes run as `kind`.
    pub fn start_as(
        kind: NodeKind,
        ids: &[&str],
        shards: u32,
        replicas: u32,
        tweak: impl Fn(&str, &mut Config),
    ) -> ManagedCluster {
        Self::start_on(Etcd::start(), kind, ids, shards, replicas, tweak)
    }

    /// As [`ManagedCluster::start_as`], on `etcd` (its credentials, if any, go into
    /// every node's configuration and the harness's own calls).
    pub fn start_on(
        etcd: Etcd,
        kind: NodeKind,
        ids: &[&str],
        shards: u32,
        replicas: u32,
        tweak: impl Fn(&str, &mut Config),
    ) -> ManagedCluster {
        crate::log_if_asked();
        let mut c = ManagedCluster {
            etcd,
            dir: tempfile::tempdir().unwrap(),
            shards,
            kind,
            configs: BTreeMap::new(),
            running: BTreeMap::new(),
        };
        for id in ids {
            c.add(id, replicas, &tweak);
        }
        c
    }

    /// Configures and starts a new node `id`.
    pub fn add(&mut self, id: &str, replicas: u32, tweak: &impl Fn(&str, &mut Config)) {
        let listen = format!("127.0.0.1:{}", free_ports(1)[0]);
        let mut c = node_config(self.dir.path(), id, &listen, self.shards);
        c.cluster.etcd = Some(self.etcd.url());
        c.cluster.replicas = replicas;
        if let Some(etcd) = &self.etcd.credentials {
            c.cluster.etcd_user = Some(etcd.user().to_owned());
            c.cluster.etcd_password_file = Some(self.etcd_password_file());
        }
        tweak(id, &mut c);
        self.configs.insert(id.to_owned(), c);
        self.start_node(id);
    }

    /// Starts (again) node `id` on its data directory and port.
    pub fn start_node(&mut self, id: &str) {
        assert!(!self.running.contains_key(id), "node {id} is running");
        let running = match self.kind {
            NodeKind::InProcess => self.start_in_process(id),
            NodeKind::Process => self.start_process(id),
        };
        self.running.insert(id.to_owned(), running);
    }

    /// Retries (bounded) while a killed predecessor's stores are still closing.
    fn start_in_process(&self, id: &str) -> Running {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match start_on_own_runtime(self.configs[id].clone()) {
                Ok((runtime, node)) => return Running::InProcess { runtime, node: Box::new(node) },
                Err(e) => {
                    assert!(Instant::now() < deadline, "node {id} did not start: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// `feedgraph serve --config <dir>/<id>.toml`, logging to `<dir>/<id>.log`; waits
    /// (bounded) until it listens, and panics with the end of its log if it exits.
    fn start_process(&self, id: &str) -> Running {
        let config = &self.configs[id];
        let path = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
        let log_path = self.dir.path().join(format!("{id}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut child = Command::new(feedgraph_binary())
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(config.listen).is_err() {
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                panic!(
                    "node {id} ({exited:?}) does not listen on {}; its log ends:\n{}",
                    config.listen,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Running::Process(child)
    }

    /// Kills node `id` as a crash does: its runtime dropped with everything on it, or
    /// its process sent SIGKILL — no lease revocation, no goodbye.
    pub fn kill(&mut self, id: &str) {
        match self.running.remove(id).expect("running node") {
            Running::InProcess { runtime, node } => {
                runtime.shutdown_background();
                drop(node);
            }
            Running::Process(mut child) => {
                child.kill().unwrap();
                child.wait().unwrap();
            }
        }
    }

    /// Stops node `id` gracefully (it leaves the cluster first): `Node::shutdown`, or
    /// SIGTERM to its process (bounded wait, then SIGKILL).
    pub fn stop(&mut self, id: &str) {
        match self.running.remove(id).expect("running node") {
            Running::InProcess { runtime, node } => {
                runtime.block_on(node.shutdown()).unwrap();
                runtime.shutdown_timeout(Duration::from_secs(5));
            }
            Running::Process(mut child) => {
                let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
                assert!(sent.as_ref().is_ok_and(|s| s.success()), "kill -TERM node {id}: {sent:?}");
                let deadline = Instant::now() + Duration::from_secs(30);
                while child.try_wait().unwrap().is_none() {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("node {id} did not stop within 30 s of SIGTERM");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// The in-process node `id` (panics for a process: use gRPC or [`Self::stored`]).
    pub fn node(&self, id: &str) -> &Node {
        match &self.running[id] {
            Running::InProcess { node, .. } => node,
            Running::Process(_) => panic!("node {id} is a process"),
        }
    }

    /// What every node stores, by node and shard, to check from the data itself: the
    /// stores of running in-process nodes; or, for processes, each node's data directory
    /// opened once every process has been killed. Killed together, not stopped one by
    /// one: a graceful stop hands its leaderships over, and the new leaders' epoch
    /// records would then differ between the nodes still up and those already gone.
    pub fn stored(&mut self) -> BTreeMap<String, BTreeMap<u32, Arc<Shard>>> {
        match self.kind {
            NodeKind::InProcess => self
                .running
                .keys()
                .map(|id| {
                    let replicas = self.node(id).replicas();
                    let stores =
                        (0..self.shards).filter_map(|s| Some((s, replicas.get(s)?.store()?))).collect();
                    (id.clone(), stores)
                })
                .collect(),
            NodeKind::Process => {
                for id in self.running() {
                    self.kill(&id);
                }
                self.configs
                    .iter()
                    .map(|(id, config)| {
                        let shards = feedgraph_server::open_shards(config).unwrap();
                        (
                            id.clone(),
                            shards.into_iter().enumerate().map(|(s, store)| (s as u32, store)).collect(),
                        )
                    })
                    .collect()
            }
        }
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: &str) -> &std::path::Path {
        &self.configs[id].data_dir
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    pub fn running(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    pub fn addr(&self, id: &str) -> String {
        self.configs[id].listen.to_string()
    }

    /// The etcd password, in a file of the cluster's directory (the nodes' config names
    /// it; the environment variable would be shared by every in-process node).
    fn etcd_password_file(&self) -> PathBuf {
        let path = self.dir.path().join("etcd-password");
        if !path.exists() {
            std::fs::write(&path, format!("{}\n", ETCD_TEST_PASSWORD)).unwrap();
        }
        path
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.configs.values().next().unwrap().cluster.name)
    }

    /// The cluster as `feedgraph cluster status` reads it.
    pub async fn status(&self) -> ClusterStatus {
        let mut client =
            manager::connect(std::slice::from_ref(&self.etcd.endpoint), self.etcd.credentials.as_ref())
                .await
                .unwrap();
        ClusterStatus::read(&mut client, &self.keys(), &crate::admin_credentials()).await.unwrap()
    }

    /// Waits until every shard has its leader and followers in their assigned roles,
    /// readable, and no balancing move is left; panics after `timeout`.
    pub async fn converged(&self, timeout: Duration) -> ClusterStatus {
        self.wait_for(timeout, "converged", ClusterStatus::converged).await
    }

    /// Waits until the cluster's status satisfies `cond` (named `what` in the panic
    /// after `timeout`, with the last shard map).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "not {what} after {timeout:?}: {:#?}", s.view);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until, on every shard, every member has applied the leader's latest
    /// sequence (as the nodes report it); panics after `timeout`.
    pub async fn caught_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await;
            let sequence = |node: &str, shard: u32| {
                status.report(node, shard).filter(|r| r.has_data).map(|r| r.applied_sequence)
            };
            let behind: Vec<(u32, String, Option<u64>, Option<u64>)> = (0..self.shards)
                .flat_map(|shard| {
                    let a = status.view.shards[shard as usize].clone();
                    let leader_seq = a.as_ref().and_then(|a| sequence(&a.leader, shard));
                    a.into_iter().flat_map(|a| a.followers).filter_map(move |f| {
                        let seq = sequence(&f, shard);
                        (seq.is_none() || seq != leader_seq).then_some((shard, f, seq, leader_seq))
                    })
                })
                .collect();
            if status.converged() && behind.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not caught up after {timeout:?}: {behind:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ManagedCluster {
    fn drop(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            match r {
                Running::InProcess { runtime, node } => {
                    runtime.shutdown_background();
                    drop(node);
                }
                Running::Process(mut child) => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}
