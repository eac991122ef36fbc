//! Checks a point's namespace operations and file states against the
//! replica as their Manifest chunks arrive, before any block is staged, so that a point an honest primary
//! could never send (an operation of unknown kind, a path through a
//! symlink, a folder where a file must be, a non-empty folder to remove)
//! is refused with a clear message instead of failing halfway through its
//! apply. Paths an earlier operation of the same point changes are not
//! checked against the disk (their state then is the apply's business;
//! see `apply`, which logs and skips an operation that conflicts with an
//! earlier one, and fails on a file-system or resource error).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::confine::{self, PathError};
use crate::proto::replication::{FileState, NamespaceOp, OpKind, PathMeta};
use crate::wire::MAX_FILE_SIZE;
use crate::{state, sys};

/// Why a point cannot be applied on this replica: refused before anything
/// is staged (the service answers InvalidArgument).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// A path is not confined to the replica root.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A path goes through a symlink an earlier operation made.
    #[error("path {path:?} goes through {link:?}, a symlink made earlier in the same point")]
    ThroughNewSymlink {
        /// The path, as received.
        path: String,
        /// The symlink, below the root.
        link: PathBuf,
    },
    /// An operation of a kind this build does not know.
    #[error("operation {op} has unknown kind {kind}")]
    UnknownKind {
        /// Its position in the point.
        op: usize,
        /// The kind received.
        kind: i32,
    },
    /// A symlink to nothing.
    #[error("symlink {path:?} has an empty target")]
    EmptySymlinkTarget {
        /// The symlink's path.
        path: String,
    },
    /// A truncate beyond [`MAX_FILE_SIZE`].
    #[error("truncate of {path:?} to {size} bytes is beyond the limit")]
    TruncateTooLarge {
        /// The file.
        path: String,
        /// The size asked for.
        size: u64,
    },
    /// Something that is not a folder stands where a folder must be.
    #[error("{path:?} lies below {blocker:?}, which is not a folder on the replica")]
    FileOnTheWay {
        /// The path, as received.
        path: String,
        /// What is in the way, below the root.
        blocker: PathBuf,
    },
    /// An operation finds the wrong kind of thing at its path.
    #[error("operation {op} ({kind:?}): {path:?} {wrong} on the replica")]
    WrongKind {
        /// Its position in the point.
        op: usize,
        /// Its kind.
        kind: OpKind,
        /// The path, as received.
        path: String,
        /// What is wrong there.
        wrong: &'static str,
    },
    /// A file state beyond [`MAX_FILE_SIZE`].
    #[error("file {file_id} size {size} is beyond the limit")]
    FileTooLarge {
        /// The file.
        file_id: u64,
        /// Its size.
        size: u64,
    },
    /// A file state whose path holds something else than a file.
    #[error("file {file_id} at {path:?} is not a regular file on the replica")]
    NotAFile {
        /// The file.
        file_id: u64,
        /// Its path, as received.
        path: String,
    },
}

/// The kind (`S_IFMT` bits) of what is at `path` below `root`, if
/// anything: looked up by descriptors from `root`, so a path longer than
/// PATH_MAX once joined to `root` is seen too.
fn exists(root: &Path, path: &Path) -> Option<u32> {
    let rel = path.strip_prefix(root).ok()?.as_os_str().as_bytes();
    let fd = state::open_root(root).ok()?;
    let st = state::stat_beneath(fd.as_fd(), rel).ok()?;
    Some(st.st_mode & libc::S_IFMT)
}

/// Whether the folder at `path` below `root` is empty (false when it
/// cannot be read).
fn empty_dir(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let listed = state::open_root(root)
        .and_then(|fd| state::dir_beneath(fd.as_fd(), rel.as_os_str().as_bytes(), None))
        .and_then(|dir| {
            let at = sys::proc_path(dir.as_fd());
            std::fs::read_dir(Path::new(OsStr::from_bytes(at.to_bytes())))
        });
    listed.is_ok_and(|mut d| d.next().is_none())
}

/// The folders strictly above `path`, up to `root` (excluded).
fn folders_above<'p>(root: &'p Path, path: &'p Path) -> impl Iterator<Item = &'p Path> {
    path.ancestors()
        .skip(1)
        .take_while(move |a| a.starts_with(root) && *a != root)
}

