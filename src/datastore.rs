//! A datastore's state folder (`BACKING/.hbrfs/`): its format line, the
//! lock that keeps one daemon per datastore, and opening the journal and the
//! tracker together — including the mount-time scan that reconciles the
//! journal with what is really in the backing directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::fs::recorder::{Change, ChangeRecorder, Gate, Gone, NewFile, Tracked};
use crate::ids::{BlockSize, FileId};
use crate::journal::Journal;
use crate::proto::journal::{FileRecord, OpKind, OpRecord};
use crate::state::{STATE_DIR, StatePaths, hex, now_ns, walk_files, write_durably};
use crate::sys;
use crate::tracking::{FileSource, TrackedFile, Tracker};

/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The parsed format line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    /// Tracking granularity, fixed at creation.
    pub block_size: BlockSize,
    /// Random id of this datastore, fixed at creation.
    pub id: String,
}

impl Format {
    fn line(&self) -> String {
        format!(
            "hbrfs-datastore v{FORMAT_VERSION} block_size={} id={}\n",
            self.block_size.bytes(),
            self.id
        )
    }

    fn parse(path: &Path, text: &str) -> Result<Format> {
        let bad = |reason: String| Error::BadState {
            path: path.to_path_buf(),
            reason,
        };
        let mut words = text.split_whitespace();
        if words.next() != Some("hbrfs-datastore") {
            return Err(bad("not an hbrfs format file".into()));
        }
        let version: u32 = words
            .next()
            .and_then(|v| v.strip_prefix('v'))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("missing format version".into()))?;
        if version > FORMAT_VERSION {
            return Err(bad(format!(
                "datastore format v{version} was written by a newer hbrfs; this one reads up to v{FORMAT_VERSION}"
            )));
        }
        let mut block_size = None;
        let mut id = None;
        for word in words {
            if let Some(v) = word.strip_prefix("block_size=") {
                block_size = v.parse().ok().and_then(BlockSize::new);
            } else if let Some(v) = word.strip_prefix("id=") {
                id = Some(v.to_string());
            }
        }
        Ok(Format {
            block_size: block_size.ok_or_else(|| bad("missing or invalid block_size".into()))?,
            id: id.ok_or_else(|| bad("missing datastore id".into()))?,
        })
    }
}

fn random_id() -> Result<String> {
    let bytes: [u8; 16] = sys::random_bytes().at("/dev/urandom")?;
    Ok(hex(&bytes))
}

/// How a datastore is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// By the daemon: creates the state folder if needed, takes the lock,
    /// may change everything. `block_size` is what the user asked for.
    Daemon {
        /// `--block-size`, if given.
        block_size: Option<BlockSize>,
    },
    /// By `hbrfs journal` while no daemon runs: reads only.
    Inspect,
}

/// An open datastore.
#[derive(Debug)]
pub struct Datastore {
    /// The backing directory.
    pub root: PathBuf,
    /// Its state folder.
    pub paths: StatePaths,
    /// Its format line.
    pub format: Format,
    /// The change journal.
    pub journal: Arc<Journal>,
    /// The dirty bitmaps and epochs.
    pub tracker: Arc<Tracker>,
    /// Held for as long as the datastore is open by the daemon.
    _lock: Option<File>,
    /// Whether the state folder was made by this open.
    pub fresh: bool,
}

