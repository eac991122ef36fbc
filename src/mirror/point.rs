//! One recovery point as a read-only filesystem: its [`Tree`] for names
//! and attributes, its [`PointBytes`] for bytes (a replica's
//! [`PointView`], or an object store's point). `hbrfs mount-point` mounts
//! one alone; the mirror serves one per opened `.points/<name>/`.
//!
//! A point never changes, so the kernel may cache everything: entries and
//! attributes for a day, file pages across opens (`FOPEN_KEEP_CACHE`).
//! Reads go to the source whole (up to 1 MiB a request, see
//! [`crate::fs::negotiate`]); each takes the points lock shared (inside
//! the view) and nothing else, never the mirror's view lock.
//!
//! A replica's view (and with it the pin that keeps retention off the point) may
//! be let go while nothing uses it ([`PointFs::let_go_if_idle`]) and is
//! opened again by the next read; the tree stays, as the point's namespace
//! cannot change.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{Errno, FileHandle, FopenFlags, INodeNo};

use super::tree::{Node, Tree};
use crate::error::{IoContext, Result};
use crate::fs::handles::{DirEntry, HandleTable, listing};
use crate::fs::reply::{Entry, Listing, Res, state_errno};
use crate::points::{PointView, PointsPaths};
use crate::proto::points::PointRecord;
use crate::state::ReplicaPaths;

