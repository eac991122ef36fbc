//! One typed answer per control request, and how each is computed from an
//! open datastore. The daemon serialises these onto the socket and the
//! CLI deserialises the same types, so a field cannot be renamed on one
//! side only. Field names are the JSON keys `hbrfs ... --json` prints.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::datastore::Datastore;
use crate::error::{Error, Result};
use crate::journal::{epoch_state_name, op_name};
use crate::replicate::{ReplStats, ReplicationReport};
use crate::state;
use crate::tracking::{CutOutcome, TrackedFile};

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Blocks dirty in `file` now, open and closed epochs together.
fn dirty_blocks(file: &TrackedFile) -> u64 {
    file.dirty_extents().iter().map(|r| r.end - r.start).sum()
}

/// The backing directory's root, opened once per answer, not once per
/// file (10,000 opens and closes for a `journal ls` of 10,000 files).
fn backing_root(ds: &Datastore) -> Option<OwnedFd> {
    state::open_root(&ds.root).ok()
}

/// The size of a journal path below `root`, 0 when it is gone (looked up
/// by descriptors: the root joined to it may exceed PATH_MAX).
fn backing_size(root: Option<&OwnedFd>, path: &[u8]) -> u64 {
    root.and_then(|root| state::stat_beneath(root.as_fd(), path).ok())
        .map_or(0, |st| st.st_size as u64)
}

/// `journal ls`: every tracked file, so a user sees what will ship.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    /// One row per tracked file, in file-id order.
    pub files: Vec<FileRow>,
}

/// One tracked file's dirty counts and write counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRow {
    /// Path relative to the datastore root.
    pub path: String,
    /// The stable file id the journal gave it.
    pub id: u64,
    /// Its size in the backing directory (0 when gone).
    pub size: u64,
    /// Blocks waiting to ship.
    pub dirty_blocks: u64,
    /// The same in bytes (blocks times block size).
    pub dirty_bytes: u64,
    /// Bytes written through the mount since tracking began.
    pub bytes_written: u64,
    /// Unix nanoseconds of the last write, 0 for none.
    pub last_write_ns: u64,
}

impl Files {
    /// Reads the journal's files and the tracker's counts.
    pub fn of(ds: &Datastore) -> Result<Self> {
        let bs = ds.format.block_size.bytes();
        let mut files = Vec::new();
        let root = backing_root(ds);
        for (id, rec) in ds.journal.files()? {
            // The daemon knows a live file's size: no path walk per file
            // (10,000 of them cost the daemon ~170 ms here).
            let (dirty, counters, live) = match ds.tracker.file(id) {
                Some(f) => (dirty_blocks(&f), f.counters(), f.live_size()),
                None => (0, Default::default(), None),
            };
            files.push(FileRow {
                path: lossy(&rec.path),
                id: id.0,
                size: live.unwrap_or_else(|| backing_size(root.as_ref(), &rec.path)),
                dirty_blocks: dirty,
                dirty_bytes: dirty * bs,
                bytes_written: counters.bytes_written,
                last_write_ns: counters.last_write_ns,
            });
        }
        Ok(Self { files })
    }
}

/// `journal show PATH`: one file's dirty blocks merged into extents, so a
/// user can see exactly which ranges the next point carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extents {
    /// Path relative to the datastore root.
    pub path: String,
    /// The stable file id.
    pub id: u64,
    /// The datastore's tracking granularity in bytes.
    pub block_size: u64,
    /// Its size in the backing directory (0 when gone).
    pub size: u64,
    /// The dirty extents, in block order.
    pub extents: Vec<Extent>,
}

/// A run of consecutive dirty blocks, in blocks and in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// The first dirty block.
    pub first_block: u64,
    /// How many blocks the run holds.
    pub blocks: u64,
    /// `first_block` in bytes.
    pub offset: u64,
    /// `blocks` in bytes.
    pub length: u64,
}

