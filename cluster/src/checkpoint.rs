//! Checkpoint bootstrap. The leader takes a RocksDB checkpoint (exact sequence, hard
//! links), describes it in a manifest (file names, sizes, CRC-32C), keeps it a while
//! for resumption, and streams it in chunks. The follower downloads into a staging
//! directory, resumes a broken stream where its files stop, verifies every file, and
//! the replica swaps it in ([`crate::Replica::install`]).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use feedgraph_graph_store::Shard;
use feedgraph_proto::pb::internal as ipb;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::{Error, Result, blocking};

/// A checkpoint as the leader describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) id: String,
    pub(crate) sequence: u64,
    pub(crate) epoch: u64,
    /// (file name, size, CRC-32C)
    pub(crate) files: Vec<(String, u64, u32)>,
}

impl Manifest {
    pub(crate) fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }

    pub(crate) fn to_proto(&self) -> ipb::CheckpointManifest {
        ipb::CheckpointManifest {
            checkpoint_id: self.id.clone(),
            sequence: self.sequence,
            epoch: self.epoch,
            files: self
                .files
                .iter()
                .map(|(name, size, crc)| ipb::CheckpointFile {
                    name: name.clone(),
                    size: *size,
                    crc32c: *crc,
                })
                .collect(),
            total_bytes: self.total_bytes(),
        }
    }

    /// Checks what the leader sent: plain file names only (no paths), no duplicates.
    pub(crate) fn from_proto(m: ipb::CheckpointManifest) -> Result<Manifest> {
        let mut seen = std::collections::HashSet::new();
        for f in &m.files {
            if !plain_name(&f.name) || !seen.insert(f.name.clone()) {
                return Err(Error::Checkpoint(format!("manifest names file `{}`", f.name)));
            }
        }
        Ok(Manifest {
            id: m.checkpoint_id,
            sequence: m.sequence,
            epoch: m.epoch,
            files: m.files.into_iter().map(|f| (f.name, f.size, f.crc32c)).collect(),
        })
    }
}

/// A file name with no directory part (what a RocksDB checkpoint holds).
pub(crate) fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// CRC-32C of a file. Blocking.
fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}

struct Held {
    shard: u32,
    path: PathBuf,
    manifest: Arc<Manifest>,
    last_used: Instant,
}

/// The checkpoints a leader holds for followers to download (and resume).
pub(crate) struct Checkpoints {
    dir: PathBuf,
    ttl: Duration,
    held: Mutex<HashMap<String, Held>>,
    /// Fault injection: break the first stream after this many bytes.
    break_after: Option<u64>,
    broken_once: AtomicBool,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints").field("dir", &self.dir).finish()
    }
}

