//! Change tracking: per-file dirty bitmaps, the datastore's epoch counter,
//! and the cut gate that makes an epoch boundary one instant across every
//! file of the consistency group (the whole datastore).
//!
//! Writers hold the gate shared from marking their blocks until their
//! `pwrite` returns; a cut holds it exclusively only to flip the per-file
//! slots of the files written in the open epoch, so writes wait for
//! microseconds, never for shipping. Decisions the design card leaves open
//! are in `docs/design.md` ("Epochs and the cut").

pub mod bitmap;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::Result;
use crate::ids::{BlockSize, Epoch, FileId};
use crate::journal::Journal;
use crate::proto::journal::{EpochRecord, EpochState};
use bitmap::{Bitmap, Slot};

/// Unix time in nanoseconds, the unit of every timestamp hbrfs records.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One tracked file: its bitmap and what the cut needs to know about it.
#[derive(Debug)]
pub struct TrackedFile {
    /// The stable id.
    pub id: FileId,
    block_size: BlockSize,
    bitmap: Bitmap,
    /// Written in the open epoch: the cut visits only these files.
    touched: AtomicBool,
    /// Its closed slot holds blocks waiting to ship: the cut must fold into
    /// it instead of swapping.
    closed_nonempty: AtomicBool,
}

impl TrackedFile {
    /// Marks the blocks of `len` bytes at `offset` dirty, counting `written`
    /// bytes. Call with the cut gate held, before the data is written.
    pub fn mark(&self, offset: u64, len: u64, written: u64) -> Result<()> {
        self.mark_blocks(self.block_size.blocks_of(offset, len), written)
    }

    /// Marks whole blocks dirty (truncate marks from the new end to the old).
    pub fn mark_blocks(&self, blocks: std::ops::Range<u64>, written: u64) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.bitmap.mark(blocks, written, now_ns())?;
        self.touched.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the bitmap durable (msync): part of `fsync` of the image.
    pub fn sync(&self) -> Result<()> {
        self.bitmap.sync()
    }

    /// Dirty blocks (pending in either slot), merged into runs.
    pub fn dirty_extents(&self) -> Vec<std::ops::Range<u64>> {
        self.bitmap.dirty_extents()
    }

    /// The bitmap header counters.
    pub fn counters(&self) -> bitmap::Counters {
        self.bitmap.counters()
    }
}

/// What a cut did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOutcome {
    /// Nothing was written in the open epoch: it stays open.
    Empty,
    /// The epoch was closed as a new set waiting to ship.
    Closed(Epoch),
    /// The epoch was folded into the closed epoch still waiting to ship.
    Merged {
        /// The epoch that was cut.
        epoch: Epoch,
        /// The waiting epoch that absorbed it.
        into: Epoch,
    },
}

/// The datastore's tracking state.
#[derive(Debug)]
pub struct Tracker {
    bitmaps_dir: PathBuf,
    block_size: BlockSize,
    journal: Arc<Journal>,
    /// The cut gate: writes and namespace operations hold it shared, a cut
    /// exclusively, so no write straddles an epoch boundary.
    gate: RwLock<()>,
    /// Tracked files by id; looked up on open, not per write.
    files: RwLock<HashMap<FileId, Arc<TrackedFile>>>,
    /// The open epoch.
    epoch: AtomicU64,
    /// The closed epoch whose blocks wait to ship, 0 when none.
    waiting: AtomicU64,
    /// Namespace operations recorded in the open epoch.
    ops_in_epoch: AtomicU64,
    /// Longest time a cut held the gate, in nanoseconds.
    max_cut_stall_ns: AtomicU64,
    /// Whether this process may change the bitmaps (the daemon) or only
    /// read them (`hbrfs journal` with no daemon running).
    writable: bool,
}

