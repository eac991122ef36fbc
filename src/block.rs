//! Block content: keyed hashing, zero detection, and bounded zstd.
//!
//! Hashes are xxh3-128 with a 192-byte secret that belongs to one
//! replication pair: a guest that can choose its disk content still cannot
//! predict hashes, so it cannot craft a collision that would make the
//! secondary reuse the wrong content (and the secondary verifies content
//! before reusing it anyway). Decompression is bounded by the block size,
//! so a forged frame cannot make the secondary allocate more.
//!
//! Compression that pays: a block is first probed (a [`PROBE_BYTES`]
//! sample compressed at [`PROBE_LEVEL`]); when the sample does not shrink
//! by [`PROBE_MIN_SAVING`], the block travels as a zstd frame of raw blocks
//! written here (RFC 8878, section 3.1.1), so random or already compressed
//! data costs a copy instead of a failed compression, and the secondary's
//! decoder (plain zstd) stays as it is.

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
    with_compressor(&COMPRESSOR, level, |c| c.compress(data))
}

/// Bytes of a block the probe compresses: four stripes of a quarter each,
/// spread over the block, so a block whose head differs from its body is
/// judged by both.
pub const PROBE_BYTES: usize = 4096;
/// The probe's zstd level: the fastest that still finds literal entropy
/// and short matches.
pub const PROBE_LEVEL: i32 = -1;
/// Share of the sample (in 1/1000) the probe must save for the block to be
/// compressed; below it the block is sent raw. Random and already
/// compressed data saves nothing (zstd's frame makes it grow).
pub const PROBE_MIN_SAVING: usize = 30;

/// A block as it travels: a zstd frame, and whether the probe found it
/// incompressible (the frame then holds it raw).
#[derive(Debug)]
pub struct Packed {
    /// A zstd frame of the block.
    pub frame: Vec<u8>,
    /// The frame is raw blocks: compression was skipped.
    pub raw: bool,
}

/// Compresses a block at `level` unless the probe says it does not
/// compress; then a raw frame, which any zstd decoder reads.
pub fn pack(data: &[u8], level: i32) -> std::io::Result<Packed> {
    if !compressible(data)? {
        return Ok(Packed {
            frame: raw_frame(data),
            raw: true,
        });
    }
    Ok(Packed {
        frame: compress(data, level)?,
        raw: false,
    })
}

/// Whether a sample of `data` shrinks by [`PROBE_MIN_SAVING`] at
/// [`PROBE_LEVEL`]. Blocks not much larger than the sample are always
/// compressed: the probe would cost as much as the compression.
fn compressible(data: &[u8]) -> std::io::Result<bool> {
    if data.len() < 4 * PROBE_BYTES {
        return Ok(true);
    }
    let stripe = PROBE_BYTES / 4;
    let step = data.len() / 4;
    let mut sample = [0u8; PROBE_BYTES];
    for (i, part) in sample.chunks_mut(stripe).enumerate() {
        part.copy_from_slice(&data[i * step..i * step + stripe]);
    }
    let packed = with_compressor(&PROBE, PROBE_LEVEL, |c| c.compress(&sample))?;
    Ok(packed.len() * 1000 <= PROBE_BYTES * (1000 - PROBE_MIN_SAVING))
}

/// Magic number that starts a zstd frame (RFC 8878, 3.1.1).
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Largest block of a zstd frame (RFC 8878, 3.1.1.2.4: Block_Maximum_Size).
const ZSTD_BLOCK_MAX: usize = 128 * 1024;

