//! The error tree: leaf errors carry their source and the thing they are
//! about (a path, a file), so every message names what is wrong.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Errors of the state folder, the journal and the tracking files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An IO error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The state folder or one of its files holds something we do not accept.
    #[error("{path}: {reason}")]
    BadState {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// The sled journal failed.
    #[error("journal {path}: {source}")]
    Journal {
        /// The journal folder.
        path: PathBuf,
        /// What sled said.
        #[source]
        source: sled::Error,
    },
    /// A journal record could not be decoded.
    #[error("journal {path}: corrupt record in tree {tree}: {source}")]
    Record {
        /// The journal folder.
        path: PathBuf,
        /// Which tree held the record.
        tree: &'static str,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
    /// The other side of a replication pair failed, or could not be
    /// reached.
    #[error("{0}")]
    Remote(String),
    /// The target (a secondary, or an object store's series) refused what
    /// was shipped: sending the same again would be refused again. The
    /// message names the target.
    #[error("refused {0}")]
    Refused(String),
    /// The user asked for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),
}

/// What kind of failure an [`Error`] is: what callers match on for control
/// flow (retry, resume, give up, tell the user), so they never inspect
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A local file or device failed: the operation may succeed later, the
    /// state it was about is intact.
    Io,
    /// Local state (state folder, journal, a record) is not what we accept.
    State,
    /// The peer failed or could not be reached: resume later.
    Remote,
    /// The peer refused what was shipped: sending the same again would be
    /// refused again.
    Refused,
    /// The user asked for something that cannot be done as asked.
    Usage,
}

impl ErrorKind {
    /// Every kind, in the order [`ErrorCounts`] lists them.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Io,
        ErrorKind::State,
        ErrorKind::Remote,
        ErrorKind::Refused,
        ErrorKind::Usage,
    ];

    /// The kind's name as status and metrics show it (the `kind` label).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::State => "state",
            ErrorKind::Remote => "remote",
            ErrorKind::Refused => "refused",
            ErrorKind::Usage => "usage",
        }
    }
}

/// Failures counted by kind since the daemon started: bumped where a
/// failure is reported, read by `status` and the metrics endpoint, so a
/// monitor sees failures that recovered before anyone looked.
#[derive(Debug, Default)]
pub struct ErrorCounters([AtomicU64; 5]);

impl ErrorCounters {
    /// Counts one failure of `kind`.
    pub fn count(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind);
        self.0[i.expect("every kind is listed")].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts, as `status` shows them.
    pub fn report(&self) -> ErrorCounts {
        let [io, state, remote, refused, usage] =
            self.0.each_ref().map(|a| a.load(Ordering::Relaxed));
        ErrorCounts {
            io,
            state,
            remote,
            refused,
            usage,
        }
    }
}

/// Failures by [`ErrorKind`] since the daemon started (`errors` in
/// `hbrfs status --json`, `hbrfs_errors_total{kind}` in the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// Local file or device failures.
    pub io: u64,
    /// Local state not accepted.
    pub state: u64,
    /// The peer failed or could not be reached.
    pub remote: u64,
    /// The peer refused what was shipped.
    pub refused: u64,
    /// Asked for something that cannot be done.
    pub usage: u64,
}

impl ErrorCounts {
    /// Each kind with its count, in [`ErrorKind::ALL`]'s order.
    pub fn by_kind(&self) -> [(ErrorKind, u64); 5] {
        let counts = [self.io, self.state, self.remote, self.refused, self.usage];
        std::array::from_fn(|i| (ErrorKind::ALL[i], counts[i]))
    }
}

impl Error {
    /// The system error behind an IO failure (ENOSPC, EIO…), when there
    /// is one: what decides whether space is the cause.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::Journal {
                source: sled::Error::Io(source),
                ..
            } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kind of this error, for control flow.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::BadState { .. } | Error::Journal { .. } | Error::Record { .. } => {
                ErrorKind::State
            }
            Error::Remote(_) => ErrorKind::Remote,
            Error::Refused(_) => ErrorKind::Refused,
            Error::Usage(_) => ErrorKind::Usage,
        }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an `io::Error`.
pub trait IoContext<T> {
    /// Names the path an IO error is about.
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
