//! The offer manifest of the point being received (`staging/offers`),
//! which is also the log a restarted secondary (even after `kill -9`)
//! resumes the point from, and what a stream that broke before its commit
//! leaves for the next one ([`Carried`]: its content by hash and the point
//! in part, see `session`).
//!
//! Format: a length-delimited `PartialHeader` (point id, epoch), then one
//! length-delimited `StagedBlock` per complete offer, in the primary's
//! order (`spill`). Records are appended as offers complete and synced at
//! checkpoints, after the staging data file; at the commit everything is
//! synced before the redo record. After a crash a record may name data
//! that never reached the disk, or be torn: what is loaded is re-hashed
//! before use and the log ends at the first record that does not check
//! out ([`Carried::from_log`]).
//!
//! Memory does not grow with the point: the log is read and written one
//! record at a time, and the content kept by hash is capped at
//! [`CONTENT_HINTS`] entries.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::spill::{Records, Spill};
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

/// Most entries a [`Content`] map keeps (a few MiB): content by hash is a
/// hint that saves sending a block again, so a hint not kept costs bytes
/// on the wire, never correctness, and memory stays bounded however many
/// blocks a point stages.
pub const CONTENT_HINTS: usize = 1 << 16;

/// Keeps the hint that content of `hash` lies at `at`, unless `content`
/// is full.
pub fn hint(content: &mut Content, hash: BlockHash, at: (u64, u32)) {
    if content.len() < CONTENT_HINTS {
        content.insert(hash, at);
    }
}

/// Where the offers of a point stand: how many are complete (in the
/// primary's order), and what the next one must follow.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Offers complete.
    pub done: u64,
    /// The last of them.
    pub last: Option<Place>,
    /// Files whose offers are over (offers go file by file): one entry
    /// per file of the point, never per offer.
    pub left: HashSet<FileId>,
}

impl Progress {
    /// One more offer complete, at `place`.
    fn advance(&mut self, place: Place) {
        if let Some((file, _)) = self.last.filter(|l| l.0 != place.0) {
            self.left.insert(file);
        }
        self.last = Some(place);
        self.done += 1;
    }
}

/// A point a broken stream staged in part.
#[derive(Debug)]
pub struct PartialPoint {
    /// The point's id.
    pub point: Vec<u8>,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its complete offers.
    pub progress: Progress,
    /// The offers log's length after them.
    pub log_len: u64,
}

/// What streams that broke before their commit staged, for the next one.
#[derive(Debug, Default)]
pub struct Carried {
    /// Their verified content by hash (at most [`CONTENT_HINTS`]).
    pub content: Content,
    /// The point the last one broke in, unless it was refused.
    pub point: Option<PartialPoint>,
}

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.point {
            Some(p) => write!(f, "{} offers of epoch {}", p.progress.done, p.epoch),
            None => write!(f, "{} blocks of content", self.content.len()),
        }
    }
}

impl Carried {
    /// The point a stream of an earlier run of the secondary left in its
    /// log, read one record at a time, each block's staged content re-read
    /// and re-hashed: the log ends at the first that does not match.
    pub fn from_log(paths: &ReplicaPaths, key: &HashKey) -> Option<Carried> {
        let mut records = Records::open(&paths.staged_offers()).ok()?;
        let header: PartialHeader = records.read().ok()??;
        let data = File::open(paths.staged_data()).ok()?;
        let mut carried = Carried::default();
        let mut progress = Progress::default();
        let mut log_len = records.at();
        let mut buf = Vec::new();
        while let Ok(Some(b)) = records.read::<StagedBlock>() {
            if !b.zero {
                buf.resize(b.length as usize, 0);
                let Some(hash) = BlockHash::from_bytes(&b.hash) else {
                    break;
                };
                if data.read_exact_at(&mut buf, b.offset).is_err() || key.hash(&buf) != hash {
                    break;
                }
                hint(&mut carried.content, hash, (b.offset, b.length));
            }
            progress.advance(place_of(&b));
            log_len = records.at();
        }
        carried.point = Some(PartialPoint {
            point: header.point,
            epoch: Epoch(header.epoch),
            progress,
            log_len,
        });
        Some(carried)
    }
}

