//! One Ship stream at the secondary: checks every message against what
//! came before and the limits, stages the epoch's blocks, and hands the
//! complete epoch to the store. Anything malformed ends the stream with a
//! message naming what is wrong; nothing reaches the replica before the
//! commit, so the replica stays at its last consistent point.
//!
//! Resuming: a stream that breaks before its commit leaves what it staged
//! behind (`Carried`), so a reconnect loop always moves forward even when
//! the connection breaks faster than a whole point ships:
//! - the point itself, up to the first offer whose block has not arrived:
//!   a stream of the same point (same point id: the primary retries a
//!   point unchanged) starts there, and Begin's answer says where. It is
//!   also logged to disk every `CHECKPOINT_BYTES` (`resume`), so a
//!   restart of the secondary resumes it too. A refused stream keeps no
//!   point (a primary never resends a refused one);
//! - its content by hash: a stream of another point (the primary folded
//!   the old one into a newer cut) fills offers of the same content from it
//!   instead of asking again. Like the content index these are hints, each
//!   re-read and re-hashed before use.
//!
//! The staging data file only grows while content is carried; once it is
//! larger than the files of a new point (mostly content rewritten since),
//! it is started afresh, so staging never needs more than twice the size
//! of the point's files.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::preflight;
use super::refused::Refused;
use super::resume::{Carried, Content, PartialLog, PartialPoint, Place, place_of};
use super::store::{ReplicaCounts, ReplicaStore};
use crate::block::{self, BlockHash, HashKey};
use crate::error::IoContext;
use crate::ids::{BlockNo, Epoch, FileId};
use crate::proto::replica::{StagedBlock, StagedEpoch};
use crate::proto::replication::{Applied, Begin, Blocks, Commit, Offer, Offers, Resumed, Wants};
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_OFFERS};

/// Staged bytes between two checkpoints of the point's log (every message
/// in unit tests, so that the fuzz suite exercises the log too).
const CHECKPOINT_BYTES: u64 = if cfg!(test) { 1 } else { 32 * 1024 * 1024 };

/// Blocks awaiting data: place → (hash, length).
type Pending = HashMap<Place, (BlockHash, u32)>;

/// The place an offer or a block names.
fn place(file_id: u64, block: u64) -> Place {
    (FileId(file_id), BlockNo(block))
}

/// The state of one epoch being received.
#[derive(Debug)]
pub struct Session<'a> {
    store: &'a ReplicaStore,
    /// When the stream started and the store's counters then, for the
    /// point's log line.
    opened: (Instant, ReplicaCounts),
    key: HashKey,
    block_size: u64,
    begin: Option<Begin>,
    sizes: HashMap<FileId, u64>,
    data_path: PathBuf,
    data: File,
    data_len: u64,
    blocks: Vec<StagedBlock>,
    pending: Pending,
    /// Content staged in this epoch by hash, so a repeated block is
    /// staged once.
    staged: Content,
    /// Content staged by earlier streams that broke, not yet used here.
    carried: Content,
    /// The point an earlier stream broke in, until Begin says whether
    /// this stream ships the same one.
    partial: Option<PartialPoint>,
    /// Every offer in the primary's order: a stream that breaks resumes
    /// at the first whose block has not arrived.
    offer_log: Vec<Place>,
    /// Where in `blocks` each offer's block is (with `pending`, every
    /// offer made).
    block_at: HashMap<Place, usize>,
    /// The point's on-disk log, and the staged bytes since its last
    /// checkpoint.
    log: Option<PartialLog>,
    unlogged_bytes: u64,
    /// Set once the epoch is applied: nothing is left to carry.
    committed: bool,
    /// Set when the stream was refused: no point is kept for resuming.
    refused: bool,
}

