//! Reading one point of an object-store repository lazily: its namespace
//! from its manifest, file bytes through its map chunks and block blobs,
//! each fetched with a ranged GET only when read. What `mount-point`,
//! `test-failover` and `restore` of an `s3://` point are built on.
//!
//! - **Cache.** Blocks fetched stay in a cache bounded by bytes (least
//!   recently used out first, [`DEFAULT_CACHE_BYTES`] by default); decoded
//!   map chunks in one of their own. A block being fetched is fetched once,
//!   however many readers want it at that moment.
//! - **Read-ahead.** A file read sequentially (each read starting where the
//!   last ended, give or take the kernel's reordering) gets the next
//!   [`READ_AHEAD_BYTES`] fetched in the background, so a sequential reader
//!   (a VM booting, a copy) finds its blocks in the cache.
//! - **Merged GETs.** Blobs of one pack lying close together (a point's
//!   blocks are packed in the order they were uploaded, so neighbouring
//!   blocks of a file usually neighbour in their pack) are fetched by one
//!   ranged GET of at most [`MAX_GET`] bytes, wasting at most [`MERGE_GAP`]
//!   between two blobs.
//! - **Missing blobs.** A blob the local index does not know makes the
//!   reader load new index segments and index the packs no segment names
//!   (once per reader), then fail naming the point, file and block.
//!
//! Every blob read is checked against its keyed hash
//! ([`cache::open_blob`]): damage is an error, never wrong data.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use crate::block::BlockHash;
use crate::error::{Error, Result};
use crate::proto::object::{FileMap, PointManifest};
use crate::proto::points::Entry;

use super::cache::{self, Cache, Location};
use super::lru::Lru;
use super::manifest::{self, decode_map, hash_of};
use super::{MAP_CHUNK_BLOCKS, Repo, s3};

/// Default bytes of blocks a reader keeps.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// How far ahead of a sequential reader blocks are fetched.
pub const READ_AHEAD_BYTES: u64 = 8 << 20;
/// The largest gap between two blobs of one pack that one GET spans.
pub const MERGE_GAP: u64 = 64 << 10;
/// The largest merged GET.
pub const MAX_GET: u64 = 8 << 20;
/// GETs one read (or read-ahead) has in flight at most.
pub const GETS_IN_FLIGHT: usize = 16;
/// Bytes of decoded map chunks a reader keeps (64 KiB each: 256 chunks
/// map 64 GiB of files at 64 KiB blocks).
const MAP_CACHE_BYTES: u64 = 16 << 20;
/// A read starting this close to where the file's last read ended is
/// still sequential (the kernel issues its read-ahead out of order).
const SEQUENTIAL_SLACK: u64 = 2 << 20;

/// A fetched blob's content, shared by the cache and its readers.
type Blob = Arc<Vec<u8>>;

/// Requests and bytes a reader fetched, for `mount-point`'s figures.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Ranged GETs.
    pub gets: AtomicU64,
    /// Bytes they returned.
    pub bytes: AtomicU64,
}

/// How one file is being read: where its last read ended and how far
/// read-ahead has been asked for.
#[derive(Debug, Default)]
struct Stream {
    next: u64,
    /// Blocks below this are fetched or being fetched.
    ahead: u64,
}

/// What a blob is, for errors.
#[derive(Clone, Copy, Debug)]
enum Want {
    Block { file: u64, block: u64 },
    Map { file: u64, chunk: u64 },
}

/// One point of a repository, opened for reading.
#[derive(Debug)]
pub struct PointReader {
    repo: Repo,
    index: Arc<Cache>,
    series: String,
    manifest: PointManifest,
    /// file id → its place in `manifest.files`.
    files: HashMap<u64, usize>,
    blocks: Mutex<Lru<BlockHash, Vec<u8>>>,
    maps: Mutex<Lru<BlockHash, Vec<[u8; 16]>>>,
    /// Blocks being fetched, for readers who want them meanwhile.
    inflight: Mutex<HashMap<BlockHash, watch::Receiver<Option<Blob>>>>,
    streams: Mutex<HashMap<u64, Stream>>,
    /// Whether the index was refreshed for a blob it did not know.
    refreshed: tokio::sync::Mutex<bool>,
    fetched: Fetched,
}

