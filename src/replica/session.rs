//! One Ship stream at the secondary: checks every message against what
//! came before and the limits, and applies the point in place as it
//! arrives (`inflight`). Anything malformed ends the stream with a message
//! naming what is wrong, and the point is rolled back: the replica stays
//! at its last consistent point.
//!
//! Bounded: Begin is a header; the point's lists arrive in Manifest chunks,
//! each checked (`preflight`) and spilled to `staging/point`; once they
//! end, the point's namespace operations and sizes are applied. Offers go
//! file by file, blocks ascending, up to [`MAX_WINDOW_OFFERS`] ahead of
//! their blocks. Blocks are decoded and hash-checked across the cores
//! (`workers`); a block whose content is here already (the content index,
//! this batch, a broken stream's) is not asked for. Blocks are written in
//! place in batches of 16 MiB (their old content saved to
//! the undo first), and each offer written is appended, in the primary's
//! order, to the offer manifest `staging/offers` (`resume`). So what a
//! session holds in memory does not grow with the operations or offers of
//! the point.
//!
//! Resuming: a stream that breaks before its commit leaves what it wrote,
//! read back into the staging folder before the rollback (`Carried`), so a
//! reconnect loop always moves forward even when the connection breaks
//! faster than a whole point ships:
//! - the point itself, up to the first offer not yet written: a stream of
//!   the same point (same point id: the primary retries a point unchanged)
//!   writes that part from the staging folder and starts after it, and the
//!   answer to its lists says where. A restart of the secondary does the
//!   same from the offers log (flushed after every batch, never synced: a
//!   restart re-hashes what it reads back). A refused stream keeps no
//!   point (a primary never resends a refused one);
//! - its content by hash: a stream of another point (the primary folded
//!   the old one into a newer cut) fills offers of the same content from it
//!   instead of asking again. Like the content index these are hints, each
//!   re-read and re-hashed before use.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::apply::Landing;
use super::inflight::InFlight;
use super::preflight::Walk;
use super::refused::Refused;
use super::resume::{Carried, Content, OffersLog, PartialPoint, Place};
use super::spill::Spill;
use super::store::{ReplicaCounts, ReplicaStore};
use crate::block::{self, BlockHash, HashKey};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::proto::replica::StagedBlock;
use crate::proto::replication::{
    Applied, Begin, Blocks, Commit, Manifest, Offer, Offers, Resumed, Wants,
};
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_OFFERS, MAX_WINDOW_OFFERS};

