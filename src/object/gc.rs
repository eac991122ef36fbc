//! Garbage collection of the object store (`hbrfs gc s3://…`): packs no
//! live point needs are deleted, without ever deleting one a concurrent
//! upload relies on.
//!
//! # One run
//!
//! 1. **Lease.** `gc/lease` is created create-only; one past its expiry is
//!    taken over by a conditional replace (`If-Match` its ETag), so of two
//!    GCs only one holds it. It is renewed the same way while the run
//!    lasts, and deleted at the end. A live lease is a refusal naming its
//!    holder and expiry. `--dry-run` takes no lease and writes nothing.
//! 2. **Retention** (`--keep`): the grid applied to every series first
//!    ([`super::retention`]).
//! 3. **Mark**, in this order: the live manifests of every series; then
//!    the index segments (every manifest's segment was written before it,
//!    so all it names is indexed); then the listing of `data/` (every pack
//!    a listed segment names was uploaded before it). Each manifest's map
//!    chunks are fetched once per distinct hash; the map chunks and the
//!    blocks they name are the referenced blobs. A referenced blob keeps
//!    the newest pack that holds it (by upload time, then id); a pack is
//!    referenced if it keeps any. So a blob held twice (a writer stored it
//!    again beside a candidate, or a repack copied it) lets the older copy
//!    go; a reader whose index named that copy finds it gone, learns the
//!    deletion from `gc/deleted/` and reads the other
//!    ([`super::cache::Cache::read`]). A pack in no segment (a writer died
//!    between its packs and its segment, or is uploading now) cannot be
//!    referenced: no manifest is published before its segment.
//! 4. **Sweep.** Packs of the previous `gc/candidates` first marked at
//!    least the grace period before this mark began and still
//!    unreferenced are written to `gc/deleted/NS`, then deleted. The new
//!    `gc/candidates` lists every other unreferenced pack older than the
//!    grace period (a younger one may belong to an upload in flight), each
//!    with its *first* mark: a pack that stays a candidate keeps the time
//!    it first became one, and one that was referenced in between starts
//!    again. Segments all of whose packs are gone are deleted last (a
//!    cache that loaded them already dropped their packs by
//!    `gc/deleted/`; one that never did has no use for them).
//! 5. **Repack.** Referenced packs under half live are sparse. The live
//!    blobs of the sparsest (up to [`REPACK_BYTES_PER_RUN`] a run) are
//!    read whole, checked against their hashes, and written into new packs
//!    named by one new segment. The sparse packs stay: the next run finds
//!    their blobs kept newer elsewhere, lists them as candidates, and a run
//!    a grace period later deletes them, so a repack frees space two runs
//!    and a grace period after it, by the same path as any other pack.
//!
//! # Why this never deletes what an upload needs
//!
//! A writer never dedups against a candidate, and re-syncs before it
//! publishes, failing the point if a pack it relied on became a candidate
//! (or was deleted). A pack is deleted only if it was a candidate for the
//! whole grace period before the mark and no manifest loaded by that mark
//! names it: a writer that relied on it must have synced before it became
//! a candidate and published after the mark, more than a grace period
//! later, with no re-sync in between. A fresh pack is no candidate before
//! it is a grace period old, so an upload shorter than that never sees its
//! own packs marked. The grace period is meant to be hours (default 24 h);
//! the milliseconds between a mark's clock reading and its write do not
//! count.
//!
//! # Cost
//!
//! LISTs of `points/`, `index/` and `data/` (one per 1,000 keys), a GET per
//! live manifest, and GETs of index segments and map chunks not in the
//! local cache (`--cache-dir`: both are immutable, so a later run fetches
//! only new ones); then a PUT and a DELETE per deleted pack and a PUT of
//! the candidates. The index is held in memory: about 120 bytes a blob,
//! with the live set and each live blob's keeper (~2 GiB for 1 TiB of
//! 64 KiB blocks). A repack adds a GET of each sparse pack it copies, a
//! PUT per new pack and one for its segment.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;

use crate::block::BlockHash;
use crate::error::{Error, IoContext, Result};
use crate::keep::Retention;
use crate::proto::object::{
    BlobKind, GcCandidates, GcDeleted, GcLease, IndexSegment, index_segment,
};
use crate::state::{hex, now_ns, unhex, utc};

use super::cache::{self, Location, fetch, segment_name};
use super::manifest::{decode_map, hash_of, list_series, point_rel};
use super::pack::{FinishedPack, PackBuilder};
use super::retention::{published, to_drop};
use super::{Repo, format, pack_rel, s3};

