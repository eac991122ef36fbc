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
//!   also logged to disk every `CHECKPOINT_BYTES` (`partial`), so a
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
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::partial::PartialLog;
use super::store::ReplicaStore;
use crate::block::{self, BlockHash, HashKey};
use crate::error::IoContext;
use crate::proto::replica::{StagedBlock, StagedEpoch};
use crate::proto::replication::{Applied, Begin, Blocks, Commit, Offers, Resumed, Wants};
use crate::state::ReplicaPaths;
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_OFFERS};

/// Staged bytes between two checkpoints of the point's log (every message
/// in unit tests, so that the fuzz suite exercises the log too).
const CHECKPOINT_BYTES: u64 = if cfg!(test) { 1 } else { 32 * 1024 * 1024 };

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

fn staging_error(path: &Path, e: std::io::Error) -> Refused {
    Refused(format!("staging {}: {e}", path.display()))
}

/// Blocks awaiting data: (file id, block) → (hash, length).
type Pending = HashMap<(u64, u64), (BlockHash, u32)>;

/// Content in the staging data file by hash: (offset, length).
type Content = HashMap<BlockHash, (u64, u32)>;

/// A point a broken stream staged in part.
#[derive(Debug)]
struct PartialPoint {
    point: Vec<u8>,
    epoch: u64,
    /// Its offers (file id, block) in the primary's order, each complete.
    offers: Vec<(u64, u64)>,
    /// Their staged blocks.
    blocks: Vec<StagedBlock>,
    /// How many of the offers the on-disk log holds (`partial`), and its
    /// length after them; `None` when there is no log.
    logged: Option<(usize, u64)>,
}

/// What streams that broke before their commit staged, for the next one.
#[derive(Debug, Default)]
pub struct Carried {
    content: Content,
    point: Option<PartialPoint>,
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
    /// log (`partial`), each block's staged content re-read and re-hashed:
    /// the log ends at the first that does not match.
    pub fn from_log(paths: &ReplicaPaths, key: &HashKey) -> Option<Carried> {
        let loaded = super::partial::load(paths)?;
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
            offers: blocks.iter().map(|b| (b.file_id, b.block)).collect(),
            logged: Some((blocks.len(), len)),
            blocks,
        });
        Some(carried)
    }
}

