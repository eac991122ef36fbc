//! Change tracking: per-file dirty bitmaps, the datastore's epoch counter,
//! the cut gate that makes an epoch boundary one instant across every file
//! of the consistency group (the whole datastore), and pre-images that keep
//! a protected closed set as it was at its cut.
//!
//! Writers hold the gate shared from marking their blocks until their
//! `pwrite` returns; a cut holds it exclusively only to flip the per-file
//! slots of the files written in the open epoch and snapshot their size and
//! path, so writes wait for microseconds, never for shipping. The cut visits
//! only the dirty files (written in the open epoch, or holding a closed
//! set), never every tracked file. Decisions the design card leaves open are
//! in `docs/design.md` ("Epochs and the cut").
//!
//! This module deals in sets of blocks only: what a point is, whether it
//! ships, is pending or was applied lives in `replicate::point`, which
//! drives the closed set through [`Tracker::protect_closed`],
//! [`Tracker::unprotect`] and [`Tracker::clear_closed`].
//!
//! # Layout
//!
//! - this file: the [`Tracker`]: epochs, the cut gate, the dirty-file set, the closed set.
//! - `file`: one [`TrackedFile`]: marking writes, reading as of the cut, its slots at a cut.
//! - [`bitmap`]: the memory-mapped two-slot bitmap of one file.
//! - [`preimage`]: the saved cut-time content of protected closed blocks.
//! - `wake`: [`Dirtied`], "changed since the last cut", which wakes the
//!   replicator.

pub mod bitmap;
mod file;
pub mod preimage;
mod wake;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;

use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, BlockSize, Epoch, FileId};
use crate::journal::Journal;
use crate::proto::journal::{EpochRecord, EpochState};
use crate::state::{StatePaths, now_ns};
use bitmap::{Bitmap, Slot};
pub use file::TrackedFile;
pub use wake::Dirtied;

/// Upper bounds of the cut-stall histogram, in seconds: 1 µs to ~1 s by
/// factors of 4, since a cut should hold writes for microseconds and a
/// hold of milliseconds is what an operator must see.
const STALL_BUCKETS: [f64; 11] = [
    1e-6, 4e-6, 1.6e-5, 6.4e-5, 2.56e-4, 1.024e-3, 4.096e-3, 1.6384e-2, 6.5536e-2, 0.262144,
    1.048576,
];

/// What a cut did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOutcome {
    /// Nothing was written in the open epoch: it stays open.
    Empty,
    /// The closed set is protected (being shipped); the open epoch goes on.
    Deferred,
    /// The epoch was closed as a new closed set.
    Closed(Epoch),
    /// The epoch was folded into the closed set not yet cleared.
    Merged {
        /// The epoch that was cut.
        epoch: Epoch,
        /// The first epoch of the closed set that absorbed it.
        into: Epoch,
    },
}

/// The closed set, handed over with its pre-image protection on: every
/// block written up to the cut of `end`, as it was at that cut.
#[derive(Debug)]
pub struct ClosedSet {
    /// The first epoch of the set (its journal record).
    pub first: Epoch,
    /// The epoch whose cut the set ends at.
    pub end: Epoch,
    /// Files with blocks or a size or path in the set, by id.
    pub files: Vec<Arc<TrackedFile>>,
}

/// How to open a file's tracking state.
#[derive(Debug)]
pub struct FileSource {
    /// Read-only descriptor of the backing file (absent when inspecting).
    pub reader: Option<File>,
    /// Path relative to the root.
    pub path: Vec<u8>,
    /// Current size.
    pub size: u64,
}

/// Ids of the files a cut has to visit: those touched in the open epoch
/// and those holding a non-empty closed set. Keeping it makes the cut's
/// cost follow the files changed, not the files tracked.
#[derive(Debug, Default)]
struct DirtyFiles(Mutex<HashSet<FileId>>);

impl DirtyFiles {
    fn insert(&self, id: FileId) {
        self.0.lock().expect("dirty lock").insert(id);
    }

