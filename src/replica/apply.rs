//! The atomic apply of a staged epoch: redo → apply → applied.
//!
//! An epoch is first staged completely (block data, the lists of its
//! Begin and Manifest chunks in `point`, its offers in `offers`, all
//! fsynced) in `REPLICA/.hbrfs/staging/`; then a `redo` record naming it
//! is written durably — the commit point ([`write_commit_point`]); then it
//! is applied in place and the replica fsynced ([`Apply::run`]), reading
//! the staged lists and offers back one record at a time, so the apply's
//! memory does not grow with the point; then `applied` is updated and the
//! redo record and staging removed (by the store, which owns the in-memory
//! state). A restart that finds a redo record applies the staged epoch
//! again (every step is idempotent; namespace operations count their
//! progress in `staging/ops-done`). So after
//! a crash at any instant the replica is at the previous point or, after
//! the replay at start, at the new one — never between. The mirrored mount
//! is kept out of the replica (the store's `view` lock) while an epoch
//! applies.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::confine;
use super::index::ContentIndex;
use super::meta::{self, Refusals};
use super::records::{Applied, Redo, bad};
use super::resume::read_offers;
use super::spill::Records;
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, Epoch, FileId};
use crate::points::PointKeeper;
use crate::points::undo::UndoWriter;
use crate::proto::points::PointRecord;
use crate::proto::replica::StagedBlock;
use crate::proto::replication::{Begin, Manifest, NamespaceOp, OpKind};
use crate::state::{self, ReplicaPaths, now_ns, write_durably};
use crate::sys;

/// Blocks whose old content is saved and synced before they are written
/// (one fsync of the undo per batch, not per block; 1024 measured faster
/// than 256 for a 512 MiB overwrite).
const UNDO_BATCH: usize = 1024;

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

/// The commit point: the operations-done count at zero, then the redo
/// record, each written durably (the session synced the staging first:
/// block data, lists, offers). From here a crash replays the apply.
pub fn write_commit_point(paths: &ReplicaPaths, epoch: Epoch) -> Result<()> {
    write_durably(&paths.ops_done(), b"")?;
    Redo { epoch, ops_done: 0 }.write(paths)
}

/// How many operations of the staged point an interrupted apply did: the
/// length of the `ops-done` file (or the count of an older build's redo
/// record).
pub fn ops_done(paths: &ReplicaPaths, redo: &Redo) -> usize {
    let len = fs::metadata(paths.ops_done()).map_or(0, |m| m.len());
    redo.ops_done
        .max(usize::try_from(len).unwrap_or(usize::MAX))
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
    /// Whether device nodes are made (`serve --allow-devices`).
    pub allow_devices: bool,
    /// Where the old content of what the apply overwrites, punches,
    /// truncates or removes is saved first (the previous point's undo);
    /// `None` when no older point is kept.
    pub undo: RefCell<Option<UndoWriter>>,
    /// The recovery points, which record this one once it is applied.
    pub points: &'a PointKeeper,
}

