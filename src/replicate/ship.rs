//! Shipping one point over one stream: Begin (a small header), its lists
//! in Manifest chunks of a few MiB (namespace operations read from the
//! journal one at a time, then file sizes and paths at the cut, then the
//! metadata the point changed, deepest paths first), then chunk by chunk
//! a keyed hash per dirty block, the secondary's wants, the wanted blocks
//! zstd-compressed (zero blocks travel as markers in the offer; blocks a
//! probe finds incompressible as raw zstd frames, see `block::pack`), and
//! Commit, answered once the point is applied. A resumed stream skips the
//! offers the secondary holds.
//!
//! The chunks are pipelined (`pipeline`): offers stream up to a window of
//! chunks ahead of their blocks, the wants are read as they come (in the
//! order of the offers) and the wanted blocks compressed on the workers
//! while later chunks are offered and earlier blocks sent; no chunk waits
//! for a round trip of its own. Every stage still has its deadline.
//!
//! The level: `--zstd-level` defaults to -1 ([`super::DEFAULT_ZSTD_LEVEL`]),
//! by measurement on the 1 GiB mixed image of `contrib/bench`: level -3
//! ratio 1.85 at 217 MB per primary CPU-second, -1 2.00 at 209, 1 2.15 at
//! 186, 3 2.21 at 130 (initial syncs, medians of two, `docs/design.md`).
//! Blocks the probe finds incompressible skip compression whatever the
//! level.
//!
//! Reading, hashing and compressing run on blocking threads and the
//! block workers, never on the FUSE threads and never on the async
//! runtime's workers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::block::{self, HashKey};
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, Epoch};
use prost::Message;

use crate::datastore::Datastore;
use crate::proto::journal::{OpKind as JournalOpKind, OpRecord};
use crate::proto::replication::{
    Begin, Block, Blocks, Commit, FileState, Manifest, NamespaceOp, Offer, Offers, ShipMessage,
    ShipReply, ship_message, ship_reply,
};
use crate::throttle::Throttle;
use crate::tracking::{ClosedSet, TrackedFile};
use crate::wire::{
    MAX_BLOCKS, MAX_MESSAGE, MAX_WINDOW_OFFERS, NO_PROGRESS_TIMEOUT, apply_timeout,
    manifest_timeout, tuned,
};

use super::client::{Client, blocking, next_reply, remote, ship_status, unexpected, within};
use super::point::Point;
use super::stats::ReplStats;
use super::{Replicator, meta};

/// Bytes of blocks read, hashed and offered per Offers message (within
/// [`MAX_WINDOW_OFFERS`] / the window); `HBRFS_OFFER_CHUNK_BYTES`.
const OFFER_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Offers messages whose blocks are not all sent yet, at most: how far
/// offers stream ahead of the blocks; `HBRFS_SHIP_WINDOW`.
const SHIP_WINDOW: u64 = 8;
/// Chunks read and hashed ahead of the one being offered.
const READ_AHEAD: usize = 2;
/// Compressed bytes per Blocks message (well under the message limit);
/// `HBRFS_BLOCKS_MESSAGE_BYTES`.
const BLOCKS_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
/// Encoded bytes of operations and file states per Manifest chunk (well
/// under the message limit, whatever the backlog).
const MANIFEST_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// What an entry of a repeated field costs beyond its own encoding (its
/// tag and length), counted generously.
const ENTRY_OVERHEAD: usize = 8;

/// The blocks to offer, file by file, in the order they are offered.
pub(super) type Work = Vec<(Arc<TrackedFile>, Vec<BlockNo>)>;

/// One block read for an offer.
pub(super) struct ReadBlock {
    pub(super) offer: Offer,
    data: Vec<u8>,
}

