//! Failback: a demoted secondary (an old primary) hands the new primary
//! its resync list at hello — every path and block it wrote after the
//! pair's common base. The new primary checks the list (untrusted input:
//! paths, counts and block numbers bounded), and turns it into its own
//! tracking ([`mark`]), so its next point ships the union of three sets:
//! what it wrote since the base (already dirty), what a `promote --point`
//! rollback changed (dirty since the promote; its paths in
//! `.hbrfs/rolled-back`), and what the old side listed. Hash offers make
//! blocks already equal free; nothing is read but the listed blocks.
//!
//! By path, on this side:
//! - a regular file: the listed blocks are marked (the whole file when a
//!   namespace operation touched the path on the old side, or the old
//!   side holds something else there); a file renamed here since the base
//!   is found under its new name through this side's unshipped renames;
//! - nothing here: an unlink (or rmdir, for a folder) ships, deepest
//!   paths first;
//! - anything else: its metadata ships.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;

use crate::datastore::Datastore;
use crate::error::{Error, IoContext, Result};
use crate::ids::{Epoch, FileId};
use crate::proto::journal::OpKind;
use crate::proto::replication::{PathKind, ResyncPath, ResyncRequest};
use crate::state::{open_root, stat_beneath};
use crate::wire::{MAX_FILE_SIZE, MAX_PATH, MAX_RESYNC_EXTENTS, MAX_RESYNC_PATHS};

use super::client::{Client, remote, within};

/// One path of the list, its entries merged.
#[derive(Debug, Default)]
struct Wanted {
    kind: Option<PathKind>,
    blocks: Vec<std::ops::Range<u64>>,
    renamed: bool,
}

/// Reads the resync list named `token` from the secondary, checking
/// every entry.
pub(super) async fn fetch(
    client: &mut Client,
    token: &[u8],
    block_size: u64,
) -> Result<Vec<ResyncPath>> {
    let wait = crate::wire::NO_PROGRESS_TIMEOUT;
    let request = ResyncRequest {
        token: token.to_vec(),
    };
    let mut stream = within(wait, "(waiting for its resync list)", async {
        client
            .resync(request)
            .await
            .map_err(|s| remote("resync list", s.message()))
    })
    .await?
    .into_inner();
    let mut paths = Vec::new();
    loop {
        let next = within(wait, "(receiving its resync list)", async {
            stream
                .message()
                .await
                .map_err(|s| remote("resync list", s.message()))
        })
        .await?;
        let Some(chunk) = next else {
            return Ok(paths);
        };
        for entry in chunk.paths {
            check(&entry, block_size)?;
            paths.push(entry);
        }
        if paths.len() > MAX_RESYNC_PATHS {
            return Err(bad(format!("more than {MAX_RESYNC_PATHS} entries")));
        }
    }
}

fn bad(reason: String) -> Error {
    Error::Remote(format!(
        "the secondary's resync list is malformed ({reason}); nothing was marked. \
         Demote the old primary again, or reseed it (rm -rf REPLICA/.hbrfs)"
    ))
}

/// Refuses an entry no honest list holds.
fn check(e: &ResyncPath, block_size: u64) -> Result<()> {
    let shown = String::from_utf8_lossy(&e.path);
    let first = e.path.split(|&b| b == b'/').next().unwrap_or_default();
    let confined = e.path.len() <= MAX_PATH
        && !e.path.starts_with(b"/")
        && !e.path.contains(&0)
        && first != crate::state::STATE_DIR.as_bytes()
        && e.path
            .split(|&b| b == b'/')
            .all(|c| c != b".." && c != b"." && !c.is_empty());
    if !(confined || e.path.is_empty() && e.meta) {
        return Err(bad(format!(
            "path {shown:?} is not confined to the datastore"
        )));
    }
    if PathKind::try_from(e.kind).is_err() {
        return Err(bad(format!("{shown}: unknown kind {}", e.kind)));
    }
    if e.extents.len() % 2 != 0 || e.extents.len() > 2 * MAX_RESYNC_EXTENTS {
        return Err(bad(format!("{shown}: {} extent numbers", e.extents.len())));
    }
    let limit = MAX_FILE_SIZE.div_ceil(block_size);
    for pair in e.extents.chunks(2) {
        let end = pair[0].checked_add(pair[1]);
        if pair[1] == 0 || end.is_none_or(|end| end > limit) {
            return Err(bad(format!("{shown}: blocks {}+{}", pair[0], pair[1])));
        }
    }
    Ok(())
}

