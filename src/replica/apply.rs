//! The atomic apply of a staged epoch: redo → apply → applied.
//!
//! An epoch is first staged completely (block data and a manifest,
//! fsynced) in `REPLICA/.hbrfs/staging/`; then a `redo` record naming it
//! is written durably — the commit point ([`write_commit_point`]); then it
//! is applied in place and the replica fsynced ([`Apply::run`]); then
//! `applied` is updated and the redo record and staging removed (by the
//! store, which owns the in-memory state). A restart that finds a redo
//! record applies the staged epoch again (every step is idempotent;
//! namespace operations count their progress in the redo record). So after
//! a crash at any instant the replica is at the previous point or, after
//! the replay at start, at the new one — never between. The mirrored mount
//! is kept out of the replica (the store's `view` lock) while an epoch
//! applies.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use prost::Message;

use super::confine;
use super::index::ContentIndex;
use super::records::{Applied, Redo, bad};
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::proto::replica::{StagedBlock, StagedEpoch};
use crate::proto::replication::{Begin, NamespaceOp, OpKind};
use crate::state::{self, ReplicaPaths, now_ns, write_durably};
use crate::sys;

/// Replica folders and files get fixed modes (0755, 0644): the primary's
/// modes are not shipped yet, and the secondary's umask must not decide.
pub fn make_dirs(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .at(path)
}

/// Opens (creating, 0644) the regular file `name` in `dir` for writing,
/// never following a symlink.
fn open_for_write(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<File> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW;
    sys::openat(Some(dir), name, flags, 0o644).map(File::from)
}

/// Whether `e` says a path is not there (a missing name or folder on the
/// way): an operation finding its effect already done.
fn missing(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// The commit point: the staged manifest, then the redo record, each
/// written durably. From here a crash replays the apply.
pub fn write_commit_point(paths: &ReplicaPaths, staged: &StagedEpoch, epoch: Epoch) -> Result<()> {
    write_durably(&paths.staged_manifest(), &staged.encode_to_vec())?;
    Redo { epoch, ops_done: 0 }.write(paths)
}

/// The manifest an interrupted apply staged, to apply it again.
pub fn read_manifest(paths: &ReplicaPaths) -> Result<StagedEpoch> {
    let manifest = paths.staged_manifest();
    let bytes = fs::read(&manifest).at(&manifest)?;
    StagedEpoch::decode(bytes.as_slice())
        .map_err(|e| bad(&manifest, format!("corrupt staged manifest: {e}")))
}

/// What an apply works on: the replica root, its state folder and its
/// content index, at the pair's block size.
#[derive(Debug)]
pub struct Apply<'a> {
    /// The replica root.
    pub root: &'a Path,
    /// Its state folder (staging, redo, applied).
    pub paths: &'a ReplicaPaths,
    /// The content index, updated with what the epoch writes.
    pub index: &'a ContentIndex,
    /// The pair's block size in bytes.
    pub block_size: u64,
}

