//! Shipping a point to an object-store repository (`--replicate-to
//! s3://…`) instead of a secondary: the same cut, pre-images, lists and
//! blocks, published as packs, an index segment and a manifest (see
//! `crate::object` for the layout).
//!
//! # One point
//!
//! 1. **Lists.** The point's namespace operations, file states and
//!    metadata (the same chunks a secondary receives) are replayed over
//!    the namespace of the series' newest point ([`Namespace`]).
//! 2. **Blocks.** Every dirty block is read as it was at the cut and
//!    hashed with the repository's key. A zero block is a zero map entry;
//!    a block some pack already holds (and GC has not listed as a
//!    candidate) is a reference; the rest is compressed into the open
//!    pack. Full packs upload while later blocks are read, at most
//!    [`UPLOADS_IN_FLIGHT`] at once; each uploaded pack is noted in the
//!    local cache at once, so a point that fails and ships again (after a
//!    store outage, a restart) finds its blocks there and does not upload
//!    them twice.
//! 3. **Maps.** The map chunks the dirty blocks fall in are rewritten
//!    (old chunks come from the repository) and stored as blobs too.
//! 4. **Publish.** The last pack, then one index segment naming every
//!    pack no segment names yet, then — after checking that no pack the
//!    point relies on became a GC candidate meanwhile — the manifest,
//!    create-only at the next sequence number. Another writer's manifest
//!    there is a refusal: two primaries never own one series.
//!
//! The point counts as applied (its blocks turn clean) only once the
//! manifest is written.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::block::{self, BlockHash};
use crate::error::{Error, Result};
use crate::ids::Epoch;
use crate::object::cache::{Cache, segment_name};
use crate::object::manifest::{self, decode_map, encode_map, hash_of};
use crate::object::namespace::Namespace;
use crate::object::pack::{FinishedPack, PackBuilder};
use crate::object::{MAP_CHUNK_BLOCKS, Repo, S3Options, S3Url, pack_rel, retention, s3};
use crate::proto::object::{BlobKind, FileMap, PointManifest};
use crate::state::now_ns;

use super::client::blocking;
use super::point::Point;
use super::ship::{ReadBlock, Work, list_blocks, manifest_chunks, pack_blocks, read_and_hash};
use super::{Replicator, Target};

/// Packs uploading at once: enough to keep a link busy while the next
/// pack fills, few enough that the primary holds at most this many
/// [`crate::object::PACK_BYTES`] in memory.
pub const UPLOADS_IN_FLIGHT: usize = 4;

/// Blocks read, hashed and compressed per step.
const READ_CHUNK_BLOCKS: usize = 256;

/// A repository the replicator is connected to.
#[derive(Debug)]
pub struct ObjectLink {
    repo: Repo,
    cache: Arc<Cache>,
    /// This datastore's series: its id.
    series: String,
    /// The series' newest point, `None` before the first.
    latest: Option<PointManifest>,
}

/// A hash of zeros: a zero block or a map chunk of zero blocks.
const ZERO: [u8; 16] = [0u8; 16];

/// One file's map being rewritten by a point.
struct Remap {
    file_id: u64,
    size: u64,
    /// Blocks at the cut's size.
    nblocks: u64,
    /// Map chunk references: the old map's, cut or grown to the size.
    chunks: Vec<Vec<u8>>,
    /// The chunk being rewritten: its index and hashes.
    open: Option<(usize, Vec<[u8; 16]>)>,
    /// The file is smaller than in the point before.
    shrank: bool,
    /// The last chunk was rewritten (so cut at the end already).
    closed_last: bool,
}

impl Remap {
    /// File `file_id` of `size` bytes, from its map in the point before.
    fn new(file_id: u64, size: u64, block_size: u64, old: &HashMap<u64, FileMap>) -> Remap {
        let nblocks = size.div_ceil(block_size);
        let old = old.get(&file_id);
        let mut chunks = old.map(|m| m.chunks.clone()).unwrap_or_default();
        chunks.resize(nblocks.div_ceil(MAP_CHUNK_BLOCKS) as usize, Vec::new());
        Remap {
            file_id,
            size,
            nblocks,
            chunks,
            open: None,
            shrank: old.is_some_and(|m| m.size > size),
            closed_last: false,
        }
    }
}

