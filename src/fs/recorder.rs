//! The seam between the FUSE layer and change recording.
//!
//! The passthrough says *what happened* ([`Change`], a file to track, a
//! request to make what was recorded durable); a [`ChangeRecorder`] decides
//! how it is kept (the datastore: its journal and tracker). The FUSE layer
//! knows nothing of the journal. The hot write path does not come through
//! here: it marks the [`Tracked`] file the inode holds (bits in an mmap'd
//! bitmap), so a write costs no journal work.
//!
//! [`Recording`] is how the passthrough holds a recorder: absent for a plain
//! passthrough, and the one place that decides what a failed recording
//! means for the operation (it fails closed: see [`Recording`]).

use std::fmt;
use std::fs::File;
use std::sync::{Arc, RwLockReadGuard};

use super::reply::{Res, state_errno};
use crate::error::{Error, Result};
use crate::ids::FileId;

/// What the write path tells the tracking state of one regular file: the
/// blocks about to change (before the data reaches the backing file) and
/// its size. Implemented by `tracking`'s per-file state, so the FUSE layer,
/// shared by both wings, never names the primary's tracking types.
pub trait TrackedBlocks: Send + Sync + fmt::Debug {
    /// The file's stable id, for the namespace changes that name it.
    fn id(&self) -> FileId;
    /// Marks the blocks of `len` bytes at `offset` dirty, counting
    /// `written` bytes; called with the cut gate held, before the write.
    fn mark(&self, offset: u64, len: u64, written: u64) -> Result<()>;
    /// Marks what a truncate from `old` to `new` bytes discards.
    fn before_truncate(&self, old: u64, new: u64) -> Result<()>;
    /// The file now ends at least at `end` (after a write).
    fn extended_to(&self, end: u64);
    /// The file's size was set to `size` (truncate).
    fn resized(&self, size: u64);
    /// Makes the dirty marks durable: part of `fsync` of the file.
    fn sync(&self) -> Result<()>;
}

/// The tracking state an inode holds.
pub type Tracked = Arc<dyn TrackedBlocks>;

/// The cut gate, held shared for the length of one change so that an epoch
/// cut never falls inside it.
pub type Gate<'a> = RwLockReadGuard<'a, ()>;

/// A regular file to start tracking, all of it dirty: just created, or seen
/// for the first time (it appeared behind hbrfs's back).
#[derive(Debug)]
pub struct NewFile<'a> {
    /// Its backing inode number.
    pub ino: u64,
    /// Its path relative to the root.
    pub path: &'a [u8],
    /// Its size now.
    pub size: u64,
    /// An open reader, for pre-images of blocks rewritten while shipping.
    pub reader: File,
}

/// A name of a regular file that went away (unlinked, or replaced by a
/// rename): the recorder forgets the file when it was its last link.
#[derive(Clone, Copy, Debug)]
pub struct Gone {
    /// The file's backing inode number.
    pub ino: u64,
    /// No other name is left.
    pub last_link: bool,
}

/// A namespace change the passthrough made in the backing directory; paths
/// are relative to the root.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// A regular file was created and is tracked as `file`.
    Created {
        /// Its id, from [`ChangeRecorder::track`].
        file: FileId,
        /// Where.
        path: &'a [u8],
    },
    /// A device, fifo or socket was made.
    Node {
        /// Where.
        path: &'a [u8],
        /// Its `st_mode` (type and permission bits).
        mode: u32,
        /// Its device number (devices only).
        rdev: u32,
    },
    /// The mode, owner, times or extended attributes of a node were set
    /// (chmod, chown, utimens, setxattr, removexattr): its metadata ships
    /// with the point.
    Meta {
        /// The file, if tracked.
        file: Option<FileId>,
        /// Where, for a node that is not a tracked file (a tracked file's
        /// names are the journal's, as for `Truncated`).
        path: Option<&'a [u8]>,
    },
    /// A directory was made.
    Mkdir {
        /// Where.
        path: &'a [u8],
    },
    /// A directory was removed.
    Rmdir {
        /// Where.
        path: &'a [u8],
    },
    /// A symbolic link was made.
    Symlink {
        /// Where.
        path: &'a [u8],
        /// What it points to.
        target: &'a [u8],
    },
    /// A file's size was set.
    Truncated {
        /// The file, if tracked.
        file: Option<FileId>,
        /// Where, for a file that is not tracked; a tracked file's names
        /// are the journal's (the node may have been reached by a name
        /// removed since).
        path: Option<&'a [u8]>,
        /// Its new size.
        size: u64,
    },
    /// A name other than a directory was removed.
    Unlinked {
        /// Where.
        path: &'a [u8],
        /// The regular file it named (`None` for other kinds).
        file: Option<Gone>,
    },
    /// A name was moved (`renameat2`).
    Renamed {
        /// The old name.
        from: &'a [u8],
        /// The new name.
        to: &'a [u8],
        /// The `renameat2` flags (`RENAME_EXCHANGE` swaps the two).
        flags: u32,
        /// Backing inode number of what moved.
        ino: u64,
        /// The regular file the new name named before, if it went away.
        replaced: Option<Gone>,
    },
    /// A hard link was made.
    Linked {
        /// The file, if tracked.
        file: Option<FileId>,
        /// An existing name of it, for a file that is not tracked (a
        /// tracked file's names are the journal's).
        from: Option<&'a [u8]>,
        /// The new name.
        to: &'a [u8],
    },
}

