//! Failover: `hbrfs promote REPLICA` turns a replica into a primary
//! datastore at its applied point, the pair's common base.
//!
//! The replica is opened as a secondary would open it (its daemon lock
//! taken, an apply a crash interrupted finished), then the primary state
//! is made beside the replica's records in the same `.hbrfs`: the format
//! line with the pair's datastore id and block size, the pair's hash key
//! as the primary's, a journal tracking every regular file with a clean
//! bitmap (nothing to ship: the old primary held the same content at the
//! base), its epoch counter above the replica's applied epoch (epochs stay
//! monotonic across the role swap), and the base as the last shipped
//! point. The role record is written last: a crash before it leaves a
//! replica, and promote can run again.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::datastore::Format;
use crate::error::{Error, IoContext, Result};
use crate::ids::{BlockSize, Epoch, FileId};
use crate::journal::{Journal, ShippedPoint};
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
    /// Regular files now tracked, all clean.
    pub files: u64,
}

/// Promotes the replica at `root` to a primary at its applied point.
pub fn promote(root: &Path) -> Result<Promoted> {
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
    let base = ShippedPoint {
        epoch: applied.epoch,
        id,
    };
    let files = make_primary_state(&root, &pair, applied.epoch, base)?;
    clear_staging(&store)?;
    Role::Primary {
        base: base.epoch,
        point: id.to_vec(),
    }
    .write(&root)?;
    drop(store);
    Ok(Promoted {
        datastore_id: pair.datastore_id,
        base: base.epoch,
        point: id.to_vec(),
        files,
    })
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
    let store = ReplicaStore::open(root, false)?;
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
/// file tracked, clean, epochs from above `floor`, `base` shipped.
/// Returns the files tracked.
fn make_primary_state(root: &Path, pair: &Pair, floor: Epoch, base: ShippedPoint) -> Result<u64> {
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
    let files = track_clean(root, &paths, &journal, block_size)?;
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
/// sorted, the first its shipping name) with a clean bitmap.
fn track_clean(root: &Path, paths: &StatePaths, journal: &Journal, bs: BlockSize) -> Result<u64> {
    let mut found: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    walk_files(root, &mut |rel, st| {
        found.entry(st.st_ino).or_default().push(rel)
    })?;
    let count = found.len() as u64;
    for (ino, mut names) in found {
        names.sort();
        let path = names.remove(0);
        let id: FileId = journal.new_file_id()?;
        Bitmap::create(&paths.bitmap(id.0), id, bs, 0)?;
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
