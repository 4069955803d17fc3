//! What the load tool sends: feed reads for users drawn by activity, writes, the
//! generated graph as write batches (over gRPC or to a file), and viewers with a chosen
//! fanout.

use std::time::Duration;

use anyhow::{Context, bail};
use feedgraph_model::{FollowTarget, Mutation, UserId};
use feedgraph_proto::auth::{AuthChannel, Credentials};
use feedgraph_proto::pb::v1 as pb;
use prost::Message;
use rand::Rng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;

use crate::engine::Outcome;
use crate::generator::{Graph, user_context};

/// gRPC clients of one target.
#[derive(Clone, Debug)]
pub struct Client {
    pub feed: pb::feed_service_client::FeedServiceClient<AuthChannel>,
    pub graph: pb::graph_service_client::GraphServiceClient<AuthChannel>,
}

/// Connects, failing with a clear message (before any load starts) when the target
/// does not answer within `timeout`; with `credentials` (a token on every request,
/// TLS when given).
pub async fn connect(addr: &str, timeout: Duration, credentials: Credentials) -> anyhow::Result<Client> {
    let url = credentials.url(addr);
    let channel = credentials
        .endpoint(addr)
        .with_context(|| format!("`{addr}` is not an address"))?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach a feedgraph service at {url}"))?;
    let channel = credentials.authorize(channel);
    Ok(Client {
        feed: pb::feed_service_client::FeedServiceClient::new(channel.clone()),
        graph: pb::graph_service_client::GraphServiceClient::new(channel),
    })
}

/// Draws viewers with probability proportional to their follow count: active users
/// follow more and open their feeds more, and they are the ones whose feeds fan out to
/// celebrities.
#[derive(Clone, Debug)]
pub struct UserPicker {
    users: Vec<u64>,
    weights: WeightedIndex<u64>,
}

impl UserPicker {
    pub fn from_graph(graph: &Graph) -> anyhow::Result<Self> {
        let mut counts: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for (u, _) in &graph.follows {
            *counts.entry(u.get()).or_default() += 1;
        }
        let mut users: Vec<(u64, u64)> = counts.into_iter().collect();
        users.sort_unstable();
        if users.is_empty() {
            bail!("the graph has no follows: no feed to read");
        }
        let weights = WeightedIndex::new(users.iter().map(|(_, c)| *c)).context("follow-count weights")?;
        Ok(Self { users: users.into_iter().map(|(u, _)| u).collect(), weights })
    }

    /// A single viewer (the fanout sweep).
    pub fn single(user: u64) -> anyhow::Result<Self> {
        Ok(Self { users: vec![user], weights: WeightedIndex::new([1u64]).context("weights")? })
    }

    pub fn pick(&self, rng: &mut impl Rng) -> u64 {
        self.users[self.weights.sample(rng)]
    }
}

fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

/// The service's own counters, from its Prometheus endpoint: CPU seconds of the process
/// and feed requests answered (any status).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServiceCounters {
    pub cpu_seconds: f64,
    pub feed_requests: u64,
}

impl ServiceCounters {
    /// Reads `http://addr/metrics`; `None` when it cannot be read or lacks the CPU counter.
    pub async fn scrape(addr: &str) -> Option<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: feedgraph\r\n\r\n").await.ok()?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await.ok()?;
            Some(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(3), read).await.ok()??;
        Self::parse(&body)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut out = ServiceCounters::default();
        let mut cpu = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            if name == "feedgraph_process_cpu_seconds_total" {
                cpu = Some(v);
            } else if name.starts_with("feedgraph_grpc_requests_total{")
                && (name.contains("method=\"GetFollowingFeed\"") || name.contains("method=\"GetHomeFeed\""))
            {
                out.feed_requests += v as u64;
            }
        }
        out.cpu_seconds = cpu?;
        Some(out)
    }
}

/// One feed page for `user`, with their synthetic `user.*` context, ranked by `ranking`
/// (the service's default when `None`).
pub async fn read_feed(
    mut client: Client,
    user: u64,
    home: bool,
    page_size: u32,
    ranking: Option<String>,
) -> Outcome {
    let features = UserId::new(user)
        .map(|u| user_context(u, 42).into_iter().map(|(k, v)| (k.to_string(), v as f32)).collect())
        .unwrap_or_default();
    let request = pb::FeedRequest {
        user_id: user,
        page_size,
        features,
        ranking: ranking.unwrap_or_default(),
        ..Default::default()
    };
    let response = if home {
        client.feed.get_home_feed(request).await
    } else {
        client.feed.get_following_feed(request).await
    };
    match response {
        Ok(r) => {
            let stats = r.into_inner().stats.unwrap_or_default();
            Outcome {
                error: None,
                partial: stats.partial,
                fallback: stats.scoring == pb::Scoring::LightFallback as i32,
                scanned: stats.candidates_scanned,
                units: 0,
            }
        }
        Err(s) => Outcome { error: Some(code_name(&s)), ..Outcome::default() },
    }
}