impl Change<'_> {
    /// The path a log line about this change names.
    fn path(&self) -> &[u8] {
        match *self {
            Change::Created { path, .. }
            | Change::Node { path, .. }
            | Change::Mkdir { path }
            | Change::Rmdir { path }
            | Change::Symlink { path, .. }
            | Change::Unlinked { path, .. } => path,
            Change::Renamed { from, .. } => from,
            Change::Linked { to, .. } => to,
            Change::Truncated { path, .. } | Change::Meta { path, .. } => path.unwrap_or_default(),
        }
    }
}

impl fmt::Display for Change<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Change::Created { .. } => "create",
            Change::Node { .. } => "mknod",
            Change::Meta { .. } => "set metadata of",
            Change::Mkdir { .. } => "mkdir",
            Change::Rmdir { .. } => "rmdir",
            Change::Symlink { .. } => "symlink",
            Change::Truncated { .. } => "truncate",
            Change::Unlinked { .. } => "unlink",
            Change::Renamed { .. } => "rename",
            Change::Linked { .. } => "link",
        };
        write!(f, "{kind} {}", String::from_utf8_lossy(self.path()))
    }
}

/// Keeps the changes made through the mount, so they can be replicated.
/// Every method is called with the cut gate held (from [`gate`]), except
/// `gate` itself and `flush`.
///
/// [`gate`]: ChangeRecorder::gate
pub trait ChangeRecorder: Send + Sync + fmt::Debug {
    /// Holds the cut gate shared for one change.
    fn gate(&self) -> Gate<'_>;

