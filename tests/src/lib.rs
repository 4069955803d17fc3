//! Cluster tests for feedgraph: real nodes started in-process through the same
//! `feedgraph_server::start` as the binary, talking gRPC on 127.0.0.1.
//!
//! Owns: [`Cluster`], a harness that writes a placement for nodes on free loopback
//! ports, starts, stops and restarts them on their own data directories, and offers
//! clients and digests; every test stops what it started (dropping a `Cluster` stops
//! its nodes' servers with the runtime, and its directories are removed); and
//! [`managed::ManagedCluster`], nodes of a cluster managed through a real etcd, run in
//! this process or as `feedgraph serve` child processes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

pub mod managed;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use feedgraph_cluster::Role;
use feedgraph_graph_store::Digest;
use feedgraph_proto::auth::{AuthChannel as Channel, Bearer, Secret};
use feedgraph_proto::pb::{internal as ipb, v1 as pb};
use feedgraph_server::{Config, Node};

/// With `FEEDGRAPH_TEST_LOG` set (an env-filter, e.g. `debug`), the nodes log to
/// stderr.
pub fn log_if_asked() {
    if let Ok(filter) = std::env::var("FEEDGRAPH_TEST_LOG") {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .finish();
        // Several tests of one binary ask: the first one wins.
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}

/// Free TCP ports on 127.0.0.1 (bound, read, released), below the kernel's ephemeral
/// range: a port the kernel hands out (port 0) can be taken by any outgoing connection
/// (a node's own, to another node or to etcd) between this call and the node's bind,
/// and a restarted node could not get its port back.
/// A node's `/metrics` text (HTTP/1.1 GET), bounded in time.
pub async fn metrics_text(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bounded = Duration::from_secs(5);
    let mut s = tokio::time::timeout(bounded, tokio::net::TcpStream::connect(addr))
        .await
        .expect("metrics port answers in time")
        .expect("metrics port accepts");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request sent");
    let mut out = String::new();
    tokio::time::timeout(bounded, s.read_to_string(&mut out))
        .await
        .expect("metrics read in time")
        .expect("metrics read");
    out
}

pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|low| *low > 12_000)
        .unwrap_or(32_768);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..10_000 {
        if listeners.len() == n {
            break;
        }
        // splitmix64 of a per-process counter: different ports for concurrent tests.
        let mut x =
            seed.wrapping_add(DRAWS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let port = 10_000 + x % (ephemeral_low - 10_000);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(l);
        }
    }
    assert_eq!(listeners.len(), n, "no {n} free ports below {ephemeral_low}");
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// The admin token of every test cluster: nodes accept it and send it to each other,
/// and the harness's clients send it.
pub const ADMIN_TOKEN: &str = "feedgraph-test-admin-token-0001";

/// What the harness's clients send.
pub fn admin_bearer() -> Bearer {
    Bearer::new(Some(&Secret::new(ADMIN_TOKEN).unwrap()))
}

/// [`admin_bearer`], plaintext.
pub fn admin_credentials() -> feedgraph_proto::auth::Credentials {
    feedgraph_proto::auth::Credentials::new(admin_bearer(), None)
}

/// `<root>/admin.tokens` holding [`ADMIN_TOKEN`], readable by this user only.
pub fn admin_token_file(root: &Path) -> PathBuf {
    let path = root.join("admin.tokens");
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// A test node's configuration: data under `<root>/<id>` (created, with the cursor
/// key every test node shares, so that a cursor works on every broker), gRPC on
/// `listen`, metrics on a free port, small memory, short polls, no per-owner caps, and
/// [`ADMIN_TOKEN`] from a token file (so a node in a child process has it too).
pub fn node_config(root: &Path, id: &str, listen: &str, shards: u32) -> Config {
    let data_dir = root.join(id);
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("cursor.key"), [7u8; 32]).unwrap();
    let admin_tokens = admin_token_file(root);
    let mut c = Config {
        data_dir,
        listen: listen.parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards,
        node_id: id.to_owned(),
        ..Config::default()
    };
    c.store.block_cache_mb = 16;
    c.store.write_buffers_total_mb = 64;
    c.replication.poll_wait_ms = 200;
    c.feed.max_per_owner = 1000;
    c.feed.max_per_board = 1000;
    c.auth.admin_tokens_file = Some(admin_tokens);
    c
}

