//! One file's crash-safe dirty bitmap: a memory-mapped file with two slots
//! (the open epoch's writes and the closed set waiting to ship), interleaved
//! so the file grows by appending. The byte layout is in `docs/design.md`.
//!
//! Setting a bit is a `fetch_or` on the mapped page: the page belongs to the
//! kernel's page cache, so a `kill -9` right after it loses nothing.
//!
//! # Summary
//!
//! So that counting, listing, folding and clearing cost what is dirty and not
//! the size of the file (a 1 TiB sparse image has 16M blocks at 64 KiB), each
//! slot keeps a *summary*: one bit per `SUMMARY_GROUPS` block groups (a
//! "summary page", 4096 blocks) saying "this page may hold set bits". `mark`
//! sets the page's summary bit before the word's bits (one relaxed load, and a
//! `fetch_or` only when the bit was clear); the scans visit summarised pages
//! only, and fold and clear drop the summary bits of the pages they empty.
//!
//! The summary lives in memory only, never in the file: it is rebuilt by one
//! full scan of the words when the bitmap is opened (one scan per mount, not
//! per cut). The file format is therefore unchanged (version 1), a bitmap
//! written by any build loads, and a crash can never leave a summary that
//! hides a set bit (invariant 1 rests on the words alone).
//!
//! # Bounds and space
//!
//! Block numbers are bounded by [`MAX_FILE_SIZE`] (16 TiB less a block,
//! ext4's limit and the largest file a secondary accepts): [`Bitmap::mark`]
//! and the growth under it refuse a block at or beyond the bound with
//! `EFBIG`, so no write can grow a bitmap past 64 MiB (at 64 KiB blocks).
//! The filesystem refuses such writes before they get here; this is the
//! second line of defence.
//!
//! The file's blocks are allocated (`fallocate`) before the file is
//! lengthened and remapped, so a full disk is an `ENOSPC` from the write
//! that grows the bitmap, never a `SIGBUS` on a later store through the
//! mapping. A file system without `fallocate` (`EOPNOTSUPP`) gets a plain
//! sparse `set_len`, as before.
//!
//! The summary is kept per *physical* slot (0 or 1), like the words, so
//! [`Bitmap::swap_slots`] stays O(1). A page's summary bit may be set while
//! the page is empty (never the reverse, outside a call racing a `mark` into
//! the same slot, which the callers exclude with the cut gate).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use memmap2::MmapMut;

use crate::error::{Error, IoContext, Result};
use crate::ids::{BlockSize, FileId};
use crate::sys;
use crate::wire::MAX_FILE_SIZE;

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
/// Block groups (words of one slot) per summary bit: a summary page covers
/// 64 × 64 = 4096 blocks (256 MiB of image at 64 KiB blocks), and one summary
/// word covers 262,144 blocks, so a 16M-block file has 64 summary words.
const SUMMARY_GROUPS: u64 = 64;

/// The two halves of the bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Collects the writes of the open epoch.
    Active,
    /// Holds the closed set waiting to be shipped.
    Closed,
}

/// A file's dirty bitmap.
///
/// It keeps the mapping, not a descriptor: a datastore of 10,000 files
/// would otherwise hold 10,000 descriptors for files that are only
/// reopened to grow, next to the 10,000 readers of their backing files,
/// and a hard limit of 20,000 open files (common in containers) refused
/// the mount. Growth reopens the file by its path.
#[derive(Debug)]
pub struct Bitmap {
    path: PathBuf,
    /// Blocks of a file of [`MAX_FILE_SIZE`] bytes: every block number is
    /// below it.
    max_blocks: u64,
    /// Growing the file remaps it (and lengthens the summary): writers hold
    /// this shared while they touch the words, growth takes it exclusively.
    map: RwLock<Mapped>,
}

