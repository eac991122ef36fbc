//! Failback, the old primary's side: `hbrfs demote BACKING` turns a
//! primary whose daemon stopped (a crash, a kill -9, its host coming back
//! after a failover) into a secondary of the new primary.
//!
//! The datastore is opened as its daemon would open it (lock taken, the
//! mount-time scan reconciling what a crash left), and what it holds that
//! the new primary may not becomes the **resync list**
//! (`replica::resync`): every block set in its bitmaps (the open epoch,
//! and the closed set whose point may or may not have been applied), and
//! every path a journal operation after its last shipped point touched
//! (created, renamed, unlinked, truncated, linked: the new primary ships
//! those whole, or removes them; metadata-only changes ship metadata).
//! Nothing is read but the bitmaps and the journal. The list may be empty
//! (a planned migration: everything was shipped); it is written anyway,
//! since it also tells the new primary that this secondary was demoted.
//!
//! Then the replica records (`pair` with this datastore's own id, block
//! size and hash key; `applied` at its last shipped point) are written,
//! the role record says `secondary`, and the primary state (format,
//! journal, bitmaps, pre-images, pair key) is **moved aside** to
//! `.hbrfs/demoted/` (replacing an older one).

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::block::HashKey;
use crate::datastore::{Access, Datastore};
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::proto::journal::OpKind;
use crate::proto::replication::{PathKind, ResyncPath};
use crate::replica::resync::ResyncWriter;
use crate::replica::{Applied, Pair};
use crate::state::{ReplicaPaths, StatePaths, now_ns, open_root, stat_beneath};

use super::Role;

/// What a demote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demoted {
    /// The last epoch the old primary had shipped (its applied point now).
    pub base: Epoch,
    /// Paths in the resync list (0: an empty list, nothing to ship back).
    pub paths: u64,
    /// Blocks listed.
    pub blocks: u64,
    /// Where the primary state went.
    pub aside: PathBuf,
}

/// Demotes the primary datastore at `backing` to a secondary.
pub fn demote(backing: &Path) -> Result<Demoted> {
    demote_with(backing, false)
}

/// Demotes like [`demote`]; with `require_empty` (a planned migration,
/// which promises zero loss and no resync) it refuses, changing nothing,
/// when the datastore holds anything its secondary does not.
pub(super) fn demote_with(backing: &Path, require_empty: bool) -> Result<Demoted> {
    let backing = backing.canonicalize().at(backing)?;
    let spaths = StatePaths::of(&backing);
    if let Some(Role::Secondary { base }) = Role::read(&backing)? {
        return Err(Error::Usage(format!(
            "{}: already demoted (after epoch {base}); serve it with `hbrfs serve`",
            backing.display()
        )));
    }
    if !spaths.format().exists() {
        return Err(Error::Usage(format!(
            "{}: not a primary datastore (no {})",
            backing.display(),
            spaths.format().display()
        )));
    }
    let key = pair_key(&spaths)?;
    let ds = Datastore::open(&backing, Access::Daemon { block_size: None })?;
    ds.start()?;
    let last = ds.journal.last_shipped()?;
    let base = last.map_or(Epoch(0), |p| p.epoch);
    let rpaths = ReplicaPaths::of(&backing);
    let list = resync_list(&ds, base)?;
    if require_empty && !list.is_empty() {
        return Err(Error::Usage(format!(
            "{}: {} paths changed after the final point (epoch {base}) reached the secondary: \
             nothing was demoted. Stop whatever writes, mount it again to ship them, and run \
             `hbrfs migrate` again",
            backing.display(),
            list.len()
        )));
    }
    let (paths, blocks) = write_list(&ds, &rpaths, base, list)?;
    Pair {
        datastore_id: ds.format.id.clone(),
        block_size: ds.format.block_size.bytes() as u32,
        key,
    }
    .write(&rpaths)?;
    Applied {
        epoch: base,
        at_ns: now_ns(),
        point: last.map(|p| p.id.to_vec()).unwrap_or_default(),
    }
    .write(&rpaths)?;
    let lock = ds.close_keeping_lock()?;
    // The role first: a crash before the move leaves a secondary with
    // stale primary state beside it (a later promote replaces it), never
    // a folder a mount would take for a new datastore.
    Role::Secondary { base }.write(&backing)?;
    let aside = move_aside(&spaths)?;
    drop(lock);
    Ok(Demoted {
        base,
        paths,
        blocks,
        aside,
    })
}