/// How long a lease holds without renewal: a GC that died frees the
/// repository for the next one after this.
pub const LEASE_TTL: Duration = Duration::from_secs(300);
/// Requests in flight at once while marking.
const CONCURRENCY: usize = 16;
/// A referenced pack below this share of live bytes is sparse.
const SPARSE_SHARE: f64 = 0.5;
/// Live bytes one run copies out of sparse packs at most: more is left
/// for the next runs, so one run's time stays bounded.
pub const REPACK_BYTES_PER_RUN: u64 = 1 << 30;

/// What `hbrfs gc` asks.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// How long a pack stays a candidate before it may go, and how old an
    /// unreferenced pack must be to become one: longer than any upload.
    pub grace: Duration,
    /// Report only: no lease, no write, no delete.
    pub dry_run: bool,
    /// Apply this grid to every series first.
    pub keep: Option<Retention>,
    /// Where index segments and map chunks are cached between runs.
    pub cache_dir: PathBuf,
}

/// A pack referenced for less than half its bytes.
#[derive(Clone, Debug, Serialize)]
pub struct SparsePack {
    /// Its key below the prefix.
    pub pack: String,
    /// Bytes of blobs in it.
    pub bytes: u64,
    /// Bytes of blobs a live point names.
    pub live_bytes: u64,
}

/// Requests one run made, by kind.
#[derive(Debug, Default, Serialize)]
pub struct Requests {
    /// LIST calls (each may be several pages).
    pub lists: u64,
    /// GETs (whole objects and ranges).
    pub gets: u64,
    /// PUTs (lease, deletion record, candidates).
    pub puts: u64,
    /// DELETEs (manifests, packs, segments, the lease).
    pub deletes: u64,
}

/// What one run found and did (or, dry, would do).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Points retention let go: (series, seq).
    pub dropped: Vec<(String, u64)>,
    /// Live points marked.
    pub points: u64,
    /// Distinct map chunks they name.
    pub map_chunks: u64,
    /// Packs in `data/`, and their bytes.
    pub packs: u64,
    pub pack_bytes: u64,
    /// Packs a live point needs, their bytes, and the live blobs' bytes.
    pub referenced_packs: u64,
    pub referenced_bytes: u64,
    pub live_blob_bytes: u64,
    /// Unreferenced packs younger than the grace period (uploads in
    /// flight, or just orphaned): not candidates yet.
    pub young_packs: u64,
    pub young_bytes: u64,
    /// Candidates after this run, and their bytes.
    pub candidates: u64,
    pub candidate_bytes: u64,
    /// Packs deleted (dry: that would be), and the bytes freed.
    pub deleted: u64,
    pub freed_bytes: u64,
    /// Index segments deleted (all their packs gone).
    pub segments_deleted: u64,
    /// Referenced packs under half live.
    pub sparse: Vec<SparsePack>,
    /// Sparse packs whose live blobs this run copied into new packs (dry:
    /// would copy), sparsest first up to [`REPACK_BYTES_PER_RUN`]; they go
    /// by the grace path from the next run on, the new copies held newer.
    pub repacked: u64,
    /// Live bytes those copies took, and the packs they were written to.
    pub repacked_bytes: u64,
    pub repack_packs: u64,
    /// What the run cost.
    pub requests: Requests,
    /// Wall time, ms.
    pub elapsed_ms: u64,
}

/// Request counters, shared by the concurrent fetches.
#[derive(Default)]
struct Counts {
    lists: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
}

impl Counts {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) -> Requests {
        Requests {
            lists: self.lists.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
        }
    }
}

/// The default `--cache-dir` for `repo`: `$XDG_CACHE_HOME/hbrfs/ID-gc`,
/// else `~/.cache/hbrfs/ID-gc`, else one under the temp folder.
pub fn default_cache_dir(repo: &Repo) -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("hbrfs").join(format!("{}-gc", repo.id_hex()))
}

