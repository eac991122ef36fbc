//! The local index of a repository: which pack holds each blob. It is a
//! cache of the repository's index segments (loaded as new ones appear),
//! kept in sled beside the datastore's state (a writer) or in a cache
//! folder (a reader), and rebuilt from the packs' own footers when a blob
//! is in no segment (segments lost, or a writer that died between its
//! packs and its segment).
//!
//! A writer also records here the packs it uploaded that no segment names
//! yet ([`Cache::pending`]): the next point's segment names them, so a
//! point resumed after a failure neither uploads them again nor leaves
//! them unindexed.
//!
//! GC's records shape what a writer may rely on: packs a GC deleted are
//! dropped, and a writer never dedups against a pack GC listed as a
//! candidate (it may be deleted once the grace period passes; a point
//! that relies on it would lose the block).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;

use crate::block::BlockHash;
use crate::error::{Error, Result};
use crate::proto::object::{
    BlobKind, GcCandidates, GcDeleted, IndexSegment, PackEntry, index_segment,
};

use super::{Repo, format, pack_rel, s3};

/// Where a blob lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The pack's id.
    pub pack: [u8; 16],
    /// Offset of the blob in the pack.
    pub offset: u64,
    /// Bytes stored.
    pub stored: u32,
    /// Bytes once decompressed.
    pub raw: u32,
    /// Block or map chunk.
    pub kind: BlobKind,
}

impl Location {
    const LEN: usize = 16 + 8 + 4 + 4 + 1;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..16].copy_from_slice(&self.pack);
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.stored.to_le_bytes());
        b[28..32].copy_from_slice(&self.raw.to_le_bytes());
        b[32] = self.kind as u8;
        b
    }

    fn decode(b: &[u8]) -> Option<Location> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Location {
            pack: b[..16].try_into().ok()?,
            offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
            stored: u32::from_le_bytes(b[24..28].try_into().ok()?),
            raw: u32::from_le_bytes(b[28..32].try_into().ok()?),
            kind: BlobKind::try_from(i32::from(b[32])).ok()?,
        })
    }

    /// Where the blob `e` of pack `pack` lies.
    pub fn of(pack: [u8; 16], e: &PackEntry) -> Location {
        Location {
            pack,
            offset: e.offset,
            stored: e.stored,
            raw: e.raw,
            kind: e.kind(),
        }
    }

    /// The pack's key below the prefix.
    pub fn pack_rel(&self) -> String {
        pack_rel(&self.pack)
    }
}

/// The local index of one repository.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    /// hash ++ pack id → [`Location`]: a blob may lie in several packs
    /// (stored again beside a GC candidate, or copied by a repack), and
    /// the copy a reader knew may be deleted once another is indexed.
    blobs: sled::Tree,
    /// Every pack known: id → ().
    packs: sled::Tree,
    /// Segments loaded, and GC deletion records applied: key → ().
    seen: sled::Tree,
    /// Packs this writer uploaded that no segment names: id → encoded
    /// [`index_segment::Pack`].
    pending: sled::Tree,
    db: sled::Db,
    /// Packs GC listed as candidates at the last sync.
    candidates: Mutex<HashSet<[u8; 16]>>,
}

/// The layout of the trees: a cache written by a version that kept one
/// copy per blob is rebuilt.
const LAYOUT: &[u8] = b"2";

fn sled_err(dir: &Path, e: sled::Error) -> Error {
    Error::Journal {
        path: dir.to_path_buf(),
        source: e,
    }
}

/// A pack id from the bytes of a record, if 16 bytes long.
fn pack_id(bytes: &[u8]) -> Option<[u8; 16]> {
    bytes.try_into().ok()
}