/// The sizes of a ship's pipeline. What the primary holds of a point's
/// data is about (`window` + [`READ_AHEAD`] + 1) chunks, raw and packed.
/// Benchmarks vary them through the environment (`wire::tuned`).
struct Shape {
    /// Blocks per Offers message.
    chunk_blocks: usize,
    /// Offers messages outstanding.
    window: usize,
    /// Compressed bytes per Blocks message.
    message_bytes: usize,
    /// Whether incompressible blocks are found by a probe and sent raw
    /// (`HBRFS_RAW_PROBE=0` compresses every block, for comparison).
    probe: bool,
}

impl Shape {
    fn new(block_size: u64) -> Shape {
        let window = tuned("HBRFS_SHIP_WINDOW", SHIP_WINDOW).clamp(1, 64) as usize;
        let chunk = tuned("HBRFS_OFFER_CHUNK_BYTES", OFFER_CHUNK_BYTES) / block_size.max(1);
        let most = (MAX_WINDOW_OFFERS / window) as u64;
        let message = tuned("HBRFS_BLOCKS_MESSAGE_BYTES", BLOCKS_MESSAGE_BYTES);
        Shape {
            chunk_blocks: chunk.clamp(1, most) as usize,
            window,
            message_bytes: message.clamp(64 * 1024, MAX_MESSAGE as u64 / 2) as usize,
            probe: tuned("HBRFS_RAW_PROBE", 1) != 0,
        }
    }
}

/// The sending half of a ship stream: messages out, throttled and counted.
struct Outbox<'a> {
    /// Dropped to end the request stream once Commit is sent.
    tx: Option<mpsc::Sender<ShipMessage>>,
    stats: &'a ReplStats,
    throttle: Option<&'a Mutex<Throttle>>,
}

/// One ship stream: messages out, replies in.
struct Stream<'a> {
    out: Outbox<'a>,
    replies: tonic::Streaming<ShipReply>,
}

impl Outbox<'_> {
    /// Sends one message once the `--max-rate` bucket allows it; fails if
    /// the stream takes no message for [`NO_PROGRESS_TIMEOUT`] (it stalled).
    async fn send(&self, body: ship_message::Body) -> Result<()> {
        let what = match &body {
            ship_message::Body::Begin(_) => "Begin",
            ship_message::Body::Manifest(_) => "Manifest",
            ship_message::Body::Offers(_) => "Offers",
            ship_message::Body::Blocks(_) => "Blocks",
            ship_message::Body::Commit(_) => "Commit",
        };
        let msg = ShipMessage { body: Some(body) };
        let len = prost::Message::encoded_len(&msg) as u64;
        let wait = self.throttle.map_or(Duration::ZERO, |t| {
            t.lock().expect("throttle lock").take(len)
        });
        tokio::time::sleep(wait).await;
        self.stats.wire_bytes.fetch_add(len, Ordering::Relaxed);
        let closed = || remote("ship", "stream closed by the secondary");
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        let sending = format!("(the stream took no {what} message)");
        within(NO_PROGRESS_TIMEOUT, &sending, async {
            tx.send(msg).await.map_err(|_| closed())
        })
        .await?;
        self.stats.progressed();
        Ok(())
    }
}

impl Stream<'_> {
    /// Sends one message (see [`Outbox::send`]).
    async fn send(&self, body: ship_message::Body) -> Result<()> {
        self.out.send(body).await
    }

    /// The secondary's answer to `what`, waited for at most `limit`.
    async fn reply(&mut self, what: &str, limit: Duration) -> Result<ship_reply::Body> {
        let reply = next_reply(&mut self.replies, what, limit).await?;
        self.out.stats.progressed();
        Ok(reply)
    }
}

/// Reads, zero-checks and hashes `blocks` of `file` as they were at the cut.
pub(super) fn read_and_hash(
    file: &TrackedFile,
    blocks: &[BlockNo],
    key: &HashKey,
) -> Result<Vec<ReadBlock>> {
    blocks
        .iter()
        .map(|&block| {
            let data = file.read_at_cut(block)?;
            let zero = block::is_zero(&data);
            Ok(ReadBlock {
                offer: Offer {
                    file_id: file.id.0,
                    block: block.0,
                    hash: if zero {
                        Vec::new()
                    } else {
                        key.hash(&data).to_bytes().to_vec()
                    },
                    zero,
                    length: data.len() as u32,
                },
                data,
            })
        })
        .collect()
}