/// Runs one GC on `repo`.
pub async fn run(repo: &Repo, opts: &GcOptions) -> Result<GcReport> {
    let started = std::time::Instant::now();
    let counts = Counts::default();
    let mut lease = if opts.dry_run {
        None
    } else {
        Some(Lease::take(repo, &counts).await?)
    };
    let result = collect(repo, opts, &counts, &mut lease).await;
    if let Some(lease) = lease {
        let released = lease.release(repo, &counts).await;
        if result.is_ok() {
            released?;
        } else if let Err(e) = released {
            log::warn!("{e}");
        }
    }
    let mut report = result?;
    report.requests = counts.report();
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// What the mark found of one pack.
#[derive(Debug, Default)]
struct PackState {
    /// Object size (from the listing).
    size: u64,
    /// When it was uploaded (unix ns).
    modified_ns: u64,
    /// Blob bytes, and live blob bytes.
    blob_bytes: u64,
    live_bytes: u64,
    referenced: bool,
}

impl PackState {
    /// Referenced for less than [`SPARSE_SHARE`] of its blob bytes.
    fn is_sparse(&self) -> bool {
        (self.live_bytes as f64) < SPARSE_SHARE * self.blob_bytes as f64
    }
}

async fn collect(
    repo: &Repo,
    opts: &GcOptions,
    counts: &Counts,
    lease: &mut Option<Lease>,
) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    let store = repo.store.as_ref();
    let mark_ns = now_ns();
    let cache = LocalCache::open(&opts.cache_dir)?;

    // Retention, and the live manifests.
    Counts::add(&counts.lists);
    let mut live = Vec::new();
    for series in list_series(repo).await? {
        Counts::add(&counts.lists);
        let points = published(repo, &series).await?;
        let dropped = match &opts.keep {
            Some(keep) => to_drop(keep, &points, mark_ns),
            None => Vec::new(),
        };
        for seq in &dropped {
            if !opts.dry_run {
                Counts::add(&counts.deletes);
                s3::delete(store, &repo.url, &point_rel(&series, *seq)).await?;
            }
            report.dropped.push((series.clone(), *seq));
        }
        let dropped: HashSet<u64> = dropped.into_iter().collect();
        live.extend(
            points
                .iter()
                .filter(|p| !dropped.contains(&p.seq))
                .map(|p| point_rel(&series, p.seq)),
        );
    }
    keep_lease(lease, repo, counts).await?;
    let manifests = concurrently(live, |rel| async move {
        Counts::add(&counts.gets);
        let Some(bytes) = s3::get_opt(store, &repo.url, &rel).await? else {
            return Ok(None); // let go meanwhile (the primary's retention)
        };
        let m: crate::proto::object::PointManifest = format::open(&bytes, &repo.url, &rel)?;
        Ok(Some((rel, m)))
    })
    .await?;
    let mut map_named_by: HashMap<u128, String> = HashMap::new();
    for (rel, m) in manifests.iter().flatten() {
        report.points += 1;
        for file in &m.files {
            for chunk in &file.chunks {
                if !chunk.is_empty() && chunk.len() != 16 {
                    return Err(repo
                        .url
                        .damaged(rel, format!("a map chunk hash of {} bytes", chunk.len())));
                }
                if let Some(h) = hash_of(chunk) {
                    map_named_by.entry(h.0).or_insert_with(|| rel.clone());
                }
            }
        }
    }
    drop(manifests);
    report.map_chunks = map_named_by.len() as u64;

    // The index: every segment, then the packs in `data/`.
    keep_lease(lease, repo, counts).await?;
    Counts::add(&counts.lists);
    let segment_rels: Vec<String> = s3::list(store, &repo.url, "index")
        .await?
        .iter()
        .map(|m| repo.url.rel(&m.location).to_string())
        .collect();
    let segments = concurrently(segment_rels, |rel| {
        let cache = &cache;
        async move {
            let bytes = cache
                .segment(&rel, || async {
                    Counts::add(&counts.gets);
                    s3::get_opt(store, &repo.url, &rel).await
                })
                .await?;
            let Some(bytes) = bytes else {
                return Ok(None); // deleted by an earlier GC meanwhile
            };
            let segment: IndexSegment = format::open(&bytes, &repo.url, &rel)?;
            Ok(Some((rel, segment)))
        }
    })
    .await?;
    Counts::add(&counts.lists);
    let mut packs: HashMap<[u8; 16], PackState> = HashMap::new();
    for meta in s3::list(store, &repo.url, "data").await? {
        let rel = repo.url.rel(&meta.location);
        let Some(id) = rel
            .rsplit('/')
            .next()
            .and_then(unhex)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
        else {
            log::warn!("{}/{rel}: not a pack's name; left alone", repo.url);
            continue;
        };
        let modified_ns = meta.last_modified.timestamp_nanos_opt().unwrap_or(0);
        packs.insert(
            id,
            PackState {
                size: meta.size,
                modified_ns: u64::try_from(modified_ns).unwrap_or(0),
                ..PackState::default()
            },
        );
    }

    // Where each map chunk lies, and each pack's blobs by hash.
    let mut maps: HashMap<u128, Location> = HashMap::new();
    let mut blobs: HashMap<[u8; 16], Vec<(u128, u64)>> = HashMap::new();
    let mut segment_packs: Vec<(String, Vec<[u8; 16]>)> = Vec::new();
    for (rel, segment) in segments.iter().flatten() {
        let mut named = Vec::new();
        for p in &segment.packs {
            let id: [u8; 16] = p
                .pack
                .as_slice()
                .try_into()
                .map_err(|_| repo.url.damaged(rel, "a pack id not 16 bytes long"))?;
            named.push(id);
            let listed = blobs.entry(id).or_default();
            if !listed.is_empty() {
                continue; // named by two segments (a repair, a retried point)
            }
            for e in &p.entries {
                format::check_entry(e, u64::MAX, &repo.url, rel)?;
                let h = BlockHash::from_bytes(&e.hash).map_or(0, |h| h.0);
                listed.push((h, u64::from(e.stored)));
                if e.kind() == BlobKind::Map && packs.contains_key(&id) {
                    let loc = Location {
                        pack: id,
                        offset: e.offset,
                        stored: e.stored,
                        raw: e.raw,
                        kind: BlobKind::Map,
                    };
                    maps.entry(h).or_insert(loc);
                }
            }
        }
        segment_packs.push((rel.clone(), named));
    }
    drop(segments);

    // The map chunks: the referenced blobs.
    keep_lease(lease, repo, counts).await?;
    let wanted: Vec<(u128, String)> = map_named_by.into_iter().collect();
    let chunks = concurrently(wanted, |(h, named_by)| {
        let (cache, maps, packs) = (&cache, &maps, &packs);
        async move {
            let hash = BlockHash(h);
            let Some(loc) = maps.get(&h).filter(|l| packs.contains_key(&l.pack)) else {
                return Err(repo.url.damaged(
                    &named_by,
                    format!(
                        "names map chunk {hash:?}, which no pack holds: the repository is \
                         damaged; GC stopped before deleting anything"
                    ),
                ));
            };
            let raw = cache
                .map_chunk(repo, hash, || async {
                    Counts::add(&counts.gets);
                    fetch(repo, hash, loc).await?.ok_or_else(|| {
                        repo.url.damaged(
                            &loc.pack_rel(),
                            "vanished while GC held the lease; GC stopped before deleting anything",
                        )
                    })
                })
                .await?;
            let what = format!("{} (map chunk {hash:?})", loc.pack_rel());
            let hashes = decode_map(&raw, repo, &what)?;
            Ok((h, hashes))
        }
    })
    .await?;
    let mut referenced: HashSet<u128> = HashSet::new();
    for (h, hashes) in &chunks {
        referenced.insert(*h);
        referenced.extend(hashes.iter().filter_map(|b| hash_of(b)).map(|b| b.0));
    }
    cache.keep_maps(chunks.iter().map(|(h, _)| *h))?;
    drop(chunks);

    // Which packs are referenced: a blob held by several packs keeps only
    // the newest (a repack's copy, or a writer's beside a candidate), so
    // the older copies go by the grace path; a reader that knew one reads
    // another once it is deleted.
    let mut keeper: HashMap<u128, (u64, [u8; 16])> = HashMap::new();
    for (id, state) in &packs {
        for &(h, _) in blobs.get(id).map(Vec::as_slice).unwrap_or_default() {
            if referenced.contains(&h) {
                let k = keeper.entry(h).or_insert((state.modified_ns, *id));
                *k = (*k).max((state.modified_ns, *id));
            }
        }
    }
    if let Some(missing) = referenced.iter().find(|h| !keeper.contains_key(h)) {
        return Err(Error::BadState {
            path: PathBuf::from(repo.url.to_string()),
            reason: format!(
                "{} blobs live points name are in no pack (e.g. {:?}): the repository is \
                 damaged; GC stopped before deleting anything",
                referenced.len() - keeper.len(),
                BlockHash(*missing)
            ),
        });
    }
    let keeps = |h: u128, id: &[u8; 16]| keeper.get(&h).is_some_and(|k| k.1 == *id);
    for (id, state) in packs.iter_mut() {
        for &(h, stored) in blobs.get(id).map(Vec::as_slice).unwrap_or_default() {
            state.blob_bytes += stored;
            if keeps(h, id) {
                state.live_bytes += stored;
                state.referenced = true;
            }
        }
    }
    // The sparse packs, sparsest first; the first ones, up to
    // REPACK_BYTES_PER_RUN, are repacked with the blobs they keep.
    let mut sparse: Vec<[u8; 16]> = packs
        .iter()
        .filter(|(_, p)| p.referenced && p.is_sparse())
        .map(|(id, _)| *id)
        .collect();
    sparse.sort_by_key(|id| packs[id].live_bytes * 1000 / packs[id].blob_bytes.max(1));
    let mut repack_from = Vec::new();
    for id in &sparse {
        let live = packs[id].live_bytes;
        if report.repacked_bytes + live > REPACK_BYTES_PER_RUN && !repack_from.is_empty() {
            break;
        }
        report.repacked += 1;
        report.repacked_bytes += live;
        let held = blobs.get(id).map(Vec::as_slice).unwrap_or_default();
        let kept = held.iter().filter(|(h, _)| keeps(*h, id)).map(|(h, _)| *h);
        repack_from.push((*id, kept.collect::<HashSet<u128>>()));
    }
    report.sparse = sparse
        .iter()
        .map(|id| SparsePack {
            pack: pack_rel(id),
            bytes: packs[id].blob_bytes,
            live_bytes: packs[id].live_bytes,
        })
        .collect();
    drop((referenced, keeper, blobs, maps));

    report.packs = packs.len() as u64;
    report.pack_bytes = packs.values().map(|p| p.size).sum();
    let mut unreferenced = Vec::new();
    for (id, p) in &packs {
        if p.referenced {
            report.referenced_packs += 1;
            report.referenced_bytes += p.size;
            report.live_blob_bytes += p.live_bytes;
        } else {
            unreferenced.push((*id, p.modified_ns));
        }
    }

    // The sweep.
    Counts::add(&counts.gets);
    let previous = match s3::get_opt(store, &repo.url, CANDIDATES).await? {
        Some(bytes) => first_marks(&format::open(&bytes, &repo.url, CANDIDATES)?),
        None => HashMap::new(),
    };
    let grace_ns = opts.grace.as_nanos().min(u128::from(u64::MAX)) as u64;
    let plan = plan_sweep(&previous, &unreferenced, mark_ns, grace_ns);
    let size = |id: &[u8; 16]| packs.get(id).map_or(0, |p| p.size);
    report.young_packs = plan.young.len() as u64;
    report.young_bytes = plan.young.iter().map(size).sum();
    report.candidates = plan.candidates.len() as u64;
    report.candidate_bytes = plan.candidates.iter().map(|(id, _)| size(id)).sum();
    report.deleted = plan.delete.len() as u64;
    report.freed_bytes = plan.delete.iter().map(size).sum();
    let gone: HashSet<[u8; 16]> = plan.delete.iter().copied().collect();
    let dead_segments: Vec<&String> = segment_packs
        .iter()
        .filter(|(_, named)| {
            named
                .iter()
                .all(|id| gone.contains(id) || !packs.contains_key(id))
        })
        .map(|(rel, _)| rel)
        .collect();
    report.segments_deleted = dead_segments.len() as u64;
    if opts.dry_run {
        return Ok(report);
    }

    if !plan.delete.is_empty() {
        keep_lease(lease, repo, counts).await?;
        let record = GcDeleted {
            packs: plan.delete.iter().map(|id| id.to_vec()).collect(),
        };
        let rel = format!("gc/deleted/{:020}", now_ns());
        Counts::add(&counts.puts);
        s3::put(store, &repo.url, &rel, format::seal(&record)?).await?;
        for id in &plan.delete {
            keep_lease(lease, repo, counts).await?;
            Counts::add(&counts.deletes);
            s3::delete(store, &repo.url, &pack_rel(id)).await?;
        }
    }
    keep_lease(lease, repo, counts).await?;
    let record = GcCandidates {
        marked_ns: mark_ns,
        packs: plan.candidates.iter().map(|(id, _)| id.to_vec()).collect(),
        first_marked_ns: plan.candidates.iter().map(|(_, at)| *at).collect(),
    };
    Counts::add(&counts.puts);
    s3::put(store, &repo.url, CANDIDATES, format::seal(&record)?).await?;
    for rel in dead_segments {
        keep_lease(lease, repo, counts).await?;
        Counts::add(&counts.deletes);
        s3::delete(store, &repo.url, rel).await?;
        cache.forget_segment(rel)?;
    }
    report.repack_packs = repack(repo, &repack_from, lease, counts).await?;
    log::info!(
        "{}: GC deleted {} packs ({} bytes); {} candidates; repacked {} sparse packs ({} live bytes) into {}",
        repo.url,
        report.deleted,
        report.freed_bytes,
        report.candidates,
        report.repacked,
        report.repacked_bytes,
        report.repack_packs
    );
    Ok(report)
}

