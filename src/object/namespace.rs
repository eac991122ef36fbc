//! A point's namespace replayed in memory, for a repository that has no
//! folder to apply a point to.
//!
//! The primary does not hold a point's whole namespace at the cut: it
//! ships the point's namespace operations, then each dirty file's path and
//! size, then the metadata of the paths whose metadata changed. A POSIX
//! secondary applies those to a real folder (`replica::apply`,
//! `replica::meta`); an object-store point must list its whole namespace
//! in its manifest, so the same lists are applied here to the previous
//! point's namespace: previous namespace + this point's lists = this
//! point's namespace.
//!
//! Each operation does what the secondary's apply does to a folder,
//! including where it fails: a failure there fails the point, and so an
//! error here (a conflict, or input no primary sends) means the point's
//! namespace cannot be made. After an error the namespace holds part of
//! the operation (folders made on the way, as on the secondary) and is
//! to be dropped with the point, as the secondary rolls its folder back.
//!
//! What is modelled, and where it differs from a folder:
//! - A regular file is known by the primary's file id, which is also its
//!   `Entry.ino` (so `mirror::tree::Tree::build` groups its
//!   names as hard links, and the manifest's file maps find it). Names of
//!   one id share size, mode, owner and time, as names of one inode do.
//! - Folders, symlinks and other nodes get inode numbers only in
//!   [`Namespace::into_parts`]: counted up from 2^63 in the order listed,
//!   skipping every file id the namespace holds, so they never collide
//!   with a file (whose ids are the primary's) nor with each other.
//! - A hard link of a symlink or a node is a copy here (a second node
//!   with the same target and metadata), not a second name of one node.
//! - A device node is recorded like a FIFO: no `--allow-devices` applies
//!   to a repository; whoever restores it decides whether to make it.
//! - What the apply makes gets the secondary's private placeholders until
//!   the point's metadata arrives: folders 0700, files and nodes 0600,
//!   owner 0:0 (the secondary runs as root) and time 0 (a folder's would
//!   be the apply's time: 0 keeps a namespace a function of its lists).
//!   [`Namespace::empty`]'s root is such a folder too, as
//!   `replica::apply::make_dirs` makes a fresh replica root.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::proto::points::Entry;
use crate::proto::replication::{FileState, NamespaceOp, OpKind, PathMeta};
use crate::state::STATE_DIR;
use crate::wire::MAX_PATH;

/// The first inode number given to a folder, symlink or node.
const SYNTHETIC_INO: u64 = 1 << 63;

/// The longest symlink target `symlinkat` takes (PATH_MAX with its NUL).
const MAX_TARGET: usize = 4095;

/// Type bits of `st_mode`.
const S_IFMT: u32 = libc::S_IFMT;

/// What one inode shows besides its content: `st_mode` (type and
/// permissions), owner and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
}

impl Attrs {
    /// What the secondary gives a node it makes, of type `kind` and
    /// permissions `perm`, until the point's metadata arrives.
    fn made(kind: u32, perm: u32) -> Attrs {
        Attrs {
            mode: kind | perm,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
        }
    }

    /// The attributes an entry of a manifest carries.
    fn of(e: &Entry) -> Attrs {
        Attrs {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime_ns: e.mtime_ns,
        }
    }
}

/// What a name of the namespace is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Item {
    /// A folder.
    Dir(Attrs),
    /// A name of the regular file with this file id.
    File(u64),
    /// A symlink and its target.
    Symlink(Attrs, Vec<u8>),
    /// A FIFO, socket or device node (type in the mode) and its device.
    Node(Attrs, u64),
}

impl Item {
    /// The type bits of a non-file item (files' are `S_IFREG`).
    fn kind(&self) -> u32 {
        match self {
            Item::Dir(_) => libc::S_IFDIR,
            Item::File(_) => libc::S_IFREG,
            Item::Symlink(..) => libc::S_IFLNK,
            Item::Node(a, _) => a.mode & S_IFMT,
        }
    }
}

/// One regular file: what its names share.
#[derive(Clone, Debug, PartialEq, Eq)]
struct File {
    attrs: Attrs,
    size: u64,
    /// Every name of it (never empty: a file whose last name goes is
    /// dropped).
    names: BTreeSet<Vec<u8>>,
}

/// A point's namespace: every name by path, each regular file by file id,
/// and the root's metadata. What an object-store point's manifest lists,
/// rebuilt point after point from the lists the primary ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    root: Attrs,
    /// Every name but the root, in byte order of the paths: a folder's
    /// path is a prefix of everything below it, so it sorts first, and
    /// everything below `p` lies in the range `p/`..`p0`.
    names: BTreeMap<Vec<u8>, Item>,
    files: HashMap<u64, File>,
}

/// `path` as a path for messages.
fn shown(path: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(path))
}

/// An operation or list item that cannot be applied to the namespace: the
/// path it names and why.
fn conflict(path: &[u8], reason: impl Into<String>) -> Error {
    Error::BadState {
        path: shown(path),
        reason: reason.into(),
    }
}

/// Why `path` is not a path below the root as the secondary accepts one
/// (`replica::confine::join`, then a walk refusing `.` and `..`), or
/// `None`. Stricter in one way: an empty component (`a//b`), which the
/// secondary's walk skips, is refused, as no primary sends one and an
/// entry's path must be the one way to name it.
fn path_fault(path: &[u8]) -> Option<&'static str> {
    if path.is_empty() {
        return Some("an empty path");
    }
    if path.len() > MAX_PATH {
        return Some("a path longer than the wire allows");
    }
    if path.contains(&0) {
        return Some("a path holding a NUL byte");
    }
    let mut parts = path.split(|&b| b == b'/');
    if parts.clone().next() == Some(STATE_DIR.as_bytes()) {
        return Some("a path in the state folder");
    }
    parts
        .any(|p| p.is_empty() || p == b"." || p == b"..")
        .then_some("a path with an empty, \".\" or \"..\" component, or a leading or trailing '/'")
}

