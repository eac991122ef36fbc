//! Answers to the kernel: every errno is produced here (from an IO error or
//! a state error), and [`Answer`] turns an op's `Result` into the one reply
//! a FUSE request gets, so a callback is "call the op, answer".

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FopenFlags, Generation, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr,
};

use super::handles::Handle;
use crate::error::Error;
use crate::sys;

/// What an op returns: a value, or the errno the kernel is told.
pub type Res<T> = Result<T, Errno>;

/// The errno of an IO error on the backing directory.
pub fn io_errno(e: io::Error) -> Errno {
    Errno::from_i32(sys::errno_of(&e))
}

/// The errno of a failure of the tracking state: its IO errno when it has
/// one (ENOSPC stays ENOSPC), EIO (and a log line) otherwise.
pub fn state_errno(e: Error) -> Errno {
    match e {
        Error::Io { source, .. } => io_errno(source),
        other => {
            log::error!("{other}");
            Errno::EIO
        }
    }
}

/// A node's attributes and how long the kernel may cache them.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The attributes.
    pub attr: FileAttr,
    /// How long they (and the name, for a lookup) stay valid.
    pub ttl: Duration,
}

/// An extended attribute answer: its size when the caller asked for the
/// size only (a buffer of 0), else its bytes.
#[derive(Debug)]
pub enum Xattr {
    /// The size the caller needs.
    Size(u32),
    /// The value or the name list.
    Data(Vec<u8>),
}

/// A directory listing from `offset` on (entries are snapshotted at
/// `opendir`).
#[derive(Debug)]
pub struct Listing {
    /// The directory handle holding the entries.
    pub handle: Arc<Handle>,
    /// Where the kernel continues.
    pub offset: u64,
}

impl Listing {
    /// Listing `fh` of `handles` from `offset` on (`EBADF` if it is not
    /// open).
    pub fn of(handles: &super::handles::HandleTable, fh: FileHandle, offset: u64) -> Res<Listing> {
        let handle = handles.get(fh).ok_or(Errno::EBADF)?;
        Ok(Listing { handle, offset })
    }
}

/// Replies to one request with an op's result: the value, or the errno.
pub trait Answer<T> {
    /// Sends the reply.
    fn answer(self, res: Res<T>);
}

/// Implements [`Answer`] for a reply type: `$ok` sends the value.
macro_rules! answer {
    ($reply:ty, $t:ty, |$r:ident, $v:pat_param| $ok:expr) => {
        impl Answer<$t> for $reply {
            fn answer(self, res: Res<$t>) {
                match res {
                    Ok($v) => {
                        let $r = self;
                        $ok
                    }
                    Err(e) => self.error(e),
                }
            }
        }
    };
}

answer!(ReplyEmpty, (), |r, ()| r.ok());
answer!(ReplyData, Vec<u8>, |r, data| r.data(&data));
answer!(ReplyWrite, u32, |r, n| r.written(n));
answer!(ReplyLseek, i64, |r, offset| r.offset(offset));
answer!(ReplyOpen, (FileHandle, FopenFlags), |r, (fh, flags)| r
    .opened(fh, flags));
answer!(ReplyEntry, Entry, |r, e| r.entry(
    &e.ttl,
    &e.attr,
    Generation(0)
));
answer!(ReplyAttr, Entry, |r, e| r.attr(&e.ttl, &e.attr));
answer!(ReplyCreate, (Entry, FileHandle, FopenFlags), |r,
                                                       (
    e,
    fh,
    flags,
)| r.created(
    &e.ttl,
    &e.attr,
    Generation(0),
    fh,
    flags
));
answer!(ReplyXattr, Xattr, |r, x| match x {
    Xattr::Size(n) => r.size(n),
    Xattr::Data(data) => r.data(&data),
});
answer!(ReplyStatfs, libc::statvfs, |r, s| r.statfs(
    s.f_blocks,
    s.f_bfree,
    s.f_bavail,
    s.f_files,
    s.f_ffree,
    s.f_bsize as u32,
    s.f_namemax as u32,
    s.f_frsize as u32,
));
answer!(ReplyDirectory, Listing, |r, listing| {
    let mut r = r;
    if let Handle::Dir(entries) = &*listing.handle {
        for (i, e) in entries.iter().enumerate().skip(listing.offset as usize) {
            if r.add(e.ino, i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
    }
    r.ok()
});