/// Copies the live blobs of each pack of `from` (with the hashes this run
/// keeps in it) into new packs, checked on the way, and publishes one index
/// segment naming them; returns how many packs it wrote. The sources stay:
/// the next run finds their blobs held newer elsewhere and lists them as
/// candidates. A run that dies first leaves packs in no segment, which go
/// the way of any orphan.
async fn repack(
    repo: &Repo,
    from: &[([u8; 16], HashSet<u128>)],
    lease: &mut Option<Lease>,
    counts: &Counts,
) -> Result<u64> {
    let store = repo.store.as_ref();
    let (mut builder, mut written) = (PackBuilder::default(), Vec::new());
    for (id, live) in from {
        keep_lease(lease, repo, counts).await?;
        let rel = pack_rel(id);
        Counts::add(&counts.gets);
        let bytes = s3::get_opt(store, &repo.url, &rel)
            .await?
            .ok_or_else(|| repo.url.damaged(&rel, "vanished while GC held the lease"))?;
        for e in format::parse_footer(&bytes, bytes.len() as u64, &repo.url, &rel)? {
            let Some(hash) = BlockHash::from_bytes(&e.hash).filter(|h| live.contains(&h.0)) else {
                continue;
            };
            let loc = Location::of(*id, &e);
            let stored = &bytes[e.offset as usize..(e.offset + u64::from(e.stored)) as usize];
            cache::open_blob(repo, hash, &loc, stored)?;
            builder.add(hash, e.kind(), stored, e.raw as usize);
            if builder.is_full() {
                keep_lease(lease, repo, counts).await?;
                written.push(put_pack(repo, &mut builder, counts).await?);
            }
        }
    }
    if !builder.is_empty() {
        written.push(put_pack(repo, &mut builder, counts).await?);
    }
    if written.is_empty() {
        return Ok(0);
    }
    let segment = IndexSegment { packs: written };
    keep_lease(lease, repo, counts).await?;
    Counts::add(&counts.puts);
    s3::put(store, &repo.url, &segment_name()?, format::seal(&segment)?).await?;
    Ok(segment.packs.len() as u64)
}

