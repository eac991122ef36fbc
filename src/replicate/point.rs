//! A point's life on the primary, in one place and with one owner:
//!
//! 1. **cut**: [`Points::next`] cuts the open epoch and takes the closed
//!    set over with its pre-image protection on (`Tracker::protect_closed`,
//!    one hold of the gate), and gives the point a random id;
//! 2. **pending**: the point is recorded in the journal, durably, before a
//!    byte is sent, so a lost acknowledgement is recognised on reconnect;
//! 3. **shipping**: the replicator streams it; when the stream breaks the
//!    point is held ([`Points::broken`]) and shipped again unchanged (same
//!    epoch, id and block order) after the reconnect, from where the
//!    secondary says it stopped; when the secondary refuses it, its
//!    protection is dropped and it is folded into the next cut
//!    ([`Points::refused`]);
//! 4. **applied**: [`Points::applied`] clears the closed set and writes the
//!    point record: the epoch's Shipped state, its operations and the
//!    records of older epochs pruned, the last shipped point (and no
//!    pending one). A point applied before its
//!    acknowledgement was lost is finished on reconnect.
//!
//! This is the only writer of the point record in the journal; `tracking`
//! knows only sets of blocks.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::datastore::Datastore;
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::journal::ShippedPoint;
use crate::proto::journal::EpochState;
use crate::state::hex;
use crate::tracking::ClosedSet;

use super::client::blocking;
use super::stats::ReplStats;

/// A cut point: the closed set it ships, its record (epoch and id), and
/// the replica epoch it is based on.
#[derive(Debug)]
pub struct Point {
    set: Arc<ClosedSet>,
    record: ShippedPoint,
    base: Epoch,
    /// The token of the failback resync list this point covers, empty
    /// for most points (see `replicate::resync`).
    resync: Vec<u8>,
}

impl Point {
    /// The closed set the point carries.
    pub fn set(&self) -> &ClosedSet {
        &self.set
    }

    /// The epoch the replica reaches with this point.
    pub fn epoch(&self) -> Epoch {
        self.record.epoch
    }

    /// The random id both sides record.
    pub fn id(&self) -> [u8; 16] {
        self.record.id
    }

    /// The replica epoch the point is based on (0: a baseline).
    pub fn base(&self) -> Epoch {
        self.base
    }

    /// The token of the resync list this point covers, empty if none.
    pub fn resync_token(&self) -> &[u8] {
        &self.resync
    }
}

/// The owner of the primary's points: the one in flight (held across a
/// broken stream) and the point record in the journal.
#[derive(Debug)]
pub struct Points {
    ds: Arc<Datastore>,
    /// Where cuts and retries are counted.
    stats: Arc<ReplStats>,
    /// A point whose stream broke, kept (with its pre-images) to ship
    /// again unchanged, so the secondary can resume it. No `.await`
    /// happens under the lock.
    held: Mutex<Option<Point>>,
    /// The token of a failback resync list marked into tracking and not
    /// yet carried by a cut: the next point cut covers it. No `.await`
    /// happens under the lock.
    resync: Mutex<Vec<u8>>,
}

impl Points {
    /// The points of `ds`, counted in `stats`.
    pub fn new(ds: Arc<Datastore>, stats: Arc<ReplStats>) -> Points {
        Points {
            ds,
            stats,
            held: Mutex::new(None),
            resync: Mutex::new(Vec::new()),
        }
    }

    /// The epoch of the last point the secondary acknowledged, 0 if none.
    pub fn last_shipped_epoch(&self) -> Result<Epoch> {
        Ok(self
            .ds
            .journal
            .last_shipped()?
            .map_or(Epoch(0), |p| p.epoch))
    }

