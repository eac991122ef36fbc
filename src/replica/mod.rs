//! The secondary: the gRPC service a primary ships to (`service`), one
//! stream at a time (`session`), on top of the replica folder (`store`).
//!
//! # Layout
//!
//! - `service`: the tonic service; maps the parts' errors to statuses.
//! - `session`: one point being received; refusals are `refused::Refused`.
//! - `preflight`: refuses a point that cannot be applied, before staging.
//! - `resume`: the offers log of a point being received (its offer
//!   manifest, and what a restart resumes from) and what a broken stream
//!   leaves for the next (`Carried`).
//! - `spill`: append-only files of records in staging, read back one at a
//!   time: how a point's lists and offers stay out of memory.
//! - `store`: the replica folder as one object, wiring the parts below.
//! - `apply`: a point applied in place as it arrives, undo first.
//! - `inflight`: the point being applied: begin, commit, or rollback.
//! - `overlay`: what the mirror reads of the point before while a point
//!   that changes only block content is in flight.
//! - `meta`: a point's metadata (modes, owners, xattrs, times) and its
//!   FIFOs, sockets and device nodes, with what this secondary refuses.
//! - `verify`: `hbrfs verify` against the applied point.
//! - `index`: the content index (hints only: every use re-reads and
//!   re-hashes); `seed`: indexes a folder's existing content.
//! - `records`: the pair, applied and redo records and their parsers.
//! - `resync`: a demoted secondary's resync list (written by `roles`'
//!   demote, handed to the new primary, dropped once a point covers it).
//! - `confine`: every received path confined to the replica root.
//!
//! Imports run one way, with no circle: service → {session, store,
//! verify, records, refused}; session → {store, resume, spill, preflight,
//! refused}; verify → {store, confine}; store → {apply, meta, index, seed,
//! records, resume, refused, resync}; resync → {records, spill}; apply → {index, records, resume, spill,
//! confine, meta}; meta → {records, confine}; resume → spill; spill →
//! records; seed → index; refused → preflight; index, preflight → confine.
//! Nothing but the
//! service (and the fuzz tests) imports session.

#![warn(missing_docs)]

pub mod apply;
pub mod confine;
pub mod index;
pub mod inflight;
pub mod meta;
pub mod overlay;
pub mod preflight;
pub mod records;
pub mod refused;
pub mod resume;
pub mod resync;
pub mod seed;
pub mod service;
pub mod session;
pub mod spill;
pub mod store;
pub mod verify;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod object_namespace_tests;

pub use records::{Applied, Pair};
pub use service::{ReplicaService, serve_on};
pub use store::ReplicaStore;