    fn ids(&self) -> Vec<FileId> {
        self.0.lock().expect("dirty lock").iter().copied().collect()
    }

    fn remove(&self, id: FileId) {
        self.0.lock().expect("dirty lock").remove(&id);
    }

    /// Drops `f` unless it is touched or holds a closed set. The check and
    /// the removal share the lock a first touch inserts under, so a touch
    /// racing with this is never lost.
    fn remove_if_clean(&self, f: &TrackedFile) {
        let mut set = self.0.lock().expect("dirty lock");
        if !f.touched.load(Ordering::Relaxed) && !f.closed_nonempty.load(Ordering::Relaxed) {
            set.remove(&f.id);
        }
    }
}

/// The datastore's tracking state.
#[derive(Debug)]
pub struct Tracker {
    paths: StatePaths,
    block_size: BlockSize,
    journal: Arc<Journal>,
    /// The cut gate: writes and namespace operations hold it shared, a cut
    /// exclusively, so no write straddles an epoch boundary.
    gate: RwLock<()>,
    /// Tracked files by id; looked up on open, not per write.
    files: RwLock<HashMap<FileId, Arc<TrackedFile>>>,
    /// The files a cut visits (see [`DirtyFiles`]).
    dirty: Arc<DirtyFiles>,
    /// Raised by the first change after a cut, taken by the cut: wakes
    /// the replicator.
    dirtied: Arc<Dirtied>,
    /// The open epoch.
    epoch: AtomicU64,
    /// The first epoch of the closed set, 0 when there is none.
    closed_first: AtomicU64,
    /// The last epoch folded into the closed set.
    closed_end: AtomicU64,
    /// The closed set is protected (handed over, read as of its cut): it
    /// must not change, so cuts are deferred.
    protected: AtomicBool,
    /// Namespace operations recorded in the open epoch.
    ops_in_epoch: AtomicU64,
    /// How long recent cuts held the gate (writes wait at most this), in
    /// nanoseconds; the newest 4096.
    cut_stalls: Mutex<std::collections::VecDeque<u64>>,
    /// Every cut's gate hold since the daemon started, in seconds, for
    /// the metrics endpoint (the ring above forgets; a histogram does not).
    stall_histogram: Histogram,
    /// Whether this process may change the bitmaps (the daemon) or only
    /// read them (`hbrfs journal` with no daemon running).
    writable: bool,
}

impl Tracker {
    /// Opens the tracking state; the epoch counter resumes from the journal.
    pub fn new(
        paths: &StatePaths,
        block_size: BlockSize,
        journal: Arc<Journal>,
        writable: bool,
    ) -> Result<Tracker> {
        let epochs = journal.epochs()?;
        let epoch = epochs.last().map_or(1, |(e, _)| e.0);
        if epochs.is_empty() && writable {
            let rec = EpochRecord {
                state: EpochState::Open as i32,
                opened_ns: now_ns(),
                ..Default::default()
            };
            journal.put_epoch(Epoch(1), &rec)?;
        }
        let closed_first = epochs
            .iter()
            .rev()
            .find(|(_, r)| r.state() == EpochState::Closed)
            .map_or(0, |(e, _)| e.0);
        let closed_end = epochs
            .iter()
            .filter(|(e, r)| {
                e.0 == closed_first || (closed_first != 0 && r.merged_into == closed_first)
            })
            .map(|(e, _)| e.0)
            .max()
            .unwrap_or(0);
        Ok(Tracker {
            paths: paths.clone(),
            block_size,
            journal,
            gate: RwLock::new(()),
            files: RwLock::new(HashMap::new()),
            dirty: Arc::new(DirtyFiles::default()),
            dirtied: Arc::new(Dirtied::default()),
            epoch: AtomicU64::new(epoch),
            closed_first: AtomicU64::new(closed_first),
            closed_end: AtomicU64::new(closed_end),
            protected: AtomicBool::new(false),
            ops_in_epoch: AtomicU64::new(0),
            cut_stalls: Mutex::new(std::collections::VecDeque::new()),
            stall_histogram: Histogram::new(STALL_BUCKETS),
            writable,
        })
    }

