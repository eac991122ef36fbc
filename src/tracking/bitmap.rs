//! One file's crash-safe dirty bitmap: a memory-mapped file with two slots
//! (the open epoch's writes and the closed set waiting to ship), interleaved
//! so the file grows by appending. The byte layout is in `docs/design.md`.
//!
//! Setting a bit is a `fetch_or` on the mapped page: the page belongs to the
//! kernel's page cache, so a `kill -9` right after it loses nothing.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::error::{Error, IoContext, Result};
use crate::ids::{BlockSize, FileId};

const MAGIC: &[u8; 8] = b"HBRFSBM1";
const VERSION: u32 = 1;
/// Header size: one page, so the words start page-aligned.
const HEADER: usize = 4096;
const OFF_BLOCK_SIZE: usize = 12;
const OFF_FILE_ID: usize = 16;
const OFF_CAPACITY: usize = 24;
const OFF_BYTES_WRITTEN: usize = 32;
const OFF_BLOCKS_DIRTIED: usize = 40;
const OFF_LAST_WRITE: usize = 48;
const OFF_ACTIVE_SLOT: usize = 56;
/// Smallest capacity, in blocks (one group per slot).
const MIN_CAPACITY: u64 = 64;

/// The two halves of the bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Collects the writes of the open epoch.
    Active,
    /// Holds the closed set waiting to be shipped.
    Closed,
}

/// A file's dirty bitmap.
#[derive(Debug)]
pub struct Bitmap {
    path: PathBuf,
    file: File,
    /// Growing the file remaps it: writers hold this shared while they touch
    /// the words, growth takes it exclusively.
    map: RwLock<MmapMut>,
}

/// Counters kept in the bitmap header (so they cost no database work).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes written through the mount since the file was first tracked.
    pub bytes_written: u64,
    /// Blocks that went from clean to dirty.
    pub blocks_dirtied: u64,
    /// Unix nanoseconds of the last write, 0 if none.
    pub last_write_ns: u64,
}

fn word_at(map: &MmapMut, offset: usize) -> &AtomicU64 {
    assert!(offset % 8 == 0 && offset + 8 <= map.len());
    // SAFETY: the offset is 8-aligned within a page-aligned mapping and in
    // bounds (checked above); all accesses to these words are atomic.
    unsafe { &*(map.as_ptr().add(offset) as *const AtomicU64) }
}

fn capacity_of(map: &MmapMut) -> u64 {
    word_at(map, OFF_CAPACITY).load(Ordering::Relaxed)
}

fn file_len(capacity: u64) -> u64 {
    HEADER as u64 + capacity / 64 * 16
}