    /// Compares the secondary's last applied point (`applied`, `id`) with
    /// this primary's history: the same point, the pending point whose
    /// acknowledgement was lost (recorded as shipped now), or an empty
    /// replica (a baseline: everything is marked) are fine; anything else
    /// means the histories diverged, and nothing may be sent to `target`
    /// (the error says so, and `remedy`).
    pub async fn reconcile(
        &self,
        applied: Epoch,
        id: &[u8],
        target: &str,
        remedy: &str,
    ) -> Result<()> {
        let journal = &self.ds.journal;
        let shipped = journal.last_shipped()?;
        let pending = journal.pending_point()?;
        let is =
            |p: &Option<ShippedPoint>| p.is_some_and(|p| p.epoch == applied && p.id[..] == *id);
        if is(&shipped) {
            return Ok(());
        }
        if let Some(p) = pending.filter(|_| is(&pending)) {
            log::info!("the secondary applied epoch {applied} before its acknowledgement was lost");
            return journal.set_last_shipped(&p);
        }
        if applied == Epoch(0) && id.is_empty() {
            if shipped.is_some() {
                log::warn!(
                    "{target} holds nothing of this datastore: shipping everything (baseline)"
                );
                let ds = self.ds.clone();
                blocking("baseline", move || ds.tracker.mark_everything()).await?;
            }
            return Ok(());
        }
        let show = |p: Option<ShippedPoint>| {
            p.map_or("none".to_string(), |p| {
                format!("epoch {} (point {})", p.epoch, p.id_hex())
            })
        };
        Err(Error::Remote(format!(
            "histories diverged: {target} last applied epoch {applied} (point {}), but this primary last \
             shipped {} and was shipping {}. Nothing was sent or overwritten. {remedy}",
            hex(id),
            show(shipped),
            show(pending)
        )))
    }

    /// The point to ship now that the replica is at `applied`: the held one
    /// again if the replica is still at its base, else a new cut (after
    /// finishing a held point the replica turned out to hold, or folding
    /// one it does not); `None` when nothing changed.
    pub async fn next(&self, applied: Epoch) -> Result<Option<Point>> {
        let held = self.held.lock().expect("held lock").take();
        if let Some(point) = held {
            if point.base == applied {
                let retry = self.stats.retries.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!(
                    "epoch {}: shipping the point again after its stream broke (retry {retry} since start)",
                    point.epoch()
                );
                return Ok(Some(point));
            }
            if applied == point.epoch() {
                // Applied before the acknowledgement was lost (the hello
                // found it): done, nothing to resend.
                log::info!("epoch {applied} was applied before its stream broke");
                self.applied(point).await?;
            } else {
                self.refused(point);
            }
        }
        self.cut(applied).await
    }

    /// Cuts a new point based on `applied` and records it as pending.
    async fn cut(&self, applied: Epoch) -> Result<Option<Point>> {
        self.ds.check_recorded()?;
        let ds = self.ds.clone();
        let Some(set) = blocking("cut", move || ds.tracker.protect_closed()).await? else {
            return Ok(None);
        };
        let point = Point {
            record: ShippedPoint {
                epoch: set.end,
                id: crate::sys::random_bytes().at("/dev/urandom")?,
            },
            set: Arc::new(set),
            base: applied,
            resync: std::mem::take(&mut *self.resync.lock().expect("resync lock")),
        };
        self.stats.points_cut.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.ds.journal.set_pending_point(&point.record) {
            self.refused(point);
            return Err(e);
        }
        Ok(Some(point))
    }

    /// A failback resync list named `token` is marked into tracking: the
    /// next point cut carries the token, so the secondary drops the list
    /// once it is applied.
    pub fn resync_marked(&self, token: Vec<u8>) {
        *self.resync.lock().expect("resync lock") = token;
    }

    /// The secondary applied `point`: its blocks are clean, and the point
    /// record says so (epoch shipped, its operations pruned, last shipped).
    pub async fn applied(&self, point: Point) -> Result<()> {
        let ds = self.ds.clone();
        blocking("finishing ship", move || {
            if !point.resync.is_empty() {
                super::resync::covered(&ds)?;
            }
            ds.tracker.clear_closed(&point.set);
            let journal = &ds.journal;
            let first = point.set.first;
            let mut record = journal.epoch(first)?.unwrap_or_default();
            record.state = EpochState::Shipped as i32;
            journal.put_epoch(first, &record)?;
            journal.prune_epochs_before(first)?;
            journal.prune_ops_through(point.set.end)?;
            journal.set_last_shipped(&point.record)?;
            journal.flush()
        })
        .await
    }

    /// The secondary refused `point` (sending it again would be refused
    /// again), or it cannot be resumed: its protection goes, and the next
    /// cut folds everything written since into its closed set.
    pub fn refused(&self, point: Point) {
        self.ds.tracker.unprotect(&point.set);
        if !point.resync.is_empty() {
            let mut token = self.resync.lock().expect("resync lock");
            if token.is_empty() {
                *token = point.resync;
            }
        }
    }

    /// The stream of `point` broke: it is held and shipped again unchanged
    /// after the reconnect.
    pub fn broken(&self, point: Point) {
        *self.held.lock().expect("held lock") = Some(point);
    }
}
