//! `hbrfs test-failover`: a writable sandbox of one point, for booting a
//! VM from it while replication goes on.
//!
//! The sandbox starts as the point's tree (node i of the tree is FUSE
//! inode i + 1) and keeps every change in memory and in a scratch folder
//! of its own: names, modes, owners and times in the node table, file
//! content per file in a [`file::CowFile`] (a sparse scratch file plus the
//! set of blocks written). Nothing is ever written to the replica or its
//! points; the point stays pinned while the sandbox lives (applies go on,
//! retention leaves it), and dropping the sandbox removes its scratch
//! folder. Nodes are never reused; one unlinked stays in the table (empty
//! of names) until the sandbox ends, so an open file of it still reads.
//!
//! # Layout
//!
//! - this file: the node table and the namespace ops.
//! - `file`: a file's copy-on-write content.
//! - `fuse`: the fuser `Filesystem`: callbacks that call an op and answer.

pub mod file;
mod fuse;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuser::{Errno, FileHandle, INodeNo};

use self::file::{Base, CowFile};
use super::point::PointBytes;
use super::tree::{Node, Tree};
use crate::error::{IoContext, Result};
use crate::fs::handles::{DirEntry, HandleTable, listing};
use crate::fs::reply::{Entry, Listing, Res, state_errno};

/// Attributes may be cached this long: every change goes through us.
const TTL: Duration = Duration::from_secs(1);

/// One node of the sandbox.
#[derive(Debug)]
struct SNode {
    /// Attributes (a file's size and mtime live in its content).
    meta: Node,
    /// A file's content.
    file: Option<Arc<Mutex<CowFile>>>,
}

/// The node table.
#[derive(Debug)]
struct Nodes {
    map: HashMap<u64, SNode>,
    next: u64,
}

/// A writable sandbox of one point.
#[derive(Debug)]
pub struct Sandbox {
    /// The point's bytes: a replica's view or an object store's point.
    view: Box<dyn PointBytes>,
    /// The scratch folder (this sandbox's alone), removed on drop.
    scratch: PathBuf,
    block_size: u64,
    /// Written by namespace ops, read by the rest; a file's content has
    /// its own lock, so IO holds this one only to find the file.
    nodes: RwLock<Nodes>,
    listings: HandleTable,
}

impl Sandbox {
    /// A sandbox of the point of namespace `tree` whose bytes `view`
    /// reads, keeping its changes in `scratch` (made here, empty; removed
    /// when the sandbox drops).
    pub fn new(
        tree: &Tree,
        view: Box<dyn PointBytes>,
        scratch: PathBuf,
        block_size: u64,
    ) -> Result<Sandbox> {
        crate::state::make_state_dirs(&scratch)?;
        let mut map = HashMap::new();
        for (i, n) in tree.nodes().iter().enumerate() {
            let ino = i as u64 + 1;
            let file = n.is_file().then(|| {
                let base = Base {
                    ino: n.replica_ino,
                    len: n.size,
                };
                let path = scratch.join(ino.to_string());
                Arc::new(Mutex::new(CowFile::new(
                    Some(base),
                    n.mtime_ns,
                    path,
                    block_size,
                )))
            });
            let children = n.children.iter().map(|(k, &v)| (k.clone(), v + 1));
            let meta = Node {
                target: n.target.clone(),
                children: children.collect(),
                ..*n
            };
            map.insert(ino, SNode { meta, file });
        }
        let next = map.len() as u64 + 1;
        Ok(Sandbox {
            view,
            scratch,
            block_size,
            nodes: RwLock::new(Nodes { map, next }),
            listings: HandleTable::default(),
        })
    }

    fn entry_of(&self, ino: u64, n: &SNode) -> Entry {
        let mut attr = n.meta.attr(INodeNo(ino), self.block_size as u32);
        if let Some(f) = &n.file {
            let f = f.lock().expect("file lock");
            attr = Node {
                size: f.size,
                mtime_ns: f.mtime_ns,
                target: Vec::new(),
                children: BTreeMap::new(),
                ..n.meta
            }
            .attr(INodeNo(ino), self.block_size as u32);
        }
        Entry { attr, ttl: TTL }
    }

    /// The attributes of `ino`.
    pub fn op_getattr(&self, ino: INodeNo) -> Res<Entry> {
        let nodes = self.nodes.read().expect("nodes lock");
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        Ok(self.entry_of(ino.0, n))
    }

