//! The inode table of a point: its recorded namespace turned into nodes
//! once, when the point is opened. A point never changes, so the table is
//! built whole and never edited: names of one replica inode (hard links)
//! share a node, a folder's link count is 2 + its subfolders, a file's is
//! its number of names.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::error::{Error, Result};
use crate::fs::attr::file_type;
use crate::proto::points::Entry;

/// One node of a point: a folder, a file (with all its names), a link…
#[derive(Debug)]
pub struct Node {
    /// `st_mode`: type and permissions.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes as of the point.
    pub size: u64,
    /// Modification time, unix ns.
    pub mtime_ns: i64,
    /// Device number (device nodes).
    pub rdev: u64,
    /// Names (or 2 + subfolders for a folder).
    pub nlink: u32,
    /// The replica inode the point's undo records are keyed by.
    pub replica_ino: u64,
    /// A symlink's target.
    pub target: Vec<u8>,
    /// A folder's entries: name → node index (or inode, in a sandbox).
    pub children: BTreeMap<OsString, u64>,
}

impl Node {
    /// Whether the node is a folder.
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Whether the node is a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    /// The kernel's file type of the node.
    pub fn kind(&self) -> FileType {
        file_type(self.mode)
    }

    /// The attributes the kernel is told, as FUSE inode `ino`.
    pub fn attr(&self, ino: INodeNo, blksize: u32) -> FileAttr {
        let mtime = time_of(self.mtime_ns);
        FileAttr {
            ino,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: UNIX_EPOCH,
            kind: self.kind(),
            perm: (self.mode & 0o7777) as u16,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev as u32,
            blksize,
            flags: 0,
        }
    }
}

/// Unix nanoseconds (negative: before 1970) as a `SystemTime`.
pub fn time_of(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

/// Every node of one point; node 0 is its root.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

/// A namespace that does not make a tree (a damaged points file).
fn damaged(namespace: &Path, reason: String) -> Error {
    Error::BadState {
        path: namespace.to_path_buf(),
        reason,
    }
}

impl Tree {
    /// The tree of `entries` (parents before children, as a point's
    /// namespace lists them), under a root that has `root`'s attributes;
    /// `namespace` names the file they came from in errors.
    pub fn build(entries: &[Entry], root: Node, namespace: &Path) -> Result<Tree> {
        let mut nodes = vec![root];
        let mut dirs: HashMap<&[u8], u32> = HashMap::from([(&b""[..], 0)]);
        let mut by_ino: HashMap<u64, u32> = HashMap::new();
        for e in entries {
            let (parent, name) = match e.path.iter().rposition(|&b| b == b'/') {
                Some(at) => (&e.path[..at], &e.path[at + 1..]),
                None => (&b""[..], &e.path[..]),
            };
            let shown = || String::from_utf8_lossy(&e.path).into_owned();
            if name.is_empty() || name == b"." || name == b".." || name.contains(&0) {
                return Err(damaged(namespace, format!("bad entry name {:?}", shown())));
            }
            let Some(&p) = dirs.get(parent) else {
                return Err(damaged(
                    namespace,
                    format!("{:?} before its folder", shown()),
                ));
            };
            let is_dir = e.mode & libc::S_IFMT == libc::S_IFDIR;
            let idx = match by_ino.get(&e.ino) {
                Some(&idx) if !is_dir => {
                    nodes[idx as usize].nlink += 1;
                    idx
                }
                _ => {
                    let idx = u32::try_from(nodes.len())
                        .map_err(|_| damaged(namespace, "more than 2^32 entries".into()))?;
                    nodes.push(Node {
                        mode: e.mode,
                        uid: e.uid,
                        gid: e.gid,
                        size: e.size,
                        mtime_ns: e.mtime_ns,
                        rdev: e.rdev,
                        nlink: if is_dir { 2 } else { 1 },
                        replica_ino: e.ino,
                        target: e.target.clone(),
                        children: BTreeMap::new(),
                    });
                    by_ino.insert(e.ino, idx);
                    idx
                }
            };
            if is_dir {
                dirs.insert(&e.path, idx);
                nodes[p as usize].nlink += 1;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            nodes[p as usize].children.insert(name, u64::from(idx));
        }
        Ok(Tree { nodes })
    }

    /// Every node, the root first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `idx`, if the tree has it.
    pub fn node(&self, idx: u64) -> Option<&Node> {
        usize::try_from(idx).ok().and_then(|i| self.nodes.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, mode: u32, ino: u64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            mode,
            ino,
            size: 10,
            ..Entry::default()
        }
    }

    fn root() -> Node {
        Node {
            mode: libc::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns: 0,
            rdev: 0,
            nlink: 2,
            replica_ino: 0,
            target: Vec::new(),
            children: BTreeMap::new(),
        }
    }

    #[test]
    fn hard_links_share_a_node_and_folders_count_subfolders() {
        let entries = [
            entry("a", libc::S_IFDIR | 0o755, 5),
            entry("a/x", libc::S_IFREG | 0o644, 7),
            entry("a/b", libc::S_IFDIR | 0o755, 6),
            entry("y", libc::S_IFREG | 0o644, 7),
        ];
        let t = Tree::build(&entries, root(), Path::new("ns")).unwrap();
        assert!(t.node(3).is_some() && t.node(4).is_none());
        let r = t.node(0).unwrap();
        assert_eq!(r.nlink, 3);
        let a = t.node(r.children[OsStr::new("a")]).unwrap();
        assert_eq!(a.nlink, 3);
        let x = a.children[OsStr::new("x")];
        assert_eq!(r.children[OsStr::new("y")], x);
        assert_eq!(t.node(x).unwrap().nlink, 2);
    }

    #[test]
    fn a_child_before_its_folder_or_a_bad_name_is_damage() {
        let orphan = [entry("a/x", libc::S_IFREG, 7)];
        assert!(Tree::build(&orphan, root(), Path::new("ns")).is_err());
        let dots = [entry("..", libc::S_IFDIR, 7)];
        assert!(Tree::build(&dots, root(), Path::new("ns")).is_err());
    }
}