/// The open offers log of the point being received.
#[derive(Debug)]
pub struct OffersLog {
    spill: Spill,
    progress: Progress,
}

impl OffersLog {
    /// A new log for `point` (replacing any other).
    pub fn start(paths: &ReplicaPaths, point: &[u8], epoch: Epoch) -> Result<OffersLog> {
        let mut spill = Spill::create(&paths.staged_offers())?;
        spill.push(&PartialHeader {
            point: point.to_vec(),
            epoch: epoch.0,
        })?;
        Ok(OffersLog {
            spill,
            progress: Progress::default(),
        })
    }

    /// The log of a point resumed (anything after its complete offers is
    /// cut off).
    pub fn resume(paths: &ReplicaPaths, p: PartialPoint) -> Result<OffersLog> {
        Ok(OffersLog {
            spill: Spill::reopen(&paths.staged_offers(), p.log_len)?,
            progress: p.progress,
        })
    }

    /// Where the offers stand.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Records the next complete offer.
    pub fn push(&mut self, block: &StagedBlock) -> Result<()> {
        self.spill.push(block)?;
        self.progress.advance(place_of(block));
        Ok(())
    }

    /// Writes out every offer pushed (not synced: a restart re-hashes
    /// what the log names).
    pub fn flush(&mut self) -> Result<()> {
        self.spill.flush()
    }

    /// What a broken stream leaves of the point: its complete offers,
    /// written out (not synced: a restart re-hashes what it loads).
    pub fn into_partial(mut self, point: Vec<u8>, epoch: Epoch) -> Result<PartialPoint> {
        self.spill.flush()?;
        Ok(PartialPoint {
            point,
            epoch,
            log_len: self.spill.written(),
            progress: self.progress,
        })
    }
}

/// Stages the content of the offers logged for a point applied in place
/// (read back from the replica by `read`) before it is rolled back, so
/// that the next stream resumes it as if it had been staged: a new data
/// file and log replace the staging's, ending at the first block whose
/// content is not there or does not hash as offered. No log, nothing to
/// stage.
pub fn stage_written(
    paths: &ReplicaPaths,
    key: &HashKey,
    mut read: impl FnMut(&StagedBlock) -> Option<Vec<u8>>,
) -> Result<()> {
    let Ok((header, mut records)) = read_offers(paths) else {
        return Ok(());
    };
    let (data_path, log_path) = (
        paths.staging().join("data.new"),
        paths.staging().join("offers.new"),
    );
    let staged = (|| {
        let mut data = Spill::create(&data_path)?;
        let mut log = Spill::create(&log_path)?;
        log.push(&header)?;
        while let Ok(Some(mut b)) = records.read::<StagedBlock>() {
            if !b.zero {
                let Some(hash) = BlockHash::from_bytes(&b.hash) else {
                    break;
                };
                let Some(content) = read(&b).filter(|c| key.hash(c) == hash) else {
                    break;
                };
                b.offset = data.append(&content)?;
            }
            log.push(&b)?;
        }
        data.flush()?;
        log.flush()?;
        std::fs::rename(&data_path, paths.staged_data()).at(&data_path)?;
        std::fs::rename(&log_path, paths.staged_offers()).at(&log_path)
    })();
    if staged.is_err() {
        let _ = std::fs::remove_file(&data_path);
        let _ = std::fs::remove_file(&log_path);
    }
    staged
}

/// The offers of the staged point at `paths`: the log's header (checked
/// against `epoch` by the caller) and its records, read one at a time.
pub fn read_offers(paths: &ReplicaPaths) -> Result<(PartialHeader, Records)> {
    let path = paths.staged_offers();
    let mut records = Records::open(&path)?;
    let header = records
        .read()?
        .ok_or_else(|| super::records::bad(&path, "an offers log without its header"))?;
    Ok((header, records))
}
