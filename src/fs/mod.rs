//! The passthrough filesystem: every operation goes to the backing
//! directory through `O_PATH` descriptors and `*at` calls; writes and
//! namespace changes are recorded by `tracking` and `journal` first.
//!
//! Each callback calls a helper returning `Result<_, Errno>` and ends in one
//! `match` that replies, so no callback can panic on an IO error.
//!
//! Decisions: a caller's `O_DIRECT` reaches the backing file (through an
//! aligned buffer, `aligned`), and such opens get `FOPEN_DIRECT_IO` with
//! parallel direct writes; buffered opens use the kernel's writeback cache,
//! and while one is open SEEK_DATA/SEEK_HOLE answer "no holes" (the kernel
//! does not flush before asking). POSIX/flock locks are left to the kernel
//! (local locks; a datastore has one host).

mod aligned;
pub mod handles;
pub mod inodes;

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::datastore::Datastore;
use crate::error::{Error, IoContext};
use crate::ids::FileId;
use crate::proto::journal::OpKind;
use crate::state::STATE_DIR;
use crate::sys::{self, TimeSpec};
use crate::tracking::TrackedFile;
use handles::{DirEntry, Handle, HandleTable, OpenFile};
use inodes::{Inode, InodeTable};

/// How long the kernel may cache attributes and entries: every change goes
/// through this daemon, so the kernel's cache stays right.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel may send (the kernel's own cap here).
pub const MAX_WRITE: u32 = 1024 * 1024;

type Res<T> = Result<T, Errno>;

fn io_errno(e: io::Error) -> Errno {
    Errno::from_i32(sys::errno_of(&e))
}

fn state_errno(e: Error) -> Errno {
    match e {
        Error::Io { source, .. } => io_errno(source),
        other => {
            log::error!("{other}");
            Errno::EIO
        }
    }
}

/// Reads up to `buf.len()` bytes at `offset`, fewer only at the end.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Res<usize> {
    crate::state::read_full(file, buf, offset).map_err(io_errno)
}

fn display(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: INodeNo, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_spec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::Omit,
        Some(TimeOrNow::Now) => TimeSpec::Now,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::At(d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
                if ns == 0 {
                    TimeSpec::At(-s, 0)
                } else {
                    TimeSpec::At(-s - 1, 1_000_000_000 - ns)
                }
            }
        },
    }
}

/// The passthrough filesystem over one datastore.
#[derive(Debug)]
pub struct Passthrough {
    /// The backing directory.
    root: std::path::PathBuf,
    /// The datastore whose changes are tracked; `None` for a plain
    /// passthrough (the benchmark's baseline) and for the mirror.
    ds: Option<Arc<Datastore>>,
    /// For the mirror: held shared by every read, so that an epoch being
    /// applied (which holds it exclusively) is never seen half-done.
    view: Option<Arc<std::sync::RwLock<()>>>,
    /// Attribute and entry cache time.
    ttl: Duration,
    inodes: InodeTable,
    handles: HandleTable,
    /// Whether the kernel caches writes (negotiated in `init`).
    writeback: bool,
}

impl Passthrough {
    /// A filesystem over `ds`; `tracking` false makes it a plain passthrough.
    pub fn new(root: &Path, ds: Option<Arc<Datastore>>) -> io::Result<Passthrough> {
        Self::build(root, ds, None)
    }

    /// A read-only view for the secondary's mirror: no kernel caching (the
    /// replica changes under it) and reads held out of applies by `view`.
    pub fn mirror(root: &Path, view: Arc<std::sync::RwLock<()>>) -> io::Result<Passthrough> {
        Self::build(root, None, Some(view))
    }