/// `work` without its first `n` blocks (in order: files, then blocks).
fn skip_blocks(work: Work, mut n: usize) -> Work {
    work.into_iter()
        .filter_map(|(file, mut blocks)| {
            let skip = n.min(blocks.len());
            n -= skip;
            blocks.drain(..skip);
            (!blocks.is_empty()).then_some((file, blocks))
        })
        .collect()
}

/// A point's lists being cut into Manifest chunks of about
/// [`MANIFEST_CHUNK_BYTES`], each sent as soon as it is full.
struct Chunker {
    tx: mpsc::Sender<Result<Manifest>>,
    chunk: Manifest,
    bytes: usize,
}

impl Chunker {
    /// Counts `added` bytes just put in the chunk and sends the chunk once
    /// full; `false` once nobody receives (the stream failed).
    fn added(&mut self, added: usize) -> bool {
        self.bytes += added;
        if self.bytes < MANIFEST_CHUNK_BYTES {
            return true;
        }
        self.bytes = 0;
        let chunk = std::mem::take(&mut self.chunk);
        self.tx.blocking_send(Ok(chunk)).is_ok()
    }

    /// Sends `error` in place of the next chunk: the stream fails with it.
    fn failed(self, error: crate::error::Error) {
        let _ = self.tx.blocking_send(Err(error));
    }

    /// The namespace operations of the point, one journal record at a
    /// time (metadata records stay behind: they travel as the metadata
    /// itself), then every file's path and size at the cut, then the
    /// metadata the point changed (see `meta`), then the end.
    fn run(mut self, ds: &Datastore, base: Epoch, end: Epoch, files: &[Arc<TrackedFile>]) {
        let mut dirty = meta::Dirty::default();
        for op in ds.journal.ops_between(base, end) {
            let op = match op {
                Ok(op) => op,
                Err(e) => return self.failed(e),
            };
            dirty.add_op(&op);
            let Some(op) = wire_op(op) else {
                continue;
            };
            let len = op.encoded_len() + ENTRY_OVERHEAD;
            self.chunk.ops.push(op);
            if !self.added(len) {
                return;
            }
        }
        for f in files {
            dirty.paths.insert(f.at_cut().0);
            let (path, size) = f.at_cut();
            let file = FileState {
                file_id: f.id.0,
                path,
                size,
            };
            let len = file.encoded_len() + ENTRY_OVERHEAD;
            self.chunk.files.push(file);
            if !self.added(len) {
                return;
            }
        }
        let metas = match meta::read_metas(&ds.root, dirty) {
            Ok(metas) => metas,
            Err(e) => return self.failed(e),
        };
        for m in metas {
            let len = m.encoded_len() + ENTRY_OVERHEAD;
            self.chunk.metas.push(m);
            if !self.added(len) {
                return;
            }
        }
        self.chunk.end = true;
        let _ = self.tx.blocking_send(Ok(self.chunk));
    }
}

/// The Manifest chunks of `point`, made on a blocking thread (journal
/// reads) a couple ahead of the one being sent: the primary holds one or
/// two chunks of a point's lists at a time, however long its backlog.
pub(super) fn manifest_chunks(
    ds: Arc<Datastore>,
    point: &Point,
) -> mpsc::Receiver<Result<Manifest>> {
    let (tx, rx) = mpsc::channel(2);
    let (base, end) = (point.base(), point.epoch());
    let files = point.set().files.clone();
    let chunker = Chunker {
        tx,
        chunk: Manifest::default(),
        bytes: 0,
    };
    tokio::task::spawn_blocking(move || chunker.run(&ds, base, end, &files));
    rx
}