/// The mapping and its in-memory summary, replaced together on growth.
#[derive(Debug)]
struct Mapped {
    map: MmapMut,
    /// Per physical slot: bit `p % 64` of word `p / 64` is set when summary
    /// page `p` (groups `p * SUMMARY_GROUPS..`) may hold set bits.
    summary: [Vec<AtomicU64>; 2],
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

/// The blocks of a file of [`MAX_FILE_SIZE`] bytes at `block_size`.
fn max_blocks(block_size: BlockSize) -> u64 {
    MAX_FILE_SIZE.div_ceil(block_size.bytes())
}

/// The largest capacity a bitmap needs: the blocks of a file of
/// [`MAX_FILE_SIZE`] bytes, in whole groups.
fn capacity_bound(block_size: BlockSize) -> u64 {
    max_blocks(block_size).div_ceil(64) * 64
}

/// Cuts a bitmap made by an older build, before block numbers were
/// bounded, back to `bound` blocks: one write far beyond the largest file
/// (`pwrite` at 2^56) made it a 512 GiB sparse file, whose full scan at
/// every open kept the daemon from answering for minutes. Such blocks
/// cannot be replicated (no secondary accepts a file that large), so
/// their marks are dropped, counted and logged; counting them visits only
/// the file's data extents (`SEEK_DATA`/`SEEK_HOLE`), so the cost is what
/// the file holds, not its length. A writable open shortens the file
/// (length first, then the header: a crash between is recognised at the
/// next open); a read-only one bounds its private copy of the header.
fn trim(path: &Path, file: &File, mut map: MmapMut, bound: u64, writable: bool) -> Result<MmapMut> {
    let dropped = marks_beyond(file, &map, bound).at(path)?;
    log::warn!(
        "{}: bitmap of {} blocks (made by an older hbrfs) cut to the {bound} blocks of the largest \
         file; {dropped} marks beyond it dropped (no file can hold those blocks)",
        path.display(),
        capacity_of(&map)
    );
    if !writable {
        word_at(&map, OFF_CAPACITY).store(bound, Ordering::Relaxed);
        return Ok(map);
    }
    drop(map);
    file.set_len(file_len(bound)).at(path)?;
    std::os::unix::fs::FileExt::write_all_at(file, &bound.to_le_bytes(), OFF_CAPACITY as u64)
        .at(path)?;
    file.sync_all().at(path)?;
    // SAFETY: as in `Bitmap::create`.
    map = unsafe { MmapMut::map_mut(file) }.at(path)?;
    Ok(map)
}

/// Set bits (either slot) of the words past `bound` blocks, reading only
/// the file's data extents.
fn marks_beyond(file: &File, map: &MmapMut, bound: u64) -> io::Result<u64> {
    let (start, end) = (file_len(bound), map.len() as u64);
    let mut at = start;
    let mut marks = 0;
    while at < end {
        let data = match sys::lseek(file.as_fd(), at as i64, libc::SEEK_DATA) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            res => res? as u64,
        };
        let hole = (sys::lseek(file.as_fd(), data as i64, libc::SEEK_HOLE)? as u64).min(end);
        let mut word = (data & !7).max(start);
        while word < hole {
            marks += u64::from(
                word_at(map, word as usize)
                    .load(Ordering::Relaxed)
                    .count_ones(),
            );
            word += 8;
        }
        at = hole;
    }
    Ok(marks)
}

/// The refusal of a block beyond [`MAX_FILE_SIZE`]: `EFBIG`, as the
/// backing file system answers a write beyond its largest file.
fn too_large(path: &Path) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EFBIG),
    }
}

/// Lengthens `file` from `old` to `new` bytes with the new range allocated
/// first (`FALLOC_FL_KEEP_SIZE`, so a failure leaves the length alone):
/// `ENOSPC` comes now, not as a `SIGBUS` on a store through the mapping.
fn grow(file: &File, old: u64, new: u64) -> io::Result<()> {
    if new > old {
        match sys::fallocate(file.as_fd(), libc::FALLOC_FL_KEEP_SIZE, old, new - old) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            res => res?,
        }
    }
    file.set_len(new)
}

/// Summary words needed for `capacity` blocks.
fn summary_len(capacity: u64) -> usize {
    (capacity / 64).div_ceil(SUMMARY_GROUPS * 64) as usize
}

impl Mapped {
    /// Wraps a mapping and builds its summary by one full scan of the words:
    /// the only full scan, done once per open.
    fn new(map: MmapMut) -> Mapped {
        let len = summary_len(capacity_of(&map));
        let mapped = Mapped {
            summary: [0, 1].map(|_| (0..len).map(|_| AtomicU64::new(0)).collect()),
            map,
        };
        for group in 0..mapped.groups() {
            for phys in 0..2 {
                if mapped.word(group, phys).load(Ordering::Relaxed) != 0 {
                    mapped.summarise(group, phys);
                }
            }
        }
        mapped
    }

    /// Number of block groups (words per slot).
    fn groups(&self) -> u64 {
        capacity_of(&self.map) / 64
    }