    fn build(
        root: &Path,
        ds: Option<Arc<Datastore>>,
        view: Option<Arc<std::sync::RwLock<()>>>,
    ) -> io::Result<Passthrough> {
        let root_fd = sys::openat(None, root.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::statat(root_fd.as_fd(), OsStr::new(""))?;
        Ok(Passthrough {
            root: root.to_path_buf(),
            ds,
            ttl: if view.is_some() { Duration::ZERO } else { TTL },
            view,
            inodes: InodeTable::new(root_fd, (st.st_dev, st.st_ino)),
            handles: HandleTable::default(),
            writeback: false,
        })
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

    /// For the mirror: holds applies off while a read runs.
    fn viewing(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        self.view.as_ref().map(|v| v.read().expect("view lock"))
    }

    /// Holds the cut gate for one change, when tracking.
    fn gate(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        self.ds.as_ref().map(|ds| ds.tracker.gate())
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

    fn record(&self, kind: OpKind, id: Option<FileId>, path: &[u8], target: &[u8], size: u64) {
        let Some(ds) = &self.ds else {
            return;
        };
        if let Err(e) = ds.record_op(kind, id, path, target, size) {
            // The scan at the next mount repairs a missing record.
            log::error!("recording {kind:?} {}: {e}", String::from_utf8_lossy(path));
        }
    }

    /// Tracking state of the regular file at `key`, created fully dirty if
    /// the file has none (it appeared behind hbrfs's back).
    fn tracking_for(
        &self,
        st: &libc::stat,
        path: impl FnOnce() -> Vec<u8>,
        reader: impl FnOnce() -> crate::error::Result<File>,
    ) -> Option<Arc<TrackedFile>> {
        let ds = self.ds.as_ref()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let found = match ds.journal.file_by_ino(st.st_ino) {
            Ok(Some(id)) => ds.tracker.file(id),
            Ok(None) => None,
            Err(e) => {
                log::error!("journal lookup of inode {}: {e}", st.st_ino);
                None
            }
        };
        if found.is_some() {
            return found;
        }
        let path = path();
        log::warn!(
            "{}: found without tracking state (changed outside hbrfs?): all of it is dirty",
            String::from_utf8_lossy(&path)
        );
        let tracked = reader().and_then(|r| ds.track_file(st.st_ino, &path, st.st_size as u64, r));
        match tracked {
            Ok(f) => Some(f),
            Err(e) => {
                log::error!("tracking {}: {e}", String::from_utf8_lossy(&path));
                None
            }
        }
    }

    /// Looks `name` up in `parent` and takes a kernel reference on it.
    fn do_lookup(&self, parent: &Inode, name: &OsStr) -> Res<(Arc<Inode>, FileAttr)> {
        let _view = self.viewing();
        if parent.ino == INodeNo::ROOT && name == STATE_DIR {
            return Err(Errno::ENOENT);
        }
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        let st = sys::statat(fd.as_fd(), OsStr::new("")).map_err(io_errno)?;
        let key = (st.st_dev, st.st_ino);
        let known = self.inodes.known(key);
        let node = self.inodes.lookup(fd, key, st.st_mode & libc::S_IFMT, || {
            if known {
                None
            } else {
                let reader = || {
                    sys::openat(
                        Some(parent.fd()),
                        name,
                        libc::O_RDONLY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map(File::from)
                    .at(display(name))
                };
                self.tracking_for(&st, || self.child_path(parent, name), reader)
            }
        });
        Ok((node.clone(), attr(node.ino, &st)))
    }

    /// Gives a just-created node the caller's ownership (the daemon runs as
    /// root), honouring a set-group-id parent.
    fn set_owner(&self, req: &Request, parent: &Inode, fd: &OwnedFd) -> Res<()> {
        let pst = sys::statat(parent.fd(), OsStr::new("")).map_err(io_errno)?;
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

    /// For a handle opened with `flags`: counts it as a cached writer when
    /// its writes go through the kernel's writeback cache.
    fn cached_writer(&self, node: &Arc<Inode>, flags: i32) -> Option<inodes::CachedWriter> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        (self.writeback && writes && flags & libc::O_DIRECT == 0)
            .then(|| inodes::CachedWriter::new(node.clone()))
    }

    /// SEEK_DATA/SEEK_HOLE. While the kernel may cache written pages the
    /// backing file has not seen yet (it does not flush them before asking),
    /// the answer is "no holes": always safe for a reader, at the cost of
    /// hole detection while the image is open for buffered writing.
    fn op_lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> Res<i64> {
        let h = self.open_file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        if !f.inode.has_cached_writers()
            || !(whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE)
        {
            return sys::lseek(f.file.as_fd(), offset, whence).map_err(io_errno);
        }
        if offset < 0 {
            return Err(Errno::EINVAL);
        }
        let size = sys::statat(f.file.as_fd(), OsStr::new(""))
            .map_err(io_errno)?
            .st_size;
        Ok(if whence == libc::SEEK_DATA {
            offset
        } else {
            offset.max(size)
        })
    }

    fn fopen_flags(&self, flags: i32) -> FopenFlags {
        if flags & libc::O_DIRECT != 0 || self.view.is_some() {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    fn op_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(FileAttr, FileHandle, FopenFlags)> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.gate();
        let fd = sys::openat(
            Some(parent.fd()),
            name,
            (self.backing_flags(flags) & !libc::O_ACCMODE)
                | libc::O_RDWR
                | libc::O_CREAT
                | libc::O_EXCL,
            mode & 0o7777,
        )
        .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        let file = File::from(fd);
        let st = sys::statat(file.as_fd(), OsStr::new("")).map_err(io_errno)?;
        let path = self.child_path(&parent, name);
        let tracked = if let Some(ds) = &self.ds {
            let reader = File::from(sys::reopen(file.as_fd(), libc::O_RDONLY).map_err(io_errno)?);
            let t = ds
                .track_file(st.st_ino, &path, 0, reader)
                .map_err(state_errno)?;
            Some(t)
        } else {
            None
        };
        let id = tracked.as_ref().map(|t| t.id);
        let path_fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        let node = self
            .inodes
            .lookup(path_fd, (st.st_dev, st.st_ino), libc::S_IFREG, || tracked);
        self.record(OpKind::Create, id, &path, b"", 0);
        if let Some(ds) = &self.ds {
            // The new file's id must be on disk before its first write is
            // acknowledged: a crash must not leave marked blocks of a file
            // the journal does not know (the next mount would find it, but
            // `hbrfs journal` before that would not show its changes).
            ds.journal.flush().map_err(state_errno)?;
        }
        let (file, direct) = if flags & libc::O_DIRECT != 0 {
            match sys::reopen(file.as_fd(), self.backing_flags(flags) | libc::O_DIRECT) {
                Ok(fd) => (File::from(fd), true),
                Err(_) => (file, false),
            }
        } else {
            (file, false)
        };
        let fh = self.handles.insert(Handle::File(OpenFile {
            file,
            direct,
            _cached_writer: self.cached_writer(&node, flags),
            inode: node.clone(),
        }));
        Ok((attr(node.ino, &st), fh, self.fopen_flags(flags)))
    }

    fn op_open(&self, ino: INodeNo, flags: i32) -> Res<(FileHandle, FopenFlags)> {
        let node = self.inode(ino)?;
        // The caller's O_DIRECT reaches the backing file, so a cache=none
        // image is not cached twice in host memory; a backing file system
        // that refuses O_DIRECT gets buffered IO instead.
        let direct_fd = (flags & libc::O_DIRECT != 0)
            .then(|| sys::reopen(node.fd(), self.backing_flags(flags) | libc::O_DIRECT).ok())
            .flatten();
        let direct = direct_fd.is_some();
        let fd = match direct_fd {
            Some(fd) => fd,
            None => sys::reopen(node.fd(), self.backing_flags(flags)).map_err(io_errno)?,
        };
        let fh = self.handles.insert(Handle::File(OpenFile {
            file: File::from(fd),
            direct,
            _cached_writer: self.cached_writer(&node, flags),
            inode: node,
        }));
        Ok((fh, self.fopen_flags(flags)))
    }

    fn op_read(&self, fh: FileHandle, offset: u64, size: u32) -> Res<Vec<u8>> {
        let _view = self.viewing();
        let h = self.open_file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EBADF);
        };
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

    fn op_write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Res<u32> {
        let h = self.open_file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EBADF);
        };
        let _gate = self.gate();
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

    fn op_fsync(&self, fh: FileHandle, datasync: bool) -> Res<()> {
        let h = self.open_file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EBADF);
        };
        // Bits first: once the data is durable, its marks must be too.
        if let Some(t) = &f.inode.tracked {
            t.sync().map_err(state_errno)?;
        }
        if datasync {
            f.file.sync_data().map_err(io_errno)?;
        } else {
            f.file.sync_all().map_err(io_errno)?;
        }
        if let Some(ds) = &self.ds {
            ds.journal.flush().map_err(state_errno)?;
        }
        Ok(())
    }

    /// Truncates `node` to `size`, marking the blocks between the old and
    /// the new end (their content changes if the file grows again).
    fn truncate(&self, node: &Inode, fh: Option<FileHandle>, size: u64) -> Res<()> {
        let _gate = self.gate();
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
        let old = sys::statat(fd, OsStr::new("")).map_err(io_errno)?.st_size as u64;
        if let Some(t) = &node.tracked {
            t.before_truncate(old, size).map_err(state_errno)?;
        }
        sys::ftruncate(fd, size).map_err(io_errno)?;
        if let Some(t) = &node.tracked {
            t.resized(size);
        }
        let id = node.tracked.as_ref().map(|t| t.id);
        self.record(OpKind::Truncate, id, &self.path_of(node), b"", size);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn op_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<FileAttr> {
        let node = self.inode(ino)?;
        if let Some(mode) = mode {
            sys::chmod(node.fd(), mode & 0o7777).map_err(io_errno)?;
        }
        if uid.is_some() || gid.is_some() {
            sys::chown(node.fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
                .map_err(io_errno)?;
        }
        if let Some(size) = size {
            self.truncate(&node, fh, size)?;
        }
        if atime.is_some() || mtime.is_some() {
            sys::utimens_fd(node.fd(), time_spec(atime), time_spec(mtime)).map_err(io_errno)?;
        }
        let st = sys::statat(node.fd(), OsStr::new("")).map_err(io_errno)?;
        Ok(attr(node.ino, &st))
    }

    /// Runs `make` to create a non-regular node in `parent`, sets its owner,
    /// records `kind`, and looks it up.
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: OpKind,
        target: &[u8],
        make: impl FnOnce(&Inode) -> io::Result<()>,
    ) -> Res<FileAttr> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.gate();
        make(&parent).map_err(io_errno)?;
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        drop(fd);
        self.record(kind, None, &self.child_path(&parent, name), target, 0);
        let (_, attr) = self.do_lookup(&parent, name)?;
        Ok(attr)
    }

    fn op_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.gate();
        let st = sys::statat(parent.fd(), name).map_err(io_errno)?;
        let path = self.child_path(&parent, name);
        sys::unlinkat(parent.fd(), name, dir).map_err(io_errno)?;
        if dir {
            self.record(OpKind::Rmdir, None, &path, b"", 0);
            return Ok(());
        }
        let id = self.forget_if_last_link(&st);
        self.record(OpKind::Unlink, id, &path, b"", 0);
        Ok(())
    }