impl Bitmap {
    /// Creates a new bitmap for `id`, with blocks `0..dirty_blocks` already
    /// dirty in the closed set (a file whose earlier state is unknown).
    pub fn create(
        path: &Path,
        id: FileId,
        block_size: BlockSize,
        dirty_blocks: u64,
    ) -> Result<Self> {
        let capacity = dirty_blocks.div_ceil(64).max(1) * 64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        file.set_len(file_len(capacity)).at(path)?;
        // SAFETY: the file is ours (under the locked state folder) and only
        // accessed through atomics while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file) }.at(path)?;
        map[..8].copy_from_slice(MAGIC);
        map[8..12].copy_from_slice(&VERSION.to_le_bytes());
        map[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4]
            .copy_from_slice(&(block_size.bytes() as u32).to_le_bytes());
        map[OFF_FILE_ID..OFF_FILE_ID + 8].copy_from_slice(&id.0.to_le_bytes());
        map[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
        let bitmap = Bitmap {
            path: path.to_path_buf(),
            file,
            map: RwLock::new(map),
        };
        bitmap.set_range(Slot::Closed, 0..dirty_blocks);
        bitmap.sync()?;
        Ok(bitmap)
    }

    /// Opens an existing bitmap, checking that it belongs to `id` and was
    /// made with `block_size`.
    pub fn open(path: &Path, id: FileId, block_size: BlockSize, writable: bool) -> Result<Self> {
        let bad = |reason: String| Error::BadState {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .at(path)?;
        let len = file.metadata().at(path)?.len();
        if len < HEADER as u64 {
            return Err(bad(format!(
                "bitmap file is {len} bytes, shorter than its header"
            )));
        }
        // SAFETY: as in `create`. A read-only open maps privately so the
        // atomics never write through to the file.
        let map = unsafe {
            if writable {
                MmapMut::map_mut(&file)
            } else {
                memmap2::MmapOptions::new().map_copy(&file)
            }
        }
        .at(path)?;
        if &map[..8] != MAGIC {
            return Err(bad("not an hbrfs bitmap (bad magic)".into()));
        }
        let version = u32::from_le_bytes(map[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(format!(
                "bitmap format version {version}, this hbrfs reads {VERSION}"
            )));
        }
        let bs = u32::from_le_bytes(map[12..16].try_into().expect("4 bytes"));
        if u64::from(bs) != block_size.bytes() {
            return Err(bad(format!(
                "bitmap block size {bs}, datastore uses {}",
                block_size.bytes()
            )));
        }
        let found = word_at(&map, OFF_FILE_ID).load(Ordering::Relaxed);
        if found != id.0 {
            return Err(bad(format!(
                "bitmap belongs to file id {found}, expected {id}"
            )));
        }
        let capacity = capacity_of(&map);
        if capacity % 64 != 0 || file_len(capacity) != len {
            return Err(bad(format!(
                "capacity {capacity} blocks does not match file length {len}"
            )));
        }
        Ok(Bitmap {
            path: path.to_path_buf(),
            file,
            map: RwLock::new(map),
        })
    }

    /// The words of block group `group` for `slot`.
    fn word_offset(map: &MmapMut, group: u64, slot: Slot) -> usize {
        let active = word_at(map, OFF_ACTIVE_SLOT).load(Ordering::Relaxed) as usize & 1;
        let index = match slot {
            Slot::Active => active,
            Slot::Closed => 1 - active,
        };
        HEADER + (group as usize * 2 + index) * 8
    }

    /// Makes sure the bitmap can hold blocks below `end`, growing it
    /// (doubling) when needed.
    fn ensure_capacity(&self, end: u64) -> Result<()> {
        if end <= capacity_of(&self.map.read().expect("bitmap lock")) {
            return Ok(());
        }
        let mut map = self.map.write().expect("bitmap lock");
        let old = capacity_of(&map);
        if end <= old {
            return Ok(());
        }
        let capacity = end
            .div_ceil(64)
            .max(1)
            .next_power_of_two()
            .max(MIN_CAPACITY / 64)
            * 64;
        map.flush().at(&self.path)?;
        self.file.set_len(file_len(capacity)).at(&self.path)?;
        // SAFETY: as in `create`; the old mapping is dropped on assignment
        // while we hold the lock exclusively.
        *map = unsafe { MmapMut::map_mut(&self.file) }.at(&self.path)?;
        word_at(&map, OFF_CAPACITY).store(capacity, Ordering::Relaxed);
        Ok(())
    }

    /// Sets `blocks` in `slot`; returns how many bits went from 0 to 1.
    fn set_range(&self, slot: Slot, blocks: Range<u64>) -> u64 {
        Self::set_range_in(&self.map.read().expect("bitmap lock"), slot, blocks)
    }

    /// [`Self::set_range`] on a mapping the caller holds.
    fn set_range_in(map: &MmapMut, slot: Slot, blocks: Range<u64>) -> u64 {
        let mut newly = 0;
        let mut block = blocks.start;
        while block < blocks.end {
            let group = block / 64;
            let first = block % 64;
            let last = (blocks.end - group * 64).min(64);
            let mask = if last - first == 64 {
                u64::MAX
            } else {
                ((1u64 << (last - first)) - 1) << first
            };
            let old =
                word_at(map, Self::word_offset(map, group, slot)).fetch_or(mask, Ordering::Relaxed);
            newly += u64::from((mask & !old).count_ones());
            block = group * 64 + last;
        }
        newly
    }

    /// Marks `blocks` dirty in the open epoch and counts `bytes` written.
    /// Called before the data reaches the backing file.
    pub fn mark(&self, blocks: Range<u64>, bytes: u64, now_ns: u64) -> Result<()> {
        // One shared lock per write on the hot path; growth is the rare case.
        loop {
            {
                let map = self.map.read().expect("bitmap lock");
                if blocks.end <= capacity_of(&map) {
                    let newly = Self::set_range_in(&map, Slot::Active, blocks);
                    word_at(&map, OFF_BYTES_WRITTEN).fetch_add(bytes, Ordering::Relaxed);
                    if newly > 0 {
                        word_at(&map, OFF_BLOCKS_DIRTIED).fetch_add(newly, Ordering::Relaxed);
                    }
                    word_at(&map, OFF_LAST_WRITE).fetch_max(now_ns, Ordering::Relaxed);
                    return Ok(());
                }
            }
            self.ensure_capacity(blocks.end)?;
        }
    }

    /// The header counters.
    pub fn counters(&self) -> Counters {
        let map = self.map.read().expect("bitmap lock");
        Counters {
            bytes_written: word_at(&map, OFF_BYTES_WRITTEN).load(Ordering::Relaxed),
            blocks_dirtied: word_at(&map, OFF_BLOCKS_DIRTIED).load(Ordering::Relaxed),
            last_write_ns: word_at(&map, OFF_LAST_WRITE).load(Ordering::Relaxed),
        }
    }

    /// Number of blocks set in `slot`.
    pub fn count(&self, slot: Slot) -> u64 {
        let map = self.map.read().expect("bitmap lock");
        (0..capacity_of(&map) / 64)
            .map(|g| {
                u64::from(
                    word_at(&map, Self::word_offset(&map, g, slot))
                        .load(Ordering::Relaxed)
                        .count_ones(),
                )
            })
            .sum()
    }

    /// Swaps the slots: the open epoch's writes become the closed set and
    /// the (empty) closed slot starts collecting. O(1); the caller holds the
    /// cut gate and knows the closed slot is empty.
    pub fn swap_slots(&self) {
        let map = self.map.read().expect("bitmap lock");
        word_at(&map, OFF_ACTIVE_SLOT).fetch_xor(1, Ordering::Relaxed);
    }

    /// Folds the active slot into the closed set and clears it; the caller
    /// holds the cut gate.
    pub fn fold_active_into_closed(&self) {
        let map = self.map.read().expect("bitmap lock");
        for g in 0..capacity_of(&map) / 64 {
            let active = word_at(&map, Self::word_offset(&map, g, Slot::Active));
            let bits = active.swap(0, Ordering::Relaxed);
            if bits != 0 {
                word_at(&map, Self::word_offset(&map, g, Slot::Closed))
                    .fetch_or(bits, Ordering::Relaxed);
            }
        }
    }

    /// Whether `block` is set in `slot`.
    pub fn is_set(&self, slot: Slot, block: u64) -> bool {
        let map = self.map.read().expect("bitmap lock");
        block < capacity_of(&map)
            && word_at(&map, Self::word_offset(&map, block / 64, slot)).load(Ordering::Relaxed)
                & (1 << (block % 64))
                != 0
    }

    /// The blocks set in `slot`, in order.
    pub fn blocks(&self, slot: Slot) -> Vec<u64> {
        let map = self.map.read().expect("bitmap lock");
        let mut out = Vec::new();
        for g in 0..capacity_of(&map) / 64 {
            let mut bits = word_at(&map, Self::word_offset(&map, g, slot)).load(Ordering::Relaxed);
            while bits != 0 {
                out.push(g * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Clears the closed slot once its epoch is applied at the secondary.
    pub fn clear_closed(&self) {
        let map = self.map.read().expect("bitmap lock");
        for g in 0..capacity_of(&map) / 64 {
            word_at(&map, Self::word_offset(&map, g, Slot::Closed)).store(0, Ordering::Relaxed);
        }
    }

    /// Sets every block below `blocks` in the closed slot (a full baseline).
    pub fn fill_closed(&self, blocks: u64) -> Result<()> {
        self.ensure_capacity(blocks)?;
        self.set_range(Slot::Closed, 0..blocks);
        Ok(())
    }

    /// The dirty blocks (set in either slot), merged into runs.
    pub fn dirty_extents(&self) -> Vec<Range<u64>> {
        let map = self.map.read().expect("bitmap lock");
        let mut extents: Vec<Range<u64>> = Vec::new();
        for g in 0..capacity_of(&map) / 64 {
            let mut bits = word_at(&map, Self::word_offset(&map, g, Slot::Active))
                .load(Ordering::Relaxed)
                | word_at(&map, Self::word_offset(&map, g, Slot::Closed)).load(Ordering::Relaxed);
            while bits != 0 {
                let start = u64::from(bits.trailing_zeros());
                let run = u64::from((bits >> start).trailing_ones());
                let range = g * 64 + start..g * 64 + start + run;
                match extents.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => extents.push(range),
                }
                bits = if start + run >= 64 {
                    0
                } else {
                    bits & !(((1u64 << run) - 1) << start)
                };
            }
        }
        extents
    }

    /// Writes the mapped pages to disk (`msync`), so set bits survive a
    /// power cut; called from `fsync` before the data is synced.
    pub fn sync(&self) -> Result<()> {
        self.map.read().expect("bitmap lock").flush().at(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(dir: &Path) -> Bitmap {
        Bitmap::create(&dir.join("b.map"), FileId(7), BlockSize::DEFAULT, 0).unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hbrfs-bitmap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn marks_merge_into_extents_across_groups() {
        let dir = tempdir("extents");
        let b = bitmap(&dir);
        b.mark(3..5, 10, 1).unwrap();
        b.mark(60..130, 10, 2).unwrap();
        b.mark(130..131, 10, 3).unwrap();
        assert_eq!(b.dirty_extents(), vec![3..5, 60..131]);
        assert_eq!(b.count(Slot::Active), 2 + 71);
        let c = b.counters();
        assert_eq!(
            (c.bytes_written, c.blocks_dirtied, c.last_write_ns),
            (30, 73, 3)
        );
    }

    #[test]
    fn survives_reopen_and_growth() {
        let dir = tempdir("reopen");
        let path = dir.join("b.map");
        {
            let b = Bitmap::create(&path, FileId(7), BlockSize::DEFAULT, 10).unwrap();
            b.mark(100_000..100_001, 1, 1).unwrap();
        }
        let b = Bitmap::open(&path, FileId(7), BlockSize::DEFAULT, true).unwrap();
        assert_eq!(b.dirty_extents(), vec![0..10, 100_000..100_001]);
        assert_eq!(b.count(Slot::Closed), 10);
        assert!(Bitmap::open(&path, FileId(8), BlockSize::DEFAULT, false).is_err());
        let other = BlockSize::new(4096).unwrap();
        let err = Bitmap::open(&path, FileId(7), other, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("block size"), "{err}");
    }

    #[test]
    fn swap_then_fold_keeps_every_bit() {
        let dir = tempdir("slots");
        let b = bitmap(&dir);
        b.mark(1..2, 1, 1).unwrap();
        b.swap_slots();
        assert_eq!((b.count(Slot::Active), b.count(Slot::Closed)), (0, 1));
        b.mark(1..3, 1, 1).unwrap();
        b.fold_active_into_closed();
        assert_eq!((b.count(Slot::Active), b.count(Slot::Closed)), (0, 2));
        assert_eq!(b.dirty_extents(), vec![1..3]);
    }

    #[test]
    fn rejects_a_truncated_file_with_a_clear_error() {
        let dir = tempdir("bad");
        let path = dir.join("b.map");
        std::fs::write(&path, b"HBRFSBM1").unwrap();
        let err = Bitmap::open(&path, FileId(7), BlockSize::DEFAULT, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than its header"), "{err}");
    }
}
