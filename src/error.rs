//! The error tree: leaf errors carry their source and the thing they are
//! about (a path, a file), so every message names what is wrong.

use std::io;
use std::path::PathBuf;

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
    /// The secondary refused what was shipped: sending the same again
    /// would be refused again.
    #[error("refused by the secondary: {0}")]
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

impl Error {
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
