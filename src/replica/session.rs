//! One Ship stream at the secondary: checks every message against what
//! came before and the limits, stages the epoch's blocks, and hands the
//! complete epoch to the store. Anything malformed ends the stream with a
//! message naming what is wrong; nothing reaches the replica before the
//! commit, so the replica stays at its last consistent point.
//!
//! Bounded: Begin is a header; the point's lists arrive in Manifest chunks,
//! each checked (`preflight`) and spilled to `staging/point`; offers go
//! file by file, blocks ascending, up to [`MAX_WINDOW_OFFERS`] ahead of
//! their blocks, and each one complete is appended to the offer manifest
//! `staging/offers` (`resume`). Blocks are decoded and hash-checked across
//! the cores (`workers`), and staged in the order they came. So what a session holds
//! in memory does not grow with the operations or offers of the point.
//!
//! Resuming: a stream that breaks before its commit leaves what it staged
//! behind (`Carried`), so a reconnect loop always moves forward even when
//! the connection breaks faster than a whole point ships:
//! - the point itself, up to the first offer whose block has not arrived:
//!   a stream of the same point (same point id: the primary retries a
//!   point unchanged) starts there, and the answer to its lists says
//!   where. The offer manifest is synced every `CHECKPOINT_BYTES`, so a
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::preflight::Walk;
use super::refused::Refused;
use super::resume::{Carried, Content, OffersLog, PartialPoint, Place, hint};
use super::spill::Spill;
use super::store::{ReplicaCounts, ReplicaStore};
use crate::block::{self, BlockHash, HashKey};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::proto::replica::StagedBlock;
use crate::proto::replication::{
    Applied, Begin, Blocks, Commit, Manifest, Offer, Offers, Resumed, Wants,
};
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_OFFERS, MAX_WINDOW_OFFERS};

/// Staged bytes between two checkpoints of the point's log (every message
/// in unit tests, so that the fuzz suite exercises the log too).
const CHECKPOINT_BYTES: u64 = if cfg!(test) { 1 } else { 32 * 1024 * 1024 };

/// Raw bytes of blocks decoded at once by the workers: what a Blocks
/// message costs in memory at most beyond itself.
const DECODE_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A block that came for a pending offer, until it is decoded.
struct Wanted {
    block: crate::proto::replication::Block,
    hash: BlockHash,
    /// The offer's number in the point.
    number: u64,
    /// The offer's length: the block must decode to exactly this.
    length: usize,
}

/// The place an offer or a block names.
fn place(file_id: u64, block: u64) -> Place {
    (FileId(file_id), BlockNo(block))
}

/// The lists of a point while its Manifest chunks arrive: spilled to
/// `staging/point` as they are checked.
#[derive(Debug)]
struct Lists<'a> {
    spill: Spill,
    walk: Walk<'a>,
    ops: usize,
    files: usize,
    metas: usize,
}

/// One offer of the Offers message being answered, until it is complete
/// and logged.
#[derive(Debug)]
struct Slot {
    block: StagedBlock,
    /// Its content is staged (or it is a zero block).
    ready: bool,
}