impl PointReader {
    /// Point `seq` of `series` in `repo`, its blobs found through `index`
    /// (synced with the repository's segments here), keeping up to
    /// `cache_bytes` of blocks.
    pub async fn open(
        repo: Repo,
        index: Arc<Cache>,
        series: &str,
        seq: u64,
        cache_bytes: u64,
    ) -> Result<PointReader> {
        let manifest = manifest::load(&repo, series, seq).await?.ok_or_else(|| {
            Error::Usage(format!(
                "{} has no point {seq} of datastore {series} (see `hbrfs points ls {}`)",
                repo.url, repo.url
            ))
        })?;
        index.sync(&repo).await?;
        let files = manifest
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.file_id, i))
            .collect();
        Ok(PointReader {
            repo,
            index,
            series: series.to_string(),
            manifest,
            files,
            blocks: Mutex::new(Lru::new(cache_bytes)),
            maps: Mutex::new(Lru::new(MAP_CACHE_BYTES)),
            inflight: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            refreshed: tokio::sync::Mutex::new(false),
            fetched: Fetched::default(),
        })
    }

    /// The point's manifest: namespace, root, files.
    pub fn manifest(&self) -> &PointManifest {
        &self.manifest
    }

    /// Every entry but the root, parents before children.
    pub fn namespace(&self) -> &[Entry] {
        &self.manifest.namespace
    }

    /// The repository.
    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    /// Requests and bytes fetched so far.
    pub fn fetched(&self) -> &Fetched {
        &self.fetched
    }

    /// The point as messages name it.
    pub fn name(&self) -> String {
        format!(
            "point {} of datastore {} in {}",
            self.manifest.seq, self.series, self.repo.url
        )
    }

    /// The map of file `file_id`.
    pub fn file(&self, file_id: u64) -> Result<&FileMap> {
        self.files
            .get(&file_id)
            .and_then(|&i| self.manifest.files.get(i))
            .ok_or_else(|| Error::BadState {
                path: manifest::point_rel(&self.series, self.manifest.seq).into(),
                reason: format!(
                    "{}: the namespace names file id {file_id}, which has no block map",
                    self.name()
                ),
            })
    }

    /// Up to `len` bytes of file `file_id` from `offset` (short at its
    /// end), as of the point; starts read-ahead when the file is read
    /// sequentially. Must run on a multi-threaded tokio runtime.
    pub async fn read(self: &Arc<Self>, file_id: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        let fm = self.file(file_id)?;
        let end = fm.size.min(offset.saturating_add(len));
        if offset >= end {
            return Ok(Vec::new());
        }
        let bs = self.repo.block_size();
        let blocks = offset / bs..end.div_ceil(bs);
        if let Some(ahead) = self.note_read(file_id, fm.size, offset, end) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.prefetch(file_id, ahead).await {
                    log::debug!("read-ahead of file {file_id}: {e}");
                }
            });
        }
        let hashes = self.block_hashes(fm, blocks.clone()).await?;
        let wanted = wanted_blocks(file_id, blocks.clone(), &hashes);
        let got = self.blobs(&wanted).await?;
        let mut out = vec![0u8; (end - offset) as usize];
        for (block, h) in blocks.zip(hashes) {
            let Some(h) = h else { continue };
            let content = got
                .get(&h)
                .ok_or_else(|| self.damaged(format!("block {block} was not fetched")))?;
            let start = block * bs;
            let need = (fm.size.min(start + bs) - start) as usize;
            if content.len() < need {
                return Err(self.damaged(format!(
                    "block {block} of file id {file_id} holds {} bytes, the file's size needs {need}",
                    content.len()
                )));
            }
            let from = offset.max(start);
            let to = end.min(start + bs);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&content[(from - start) as usize..(to - start) as usize]);
        }
        Ok(out)
    }

    /// Each block's hash of `blocks` of the file `fm` (`None`: zero).
    pub async fn block_hashes(
        &self,
        fm: &FileMap,
        blocks: Range<u64>,
    ) -> Result<Vec<Option<BlockHash>>> {
        let mut hashes = Vec::with_capacity((blocks.end - blocks.start) as usize);
        let mut block = blocks.start;
        while block < blocks.end {
            let chunk = block / MAP_CHUNK_BLOCKS;
            let upto = blocks.end.min((chunk + 1) * MAP_CHUNK_BLOCKS);
            match self.map(fm, chunk).await? {
                None => hashes.extend((block..upto).map(|_| None)),
                Some(map) => hashes
                    .extend((block..upto).map(|b| hash_of(&map[(b % MAP_CHUNK_BLOCKS) as usize]))),
            }
            block = upto;
        }
        Ok(hashes)
    }

    /// Map chunk `chunk` of the file `fm`, `None` when all its blocks are
    /// zero.
    async fn map(&self, fm: &FileMap, chunk: u64) -> Result<Option<Arc<Vec<[u8; 16]>>>> {
        let Some(hash) = fm.chunks.get(chunk as usize).and_then(|h| hash_of(h)) else {
            return Ok(None);
        };
        if let Some(map) = self.maps.lock().expect("maps lock").get(&hash) {
            return Ok(Some(map));
        }
        let want = Want::Map {
            file: fm.file_id,
            chunk,
        };
        let located = [(hash, self.locate(hash, want).await?)];
        let mut raw = None;
        self.fetch_located(&located, |_, blob| raw = Some(blob))
            .await?;
        let raw = raw.ok_or_else(|| self.damaged(format!("map chunk {chunk} was not read")))?;
        let what = manifest::point_rel(&self.series, self.manifest.seq);
        let map = Arc::new(decode_map(&raw, &self.repo, &what)?);
        let weight = MAP_CHUNK_BLOCKS * 16;
        self.maps
            .lock()
            .expect("maps lock")
            .insert(hash, map.clone(), weight);
        Ok(Some(map))
    }

    /// The content of each blob of `wanted`, from the cache, from a fetch
    /// in flight, or fetched now (neighbours in one GET).
    async fn blobs(&self, wanted: &[(BlockHash, Want)]) -> Result<HashMap<BlockHash, Blob>> {
        let mut got = HashMap::with_capacity(wanted.len());
        {
            let mut cache = self.blocks.lock().expect("blocks lock");
            for (h, _) in wanted {
                if let Some(b) = cache.get(h) {
                    got.insert(*h, b);
                }
            }
        }
        let mut waits = Vec::new();
        let mut claimed = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for &(h, want) in wanted {
                if got.contains_key(&h) || claimed.iter().any(|(c, _, _)| *c == h) {
                    continue;
                }
                match inflight.get(&h) {
                    Some(rx) => waits.push((h, want, rx.clone())),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(h, rx);
                        claimed.push((h, want, tx));
                    }
                }
            }
        }
        let result = self.fetch_claimed(&claimed, &mut got).await;
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for (h, _, _) in &claimed {
                inflight.remove(h);
            }
        }
        result?;
        for (h, want, mut rx) in waits {
            let blob = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => None,
            };
            let blob = match blob {
                Some(b) => b,
                // Its fetcher failed or was dropped: fetch it here.
                None => {
                    let located = [(h, self.locate(h, want).await?)];
                    let mut one = None;
                    self.fetch_located(&located, |_, b| one = Some(b)).await?;
                    let b = Arc::new(one.ok_or_else(|| self.damaged("a blob was not read"))?);
                    self.keep(h, &b);
                    b
                }
            };
            got.insert(h, blob);
        }
        Ok(got)
    }

    /// Fetches the blobs `claimed`, handing each to its waiters and the
    /// cache as it arrives.
    async fn fetch_claimed(
        &self,
        claimed: &[(BlockHash, Want, watch::Sender<Option<Blob>>)],
        got: &mut HashMap<BlockHash, Blob>,
    ) -> Result<()> {
        if claimed.is_empty() {
            return Ok(());
        }
        let mut located = Vec::with_capacity(claimed.len());
        for (h, want, _) in claimed {
            located.push((*h, self.locate(*h, *want).await?));
        }
        let senders: HashMap<BlockHash, &watch::Sender<Option<Blob>>> =
            claimed.iter().map(|(h, _, tx)| (*h, tx)).collect();
        self.fetch_located(&located, |h, raw| {
            let blob = Arc::new(raw);
            self.keep(h, &blob);
            if let Some(tx) = senders.get(&h) {
                tx.send_replace(Some(blob.clone()));
            }
            got.insert(h, blob);
        })
        .await
    }

    fn keep(&self, h: BlockHash, blob: &Blob) {
        let weight = blob.len() as u64;
        self.blocks
            .lock()
            .expect("blocks lock")
            .insert(h, blob.clone(), weight);
    }

    /// Fetches every blob of `located` (neighbours of one pack in one GET,
    /// [`GETS_IN_FLIGHT`] GETs at a time), checks each and hands it to
    /// `each` with its hash.
    pub async fn fetch_located(
        &self,
        located: &[(BlockHash, Location)],
        mut each: impl FnMut(BlockHash, Vec<u8>),
    ) -> Result<()> {
        let groups = merge_neighbours(located);
        let mut gets = futures_util::stream::iter(groups.into_iter().map(|group| async move {
            let first = &group[0].1;
            let last = &group[group.len() - 1].1;
            let range = first.offset..last.offset + u64::from(last.stored);
            let rel = first.pack_rel();
            let got = s3::get_range_opt(
                self.repo.store.as_ref(),
                &self.repo.url,
                &rel,
                range.clone(),
            )
            .await?;
            let Some(bytes) = got else {
                return self.read_moved(&group).await;
            };
            self.fetched.gets.fetch_add(1, Ordering::Relaxed);
            self.fetched
                .bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let blobs = tokio::task::spawn_blocking({
                let repo = self.repo.clone();
                move || -> Result<Vec<(BlockHash, Vec<u8>)>> {
                    group
                        .iter()
                        .map(|(h, loc)| {
                            let at = (loc.offset - range.start) as usize;
                            let stored = bytes.get(at..at + loc.stored as usize).unwrap_or(&[]);
                            cache::open_blob(&repo, *h, loc, stored).map(|raw| (*h, raw))
                        })
                        .collect()
                }
            })
            .await
            .map_err(|e| Error::Remote(format!("decompressing blobs: {e}")))??;
            Ok::<_, Error>(blobs)
        }))
        .buffer_unordered(GETS_IN_FLIGHT);
        while let Some(blobs) = gets.try_next().await? {
            for (h, raw) in blobs {
                each(h, raw);
            }
        }
        Ok(())
    }

    /// The blobs of `group` once their pack was found gone (GC deleted it
    /// after they were stored elsewhere, by a repack or a writer): each
    /// read from the copy the refreshed index names.
    async fn read_moved(
        &self,
        group: &[(BlockHash, Location)],
    ) -> Result<Vec<(BlockHash, Vec<u8>)>> {
        let gone = group[0].1.pack_rel();
        log::info!(
            "{}: {gone} is gone (deleted by GC); reading {} blobs from their other copies",
            self.repo.url,
            group.len()
        );
        let mut blobs = Vec::with_capacity(group.len());
        for (h, _) in group {
            let Some((loc, raw)) = self.index.read(&self.repo, *h).await? else {
                return Err(self.damaged(format!(
                    "blob {h:?}: its pack {gone} is gone and no other pack holds it \
                     (the repository is damaged)"
                )));
            };
            self.fetched.gets.fetch_add(1, Ordering::Relaxed);
            self.fetched
                .bytes
                .fetch_add(u64::from(loc.stored), Ordering::Relaxed);
            blobs.push((*h, raw));
        }
        Ok(blobs)
    }

    /// Where blob `hash` lies; a blob the index does not know makes it
    /// load new segments and index unindexed packs, once per reader.
    async fn locate(&self, hash: BlockHash, want: Want) -> Result<Location> {
        if let Some(loc) = self.index.lookup(hash)? {
            return Ok(loc);
        }
        {
            let mut refreshed = self.refreshed.lock().await;
            if !*refreshed {
                *refreshed = true;
                self.index.sync(&self.repo).await?;
                self.index.repair_from_packs(&self.repo).await?;
            }
        }
        if let Some(loc) = self.index.lookup(hash)? {
            return Ok(loc);
        }
        let what = match want {
            Want::Block { file, block } => format!("block {block} of file id {file}"),
            Want::Map { file, chunk } => format!("map chunk {chunk} of file id {file}"),
        };
        Err(self.damaged(format!(
            "{what} (blob {hash:?}) is in no pack of the repository \
             (deleted by a GC, or the repository is damaged)"
        )))
    }

    /// Notes a read of `offset..end` of file `file_id` (of `size` bytes);
    /// the blocks to fetch ahead when it continues a sequential run.
    fn note_read(&self, file_id: u64, size: u64, offset: u64, end: u64) -> Option<Range<u64>> {
        let bs = self.repo.block_size();
        let window = (READ_AHEAD_BYTES / bs).max(4);
        let last = size.div_ceil(bs);
        let mut streams = self.streams.lock().expect("streams lock");
        let s = streams.entry(file_id).or_default();
        let sequential = offset > 0
            && offset + SEQUENTIAL_SLACK >= s.next
            && offset <= s.next + SEQUENTIAL_SLACK;
        s.next = if sequential { s.next.max(end) } else { end };
        let end_block = end.div_ceil(bs);
        if !sequential {
            s.ahead = end_block;
            return None;
        }
        if s.ahead >= end_block + window / 2 {
            return None;
        }
        let from = s.ahead.max(end_block);
        let to = (end_block + window).min(last);
        s.ahead = to.max(s.ahead);
        (from < to).then_some(from..to)
    }

    /// Fetches `blocks` of file `file_id` into the cache.
    async fn prefetch(&self, file_id: u64, blocks: Range<u64>) -> Result<()> {
        let fm = self.file(file_id)?;
        let hashes = self.block_hashes(fm, blocks.clone()).await?;
        let wanted = wanted_blocks(file_id, blocks, &hashes);
        self.blobs(&wanted).await.map(|_| ())
    }

    /// The blobs of `wanted` blocks located, for a caller that fetches
    /// them itself ([`PointReader::fetch_located`]) without the cache.
    pub async fn locate_blocks(
        &self,
        file_id: u64,
        blocks: &[(u64, BlockHash)],
    ) -> Result<Vec<(BlockHash, Location)>> {
        let mut out = Vec::with_capacity(blocks.len());
        for &(block, h) in blocks {
            let want = Want::Block {
                file: file_id,
                block,
            };
            out.push((h, self.locate(h, want).await?));
        }
        Ok(out)
    }

    fn damaged(&self, reason: impl std::fmt::Display) -> Error {
        Error::BadState {
            path: format!(
                "{}/{}",
                self.repo.url,
                manifest::point_rel(&self.series, self.manifest.seq)
            )
            .into(),
            reason: format!("{}: {reason}", self.name()),
        }
    }
}