impl Tracker {
    /// Opens the tracking state; the epoch counter resumes from the journal.
    pub fn new(
        bitmaps_dir: &Path,
        block_size: BlockSize,
        journal: Arc<Journal>,
        writable: bool,
    ) -> Result<Tracker> {
        let (epoch, waiting) = match journal.last_epoch()? {
            None => {
                if writable {
                    let rec = EpochRecord {
                        state: EpochState::Open as i32,
                        opened_ns: now_ns(),
                        ..Default::default()
                    };
                    journal.put_epoch(Epoch(1), &rec)?;
                }
                (1, 0)
            }
            Some((last, _)) => {
                let waiting = journal
                    .epochs()?
                    .into_iter()
                    .rev()
                    .find(|(_, r)| r.state() == EpochState::Closed)
                    .map_or(0, |(e, _)| e.0);
                (last.0, waiting)
            }
        };
        Ok(Tracker {
            bitmaps_dir: bitmaps_dir.to_path_buf(),
            block_size,
            journal,
            gate: RwLock::new(()),
            files: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(epoch),
            waiting: AtomicU64::new(waiting),
            ops_in_epoch: AtomicU64::new(0),
            max_cut_stall_ns: AtomicU64::new(0),
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

    /// Longest time a cut has held writes, in nanoseconds.
    pub fn max_cut_stall_ns(&self) -> u64 {
        self.max_cut_stall_ns.load(Ordering::Relaxed)
    }

    /// Holds the cut gate shared for one write or namespace operation.
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().expect("gate lock")
    }

    /// Counts a namespace operation into the open epoch (call under the gate).
    pub fn note_op(&self) {
        self.ops_in_epoch.fetch_add(1, Ordering::Relaxed);
    }

    fn bitmap_path(&self, id: FileId) -> PathBuf {
        self.bitmaps_dir.join(format!("{}.map", id.0))
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

    fn insert(&self, id: FileId, bitmap: Bitmap) -> Arc<TrackedFile> {
        let closed = bitmap.count(Slot::Closed) > 0;
        let touched = bitmap.count(Slot::Active) > 0;
        let file = Arc::new(TrackedFile {
            id,
            block_size: self.block_size,
            bitmap,
            touched: AtomicBool::new(touched),
            closed_nonempty: AtomicBool::new(closed),
        });
        self.files
            .write()
            .expect("files lock")
            .insert(id, file.clone());
        file
    }

    /// Starts tracking a file whose earlier content is unknown (new, or
    /// found without state): blocks `0..dirty_blocks` start dirty.
    pub fn track_new(&self, id: FileId, dirty_blocks: u64) -> Result<Arc<TrackedFile>> {
        let bitmap = Bitmap::create(&self.bitmap_path(id), id, self.block_size, dirty_blocks)?;
        let file = self.insert(id, bitmap);
        if dirty_blocks > 0 {
            file.closed_nonempty.store(true, Ordering::Relaxed);
        }
        Ok(file)
    }

    /// Loads a known file's bitmap. When it is missing or unreadable, the
    /// file is tracked anew with all `size_blocks` dirty and the reason is
    /// returned so the caller can say so.
    pub fn load(&self, id: FileId, size_blocks: u64) -> Result<(Arc<TrackedFile>, Option<String>)> {
        let path = self.bitmap_path(id);
        match Bitmap::open(&path, id, self.block_size, self.writable) {
            Ok(bitmap) => Ok((self.insert(id, bitmap), None)),
            Err(e) if self.writable => Ok((self.track_new(id, size_blocks)?, Some(e.to_string()))),
            Err(e) => Err(e),
        }
    }

    /// Stops tracking a file that no longer exists (its last name was
    /// unlinked): its bitmap goes too.
    pub fn forget(&self, id: FileId) {
        self.files.write().expect("files lock").remove(&id);
        let path = self.bitmap_path(id);
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("removing bitmap {}: {e}", path.display());
        }
    }

    /// Closes the open epoch: drains writes in flight, flips the slots of
    /// every file written in it, opens the next epoch, lets writes resume.
    /// The bookkeeping (counting, journal records) happens after writes
    /// resume.
    pub fn cut(&self) -> Result<CutOutcome> {
        let gate = self.gate.write().expect("gate lock");
        let held = Instant::now();
        let touched: Vec<Arc<TrackedFile>> = self
            .files
            .read()
            .expect("files lock")
            .values()
            .filter(|f| f.touched.swap(false, Ordering::Relaxed))
            .cloned()
            .collect();
        let ops = self.ops_in_epoch.swap(0, Ordering::Relaxed);
        if touched.is_empty() && ops == 0 {
            return Ok(CutOutcome::Empty);
        }
        for f in &touched {
            if f.closed_nonempty.swap(true, Ordering::Relaxed) {
                f.bitmap.fold_active_into_closed();
            } else {
                f.bitmap.swap_slots();
            }
        }
        let closed = Epoch(self.epoch.fetch_add(1, Ordering::Relaxed));
        let stall = held.elapsed().as_nanos() as u64;
        drop(gate);
        self.max_cut_stall_ns.fetch_max(stall, Ordering::Relaxed);

        let now = now_ns();
        let (files, blocks) = self.closed_set_size();
        let waiting = self.waiting.load(Ordering::Relaxed);
        let outcome = if waiting == 0 {
            self.waiting.store(closed.0, Ordering::Relaxed);
            CutOutcome::Closed(closed)
        } else {
            CutOutcome::Merged {
                epoch: closed,
                into: Epoch(waiting),
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

    /// Files and blocks in the closed set waiting to ship.
    fn closed_set_size(&self) -> (u64, u64) {
        self.all_files()
            .iter()
            .filter(|f| f.closed_nonempty.load(Ordering::Relaxed))
            .map(|f| f.bitmap.count(Slot::Closed))
            .filter(|&n| n > 0)
            .fold((0, 0), |(files, blocks), n| (files + 1, blocks + n))
    }
}