/// A namespace operation as it travels; `None` for a metadata record (it
/// travels as the metadata itself, in the point's metas).
fn wire_op(op: OpRecord) -> Option<NamespaceOp> {
    (op.kind() != JournalOpKind::Meta).then_some(NamespaceOp {
        kind: op.kind,
        file_id: op.file_id,
        path: op.path,
        // Rename flags, the new size or mknod's mode and device travel in
        // `size`.
        arg: op.size,
        target: op.target,
    })
}

/// The closed blocks of every file of `set`, listed on a blocking thread.
pub(super) async fn list_blocks(set: &ClosedSet) -> Result<Work> {
    let files = set.files.clone();
    blocking("listing blocks", move || {
        Ok(files
            .into_iter()
            .map(|f| {
                let blocks = f.closed_blocks();
                (f, blocks)
            })
            .collect())
    })
    .await
}

impl Replicator {
    /// Streams `point` to the secondary and waits until it is applied.
    pub(super) async fn ship(&self, client: &mut Client, point: &Point) -> Result<()> {
        let (tx, rx) = mpsc::channel::<ShipMessage>(4);
        let what = "(waiting for it to open the ship stream)";
        let replies = within(NO_PROGRESS_TIMEOUT, what, async {
            client
                .ship(ReceiverStream::new(rx))
                .await
                .map_err(ship_status)
        })
        .await?
        .into_inner();
        self.stats.progressed();
        let mut stream = Stream {
            out: Outbox {
                tx: Some(tx),
                stats: &self.stats,
                throttle: self.throttle.as_ref(),
            },
            replies,
        };
        let offers_done = self.begin(&mut stream, point).await?;
        let work = list_blocks(point.set()).await?;
        let total: u64 = work.iter().map(|(_, b)| b.len() as u64).sum();
        if offers_done > total {
            return Err(remote(
                "secondary",
                format!("claims {offers_done} offers of a point of {total} blocks"),
            ));
        }
        let work = skip_blocks(work, offers_done as usize);
        self.stats
            .start_ship(total, offers_done, point.base() == Epoch(0));
        let result = self.ship_blocks(work, &mut stream).await;
        self.stats.end_ship();
        result?;
        let epoch = point.epoch().0;
        stream
            .send(ship_message::Body::Commit(Commit { epoch }))
            .await?;
        stream.out.tx = None;
        // Applying a big point takes a while: a generous deadline that
        // grows with the point; the keepalive meanwhile notices a stall.
        let bytes = total.saturating_mul(self.ds.format.block_size.bytes());
        match stream.reply("Commit", apply_timeout(bytes)).await? {
            ship_reply::Body::Applied(a) if a.epoch == epoch => {
                self.stats.secondary_refused(epoch, &a.refusals);
                Ok(())
            }
            other => Err(unexpected("Commit", &other)),
        }
    }

    /// Sends Begin and the point's lists; returns how many offers the
    /// secondary already holds from a broken stream of the same point.
    async fn begin(&self, stream: &mut Stream<'_>, point: &Point) -> Result<u64> {
        let begin = Begin {
            epoch: point.epoch().0,
            base_epoch: point.base().0,
            point: point.id().to_vec(),
            resync_token: point.resync_token().to_vec(),
        };
        stream.send(ship_message::Body::Begin(begin)).await?;
        let mut chunks = manifest_chunks(self.ds.clone(), point);
        let mut sent = 0;
        while let Some(chunk) = chunks.recv().await {
            stream.send(ship_message::Body::Manifest(chunk?)).await?;
            sent += 1;
        }
        let offers_done = match stream.reply("Manifest", manifest_timeout(sent)).await? {
            ship_reply::Body::Resumed(r) => r.offers_done,
            other => return Err(unexpected("Manifest", &other)),
        };
        if offers_done > 0 {
            log::info!(
                "epoch {}: the secondary holds the first {offers_done} offers from a broken stream; \
                 resuming after them",
                point.epoch()
            );
        }
        Ok(offers_done)
    }