/// The non-zero blocks of `blocks` of file `file_id` whose hashes are
/// `hashes`, as blobs wanted.
fn wanted_blocks(
    file_id: u64,
    blocks: Range<u64>,
    hashes: &[Option<BlockHash>],
) -> Vec<(BlockHash, Want)> {
    blocks
        .zip(hashes)
        .filter_map(|(block, h)| {
            let want = Want::Block {
                file: file_id,
                block,
            };
            h.map(|h| (h, want))
        })
        .collect()
}

/// Where a reading command finds its point: `s3://…` and what the
/// command line adds.
#[derive(Clone, Debug)]
pub struct PointSource {
    /// The repository.
    pub url: super::S3Url,
    /// `--s3-endpoint`.
    pub opts: super::S3Options,
    /// `--cache-dir`: the local index; default [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// `--datastore`: the series, needed when several share the repository.
    pub datastore: Option<String>,
    /// Bytes of blocks to keep in memory.
    pub cache_bytes: u64,
}

/// `$XDG_CACHE_HOME/hbrfs/<repo-id>`, else `~/.cache/hbrfs/<repo-id>`:
/// where a reader keeps the index of `repo` between runs.
pub fn default_cache_dir(repo: &Repo) -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = match (var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(x), _) => PathBuf::from(x),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => {
            return Err(Error::Usage(
                "neither XDG_CACHE_HOME nor HOME is set: name a cache folder with --cache-dir"
                    .into(),
            ));
        }
    };
    Ok(base.join("hbrfs").join(repo.id_hex()))
}

