//! The object-store repository (`s3://BUCKET/PREFIX`): where a primary
//! mounted with `--replicate-to s3://…` publishes its points, and where
//! `points ls`, `mount-point`, `restore`, `test-failover`, `promote` and
//! `gc` find them. Both wings use it: the primary writes points, the
//! recovery commands read them; neither imports the other (the module sits
//! on the shared floor, next to `block` and `state`).
//!
//! # Layout (format version [`FORMAT_VERSION`], records in `proto/object.proto`)
//!
//! ```text
//! PREFIX/config                   RepoConfig: block size, hash secret (create-only)
//! PREFIX/data/HH/PACK             packs of ~16 MiB: blobs, then a footer indexing them
//! PREFIX/index/NAME               index segments: each pack's footer entries (immutable)
//! PREFIX/points/SERIES/SEQ        point manifests, create-only: namespace + map chunk refs
//! PREFIX/gc/lease                 the one GC running (create-only, expires)
//! PREFIX/gc/candidates            packs unreferenced at the last mark
//! PREFIX/gc/deleted/NS            packs a GC deleted, written before it deletes them
//! ```
//!
//! - **Blobs** are blocks (zstd frames, raw frames when incompressible) and
//!   map chunks, each named by the keyed xxh3-128 of its uncompressed
//!   content with the repository's secret: blocks dedup across points and
//!   across every datastore that shares the repository. Never one object
//!   per block: blobs go into write-once packs of about [`PACK_BYTES`].
//! - **A point** is two levels: map chunks (the hashes of
//!   [`MAP_CHUNK_BLOCKS`] blocks of one file, themselves blobs in packs)
//!   and the manifest (the namespace and each file's list of map chunk
//!   hashes). A point whose change touches a few chunks uploads those
//!   chunks and a manifest: requests follow the changed data, not the disk.
//! - **Publishing** is ordered: packs, then the index segment naming
//!   them, then the manifest, written create-only (`If-None-Match: *`) at
//!   the next sequence number of its series. A point is visible whole or
//!   not at all, and of two writers racing for one sequence number one
//!   wins and the other is refused.
//! - **A series** is one datastore's points (`SERIES` is its datastore id),
//!   so several datastores can share a repository and its dedup.
//!
//! # Modules
//!
//! - [`s3`]: the address, credentials (AWS conventions) and the store,
//!   every request with a deadline and the crate's retries.
//! - [`mod@format`]: encoding and checking every record; packs' footers.
//! - [`pack`]: building a pack.
//! - [`cache`]: the local index (hash → pack), rebuilt from segments, or
//!   from pack footers when segments are lost.
//! - [`manifest`]: series, point manifests and map chunks.
//! - [`namespace`]: a point's namespace replayed from the primary's lists.
//! - [`retention`]: the `--keep` grid applied to a series (manifests go).
//! - [`gc`]: mark, grace and sweep of unreferenced packs, under a lease.
//! - [`read`]: one point read lazily (`mount-point`, `test-failover`,
//!   `restore` of an `s3://` point), through [`lru`], a cache bounded by bytes.
//! - [`restore`]: one point written out whole into a folder.

pub mod cache;
pub mod format;
pub mod gc;
pub mod lru;
pub mod manifest;
pub mod namespace;
pub mod pack;
pub mod read;
pub mod restore;
pub mod retention;
pub mod s3;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as Key;

use crate::block::HashKey;
use crate::error::{Error, Result};
use crate::proto::object::RepoConfig;

pub use s3::{S3Options, S3Url};

/// The repository format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// About how large a pack grows before it is uploaded: large enough that
/// a TiB is 65,536 requests, small enough that a failed upload costs
/// little to send again.
pub const PACK_BYTES: usize = 16 * 1024 * 1024;

/// Blocks per map chunk: 4,096 hashes (64 KiB raw) cover 256 MiB of a file
/// at the default 64 KiB block, so a 4 GiB image's map is 16 chunks.
pub const MAP_CHUNK_BLOCKS: u64 = 4096;

/// One opened repository: its store, its prefix and its config.
#[derive(Clone, Debug)]
pub struct Repo {
    /// The store, shared by every request.
    pub store: Arc<dyn ObjectStore>,
    /// Where it is, for keys and messages.
    pub url: S3Url,
    /// Block size, secret and id.
    pub config: RepoConfig,
    /// The keyed hash of every blob.
    pub key: HashKey,
}

impl Repo {
    /// The repository at `url`; with `create` (a writer), one is made with
    /// `block_size` if none is there. A repository of another block size
    /// or format is refused, naming both.
    pub async fn open(url: &S3Url, opts: &S3Options, create: Option<u32>) -> Result<Repo> {
        let store = s3::connect(url, opts)?;
        let config = s3::load_or_create_config(&store, url, create).await?;
        if config.version != FORMAT_VERSION {
            return Err(Error::Usage(format!(
                "{url} is a repository of format {}, this hbrfs reads format {FORMAT_VERSION}",
                config.version
            )));
        }
        if let Some(bs) = create.filter(|bs| *bs != config.block_size) {
            return Err(Error::Usage(format!(
                "{url} holds blocks of {} bytes, this datastore tracks {bs}-byte blocks: \
                 use another prefix",
                config.block_size
            )));
        }
        let key = HashKey::from_bytes(&config.hash_key).ok_or_else(|| {
            url.damaged(
                "config",
                format!("hash key of {} bytes", config.hash_key.len()),
            )
        })?;
        Ok(Repo {
            store,
            url: url.clone(),
            config,
            key,
        })
    }

    /// The key of `rel` under the prefix.
    pub fn key(&self, rel: &str) -> Key {
        self.url.key(rel)
    }

    /// The repository's id as hex, naming local caches.
    pub fn id_hex(&self) -> String {
        crate::state::hex(&self.config.repo_id)
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        u64::from(self.config.block_size)
    }
}

/// The key of pack `id` under the prefix: `data/HH/HEX`, spread over 256
/// folders so no listing grows past what a store lists quickly.
pub fn pack_rel(id: &[u8]) -> String {
    let hex = crate::state::hex(id);
    format!("data/{}/{hex}", &hex[..2.min(hex.len())])
}
