//! hbrfs: host-based replication for virtual-disk images.
//!
//! A passthrough FUSE mount over a backing directory notices every write,
//! records it crash-safely, and (in later parts) ships crash-consistent
//! points to a secondary site.
//!
//! # Layout
//!
//! - [`fs`]: the fuser `Filesystem`: passthrough of every operation images need; tells a `ChangeRecorder` what changed.
//! - [`tracking`]: per-file dirty bitmaps (memmap2), epochs, the cut gate, the closed set and its pre-images.
//! - [`journal`]: the sled database: file ids, namespace operations, epochs.
//! - [`datastore`]: the state folder: format, lock, opening tracking and journal together, the mount-time scan, and recording the mount's changes.
//! - [`daemon`]: the long-running commands: the primary (`mount`), the secondary (`serve`, `mount-replica`), `up`; mounts and signals.
//! - [`control`]: the daemon's control socket: one request enum, one typed answer per request.
//! - [`auth`]: the pre-shared key and the per-request tokens peers authenticate with.
//! - [`tls`]: the channel's TLS, with certificates from an authority derived from that key.
//! - [`block`]: keyed xxh3-128 block hashes, zero detection, bounded zstd.
//! - [`replicate`]: the primary's replicator: a point's life (cut, pending, shipping, applied), offers, wanted blocks, verify, stats.
//! - [`replica`]: the secondary: gRPC service, staging, atomic apply, content index.
//! - [`mirror`]: the secondary's read-only FUSE view of its replica.
//! - [`cli`]: clap commands and how their typed answers render; `main.rs` only calls [`cli::main`].
//! - [`throttle`]: the token bucket behind `--max-rate`.
//! - [`sys`]: every raw syscall, each behind a helper that returns `io::Result`.
//! - [`ids`]: the newtypes for ids and units shared by the modules.
//! - [`error`]: the error tree.

pub mod auth;
pub mod block;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod datastore;
pub mod error;
pub mod fs;
pub mod ids;
pub mod journal;
pub mod mirror;
pub mod state;
pub mod sys;
pub mod throttle;
pub mod tls;
pub mod tracking;
pub mod wire;

pub mod replica;
pub mod replicate;

/// Generated protobuf types (see `proto/`).
pub mod proto {
    /// Records stored in the journal.
    pub mod journal {
        tonic::include_proto!("hbrfs.journal");
    }
    /// The replication protocol between primary and secondary.
    pub mod replication {
        tonic::include_proto!("hbrfs.replication");
    }
    /// The secondary's staged-epoch records.
    pub mod replica {
        tonic::include_proto!("hbrfs.replica");
    }
}
