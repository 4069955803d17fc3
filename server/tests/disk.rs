//! A bad disk under one shard: the node runs as a child process in its own user and
//! mount namespaces (`unshare -rm`, nothing leaks to the machine's mounts), with shard
//! 1's directory on a small tmpfs. Writes to shard 1 fill it; the shard must stop
//! taking writes with a clear status, keep serving what it acknowledged, show the fault
//! in its replica status, and leave shard 0 alone. Then the node is killed, the tmpfs
//! grown, and a restarted node must hold every acknowledged write and take writes
//! again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use feedgraph_model::{UserId, shard_of};
use feedgraph_proto::pb::internal as ipb;
use feedgraph_proto::pb::v1 as pb;
use pb::graph_service_client::GraphServiceClient;
use pb::mutation::Op;
use tonic::transport::Channel;

const SHARDS: u32 = 2;
const NOW: i64 = 1_800_000_000_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A user whose content lives on `shard`.
fn owner_on(shard: u32) -> u64 {
    (1..10_000u64).find(|u| shard_of(UserId::new(*u).unwrap(), SHARDS) == shard).unwrap()
}

fn m(op: Op) -> pb::Mutation {
    pb::Mutation { op: Some(op) }
}

fn board(id: u64, owner: u64) -> pb::Mutation {
    m(Op::UpsertBoard(pb::UpsertBoard { board_id: id, owner_id: owner, name: format!("b{id}") }))
}

fn pin(id: u64, owner: u64, board: u64) -> pb::Mutation {
    m(Op::UpsertPin(pb::UpsertPin {
        pin_id: id,
        owner_id: owner,
        board_id: board,
        created_at_ms: NOW,
        topic_ids: Vec::new(),
        signals: Some(pb::PinSignals { quality: 0.5, saves: 1, clicks: 1, closeups: 1 }),
    }))
}

async fn write(
    g: &mut GraphServiceClient<Channel>,
    mutations: Vec<pb::Mutation>,
) -> Result<(), tonic::Status> {
    g.write(pb::WriteRequest { mutations, ack: pb::Ack::Sync as i32, request_id: String::new() })
        .await
        .map(|_| ())
}

async fn connect(addr: &str, within: Duration) -> GraphServiceClient<Channel> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut g) = GraphServiceClient::connect(format!("http://{addr}")).await {
            // Serving, not only listening: a read of an unknown pin answers.
            if g.get_pin(get(owner_on(0), 1)).await.is_ok() {
                return g;
            }
        }
        assert!(Instant::now() < deadline, "no node at {addr} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn get(owner: u64, pin: u64) -> pb::GetPinRequest {
    pb::GetPinRequest { pin: Some(pb::PinRef { pin_id: pin, owner_id: owner }) }
}

async fn replica_status(addr: &str) -> Vec<ipb::ReplicaStatus> {
    let mut admin =
        ipb::admin_service_client::AdminServiceClient::connect(format!("http://{addr}")).await.unwrap();
    admin.list_replicas(ipb::ListReplicasRequest {}).await.unwrap().into_inner().replicas
}

/// Kills the namespace's processes when the test ends, however it ends: the shell
/// (or the second node it became) and the first node, which runs in its background.
struct Namespace {
    shell: Child,
    first_node: std::path::PathBuf,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.first_node) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).stderr(Stdio::null()).status();
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

