//! The filesystem of `hbrfs mount-point`: one recovery point, read-only,
//! as the whole mount (its root is the point's root). Each callback calls
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

use super::point::PointFs;
use crate::error::{IoContext, Result};
use crate::fs::reply::{Answer, Xattr, io_errno};
use crate::sys;

/// One point mounted alone.
#[derive(Debug)]
pub struct PointMount {
    point: PointFs,
    /// The replica folder, for `statfs`.
    root: File,
}

impl PointMount {
    /// Point `epoch` of the replica at `root` (block size `block_size`),
    /// pinned for as long as the mount lives.
    pub fn open(root: &Path, epoch: u64, block_size: u64) -> Result<PointMount> {
        Ok(PointMount {
            point: PointFs::open(root, epoch, block_size, INodeNo::ROOT.0)?,
            root: File::open(root).at(root)?,
        })
    }
}

/// Answers `statfs` with the replica folder's file system.
fn statfs_of(root: &File) -> Result<libc::statvfs, Errno> {
    sys::statvfs(root.as_fd()).map_err(io_errno)
}

impl Filesystem for PointMount {
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

    fn getxattr(&self, _req: &Request, _: INodeNo, _: &OsStr, _: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
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