impl Replicator {
    /// Opens the repository at `url` (made on first use), loads its index
    /// and the series' newest point, and reconciles it with this
    /// primary's history; returns the link and the epoch it holds.
    pub(super) async fn connect_object(
        &self,
        url: &S3Url,
        opts: &S3Options,
    ) -> Result<(ObjectLink, Epoch)> {
        let bs = self.ds.format.block_size.bytes() as u32;
        let repo = Repo::open(url, opts, Some(bs)).await?;
        let dir = self.ds.paths.object_cache(&repo.id_hex());
        let cache = {
            let repo = repo.clone();
            blocking("opening the object index", move || Cache::open(&dir, &repo)).await?
        };
        cache.sync(&repo).await?;
        self.stats.progressed();
        let series = self.ds.format.id.clone();
        let latest = match manifest::list_points(&repo, &series).await?.last() {
            Some(&seq) => manifest::load(&repo, &series, seq).await?,
            None => None,
        };
        let (epoch, id) = latest.as_ref().map_or((Epoch(0), Vec::new()), |m| {
            (Epoch(m.epoch), m.point_id.clone())
        });
        let remedy = format!(
            "If this primary is right, replicate to another prefix (or delete {url}/points/{series}/ \
             for a full upload)"
        );
        self.points
            .reconcile(epoch, &id, &url.to_string(), &remedy)
            .await?;
        log::info!("connected to {url} (series {series}, at epoch {epoch})");
        self.stats.connected.store(true, Ordering::Relaxed);
        Ok((
            ObjectLink {
                repo,
                cache: Arc::new(cache),
                series,
                latest,
            },
            epoch,
        ))
    }

    /// Uploads `point` and publishes it; on success the link's newest
    /// point is this one.
    pub(super) async fn ship_object(&self, link: &mut ObjectLink, point: &Point) -> Result<()> {
        let base = link.latest.as_ref().filter(|_| point.base() != Epoch(0));
        let mut namespace = match base {
            Some(m) => Namespace::from_entries(
                m.root.clone().unwrap_or_default(),
                m.namespace.clone(),
                &manifest::point_rel(&link.series, m.seq),
            )?,
            None => Namespace::empty(),
        };
        let mut chunks = manifest_chunks(self.ds.clone(), point);
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            for op in &chunk.ops {
                namespace.apply_op(op)?;
            }
            for f in &chunk.files {
                namespace.set_file(f)?;
            }
            for m in &chunk.metas {
                namespace.set_meta(m)?;
            }
        }
        self.stats.progressed();
        let old_maps: HashMap<u64, FileMap> = base
            .map(|m| m.files.iter().map(|f| (f.file_id, f.clone())).collect())
            .unwrap_or_default();
        let work = list_blocks(point.set()).await?;
        let total: u64 = work.iter().map(|(_, b)| b.len() as u64).sum();
        self.stats.start_ship(total, 0, point.base() == Epoch(0));
        let mut upload = Upload::new(self, link);
        let result = upload.blocks(work, &old_maps).await;
        self.stats.end_ship();
        result?;
        let files = namespace
            .files()
            .map(|(id, size)| {
                let map = upload
                    .maps
                    .remove(&id)
                    .or_else(|| old_maps.get(&id).cloned());
                FileMap {
                    file_id: id,
                    size,
                    chunks: map.map(|m| m.chunks).unwrap_or_default(),
                }
            })
            .collect();
        let segment = upload.finish().await?;
        let (root, entries) = namespace.into_parts();
        let seq = link.latest.as_ref().map_or(1, |m| m.seq + 1);
        let cut_ns = self
            .ds
            .journal
            .epoch(point.epoch())?
            .map_or(0, |r| r.closed_ns);
        let manifest = PointManifest {
            seq,
            epoch: point.epoch().0,
            point_id: point.id().to_vec(),
            parent_id: link
                .latest
                .as_ref()
                .map(|m| m.point_id.clone())
                .unwrap_or_default(),
            cut_ns,
            published_ns: now_ns(),
            namespace: entries,
            root: Some(root),
            files,
            new_blocks: upload.new_blocks,
            new_bytes: upload.new_bytes,
            segment,
        };
        self.publish(link, manifest).await
    }

    /// Writes `m` create-only; a manifest of another writer there is a
    /// refusal naming both points.
    async fn publish(&self, link: &mut ObjectLink, m: PointManifest) -> Result<()> {
        let (repo, series) = (&link.repo, &link.series);
        if !manifest::publish(repo, series, &m).await? {
            let there = manifest::load(repo, series, m.seq).await?;
            if there.as_ref().is_none_or(|t| t.point_id != m.point_id) {
                return Err(Error::Refused(format!(
                    "by {}: point {} of datastore {series} was published by another writer (point {}): \
                     two primaries are replicating this datastore to one prefix. This one stops \
                     publishing; its changes stay dirty. Stop the other primary, or give this one \
                     another prefix.",
                    repo.url,
                    m.seq,
                    there.map_or("gone".into(), |t| crate::state::hex(&t.point_id)),
                )));
            }
        }
        self.stats.progressed();
        log::info!(
            "{}: published point {} (epoch {}): {} new blocks, {} bytes",
            repo.url,
            m.seq,
            m.epoch,
            m.new_blocks,
            m.new_bytes
        );
        link.latest = Some(m);
        if let Target::Object {
            keep: Some(keep), ..
        } = &self.opts.target
        {
            // The point is published whatever happens here: a failure only
            // leaves older points for the next publish (or `gc --keep`).
            if let Err(e) = retention::apply(&link.repo, &link.series, keep).await {
                log::warn!(
                    "{}: retention failed, retried after the next point: {e}",
                    link.repo.url
                );
                self.stats.fail(&e);
            }
        }
        Ok(())
    }
}

