//! The handle table: FUSE file handles ↔ open backing files and directory
//! listings.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fuser::{FileHandle, FileType, INodeNo};

use super::inodes::{CachedWriter, Inode};

/// An open regular file.
#[derive(Debug)]
pub struct OpenFile {
    /// The backing file, opened with the caller's access mode.
    pub file: File,
    /// The node it belongs to (keeps its tracking state alive).
    pub inode: Arc<Inode>,
    /// Set when writes through this handle go through the kernel's cache.
    pub _cached_writer: Option<CachedWriter>,
    /// The backing file is open with `O_DIRECT` (the caller asked for it):
    /// IO goes through an aligned buffer.
    pub direct: bool,
}

/// One directory entry as listed at `opendir`.
#[derive(Debug)]
pub struct DirEntry {
    /// Inode number to report (the backing one: the kernel only uses it for `d_ino`).
    pub ino: INodeNo,
    /// Entry type.
    pub kind: FileType,
    /// Entry name.
    pub name: OsString,
}

/// What a handle refers to.
#[derive(Debug)]
pub enum Handle {
    /// An open file.
    File(OpenFile),
    /// A directory listing, snapshotted at `opendir` so offsets stay stable.
    Dir(Vec<DirEntry>),
}

/// The listing of folder `ino`: `.` and `..` (the kernel only shows their
/// `d_ino`), then `children`.
pub fn listing(ino: INodeNo, children: impl IntoIterator<Item = DirEntry>) -> Handle {
    let dot = |name: &str| DirEntry {
        ino,
        kind: FileType::Directory,
        name: name.into(),
    };
    let mut entries = vec![dot("."), dot("..")];
    entries.extend(children);
    Handle::Dir(entries)
}

/// All open handles.
#[derive(Debug, Default)]
pub struct HandleTable {
    /// Read on every IO, written on open/release.
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
}

impl HandleTable {
    /// Stores a handle and returns its number.
    pub fn insert(&self, handle: Handle) -> FileHandle {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.handles
            .write()
            .expect("handle lock")
            .insert(fh, Arc::new(handle));
        FileHandle(fh)
    }

    /// The handle `fh`, if open.
    pub fn get(&self, fh: FileHandle) -> Option<Arc<Handle>> {
        self.handles
            .read()
            .expect("handle lock")
            .get(&fh.0)
            .cloned()
    }

    /// Closes `fh`.
    pub fn remove(&self, fh: FileHandle) {
        self.handles.write().expect("handle lock").remove(&fh.0);
    }
}