impl Apply<'_> {
    /// Applies the staged epoch in place from operation `ops_done` on and
    /// records it durably as applied; returns that record. The redo record
    /// and the staging are the caller's to remove.
    pub fn run(&self, staged: &StagedEpoch, epoch: Epoch, ops_done: usize) -> Result<Applied> {
        let begin = staged.begin.clone().unwrap_or_default();
        self.apply_ops(&begin, epoch, ops_done)?;
        self.write_files(staged, &begin)?;
        self.sync_dirs(&begin)?;
        self.index.flush()?;
        let applied = Applied {
            epoch,
            at_ns: now_ns(),
            point: begin.point.clone(),
        };
        applied.write(self.paths)?;
        Ok(applied)
    }

    /// The namespace operations from `ops_done` on, each counted in the
    /// redo record. None is ever skipped. They are idempotent by design
    /// (each is a no-op when it finds its effect done: a create or mkdir
    /// of a name that exists, an unlink, rmdir, truncate or rename of a
    /// name that is gone, a link whose new name exists), so a replay after
    /// a crash or a failure is harmless. Any other failure is either the
    /// replica's file system failing (no space, no descriptors, an IO
    /// error) or a true conflict (the replica was changed behind the
    /// secondary's back: a file left in a folder the primary removed); both
    /// fail the apply with that cause, which both sides' `status` shows.
    /// The redo record stays at this operation, and the retry (next hello
    /// or stream) starts there once the cause is fixed.
    fn apply_ops(&self, begin: &Begin, epoch: Epoch, ops_done: usize) -> Result<()> {
        for (i, op) in begin.ops.iter().enumerate().skip(ops_done) {
            self.apply_op(op).inspect_err(|e| {
                log::error!(
                    "epoch {epoch}: operation {i} ({:?} {}) failed, the apply stops here \
                     and is retried from it: {e}",
                    op.kind(),
                    String::from_utf8_lossy(&op.path)
                )
            })?;
            Redo {
                epoch,
                ops_done: i + 1,
            }
            .write(self.paths)?;
        }
        Ok(())
    }

    /// Writes the epoch's files one at a time: each is opened at its final
    /// size, gets its staged blocks (holes punched for zero blocks, content
    /// indexed), is fsynced and closed before the next is opened. So an
    /// apply holds one file open whatever the size of its point, and each
    /// file is durable before `applied` is written. Any failure (EMFILE,
    /// ENOSPC, EIO, EFBIG, a path that cannot be made) fails the apply:
    /// the redo record stays and the whole apply is retried, nothing is
    /// skipped.
    fn write_files(&self, staged: &StagedEpoch, begin: &Begin) -> Result<()> {
        let data_path = self.paths.staged_data();
        let data = File::open(&data_path).at(&data_path)?;
        let mut by_file: HashMap<u64, Vec<&StagedBlock>> = HashMap::new();
        for b in &staged.blocks {
            by_file.entry(b.file_id).or_default().push(b);
        }
        let mut buf = Vec::new();
        for f in &begin.files {
            let path = self.shown(&f.path)?;
            let (dir, name) = self.parent(&f.path, true)?;
            let file = open_for_write(dir.as_fd(), name).at(&path)?;
            file.set_len(f.size).at(&path)?;
            let id = FileId(f.file_id);
            self.index.set_path(id, &f.path)?;
            for b in by_file.remove(&f.file_id).unwrap_or_default() {
                self.write_block(&file, &path, b, &data, &data_path, &mut buf)?;
            }
            file.sync_all().at(&path)?;
        }
        if let Some(id) = by_file.keys().next() {
            return Err(bad(
                &self.paths.staged_manifest(),
                format!("staged blocks of file {id}, which the epoch does not list"),
            ));
        }
        Ok(())
    }

    /// Writes one staged block into `file` (at `path`): a hole punched
    /// (zeros written where punching is not supported) for a zero block,
    /// else its data from the staging file, indexed.
    fn write_block(
        &self,
        file: &File,
        path: &Path,
        b: &StagedBlock,
        data: &File,
        data_path: &Path,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let at = b.block * self.block_size;
        if b.zero {
            let punched = sys::fallocate(
                file.as_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                u64::from(b.length),
            );
            if punched.is_err() {
                file.write_all_at(&vec![0u8; b.length as usize], at)
                    .at(path)?;
            }
            return Ok(());
        }
        buf.resize(b.length as usize, 0);
        data.read_exact_at(buf, b.offset).at(data_path)?;
        file.write_all_at(buf, at).at(path)?;
        self.index
            .record(&b.hash, FileId(b.file_id), BlockNo(b.block))
    }

    /// Syncs the folders whose entries this epoch changed (its files were
    /// fsynced as they were written): only what it touched, not the whole
    /// file system. A folder a later operation removed is not there to
    /// sync; any other failure fails the apply.
    fn sync_dirs(&self, begin: &Begin) -> Result<()> {
        let mut dirs: BTreeSet<&[u8]> = BTreeSet::from([&b""[..]]);
        let raw_paths = begin.ops.iter().flat_map(|op| [&op.path, &op.target]);
        for raw in raw_paths.chain(begin.files.iter().map(|f| &f.path)) {
            if confine::join(self.root, raw).is_ok() {
                let ends = raw.iter().enumerate().filter(|(_, b)| **b == b'/');
                dirs.extend(ends.map(|(at, _)| &raw[..at]));
            }
        }
        let root = self.root_fd()?;
        for rel in dirs {
            let shown = self.root.join(OsStr::from_bytes(rel));
            let dir = match state::dir_beneath(root.as_fd(), rel, None) {
                Err(e) if missing(&e) => continue,
                opened => opened.at(&shown)?,
            };
            let dir = sys::reopen(dir.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).at(&shown)?;
            File::from(dir).sync_all().at(&shown)?;
        }
        Ok(())
    }

    /// A descriptor of the replica root, which every path of a point is
    /// resolved from (one component at a time: `root` joined to a path
    /// of up to [`crate::wire::MAX_PATH`] bytes may exceed PATH_MAX).
    fn root_fd(&self) -> Result<OwnedFd> {
        state::open_root(self.root).at(self.root)
    }

    /// `raw` confined to the root, as a path for messages.
    fn shown(&self, raw: &[u8]) -> Result<PathBuf> {
        confine::join(self.root, raw).map_err(|e| bad(self.root, e.to_string()))
    }

    /// The folder holding `raw` (made, 0755, when `make`) and its last
    /// name, walked by descriptors from the root; a symlink on the way is
    /// refused (`ELOOP`).
    fn parent<'r>(&self, raw: &'r [u8], make: bool) -> Result<(OwnedFd, &'r OsStr)> {
        let shown = self.shown(raw)?;
        let root = self.root_fd()?;
        state::parent_beneath(root.as_fd(), raw, make.then_some(0o755)).at(shown)
    }

    /// The folder holding `raw` and its last name, when something is
    /// there (`None`: nothing is, nor maybe its folder).
    fn existing<'r>(&self, raw: &'r [u8]) -> Result<Option<(OwnedFd, &'r OsStr)>> {
        let shown = self.shown(raw)?;
        let root = self.root_fd()?;
        let (dir, name) = match state::parent_beneath(root.as_fd(), raw, None) {
            Err(e) if missing(&e) => return Ok(None),
            found => found.at(&shown)?,
        };
        match sys::statat(dir.as_fd(), name) {
            Ok(_) => Ok(Some((dir, name))),
            Err(e) if missing(&e) => Ok(None),
            Err(e) => Err(e).at(shown),
        }
    }

    /// Applies one namespace operation; each is a no-op when it finds its
    /// effect already done, so a replay after a crash is harmless. Every
    /// path is walked by descriptors from the root (see [`Apply::parent`]).
    fn apply_op(&self, op: &NamespaceOp) -> Result<()> {
        let path = self.shown(&op.path)?;
        match op.kind() {
            OpKind::Create => {
                let (dir, name) = self.parent(&op.path, true)?;
                if sys::statat(dir.as_fd(), name).is_err() {
                    open_for_write(dir.as_fd(), name).at(&path)?;
                }
            }
            OpKind::Mkdir => {
                let root = self.root_fd()?;
                state::dir_beneath(root.as_fd(), &op.path, Some(0o755)).at(&path)?;
            }
            OpKind::Rmdir | OpKind::Unlink => {
                if let Some((dir, name)) = self.existing(&op.path)? {
                    let rmdir = op.kind() == OpKind::Rmdir;
                    sys::unlinkat(dir.as_fd(), name, rmdir).at(&path)?;
                }
            }
            OpKind::Truncate => {
                if let Some((dir, name)) = self.existing(&op.path)? {
                    let flags = libc::O_WRONLY | libc::O_NOFOLLOW;
                    sys::openat(Some(dir.as_fd()), name, flags, 0)
                        .and_then(|f| sys::ftruncate(f.as_fd(), op.arg))
                        .at(&path)?;
                }
            }
            OpKind::Rename => self.rename(op, &path)?,
            OpKind::Symlink => {
                let (dir, name) = self.parent(&op.path, true)?;
                let st = sys::statat(dir.as_fd(), name);
                if st.is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK) {
                    sys::unlinkat(dir.as_fd(), name, false).at(&path)?;
                }
                let target = Path::new(OsStr::from_bytes(&op.target));
                sys::symlinkat(target, dir.as_fd(), name).at(&path)?;
            }
            OpKind::Link => self.link(op)?,
            OpKind::Unspecified => {
                return Err(bad(self.root, "namespace operation of unknown kind"));
            }
        }
        Ok(())
    }

    /// A hard link: `op.target` becomes another name of the file at
    /// `path` (the same inode, as on the primary), unless it is there.
    fn link(&self, op: &NamespaceOp) -> Result<()> {
        let target = self.shown(&op.target)?;
        let Some((from_dir, from)) = self.existing(&op.path)? else {
            return Ok(());
        };
        let (to_dir, to) = self.parent(&op.target, true)?;
        if sys::statat(to_dir.as_fd(), to).is_ok() {
            return Ok(());
        }
        sys::linkat(from_dir.as_fd(), from, to_dir.as_fd(), to).at(target)
    }

    /// A rename (or exchange, `arg` holding the flags) of `path`, and the
    /// index's paths after it.
    fn rename(&self, op: &NamespaceOp, path: &Path) -> Result<()> {
        let exchange = op.arg as u32 & libc::RENAME_EXCHANGE != 0;
        let Some((from_dir, from)) = self.existing(&op.path)? else {
            return Ok(());
        };
        if !exchange && op.path == op.target {
            return Ok(());
        }
        let (to_dir, to) = self.parent(&op.target, true)?;
        let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
        sys::renameat2(from_dir.as_fd(), from, to_dir.as_fd(), to, flags).at(path)?;
        self.index.repath(&op.path, &op.target)
    }
}
