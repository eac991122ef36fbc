//! The passthrough ops: every operation goes to the backing directory
//! through `O_PATH` descriptors and `*at` calls. A write marks its blocks in
//! the file's `TrackedFile` before the data reaches the backing file; a
//! namespace change is told to the [`Recording`] under the cut gate.
//!
//! Each op returns `Res<_>` (a value or an errno); the FUSE callbacks in
//! `fuse` (and the mirror's) only call an op and answer with its result.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileHandle, FileType, FopenFlags, INodeNo, InitFlags, KernelConfig, Request, TimeOrNow,
};

use super::aligned;
use super::attr::{entry_type, file_attr, time_spec};
use super::handles::{DirEntry, Handle, HandleTable, OpenFile};
use super::inodes::{self, Inode, InodeTable};
use super::recorder::{Change, ChangeRecorder, Gone, Recording};
use super::reply::{Entry, Listing, Res, Xattr, io_errno, state_errno};
use crate::error::IoContext;
use crate::state::STATE_DIR;
use crate::sys;

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

/// What a `setattr` asks to change (`None`: leave it).
#[derive(Clone, Copy, Debug)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (truncate or extend).
    pub size: Option<u64>,
    /// Access time.
    pub atime: Option<TimeOrNow>,
    /// Modification time.
    pub mtime: Option<TimeOrNow>,
    /// The handle the caller truncates through, if any.
    pub fh: Option<FileHandle>,
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
}

/// Reads up to `buf.len()` bytes at `offset`, fewer only at the end.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Res<usize> {
    crate::state::read_full(file, buf, offset).map_err(io_errno)
}

