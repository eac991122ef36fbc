//! A datastore's state folder (`BACKING/.hbrfs/`): its format line, the
//! lock that keeps one daemon per datastore, and opening the journal and the
//! tracker together — including the mount-time scan that reconciles the
//! journal with what is really in the backing directory.
//!
//! # Layout
//!
//! - this file: [`Datastore::open`], the [`Format`] line, the lock, [`Access`], start and clean stop.
//! - `scan`: the mount-time reconcile, orphan bitmaps, the [`ScanReport`].
//! - `recorder`: the datastore as the mount's `ChangeRecorder` (journal ops, renames, forgetting).

mod recorder;
mod scan;

use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::ids::BlockSize;
use crate::journal::Journal;
use crate::proto::journal::{FileRecord, OpKind};
use crate::state::{STATE_DIR, StatePaths, hex, now_ns, write_durably};
use crate::sys;
use crate::tracking::{FileSource, TrackedFile, Tracker};

pub use scan::ScanReport;

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

    /// Writes the format line of the datastore at `paths`, durably: at
    /// creation, or when `promote` turns a replica into this datastore.
    pub fn write(&self, paths: &StatePaths) -> Result<()> {
        write_durably(&paths.format(), self.line().as_bytes())
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
    /// Why a namespace change made through the mount is missing from the
    /// journal, once one is: no new point may be cut without it (see
    /// [`Datastore::check_recorded`]). Set by the mount's threads, read by
    /// the replicator; held only to copy the message.
    unrecorded: Mutex<Option<String>>,
    /// Whether the state folder was made by this open.
    pub fresh: bool,
    /// The paths whose metadata change the open epoch already recorded:
    /// the kernel sends a setattr for the times of every written-back
    /// file, so one record per path and epoch keeps the journal small.
    meta_noted: recorder::MetaNoted,
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
                crate::state::open_state_dir(&paths.dir)?;
                crate::state::make_state_dirs(&paths.bitmaps())?;
                // The state is the daemon's alone, whatever the umask.
                crate::state::set_private(&paths.dir, crate::state::STATE_DIR_MODE)?;
                let lock = crate::state::take_lock(&paths.dir)?;
                let format = if fresh {
                    let format = Format {
                        block_size: block_size.unwrap_or(BlockSize::DEFAULT),
                        id: random_id()?,
                    };
                    format.write(&paths)?;
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
                crate::state::open_state_dir(&paths.dir)?;
                (read_format(&paths)?, None)
            }
        };
        let writable = lock.is_some();
        let journal = Arc::new(open_journal(&paths, writable)?);
        if writable {
            let pre = paths.preimages();
            crate::state::make_state_dirs(&pre)?;
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
            unrecorded: Mutex::new(None),
            fresh,
            meta_noted: recorder::MetaNoted::default(),
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
                more_names: Vec::new(),
            },
        )?;
        Ok(file)
    }

    /// Records `kind` of `path` in the open epoch for a failback (an
    /// unlink or rmdir of what only the demoted secondary holds, or a
    /// path whose metadata must ship), under the cut gate like any
    /// namespace operation.
    pub fn record_failback_op(&self, kind: OpKind, path: &[u8]) -> Result<()> {
        let _gate = self.tracker.gate();
        self.append_op(recorder::op_record(kind, None, path, b"", 0))
    }

    /// Fails while a namespace change made through the mount went
    /// unrecorded: a point cut now would silently miss it. Only the
    /// mount-time scan of a restart reconciles the journal with the
    /// backing tree, so the error says to restart, and `status` shows it.
    pub fn check_recorded(&self) -> Result<()> {
        match &*self.unrecorded.lock().expect("unrecorded lock") {
            None => Ok(()),
            Some(why) => Err(Error::BadState {
                path: self.paths.journal(),
                reason: format!(
                    "{why}; no new point is cut until the daemon is restarted \
                     (its mount-time scan reconciles the journal with {})",
                    self.root.display()
                ),
            }),
        }
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

    /// Closes the datastore and hands back its daemon lock, so that
    /// `demote` can move the state folder's primary state away while no
    /// daemon can start on it.
    pub fn close_keeping_lock(self) -> Result<Option<File>> {
        self.tracker.sync_all()?;
        self.journal.flush()?;
        Ok(self._lock)
    }

    /// The daemon's clean stop: flushes everything and leaves the marker.
    pub fn shutdown(&self) -> Result<()> {
        self.tracker.sync_all()?;
        self.journal.flush()?;
        write_durably(&self.paths.clean_marker(), b"clean\n")
    }
}

fn read_format(paths: &StatePaths) -> Result<Format> {
    let path = paths.format();
    let text = fs::read_to_string(&path).at(&path)?;
    Format::parse(&path, &text)
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
            crate::state::make_state_dirs(&paths.bitmaps())?;
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
}
