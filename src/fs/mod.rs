//! The passthrough filesystem: every operation goes to the backing
//! directory through `O_PATH` descriptors and `*at` calls; writes mark
//! their blocks in `tracking` first, and namespace changes are told to a
//! [`ChangeRecorder`] (the datastore) under the cut gate.
//!
//! Decisions: a caller's `O_DIRECT` reaches the backing file (through an
//! aligned buffer, `aligned`), and such opens get `FOPEN_DIRECT_IO` with
//! parallel direct writes; buffered opens use the kernel's writeback cache,
//! and while one is open SEEK_DATA/SEEK_HOLE answer "no holes" (the kernel
//! does not flush before asking). POSIX/flock locks are left to the kernel
//! (local locks; a datastore has one host).
//!
//! # Layout
//!
//! - `fuse`: the fuser `Filesystem` impl: callbacks that call an op and answer.
//! - [`passthrough`]: the ops (`op_*`) over the backing directory: the `Passthrough` and lookup,
//!   the data path, the namespace ops and the metadata ops, a file each.
//! - [`attr`]: stat → `FileAttr`, file types, time conversions.
//! - [`reply`]: errnos, and answering a request from an op's result.
//! - [`recorder`]: the [`ChangeRecorder`] seam, and what a failed recording means.
//! - [`inodes`], [`handles`]: the inode and handle tables; `aligned`: buffers for `O_DIRECT`.

mod aligned;
pub mod attr;
mod fuse;
pub mod handles;
pub mod inodes;
pub mod passthrough;
pub mod recorder;
pub mod reply;

pub use passthrough::{Cache, MAX_WRITE, Passthrough, negotiate};
pub use recorder::ChangeRecorder;
