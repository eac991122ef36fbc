//! The secondary's read-only view of its replica (`hbrfs serve --mount`,
//! `hbrfs mount-replica`): the shared passthrough ops over the replica
//! folder, with nothing cached by the kernel (the files change under it as
//! points apply) and every read held out of an apply by the view lock, so
//! a reader never sees a point half-applied.
//!
//! Only the reading callbacks are served; the mount is read-only, so the
//! kernel refuses every change before it reaches us. An ioctl gets the
//! kernel's answer for a filesystem without them: ENOTTY, as a plain file.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use fuser::{
    FileHandle, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

use crate::fs::reply::Answer;
use crate::fs::{Cache, Passthrough};

/// The read-only mirror of a replica folder.
#[derive(Debug)]
pub struct Mirror {
    /// The replica folder, passed through uncached and unrecorded.
    fs: Passthrough,
    /// Held shared by every read, so that a point being applied (which
    /// holds it exclusively) is never seen half-done.
    view: Arc<RwLock<()>>,
}

impl Mirror {
    /// A mirror of the replica at `root`, whose applies hold `view`.
    pub fn new(root: &Path, view: Arc<RwLock<()>>) -> io::Result<Mirror> {
        Ok(Mirror {
            fs: Passthrough::new(root, None, Cache::Never)?,
            view,
        })
    }

    /// Holds applies off while a read runs.
    fn viewing(&self) -> RwLockReadGuard<'_, ()> {
        self.view.read().expect("view lock")
    }
}

impl Filesystem for Mirror {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.fs.negotiate(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _view = self.viewing();
        reply.answer(self.fs.op_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _view = self.viewing();
        reply.answer(self.fs.op_getattr(ino));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply.answer(self.fs.op_readlink(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply.answer(self.fs.op_open(ino, flags.0));
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
        let _view = self.viewing();
        reply.answer(self.fs.op_read(fh, offset, size));
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
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
        self.fs.release(fh);
        reply.ok();
    }

    fn fsync(&self, _: &Request, _: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        reply.answer(self.fs.op_fsync(fh, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _view = self.viewing();
        reply.answer(self.fs.op_opendir(ino).map(|fh| (fh, FopenFlags::empty())));
    }

    fn readdir(&self, _: &Request, _: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        reply.answer(self.fs.op_readdir(fh, offset));
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, reply: ReplyEmpty) {
        self.fs.release(fh);
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        reply.answer(self.fs.op_fsyncdir(ino));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.answer(self.fs.op_statfs());
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply.answer(self.fs.op_getxattr(ino, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply.answer(self.fs.op_listxattr(ino, size));
    }

    fn lseek(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply.answer(self.fs.op_lseek(fh, offset, whence));
    }
}