fn kill_node(pid_file: &Path) {
    let pid = std::fs::read_to_string(pid_file).unwrap();
    let status = Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_one_shards_writes_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shard_dir = data.join("shard-001");
    std::fs::create_dir_all(&shard_dir).unwrap();
    let (grpc, metrics) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{grpc}");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nlisten = \"{addr}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\nshards = {SHARDS}\n\
             [store]\nwrite_buffer_mb = 1\n"
        ),
    )
    .unwrap();
    let pid_file = dir.path().join("node.pid");
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    // The first node runs until killed; then the tmpfs grows and a second node starts
    // on the same data, in the same namespace.
    let script = format!(
        "set -e; mount -t tmpfs -o size=8m tmpfs {shard_dir:?}; \
         {bin:?} serve --config {config:?} & echo $! > {pid_file:?}; wait || true; \
         mount -o remount,size=256m {shard_dir:?}; exec {bin:?} serve --config {config:?}",
        bin = env!("CARGO_BIN_EXE_feedgraph"),
    );
    let child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs the node in its own mount namespace");
    let _namespace = Namespace { shell: child, first_node: pid_file.clone() };
    let mut g = connect(&addr, Duration::from_secs(30)).await;

    let (full, fine) = (owner_on(1), owner_on(0));
    write(&mut g, vec![board(full * 10, full), board(fine * 10, fine)]).await.unwrap();
    // Fill shard 1: 500 pins (~100 KB of WAL) a request, each fsync'ed, until refused.
    let mut acknowledged: Vec<u64> = Vec::new();
    let mut next = 1_000_000u64;
    let refusal = loop {
        assert!(next < 1_000_000 + 500 * 400, "8 MiB never filled");
        let batch: Vec<u64> = (next..next + 500).collect();
        next += 500;
        match write(&mut g, batch.iter().map(|p| pin(*p, full, full * 10)).collect()).await {
            Ok(()) => acknowledged.extend(batch),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("stopped taking writes"), "{}", refusal.message());
    assert!(!acknowledged.is_empty(), "the first write was refused: the tmpfs is too small to test with");
    eprintln!("{} pins acknowledged before the disk filled: {}", acknowledged.len(), refusal.message());
    // Stopped, not flapping: the next write is refused the same way, at once.
    let again = write(&mut g, vec![pin(next, full, full * 10)]).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable);
    // Reads still serve what was acknowledged.
    for p in acknowledged.iter().step_by(97) {
        let got = g.get_pin(get(full, *p)).await.unwrap().into_inner();
        assert!(got.found, "acknowledged pin {p} not served");
    }
    // The other shard takes writes.
    write(&mut g, vec![pin(1, fine, fine * 10)]).await.unwrap();
    // The replica status says which shard and why.
    let status = replica_status(&addr).await;
    let fault = |shard: u32| status.iter().find(|r| r.shard == shard).unwrap().fault.clone();
    assert!(fault(1).contains("No space left on device"), "{:?}", fault(1));
    assert_eq!(fault(0), "");

    // A crash, then space: the restarted node has every acknowledged write.
    kill_node(&pid_file);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut g = connect(&addr, Duration::from_secs(60)).await;
    for p in &acknowledged {
        let got = g.get_pin(get(full, *p)).await.unwrap().into_inner();
        assert!(got.found, "acknowledged pin {p} lost");
    }
    write(&mut g, vec![pin(next + 1, full, full * 10)]).await.unwrap();
    assert_eq!(replica_status(&addr).await.iter().map(|r| r.fault.as_str()).collect::<Vec<_>>(), ["", ""]);
}

/// A shard whose store does not open — here its pin records, read at open, sit on a
/// corrupted file — is held offline and reported, and the node serves its other shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_store_does_not_open_is_held_offline_while_the_others_serve() {
    use feedgraph_model::{Board, BoardId, Durability, Mutation, Pin, PinId};
    let dir = tempfile::tempdir().unwrap();
    let config = feedgraph_server::Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        shards: SHARDS,
        ..Default::default()
    };
    let (good, bad) = (owner_on(0), owner_on(1));
    {
        let shards = feedgraph_server::open_shards(&config).unwrap();
        for (shard, owner) in [(0, good), (1, bad)] {
            let o = UserId::new(owner).unwrap();
            let b = BoardId::new(owner * 10).unwrap();
            let mut muts = vec![Mutation::UpsertBoard(Board { id: b, owner: o, name: "b".into() })];
            muts.extend((1..=500).map(|p| {
                Mutation::UpsertPin(Pin {
                    id: PinId::new(owner * 1000 + p).unwrap(),
                    owner: o,
                    board: b,
                    created_at_ms: NOW,
                    topics: Vec::new(),
                    signals: Default::default(),
                })
            }));
            shards[shard].write(&muts, Durability::Sync).unwrap();
            shards[shard].flush().unwrap();
        }
    }
    // Flip bytes in the first data block of every table file of shard 1.
    for entry in std::fs::read_dir(dir.path().join("shard-001")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "sst") {
            let mut bytes = std::fs::read(&path).unwrap();
            for b in &mut bytes[8..40] {
                *b ^= 0x5a;
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }

    let node = feedgraph_server::start(config).await.unwrap();
    let addr = node.grpc_addr().to_string();
    let mut g = connect(&addr, Duration::from_secs(10)).await;
    assert!(g.get_pin(get(good, good * 1000 + 7)).await.unwrap().into_inner().found);
    let refused = g.get_pin(get(bad, bad * 1000 + 7)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    write(&mut g, vec![pin(good * 1000 + 900, good, good * 10)]).await.unwrap();
    let refused = write(&mut g, vec![pin(bad * 1000 + 900, bad, bad * 10)]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let status = replica_status(&addr).await;
    let of = |shard: u32| status.iter().find(|r| r.shard == shard).unwrap();
    assert!(of(1).fault.contains("orruption"), "{:?}", of(1));
    assert!(!of(1).has_data && of(1).state.contains("did not open"), "{:?}", of(1));
    assert!(of(0).fault.is_empty() && of(0).has_data);
    node.shutdown().await.unwrap();
}