    /// After the name of a file with stat `st` went away: when it was its
    /// last link, its tracking state goes too. Returns its file id.
    fn forget_if_last_link(&self, st: &libc::stat) -> Option<FileId> {
        let ds = self.ds.as_ref()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let id = ds.journal.file_by_ino(st.st_ino).ok().flatten()?;
        if st.st_nlink <= 1 {
            if let Err(e) = ds.journal.remove_file(id) {
                log::error!("forgetting file {id}: {e}");
            }
            ds.tracker.forget(id);
        }
        Some(id)
    }

    fn op_rename(
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
        let _gate = self.gate();
        let src = sys::statat(parent.fd(), name).map_err(io_errno)?;
        let replaced = sys::statat(newparent.fd(), newname).ok();
        let from = self.child_path(&parent, name);
        let to = self.child_path(&newparent, newname);
        sys::renameat2(parent.fd(), name, newparent.fd(), newname, flags).map_err(io_errno)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if let Some(old) = replaced.filter(|r| !exchange && r.st_ino != src.st_ino) {
            self.forget_if_last_link(&old);
        }
        let id = self
            .ds
            .as_ref()
            .and_then(|ds| ds.journal.file_by_ino(src.st_ino).ok().flatten());
        self.record(OpKind::Rename, id, &from, &to, u64::from(flags));
        if self.ds.is_some() {
            self.repath(&from, &to, exchange);
        }
        Ok(())
    }

