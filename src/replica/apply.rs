//! The apply of a point as it arrives, each block written once, in place.
//!
//! A point is applied while it streams in ([`Apply::start`] once its lists
//! are complete, [`Apply::write`] for each batch of blocks, then
//! [`Apply::finish`] at its commit), with the replica kept recoverable to
//! the point before it (E-1) at every instant by undo, not by a staged
//! copy of the new data:
//!
//! 1. Before anything changes, the store makes sure E-1 is a recorded
//!    point (its namespace; a temporary one with `--keep none` or before
//!    the first point) and writes the `inflight` record durably.
//! 2. Namespace operations and sizes, then blocks batch by batch: the old
//!    content of each batch is saved into E-1's undo and synced, then the
//!    new content is written in place (once; the kernel's page cache is
//!    the only copy). Nothing is synced per file.
//! 3. At the commit: one `syncfs` (every block durable), then the `redo`
//!    record (the commit point), then the point's metadata, a second
//!    `syncfs`, the recovery point and `applied`.
//!
//! A crash or a failure before the commit point rolls the replica back to
//! E-1 from the undo (`points::undo_in_flight`); after it, the restart
//! finishes the apply from the redo record (metadata and the record only:
//! the blocks are durable). So after a crash at any instant the replica is
//! at E-1 or, after the restart, at E — never between. The mirrored mount
//! is kept out of the replica (the store's `view` lock) while a point is
//! in flight.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::confine;
use super::index::ContentIndex;
use super::meta::{self, Refusals};
use super::overlay::Overlay;
use super::records::{Applied, bad};
use super::spill::Records;
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::points::PointKeeper;
use crate::points::undo::UndoWriter;
use crate::proto::points::PointRecord;
use crate::proto::replica::StagedBlock;
use crate::proto::replication::{Begin, Manifest, NamespaceOp, OpKind};
use crate::state::{self, ReplicaPaths, now_ns};
use crate::sys;

/// Replica folders and files are made private (0700, 0600) whatever the
/// secondary's umask, and keep that mode until the point's metadata
/// (applied last, see `meta`) gives them the primary's.
pub fn make_dirs(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .at(path)
}

