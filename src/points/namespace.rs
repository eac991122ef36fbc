//! A point's namespace: every entry of the replica right after the point
//! applied, with the inode each regular file had (the key of its undo
//! records). Walked once per point, so it costs the number of entries,
//! which for a datastore of images is small; the block data of a point
//! never is walked.

use std::os::fd::AsFd;
use std::path::Path;

use prost::Message;

use super::store::read_message;
use crate::error::{IoContext, Result};
use crate::proto::points::{Entry, Namespace};
use crate::state::{ShortPath, open_root, walk, write_durably};

/// The namespace of the replica at `root` now.
pub fn of(root: &Path) -> Result<Namespace> {
    let fd = open_root(root).at(root)?;
    let mut entries = Vec::new();
    let mut links = Vec::new();
    walk(root, &mut |path, st| {
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            links.push(entries.len());
        }
        entries.push(Entry {
            path,
            mode: st.st_mode,
            ino: st.st_ino,
            size: st.st_size as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            target: Vec::new(),
            rdev: st.st_rdev,
        })
    })?;
    for i in links {
        let e = &mut entries[i];
        let at = ShortPath::beneath(fd.as_fd(), &e.path, None).at(root)?;
        let target = std::fs::read_link(at.path()).at(root)?;
        e.target = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
    }
    Ok(Namespace { entries })
}

/// Writes the namespace of the replica at `root` to `path` durably;
/// returns how many regular files it holds.
pub fn write(root: &Path, path: &Path) -> Result<u64> {
    let ns = of(root)?;
    write_durably(path, &ns.encode_to_vec())?;
    Ok(ns.entries.iter().filter(|e| is_file(e)).count() as u64)
}

/// Reads a point's namespace.
pub fn read(path: &Path) -> Result<Namespace> {
    read_message(path)
}

/// Whether `e` is a regular file.
pub fn is_file(e: &Entry) -> bool {
    e.mode & libc::S_IFMT == libc::S_IFREG
}
