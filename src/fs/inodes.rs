//! The inode table: FUSE inode numbers ↔ `O_PATH` descriptors of backing
//! objects. Holding a descriptor (not a path) keeps a node valid across
//! renames of it or its parents, as in virtiofsd. Each node also keeps the
//! [`Link`] it was last reached by (its parent's node and its name there),
//! so that a path relative to the root is built from nodes, never read
//! back from `/proc/self/fd` (which fails beyond PATH_MAX).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::INodeNo;

use super::recorder::Tracked;

/// Identity of a backing object: (device, inode).
pub type BackingKey = (u64, u64);

/// Where a node was reached: its parent folder's node and its name there.
/// A folder has one parent, and a rename through the mount moves its link
/// ([`InodeTable::relink`]), so the chain of links from a folder up to the
/// root is its path. A file's link is only the name it was last reached
/// by (it may have several, and lose that one).
#[derive(Clone, Debug)]
pub struct Link {
    /// The parent folder's node.
    pub parent: Arc<Inode>,
    /// The name in it.
    pub name: OsString,
}

/// One node the kernel knows about.
#[derive(Debug)]
pub struct Inode {
    /// Our inode number.
    pub ino: INodeNo,
    /// `O_PATH | O_NOFOLLOW` descriptor of the backing object.
    pub fd: OwnedFd,
    /// Backing (device, inode).
    pub key: BackingKey,
    /// `S_IFMT` bits of the backing object.
    pub kind: u32,
    /// Tracking state, for regular files when tracking is on.
    pub tracked: Option<Tracked>,
    /// Where the node was last reached (`None` for the root). Its own lock:
    /// a rename moves it while paths of other nodes are being built.
    link: Mutex<Option<Link>>,
    /// Kernel references (lookups minus forgets).
    lookups: AtomicU64,
    /// Open handles through which the kernel may cache written pages (the
    /// writeback cache): while any exist, the backing file may lack data
    /// the kernel already acknowledged.
    cached_writers: AtomicU64,
}

impl Inode {
    /// The descriptor, borrowed.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where the node was last reached (`None` for the root).
    pub fn link(&self) -> Option<Link> {
        self.link.lock().expect("link lock").clone()
    }

    /// Whether the node is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == libc::S_IFREG
    }

    /// Whether the node is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// Whether the kernel may hold written pages of this file that the
    /// backing file has not seen.
    pub fn has_cached_writers(&self) -> bool {
        self.cached_writers.load(Ordering::Relaxed) > 0
    }
}

/// Counts an open handle as a cached writer of its node for as long as it
/// lives.
#[derive(Debug)]
pub struct CachedWriter(Arc<Inode>);

impl CachedWriter {
    /// Starts counting.
    pub fn new(inode: Arc<Inode>) -> CachedWriter {
        inode.cached_writers.fetch_add(1, Ordering::Relaxed);
        CachedWriter(inode)
    }
}

impl Drop for CachedWriter {
    fn drop(&mut self) {
        self.0.cached_writers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Tables {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<BackingKey, u64>,
    next: u64,
}

/// All nodes the kernel holds references to.
#[derive(Debug)]
pub struct InodeTable {
    /// One lock for both maps, which must change together; held for map
    /// operations and, when a node is new, for finding its tracking state
    /// (a journal lookup, rarely a new bitmap), so that a FORGET cannot
    /// fall between "no node yet" and building it.
    tables: Mutex<Tables>,
}

impl InodeTable {
    /// A table holding only the root.
    pub fn new(root_fd: OwnedFd, root_key: BackingKey) -> InodeTable {
        let root = Arc::new(Inode {
            ino: INodeNo::ROOT,
            fd: root_fd,
            key: root_key,
            kind: libc::S_IFDIR,
            tracked: None,
            link: Mutex::new(None),
            lookups: AtomicU64::new(1),
            cached_writers: AtomicU64::new(0),
        });
        let mut tables = Tables {
            next: INodeNo::ROOT.0 + 1,
            ..Default::default()
        };
        tables.by_key.insert(root_key, INodeNo::ROOT.0);
        tables.by_ino.insert(INodeNo::ROOT.0, root);
        InodeTable {
            tables: Mutex::new(tables),
        }
    }

    /// The node `ino`, if the kernel still holds it.
    pub fn get(&self, ino: INodeNo) -> Option<Arc<Inode>> {
        self.tables
            .lock()
            .expect("inode lock")
            .by_ino
            .get(&ino.0)
            .cloned()
    }

    /// Takes one kernel reference on the node for `key`, reached by
    /// `link`, creating it from `fd` and `tracked` when it is new.
    /// `tracked` runs under the table's lock, exactly when the node is
    /// built: a FORGET cannot drop the node between "it exists" and "build
    /// it", so no node is ever built without tracking state it should
    /// have. A failure of `tracked` fails the lookup and builds nothing
    /// (tracking fails closed).
    pub fn lookup<E>(
        &self,
        fd: OwnedFd,
        key: BackingKey,
        kind: u32,
        link: Link,
        tracked: impl FnOnce() -> Result<Option<Tracked>, E>,
    ) -> Result<Arc<Inode>, E> {
        let mut t = self.tables.lock().expect("inode lock");
        if let Some(node) = t.by_key.get(&key).and_then(|ino| t.by_ino.get(ino)) {
            node.lookups.fetch_add(1, Ordering::Relaxed);
            *node.link.lock().expect("link lock") = Some(link);
            return Ok(node.clone());
        }
        let tracked = tracked()?;
        let ino = t.next;
        t.next += 1;
        let node = Arc::new(Inode {
            ino: INodeNo(ino),
            fd,
            key,
            kind,
            tracked,
            link: Mutex::new(Some(link)),
            lookups: AtomicU64::new(1),
            cached_writers: AtomicU64::new(0),
        });
        t.by_key.insert(key, ino);
        t.by_ino.insert(ino, node.clone());
        Ok(node)
    }

    /// The node for `key`, if the kernel holds one, is now reached by
    /// `link` (after a rename through the mount).
    pub fn relink(&self, key: BackingKey, link: Link) {
        let t = self.tables.lock().expect("inode lock");
        if let Some(node) = t.by_key.get(&key).and_then(|ino| t.by_ino.get(ino)) {
            *node.link.lock().expect("link lock") = Some(link);
        }
    }

    /// Drops `n` kernel references; the node goes when none are left.
    pub fn forget(&self, ino: INodeNo, n: u64) {
        if ino == INodeNo::ROOT {
            return;
        }
        let mut t = self.tables.lock().expect("inode lock");
        let Some(node) = t.by_ino.get(&ino.0) else {
            return;
        };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
        node.lookups.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = node.key;
            t.by_ino.remove(&ino.0);
            if t.by_key.get(&key) == Some(&ino.0) {
                t.by_key.remove(&key);
            }
        }
    }
}