/// [`path_fault`] as an error.
fn check_path(path: &[u8]) -> Result<()> {
    match path_fault(path) {
        Some(fault) => Err(conflict(path, format!("{fault} is not below the root"))),
        None => Ok(()),
    }
}

/// The folders above `path`, outermost first (`a`, `a/b` for `a/b/c`).
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(|(at, _)| &path[..at])
}

/// The range of paths strictly below `path`: `path/`..`path0`.
fn below(path: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = path.to_vec();
    lo.push(b'/');
    let mut hi = path.to_vec();
    hi.push(b'/' + 1);
    (lo, hi)
}

/// Whether `inner` is strictly below `outer`.
fn is_below(inner: &[u8], outer: &[u8]) -> bool {
    inner.len() > outer.len() && inner.starts_with(outer) && inner[outer.len()] == b'/'
}

/// Seconds and nanoseconds as unix ns, saturating; nanoseconds of a
/// second or more are refused, as `utimensat` refuses them.
fn time_ns(path: &[u8], sec: i64, nsec: u32) -> Result<i64> {
    if nsec >= 1_000_000_000 {
        return Err(conflict(path, format!("metadata with {nsec} nanoseconds")));
    }
    Ok(sec
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(nsec)))
}

impl Namespace {
    /// The namespace before a series' first point: only the root, a
    /// private folder as a fresh replica root is (see the module doc),
    /// until the first point's metadata gives it the primary's.
    pub fn empty() -> Namespace {
        Namespace {
            root: Attrs::made(libc::S_IFDIR, 0o700),
            names: BTreeMap::new(),
            files: HashMap::new(),
        }
    }

    /// The namespace a published manifest lists: its `root` and its
    /// `entries` (parents before children). A manifest comes from the
    /// network, so damage (a bad name, a child before its folder or below
    /// a non-folder, a duplicate path, an unknown type, a root that is no
    /// folder) is an error naming `what` (the manifest's key) and the
    /// entry. Names of one regular file share its first entry's size and
    /// metadata; folders', symlinks' and nodes' inode numbers are not
    /// kept (see the module doc).
    pub fn from_entries(root: Entry, entries: Vec<Entry>, what: &str) -> Result<Namespace> {
        let damaged = |path: &[u8], reason: String| Error::BadState {
            path: PathBuf::from(what),
            reason: format!("entry {:?}: {reason}", String::from_utf8_lossy(path)),
        };
        if !root.path.is_empty() || root.mode & S_IFMT != libc::S_IFDIR {
            return Err(damaged(&root.path, "the root is not a folder".into()));
        }
        let mut ns = Namespace {
            root: Attrs::of(&root),
            names: BTreeMap::new(),
            files: HashMap::new(),
        };
        for e in entries {
            if let Some(fault) = path_fault(&e.path) {
                return Err(damaged(&e.path, fault.into()));
            }
            if let Some(at) = e.path.iter().rposition(|&b| b == b'/') {
                match ns.names.get(&e.path[..at]) {
                    Some(Item::Dir(_)) => {}
                    Some(_) => return Err(damaged(&e.path, "below a non-folder".into())),
                    None => return Err(damaged(&e.path, "before its folder".into())),
                }
            }
            if ns.names.contains_key(&e.path) {
                return Err(damaged(&e.path, "listed twice".into()));
            }
            let attrs = Attrs::of(&e);
            let item = match e.mode & S_IFMT {
                libc::S_IFDIR => Item::Dir(attrs),
                libc::S_IFREG => {
                    ns.add_name(e.ino, &e.path, attrs, e.size);
                    Item::File(e.ino)
                }
                libc::S_IFLNK => Item::Symlink(attrs, e.target),
                libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => {
                    Item::Node(attrs, e.rdev)
                }
                other => return Err(damaged(&e.path, format!("unknown type {other:o}"))),
            };
            ns.names.insert(e.path, item);
        }
        Ok(ns)
    }

    /// Applies one of a point's namespace operations as the secondary's
    /// apply does (see the module doc): each is a no-op when it finds its
    /// effect already done or its path missing, and an error where the
    /// secondary's would fail (the point cannot be applied).
    pub fn apply_op(&mut self, op: &NamespaceOp) -> Result<()> {
        let path = &op.path[..];
        check_path(path)?;
        let kind = op.kind();
        match kind {
            OpKind::Create => {
                self.make_dirs(path, false)?;
                if !self.names.contains_key(path) {
                    self.add_name(op.file_id, path, Attrs::made(libc::S_IFREG, 0o600), 0);
                    self.names.insert(path.to_vec(), Item::File(op.file_id));
                }
            }
            OpKind::Mkdir => self.make_dirs(path, true)?,
            OpKind::Rmdir | OpKind::Unlink => {
                let Some(item) = self.existing(path)? else {
                    return Ok(());
                };
                match (kind == OpKind::Rmdir, item) {
                    (true, Item::Dir(_)) if self.has_below(path) => {
                        return Err(conflict(path, "rmdir of a folder that is not empty"));
                    }
                    (true, Item::Dir(_)) | (false, Item::File(_) | Item::Symlink(..)) => {}
                    (false, Item::Node(..)) => {}
                    (true, _) => return Err(conflict(path, "rmdir of a non-folder")),
                    (false, Item::Dir(_)) => return Err(conflict(path, "unlink of a folder")),
                }
                self.remove_name(path);
            }
            OpKind::Truncate => match self.existing(path)? {
                None => {}
                Some(&Item::File(id)) => {
                    if let Some(f) = self.files.get_mut(&id) {
                        f.size = op.arg;
                    }
                }
                Some(_) => return Err(conflict(path, "truncate of a non-file")),
            },
            OpKind::Rename => self.rename(op)?,
            OpKind::Symlink => self.symlink(path, &op.target)?,
            OpKind::Link => self.link(path, &op.target)?,
            OpKind::Mknod => self.mknod(path, op.arg)?,
            OpKind::Unspecified => {
                return Err(conflict(path, "a namespace operation of unknown kind"));
            }
        }
        Ok(())
    }