    /// Starts tracking a regular file, all of it dirty; the returned state
    /// is what its writes mark.
    fn track(&self, file: NewFile<'_>) -> Result<Tracked>;

    /// The tracking state of the regular file with backing inode `ino`, if
    /// it has one.
    fn tracked(&self, ino: u64) -> Result<Option<Tracked>>;

    /// Records a namespace change in the open epoch (and follows it: a file
    /// whose last name went is forgotten, a rename moves tracked paths).
    fn record(&self, change: &Change<'_>) -> Result<()>;

    /// Makes everything recorded so far durable (fsync, and a new file
    /// before its first write is acknowledged).
    fn flush(&self) -> Result<()>;

    /// `change` happened on the backing directory but [`record`] failed
    /// with `error`: the recorder must see to it that no point ships
    /// without it (the datastore holds new cuts until it is reconciled).
    ///
    /// [`record`]: ChangeRecorder::record
    fn unrecorded(&self, change: &Change<'_>, error: &Error);
}

/// The recorder as the passthrough holds it: `None` for a plain passthrough
/// (the benchmark's baseline) and for the mirror.
///
/// This is the one place that decides what a failed recording means, and
/// it fails closed: a write must never land unmarked, a change never go
/// unrecorded in silence.
/// - A file whose tracking state cannot be found or made (ENOSPC in the
///   state folder, a journal error) fails its lookup, open or create with
///   that errno (ENOSPC, else EIO): no node exists without its tracking
///   state, so no write can pass unmarked.
/// - A namespace change that already happened on the backing directory
///   but cannot be recorded fails the operation with EIO (ENOSPC when
///   that is the cause), and the recorder is told
///   ([`ChangeRecorder::unrecorded`]) so that no later point can ship
///   without it: the datastore cuts no new point until a restart's
///   mount-time scan reconciles the journal, and says why in `status`.
#[derive(Clone, Debug, Default)]
pub struct Recording(Option<Arc<dyn ChangeRecorder>>);

impl Recording {
    /// Recording through `recorder`, or none.
    pub fn new(recorder: Option<Arc<dyn ChangeRecorder>>) -> Recording {
        Recording(recorder)
    }

    /// Holds the cut gate for one change, when recording.
    pub fn gate(&self) -> Option<Gate<'_>> {
        self.0.as_ref().map(|r| r.gate())
    }

    /// Records `change`; a failure is the operation's errno, and the
    /// recorder learns the change went unrecorded.
    pub fn record(&self, change: Change<'_>) -> Res<()> {
        let Some(r) = &self.0 else {
            return Ok(());
        };
        r.record(&change).map_err(|e| {
            log::error!("recording {change}: {e}");
            r.unrecorded(&change, &e);
            state_errno(e)
        })
    }

    /// Tracks the empty file just created at `path` with backing inode
    /// `ino` (`None` when not recording; `reader` is opened only when
    /// recording).
    pub fn track_new(
        &self,
        ino: u64,
        path: &[u8],
        reader: impl FnOnce() -> Result<File>,
    ) -> Result<Option<Tracked>> {
        let Some(r) = &self.0 else {
            return Ok(None);
        };
        let reader = reader()?;
        r.track(NewFile {
            ino,
            path,
            size: 0,
            reader,
        })
        .map(Some)
    }

    /// Tracking state of the regular file with backing stat `st`, made
    /// fully dirty if the file has none (it appeared behind hbrfs's back).
    /// `path` and `reader` are asked for only then. A failure is the
    /// errno the lookup fails with: the file gets no node rather than an
    /// untracked one.
    pub fn tracking_for(
        &self,
        st: &libc::stat,
        path: impl FnOnce() -> Result<Vec<u8>>,
        reader: impl FnOnce() -> Result<File>,
    ) -> Res<Option<Tracked>> {
        let Some(r) = self.0.as_ref() else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        let failed = |what: String| {
            move |e: Error| {
                log::error!("{what}: {e}");
                state_errno(e)
            }
        };
        let ino = st.st_ino;
        let found = r.tracked(ino);
        if let Some(found) = found.map_err(failed(format!("journal lookup of inode {ino}")))? {
            return Ok(Some(found));
        }
        let path = path().map_err(failed(format!("the path of inode {ino}")))?;
        let shown = String::from_utf8_lossy(&path).into_owned();
        log::warn!(
            "{shown}: found without tracking state (changed outside hbrfs?): all of it is dirty"
        );
        let tracked = reader().and_then(|reader| {
            r.track(NewFile {
                ino,
                path: &path,
                size: st.st_size as u64,
                reader,
            })
        });
        tracked
            .map(Some)
            .map_err(failed(format!("tracking {shown}")))
    }

    /// Makes what was recorded durable (nothing to do when not recording).
    pub fn flush(&self) -> Result<()> {
        self.0.as_ref().map_or(Ok(()), |r| r.flush())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::{Mutex, RwLock};

    use super::*;

    /// A recorder whose state folder is full: nothing can be tracked or
    /// recorded.
    #[derive(Debug, Default)]
    struct Full {
        gate: RwLock<()>,
        lost: Mutex<Vec<String>>,
    }

    fn no_space() -> Error {
        Error::Io {
            path: ".hbrfs/bitmaps/1.map".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }

    impl ChangeRecorder for Full {
        fn gate(&self) -> Gate<'_> {
            self.gate.read().unwrap()
        }
        fn track(&self, _: NewFile<'_>) -> Result<Tracked> {
            Err(no_space())
        }
        fn tracked(&self, _: u64) -> Result<Option<Tracked>> {
            Ok(None)
        }
        fn record(&self, _: &Change<'_>) -> Result<()> {
            Err(Error::Usage("journal refused".into()))
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn unrecorded(&self, change: &Change<'_>, _: &Error) {
            self.lost.lock().unwrap().push(change.to_string());
        }
    }

    #[test]
    fn tracking_and_recording_fail_closed() {
        let full = Arc::new(Full::default());
        let recording = Recording::new(Some(full.clone()));
        let file = tempfile::NamedTempFile::new().unwrap();
        let st = crate::sys::statat(file.as_file().as_fd(), "".as_ref()).unwrap();
        let reader = || Ok(file.reopen().unwrap());
        let found = recording.tracking_for(&st, || Ok(b"img".to_vec()), reader);
        assert_eq!(found.unwrap_err(), fuser::Errno::ENOSPC);

        let err = recording.record(Change::Mkdir { path: b"d" }).unwrap_err();
        assert_eq!(err, fuser::Errno::EIO);
        assert_eq!(*full.lost.lock().unwrap(), ["mkdir d"]);
    }
}
