//! `feedgraph serve --demo`: a sample Pinterest-like graph (the `feedgraph-load`
//! generator), bulk-loaded once into the node's shards.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use feedgraph_graph_store::{BulkLoad, Shard};
use feedgraph_loadtest::{Graph, GraphSpec, generate};
use feedgraph_model::{FollowTarget, UserId};

use crate::Error;

/// The model the demo re-ranks feeds with.
pub const DEMO_MODEL: &str = "engagement_mlp";

/// The trained models in `scoring/models/`, built into the binary so that the demo
/// works from anywhere: (path inside the model directory, contents).
const DEMO_MODEL_FILES: [(&str, &[u8]); 4] = [
    ("engagement_mlp/1/model.onnx", include_bytes!("../../scoring/models/engagement_mlp/1/model.onnx")),
    ("engagement_mlp/1/schema.toml", include_bytes!("../../scoring/models/engagement_mlp/1/schema.toml")),
    ("engagement_gbdt/1/model.txt", include_bytes!("../../scoring/models/engagement_gbdt/1/model.txt")),
    ("engagement_gbdt/1/schema.toml", include_bytes!("../../scoring/models/engagement_gbdt/1/schema.toml")),
];

/// Writes the bundled models into `dir` unless a version of each is already there
/// (an operator's newer versions are left alone). Blocking.
pub fn ensure_models(dir: &Path) -> Result<(), Error> {
    for (path, bytes) in DEMO_MODEL_FILES {
        let target = dir.join(path);
        let model_dir = target.parent().and_then(Path::parent).unwrap_or(dir);
        if model_dir.exists() && !target.parent().is_some_and(Path::exists) {
            continue;
        }
        if target.exists() {
            continue;
        }
        let io = |what: String| move |source| Error::Io { what, source };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::write(&target, bytes).map_err(io(format!("writing {}", target.display())))?;
    }
    Ok(())
}

/// Written into the data directory once the demo graph is loaded.
const MARKER: &str = "demo-loaded";

/// What the demo loaded (or found loaded).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DemoInfo {
    /// A user with about 300 follows, for the sample queries.
    pub showcase_user: UserId,
    /// Pins and edges loaded now (0 when the data directory already had the demo).
    pub pins_loaded: u64,
    pub edges_written: u64,
    pub seconds: f64,
}

/// A generated graph cut into one bulk load per shard: each user, board, pin and follow
/// on its owner's shard.
pub fn split_by_shard(graph: Graph, shards: u32) -> Vec<BulkLoad> {
    BulkLoad { users: graph.users, boards: graph.boards, pins: graph.pins, follows: graph.follows }
        .split_by_shard(shards)
}

/// Loads the demo graph into `shards` unless `data_dir` says it is already there.
/// Reports `(pins done, pins total)` as it goes. Blocking.
pub fn ensure_loaded(
    data_dir: &Path,
    shards: &[Arc<Shard>],
    spec: &GraphSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DemoInfo, Error> {
    let marker = data_dir.join(MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker)
        && let Some(user) = text.trim().parse::<u64>().ok().and_then(UserId::new)
    {
        return Ok(DemoInfo { showcase_user: user, pins_loaded: 0, edges_written: 0, seconds: 0.0 });
    }
    let started = Instant::now();
    let graph = generate(spec);
    let showcase_user =
        showcase(&graph.follows).ok_or_else(|| Error::DataDir("the demo graph has no follows".into()))?;

    let loads = split_by_shard(graph, shards.len() as u32);
    let total = spec.pins;
    let (mut done, mut pins_loaded, mut edges_written) = (0u64, 0u64, 0u64);
    for (shard, load) in shards.iter().zip(loads) {
        let before = done;
        let stats = shard.bulk_load(load, 200_000, &mut |p| progress(before + p.pins_done, total))?;
        done += stats.pins_loaded + stats.pins_skipped;
        pins_loaded += stats.pins_loaded;
        edges_written += stats.edges_written;
    }
    std::fs::write(&marker, format!("{}\n", showcase_user.get()))
        .map_err(|source| Error::Io { what: format!("writing {}", marker.display()), source })?;
    Ok(DemoInfo { showcase_user, pins_loaded, edges_written, seconds: started.elapsed().as_secs_f64() })
}

/// The user whose follow count is closest to 300.
fn showcase(follows: &[(UserId, FollowTarget)]) -> Option<UserId> {
    let mut counts: HashMap<UserId, i64> = HashMap::new();
    for (u, _) in follows {
        *counts.entry(*u).or_default() += 1;
    }
    counts.into_iter().min_by_key(|(u, c)| ((c - 300).abs(), u.get())).map(|(u, _)| u)
}