/// One write batch; `units` is the edges it carries.
pub async fn write(mut client: Client, mutations: Vec<pb::Mutation>, units: u64) -> Outcome {
    let request = pb::WriteRequest { mutations, ack: pb::Ack::Async as i32, request_id: String::new() };
    match client.graph.write(request).await {
        Ok(_) => Outcome { units, ..Outcome::default() },
        Err(s) => Outcome { error: Some(code_name(&s)), ..Outcome::default() },
    }
}

/// Sends `batches` (from [`write_batches`]) with `concurrency` requests in flight until
/// every one has been answered. Pins name their boards, so every batch before the first
/// pin (users, boards) is committed before a pin batch is sent — else the service
/// rightly answers NOT_FOUND.
pub async fn ingest(
    client: Client,
    batches: Vec<(Vec<pb::Mutation>, u64)>,
    concurrency: usize,
    progress: bool,
) -> crate::engine::Report {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let total = batches.len() as u64;
    let first_pin_batch = batches
        .iter()
        .position(|(m, _)| m.iter().any(|m| matches!(m.op, Some(pb::mutation::Op::UpsertPin(_)))))
        .unwrap_or(batches.len()) as u64;
    let batches = Arc::new(batches);
    let boards_done = Arc::new(AtomicU64::new(0));
    let run_spec = crate::engine::RunSpec {
        model: crate::engine::LoadModel::Closed { concurrency },
        warmup: Duration::ZERO,
        duration: Duration::from_secs(24 * 3600),
        timeout: Duration::from_secs(60),
        progress,
        limit: Some(total),
    };
    crate::engine::run(run_spec, move |i| {
        let (mutations, edges) = batches.get(i as usize).cloned().unwrap_or_default();
        let (client, boards_done) = (client.clone(), boards_done.clone());
        async move {
            if mutations.is_empty() {
                return Outcome::default();
            }
            if i >= first_pin_batch {
                while boards_done.load(Ordering::Acquire) < first_pin_batch {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let outcome = write(client, mutations, edges).await;
            if i < first_pin_batch {
                boards_done.fetch_add(1, Ordering::Release);
            }
            outcome
        }
    })
    .await
}

/// Adjacency entries a mutation adds (pin: owner, board and each topic; follow: one).
pub fn edges_of(m: &Mutation) -> u64 {
    match m {
        Mutation::UpsertPin(p) => 2 + p.topics.len() as u64,
        Mutation::Follow { .. } => 1,
        _ => 0,
    }
}

/// The graph as write batches of at most `batch` mutations, in dependency order (users,
/// boards, pins, follows), each with its edge count.
pub fn write_batches(graph: Graph, batch: usize) -> Vec<(Vec<pb::Mutation>, u64)> {
    let Graph { users, boards, pins, follows } = graph;
    let all = users
        .into_iter()
        .map(Mutation::UpsertUser)
        .chain(boards.into_iter().map(Mutation::UpsertBoard))
        .chain(pins.into_iter().map(Mutation::UpsertPin))
        .chain(follows.into_iter().map(|(follower, target)| Mutation::Follow { follower, target }));
    let mut out = Vec::new();
    let mut current = Vec::with_capacity(batch);
    let mut edges = 0;
    for m in all {
        edges += edges_of(&m);
        current.push(pb::Mutation::from(m));
        if current.len() == batch.max(1) {
            out.push((std::mem::take(&mut current), std::mem::take(&mut edges)));
        }
    }
    if !current.is_empty() {
        out.push((current, edges));
    }
    out
}

/// Writes batches to a file `feedgraph bulk-load` reads: length-delimited
/// `feedgraph.v1.WriteRequest` messages.
pub fn write_file(path: &std::path::Path, batches: &[(Vec<pb::Mutation>, u64)]) -> anyhow::Result<u64> {
    use std::io::Write;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut bytes = 0;
    let mut buf = Vec::new();
    for (mutations, _) in batches {
        buf.clear();
        pb::WriteRequest {
            mutations: mutations.clone(),
            ack: pb::Ack::Async as i32,
            request_id: String::new(),
        }
        .encode_length_delimited(&mut buf)?;
        out.write_all(&buf)?;
        bytes += buf.len() as u64;
    }
    out.flush()?;
    Ok(bytes)
}

/// Reads what [`write_file`] wrote, one request at a time.
#[derive(Debug)]
pub struct FileReader<R> {
    input: R,
    buf: Vec<u8>,
}

impl<R: std::io::Read> FileReader<R> {
    pub fn new(input: R) -> Self {
        Self { input, buf: Vec::new() }
    }

    /// The next request, or `None` at the end.
    pub fn next_request(&mut self) -> anyhow::Result<Option<pb::WriteRequest>> {
        // A varint length prefix, one byte at a time (at most 10).
        let mut len: u64 = 0;
        for i in 0..10 {
            let mut byte = [0u8];
            match self.input.read(&mut byte)? {
                0 if i == 0 => return Ok(None),
                0 => bail!("file ends inside a length prefix"),
                _ => {}
            }
            len |= u64::from(byte[0] & 0x7f) << (7 * i);
            if byte[0] & 0x80 == 0 {
                break;
            }
            if i == 9 {
                bail!("malformed length prefix");
            }
        }
        if len > 256 << 20 {
            bail!("a request of {len} bytes is too large for this format");
        }
        self.buf.resize(len as usize, 0);
        self.input.read_exact(&mut self.buf).context("file ends inside a request")?;
        Ok(Some(pb::WriteRequest::decode(&self.buf[..]).context("malformed request")?))
    }
}

/// Makes `viewer` follow `fanout` users spread evenly over ids `1..=users` (never
/// itself), in batches.
pub async fn set_fanout(client: &Client, viewer: u64, fanout: u64, users: u64) -> anyhow::Result<()> {
    let follower = UserId::new(viewer).context("viewer id must be non-zero")?;
    if fanout > users {
        bail!("fanout {fanout} exceeds the graph's {users} users");
    }
    let step = (users / fanout.max(1)).max(1);
    let targets: Vec<pb::Mutation> = (0..fanout)
        .filter_map(|k| UserId::new(1 + k * step))
        .filter(|u| *u != follower)
        .map(|u| pb::Mutation::from(Mutation::Follow { follower, target: FollowTarget::User(u) }))
        .collect();
    for chunk in targets.chunks(1000) {
        let outcome = write(client.clone(), chunk.to_vec(), 0).await;
        if let Some(code) = outcome.error {
            bail!("setting up viewer {viewer}'s {fanout} follows failed: {code}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{GraphSpec, generate};

    fn small() -> Graph {
        generate(&GraphSpec { users: 500, boards: 1_000, pins: 5_000, ..GraphSpec::demo(1_800_000_000_000) })
    }

    #[test]
    fn batches_keep_dependency_order_and_count_edges() {
        let g = small();
        let expected_edges: u64 =
            g.pins.iter().map(|p| 2 + p.topics.len() as u64).sum::<u64>() + g.follows.len() as u64;
        let total = g.users.len() + g.boards.len() + g.pins.len() + g.follows.len();
        let batches = write_batches(g, 1000);
        assert_eq!(batches.iter().map(|(m, _)| m.len()).sum::<usize>(), total);
        assert_eq!(batches.iter().map(|(_, e)| e).sum::<u64>(), expected_edges);
        assert!(matches!(batches[0].0[0].op, Some(pb::mutation::Op::UpsertUser(_))));
    }

    #[test]
    fn files_round_trip() {
        let batches = write_batches(small(), 700);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("graph.fgw");
        write_file(&path, &batches).unwrap();
        let mut reader = FileReader::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut back = Vec::new();
        while let Some(r) = reader.next_request().unwrap() {
            back.push(r.mutations);
        }
        assert_eq!(back, batches.into_iter().map(|(m, _)| m).collect::<Vec<_>>());
        // A truncated file is an error, not a silent end.
        let bytes = std::fs::read(&path).unwrap();
        let mut reader = FileReader::new(&bytes[..bytes.len() - 3]);
        let mut result = Ok(Some(pb::WriteRequest::default()));
        while let Ok(Some(_)) = result {
            result = reader.next_request();
        }
        assert!(result.is_err());
    }

    #[test]
    fn service_counters_are_read_from_the_exposition() {
        let text = "# HELP x\nfeedgraph_process_cpu_seconds_total 12.5\n\
            feedgraph_grpc_requests_total{code=\"OK\",method=\"GetFollowingFeed\"} 10\n\
            feedgraph_grpc_requests_total{code=\"ResourceExhausted\",method=\"GetHomeFeed\"} 3\n\
            feedgraph_grpc_requests_total{code=\"OK\",method=\"Write\"} 99\n";
        assert_eq!(
            ServiceCounters::parse(text),
            Some(ServiceCounters { cpu_seconds: 12.5, feed_requests: 13 })
        );
        assert_eq!(ServiceCounters::parse("feedgraph_grpc_requests_total{} 1\n"), None);
    }

    #[test]
    fn the_picker_favours_active_users() {
        let g = small();
        let picker = UserPicker::from_graph(&g).unwrap();
        let mut counts: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for (u, _) in &g.follows {
            *counts.entry(u.get()).or_default() += 1;
        }
        let (busiest, _) = counts.iter().max_by_key(|(u, c)| (**c, **u)).map(|(u, c)| (*u, *c)).unwrap();
        let quietest = counts.iter().min_by_key(|(u, c)| (**c, **u)).map(|(u, _)| *u).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        use rand::SeedableRng;
        let draws: Vec<u64> = (0..50_000).map(|_| picker.pick(&mut rng)).collect();
        let hits = |u: u64| draws.iter().filter(|d| **d == u).count();
        assert!(hits(busiest) > 5 * hits(quietest).max(1), "{} vs {}", hits(busiest), hits(quietest));
    }
}
