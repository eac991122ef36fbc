//! The metadata a point carries: which paths' mode, owner, times and
//! extended attributes it changed, and their values read from the backing.
//!
//! A path's metadata is "dirty" in a point when one of the point's
//! operations made or changed it (its own record for chmod, chown, utimens
//! and xattr calls; create, mkdir, mknod, symlink, link, truncate and the
//! target of a rename), when an operation changed the entries of its
//! folder (the folder's times), or when its file has dirty blocks (a write
//! moves mtime). A renamed folder brings its whole subtree: metadata of
//! paths below it that an earlier point could not read under their old
//! names would otherwise never ship. The mount-time scan records a
//! metadata change of the root "found at mount": the point carrying it
//! reads every path of the datastore, which catches what changed while
//! nothing was mounted.
//!
//! Values are read when the point ships, so they are at or after the cut,
//! never before it: a change made after the cut may arrive one point
//! early, and the next point carries the path again if it changes again.
//! A path gone from the backing by then is left out; whatever removed or
//! moved it is an operation of a later point.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::proto::journal::{OpKind, OpRecord};
use crate::proto::replication::{PathMeta, Xattr};
use crate::state::{self, STATE_DIR, ShortPath};
use crate::sys;

/// The folder holding `path` ("" for a name in the root).
fn parent(path: &[u8]) -> &[u8] {
    path.iter()
        .rposition(|b| *b == b'/')
        .map_or(&[][..], |i| &path[..i])
}

/// The paths whose metadata a point changed.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Paths whose metadata goes.
    pub paths: BTreeSet<Vec<u8>>,
    /// Renamed paths: everything below them goes too.
    pub trees: BTreeSet<Vec<u8>>,
    /// Every path goes (the first point after a mount).
    pub everything: bool,
}

impl Dirty {
    /// Notes the paths whose metadata `op` changed.
    pub fn add_op(&mut self, op: &OpRecord) {
        let (path, target) = (&op.path, &op.target);
        let paths = &mut self.paths;
        match op.kind() {
            OpKind::Meta if op.found_at_mount && path.is_empty() => self.everything = true,
            OpKind::Meta | OpKind::Truncate => {
                paths.insert(path.clone());
            }
            OpKind::Create | OpKind::Mkdir | OpKind::Symlink | OpKind::Mknod => {
                paths.extend([path.clone(), parent(path).to_vec()]);
            }
            OpKind::Unlink | OpKind::Rmdir => {
                paths.insert(parent(path).to_vec());
            }
            OpKind::Link => {
                paths.extend([path.clone(), target.clone(), parent(target).to_vec()]);
            }
            OpKind::Rename => {
                paths.extend([path.clone(), target.clone()]);
                paths.extend([parent(path).to_vec(), parent(target).to_vec()]);
                self.trees.extend([path.clone(), target.clone()]);
            }
            OpKind::Unspecified => {}
        }
    }
}

/// Reads the metadata of what `dirty` names in the datastore at `root`,
/// deepest paths first (the order the secondary applies them in), gone
/// paths left out. Paths are walked by descriptors from the root, so
/// their length is not bounded by PATH_MAX.
pub fn read_metas(root: &Path, dirty: Dirty) -> Result<Vec<PathMeta>> {
    let root_fd = state::open_root(root).at(root)?;
    let root_fd = root_fd.as_fd();
    let mut paths = dirty.paths;
    if dirty.everything {
        paths.insert(Vec::new());
        add_tree(root_fd, root, b"", &mut paths)?;
    } else {
        for tree in dirty.trees {
            add_tree(root_fd, root, &tree, &mut paths)?;
        }
    }
    let mut metas = Vec::with_capacity(paths.len());
    for path in paths {
        if let Some(meta) = read_meta(root_fd, root, &path)? {
            metas.push(meta);
        }
    }
    metas.sort_by_key(|m| Reverse(m.path.iter().filter(|b| **b == b'/').count()));
    Ok(metas)
}