    /// Looks `name` up in folder `parent`.
    pub fn op_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        let nodes = self.nodes.read().expect("nodes lock");
        let dir = nodes.map.get(&parent.0).ok_or(Errno::ESTALE)?;
        let ino = *dir.meta.children.get(name).ok_or(Errno::ENOENT)?;
        let n = nodes.map.get(&ino).ok_or(Errno::EIO)?;
        Ok(self.entry_of(ino, n))
    }

    /// The target of symlink `ino`.
    pub fn op_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        let nodes = self.nodes.read().expect("nodes lock");
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        if n.meta.mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        Ok(n.meta.target.clone())
    }

    /// The content of file `ino`.
    fn file(&self, ino: INodeNo) -> Res<Arc<Mutex<CowFile>>> {
        let nodes = self.nodes.read().expect("nodes lock");
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        n.file.clone().ok_or(Errno::EISDIR)
    }

    /// Opens file `ino` (`O_TRUNC` empties it).
    pub fn op_open(&self, ino: INodeNo, flags: i32) -> Res<FileHandle> {
        let file = self.file(ino)?;
        if flags & libc::O_TRUNC != 0 {
            let mut f = file.lock().expect("file lock");
            f.truncate(0).map_err(state_errno)?;
        }
        Ok(FileHandle(0))
    }

    /// Reads file `ino`.
    pub fn op_read(&self, ino: INodeNo, offset: u64, size: u32) -> Res<Vec<u8>> {
        let file = self.file(ino)?;
        let f = file.lock().expect("file lock");
        f.read(self.view.as_ref(), offset, size)
            .map_err(state_errno)
    }

    /// Writes file `ino`.
    pub fn op_write(&self, ino: INodeNo, offset: u64, data: &[u8]) -> Res<u32> {
        let file = self.file(ino)?;
        let mut f = file.lock().expect("file lock");
        f.write(self.view.as_ref(), offset, data)
            .map_err(state_errno)?;
        Ok(data.len() as u32)
    }

    /// Syncs file `ino`'s scratch.
    pub fn op_fsync(&self, ino: INodeNo) -> Res<()> {
        let file = self.file(ino)?;
        let f = file.lock().expect("file lock");
        f.sync().map_err(state_errno)
    }

    /// Changes the attributes of `ino`.
    pub fn op_setattr(&self, ino: INodeNo, set: SetAttr) -> Res<Entry> {
        let mut nodes = self.nodes.write().expect("nodes lock");
        let n = nodes.map.get_mut(&ino.0).ok_or(Errno::ESTALE)?;
        if let Some(mode) = set.mode {
            n.meta.mode = n.meta.mode & libc::S_IFMT | mode & 0o7777;
        }
        n.meta.uid = set.uid.unwrap_or(n.meta.uid);
        n.meta.gid = set.gid.unwrap_or(n.meta.gid);
        match (&n.file, set.size) {
            (Some(f), Some(size)) => f
                .lock()
                .expect("file lock")
                .truncate(size)
                .map_err(state_errno)?,
            (None, Some(_)) => return Err(Errno::EISDIR),
            _ => {}
        }
        if let Some(mtime) = set.mtime_ns {
            match &n.file {
                Some(f) => f.lock().expect("file lock").mtime_ns = mtime,
                None => n.meta.mtime_ns = mtime,
            }
        }
        Ok(self.entry_of(ino.0, n))
    }

    /// Makes `name` in `parent` with attributes `meta` (a file gets empty
    /// content).
    pub fn op_make(&self, parent: INodeNo, name: &OsStr, meta: Node) -> Res<Entry> {
        let mut nodes = self.nodes.write().expect("nodes lock");
        let dir = nodes.map.get(&parent.0).ok_or(Errno::ESTALE)?;
        if !dir.meta.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if dir.meta.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = nodes.next;
        nodes.next += 1;
        let file = meta.is_file().then(|| {
            let path = self.scratch.join(ino.to_string());
            Arc::new(Mutex::new(CowFile::new(
                None,
                meta.mtime_ns,
                path,
                self.block_size,
            )))
        });
        let is_dir = meta.is_dir();
        let dir = nodes.map.get_mut(&parent.0).ok_or(Errno::ESTALE)?;
        dir.meta.children.insert(name.to_os_string(), ino);
        dir.meta.nlink += u32::from(is_dir);
        let n = SNode { meta, file };
        let entry = self.entry_of(ino, &n);
        nodes.map.insert(ino, n);
        Ok(entry)
    }

    /// Removes `name` from `parent` (a folder only when `dir`, and empty).
    pub fn op_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let mut nodes = self.nodes.write().expect("nodes lock");
        let p = nodes.map.get(&parent.0).ok_or(Errno::ESTALE)?;
        let ino = *p.meta.children.get(name).ok_or(Errno::ENOENT)?;
        let n = nodes.map.get(&ino).ok_or(Errno::EIO)?;
        match (dir, n.meta.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !n.meta.children.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        unlink_in(&mut nodes, parent.0, name, ino);
        Ok(())
    }

    /// Adds the name `name` in `parent` to `ino` (not a folder).
    pub fn op_link(&self, ino: INodeNo, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        let mut nodes = self.nodes.write().expect("nodes lock");
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        if n.meta.is_dir() {
            return Err(Errno::EPERM);
        }
        let p = nodes.map.get_mut(&parent.0).ok_or(Errno::ESTALE)?;
        if p.meta.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        p.meta.children.insert(name.to_os_string(), ino.0);
        let n = nodes.map.get_mut(&ino.0).ok_or(Errno::ESTALE)?;
        n.meta.nlink += 1;
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        Ok(self.entry_of(ino.0, n))
    }

    /// Moves `name` in `parent` to `newname` in `newparent`, replacing a
    /// file or an empty folder there (not with `RENAME_NOREPLACE`).
    pub fn op_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(Errno::EINVAL);
        }
        let mut nodes = self.nodes.write().expect("nodes lock");
        let p = nodes.map.get(&parent.0).ok_or(Errno::ESTALE)?;
        let ino = *p.meta.children.get(name).ok_or(Errno::ENOENT)?;
        let is_dir = nodes.map.get(&ino).is_some_and(|n| n.meta.is_dir());
        let np = nodes.map.get(&newparent.0).ok_or(Errno::ESTALE)?;
        if let Some(&old) = np.meta.children.get(newname) {
            if old == ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            let target = nodes.map.get(&old).ok_or(Errno::EIO)?;
            match (is_dir, target.meta.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !target.meta.children.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            unlink_in(&mut nodes, newparent.0, newname, old);
        }
        let p = nodes.map.get_mut(&parent.0).ok_or(Errno::ESTALE)?;
        p.meta.children.remove(name);
        p.meta.nlink -= u32::from(is_dir);
        let np = nodes.map.get_mut(&newparent.0).ok_or(Errno::ESTALE)?;
        np.meta.children.insert(newname.to_os_string(), ino);
        np.meta.nlink += u32::from(is_dir);
        Ok(())
    }

    /// Lists folder `ino`.
    pub fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        let nodes = self.nodes.read().expect("nodes lock");
        let n = nodes.map.get(&ino.0).ok_or(Errno::ESTALE)?;
        if !n.meta.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let mut children = Vec::with_capacity(n.meta.children.len());
        for (name, &child) in &n.meta.children {
            let kind = nodes.map.get(&child).ok_or(Errno::EIO)?.meta.kind();
            children.push(DirEntry {
                ino: INodeNo(child),
                kind,
                name: name.clone(),
            });
        }
        Ok(self.listings.insert(listing(ino, children)))
    }

    /// The entries of listing `fh` from `offset` on.
    pub fn op_readdir(&self, fh: FileHandle, offset: u64) -> Res<Listing> {
        Listing::of(&self.listings, fh, offset)
    }

    /// Forgets listing `fh`.
    pub fn releasedir(&self, fh: FileHandle) {
        self.listings.remove(fh);
    }

    /// The scratch folder's file system, for `statfs`.
    pub fn op_statfs(&self) -> Res<libc::statvfs> {
        let dir = std::fs::File::open(&self.scratch).map_err(crate::fs::reply::io_errno)?;
        crate::sys::statvfs(std::os::fd::AsFd::as_fd(&dir)).map_err(crate::fs::reply::io_errno)
    }
}

