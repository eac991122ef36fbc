//! Why a Ship stream was refused. A refusal closes the stream with
//! InvalidArgument (the primary tells "refused" from "failed" by that
//! code: a refused point is never sent again as it was) and leaves the
//! replica at its last applied point. Every message names what is wrong,
//! with the file and block where there is one.
//!
//! Five of these are failures, not refusals ([`Refused::is_retryable`]):
//! staging or spilling that failed (a full disk), an apply that failed, one that
//! failed earlier and still fails when retried, and a block worker lost. A failed apply's redo
//! record stays; the stream ends with Unavailable and its cause
//! ([`Refused::cause`]: "no space left on REPLICA"), and the primary keeps
//! the point and ships it again, resuming what was staged.

use std::path::PathBuf;

use super::preflight::PreflightError;
use crate::block::BlockError;
use crate::error::{Error, ErrorKind};
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_OFFERS, MAX_WINDOW_OFFERS};

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A stream before any hello: there is no pair to check against.
    #[error("no primary has said hello to this replica yet")]
    NotPaired,
    /// An apply failed earlier, its redo record waits, and finishing it
    /// failed again (retryable).
    #[error("finishing the earlier apply of epoch {epoch}: {source} (retried on the next stream)")]
    ApplyPending {
        /// The epoch of the redo record.
        epoch: u64,
        /// Why it still fails.
        #[source]
        source: Error,
    },
    /// The staging data file failed.
    #[error("staging {}: {source}", path.display())]
    Staging {
        /// The staging data file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The point's spill files in staging (its lists, its offers) failed:
    /// a failure of this secondary (retryable), like `Staging`.
    #[error("staging the point: {0}")]
    Spill(#[source] Error),
    /// A message without a body.
    #[error("empty ship message")]
    EmptyMessage,
    /// A message after the commit ended the epoch.
    #[error("message after Commit")]
    AfterCommit,
    /// Begin twice.
    #[error("a second Begin in one stream")]
    SecondBegin,
    /// A point id that is not 16 bytes.
    #[error("point id of {0} bytes, expected 16")]
    PointId(usize),
    /// A point based on another point than the applied one.
    #[error("epoch {epoch} is based on epoch {base}, but this replica is at epoch {applied}")]
    WrongBase {
        /// The point's epoch.
        epoch: u64,
        /// The epoch it is based on.
        base: u64,
        /// The replica's applied epoch.
        applied: u64,
    },
    /// A point not newer than the applied one.
    #[error(
        "epoch {epoch} is not newer than the applied epoch {applied} (replayed or out of order)"
    )]
    NotNewer {
        /// The point's epoch.
        epoch: u64,
        /// The replica's applied epoch.
        applied: u64,
    },
    /// A Manifest chunk before Begin or after the chunk that ended the
    /// lists.
    #[error("a Manifest chunk before Begin or after the end of its lists")]
    ManifestOutsideLists,
    /// The lists out of their order: operations, then file states, then
    /// metadata.
    #[error("the Manifest chunks' lists are out of order (operations, files, then metadata)")]
    ListsOutOfOrder,
    /// More operations, files or paths' metadata than [`MAX_ENTRIES`].
    #[error(
        "epoch {epoch} carries {ops} operations, {files} files and {metas} paths' metadata; \
         at most {MAX_ENTRIES} each"
    )]
    TooManyEntries {
        /// The point's epoch.
        epoch: u64,
        /// Its operations.
        ops: usize,
        /// Its files.
        files: usize,
        /// Its paths' metadata.
        metas: usize,
    },
    /// The point cannot be applied on this replica.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The block workers lost a batch (a worker panicked): nothing of it
    /// is staged.
    #[error("decoding blocks: a block worker stopped")]
    Workers,
    /// A file state listed twice.
    #[error("file {0} listed twice")]
    FileTwice(u64),
    /// Offers before Begin and the end of its lists.
    #[error("Offers before Begin and the end of its lists")]
    OffersBeforeBegin,
    /// Offers that would hold more than [`MAX_WINDOW_OFFERS`] offers
    /// awaiting their blocks.
    #[error(
        "Offers of {offers} offers while {awaiting} offers await blocks still to come \
         (at most {MAX_WINDOW_OFFERS} in all)"
    )]
    WindowFull {
        /// Offers in the message.
        offers: usize,
        /// Offers held from the first whose block has not come.
        awaiting: usize,
    },
    /// More offers than [`MAX_OFFERS`] in one message.
    #[error("{0} offers in one message; at most {MAX_OFFERS}")]
    TooManyOffers(usize),
    /// An offer for a file the point does not list.
    #[error("offer for file {0} which is not in the epoch")]
    NotInEpoch(u64),
    /// An offer past the end of its file.
    #[error("offer for block {block} of file {file} beyond its size {size}")]
    BeyondSize {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
        /// The file's size.
        size: u64,
    },
    /// An offer whose length does not follow from the file's size.
    #[error("offer for block {block} of file {file} has length {length}, expected {expected}")]
    WrongLength {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
        /// The length offered.
        length: u32,
        /// The length the file's size gives.
        expected: u32,
    },
    /// The same block offered twice in one point, or an offer out of
    /// order (offers go file by file, blocks ascending, so an offer out of
    /// order may be one made before).
    #[error(
        "block {block} of file {file} offered twice or out of order (file by file, blocks ascending)"
    )]
    OfferedTwice {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
    },
    /// A hash of the wrong length.
    #[error("offer for block {block} of file {file} has a {len}-byte hash")]
    HashLength {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
        /// The hash's length.
        len: usize,
    },
    /// The content index could not be read.
    #[error("reading the content index: {0}")]
    Index(#[source] Error),
    /// More blocks than [`MAX_BLOCKS`] in one message.
    #[error("{0} blocks in one message; at most {MAX_BLOCKS}")]
    TooManyBlocks(usize),
    /// A block that was not wanted.
    #[error("block {block} of file {file} was not asked for")]
    NotAskedFor {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
    },
    /// A block that does not decompress within its bounds.
    #[error("block {block} of file {file}: {source}")]
    Decompress {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
        /// What decompression said.
        #[source]
        source: BlockError,
    },
    /// A block whose content does not match its offer.
    #[error(
        "block {block} of file {file} does not match the hash offered for it (corrupted in transit?)"
    )]
    HashMismatch {
        /// The block.
        block: u64,
        /// The file.
        file: u64,
    },
    /// Commit before Begin.
    #[error("Commit before Begin")]
    CommitBeforeBegin,
    /// A commit for another epoch.
    #[error("Commit for epoch {commit} inside epoch {begin}")]
    CommitEpoch {
        /// The epoch the commit names.
        commit: u64,
        /// The stream's epoch.
        begin: u64,
    },
    /// A commit with wanted blocks still missing.
    #[error("Commit with {0} wanted blocks never sent")]
    CommitMissing(usize),
    /// The apply failed (retryable: its redo record stays, and the next
    /// hello or stream applies it again).
    #[error("applying epoch {epoch}: {source}")]
    Apply {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: Error,
    },
}