    /// The physical index (0 or 1) of `slot`.
    fn phys(&self, slot: Slot) -> usize {
        let active = word_at(&self.map, OFF_ACTIVE_SLOT).load(Ordering::Relaxed) as usize & 1;
        match slot {
            Slot::Active => active,
            Slot::Closed => 1 - active,
        }
    }

    /// The word of block group `group` in physical slot `phys`.
    fn word(&self, group: u64, phys: usize) -> &AtomicU64 {
        word_at(&self.map, HEADER + (group as usize * 2 + phys) * 8)
    }

    /// The summary word and bit of the page holding `group`.
    fn summary_bit(&self, group: u64, phys: usize) -> (&AtomicU64, u64) {
        let page = group / SUMMARY_GROUPS;
        (&self.summary[phys][(page / 64) as usize], 1 << (page % 64))
    }

    /// Notes that the page of `group` may hold set bits in `phys`. Called
    /// before the bits are set; a load first keeps the shared cache line
    /// clean when the bit is already set (the common case on the write path).
    fn summarise(&self, group: u64, phys: usize) {
        let (word, bit) = self.summary_bit(group, phys);
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// The block groups of every page summarised in any of `phys`, in
    /// order: what the scans visit instead of every group.
    fn summarised_groups(&self, phys: &[usize]) -> impl Iterator<Item = u64> + '_ {
        let groups = self.groups();
        let len = self.summary[0].len();
        let phys = phys.to_vec();
        (0..len).flat_map(move |i| {
            let mut bits = phys.iter().fold(0, |acc, &p| {
                acc | self.summary[p][i].load(Ordering::Relaxed)
            });
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let page = i as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    page * SUMMARY_GROUPS..((page + 1) * SUMMARY_GROUPS).min(groups)
                })
            })
            .flatten()
        })
    }

    /// Clears the summary of physical slot `phys` (after its words were
    /// emptied).
    fn clear_summary(&self, phys: usize) {
        for word in &self.summary[phys] {
            word.store(0, Ordering::Relaxed);
        }
    }
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
        if dirty_blocks > max_blocks(block_size) {
            return Err(too_large(path));
        }
        let capacity = dirty_blocks.div_ceil(64).max(1) * 64;
        let file = crate::state::state_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        grow(&file, 0, file_len(capacity)).at(path)?;
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
            max_blocks: max_blocks(block_size),
            map: RwLock::new(Mapped::new(map)),
        };
        bitmap.set_range(Slot::Closed, 0..dirty_blocks);
        bitmap.sync()?;
        Ok(bitmap)
    }

    /// Opens an existing bitmap, checking that it belongs to `id` and was
    /// made with `block_size`; builds the in-memory summary by one scan.
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
        let bound = capacity_bound(block_size);
        // A trim that a crash interrupted has shortened the file already.
        let trimmed = capacity > bound && len == file_len(bound);
        if capacity % 64 != 0 || (file_len(capacity) != len && !trimmed) {
            return Err(bad(format!(
                "capacity {capacity} blocks does not match file length {len}"
            )));
        }
        let map = if capacity > bound {
            trim(path, &file, map, bound, writable)?
        } else {
            map
        };
        Ok(Bitmap {
            path: path.to_path_buf(),
            max_blocks: max_blocks(block_size),
            map: RwLock::new(Mapped::new(map)),
        })
    }

    /// The mapping, held shared.
    fn mapped(&self) -> RwLockReadGuard<'_, Mapped> {
        self.map.read().expect("bitmap lock")
    }

    /// Makes sure the bitmap can hold blocks below `end`, growing it
    /// (doubling, up to the blocks of [`MAX_FILE_SIZE`]) when needed;
    /// `EFBIG` for an `end` beyond that bound.
    fn ensure_capacity(&self, end: u64) -> Result<()> {
        if end > self.max_blocks {
            return Err(too_large(&self.path));
        }
        if end <= capacity_of(&self.mapped().map) {
            return Ok(());
        }
        let mut mapped = self.map.write().expect("bitmap lock");
        let old = capacity_of(&mapped.map);
        if end <= old {
            return Ok(());
        }
        let capacity = end
            .div_ceil(64)
            .max(1)
            .next_power_of_two()
            .max(MIN_CAPACITY / 64)
            .min(self.max_blocks.div_ceil(64))
            .max(end.div_ceil(64))
            * 64;
        mapped.map.flush().at(&self.path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .at(&self.path)?;
        grow(&file, file_len(old), file_len(capacity)).at(&self.path)?;
        // SAFETY: as in `create`; the old mapping is dropped on assignment
        // while we hold the lock exclusively.
        mapped.map = unsafe { MmapMut::map_mut(&file) }.at(&self.path)?;
        word_at(&mapped.map, OFF_CAPACITY).store(capacity, Ordering::Relaxed);
        // The new words are zero: their pages start unsummarised.
        let len = summary_len(capacity);
        for summary in &mut mapped.summary {
            summary.resize_with(len, || AtomicU64::new(0));
        }
        Ok(())
    }

    /// Sets `blocks` in `slot`; returns how many bits went from 0 to 1.
    fn set_range(&self, slot: Slot, blocks: Range<u64>) -> u64 {
        Self::set_range_in(&self.mapped(), slot, blocks)
    }

    /// [`Self::set_range`] on a mapping the caller holds. Each word's page
    /// is summarised before its bits are set.
    fn set_range_in(mapped: &Mapped, slot: Slot, blocks: Range<u64>) -> u64 {
        let phys = mapped.phys(slot);
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
            mapped.summarise(group, phys);
            let old = mapped.word(group, phys).fetch_or(mask, Ordering::Relaxed);
            newly += u64::from((mask & !old).count_ones());
            block = group * 64 + last;
        }
        newly
    }

    /// Marks `blocks` dirty in the open epoch and counts `bytes` written.
    /// Called before the data reaches the backing file. `EFBIG` (nothing
    /// marked) when `blocks` reaches beyond [`MAX_FILE_SIZE`]; the error of
    /// growing the file (`ENOSPC`, `EIO`) when it cannot grow.
    pub fn mark(&self, blocks: Range<u64>, bytes: u64, now_ns: u64) -> Result<()> {
        if blocks.end > self.max_blocks {
            return Err(too_large(&self.path));
        }
        // One shared lock per write on the hot path; growth is the rare case.
        loop {
            {
                let mapped = self.mapped();
                let map = &mapped.map;
                if blocks.end <= capacity_of(map) {
                    let newly = Self::set_range_in(&mapped, Slot::Active, blocks);
                    word_at(map, OFF_BYTES_WRITTEN).fetch_add(bytes, Ordering::Relaxed);
                    if newly > 0 {
                        word_at(map, OFF_BLOCKS_DIRTIED).fetch_add(newly, Ordering::Relaxed);
                    }
                    word_at(map, OFF_LAST_WRITE).fetch_max(now_ns, Ordering::Relaxed);
                    return Ok(());
                }
            }
            self.ensure_capacity(blocks.end)?;
        }
    }

    /// The header counters.
    pub fn counters(&self) -> Counters {
        let mapped = self.mapped();
        let counter = |offset| word_at(&mapped.map, offset).load(Ordering::Relaxed);
        Counters {
            bytes_written: counter(OFF_BYTES_WRITTEN),
            blocks_dirtied: counter(OFF_BLOCKS_DIRTIED),
            last_write_ns: counter(OFF_LAST_WRITE),
        }
    }

    /// Number of blocks set in `slot`; visits summarised pages only.
    pub fn count(&self, slot: Slot) -> u64 {
        let mapped = self.mapped();
        let phys = mapped.phys(slot);
        mapped
            .summarised_groups(&[phys])
            .map(|g| u64::from(mapped.word(g, phys).load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Swaps the slots: the open epoch's writes become the closed set and
    /// the (empty) closed slot starts collecting. O(1), summaries included
    /// (they belong to the physical slots); the caller holds the cut gate
    /// and knows the closed slot is empty.
    pub fn swap_slots(&self) {
        let mapped = self.mapped();
        word_at(&mapped.map, OFF_ACTIVE_SLOT).fetch_xor(1, Ordering::Relaxed);
    }

    /// Folds the active slot into the closed set and clears it; visits the
    /// active slot's summarised pages only. The caller holds the cut gate.
    pub fn fold_active_into_closed(&self) {
        let mapped = self.mapped();
        let (active, closed) = (mapped.phys(Slot::Active), mapped.phys(Slot::Closed));
        for g in mapped.summarised_groups(&[active]) {
            let bits = mapped.word(g, active).swap(0, Ordering::Relaxed);
            if bits != 0 {
                mapped.summarise(g, closed);
                mapped.word(g, closed).fetch_or(bits, Ordering::Relaxed);
            }
        }
        mapped.clear_summary(active);
    }

    /// Whether `block` is set in `slot`.
    pub fn is_set(&self, slot: Slot, block: u64) -> bool {
        let mapped = self.mapped();
        block < capacity_of(&mapped.map)
            && mapped
                .word(block / 64, mapped.phys(slot))
                .load(Ordering::Relaxed)
                & (1 << (block % 64))
                != 0
    }

    /// The blocks set in `slot`, in order; visits summarised pages only.
    pub fn blocks(&self, slot: Slot) -> Vec<u64> {
        let mapped = self.mapped();
        let phys = mapped.phys(slot);
        let mut out = Vec::new();
        for g in mapped.summarised_groups(&[phys]) {
            let mut bits = mapped.word(g, phys).load(Ordering::Relaxed);
            while bits != 0 {
                out.push(g * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Clears the closed slot once its epoch is applied at the secondary;
    /// visits its summarised pages only. Nothing marks the closed slot
    /// meanwhile (writes go to the active slot).
    pub fn clear_closed(&self) {
        let mapped = self.mapped();
        let closed = mapped.phys(Slot::Closed);
        for g in mapped.summarised_groups(&[closed]) {
            mapped.word(g, closed).store(0, Ordering::Relaxed);
        }
        mapped.clear_summary(closed);
    }

    /// Sets every block below `blocks` in the closed slot (a full baseline).
    pub fn fill_closed(&self, blocks: u64) -> Result<()> {
        self.ensure_capacity(blocks)?;
        self.set_range(Slot::Closed, 0..blocks);
        Ok(())
    }

    /// The dirty blocks (set in either slot), merged into runs; visits the
    /// pages summarised in either slot only.
    pub fn dirty_extents(&self) -> Vec<Range<u64>> {
        let mapped = self.mapped();
        let mut extents: Vec<Range<u64>> = Vec::new();
        for g in mapped.summarised_groups(&[0, 1]) {
            let mut bits = mapped.word(g, 0).load(Ordering::Relaxed)
                | mapped.word(g, 1).load(Ordering::Relaxed);
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
        self.mapped().map.flush().at(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

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

    /// The blocks set in `slot` by a full scan of every word, ignoring the
    /// summary: what the fast paths must agree with.
    fn naive_blocks(b: &Bitmap, slot: Slot) -> Vec<u64> {
        let mapped = b.mapped();
        let phys = mapped.phys(slot);
        (0..mapped.groups())
            .flat_map(|g| {
                let bits = mapped.word(g, phys).load(Ordering::Relaxed);
                (0..64)
                    .filter(move |i| bits & (1 << i) != 0)
                    .map(move |i| g * 64 + i)
            })
            .collect()
    }

    /// Checks every fast path against the full scan and against `model`
    /// (the blocks set in the active and closed slot).
    fn check(b: &Bitmap, model: &[BTreeSet<u64>; 2]) {
        for (slot, want) in [Slot::Active, Slot::Closed].into_iter().zip(model) {
            let want: Vec<u64> = want.iter().copied().collect();
            assert_eq!(naive_blocks(b, slot), want, "{slot:?} full scan");
            assert_eq!(b.blocks(slot), want, "{slot:?} blocks");
            assert_eq!(b.count(slot), want.len() as u64, "{slot:?} count");
        }
        let mut extents: Vec<Range<u64>> = Vec::new();
        for &block in model[0].union(&model[1]) {
            match extents.last_mut() {
                Some(last) if last.end == block => last.end += 1,
                _ => extents.push(block..block + 1),
            }
        }
        assert_eq!(b.dirty_extents(), extents, "dirty extents");
    }

    /// One step of the random sequence.
    #[derive(Clone, Debug)]
    enum Step {
        Mark(Range<u64>),
        Swap,
        Fold,
        Clear,
        Fill(u64),
        Reopen,
    }

    /// Blocks up to ~600k: three summary words, so pages in several words
    /// and growth across them are exercised.
    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u64..600_000, 1u64..200).prop_map(|(s, n)| Step::Mark(s..s + n)),
            1 => Just(Step::Swap),
            2 => Just(Step::Fold),
            2 => Just(Step::Clear),
            1 => (0u64..9_000).prop_map(Step::Fill),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn fast_paths_match_a_full_scan(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempdir("prop");
            let path = dir.join("b.map");
            let mut b = Bitmap::create(&path, FileId(7), BlockSize::DEFAULT, 100).unwrap();
            let mut model: [BTreeSet<u64>; 2] = [BTreeSet::new(), (0..100).collect()];
            for step in steps {
                match step {
                    Step::Mark(r) => {
                        b.mark(r.clone(), 1, 1).unwrap();
                        model[0].extend(r);
                    }
                    Step::Swap => {
                        b.swap_slots();
                        model.swap(0, 1);
                    }
                    Step::Fold => {
                        b.fold_active_into_closed();
                        let active = std::mem::take(&mut model[0]);
                        model[1].extend(active);
                    }
                    Step::Clear => {
                        b.clear_closed();
                        model[1].clear();
                    }
                    Step::Fill(n) => {
                        b.fill_closed(n).unwrap();
                        model[1].extend(0..n);
                    }
                    Step::Reopen => {
                        drop(b);
                        b = Bitmap::open(&path, FileId(7), BlockSize::DEFAULT, true).unwrap();
                    }
                }
                check(&b, &model);
            }
        }
    }

    #[test]
    fn a_read_only_open_rebuilds_the_summary() {
        let dir = tempdir("readonly");
        let path = dir.join("b.map");
        {
            let b = Bitmap::create(&path, FileId(7), BlockSize::DEFAULT, 0).unwrap();
            b.mark(5_000_000..5_000_002, 1, 1).unwrap();
            b.swap_slots();
            b.mark(70..71, 1, 1).unwrap();
        }
        let b = Bitmap::open(&path, FileId(7), BlockSize::DEFAULT, false).unwrap();
        assert_eq!(b.blocks(Slot::Closed), vec![5_000_000, 5_000_001]);
        assert_eq!(b.blocks(Slot::Active), vec![70]);
        assert_eq!(b.dirty_extents(), vec![70..71, 5_000_000..5_000_002]);
    }

    #[test]
    fn refuses_blocks_beyond_the_largest_file_with_efbig() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempdir("bound");
        let path = dir.join("b.map");
        let b = Bitmap::create(&path, FileId(7), BlockSize::DEFAULT, 0).unwrap();
        let last = MAX_FILE_SIZE.div_ceil(BlockSize::DEFAULT.bytes()) - 1;
        let len_before = std::fs::metadata(&path).unwrap().len();
        for blocks in [last + 1..last + 2, last..last + 2, 1 << 40..(1 << 40) + 1] {
            let err = b.mark(blocks.clone(), 1, 1).unwrap_err();
            match &err {
                Error::Io { source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{err}")
                }
                other => panic!("{blocks:?}: not an IO error: {other}"),
            }
        }
        assert!(b.fill_closed(last + 2).is_err());
        assert_eq!(b.dirty_extents(), vec![], "nothing marked");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len_before);
        assert!(
            Bitmap::create(&dir.join("c.map"), FileId(8), BlockSize::DEFAULT, last + 2).is_err()
        );
        // The last block is fine, and the file is allocated, not sparse.
        b.mark(last..last + 1, 1, 2).unwrap();
        assert_eq!(b.blocks(Slot::Active), vec![last]);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), file_len(last + 1));
        assert!(meta.blocks() * 512 >= meta.len(), "{meta:?}");
        drop(b);
        let b = Bitmap::open(&path, FileId(7), BlockSize::DEFAULT, true).unwrap();
        assert_eq!(b.blocks(Slot::Active), vec![last]);
    }

    #[test]
    fn a_huge_sparse_bitmap_of_an_older_build_is_cut_to_the_bound_at_open_in_bounded_time() {
        let dir = tempdir("huge");
        let path = dir.join("1.map");
        let bs = BlockSize::DEFAULT;
        let b = Bitmap::create(&path, FileId(1), bs, 0).unwrap();
        b.mark(3..4, 1, 1).unwrap();
        drop(b);
        // What `pwrite` at 2^56 made before block numbers were bounded:
        // capacity for block 2^40, one bit set there, the rest a hole.
        let far: u64 = (1 << 56) / bs.bytes();
        let capacity = (far + 1).div_ceil(64) * 64;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(file_len(capacity)).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&capacity.to_le_bytes(), OFF_CAPACITY as u64)
            .unwrap();
        let word = HEADER as u64 + far / 64 * 16;
        file.write_all_at(&(1u64 << (far % 64)).to_le_bytes(), word)
            .unwrap();
        drop(file);

        let started = std::time::Instant::now();
        let b = Bitmap::open(&path, FileId(1), bs, true).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let bound = capacity_bound(bs);
        assert_eq!(capacity_of(&b.mapped().map), bound);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), file_len(bound));
        assert_eq!(
            b.dirty_extents(),
            vec![3..4],
            "the marks below the bound stay"
        );
        drop(b);
        let b = Bitmap::open(&path, FileId(1), bs, false).unwrap();
        assert_eq!(b.dirty_extents(), vec![3..4]);
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