    /// A dirty file's path and size at the cut: after this, a regular
    /// file with that file id and size is at that path (its folders made
    /// where missing, as the secondary's `size_files` does). A file of
    /// another id there becomes this one, with all its names (on the
    /// secondary the inode at the path takes the id); a name this id has
    /// elsewhere stays its name (on the primary, names of one id are hard
    /// links). Anything but a regular file at the path is an error.
    pub fn set_file(&mut self, file: &FileState) -> Result<()> {
        let (path, id) = (&file.path[..], file.file_id);
        check_path(path)?;
        self.make_dirs(path, false)?;
        match self.names.get(path) {
            None => {
                self.add_name(id, path, Attrs::made(libc::S_IFREG, 0o600), 0);
                self.names.insert(path.to_vec(), Item::File(id));
            }
            Some(&Item::File(old)) if old != id => self.relabel(old, id),
            Some(Item::File(_)) => {}
            Some(_) => {
                let why = format!("file {id} at a path that is not a regular file");
                return Err(conflict(path, why));
            }
        }
        if let Some(f) = self.files.get_mut(&id) {
            f.size = file.size;
        }
        Ok(())
    }

    /// A path's metadata, as the secondary's `apply_meta` sets it: owner,
    /// permission bits (not on a symlink) and modification time, on the
    /// name of the same type only (another type there is left alone: the
    /// point that makes it carries its metadata again); a missing path is
    /// left out. An empty path is the root. Extended attributes and the
    /// access time are not part of a manifest's namespace.
    pub fn set_meta(&mut self, meta: &PathMeta) -> Result<()> {
        let path = &meta.path[..];
        let mtime_ns = time_ns(path, meta.mtime_sec, meta.mtime_nsec)?;
        time_ns(path, meta.atime_sec, meta.atime_nsec)?;
        let kind = meta.mode & S_IFMT;
        let attrs = if path.is_empty() {
            Some(&mut self.root).filter(|_| kind == libc::S_IFDIR)
        } else {
            check_path(path)?;
            match self.existing(path)? {
                Some(item) if item.kind() == kind => match self.names.get_mut(path) {
                    Some(&mut Item::File(id)) => self.files.get_mut(&id).map(|f| &mut f.attrs),
                    Some(Item::Dir(a) | Item::Symlink(a, _) | Item::Node(a, _)) => Some(a),
                    None => None,
                },
                _ => None,
            }
        };
        if let Some(a) = attrs {
            a.uid = meta.uid;
            a.gid = meta.gid;
            if kind != libc::S_IFLNK {
                a.mode = kind | (meta.mode & 0o7777);
            }
            a.mtime_ns = mtime_ns;
        }
        Ok(())
    }

    /// Every regular file's id and size: the files a manifest maps.
    pub fn files(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.files.iter().map(|(&id, f)| (id, f.size))
    }

    /// The root and every other entry as a manifest lists them, in byte
    /// order of their paths, which puts each folder before everything
    /// below it (its path is a proper prefix of theirs); `a-x` sorting
    /// between `a` and `a/b` splits `a`'s subtree but never precedes `a`.
    /// A folder's size is 0, a symlink's its target's length (as `lstat`
    /// says).
    pub fn into_parts(self) -> (Entry, Vec<Entry>) {
        let used: HashSet<u64> = self.files.keys().copied().collect();
        let mut next = SYNTHETIC_INO;
        let mut ino = move || {
            while used.contains(&next) {
                next = next.wrapping_add(1);
            }
            next = next.wrapping_add(1);
            next.wrapping_sub(1)
        };
        let entry = |path: Vec<u8>, a: &Attrs, ino: u64| Entry {
            path,
            mode: a.mode,
            ino,
            uid: a.uid,
            gid: a.gid,
            mtime_ns: a.mtime_ns,
            ..Entry::default()
        };
        let root = entry(Vec::new(), &self.root, ino());
        let mut entries = Vec::with_capacity(self.names.len());
        for (path, item) in self.names {
            entries.push(match item {
                Item::Dir(a) => entry(path, &a, ino()),
                Item::File(id) => match self.files.get(&id) {
                    Some(f) => Entry {
                        size: f.size,
                        ..entry(path, &f.attrs, id)
                    },
                    None => continue,
                },
                Item::Symlink(a, target) => Entry {
                    size: target.len() as u64,
                    target,
                    ..entry(path, &a, ino())
                },
                Item::Node(a, rdev) => Entry {
                    rdev,
                    ..entry(path, &a, ino())
                },
            });
        }
        (root, entries)
    }

    /// The item at `path` if it is there, walked as the secondary's
    /// `existing` walks: a missing folder or a non-folder on the way is
    /// "not there", a symlink on the way an error (`ELOOP`).
    fn existing(&self, path: &[u8]) -> Result<Option<&Item>> {
        for dir in ancestors(path) {
            match self.names.get(dir) {
                Some(Item::Dir(_)) => {}
                Some(Item::Symlink(..)) => return Err(through_symlink(path)),
                Some(_) | None => return Ok(None),
            }
        }
        Ok(self.names.get(path))
    }

