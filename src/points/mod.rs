//! Recovery points on the secondary: every applied point stays readable
//! until the retention grid lets it go.
//!
//! The live replica is always the newest point. Each older retained point
//! P keeps, in its folder, the **undo** that composes it from the next
//! retained point: the old content of every block the next point's apply
//! overwrote, punched or truncated away (`undo`), and hard links to the
//! files that apply removed (so removing a file costs a link, not a copy).
//! A point's content is therefore, block by block, the first undo record
//! found walking from P towards the newest point, else the file's content
//! now (live, or kept by a removal). Each point also keeps its namespace as
//! it was right after its apply (`namespace`). Undo records are keyed by
//! the replica's inode numbers, which a file keeps across renames.
//!
//! # On disk (`REPLICA/.hbrfs/points/`)
//!
//! - `catalog`: the retained points, oldest first (`proto/points.proto`),
//!   rewritten whole and durably; the only truth of which points exist.
//! - `lock`: `flock`ed exclusively while an apply or a thinning changes
//!   the replica or the undo, shared by every read of a point view (views
//!   may run in other processes: `hbrfs mount-point`).
//! - `E<epoch>/namespace`: the point's namespace.
//! - `E<epoch>/undo-<G>.idx`, `undo-<G>.data`, `files-<G>/<ino>`: its undo
//!   at generation G (see `undo` for the record format).
//! - `E<epoch>/pin`: `flock`ed shared by each view of the point, so that
//!   retention leaves it (and its undo) alone while it is mounted.
//!
//! # Order of writes (crash safety)
//!
//! An apply appends undo for each batch of blocks and syncs it before it
//! overwrites them, so a replayed apply (after a crash) finds the old
//! content saved and never saves new content as old. The new point's folder
//! and then the catalog are written after the apply, before `applied`.
//! A thinning writes the merged undo as the next generation, then the
//! catalog, then removes what the catalog no longer names; opening removes
//! any folder or generation the catalog does not name.
//!
//! # Layout
//!
//! - `store`: the catalog, the lock, pins, and what an apply calls.
//! - `undo`: the undo writer an apply saves through, and undo indexes.
//! - `namespace`: a point's namespace, walked after its apply.
//! - `retention`: the `--keep` grid, expiry and thinning.
//! - `view`: a point composed lazily, for mounts and exports.
//! - `export`: one image of a point as a qcow2, in full or as the change
//!   since an older point (read from the undo keys).
//! - `rollback`: turns the live replica back into an older point.

#![warn(missing_docs)]

pub mod export;
pub mod namespace;
pub mod retention;
pub mod rollback;
pub mod store;
pub mod undo;
pub mod view;

#[cfg(test)]
mod tests;

pub use export::{ExportRequest, Exported, export};
pub use retention::Retention;
pub use rollback::{RolledBack, rollback_to, undo_in_flight};
pub use store::{PointKeeper, PointsPaths, drop_kept, find_point, point_name, read_catalog};
pub use view::PointView;