/// Bytes of blocks written in place at once, each batch's old content
/// saved and synced to the undo first (two blocks of the fuzz suite's in
/// unit tests, so that it exercises the batches and the log).
const WRITE_BATCH_BYTES: usize = if cfg!(test) { 8192 } else { 16 * 1024 * 1024 };

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
    /// Its block is written in place.
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
    /// The staging data file: content broken streams left (see `resume`).
    data_path: PathBuf,
    data: File,
    data_len: u64,
    /// The point being applied, once its lists are complete.
    inflight: Option<InFlight<'a>>,
    /// Blocks ready to be written (their offers' numbers alongside), and
    /// where in it each content lies by hash, with its bytes.
    batch: Vec<Landing>,
    batch_numbers: Vec<u64>,
    batch_hashes: HashMap<BlockHash, usize>,
    batch_bytes: usize,
    /// The offers not yet logged (from the first whose block has not
    /// come), the first being the log's next.
    window: VecDeque<Slot>,
    /// Wanted blocks awaiting data: place → (hash, the offer's number in
    /// the point; minus the offers logged, its position in `window`).
    pending: HashMap<Place, (BlockHash, u64)>,
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
    /// Set once the epoch is applied: nothing is left to carry.
    committed: bool,
    /// Set when the stream was refused: no point is kept for resuming.
    refused: bool,
    /// Set when the replica's file system filled: what the point wrote is
    /// not read back into staging.
    out_of_space: bool,
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
            inflight: None,
            batch: Vec::new(),
            batch_numbers: Vec::new(),
            batch_hashes: HashMap::new(),
            batch_bytes: 0,
            window: VecDeque::new(),
            pending: HashMap::new(),
            carried,
            partial,
            log: None,
            left: HashSet::new(),
            committed: false,
            refused: false,
            out_of_space: false,
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
        let mut listed = self.lists.take().map(|l| l.spill);
        if let Some(spill) = listed.as_mut() {
            spill.flush().map_err(Refused::Spill)?;
        }
        self.listed = listed;
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
        self.begin_in_flight(epoch)?;
        Ok(Resumed { offers_done: 0 })
    }

    /// Starts applying the point in place: its namespace operations and
    /// sizes (see `inflight`).
    fn begin_in_flight(&mut self, epoch: Epoch) -> Result<(), Refused> {
        let apply = |source| Refused::Apply {
            epoch: epoch.0,
            source,
        };
        let base = Epoch(self.begin.as_ref().map_or(0, |b| b.base_epoch));
        let inflight = self
            .inflight
            .insert(InFlight::begin(self.store, epoch, base).map_err(apply)?);
        inflight.start().map_err(apply)
    }

    /// The point's epoch, once Begin came.
    fn epoch(&self) -> u64 {
        self.begin.as_ref().map_or(0, |b| b.epoch)
    }

    /// Takes up the point an earlier, broken stream of the same point left:
    /// its complete offers, logged, are written in place from the staging
    /// folder; returns how many they are.
    fn resume_point(&mut self, p: PartialPoint, epoch: Epoch) -> Result<Resumed, Refused> {
        let offers_done = p.progress.done;
        log::info!(
            "epoch {epoch}: resuming after {offers_done} offers a broken stream left complete"
        );
        self.left = p.progress.left.clone();
        self.begin_in_flight(epoch)?;
        self.write_carried(offers_done)?;
        let log = OffersLog::resume(&self.store.paths, p).map_err(Refused::Spill)?;
        self.log = Some(log);
        self.store
            .stats
            .blocks_resumed
            .fetch_add(offers_done, Ordering::Relaxed);
        Ok(Resumed { offers_done })
    }

    /// Writes in place the first `count` offers of the log a broken stream
    /// of this point left, from the staging data file (re-hashed when they
    /// were read back into it).
    fn write_carried(&mut self, count: u64) -> Result<(), Refused> {
        let spill = |e| Refused::Spill(e);
        let (_, mut records) = super::resume::read_offers(&self.store.paths).map_err(spill)?;
        let mut landings = Vec::new();
        let mut bytes = 0;
        for _ in 0..count {
            let Some(b) = records.read::<StagedBlock>().map_err(spill)? else {
                break;
            };
            let mut data = vec![0u8; if b.zero { 0 } else { b.length as usize }];
            self.data
                .read_exact_at(&mut data, b.offset)
                .map_err(|e| Refused::staging(&self.data_path, e))?;
            bytes += data.len();
            landings.push(Landing { block: b, data });
            if bytes >= WRITE_BATCH_BYTES {
                self.write_landings(&landings)?;
                landings.clear();
                bytes = 0;
            }
        }
        self.write_landings(&landings)
    }

    /// Writes `landings` in place through the point in flight.
    fn write_landings(&mut self, landings: &[Landing]) -> Result<(), Refused> {
        let epoch = self.epoch();
        let inflight = self.inflight.as_mut().ok_or(Refused::OffersBeforeBegin)?;
        inflight
            .write(landings)
            .map_err(|source| Refused::Apply { epoch, source })
    }

    /// Content for `hash` that an earlier, broken stream staged, checked
    /// again.
    fn resume(&mut self, hash: BlockHash, length: u32) -> Option<Vec<u8>> {
        let (offset, len) = self.carried.remove(&hash)?;
        let mut buf = vec![0u8; len as usize];
        if len != length
            || self.data.read_exact_at(&mut buf, offset).is_err()
            || self.key.hash(&buf) != hash
        {
            return None;
        }
        Some(buf)
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

    /// Adds a block whose content is at hand (`data`; empty for a zero
    /// block) for offer `number`, writing the batch once it is full.
    fn land(&mut self, block: StagedBlock, data: Vec<u8>, number: u64) -> Result<(), Refused> {
        if let Some(hash) = BlockHash::from_bytes(&block.hash) {
            self.batch_hashes.insert(hash, self.batch.len());
        }
        // A zero block counts its length too: a batch holds at most
        // WRITE_BATCH_BYTES of the point, written or punched.
        self.batch_bytes += block.length as usize;
        self.batch.push(Landing { block, data });
        self.batch_numbers.push(number);
        if self.batch_bytes >= WRITE_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the batch in place, marks its offers complete and logs
    /// those at the front of the window (the log written out to the
    /// kernel: a `kill -9` loses none of it).
    fn flush(&mut self) -> Result<(), Refused> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.write_landings(&batch)?;
        let done = self.log()?.progress().done;
        for number in self.batch_numbers.drain(..) {
            self.window[(number - done) as usize].ready = true;
        }
        self.batch_hashes.clear();
        self.batch_bytes = 0;
        self.log_complete()?;
        self.log()?.flush().map_err(Refused::Spill)
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

    /// Content of `hash` at hand: in the batch being written, or carried
    /// from a broken stream.
    fn content_at_hand(&mut self, hash: BlockHash, length: u32) -> Option<Vec<u8>> {
        if let Some(&i) = self.batch_hashes.get(&hash) {
            let data = &self.batch[i].data;
            return (data.len() == length as usize).then(|| data.clone());
        }
        self.resume(hash, length).inspect(|_| {
            self.store
                .stats
                .blocks_resumed
                .fetch_add(1, Ordering::Relaxed);
        })
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
        // Offers whose blocks are at hand, being written, await nothing.
        let awaiting = self.window.len() - self.batch_numbers.len();
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
        let number = self.log()?.progress().done + self.window.len() as u64;
        if o.zero {
            self.window.push_back(Slot {
                block: block.clone(),
                ready: false,
            });
            self.land(block, Vec::new(), number)?;
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
        let data = match self.content_at_hand(hash, o.length) {
            Some(data) => Some(data),
            None => self
                .store
                .find(&self.key, hash, o.length as usize)
                .map_err(Refused::Index)?,
        };
        self.window.push_back(Slot {
            block: block.clone(),
            ready: false,
        });
        let Some(data) = data else {
            self.pending.insert(key, (hash, number));
            return Ok(true);
        };
        self.store.stats.blocks_have.fetch_add(1, Ordering::Relaxed);
        self.land(block, data, number)?;
        Ok(false)
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
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let last = blocks.blocks.len();
        for (i, b) in blocks.blocks.into_iter().enumerate() {
            let (block, file) = (b.block, b.file_id);
            let Some((hash, number)) = self.pending.remove(&place(file, block)) else {
                return Err(Refused::NotAskedFor { block, file });
            };
            let done = self.log()?.progress().done;
            let length = self.window[(number - done) as usize].block.length as usize;
            batch_bytes += length;
            batch.push(Wanted {
                block: b,
                hash,
                number,
                length,
            });
            if batch_bytes >= DECODE_BATCH_BYTES || i + 1 == last {
                self.decode_batch(std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
        }
        Ok(())
    }

    /// Decodes and checks `batch` across the workers, then lands each
    /// block in order.
    fn decode_batch(&mut self, batch: Vec<Wanted>) -> Result<(), Refused> {
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
            let done = self.log()?.progress().done;
            let block = self.window[(w.number - done) as usize].block.clone();
            self.land(block, data, w.number)?;
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

    /// This stream failed for want of space on the replica: its point is
    /// rolled back keeping nothing (the primary sends it again).
    pub fn mark_out_of_space(&mut self) {
        self.out_of_space = true;
    }

    /// The end of the epoch: its last blocks written, then the point
    /// committed and finished (see `inflight`).
    pub fn commit(mut self, commit: Commit) -> Result<Applied, Refused> {
        let checked = self.check_commit(&commit);
        let begin = checked.inspect_err(|_| self.refused = true)?;
        self.flush()?;
        let blocks = self.log()?.progress().done;
        let epoch = begin.epoch;
        let inflight = self.inflight.take().ok_or(Refused::CommitBeforeBegin)?;
        // From here the point is the commit's: finished, or rolled back by
        // the commit itself when it fails before its commit point.
        self.committed = true;
        let applying = Instant::now();
        let refusals = inflight
            .commit()
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
             received, in {:.3} s ({:.3} s committing)",
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
    /// A stream that ends without its commit rolls its point back, leaving
    /// what it wrote (read back into the staging folder) to the next
    /// stream: its content and, unless it was refused, its point.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // What came is written first, so that all of it is resumed.
        let point = if self.refused || self.out_of_space || self.flush().is_err() {
            None
        } else {
            self.leave_point()
        };
        if point.is_none() {
            let _ = fs::remove_file(self.store.paths.staged_offers());
        }
        let carried = match self.inflight.take() {
            Some(inflight) => inflight.abandon(&self.key, point.is_some(), self.out_of_space),
            None => Some(Carried {
                content: std::mem::take(&mut self.carried),
                point,
            }),
        };
        if let Some(c) = carried.filter(|c| !c.content.is_empty() || c.point.is_some()) {
            self.store.keep_carried(c);
        }
    }
}