impl Refused {
    /// A failure of this secondary, not a refusal of the point: staging
    /// or applying failed (no space, no descriptors, an IO error), so the
    /// same point may be sent again, and resumes where it stopped. A
    /// failed apply's redo record stays and the apply is retried first.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Refused::Apply { .. }
                | Refused::ApplyPending { .. }
                | Refused::Staging { .. }
                | Refused::Spill(_)
                | Refused::Index(_)
                | Refused::Workers
        )
    }

    /// Whether this failure is the replica's file system being full:
    /// then what a broken point wrote is not read back into staging (it
    /// would fill it again), and the primary sends it again.
    pub fn out_of_space(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOSPC | libc::EDQUOT))
    }

    /// The system error behind a failure, when there is one.
    fn errno(&self) -> Option<i32> {
        match self {
            Refused::Staging { source, .. } => source.raw_os_error(),
            Refused::Apply { source, .. }
            | Refused::ApplyPending { source, .. }
            | Refused::Index(source)
            | Refused::Spill(source) => source.errno(),
            _ => None,
        }
    }

    /// What both sides show (the primary prefixes "secondary: "): a full
    /// file system under `replica` says so first, so the user knows what
    /// to free without reading an IO error.
    pub fn cause(&self, replica: &std::path::Path) -> String {
        match self.errno() {
            Some(libc::ENOSPC | libc::EDQUOT) => {
                format!("no space left on {} ({self})", replica.display())
            }
            _ => self.to_string(),
        }
    }

    /// The kind of this failure for the error counters: a failed apply
    /// is its cause's kind, a staging failure is IO, anything else is a
    /// refusal of the point.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Refused::Apply { source, .. }
            | Refused::ApplyPending { source, .. }
            | Refused::Spill(source) => source.kind(),
            Refused::Staging { .. } | Refused::Workers => ErrorKind::Io,
            Refused::Index(source) => source.kind(),
            _ => ErrorKind::Refused,
        }
    }

    /// The staging data file at `path` failed.
    pub fn staging(path: &std::path::Path, source: std::io::Error) -> Refused {
        Refused::Staging {
            path: path.to_path_buf(),
            source,
        }
    }
}
