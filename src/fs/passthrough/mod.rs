//! The passthrough ops: every operation goes to the backing directory
//! through `O_PATH` descriptors and `*at` calls. A write marks its blocks in
//! the file's `TrackedFile` before the data reaches the backing file; a
//! namespace change is told to the [`Recording`] under the cut gate.
//!
//! Each op returns `Res<_>` (a value or an errno); the FUSE callbacks in
//! `fuse` (and the mirror's) only call an op and answer with its result.
//!
//! # Layout
//!
//! - this file: the [`Passthrough`] (its tables, how it negotiates with the kernel), lookup, and the helpers the ops share.
//! - `data`: the data path: open, read, write, fsync, truncate, fallocate, lseek, copy_file_range.
//! - `namespace`: the ops that make, remove, move, link and list names.
//! - `metadata`: getattr/setattr, readlink, statfs, extended attributes.
//! - `privileges`: dropping setuid/setgid as the kernel would, which
//!   negotiating `FUSE_HANDLE_KILLPRIV_V2` hands to us.

mod data;
mod metadata;
mod namespace;
mod privileges;

pub use metadata::SetAttr;
pub use privileges::Changer;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuser::{Errno, FileHandle, INodeNo, InitFlags, KernelConfig, Notifier};

use super::attr::file_attr;
use super::handles::{Handle, HandleTable};
use super::inodes::{Inode, InodeTable, Link};
use super::recorder::{ChangeRecorder, Recording};
use super::reply::{Entry, Res, io_errno};
use crate::error::IoContext;
use crate::state::STATE_DIR;
use crate::sys;
use crate::wire::MAX_PATH;

/// How long the kernel may cache attributes and entries when every change
/// goes through this daemon.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel may send (the kernel's own cap here).
pub const MAX_WRITE: u32 = 1024 * 1024;

/// How much of what the mount shows the kernel may cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Every change goes through this daemon, so the kernel's caches stay
    /// right: attributes and entries for a second, written pages in the
    /// writeback cache, file pages kept across opens.
    Kernel,
    /// The files change under the mount (the mirror, while points apply):
    /// nothing is cached, every read and attribute comes from the backing
    /// file.
    Never,
}

/// Negotiates with the kernel at `init`: large writes and reads (1 MiB
/// requests and readahead: a sequential reader of an image gets whole
/// ranges, not 4 KiB pages), parallel directory ops, and the writeback
/// cache when `writeback` asks for it. Returns whether the writeback cache
/// is on. Every hbrfs mount (passthrough, mirror, point views) starts so.
pub fn negotiate(config: &mut KernelConfig, writeback: bool) -> bool {
    let _ = config.set_max_write(MAX_WRITE);
    let _ = config.set_max_readahead(MAX_WRITE);
    let wanted = [
        InitFlags::FUSE_WRITEBACK_CACHE,
        InitFlags::FUSE_ASYNC_DIO,
        InitFlags::FUSE_PARALLEL_DIROPS,
        InitFlags::FUSE_BIG_WRITES,
        InitFlags::FUSE_MAX_PAGES,
    ];
    let mut on = false;
    for flag in wanted {
        if flag == InitFlags::FUSE_WRITEBACK_CACHE && !writeback {
            continue;
        }
        if config.add_capabilities(flag).is_err() {
            log::info!("kernel does not offer {flag:?}");
        } else if flag == InitFlags::FUSE_WRITEBACK_CACHE {
            on = true;
        }
    }
    on
}

/// The passthrough over one backing directory: its inode and handle
/// tables, and where its changes are recorded.
#[derive(Debug)]
pub struct Passthrough {
    /// The backing directory.
    root: PathBuf,
    /// Where changes go; off for a plain passthrough and for the mirror.
    recording: Recording,
    /// What the kernel may cache.
    cache: Cache,
    inodes: InodeTable,
    handles: HandleTable,
    /// Whether the kernel caches writes (negotiated in `init`).
    writeback: bool,
    /// How to tell the kernel its cached attributes went stale (set once
    /// the session exists, see [`Passthrough::notifier_slot`]).
    notifier: Arc<OnceLock<Notifier>>,
}

