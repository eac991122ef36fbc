//! The secondary's read-only views of its replica (`hbrfs serve --mount`,
//! `hbrfs mount-replica`): the shared passthrough ops over the replica
//! folder, with nothing cached by the kernel (the files change under it as
//! points apply) and every read held out of an apply by the view lock, so
//! a reader never sees a point half-applied.
//!
//! Only the reading callbacks are served; the mount is read-only, so the
//! kernel refuses every change before it reaches us. An ioctl gets the
//! kernel's answer for a filesystem without them: ENOTTY, as a plain file.
//!
//! # Layout
//!
//! - this file: the [`Mirror`] of the live replica, and finding a kept point.
//! - `tree`: a point's recorded namespace as an inode table.
//! - `object`: a point of an object-store repository, read lazily.
//! - `point`: one point served read-only ([`point::PointFs`]): the ops.
//! - `point_mount`: `hbrfs mount-point`, one point as a whole mount.
//! - `points_dir`: `.points/` in the mirror's root, every kept point.
//! - `sandbox`: `hbrfs test-failover`, a writable copy-on-write sandbox of a point.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};

use crate::error::{Error, Result};
use crate::fs::handles::DirEntry;
use crate::fs::reply::{Answer, Res, Xattr};
use crate::fs::{Cache, Passthrough};
use crate::points::{PointsPaths, find_point, read_catalog};
use crate::proto::points::PointRecord;
use crate::replica::Pair;
use crate::replica::overlay::SharedOverlay;
use crate::state::ReplicaPaths;

pub mod object;
pub mod point;
pub mod point_mount;
pub mod points_dir;
pub mod sandbox;
pub mod tree;

use points_dir::PointsDir;

/// The block size points of the replica at `root` compose by: its pair's.
pub fn block_size_of(root: &Path) -> Result<u64> {
    let replica = ReplicaPaths::of(root);
    if !replica.dir.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a replica folder (it has no {} state folder)",
            root.display(),
            crate::state::STATE_DIR
        )));
    }
    match Pair::read(&replica)? {
        Some(pair) => Ok(u64::from(pair.block_size)),
        None => Err(Error::Usage(format!(
            "{} has no recovery points: no primary has shipped a point to it yet",
            root.display()
        ))),
    }
}

/// The kept point `spec` names (an epoch, a name from `hbrfs points ls`,
/// or `latest`) in the replica at `root`, with the block size to compose
/// it by. A replica that keeps none, or a spec that names none, is a
/// usage error saying what is kept.
pub fn find_kept(root: &Path, spec: &str) -> Result<(PointRecord, u64)> {
    let block_size = block_size_of(root)?;
    let points = read_catalog(&PointsPaths::new(ReplicaPaths::of(root).points()))?;
    if points.is_empty() {
        return Err(Error::Usage(format!(
            "{} keeps no recovery points (its secondary runs with --keep none, \
             or no point has been applied yet)",
            root.display()
        )));
    }
    Ok((find_point(&points, spec)?.clone(), block_size))
}

/// The read-only mirror of a replica folder.
#[derive(Debug)]
pub struct Mirror {
    /// The replica folder, passed through uncached and unrecorded.
    fs: Passthrough,
    /// Held shared by every read, so that a point being applied (which
    /// holds it exclusively) is never seen half-done. Never held by an op
    /// on `.points`: point views take the points lock, which an apply
    /// takes after this one.
    view: Arc<RwLock<()>>,
    /// The point before, while a point that changes only block content
    /// is in flight (the view lock is not held then): reads are patched
    /// with the old content of what it overwrote.
    overlay: SharedOverlay,
    /// `.points/` in the root.
    points: Arc<PointsDir>,
    /// Whether the shadowed `.points` of the replica was warned about.
    warned: AtomicBool,
}

