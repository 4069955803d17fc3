//! `feedgraph-load`: synthetic graphs, bulk ingest and open-loop fanout load tests.
//! Parses the command line, starts an embedded service when asked, and calls
//! `feedgraph_loadtest` (engine, scenarios, report, plot).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use feedgraph_loadtest::engine::{self, LoadModel, Outcome, Report, RunSpec};
use feedgraph_loadtest::scenario::{self, Client, UserPicker};
use feedgraph_loadtest::{GraphSpec, generate};
use feedgraph_model::{Mutation, Pin, PinId, PinSignals, TopicId};
use feedgraph_proto::pb::v1 as pb;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(
    name = "feedgraph-load",
    version,
    about = "Load tests for feedgraph: ingest, feeds, mixed, fanout sweep"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the generated graph over gRPC (edges/s), or to a file for `feedgraph bulk-load`.
    Ingest(IngestArgs),
    /// Following-feed reads for users drawn by activity.
    Following(ReadArgs),
    /// Home-feed reads for users drawn by activity.
    Home(ReadArgs),
    /// Feed reads (following and home) with a fraction of writes (new pins).
    Mixed(MixedArgs),
    /// Following-feed latency against fanout: viewers following 10 … 5,000 accounts.
    FanoutSweep(SweepArgs),
}

#[derive(Args, Debug, Clone)]
struct GraphArgs {
    /// Users of the generated graph (the target must hold the same graph: by default
    /// the demo graph of `feedgraph serve --demo`).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..))]
    users: u64,
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    boards: u64,
    #[arg(long, default_value_t = 1_000_000)]
    pins: u64,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    topics: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl GraphArgs {
    fn spec(&self) -> GraphSpec {
        GraphSpec {
            users: self.users,
            boards: self.boards,
            pins: self.pins,
            topics: self.topics,
            seed: self.seed,
            ..GraphSpec::demo(now_ms())
        }
    }
}

#[derive(Args, Debug, Clone)]
struct TargetArgs {
    /// Service address.
    #[arg(long, env = "FEEDGRAPH_ADDR", default_value = "127.0.0.1:7878")]
    addr: String,
    /// The service's Prometheus endpoint (host:port), read before and after each run
    /// for its CPU time and its own request count (the embedded service's is used with
    /// --embedded). Unreachable: the report leaves them out.
    #[arg(long, env = "FEEDGRAPH_METRICS_ADDR", default_value = "127.0.0.1:9878")]
    metrics_addr: String,
    /// Start `feedgraph serve` in this process on a temporary directory instead (loaded
    /// with the generated graph, scoring with the demo MLP).
    #[arg(long)]
    embedded: bool,
    /// Model the embedded service re-ranks with (`none`: light scores only).
    #[arg(long, default_value = "engagement_mlp")]
    model: String,
    /// Shards of the embedded service.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    shards: u32,
    /// Bearer token for a service with tokens (`read` for feeds, `write` for ingest
    /// and mixed loads). Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "FEEDGRAPH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// TLS: the CA (PEM) that signs the service's certificate.
    #[arg(long, env = "FEEDGRAPH_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's certificate chain and key (PEM).
    #[arg(long, env = "FEEDGRAPH_TLS_CERT", requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "FEEDGRAPH_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(format!("{s}: must be a positive number")) }
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("{s}: must be in [0, 1]")) }
}

#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// Open loop: requests per second; several (comma-separated) run one after another.
    #[arg(long, value_delimiter = ',', value_parser = positive, conflicts_with = "concurrency")]
    rate: Vec<f64>,
    /// Closed loop: this many workers, each waiting for its answer.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: Option<u64>,
    /// Measured seconds per run.
    #[arg(long, default_value = "10", value_parser = positive)]
    duration: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value = "2", value_parser = positive)]
    warmup: f64,
    /// A request not answered by then is an error; missed requests are recorded at it.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Open loop: most outstanding requests; a request due beyond is missed.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_in_flight: u64,
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
    /// Ranking each feed request names (the service's default when unset).
    #[arg(long)]
    ranking: Option<String>,
    /// Print the reports as JSON on stdout (the human report goes to stderr).
    #[arg(long)]
    json: bool,
    /// Draw latency percentiles against rate (or fanout) into this SVG file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

