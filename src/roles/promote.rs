//! Failover: `hbrfs promote REPLICA [--point P]` turns a replica into a
//! primary datastore at its applied point, or at an older kept point P it
//! is first rolled back to (`points::rollback_to`); that point is the
//! pair's common base.
//!
//! The replica is opened as a secondary would open it (its daemon lock
//! taken, an apply a crash interrupted finished), then the primary state
//! is made beside the replica's records in the same `.hbrfs`: the format
//! line with the pair's datastore id and block size, the pair's hash key
//! as the primary's, a journal tracking every regular file with a clean
//! bitmap (nothing to ship: the old primary held the same content at the
//! base), its epoch counter above the replica's applied epoch (epochs stay
//! monotonic across the role swap, also after a rollback), and the base as
//! the last shipped point. A rollback's blocks are marked dirty (the old
//! primary holds their later content) and its paths are kept in
//! `.hbrfs/rolled-back` for the first failback to reconcile. The role record is written last: a crash before it leaves a
//! replica, and promote can run again.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::datastore::Format;
use crate::error::{Error, IoContext, Result};
use crate::ids::{BlockSize, Epoch, FileId};
use crate::journal::{Journal, ShippedPoint};
use crate::points::{Retention, RolledBack, find_point, rollback_to};
use crate::proto::journal::{EpochRecord, EpochState, FileRecord};
use crate::replica::{Pair, ReplicaStore};
use crate::state::{StatePaths, make_state_dirs, now_ns, walk_files, write_durably};
use crate::tracking::bitmap::Bitmap;

use super::Role;

/// What a promote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promoted {
    /// The datastore the folder now is (the pair's id).
    pub datastore_id: String,
    /// The common base point's epoch.
    pub base: Epoch,
    /// The base point's id.
    pub point: Vec<u8>,
    /// Regular files now tracked.
    pub files: u64,
    /// Blocks a rollback wrote back, marked dirty.
    pub dirty_blocks: u64,
    /// Paths a rollback removed, made again or changed.
    pub rolled_back_paths: u64,
}

/// Promotes the replica at `root` to a primary at its applied point, or
/// at the kept point `point` (an epoch or a point name, as `hbrfs points
/// ls` shows them) after rolling the replica back to it.
pub fn promote(root: &Path, point: Option<&str>) -> Result<Promoted> {
    let root = root.canonicalize().at(root)?;
    let store = open_replica(&root)?;
    let pair = store.pair().ok_or_else(|| not_a_replica(&root))?;
    let applied = store.applied();
    let id: [u8; 16] = applied.point.as_slice().try_into().map_err(|_| {
        Error::Usage(format!(
            "{}: no point was applied yet; there is nothing to promote",
            root.display()
        ))
    })?;
    let (base, rolled) = match point {
        None => (
            ShippedPoint {
                epoch: applied.epoch,
                id,
            },
            RolledBack::default(),
        ),
        Some(spec) => roll_back(&store, &pair, spec)?,
    };
    let files = make_primary_state(&root, &pair, applied.epoch, base, &rolled.blocks)?;
    keep_rolled_back_paths(&root, &rolled.paths)?;
    clear_staging(&store)?;
    Role::Primary {
        base: base.epoch,
        point: base.id.to_vec(),
    }
    .write(&root)?;
    drop(store);
    Ok(Promoted {
        datastore_id: pair.datastore_id,
        base: base.epoch,
        point: base.id.to_vec(),
        files,
        dirty_blocks: rolled.blocks.iter().map(|(_, b)| b.len() as u64).sum(),
        rolled_back_paths: rolled.paths.len() as u64,
    })
}

/// Rolls the replica of `store` back to the kept point `spec`; returns
/// the point and what the rollback changed.
fn roll_back(store: &ReplicaStore, pair: &Pair, spec: &str) -> Result<(ShippedPoint, RolledBack)> {
    let kept = store.points.list();
    let p = find_point(&kept, spec)?;
    // A point's id is what the primary sent; a missing one (never, from
    // this build) gets a fresh id: no secondary holds it anyway.
    let id = match <[u8; 16]>::try_from(p.point.as_slice()) {
        Ok(id) => id,
        Err(_) => crate::sys::random_bytes().at("/dev/urandom")?,
    };
    let epoch = Epoch(p.epoch);
    let rolled = rollback_to(&store.root, epoch, u64::from(pair.block_size))?;
    Ok((ShippedPoint { epoch, id }, rolled))
}

/// Keeps the paths a rollback changed for the first failback (one per
/// NUL-terminated record, durably); nothing when there are none.
fn keep_rolled_back_paths(root: &Path, paths: &[Vec<u8>]) -> Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    let bytes: Vec<u8> = paths
        .iter()
        .flat_map(|p| p.iter().copied().chain([0]))
        .collect();
    write_durably(&StatePaths::of(root).rolled_back(), &bytes)
}