impl Mirror {
    /// A mirror of the replica at `root`, whose applies hold `view` or
    /// serve the point before through `overlay`.
    pub fn new(root: &Path, view: Arc<RwLock<()>>, overlay: SharedOverlay) -> io::Result<Mirror> {
        let points = Arc::new(PointsDir::new(root)?);
        PointsDir::sweep_while_alive(Arc::downgrade(&points))?;
        Ok(Mirror {
            fs: Passthrough::new(root, None, Cache::Never)?,
            view,
            overlay,
            points,
            warned: AtomicBool::new(false),
        })
    }

    /// Holds applies off while a read runs.
    fn viewing(&self) -> RwLockReadGuard<'_, ()> {
        self.view.read().expect("view lock")
    }

    /// Lists the root with `.points` in it (in place of the replica's own,
    /// which is warned about once).
    fn open_root(&self) -> Res<FileHandle> {
        let _view = self.viewing();
        let shadow = |entries: &mut Vec<DirEntry>| {
            let before = entries.len();
            entries.retain(|e| e.name != points_dir::NAME);
            if entries.len() < before && !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "the replica's own {} is shadowed by the recovery points in the mirror",
                    points_dir::NAME
                );
            }
            entries.push(DirEntry {
                ino: INodeNo::ROOT,
                kind: fuser::FileType::Directory,
                name: points_dir::NAME.into(),
            });
        };
        self.fs.op_opendir_with(INodeNo::ROOT, shadow)
    }
}

impl Filesystem for Mirror {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.fs.negotiate(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == points_dir::NAME {
            return reply.answer(self.points.op_lookup_self());
        }
        if PointsDir::owns(parent) {
            return reply.answer(self.points.op_lookup(parent, name));
        }
        let _view = self.viewing();
        reply.answer(self.fs.op_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if !PointsDir::owns(ino) {
            self.fs.forget(ino, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_getattr(ino));
        }
        let _view = self.viewing();
        reply.answer(self.fs.op_getattr(ino));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_readlink(ino));
        }
        reply.answer(self.fs.op_readlink(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_open(ino, flags.0));
        }
        reply.answer(self.fs.op_open(ino, flags.0));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_read(ino, offset, size));
        }
        let _view = self.viewing();
        let overlay = self.overlay.read().expect("overlay lock");
        let read = self.fs.op_read(fh, offset, size).and_then(|mut data| {
            if overlay.is_active() {
                let ino = self.fs.backing_ino(fh)?;
                overlay
                    .patch(ino, offset, &mut data)
                    .map_err(crate::fs::reply::state_errno)?;
            }
            Ok(data)
        });
        reply.answer(read);
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if PointsDir::owns(ino) {
            self.points.release(ino);
        } else {
            self.fs.release(fh);
        }
        reply.ok();
    }

    fn fsync(&self, _: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if PointsDir::owns(ino) {
            return reply.ok();
        }
        reply.answer(self.fs.op_fsync(fh, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let opened = if PointsDir::owns(ino) {
            self.points.op_opendir(ino)
        } else if ino == INodeNo::ROOT {
            self.open_root()
        } else {
            let _view = self.viewing();
            self.fs.op_opendir(ino)
        };
        reply.answer(opened.map(|fh| (fh, FopenFlags::empty())));
    }

    fn readdir(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_readdir(ino, fh, offset));
        }
        reply.answer(self.fs.op_readdir(fh, offset));
    }

    fn releasedir(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if PointsDir::owns(ino) {
            self.points.releasedir(ino, fh);
        } else {
            self.fs.release(fh);
        }
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        if PointsDir::owns(ino) {
            return reply.ok();
        }
        reply.answer(self.fs.op_fsyncdir(ino));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.answer(self.fs.op_statfs());
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if PointsDir::owns(ino) {
            return reply.error(Errno::ENODATA);
        }
        reply.answer(self.fs.op_getxattr(ino, name, size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if PointsDir::owns(ino) {
            return reply.answer(Ok(Xattr::Data(Vec::new())));
        }
        reply.answer(self.fs.op_listxattr(ino, size));
    }

    fn lseek(
        &self,
        _: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if PointsDir::owns(ino) {
            return reply.answer(self.points.op_lseek(ino, offset, whence));
        }
        reply.answer(self.fs.op_lseek(fh, offset, whence));
    }
}