/// How long the kernel may cache a point's entries and attributes: they
/// never change.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Where a point's file bytes come from: a replica's undo and live files
/// ([`HeldView`]), or an object store's packs (`crate::mirror::object`).
pub trait PointBytes: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset` of the file the point's namespace names
    /// `ino`, of `size` bytes at the point; returns the bytes read (short
    /// at its end).
    fn read(&self, ino: u64, size: u64, offset: u64, buf: &mut [u8]) -> Result<usize>;

    /// Requests and bytes fetched from a remote store so far, if the
    /// bytes come from one (shown as the root's `user.hbrfs.fetched`).
    fn fetched(&self) -> Option<(u64, u64)> {
        None
    }
}

impl PointBytes for PointView {
    fn read(&self, ino: u64, size: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        PointView::read(self, ino, size, offset, buf)
    }
}

/// A view, when it was last used.
#[derive(Debug)]
struct Held {
    view: Option<Arc<PointView>>,
    last_used: Instant,
}

/// A replica's point as [`PointBytes`]: its view, let go while idle (and
/// with it the pin that keeps retention off the point) and opened again
/// by the next read.
#[derive(Debug)]
pub struct HeldView {
    /// The replica folder.
    root: PathBuf,
    /// The point's record (its epoch is what a view opens again).
    record: PointRecord,
    /// The pair's block size (what the view composes by).
    block_size: u64,
    /// The view, or none while let go; its own lock, so a read only
    /// clones the `Arc` under it and reads outside.
    held: Mutex<Held>,
}

impl HeldView {
    /// The view, opened again if it was let go.
    fn view(&self) -> Result<Arc<PointView>> {
        let mut held = self.held.lock().expect("view lock");
        held.last_used = Instant::now();
        if let Some(view) = &held.view {
            return Ok(view.clone());
        }
        let view = Arc::new(PointView::open(
            &self.root,
            self.record.epoch,
            self.block_size,
        )?);
        held.view = Some(view.clone());
        Ok(view)
    }
}

impl PointBytes for HeldView {
    fn read(&self, ino: u64, size: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.view()?.read(ino, size, offset, buf)
    }
}

/// One point, served read-only as FUSE inodes `base..base + nodes`, its
/// bytes from `S`.
#[derive(Debug)]
pub struct PointFs<S = HeldView> {
    source: S,
    /// The block size (the attributes' `blksize`).
    block_size: u64,
    /// FUSE inode of node 0, the point's root.
    base: u64,
    tree: Tree,
    /// Open file handles: a point in use is never let go.
    open: AtomicU64,
    /// Folder listings, snapshotted at `opendir`.
    listings: HandleTable,
}

/// The tree of the point `view` shows of the replica at `root`: its
/// recorded namespace under a root with the replica root's owner and
/// permissions and the point's time.
pub fn tree_of(root: &Path, view: &PointView) -> Result<Tree> {
    let record = view.record();
    let meta = std::fs::metadata(root).at(root)?;
    let top = Node {
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.size(),
        mtime_ns: i64::try_from(record.at_ns).unwrap_or(i64::MAX),
        rdev: 0,
        nlink: 2,
        replica_ino: meta.ino(),
        target: Vec::new(),
        children: Default::default(),
    };
    let namespace = PointsPaths::new(ReplicaPaths::of(root).points()).namespace(record.epoch);
    Tree::build(view.entries(), top, &namespace)
}

impl PointFs<HeldView> {
    /// Opens point `epoch` of the replica at `root` (block size
    /// `block_size`), pinned, as FUSE inodes from `base` on.
    pub fn open(root: &Path, epoch: u64, block_size: u64, base: u64) -> Result<PointFs> {
        let view = PointView::open(root, epoch, block_size)?;
        let record = view.record().clone();
        let tree = tree_of(root, &view)?;
        let source = HeldView {
            root: root.to_path_buf(),
            record,
            block_size,
            held: Mutex::new(Held {
                view: Some(Arc::new(view)),
                last_used: Instant::now(),
            }),
        };
        Ok(PointFs::new(source, tree, block_size, base))
    }

    /// The point's record.
    pub fn record(&self) -> &PointRecord {
        &self.source.record
    }

    /// Lets the view (and its pin) go when no file is open and nothing
    /// was read for `idle`; returns whether it holds none now.
    pub fn let_go_if_idle(&self, idle: Duration) -> bool {
        let mut held = self.source.held.lock().expect("view lock");
        if self.open.load(Ordering::Relaxed) == 0 && held.last_used.elapsed() >= idle {
            held.view = None;
        }
        held.view.is_none()
    }
}

impl<S: PointBytes> PointFs<S> {
    /// The point of namespace `tree` whose bytes `source` reads, as FUSE
    /// inodes from `base` on.
    pub fn new(source: S, tree: Tree, block_size: u64, base: u64) -> PointFs<S> {
        PointFs {
            source,
            block_size,
            base,
            tree,
            open: AtomicU64::new(0),
            listings: HandleTable::default(),
        }
    }

    /// Where its bytes come from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The FUSE inode of the point's root.
    pub fn root_ino(&self) -> INodeNo {
        INodeNo(self.base)
    }

    fn node(&self, ino: INodeNo) -> Res<&Node> {
        ino.0
            .checked_sub(self.base)
            .and_then(|i| self.tree.node(i))
            .ok_or(Errno::ESTALE)
    }

    fn entry(&self, ino: INodeNo, node: &Node) -> Entry {
        Entry {
            attr: node.attr(ino, self.block_size as u32),
            ttl: TTL,
        }
    }

    /// Looks `name` up in folder `parent`.
    pub fn op_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        let dir = self.node(parent)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let idx = *dir.children.get(name).ok_or(Errno::ENOENT)?;
        let ino = INodeNo(self.base + idx);
        self.op_getattr(ino)
    }

    /// The attributes of `ino`.
    pub fn op_getattr(&self, ino: INodeNo) -> Res<Entry> {
        let node = self.node(ino)?;
        Ok(self.entry(ino, node))
    }

    /// The target of symlink `ino`.
    pub fn op_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        if node.mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        Ok(node.target.clone())
    }

    /// Opens file `ino` for reading; its pages may stay cached.
    pub fn op_open(&self, ino: INodeNo, flags: i32) -> Res<(FileHandle, FopenFlags)> {
        let node = self.node(ino)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(Errno::EROFS);
        }
        if !node.is_file() {
            return Err(Errno::EINVAL);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok((FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE))
    }

    /// Closes a file opened by [`PointFs::op_open`].
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads `size` bytes at `offset` of file `ino` as of the point.
    pub fn op_read(&self, ino: INodeNo, offset: u64, size: u32) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        if !node.is_file() {
            return Err(Errno::EISDIR);
        }
        let len = node.size.saturating_sub(offset).min(u64::from(size));
        let mut buf = vec![0u8; len as usize];
        let n = self
            .source
            .read(node.replica_ino, node.size, offset, &mut buf)
            .map_err(state_errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Data and holes of file `ino`: a point's file is all data (the view
    /// does not track holes), so `SEEK_DATA` stays and `SEEK_HOLE` goes to
    /// the end, as a file system without holes answers.
    pub fn op_lseek(&self, ino: INodeNo, offset: i64, whence: i32) -> Res<i64> {
        let node = self.node(ino)?;
        let size = i64::try_from(node.size).map_err(|_| Errno::EOVERFLOW)?;
        if offset < 0 || offset >= size {
            return Err(Errno::ENXIO);
        }
        match whence {
            libc::SEEK_DATA => Ok(offset),
            libc::SEEK_HOLE => Ok(size),
            _ => Err(Errno::EINVAL),
        }
    }

    /// Lists folder `ino`.
    pub fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        let node = self.node(ino)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let mut children = Vec::with_capacity(node.children.len());
        for (name, &idx) in &node.children {
            let kind = self.tree.node(idx).map(Node::kind);
            children.push(DirEntry {
                ino: INodeNo(self.base + idx),
                kind: kind.ok_or(Errno::EIO)?,
                name: name.clone(),
            });
        }
        Ok(self.listings.insert(listing(ino, children)))
    }

    /// The entries of listing `fh` from `offset` on.
    pub fn op_readdir(&self, fh: FileHandle, offset: u64) -> Res<Listing> {
        Listing::of(&self.listings, fh, offset)
    }

    /// Forgets listing `fh`.
    pub fn releasedir(&self, fh: FileHandle) {
        self.listings.remove(fh);
    }
}