    /// Makes the missing folders above `path` (and `path` itself when
    /// `last`) as the secondary's `dir_beneath(.., Some(0o700))` does: a
    /// symlink or another non-folder on the way is an error.
    fn make_dirs(&mut self, path: &[u8], last: bool) -> Result<()> {
        let all = ancestors(path).chain(last.then_some(path));
        for dir in all {
            match self.names.get(dir) {
                Some(Item::Dir(_)) => {}
                Some(Item::Symlink(..)) => return Err(through_symlink(path)),
                Some(_) => return Err(conflict(path, format!("{:?} is not a folder", shown(dir)))),
                None => {
                    let made = Item::Dir(Attrs::made(libc::S_IFDIR, 0o700));
                    self.names.insert(dir.to_vec(), made);
                }
            }
        }
        Ok(())
    }

    /// Whether anything lies below `path`.
    fn has_below(&self, path: &[u8]) -> bool {
        let (lo, hi) = below(path);
        self.names.range(lo..hi).next().is_some()
    }

    /// Adds `path` to the names of file `id`, making the file (with
    /// `attrs` and `size`) if it has none yet. The caller inserts the name.
    fn add_name(&mut self, id: u64, path: &[u8], attrs: Attrs, size: u64) {
        let file = self.files.entry(id).or_insert_with(|| File {
            attrs,
            size,
            names: BTreeSet::new(),
        });
        file.names.insert(path.to_vec());
    }

    /// Removes the name `path` (not what is below it), and a file whose
    /// last name it was.
    fn remove_name(&mut self, path: &[u8]) {
        if let Some(Item::File(id)) = self.names.remove(path) {
            self.drop_name(id, path);
        }
    }

    /// Takes `path` out of file `id`'s names, dropping the file with its
    /// last name.
    fn drop_name(&mut self, id: u64, path: &[u8]) {
        if let Some(f) = self.files.get_mut(&id) {
            f.names.remove(path);
            if f.names.is_empty() {
                self.files.remove(&id);
            }
        }
    }

    /// File `old` becomes file `id`: its names join `id`'s, and its
    /// metadata is kept (the inode at the path is `old`'s).
    fn relabel(&mut self, old: u64, id: u64) {
        let Some(file) = self.files.remove(&old) else {
            return;
        };
        for name in &file.names {
            if let Some(item) = self.names.get_mut(name) {
                *item = Item::File(id);
            }
        }
        match self.files.get_mut(&id) {
            Some(f) => {
                f.attrs = file.attrs;
                f.names.extend(file.names);
            }
            None => {
                self.files.insert(id, file);
            }
        }
    }

    /// Takes `path` and everything below it out of the names, paths kept
    /// relative to `path` (its own as empty); files keep their records
    /// (see [`Namespace::put_subtree`]).
    fn take_subtree(&mut self, path: &[u8]) -> Vec<(Vec<u8>, Item)> {
        let (lo, hi) = below(path);
        let keys: Vec<Vec<u8>> = self.names.range(lo..hi).map(|(k, _)| k.clone()).collect();
        let mut taken = Vec::with_capacity(keys.len() + 1);
        for key in std::iter::once(path.to_vec()).chain(keys) {
            if let Some(item) = self.names.remove(&key) {
                if let Item::File(id) = item
                    && let Some(f) = self.files.get_mut(&id)
                {
                    f.names.remove(&key);
                }
                taken.push((key[path.len()..].to_vec(), item));
            }
        }
        taken
    }

    /// Puts what [`Namespace::take_subtree`] took back at `path`.
    fn put_subtree(&mut self, path: &[u8], items: Vec<(Vec<u8>, Item)>) {
        for (rel, item) in items {
            let mut key = path.to_vec();
            key.extend_from_slice(&rel);
            if let Item::File(id) = item
                && let Some(f) = self.files.get_mut(&id)
            {
                f.names.insert(key.clone());
            }
            self.names.insert(key, item);
        }
    }

    /// A rename, or with `RENAME_EXCHANGE` in `arg` an exchange, as the
    /// secondary's `rename` does it (a missing source is a no-op, the
    /// target's folders are made) with `renameat2`'s rules: a folder
    /// replaces only an empty folder, a non-folder only a non-folder, two
    /// names of one file stay as they are, a folder never moves below
    /// itself, an exchange needs both.
    fn rename(&mut self, op: &NamespaceOp) -> Result<()> {
        let (from, to) = (&op.path[..], &op.target[..]);
        let exchange = op.arg as u32 & libc::RENAME_EXCHANGE != 0;
        let Some(source) = self.existing(from)?.cloned() else {
            return Ok(());
        };
        if from == to {
            return Ok(());
        }
        check_path(to)?;
        self.make_dirs(to, false)?;
        if is_below(to, from) || is_below(from, to) {
            return Err(conflict(
                from,
                format!("rename to {:?}: one below the other", shown(to)),
            ));
        }
        let target = self.names.get(to).cloned();
        if exchange {
            if target.is_none() {
                return Err(conflict(
                    from,
                    format!("exchange with {:?}, which is missing", shown(to)),
                ));
            }
            let a = self.take_subtree(from);
            let b = self.take_subtree(to);
            self.put_subtree(to, a);
            self.put_subtree(from, b);
            return Ok(());
        }
        match (&source, target) {
            (_, None) => {}
            (Item::File(a), Some(Item::File(b))) if *a == b => return Ok(()),
            (Item::Dir(_), Some(Item::Dir(_))) if !self.has_below(to) => self.remove_name(to),
            (Item::Dir(_), Some(Item::Dir(_))) => {
                return Err(conflict(to, "rename onto a folder that is not empty"));
            }
            (Item::Dir(_), Some(_)) => {
                return Err(conflict(to, "rename of a folder onto a non-folder"));
            }
            (_, Some(Item::Dir(_))) => {
                return Err(conflict(to, "rename of a non-folder onto a folder"));
            }
            (_, Some(_)) => self.remove_name(to),
        }
        let moved = self.take_subtree(from);
        self.put_subtree(to, moved);
        Ok(())
    }