/// `rel` below `root`, for messages.
fn shown(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// Whether `e` says the path is no longer there (removed or moved since).
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// Adds every path below the folder `rel` (if it is one) to `paths`,
/// skipping the state folder.
fn add_tree(
    root_fd: BorrowedFd<'_>,
    root: &Path,
    rel: &[u8],
    paths: &mut BTreeSet<Vec<u8>>,
) -> Result<()> {
    let at = shown(root, rel);
    let listed = state::dir_beneath(root_fd, rel, None).and_then(|dir| {
        let proc = sys::proc_path(dir.as_fd());
        fs::read_dir(Path::new(OsStr::from_bytes(proc.to_bytes())))
    });
    let entries = match listed {
        Ok(entries) => entries,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e).at(&at),
    };
    for entry in entries {
        let entry = entry.at(&at)?;
        let name = entry.file_name();
        if rel.is_empty() && name == STATE_DIR {
            continue;
        }
        let child = if rel.is_empty() {
            name.as_bytes().to_vec()
        } else {
            [rel, b"/", name.as_bytes()].concat()
        };
        if entry.file_type().at(&at)?.is_dir() {
            add_tree(root_fd, root, &child, paths)?;
        }
        paths.insert(child);
    }
    Ok(())
}

/// The metadata of `rel` as the backing holds it now; `None` when it is
/// gone.
fn read_meta(root_fd: BorrowedFd<'_>, root: &Path, rel: &[u8]) -> Result<Option<PathMeta>> {
    let at = shown(root, rel);
    let short = match ShortPath::beneath(root_fd, rel, None) {
        Ok(short) => short,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e).at(&at),
    };
    let path = short.path();
    let st = match fs::symlink_metadata(path) {
        Ok(st) => st,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e).at(&at),
    };
    let xattrs = match sys::xattrs_of(path) {
        Ok(list) => list,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
        Err(e) => return Err(e).at(&at),
    };
    Ok(Some(PathMeta {
        path: rel.to_vec(),
        mode: st.mode(),
        uid: st.uid(),
        gid: st.gid(),
        atime_sec: st.atime(),
        atime_nsec: st.atime_nsec() as u32,
        mtime_sec: st.mtime(),
        mtime_nsec: st.mtime_nsec() as u32,
        xattrs: xattrs
            .into_iter()
            .map(|(name, value)| Xattr { name, value })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, path: &str, target: &str) -> OpRecord {
        OpRecord {
            kind: kind as i32,
            path: path.into(),
            target: target.into(),
            ..Default::default()
        }
    }

    fn dirty_paths(ops: &[OpRecord], files: impl IntoIterator<Item = Vec<u8>>) -> Dirty {
        let mut dirty = Dirty {
            paths: files.into_iter().collect(),
            ..Dirty::default()
        };
        ops.iter().for_each(|op| dirty.add_op(op));
        dirty
    }

    #[test]
    fn operations_dirty_their_paths_and_folders_and_renames_their_subtrees() {
        let ops = [
            op(OpKind::Create, "a/f", ""),
            op(OpKind::Meta, "m", ""),
            op(OpKind::Unlink, "b/g", ""),
            op(OpKind::Rename, "c/d", "e/d2"),
            op(OpKind::Link, "a/f", "x/l"),
        ];
        let dirty = dirty_paths(&ops, [b"w/file".to_vec()]);
        assert!(!dirty.everything);
        let want = [
            "a", "a/f", "b", "c", "c/d", "e", "e/d2", "m", "w/file", "x", "x/l",
        ];
        let got: Vec<&str> = dirty
            .paths
            .iter()
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            dirty.trees.into_iter().collect::<Vec<_>>(),
            [b"c/d".to_vec(), b"e/d2".to_vec()]
        );
    }

    #[test]
    fn a_full_pass_reads_every_path_but_the_state_folder_deepest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::create_dir(root.join(STATE_DIR)).unwrap();
        fs::write(root.join("d/e/f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", root.join("d/e/l")).unwrap();
        let found = OpRecord {
            found_at_mount: true,
            ..op(OpKind::Meta, "", "")
        };
        let everything = dirty_paths(&[found], []);
        assert!(everything.everything);
        let metas = read_metas(root, everything).unwrap();
        let paths: Vec<&[u8]> = metas.iter().map(|m| &m.path[..]).collect();
        assert_eq!(paths, [&b"d/e/f"[..], b"d/e/l", b"d/e", b"", b"d"]);
        let link = &metas[1];
        assert_eq!(link.mode & libc::S_IFMT, libc::S_IFLNK);
        let gone = dirty_paths(&[op(OpKind::Meta, "nope", "")], []);
        let gone = read_metas(root, gone).unwrap();
        assert!(gone.is_empty());
    }
}