impl LoadArgs {
    fn specs(&self) -> Vec<RunSpec> {
        let base = RunSpec {
            model: LoadModel::Closed { concurrency: 1 },
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(self.duration),
            timeout: Duration::from_millis(self.timeout_ms),
            progress: true,
            limit: None,
        };
        match (self.concurrency, self.rate.is_empty()) {
            (Some(c), _) => vec![RunSpec { model: LoadModel::Closed { concurrency: c as usize }, ..base }],
            (None, true) => {
                vec![RunSpec {
                    model: LoadModel::Open { rate: 100.0, max_in_flight: self.max_in_flight as usize },
                    ..base
                }]
            }
            (None, false) => self
                .rate
                .iter()
                .map(|r| RunSpec {
                    model: LoadModel::Open { rate: *r, max_in_flight: self.max_in_flight as usize },
                    ..base
                })
                .collect(),
        }
    }
}

#[derive(Args, Debug)]
struct ReadArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    graph: GraphArgs,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Debug)]
struct MixedArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    graph: GraphArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Share of requests that are writes (a new pin on an existing board).
    #[arg(long, default_value = "0.05", value_parser = fraction)]
    write_fraction: f64,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    graph: GraphArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Fanouts to measure: accounts each viewer follows.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,500,1000,2000,5000", value_parser = clap::value_parser!(u64).range(1..))]
    fanouts: Vec<u64>,
}

#[derive(Args, Debug)]
struct IngestArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    graph: GraphArgs,
    /// Mutations per write request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// Write requests in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    concurrency: u64,
    /// Write the batches to this file instead (for `feedgraph bulk-load --file`).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The service under load: an address, or a node this process started.
struct Target {
    client: Client,
    metrics_addr: String,
    node: Option<(feedgraph_server::Node, tempfile::TempDir)>,
}

impl Target {
    async fn open(args: &TargetArgs, spec: Option<&GraphSpec>) -> anyhow::Result<Self> {
        if !args.embedded {
            let bearer = feedgraph_proto::auth::Bearer::from_user(args.token.as_deref())
                .context("--token / FEEDGRAPH_TOKEN")?;
            let tls = match &args.tls_ca {
                Some(ca) => Some(feedgraph_proto::auth::client_tls(
                    ca,
                    args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
                )?),
                None => None,
            };
            let credentials = feedgraph_proto::auth::Credentials::new(bearer, tls);
            let client = scenario::connect(&args.addr, Duration::from_secs(3), credentials).await?;
            return Ok(Target { client, metrics_addr: args.metrics_addr.clone(), node: None });
        }
        let dir = tempfile::tempdir().context("temporary data directory")?;
        let mut config = feedgraph_server::Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse()?,
            metrics_listen: "127.0.0.1:0".parse()?,
            shards: args.shards,
            log: "warn".into(),
            ..Default::default()
        };
        if args.model != "none" {
            let models = dir.path().join("models");
            feedgraph_server::demo::ensure_models(&models)?;
            config.scorer.model_dir = Some(models);
            config.scorer.model = args.model.clone();
        }
        let cfg = config.clone();
        let spec = spec.cloned();
        let shards = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let shards = feedgraph_server::open_shards(&cfg)?;
            if let Some(spec) = spec {
                eprintln!("embedded service: loading {} pins into {} shards", spec.pins, cfg.shards);
                feedgraph_server::demo::ensure_loaded(&cfg.data_dir, &shards, &spec, &mut |_, _| {})?;
            }
            Ok(shards)
        })
        .await??;
        let node = feedgraph_server::start_with(config, shards).await?;
        // The embedded service has no tokens.
        let client = scenario::connect(
            &node.grpc_addr().to_string(),
            Duration::from_secs(3),
            feedgraph_proto::auth::Credentials::none(),
        )
        .await?;
        eprintln!("embedded service on {}", node.grpc_addr());
        let metrics_addr = node.metrics_addr().to_string();
        Ok(Target { client, metrics_addr, node: Some((node, dir)) })
    }

    /// Runs `run_spec` with `call`, reading the service's counters around it.
    async fn run<F, Fut>(&self, run_spec: RunSpec, call: F) -> Report
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let before = scenario::ServiceCounters::scrape(&self.metrics_addr).await;
        let mut report = engine::run(run_spec, call).await;
        if let (Some(b), Some(a)) = (before, scenario::ServiceCounters::scrape(&self.metrics_addr).await) {
            let requests = a.feed_requests.saturating_sub(b.feed_requests);
            report.service_requests = Some(requests);
            report.service_cpu_us_per_request =
                Some((a.cpu_seconds - b.cpu_seconds).max(0.0) * 1e6 / requests.max(1) as f64);
        }
        report
    }

    async fn close(self) -> anyhow::Result<()> {
        if let Some((node, _dir)) = self.node {
            node.shutdown().await?;
        }
        Ok(())
    }
}