/// The sequence number `spec` names in `series`: a number from `points
/// ls`, or `latest`.
pub async fn resolve_point(repo: &Repo, series: &str, spec: &str) -> Result<u64> {
    let seqs = manifest::list_points(repo, series).await?;
    let seq = match spec {
        "latest" => seqs.last().copied(),
        n => Some(n.parse::<u64>().map_err(|_| {
            Error::Usage(format!(
                "{spec:?}: a point is its number (SEQ in `hbrfs points ls {}`) or `latest`",
                repo.url
            ))
        })?),
    };
    match seq {
        Some(seq) if seqs.contains(&seq) => Ok(seq),
        _ => Err(Error::Usage(format!(
            "{} has no point {spec} of datastore {series} (it has {})",
            repo.url,
            match (seqs.first(), seqs.last()) {
                (Some(a), Some(b)) => format!("points {a} to {b}"),
                _ => "none".into(),
            }
        ))),
    }
}

/// The repository of `src`, its local index, and the point `spec` of its
/// series, opened; the index folder is made if missing.
pub async fn open_point(src: &PointSource, spec: &str) -> Result<(PointReader, PathBuf)> {
    let repo = Repo::open(&src.url, &src.opts, None).await?;
    let dir = match &src.cache_dir {
        Some(d) => d.clone(),
        None => default_cache_dir(&repo)?,
    };
    let index = Cache::open(&dir, &repo).map_err(|e| {
        Error::Usage(format!(
            "{e} (is another hbrfs reading {} with this cache folder? Give this one its own \
             with --cache-dir)",
            repo.url
        ))
    })?;
    let series = manifest::pick_series(&repo, src.datastore.as_deref()).await?;
    let seq = resolve_point(&repo, &series, spec).await?;
    let reader = PointReader::open(repo, Arc::new(index), &series, seq, src.cache_bytes).await?;
    Ok((reader, dir))
}

