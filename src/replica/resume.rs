//! What a stream that broke before its commit leaves for the next one
//! ([`Carried`]: its content by hash and the point in part, see `session`),
//! and the on-disk log of a point being received (`staging/partial`), so
//! that a secondary restarted (even by `kill -9`) in the middle of a long
//! point resumes it instead of asking for it all again.
//!
//! Format: a length-delimited `PartialHeader` (point id, epoch), then one
//! length-delimited `StagedBlock` per complete offer, in the primary's
//! order. Records are appended at checkpoints, after the staging data file
//! was synced, and synced themselves: every record names data that is on
//! disk. A torn last record (a crash mid-append) ends the log; what is
//! loaded is re-hashed before use ([`Carried::from_log`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use prost::Message;

use crate::block::{BlockHash, HashKey};
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::proto::replica::{PartialHeader, StagedBlock};
use crate::state::ReplicaPaths;

/// Where an offer's block goes: (file id, block), the key of every offer.
pub type Place = (FileId, BlockNo);

/// The place of a staged block.
pub fn place_of(b: &StagedBlock) -> Place {
    (FileId(b.file_id), BlockNo(b.block))
}

/// Content in the staging data file by hash: (offset, length).
pub type Content = HashMap<BlockHash, (u64, u32)>;

/// A point a broken stream staged in part.
#[derive(Debug)]
pub struct PartialPoint {
    /// The point's id.
    pub point: Vec<u8>,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its offers in the primary's order, each complete.
    pub offers: Vec<Place>,
    /// Their staged blocks.
    pub blocks: Vec<StagedBlock>,
    /// How many of the offers the on-disk log holds, and its length after
    /// them; `None` when there is no log.
    pub logged: Option<(usize, u64)>,
}

/// What streams that broke before their commit staged, for the next one.
#[derive(Debug, Default)]
pub struct Carried {
    /// Their verified content by hash.
    pub content: Content,
    /// The point the last one broke in, unless it was refused.
    pub point: Option<PartialPoint>,
}

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.point {
            Some(p) => write!(f, "{} offers of epoch {}", p.offers.len(), p.epoch),
            None => write!(f, "{} blocks of content", self.content.len()),
        }
    }
}

impl Carried {
    /// The point a stream of an earlier run of the secondary left in its
    /// log, each block's staged content re-read and re-hashed: the log
    /// ends at the first that does not match.
    pub fn from_log(paths: &ReplicaPaths, key: &HashKey) -> Option<Carried> {
        let loaded = load(paths)?;
        let data = File::open(paths.staged_data()).ok()?;
        let mut carried = Carried::default();
        let mut blocks = Vec::new();
        let mut len = loaded.header_len;
        for (b, end) in loaded.blocks {
            if !b.zero {
                let mut buf = vec![0u8; b.length as usize];
                let hash = BlockHash::from_bytes(&b.hash)?;
                if data.read_exact_at(&mut buf, b.offset).is_err() || key.hash(&buf) != hash {
                    break;
                }
                carried.content.insert(hash, (b.offset, b.length));
            }
            blocks.push(b);
            len = end;
        }
        carried.point = Some(PartialPoint {
            point: loaded.point,
            epoch: loaded.epoch,
            offers: blocks.iter().map(place_of).collect(),
            logged: Some((blocks.len(), len)),
            blocks,
        });
        Some(carried)
    }
}

/// An open log, appended to at checkpoints.
#[derive(Debug)]
pub struct PartialLog {
    path: PathBuf,
    file: File,
    /// Offers recorded so far.
    logged: usize,
    /// The log's length after them.
    len: u64,
}

impl PartialLog {
    /// A new log for `point` (replacing any other).
    pub fn start(paths: &ReplicaPaths, point: &[u8], epoch: Epoch) -> Result<PartialLog> {
        let path = paths.partial();
        let mut file = crate::state::state_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .at(&path)?;
        let header = PartialHeader {
            point: point.to_vec(),
            epoch: epoch.0,
        };
        let bytes = header.encode_length_delimited_to_vec();
        file.write_all(&bytes).at(&path)?;
        Ok(PartialLog {
            path,
            file,
            logged: 0,
            len: bytes.len() as u64,
        })
    }

    /// The log of a point resumed: `logged` offers in its first `len`
    /// bytes (anything after them is cut off).
    pub fn resume(paths: &ReplicaPaths, logged: usize, len: u64) -> Result<PartialLog> {
        let path = paths.partial();
        let file = OpenOptions::new().append(true).open(&path).at(&path)?;
        file.set_len(len).at(&path)?;
        Ok(PartialLog {
            path,
            file,
            logged,
            len,
        })
    }

    /// Offers recorded so far, and the log's length after them.
    pub fn logged(&self) -> (usize, u64) {
        (self.logged, self.len)
    }

    /// Stops logging: the log is removed, so that no restart trusts a log
    /// that misses what was staged since.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Records `blocks` (the next complete offers) durably.
    pub fn append(&mut self, blocks: &[&StagedBlock]) -> Result<()> {
        let mut bytes = Vec::new();
        for b in blocks {
            b.encode_length_delimited(&mut bytes)
                .expect("a Vec grows as needed");
        }
        self.file
            .write_all(&bytes)
            .and_then(|_| self.file.sync_data())
            .at(&self.path)?;
        self.logged += blocks.len();
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// What a log holds (up to a torn last record); `None` without a
/// readable header.
#[derive(Debug)]
pub struct Loaded {
    /// The point's id and epoch.
    pub point: Vec<u8>,
    /// Its epoch.
    pub epoch: Epoch,
    /// The length of the header.
    pub header_len: u64,
    /// Each complete offer's block, with the log's length after it.
    pub blocks: Vec<(StagedBlock, u64)>,
}

/// Reads the log of the replica at `paths`.
pub fn load(paths: &ReplicaPaths) -> Option<Loaded> {
    let bytes = std::fs::read(paths.partial()).ok()?;
    let mut rest = bytes.as_slice();
    let header = PartialHeader::decode_length_delimited(&mut rest).ok()?;
    let at = |rest: &[u8]| (bytes.len() - rest.len()) as u64;
    let header_len = at(rest);
    let mut blocks = Vec::new();
    while !rest.is_empty() {
        match StagedBlock::decode_length_delimited(&mut rest) {
            Ok(b) => blocks.push((b, at(rest))),
            Err(_) => break,
        }
    }
    Some(Loaded {
        point: header.point,
        epoch: Epoch(header.epoch),
        header_len,
        blocks,
    })
}
