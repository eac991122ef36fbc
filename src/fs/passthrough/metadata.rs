//! Metadata ops: attributes (getattr, setattr), symlink targets, the file
//! system's statistics and extended attributes.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use fuser::{Errno, FileHandle, INodeNo, TimeOrNow};

use super::{Passthrough, stat};
use crate::fs::attr::time_spec;
use crate::fs::inodes::Inode;
use crate::fs::recorder::Change;
use crate::fs::reply::{Entry, Res, Xattr, io_errno};
use crate::sys;

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
    /// Who asks (whether a truncate drops setuid/setgid depends on it).
    pub changer: super::Changer,
}

impl Passthrough {
    /// The attributes of `ino`.
    pub fn op_getattr(&self, ino: INodeNo) -> Res<Entry> {
        let node = self.inode(ino)?;
        Ok(self.entry(ino, &stat(node.fd())?))
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
            self.truncate(&node, set.fh, size, set.changer)?;
        }
        let times = set.atime.is_some() || set.mtime.is_some();
        if times {
            sys::utimens_fd(node.fd(), time_spec(set.atime), time_spec(set.mtime))
                .map_err(io_errno)?;
        }
        if times || set.mode.is_some() || set.uid.is_some() || set.gid.is_some() {
            self.meta_changed(&node)?;
        }
        Ok(self.entry(node.ino, &stat(node.fd())?))
    }

    /// Records that the metadata of `node` changed. Taken after the change,
    /// in a gate of its own: a cut in between puts the record in the next
    /// epoch, which reads the metadata when it ships, so nothing is missed.
    /// A path that cannot be known fails the call (`ENAMETOOLONG`, `EIO`).
    pub(super) fn meta_changed(&self, node: &Arc<Inode>) -> Res<()> {
        if let Some(_gate) = self.recording.gate() {
            let path = self.untracked_path(node)?;
            self.recording.record(Change::Meta {
                file: node.tracked.as_ref().map(|t| t.id()),
                path: path.as_deref(),
            })?;
        }
        Ok(())
    }

    /// The target of the symlink `ino`.
    pub fn op_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        sys::readlink(self.inode(ino)?.fd()).map_err(io_errno)
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
        sys::setxattr(fd.as_fd(), name, value, flags).map_err(io_errno)?;
        let node = self.inode(ino)?;
        self.meta_changed(&node)
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
        sys::removexattr(fd.as_fd(), name).map_err(io_errno)?;
        let node = self.inode(ino)?;
        self.meta_changed(&node)
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