/// Uploads the pack `builder` holds; what a segment says of it.
async fn put_pack(
    repo: &Repo,
    builder: &mut PackBuilder,
    counts: &Counts,
) -> Result<index_segment::Pack> {
    let FinishedPack { id, bytes, entries } = builder.finish()?;
    Counts::add(&counts.puts);
    s3::put(repo.store.as_ref(), &repo.url, &pack_rel(&id), bytes).await?;
    Ok(index_segment::Pack {
        pack: id.to_vec(),
        entries,
    })
}

/// The candidates record's key below the prefix.
const CANDIDATES: &str = "gc/candidates";

/// Each candidate of `c` with its first mark.
fn first_marks(c: &GcCandidates) -> HashMap<[u8; 16], u64> {
    c.packs
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let id = <[u8; 16]>::try_from(p.as_slice()).ok()?;
            Some((id, c.first_marked_ns.get(i).copied().unwrap_or(c.marked_ns)))
        })
        .collect()
}

/// What a sweep does.
#[derive(Debug, Default, PartialEq, Eq)]
struct SweepPlan {
    /// Packs to delete now.
    delete: Vec<[u8; 16]>,
    /// The new candidates with their first marks.
    candidates: Vec<([u8; 16], u64)>,
    /// Unreferenced packs too young to be candidates.
    young: Vec<[u8; 16]>,
}