    /// Offers every block of `work` chunk by chunk and sends what is
    /// wanted. `work` (8 bytes per dirty block: the one list the primary
    /// holds that grows with the point) moves to the reader, not copied.
    async fn ship_blocks(&self, work: Work, stream: &mut Stream<'_>) -> Result<()> {
        let shape = Shape::new(self.ds.format.block_size.bytes());
        // Chunks are read and hashed ahead on a blocking thread while the
        // earlier ones are offered, answered, compressed and sent.
        let (chunk_tx, chunks) = mpsc::channel::<Result<Vec<ReadBlock>>>(READ_AHEAD);
        let key = self.key.clone();
        let chunk_blocks = shape.chunk_blocks;
        let reader = tokio::task::spawn_blocking(move || {
            for (file, blocks) in work {
                for chunk in blocks.chunks(chunk_blocks) {
                    let read = read_and_hash(&file, chunk, &key);
                    let failed = read.is_err();
                    if chunk_tx.blocking_send(read).is_err() || failed {
                        return;
                    }
                }
            }
        });
        // The reader stops at its next chunk once nobody receives.
        let result = self.pipeline(chunks, stream, &shape).await;
        reader.await.map_err(|e| remote("reading blocks", e))?;
        result
    }

    /// The ship's three stages, running at once: offering chunks (at most
    /// `shape.window` whose blocks are not all sent), reading the wants
    /// (answers come in the order of the offers) and starting their
    /// compression on the workers, and sending the compressed blocks in
    /// the order of the offers. A chunk's window slot is freed once its
    /// last block is handed to the stream, so the secondary never holds
    /// more than `shape.window` chunks of offers awaiting blocks (within
    /// [`MAX_WINDOW_OFFERS`]). The first stage to fail ends all three.
    async fn pipeline(
        &self,
        mut chunks: mpsc::Receiver<Result<Vec<ReadBlock>>>,
        stream: &mut Stream<'_>,
        shape: &Shape,
    ) -> Result<()> {
        let slots = Semaphore::new(shape.window);
        let (offered_tx, mut offered) = mpsc::channel(shape.window);
        let (packing_tx, mut packing) = mpsc::channel(shape.window);
        let (out, replies) = (&stream.out, &mut stream.replies);
        let (slots, stats) = (&slots, &self.stats);
        let stopped = || remote("ship", "a stage of the pipeline stopped");
        let offer = async move {
            while let Some(read) = chunks.recv().await {
                let read = read?;
                let slot = slots.acquire().await.map_err(|_| stopped())?;
                let offers = self.count_offers(&read);
                out.send(ship_message::Body::Offers(Offers { offers }))
                    .await?;
                offered_tx.send((read, slot)).await.map_err(|_| stopped())?;
            }
            Ok::<_, crate::error::Error>(())
        };
        let (level, probe) = (self.opts.level, shape.probe);
        let answer = async move {
            while let Some((read, slot)) = offered.recv().await {
                let wants = match next_reply(replies, "Offers", NO_PROGRESS_TIMEOUT).await? {
                    ship_reply::Body::Wants(w) => w,
                    other => return Err(unexpected("Offers", &other)),
                };
                stats.progressed();
                let count = read.len() as u64;
                let wanted = take_wanted(read, wants.positions)?;
                let packed = tokio::task::spawn_blocking(move || pack_blocks(wanted, level, probe));
                packing_tx
                    .send((packed, count, slot))
                    .await
                    .map_err(|_| stopped())?;
            }
            Ok(())
        };
        let send = async move {
            while let Some((packed, count, slot)) = packing.recv().await {
                let packed = packed.await.map_err(|e| remote("compressing", e))??;
                self.send_blocks(packed, out, shape.message_bytes).await?;
                stats.ship_done.fetch_add(count, Ordering::Relaxed);
                drop(slot);
            }
            Ok(())
        };
        tokio::try_join!(offer, answer, send).map(|_| ())
    }