/// `data` as a zstd frame of raw blocks (RFC 8878): single segment, the
/// content size in the header (the secondary bounds decompression by it),
/// no checksum (the secondary checks the keyed hash), blocks of at most
/// 128 KiB, each a 3-byte header (last flag, type 0 = raw, size) and the
/// bytes as they are.
pub fn raw_frame(data: &[u8]) -> Vec<u8> {
    let n = data.len();
    let mut frame = Vec::with_capacity(n + 18 + 3 * (n / ZSTD_BLOCK_MAX));
    frame.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame_Header_Descriptor: Frame_Content_Size_flag in bits 7-6,
    // Single_Segment_flag in bit 5, no checksum, no dictionary. With a
    // single segment, flag 0 is a 1-byte size, 1 a 2-byte size less 256,
    // 2 a 4-byte size, 3 an 8-byte size.
    let single = 1 << 5;
    if n < 256 {
        frame.extend_from_slice(&[single, n as u8]);
    } else if n < 256 + 65536 {
        frame.push((1 << 6) | single);
        frame.extend_from_slice(&((n - 256) as u16).to_le_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        frame.push((2 << 6) | single);
        frame.extend_from_slice(&n.to_le_bytes());
    } else {
        frame.push((3 << 6) | single);
        frame.extend_from_slice(&(n as u64).to_le_bytes());
    }
    let mut blocks = data.chunks(ZSTD_BLOCK_MAX).peekable();
    if blocks.peek().is_none() {
        // An empty frame is one empty last block.
        frame.extend_from_slice(&[1, 0, 0]);
    }
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // Block_Header: Last_Block in bit 0, Block_Type (0: raw) in bits
        // 1-2, Block_Size in bits 3-23, little-endian.
        let header = ((block.len() as u32) << 3) | last;
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.extend_from_slice(block);
    }
    frame
}

/// Runs `f` with this thread's compressor of `cell` at `level`, made (or
/// remade for another level) on first use.
fn with_compressor<T>(
    cell: &'static std::thread::LocalKey<RefCell<Option<(i32, Compressor)>>>,
    level: i32,
    f: impl FnOnce(&mut Compressor) -> std::io::Result<T>,
) -> std::io::Result<T> {
    cell.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, Compressor::new(level)?));
        }
        let (_, compressor) = cell.as_mut().expect("made above");
        f(compressor)
    })
}

type Compressor = zstd::bulk::Compressor<'static>;

thread_local! {
    /// One zstd context per thread, reused: making one per 64 KiB block
    /// cost a measurable share of the CPU (ZSTD_createDCtx was 3.4% of the
    /// secondary's profile).
    static COMPRESSOR: RefCell<Option<(i32, Compressor)>> = const { RefCell::new(None) };
    /// The probe's own context, so probing does not remake the block
    /// compressor for another level.
    static PROBE: RefCell<Option<(i32, Compressor)>> = const { RefCell::new(None) };
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

    /// Bytes no compressor shrinks (xorshift).
    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn raw_frames_are_read_by_zstd_at_every_size_class() {
        // Each Frame_Content_Size width, its edges, and several blocks.
        for n in [
            0, 1, 255, 256, 65535, 65536, 65791, 65792, 131072, 131073, 300_000,
        ] {
            let data = noise(n, n as u64 + 1);
            let frame = raw_frame(&data);
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame).ok(),
                Some(Some(n as u64)),
                "content size of a raw frame of {n} bytes"
            );
            assert_eq!(decompress(&frame, n).unwrap(), data, "{n} bytes");
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), data);
            if n > 0 {
                assert!(matches!(
                    decompress(&frame, n - 1),
                    Err(BlockError::TooLarge { .. })
                ));
            }
        }
    }

    #[test]
    fn the_probe_sends_noise_raw_and_compresses_the_rest() {
        let random = noise(65536, 7);
        let p = pack(&random, 1).unwrap();
        assert!(p.raw, "random data is sent raw");
        // Magic, descriptor, a 2-byte content size, one block header.
        assert_eq!(p.frame.len(), 65536 + 4 + 1 + 2 + 3);
        assert_eq!(decompress(&p.frame, 65536).unwrap(), random);

        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"the quick brown fox jumps over the lazy dog "[i as usize % 44])
            .collect();
        let p = pack(&text, 1).unwrap();
        assert!(!p.raw, "text is compressed");
        assert!(p.frame.len() < 4096);
        assert_eq!(decompress(&p.frame, 65536).unwrap(), text);

        // A block half random, half text is judged by its stripes: it
        // compresses, so it is compressed.
        let mixed = [&random[..32768], &text[..32768]].concat();
        assert!(!pack(&mixed, 1).unwrap().raw);
        // Small blocks are not probed.
        assert!(!pack(&random[..4096], 1).unwrap().raw);
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