    /// The tracking granularity.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The open epoch.
    pub fn current_epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Relaxed))
    }

    /// How long recent cuts held writes: (count, p99, max) in nanoseconds.
    pub fn cut_stalls(&self) -> (usize, u64, u64) {
        let mut v: Vec<u64> = self
            .cut_stalls
            .lock()
            .expect("stall lock")
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        let p99 = v
            .get((v.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or(0);
        (v.len(), p99, v.last().copied().unwrap_or(0))
    }

    /// How long the newest cut held writes: lets a benchmark or a test
    /// time one cut's gate hold apart from its journal records.
    pub fn last_cut_stall(&self) -> Option<Duration> {
        let stalls = self.cut_stalls.lock().expect("stall lock");
        stalls.back().map(|&ns| Duration::from_nanos(ns))
    }

    /// How long every cut since the start held writes, in seconds.
    pub fn cut_stall_histogram(&self) -> &Histogram {
        &self.stall_histogram
    }

    /// Holds the cut gate shared for one write or namespace operation.
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().expect("gate lock")
    }

    /// Counts a namespace operation into the open epoch (call under the gate).
    pub fn note_op(&self) {
        self.ops_in_epoch.fetch_add(1, Ordering::Relaxed);
        self.dirtied.raise();
    }

    /// "Changed since the last cut": what the replicator waits on.
    pub fn dirtied(&self) -> &Dirtied {
        &self.dirtied
    }

    fn bitmap_path(&self, id: FileId) -> PathBuf {
        self.paths.bitmap(id.0)
    }

    /// The tracked file `id`, if it is loaded.
    pub fn file(&self, id: FileId) -> Option<Arc<TrackedFile>> {
        self.files.read().expect("files lock").get(&id).cloned()
    }

    /// Every loaded file.
    pub fn all_files(&self) -> Vec<Arc<TrackedFile>> {
        self.files
            .read()
            .expect("files lock")
            .values()
            .cloned()
            .collect()
    }

    /// Blocks dirty now (open and closed epochs together), all files.
    /// Only the files of the dirty set can hold any (the cut ships from
    /// the same set), so this costs the dirty files, not the tracked ones:
    /// `status` of 10,000 clean files spent ~20 ms of its ~25 ms in a scan
    /// of every bitmap.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty_files()
            .iter()
            .map(|f| {
                f.dirty_extents()
                    .iter()
                    .map(|r| r.end - r.start)
                    .sum::<u64>()
            })
            .sum()
    }

    /// The loaded files of the dirty set, by id; entries of files no longer
    /// loaded are dropped.
    fn dirty_files(&self) -> Vec<Arc<TrackedFile>> {
        let files = self.files.read().expect("files lock");
        let mut dirty: Vec<Arc<TrackedFile>> = self
            .dirty
            .ids()
            .into_iter()
            .filter_map(|id| {
                let f = files.get(&id).cloned();
                if f.is_none() {
                    self.dirty.remove(id);
                }
                f
            })
            .collect();
        dirty.sort_unstable_by_key(|f| f.id);
        dirty
    }

    fn insert(&self, id: FileId, bitmap: Bitmap, source: FileSource) -> Arc<TrackedFile> {
        let closed = bitmap.count(Slot::Closed) > 0;
        let touched = bitmap.count(Slot::Active) > 0;
        let file = Arc::new(TrackedFile {
            id,
            block_size: self.block_size,
            bitmap,
            reader: source.reader,
            size: AtomicU64::new(source.size),
            at_cut: Mutex::new((source.path.clone(), source.size)),
            path: Mutex::new(source.path),
            touched: AtomicBool::new(touched),
            closed_nonempty: AtomicBool::new(closed),
            protected: AtomicBool::new(false),
            gone_epoch: AtomicU64::new(0),
            preimages: Mutex::new(None),
            preimage_path: self.paths.preimage(id.0),
            dirty: self.dirty.clone(),
            dirtied: self.dirtied.clone(),
        });
        self.files
            .write()
            .expect("files lock")
            .insert(id, file.clone());
        if touched || closed {
            self.dirty.insert(id);
        }
        file
    }

    /// Starts tracking a file whose earlier content is unknown (new, or
    /// found without state): all of its blocks start dirty.
    pub fn track_new(&self, id: FileId, source: FileSource) -> Result<Arc<TrackedFile>> {
        let blocks = source.size.div_ceil(self.block_size.bytes());
        let bitmap = Bitmap::create(&self.bitmap_path(id), id, self.block_size, blocks)?;
        let file = self.insert(id, bitmap, source);
        // A new file is a change of the open epoch even when empty.
        file.touch();
        Ok(file)
    }

    /// Loads a known file's bitmap. When it is missing or unreadable, the
    /// file is tracked anew with all its blocks dirty and the reason is
    /// returned so the caller can say so.
    pub fn load(
        &self,
        id: FileId,
        source: FileSource,
    ) -> Result<(Arc<TrackedFile>, Option<String>)> {
        let path = self.bitmap_path(id);
        match Bitmap::open(&path, id, self.block_size, self.writable) {
            Ok(bitmap) => Ok((self.insert(id, bitmap, source), None)),
            Err(e) if self.writable => Ok((self.track_new(id, source)?, Some(e.to_string()))),
            Err(e) => Err(e),
        }
    }

    /// Stops tracking a file that no longer exists (its last name was
    /// unlinked): its bitmap goes too.
    pub fn forget(&self, id: FileId) {
        let mut files = self.files.write().expect("files lock");
        if let Some(f) = files.get(&id)
            && f.closed_nonempty.load(Ordering::Relaxed)
        {
            // Its blocks still belong to the closed set.
            f.gone_epoch
                .store(self.epoch.load(Ordering::Relaxed), Ordering::Relaxed);
            return;
        }
        files.remove(&id);
        drop(files);
        self.dirty.remove(id);
        self.remove_bitmap(id);
    }

    fn remove_bitmap(&self, id: FileId) {
        let path = self.bitmap_path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("removing bitmap {}: {e}", path.display());
        }
    }

    /// Marks blocks dirty again so the next point ships them (`hbrfs verify
    /// --repair`): their content does not change, only the replica's is
    /// wrong.
    pub fn mark_for_repair(&self, file: &TrackedFile, blocks: &[BlockNo]) -> Result<()> {
        let _gate = self.gate();
        for &BlockNo(b) in blocks {
            file.mark_blocks(b..b + 1, 0)?;
        }
        Ok(())
    }

    /// Marks `ranges` of blocks dirty so the next point ships them (a
    /// failback: the secondary, an old primary, holds other content
    /// there); their content does not change here.
    pub fn mark_ranges(&self, file: &TrackedFile, ranges: &[std::ops::Range<u64>]) -> Result<()> {
        let _gate = self.gate();
        for r in ranges {
            file.mark_blocks(r.clone(), 0)?;
        }
        Ok(())
    }

    /// Marks every block of every file dirty: the secondary holds nothing
    /// of this datastore and needs a full baseline.
    pub fn mark_everything(&self) -> Result<()> {
        let _gate = self.gate.write().expect("gate lock");
        for f in self.all_files() {
            let size = f.size.load(Ordering::Relaxed);
            f.bitmap
                .mark(0..size.div_ceil(self.block_size.bytes()), 0, now_ns())?;
            f.touch();
        }
        Ok(())
    }

    /// Under the exclusive gate: flips the slots of every touched file,
    /// snapshots the closed set's paths and sizes, opens the next epoch.
    /// Visits only the dirty set and returns it with the epoch closed
    /// (`None` when nothing changed).
    fn cut_locked(&self) -> (Option<Epoch>, Vec<Arc<TrackedFile>>) {
        let files = self.dirty_files();
        let mut any = self.ops_in_epoch.swap(0, Ordering::Relaxed) > 0;
        for f in &files {
            let touched = f.touched.swap(false, Ordering::Relaxed);
            any |= touched;
            if touched || f.closed_nonempty.load(Ordering::Relaxed) {
                f.cut(touched);
            } else {
                self.dirty.remove_if_clean(f);
            }
        }
        let closed = any.then(|| Epoch(self.epoch.fetch_add(1, Ordering::Relaxed)));
        (closed, files)
    }

    /// Closes the open epoch: drains writes in flight, flips the slots of
    /// every file written in it, opens the next epoch, lets writes resume.
    /// Deferred while the closed set is protected. The bookkeeping
    /// (counting, journal records) happens after.
    pub fn cut(&self) -> Result<CutOutcome> {
        // New writes queue from the moment the cut asks for the gate (the
        // lock prefers writers), so the stall is timed from here.
        let held = Instant::now();
        let gate = self.gate.write().expect("gate lock");
        if self.protected.load(Ordering::Relaxed) {
            return Ok(CutOutcome::Deferred);
        }
        let (closed, files) = self.cut_locked();
        self.note_stall(held);
        drop(gate);
        match closed {
            Some(epoch) => self.record_cut(epoch, &files),
            None => Ok(CutOutcome::Empty),
        }
    }

    fn note_stall(&self, held: Instant) {
        let took = held.elapsed();
        self.stall_histogram.observe(took.as_secs_f64());
        let mut stalls = self.cut_stalls.lock().expect("stall lock");
        if stalls.len() == 4096 {
            stalls.pop_front();
        }
        stalls.push_back(took.as_nanos() as u64);
    }

    /// Records the cut of `closed` in the journal: closed, or merged into
    /// the closed set; `dirty` is the dirty set the cut visited.
    fn record_cut(&self, closed: Epoch, dirty: &[Arc<TrackedFile>]) -> Result<CutOutcome> {
        let now = now_ns();
        let (files, blocks) = closed_set_size(dirty);
        let first = self.closed_first.load(Ordering::Relaxed);
        self.closed_end.store(closed.0, Ordering::Relaxed);
        let outcome = if first == 0 {
            self.closed_first.store(closed.0, Ordering::Relaxed);
            CutOutcome::Closed(closed)
        } else {
            CutOutcome::Merged {
                epoch: closed,
                into: Epoch(first),
            }
        };
        let mut record = self.journal.epoch(closed)?.unwrap_or_default();
        record.closed_ns = now;
        match outcome {
            CutOutcome::Merged { into, .. } => {
                record.state = EpochState::Merged as i32;
                record.merged_into = into.0;
                let mut target = self.journal.epoch(into)?.unwrap_or_default();
                target.files = files;
                target.blocks = blocks;
                self.journal.put_epoch(into, &target)?;
            }
            _ => {
                record.state = EpochState::Closed as i32;
                record.files = files;
                record.blocks = blocks;
            }
        }
        self.journal.put_epoch(closed, &record)?;
        let next = EpochRecord {
            state: EpochState::Open as i32,
            opened_ns: now,
            ..Default::default()
        };
        self.journal.put_epoch(Epoch(closed.0 + 1), &next)?;
        self.journal.flush()?;
        Ok(outcome)
    }

    /// Cuts the open epoch (closing it or folding it into the closed set)
    /// and hands the closed set over with pre-image protection on, in one
    /// hold of the gate so that no write slips between the cut and the
    /// protection. `None` when there is no closed set, or it is protected
    /// already.
    pub fn protect_closed(&self) -> Result<Option<ClosedSet>> {
        let held = Instant::now();
        let gate = self.gate.write().expect("gate lock");
        if self.protected.load(Ordering::Relaxed) {
            return Ok(None);
        }
        // Under the exclusive gate no change is half made: everything
        // changed so far is in this set, and every change from here on
        // raises the flag again. (A plain `cut` leaves it up: what it
        // closes is still for the replicator to take.)
        self.dirtied.take();
        let (closed, dirty) = self.cut_locked();
        let end = closed.map_or(self.closed_end.load(Ordering::Relaxed), |e| e.0);
        let exists_at_cut = |f: &TrackedFile| {
            let gone = f.gone_epoch.load(Ordering::Relaxed);
            gone == 0 || gone > end
        };
        let files: Vec<Arc<TrackedFile>> = dirty
            .iter()
            .filter(|f| f.closed_nonempty.load(Ordering::Relaxed) && exists_at_cut(f))
            .cloned()
            .collect();
        for f in &files {
            f.protected.store(true, Ordering::Release);
        }
        let any = closed.is_some() || self.closed_first.load(Ordering::Relaxed) != 0;
        self.protected.store(any, Ordering::Relaxed);
        self.note_stall(held);
        drop(gate);
        if let Some(epoch) = closed {
            self.record_cut(epoch, &dirty)?;
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(ClosedSet {
            first: Epoch(self.closed_first.load(Ordering::Relaxed)),
            end: Epoch(self.closed_end.load(Ordering::Relaxed)),
            files,
        }))
    }

    /// Turns the protection of `set` off and drops its pre-images. The set
    /// stays closed: the next cut folds everything written since into it
    /// (a later, still consistent cut).
    pub fn unprotect(&self, set: &ClosedSet) {
        for f in &set.files {
            f.protected.store(false, Ordering::Release);
            *f.preimages.lock().expect("preimage lock") = None;
        }
        self.protected.store(false, Ordering::Relaxed);
    }

    /// Empties the closed set `set` (its blocks are clean now), forgets the
    /// files whose last name went while they held closed blocks, and turns
    /// the protection off: the next cut closes a new set.
    pub fn clear_closed(&self, set: &ClosedSet) {
        // A gone file is kept only while it holds a closed set, so it is in
        // the dirty set until the loop below clears that.
        let gone: Vec<FileId> = self
            .dirty_files()
            .iter()
            .filter(|f| f.is_gone())
            .map(|f| f.id)
            .collect();
        for f in &set.files {
            f.bitmap.clear_closed();
            f.closed_nonempty.store(false, Ordering::Relaxed);
            self.dirty.remove_if_clean(f);
        }
        for id in gone {
            self.files.write().expect("files lock").remove(&id);
            self.dirty.remove(id);
            self.remove_bitmap(id);
        }
        self.closed_first.store(0, Ordering::Relaxed);
        self.closed_end.store(0, Ordering::Relaxed);
        self.unprotect(set);
    }

    /// Flushes every bitmap to disk (clean shutdown).
    pub fn sync_all(&self) -> Result<()> {
        for f in self.all_files() {
            f.sync()?;
        }
        let dir = self.paths.bitmaps();
        File::open(&dir).and_then(|d| d.sync_all()).at(&dir)
    }
}