impl Datastore {
    /// Opens the datastore at `backing`.
    pub fn open(backing: &Path, access: Access) -> Result<Datastore> {
        let meta = fs::metadata(backing).at(backing)?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!(
                "{}: not a directory",
                backing.display()
            )));
        }
        let root = backing.canonicalize().at(backing)?;
        let paths = StatePaths::of(&root);
        let fresh = !paths.format().exists();
        let (format, lock) = match access {
            Access::Daemon { block_size } => {
                fs::create_dir_all(paths.bitmaps()).at(paths.bitmaps())?;
                // The state is the daemon's alone, whatever the umask.
                fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700)).at(&paths.dir)?;
                let lock = take_lock(&paths)?;
                let format = if fresh {
                    let format = Format {
                        block_size: block_size.unwrap_or(BlockSize::DEFAULT),
                        id: random_id()?,
                    };
                    write_durably(&paths.format(), format.line().as_bytes())?;
                    format
                } else {
                    read_format(&paths)?
                };
                if let Some(asked) = block_size.filter(|b| *b != format.block_size) {
                    return Err(Error::Usage(format!(
                        "{}: this datastore was created with block size {}; --block-size {asked} does not match. \
                         The block size is fixed at creation; remove {} to start over (this forces a full resync).",
                        root.display(),
                        format.block_size,
                        paths.dir.display()
                    )));
                }
                (format, Some(lock))
            }
            Access::Inspect => {
                if fresh {
                    return Err(Error::Usage(format!(
                        "{}: no hbrfs datastore here (no {STATE_DIR}/format); mount it once with `hbrfs mount`",
                        root.display()
                    )));
                }
                (read_format(&paths)?, None)
            }
        };
        let writable = lock.is_some();
        let journal = Arc::new(open_journal(&paths, writable)?);
        if writable {
            let pre = paths.preimages();
            fs::create_dir_all(&pre).at(&pre)?;
        }
        let tracker = Arc::new(Tracker::new(
            &paths,
            format.block_size,
            journal.clone(),
            writable,
        )?);
        Ok(Datastore {
            root,
            paths,
            format,
            journal,
            tracker,
            _lock: lock,
            fresh,
        })
    }

    /// Path of a backing file relative to the root, as the journal keeps it.
    pub fn relative(&self, abs: &Path) -> Vec<u8> {
        abs.strip_prefix(&self.root)
            .unwrap_or(abs)
            .as_os_str()
            .as_bytes()
            .to_vec()
    }

    /// Records a namespace operation in the open epoch (call under the gate).
    fn record_op(
        &self,
        kind: OpKind,
        file_id: Option<FileId>,
        path: &[u8],
        target: &[u8],
        size: u64,
    ) -> Result<()> {
        self.tracker.note_op();
        self.journal
            .append_op(&OpRecord {
                kind: kind as i32,
                epoch: self.tracker.current_epoch().0,
                file_id: file_id.map_or(0, |f| f.0),
                path: path.to_vec(),
                target: target.to_vec(),
                size,
                time_ns: now_ns(),
                found_at_mount: false,
            })
            .map(drop)
    }

    /// Starts tracking a regular file just created (or first seen) at
    /// `path` with backing inode `ino` and `size` bytes, all of them dirty.
    pub fn track_file(
        &self,
        ino: u64,
        path: &[u8],
        size: u64,
        reader: File,
    ) -> Result<Arc<TrackedFile>> {
        let id = self.journal.new_file_id()?;
        let source = FileSource {
            reader: Some(reader),
            path: path.to_vec(),
            size,
        };
        let file = self.tracker.track_new(id, source)?;
        self.journal.put_file(
            id,
            &FileRecord {
                path: path.to_vec(),
                backing_ino: ino,
                created_ns: now_ns(),
            },
        )?;
        Ok(file)
    }

    /// Loads every tracked file's bitmap without changing anything (for
    /// inspection while no daemon runs).
    pub fn load_for_inspection(&self) -> Result<()> {
        for (id, rec) in self.journal.files()? {
            let source = FileSource {
                reader: None,
                path: rec.path,
                size: 0,
            };
            self.tracker.load(id, source)?;
        }
        Ok(())
    }

    /// The daemon's start: reconciles the journal with the backing tree,
    /// loads every bitmap, and closes the epoch a crash left open.
    pub fn start(&self) -> Result<ScanReport> {
        let clean = self.paths.clean_marker();
        let was_clean = clean.exists() || self.fresh;
        if clean.exists() {
            fs::remove_file(&clean).at(&clean)?;
        }
        let report = self.reconcile()?;
        if !was_clean {
            let files = self.tracker.all_files();
            let dirty: Vec<u64> = files
                .iter()
                .map(|f| f.dirty_extents().iter().map(|r| r.end - r.start).sum())
                .collect();
            log::warn!(
                "the previous run did not stop cleanly (crash or kill -9): resuming from the bitmaps, \
                 no full resync: {} blocks in {} files are marked (written since the last shipped point, \
                 or in flight at the crash) and will be shipped again",
                dirty.iter().sum::<u64>(),
                dirty.iter().filter(|&&n| n > 0).count()
            );
        }
        self.tracker.cut()?;
        self.journal.flush()?;
        Ok(report)
    }

    /// The daemon's clean stop: flushes everything and leaves the marker.
    pub fn shutdown(&self) -> Result<()> {
        self.tracker.sync_all()?;
        self.journal.flush()?;
        write_durably(&self.paths.clean_marker(), b"clean\n")
    }

    fn reconcile(&self) -> Result<ScanReport> {
        let mut found: HashMap<u64, (Vec<u8>, u64)> = HashMap::new();
        walk_files(&self.root, &mut |rel, meta| {
            found.entry(meta.ino()).or_insert((rel, meta.len()));
        })?;
        let mut report = ScanReport::default();
        let bs = self.format.block_size.bytes();
        for (id, mut record) in self.journal.files()? {
            match found.remove(&record.backing_ino) {
                Some((path, size)) => {
                    if path != record.path {
                        self.found_op(OpKind::Rename, Some(id), &record.path, &path)?;
                        record.path = path.clone();
                        self.journal.put_file(id, &record)?;
                        report.moved += 1;
                    }
                    let source = FileSource {
                        reader: Some(self.open_reader(&path)?),
                        path: path.clone(),
                        size,
                    };
                    let (_, problem) = self.tracker.load(id, source)?;
                    if let Some(problem) = problem {
                        log::warn!(
                            "{}: {problem}; treating all of it as dirty",
                            String::from_utf8_lossy(&record.path)
                        );
                        report.bitmaps_rebuilt += 1;
                    }
                    report.tracked += 1;
                }
                None => {
                    self.found_op(OpKind::Unlink, Some(id), &record.path, b"")?;
                    self.journal.remove_file(id)?;
                    self.tracker.forget(id);
                    report.gone += 1;
                }
            }
        }
        for (ino, (path, size)) in found {
            let file = self.track_file(ino, &path, size, self.open_reader(&path)?)?;
            self.found_op(OpKind::Create, Some(file.id), &path, b"")?;
            report.untracked_blocks += size.div_ceil(bs);
            report.untracked += 1;
            report.tracked += 1;
        }
        self.remove_orphan_bitmaps()?;
        if report.untracked > 0 {
            let why = if self.fresh {
                "the state folder is new"
            } else {
                "they changed while hbrfs was not running, or their state was lost"
            };
            log::warn!(
                "{} file(s) without tracking state ({why}): all {} of their blocks are dirty and will be replicated in full",
                report.untracked,
                report.untracked_blocks
            );
        }
        Ok(report)
    }

    /// Removes bitmaps whose file id the journal no longer knows (a crash
    /// between creating a bitmap and recording its file).
    fn remove_orphan_bitmaps(&self) -> Result<()> {
        let dir = self.paths.bitmaps();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .map(FileId);
            if id.is_none_or(|id| self.tracker.file(id).is_none()) {
                log::info!("removing orphan bitmap {}", path.display());
                fs::remove_file(&path).at(&path)?;
            }
        }
        Ok(())
    }

    fn open_reader(&self, rel: &[u8]) -> Result<File> {
        let path = self.root.join(std::ffi::OsStr::from_bytes(rel));
        File::open(&path).at(path)
    }

    fn found_op(&self, kind: OpKind, id: Option<FileId>, path: &[u8], target: &[u8]) -> Result<()> {
        self.tracker.note_op();
        self.journal
            .append_op(&OpRecord {
                kind: kind as i32,
                epoch: self.tracker.current_epoch().0,
                file_id: id.map_or(0, |f| f.0),
                path: path.to_vec(),
                target: target.to_vec(),
                size: 0,
                time_ns: now_ns(),
                found_at_mount: true,
            })
            .map(drop)
    }
}

