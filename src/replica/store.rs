//! The secondary's replica folder as one object: it opens the folder
//! (finishing an apply a crash interrupted), holds the pair, the last
//! applied point, the content index and what broken streams staged, and
//! wires the parts: `records` for the state files, `index` and `seed` for
//! the content index, `apply` for the atomic apply, `resume` for what a
//! broken stream leaves behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::apply::make_dirs;
use super::index::ContentIndex;
use super::inflight::left_in_flight;
use super::meta::Refusals;
use super::overlay::SharedOverlay;
use super::records::{Applied, Pair, Redo};
use super::refused::Refused;
use super::resume::Carried;
use super::resync;
use super::seed;
use crate::block::{BlockHash, HashKey};
use crate::error::{Error, ErrorCounters, IoContext, Result};
use crate::ids::{Epoch, FileId};
use crate::points::{PointKeeper, PointsPaths, Retention};
use crate::proto::replication::ResyncChunk;
use crate::state::{ReplicaPaths, now_ns};

/// Counters for `hbrfs status` and the metrics endpoint on the secondary.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Points applied whole since the daemon started (by a stream, a
    /// retry or the recovery at start).
    pub points_applied: AtomicU64,
    /// Refusals and failed applies, by kind.
    pub errors: ErrorCounters,
    /// When a primary last said hello or sent a message on a ship stream
    /// (unix ns, 0 before).
    pub last_progress_ns: AtomicU64,
    /// Bytes of block data received (compressed).
    pub bytes_received: AtomicU64,
    /// Blocks filled from content the replica already held.
    pub blocks_have: AtomicU64,
    /// Blocks the primary had to send.
    pub blocks_sent: AtomicU64,
    /// Blocks filled from content staged by a stream that broke before
    /// its commit (a reconnect resuming, not resending).
    pub blocks_resumed: AtomicU64,
    /// What applies refused to do (see `meta`), and the last of them: a
    /// refusal never fails a point, so it must show here.
    refusals: AtomicU64,
    last_refusal: Mutex<String>,
    /// Why the last stream, hello or redo replay failed or was refused,
    /// until a point applies: what `status` shows while replication is
    /// stuck ("no space left on REPLICA ..."). Held only to copy it.
    last_error: Mutex<String>,
}

impl ReplicaStats {
    /// Counts and logs what an apply refused to do.
    pub(super) fn refused(&self, epoch: Epoch, refusals: &[String]) {
        for r in refusals {
            log::error!("epoch {epoch}: refused: {r}");
        }
        if let Some(last) = refusals.last() {
            self.refusals
                .fetch_add(refusals.len() as u64, Ordering::Relaxed);
            *self.last_refusal.lock().expect("refusal lock") = last.clone();
        }
    }

    /// How many refusals there were, and the last one.
    pub fn refusals(&self) -> (u64, String) {
        let last = self.last_refusal.lock().expect("refusal lock").clone();
        (self.refusals.load(Ordering::Relaxed), last)
    }

    /// Keeps `cause` as the last error.
    pub fn failed(&self, cause: &str) {
        *self.last_error.lock().expect("last_error lock") = cause.to_string();
    }

    /// The last error, empty since a point applied.
    pub fn last_error(&self) -> String {
        self.last_error.lock().expect("last_error lock").clone()
    }
}

/// The data counters of [`ReplicaStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    /// Bytes of block data received (compressed).
    pub bytes_received: u64,
    /// Blocks filled from content the replica already held.
    pub blocks_have: u64,
    /// Blocks the primary had to send.
    pub blocks_sent: u64,
    /// Blocks filled from content a broken stream staged.
    pub blocks_resumed: u64,
}

impl ReplicaCounts {
    /// What was counted between `before` and these counts (one point's
    /// share, for its log line).
    pub fn since(&self, before: &ReplicaCounts) -> ReplicaCounts {
        ReplicaCounts {
            bytes_received: self.bytes_received.saturating_sub(before.bytes_received),
            blocks_have: self.blocks_have.saturating_sub(before.blocks_have),
            blocks_sent: self.blocks_sent.saturating_sub(before.blocks_sent),
            blocks_resumed: self.blocks_resumed.saturating_sub(before.blocks_resumed),
        }
    }
}

