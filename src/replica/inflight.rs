//! A point being applied in place while it streams in (see `apply` for
//! the order of writes): it holds the point views (the points lock) out
//! from its first change to the replica until it is committed or rolled
//! back, and the mirror ([`ReplicaStore::view`]) too, unless the point
//! changes only block content: then the mirror reads the point before
//! through the `overlay` until the commit. No reader ever sees the replica
//! between two points.
//!
//! A point that does not reach its commit (the stream broke, was refused,
//! or the secondary stopped) is rolled back to the point before it from
//! the undo. What it had written is first read back into the staging
//! folder (re-hashed, as a broken stream's staged content always was), so
//! that a stream of the same point resumes where it stopped and a stream
//! of another point finds that content by hash (`resume`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::RwLockWriteGuard;
use std::sync::atomic::Ordering;

use super::apply::{self, Apply, Landing};
use super::meta::Refusals;
use super::records::{Applied, Redo};
use super::resume::{self, Carried};
use super::store::ReplicaStore;
use crate::block::HashKey;
use crate::error::{IoContext, Result};
use crate::ids::Epoch;
use crate::points::store::Locked;
use crate::points::undo_in_flight;
use crate::proto::points::PointRecord;
use crate::state::{ReplicaPaths, write_durably};

/// The epoch of the point left in flight at `paths`, if one is.
pub fn left_in_flight(paths: &ReplicaPaths) -> Option<Epoch> {
    let text = fs::read_to_string(paths.in_flight()).ok()?;
    text.trim().parse().ok().map(Epoch)
}

/// A point being applied in place.
#[derive(Debug)]
pub struct InFlight<'s> {
    store: &'s ReplicaStore,
    epoch: Epoch,
    apply: Apply<'s>,
    /// The point's files and their sizes, once started.
    files: HashMap<u64, u64>,
    /// Files that got blocks.
    written: HashSet<u64>,
    /// Blocks written.
    blocks: u64,
    refusals: Refusals,
    /// The points lock, held exclusively until the point is committed or
    /// rolled back.
    _points: Locked,
    view: ViewGuard<'s>,
    /// Set at the commit point: from there the point is finished, never
    /// rolled back.
    committed: bool,
}

/// The mirror's lock, held by a point in flight (`None` while the mirror
/// reads through the overlay).
type ViewGuard<'s> = Option<RwLockWriteGuard<'s, ()>>;

impl<'s> InFlight<'s> {
    /// Starts applying point `epoch` over the applied one: readers held
    /// out, the point before recorded for undo, the `inflight` record
    /// written durably, then the namespace operations and sizes. A
    /// failure here leaves an `InFlight` to roll back: the caller drops
    /// it through [`InFlight::abandon`].
    pub fn begin(store: &'s ReplicaStore, epoch: Epoch, base: Epoch) -> Result<InFlight<'s>> {
        let view = store.view.write().expect("view lock");
        let points = store.points.exclusive()?;
        let applied = store.applied();
        if applied.epoch != base {
            return Err(crate::error::Error::BadState {
                path: store.paths.applied(),
                reason: format!(
                    "epoch {epoch} follows epoch {base}, but another stream applied epoch {} \
                     meanwhile",
                    applied.epoch
                ),
            });
        }
        let base = PointRecord {
            epoch: applied.epoch.0,
            at_ns: applied.at_ns,
            point: applied.point,
            ..Default::default()
        };
        let undo = store.points.base(&store.root, base, store.block_size())?;
        write_durably(&store.paths.in_flight(), format!("{epoch}\n").as_bytes())?;
        Ok(InFlight {
            apply: store.apply_with(Some(undo)),
            store,
            epoch,
            files: HashMap::new(),
            written: HashSet::new(),
            blocks: 0,
            refusals: Refusals::new(),
            _points: points,
            view: Some(view),
            committed: false,
        })
    }

    /// The namespace operations and sizes of the point (its lists are in
    /// the staging folder); a point that changes only block content then
    /// lets the mirror in, through the overlay.
    pub fn start(&mut self) -> Result<()> {
        let started = self.apply.start(self.epoch, &mut self.refusals)?;
        self.files = started.files;
        let undo = self.apply.undo.borrow();
        if let (true, Some(undo)) = (started.content_only, undo.as_ref()) {
            let mut overlay = self.store.overlay.write().expect("overlay lock");
            overlay.start(undo.data_path(), self.store.block_size())?;
            self.view = None;
        }
        Ok(())
    }

    /// Holds the mirror out again (and stops the overlay): the point is
    /// about to be finished or rolled back.
    fn hold_mirror(&mut self) {
        if self.view.is_none() {
            self.view = Some(self.store.view.write().expect("view lock"));
        }
        self.store.overlay.write().expect("overlay lock").clear();
    }

    /// Writes a batch of blocks in place (see [`Apply::write`]).
    pub fn write(&mut self, blocks: &[Landing]) -> Result<()> {
        self.apply.write(blocks, &self.files)?;
        for b in blocks {
            self.written.insert(b.block.file_id);
        }
        self.blocks += blocks.len() as u64;
        Ok(())
    }

    /// The commit: every block synced, the redo record written (the
    /// commit point), then the point finished and recorded; returns what
    /// it refused to do. A failure after the commit point leaves the redo
    /// record for the next stream or start to finish the point.
    pub fn commit(mut self) -> Result<Refusals> {
        apply::sync_replica(&self.store.root)?;
        let redo = Redo {
            epoch: self.epoch,
            blocks: self.blocks,
        };
        redo.write(&self.store.paths)?;
        self.committed = true;
        crate::state::crash_point("committed");
        self.hold_mirror();
        let applied = self.apply.finish(
            self.epoch,
            Some(&self.written),
            self.blocks,
            &mut self.refusals,
        )?;
        self.store.finished(applied, &self.refusals)?;
        Ok(std::mem::take(&mut self.refusals))
    }

    /// Rolls the point back (the replica is the point before it again),
    /// after reading what it wrote back into the staging folder when
    /// `keep` (the offers log names it); returns what the next stream can
    /// use of it. When it failed for want of space (`full`), history gives
    /// way to the replica: the older points go, so that the retry has the
    /// space their undo held. A failure is logged and shown in `status`,
    /// and the rollback is retried before the next stream.
    pub fn abandon(mut self, key: &HashKey, keep: bool, full: bool) -> Option<Carried> {
        self.committed = true;
        self.hold_mirror();
        if keep {
            self.store.keep_written(&self.apply, key, self.epoch);
        } else {
            let _ = fs::remove_file(self.store.paths.staged_offers());
        }
        if !self.roll_back_reporting() {
            return None;
        }
        if full {
            self.store.give_way();
        }
        Carried::from_log(&self.store.paths, key)
    }

    /// Rolls the point back; a failure is logged and shown in `status`,
    /// and the rollback is retried before the next point. Whether it
    /// succeeded.
    fn roll_back_reporting(&self) -> bool {
        let Err(e) = self.store.roll_back(self.epoch) else {
            return true;
        };
        let cause = format!(
            "epoch {} did not complete and rolling it back failed (retried before the next \
             point): {e}",
            self.epoch
        );
        log::error!("{cause}");
        self.store.stats.failed(&cause);
        false
    }
}

impl Drop for InFlight<'_> {
    /// An in-flight point dropped before its commit point without
    /// [`InFlight::abandon`] (its commit failed before the redo record, or
    /// a panic) is rolled back, keeping nothing.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.committed = true;
        self.hold_mirror();
        self.roll_back_reporting();
    }
}

