//! The data path: opening a file, reading and writing it (each write's
//! blocks marked dirty first), fsync, truncate, fallocate, SEEK_DATA/HOLE
//! and copy_file_range.
//!
//! # The largest file
//!
//! No file grows beyond [`MAX_FILE_SIZE`] (16 TiB less a block: ext4's
//! limit, and the largest file a secondary accepts): a write, fallocate,
//! copy_file_range or truncate reaching beyond it gets `EFBIG` before
//! anything is marked or written, as the kernel answers for a file
//! system's own limit (a write or copy straddling the bound is cut short
//! at it, one starting at or past it is refused). So a block number is
//! bounded, and one stray `pwrite` at 2^56 cannot grow a 512 GiB bitmap.
//! The bound is the same whatever the backing file system accepts (XFS
//! takes 8 EiB): a larger file could not be replicated.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fuser::{Errno, FileHandle, FopenFlags, INodeNo};

use super::{Cache, Changer, Passthrough, stat};
use crate::fs::aligned;
use crate::fs::handles::{Handle, OpenFile};
use crate::fs::inodes::{self, Inode};
use crate::fs::recorder::Change;
use crate::fs::reply::{Res, io_errno, state_errno};
use crate::sys;
use crate::wire::MAX_FILE_SIZE;

/// How many of `len` bytes at `offset` may be written without the file
/// growing beyond [`MAX_FILE_SIZE`]: all of them, fewer when the range
/// straddles the bound, `EFBIG` when it starts at or beyond it (nothing
/// to write is never refused).
fn writable_len(offset: u64, len: u64) -> Res<u64> {
    if len == 0 {
        return Ok(0);
    }
    if offset >= MAX_FILE_SIZE {
        return Err(Errno::EFBIG);
    }
    Ok(len.min(MAX_FILE_SIZE - offset))
}

/// Reads up to `buf.len()` bytes at `offset`, fewer only at the end.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Res<usize> {
    crate::state::read_full(file, buf, offset).map_err(io_errno)
}

/// The backing file of an open-file handle (directories are refused).
fn file_of(h: &Handle) -> Res<&OpenFile> {
    match h {
        Handle::File(f) => Ok(f),
        Handle::Dir(_) => Err(Errno::EBADF),
    }
}

impl Passthrough {
    /// Flags for opening the backing file for a caller's `flags`.
    pub(super) fn backing_flags(&self, flags: i32) -> i32 {
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
    pub(super) fn reopen_direct(&self, fd: BorrowedFd<'_>, flags: i32) -> Option<OwnedFd> {
        if flags & libc::O_DIRECT == 0 {
            return None;
        }
        sys::reopen(fd, self.backing_flags(flags) | libc::O_DIRECT).ok()
    }

    /// Stores an open handle on `file` of `node`, opened for the caller's
    /// `flags` (`direct`: the backing file has `O_DIRECT`).
    pub(super) fn insert_file(
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

    /// The inode number of the backing file open as `fh` (what a replica's
    /// undo is keyed by).
    pub fn backing_ino(&self, fh: FileHandle) -> Res<u64> {
        let h = self.open_file(fh)?;
        let st = stat(file_of(&h)?.file.as_fd())?;
        Ok(st.st_ino)
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

    /// Writes `data` at `offset`, its blocks marked dirty first; a write
    /// reaching beyond [`MAX_FILE_SIZE`] is cut short at it, or refused
    /// (`EFBIG`) when it starts there. `changer` says whether setuid and
    /// setgid go first.
    pub fn op_write(&self, fh: FileHandle, offset: u64, data: &[u8], changer: Changer) -> Res<u32> {
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        let data = &data[..writable_len(offset, data.len() as u64)? as usize];
        self.kill_privileges(&f.inode, f.file.as_fd(), changer)?;
        let _gate = self.recording.gate();
        if let Some(t) = &f.inode.tracked {
            t.mark(offset, data.len() as u64, data.len() as u64)
                .map_err(state_errno)?;
        }
        let written = if f.direct {
            aligned::with_buffer(data.len(), |buf| {
                buf.copy_from_slice(data);
                f.file.write_all_at(buf, offset).map_err(io_errno)
            })
        } else {
            f.file.write_all_at(data, offset).map_err(io_errno)
        };
        if let Some(t) = &f.inode.tracked {
            // A write that failed part-way (ENOSPC) may have lengthened
            // the backing file all the same: the size shipped follows it.
            let end = match written {
                Ok(()) => offset + data.len() as u64,
                Err(_) => stat(f.file.as_fd()).map_or(0, |st| st.st_size as u64),
            };
            t.extended_to(end);
        }
        written.map(|()| data.len() as u32)
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

    /// Truncates `node` to `size` for `changer`, marking the blocks
    /// between the old and the new end (their content changes if the file
    /// grows again).
    pub(super) fn truncate(
        &self,
        node: &Arc<Inode>,
        fh: Option<FileHandle>,
        size: u64,
        changer: Changer,
    ) -> Res<()> {
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        self.kill_privileges(node, node.fd(), changer)?;
        let _gate = self.recording.gate();
        let path = self.untracked_path(node)?;
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
            path: path.as_deref(),
            size,
        })
    }

    /// Allocates, punches or zeroes a range; punched and zeroed blocks are
    /// marked (their content changes). A range ending beyond
    /// [`MAX_FILE_SIZE`] is refused (`EFBIG`), whatever the mode, as
    /// `vfs_fallocate` refuses one beyond a file system's limit.
    /// `changer` asks (whether setuid/setgid go depends on it).
    pub fn op_fallocate(
        &self,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        changer: Changer,
    ) -> Res<()> {
        if offset
            .checked_add(length)
            .is_none_or(|end| end > MAX_FILE_SIZE)
        {
            return Err(Errno::EFBIG);
        }
        let h = self.open_file(fh)?;
        let f = file_of(&h)?;
        self.kill_privileges(&f.inode, f.file.as_fd(), changer)?;
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
    /// the blocks it writes are marked first. A copy reaching beyond
    /// [`MAX_FILE_SIZE`] is cut short at it, or refused (`EFBIG`) when it
    /// starts there. `changer` asks (whether setuid/setgid of the target
    /// go depends on it).
    pub fn op_copy_file_range(
        &self,
        (fh_in, off_in): (FileHandle, u64),
        (fh_out, off_out): (FileHandle, u64),
        len: u64,
        changer: Changer,
    ) -> Res<u32> {
        let hin = self.open_file(fh_in)?;
        let hout = self.open_file(fh_out)?;
        let (fin, fout) = (file_of(&hin)?, file_of(&hout)?);
        self.kill_privileges(&fout.inode, fout.file.as_fd(), changer)?;
        // Clamped to the source's end, so exactly the blocks that change
        // are marked.
        let src_size = stat(fin.file.as_fd())?.st_size as u64;
        let len = len
            .min(u64::from(u32::MAX) & !0xfff)
            .min(src_size.saturating_sub(off_in));
        let len = writable_len(off_out, len)? as usize;
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
