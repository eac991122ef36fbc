//! hbrfs: host-based replication for virtual-disk images.
//!
//! A passthrough FUSE mount over a backing directory notices every write,
//! records it crash-safely, and ships crash-consistent points to a
//! secondary, which applies each one atomically and shows it read-only.
//!
//! # Layout
//!
//! Floors from top to bottom; a module imports only from floors below its
//! own, and the primary wing and the secondary wing never import each other
//! (they meet in [`wire`] and the generated [`proto`]). `tests/layers.rs`
//! checks this map against the sources; `docs/design.md` ("Module map")
//! says where each coming feature goes.
//!
//! Commands and process wiring:
//! - [`cli`]: clap commands and how their typed answers render; `main.rs` only calls [`cli::main`].
//! - [`daemon`]: process wiring: the primary (`mount`), the secondary (`serve`, `mount-replica`), `up`; mounts and signals; the `--metrics` endpoint.
//! - [`roles`]: who is primary: the role record, `promote` (failover) and `demote` (failback's resync list); above both wings.
//! - [`control`]: the daemon's control socket: one request enum, one typed answer per request.
//!
//! Primary wing (top to bottom):
//! - [`replicate`]: the replicator: a point's life (cut → pending → shipping → applied, one owner in `replicate::point`), offers, wanted blocks, verify, stats.
//! - [`datastore`]: the state folder (format, lock, mount-time scan) and the [`fs::recorder::ChangeRecorder`] that records what the mount changed.
//! - [`tracking`]: per-file dirty bitmaps (memmap2), epochs, the cut gate, the closed set and its pre-images; knows nothing of shipping.
//! - [`journal`]: the sled database: file ids and their path index, namespace operations keyed by epoch, epochs, the point record.
//!
//! Secondary wing:
//! - [`mirror`]: the secondary's FUSE views: its replica read-only (with `.points/`), one recovery point read-only, a writable test-failover sandbox of one.
//! - [`replica`]: the gRPC service, one point's session, preflight, staging, atomic apply, content index, seeding.
//! - [`points`]: recovery points: undo records saved before an apply overwrites, the catalog, retention and thinning, lazy point views, rollback.
//!
//! Shared by both wings:
//! - [`fs`]: the FUSE passthrough of every operation images need; tells a `ChangeRecorder` what changed and marks a `TrackedBlocks` before each write.
//! - [`object`]: the object-store repository (`s3://BUCKET/PREFIX`): packs, index segments, manifests, the local index; the primary publishes points there, the recovery commands read them.
//! - [`tls`]: the channel's TLS, with certificates from an authority derived from the pair key.
//! - [`auth`]: the pre-shared key and the per-request tokens peers authenticate with.
//! - [`block`]: keyed xxh3-128 block hashes, zero detection, bounded zstd.
//! - [`wire`]: the protocol version and every message limit both wings obey.
//! - [`state`]: the state folders' paths ([`state::StatePaths`], [`state::ReplicaPaths`]), durable small writes, time, hex, the tree walk.
//! - [`throttle`]: the token bucket behind `--max-rate`.
//! - [`qcow2`]: a sequential qcow2 v3 image writer, for exporting a point (or the change since another) as a backing chain.
//! - [`workers`]: one thread per core for the block work of both wings (compression, decompression and hash checks), contexts kept per thread.
//! - [`ids`]: the newtypes for ids and units (`FileId`, `BlockNo`, `Epoch`, `BlockSize`).
//! - [`error`]: the error tree, with [`error::Error::kind`] for control flow.
//! - [`sys`]: every raw syscall, each behind a helper that returns `io::Result`.

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
pub mod object;
pub mod points;
pub mod qcow2;
pub mod roles;
pub mod state;
pub mod sys;
pub mod throttle;
pub mod tls;
pub mod tracking;
pub mod wire;
pub mod workers;

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
    /// The secondary's recovery points: catalog and namespaces.
    pub mod points {
        tonic::include_proto!("hbrfs.points");
    }
    /// Records of the object-store repository (`proto/object.proto`).
    pub mod object {
        tonic::include_proto!("hbrfs.object");
    }
}