fn not_a_replica(root: &Path) -> Error {
    Error::Usage(format!(
        "{}: not a replica (no pair record: no primary ever shipped to it)",
        root.display()
    ))
}

/// Opens the replica as `serve` would: takes its daemon lock (refusing
/// while a secondary serves it) and finishes an apply a crash interrupted,
/// so what is promoted is a whole point.
fn open_replica(root: &Path) -> Result<ReplicaStore> {
    if let Some(Role::Primary { base, .. }) = Role::read(root)? {
        return Err(Error::Usage(format!(
            "{}: already promoted (at epoch {base}); it is a primary",
            root.display()
        )));
    }
    if Pair::read(&crate::state::ReplicaPaths::of(root))?.is_none() {
        return Err(not_a_replica(root));
    }
    // Nothing is applied here, so retention never runs: a grid keeping
    // every point only makes sure that opening drops none.
    let keep_all = Retention::new(vec![(Duration::ZERO, Duration::MAX)], None);
    let store = ReplicaStore::open(root, false, keep_all)?;
    if store.apply_pending() {
        return Err(Error::Usage(format!(
            "{}: the apply of a point was interrupted and cannot finish yet (see `hbrfs status`); \
             promoting now would give a torn point",
            root.display()
        )));
    }
    Ok(store)
}

/// A point a broken stream left half received belongs to the old
/// primary's history: it goes.
fn clear_staging(store: &ReplicaStore) -> Result<()> {
    let dir = store.paths.staging();
    fs::remove_dir_all(&dir).at(&dir)?;
    make_state_dirs(&dir)
}

/// Makes the primary state of the datastore `pair` names in `root`'s
/// state folder (replacing any left by an earlier try): every regular
/// file tracked, clean but for the `dirty` blocks (by path), epochs from
/// above `floor`, `base` shipped. Returns the files tracked.
fn make_primary_state(
    root: &Path,
    pair: &Pair,
    floor: Epoch,
    base: ShippedPoint,
    dirty: &[(Vec<u8>, Vec<u64>)],
) -> Result<u64> {
    let paths = StatePaths::of(root);
    for stale in [paths.journal(), paths.bitmaps(), paths.preimages()] {
        if stale.exists() {
            fs::remove_dir_all(&stale).at(&stale)?;
        }
    }
    make_state_dirs(&paths.bitmaps())?;
    make_state_dirs(&paths.preimages())?;
    let block_size = BlockSize::new(u64::from(pair.block_size)).ok_or_else(|| Error::BadState {
        path: crate::state::ReplicaPaths::of(root).pair(),
        reason: format!("block size {} out of range", pair.block_size),
    })?;
    Format {
        block_size,
        id: pair.datastore_id.clone(),
    }
    .write(&paths)?;
    write_durably(&paths.pair_key(), pair.key.as_bytes())?;
    let journal = Journal::open(&paths.journal())?;
    let dirty: HashMap<&[u8], &[u64]> = dirty.iter().map(|(p, b)| (&p[..], &b[..])).collect();
    let files = track_clean(root, &paths, &journal, block_size, &dirty)?;
    let open = EpochRecord {
        state: EpochState::Open as i32,
        opened_ns: now_ns(),
        ..Default::default()
    };
    journal.put_epoch(Epoch(floor.0 + 1), &open)?;
    journal.set_last_shipped(&base)?;
    journal.flush()?;
    write_durably(&paths.clean_marker(), b"clean\n")?;
    Ok(files)
}

/// Tracks every regular file below `root` (one id per inode, its names
/// sorted, the first its shipping name) with a clean bitmap, but for the
/// `dirty` blocks of a path.
fn track_clean(
    root: &Path,
    paths: &StatePaths,
    journal: &Journal,
    bs: BlockSize,
    dirty: &HashMap<&[u8], &[u64]>,
) -> Result<u64> {
    let mut found: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    walk_files(root, &mut |rel, st| {
        found.entry(st.st_ino).or_default().push(rel)
    })?;
    let count = found.len() as u64;
    for (ino, mut names) in found {
        names.sort();
        let path = names.remove(0);
        let id: FileId = journal.new_file_id()?;
        let bitmap = Bitmap::create(&paths.bitmap(id.0), id, bs, 0)?;
        let marked = names
            .iter()
            .chain([&path])
            .filter_map(|n| dirty.get(&n[..]).copied());
        for &b in marked.flatten() {
            bitmap.mark(b..b + 1, 0, now_ns())?;
        }
        bitmap.sync()?;
        let record = FileRecord {
            path,
            backing_ino: ino,
            created_ns: now_ns(),
            more_names: names,
        };
        journal.put_file(id, &record)?;
    }
    Ok(count)
}