impl Checkpoints {
    /// Checkpoints live in `dir`; what a previous run left there is removed. Blocking.
    pub(crate) fn new(dir: PathBuf, ttl: Duration, break_after: Option<u64>) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("clearing {}", dir.display()), e))?;
        }
        Ok(Self {
            dir,
            ttl,
            held: Mutex::new(HashMap::new()),
            break_after,
            broken_once: AtomicBool::new(false),
        })
    }

    /// The checkpoint `resume` names if this leader still holds it (for the same
    /// shard), else a new one of `store`.
    pub(crate) async fn get_or_take(
        &self,
        shard: u32,
        store: Arc<Shard>,
        epoch: u64,
        resume: Option<&str>,
    ) -> Result<(PathBuf, Arc<Manifest>)> {
        if let Some(id) = resume {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = held.get_mut(id).filter(|h| h.shard == shard) {
                h.last_used = Instant::now();
                return Ok((h.path.clone(), h.manifest.clone()));
            }
        }
        let expired = self.expired(shard);
        if !expired.is_empty() {
            blocking(move || {
                remove_checkpoints(expired);
                Ok(())
            })
            .await?;
        }
        let id = format!("shard-{shard:03}-{:016x}", rand::random::<u64>());
        let path = self.dir.join(&id);
        let dir = self.dir.clone();
        let (p, id2) = (path.clone(), id.clone());
        let manifest = blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let sequence = store.checkpoint(&p)?;
            let mut files = Vec::new();
            for entry in
                std::fs::read_dir(&p).map_err(|e| Error::io(format!("listing {}", p.display()), e))?
            {
                let entry = entry.map_err(|e| Error::io(format!("listing {}", p.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) || !plain_name(&name) {
                    return Err(Error::Checkpoint(format!("unexpected entry `{name}` in a checkpoint")));
                }
                let (size, crc) = file_crc(&entry.path())
                    .map_err(|e| Error::io(format!("reading {}", entry.path().display()), e))?;
                files.push((name, size, crc));
            }
            files.sort();
            Ok(Manifest { id: id2, sequence, epoch, files })
        })
        .await?;
        let manifest = Arc::new(manifest);
        tracing::info!(
            shard,
            checkpoint = %id,
            sequence = manifest.sequence,
            bytes = manifest.total_bytes(),
            "checkpoint taken for a follower"
        );
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Held { shard, path: path.clone(), manifest: manifest.clone(), last_used: Instant::now() },
        );
        Ok((path, manifest))
    }

    /// Takes out of the held set the checkpoints unused for longer than the TTL, and
    /// the least recently used of `shard`'s beyond [`MAX_HELD_PER_SHARD`] - 1 (room for
    /// the one about to be taken): each pins the SST files it links.
    fn expired(&self, shard: u32) -> Vec<PathBuf> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> =
            held.iter().filter(|(_, h)| h.last_used.elapsed() > self.ttl).map(|(id, _)| id.clone()).collect();
        let mut of_shard: Vec<(&String, Instant)> =
            held.iter().filter(|(_, h)| h.shard == shard).map(|(id, h)| (id, h.last_used)).collect();
        of_shard.sort_by_key(|(_, used)| *used);
        let excess = of_shard.len().saturating_sub(MAX_HELD_PER_SHARD - 1);
        ids.extend(of_shard.into_iter().take(excess).map(|(id, _)| id.clone()));
        ids.iter().filter_map(|id| held.remove(id)).map(|h| h.path).collect()
    }

    /// Streams `manifest` then the bytes of every file the follower lacks (`have`:
    /// bytes it holds per file), in chunks.
    pub(crate) fn stream(
        self: &Arc<Self>,
        path: PathBuf,
        manifest: Arc<Manifest>,
        have: HashMap<String, u64>,
        chunk_bytes: usize,
    ) -> mpsc::Receiver<Result<ipb::CheckpointChunk, Status>> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let send = |part| tx.blocking_send(Ok(ipb::CheckpointChunk { part: Some(part) })).is_ok();
            if !send(ipb::checkpoint_chunk::Part::Manifest(manifest.to_proto())) {
                return;
            }
            let mut sent = 0u64;
            let mut buf = vec![0u8; chunk_bytes.clamp(4 << 10, 16 << 20)];
            for (name, size, _) in &manifest.files {
                let mut offset = have.get(name).copied().unwrap_or(0).min(*size);
                if offset == *size {
                    continue;
                }
                let file = std::fs::File::open(path.join(name)).and_then(|mut f| {
                    f.seek(SeekFrom::Start(offset))?;
                    Ok(f)
                });
                let mut file = match file {
                    Ok(f) => f,
                    Err(e) => {
                        let _ =
                            tx.blocking_send(Err(Status::internal(format!("checkpoint file {name}: {e}"))));
                        return;
                    }
                };
                while offset < *size {
                    let want = buf.len().min((*size - offset) as usize);
                    if let Err(e) = file.read_exact(&mut buf[..want]) {
                        let _ =
                            tx.blocking_send(Err(Status::internal(format!("checkpoint file {name}: {e}"))));
                        return;
                    }
                    let chunk = ipb::FileChunk { name: name.clone(), offset, data: buf[..want].to_vec() };
                    if !send(ipb::checkpoint_chunk::Part::Chunk(chunk)) {
                        return;
                    }
                    offset += want as u64;
                    sent += want as u64;
                    if let Some(limit) = this.break_after
                        && sent >= limit
                        && !this.broken_once.swap(true, Ordering::AcqRel)
                    {
                        tracing::warn!(sent, "debug: breaking a checkpoint stream on purpose");
                        let _ = tx.blocking_send(Err(Status::aborted(
                            "debug: checkpoint stream broken on purpose",
                        )));
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// What a follower downloads, where, and whom it tells.
pub(crate) struct Fetch<'a> {
    pub(crate) shard: u32,
    /// The epoch the follower follows (the leader refuses another).
    pub(crate) epoch: u64,
    pub(crate) staging: &'a Path,
    pub(crate) chunk_bytes: usize,
    /// Called with (bytes held, total bytes) after every chunk.
    pub(crate) on_progress: &'a (dyn Fn(u64, u64) + Sync),
    /// Called when a broken stream is resumed.
    pub(crate) on_resume: &'a (dyn Fn() + Sync),
}

/// Downloads a checkpoint into `fetch.staging` from the leader behind `client`,
/// resuming broken streams where the local files stop, and verifies it. Progress goes
/// to the log and `on_progress`. Gives up after 8 broken streams.
pub(crate) async fn download(
    client: &mut ipb::replication_service_client::ReplicationServiceClient<
        feedgraph_proto::auth::AuthChannel,
    >,
    fetch: Fetch<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Manifest> {
    const ATTEMPTS: usize = 8;
    let Fetch { shard, epoch, staging, chunk_bytes, on_progress, on_resume } = fetch;
    if staging.exists() {
        let s = staging.to_path_buf();
        blocking(move || {
            std::fs::remove_dir_all(&s).map_err(|e| Error::io(format!("clearing {}", s.display()), e))
        })
        .await?;
    }
    let mut known: Option<Manifest> = None;
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        if *stop.borrow() {
            return Err(Error::Shutdown);
        }
        if attempt > 0 {
            on_resume();
            tokio::time::sleep(Duration::from_millis(100 * (1 << attempt.min(5)))).await;
        }
        let resume = match &known {
            Some(m) => {
                let (s, m2) = (staging.to_path_buf(), m.clone());
                let have = blocking(move || Ok(held_bytes(&s, &m2))).await?;
                Some(ipb::CheckpointResume { checkpoint_id: m.id.clone(), have })
            }
            None => None,
        };
        let request = ipb::StreamCheckpointRequest { shard, chunk_bytes: chunk_bytes as u32, epoch, resume };
        match receive(client, request, staging, &mut known, stop, on_progress).await {
            Ok(()) => {}
            Err(Error::Shutdown) => return Err(Error::Shutdown),
            Err(e @ Error::Unauthorized(_)) => return Err(e),
            Err(e) => {
                last_error = e.to_string();
                tracing::info!(shard, attempt, error = %e, "checkpoint stream broke; resuming");
                continue;
            }
        }
        let Some(manifest) = known.clone() else { continue };
        let (s, m) = (staging.to_path_buf(), manifest.clone());
        let bad = blocking(move || verify(&s, &m)).await?;
        if bad.is_empty() {
            return Ok(manifest);
        }
        last_error = format!("files failed verification: {}", bad.join(", "));
        tracing::warn!(shard, files = ?bad, "checkpoint files failed verification; fetching them again");
    }
    Err(Error::Checkpoint(format!("gave up after {ATTEMPTS} attempts: {last_error}")))
}

/// Bytes held of each manifest file in `staging`.
fn held_bytes(staging: &Path, m: &Manifest) -> HashMap<String, u64> {
    m.files
        .iter()
        .filter_map(|(name, size, _)| {
            let len = std::fs::metadata(staging.join(name)).ok()?.len();
            Some((name.clone(), len.min(*size)))
        })
        .collect()
}

/// Files whose size or CRC-32C differ from the manifest (removed, to be fetched
/// again). Syncs the good ones. Blocking.
fn verify(staging: &Path, m: &Manifest) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for (name, size, crc) in &m.files {
        let path = staging.join(name);
        match file_crc(&path) {
            Ok((s, c)) if s == *size && c == *crc => {
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
            }
            _ => {
                let _ = std::fs::remove_file(&path);
                bad.push(name.clone());
            }
        }
    }
    if let Ok(d) = std::fs::File::open(staging) {
        let _ = d.sync_all();
    }
    Ok(bad)
}

/// One stream: the manifest (a new checkpoint replaces whatever `staging` held), then
/// chunks appended at exactly the offsets the files have.
async fn receive(
    client: &mut ipb::replication_service_client::ReplicationServiceClient<
        feedgraph_proto::auth::AuthChannel,
    >,
    request: ipb::StreamCheckpointRequest,
    staging: &Path,
    known: &mut Option<Manifest>,
    stop: &mut watch::Receiver<bool>,
    on_progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let shard = request.shard;
    let mut stream = tokio::select! {
        r = client.stream_checkpoint(request) => r.map_err(|s| Error::remote(&s))?.into_inner(),
        _ = stop.wait_for(|s| *s) => return Err(Error::Shutdown),
    };
    let first = stream.message().await.map_err(|s| Error::remote(&s))?;
    let manifest = match first.and_then(|c| c.part) {
        Some(ipb::checkpoint_chunk::Part::Manifest(m)) => Manifest::from_proto(m)?,
        _ => return Err(Error::Checkpoint("the stream did not start with a manifest".into())),
    };
    if known.as_ref().is_none_or(|k| k.id != manifest.id) {
        // A new checkpoint: whatever was downloaded belongs to another one.
        let s = staging.to_path_buf();
        blocking(move || {
            if s.exists() {
                std::fs::remove_dir_all(&s).map_err(|e| Error::io(format!("clearing {}", s.display()), e))?;
            }
            std::fs::create_dir_all(&s).map_err(|e| Error::io(format!("creating {}", s.display()), e))
        })
        .await?;
        tracing::info!(
            shard,
            checkpoint = %manifest.id,
            sequence = manifest.sequence,
            mb = manifest.total_bytes() as f64 / 1e6,
            "downloading a checkpoint"
        );
    }
    // Empty files get no chunks: create them now.
    let (s, m) = (staging.to_path_buf(), manifest.clone());
    blocking(move || {
        for (name, _, _) in m.files.iter().filter(|f| f.1 == 0) {
            let path = s.join(name);
            std::fs::File::create(&path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        }
        Ok(())
    })
    .await?;
    let total = manifest.total_bytes();
    let sizes: HashMap<String, u64> = manifest.files.iter().map(|(n, s, _)| (n.clone(), *s)).collect();
    *known = Some(manifest.clone());
    let (s, m) = (staging.to_path_buf(), manifest.clone());
    let mut done: u64 = blocking(move || Ok(held_bytes(&s, &m).values().sum())).await?;
    let mut logged_tenth = done * 10 / total.max(1);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|s| Error::remote(&s))?,
            _ = stop.wait_for(|s| *s) => return Err(Error::Shutdown),
        };
        let Some(msg) = msg else { return Ok(()) };
        let Some(ipb::checkpoint_chunk::Part::Chunk(chunk)) = msg.part else {
            return Err(Error::Checkpoint("a second manifest in one stream".into()));
        };
        let size = *sizes
            .get(&chunk.name)
            .ok_or_else(|| Error::Checkpoint(format!("chunk of `{}`, not in the manifest", chunk.name)))?;
        if chunk.offset + chunk.data.len() as u64 > size {
            return Err(Error::Checkpoint(format!("chunk beyond the end of `{}`", chunk.name)));
        }
        let len = chunk.data.len() as u64;
        let path = staging.join(&chunk.name);
        blocking(move || append_at(&path, chunk.offset, &chunk.data)).await?;
        done += len;
        on_progress(done, total);
        let tenth = done * 10 / total.max(1);
        if tenth > logged_tenth {
            logged_tenth = tenth;
            tracing::info!(shard, percent = tenth * 10, mb = done as f64 / 1e6, "checkpoint download");
        }
    }
}