impl ReplicaStats {
    /// The data counters now.
    pub fn counts(&self) -> ReplicaCounts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReplicaCounts {
            bytes_received: load(&self.bytes_received),
            blocks_have: load(&self.blocks_have),
            blocks_sent: load(&self.blocks_sent),
            blocks_resumed: load(&self.blocks_resumed),
        }
    }

    /// A primary made progress: said hello or sent a message.
    pub fn progressed(&self) {
        self.last_progress_ns.store(now_ns(), Ordering::Relaxed);
    }
}

/// Why a primary's hello was refused: the replica belongs to another pair
/// (or its pair record could not be written). Sending the same hello
/// again is refused again.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// Another datastore is paired with this replica.
    #[error(
        "this replica ({}) belongs to primary datastore {paired}; refusing datastore {offered}. \
         To replicate another datastore, use another replica folder.",
        root.display()
    )]
    OtherDatastore {
        /// The replica root.
        root: PathBuf,
        /// The paired datastore.
        paired: String,
        /// The one that said hello.
        offered: String,
    },
    /// The same datastore with another block size.
    #[error("block size {offered} differs from the pair's {paired}")]
    BlockSize {
        /// The block size offered.
        offered: u32,
        /// The pair's.
        paired: u32,
    },
    /// The same datastore with another hash key: its state was recreated.
    #[error(
        "datastore {datastore} presents a different hash key than when the pair was made; \
         its state folder was recreated? Use a new replica folder to reseed."
    )]
    HashKey {
        /// The datastore.
        datastore: String,
    },
    /// The pair record could not be written.
    #[error(transparent)]
    Record(#[from] Error),
}

/// An open replica folder.
#[derive(Debug)]
pub struct ReplicaStore {
    /// The replica root (what a hypervisor uses after failover).
    pub root: PathBuf,
    /// Its state folder.
    pub paths: ReplicaPaths,
    /// The index of content held. Hints only: every use re-reads and
    /// re-hashes the content.
    pub(super) index: ContentIndex,
    pair: Mutex<Option<Pair>>,
    /// The last applied point.
    pub(super) applied: Mutex<Applied>,
    /// Content staged by streams that broke before their commit, handed
    /// to the next stream (see `session`); `None` when staging is empty.
    carried: Mutex<Option<Carried>>,
    /// Held exclusively while an epoch applies, shared by the mirror's
    /// reads, so the mirror never shows a half-applied point.
    pub view: Arc<RwLock<()>>,
    /// What the mirror reads of the point before while a point that
    /// changes only block content is in flight (see `overlay`).
    pub overlay: SharedOverlay,
    /// Counters.
    pub stats: ReplicaStats,
    /// Whether points may make device nodes (`serve --allow-devices`).
    pub(super) allow_devices: bool,
    /// The recovery points kept of this replica.
    pub points: PointKeeper,
    /// The token of the resync list a demote left (see `resync`), until
    /// a point covering it is applied; held only to copy or clear it.
    resync: Mutex<Option<Vec<u8>>>,
    /// The folder's daemon lock (`state::take_lock`), held while open.
    _lock: std::fs::File,
}

/// Space the secondary keeps for itself in `REPLICA/.hbrfs/reserve`
/// (allocated, like a file system's reserved blocks): staging or an apply
/// may fill the replica's file system, and the content index (sled) then
/// cannot even be opened, so a restarted secondary could not start, serve
/// and report why. The reserve is given up to open the index, and taken
/// again once space allows (after a point applies).
const RESERVE: u64 = 8 * 1024 * 1024;

