//! `hbrfs verify` at the secondary: the primary's block hashes compared
//! with the replica at its applied point, applies waiting while it reads.

use std::os::unix::fs::FileExt;

use super::confine;
use super::store::ReplicaStore;
use crate::error::Error;
use crate::ids::{Epoch, FileId};
use crate::proto::replication::{VerifyFile, VerifyReply, VerifyRequest, VerifyResult};

/// Most files, and most blocks of one file, in one request.
const MAX_VERIFY: usize = 1 << 20;

/// Why a verify request cannot be answered now, or at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The replica is at another point than the one to compare with.
    #[error("the replica is at epoch {applied}, not {asked}: verify again once it caught up")]
    OtherPoint {
        /// The replica's applied epoch.
        applied: Epoch,
        /// The epoch the primary compares.
        asked: u64,
    },
    /// No pair yet: there is no key to hash with.
    #[error("no primary has said hello to this replica yet")]
    NotPaired,
    /// Beyond the request limits.
    #[error("{0} files in one request")]
    TooManyFiles(usize),
    /// A file's blocks and hashes do not pair up (or are too many).
    #[error("file {file_id}: {blocks} blocks but {hashes} hashes")]
    Mismatch {
        /// The file.
        file_id: u64,
        /// How many block numbers it lists.
        blocks: usize,
        /// How many hashes.
        hashes: usize,
    },
    /// The content index could not be read.
    #[error(transparent)]
    Index(#[from] Error),
}

/// Checks the primary's block hashes against the replica at its applied
/// point.
pub fn compare(store: &ReplicaStore, req: &VerifyRequest) -> Result<VerifyReply, VerifyError> {
    let _view = store.view.read().expect("view lock");
    let applied = store.applied().epoch;
    if req.epoch != applied.0 {
        return Err(VerifyError::OtherPoint {
            applied,
            asked: req.epoch,
        });
    }
    let pair = store.pair().ok_or(VerifyError::NotPaired)?;
    if req.files.len() > MAX_VERIFY {
        return Err(VerifyError::TooManyFiles(req.files.len()));
    }
    let bs = u64::from(pair.block_size);
    let files = req
        .files
        .iter()
        .map(|f| compare_file(store, &pair.key, bs, f))
        .collect::<Result<_, _>>()?;
    Ok(VerifyReply {
        epoch: applied.0,
        files,
    })
}

/// One file's blocks compared.
fn compare_file(
    store: &ReplicaStore,
    key: &crate::block::HashKey,
    bs: u64,
    f: &VerifyFile,
) -> Result<VerifyResult, VerifyError> {
    if f.blocks.len() != f.hashes.len() || f.blocks.len() > MAX_VERIFY {
        return Err(VerifyError::Mismatch {
            file_id: f.file_id,
            blocks: f.blocks.len(),
            hashes: f.hashes.len(),
        });
    }
    let rel = store.file_path(FileId(f.file_id))?.unwrap_or_default();
    let file = confine::open_file(&store.root, &rel);
    let size = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let mut differing = Vec::new();
    for (&block, hash) in f.blocks.iter().zip(&f.hashes) {
        let start = block.saturating_mul(bs);
        let len = f.size.saturating_sub(start).min(bs) as usize;
        if !f.idle && start + len as u64 > size {
            // Past the replica's end while a size change waits to ship.
            continue;
        }
        let mut buf = vec![0u8; len];
        let same = file.as_ref().is_some_and(|file| {
            file.read_exact_at(&mut buf, start).is_ok() && key.hash(&buf).to_bytes()[..] == hash[..]
        });
        if !same {
            differing.push(block);
        }
    }
    Ok(VerifyResult {
        file_id: f.file_id,
        path: rel,
        size_differs: f.idle && size != f.size,
        size,
        differing,
    })
}