/// The sweep for the packs `unreferenced` now (with their upload times),
/// given the `previous` candidates' first marks, this mark's time and the
/// grace period. Pure: the candidate state machine.
///
/// - a previous candidate still unreferenced whose first mark is a grace
///   period old goes;
/// - one not yet that old stays a candidate with its first mark;
/// - any other unreferenced pack becomes a candidate marked now, if it was
///   uploaded at least a grace period ago; else it is young and waits;
/// - a previous candidate referenced again (or gone) is dropped: if it is
///   unreferenced later, its grace starts again.
fn plan_sweep(
    previous: &HashMap<[u8; 16], u64>,
    unreferenced: &[([u8; 16], u64)],
    mark_ns: u64,
    grace_ns: u64,
) -> SweepPlan {
    let mut plan = SweepPlan::default();
    for &(id, uploaded_ns) in unreferenced {
        match previous.get(&id) {
            Some(&first) if first.saturating_add(grace_ns) <= mark_ns => plan.delete.push(id),
            Some(&first) => plan.candidates.push((id, first)),
            None if uploaded_ns.saturating_add(grace_ns) <= mark_ns => {
                plan.candidates.push((id, mark_ns))
            }
            None => plan.young.push(id),
        }
    }
    plan.delete.sort_unstable();
    plan.candidates.sort_unstable();
    plan.young.sort_unstable();
    plan
}

/// Runs `f` on every item, [`CONCURRENCY`] at a time; the results in any
/// order, or the first error.
async fn concurrently<I, T, F, Fut>(items: Vec<I>, f: F) -> Result<Vec<T>>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    futures_util::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// Renews `lease` if one is held and a third of it has passed.
async fn keep_lease(lease: &mut Option<Lease>, repo: &Repo, counts: &Counts) -> Result<()> {
    match lease {
        Some(l) => l.keep(repo, counts).await,
        None => Ok(()),
    }
}