    /// A symlink at `path` to `target`, as the secondary makes it: a
    /// symlink there is replaced, anything else there is an error.
    fn symlink(&mut self, path: &[u8], target: &[u8]) -> Result<()> {
        if target.is_empty() || target.contains(&0) || target.len() > MAX_TARGET {
            return Err(conflict(
                path,
                "a symlink target that is empty, too long or holds NUL",
            ));
        }
        self.make_dirs(path, false)?;
        match self.names.get(path) {
            None | Some(Item::Symlink(..)) => {}
            Some(_) => return Err(conflict(path, "symlink onto an existing name")),
        }
        let attrs = Attrs::made(libc::S_IFLNK, 0o777);
        self.names
            .insert(path.to_vec(), Item::Symlink(attrs, target.to_vec()));
        Ok(())
    }

    /// A hard link: `to` becomes another name of what is at `from` (a
    /// regular file: the same file; a symlink or node: a copy), unless
    /// `from` is missing or `to` is there. A folder cannot be linked.
    fn link(&mut self, from: &[u8], to: &[u8]) -> Result<()> {
        check_path(to)?;
        let Some(source) = self.existing(from)?.cloned() else {
            return Ok(());
        };
        self.make_dirs(to, false)?;
        if self.names.contains_key(to) {
            return Ok(());
        }
        match source {
            Item::Dir(_) => return Err(conflict(from, "hard link of a folder")),
            Item::File(id) => {
                if let Some(f) = self.files.get_mut(&id) {
                    f.names.insert(to.to_vec());
                }
            }
            Item::Symlink(..) | Item::Node(..) => {}
        }
        self.names.insert(to.to_vec(), source);
        Ok(())
    }

    /// A FIFO, socket or device node (`arg`: `st_mode` in the low 32 bits,
    /// `st_rdev` in the high 32), 0600 until its metadata arrives, as the
    /// secondary's `mknod` makes it: a node of that type there is kept,
    /// anything else there is an error.
    fn mknod(&mut self, path: &[u8], arg: u64) -> Result<()> {
        let kind = arg as u32 & S_IFMT;
        let known = [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFCHR, libc::S_IFBLK];
        if !known.contains(&kind) {
            return Err(conflict(path, format!("mknod of unknown type {kind:o}")));
        }
        self.make_dirs(path, false)?;
        match self.names.get(path) {
            None => {}
            Some(item @ Item::Node(..)) if item.kind() == kind => return Ok(()),
            Some(_) => return Err(conflict(path, "mknod onto an existing name")),
        }
        let node = Item::Node(Attrs::made(kind, 0o600), arg >> 32);
        self.names.insert(path.to_vec(), node);
        Ok(())
    }
}

/// A path with a symlink on the way, which the secondary refuses to
/// follow (`ELOOP`).
fn through_symlink(path: &[u8]) -> Error {
    conflict(path, "a path through a symlink")
}

