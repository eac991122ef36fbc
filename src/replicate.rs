//! The primary's replicator: every RPO tick it cuts a point (tracking's
//! `begin_ship`), offers a keyed hash per dirty block, sends zstd-compressed
//! only what the secondary wants (zero blocks as markers), commits, and
//! forgets the point only once the secondary says it is applied. A failed
//! ship leaves the point waiting; the next one folds in everything written
//! since, so the replica still only ever moves between consistent points.
//!
//! Reading, hashing and compressing run on blocking threads, never on the
//! FUSE threads and never on the async runtime's workers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client that authenticates every request.
type Client = ReplicationClient<InterceptedService<Channel, PresentKey>>;

/// Connects to the secondary at `addr` over the pair's TLS (`tls`),
/// presenting `key`.
async fn client(addr: &str, key: &AuthKey, timeout: Duration) -> Result<Client> {
    let url = format!("https://{addr}");
    let channel = Channel::from_shared(url.clone())
        .map_err(|e| remote(&url, e))?
        .tls_config(crate::tls::client_config(key)?)
        .map_err(|e| remote(&url, e))?
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| connect_error(addr, &e))?;
    Ok(
        ReplicationClient::with_interceptor(channel, PresentKey(key.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

/// A failed connection, with every cause (the useful one, e.g. a refused
/// certificate, is deep in the chain) and what it most likely means.
fn connect_error(addr: &str, e: &tonic::transport::Error) -> Error {
    let mut causes = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let all = causes.join(": ");
    let hint = if all.contains("certificate") {
        " (the secondary's TLS certificate is not from this pair's key: a wrong key; \
         --auth-key must be a copy of the secondary's REPLICA/.hbrfs/auth.key)"
    } else {
        ""
    };
    Error::Remote(format!("connecting to {addr}: {all}{hint}"))
}

use crate::auth::{AuthKey, PresentKey};
use crate::block::{self, HashKey};
use crate::datastore::Datastore;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::ids::Epoch;
use crate::journal::ShippedPoint;
use crate::proto::replication::replication_client::ReplicationClient;
use crate::proto::replication::{
    Begin, Block, Blocks, Commit, FileState, HelloRequest, NamespaceOp, Offer, Offers, ShipMessage,
    ShipReply, VerifyFile, VerifyRequest, ship_message, ship_reply,
};
use crate::state::{hex, now_ns, write_durably};
use crate::throttle::Throttle;
use crate::tracking::{ShipSet, TrackedFile};
use crate::wire::{MAX_BLOCKS, MAX_MESSAGE, PROTOCOL_VERSION};

/// Blocks read, hashed and offered per round trip.
const OFFER_CHUNK: usize = 256;
/// Chunks read and hashed ahead of the one being offered.
const READ_AHEAD: usize = 2;
/// Compressed bytes per Blocks message (well under the message limit).
const BLOCKS_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How to replicate.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// The secondary, e.g. `127.0.0.1:7070`.
    pub addr: String,
    /// Cut and ship this often.
    pub rpo: Duration,
    /// zstd level for blocks.
    pub level: i32,
    /// The key the secondary expects.
    pub key: AuthKey,
    /// Cap on replication bandwidth, bytes per second.
    pub max_rate: Option<u64>,
}

/// Counters for `hbrfs status`.
#[derive(Debug, Default)]
pub struct ReplStats {
    connected: AtomicBool,
    last_applied: AtomicU64,
    /// When the last applied point was cut: the replica's age is measured
    /// from here.
    last_applied_cut_ns: AtomicU64,
    epochs_shipped: AtomicU64,
    blocks_offered: AtomicU64,
    blocks_zero: AtomicU64,
    blocks_sent: AtomicU64,
    raw_bytes_sent: AtomicU64,
    compressed_bytes_sent: AtomicU64,
    wire_bytes: AtomicU64,
    last_error: Mutex<String>,
    /// `--max-rate`, 0 for none.
    max_rate: AtomicU64,
    /// The ship in progress: blocks to offer, blocks offered so far, when
    /// it started (0 when none), and whether it is a full baseline.
    ship_total: AtomicU64,
    ship_done: AtomicU64,
    ship_started_ns: AtomicU64,
    ship_wire_start: AtomicU64,
    baseline: AtomicBool,
}

impl ReplStats {
    /// The counters as JSON, with the derived ratios.
    pub fn report(&self) -> Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let offered = l(&self.blocks_offered);
        let nonzero = offered.saturating_sub(l(&self.blocks_zero));
        let sent = l(&self.blocks_sent);
        let cut = l(&self.last_applied_cut_ns);
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "last_applied_epoch": l(&self.last_applied),
            "last_applied_cut_ns": cut,
            "replica_age_ms": if cut == 0 { Value::Null } else { json!(now_ns().saturating_sub(cut) / 1_000_000) },
            "epochs_shipped": l(&self.epochs_shipped),
            "blocks_offered": offered,
            "blocks_zero": l(&self.blocks_zero),
            "blocks_sent": sent,
            "blocks_have": nonzero.saturating_sub(sent),
            "dedup_ratio": if nonzero == 0 { 0.0 } else { (nonzero - sent) as f64 / nonzero as f64 },
            "raw_bytes_sent": l(&self.raw_bytes_sent),
            "compressed_bytes_sent": l(&self.compressed_bytes_sent),
            "compression_ratio": ratio(l(&self.raw_bytes_sent), l(&self.compressed_bytes_sent)),
            "wire_bytes": l(&self.wire_bytes),
            "max_rate_bytes_per_s": match l(&self.max_rate) { 0 => Value::Null, r => json!(r) },
            "shipping": self.progress(),
            "last_error": self.last_error.lock().expect("error lock").clone(),
        })
    }

    /// The ship in progress: blocks done of total, wire rate, and an
    /// estimate of the time left; null when nothing ships.
    fn progress(&self) -> Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let started = l(&self.ship_started_ns);
        if started == 0 {
            return Value::Null;
        }
        let secs = now_ns().saturating_sub(started) as f64 / 1e9;
        let (done, total) = (l(&self.ship_done), l(&self.ship_total));
        let rate =
            l(&self.wire_bytes).saturating_sub(l(&self.ship_wire_start)) as f64 / secs.max(1e-3);
        let eta = (done > 0).then(|| secs * (total.saturating_sub(done)) as f64 / done as f64);
        json!({
            "baseline": self.baseline.load(Ordering::Relaxed),
            "blocks_done": done,
            "blocks_total": total,
            "seconds": secs,
            "wire_bytes_per_s": rate,
            "eta_s": eta,
        })
    }

    fn fail(&self, e: &Error) {
        log::warn!("replication: {e}");
        self.connected.store(false, Ordering::Relaxed);
        *self.last_error.lock().expect("error lock") = e.to_string();
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn remote(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Remote(format!("{what}: {e}"))
}

/// The secondary's next reply on a ship stream, to the message `what`.
async fn next_reply(
    replies: &mut tonic::Streaming<ShipReply>,
    what: &str,
) -> Result<ship_reply::Body> {
    match replies.message().await.map_err(ship_status)? {
        Some(ShipReply { body: Some(body) }) => Ok(body),
        Some(_) => Err(remote(
            "secondary",
            format!("answered {what} with an empty reply"),
        )),
        None => Err(remote(
            "secondary",
            format!("closed the stream before answering {what}"),
        )),
    }
}

/// A reply that does not answer `what`.
fn unexpected(what: &str, reply: &ship_reply::Body) -> Error {
    remote("secondary", format!("answered {what} with {reply:?}"))
}

/// An error status from the secondary during a ship: a refusal of the
/// point (invalid argument) or a failure.
fn ship_status(s: tonic::Status) -> Error {
    if s.code() == tonic::Code::InvalidArgument {
        Error::Refused(s.message().to_string())
    } else {
        remote("secondary", s.message())
    }
}

/// The pair's hash key, made once and kept in the state folder.
fn pair_key(ds: &Datastore) -> Result<HashKey> {
    let path = ds.paths.pair_key();
    if let Ok(bytes) = std::fs::read(&path) {
        return HashKey::from_bytes(&bytes).ok_or_else(|| Error::BadState {
            path: path.clone(),
            reason: format!(
                "hash key of {} bytes, expected {}",
                bytes.len(),
                block::SECRET_LEN
            ),
        });
    }
    let key = HashKey::random().at("/dev/urandom")?;
    write_durably(&path, key.as_bytes())?;
    Ok(key)
}

/// One block read for an offer.
struct ReadBlock {
    offer: Offer,
    data: Vec<u8>,
}

/// Reads, zero-checks and hashes `blocks` of `file` as they were at the cut.
fn read_and_hash(file: &TrackedFile, blocks: &[u64], key: &HashKey) -> Result<Vec<ReadBlock>> {
    blocks
        .iter()
        .map(|&block| {
            let data = file.read_for_ship(block)?;
            let zero = block::is_zero(&data);
            Ok(ReadBlock {
                offer: Offer {
                    file_id: file.id.0,
                    block,
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
fn skip_blocks(
    work: Vec<(Arc<TrackedFile>, Vec<u64>)>,
    mut n: usize,
) -> Vec<(Arc<TrackedFile>, Vec<u64>)> {
    work.into_iter()
        .filter_map(|(file, blocks)| {
            let skip = n.min(blocks.len());
            n -= skip;
            (skip < blocks.len()).then(|| (file, blocks[skip..].to_vec()))
        })
        .collect()
}

/// The primary's replicator.
#[derive(Debug)]
pub struct Replicator {
    ds: Arc<Datastore>,
    opts: ReplicateOptions,
    key: HashKey,
    /// Counters, shared with the control socket.
    pub stats: Arc<ReplStats>,
    /// The `--max-rate` bucket; no `.await` happens under the lock.
    throttle: Option<Mutex<Throttle>>,
    /// Held by a tick and by `verify`, so verify never runs while a point
    /// is shipping or applying.
    turn: tokio::sync::Mutex<()>,
    /// A point whose stream broke, kept (with its pre-images) to ship
    /// again unchanged, so the secondary can resume it.
    held: Mutex<Option<Held>>,
}

/// A cut point being shipped, and the replica epoch it is based on.
#[derive(Debug)]
struct Held {
    set: Arc<ShipSet>,
    point: ShippedPoint,
    base: u64,
}

impl Replicator {
    /// A replicator for `ds`; makes the pair key on first use.
    pub fn new(ds: Arc<Datastore>, opts: ReplicateOptions) -> Result<Replicator> {
        let key = pair_key(&ds)?;
        let stats = Arc::new(ReplStats::default());
        stats
            .max_rate
            .store(opts.max_rate.unwrap_or(0), Ordering::Relaxed);
        let shipped = ds.journal.last_shipped()?;
        stats
            .last_applied
            .store(shipped.map_or(0, |p| p.epoch.0), Ordering::Relaxed);
        Ok(Replicator {
            throttle: opts.max_rate.map(|r| Mutex::new(Throttle::new(r))),
            turn: tokio::sync::Mutex::new(()),
            held: Mutex::new(None),
            ds,
            opts,
            key,
            stats,
        })
    }

    /// Ships points every RPO until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut client: Option<(Client, u64)> = None;
        let mut backoff = Duration::from_millis(250);
        loop {
            // A (re)connect is followed by a tick at once, in the same turn.
            let wait = if client.is_some() {
                self.opts.rpo
            } else {
                backoff
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
            if client.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        backoff = Duration::from_millis(250);
                        client = Some(c);
                    }
                    Err(e) => {
                        self.stats.fail(&e);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let (mut c, applied) = client.take().expect("connected above");
            let turn = self.turn.lock().await;
            let ticked = self.tick(&mut c, applied).await;
            drop(turn);
            match ticked {
                Ok(applied) => client = Some((c, applied)),
                Err(e) => self.stats.fail(&e),
            }
        }
    }

    /// Says hello; returns the client and the replica's last applied epoch.
    async fn connect(&self) -> Result<(Client, u64)> {
        let mut client = client(&self.opts.addr, &self.opts.key, Duration::from_secs(5)).await?;
        let hello = HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            datastore_id: self.ds.format.id.clone(),
            block_size: self.ds.format.block_size.bytes() as u32,
            hash_key: self.key.as_bytes().to_vec(),
        };
        let reply = client
            .hello(hello)
            .await
            .map_err(|s| {
                remote(
                    &format!("hello to secondary {}", self.opts.addr),
                    s.message(),
                )
            })?
            .into_inner();
        let applied = reply.last_applied_epoch;
        self.check_history(applied, &reply.last_applied_point)
            .await?;
        log::info!(
            "connected to secondary {} (at epoch {applied})",
            self.opts.addr
        );
        self.stats.connected.store(true, Ordering::Relaxed);
        self.stats.last_applied.store(applied, Ordering::Relaxed);
        Ok((client, applied))
    }

    /// `hbrfs verify`: compares every clean block (dirty ones ship with the
    /// next point anyway, so they are no difference) with the replica at
    /// the last shipped point, by keyed hash; with `repair`, marks the
    /// differing blocks so the next point ships them.
    pub async fn verify(&self, repair: bool) -> Result<Value> {
        const CHUNK: usize = 16_384;
        let _turn = self.turn.lock().await;
        let mut c = client(&self.opts.addr, &self.opts.key, Duration::from_secs(5)).await?;
        let applied = c
            .status(crate::proto::replication::StatusRequest {})
            .await
            .map_err(|s| remote("secondary", s.message()))?
            .into_inner()
            .last_applied_epoch;
        let shipped = self.ds.journal.last_shipped()?.map_or(0, |p| p.epoch.0);
        if applied != shipped || applied == 0 {
            return Err(Error::Remote(format!(
                "the secondary is at epoch {applied} and the last point shipped is {shipped}: \
                 verify once a point has been applied"
            )));
        }
        let (mut checked, mut skipped) = (0u64, 0u64);
        let mut differences = Vec::new();
        for file in self
            .ds
            .tracker
            .all_files()
            .into_iter()
            .filter(|f| !f.is_gone())
        {
            let blocks: Vec<u64> =
                (0..file.size().div_ceil(self.ds.format.block_size.bytes())).collect();
            let mut differing = Vec::new();
            let mut path = Vec::new();
            let mut size_differs = None;
            for chunk in blocks.chunks(CHUNK) {
                let count = chunk.len();
                let (f, chunk, key) = (file.clone(), chunk.to_vec(), self.key.clone());
                let vf = tokio::task::spawn_blocking(move || -> Result<VerifyFile> {
                    let mut vf = VerifyFile {
                        file_id: f.id.0,
                        size: f.size(),
                        idle: !f.has_pending(),
                        ..Default::default()
                    };
                    for b in chunk {
                        if let Some(data) = f.read_clean(b)? {
                            vf.blocks.push(b);
                            vf.hashes.push(key.hash(&data).to_bytes().to_vec());
                        }
                    }
                    Ok(vf)
                })
                .await
                .map_err(|e| remote("reading blocks", e))??;
                checked += vf.blocks.len() as u64;
                skipped += (count - vf.blocks.len()) as u64;
                if vf.blocks.is_empty() {
                    continue;
                }
                let reply = c
                    .verify(VerifyRequest {
                        epoch: applied,
                        files: vec![vf],
                    })
                    .await
                    .map_err(|s| remote("secondary", s.message()))?
                    .into_inner();
                for r in reply.files {
                    path = r.path;
                    differing.extend(r.differing);
                    if r.size_differs {
                        size_differs = Some(r.size);
                    }
                }
            }
            if differing.is_empty() && size_differs.is_none() {
                continue;
            }
            if repair {
                self.ds.tracker.mark_for_repair(&file, &differing)?;
            }
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for b in &differing {
                match ranges.last_mut() {
                    Some((first, n)) if *first + *n == *b => *n += 1,
                    _ => ranges.push((*b, 1)),
                }
            }
            let shown = if path.is_empty() {
                file.at_cut().0
            } else {
                path
            };
            differences.push(json!({
                "path": String::from_utf8_lossy(&shown),
                "file_id": file.id.0,
                "blocks": differing.len(),
                "replica_size": size_differs,
                "size": file.size(),
                "ranges": ranges.iter().map(|(f, n)| json!({"first_block": f, "blocks": n})).collect::<Vec<_>>(),
            }));
        }
        Ok(json!({
            "epoch": applied,
            "blocks_checked": checked,
            "blocks_dirty_skipped": skipped,
            "differences": differences,
            "repaired": repair && !differences.is_empty(),
        }))
    }

    /// Compares the secondary's last applied point with this primary's
    /// history: the same point, the point whose acknowledgement was lost, or
    /// an empty replica (baseline) are fine; anything else means the two
    /// histories diverged, and nothing is sent.
    async fn check_history(&self, applied: u64, point: &[u8]) -> Result<()> {
        let journal = &self.ds.journal;
        let shipped = journal.last_shipped()?;
        let pending = journal.pending_point()?;
        let is = |p: &Option<ShippedPoint>| {
            p.is_some_and(|p| p.epoch.0 == applied && p.id[..] == *point)
        };
        if is(&shipped) {
            return Ok(());
        }
        if is(&pending) {
            log::info!("the secondary applied epoch {applied} before its acknowledgement was lost");
            return journal.set_last_shipped(&pending.expect("matched above"));
        }
        if applied == 0 && point.is_empty() {
            if shipped.is_some() {
                log::warn!(
                    "the secondary holds nothing of this datastore: shipping everything (baseline)"
                );
                let ds = self.ds.clone();
                tokio::task::spawn_blocking(move || ds.tracker.mark_everything())
                    .await
                    .map_err(|e| remote("baseline", e))??;
            }
            return Ok(());
        }
        let point_hex = hex(point);
        let show = |p: Option<ShippedPoint>| {
            p.map_or("none".to_string(), |p| {
                format!("epoch {} (point {})", p.epoch, p.id_hex())
            })
        };
        Err(Error::Remote(format!(
            "histories diverged: the secondary {} last applied epoch {applied} (point {point_hex}), but this primary last \
             shipped {} and was shipping {}. Nothing was sent or overwritten. If this primary is right, reseed the \
             secondary: stop it and run `rm -rf REPLICA_DIR/.hbrfs` there (a full resync), or replicate to a new \
             replica folder.",
            self.opts.addr,
            show(shipped),
            show(pending)
        )))
    }

    /// The point to ship now: the held one again if the replica is still
    /// at its base, else a new cut; `None` when nothing changed.
    async fn next_point(&self, applied: u64) -> Result<Option<Held>> {
        let held = self.held.lock().expect("held lock").take();
        if let Some(h) = held {
            if h.base == applied {
                return Ok(Some(h));
            }
            let ds = self.ds.clone();
            if applied == h.point.epoch.0 {
                // Applied before the acknowledgement was lost (the hello
                // found it): done, nothing to resend.
                log::info!("epoch {applied} was applied before its stream broke");
                tokio::task::spawn_blocking(move || ds.tracker.finish_ship(&h.set, &h.point))
                    .await
                    .map_err(|e| remote("finishing ship", e))??;
            } else {
                self.ds.tracker.abort_ship(&h.set);
            }
        }
        let ds = self.ds.clone();
        let Some(set) = tokio::task::spawn_blocking(move || ds.tracker.begin_ship())
            .await
            .map_err(|e| remote("cut", e))??
        else {
            return Ok(None);
        };
        let point = ShippedPoint {
            epoch: set.end,
            id: crate::sys::random_bytes().at("/dev/urandom")?,
        };
        let held = Held {
            set: Arc::new(set),
            point,
            base: applied,
        };
        if let Err(e) = self.ds.journal.set_pending_point(&held.point) {
            self.ds.tracker.abort_ship(&held.set);
            return Err(e);
        }
        Ok(Some(held))
    }

    /// One RPO tick: cut and ship if anything changed; returns the
    /// replica's epoch afterwards.
    async fn tick(&self, client: &mut Client, applied: u64) -> Result<u64> {
        let Some(held) = self.next_point(applied).await? else {
            // Nothing changed since the last point: the replica equals the
            // primary now, so its age is zero (not the time since a cut).
            self.stats
                .last_applied_cut_ns
                .store(now_ns(), Ordering::Relaxed);
            return Ok(applied);
        };
        let (set, point) = (held.set.clone(), held.point);
        match self.ship(client, &set, applied, &point).await {
            Ok(()) => {
                // The secondary holds the point: say so before the blocks
                // turn clean, so status never shows clean blocks and an
                // older point.
                let cut = self.ds.journal.epoch(set.end)?.map_or(0, |r| r.closed_ns);
                self.stats
                    .last_applied
                    .store(set.end.0.max(applied), Ordering::Relaxed);
                self.stats.last_applied_cut_ns.store(cut, Ordering::Relaxed);
                self.stats.epochs_shipped.fetch_add(1, Ordering::Relaxed);
                let ds = self.ds.clone();
                let done = set.clone();
                tokio::task::spawn_blocking(move || ds.tracker.finish_ship(&done, &point))
                    .await
                    .map_err(|e| remote("finishing ship", e))??;
                Ok(set.end.0.max(applied))
            }
            Err(e) if e.kind() == ErrorKind::Refused => {
                // Sending it again would be refused again: fold it into
                // the next cut.
                self.ds.tracker.abort_ship(&set);
                Err(e)
            }
            Err(e) => {
                // The connection broke: the same point ships again on
                // reconnect, from where the secondary says it stopped.
                *self.held.lock().expect("held lock") = Some(held);
                Err(e)
            }
        }
    }

    /// Streams one point to the secondary and waits until it is applied.
    async fn ship(
        &self,
        client: &mut Client,
        set: &ShipSet,
        base: u64,
        point: &ShippedPoint,
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel::<ShipMessage>(4);
        let mut replies = client
            .ship(ReceiverStream::new(rx))
            .await
            .map_err(ship_status)?
            .into_inner();
        let send = |body: ship_message::Body| {
            let tx = tx.clone();
            let stats = self.stats.clone();
            let msg = ShipMessage { body: Some(body) };
            let len = prost::Message::encoded_len(&msg) as u64;
            let wait = self.throttle.as_ref().map_or(Duration::ZERO, |t| {
                t.lock().expect("throttle lock").take(len)
            });
            async move {
                tokio::time::sleep(wait).await;
                stats.wire_bytes.fetch_add(len, Ordering::Relaxed);
                tx.send(msg)
                    .await
                    .map_err(|_| remote("ship", "stream closed by the secondary"))
            }
        };
        let ops = self
            .ds
            .journal
            .ops_between(Epoch(base), set.end)?
            .into_iter()
            .map(|op| NamespaceOp {
                kind: op.kind,
                file_id: op.file_id,
                path: op.path,
                // Rename flags or the new size travel in `size`.
                arg: op.size,
                target: op.target,
            })
            .collect();
        let files = set
            .files
            .iter()
            .map(|f| {
                let (path, size) = f.at_cut();
                FileState {
                    file_id: f.id.0,
                    path,
                    size,
                }
            })
            .collect();
        send(ship_message::Body::Begin(Begin {
            epoch: set.end.0,
            base_epoch: base,
            ops,
            files,
            point: point.id.to_vec(),
        }))
        .await?;
        let offers_done = match next_reply(&mut replies, "Begin").await? {
            ship_reply::Body::Resumed(r) => r.offers_done,
            other => return Err(unexpected("Begin", &other)),
        };
        if offers_done > 0 {
            log::info!(
                "epoch {}: the secondary holds the first {offers_done} offers from a broken stream; \
                 resuming after them",
                set.end
            );
        }
        let files = set.files.clone();
        let work = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|f| {
                    let blocks = f.closed_blocks();
                    (f, blocks)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| remote("listing blocks", e))?;
        let total: u64 = work.iter().map(|(_, b)| b.len() as u64).sum();
        if offers_done > total {
            return Err(remote(
                "secondary",
                format!("claims {offers_done} offers of a point of {total} blocks"),
            ));
        }
        let work = skip_blocks(work, offers_done as usize);
        let stats = &self.stats;
        stats.ship_total.store(total, Ordering::Relaxed);
        stats.ship_done.store(offers_done, Ordering::Relaxed);
        stats
            .ship_wire_start
            .store(stats.wire_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        stats.baseline.store(base == 0, Ordering::Relaxed);
        stats.ship_started_ns.store(now_ns(), Ordering::Relaxed);
        let result = self.ship_blocks(&work, &send, &mut replies).await;
        stats.ship_started_ns.store(0, Ordering::Relaxed);
        result?;
        send(ship_message::Body::Commit(Commit { epoch: set.end.0 })).await?;
        drop(tx);
        match next_reply(&mut replies, "Commit").await? {
            ship_reply::Body::Applied(a) if a.epoch == set.end.0 => Ok(()),
            other => Err(unexpected("Commit", &other)),
        }
    }

    /// Offers every block of `work` chunk by chunk and sends what is wanted.
    async fn ship_blocks<F, Fut>(
        &self,
        work: &[(Arc<TrackedFile>, Vec<u64>)],
        send: &F,
        replies: &mut tonic::Streaming<ShipReply>,
    ) -> Result<()>
    where
        F: Fn(ship_message::Body) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        // Chunks are read and hashed ahead on a blocking thread while the
        // previous one is answered, compressed and sent.
        let (chunk_tx, mut chunks) = mpsc::channel::<Result<Vec<ReadBlock>>>(READ_AHEAD);
        let (work, key) = (work.to_vec(), self.key.clone());
        let reader = tokio::task::spawn_blocking(move || {
            for (file, blocks) in work {
                for chunk in blocks.chunks(OFFER_CHUNK) {
                    let read = read_and_hash(&file, chunk, &key);
                    let failed = read.is_err();
                    if chunk_tx.blocking_send(read).is_err() || failed {
                        return;
                    }
                }
            }
        });
        let mut result = Ok(());
        while let Some(read) = chunks.recv().await {
            result = match read {
                Ok(read) => self.offer_chunk(read, send, replies).await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                break;
            }
        }
        // The reader stops at its next chunk once nobody receives.
        drop(chunks);
        reader.await.map_err(|e| remote("reading blocks", e))?;
        result
    }

    /// Offers one chunk of read blocks and sends what the secondary wants.
    async fn offer_chunk<F, Fut>(
        &self,
        read: Vec<ReadBlock>,
        send: &F,
        replies: &mut tonic::Streaming<ShipReply>,
    ) -> Result<()>
    where
        F: Fn(ship_message::Body) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let count = read.len() as u64;
        let offers: Vec<Offer> = read.iter().map(|r| r.offer.clone()).collect();
        let zeros = offers.iter().filter(|o| o.zero).count() as u64;
        self.stats
            .blocks_offered
            .fetch_add(offers.len() as u64, Ordering::Relaxed);
        self.stats.blocks_zero.fetch_add(zeros, Ordering::Relaxed);
        send(ship_message::Body::Offers(Offers { offers })).await?;
        let wants = match next_reply(replies, "Offers").await? {
            ship_reply::Body::Wants(w) => w,
            other => return Err(unexpected("Offers", &other)),
        };
        self.send_wanted(read, wants.positions, send).await?;
        self.stats.ship_done.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// Compresses the wanted blocks of a chunk and sends them.
    async fn send_wanted<F, Fut>(
        &self,
        read: Vec<ReadBlock>,
        positions: Vec<u32>,
        send: &F,
    ) -> Result<()>
    where
        F: Fn(ship_message::Body) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut wanted = Vec::with_capacity(positions.len());
        let mut read: Vec<Option<ReadBlock>> = read.into_iter().map(Some).collect();
        for p in positions {
            let block = read
                .get_mut(p as usize)
                .and_then(Option::take)
                .filter(|b| !b.offer.zero)
                .ok_or_else(|| {
                    remote(
                        "secondary",
                        format!("wanted offer {p}, which was not offered"),
                    )
                })?;
            wanted.push(block);
        }
        // Compression is the costly step: the wanted blocks are split
        // across the cores.
        let level = self.opts.level;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_task = wanted.len().div_ceil(cores).max(1);
        let mut tasks = Vec::new();
        while !wanted.is_empty() {
            let part: Vec<ReadBlock> = wanted.drain(..per_task.min(wanted.len())).collect();
            tasks.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|b| {
                        block::compress(&b.data, level).map(|z| {
                            (
                                Block {
                                    file_id: b.offer.file_id,
                                    block: b.offer.block,
                                    zstd: z,
                                },
                                b.data.len(),
                            )
                        })
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            }));
        }
        let mut compressed = Vec::new();
        for task in tasks {
            compressed.extend(
                task.await
                    .map_err(|e| remote("compressing", e))?
                    .at("zstd")?,
            );
        }
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for (block, raw) in compressed {
            self.stats.blocks_sent.fetch_add(1, Ordering::Relaxed);
            self.stats
                .raw_bytes_sent
                .fetch_add(raw as u64, Ordering::Relaxed);
            self.stats
                .compressed_bytes_sent
                .fetch_add(block.zstd.len() as u64, Ordering::Relaxed);
            batch_bytes += block.zstd.len();
            batch.push(block);
            if batch_bytes >= BLOCKS_MESSAGE_BYTES || batch.len() >= MAX_BLOCKS {
                send(ship_message::Body::Blocks(Blocks {
                    blocks: std::mem::take(&mut batch),
                }))
                .await?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            send(ship_message::Body::Blocks(Blocks { blocks: batch })).await?;
        }
        Ok(())
    }
}

/// Asks a running secondary for its counters (for `hbrfs status`).
pub fn remote_status(addr: &str, key: &AuthKey) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at("tokio runtime")?;
    rt.block_on(async {
        let s = client(addr, key, Duration::from_secs(2))
            .await?
            .status(crate::proto::replication::StatusRequest {})
            .await
            .map_err(|e| remote(addr, e.message()))?
            .into_inner();
        Ok(json!({
            "last_applied_epoch": s.last_applied_epoch,
            "files": s.files,
            "bytes_received": s.bytes_received,
            "blocks_have": s.blocks_have,
            "blocks_sent": s.blocks_sent,
            "blocks_resumed": s.blocks_resumed,
        }))
    })
}