/// Appends `data` to the file at `path`, which must be exactly `offset` bytes long.
fn append_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len != offset {
        return Err(Error::Checkpoint(format!(
            "chunk at {offset} of `{}`, which holds {len} bytes",
            path.display()
        )));
    }
    f.write_all(data).map_err(io)
}

/// Checkpoints of one shard a leader holds at most (followers bootstrapping at once).
const MAX_HELD_PER_SHARD: usize = 4;

/// Deletes checkpoint directories (hard links: quick, but disk work). Blocking.
fn remove_checkpoints(paths: Vec<PathBuf>) {
    for path in paths {
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an expired checkpoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_refuse_paths() {
        let m = |name: &str| ipb::CheckpointManifest {
            files: vec![ipb::CheckpointFile { name: name.into(), size: 1, crc32c: 0 }],
            ..Default::default()
        };
        assert!(Manifest::from_proto(m("000012.sst")).is_ok());
        for bad in ["../etc/passwd", "a/b", "..", "", "x\0y"] {
            assert!(Manifest::from_proto(m(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn append_checks_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        append_at(&p, 0, b"abc").unwrap();
        append_at(&p, 3, b"de").unwrap();
        assert!(append_at(&p, 2, b"x").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"abcde");
        assert_eq!(file_crc(&p).unwrap(), (5, crc32c::crc32c(b"abcde")));
    }
}