/// The GC lease this run holds.
struct Lease {
    /// What the last write returned: the next renewal is conditional on it.
    version: UpdateVersion,
    /// When it was last written, and who holds it.
    renewed_ns: u64,
    holder: Vec<u8>,
}

/// The lease's key below the prefix.
const LEASE: &str = "gc/lease";

impl Lease {
    /// Takes the lease, or says who holds it.
    async fn take(repo: &Repo, counts: &Counts) -> Result<Lease> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("{} pid {}", host.trim(), std::process::id()).into_bytes();
        let store = repo.store.as_ref();
        let key = repo.key(LEASE);
        // Twice: a lease released between our create and our read is
        // created again.
        for _ in 0..2 {
            let now = now_ns();
            let record = lease_record(&holder, now)?;
            Counts::add(&counts.puts);
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match store.put_opts(&key, record.clone(), create).await {
                Ok(put) => {
                    return Ok(Lease {
                        version: put.into(),
                        renewed_ns: now,
                        holder,
                    });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(s3::failed(&repo.url, "creating gc/lease", e)),
            }
            Counts::add(&counts.gets);
            let got = match store.get(&key).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(s3::failed(&repo.url, "reading gc/lease", e)),
            };
            let seen = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got
                .bytes()
                .await
                .map_err(|e| s3::failed(&repo.url, "reading gc/lease", e))?;
            let held: GcLease = format::open(&bytes, &repo.url, LEASE)?;
            let who = String::from_utf8_lossy(&held.holder).into_owned();
            if held.expires_ns > now {
                return Err(Error::Usage(format!(
                    "{}: another GC is running ({who}, since {} UTC); its lease {}/{LEASE} \
                     expires at {} UTC unless renewed: try again later",
                    repo.url,
                    utc(held.taken_ns),
                    repo.url,
                    utc(held.expires_ns)
                )));
            }
            log::warn!(
                "{}: taking over the GC lease of {who}, expired at {} UTC",
                repo.url,
                utc(held.expires_ns)
            );
            Counts::add(&counts.puts);
            return match store.put_opts(&key, record, update(seen)).await {
                Ok(put) => Ok(Lease {
                    version: put.into(),
                    renewed_ns: now,
                    holder,
                }),
                Err(object_store::Error::Precondition { .. }) => Err(Error::Usage(format!(
                    "{}: the GC lease of {who} had expired, but another GC took it over \
                     first: try again later",
                    repo.url
                ))),
                Err(e) => Err(s3::failed(&repo.url, "taking over gc/lease", e)),
            };
        }
        Err(Error::Usage(format!(
            "{}: {LEASE} came and went twice while taking it: other GCs are running, try \
             again later",
            repo.url
        )))
    }

    /// Renews the lease once a third of it has passed; an error if another
    /// GC took it (this one ran past its expiry).
    async fn keep(&mut self, repo: &Repo, counts: &Counts) -> Result<()> {
        let now = now_ns();
        let ttl = LEASE_TTL.as_nanos() as u64;
        if now < self.renewed_ns + ttl / 3 {
            return Ok(());
        }
        let record = lease_record(&self.holder, now)?;
        Counts::add(&counts.puts);
        match repo
            .store
            .put_opts(&repo.key(LEASE), record, update(self.version.clone()))
            .await
        {
            Ok(put) => {
                self.version = put.into();
                self.renewed_ns = now;
                Ok(())
            }
            Err(object_store::Error::Precondition { .. }) => Err(Error::Usage(format!(
                "{}: this GC lost its lease {}/{LEASE} to another GC (it ran past the \
                 lease's expiry); it stopped",
                repo.url, repo.url
            ))),
            Err(e) => Err(s3::failed(&repo.url, "renewing gc/lease", e)),
        }
    }

    /// Deletes the lease, unless it expired meanwhile (another GC may hold
    /// it now: a plain DELETE would free theirs).
    async fn release(self, repo: &Repo, counts: &Counts) -> Result<()> {
        if now_ns() >= self.renewed_ns + LEASE_TTL.as_nanos() as u64 {
            log::warn!("{}: this GC's lease expired before it ended", repo.url);
            return Ok(());
        }
        Counts::add(&counts.deletes);
        s3::delete(repo.store.as_ref(), &repo.url, LEASE).await
    }
}

/// A lease record for `holder`, taken now.
fn lease_record(holder: &[u8], now: u64) -> Result<PutPayload> {
    let lease = GcLease {
        holder: holder.to_vec(),
        taken_ns: now,
        expires_ns: now + LEASE_TTL.as_nanos() as u64,
    };
    Ok(PutPayload::from(format::seal(&lease)?))
}