fn display(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

fn stat(fd: BorrowedFd<'_>) -> Res<libc::stat> {
    sys::statat(fd, OsStr::new("")).map_err(io_errno)
}

/// The backing file of an open-file handle (directories are refused).
fn file_of(h: &Handle) -> Res<&OpenFile> {
    match h {
        Handle::File(f) => Ok(f),
        Handle::Dir(_) => Err(Errno::EBADF),
    }
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
        })
    }

    /// Negotiates with the kernel at `init`: large writes, parallel
    /// directory ops, and the writeback cache when the kernel may cache.
    pub fn negotiate(&mut self, config: &mut KernelConfig) {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let wanted = [
            InitFlags::FUSE_WRITEBACK_CACHE,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
        ];
        for flag in wanted {
            if flag == InitFlags::FUSE_WRITEBACK_CACHE && self.cache == Cache::Never {
                // Files that change under the kernel: with a writeback
                // cache it would trust its own (stale) sizes.
                continue;
            }
            if config.add_capabilities(flag).is_err() {
                log::info!("kernel does not offer {flag:?}");
            } else if flag == InitFlags::FUSE_WRITEBACK_CACHE {
                self.writeback = true;
            }
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

    /// Path of a node relative to the root, as the journal records it.
    fn path_of(&self, node: &Inode) -> Vec<u8> {
        if node.ino == INodeNo::ROOT {
            return Vec::new();
        }
        match std::fs::read_link(Path::new(sys::proc_path(node.fd()).to_str().unwrap_or(""))) {
            Ok(p) => p
                .strip_prefix(&self.root)
                .unwrap_or(&p)
                .as_os_str()
                .as_bytes()
                .to_vec(),
            Err(_) => Vec::new(),
        }
    }

    fn child_path(&self, parent: &Inode, name: &OsStr) -> Vec<u8> {
        let mut p = self.path_of(parent);
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        p
    }

    /// Looks `name` up in `parent` and takes a kernel reference on it.
    pub fn op_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        let parent = self.inode(parent)?;
        self.lookup_in(&parent, name)
    }

    fn lookup_in(&self, parent: &Inode, name: &OsStr) -> Res<Entry> {
        if parent.ino == INodeNo::ROOT && name == STATE_DIR {
            return Err(Errno::ENOENT);
        }
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        let st = stat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let known = self.inodes.known(key);
        let node = self.inodes.lookup(fd, key, st.st_mode & libc::S_IFMT, || {
            if known {
                return None;
            }
            let reader = || {
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW;
                sys::openat(Some(parent.fd()), name, flags, 0)
                    .map(File::from)
                    .at(display(name))
            };
            let path = || self.child_path(parent, name);
            self.recording.tracking_for(&st, path, reader)
        });
        Ok(self.entry(node.ino, &st))
    }

    /// Drops `nlookup` kernel references on `ino`.
    pub fn forget(&self, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    /// The attributes of `ino`.
    pub fn op_getattr(&self, ino: INodeNo) -> Res<Entry> {
        let node = self.inode(ino)?;
        Ok(self.entry(ino, &stat(node.fd())?))
    }

    /// The target of the symlink `ino`.
    pub fn op_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        sys::readlink(self.inode(ino)?.fd()).map_err(io_errno)
    }

    /// Gives a just-created node the caller's ownership (the daemon runs as
    /// root), honouring a set-group-id parent.
    fn set_owner(&self, req: &Request, parent: &Inode, fd: &OwnedFd) -> Res<()> {
        let pst = stat(parent.fd())?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            req.gid()
        };
        sys::chown(fd.as_fd(), req.uid(), gid).map_err(io_errno)
    }

    /// Flags for opening the backing file for a caller's `flags`.
    fn backing_flags(&self, flags: i32) -> i32 {
        let mut f = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_DIRECT);
        f &= !libc::O_NOCTTY;
        if self.writeback {
            // The kernel reads pages to fill partial writes and appends itself.
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    /// When the caller asked for `O_DIRECT`, `fd` reopened with it: the
    /// caller's O_DIRECT reaches the backing file, so a cache=none image is
    /// not cached twice in host memory. `None` also when the backing file
    /// system refuses O_DIRECT: the caller gets buffered IO instead.
    fn reopen_direct(&self, fd: BorrowedFd<'_>, flags: i32) -> Option<OwnedFd> {
        if flags & libc::O_DIRECT == 0 {
            return None;
        }
        sys::reopen(fd, self.backing_flags(flags) | libc::O_DIRECT).ok()
    }

    /// Stores an open handle on `file` of `node`, opened for the caller's
    /// `flags` (`direct`: the backing file has `O_DIRECT`).
    fn insert_file(
        &self,
        node: Arc<Inode>,
        file: File,
        direct: bool,
        flags: i32,
    ) -> (FileHandle, FopenFlags) {
        // Counted as a cached writer when its writes go through the
        // kernel's writeback cache.
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let cached = self.writeback && writes && flags & libc::O_DIRECT == 0;
        let fh = self.handles.insert(Handle::File(OpenFile {
            file,
            direct,
            _cached_writer: cached.then(|| inodes::CachedWriter::new(node.clone())),
            inode: node,
        }));
        let fopen = if flags & libc::O_DIRECT != 0 || self.cache == Cache::Never {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        (fh, fopen)
    }

    /// Creates and opens the regular file `name` in `parent`, tracked from
    /// its first byte.
    pub fn op_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(Entry, FileHandle, FopenFlags)> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.recording.gate();
        let create = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
        let access = self.backing_flags(flags) & !libc::O_ACCMODE;
        let fd = sys::openat(Some(parent.fd()), name, access | create, mode & 0o7777)
            .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        let file = File::from(fd);
        let st = stat(file.as_fd())?;
        let path = self.child_path(&parent, name);
        let reader = || {
            sys::reopen(file.as_fd(), libc::O_RDONLY)
                .map(File::from)
                .at(display(name))
        };
        let tracked = (self.recording)
            .track_new(st.st_ino, &path, reader)
            .map_err(state_errno)?;
        let id = tracked.as_ref().map(|t| t.id());
        let path_fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        let node = self
            .inodes
            .lookup(path_fd, (st.st_dev, st.st_ino), libc::S_IFREG, || tracked);
        if let Some(file) = id {
            self.recording.record(Change::Created { file, path: &path });
        }
        // The new file's id must be on disk before its first write is
        // acknowledged: a crash must not leave marked blocks of a file the
        // journal does not know (the next mount would find it, but `hbrfs
        // journal` before that would not show its changes).
        self.recording.flush().map_err(state_errno)?;
        let direct_fd = self.reopen_direct(file.as_fd(), flags);
        let direct = direct_fd.is_some();
        let file = direct_fd.map_or(file, File::from);
        let (fh, fopen) = self.insert_file(node.clone(), file, direct, flags);
        Ok((self.entry(node.ino, &st), fh, fopen))
    }

    /// Makes the node `name` in `parent` with `mknod`; a regular file is
    /// made (and tracked) as by create.
    pub fn op_mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Res<Entry> {
        if mode & libc::S_IFMT == libc::S_IFREG {
            let (entry, fh, _) = self.op_create(req, parent, name, mode, libc::O_WRONLY)?;
            self.handles.remove(fh);
            return Ok(entry);
        }
        let record = |path: &[u8]| self.recording.record(Change::Node { path });
        self.make_node(req, parent, name, record, |p| {
            sys::mknodat(p.fd(), name, mode, u64::from(rdev))
        })
    }

    /// Makes the directory `name` in `parent`.
    pub fn op_mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32) -> Res<Entry> {
        let record = |path: &[u8]| self.recording.record(Change::Mkdir { path });
        self.make_node(req, parent, name, record, |p| {
            sys::mkdirat(p.fd(), name, mode & 0o7777)
        })
    }

    /// Makes the symlink `name` in `parent`, pointing at `target`.
    pub fn op_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
    ) -> Res<Entry> {
        let record = |path: &[u8]| {
            let target = target.as_os_str().as_bytes();
            self.recording.record(Change::Symlink { path, target });
        };
        self.make_node(req, parent, name, record, |p| {
            sys::symlinkat(target, p.fd(), name)
        })
    }

    /// Runs `make` to create a non-regular node in `parent`, sets its owner,
    /// has it recorded (`record` is given its path), and looks it up.
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        record: impl FnOnce(&[u8]),
        make: impl FnOnce(&Inode) -> io::Result<()>,
    ) -> Res<Entry> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.recording.gate();
        make(&parent).map_err(io_errno)?;
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        drop(fd);
        record(&self.child_path(&parent, name));
        self.lookup_in(&parent, name)
    }

    /// Opens `ino` for the caller's `flags`.
    pub fn op_open(&self, ino: INodeNo, flags: i32) -> Res<(FileHandle, FopenFlags)> {
        let node = self.inode(ino)?;
        let direct_fd = self.reopen_direct(node.fd(), flags);
        let direct = direct_fd.is_some();
        let fd = match direct_fd {
            Some(fd) => fd,
            None => sys::reopen(node.fd(), self.backing_flags(flags)).map_err(io_errno)?,
        };
        Ok(self.insert_file(node, File::from(fd), direct, flags))
    }

    /// Closes a file or directory handle.
    pub fn release(&self, fh: FileHandle) {
        self.handles.remove(fh);
    }

    /// Reads `size` bytes at `offset` (fewer only at the end of the file).
    pub fn op_read(&self, fh: FileHandle, offset: u64, size: u32) -> Res<Vec<u8>> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        if f.direct {
            return aligned::with_buffer(size as usize, |buf| {
                let n = read_full(&f.file, buf, offset)?;
                Ok(buf[..n].to_vec())
            });
        }
        let mut buf = vec![0u8; size as usize];
        let n = read_full(&f.file, &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset`, its blocks marked dirty first.
    pub fn op_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Res<u32> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        let _gate = self.recording.gate();
        if let Some(t) = &f.inode.tracked {
            t.mark(offset, data.len() as u64, data.len() as u64)
                .map_err(state_errno)?;
        }
        if f.direct {
            aligned::with_buffer(data.len(), |buf| {
                buf.copy_from_slice(data);
                f.file.write_all_at(buf, offset).map_err(io_errno)
            })?;
        } else {
            f.file.write_all_at(data, offset).map_err(io_errno)?;
        }
        if let Some(t) = &f.inode.tracked {
            t.extended_to(offset + data.len() as u64);
        }
        Ok(data.len() as u32)
    }

    /// Makes the file's data, its dirty marks and every recorded change
    /// durable.
    pub fn op_fsync(&self, fh: FileHandle, datasync: bool) -> Res<()> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        // Bits first: once the data is durable, its marks must be too.
        if let Some(t) = &f.inode.tracked {
            t.sync().map_err(state_errno)?;
        }
        if datasync {
            f.file.sync_data().map_err(io_errno)?;
        } else {
            f.file.sync_all().map_err(io_errno)?;
        }
        self.recording.flush().map_err(state_errno)
    }

    /// Truncates `node` to `size`, marking the blocks between the old and
    /// the new end (their content changes if the file grows again).
    fn truncate(&self, node: &Inode, fh: Option<FileHandle>, size: u64) -> Res<()> {
        let _gate = self.recording.gate();
        let reopened;
        let handle;
        let fd = match fh.and_then(|fh| self.handles.get(fh)) {
            Some(h) => {
                handle = h;
                match &*handle {
                    Handle::File(f) => f.file.as_fd(),
                    Handle::Dir(_) => return Err(Errno::EISDIR),
                }
            }
            None => {
                reopened = sys::reopen(node.fd(), libc::O_WRONLY).map_err(io_errno)?;
                reopened.as_fd()
            }
        };
        let old = stat(fd)?.st_size as u64;
        if let Some(t) = &node.tracked {
            t.before_truncate(old, size).map_err(state_errno)?;
        }
        sys::ftruncate(fd, size).map_err(io_errno)?;
        if let Some(t) = &node.tracked {
            t.resized(size);
        }
        self.recording.record(Change::Truncated {
            file: node.tracked.as_ref().map(|t| t.id()),
            path: &self.path_of(node),
            size,
        });
        Ok(())
    }

    /// Changes mode, owner, size and times of `ino`, as `set` asks.
    pub fn op_setattr(&self, ino: INodeNo, set: SetAttr) -> Res<Entry> {
        let node = self.inode(ino)?;
        if let Some(mode) = set.mode {
            sys::chmod(node.fd(), mode & 0o7777).map_err(io_errno)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown(
                node.fd(),
                set.uid.unwrap_or(u32::MAX),
                set.gid.unwrap_or(u32::MAX),
            )
            .map_err(io_errno)?;
        }
        if let Some(size) = set.size {
            self.truncate(&node, set.fh, size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            sys::utimens_fd(node.fd(), time_spec(set.atime), time_spec(set.mtime))
                .map_err(io_errno)?;
        }
        Ok(self.entry(node.ino, &stat(node.fd())?))
    }

    /// What is recorded of a regular file whose name `st` went away.
    fn gone(st: &libc::stat) -> Option<Gone> {
        (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(Gone {
            ino: st.st_ino,
            last_link: st.st_nlink <= 1,
        })
    }

    /// Removes `name` from `parent` (`dir`: a directory, as rmdir).
    pub fn op_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.recording.gate();
        let st = sys::statat(parent.fd(), name).map_err(io_errno)?;
        let path = &self.child_path(&parent, name);
        sys::unlinkat(parent.fd(), name, dir).map_err(io_errno)?;
        self.recording.record(if dir {
            Change::Rmdir { path }
        } else {
            Change::Unlinked {
                path,
                file: Self::gone(&st),
            }
        });
        Ok(())
    }

    /// Moves `name` in `parent` to `newname` in `newparent` (`renameat2`
    /// with `flags`).
    pub fn op_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        let parent = self.inode(parent)?;
        let newparent = self.inode(newparent)?;
        Self::check_name(&parent, name)?;
        Self::check_name(&newparent, newname)?;
        let _gate = self.recording.gate();
        let src = sys::statat(parent.fd(), name).map_err(io_errno)?;
        let replaced = sys::statat(newparent.fd(), newname).ok();
        let from = self.child_path(&parent, name);
        let to = self.child_path(&newparent, newname);
        sys::renameat2(parent.fd(), name, newparent.fd(), newname, flags).map_err(io_errno)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let replaced = replaced.filter(|r| !exchange && r.st_ino != src.st_ino);
        self.recording.record(Change::Renamed {
            from: &from,
            to: &to,
            flags,
            ino: src.st_ino,
            replaced: replaced.as_ref().and_then(Self::gone),
        });
        Ok(())
    }

    /// Links `ino` as `newname` in `newparent`.
    pub fn op_link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Res<Entry> {
        let node = self.inode(ino)?;
        let newparent = self.inode(newparent)?;
        Self::check_name(&newparent, newname)?;
        let _gate = self.recording.gate();
        sys::linkat(node.fd(), newparent.fd(), newname).map_err(io_errno)?;
        self.recording.record(Change::Linked {
            file: node.tracked.as_ref().map(|t| t.id()),
            from: &self.path_of(&node),
            to: &self.child_path(&newparent, newname),
        });
        self.lookup_in(&newparent, newname)
    }

    /// Opens directory `ino`, listing its entries now so that offsets stay
    /// stable.
    pub fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        let node = self.inode(ino)?;
        let fd = sys::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_errno)?;
        let dir_path = sys::proc_path(fd.as_fd());
        let dot = |name: &str| DirEntry {
            ino: node.ino,
            kind: FileType::Directory,
            name: name.into(),
        };
        let mut entries = vec![dot("."), dot("..")];
        let reader = std::fs::read_dir(Path::new(OsStr::from_bytes(dir_path.to_bytes())))
            .map_err(io_errno)?;
        for entry in reader {
            let entry = entry.map_err(io_errno)?;
            let name = entry.file_name();
            if ino == INodeNo::ROOT && name == STATE_DIR {
                continue;
            }
            entries.push(DirEntry {
                ino: INodeNo(entry.ino()),
                kind: entry.file_type().map_or(FileType::RegularFile, entry_type),
                name,
            });
        }
        Ok(self.handles.insert(Handle::Dir(entries)))
    }

    /// The entries of directory handle `fh` from `offset` on.
    pub fn op_readdir(&self, fh: FileHandle, offset: u64) -> Res<Listing> {
        let handle = self.handles.get(fh).ok_or(Errno::EBADF)?;
        let Handle::Dir(_) = &*handle else {
            return Err(Errno::ENOTDIR);
        };
        Ok(Listing { handle, offset })
    }

    /// Makes directory `ino` durable.
    pub fn op_fsyncdir(&self, ino: INodeNo) -> Res<()> {
        let node = self.inode(ino)?;
        let fd = sys::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_errno)?;
        File::from(fd).sync_all().map_err(io_errno)
    }

    /// The backing file system's statistics.
    pub fn op_statfs(&self) -> Res<libc::statvfs> {
        sys::statvfs(self.inode(INodeNo::ROOT)?.fd()).map_err(io_errno)
    }

    /// A descriptor for xattr calls: O_PATH descriptors cannot take them.
    fn xattr_fd(&self, ino: INodeNo) -> Res<OwnedFd> {
        let node = self.inode(ino)?;
        if !(node.is_file() || node.is_dir()) {
            return Err(Errno::EOPNOTSUPP);
        }
        sys::reopen(node.fd(), libc::O_RDONLY | libc::O_NONBLOCK).map_err(io_errno)
    }

    /// Sets the extended attribute `name` of `ino`.
    pub fn op_setxattr(&self, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32) -> Res<()> {
        let fd = self.xattr_fd(ino)?;
        sys::setxattr(fd.as_fd(), name, value, flags).map_err(io_errno)
    }

    /// The extended attribute `name` of `ino` (its size if `size` is 0).
    pub fn op_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32) -> Res<Xattr> {
        let fd = self.xattr_fd(ino)?;
        xattr_answer(size, |buf| sys::getxattr(fd.as_fd(), name, buf))
    }

    /// The extended attribute names of `ino` (their size if `size` is 0).
    pub fn op_listxattr(&self, ino: INodeNo, size: u32) -> Res<Xattr> {
        let fd = self.xattr_fd(ino)?;
        xattr_answer(size, |buf| sys::listxattr(fd.as_fd(), buf))
    }

    /// Removes the extended attribute `name` of `ino`.
    pub fn op_removexattr(&self, ino: INodeNo, name: &OsStr) -> Res<()> {
        let fd = self.xattr_fd(ino)?;
        sys::removexattr(fd.as_fd(), name).map_err(io_errno)
    }

    /// Allocates, punches or zeroes a range; punched and zeroed blocks are
    /// marked (their content changes).
    pub fn op_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Res<()> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        let _gate = self.recording.gate();
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            if let Some(t) = &f.inode.tracked {
                t.mark(offset, length, 0).map_err(state_errno)?;
            }
        }
        sys::fallocate(f.file.as_fd(), mode, offset, length).map_err(io_errno)?;
        if let Some(t) = &f.inode.tracked {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                t.extended_to(offset + length);
            }
        }
        Ok(())
    }

    /// SEEK_DATA/SEEK_HOLE. While the kernel may cache written pages the
    /// backing file has not seen yet (it does not flush them before asking),
    /// the answer is "no holes": always safe for a reader, at the cost of
    /// hole detection while the image is open for buffered writing.
    pub fn op_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Res<i64> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        if !f.inode.has_cached_writers()
            || !(whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE)
        {
            return sys::lseek(f.file.as_fd(), offset, whence).map_err(io_errno);
        }
        if offset < 0 {
            return Err(Errno::EINVAL);
        }
        let size = stat(f.file.as_fd())?.st_size;
        Ok(if whence == libc::SEEK_DATA {
            offset
        } else {
            offset.max(size)
        })
    }

    /// Copies a range between two open files in the backing file system;
    /// the blocks it writes are marked first.
    pub fn op_copy_file_range(
        &self,
        fh_in: FileHandle,
        off_in: u64,
        fh_out: FileHandle,
        off_out: u64,
        len: u64,
    ) -> Res<u32> {
        let hin = self.open_file(fh_in)?;
        let hout = self.open_file(fh_out)?;
        let (fin, fout) = (file_of(&hin)?, file_of(&hout)?);
        // Clamped to the source's end, so exactly the blocks that change
        // are marked.
        let src_size = stat(fin.file.as_fd())?.st_size as u64;
        let len = len
            .min(u64::from(u32::MAX) & !0xfff)
            .min(src_size.saturating_sub(off_in)) as usize;
        let _gate = self.recording.gate();
        if let Some(t) = &fout.inode.tracked {
            t.mark(off_out, len as u64, len as u64)
                .map_err(state_errno)?;
        }
        let n = sys::copy_file_range(fin.file.as_fd(), off_in, fout.file.as_fd(), off_out, len)
            .map_err(io_errno)?;
        if let Some(t) = &fout.inode.tracked {
            t.extended_to(off_out + n as u64);
        }
        Ok(n as u32)
    }
}

/// Runs an xattr read into a buffer of `size` bytes; answers its size when
/// `size` is 0 (the caller asks how large a buffer it needs).
fn xattr_answer(size: u32, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> Res<Xattr> {
    let mut buf = vec![0u8; size as usize];
    let n = read(&mut buf).map_err(io_errno)?;
    if size == 0 {
        return Ok(Xattr::Size(n as u32));
    }
    buf.truncate(n);
    Ok(Xattr::Data(buf))
}