/// Refuses a path below something that exists and is not a folder.
fn no_file_on_the_way(root: &Path, path: &Path, shown: &str) -> Result<(), PreflightError> {
    let blocked =
        folders_above(root, path).find(|a| exists(root, a).is_some_and(|m| m != libc::S_IFDIR));
    match blocked {
        Some(a) => Err(PreflightError::FileOnTheWay {
            path: shown.to_string(),
            blocker: a.strip_prefix(root).unwrap_or(a).to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// What is wrong with an existing `m` at the path of an operation of
/// `kind`, if anything.
fn wrong_kind(kind: OpKind, root: &Path, path: &Path, m: u32) -> Option<&'static str> {
    let dir = m == libc::S_IFDIR;
    match kind {
        OpKind::Rmdir if !dir => Some("is not a folder"),
        OpKind::Rmdir if !empty_dir(root, path) => Some("is a folder that is not empty"),
        OpKind::Unlink if dir => Some("is a folder"),
        OpKind::Mkdir if !dir => Some("exists and is not a folder"),
        OpKind::Create | OpKind::Truncate if m != libc::S_IFREG => Some("is not a regular file"),
        // Any non-folder can have several names: fifos, sockets, device
        // nodes and symlinks too (pjdfstest's link cases make all of them).
        OpKind::Link if dir => Some("is a folder"),
        _ => None,
    }
}

/// A path as the walk remembers it: a 128-bit (unkeyed) hash of its
/// bytes (16 bytes however long the path). A collision can only make a
/// path look touched, which skips a check against the disk (the apply
/// then decides, and confines every path again): never a path let
/// through.
fn remembered(p: &Path) -> u128 {
    xxhash_rust::xxh3::xxh3_128(p.as_os_str().as_bytes())
}

/// The walk through one point, fed its operations and then its file
/// states as their Manifest chunks arrive: the paths its operations
/// touched so far (their state is the apply's business) and the symlinks
/// they made. Memory is a hash per distinct path touched (and per folder
/// above one), never the operations themselves, and each check costs the
/// depth of its path, not the number of operations before it.
#[derive(Debug)]
pub struct Walk<'a> {
    root: &'a Path,
    /// Paths an earlier operation touched.
    touched: HashSet<u128>,
    /// Every folder above a touched path: something below it was touched.
    above: HashSet<u128>,
    /// Symlinks an earlier operation made.
    links: HashSet<PathBuf>,
    /// Operations walked so far.
    ops: usize,
}

impl<'a> Walk<'a> {
    /// A walk of a point to be applied to the replica at `root`.
    pub fn new(root: &'a Path) -> Walk<'a> {
        Walk {
            root,
            touched: HashSet::new(),
            above: HashSet::new(),
            links: HashSet::new(),
            ops: 0,
        }
    }

    /// Confines `raw`, refusing a path through a symlink made earlier in
    /// the point.
    fn resolve(&self, raw: &[u8]) -> Result<PathBuf, PreflightError> {
        let path = confine::resolve(self.root, raw)?;
        if let Some(link) = folders_above(self.root, &path).find(|a| self.links.contains(*a)) {
            return Err(PreflightError::ThroughNewSymlink {
                path: String::from_utf8_lossy(raw).into_owned(),
                link: link.strip_prefix(self.root).unwrap_or(link).to_path_buf(),
            });
        }
        Ok(path)
    }

    /// Whether no earlier operation touched `path`, above or below it:
    /// then it is checked against the disk, and `shown` must not lie
    /// below a file.
    fn untouched(&self, path: &Path, shown: &str) -> Result<bool, PreflightError> {
        let touched = self.above.contains(&remembered(path))
            || path
                .ancestors()
                .take_while(|a| a.starts_with(self.root))
                .any(|a| self.touched.contains(&remembered(a)));
        if !touched {
            no_file_on_the_way(self.root, path, shown)?;
        }
        Ok(!touched)
    }

    /// Remembers that an operation touched `path`.
    fn touch(&mut self, path: &Path) {
        self.touched.insert(remembered(path));
        let above: Vec<u128> = folders_above(self.root, path).map(remembered).collect();
        for folder in above {
            // Its own folders are in already.
            if !self.above.insert(folder) {
                break;
            }
        }
    }

    /// The point's next operation.
    pub fn op(&mut self, op: &NamespaceOp) -> Result<(), PreflightError> {
        let i = self.ops;
        self.ops += 1;
        let kind = OpKind::try_from(op.kind)
            .ok()
            .filter(|k| *k != OpKind::Unspecified)
            .ok_or(PreflightError::UnknownKind {
                op: i,
                kind: op.kind,
            })?;
        let path = self.resolve(&op.path)?;
        let shown = String::from_utf8_lossy(&op.path);
        let target = match kind {
            // An empty target is refused by `confine` like any bad path.
            OpKind::Rename | OpKind::Link => Some(self.resolve(&op.target)?),
            OpKind::Symlink if op.target.is_empty() => {
                return Err(PreflightError::EmptySymlinkTarget {
                    path: shown.into_owned(),
                });
            }
            _ => None,
        };
        if kind == OpKind::Truncate && op.arg > MAX_FILE_SIZE {
            return Err(PreflightError::TruncateTooLarge {
                path: shown.into_owned(),
                size: op.arg,
            });
        }
        if self.untouched(&path, &shown)?
            && let Some(m) = exists(self.root, &path)
            && let Some(wrong) = wrong_kind(kind, self.root, &path, m)
        {
            return Err(PreflightError::WrongKind {
                op: i,
                kind,
                path: shown.into_owned(),
                wrong,
            });
        }
        if kind == OpKind::Symlink {
            self.links.insert(path.clone());
        }
        self.touch(&path);
        if let Some(target) = target {
            self.touch(&target);
        }
        Ok(())
    }

    /// A file's final state, after every operation.
    pub fn file(&self, f: &FileState) -> Result<(), PreflightError> {
        let path = self.resolve(&f.path)?;
        if f.size > MAX_FILE_SIZE {
            return Err(PreflightError::FileTooLarge {
                file_id: f.file_id,
                size: f.size,
            });
        }
        let shown = String::from_utf8_lossy(&f.path);
        if self.untouched(&path, &shown)?
            && exists(self.root, &path).is_some_and(|m| m != libc::S_IFREG)
        {
            return Err(PreflightError::NotAFile {
                file_id: f.file_id,
                path: shown.into_owned(),
            });
        }
        Ok(())
    }

    /// A path's metadata: it goes to a path confined below the root, or
    /// to the root itself (an empty path).
    pub fn meta(&self, m: &PathMeta) -> Result<(), PreflightError> {
        if !m.path.is_empty() {
            confine::join(self.root, &m.path)?;
        }
        Ok(())
    }
}