/// One point's upload: the open pack, the packs in flight, the maps of
/// the files written.
struct Upload<'a> {
    rep: &'a Replicator,
    repo: Repo,
    cache: Arc<Cache>,
    pack: PackBuilder,
    /// Blobs in this point's packs so far (they dedup within the point).
    added: HashSet<BlockHash>,
    /// Packs the point relies on that it did not upload itself.
    relied: HashSet<[u8; 16]>,
    /// Map chunks fetched or made, by hash.
    chunks: HashMap<BlockHash, Arc<Vec<[u8; 16]>>>,
    uploads: JoinSet<Result<()>>,
    slots: Arc<Semaphore>,
    /// The new map of each file with dirty blocks.
    maps: HashMap<u64, FileMap>,
    new_blocks: u64,
    new_bytes: u64,
}

impl<'a> Upload<'a> {
    fn new(rep: &'a Replicator, link: &ObjectLink) -> Upload<'a> {
        Upload {
            rep,
            repo: link.repo.clone(),
            cache: link.cache.clone(),
            pack: PackBuilder::default(),
            added: HashSet::new(),
            relied: HashSet::new(),
            chunks: HashMap::new(),
            uploads: JoinSet::new(),
            slots: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
            maps: HashMap::new(),
            new_blocks: 0,
            new_bytes: 0,
        }
    }

    /// Reads, dedups and packs every block of `work`, and makes the new
    /// maps of its files, one map chunk at a time: blocks come file by
    /// file in ascending order, so a chunk is final once a block past it
    /// arrives, and the primary holds one chunk, not the point's list.
    async fn blocks(&mut self, work: Work, old_maps: &HashMap<u64, FileMap>) -> Result<()> {
        let (tx, mut rx) = mpsc::channel::<Result<(u64, Vec<ReadBlock>)>>(2);
        let key = self.repo.key.clone();
        let files: Vec<_> = work.iter().map(|(f, _)| (f.id.0, f.at_cut().1)).collect();
        let reader = tokio::task::spawn_blocking(move || {
            for (file, blocks) in work {
                for chunk in blocks.chunks(READ_CHUNK_BLOCKS) {
                    let read = read_and_hash(&file, chunk, &key).map(|r| (file.id.0, r));
                    let failed = read.is_err();
                    if tx.blocking_send(read).is_err() || failed {
                        return;
                    }
                }
            }
        });
        let sizes: HashMap<u64, u64> = files.iter().copied().collect();
        let mut remap: Option<Remap> = None;
        let result = async {
            while let Some(read) = rx.recv().await {
                let (file_id, read) = read?;
                if remap.as_ref().is_none_or(|r| r.file_id != file_id) {
                    if let Some(done) = remap.take() {
                        self.finish_map(done).await?;
                    }
                    let size = sizes.get(&file_id).copied().unwrap_or(0);
                    remap = Some(Remap::new(file_id, size, self.repo.block_size(), old_maps));
                }
                let r = remap.as_mut().expect("set above");
                for b in &read {
                    let hash = b.offer.hash.as_slice().try_into().unwrap_or(ZERO);
                    self.set_entry(r, b.offer.block, hash).await?;
                }
                self.add_blocks(read).await?;
            }
            if let Some(done) = remap.take() {
                self.finish_map(done).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        reader
            .await
            .map_err(|e| Error::Remote(format!("reading blocks: {e}")))?;
        result?;
        // Files whose size or path changed without a block to ship.
        for (file_id, size) in files {
            if !self.maps.contains_key(&file_id) {
                let r = Remap::new(file_id, size, self.repo.block_size(), old_maps);
                self.finish_map(r).await?;
            }
        }
        Ok(())
    }

    /// Packs the blocks of `read` no pack holds yet.
    async fn add_blocks(&mut self, read: Vec<ReadBlock>) -> Result<()> {
        let offers = self.rep.count_offers(&read);
        let (mut wanted, mut hashes) = (Vec::new(), Vec::new());
        for (r, o) in read.into_iter().zip(&offers) {
            let Some(hash) = (!o.zero).then(|| BlockHash::from_bytes(&o.hash)).flatten() else {
                continue;
            };
            if !self.known(hash)? {
                self.added.insert(hash);
                wanted.push(r);
                hashes.push(hash);
            }
        }
        let count = offers.len() as u64;
        if !wanted.is_empty() {
            let level = self.rep.opts.level;
            let packed = tokio::task::spawn_blocking(move || pack_blocks(wanted, level, true))
                .await
                .map_err(|e| Error::Remote(format!("compressing: {e}")))??;
            for (p, hash) in packed.into_iter().zip(hashes) {
                self.rep.count_sent(&p);
                self.new_blocks += 1;
                self.new_bytes += p.block.zstd.len() as u64;
                self.pack
                    .add(hash, BlobKind::Block, &p.block.zstd, p.length);
                if self.pack.is_full() {
                    self.send_pack().await?;
                }
            }
        }
        self.rep.stats.ship_done.fetch_add(count, Ordering::Relaxed);
        self.rep.stats.progressed();
        Ok(())
    }

    /// Whether `hash` is in this point's packs or one the point may rely
    /// on (noting that pack as relied on).
    fn known(&mut self, hash: BlockHash) -> Result<bool> {
        if self.added.contains(&hash) {
            return Ok(true);
        }
        match self.cache.lookup_for_write(hash)? {
            Some(loc) => {
                self.relied.insert(loc.pack);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Uploads the open pack in the background (waiting for a slot).
    async fn send_pack(&mut self) -> Result<()> {
        let FinishedPack { id, bytes, entries } = self.pack.finish()?;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::Remote(e.to_string()))?;
        // A failed upload ends the point at the next pack, not the last.
        while let Some(done) = self.uploads.try_join_next() {
            done.map_err(|e| Error::Remote(format!("uploading a pack: {e}")))??;
        }
        let wait = self
            .rep
            .throttle
            .as_ref()
            .map_or(std::time::Duration::ZERO, |t| {
                t.lock().expect("throttle lock").take(bytes.len() as u64)
            });
        let (repo, cache, stats) = (
            self.repo.clone(),
            self.cache.clone(),
            self.rep.stats.clone(),
        );
        self.uploads.spawn(async move {
            tokio::time::sleep(wait).await;
            let len = bytes.len() as u64;
            s3::put(repo.store.as_ref(), &repo.url, &pack_rel(&id), bytes).await?;
            stats.wire_bytes.fetch_add(len, Ordering::Relaxed);
            stats.progressed();
            blocking("noting an uploaded pack", move || {
                cache.uploaded(id, entries)
            })
            .await?;
            drop(slot);
            Ok(())
        });
        Ok(())
    }

    /// The map chunk `hash` (from this point, or fetched).
    async fn map_chunk(&mut self, hash: BlockHash) -> Result<Arc<Vec<[u8; 16]>>> {
        if let Some(c) = self.chunks.get(&hash) {
            return Ok(c.clone());
        }
        let (loc, raw) = match self.cache.read(&self.repo, hash).await? {
            Some(found) => found,
            None => {
                self.cache.repair_from_packs(&self.repo).await?;
                self.cache.read(&self.repo, hash).await?.ok_or_else(|| {
                    self.repo
                        .url
                        .damaged("index", format!("map chunk {hash:?} is in no pack"))
                })?
            }
        };
        self.relied.insert(loc.pack);
        let chunk = Arc::new(decode_map(&raw, &self.repo, &loc.pack_rel())?);
        self.chunks.insert(hash, chunk.clone());
        Ok(chunk)
    }

    /// Sets block `block` of the file `r` maps to `hash`, first making
    /// the chunk it falls in the open one (storing the one before).
    async fn set_entry(&mut self, r: &mut Remap, block: u64, hash: [u8; 16]) -> Result<()> {
        let idx = (block / MAP_CHUNK_BLOCKS) as usize;
        if idx >= r.chunks.len() {
            return Ok(());
        }
        if r.open.as_ref().is_none_or(|(i, _)| *i != idx) {
            self.close_chunk(r).await?;
            let hashes = match hash_of(&r.chunks[idx]) {
                Some(h) => self.map_chunk(h).await?.as_ref().clone(),
                None => vec![ZERO; MAP_CHUNK_BLOCKS as usize],
            };
            r.open = Some((idx, hashes));
        }
        let (_, hashes) = r.open.as_mut().expect("opened above");
        hashes[(block % MAP_CHUNK_BLOCKS) as usize] = hash;
        Ok(())
    }

    /// Stores the open chunk of `r`, cut at the file's end.
    async fn close_chunk(&mut self, r: &mut Remap) -> Result<()> {
        let Some((idx, mut hashes)) = r.open.take() else {
            return Ok(());
        };
        let end = r.nblocks.saturating_sub(idx as u64 * MAP_CHUNK_BLOCKS);
        hashes[end.min(MAP_CHUNK_BLOCKS) as usize..].fill(ZERO);
        r.chunks[idx] = self.store_map(hashes).await?;
        r.closed_last |= idx + 1 == r.chunks.len();
        Ok(())
    }

    /// Finishes the map of `r`: its open chunk stored, and after a shrink
    /// its last chunk cut at the new end (entries past it are stale).
    async fn finish_map(&mut self, mut r: Remap) -> Result<()> {
        self.close_chunk(&mut r).await?;
        if r.shrank && !r.closed_last && !r.chunks.is_empty() {
            let last = r.chunks.len() - 1;
            if let Some(h) = hash_of(&r.chunks[last]) {
                r.open = Some((last, self.map_chunk(h).await?.as_ref().clone()));
                self.close_chunk(&mut r).await?;
            }
        }
        let map = FileMap {
            file_id: r.file_id,
            size: r.size,
            chunks: r.chunks,
        };
        self.maps.insert(r.file_id, map);
        Ok(())
    }

    /// Stores a map chunk as a blob (unless some pack holds it); returns
    /// its reference (empty for all zero).
    async fn store_map(&mut self, hashes: Vec<[u8; 16]>) -> Result<Vec<u8>> {
        if hashes.iter().all(|h| *h == ZERO) {
            return Ok(Vec::new());
        }
        let raw = encode_map(&hashes);
        let hash = self.repo.key.hash(&raw);
        if !self.known(hash)? {
            let stored = block::compress(&raw, 3)
                .map_err(|e| Error::Remote(format!("compressing a map chunk: {e}")))?;
            self.added.insert(hash);
            self.pack.add(hash, BlobKind::Map, &stored, raw.len());
            if self.pack.is_full() {
                self.send_pack().await?;
            }
        }
        self.chunks.insert(hash, Arc::new(hashes));
        Ok(hash.to_bytes().to_vec())
    }

    /// Uploads the last pack, waits for every upload, publishes one
    /// segment naming the packs no segment names, and checks that no pack
    /// the point relies on went to GC; returns the segment's name.
    async fn finish(&mut self) -> Result<String> {
        if !self.pack.is_empty() {
            self.send_pack().await?;
        }
        while let Some(done) = self.uploads.join_next().await {
            done.map_err(|e| Error::Remote(format!("uploading a pack: {e}")))??;
        }
        let pending = {
            let cache = self.cache.clone();
            blocking("listing packs to index", move || cache.pending()).await?
        };
        let mut name = String::new();
        if !pending.packs.is_empty() {
            name = segment_name()?;
            let sealed = crate::object::format::seal(&pending)?;
            s3::put(self.repo.store.as_ref(), &self.repo.url, &name, sealed).await?;
            let (cache, n) = (self.cache.clone(), name.clone());
            blocking("noting a segment", move || cache.indexed(&n, &pending)).await?;
        }
        self.cache.sync(&self.repo).await?;
        let gone: Vec<_> = (self.relied.iter())
            .filter(|p| self.cache.is_candidate(p) || !self.cache.has_pack(p).unwrap_or(false))
            .collect();
        if !gone.is_empty() {
            return Err(Error::Remote(format!(
                "{}: {} packs this point relies on became GC candidates while it uploaded; \
                 the point ships again without them",
                self.repo.url,
                gone.len()
            )));
        }
        Ok(name)
    }
}