    /// Counts the offers of a chunk read and returns them.
    pub(super) fn count_offers(&self, read: &[ReadBlock]) -> Vec<Offer> {
        let offers: Vec<Offer> = read.iter().map(|r| r.offer.clone()).collect();
        let zeros = offers.iter().filter(|o| o.zero).count() as u64;
        let bytes = |zero_only: bool| {
            (offers.iter())
                .filter(|o| o.zero || !zero_only)
                .map(|o| u64::from(o.length))
                .sum::<u64>()
        };
        let stats = &self.stats;
        stats
            .blocks_offered
            .fetch_add(offers.len() as u64, Ordering::Relaxed);
        stats.blocks_zero.fetch_add(zeros, Ordering::Relaxed);
        stats
            .bytes_offered
            .fetch_add(bytes(false), Ordering::Relaxed);
        stats.bytes_zero.fetch_add(bytes(true), Ordering::Relaxed);
        offers
    }

    /// Counts a block sent (to a secondary or into a pack).
    pub(super) fn count_sent(&self, b: &PackedBlock) {
        let stats = &self.stats;
        stats.blocks_sent.fetch_add(1, Ordering::Relaxed);
        if b.raw {
            stats.blocks_raw.fetch_add(1, Ordering::Relaxed);
        }
        (stats.raw_bytes_sent).fetch_add(b.length as u64, Ordering::Relaxed);
        (stats.compressed_bytes_sent).fetch_add(b.block.zstd.len() as u64, Ordering::Relaxed);
    }

    /// Sends packed blocks in messages of at most `message_bytes` or
    /// [`MAX_BLOCKS`] blocks.
    async fn send_blocks(
        &self,
        packed: Vec<PackedBlock>,
        out: &Outbox<'_>,
        message_bytes: usize,
    ) -> Result<()> {
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for b in packed {
            self.count_sent(&b);
            batch_bytes += b.block.zstd.len();
            batch.push(b.block);
            if batch_bytes >= message_bytes || batch.len() >= MAX_BLOCKS {
                let blocks = std::mem::take(&mut batch);
                out.send(ship_message::Body::Blocks(Blocks { blocks }))
                    .await?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            out.send(ship_message::Body::Blocks(Blocks { blocks: batch }))
                .await?;
        }
        Ok(())
    }
}

/// The blocks of a chunk at the offer positions the secondary wants; a
/// position that was not offered (or was a zero marker) is an error.
fn take_wanted(read: Vec<ReadBlock>, positions: Vec<u32>) -> Result<Vec<ReadBlock>> {
    let mut read: Vec<Option<ReadBlock>> = read.into_iter().map(Some).collect();
    positions
        .into_iter()
        .map(|p| {
            read.get_mut(p as usize)
                .and_then(Option::take)
                .filter(|b| !b.offer.zero)
                .ok_or_else(|| {
                    remote(
                        "secondary",
                        format!("wanted offer {p}, which was not offered"),
                    )
                })
        })
        .collect()
}

/// A wanted block ready to send, with its raw length and whether the
/// probe sent it raw.
pub(super) struct PackedBlock {
    pub(super) block: Block,
    pub(super) length: usize,
    raw: bool,
}

/// Packs `wanted` at `level` across the workers (compression is the
/// costly step; `probe`: incompressible blocks go raw, see `block::pack`),
/// in order. Blocks the calling thread until the workers are done.
pub(super) fn pack_blocks(
    wanted: Vec<ReadBlock>,
    level: i32,
    probe: bool,
) -> Result<Vec<PackedBlock>> {
    let packed = crate::workers::map(wanted, move |b| {
        let packed = if probe {
            block::pack(&b.data, level)
        } else {
            block::compress(&b.data, level).map(|frame| block::Packed { frame, raw: false })
        };
        packed.map(|p| PackedBlock {
            block: Block {
                file_id: b.offer.file_id,
                block: b.offer.block,
                zstd: p.frame,
            },
            length: b.data.len(),
            raw: p.raw,
        })
    })
    .ok_or_else(|| remote("compressing", "a block worker stopped"))?;
    packed
        .into_iter()
        .collect::<std::io::Result<_>>()
        .at("zstd")
}