/// Removes the name `name` of `ino` from folder `parent`.
fn unlink_in(nodes: &mut Nodes, parent: u64, name: &OsStr, ino: u64) {
    let is_dir = nodes.map.get(&ino).is_some_and(|n| n.meta.is_dir());
    if let Some(p) = nodes.map.get_mut(&parent) {
        p.meta.children.remove(name);
        p.meta.nlink -= u32::from(is_dir);
    }
    if let Some(n) = nodes.map.get_mut(&ino) {
        n.meta.nlink = n.meta.nlink.saturating_sub(if is_dir { 2 } else { 1 });
    }
}

/// What `setattr` changes (`None`: leave it).
#[derive(Debug, Default)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (files).
    pub size: Option<u64>,
    /// Modification time, unix ns.
    pub mtime_ns: Option<i64>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.scratch) {
            log::error!(
                "removing the sandbox's scratch folder {}: {e}",
                self.scratch.display()
            );
        }
    }
}

/// A new node for `op_make`: type and permissions `mode`, owned by
/// `uid`:`gid`, pointing at `target` (symlinks).
pub fn node(mode: u32, uid: u32, gid: u32, target: &Path) -> Node {
    let target = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
    Node {
        mode,
        uid,
        gid,
        size: target.len() as u64,
        mtime_ns: crate::state::now_ns() as i64,
        rdev: 0,
        nlink: if mode & libc::S_IFMT == libc::S_IFDIR {
            2
        } else {
            1
        },
        replica_ino: 0,
        target,
        children: BTreeMap::new(),
    }
}

/// Names of the sandbox's scratch folder for process `pid` under `dir`.
pub fn scratch_for(dir: &Path, pid: u32) -> PathBuf {
    dir.join(pid.to_string())
}

/// Removes the scratch folders under `dir` of sandboxes whose process is
/// gone (killed before it could clean up).
pub fn remove_stale(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let path = e.at(dir)?.path();
        let pid = path
            .file_name()
            .and_then(|n| n.to_str()?.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            log::info!(
                "removing the scratch of a sandbox that is gone: {}",
                path.display()
            );
            std::fs::remove_dir_all(&path).at(&path)?;
        }
    }
    Ok(())
}
