//! The namespace: ops that make, remove, move, link and list names
//! (create, mknod, mkdir, symlink, unlink/rmdir, rename, link, the
//! directory listing), each told to the recorder under the cut gate.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::Path;

use fuser::{Errno, FileHandle, FileType, FopenFlags, INodeNo, Request};

use super::{Passthrough, display, stat};
use crate::error::IoContext;
use crate::fs::attr::entry_type;
use crate::fs::handles::{DirEntry, Handle};
use crate::fs::inodes::Inode;
use crate::fs::recorder::{Change, Gone};
use crate::fs::reply::{Entry, Listing, Res, io_errno, state_errno};
use crate::state::STATE_DIR;
use crate::sys;

impl Passthrough {
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
        let path = self.child_path(&parent, name)?;
        let create = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
        let access = self.backing_flags(flags) & !libc::O_ACCMODE;
        let fd = sys::openat(Some(parent.fd()), name, access | create, mode & 0o7777)
            .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        let file = File::from(fd);
        let st = stat(file.as_fd())?;
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
        let key = (st.st_dev, st.st_ino);
        let link = Self::link_to(&parent, name);
        let node = (self.inodes).lookup(path_fd, key, libc::S_IFREG, link, || {
            Ok::<_, Errno>(tracked)
        })?;
        if let Some(file) = id {
            self.recording
                .record(Change::Created { file, path: &path })?;
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
        let record = |path: &[u8]| self.recording.record(Change::Node { path, mode, rdev });
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
            self.recording.record(Change::Symlink { path, target })
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
        record: impl FnOnce(&[u8]) -> Res<()>,
        make: impl FnOnce(&Inode) -> io::Result<()>,
    ) -> Res<Entry> {
        let parent = self.inode(parent)?;
        Self::check_name(&parent, name)?;
        let _gate = self.recording.gate();
        let path = self.child_path(&parent, name)?;
        make(&parent).map_err(io_errno)?;
        let fd = sys::openat(Some(parent.fd()), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(io_errno)?;
        self.set_owner(req, &parent, &fd)?;
        drop(fd);
        record(&path)?;
        self.lookup_in(&parent, name)
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
        let path = &self.child_path(&parent, name)?;
        sys::unlinkat(parent.fd(), name, dir).map_err(io_errno)?;
        self.recording.record(if dir {
            Change::Rmdir { path }
        } else {
            Change::Unlinked {
                path,
                file: Self::gone(&st),
            }
        })
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
        let from = self.child_path(&parent, name)?;
        let to = self.child_path(&newparent, newname)?;
        sys::renameat2(parent.fd(), name, newparent.fd(), newname, flags).map_err(io_errno)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let same = |r: &libc::stat| (r.st_dev, r.st_ino) == (src.st_dev, src.st_ino);
        if !exchange && replaced.as_ref().is_some_and(same) {
            // Two links of one file: rename(2) did nothing.
            return Ok(());
        }
        let key = |st: &libc::stat| (st.st_dev, st.st_ino);
        (self.inodes).relink(key(&src), Self::link_to(&newparent, newname));
        if let Some(other) = replaced.as_ref().filter(|_| exchange) {
            (self.inodes).relink(key(other), Self::link_to(&parent, name));
        }
        let replaced = replaced.filter(|_| !exchange);
        self.recording.record(Change::Renamed {
            from: &from,
            to: &to,
            flags,
            ino: src.st_ino,
            replaced: replaced.as_ref().and_then(Self::gone),
        })
    }

    /// Links `ino` as `newname` in `newparent`.
    pub fn op_link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Res<Entry> {
        let node = self.inode(ino)?;
        let newparent = self.inode(newparent)?;
        Self::check_name(&newparent, newname)?;
        let _gate = self.recording.gate();
        let from = self.untracked_path(&node)?;
        let to = self.child_path(&newparent, newname)?;
        sys::linkat(node.fd(), OsStr::new(""), newparent.fd(), newname).map_err(io_errno)?;
        self.recording.record(Change::Linked {
            file: node.tracked.as_ref().map(|t| t.id()),
            from: from.as_deref(),
            to: &to,
        })?;
        self.lookup_in(&newparent, newname)
    }

    /// Opens directory `ino`, listing its entries now so that offsets stay
    /// stable.
    pub fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        self.op_opendir_with(ino, |_| {})
    }

    /// Lists directory `ino`, letting `edit` change the listing before it
    /// is kept (the mirror puts its own entries in the root's).
    pub fn op_opendir_with(
        &self,
        ino: INodeNo,
        edit: impl FnOnce(&mut Vec<DirEntry>),
    ) -> Res<FileHandle> {
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
        edit(&mut entries);
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
}