impl Extents {
    /// Finds `path` (relative to the datastore root) among the tracked files.
    pub fn of(ds: &Datastore, path: &str) -> Result<Self> {
        let bs = ds.format.block_size.bytes();
        let wanted = path.trim_start_matches("./").trim_matches('/').as_bytes();
        let (id, rec) = ds
            .journal
            .files()?
            .into_iter()
            .find(|(_, r)| r.path == wanted)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{path}: not a tracked file of {}",
                    ds.root.display()
                ))
            })?;
        let extents = ds
            .tracker
            .file(id)
            .map(|f| f.dirty_extents())
            .unwrap_or_default()
            .into_iter()
            .map(|r| Extent {
                first_block: r.start,
                blocks: r.end - r.start,
                offset: r.start * bs,
                length: (r.end - r.start) * bs,
            })
            .collect();
        Ok(Self {
            path: lossy(&rec.path),
            id: id.0,
            block_size: bs,
            size: backing_size(backing_root(ds).as_ref(), &rec.path),
            extents,
        })
    }
}

/// `journal epochs`: the epochs the journal still holds, to see what is
/// open, waiting, merged or shipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    /// One row per epoch, oldest first.
    pub epochs: Vec<EpochRow>,
}

/// One epoch's state and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRow {
    /// The epoch number.
    pub epoch: u64,
    /// open, closed, merged, shipped (the journal's names).
    pub state: String,
    /// Unix nanoseconds it was opened.
    pub opened_ns: u64,
    /// Unix nanoseconds it was cut; none while open.
    pub closed_ns: Option<u64>,
    /// Files dirty in it when it was cut.
    pub files: u64,
    /// Blocks dirty in it when it was cut.
    pub blocks: u64,
    /// For a merged epoch: the closed epoch that carries its blocks.
    pub merged_into: Option<u64>,
}

impl Epochs {
    /// Reads the journal's epoch records.
    pub fn of(ds: &Datastore) -> Result<Self> {
        let epochs = ds
            .journal
            .epochs()?
            .into_iter()
            .map(|(e, r)| EpochRow {
                epoch: e.0,
                state: epoch_state_name(r.state()).into(),
                opened_ns: r.opened_ns,
                closed_ns: (r.closed_ns != 0).then_some(r.closed_ns),
                files: r.files,
                blocks: r.blocks,
                merged_into: (r.merged_into != 0).then_some(r.merged_into),
            })
            .collect();
        Ok(Self { epochs })
    }
}

/// `journal ops`: the namespace operations in order, as they will be
/// replayed at the secondary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    /// One row per operation, in sequence order.
    pub ops: Vec<OpRow>,
}

/// One namespace operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRow {
    /// Its sequence number in the journal.
    pub seq: u64,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// create, rename, unlink, ... (the journal's names).
    pub op: String,
    /// The tracked file, none for directories and symlinks.
    pub file_id: Option<u64>,
    /// The path it acted on.
    pub path: String,
    /// Rename destination, symlink target or link name, when it has one.
    pub target: Option<String>,
    /// New size, for truncate.
    pub size: u64,
    /// Unix nanoseconds it happened (or was found).
    pub time_ns: u64,
    /// Found by the mount-time scan rather than seen happening.
    pub found_at_mount: bool,
}

impl Ops {
    /// Reads the journal's operations.
    pub fn of(ds: &Datastore) -> Result<Self> {
        let ops = ds
            .journal
            .ops()?
            .into_iter()
            .map(|(seq, op)| OpRow {
                seq,
                epoch: op.epoch,
                op: op_name(op.kind()).into(),
                file_id: (op.file_id != 0).then_some(op.file_id),
                path: lossy(&op.path),
                target: (!op.target.is_empty()).then(|| lossy(&op.target)),
                size: op.size,
                time_ns: op.time_ns,
                found_at_mount: op.found_at_mount,
            })
            .collect();
        Ok(Self { ops })
    }
}