/// The pair's hash key: the new primary presents the same one.
fn pair_key(paths: &StatePaths) -> Result<HashKey> {
    let path = paths.pair_key();
    let bytes = fs::read(&path).map_err(|_| {
        Error::Usage(format!(
            "{}: this datastore never replicated (no {}): it has no pair to fail back into",
            paths.dir.display(),
            path.display()
        ))
    })?;
    HashKey::from_bytes(&bytes).ok_or_else(|| Error::BadState {
        path,
        reason: format!("a hash key of {} bytes", bytes.len()),
    })
}

/// What `ds` changed after `base`, by path: its dirty blocks and the
/// paths its unshipped journal operations touched.
fn resync_list(ds: &Datastore, base: Epoch) -> Result<BTreeMap<Vec<u8>, ResyncPath>> {
    let mut list: BTreeMap<Vec<u8>, ResyncPath> = BTreeMap::new();
    for (id, record) in ds.journal.files()? {
        let Some(file) = ds.tracker.file(id) else {
            continue;
        };
        let extents = file.dirty_extents();
        if !extents.is_empty() {
            let entry = list.entry(record.path).or_default();
            entry.extents = extents
                .iter()
                .flat_map(|r| [r.start, r.end - r.start])
                .collect();
        }
    }
    for op in ds.journal.ops_between(base, Epoch(u64::MAX)) {
        let op = op?;
        match op.kind() {
            // Every mount records one for the root ("anything may have
            // changed while unmounted"); it is no change of its own.
            OpKind::Meta if op.path.is_empty() && op.found_at_mount => {}
            OpKind::Meta => list.entry(op.path).or_default().meta = true,
            kind => {
                if matches!(kind, OpKind::Rename | OpKind::Link) {
                    list.entry(op.target).or_default().renamed = true;
                }
                list.entry(op.path).or_default().renamed = true;
            }
        }
    }
    Ok(list)
}

/// Writes `list` as the resync list; returns (paths, blocks) listed. An
/// empty list is written too: it is what tells the new primary that this
/// secondary was demoted, so it takes it as a failback partner even when
/// its last point is not the new primary's base (a `promote --point`
/// rolled back past it).
fn write_list(
    ds: &Datastore,
    rpaths: &ReplicaPaths,
    base: Epoch,
    list: BTreeMap<Vec<u8>, ResyncPath>,
) -> Result<(u64, u64)> {
    let root = open_root(&ds.root).at(&ds.root)?;
    let token = crate::sys::random_bytes().at("/dev/urandom")?;
    let mut writer = ResyncWriter::create(rpaths, token, base.0)?;
    for (path, mut entry) in list {
        entry.kind = kind_of(root.as_fd(), &path) as i32;
        entry.path = path;
        writer.push(entry);
    }
    writer.finish()
}

/// What the backing holds at `rel` now.
fn kind_of(root: std::os::fd::BorrowedFd<'_>, rel: &[u8]) -> PathKind {
    if rel.is_empty() {
        return PathKind::Folder;
    }
    match stat_beneath(root, rel) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => PathKind::File,
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => PathKind::Folder,
        Ok(_) => PathKind::Other,
        Err(_) => PathKind::Absent,
    }
}

/// Moves the primary state to `.hbrfs/demoted/` (replacing an older one)
/// and removes what only a running primary uses.
fn move_aside(paths: &StatePaths) -> Result<PathBuf> {
    let aside = paths.demoted();
    if aside.exists() {
        fs::remove_dir_all(&aside).at(&aside)?;
    }
    crate::state::make_state_dirs(&aside)?;
    let parts = [
        paths.format(),
        paths.journal(),
        paths.bitmaps(),
        paths.preimages(),
        paths.pair_key(),
        paths.clean_marker(),
        paths.rolled_back(),
    ];
    for part in parts {
        if let Some(name) = part.file_name().filter(|_| part.exists()) {
            fs::rename(&part, aside.join(name)).at(&part)?;
        }
    }
    let socket = paths.socket();
    if socket.exists() {
        fs::remove_file(&socket).at(&socket)?;
    }
    fs::File::open(&paths.dir)
        .and_then(|d| d.sync_all())
        .at(&paths.dir)?;
    Ok(aside)
}