/// Opens (creating, 0600 until its metadata arrives) the regular file `name` in `dir` for writing (and reading: the undo saves what it overwrites),
/// never following a symlink.
fn open_for_write(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<File> {
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW;
    sys::openat(Some(dir), name, flags, 0o600).map(File::from)
}

/// Whether `e` says a path is not there (a missing name or folder on the
/// way): an operation finding its effect already done.
fn missing(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// Syncs the file system holding the replica at `root` (its state folder
/// with it): one barrier for everything a point wrote.
pub fn sync_replica(root: &Path) -> Result<()> {
    let dir = File::open(root).at(root)?;
    sys::syncfs(dir.as_fd()).at(root)
}

/// Reads the staged point's lists back one Manifest chunk at a time,
/// handing each to `each`; returns the point's header. Lists that do not
/// end, or a header of another epoch than `epoch`, are damaged staging.
fn read_lists(
    paths: &ReplicaPaths,
    epoch: Epoch,
    mut each: impl FnMut(Manifest) -> Result<()>,
) -> Result<Begin> {
    let path = paths.staged_point();
    let mut records = Records::open(&path)?;
    let begin: Begin = records
        .read()?
        .ok_or_else(|| bad(&path, "a staged point without its Begin"))?;
    if begin.epoch != epoch.0 {
        return Err(bad(
            &path,
            format!("staged epoch {} where {epoch} is applied", begin.epoch),
        ));
    }
    loop {
        let chunk: Manifest = records
            .read()?
            .ok_or_else(|| bad(&path, "the staged lists do not end"))?;
        let end = chunk.end;
        each(chunk)?;
        if end {
            return Ok(begin);
        }
    }
}

/// Every path the staged point `epoch` names (its operations' paths and
/// targets, its files) and the folders above them (which applying it
/// makes where missing): what a rollback of it may remove.
pub fn touched_paths(paths: &ReplicaPaths, epoch: Epoch) -> Result<HashSet<Vec<u8>>> {
    let mut touched = HashSet::new();
    let mut add = |path: &[u8]| {
        let ends = path.iter().enumerate().filter(|(_, b)| **b == b'/');
        touched.extend(ends.map(|(at, _)| path[..at].to_vec()));
        touched.insert(path.to_vec());
    };
    read_lists(paths, epoch, |chunk| {
        for op in &chunk.ops {
            add(&op.path);
            add(&op.target);
        }
        chunk.files.iter().for_each(|f| add(&f.path));
        Ok(())
    })?;
    Ok(touched)
}

/// A point's files, once its namespace operations and sizes are applied.
#[derive(Debug)]
pub struct Started {
    /// Every file of the point and its size.
    pub files: HashMap<u64, u64>,
    /// The point changes block content only: no operation, no file made
    /// or resized (the mirror can read the point before through the undo
    /// while it is in flight).
    pub content_only: bool,
}

/// Files an apply holds open at once (a secondary may run under a low
/// open-file limit).
const OPEN_FILES: usize = 64;

/// One block of a point on its way into the replica: where it goes (a
/// zero block is a hole) and, unless zero, its content.
#[derive(Debug)]
pub struct Landing {
    /// The offer it answers (file, block, length, hash, zero).
    pub block: StagedBlock,
    /// Its content (empty for a zero block).
    pub data: Vec<u8>,
}

/// What an apply works on: the replica root, its state folder and its
/// content index, at the pair's block size.
#[derive(Debug)]
pub struct Apply<'a> {
    /// The replica root.
    pub root: &'a Path,
    /// Its state folder (staging, redo, applied).
    pub paths: &'a ReplicaPaths,
    /// The content index, updated with what the point writes.
    pub index: &'a ContentIndex,
    /// The pair's block size in bytes.
    pub block_size: u64,
    /// Whether device nodes are made (`serve --allow-devices`).
    pub allow_devices: bool,
    /// Where the old content of what the apply overwrites, punches,
    /// truncates or removes is saved first: the undo of the point before
    /// (recorded for this, temporarily if no history is kept). Always
    /// there for a point in flight; `None` only when finishing one after
    /// a crash whose point before is no longer kept.
    pub undo: RefCell<Option<UndoWriter>>,
    /// The recovery points, which record this one once it is applied.
    pub points: &'a PointKeeper,
    /// The mirror's view of the point before, told of each block before
    /// it is overwritten (when active).
    pub overlay: &'a RwLock<Overlay>,
}

impl Apply<'_> {
    /// The point's namespace operations, then every file of it given its
    /// final size (its path recorded in the index); returns the files and
    /// their sizes, and whether the point changes only block content.
    /// What this refuses to do is added to `refusals`.
    pub fn start(&self, epoch: Epoch, refusals: &mut Refusals) -> Result<Started> {
        let ops = self.apply_ops(epoch, refusals)?;
        let (files, resized) = self.size_files(epoch)?;
        Ok(Started {
            files,
            content_only: ops == 0 && !resized,
        })
    }

    /// Writes `blocks` (of files `files` lists) in place: their old
    /// content saved into the undo and synced first, so a rollback after
    /// a crash finds every overwritten block saved and never saves new
    /// content as old. Files are opened once per run of their blocks, at
    /// most 64 at a time (one sync of the undo per group).
    pub fn write(&self, blocks: &[Landing], files: &HashMap<u64, u64>) -> Result<()> {
        let runs: Vec<&[Landing]> = blocks
            .chunk_by(|a, b| a.block.file_id == b.block.file_id)
            .collect();
        for group in runs.chunks(OPEN_FILES) {
            self.write_group(group, files)?;
        }
        crate::state::crash_point("apply-blocks");
        Ok(())
    }

    /// [`Apply::write`] for at most [`OPEN_FILES`] runs of blocks, each of
    /// one file.
    fn write_group(&self, runs: &[&[Landing]], files: &HashMap<u64, u64>) -> Result<()> {
        let mut open = Vec::with_capacity(runs.len());
        let mut saved = Vec::new();
        let mut undo = self.undo.borrow_mut();
        let undo = undo.as_mut().ok_or_else(|| self.no_undo())?;
        for run in runs {
            let id = run[0].block.file_id;
            if !files.contains_key(&id) {
                let wrong = format!("blocks of file {id}, which the point does not list");
                return Err(bad(&self.paths.staged_point(), wrong));
            }
            let (file, path) = self.open_file(id)?;
            let ino = file.metadata().at(&path)?.ino();
            for b in *run {
                if let Some(r) = undo.save(&file, ino, b.block.block, b.block.zero, &path)? {
                    saved.push((ino, b.block.block, r));
                }
            }
            open.push((file, path));
        }
        undo.sync()?;
        let mut overlay = self.overlay.write().expect("overlay lock");
        for (ino, block, r) in saved {
            overlay.insert(ino, block, r);
        }
        drop(overlay);
        for (run, (file, path)) in runs.iter().zip(&open) {
            for b in *run {
                self.write_block(file, path, b)?;
            }
        }
        Ok(())
    }

    /// The end of the point (after the commit point): sizes set again for
    /// the files that got blocks (of two files of the point at one path,
    /// the later wins; `None`: all of them, as after a crash), the point's
    /// metadata, a sync, then the recovery point and `applied`, durably;
    /// returns that record. Done again whole after a crash (every step is
    /// idempotent).
    pub fn finish(
        &self,
        epoch: Epoch,
        written: Option<&HashSet<u64>>,
        changed_blocks: u64,
        refusals: &mut Refusals,
    ) -> Result<Applied> {
        let begin = read_lists(self.paths, epoch, |chunk| {
            let got_blocks = |id: &u64| written.is_none_or(|w| w.contains(id));
            for f in chunk.files.iter().filter(|f| got_blocks(&f.file_id)) {
                let (file, path) = self.open_file(f.file_id)?;
                file.set_len(f.size).at(&path)?;
            }
            meta::apply_metas(self.root, &chunk.metas, refusals)
        })?;
        sync_replica(self.root)?;
        self.index.flush()?;
        let applied = Applied {
            epoch,
            at_ns: now_ns(),
            point: begin.point,
        };
        let record = PointRecord {
            epoch: epoch.0,
            at_ns: applied.at_ns,
            point: applied.point.clone(),
            changed_blocks,
            ..Default::default()
        };
        self.points
            .applied(self.root, record, self.undo.borrow_mut().as_mut())?;
        applied.write(self.paths)?;
        Ok(applied)
    }

    /// The point's namespace operations, in order. None is ever skipped.
    /// Any failure is either the replica's file system failing (no space,
    /// no descriptors, an IO error) or a true conflict (the replica was
    /// changed behind the secondary's back: a file left in a folder the
    /// primary removed); both fail the point with that cause, which both
    /// sides' `status` shows, and the replica is rolled back to the point
    /// before; the retry (next stream) starts over once the cause is fixed.
    fn apply_ops(&self, epoch: Epoch, refusals: &mut Refusals) -> Result<usize> {
        let mut i = 0usize;
        read_lists(self.paths, epoch, |chunk| {
            for op in &chunk.ops {
                self.apply_op(op, refusals).inspect_err(|e| {
                    log::error!(
                        "epoch {epoch}: operation {i} ({:?} {}) failed, the point stops here \
                         and is rolled back: {e}",
                        op.kind(),
                        String::from_utf8_lossy(&op.path)
                    )
                })?;
                i += 1;
            }
            Ok(())
        })?;
        Ok(i)
    }

    /// Gives every file of the point its final size, one at a time, and
    /// records its path in the index; returns the files' sizes.
    /// Any failure (EMFILE, ENOSPC, EIO, EFBIG, a path that cannot be
    /// made) fails the point: it is rolled back, nothing is skipped. Also
    /// returns whether a file was made or resized.
    fn size_files(&self, epoch: Epoch) -> Result<(HashMap<u64, u64>, bool)> {
        let mut files = HashMap::new();
        let mut resized = false;
        read_lists(self.paths, epoch, |chunk| {
            for f in &chunk.files {
                let path = self.shown(&f.path)?;
                let (dir, name) = self.parent(&f.path, true)?;
                let existed = sys::statat(dir.as_fd(), name)
                    .ok()
                    .map(|st| st.st_size as u64);
                let file = open_for_write(dir.as_fd(), name).at(&path)?;
                self.before_resize(&file, f.size, &path)?;
                file.set_len(f.size).at(&path)?;
                resized |= existed != Some(f.size);
                self.index.set_path(FileId(f.file_id), &f.path)?;
                files.insert(f.file_id, f.size);
            }
            Ok(())
        })?;
        Ok((files, resized))
    }

    /// Opens file `id` of the epoch for writing, where it lies (its path
    /// was recorded by [`Apply::size_files`]), walked by descriptors.
    fn open_file(&self, id: u64) -> Result<(File, PathBuf)> {
        let rel = self.index.file_path(FileId(id))?.ok_or_else(|| {
            bad(
                &self.paths.staged_offers(),
                format!("file {id} has no path"),
            )
        })?;
        let path = self.shown(&rel)?;
        let (dir, name) = self.parent(&rel, true)?;
        let file = open_for_write(dir.as_fd(), name).at(&path)?;
        Ok((file, path))
    }

    /// A change to the replica asked of an apply that has no undo to save
    /// the old content in (only a finish after a crash has none).
    fn no_undo(&self) -> crate::error::Error {
        bad(
            self.root,
            "a change to the replica with no undo to roll it back",
        )
    }

    /// The content block `b` names, as the replica holds it now (what a
    /// point in flight wrote there): read back before a rollback.
    pub fn read_back(&self, b: &StagedBlock) -> Result<Vec<u8>> {
        let (file, path) = self.open_file(b.file_id)?;
        let mut buf = vec![0u8; b.length as usize];
        file.read_exact_at(&mut buf, b.block * self.block_size)
            .at(&path)?;
        Ok(buf)
    }

    /// Saves (durably) the blocks of `file` a resize to `size` cuts off,
    /// and notes its size before the apply.
    fn before_resize(&self, file: &File, size: u64, path: &Path) -> Result<()> {
        let mut undo = self.undo.borrow_mut();
        let undo = undo.as_mut().ok_or_else(|| self.no_undo())?;
        let st = file.metadata().at(path)?;
        undo.note_size(st.ino(), st.size());
        if st.size() > size {
            undo.save_tail(file, st.ino(), size, path)?;
        }
        Ok(())
    }

    /// Keeps the file `name` in `dir`, which the apply is about to remove
    /// or rename over (a hard link: no copy).
    fn before_remove(&self, dir: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        let mut undo = self.undo.borrow_mut();
        let undo = undo.as_mut().ok_or_else(|| self.no_undo())?;
        match sys::statat(dir, name) {
            Ok(st) => undo.keep_removed(dir, name, &st),
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(e).at(path),
        }
    }

    /// Writes one block into `file` (at `path`): a hole punched (zeros
    /// written where punching is not supported) for a zero block, else
    /// its content, indexed.
    fn write_block(&self, file: &File, path: &Path, b: &Landing) -> Result<()> {
        let at = b.block.block * self.block_size;
        if b.block.zero {
            let punched = sys::fallocate(
                file.as_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                u64::from(b.block.length),
            );
            if punched.is_err() {
                file.write_all_at(&vec![0u8; b.block.length as usize], at)
                    .at(path)?;
            }
            return Ok(());
        }
        file.write_all_at(&b.data, at).at(path)?;
        self.index.record(
            &b.block.hash,
            FileId(b.block.file_id),
            BlockNo(b.block.block),
        )
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

    /// The folder holding `raw` (made, 0700 until its metadata arrives, when `make`) and its last
    /// name, walked by descriptors from the root; a symlink on the way is
    /// refused (`ELOOP`).
    fn parent<'r>(&self, raw: &'r [u8], make: bool) -> Result<(OwnedFd, &'r OsStr)> {
        let shown = self.shown(raw)?;
        let root = self.root_fd()?;
        state::parent_beneath(root.as_fd(), raw, make.then_some(0o700)).at(shown)
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
    fn apply_op(&self, op: &NamespaceOp, refusals: &mut Refusals) -> Result<()> {
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
                state::dir_beneath(root.as_fd(), &op.path, Some(0o700)).at(&path)?;
            }
            OpKind::Rmdir | OpKind::Unlink => {
                if let Some((dir, name)) = self.existing(&op.path)? {
                    let rmdir = op.kind() == OpKind::Rmdir;
                    self.before_remove(dir.as_fd(), name, &path)?;
                    sys::unlinkat(dir.as_fd(), name, rmdir).at(&path)?;
                }
            }
            OpKind::Truncate => {
                if let Some((dir, name)) = self.existing(&op.path)? {
                    let flags = libc::O_RDWR | libc::O_NOFOLLOW;
                    let file =
                        File::from(sys::openat(Some(dir.as_fd()), name, flags, 0).at(&path)?);
                    self.before_resize(&file, op.arg, &path)?;
                    sys::ftruncate(file.as_fd(), op.arg).at(&path)?;
                }
            }
            OpKind::Rename => self.rename(op, &path)?,
            OpKind::Mknod => {
                let node = meta::Node::at(self.root, &op.path, true)?;
                let node = node.ok_or_else(|| bad(&path, "its folder could not be made"))?;
                meta::mknod(&node, op.arg, self.allow_devices, refusals)?;
            }
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
        if !exchange {
            self.before_remove(to_dir.as_fd(), to, path)?;
        }
        let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
        sys::renameat2(from_dir.as_fd(), from, to_dir.as_fd(), to, flags).at(path)?;
        self.index.repath(&op.path, &op.target)
    }
}