fn display(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

fn stat(fd: BorrowedFd<'_>) -> Res<libc::stat> {
    sys::statat(fd, OsStr::new("")).map_err(io_errno)
}

impl Passthrough {
    /// A passthrough of `root`; changes go to `recorder` (`None`: a plain
    /// passthrough) and the kernel caches as `cache` says.
    pub fn new(
        root: &Path,
        recorder: Option<Arc<dyn ChangeRecorder>>,
        cache: Cache,
    ) -> io::Result<Passthrough> {
        let root_fd = sys::openat(None, root.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::statat(root_fd.as_fd(), OsStr::new(""))?;
        Ok(Passthrough {
            root: root.to_path_buf(),
            recording: Recording::new(recorder),
            cache,
            inodes: InodeTable::new(root_fd, (st.st_dev, st.st_ino)),
            handles: HandleTable::default(),
            writeback: false,
            notifier: Arc::default(),
        })
    }

    /// Where the mount puts its session's notifier: the passthrough moves
    /// into the session, which only then has one. Without it the kernel
    /// shows a mode this daemon changed (privileges dropped on a write)
    /// for up to the attribute timeout.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Negotiates with the kernel at `init` (see [`negotiate`]), with the
    /// writeback cache when the kernel may cache.
    /// This passthrough also kills privileges itself (see `privileges`),
    /// which spares a `security.capability` lookup before every write.
    pub fn negotiate(&mut self, config: &mut KernelConfig) {
        // Files that change under the kernel (`Cache::Never`): with a
        // writeback cache it would trust its own (stale) sizes.
        self.writeback = negotiate(config, self.cache == Cache::Kernel);
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_err()
        {
            log::info!("kernel does not offer FUSE_HANDLE_KILLPRIV_V2");
        }
    }

    fn inode(&self, ino: INodeNo) -> Res<Arc<Inode>> {
        self.inodes.get(ino).ok_or(Errno::ESTALE)
    }

    fn open_file(&self, fh: FileHandle) -> Res<Arc<Handle>> {
        let h = self.handles.get(fh).ok_or(Errno::EBADF)?;
        match *h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// `st` of node `ino`, with how long the kernel may cache it.
    fn entry(&self, ino: INodeNo, st: &libc::stat) -> Entry {
        let ttl = match self.cache {
            Cache::Kernel => TTL,
            Cache::Never => Duration::ZERO,
        };
        Entry {
            attr: file_attr(ino, st),
            ttl,
        }
    }

    /// The `.hbrfs` state folder is invisible and untouchable in the root.
    fn check_name(parent: &Inode, name: &OsStr) -> Res<()> {
        if parent.ino == INodeNo::ROOT && name == STATE_DIR {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    /// Path of a node relative to the root, as the journal records it:
    /// built from the chain of [`Link`]s up to the root, each checked
    /// against the backing directory (the name in its parent's descriptor
    /// must still be that node). Never read back from `/proc/self/fd`,
    /// which fails beyond PATH_MAX, and never a guess: `ENAMETOOLONG`
    /// beyond [`MAX_PATH`], `EIO` when the chain does not hold (the tree
    /// changed behind the mount's back, or a file lost the name it was
    /// reached by).
    fn path_of(&self, node: &Arc<Inode>) -> Res<Vec<u8>> {
        let mut names = Vec::new();
        let mut len = 0;
        let mut at = node.clone();
        while at.ino != INodeNo::ROOT {
            let link = at.link().ok_or(Errno::EIO)?;
            let st = sys::statat(link.parent.fd(), &link.name).map_err(|_| Errno::EIO)?;
            if (st.st_dev, st.st_ino) != at.key {
                return Err(Errno::EIO);
            }
            len += link.name.len() + 1;
            if len > MAX_PATH + 1 {
                return Err(Errno::ENAMETOOLONG);
            }
            names.push(link.name);
            at = link.parent;
        }
        let mut path = Vec::with_capacity(len);
        for name in names.iter().rev() {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name.as_bytes());
        }
        Ok(path)
    }

    /// Path of `name` in `parent` (see [`Passthrough::path_of`]).
    fn child_path(&self, parent: &Arc<Inode>, name: &OsStr) -> Res<Vec<u8>> {
        let mut p = self.path_of(parent)?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        if p.len() > MAX_PATH {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(p)
    }

    /// The path of a node that is not a tracked file (`None` for a
    /// tracked one, whose names the journal keeps: the name the node was
    /// reached by may be gone while another link remains).
    fn untracked_path(&self, node: &Arc<Inode>) -> Res<Option<Vec<u8>>> {
        match node.tracked {
            Some(_) => Ok(None),
            None => self.path_of(node).map(Some),
        }
    }

    /// How `parent` reaches `name`.
    fn link_to(parent: &Arc<Inode>, name: &OsStr) -> Link {
        Link {
            parent: parent.clone(),
            name: name.to_os_string(),
        }
    }

    /// Looks `name` up in `parent` and takes a kernel reference on it.
    pub fn op_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        let parent = self.inode(parent)?;
        self.lookup_in(&parent, name)
    }

    fn lookup_in(&self, parent: &Arc<Inode>, name: &OsStr) -> Res<Entry> {
        if parent.ino == INodeNo::ROOT && name == STATE_DIR {
            return Err(Errno::ENOENT);
        }
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        let st = stat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let kind = st.st_mode & libc::S_IFMT;
        let link = Self::link_to(parent, name);
        let node = self.inodes.lookup(fd, key, kind, link, || {
            let reader = || {
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW;
                sys::openat(Some(parent.fd()), name, flags, 0)
                    .map(File::from)
                    .at(display(name))
            };
            let path = || {
                let shown = || self.root.join(name);
                let errno = |e: Errno| io::Error::from_raw_os_error(e.code());
                self.child_path(parent, name).map_err(errno).at(shown())
            };
            self.recording.tracking_for(&st, path, reader)
        })?;
        Ok(self.entry(node.ino, &st))
    }

    /// Drops `nlookup` kernel references on `ino`.
    pub fn forget(&self, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }
}