/// `located` in runs of one pack each, by offset, a run spanning at most
/// [`MAX_GET`] bytes with gaps of at most [`MERGE_GAP`]; a blob asked for
/// twice is fetched once.
fn merge_neighbours(located: &[(BlockHash, Location)]) -> Vec<Vec<(BlockHash, Location)>> {
    let mut sorted = located.to_vec();
    sorted.sort_by_key(|(_, l)| (l.pack, l.offset));
    sorted.dedup_by_key(|(h, _)| *h);
    let mut groups: Vec<Vec<(BlockHash, Location)>> = Vec::new();
    for (h, loc) in sorted {
        if let Some(g) = groups.last_mut() {
            let first = &g[0].1;
            let last = &g[g.len() - 1].1;
            let last_end = last.offset + u64::from(last.stored);
            let end = loc.offset + u64::from(loc.stored);
            if last.pack == loc.pack
                && loc.offset >= last_end
                && loc.offset - last_end <= MERGE_GAP
                && end - first.offset <= MAX_GET
            {
                g.push((h, loc));
                continue;
            }
        }
        groups.push(vec![(h, loc)]);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::object::BlobKind;

    fn loc(pack: u8, offset: u64, stored: u32) -> Location {
        Location {
            pack: [pack; 16],
            offset,
            stored,
            raw: stored,
            kind: BlobKind::Block,
        }
    }

    #[test]
    fn neighbours_of_one_pack_merge_and_far_ones_do_not() {
        let located = [
            (BlockHash(1), loc(1, 0, 100)),
            (BlockHash(2), loc(1, 100, 100)),
            (BlockHash(3), loc(2, 0, 100)),
            (BlockHash(4), loc(1, 200 + MERGE_GAP + 1, 10)),
            (BlockHash(2), loc(1, 100, 100)),
            (BlockHash(5), loc(1, MAX_GET, 10)),
        ];
        let groups = merge_neighbours(&located);
        let hashes: Vec<Vec<u128>> = groups
            .iter()
            .map(|g| g.iter().map(|(h, _)| h.0).collect())
            .collect();
        assert_eq!(hashes, vec![vec![1, 2], vec![4], vec![5], vec![3]]);
    }
}