fn output(reports: &[Report], json: bool) -> anyhow::Result<()> {
    for r in reports {
        eprint!("{}", r.render());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
    }
    Ok(())
}

fn plot(
    path: &std::path::Path,
    title: &str,
    x_label: &str,
    xs: &[f64],
    reports: &[Report],
) -> anyhow::Result<()> {
    let series =
        |name: &str, f: fn(&Report) -> f64| (name.to_string(), reports.iter().map(f).collect::<Vec<f64>>());
    let svg = feedgraph_loadtest::plot::line_chart(
        title,
        x_label,
        "latency (ms)",
        xs,
        &[
            series("p50", |r| r.latency_ms.p50),
            series("p90", |r| r.latency_ms.p90),
            series("p99", |r| r.latency_ms.p99),
            series("p99.9", |r| r.latency_ms.p999),
        ],
    );
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}

/// The graph the target holds (regenerated from its spec) and its viewers by activity.
async fn graph_and_picker(spec: &GraphSpec) -> anyhow::Result<(feedgraph_loadtest::Graph, Arc<UserPicker>)> {
    let spec = spec.clone();
    let graph = tokio::task::spawn_blocking(move || generate(&spec)).await?;
    let picker = Arc::new(UserPicker::from_graph(&graph)?);
    Ok((graph, picker))
}

async fn reads(args: ReadArgs, home: bool) -> anyhow::Result<()> {
    let spec = args.graph.spec();
    let (_, picker) = graph_and_picker(&spec).await?;
    let target = Target::open(&args.target, Some(&spec)).await?;
    let name = if home { "home" } else { "following" };
    let mut reports = Vec::new();
    for run_spec in args.load.specs() {
        let (client, picker, page) = (target.client.clone(), picker.clone(), args.load.page_size);
        let ranking = args.load.ranking.clone();
        let report = target
            .run(run_spec, move |i| {
                let user = picker.pick(&mut rand_chacha::ChaCha8Rng::seed_from_u64(i));
                scenario::read_feed(client.clone(), user, home, page, ranking.clone())
            })
            .await;
        reports.push(Report { scenario: name.into(), ..report });
    }
    output(&reports, args.load.json)?;
    if let Some(path) = &args.load.plot {
        let xs: Vec<f64> = reports.iter().map(|r| r.rate).collect();
        plot_rates(path, name, &xs, &reports)?;
    }
    target.close().await
}

/// Throughput and goodput, and latency of the successful requests, against offered
/// rate: two charts, one above the other.
fn plot_rates(path: &std::path::Path, name: &str, xs: &[f64], reports: &[Report]) -> anyhow::Result<()> {
    let series =
        |name: &str, f: fn(&Report) -> f64| (name.to_string(), reports.iter().map(f).collect::<Vec<f64>>());
    let rates = feedgraph_loadtest::plot::line_chart(
        &format!("{name} feed: answers against offered load"),
        "offered rate (requests/s)",
        "requests/s",
        xs,
        &[
            series("offered", |r| r.rate),
            series("throughput (answered)", |r| r.throughput),
            series("goodput (successful)", |r| r.goodput),
        ],
    );
    let latency = feedgraph_loadtest::plot::line_chart(
        &format!("{name} feed: latency of successful requests"),
        "offered rate (requests/s)",
        "latency (ms)",
        xs,
        &[
            series("p50", |r| r.ok_latency_ms.p50),
            series("p99", |r| r.ok_latency_ms.p99),
            series("shed p99", |r| r.shed_latency_ms.p99),
        ],
    );
    let svg = feedgraph_loadtest::plot::stack(&[rates, latency]);
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}

type BoxedOutcome = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