/// One group of shards in a placement: (shards, leader, followers, epoch).
pub type Group<'a> = (&'a str, &'a str, &'a [&'a str], u64);

/// A set of nodes of one placement.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub shards: u32,
    pub addresses: BTreeMap<String, String>,
    configs: BTreeMap<String, Config>,
    nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// Nodes `ids`, with the replicas `groups` place (ids absent from every group hold
    /// none: pure brokers), each configured by `tweak(id, config)`; started.
    pub async fn start(
        ids: &[&str],
        shards: u32,
        groups: &[Group<'_>],
        tweak: impl Fn(&str, &mut Config),
    ) -> Cluster {
        log_if_asked();
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(ids.len());
        let addresses: BTreeMap<String, String> =
            ids.iter().zip(ports).map(|(id, p)| (id.to_string(), format!("127.0.0.1:{p}"))).collect();
        let placement = dir.path().join("placement.toml");
        write_placement(&placement, shards, &addresses, groups);
        let mut configs = BTreeMap::new();
        for (id, a) in &addresses {
            let mut c = node_config(dir.path(), id, a, shards);
            c.placement = Some(placement.clone());
            c.replication.map_refresh_ms = 200;
            tweak(id, &mut c);
            configs.insert(id.clone(), c);
        }
        let mut cluster = Cluster { dir, shards, addresses, configs, nodes: BTreeMap::new() };
        for id in ids {
            cluster.restart(id).await;
        }
        cluster
    }

    /// Starts (again) the node `id` on its data directory.
    pub async fn restart(&mut self, id: &str) {
        if let Err(e) = self.try_restart(id).await {
            panic!("node {id} did not start: {e}");
        }
    }

    /// Starts (again) the node `id`; its start-up error, if it refuses to start.
    pub async fn try_restart(&mut self, id: &str) -> Result<(), String> {
        assert!(!self.nodes.contains_key(id), "node {id} is running");
        let config = self.configs[id].clone();
        // A port just released by a stopped node can linger briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = loop {
            match feedgraph_server::start(config.clone()).await {
                Ok(n) => break n,
                Err(e) if Instant::now() < deadline && e.to_string().contains("binding") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(format!("{e:#}")),
            }
        };
        self.nodes.insert(id.to_owned(), node);
        Ok(())
    }

    /// Rewrites the placement every node reads at its next start (as an operator
    /// edits the file).
    pub fn set_placement(&self, groups: &[Group<'_>]) {
        write_placement(&self.dir.path().join("placement.toml"), self.shards, &self.addresses, groups);
    }

    /// Stops node `id` (gracefully: its stores are closed when this returns).
    pub async fn stop(&mut self, id: &str) {
        let node = self.nodes.remove(id).unwrap();
        node.shutdown().await.unwrap();
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids {
            self.stop(&id).await;
        }
    }

    pub fn node(&self, id: &str) -> &Node {
        &self.nodes[id]
    }

    pub fn config(&self, id: &str) -> &Config {
        &self.configs[id]
    }

    pub fn addr(&self, id: &str) -> String {
        self.addresses[id].clone()
    }

    /// A connected channel to node `id` whose requests carry [`ADMIN_TOKEN`], in
    /// plaintext (a test of a cluster with TLS builds its own, see `tests/tls.rs`).
    pub async fn channel(&self, id: &str) -> Channel {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr(id)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        feedgraph_proto::auth::with_bearer(channel, admin_bearer())
    }

    pub async fn graph(&self, id: &str) -> pb::graph_service_client::GraphServiceClient<Channel> {
        pb::graph_service_client::GraphServiceClient::new(self.channel(id).await)
    }

    pub async fn feeds(&self, id: &str) -> pb::feed_service_client::FeedServiceClient<Channel> {
        pb::feed_service_client::FeedServiceClient::new(self.channel(id).await)
    }

    pub async fn admin(&self, id: &str) -> ipb::admin_service_client::AdminServiceClient<Channel> {
        ipb::admin_service_client::AdminServiceClient::new(self.channel(id).await)
    }

    pub async fn shard_client(&self, id: &str) -> ipb::shard_service_client::ShardServiceClient<Channel> {
        ipb::shard_service_client::ShardServiceClient::new(self.channel(id).await)
    }

    /// Moves `id`'s replica of `shard` (through the admin RPC, as an operator would).
    pub async fn transition(
        &self,
        id: &str,
        shard: u32,
        role: Role,
    ) -> Result<ipb::ReplicaStatus, tonic::Status> {
        let r = self
            .admin(id)
            .await
            .transition_replica(feedgraph_cluster::service::transition_request(shard, &role, false))
            .await?;
        Ok(r.into_inner().status.unwrap_or_default())
    }

    /// The latest sequence of `id`'s replica of `shard`.
    pub fn sequence(&self, id: &str, shard: u32) -> u64 {
        self.nodes[id].replicas().get(shard).and_then(|r| r.store()).map_or(0, |s| s.latest_sequence())
    }

    /// Waits until every replica of `shard` on `followers` has applied the latest
    /// sequence of `leader`'s; panics after `timeout`.
    pub async fn caught_up(&self, leader: &str, followers: &[&str], shard: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let target = self.sequence(leader, shard);
            if followers.iter().all(|f| self.sequence(f, shard) == target) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "shard {shard}: followers {followers:?} at {:?} ({:?}), leader {leader} at {target}",
                followers.iter().map(|f| self.sequence(f, shard)).collect::<Vec<_>>(),
                followers
                    .iter()
                    .map(|f| self.nodes[*f].replicas().get(shard).map(|r| r.status().state))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The digest of `id`'s replica of `shard` (every column family and the attribute
    /// rows).
    pub async fn digest(&self, id: &str, shard: u32) -> Digest {
        let store = self.nodes[id].replicas().get(shard).and_then(|r| r.store()).expect("replica with data");
        tokio::task::spawn_blocking(move || store.digest().unwrap()).await.unwrap()
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.configs[id].data_dir.clone()
    }
}

fn write_placement(path: &Path, shards: u32, addresses: &BTreeMap<String, String>, groups: &[Group<'_>]) {
    let mut text = format!("shards = {shards}\n[nodes]\n");
    for (id, a) in addresses {
        text.push_str(&format!("{id} = \"{a}\"\n"));
    }
    for (spec, leader, followers, epoch) in groups {
        let f: Vec<String> = followers.iter().map(|f| format!("\"{f}\"")).collect();
        text.push_str(&format!(
            "[[replicas]]\nshards = \"{spec}\"\nleader = \"{leader}\"\nfollowers = [{}]\nepoch = {epoch}\n",
            f.join(", ")
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Mutations on the wire, for tests and benchmarks.
pub mod muts {
    use super::pb;
    use pb::mutation::Op;

    pub fn m(op: Op) -> pb::Mutation {
        pb::Mutation { op: Some(op) }
    }

    pub fn board(id: u64, owner: u64) -> pb::Mutation {
        m(Op::UpsertBoard(pb::UpsertBoard { board_id: id, owner_id: owner, name: format!("b{id}") }))
    }

    pub fn user(id: u64) -> pb::Mutation {
        m(Op::UpsertUser(pb::UpsertUser { user_id: id, username: format!("u{id}") }))
    }

    pub fn pin(
        id: u64,
        owner: u64,
        board: u64,
        created_at_ms: i64,
        topics: Vec<u32>,
        quality: f32,
    ) -> pb::Mutation {
        m(Op::UpsertPin(pb::UpsertPin {
            pin_id: id,
            board_id: board,
            owner_id: owner,
            created_at_ms,
            topic_ids: topics,
            signals: Some(pb::PinSignals { quality, saves: (id % 50) as u32, clicks: 1, closeups: 2 }),
        }))
    }

    pub fn follow_user(follower: u64, user: u64) -> pb::Mutation {
        m(Op::Follow(pb::Follow {
            follower_id: follower,
            target: Some(pb::FollowTarget { target: Some(pb::follow_target::Target::UserId(user)) }),
        }))
    }

    pub fn follow_topic(follower: u64, topic: u32) -> pb::Mutation {
        m(Op::Follow(pb::Follow {
            follower_id: follower,
            target: Some(pb::FollowTarget { target: Some(pb::follow_target::Target::TopicId(topic)) }),
        }))
    }

    pub fn write(mutations: Vec<pb::Mutation>, ack: pb::Ack) -> pb::WriteRequest {
        pb::WriteRequest { mutations, ack: ack as i32, request_id: String::new() }
    }
}

/// Certificates made at run time for TLS tests: a CA, and certificates it signs for
/// 127.0.0.1 and localhost.
pub mod pki {
    use std::path::{Path, PathBuf};

    pub struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    /// A certificate chain and its key, written to `<dir>/<name>.crt` and `.key`.
    #[derive(Clone, Debug)]
    pub struct Pair {
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let issuer =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
            Ca { issuer }
        }

        /// Writes the CA's certificate to `<dir>/<name>.pem`.
        pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let path = dir.join(format!("{name}.pem"));
            std::fs::write(&path, self.issuer.pem()).unwrap();
            path
        }

        /// A certificate for 127.0.0.1 and localhost named `name`, signed by this CA.
        pub fn issue(&self, dir: &Path, name: &str) -> Pair {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params =
                rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let pair = Pair { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
            std::fs::write(&pair.cert, cert.pem()).unwrap();
            std::fs::write(&pair.key, key.serialize_pem()).unwrap();
            pair
        }
    }
}