/// `journal stats`: tracking totals, the first thing to look at when a
/// datastore seems slow or behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Tracking granularity in bytes.
    pub block_size: u64,
    /// Tracked files.
    pub files: u64,
    /// Blocks waiting to ship, all files.
    pub dirty_blocks: u64,
    /// The same in bytes.
    pub dirty_bytes: u64,
    /// Bytes written through the mount, all files.
    pub bytes_written: u64,
    /// The open epoch.
    pub current_epoch: u64,
    /// Namespace operations in the journal.
    pub ops: u64,
    /// Cuts since the daemon started.
    pub cuts: u64,
    /// 99th percentile of how long a cut held writes, in nanoseconds.
    pub cut_stall_p99_ns: u64,
    /// The longest a cut held writes, in nanoseconds.
    pub cut_stall_max_ns: u64,
    /// Whether the answer came from a running daemon (else: offline read).
    pub daemon_running: bool,
}

impl Stats {
    /// Sums the tracker's files and reads the cut statistics.
    pub fn of(ds: &Datastore, daemon_running: bool) -> Self {
        let bs = ds.format.block_size.bytes();
        let files = ds.tracker.all_files();
        let dirty = ds.tracker.dirty_blocks();
        let (cuts, p99, max) = ds.tracker.cut_stalls();
        Self {
            block_size: bs,
            files: files.len() as u64,
            dirty_blocks: dirty,
            dirty_bytes: dirty * bs,
            bytes_written: files.iter().map(|f| f.counters().bytes_written).sum(),
            current_epoch: ds.tracker.current_epoch().0,
            ops: ds.journal.op_count() as u64,
            cuts: cuts as u64,
            cut_stall_p99_ns: p99,
            cut_stall_max_ns: max,
            daemon_running,
        }
    }
}

/// Which side of a pair answered `hbrfs status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The datastore that is written and replicated from.
    Primary,
    /// The replica that receives points.
    Secondary,
}

/// `status` of a primary: the tracking totals plus the replicator's
/// counters, so one command says how far behind the replica is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The tracking totals (flattened: the same keys as `journal stats`).
    #[serde(flatten)]
    pub stats: Stats,
    /// Always [`Role::Primary`] here.
    pub role: Role,
    /// The replicator's counters, none when the daemon does not replicate.
    pub replication: Option<Box<ReplicationReport>>,
}

impl Status {
    /// The totals of `ds` and, when replicating, the counters of `repl`.
    pub fn of(ds: &Datastore, repl: Option<&ReplStats>, daemon_running: bool) -> Self {
        Self {
            stats: Stats::of(ds, daemon_running),
            role: Role::Primary,
            replication: repl.map(|r| Box::new(r.report())),
        }
    }
}

/// `cut`: what closing the open epoch did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Cut {
    /// Nothing was written in the open epoch: it stays open.
    Empty {
        /// The epoch still open.
        open_epoch: u64,
    },
    /// The closed set is being shipped; the open epoch goes on.
    #[serde(rename = "deferred: the closed epoch is being shipped")]
    Deferred,
    /// The epoch was closed as a new set waiting to ship.
    Closed {
        /// The epoch that was closed.
        epoch: u64,
    },
    /// The epoch was folded into the closed epoch still waiting to ship.
    Merged {
        /// The epoch that was cut.
        epoch: u64,
        /// The waiting epoch that absorbed it.
        into: u64,
    },
}

impl Cut {
    /// Cuts now; only a running daemon may, since it owns the epochs.
    pub fn now(ds: &Datastore, daemon_running: bool) -> Result<Self> {
        if !daemon_running {
            return Err(Error::Usage(format!(
                "{}: no hbrfs daemon is running for this datastore; epochs are cut by the daemon",
                ds.root.display()
            )));
        }
        Ok(match ds.tracker.cut()? {
            CutOutcome::Empty => Cut::Empty {
                open_epoch: ds.tracker.current_epoch().0,
            },
            CutOutcome::Deferred => Cut::Deferred,
            CutOutcome::Closed(e) => Cut::Closed { epoch: e.0 },
            CutOutcome::Merged { epoch, into } => Cut::Merged {
                epoch: epoch.0,
                into: into.0,
            },
        })
    }
}