/// Random namespace operations for property tests, here and in the
/// secondary's differential test (`replica::object_namespace_tests`).
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;

    use crate::proto::replication::{NamespaceOp, OpKind};

    /// Paths close enough to collide: prefixes, `a-x` between `a` and
    /// `a/b`, and depth.
    pub const PATHS: &[&str] = &[
        "a", "b", "a-x", "a/b", "a/c", "b/a", "a/b/c", "a.b", "b/a/a",
    ];

    /// One operation of any kind on [`PATHS`] (creates and renames twice
    /// as often), with a rename, truncate or mknod argument.
    pub fn any_op() -> impl Strategy<Value = NamespaceOp> {
        let kind = prop::sample::select(vec![
            OpKind::Create,
            OpKind::Create,
            OpKind::Rename,
            OpKind::Rename,
            OpKind::Unlink,
            OpKind::Mkdir,
            OpKind::Rmdir,
            OpKind::Truncate,
            OpKind::Symlink,
            OpKind::Link,
            OpKind::Mknod,
        ]);
        let path = prop::sample::select(PATHS.to_vec());
        let arg = prop_oneof![
            Just(0u64),
            Just(u64::from(libc::RENAME_EXCHANGE)),
            Just(u64::from(libc::S_IFIFO | 0o644)),
            0u64..9000,
        ];
        (kind, path.clone(), path, 1u64..6, arg).prop_map(|(kind, p, t, file_id, arg)| {
            NamespaceOp {
                kind: kind as i32,
                file_id,
                path: p.into(),
                target: t.into(),
                arg,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::arbitrary::any_op;
    use super::*;
    use crate::mirror::tree::{self, Tree};

    fn op(kind: OpKind, path: &str, target: &str, file_id: u64, arg: u64) -> NamespaceOp {
        NamespaceOp {
            kind: kind as i32,
            file_id,
            path: path.into(),
            target: target.into(),
            arg,
        }
    }

    fn apply(ns: &mut Namespace, kind: OpKind, path: &str, target: &str) -> Result<()> {
        let id = path.len() as u64;
        ns.apply_op(&op(kind, path, target, id, 0))
    }

    fn refused(ns: &mut Namespace, kind: OpKind, path: &str, target: &str) {
        let done = apply(ns, kind, path, target);
        assert!(done.is_err(), "{kind:?} {path:?} {target:?} was applied");
    }

    fn create(ns: &mut Namespace, path: &str, id: u64) {
        ns.apply_op(&op(OpKind::Create, path, "", id, 0)).unwrap();
    }

    /// Every path and its type bits, in the order listed.
    fn listing(ns: &Namespace) -> Vec<(String, u32)> {
        let (_, entries) = ns.clone().into_parts();
        let name = |e: &Entry| String::from_utf8_lossy(&e.path).into_owned();
        entries.iter().map(|e| (name(e), e.mode & S_IFMT)).collect()
    }

    fn paths(ns: &Namespace) -> Vec<String> {
        listing(ns).into_iter().map(|(p, _)| p).collect()
    }

    fn entry_at(ns: &Namespace, path: &str) -> Option<Entry> {
        let (_, entries) = ns.clone().into_parts();
        entries.into_iter().find(|e| e.path == path.as_bytes())
    }

    /// What a manifest of `ns` must satisfy: `Tree::build` takes it, each
    /// entry's folder comes before it, file ids are regular files' inos
    /// and no other node shares one, and it reads back as `ns`.
    fn check(ns: &Namespace) {
        let (root, entries) = ns.clone().into_parts();
        let node = tree::Node {
            mode: root.mode,
            uid: root.uid,
            gid: root.gid,
            size: 0,
            mtime_ns: root.mtime_ns,
            rdev: 0,
            nlink: 2,
            replica_ino: root.ino,
            target: Vec::new(),
            children: BTreeMap::new(),
        };
        Tree::build(&entries, node, Path::new("test")).unwrap();
        let mut seen = HashSet::new();
        let mut inos = HashMap::new();
        for e in &entries {
            if let Some(at) = e.path.iter().rposition(|&b| b == b'/') {
                assert!(
                    seen.contains(&e.path[..at]),
                    "{:?} before its folder",
                    e.path
                );
            }
            seen.insert(&e.path[..]);
            let file = e.mode & S_IFMT == libc::S_IFREG;
            if let Some(other) = inos.insert(e.ino, file) {
                assert!(other && file, "ino {} shared by a non-file", e.ino);
            }
        }
        let files: HashMap<u64, u64> = ns.files().collect();
        let listed: HashMap<u64, u64> = entries
            .iter()
            .filter(|e| e.mode & S_IFMT == libc::S_IFREG)
            .map(|e| (e.ino, e.size))
            .collect();
        assert_eq!(files, listed);
        let back = Namespace::from_entries(root, entries, "test").unwrap();
        assert_eq!(&back, ns);
    }

    #[test]
    fn create_mkdir_and_truncate_make_private_placeholders() {
        let mut ns = Namespace::empty();
        create(&mut ns, "d/e/f", 7);
        apply(&mut ns, OpKind::Mkdir, "m/n", "").unwrap();
        ns.apply_op(&op(OpKind::Truncate, "d/e/f", "", 0, 4096))
            .unwrap();
        ns.apply_op(&op(OpKind::Truncate, "gone", "", 0, 1))
            .unwrap();
        // A create of a name that is there keeps what is there.
        create(&mut ns, "d/e/f", 9);
        let dir = libc::S_IFDIR;
        assert_eq!(
            listing(&ns),
            [
                ("d".into(), dir),
                ("d/e".into(), dir),
                ("d/e/f".into(), libc::S_IFREG),
                ("m".into(), dir),
                ("m/n".into(), dir)
            ]
        );
        let f = entry_at(&ns, "d/e/f").unwrap();
        assert_eq!((f.ino, f.size, f.mode, f.uid), (7, 4096, 0o100600, 0));
        assert_eq!(entry_at(&ns, "m").unwrap().mode, 0o40700);
        assert_eq!(ns.files().collect::<Vec<_>>(), [(7, 4096)]);
        // A file on the way is no folder; truncating a folder fails.
        refused(&mut ns, OpKind::Mkdir, "d/e/f/g", "");
        refused(&mut ns, OpKind::Mkdir, "d/e/f", "");
        refused(&mut ns, OpKind::Truncate, "d", "");
        check(&ns);
    }

    #[test]
    fn unlink_and_rmdir_remove_only_what_the_secondary_would() {
        let mut ns = Namespace::empty();
        create(&mut ns, "d/f", 1);
        apply(&mut ns, OpKind::Mkdir, "e", "").unwrap();
        refused(&mut ns, OpKind::Rmdir, "d", "");
        refused(&mut ns, OpKind::Unlink, "d", "");
        refused(&mut ns, OpKind::Rmdir, "d/f", "");
        apply(&mut ns, OpKind::Unlink, "d/f", "").unwrap();
        apply(&mut ns, OpKind::Unlink, "d/f", "").unwrap();
        apply(&mut ns, OpKind::Rmdir, "d", "").unwrap();
        apply(&mut ns, OpKind::Rmdir, "d", "").unwrap();
        // A file on the way: nothing there.
        create(&mut ns, "g", 2);
        apply(&mut ns, OpKind::Unlink, "g/x", "").unwrap();
        assert_eq!(paths(&ns), ["e", "g"]);
        assert_eq!(ns.files().collect::<Vec<_>>(), [(2, 0)]);
        check(&ns);
    }

    #[test]
    fn a_folder_moves_with_everything_below_it_and_nothing_beside_it() {
        let mut ns = Namespace::empty();
        create(&mut ns, "a/b/f", 1);
        create(&mut ns, "a/g", 2);
        create(&mut ns, "a-x", 3);
        create(&mut ns, "a.y/h", 4);
        apply(&mut ns, OpKind::Rename, "a", "n/m").unwrap();
        assert_eq!(
            paths(&ns),
            [
                "a-x", "a.y", "a.y/h", "n", "n/m", "n/m/b", "n/m/b/f", "n/m/g"
            ]
        );
        assert_eq!(entry_at(&ns, "n/m/b/f").unwrap().ino, 1);
        check(&ns);
        // Missing source, same path: no-ops.
        apply(&mut ns, OpKind::Rename, "a", "z").unwrap();
        apply(&mut ns, OpKind::Rename, "n", "n").unwrap();
        // Below itself, onto a folder that is not empty, across types.
        refused(&mut ns, OpKind::Rename, "n", "n/m/q");
        refused(&mut ns, OpKind::Rename, "n/m", "n");
        apply(&mut ns, OpKind::Mkdir, "e/s", "").unwrap();
        refused(&mut ns, OpKind::Rename, "n", "e");
        refused(&mut ns, OpKind::Rename, "a-x", "e");
        refused(&mut ns, OpKind::Rename, "n", "a-x");
        // Onto an empty folder, and a file onto a file (replaced).
        apply(&mut ns, OpKind::Rename, "n", "e/s").unwrap();
        apply(&mut ns, OpKind::Rename, "a-x", "e/s/m/g").unwrap();
        assert_eq!(
            paths(&ns),
            [
                "a.y",
                "a.y/h",
                "e",
                "e/s",
                "e/s/m",
                "e/s/m/b",
                "e/s/m/b/f",
                "e/s/m/g"
            ]
        );
        assert_eq!(entry_at(&ns, "e/s/m/g").unwrap().ino, 3);
        let mut ids: Vec<u64> = ns.files().map(|(id, _)| id).collect();
        ids.sort();
        assert_eq!(ids, [1, 3, 4]);
        check(&ns);
    }

    #[test]
    fn an_exchange_swaps_two_subtrees() {
        let mut ns = Namespace::empty();
        create(&mut ns, "a/f", 1);
        create(&mut ns, "b/x/f", 2);
        ns.apply_op(&op(OpKind::Link, "a/f", "b/x/g", 0, 0))
            .unwrap();
        let exchange = u64::from(libc::RENAME_EXCHANGE);
        ns.apply_op(&op(OpKind::Rename, "a", "b", 0, exchange))
            .unwrap();
        assert_eq!(paths(&ns), ["a", "a/x", "a/x/f", "a/x/g", "b", "b/f"]);
        assert_eq!(entry_at(&ns, "a/x/g").unwrap().ino, 1);
        assert_eq!(entry_at(&ns, "b/f").unwrap().ino, 1);
        check(&ns);
        let missing = op(OpKind::Rename, "a", "c", 0, exchange);
        assert!(ns.apply_op(&missing).is_err());
    }

    #[test]
    fn a_file_keeps_its_content_under_its_second_name() {
        let mut ns = Namespace::empty();
        create(&mut ns, "f", 5);
        ns.set_file(&FileState {
            file_id: 5,
            path: b"f".to_vec(),
            size: 100,
        })
        .unwrap();
        apply(&mut ns, OpKind::Link, "f", "d/g").unwrap();
        // A name that is there, or a missing source: nothing changes.
        create(&mut ns, "h", 6);
        apply(&mut ns, OpKind::Link, "f", "h").unwrap();
        apply(&mut ns, OpKind::Link, "nothing", "i").unwrap();
        let meta = PathMeta {
            path: b"d/g".to_vec(),
            mode: libc::S_IFREG | 0o640,
            uid: 7,
            ..PathMeta::default()
        };
        ns.set_meta(&meta).unwrap();
        assert_eq!(entry_at(&ns, "f").unwrap().mode, libc::S_IFREG | 0o640);
        check(&ns);
        apply(&mut ns, OpKind::Unlink, "f", "").unwrap();
        let g = entry_at(&ns, "d/g").unwrap();
        assert_eq!((g.ino, g.size, g.uid), (5, 100, 7));
        apply(&mut ns, OpKind::Unlink, "d/g", "").unwrap();
        assert_eq!(ns.files().collect::<Vec<_>>(), [(6, 0)]);
        apply(&mut ns, OpKind::Mkdir, "k", "").unwrap();
        refused(&mut ns, OpKind::Link, "k", "l");
        check(&ns);
    }

    #[test]
    fn symlinks_replace_symlinks_only() {
        let mut ns = Namespace::empty();
        apply(&mut ns, OpKind::Symlink, "l", "/etc/one").unwrap();
        apply(&mut ns, OpKind::Symlink, "l", "two").unwrap();
        let l = entry_at(&ns, "l").unwrap();
        assert_eq!((l.mode, l.size, &l.target[..]), (0o120777, 3, &b"two"[..]));
        create(&mut ns, "f", 1);
        refused(&mut ns, OpKind::Symlink, "f", "x");
        refused(&mut ns, OpKind::Symlink, "m", "");
        // A symlink on the way is refused, to walk or to make below.
        refused(&mut ns, OpKind::Unlink, "l/x", "");
        refused(&mut ns, OpKind::Mkdir, "l/x", "");
        check(&ns);
    }

    #[test]
    fn mknod_makes_fifos_and_device_nodes_and_keeps_one_of_its_type() {
        let mut ns = Namespace::empty();
        let null = u64::from(libc::S_IFCHR | 0o666) | libc::makedev(1, 3) << 32;
        ns.apply_op(&op(OpKind::Mknod, "dev/null", "", 0, null))
            .unwrap();
        let fifo = u64::from(libc::S_IFIFO | 0o644);
        ns.apply_op(&op(OpKind::Mknod, "p", "", 0, fifo)).unwrap();
        ns.apply_op(&op(OpKind::Mknod, "p", "", 0, fifo)).unwrap();
        let n = entry_at(&ns, "dev/null").unwrap();
        assert_eq!(
            (n.mode, n.rdev),
            (libc::S_IFCHR | 0o600, libc::makedev(1, 3))
        );
        assert_eq!(entry_at(&ns, "p").unwrap().mode, libc::S_IFIFO | 0o600);
        assert!(ns.apply_op(&op(OpKind::Mknod, "p", "", 0, null)).is_err());
        let file = u64::from(libc::S_IFREG | 0o644);
        assert!(ns.apply_op(&op(OpKind::Mknod, "q", "", 0, file)).is_err());
        assert!(
            ns.apply_op(&op(OpKind::Unspecified, "q", "", 0, 0))
                .is_err()
        );
        assert!(
            ns.apply_op(&NamespaceOp {
                kind: 99,
                ..op(OpKind::Create, "q", "", 1, 0)
            })
            .is_err()
        );
        check(&ns);
    }

    #[test]
    fn file_states_make_files_and_take_over_the_file_at_their_path() {
        let mut ns = Namespace::empty();
        let state = |id, path: &str, size| FileState {
            file_id: id,
            path: path.into(),
            size,
        };
        ns.set_file(&state(1, "vm/disk.img", 1 << 30)).unwrap();
        create(&mut ns, "old", 9);
        apply(&mut ns, OpKind::Link, "old", "old2").unwrap();
        ns.set_file(&state(2, "old", 10)).unwrap();
        let mut files: Vec<_> = ns.files().collect();
        files.sort();
        assert_eq!(files, [(1, 1 << 30), (2, 10)]);
        assert_eq!(entry_at(&ns, "old2").unwrap().ino, 2);
        assert_eq!(entry_at(&ns, "vm").unwrap().mode, 0o40700);
        check(&ns);
        assert!(ns.set_file(&state(3, "vm", 1)).is_err());
        assert!(ns.set_file(&state(3, "old/x", 1)).is_err());
        assert!(ns.set_file(&state(3, "/abs", 1)).is_err());
    }

    #[test]
    fn metadata_lands_on_the_same_type_only_and_the_root_takes_it() {
        let mut ns = Namespace::empty();
        create(&mut ns, "d/f", 1);
        apply(&mut ns, OpKind::Symlink, "l", "d").unwrap();
        let meta = |path: &str, mode: u32| PathMeta {
            path: path.into(),
            mode,
            uid: 1000,
            gid: 100,
            mtime_sec: 5,
            mtime_nsec: 7,
            ..PathMeta::default()
        };
        ns.set_meta(&meta("", libc::S_IFDIR | 0o755)).unwrap();
        ns.set_meta(&meta("d", libc::S_IFDIR | 0o750)).unwrap();
        ns.set_meta(&meta("d/f", libc::S_IFDIR | 0o777)).unwrap();
        ns.set_meta(&meta("l", libc::S_IFLNK | 0o700)).unwrap();
        ns.set_meta(&meta("gone/x", libc::S_IFREG | 0o700)).unwrap();
        let mut late = meta("d", libc::S_IFDIR);
        late.atime_nsec = 1_000_000_000;
        assert!(ns.set_meta(&late).is_err());
        let (root, _) = ns.clone().into_parts();
        assert_eq!(
            (root.mode, root.uid, root.mtime_ns),
            (0o40755, 1000, 5_000_000_007)
        );
        let d = entry_at(&ns, "d").unwrap();
        assert_eq!((d.mode, d.gid), (0o40750, 100));
        assert_eq!(entry_at(&ns, "d/f").unwrap().mode, 0o100600);
        let l = entry_at(&ns, "l").unwrap();
        assert_eq!((l.mode, l.uid, l.mtime_ns), (0o120777, 1000, 5_000_000_007));
        check(&ns);
    }

    #[test]
    fn damaged_manifests_are_refused_naming_the_entry() {
        let root = Entry {
            mode: libc::S_IFDIR | 0o755,
            ..Entry::default()
        };
        let e = |path: &str, mode: u32, ino: u64| Entry {
            path: path.into(),
            mode,
            ino,
            ..Entry::default()
        };
        let (dir, file) = (libc::S_IFDIR | 0o755, libc::S_IFREG | 0o644);
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![e("a/x", file, 1)], "before its folder"),
            (vec![e("a", dir, 0), e("a", dir, 0)], "listed twice"),
            (
                vec![e("a", file, 1), e("a/x", file, 2)],
                "below a non-folder",
            ),
            (vec![e("", dir, 0)], "empty path"),
            (vec![e(".", dir, 0)], "component"),
            (vec![e("a", dir, 0), e("a/..", dir, 0)], "component"),
            (vec![e("/a", dir, 0)], "component"),
            (vec![e("a", dir, 0), e("a//b", dir, 0)], "component"),
            (vec![e("a/", dir, 0)], "component"),
            (vec![e(".hbrfs", dir, 0)], "state folder"),
            (vec![e("a", 0o644, 0)], "unknown type"),
        ];
        for (entries, why) in cases {
            let err = Namespace::from_entries(root.clone(), entries.clone(), "points/s/1");
            let err = err.expect_err(why).to_string();
            assert!(err.starts_with("points/s/1: entry"), "{err}");
            assert!(err.contains(why), "{entries:?}: {err}");
        }
        let not_dir = Entry {
            mode: libc::S_IFREG,
            ..root.clone()
        };
        assert!(Namespace::from_entries(not_dir, Vec::new(), "m").is_err());
        let fine = vec![e("a", dir, 0), e("a-x", file, 3), e("a/b", file, 3)];
        let ns = Namespace::from_entries(root, fine, "m").unwrap();
        assert_eq!(ns.files().collect::<Vec<_>>(), [(3, 0)]);
        check(&ns);
    }

    fn any_step() -> impl Strategy<Value = (u8, NamespaceOp)> {
        (0u8..4, any_op())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn any_sequence_lists_a_tree_that_reads_back(steps in prop::collection::vec(any_step(), 1..40)) {
            let mut ns = Namespace::empty();
            for (what, op) in steps {
                // Errors leave a namespace the caller drops; it must still
                // be whole, so the sequence goes on with it.
                let _ = match what {
                    0 => ns.set_file(&FileState { file_id: op.file_id, path: op.path, size: op.arg }),
                    1 => ns.set_meta(&PathMeta {
                        path: op.path,
                        mode: op.arg as u32 | libc::S_IFDIR,
                        uid: 3,
                        ..PathMeta::default()
                    }),
                    _ => ns.apply_op(&op),
                };
                check(&ns);
            }
        }
    }
}