impl Apply<'_> {
    /// Applies the staged epoch in place from operation `ops_done` on and
    /// records it durably as applied; returns that record and what the
    /// apply refused to do (see `meta`). The redo record and the staging
    /// are the caller's to remove. The staged lists and offers are read
    /// back from disk one record at a time, however large the point.
    pub fn run(&self, epoch: Epoch, ops_done: usize) -> Result<(Applied, Refusals)> {
        let mut refusals = Refusals::new();
        let begin = self.apply_ops(epoch, ops_done, &mut refusals)?;
        let mut files = self.size_files(epoch)?;
        let changed_blocks = self.write_blocks(epoch, &mut files)?;
        self.sync_files(&files)?;
        read_lists(self.paths, epoch, |chunk| {
            meta::apply_metas(self.root, &chunk.metas, &mut refusals)
        })?;
        self.sync_dirs(epoch)?;
        let root = File::open(self.root).at(self.root)?;
        sys::syncfs(root.as_fd()).at(self.root)?;
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
        let undo = self.undo.borrow_mut().take();
        self.points.applied(self.root, record, undo)?;
        applied.write(self.paths)?;
        Ok((applied, refusals))
    }

    /// The namespace operations from `ops_done` on, each counted in the
    /// `ops-done` file. None is ever skipped. They are idempotent by
    /// design (each is a no-op when it finds its effect done: a create or
    /// mkdir of a name that exists, an unlink, rmdir, truncate or rename
    /// of a name that is gone, a link whose new name exists), so a replay
    /// after a crash or a failure is harmless. Any other failure is either
    /// the replica's file system failing (no space, no descriptors, an IO
    /// error) or a true conflict (the replica was changed behind the
    /// secondary's back: a file left in a folder the primary removed);
    /// both fail the apply with that cause, which both sides' `status`
    /// shows. The count stays at this operation, and the retry (next
    /// hello or stream) starts there once the cause is fixed.
    ///
    /// The count is the file's length, set by one `ftruncate` per
    /// operation and synced once after the last: cheap enough for a
    /// backlog of 300,000 operations (a durable write per operation cost
    /// a few ms each). A length is metadata, which a journaling file
    /// system (ext4, XFS: what is assumed of the replica's) commits in
    /// order with the folder changes of the operations themselves, so
    /// after a crash the count matches what the replica holds; after a
    /// `kill -9` it is exact.
    fn apply_ops(&self, epoch: Epoch, ops_done: usize, refusals: &mut Refusals) -> Result<Begin> {
        let path = self.paths.ops_done();
        let progress = crate::state::state_file_options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .at(&path)?;
        let mut i = 0usize;
        let begin = read_lists(self.paths, epoch, |chunk| {
            for op in &chunk.ops {
                if i >= ops_done {
                    self.apply_op(op, refusals).inspect_err(|e| {
                        log::error!(
                            "epoch {epoch}: operation {i} ({:?} {}) failed, the apply stops here \
                             and is retried from it: {e}",
                            op.kind(),
                            String::from_utf8_lossy(&op.path)
                        )
                    })?;
                    progress.set_len(i as u64 + 1).at(&path)?;
                }
                i += 1;
            }
            Ok(())
        })?;
        progress.sync_all().at(&path)?;
        Ok(begin)
    }

    /// Gives every file of the epoch its final size, one at a time, and
    /// records its path in the index; returns the files (size, and
    /// whether synced: none yet).
    /// Any failure (EMFILE, ENOSPC, EIO, EFBIG, a path that cannot be
    /// made) fails the apply: the redo record stays and the whole apply is
    /// retried, nothing is skipped.
    fn size_files(&self, epoch: Epoch) -> Result<HashMap<u64, (u64, bool)>> {
        let mut files = HashMap::new();
        read_lists(self.paths, epoch, |chunk| {
            for f in &chunk.files {
                let path = self.shown(&f.path)?;
                let (dir, name) = self.parent(&f.path, true)?;
                let file = open_for_write(dir.as_fd(), name).at(&path)?;
                self.before_resize(&file, f.size, &path)?;
                file.set_len(f.size).at(&path)?;
                self.index.set_path(FileId(f.file_id), &f.path)?;
                files.insert(f.file_id, (f.size, false));
            }
            Ok(())
        })?;
        Ok(files)
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

    /// Writes the staged blocks (returns how many), read from the offers log in order (file
    /// by file): each file is opened once, gets its blocks (holes punched
    /// for zero blocks, content indexed), and is fsynced and closed before
    /// the next is opened, so an apply holds one file open whatever the
    /// size of its point. `files` notes each file synced. A file's size is
    /// set again after its blocks, as when each file was sized and written
    /// in turn: of two files of the point at one path, the later wins.
    fn write_blocks(&self, epoch: Epoch, files: &mut HashMap<u64, (u64, bool)>) -> Result<u64> {
        let data_path = self.paths.staged_data();
        let data = File::open(&data_path).at(&data_path)?;
        let offers = self.paths.staged_offers();
        let (header, mut records) = read_offers(self.paths)?;
        if header.epoch != epoch.0 {
            let wrong = format!("offers of epoch {} where {epoch} is applied", header.epoch);
            return Err(bad(&offers, wrong));
        }
        // The file being written: its id, size, descriptor and path; and
        // its blocks read but not yet written.
        let mut open: Option<(u64, u64, File, PathBuf)> = None;
        let mut batch = Vec::new();
        let done = |(_, size, file, path): (u64, u64, File, PathBuf)| {
            file.set_len(size).and_then(|_| file.sync_all()).at(&path)
        };
        let staged = (&data, data_path.as_path());
        let mut count = 0;
        while let Some(b) = records.read::<StagedBlock>()? {
            count += 1;
            if open.as_ref().is_none_or(|(id, ..)| *id != b.file_id) {
                if let Some((_, _, file, path)) = &open {
                    self.write_batch(file, path, &mut batch, staged)?;
                }
                open.take().map(done).transpose()?;
                let Some((size, synced)) = files.get_mut(&b.file_id) else {
                    let id = b.file_id;
                    let wrong =
                        format!("staged blocks of file {id}, which the epoch does not list");
                    return Err(bad(&offers, wrong));
                };
                *synced = true;
                let (file, path) = self.open_file(b.file_id)?;
                open = Some((b.file_id, *size, file, path));
            }
            batch.push(b);
            if batch.len() == UNDO_BATCH {
                let (_, _, file, path) = open.as_ref().expect("opened above");
                self.write_batch(file, path, &mut batch, staged)?;
            }
        }
        if let Some((_, _, file, path)) = &open {
            self.write_batch(file, path, &mut batch, staged)?;
        }
        open.map(done).transpose()?;
        Ok(count)
    }

    /// Writes `batch` (blocks of `file`, at `path`) from the staging
    /// (`staged`: its data file and path), after saving and syncing their
    /// old content when undo is kept: a replay after a crash then finds
    /// every overwritten block saved, and never saves new content as old.
    fn write_batch(
        &self,
        file: &File,
        path: &Path,
        batch: &mut Vec<StagedBlock>,
        staged: (&File, &Path),
    ) -> Result<()> {
        if let Some(undo) = self.undo.borrow_mut().as_mut() {
            let ino = file.metadata().at(path)?.ino();
            for b in batch.iter() {
                undo.save(file, ino, b.block, b.zero, path)?;
            }
            undo.sync()?;
        }
        let mut buf = Vec::new();
        for b in batch.drain(..) {
            self.write_block(file, path, &b, staged.0, staged.1, &mut buf)?;
        }
        crate::state::crash_point("apply-blocks");
        Ok(())
    }

    /// Syncs the files of the epoch that got no block (their size and
    /// existence), so every file is durable before `applied` is written.
    fn sync_files(&self, files: &HashMap<u64, (u64, bool)>) -> Result<()> {
        for (&id, _) in files.iter().filter(|(_, (_, synced))| !*synced) {
            let (file, path) = self.open_file(id)?;
            file.sync_all().at(&path)?;
        }
        Ok(())
    }

    /// Saves (durably) the blocks of `file` a resize to `size` cuts off,
    /// and notes its size before the apply, when undo is kept.
    fn before_resize(&self, file: &File, size: u64, path: &Path) -> Result<()> {
        let mut undo = self.undo.borrow_mut();
        let Some(undo) = undo.as_mut() else {
            return Ok(());
        };
        let st = file.metadata().at(path)?;
        undo.note_size(st.ino(), st.size());
        if st.size() > size {
            undo.save_tail(file, st.ino(), size, path)?;
        }
        Ok(())
    }

    /// Keeps the file `name` in `dir`, which the apply is about to remove
    /// or rename over, when undo is kept (a hard link: no copy).
    fn before_remove(&self, dir: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        let mut undo = self.undo.borrow_mut();
        let Some(undo) = undo.as_mut() else {
            return Ok(());
        };
        match sys::statat(dir, name) {
            Ok(st) => undo.keep_removed(dir, name, &st),
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(e).at(path),
        }
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
    fn sync_dirs(&self, epoch: Epoch) -> Result<()> {
        let mut dirs: BTreeSet<Vec<u8>> = BTreeSet::from([Vec::new()]);
        read_lists(self.paths, epoch, |chunk| {
            let raw_paths = chunk.ops.iter().flat_map(|op| [&op.path, &op.target]);
            for raw in raw_paths.chain(chunk.files.iter().map(|f| &f.path)) {
                if confine::join(self.root, raw).is_ok() {
                    let ends = raw.iter().enumerate().filter(|(_, b)| **b == b'/');
                    dirs.extend(ends.map(|(at, _)| raw[..at].to_vec()));
                }
            }
            Ok(())
        })?;
        let root = self.root_fd()?;
        for rel in dirs {
            let shown = self.root.join(OsStr::from_bytes(&rel));
            let dir = match state::dir_beneath(root.as_fd(), &rel, None) {
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
