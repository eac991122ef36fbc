//! Building one pack: blobs appended as they come, the footer at the end.

use crate::block::BlockHash;
use crate::error::{IoContext, Result};
use crate::proto::object::{BlobKind, PackEntry};

use super::{PACK_BYTES, format};

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A pack ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    /// Random, 16 bytes: its key is [`super::pack_rel`] of it.
    pub id: [u8; 16],
    /// Blobs, footer and trailer.
    pub bytes: Vec<u8>,
    /// What the footer lists.
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// Appends a blob of `kind` whose uncompressed content (`raw` bytes)
    /// hashes to `hash`, stored as `stored`.
    pub fn add(&mut self, hash: BlockHash, kind: BlobKind, stored: &[u8], raw: usize) {
        self.entries.push(PackEntry {
            hash: hash.to_bytes().to_vec(),
            offset: self.bytes.len() as u64,
            stored: stored.len() as u32,
            raw: raw as u32,
            kind: kind as i32,
        });
        self.bytes.extend_from_slice(stored);
    }

    /// Whether the pack has reached [`PACK_BYTES`].
    pub fn is_full(&self) -> bool {
        self.bytes.len() >= PACK_BYTES
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of blobs so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The pack with its footer, under a fresh random id; the builder is
    /// empty again.
    pub fn finish(&mut self) -> Result<FinishedPack> {
        let mut bytes = std::mem::take(&mut self.bytes);
        let entries = std::mem::take(&mut self.entries);
        bytes.extend(format::pack_footer(entries.clone())?);
        Ok(FinishedPack {
            id: crate::sys::random_bytes::<16>().at("/dev/urandom")?,
            bytes,
            entries,
        })
    }
}