/// The state of one epoch being received. What it holds in memory is
/// bounded whatever the point's size: a size per file of the point, the
/// window of offers awaiting blocks ([`MAX_WINDOW_OFFERS`]), [`CONTENT_HINTS`] hints by hash; the lists and
/// the offers themselves are spilled to the staging folder.
///
/// [`CONTENT_HINTS`]: super::resume::CONTENT_HINTS
#[derive(Debug)]
pub struct Session<'a> {
    store: &'a ReplicaStore,
    /// When the stream started and the store's counters then, for the
    /// point's log line.
    opened: (Instant, ReplicaCounts),
    key: HashKey,
    block_size: u64,
    /// The point's header, once Begin came.
    begin: Option<Begin>,
    /// Its lists, from Begin to the Manifest chunk that ends them.
    lists: Option<Lists<'a>>,
    /// Their spill once they ended, synced at the commit.
    listed: Option<Spill>,
    /// Every file of the point, with its size at the cut.
    sizes: HashMap<FileId, u64>,
    data_path: PathBuf,
    data: File,
    data_len: u64,
    /// The offers not yet logged (from the first whose block has not
    /// come), the first being the log's next.
    window: VecDeque<Slot>,
    /// Wanted blocks awaiting data: place → (hash, the offer's number in
    /// the point; minus the offers logged, its position in `window`).
    pending: HashMap<Place, (BlockHash, u64)>,
    /// Content staged in this epoch by hash, so a repeated block is
    /// staged once (a hint: capped).
    staged: Content,
    /// Content staged by earlier streams that broke, not yet used here.
    carried: Content,
    /// The point an earlier stream broke in, until the manifest says
    /// whether this stream ships the same one.
    partial: Option<PartialPoint>,
    /// The offer manifest (and the log a restart resumes from), once the
    /// lists are complete: every complete offer in the primary's order.
    log: Option<OffersLog>,
    /// Files whose offers are over (offers go file by file).
    left: HashSet<FileId>,
    /// Staged bytes since the last checkpoint.
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
            lists: None,
            listed: None,
            sizes: HashMap::new(),
            data_path,
            data,
            data_len,
            window: VecDeque::new(),
            pending: HashMap::new(),
            staged: HashMap::new(),
            carried,
            partial,
            log: None,
            left: HashSet::new(),
            unlogged_bytes: 0,
            committed: false,
            refused: false,
        })
    }

    /// Refuses a Begin that does not follow the applied point.
    fn check_begin(&self, begin: &Begin) -> Result<(), Refused> {
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
        Ok(())
    }

    /// The header of an epoch; its lists follow in Manifest chunks, the
    /// last of which is answered.
    pub fn begin(&mut self, begin: Begin) -> Result<(), Refused> {
        self.check_begin(&begin)?;
        let mut spill = Spill::create(&self.store.paths.staged_point()).map_err(Refused::Spill)?;
        spill.push(&begin).map_err(Refused::Spill)?;
        self.lists = Some(Lists {
            spill,
            walk: Walk::new(&self.store.root),
            ops: 0,
            files: 0,
            metas: 0,
        });
        self.begin = Some(begin);
        Ok(())
    }

    /// One chunk of the epoch's lists: checked against the limits and the
    /// replica (operations first, then file states, then metadata), then
    /// spilled. The
    /// last chunk is answered with how many offers an earlier, broken
    /// stream of the same point left complete.
    pub fn manifest(&mut self, chunk: Manifest) -> Result<Option<Resumed>, Refused> {
        let epoch = self.begin.as_ref().map_or(0, |b| b.epoch);
        let lists = self.lists.as_mut().ok_or(Refused::ManifestOutsideLists)?;
        if !chunk.ops.is_empty() && lists.files + lists.metas > 0
            || !chunk.files.is_empty() && lists.metas > 0
        {
            return Err(Refused::ListsOutOfOrder);
        }
        lists.ops += chunk.ops.len();
        lists.files += chunk.files.len();
        lists.metas += chunk.metas.len();
        if lists.ops.max(lists.files).max(lists.metas) > MAX_ENTRIES {
            return Err(Refused::TooManyEntries {
                epoch,
                ops: lists.ops,
                files: lists.files,
                metas: lists.metas,
            });
        }
        for op in &chunk.ops {
            lists.walk.op(op)?;
        }
        for f in &chunk.files {
            lists.walk.file(f)?;
            if self.sizes.insert(FileId(f.file_id), f.size).is_some() {
                return Err(Refused::FileTwice(f.file_id));
            }
        }
        for m in &chunk.metas {
            lists.walk.meta(m)?;
        }
        lists.spill.push(&chunk).map_err(Refused::Spill)?;
        if !chunk.end {
            return Ok(None);
        }
        self.listed = self.lists.take().map(|l| l.spill);
        self.start_offers().map(Some)
    }

    /// The lists are complete: takes up the point an earlier stream of
    /// the same point left, or starts its offers afresh.
    fn start_offers(&mut self) -> Result<Resumed, Refused> {
        let begin = self.begin.as_ref().expect("lists follow a Begin");
        let (epoch, point) = (Epoch(begin.epoch), begin.point.clone());
        let partial = self.partial.take();
        if let Some(p) = partial.filter(|p| p.point == point && p.epoch == epoch) {
            return self.resume_point(p, epoch);
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
        let log = OffersLog::start(&self.store.paths, &point, epoch).map_err(Refused::Spill)?;
        self.log = Some(log);
        Ok(Resumed { offers_done: 0 })
    }

    /// Takes up the point an earlier, broken stream of the same point left:
    /// its complete offers, logged; returns how many they are.
    fn resume_point(&mut self, p: PartialPoint, epoch: Epoch) -> Result<Resumed, Refused> {
        let offers_done = p.progress.done;
        log::info!(
            "epoch {epoch}: resuming after {offers_done} offers a broken stream left complete"
        );
        self.left = p.progress.left.clone();
        let log = OffersLog::resume(&self.store.paths, p).map_err(Refused::Spill)?;
        self.log = Some(log);
        self.store
            .stats
            .blocks_resumed
            .fetch_add(offers_done, Ordering::Relaxed);
        Ok(Resumed { offers_done })
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
        hint(&mut self.staged, hash, (offset, len));
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

    fn log(&mut self) -> Result<&mut OffersLog, Refused> {
        self.log.as_mut().ok_or(Refused::OffersBeforeBegin)
    }

    /// Logs the offers at the front of the window that are complete.
    fn log_complete(&mut self) -> Result<(), Refused> {
        let log = self.log.as_mut().ok_or(Refused::OffersBeforeBegin)?;
        while self.window.front().is_some_and(|s| s.ready) {
            let slot = self.window.pop_front().expect("checked");
            log.push(&slot.block).map_err(Refused::Spill)?;
        }
        Ok(())
    }

    /// Every `CHECKPOINT_BYTES` staged: syncs the data file, then the log
    /// of the offers complete so far, so a restart resumes after them.
    fn checkpoint(&mut self) -> Result<(), Refused> {
        if self.unlogged_bytes < CHECKPOINT_BYTES {
            return Ok(());
        }
        self.unlogged_bytes = 0;
        self.log_complete()?;
        self.data
            .sync_data()
            .map_err(|e| Refused::staging(&self.data_path, e))?;
        self.log()?.sync().map_err(Refused::Spill)
    }

    /// Stages `data` (once per hash); its place in the data file.
    fn stage(&mut self, hash: BlockHash, data: &[u8]) -> Result<(u64, u32), Refused> {
        if let Some(&at) = self.staged.get(&hash) {
            return Ok(at);
        }
        let at = (self.append(data)?, data.len() as u32);
        hint(&mut self.staged, hash, at);
        Ok(at)
    }

    /// Refuses an offer for a file not in the epoch, past its end, of the
    /// wrong length, or made before (offers go file by file, blocks
    /// ascending, so "before" is known from the last offer alone); its
    /// place otherwise.
    fn check_offer(&self, o: &Offer, last: Option<Place>) -> Result<Place, Refused> {
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
        let key = place(file, block);
        let again = match last {
            Some((f, b)) if f == key.0 => key.1 <= b,
            _ => self.left.contains(&key.0),
        };
        if again {
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

    /// Hash offers: answers which blocks must be sent. Offers stream
    /// ahead of the blocks they want, but the window of offers held in
    /// memory (from the first whose block has not come to this message's
    /// last) stays within [`MAX_WINDOW_OFFERS`].
    pub fn offers(&mut self, offers: Offers) -> Result<Wants, Refused> {
        if self.log.is_none() {
            return Err(Refused::OffersBeforeBegin);
        }
        if offers.offers.len() > MAX_OFFERS {
            return Err(Refused::TooManyOffers(offers.offers.len()));
        }
        self.log_complete()?;
        let awaiting = self.window.len();
        if awaiting + offers.offers.len() > MAX_WINDOW_OFFERS {
            return Err(Refused::WindowFull {
                offers: offers.offers.len(),
                awaiting,
            });
        }
        let mut wants = Vec::new();
        for (i, o) in offers.offers.into_iter().enumerate() {
            if self.offer(o)? {
                wants.push(i as u32);
            }
        }
        self.checkpoint()?;
        Ok(Wants { positions: wants })
    }

    /// The last offer made: the window's last, or the log's.
    fn last_offer(&self) -> Option<Place> {
        match self.window.back() {
            Some(slot) => Some(place(slot.block.file_id, slot.block.block)),
            None => self.log.as_ref().and_then(|l| l.progress().last),
        }
    }

    /// One offer: staged from content at hand, or (`true`) wanted.
    fn offer(&mut self, o: Offer) -> Result<bool, Refused> {
        let last = self.last_offer();
        let key = self.check_offer(&o, last)?;
        if let Some((file, _)) = last.filter(|l| l.0 != key.0) {
            self.left.insert(file);
        }
        let mut block = StagedBlock {
            file_id: o.file_id,
            block: o.block,
            zero: o.zero,
            offset: 0,
            length: o.length,
            hash: Vec::new(),
        };
        if o.zero {
            self.window.push_back(Slot { block, ready: true });
            return Ok(false);
        }
        let Some(hash) = BlockHash::from_bytes(&o.hash) else {
            return Err(Refused::HashLength {
                block: o.block,
                file: o.file_id,
                len: o.hash.len(),
            });
        };
        block.hash = o.hash;
        let at = match self.staged_content(hash, o.length) {
            Some(at) => Some(at),
            None => match self.store.find(&self.key, hash, o.length as usize) {
                Ok(Some(data)) => Some(self.stage(hash, &data)?),
                Ok(None) => None,
                Err(e) => return Err(Refused::Index(e)),
            },
        };
        let ready = at.is_some();
        if let Some((offset, _)) = at {
            block.offset = offset;
            self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
        } else {
            let number = self.log()?.progress().done + self.window.len() as u64;
            self.pending.insert(key, (hash, number));
        }
        self.window.push_back(Slot { block, ready });
        Ok(!ready)
    }

    /// Wanted blocks: decompressed within bounds and checked against the
    /// hash offered for them (by the workers, a batch of about
    /// `DECODE_BATCH_BYTES` at a time), then staged in their order.
    pub fn blocks(&mut self, blocks: Blocks) -> Result<(), Refused> {
        if blocks.blocks.len() > MAX_BLOCKS {
            return Err(Refused::TooManyBlocks(blocks.blocks.len()));
        }
        // Before the offers began nothing is pending: the first block is
        // refused as not asked for.
        let done = self.log.as_ref().map_or(0, |l| l.progress().done);
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let last = blocks.blocks.len();
        for (i, b) in blocks.blocks.into_iter().enumerate() {
            let (block, file) = (b.block, b.file_id);
            let Some((hash, number)) = self.pending.remove(&place(file, block)) else {
                return Err(Refused::NotAskedFor { block, file });
            };
            let length = self.window[(number - done) as usize].block.length as usize;
            batch_bytes += length;
            batch.push(Wanted {
                block: b,
                hash,
                number,
                length,
            });
            if batch_bytes >= DECODE_BATCH_BYTES || i + 1 == last {
                self.stage_batch(std::mem::take(&mut batch), done)?;
                batch_bytes = 0;
            }
        }
        self.checkpoint()
    }

    /// Decodes and checks `batch` across the workers, then stages each
    /// block in order and marks its offer ready.
    fn stage_batch(&mut self, batch: Vec<Wanted>, done: u64) -> Result<(), Refused> {
        let key = self.key.clone();
        let decoded = crate::workers::map(batch, move |w| {
            let (block, file) = (w.block.block, w.block.file_id);
            let data = block::decompress(&w.block.zstd, w.length).map_err(|source| {
                Refused::Decompress {
                    block,
                    file,
                    source,
                }
            })?;
            if data.len() != w.length || key.hash(&data) != w.hash {
                return Err(Refused::HashMismatch { block, file });
            }
            Ok((w, data))
        })
        .ok_or(Refused::Workers)?;
        for decoded in decoded {
            let (w, data) = decoded?;
            self.store
                .stats
                .bytes_received
                .fetch_add(w.block.zstd.len() as u64, Ordering::Relaxed);
            self.store.stats.blocks_sent.fetch_add(1, Ordering::Relaxed);
            let (offset, _) = self.stage(w.hash, &data)?;
            let slot = &mut self.window[(w.number - done) as usize];
            slot.block.offset = offset;
            slot.ready = true;
        }
        Ok(())
    }

    /// The epoch's Begin, if `commit` may end it.
    fn check_commit(&mut self, commit: &Commit) -> Result<Begin, Refused> {
        let Some(begin) = self.begin.take().filter(|_| self.log.is_some()) else {
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

    /// The end of the epoch: makes its staging durable (data, lists,
    /// offers) and applies it atomically.
    pub fn commit(mut self, commit: Commit) -> Result<Applied, Refused> {
        let checked = self.check_commit(&commit);
        let begin = checked.inspect_err(|_| self.refused = true)?;
        self.log_complete()?;
        self.data
            .sync_all()
            .map_err(|e| Refused::staging(&self.data_path, e))?;
        let mut log = self.log.take().expect("checked by check_commit");
        log.sync().map_err(Refused::Spill)?;
        let blocks = log.progress().done;
        let mut listed = self
            .listed
            .take()
            .expect("the lists ended before the offers");
        listed.sync().map_err(Refused::Spill)?;
        let epoch = begin.epoch;
        // From here the staging belongs to the apply (or its redo record).
        self.committed = true;
        let applying = Instant::now();
        let refusals = self
            .store
            .commit(Epoch(epoch))
            .map_err(|source| Refused::Apply { epoch, source })?;
        // The point is applied; if it covers the resync list and the list
        // cannot go, the stream fails: the primary finds the point applied
        // at its next hello, is handed the list again and covers it again.
        self.store
            .covered(&begin.resync_token)
            .map_err(|source| Refused::Apply { epoch, source })?;
        let (opened, before) = &self.opened;
        let c = self.store.stats.counts().since(before);
        log::info!(
            "epoch {epoch} applied: {} blocks ({} received, {} held already, {} resumed), {} bytes \
             received, in {:.3} s ({:.3} s applying)",
            blocks,
            c.blocks_sent,
            c.blocks_have,
            c.blocks_resumed,
            c.bytes_received,
            opened.elapsed().as_secs_f64(),
            applying.elapsed().as_secs_f64(),
        );
        Ok(Applied { epoch, refusals })
    }

    /// What this stream leaves of its point for the next stream: its
    /// complete offers, up to the first still waiting for its block; or,
    /// when its lists did not end, the point an earlier stream left.
    fn leave_point(&mut self) -> Option<PartialPoint> {
        let (Some(b), Some(mut log)) = (self.begin.take(), self.log.take()) else {
            return self.partial.take();
        };
        while let Some(slot) = self.window.pop_front().filter(|s| s.ready) {
            if log.push(&slot.block).is_err() {
                return None;
            }
        }
        log.into_partial(b.point, Epoch(b.epoch))
            .inspect_err(|e| log::warn!("keeping the point being received: {e}"))
            .ok()
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
        for (hash, at) in self.staged.drain() {
            hint(&mut content, hash, at);
        }
        let point = if self.refused {
            let _ = fs::remove_file(self.store.paths.staged_offers());
            None
        } else {
            self.leave_point()
        };
        if point.is_none() {
            let _ = fs::remove_file(self.store.paths.staged_offers());
        }
        if !content.is_empty() || point.is_some() {
            self.store.keep_carried(Carried { content, point });
        }
    }
}