impl Cache {
    /// The cache at `dir` for `repo` (emptied if it was another
    /// repository's, say after the bucket was recreated).
    pub fn open(dir: &Path, repo: &Repo) -> Result<Cache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let err = |e| sled_err(dir, e);
        let db = sled::open(dir).map_err(err)?;
        let id = repo.config.repo_id.as_slice();
        if db.get("repo").map_err(err)?.as_deref() != Some(id)
            || db.get("layout").map_err(err)?.as_deref() != Some(LAYOUT)
        {
            for name in ["blobs", "packs", "seen", "pending"] {
                db.drop_tree(name).map_err(err)?;
            }
            db.insert("repo", id).map_err(err)?;
            db.insert("layout", LAYOUT).map_err(err)?;
        }
        Ok(Cache {
            blobs: db.open_tree("blobs").map_err(err)?,
            packs: db.open_tree("packs").map_err(err)?,
            seen: db.open_tree("seen").map_err(err)?,
            pending: db.open_tree("pending").map_err(err)?,
            db,
            dir: dir.to_path_buf(),
            candidates: Mutex::new(HashSet::new()),
        })
    }

    fn err(&self, e: sled::Error) -> Error {
        sled_err(&self.dir, e)
    }

    /// Every known copy of `hash`.
    fn copies(&self, hash: BlockHash) -> Result<Vec<Location>> {
        let mut found = Vec::new();
        for kv in self.blobs.scan_prefix(hash.to_bytes()) {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            found.extend(Location::decode(&v));
        }
        Ok(found)
    }

    /// Where `hash` lies, if any pack holds it: a copy outside GC's
    /// candidates if there is one (a candidate may go).
    pub fn lookup(&self, hash: BlockHash) -> Result<Option<Location>> {
        let copies = self.copies(hash)?;
        let safe = copies.iter().find(|l| !self.is_candidate(&l.pack));
        Ok(safe.or(copies.first()).copied())
    }

    /// Where `hash` lies, if a writer may rely on it: not in a pack GC
    /// may delete.
    pub fn lookup_for_write(&self, hash: BlockHash) -> Result<Option<Location>> {
        Ok(self
            .copies(hash)?
            .into_iter()
            .find(|l| !self.is_candidate(&l.pack)))
    }

    /// Blob `hash` and where it was read, from a pack that still holds
    /// it, or `None` if no known pack does. A copy found gone (GC deleted
    /// it once the blob was stored elsewhere: a repack, or a writer beside
    /// a candidate) makes the index learn GC's records, and the next copy
    /// is read.
    pub async fn read(&self, repo: &Repo, hash: BlockHash) -> Result<Option<(Location, Vec<u8>)>> {
        let mut gone = HashSet::new();
        loop {
            let copies = self.copies(hash)?.into_iter();
            let Some(loc) = copies
                .filter(|l| !gone.contains(&l.pack))
                .min_by_key(|l| self.is_candidate(&l.pack))
            else {
                return Ok(None);
            };
            if let Some(raw) = fetch(repo, hash, &loc).await? {
                return Ok(Some((loc, raw)));
            }
            gone.insert(loc.pack);
            self.sync(repo).await?;
        }
    }

    /// Whether pack `id` is known (named by a segment, uploaded here, or
    /// found by a repair) and not deleted by GC.
    pub fn has_pack(&self, id: &[u8; 16]) -> Result<bool> {
        self.packs.contains_key(id).map_err(|e| self.err(e))
    }

    /// Whether GC listed pack `id` as a candidate at the last sync.
    pub fn is_candidate(&self, id: &[u8; 16]) -> bool {
        self.candidates
            .lock()
            .expect("candidates lock")
            .contains(id)
    }

    /// Notes the blobs of pack `id`.
    fn insert_entries(&self, id: [u8; 16], entries: &[PackEntry]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for e in entries {
            let key = [e.hash.as_slice(), &id[..]].concat();
            batch.insert(key, &Location::of(id, e).encode()[..]);
        }
        self.blobs.apply_batch(batch).map_err(|e| self.err(e))?;
        self.packs.insert(id, &[]).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Notes a pack this writer has just uploaded, durably, as pending
    /// its segment.
    pub fn uploaded(&self, id: [u8; 16], entries: Vec<PackEntry>) -> Result<()> {
        self.insert_entries(id, &entries)?;
        let pack = index_segment::Pack {
            pack: id.to_vec(),
            entries,
        };
        self.pending
            .insert(id, pack.encode_to_vec())
            .map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The packs uploaded and in no segment yet, as a segment.
    pub fn pending(&self) -> Result<IndexSegment> {
        let mut packs = Vec::new();
        for kv in self.pending.iter() {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            let pack = index_segment::Pack::decode(v.as_ref()).map_err(|e| Error::BadState {
                path: self.dir.clone(),
                reason: format!("a pending pack record does not decode: {e}"),
            })?;
            packs.push(pack);
        }
        Ok(IndexSegment { packs })
    }

    /// The pending packs were published in segment `name`.
    pub fn indexed(&self, name: &str, segment: &IndexSegment) -> Result<()> {
        for p in &segment.packs {
            self.pending.remove(&p.pack).map_err(|e| self.err(e))?;
        }
        self.seen.insert(name, &[]).map_err(|e| self.err(e))?;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Loads the segments and GC records that appeared since the last
    /// sync; returns how many segments were new.
    pub async fn sync(&self, repo: &Repo) -> Result<usize> {
        let store = repo.store.as_ref();
        let mut new = 0;
        let (after, mut newest) = (self.listed_after("index")?, self.newest_ns("index"));
        for meta in s3::list_after(store, &repo.url, "index", after.as_deref()).await? {
            let rel = repo.url.rel(&meta.location).to_string();
            newest = newest.max(name_ns(&rel));
            if self.seen.contains_key(&rel).map_err(|e| self.err(e))? {
                continue;
            }
            let Some(bytes) = s3::get_opt(store, &repo.url, &rel).await? else {
                continue;
            };
            let segment: IndexSegment = format::open(&bytes, &repo.url, &rel)?;
            self.load_segment(&segment, repo, &rel)?;
            self.seen
                .insert(rel.as_str(), &[])
                .map_err(|e| self.err(e))?;
            new += 1;
        }
        self.note_listed("index", newest)?;
        let (mut gone, mut seen_deleted) = (HashSet::new(), Vec::new());
        let (after, mut newest) = (
            self.listed_after("gc/deleted")?,
            self.newest_ns("gc/deleted"),
        );
        for meta in s3::list_after(store, &repo.url, "gc/deleted", after.as_deref()).await? {
            let rel = repo.url.rel(&meta.location).to_string();
            newest = newest.max(name_ns(&rel));
            if self.seen.contains_key(&rel).map_err(|e| self.err(e))? {
                continue;
            }
            if let Some(bytes) = s3::get_opt(store, &repo.url, &rel).await? {
                let deleted: GcDeleted = format::open(&bytes, &repo.url, &rel)?;
                gone.extend(deleted.packs.iter().filter_map(|p| pack_id(p)));
            }
            seen_deleted.push(rel);
        }
        self.forget_packs(&gone)?;
        for rel in seen_deleted {
            self.seen
                .insert(rel.as_str(), &[])
                .map_err(|e| self.err(e))?;
        }
        self.note_listed("gc/deleted", newest)?;
        let candidates = match s3::get_opt(store, &repo.url, "gc/candidates").await? {
            Some(bytes) => {
                let c: GcCandidates = format::open(&bytes, &repo.url, "gc/candidates")?;
                c.packs.iter().filter_map(|p| pack_id(p)).collect()
            }
            None => HashSet::new(),
        };
        *self.candidates.lock().expect("candidates lock") = candidates;
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(new)
    }

    /// Where the next listing of `dir` may start: names carry their
    /// creation time (`NS-…`), so only names from [`LIST_WINDOW`] before
    /// the newest one seen need listing again (what is in that window and
    /// seen is skipped). `None` lists everything (first sync).
    fn listed_after(&self, dir: &str) -> Result<Option<String>> {
        let mark = self
            .seen
            .get(format!("mark:{dir}"))
            .map_err(|e| self.err(e))?;
        Ok(mark.and_then(|m| {
            let ns = u64::from_le_bytes(m.as_ref().try_into().ok()?);
            let from = ns.saturating_sub(LIST_WINDOW.as_nanos() as u64);
            Some(format!("{dir}/{from:020}"))
        }))
    }

    /// The newest creation time among the names of `dir` seen so far.
    fn newest_ns(&self, dir: &str) -> u64 {
        self.seen
            .get(format!("mark:{dir}"))
            .ok()
            .flatten()
            .and_then(|m| m.as_ref().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0)
    }

    /// Records the newest creation time among the names of `dir` seen.
    fn note_listed(&self, dir: &str, newest: u64) -> Result<()> {
        if newest > 0 {
            (self.seen)
                .insert(format!("mark:{dir}"), &newest.to_le_bytes())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn load_segment(&self, segment: &IndexSegment, repo: &Repo, rel: &str) -> Result<()> {
        for p in &segment.packs {
            let id = pack_id(&p.pack)
                .ok_or_else(|| repo.url.damaged(rel, "a pack id not 16 bytes long"))?;
            for e in &p.entries {
                format::check_entry(e, u64::MAX, &repo.url, rel)?;
            }
            self.insert_entries(id, &p.entries)?;
        }
        Ok(())
    }

    /// Drops the packs `gone` and their blobs (GC deleted them): one
    /// scan of the index, whatever their number.
    fn forget_packs(&self, gone: &HashSet<[u8; 16]>) -> Result<()> {
        if gone.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for kv in self.blobs.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            if Location::decode(&v).is_some_and(|l| gone.contains(&l.pack)) {
                batch.remove(k);
            }
        }
        self.blobs.apply_batch(batch).map_err(|e| self.err(e))?;
        for id in gone {
            self.packs.remove(id).map_err(|e| self.err(e))?;
            self.pending.remove(id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Indexes every pack of the repository no segment named, from its
    /// footer, and publishes a segment for them so other caches need not;
    /// returns how many packs were found.
    pub async fn repair_from_packs(&self, repo: &Repo) -> Result<usize> {
        let store = repo.store.as_ref();
        let mut found = IndexSegment::default();
        for meta in s3::list(store, &repo.url, "data").await? {
            let rel = repo.url.rel(&meta.location).to_string();
            let Some(id) = rel
                .rsplit('/')
                .next()
                .and_then(crate::state::unhex)
                .and_then(|b| pack_id(&b))
            else {
                continue;
            };
            if self.packs.contains_key(id).map_err(|e| self.err(e))? {
                continue;
            }
            let entries = read_footer(repo, &rel).await?;
            self.insert_entries(id, &entries)?;
            found.packs.push(index_segment::Pack {
                pack: id.to_vec(),
                entries,
            });
        }
        let n = found.packs.len();
        if n > 0 {
            // Sharing the repair spares other caches the footers; this
            // cache holds the entries either way, so a reader with
            // read-only credentials still reads.
            let name = segment_name()?;
            match s3::put(store, &repo.url, &name, format::seal(&found)?).await {
                Ok(()) => {
                    self.seen
                        .insert(name.as_str(), &[])
                        .map_err(|e| self.err(e))?;
                    log::warn!(
                        "{}: {n} packs were in no index segment; indexed them from their footers into {name}",
                        repo.url
                    );
                }
                Err(e) => log::warn!(
                    "{}: {n} packs were in no index segment; indexed them here from their footers, \
                     but could not publish the segment ({e})",
                    repo.url
                ),
            }
        }
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(n)
    }
}

/// The creation time a name `DIR/NS[-…]` starts with, 0 if none.
fn name_ns(rel: &str) -> u64 {
    let name = rel.rsplit('/').next().unwrap_or("");
    name.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How far back a listing of segments or GC records starts before the
/// newest name already seen: names carry their writer's clock, and a
/// writer may PUT a name some time after making it (an upload's retries),
/// or run on a clock behind ours.
const LIST_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// A fresh segment's key below the prefix: `index/NS-RANDOM`, its
/// creation time first, so a cache lists only the recent ones.
pub fn segment_name() -> Result<String> {
    use crate::error::IoContext;
    let id = crate::sys::random_bytes::<8>().at("/dev/urandom")?;
    Ok(format!(
        "index/{:020}-{}",
        crate::state::now_ns(),
        crate::state::hex(&id)
    ))
}

/// The entries of pack `rel`, from its footer (one ranged read of the
/// last 64 KiB, a second when the footer is longer).
pub async fn read_footer(repo: &Repo, rel: &str) -> Result<Vec<PackEntry>> {
    let store = repo.store.as_ref();
    let (tail, size) = s3::get_tail(store, &repo.url, rel, 64 * 1024).await?;
    let len = format::footer_len(&tail, &repo.url, rel)?;
    let need = (len + format::PACK_TRAILER) as u64;
    let tail = if need as usize > tail.len() && need <= size {
        s3::get_range(store, &repo.url, rel, size - need..size).await?
    } else {
        tail
    };
    format::parse_footer(&tail, size, &repo.url, rel)
}

/// The content of the blob `hash` at `loc`, or `None` if its pack is
/// gone: one ranged read, decompressed within its recorded size and
/// checked against its keyed hash, so a damaged or substituted pack is an
/// error, never wrong data.
pub async fn fetch(repo: &Repo, hash: BlockHash, loc: &Location) -> Result<Option<Vec<u8>>> {
    let rel = loc.pack_rel();
    let end = loc.offset + u64::from(loc.stored);
    match s3::get_range_opt(repo.store.as_ref(), &repo.url, &rel, loc.offset..end).await? {
        Some(stored) => open_blob(repo, hash, loc, &stored).map(Some),
        None => Ok(None),
    }
}

/// The content of the blob `hash` at `loc` from its `stored` bytes (read
/// alone, or cut out of a longer ranged read): decompressed within its
/// recorded size and checked against its keyed hash.
pub fn open_blob(repo: &Repo, hash: BlockHash, loc: &Location, stored: &[u8]) -> Result<Vec<u8>> {
    let rel = loc.pack_rel();
    if stored.len() != loc.stored as usize {
        return Err(repo.url.damaged(
            &rel,
            format!(
                "blob {hash:?} at {}: {} bytes read, {} recorded (the pack is cut short?)",
                loc.offset,
                stored.len(),
                loc.stored
            ),
        ));
    }
    let raw = crate::block::decompress(stored, loc.raw as usize).map_err(|e| {
        repo.url
            .damaged(&rel, format!("blob {hash:?} at {}: {e}", loc.offset))
    })?;
    if raw.len() != loc.raw as usize || repo.key.hash(&raw) != hash {
        return Err(repo.url.damaged(
            &rel,
            format!("blob {hash:?} at {} does not hash to its name", loc.offset),
        ));
    }
    Ok(raw)
}