async fn mixed(args: MixedArgs) -> anyhow::Result<()> {
    let spec = args.graph.spec();
    let (graph, picker) = graph_and_picker(&spec).await?;
    let boards: Arc<Vec<(u64, u64)>> =
        Arc::new(graph.boards.iter().map(|b| (b.id.get(), b.owner.get())).collect());
    drop(graph);
    let target = Target::open(&args.target, Some(&spec)).await?;
    // New pins get ids above the graph's and this run's start time, so runs do not collide.
    let first_pin = spec.pins + 1 + (now_ms() as u64 % 1_000_000_000) * 1000;
    let mut reports = Vec::new();
    for run_spec in args.load.specs() {
        let (client, picker, boards, page, wf) =
            (target.client.clone(), picker.clone(), boards.clone(), args.load.page_size, args.write_fraction);
        let ranking = args.load.ranking.clone();
        let report = target
            .run(run_spec, move |i| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i);
                let client = client.clone();
                if rng.random::<f64>() < wf {
                    let (board, owner) = boards[rng.random_range(0..boards.len())];
                    let pin = PinId::new(first_pin + i)
                        .zip(feedgraph_model::BoardId::new(board))
                        .zip(feedgraph_model::UserId::new(owner))
                        .map(|((id, board), owner)| {
                            Mutation::UpsertPin(Pin {
                                id,
                                owner,
                                board,
                                created_at_ms: now_ms(),
                                topics: TopicId::new(rng.random_range(1..=200)).into_iter().collect(),
                                signals: PinSignals {
                                    quality: rng.random(),
                                    saves: 0,
                                    clicks: 0,
                                    closeups: 0,
                                },
                            })
                        });
                    let mutations: Vec<pb::Mutation> = pin.into_iter().map(pb::Mutation::from).collect();
                    return Box::pin(scenario::write(client, mutations, 3)) as BoxedOutcome;
                }
                let user = picker.pick(&mut rng);
                Box::pin(scenario::read_feed(client, user, rng.random::<bool>(), page, ranking.clone()))
                    as BoxedOutcome
            })
            .await;
        reports.push(Report {
            scenario: format!("mixed ({:.0}% writes)", args.write_fraction * 100.0),
            ..report
        });
    }
    output(&reports, args.load.json)?;
    target.close().await
}

async fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let spec = args.graph.spec();
    let target = Target::open(&args.target, Some(&spec)).await?;
    let mut reports = Vec::new();
    let specs = args.load.specs();
    if specs.len() != 1 {
        bail!("fanout-sweep runs one load per fanout: give one --rate (or --concurrency)");
    }
    for &fanout in &args.fanouts {
        // One viewer per fanout, outside the graph's ids; following is idempotent, so a
        // second sweep against the same service reuses them.
        let viewer = 1_000_000_000 + fanout;
        scenario::set_fanout(&target.client, viewer, fanout, spec.users).await?;
        let picker = Arc::new(UserPicker::single(viewer)?);
        let (client, page) = (target.client.clone(), args.load.page_size);
        let ranking = args.load.ranking.clone();
        let report = target
            .run(specs[0], move |i| {
                let user = picker.pick(&mut rand_chacha::ChaCha8Rng::seed_from_u64(i));
                scenario::read_feed(client.clone(), user, false, page, ranking.clone())
            })
            .await;
        reports.push(Report { scenario: "fanout-sweep".into(), fanout, ..report });
    }
    output(&reports, args.load.json)?;
    if let Some(path) = &args.load.plot {
        let xs: Vec<f64> = reports.iter().map(|r| r.fanout as f64).collect();
        let load = match specs[0].model {
            LoadModel::Open { rate, .. } => format!("{rate:.0} requests/s"),
            LoadModel::Closed { concurrency } => format!("{concurrency} workers"),
        };
        plot(
            path,
            &format!("following feed against fanout ({load})"),
            "accounts followed by the viewer",
            &xs,
            &reports,
        )?;
    }
    target.close().await
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let spec = args.graph.spec();
    let started = std::time::Instant::now();
    let batch = args.batch as usize;
    let batches =
        tokio::task::spawn_blocking(move || scenario::write_batches(generate(&spec), batch)).await?;
    let edges: u64 = batches.iter().map(|(_, e)| e).sum();
    eprintln!(
        "generated {} write batches ({edges} edges) in {:.1} s",
        batches.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.out {
        let started = std::time::Instant::now();
        let bytes = scenario::write_file(path, &batches)?;
        eprintln!(
            "wrote {} ({:.1} MB) in {:.1} s; load it with: feedgraph bulk-load --file {}",
            path.display(),
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            path.display()
        );
        return Ok(());
    }
    // An empty embedded service: ingest is what loads it.
    let target = Target::open(&args.target, None).await?;
    let report = scenario::ingest(target.client.clone(), batches, args.concurrency as usize, true).await;
    output(&[Report { scenario: "ingest".into(), ..report }], args.json)?;
    target.close().await
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ingest(a) => ingest(a).await,
        Command::Following(a) => reads(a, false).await,
        Command::Home(a) => reads(a, true).await,
        Command::Mixed(a) => mixed(a).await,
        Command::FanoutSweep(a) => sweep(a).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