/// The datastore keeps what the mount changes: namespace changes go to the
/// journal in the open epoch, files are tracked by the tracker, and both
/// follow renames and removals.
impl ChangeRecorder for Datastore {
    fn gate(&self) -> Gate<'_> {
        self.tracker.gate()
    }

    fn track(&self, file: NewFile<'_>) -> Result<Tracked> {
        let tracked = self.track_file(file.ino, file.path, file.size, file.reader)?;
        Ok(tracked)
    }

    fn tracked(&self, ino: u64) -> Result<Option<Tracked>> {
        Ok(self
            .journal
            .file_by_ino(ino)?
            .and_then(|id| self.tracker.file(id))
            .map(|f| f as Tracked))
    }

    fn record(&self, change: &Change<'_>) -> Result<()> {
        match *change {
            Change::Created { file, path } => {
                self.record_op(OpKind::Create, Some(file), path, b"", 0)
            }
            Change::Node { path } => self.record_op(OpKind::Create, None, path, b"", 0),
            Change::Mkdir { path } => self.record_op(OpKind::Mkdir, None, path, b"", 0),
            Change::Rmdir { path } => self.record_op(OpKind::Rmdir, None, path, b"", 0),
            Change::Symlink { path, target } => {
                self.record_op(OpKind::Symlink, None, path, target, 0)
            }
            Change::Truncated { file, path, size } => {
                self.record_op(OpKind::Truncate, file, path, b"", size)
            }
            Change::Linked { file, from, to } => self.record_op(OpKind::Link, file, from, to, 0),
            Change::Unlinked { path, file } => {
                let mut failed = Failures::default();
                let id = self.name_gone(file, &mut failed);
                failed.keep(self.record_op(OpKind::Unlink, id, path, b"", 0));
                failed.result()
            }
            Change::Renamed {
                from,
                to,
                flags,
                ino,
                replaced,
            } => {
                let mut failed = Failures::default();
                self.name_gone(replaced, &mut failed);
                let id = failed.keep(self.journal.file_by_ino(ino)).flatten();
                let size = u64::from(flags);
                failed.keep(self.record_op(OpKind::Rename, id, from, to, size));
                let exchange = flags & libc::RENAME_EXCHANGE != 0;
                self.repath(from, to, exchange, &mut failed);
                failed.result()
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.journal.flush()
    }
}

/// The failures of the steps of one recorded change: every step runs, the
/// first failure is what the change returns.
#[derive(Debug, Default)]
struct Failures(Option<Error>);

impl Failures {
    /// `res`'s value, or `None` with its error kept.
    fn keep<T>(&mut self, res: Result<T>) -> Option<T> {
        res.map_err(|e| {
            self.0.get_or_insert(e);
        })
        .ok()
    }

    fn result(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Datastore {
    /// A name of a tracked regular file went away: returns its id (for the
    /// record), and when no name is left, forgets the file.
    fn name_gone(&self, gone: Option<Gone>, failed: &mut Failures) -> Option<FileId> {
        let gone = gone?;
        let id = failed.keep(self.journal.file_by_ino(gone.ino)).flatten()?;
        if gone.last_link {
            failed.keep(self.journal.remove_file(id));
            self.tracker.forget(id);
        }
        Some(id)
    }

    /// Updates the paths of tracked files at or below `from` (and, for an
    /// exchange, below `to`) after a rename. Reads every file record, so
    /// its cost follows the number of tracked files.
    /// Costs the files below the renamed path (the journal's path index),
    /// not every file of the datastore. Both sides of an exchange are
    /// looked up before any record moves.
    fn repath(&self, from: &[u8], to: &[u8], exchange: bool, failed: &mut Failures) {
        let Some(mut files) = failed.keep(self.journal.files_under(from)) else {
            return;
        };
        if exchange {
            let Some(others) = failed.keep(self.journal.files_under(to)) else {
                return;
            };
            files.extend(others);
            files.sort_by_key(|(id, _)| *id);
            files.dedup_by_key(|(id, _)| *id);
        }
        let moved = |path: &[u8], a: &[u8], b: &[u8]| -> Option<Vec<u8>> {
            let rest = path.strip_prefix(a)?;
            (rest.is_empty() || rest[0] == b'/').then(|| [b, rest].concat())
        };
        for (id, mut rec) in files {
            let new = moved(&rec.path, from, to)
                .or_else(|| exchange.then(|| moved(&rec.path, to, from)).flatten());
            if let Some(new) = new {
                if let Some(t) = self.tracker.file(id) {
                    t.renamed(new.clone());
                }
                rec.path = new;
                failed.keep(self.journal.put_file(id, &rec));
            }
        }
    }
}

/// What the mount-time scan found.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanReport {
    /// Files tracked after the scan.
    pub tracked: u64,
    /// Files found without state (new id, fully dirty).
    pub untracked: u64,
    /// Blocks those files hold.
    pub untracked_blocks: u64,
    /// Known files found under another path.
    pub moved: u64,
    /// Known files no longer there.
    pub gone: u64,
    /// Bitmaps that were missing or unreadable.
    pub bitmaps_rebuilt: u64,
}

fn read_format(paths: &StatePaths) -> Result<Format> {
    let path = paths.format();
    let text = fs::read_to_string(&path).at(&path)?;
    Format::parse(&path, &text)
}

fn take_lock(paths: &StatePaths) -> Result<File> {
    let path = paths.lock();
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .at(&path)?;
    if !sys::try_lock_exclusive(lock.as_fd()).at(&path)? {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::Usage(format!(
            "{}: datastore is in use by another hbrfs process (pid {}); stop it first",
            paths.dir.display(),
            holder.trim()
        )));
    }
    lock.set_len(0).at(&path)?;
    writeln!(lock, "{}", std::process::id()).at(&path)?;
    Ok(lock)
}

/// Opens the journal; when it cannot be opened by the daemon, moves it and
/// the bitmaps aside and starts over with everything dirty, saying so.
fn open_journal(paths: &StatePaths, writable: bool) -> Result<Journal> {
    let path = paths.journal();
    match Journal::open(&path) {
        Ok(j) => Ok(j),
        Err(e) if writable => {
            let stamp = now_ns() / 1_000_000_000;
            let aside = paths.broken("journal", stamp);
            let maps_aside = paths.broken("bitmaps", stamp);
            fs::rename(&path, &aside).at(&path)?;
            fs::rename(paths.bitmaps(), &maps_aside).at(paths.bitmaps())?;
            fs::create_dir_all(paths.bitmaps()).at(paths.bitmaps())?;
            log::error!(
                "the journal could not be opened ({e}); it was moved to {} and the bitmaps to {}. \
                 Starting a new journal: every file will be treated as entirely dirty (full resync).",
                aside.display(),
                maps_aside.display()
            );
            eprintln!(
                "hbrfs: journal {} is unusable ({e}); moved aside to {}; every file is now treated as dirty",
                path.display(),
                aside.display()
            );
            Journal::open(&path)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_line_round_trips_and_rejects_newer_versions() {
        let f = Format {
            block_size: BlockSize::DEFAULT,
            id: "abc".into(),
        };
        let p = Path::new("format");
        assert_eq!(Format::parse(p, &f.line()).unwrap(), f);
        let err = Format::parse(p, "hbrfs-datastore v9 block_size=65536 id=x").unwrap_err();
        assert!(err.to_string().contains("newer hbrfs"), "{err}");
        let err = Format::parse(p, "hbrfs-datastore v1 block_size=3 id=x").unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
    }

    #[test]
    fn recorded_rename_moves_tracked_paths_and_unlinking_the_last_name_forgets_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        let img = dir.path().join("a/img");
        fs::write(&img, b"x").unwrap();
        let ino = fs::metadata(&img).unwrap().ino();
        let dir_ino = fs::metadata(dir.path().join("a")).unwrap().ino();
        let ds = Datastore::open(dir.path(), Access::Daemon { block_size: None }).unwrap();
        ds.start().unwrap();
        let id = ds.tracked(ino).unwrap().expect("found by the scan").id();

        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let rename = Change::Renamed {
            from: b"a",
            to: b"b",
            flags: 0,
            ino: dir_ino,
            replaced: None,
        };
        ds.record(&rename).unwrap();
        assert_eq!(ds.journal.file(id).unwrap().unwrap().path, b"b/img");

        let gone = Some(Gone {
            ino,
            last_link: true,
        });
        ds.record(&Change::Unlinked {
            path: b"b/img",
            file: gone,
        })
        .unwrap();
        assert!(ds.tracked(ino).unwrap().is_none());
        assert!(ds.journal.file(id).unwrap().is_none());
        let ops: Vec<_> = ds
            .journal
            .ops()
            .unwrap()
            .into_iter()
            .map(|(_, op)| op)
            .collect();
        let last = &ops[ops.len() - 2..];
        assert_eq!(last[0].kind, OpKind::Rename as i32);
        assert_eq!(
            (&last[0].path[..], &last[0].target[..]),
            (&b"a"[..], &b"b"[..])
        );
        assert_eq!(last[1].kind, OpKind::Unlink as i32);
        assert_eq!(last[1].file_id, id.0);
    }
}
