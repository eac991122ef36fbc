//! The filesystem of `hbrfs mount-point`: one recovery point, read-only,
//! as the whole mount (its root is the point's root), of a replica or of
//! an object store. Each callback calls
//! one [`PointFs`] op and answers with its result.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use fuser::{
    Errno, FileHandle, Filesystem, INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

use super::point::{HeldView, PointBytes, PointFs};
use crate::error::{IoContext, Result};
use crate::fs::reply::{Answer, Xattr, io_errno};
use crate::sys;

/// One point mounted alone, its bytes from `S`.
#[derive(Debug)]
pub struct PointMount<S = HeldView> {
    point: PointFs<S>,
    /// The replica folder (or a reader's cache folder), for `statfs`.
    root: File,
}

/// The extended attribute of the mount's root that says what a point
/// read from a remote store has fetched: "GETS BYTES".
pub const FETCHED_XATTR: &str = "user.hbrfs.fetched";

impl<S: PointBytes> PointMount<S> {
    /// `point`, its `statfs` answered by the file system of `root`.
    pub fn new(point: PointFs<S>, root: &Path) -> Result<PointMount<S>> {
        Ok(PointMount {
            point,
            root: File::open(root).at(root)?,
        })
    }

    /// The value of `name` on `ino` for a buffer of `size` bytes: only
    /// the root's fetched figures.
    fn xattr(&self, ino: INodeNo, name: &OsStr, size: u32) -> Result<Xattr, Errno> {
        let value = match self.point.source().fetched() {
            Some((gets, bytes)) if ino == self.point.root_ino() && name == FETCHED_XATTR => {
                format!("{gets} {bytes}").into_bytes()
            }
            _ => return Err(Errno::ENODATA),
        };
        match size {
            0 => Ok(Xattr::Size(value.len() as u32)),
            n if (n as usize) < value.len() => Err(Errno::ERANGE),
            _ => Ok(Xattr::Data(value)),
        }
    }
}

impl PointMount {
    /// Point `epoch` of the replica at `root` (block size `block_size`),
    /// pinned for as long as the mount lives.
    pub fn open(root: &Path, epoch: u64, block_size: u64) -> Result<PointMount> {
        PointMount::new(
            PointFs::open(root, epoch, block_size, INodeNo::ROOT.0)?,
            root,
        )
    }
}

/// Answers `statfs` with the replica folder's file system.
fn statfs_of(root: &File) -> Result<libc::statvfs, Errno> {
    sys::statvfs(root.as_fd()).map_err(io_errno)
}

impl<S: PointBytes + 'static> Filesystem for PointMount<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        crate::fs::negotiate(config, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply.answer(self.point.op_lookup(parent, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.answer(self.point.op_getattr(ino));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply.answer(self.point.op_readlink(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply.answer(self.point.op_open(ino, flags.0));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply.answer(self.point.op_read(ino, offset, size));
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.point.release();
        reply.ok();
    }

    fn fsync(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.point.op_opendir(ino);
        reply.answer(opened.map(|fh| (fh, fuser::FopenFlags::FOPEN_CACHE_DIR)));
    }

    fn readdir(&self, _: &Request, _: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        reply.answer(self.point.op_readdir(fh, offset));
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, reply: ReplyEmpty) {
        self.point.releasedir(fh);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.answer(statfs_of(&self.root));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply.answer(self.xattr(ino, name, size));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.answer(Ok(Xattr::Data(Vec::new())));
    }

    fn lseek(
        &self,
        _: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply.answer(self.point.op_lseek(ino, offset, whence));
    }
}