/// What marking the list did, for the log.
#[derive(Debug, Default)]
pub(super) struct Marked {
    /// Blocks marked dirty.
    pub blocks: u64,
    /// Files marked whole.
    pub whole: u64,
    /// Paths removed on the secondary (unlink or rmdir).
    pub removed: u64,
}

/// Marks the list (and this side's rolled-back paths) into `ds`'s
/// tracking; `applied` is the secondary's epoch (this side's operations
/// after it are what it has not seen).
pub(super) fn mark(ds: &Datastore, list: Vec<ResyncPath>, applied: Epoch) -> Result<Marked> {
    let mut wanted: BTreeMap<Vec<u8>, Wanted> = BTreeMap::new();
    for e in list {
        let kind = e.kind();
        let w = wanted.entry(e.path).or_default();
        w.kind = Some(kind);
        w.renamed |= e.renamed;
        w.blocks
            .extend(e.extents.chunks(2).map(|p| p[0]..p[0] + p[1]));
    }
    for path in rolled_back(ds)? {
        wanted.entry(path).or_default().renamed = true;
    }
    let moved = moved_since(ds, applied)?;
    let root = open_root(&ds.root).at(&ds.root)?;
    let mut marked = Marked::default();
    let mut removals = Vec::new();
    let absent =
        |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR));
    for (path, w) in &wanted {
        if path.is_empty() {
            ds.record_failback_op(OpKind::Meta, path)?;
            continue;
        }
        match stat_beneath(root.as_fd(), path) {
            Err(e) if absent(&e) && !moved.contains_key(path) => match w.kind {
                Some(PathKind::Absent) => {}
                Some(PathKind::Folder) => removals.push((OpKind::Rmdir, path)),
                _ if wanted.keys().any(|p| below(p, path)) => removals.push((OpKind::Rmdir, path)),
                _ => removals.push((OpKind::Unlink, path)),
            },
            Err(e) if absent(&e) => {
                mark_file(ds, moved[path], path, w, &mut marked)?;
            }
            Err(e) => return Err(e).at(ds.root.join(String::from_utf8_lossy(path).as_ref())),
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                let id = moved.get(path).copied().or(file_at(ds, path)?);
                if let Some(id) = id {
                    mark_file(ds, id, path, w, &mut marked)?;
                }
                ds.record_failback_op(OpKind::Meta, path)?;
            }
            Ok(_) => ds.record_failback_op(OpKind::Meta, path)?,
        }
    }
    // Deepest first: a folder's entries go before the folder.
    removals.sort_by_key(|(_, p)| std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count()));
    for (kind, path) in removals {
        ds.record_failback_op(kind, path)?;
        marked.removed += 1;
    }
    // The point covering the list is cut even when nothing differs.
    ds.tracker.note_op();
    ds.journal.flush()?;
    Ok(marked)
}

/// Whether `p` is below `folder`.
fn below(p: &[u8], folder: &[u8]) -> bool {
    p.len() > folder.len() && p.starts_with(folder) && p[folder.len()] == b'/'
}

/// The tracked file whose name is `path`.
fn file_at(ds: &Datastore, path: &[u8]) -> Result<Option<FileId>> {
    Ok(ds
        .journal
        .files_under(path)?
        .into_iter()
        .find(|(_, r)| crate::journal::names(r).any(|n| n == path))
        .map(|(id, _)| id))
}

/// Files this side renamed or removed since `applied`, by the name they
/// had then (the name the old side knows them by).
fn moved_since(ds: &Datastore, applied: Epoch) -> Result<HashMap<Vec<u8>, FileId>> {
    let mut moved = HashMap::new();
    for op in ds.journal.ops_between(applied, Epoch(u64::MAX)) {
        let op = op?;
        if op.kind() == OpKind::Rename && op.file_id != 0 {
            moved.entry(op.path).or_insert(FileId(op.file_id));
        }
    }
    Ok(moved)
}

/// Marks the wanted blocks of file `id` (whole when its path changed).
fn mark_file(
    ds: &Datastore,
    id: FileId,
    path: &[u8],
    w: &Wanted,
    marked: &mut Marked,
) -> Result<()> {
    let Some(file) = ds.tracker.file(id).filter(|f| !f.is_gone()) else {
        return Ok(());
    };
    let blocks = file.size().div_ceil(ds.format.block_size.bytes());
    let whole = w.renamed || w.kind.is_some_and(|k| k != PathKind::File);
    let ranges: Vec<std::ops::Range<u64>> = if whole {
        marked.whole += 1;
        std::iter::once(0..blocks).collect()
    } else {
        w.blocks
            .iter()
            .map(|r| r.start.min(blocks)..r.end.min(blocks))
            .filter(|r| !r.is_empty())
            .collect()
    };
    marked.blocks += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
    log::debug!(
        "failback: {} blocks of {}",
        ranges.len(),
        String::from_utf8_lossy(path)
    );
    ds.tracker.mark_ranges(&file, &ranges)
}

