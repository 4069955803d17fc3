//! A cluster managed through a real etcd: [`Etcd`] (a child process on free loopback
//! ports and a temporary directory, killed on drop) and [`ManagedCluster`] (nodes
//! started through `feedgraph_server::start` with `cluster.etcd`, each on its own
//! runtime, so that a test can kill one by aborting its runtime — a crash, as far as
//! the rest of the cluster can tell).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use feedgraph_cluster::manager::{self, ClusterStatus, Keys};
use feedgraph_server::{Config, Node};

use crate::{free_ports, node_config};

/// etcd on 127.0.0.1, stopped on drop.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd (Debian's `etcd-server`, installed by `scripts/setup.sh`) and waits
    /// (bounded) until it answers.
    pub fn start() -> Etcd {
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
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/setup.sh installs it)");
        let etcd = Etcd { child, endpoint: format!("127.0.0.1:{}", ports[0]), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        loop {
            let ready = rt.block_on(async {
                let mut c = manager::connect(std::slice::from_ref(&etcd.endpoint)).await.ok()?;
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

struct Running {
    runtime: tokio::runtime::Runtime,
    node: Node,
}

/// Nodes of one etcd cluster, each on its own runtime and fixed loopback port.
pub struct ManagedCluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub shards: u32,
    configs: BTreeMap<String, Config>,
    running: BTreeMap<String, Running>,
}

impl ManagedCluster {
    /// Nodes `ids` of a new cluster of `shards` shards × `replicas`, each configured by
    /// `tweak`; started one after the other.
    pub fn start(
        ids: &[&str],
        shards: u32,
        replicas: u32,
        tweak: impl Fn(&str, &mut Config),
    ) -> ManagedCluster {
        crate::log_if_asked();
        let mut c = ManagedCluster {
            etcd: Etcd::start(),
            dir: tempfile::tempdir().unwrap(),
            shards,
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
        tweak(id, &mut c);
        self.configs.insert(id.to_owned(), c);
        self.start_node(id);
    }

    /// Starts (again) node `id` on its data directory and port, retrying (bounded)
    /// while a killed predecessor's stores are still closing.
    pub fn start_node(&mut self, id: &str) {
        assert!(!self.running.contains_key(id), "node {id} is running");
        let config = self.configs[id].clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(format!("node-{id}"))
                .enable_all()
                .build()
                .unwrap();
            let c = config.clone();
            let (runtime, started) = std::thread::spawn(move || {
                let started = runtime.block_on(feedgraph_server::start(c));
                (runtime, started)
            })
            .join()
            .unwrap();
            match started {
                Ok(node) => {
                    self.running.insert(id.to_owned(), Running { runtime, node });
                    return;
                }
                Err(e) => {
                    runtime.shutdown_background();
                    assert!(Instant::now() < deadline, "node {id} did not start: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Kills node `id`: its runtime is dropped with everything on it (no lease
    /// revocation, no goodbye), as if the process died.
    pub fn kill(&mut self, id: &str) {
        let Running { runtime, node } = self.running.remove(id).expect("running node");
        runtime.shutdown_background();
        drop(node);
    }

    /// Stops node `id` gracefully (it leaves the cluster first).
    pub fn stop(&mut self, id: &str) {
        let Running { runtime, node } = self.running.remove(id).expect("running node");
        runtime.block_on(node.shutdown()).unwrap();
        runtime.shutdown_timeout(Duration::from_secs(5));
    }

    pub fn node(&self, id: &str) -> &Node {
        &self.running[id].node
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

    pub fn keys(&self) -> Keys {
        Keys::new(&self.configs.values().next().unwrap().cluster.name)
    }

    /// The cluster as `feedgraph cluster status` reads it.
    pub async fn status(&self) -> ClusterStatus {
        let mut client = manager::connect(std::slice::from_ref(&self.etcd.endpoint)).await.unwrap();
        ClusterStatus::read(&mut client, &self.keys()).await.unwrap()
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

    /// Waits until, on every shard, every running replica has applied the leader's
    /// latest sequence; panics after `timeout`.
    pub async fn caught_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await;
            let behind: Vec<(u32, String, u64, u64)> = (0..self.shards)
                .flat_map(|shard| {
                    let a = status.view.shards[shard as usize].clone();
                    let leader_seq = a.as_ref().and_then(|a| self.sequence(&a.leader, shard));
                    a.into_iter().flat_map(|a| a.followers).filter_map(move |f| {
                        let seq = self.sequence(&f, shard)?;
                        (Some(seq) != leader_seq).then(|| (shard, f, seq, leader_seq.unwrap_or(0)))
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

    /// The latest sequence of `id`'s replica of `shard`, if it runs and has data.
    pub fn sequence(&self, id: &str, shard: u32) -> Option<u64> {
        self.running.get(id)?.node.replicas().get(shard)?.store().map(|s| s.latest_sequence())
    }
}

impl Drop for ManagedCluster {
    fn drop(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.runtime.shutdown_background();
            drop(r.node);
        }
    }
}
