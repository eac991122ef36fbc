//! One tracked file: its dirty bitmap, its size and path now and at the
//! last cut, and the pre-images of its protected closed set; marking a
//! write, reading a block as of the cut, and flipping its slots at a cut.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::bitmap::{self, Bitmap, Slot};
use super::preimage::PreImages;
use super::{Dirtied, DirtyFiles};
use crate::error::{IoContext, Result};
use crate::fs::recorder::TrackedBlocks;
use crate::ids::{BlockNo, BlockSize, FileId};
use crate::state::{now_ns, read_full};

/// One tracked file: its bitmap and what the cut and the reader of its
/// closed set need.
#[derive(Debug)]
pub struct TrackedFile {
    /// The stable id.
    pub id: FileId,
    pub(super) block_size: BlockSize,
    pub(super) bitmap: Bitmap,
    /// Read-only descriptor of the backing file, for pre-images and
    /// reading the closed set; it stays valid across renames and unlinks.
    pub(super) reader: Option<File>,
    /// Current size, kept by the filesystem under the gate.
    pub(super) size: AtomicU64,
    /// Current path relative to the root, kept by the filesystem.
    pub(super) path: Mutex<Vec<u8>>,
    /// Path and size at the last cut: what the closed set ships with.
    pub(super) at_cut: Mutex<(Vec<u8>, u64)>,
    /// Written (or resized) in the open epoch: the cut visits only these.
    pub(super) touched: AtomicBool,
    /// Its closed slot holds blocks waiting to ship: the cut must fold into
    /// it instead of swapping.
    pub(super) closed_nonempty: AtomicBool,
    /// Its closed set is protected (being read as of its cut): writes to
    /// closed blocks save pre-images first.
    pub(super) protected: AtomicBool,
    /// The epoch in which its last name was unlinked, 0 while it exists.
    /// A gone file stays known until the closed set holding it is cleared.
    pub(super) gone_epoch: AtomicU64,
    /// Pre-images of the protected closed set; the lock also orders a
    /// writer's save against the reader's read of the same block.
    pub(super) preimages: Mutex<Option<PreImages>>,
    pub(super) preimage_path: PathBuf,
    /// The tracker's dirty-file set, which this file joins when touched.
    pub(super) dirty: Arc<DirtyFiles>,
    /// The tracker's "changed since the last cut", raised when touched.
    pub(super) dirtied: Arc<Dirtied>,
}

impl TrackedFile {
    /// Marks the blocks of `len` bytes at `offset` dirty, counting `written`
    /// bytes. Call with the cut gate held, before the data is written.
    pub fn mark(&self, offset: u64, len: u64, written: u64) -> Result<()> {
        self.mark_blocks(self.block_size.blocks_of(offset, len), written)
    }

    /// Marks what a truncate from `old` to `new` bytes changes: when it
    /// shrinks, the blocks from the new end to the old one (their content
    /// is gone, and reads zeros if the file grows again).
    pub fn before_truncate(&self, old: u64, new: u64) -> Result<()> {
        if new >= old {
            return Ok(());
        }
        let bs = self.block_size.bytes();
        self.mark_blocks(new / bs..old.div_ceil(bs), 0)
    }