/// Opens the content index, giving up the reserve when the index cannot be
/// opened for want of space (then `true`: the file system is full).
fn open_index(paths: &ReplicaPaths) -> Result<(ContentIndex, bool)> {
    match ContentIndex::open(&paths.index()) {
        Err(Error::Journal {
            source: sled::Error::Io(e),
            ..
        }) if e.raw_os_error() == Some(libc::ENOSPC) && reserve(paths).exists() => {
            log::warn!(
                "no space left on {} to open the content index ({e}): using the reserve",
                paths.dir.display()
            );
            let r = reserve(paths);
            fs::remove_file(&r).at(&r)?;
            Ok((ContentIndex::open(&paths.index())?, true))
        }
        res => res.map(|index| (index, false)),
    }
}

fn reserve(paths: &ReplicaPaths) -> PathBuf {
    paths.dir.join("reserve")
}

/// Takes the reserve (best effort: on a full file system it waits for
/// the next applied point).
pub(super) fn keep_reserve(paths: &ReplicaPaths) {
    let path = reserve(paths);
    if path.exists() {
        return;
    }
    let made = crate::state::state_file_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .and_then(|f| crate::sys::fallocate(std::os::fd::AsFd::as_fd(&f), 0, 0, RESERVE));
    if let Err(e) = made {
        log::info!("no reserve kept in {} yet: {e}", path.display());
        let _ = fs::remove_file(&path);
    }
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica at `root`, finishing an
    /// apply a crash interrupted; device nodes are made only with
    /// `allow_devices`.
    pub fn open(root: &Path, allow_devices: bool, keep: Retention) -> Result<ReplicaStore> {
        make_dirs(root)?;
        let root = root.canonicalize().at(root)?;
        let paths = ReplicaPaths::of(&root);
        crate::state::open_state_dir(&paths.dir)?;
        crate::state::make_state_dirs(&paths.staging())?;
        crate::state::set_private(&paths.dir, crate::state::STATE_DIR_MODE)?;
        let lock = crate::state::take_lock(&paths.dir)?;
        let (index, full) = open_index(&paths)?;
        let points = PointKeeper::open(PointsPaths::new(paths.points()), keep)?;
        let store = ReplicaStore {
            _lock: lock,
            points,
            index,
            pair: Mutex::new(Pair::read(&paths)?),
            applied: Mutex::new(Applied::read(&paths)?),
            carried: Mutex::new(None),
            resync: Mutex::new(resync::header(&paths)?.map(|h| h.token)),
            view: Arc::new(RwLock::new(())),
            overlay: SharedOverlay::default(),
            stats: ReplicaStats::default(),
            allow_devices,
            root,
            paths,
        };
        store.recover(full)?;
        store.points.settle()?;
        keep_reserve(&store.paths);
        Ok(store)
    }

    /// Whether an interrupted apply is waiting to be finished.
    pub fn apply_pending(&self) -> bool {
        self.paths.redo().exists()
    }

    /// Takes what broken streams staged, for the stream starting now.
    pub fn take_carried(&self) -> Option<Carried> {
        self.carried.lock().expect("carried lock").take()
    }

    /// Keeps what a broken stream staged (and what it did not use of the
    /// earlier ones) for the next stream.
    pub fn keep_carried(&self, carried: Carried) {
        *self.carried.lock().expect("carried lock") = Some(carried);
    }

    /// The pair, once a primary has said hello.
    pub fn pair(&self) -> Option<Pair> {
        self.pair.lock().expect("pair lock").clone()
    }

    /// Accepts a primary: the first one fixes the pair; later ones must be
    /// the same datastore with the same parameters.
    pub fn accept(&self, offered: Pair) -> std::result::Result<(), PairError> {
        let mut pair = self.pair.lock().expect("pair lock");
        match &*pair {
            Some(p) if p.datastore_id != offered.datastore_id => Err(PairError::OtherDatastore {
                root: self.root.clone(),
                paired: p.datastore_id.clone(),
                offered: offered.datastore_id,
            }),
            Some(p) if p.block_size != offered.block_size => Err(PairError::BlockSize {
                offered: offered.block_size,
                paired: p.block_size,
            }),
            Some(p) if p.key != offered.key => Err(PairError::HashKey {
                datastore: offered.datastore_id,
            }),
            Some(_) => Ok(()),
            None => {
                *pair = Some(offered.clone());
                drop(pair);
                self.seed(&offered.key, u64::from(offered.block_size));
                Ok(offered.write(&self.paths)?)
            }
        }
    }

    /// Content already here (a copy made by hand, a restore) is indexed
    /// before the first point, so it does not travel; a failure costs
    /// bytes on the wire, not correctness.
    fn seed(&self, key: &HashKey, block_size: u64) {
        match seed::index_existing(&self.root, &self.index, key, block_size) {
            Ok((files, blocks)) if files > 0 => {
                log::info!(
                    "seeding: indexed {blocks} blocks of {files} files already in the replica folder"
                )
            }
            Ok(_) => {}
            Err(e) => log::warn!(
                "seeding: indexing the replica folder failed ({e}); everything will be sent"
            ),
        }
    }

    /// The token of the resync list this demoted replica holds for the
    /// new primary; empty when it holds none.
    pub fn resync_token(&self) -> Vec<u8> {
        self.resync
            .lock()
            .expect("resync lock")
            .clone()
            .unwrap_or_default()
    }

    /// The chunks of the resync list named `token`, as they travel.
    pub fn resync_chunks(&self, token: &[u8]) -> Result<Vec<ResyncChunk>> {
        resync::chunks(&self.paths, token)
    }

    /// A point carrying `token` is applied: the resync list it names is
    /// covered and goes, durably. Any other token changes nothing.
    pub fn covered(&self, token: &[u8]) -> Result<()> {
        let mut held = self.resync.lock().expect("resync lock");
        if token.is_empty() || held.as_deref() != Some(token) {
            return Ok(());
        }
        resync::drop_list(&self.paths)?;
        *held = None;
        log::info!("the resync list handed to the new primary is applied: dropped");
        Ok(())
    }

    /// The last applied epoch and when it was applied.
    pub fn applied(&self) -> Applied {
        self.applied.lock().expect("applied lock").clone()
    }

    /// Files the index knows.
    pub fn file_count(&self) -> usize {
        self.index.file_count()
    }

    /// Where the replica keeps file `id`, if known.
    pub fn file_path(&self, id: FileId) -> Result<Option<Vec<u8>>> {
        self.index.file_path(id)
    }

    pub(super) fn block_size(&self) -> u64 {
        self.pair().map_or(0, |p| u64::from(p.block_size))
    }

    /// Content this replica verifiably holds for `hash`, `length` bytes
    /// long: read from where the index points and re-hashed.
    pub fn find(&self, key: &HashKey, hash: BlockHash, length: usize) -> Result<Option<Vec<u8>>> {
        self.index
            .find(&self.root, self.block_size(), key, hash, length)
    }

    /// Settles what an earlier point left, if anything, before a new
    /// one: finishes a committed point (its redo record waits), or rolls
    /// back one left in flight whose rollback failed. Either failure is
    /// retryable, so is this.
    pub fn finish_pending(&self) -> std::result::Result<(), Refused> {
        let pending = |source| {
            let epoch = Redo::read(&self.paths)
                .ok()
                .flatten()
                .map_or(0, |r| r.epoch.0);
            Refused::ApplyPending { epoch, source }
        };
        if let Some(redo) = Redo::read(&self.paths).map_err(pending)? {
            log::warn!("retrying the apply of epoch {} that failed", redo.epoch);
            self.finish(redo).map_err(pending)?;
            log::info!("epoch {} applied on retry", redo.epoch);
        } else if left_in_flight(&self.paths).is_some() {
            // Another stream's point may be in flight: once it is done (its
            // record gone), there is nothing left to roll back.
            let _view = self.view.write().expect("view lock");
            let _points = self.points.exclusive().map_err(pending)?;
            if let Some(epoch) = left_in_flight(&self.paths) {
                self.roll_back(epoch).map_err(pending)?;
            }
        }
        Ok(())
    }

    /// Settles what a stop left: finishes a committed point, or rolls back
    /// one that was in flight (keeping what it received for the primary to
    /// resume), or keeps a point a stream was receiving. On a `full` file
    /// system (the reserve went to open the index) this waits for the next
    /// hello or stream, so the secondary can start and say why.
    fn recover(&self, full: bool) -> Result<()> {
        let redo = Redo::read(&self.paths)?;
        let in_flight = left_in_flight(&self.paths);
        if redo.is_some() && in_flight.is_none() {
            return Err(Error::BadState {
                path: self.paths.redo(),
                reason: "an apply staged by an older hbrfs is pending: finish it by starting \
                         that version's `hbrfs serve` once, then this one"
                    .into(),
            });
        }
        if redo.is_none() && in_flight.is_none() {
            // A point a stream was receiving when the secondary stopped:
            // kept for the primary to resume, if its log checks out.
            if !self.keep_logged() {
                self.clear_staging()?;
            }
            return Ok(());
        }
        // A recovery that fails (the disk is still full) must not keep the
        // secondary from serving: its records stay, `status` says why, and
        // the next hello or stream retries.
        let settled = if full {
            Err(Error::Io {
                path: self.paths.dir.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            })
        } else if let Some(redo) = redo {
            log::warn!(
                "the apply of epoch {} was interrupted after its commit point; finishing it",
                redo.epoch
            );
            self.finish(redo)
        } else {
            self.recover_in_flight(in_flight.expect("checked above"))
        };
        if let Err(source) = settled {
            let epoch = in_flight.map_or(0, |e| e.0);
            let cause = Refused::ApplyPending { epoch, source }.cause(&self.root);
            log::error!("{cause}");
            self.stats.failed(&cause);
        }
        Ok(())
    }

    /// Rolls back the point a stop left in flight, after reading what it
    /// wrote (as far as its offers log says, re-hashed) into the staging
    /// folder, so the primary resumes it rather than starting over.
    fn recover_in_flight(&self, epoch: Epoch) -> Result<()> {
        log::warn!("epoch {epoch} was being applied when the secondary stopped: rolling it back");
        if let Some(pair) = self.pair() {
            self.keep_written(&self.apply_with(None), &pair.key, epoch);
        }
        self.roll_back_locking(epoch)?;
        self.keep_logged();
        Ok(())
    }

    /// Keeps, for the primary to resume, the point the offers log in
    /// staging holds, if it checks out; whether it did.
    fn keep_logged(&self) -> bool {
        let key = self.pair().map(|p| p.key);
        let Some(carried) = key.and_then(|key| Carried::from_log(&self.paths, &key)) else {
            return false;
        };
        log::info!("kept the part of a point received before the restart: {carried}");
        self.keep_carried(carried);
        true
    }

    /// [`ReplicaStore::roll_back`], taking the points lock for it.
    fn roll_back_locking(&self, epoch: Epoch) -> Result<()> {
        let _points = self.points.exclusive()?;
        self.roll_back(epoch)
    }

    /// Finishes the committed point `redo` names (every step is
    /// idempotent); only retires it if it is already applied.
    fn finish(&self, redo: Redo) -> Result<()> {
        let epoch = redo.epoch;
        if epoch <= self.applied().epoch {
            log::info!("epoch {epoch} was applied already; removing its staging");
            return self.retire();
        }
        let _view = self.view.write().expect("view lock");
        let _points = self.points.exclusive()?;
        let undo = self.points.undo_before(epoch, self.block_size())?;
        let mut refusals = Refusals::new();
        let applied = self
            .apply_with(undo)
            .finish(epoch, None, redo.blocks, &mut refusals)?;
        self.finished(applied, &refusals)
    }

    pub(super) fn clear_staging(&self) -> Result<()> {
        *self.carried.lock().expect("carried lock") = None;
        let dir = self.paths.staging();
        fs::remove_dir_all(&dir).at(&dir)?;
        crate::state::make_state_dirs(&dir)
    }
}
