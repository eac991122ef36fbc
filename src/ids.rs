//! Newtypes for the ids and units that cross module boundaries, so a block
//! number is never passed where a file id is expected.

use std::fmt;

/// Stable id of a tracked regular file; survives renames and restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub u64);

/// Index of a block within a file (offset / block size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockNo(pub u64);

/// A replication epoch: the unit of crash-consistent shipping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// Tracking granularity in bytes; a power of two between 4 KiB and 1 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize(u32);

impl BlockSize {
    /// The default: large enough to keep bitmaps and hash lists small,
    /// small enough that a 4 KiB guest write ships little extra.
    pub const DEFAULT: BlockSize = BlockSize(64 * 1024);

    /// Validates a size; `None` when it is not a power of two in range.
    pub fn new(bytes: u64) -> Option<BlockSize> {
        let ok = bytes.is_power_of_two() && (4096..=1024 * 1024).contains(&bytes);
        ok.then_some(BlockSize(bytes as u32))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// The block holding byte `offset`.
    pub fn block_of(self, offset: u64) -> BlockNo {
        BlockNo(offset / self.bytes())
    }

    /// The blocks touched by `len` bytes at `offset` (empty when `len` is 0).
    pub fn blocks_of(self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.bytes();
        let last = (offset.saturating_add(len) - 1) / self.bytes();
        first..last + 1
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes();
        if b % (1024 * 1024) == 0 {
            write!(f, "{}M", b / (1024 * 1024))
        } else {
            write!(f, "{}K", b / 1024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_accepts_only_powers_of_two_in_range() {
        assert!(BlockSize::new(4096).is_some());
        assert!(BlockSize::new(1 << 20).is_some());
        assert!(BlockSize::new(2048).is_none());
        assert!(BlockSize::new(2 << 20).is_none());
        assert!(BlockSize::new(65536 + 4096).is_none());
    }

    #[test]
    fn blocks_of_covers_partial_blocks_at_both_ends() {
        let bs = BlockSize::new(65536).unwrap();
        assert_eq!(bs.blocks_of(0, 0), 0..0);
        assert_eq!(bs.blocks_of(0, 1), 0..1);
        assert_eq!(bs.blocks_of(65535, 2), 0..2);
        assert_eq!(bs.blocks_of(65536, 65536), 1..2);
        assert_eq!(bs.blocks_of(100, 200_000), 0..4);
    }
}