    /// Updates the journal's paths of files at or below `from` (and, for an
    /// exchange, below `to`) after a rename.
    fn repath(&self, from: &[u8], to: &[u8], exchange: bool) {
        let Some(ds) = &self.ds else {
            return;
        };
        let files = match ds.journal.files() {
            Ok(f) => f,
            Err(e) => return log::error!("updating paths after rename: {e}"),
        };
        let moved = |path: &[u8], a: &[u8], b: &[u8]| -> Option<Vec<u8>> {
            let rest = path.strip_prefix(a)?;
            (rest.is_empty() || rest[0] == b'/').then(|| [b, rest].concat())
        };
        for (id, mut rec) in files {
            let new = moved(&rec.path, from, to)
                .or_else(|| exchange.then(|| moved(&rec.path, to, from)).flatten());
            if let Some(new) = new {
                if let Some(t) = ds.tracker.file(id) {
                    t.renamed(new.clone());
                }
                rec.path = new;
                if let Err(e) = ds.journal.put_file(id, &rec) {
                    log::error!("updating path of file {id}: {e}");
                }
            }
        }
    }

    fn op_link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Res<FileAttr> {
        let node = self.inode(ino)?;
        let newparent = self.inode(newparent)?;
        Self::check_name(&newparent, newname)?;
        let _gate = self.gate();
        sys::linkat(node.fd(), newparent.fd(), newname).map_err(io_errno)?;
        let id = node.tracked.as_ref().map(|t| t.id);
        let from = self.path_of(&node);
        self.record(
            OpKind::Link,
            id,
            &from,
            &self.child_path(&newparent, newname),
            0,
        );
        let (_, attr) = self.do_lookup(&newparent, newname)?;
        Ok(attr)
    }

    fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        let _view = self.viewing();
        let node = self.inode(ino)?;
        let fd = sys::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_errno)?;
        let dir_path = sys::proc_path(fd.as_fd());
        let mut entries = vec![
            DirEntry {
                ino: node.ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: node.ino,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        let reader = std::fs::read_dir(Path::new(OsStr::from_bytes(dir_path.to_bytes())))
            .map_err(io_errno)?;
        for entry in reader {
            let entry = entry.map_err(io_errno)?;
            let name = entry.file_name();
            if ino == INodeNo::ROOT && name == STATE_DIR {
                continue;
            }
            let kind = entry.file_type().map_or(FileType::RegularFile, |t| {
                use std::os::unix::fs::FileTypeExt;
                if t.is_dir() {
                    FileType::Directory
                } else if t.is_symlink() {
                    FileType::Symlink
                } else if t.is_fifo() {
                    FileType::NamedPipe
                } else if t.is_socket() {
                    FileType::Socket
                } else if t.is_char_device() {
                    FileType::CharDevice
                } else if t.is_block_device() {
                    FileType::BlockDevice
                } else {
                    FileType::RegularFile
                }
            });
            entries.push(DirEntry {
                ino: INodeNo(entry.ino()),
                kind,
                name,
            });
        }
        Ok(self.handles.insert(Handle::Dir(entries)))
    }

    /// A descriptor for xattr calls: O_PATH descriptors cannot take them.
    fn xattr_fd(&self, ino: INodeNo) -> Res<OwnedFd> {
        let node = self.inode(ino)?;
        if !(node.is_file() || node.is_dir()) {
            return Err(Errno::EOPNOTSUPP);
        }
        sys::reopen(node.fd(), libc::O_RDONLY | libc::O_NONBLOCK).map_err(io_errno)
    }

    fn op_fallocate(&self, fh: FileHandle, offset: u64, length: u64, mode: i32) -> Res<()> {
        let h = self.open_file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EBADF);
        };
        let _gate = self.gate();
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

    #[allow(clippy::too_many_arguments)]
    fn op_copy_file_range(
        &self,
        fh_in: FileHandle,
        off_in: u64,
        fh_out: FileHandle,
        off_out: u64,
        len: u64,
    ) -> Res<u32> {
        let hin = self.open_file(fh_in)?;
        let hout = self.open_file(fh_out)?;
        let (Handle::File(fin), Handle::File(fout)) = (&*hin, &*hout) else {
            return Err(Errno::EBADF);
        };
        // Clamped to the source's end, so exactly the blocks that change
        // are marked.
        let src_size = sys::statat(fin.file.as_fd(), OsStr::new(""))
            .map_err(io_errno)?
            .st_size as u64;
        let len = len
            .min(u64::from(u32::MAX) & !0xfff)
            .min(src_size.saturating_sub(off_in)) as usize;
        let _gate = self.gate();
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

impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
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
            if flag == InitFlags::FUSE_WRITEBACK_CACHE && self.view.is_some() {
                // The mirror's files change under the kernel: with a
                // writeback cache it would trust its own (stale) sizes.
                continue;
            }
            if config.add_capabilities(flag).is_err() {
                log::info!("kernel does not offer {flag:?}");
            } else if flag == InitFlags::FUSE_WRITEBACK_CACHE {
                self.writeback = true;
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.inode(parent).and_then(|p| self.do_lookup(&p, name)) {
            Ok((_, attr)) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _view = self.viewing();
        let res = self.inode(ino).and_then(|n| {
            sys::statat(n.fd(), OsStr::new(""))
                .map_err(io_errno)
                .map(|st| attr(ino, &st))
        });
        match res {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.op_setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .inode(ino)
            .and_then(|n| sys::readlink(n.fd()).map_err(io_errno))
        {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let res = if mode & libc::S_IFMT == libc::S_IFREG {
            // A regular file made by mknod is tracked like one made by create.
            self.op_create(req, parent, name, mode, libc::O_WRONLY)
                .map(|(attr, fh, _)| {
                    self.handles.remove(fh);
                    attr
                })
        } else {
            self.make_node(req, parent, name, OpKind::Create, b"", |p| {
                sys::mknodat(p.fd(), name, mode, u64::from(rdev))
            })
        };
        match res {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make_node(req, parent, name, OpKind::Mkdir, b"", |p| {
            sys::mkdirat(p.fd(), name, mode & 0o7777)
        }) {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.op_unlink(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.op_unlink(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = self.make_node(
            req,
            parent,
            link_name,
            OpKind::Symlink,
            target.as_os_str().as_bytes(),
            |p| sys::symlinkat(target, p.fd(), link_name),
        );
        match res {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.op_rename(parent, name, newparent, newname, flags.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.op_link(ino, newparent, newname) {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.op_open(ino, flags.0) {
            Ok((fh, fl)) => reply.opened(fh, fl),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.op_read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.op_write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.op_fsync(fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.op_opendir(ino) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(h) = self.handles.get(fh) else {
            return reply.error(Errno::EBADF);
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(e.ino, i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(fh);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self
            .inode(ino)
            .and_then(|n| sys::reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_errno))
            .and_then(|fd| File::from(fd).sync_all().map_err(io_errno));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = match self.inode(INodeNo::ROOT) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        match sys::statvfs(root.fd()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(io_errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self
            .xattr_fd(ino)
            .and_then(|fd| sys::setxattr(fd.as_fd(), name, value, flags).map_err(io_errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let res = self.xattr_fd(ino).and_then(|fd| {
            let mut buf = vec![0u8; size as usize];
            let n = sys::getxattr(fd.as_fd(), name, &mut buf).map_err(io_errno)?;
            buf.truncate(n);
            Ok((n, buf))
        });
        match res {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let res = self.xattr_fd(ino).and_then(|fd| {
            let mut buf = vec![0u8; size as usize];
            let n = sys::listxattr(fd.as_fd(), &mut buf).map_err(io_errno)?;
            buf.truncate(n);
            Ok((n, buf))
        });
        match res {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .xattr_fd(ino)
            .and_then(|fd| sys::removexattr(fd.as_fd(), name).map_err(io_errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.op_create(req, parent, name, mode, flags) {
            Ok((attr, fh, fl)) => reply.created(&self.ttl, &attr, Generation(0), fh, fl),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.op_fallocate(fh, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.op_lseek(fh, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Image tools probe filesystem ioctls (e.g. FS_IOC_FSGETXATTR);
        // "not a tty" is the answer a plain file gives to an unknown one.
        reply.error(Errno::ENOTTY);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.op_copy_file_range(fh_in, offset_in, fh_out, offset_out, len) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }
}