/// Files and blocks in the closed set, counted over the dirty set.
fn closed_set_size(dirty: &[Arc<TrackedFile>]) -> (u64, u64) {
    dirty
        .iter()
        .filter(|f| f.closed_nonempty.load(Ordering::Relaxed))
        .map(|f| f.bitmap.count(Slot::Closed))
        .filter(|&n| n > 0)
        .fold((0, 0), |(files, blocks), n| (files + 1, blocks + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(dir: &std::path::Path) -> Tracker {
        let paths = StatePaths::of(dir);
        std::fs::create_dir_all(paths.bitmaps()).unwrap();
        std::fs::create_dir_all(paths.preimages()).unwrap();
        let journal = Arc::new(Journal::open(&paths.journal()).unwrap());
        Tracker::new(&paths, BlockSize::DEFAULT, journal, true).unwrap()
    }

    fn track(t: &Tracker, id: u64) -> Arc<TrackedFile> {
        let source = FileSource {
            reader: None,
            path: format!("{id}.img").into_bytes(),
            size: 0,
        };
        t.track_new(FileId(id), source).unwrap()
    }

    fn write(f: &TrackedFile, block: u64) {
        let bs = BlockSize::DEFAULT.bytes();
        f.mark(block * bs, 4096, 4096).unwrap();
        f.extended_to((block + 1) * bs);
    }

    fn dirty_ids(t: &Tracker) -> Vec<u64> {
        let mut ids: Vec<u64> = t.dirty.ids().into_iter().map(|id| id.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn the_cut_visits_only_dirty_files_and_the_closed_set_lives_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        // `dirty_blocks` counts over the dirty set only: it must agree
        // with a count over every file at each step.
        let dirty = |t: &Tracker| {
            let every: u64 = t
                .all_files()
                .iter()
                .flat_map(|f| f.dirty_extents())
                .map(|r| r.end - r.start)
                .sum();
            assert_eq!(t.dirty_blocks(), every);
            every
        };
        let files: Vec<_> = (1..=3).map(|id| track(&t, id)).collect();
        assert_eq!(t.cut().unwrap(), CutOutcome::Closed(Epoch(1)));
        let set = t.protect_closed().unwrap().unwrap();
        assert_eq!(set.files.len(), 3);
        t.clear_closed(&set);
        assert!(dirty_ids(&t).is_empty(), "idle files leave the dirty set");
        assert_eq!(dirty(&t), 0);

        write(&files[1], 5);
        assert_eq!(dirty(&t), 1);
        assert_eq!(dirty_ids(&t), vec![2]);
        assert_eq!(t.cut().unwrap(), CutOutcome::Closed(Epoch(2)));
        assert_eq!(dirty_ids(&t), vec![2], "a closed set keeps its file dirty");
        assert_eq!(dirty(&t), 1);
        write(&files[1], 6);
        assert_eq!(
            t.cut().unwrap(),
            CutOutcome::Merged {
                epoch: Epoch(3),
                into: Epoch(2)
            }
        );
        let set = t.protect_closed().unwrap().unwrap();
        assert_eq!((set.first, set.end), (Epoch(2), Epoch(3)));
        assert_eq!(
            set.files.iter().map(|f| f.id.0).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(set.files[0].closed_blocks(), vec![BlockNo(5), BlockNo(6)]);
        write(&files[0], 1);
        assert_eq!(t.cut().unwrap(), CutOutcome::Deferred);
        assert_eq!(dirty(&t), 3);
        assert!(t.protect_closed().unwrap().is_none(), "protected already");
        t.clear_closed(&set);
        assert_eq!(dirty_ids(&t), vec![1], "the write during the ship stays");
        assert_eq!(dirty(&t), 1);
        assert_eq!(t.cut().unwrap(), CutOutcome::Closed(Epoch(4)));
    }

    #[test]
    fn an_unprotected_set_folds_the_next_cut_in_and_keeps_its_first_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        let f = track(&t, 1);
        write(&f, 3);
        let set = t.protect_closed().unwrap().unwrap();
        assert_eq!((set.first, set.end), (Epoch(1), Epoch(1)));
        write(&f, 3);
        assert_eq!(f.preimage_count(), 1, "a protected block is saved first");
        t.unprotect(&set);
        assert_eq!(f.preimage_count(), 0);
        let set = t.protect_closed().unwrap().unwrap();
        assert_eq!((set.first, set.end), (Epoch(1), Epoch(2)));
        t.clear_closed(&set);
        assert_eq!(t.cut().unwrap(), CutOutcome::Empty);
        assert!(t.protect_closed().unwrap().is_none());
    }

    #[test]
    fn a_gone_file_stays_until_its_closed_set_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let t = tracker(dir.path());
        track(&t, 1);
        assert_eq!(t.cut().unwrap(), CutOutcome::Closed(Epoch(1)));
        t.forget(FileId(1));
        assert!(t.file(FileId(1)).is_some_and(|f| f.is_gone()));
        let set = t.protect_closed().unwrap().unwrap();
        t.clear_closed(&set);
        assert!(t.file(FileId(1)).is_none());
        assert!(dirty_ids(&t).is_empty());
    }
}