/// The paths a `promote --point` rollback changed here, if any wait.
fn rolled_back(ds: &Datastore) -> Result<Vec<Vec<u8>>> {
    let path = ds.paths.rolled_back();
    match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .map(<[u8]>::to_vec)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).at(path),
    }
}

/// A point covering the list is applied: the rolled-back paths are
/// reconciled too.
pub(super) fn covered(ds: &Datastore) -> Result<()> {
    let path = ds.paths.rolled_back();
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(path),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::Access;
    use crate::ids::BlockSize;

    /// The failback rule on this side: a listed file gets its listed
    /// blocks marked (and its metadata), another type gets metadata, and
    /// what only the old side holds is removed, deepest first.
    #[test]
    fn a_resync_list_marks_blocks_and_removes_what_only_the_old_side_has() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.img"), vec![7u8; 3 * 4096]).expect("image");
        std::fs::create_dir(dir.path().join("d")).expect("folder");
        let block_size = BlockSize::new(4096);
        let ds = Datastore::open(dir.path(), Access::Daemon { block_size }).expect("open");
        ds.start().expect("start");
        let set = ds
            .tracker
            .protect_closed()
            .expect("cut")
            .expect("new files");
        ds.tracker.clear_closed(&set);
        let ops_before = ds.journal.ops().expect("ops").len();
        let entry = |path: &[u8], kind: PathKind, extents: Vec<u64>| ResyncPath {
            path: path.to_vec(),
            kind: kind as i32,
            extents,
            ..Default::default()
        };
        let list = vec![
            entry(b"a.img", PathKind::File, vec![1, 1]),
            entry(b"d", PathKind::File, vec![0, 1]),
            entry(b"gone.img", PathKind::File, vec![0, 4]),
            entry(b"olddir", PathKind::Folder, vec![]),
            entry(b"olddir/x", PathKind::File, vec![0, 1]),
        ];
        let marked = mark(&ds, list, Epoch(0)).expect("mark");
        assert_eq!((marked.blocks, marked.whole, marked.removed), (1, 0, 3));
        let (id, _) = ds.journal.files().expect("files")[0].clone();
        let file = ds.tracker.file(id).expect("tracked");
        assert_eq!(file.dirty_extents(), vec![1..2]);
        let ops: Vec<(OpKind, Vec<u8>)> = ds.journal.ops().expect("ops")[ops_before..]
            .iter()
            .map(|(_, op)| (op.kind(), op.path.clone()))
            .collect();
        let want: Vec<(OpKind, Vec<u8>)> = vec![
            (OpKind::Meta, b"a.img".to_vec()),
            (OpKind::Meta, b"d".to_vec()),
            (OpKind::Unlink, b"olddir/x".to_vec()),
            (OpKind::Unlink, b"gone.img".to_vec()),
            (OpKind::Rmdir, b"olddir".to_vec()),
        ];
        assert_eq!(ops, want);
    }

    /// Paths outside the datastore, odd extents and blocks beyond the
    /// largest file are refused; an honest entry passes.
    #[test]
    fn untrusted_entries_are_checked() {
        let ok = ResyncPath {
            path: b"a/vm1.img".to_vec(),
            kind: PathKind::File as i32,
            extents: vec![0, 2, 10, 1],
            ..Default::default()
        };
        assert!(check(&ok, 65536).is_ok());
        for path in [
            &b"../x"[..],
            b"/etc/passwd",
            b".hbrfs/pair",
            b"a//b",
            b"",
            b"a/./b",
        ] {
            let e = ResyncPath {
                path: path.to_vec(),
                ..ok.clone()
            };
            assert!(check(&e, 65536).is_err(), "{path:?}");
        }
        for extents in [vec![1], vec![0, 0], vec![u64::MAX, 2], vec![1 << 40, 1]] {
            let e = ResyncPath {
                extents,
                ..ok.clone()
            };
            assert!(check(&e, 65536).is_err());
        }
        let e = ResyncPath { kind: 9, ..ok };
        assert!(check(&e, 65536).is_err());
    }
}