/// Put options replacing only the version `seen`.
fn update(seen: UpdateVersion) -> PutOptions {
    PutOptions {
        mode: PutMode::Update(seen),
        ..PutOptions::default()
    }
}

/// Immutable objects kept between runs: index segments by name, map
/// chunks by hash (checked against it when read back).
struct LocalCache {
    segments: PathBuf,
    maps: PathBuf,
}

impl LocalCache {
    fn open(dir: &Path) -> Result<LocalCache> {
        let cache = LocalCache {
            segments: dir.join("segments"),
            maps: dir.join("maps"),
        };
        for d in [&cache.segments, &cache.maps] {
            std::fs::create_dir_all(d).at(d)?;
        }
        Ok(cache)
    }

    fn segment_path(&self, rel: &str) -> PathBuf {
        self.segments.join(rel.replace('/', "_"))
    }

    /// Segment `rel`, from here or from `get` (then kept).
    async fn segment<F, Fut>(&self, rel: &str, get: F) -> Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>>>,
    {
        let path = self.segment_path(rel);
        if let Ok(bytes) = std::fs::read(&path) {
            return Ok(Some(Bytes::from(bytes)));
        }
        let got = get().await?;
        if let Some(bytes) = &got {
            crate::state::write_durably(&path, bytes)?;
        }
        Ok(got)
    }

    fn forget_segment(&self, rel: &str) -> Result<()> {
        let path = self.segment_path(rel);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&path),
            _ => Ok(()),
        }
    }

    /// Map chunk `hash` (its raw content), from here if it still hashes to
    /// its name, else from `get` (then kept).
    async fn map_chunk<F, Fut>(&self, repo: &Repo, hash: BlockHash, get: F) -> Result<Vec<u8>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        let path = self.maps.join(hex(&hash.to_bytes()));
        if let Ok(raw) = std::fs::read(&path)
            && repo.key.hash(&raw) == hash
        {
            return Ok(raw);
        }
        let raw = get().await?;
        crate::state::write_durably(&path, &raw)?;
        Ok(raw)
    }

    /// Drops the map chunks not in `used`, so the cache follows the live
    /// points.
    fn keep_maps(&self, used: impl Iterator<Item = u128>) -> Result<()> {
        let used: HashSet<String> = used.map(|h| hex(&BlockHash(h).to_bytes())).collect();
        for entry in std::fs::read_dir(&self.maps).at(&self.maps)? {
            let path = entry.at(&self.maps)?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !used.contains(name.as_ref()) {
                std::fs::remove_file(&path).at(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 100;

    fn id(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn a_candidate_goes_only_after_a_grace_period_from_its_first_mark() {
        let none = HashMap::new();
        // Run 1 at t=1000: pack 1 old enough, pack 2 uploaded 10 ns ago.
        let plan = plan_sweep(&none, &[(id(1), 0), (id(2), 990)], 1000, G);
        assert_eq!(plan.candidates, vec![(id(1), 1000)]);
        assert_eq!(plan.young, vec![id(2)]);
        assert!(plan.delete.is_empty());
        // Run 2 at t=1090: both candidates now, pack 1 keeps its first mark.
        let prev: HashMap<_, _> = plan.candidates.into_iter().collect();
        let plan = plan_sweep(&prev, &[(id(1), 0), (id(2), 990)], 1090, G);
        assert_eq!(plan.candidates, vec![(id(1), 1000), (id(2), 1090)]);
        assert!(plan.delete.is_empty());
        // Run 3 at t=1100: pack 1 goes (a grace from its first mark); pack
        // 2 was referenced again meanwhile and is no candidate.
        let prev: HashMap<_, _> = plan.candidates.into_iter().collect();
        let plan = plan_sweep(&prev, &[(id(1), 0)], 1100, G);
        assert_eq!(plan.delete, vec![id(1)]);
        assert!(plan.candidates.is_empty());
        // Unreferenced again at t=1120: its grace starts over.
        let prev: HashMap<_, _> = plan.candidates.into_iter().collect();
        let plan = plan_sweep(&prev, &[(id(2), 990)], 1120, G);
        assert_eq!(plan.candidates, vec![(id(2), 1120)]);
    }

    #[test]
    fn first_marks_read_old_records_by_their_mark() {
        let c = GcCandidates {
            marked_ns: 7,
            packs: vec![id(1).to_vec(), id(2).to_vec(), vec![1, 2]],
            first_marked_ns: vec![3],
        };
        let marks = first_marks(&c);
        assert_eq!(marks.get(&id(1)), Some(&3));
        assert_eq!(marks.get(&id(2)), Some(&7));
        assert_eq!(marks.len(), 2);
    }
}
