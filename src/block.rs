//! Block content: keyed hashing, zero detection, and bounded zstd.
//!
//! Hashes are xxh3-128 with a 192-byte secret that belongs to one
//! replication pair: a guest that can choose its disk content still cannot
//! predict hashes, so it cannot craft a collision that would make the
//! secondary reuse the wrong content (and the secondary verifies content
//! before reusing it anyway). Decompression is bounded by the block size,
//! so a forged frame cannot make the secondary allocate more.

use std::cell::RefCell;
use std::fmt;

use xxhash_rust::xxh3::xxh3_128_with_secret;

/// Length of a pair's hash secret.
pub const SECRET_LEN: usize = 192;

/// The per-pair hash key.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey([u8; SECRET_LEN]);

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    /// A key from its bytes; `None` unless exactly [`SECRET_LEN`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<HashKey> {
        bytes.try_into().ok().map(HashKey)
    }

    /// A fresh random key.
    pub fn random() -> std::io::Result<HashKey> {
        crate::sys::random_bytes().map(HashKey)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The keyed hash of a block.
    pub fn hash(&self, data: &[u8]) -> BlockHash {
        BlockHash(xxh3_128_with_secret(data, &self.0))
    }
}

/// A keyed xxh3-128 hash of one block's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl BlockHash {
    /// Big-endian bytes, as sent on the wire and kept in the index.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// From wire bytes; `None` unless exactly 16.
    pub fn from_bytes(bytes: &[u8]) -> Option<BlockHash> {
        bytes
            .try_into()
            .ok()
            .map(|b| BlockHash(u128::from_be_bytes(b)))
    }
}

/// Whether a block is all zeros (shipped as a marker, kept as a hole).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to splits safely.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Why a compressed block was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The frame claims (or turns out) to hold more than a block.
    #[error("compressed block expands beyond {limit} bytes")]
    TooLarge {
        /// The limit: the block size.
        limit: usize,
    },
    /// zstd could not decode it.
    #[error("corrupt compressed block: {0}")]
    Corrupt(String),
}

/// Compresses a block at `level`.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, compressor) = cell.as_mut().expect("made above");
        compressor.compress(data)
    })
}

thread_local! {
    /// One zstd context per thread, reused: making one per 64 KiB block
    /// cost a measurable share of the CPU (ZSTD_createDCtx was 3.4% of the
    /// secondary's profile).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Decompresses a block that must expand to at most `limit` bytes.
pub fn decompress(frame: &[u8], limit: usize) -> Result<Vec<u8>, BlockError> {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n > limit as u64 => return Err(BlockError::TooLarge { limit }),
        Err(_) => return Err(BlockError::Corrupt("unreadable frame header".into())),
        _ => {}
    }
    // A slice (not a Vec's spare capacity) lets zstd fill exactly `limit`.
    let mut out = vec![0u8; limit];
    let n = DECOMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(zstd::bulk::Decompressor::new()?);
            }
            let decompressor = cell.as_mut().expect("made above");
            decompressor.decompress_to_buffer(frame, &mut out[..])
        })
        .map_err(|e| {
            if e.to_string().contains("too small") {
                BlockError::TooLarge { limit }
            } else {
                BlockError::Corrupt(e.to_string())
            }
        })?;
    out.truncate(n);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_depend_on_the_pair_key() {
        let a = HashKey::random().unwrap();
        let b = HashKey::random().unwrap();
        let data = vec![7u8; 65536];
        assert_eq!(a.hash(&data), a.hash(&data));
        assert_ne!(a.hash(&data), b.hash(&data));
        assert_eq!(
            BlockHash::from_bytes(&a.hash(&data).to_bytes()),
            Some(a.hash(&data))
        );
    }

    #[test]
    fn zero_detection_sees_a_single_byte() {
        let mut data = vec![0u8; 65536 + 3];
        assert!(is_zero(&data[1..]));
        data[65536 + 2] = 1;
        assert!(!is_zero(&data[1..]));
    }

    #[test]
    fn decompression_is_bounded() {
        let data = vec![0u8; 1 << 20];
        let frame = compress(&data, 1).unwrap();
        assert!(matches!(
            decompress(&frame, 65536),
            Err(BlockError::TooLarge { .. })
        ));
        assert_eq!(decompress(&frame, 1 << 20).unwrap(), data);
        assert!(matches!(
            decompress(b"not zstd at all", 65536),
            Err(BlockError::Corrupt(_))
        ));
    }
}