    pub(super) fn mark_blocks(&self, blocks: std::ops::Range<u64>, written: u64) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        if self.protected.load(Ordering::Acquire) {
            self.preserve(blocks.clone())?;
        }
        self.bitmap.mark(blocks, written, now_ns())?;
        self.touch();
        Ok(())
    }

    /// Notes a change in the open epoch: the next cut visits this file,
    /// and the replicator wakes. The set's lock and the wake-up happen
    /// once per file and epoch, not per write.
    pub(super) fn touch(&self) {
        if !self.touched.swap(true, Ordering::Relaxed) {
            self.dirty.insert(self.id);
            self.dirtied.raise();
        }
    }

    /// Saves the cut-time content of the protected closed blocks in `blocks`.
    fn preserve(&self, blocks: std::ops::Range<u64>) -> Result<()> {
        let mut guard = self.preimages.lock().expect("preimage lock");
        for block in blocks {
            if !self.bitmap.is_set(Slot::Closed, block)
                || guard.as_ref().is_some_and(|s| s.contains(block))
            {
                continue;
            }
            let data = self.read_current(block)?;
            if guard.is_none() {
                *guard = Some(PreImages::create(&self.preimage_path)?);
            }
            guard.as_mut().expect("just created").save(block, &data)?;
        }
        Ok(())
    }

    fn read_current(&self, block: u64) -> Result<Vec<u8>> {
        let Some(reader) = &self.reader else {
            return Ok(Vec::new());
        };
        let bs = self.block_size.bytes();
        let mut buf = vec![0u8; bs as usize];
        let done = read_full(reader, &mut buf, block * bs).at(&self.preimage_path)?;
        buf.truncate(done);
        Ok(buf)
    }

    /// The content `block` had at the cut of the protected closed set, cut
    /// to the file's size at the cut.
    pub fn read_at_cut(&self, BlockNo(block): BlockNo) -> Result<Vec<u8>> {
        let guard = self.preimages.lock().expect("preimage lock");
        let mut data = match guard.as_ref().map(|s| s.get(block)).transpose()?.flatten() {
            Some(saved) => saved,
            None => self.read_current(block)?,
        };
        let size = self.at_cut.lock().expect("cut lock").1;
        let end = size
            .saturating_sub(block * self.block_size.bytes())
            .min(data.len() as u64);
        data.truncate(end as usize);
        Ok(data)
    }

    /// The content of `block` now, if it is clean (so it must equal the
    /// replica's at the last shipped point); `None` when it is dirty, also
    /// when it turned dirty while being read.
    pub fn read_clean(&self, BlockNo(block): BlockNo) -> Result<Option<Vec<u8>>> {
        if self.is_dirty(block) {
            return Ok(None);
        }
        let mut data = self.read_current(block)?;
        let size = self.size.load(Ordering::Relaxed);
        data.truncate(
            size.saturating_sub(block * self.block_size.bytes())
                .min(data.len() as u64) as usize,
        );
        Ok((!self.is_dirty(block)).then_some(data))
    }

    fn is_dirty(&self, block: u64) -> bool {
        self.bitmap.is_set(Slot::Active, block) || self.bitmap.is_set(Slot::Closed, block)
    }

    /// Whether anything of this file waits to ship (written since the last
    /// cut, or in a closed set).
    pub fn has_pending(&self) -> bool {
        self.touched.load(Ordering::Relaxed) || self.closed_nonempty.load(Ordering::Relaxed)
    }

    /// Current size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Its size as the mount keeps it (every write, truncate and
    /// fallocate updates it under the gate), for a file the daemon opened;
    /// none when inspecting offline, where sizes are not loaded, and for a
    /// file whose last name is gone.
    pub fn live_size(&self) -> Option<u64> {
        (self.reader.is_some() && !self.is_gone()).then(|| self.size())
    }

    /// Whether its last name was unlinked.
    pub fn is_gone(&self) -> bool {
        self.gone_epoch.load(Ordering::Relaxed) != 0
    }

    /// Notes that the file now ends at least at `end` (after a write or
    /// fallocate); growing is a change of the epoch even when no block was
    /// marked (fallocate allocates without writing).
    pub fn extended_to(&self, end: u64) {
        if self.size.fetch_max(end, Ordering::Relaxed) < end {
            self.touch();
        }
    }

    /// Notes a new size (truncate); the size change belongs to the epoch.
    pub fn resized(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
        self.touch();
    }

    /// Notes a new path (rename).
    pub fn renamed(&self, path: Vec<u8>) {
        *self.path.lock().expect("path lock") = path;
        self.touch();
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

    /// Path and size at the last cut.
    pub fn at_cut(&self) -> (Vec<u8>, u64) {
        self.at_cut.lock().expect("cut lock").clone()
    }

    /// Blocks of the closed set below the size at the cut.
    pub fn closed_blocks(&self) -> Vec<BlockNo> {
        let size = self.at_cut().1;
        let end = size.div_ceil(self.block_size.bytes());
        self.bitmap
            .blocks(Slot::Closed)
            .into_iter()
            .filter(|b| *b < end)
            .map(BlockNo)
            .collect()
    }

    /// Blocks saved as pre-images while the closed set is protected.
    pub fn preimage_count(&self) -> usize {
        self.preimages
            .lock()
            .expect("preimage lock")
            .as_ref()
            .map_or(0, PreImages::len)
    }

    /// Flips or folds this file's slots and snapshots its path and size;
    /// the caller holds the gate exclusively.
    pub(super) fn cut(&self, touched: bool) {
        if touched {
            if self.closed_nonempty.swap(true, Ordering::Relaxed) {
                self.bitmap.fold_active_into_closed();
            } else {
                self.bitmap.swap_slots();
            }
        }
        let path = self.path.lock().expect("path lock").clone();
        *self.at_cut.lock().expect("cut lock") = (path, self.size.load(Ordering::Relaxed));
    }
}

impl TrackedBlocks for TrackedFile {
    fn id(&self) -> FileId {
        self.id
    }
    fn mark(&self, offset: u64, len: u64, written: u64) -> Result<()> {
        TrackedFile::mark(self, offset, len, written)
    }
    fn before_truncate(&self, old: u64, new: u64) -> Result<()> {
        TrackedFile::before_truncate(self, old, new)
    }
    fn extended_to(&self, end: u64) {
        TrackedFile::extended_to(self, end)
    }
    fn resized(&self, size: u64) {
        TrackedFile::resized(self, size)
    }
    fn sync(&self) -> Result<()> {
        TrackedFile::sync(self)
    }
}