impl<'a> Session<'a> {
    /// A session for the paired primary; refused before any hello.
    pub fn new(store: &'a ReplicaStore) -> Result<Session<'a>, Refused> {
        let Some(pair) = store.pair() else {
            return Err(Refused::NotPaired);
        };
        // An apply that failed earlier is finished before anything else.
        store.finish_pending()?;
        let Carried {
            content: carried,
            point: partial,
        } = store.take_carried().unwrap_or_default();
        let data_path = store.paths.staged_data();
        let staging_error = |e| Refused::staging(&data_path, e);
        let data = crate::state::state_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(carried.is_empty() && partial.is_none())
            .open(&data_path)
            .map_err(staging_error)?;
        let data_len = data.metadata().map_err(staging_error)?.len();
        if !carried.is_empty() {
            log::info!(
                "resuming: {} blocks ({data_len} bytes) staged by streams that broke are kept",
                carried.len()
            );
        }
        Ok(Session {
            store,
            opened: (Instant::now(), store.stats.counts()),
            key: pair.key,
            block_size: u64::from(pair.block_size),
            begin: None,
            sizes: HashMap::new(),
            data_path,
            data,
            data_len,
            blocks: Vec::new(),
            pending: HashMap::new(),
            staged: HashMap::new(),
            carried,
            partial,
            offer_log: Vec::new(),
            block_at: HashMap::new(),
            log: None,
            unlogged_bytes: 0,
            committed: false,
            refused: false,
        })
    }

    /// Refuses a Begin that does not follow the applied point, exceeds
    /// the limits, or cannot be applied here; records its file sizes.
    fn check_begin(&mut self, begin: &Begin) -> Result<(), Refused> {
        if self.begin.is_some() {
            return Err(Refused::SecondBegin);
        }
        if begin.point.len() != 16 {
            return Err(Refused::PointId(begin.point.len()));
        }
        let applied = self.store.applied().epoch.0;
        if begin.base_epoch != applied {
            return Err(Refused::WrongBase {
                epoch: begin.epoch,
                base: begin.base_epoch,
                applied,
            });
        }
        if begin.epoch <= applied {
            return Err(Refused::NotNewer {
                epoch: begin.epoch,
                applied,
            });
        }
        if begin.ops.len() > MAX_ENTRIES || begin.files.len() > MAX_ENTRIES {
            return Err(Refused::TooManyEntries {
                epoch: begin.epoch,
                ops: begin.ops.len(),
                files: begin.files.len(),
            });
        }
        preflight::check(&self.store.root, begin)?;
        for f in &begin.files {
            if self.sizes.insert(FileId(f.file_id), f.size).is_some() {
                return Err(Refused::FileTwice(f.file_id));
            }
        }
        Ok(())
    }

    /// The start of an epoch: operations and file states. The answer says
    /// how many of its offers an earlier, broken stream of the same point
    /// left complete.
    pub fn begin(&mut self, begin: Begin) -> Result<Resumed, Refused> {
        self.check_begin(&begin)?;
        let epoch = Epoch(begin.epoch);
        let partial = self.partial.take();
        if let Some(p) = partial.filter(|p| p.point == begin.point && p.epoch == epoch) {
            let offers_done = self.resume_point(p, epoch);
            self.begin = Some(begin);
            return Ok(Resumed { offers_done });
        }
        let point_bytes = self.sizes.values().fold(0u64, |a, s| a.saturating_add(*s));
        if self.data_len > point_bytes {
            log::info!(
                "staging afresh: {} bytes carried from broken streams exceed the {point_bytes} bytes \
                 of this point's files",
                self.data_len
            );
            self.carried.clear();
            self.data
                .set_len(0)
                .map_err(|e| Refused::staging(&self.data_path, e))?;
            self.data_len = 0;
        }
        self.log = PartialLog::start(&self.store.paths, &begin.point, epoch)
            .inspect_err(|e| log::warn!("not logging epoch {epoch}: {e}"))
            .ok();
        self.begin = Some(begin);
        Ok(Resumed { offers_done: 0 })
    }

    /// Takes up the point an earlier, broken stream of the same point left:
    /// its complete offers and their blocks, and its log; returns how many
    /// offers are done.
    fn resume_point(&mut self, p: PartialPoint, epoch: Epoch) -> u64 {
        log::info!(
            "epoch {epoch}: resuming after {} offers a broken stream left complete",
            p.offers.len()
        );
        self.offer_log = p.offers;
        self.blocks = p.blocks;
        self.block_at = (self.blocks.iter().enumerate())
            .map(|(i, b)| (place_of(b), i))
            .collect();
        self.log = match p.logged {
            Some((logged, len)) => PartialLog::resume(&self.store.paths, logged, len)
                .inspect_err(|e| log::warn!("not logging epoch {epoch}: {e}"))
                .ok(),
            None => None,
        };
        if self.log.is_none() {
            let _ = fs::remove_file(self.store.paths.partial());
        }
        let offers_done = self.offer_log.len() as u64;
        self.store
            .stats
            .blocks_resumed
            .fetch_add(offers_done, Ordering::Relaxed);
        offers_done
    }

    /// Content for `hash` that an earlier, broken stream staged, checked
    /// again; its place in the data file.
    fn resume(&mut self, hash: BlockHash, length: u32) -> Option<(u64, u32)> {
        let (offset, len) = self.carried.remove(&hash)?;
        let mut buf = vec![0u8; len as usize];
        if len != length
            || self.data.read_exact_at(&mut buf, offset).is_err()
            || self.key.hash(&buf) != hash
        {
            return None;
        }
        self.staged.insert(hash, (offset, len));
        Some((offset, len))
    }

    fn append(&mut self, data: &[u8]) -> Result<u64, Refused> {
        let at = self.data_len;
        self.data
            .write_all_at(data, at)
            .map_err(|e| Refused::staging(&self.data_path, e))?;
        self.data_len += data.len() as u64;
        self.unlogged_bytes += data.len() as u64;
        Ok(at)
    }

    fn push_block(&mut self, block: StagedBlock) {
        self.block_at.insert(place_of(&block), self.blocks.len());
        self.blocks.push(block);
    }

    /// How many offers, in order, have their block staged (a block whose
    /// staging failed, on a full disk, is no longer pending but not staged
    /// either).
    fn complete(&self) -> usize {
        self.offer_log
            .iter()
            .position(|o| self.pending.contains_key(o) || !self.block_at.contains_key(o))
            .unwrap_or(self.offer_log.len())
    }

    /// Every `CHECKPOINT_BYTES` staged: syncs the data file and logs the
    /// offers completed since the last checkpoint. A failure stops the
    /// logging (a restart then starts the point afresh), not the stream.
    fn checkpoint(&mut self) {
        if self.unlogged_bytes < CHECKPOINT_BYTES {
            return;
        }
        self.unlogged_bytes = 0;
        let complete = self.complete();
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let newly: Vec<&StagedBlock> = self.offer_log[log.logged().0.min(complete)..complete]
            .iter()
            .filter_map(|o| self.block_at.get(o).map(|&i| &self.blocks[i]))
            .collect();
        let logged = self
            .data
            .sync_data()
            .at(&self.data_path)
            .and_then(|_| log.append(&newly));
        if let Err(e) = logged {
            log::warn!("logging the point being received: {e}");
            if let Some(log) = self.log.take() {
                log.abandon();
            }
        }
    }

    /// Stages `data` (once per hash) for block `block` of file `file_id`.
    fn stage(
        &mut self,
        file_id: u64,
        block: u64,
        hash: BlockHash,
        data: &[u8],
    ) -> Result<(), Refused> {
        let (offset, length) = match self.staged.get(&hash) {
            Some(&at) => at,
            None => {
                let at = (self.append(data)?, data.len() as u32);
                self.staged.insert(hash, at);
                at
            }
        };
        self.push_block(StagedBlock {
            file_id,
            block,
            zero: false,
            offset,
            length,
            hash: hash.to_bytes().to_vec(),
        });
        Ok(())
    }

    /// Refuses an offer for a file not in the epoch, past its end, of the
    /// wrong length, or made before; its place otherwise.
    fn check_offer(&self, o: &Offer) -> Result<Place, Refused> {
        let (file, block) = (o.file_id, o.block);
        let Some(&size) = self.sizes.get(&FileId(file)) else {
            return Err(Refused::NotInEpoch(file));
        };
        let start = block.checked_mul(self.block_size).filter(|s| *s < size);
        let Some(start) = start else {
            return Err(Refused::BeyondSize { block, file, size });
        };
        let expected = (size - start).min(self.block_size) as u32;
        if o.length != expected {
            return Err(Refused::WrongLength {
                block,
                file,
                length: o.length,
                expected,
            });
        }
        // An offer already made has its block, or waits for it.
        let key = place(file, block);
        if self.block_at.contains_key(&key) || self.pending.contains_key(&key) {
            return Err(Refused::OfferedTwice { block, file });
        }
        Ok(key)
    }

    /// Where content of `hash` already staged in this epoch, or carried
    /// from a broken stream, lies in the data file.
    fn staged_content(&mut self, hash: BlockHash, length: u32) -> Option<(u64, u32)> {
        match self.staged.get(&hash) {
            Some(&(offset, len)) if len == length => Some((offset, len)),
            Some(_) => None,
            None => self.resume(hash, length).inspect(|_| {
                self.store
                    .stats
                    .blocks_resumed
                    .fetch_add(1, Ordering::Relaxed);
            }),
        }
    }

    /// Hash offers: answers which blocks must be sent.
    pub fn offers(&mut self, offers: Offers) -> Result<Wants, Refused> {
        if self.begin.is_none() {
            return Err(Refused::OffersBeforeBegin);
        }
        if offers.offers.len() > MAX_OFFERS {
            return Err(Refused::TooManyOffers(offers.offers.len()));
        }
        let mut wants = Vec::new();
        for (i, o) in offers.offers.into_iter().enumerate() {
            if self.offer(o)? {
                wants.push(i as u32);
            }
        }
        self.checkpoint();
        Ok(Wants { positions: wants })
    }

    /// One offer: staged from content at hand, or (`true`) wanted.
    fn offer(&mut self, o: Offer) -> Result<bool, Refused> {
        let key = self.check_offer(&o)?;
        self.offer_log.push(key);
        if o.zero {
            self.push_block(StagedBlock {
                file_id: o.file_id,
                block: o.block,
                zero: true,
                offset: 0,
                length: o.length,
                hash: Vec::new(),
            });
            return Ok(false);
        }
        let Some(hash) = BlockHash::from_bytes(&o.hash) else {
            return Err(Refused::HashLength {
                block: o.block,
                file: o.file_id,
                len: o.hash.len(),
            });
        };
        if let Some((offset, length)) = self.staged_content(hash, o.length) {
            self.push_block(StagedBlock {
                file_id: o.file_id,
                block: o.block,
                zero: false,
                offset,
                length,
                hash: o.hash,
            });
            self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let held = self
            .store
            .find(&self.key, hash, o.length as usize)
            .map_err(Refused::Index)?;
        match held {
            Some(data) => {
                self.stage(o.file_id, o.block, hash, &data)?;
                self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            None => {
                self.pending.insert(key, (hash, o.length));
                Ok(true)
            }
        }
    }

    /// Wanted blocks: decompressed within bounds and checked against the
    /// hash offered for them before they are staged.
    pub fn blocks(&mut self, blocks: Blocks) -> Result<(), Refused> {
        if blocks.blocks.len() > MAX_BLOCKS {
            return Err(Refused::TooManyBlocks(blocks.blocks.len()));
        }
        for b in blocks.blocks {
            let (block, file) = (b.block, b.file_id);
            let Some((hash, length)) = self.pending.remove(&place(file, block)) else {
                return Err(Refused::NotAskedFor { block, file });
            };
            let data = block::decompress(&b.zstd, length as usize).map_err(|source| {
                Refused::Decompress {
                    block,
                    file,
                    source,
                }
            })?;
            if data.len() != length as usize || self.key.hash(&data) != hash {
                return Err(Refused::HashMismatch { block, file });
            }
            self.store
                .stats
                .bytes_received
                .fetch_add(b.zstd.len() as u64, Ordering::Relaxed);
            self.store.stats.blocks_sent.fetch_add(1, Ordering::Relaxed);
            self.stage(file, block, hash, &data)?;
        }
        self.checkpoint();
        Ok(())
    }

    /// The epoch's Begin, if `commit` may end it.
    fn check_commit(&mut self, commit: &Commit) -> Result<Begin, Refused> {
        let Some(begin) = self.begin.take() else {
            return Err(Refused::CommitBeforeBegin);
        };
        if commit.epoch != begin.epoch {
            return Err(Refused::CommitEpoch {
                commit: commit.epoch,
                begin: begin.epoch,
            });
        }
        if !self.pending.is_empty() {
            return Err(Refused::CommitMissing(self.pending.len()));
        }
        Ok(begin)
    }

    /// This stream was refused: a primary never sends a refused point
    /// again (it folds it into a new cut, with a new id), so nothing of
    /// the point is kept for resuming, only its verified content.
    pub fn mark_refused(&mut self) {
        self.refused = true;
    }

    /// The end of the epoch: applies it atomically.
    pub fn commit(mut self, commit: Commit) -> Result<Applied, Refused> {
        let checked = self.check_commit(&commit);
        let begin = checked.inspect_err(|_| self.refused = true)?;
        self.data
            .sync_all()
            .map_err(|e| Refused::staging(&self.data_path, e))?;
        let epoch = begin.epoch;
        let staged = StagedEpoch {
            begin: Some(begin),
            blocks: std::mem::take(&mut self.blocks),
        };
        // From here the staging belongs to the apply (or its redo record).
        self.committed = true;
        let applying = Instant::now();
        self.store
            .commit(&staged, Epoch(epoch))
            .map_err(|source| Refused::Apply { epoch, source })?;
        let (opened, before) = &self.opened;
        let c = self.store.stats.counts().since(before);
        log::info!(
            "epoch {epoch} applied: {} blocks ({} received, {} held already, {} resumed), {} bytes \
             received, in {:.3} s ({:.3} s applying)",
            staged.blocks.len(),
            c.blocks_sent,
            c.blocks_have,
            c.blocks_resumed,
            c.bytes_received,
            opened.elapsed().as_secs_f64(),
            applying.elapsed().as_secs_f64(),
        );
        Ok(Applied { epoch })
    }
}

impl Drop for Session<'_> {
    /// A stream that ends without its commit leaves its staged content to
    /// the next one (and, unless it was refused, its point).
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut content = std::mem::take(&mut self.carried);
        content.extend(self.staged.drain());
        if self.refused {
            self.begin = None;
            self.partial = None;
            let _ = fs::remove_file(self.store.paths.partial());
        }
        let point = match self.begin.take() {
            Some(b) => {
                // Up to the first offer still waiting for its block.
                let complete = self.complete();
                let after: HashSet<Place> = self.offer_log.drain(complete..).collect();
                self.blocks.retain(|b| !after.contains(&place_of(b)));
                Some(PartialPoint {
                    point: b.point,
                    epoch: Epoch(b.epoch),
                    offers: std::mem::take(&mut self.offer_log),
                    blocks: std::mem::take(&mut self.blocks),
                    logged: self.log.as_ref().map(PartialLog::logged),
                })
            }
            // The stream ended before a Begin: the earlier point stays.
            None => self.partial.take(),
        };
        if !content.is_empty() || point.is_some() {
            self.store.keep_carried(Carried { content, point });
        }
    }
}