impl ReplicaStore {
    /// Reads what the point in flight `epoch` wrote (as far as the offers
    /// log names it) back into staging before its rollback, for the next
    /// stream to resume; on failure the log goes (the primary sends the
    /// point again) and the cause is logged.
    pub(super) fn keep_written(&self, apply: &Apply<'_>, key: &HashKey, epoch: Epoch) {
        let staged = resume::stage_written(&self.paths, key, |b| apply.read_back(b).ok());
        if let Err(e) = staged {
            log::warn!("epoch {epoch}: keeping what was received failed: {e}");
            let _ = fs::remove_file(self.paths.staged_offers());
        }
    }

    /// An apply over this replica saving into `undo`.
    pub(super) fn apply_with(&self, undo: Option<crate::points::undo::UndoWriter>) -> Apply<'_> {
        Apply {
            root: &self.root,
            paths: &self.paths,
            index: &self.index,
            block_size: self.block_size(),
            allow_devices: self.allow_devices,
            undo: RefCell::new(undo),
            points: &self.points,
            overlay: &self.overlay,
        }
    }

    /// Rolls back the point left in flight (`epoch`), its `inflight`
    /// record last. Called with the view lock held (or before the mirror
    /// exists) and the points lock held exclusively.
    pub(super) fn roll_back(&self, epoch: Epoch) -> Result<()> {
        let touched = apply::touched_paths(&self.paths, epoch)
            .inspect_err(|e| {
                log::warn!("epoch {epoch}: its lists are unreadable ({e}); rolling back every path")
            })
            .ok();
        let named = |path: &[u8]| {
            let Some(set) = &touched else {
                return true;
            };
            let ends = path.iter().enumerate().filter(|(_, b)| **b == b'/');
            set.contains(path) || ends.map(|(at, _)| &path[..at]).any(|dir| set.contains(dir))
        };
        let to = undo_in_flight(&self.root, self.block_size(), &named)?;
        self.points.reload()?;
        let path = self.paths.in_flight();
        fs::remove_file(&path).at(&path)?;
        self.points.settle()?;
        log::warn!(
            "epoch {epoch} did not complete: the replica is rolled back to epoch {}",
            to.map_or(0, |e| e.0)
        );
        Ok(())
    }

    /// History gives way to the replica: a point that failed for want of
    /// space drops the recovery points but the live one (loudly), so its
    /// retry does not compete with their undo.
    fn give_way(&self) {
        let older = self.points.list().len().saturating_sub(1);
        if older == 0 {
            return;
        }
        match self.points.drop_all() {
            Ok(_) => log::error!(
                "no space left on {} for the next point: dropped the {older} older recovery \
                 points (the replica comes first)",
                self.root.display()
            ),
            Err(e) => log::error!("dropping the recovery points to make space failed: {e}"),
        }
    }

    /// The point is applied and recorded: the store's state follows, and
    /// the redo and in-flight records and the staging go.
    pub(super) fn finished(&self, applied: Applied, refusals: &Refusals) -> Result<()> {
        let epoch = applied.epoch;
        self.stats.refused(epoch, refusals);
        *self.applied.lock().expect("applied lock") = applied;
        self.stats.points_applied.fetch_add(1, Ordering::Relaxed);
        self.stats.failed("");
        self.retire()?;
        super::store::keep_reserve(&self.paths);
        Ok(())
    }

    /// A committed point is applied: its redo and in-flight records and
    /// its staging go.
    pub(super) fn retire(&self) -> Result<()> {
        Redo::remove(&self.paths)?;
        let path = self.paths.in_flight();
        if path.exists() {
            fs::remove_file(&path).at(&path)?;
        }
        self.clear_staging()
    }
}