/// The state of one epoch being received.
#[derive(Debug)]
pub struct Session<'a> {
    store: &'a ReplicaStore,
    key: HashKey,
    block_size: u64,
    begin: Option<Begin>,
    sizes: HashMap<u64, u64>,
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
    offer_log: Vec<(u64, u64)>,
    /// Where in `blocks` each offer's block is (with `pending`, every
    /// offer made).
    block_at: HashMap<(u64, u64), usize>,
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
            return refuse("no primary has said hello to this replica yet");
        };
        if store.apply_pending() {
            return refuse(
                "an earlier apply failed and must be finished first: restart the secondary",
            );
        }
        let Carried {
            content: carried,
            point: partial,
        } = store.take_carried().unwrap_or_default();
        let data_path = store.paths.staged_data();
        let staging_error = |e| staging_error(&data_path, e);
        let data = OpenOptions::new()
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

    /// The start of an epoch: operations and file states. The answer says
    /// how many of its offers an earlier, broken stream of the same point
    /// left complete.
    pub fn begin(&mut self, begin: Begin) -> Result<Resumed, Refused> {
        if self.begin.is_some() {
            return refuse("a second Begin in one stream");
        }
        if begin.point.len() != 16 {
            return refuse(format!(
                "point id of {} bytes, expected 16",
                begin.point.len()
            ));
        }
        let applied = self.store.applied().epoch;
        if begin.base_epoch != applied {
            return refuse(format!(
                "epoch {} is based on epoch {}, but this replica is at epoch {applied}",
                begin.epoch, begin.base_epoch
            ));
        }
        if begin.epoch <= applied {
            return refuse(format!(
                "epoch {} is not newer than the applied epoch {applied} (replayed or out of order)",
                begin.epoch
            ));
        }
        if begin.ops.len() > MAX_ENTRIES || begin.files.len() > MAX_ENTRIES {
            return refuse(format!(
                "epoch {} carries {} operations and {} files; at most {MAX_ENTRIES} each",
                begin.epoch,
                begin.ops.len(),
                begin.files.len()
            ));
        }
        super::preflight::check(&self.store.root, &begin).map_err(Refused)?;
        for f in &begin.files {
            if self.sizes.insert(f.file_id, f.size).is_some() {
                return refuse(format!("file {} listed twice", f.file_id));
            }
        }
        let partial = self.partial.take();
        if let Some(p) = partial.filter(|p| p.point == begin.point && p.epoch == begin.epoch) {
            log::info!(
                "epoch {}: resuming after {} offers a broken stream left complete",
                begin.epoch,
                p.offers.len()
            );
            self.offer_log = p.offers;
            self.blocks = p.blocks;
            self.block_at = (self.blocks.iter().enumerate())
                .map(|(i, b)| ((b.file_id, b.block), i))
                .collect();
            self.log = match p.logged {
                Some((logged, len)) => PartialLog::resume(&self.store.paths, logged, len)
                    .inspect_err(|e| log::warn!("not logging epoch {}: {e}", begin.epoch))
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
                .map_err(|e| staging_error(&self.data_path, e))?;
            self.data_len = 0;
        }
        self.log = PartialLog::start(&self.store.paths, &begin.point, begin.epoch)
            .inspect_err(|e| log::warn!("not logging epoch {}: {e}", begin.epoch))
            .ok();
        self.begin = Some(begin);
        Ok(Resumed { offers_done: 0 })
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
            .map_err(|e| staging_error(&self.data_path, e))?;
        self.data_len += data.len() as u64;
        self.unlogged_bytes += data.len() as u64;
        Ok(at)
    }

    fn push_block(&mut self, block: StagedBlock) {
        self.block_at
            .insert((block.file_id, block.block), self.blocks.len());
        self.blocks.push(block);
    }

    /// How many offers, in order, have their block.
    fn complete(&self) -> usize {
        self.offer_log
            .iter()
            .position(|o| self.pending.contains_key(o))
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

    /// Hash offers: answers which blocks must be sent.
    pub fn offers(&mut self, offers: Offers) -> Result<Wants, Refused> {
        if self.begin.is_none() {
            return refuse("Offers before Begin");
        }
        if offers.offers.len() > MAX_OFFERS {
            return refuse(format!(
                "{} offers in one message; at most {MAX_OFFERS}",
                offers.offers.len()
            ));
        }
        let mut wants = Vec::new();
        for (i, o) in offers.offers.into_iter().enumerate() {
            let Some(&size) = self.sizes.get(&o.file_id) else {
                return refuse(format!(
                    "offer for file {} which is not in the epoch",
                    o.file_id
                ));
            };
            let start = o.block.checked_mul(self.block_size).filter(|s| *s < size);
            let Some(start) = start else {
                return refuse(format!(
                    "offer for block {} of file {} beyond its size {size}",
                    o.block, o.file_id
                ));
            };
            let expected = (size - start).min(self.block_size) as u32;
            if o.length != expected {
                return refuse(format!(
                    "offer for block {} of file {} has length {}, expected {expected}",
                    o.block, o.file_id, o.length
                ));
            }
            // An offer already made has its block, or waits for it.
            let key = (o.file_id, o.block);
            if self.block_at.contains_key(&key) || self.pending.contains_key(&key) {
                return refuse(format!(
                    "block {} of file {} offered twice",
                    o.block, o.file_id
                ));
            }
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
                continue;
            }
            let Some(hash) = BlockHash::from_bytes(&o.hash) else {
                return refuse(format!(
                    "offer for block {} of file {} has a {}-byte hash",
                    o.block,
                    o.file_id,
                    o.hash.len()
                ));
            };
            let staged = match self.staged.get(&hash) {
                Some(&(offset, length)) if length == o.length => Some((offset, length)),
                Some(_) => None,
                None => self.resume(hash, o.length).inspect(|_| {
                    self.store
                        .stats
                        .blocks_resumed
                        .fetch_add(1, Ordering::Relaxed);
                }),
            };
            if let Some((offset, length)) = staged {
                self.push_block(StagedBlock {
                    file_id: o.file_id,
                    block: o.block,
                    zero: false,
                    offset,
                    length,
                    hash: o.hash,
                });
                self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let held = self
                .store
                .find(&self.key, hash, o.length as usize)
                .map_err(|e| Refused(format!("reading the content index: {e}")))?;
            match held {
                Some(data) => {
                    self.stage(o.file_id, o.block, hash, &data)?;
                    self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    wants.push(i as u32);
                    self.pending.insert((o.file_id, o.block), (hash, o.length));
                }
            }
        }
        self.checkpoint();
        Ok(Wants { positions: wants })
    }

    /// Wanted blocks: decompressed within bounds and checked against the
    /// hash offered for them before they are staged.
    pub fn blocks(&mut self, blocks: Blocks) -> Result<(), Refused> {
        if blocks.blocks.len() > MAX_BLOCKS {
            return refuse(format!(
                "{} blocks in one message; at most {MAX_BLOCKS}",
                blocks.blocks.len()
            ));
        }
        for b in blocks.blocks {
            let Some((hash, length)) = self.pending.remove(&(b.file_id, b.block)) else {
                return refuse(format!(
                    "block {} of file {} was not asked for",
                    b.block, b.file_id
                ));
            };
            let data = block::decompress(&b.zstd, length as usize)
                .map_err(|e| Refused(format!("block {} of file {}: {e}", b.block, b.file_id)))?;
            if data.len() != length as usize || self.key.hash(&data) != hash {
                return refuse(format!(
                    "block {} of file {} does not match the hash offered for it (corrupted in transit?)",
                    b.block, b.file_id
                ));
            }
            self.store
                .stats
                .bytes_received
                .fetch_add(b.zstd.len() as u64, Ordering::Relaxed);
            self.store.stats.blocks_sent.fetch_add(1, Ordering::Relaxed);
            self.stage(b.file_id, b.block, hash, &data)?;
        }
        self.checkpoint();
        Ok(())
    }

    /// The epoch's Begin, if `commit` may end it.
    fn check_commit(&mut self, commit: &Commit) -> Result<Begin, Refused> {
        let Some(begin) = self.begin.take() else {
            return refuse("Commit before Begin");
        };
        if commit.epoch != begin.epoch {
            return refuse(format!(
                "Commit for epoch {} inside epoch {}",
                commit.epoch, begin.epoch
            ));
        }
        if !self.pending.is_empty() {
            return refuse(format!(
                "Commit with {} wanted blocks never sent",
                self.pending.len()
            ));
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
            .map_err(|e| staging_error(&self.data_path, e))?;
        let epoch = begin.epoch;
        let staged = StagedEpoch {
            begin: Some(begin),
            blocks: std::mem::take(&mut self.blocks),
        };
        // From here the staging belongs to the apply (or its redo record).
        self.committed = true;
        self.store
            .commit(&staged, epoch)
            .map_err(|e| Refused(format!("applying epoch {epoch}: {e}")))?;
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
                let after: HashSet<(u64, u64)> = self.offer_log.drain(complete..).collect();
                self.blocks
                    .retain(|b| !after.contains(&(b.file_id, b.block)));
                Some(PartialPoint {
                    point: b.point,
                    epoch: b.epoch,
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
