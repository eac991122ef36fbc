//! `hbrfs verify`: compares every clean block with the replica at the last
//! shipped point by keyed hash, without sending block content. Dirty
//! blocks ship with the next point anyway, so they are no difference.
//! Against a secondary, the secondary hashes what it holds; against an
//! object store, the point's block maps already hold the hashes (only the
//! map chunks are read, never a block).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::block::HashKey;
use crate::error::{Error, Result};
use crate::ids::{BlockNo, Epoch};
use crate::proto::replication::{StatusRequest, VerifyFile, VerifyRequest};
use crate::tracking::TrackedFile;

use super::client::{CONNECT_TIMEOUT, Client, blocking, connect, remote, within};
use super::{Replicator, Target};
use crate::auth::AuthKey;
use crate::object::cache::Cache;
use crate::object::read::PointReader;
use crate::object::{Repo, S3Options, S3Url, manifest};
use crate::wire::{APPLY_TIMEOUT_BASE, NO_PROGRESS_TIMEOUT};

/// Blocks hashed and compared per request.
const CHUNK: u64 = 16_384;

/// What the replica says of one file, gathered over its chunks.
#[derive(Default)]
struct FileVerdict {
    /// Blocks whose hashes differ.
    differing: Vec<BlockNo>,
    /// The replica's path for the file (empty when it said none).
    path: Vec<u8>,
    /// The replica's size, when it differs.
    size_differs: Option<u64>,
}

/// Hashes the clean blocks of `blocks` of `file` on a blocking thread.
async fn hash_clean(
    file: Arc<TrackedFile>,
    blocks: std::ops::Range<u64>,
    key: HashKey,
) -> Result<VerifyFile> {
    blocking("reading blocks", move || {
        let mut vf = VerifyFile {
            file_id: file.id.0,
            size: file.size(),
            idle: !file.has_pending(),
            ..Default::default()
        };
        for b in blocks {
            if let Some(data) = file.read_clean(BlockNo(b))? {
                vf.blocks.push(b);
                vf.hashes.push(key.hash(&data).to_bytes().to_vec());
            }
        }
        Ok(vf)
    })
    .await
}

/// The row for a differing file: its blocks as runs.
fn difference(file: &TrackedFile, verdict: FileVerdict) -> Difference {
    let mut ranges: Vec<BlockRun> = Vec::new();
    for BlockNo(b) in &verdict.differing {
        match ranges.last_mut() {
            Some(run) if run.first_block + run.blocks == *b => run.blocks += 1,
            _ => ranges.push(BlockRun {
                first_block: *b,
                blocks: 1,
            }),
        }
    }
    let shown = if verdict.path.is_empty() {
        file.at_cut().0
    } else {
        verdict.path
    };
    Difference {
        path: String::from_utf8_lossy(&shown).into_owned(),
        file_id: file.id.0,
        blocks: verdict.differing.len() as u64,
        replica_size: verdict.size_differs,
        size: file.size(),
        ranges,
    }
}

/// `verify`: where primary and replica differ at the last applied point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The applied point compared against.
    pub epoch: u64,
    /// Clean blocks compared by hash.
    pub blocks_checked: u64,
    /// Dirty blocks not compared (they ship with the next point anyway).
    pub blocks_dirty_skipped: u64,
    /// The files that differ; empty when the replica matches.
    pub differences: Vec<Difference>,
    /// Whether the differing blocks were marked to ship again.
    pub repaired: bool,
}

/// One file that differs between primary and replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// Path relative to the datastore root.
    pub path: String,
    /// The stable file id.
    pub file_id: u64,
    /// How many blocks differ.
    pub blocks: u64,
    /// The replica's size, when it differs from the primary's.
    pub replica_size: Option<u64>,
    /// The primary's size.
    pub size: u64,
    /// The differing blocks as runs.
    pub ranges: Vec<BlockRun>,
}

/// A run of consecutive blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRun {
    /// The first block of the run.
    pub first_block: u64,
    /// How many blocks it holds.
    pub blocks: u64,
}

/// Blocks checked and blocks skipped as dirty, over a whole verify.
#[derive(Default)]
struct Tally {
    checked: u64,
    skipped: u64,
}

/// What `verify` compares with, at the last shipped point.
enum Replica {
    /// The secondary, asked chunk by chunk for the hashes it holds.
    Secondary { client: Client, epoch: Epoch },
    /// The point in the object store: its block maps, read through a
    /// local index of its own (the replicator holds the datastore's).
    Object(Box<PointReader>),
}

impl Replicator {
    /// `hbrfs verify`: compares every clean block with the replica at the
    /// last shipped point, by keyed hash; with `repair`, marks the
    /// differing blocks so the next point ships them.
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let _turn = self.turn.lock().await;
        let shipped = self.points.last_shipped_epoch()?.0;
        let (mut replica, epoch) = match &self.opts.target {
            Target::Secondary { addr, key } => self.secondary_at(addr, key, shipped).await?,
            Target::Object { url, s3, .. } => self.object_point_at(url, s3, shipped).await?,
        };
        let mut tally = Tally::default();
        let mut differences = Vec::new();
        let files = self.ds.tracker.all_files();
        for file in files.into_iter().filter(|f| !f.is_gone()) {
            let verdict = self.verify_file(&mut replica, &file, &mut tally).await?;
            if verdict.differing.is_empty() && verdict.size_differs.is_none() {
                continue;
            }
            if repair {
                self.ds.tracker.mark_for_repair(&file, &verdict.differing)?;
            }
            differences.push(difference(&file, verdict));
        }
        Ok(VerifyReport {
            epoch,
            blocks_checked: tally.checked,
            blocks_dirty_skipped: tally.skipped,
            repaired: repair && !differences.is_empty(),
            differences,
        })
    }

    /// The secondary at `addr`, once it has applied the point `shipped`.
    async fn secondary_at(
        &self,
        addr: &str,
        key: &AuthKey,
        shipped: u64,
    ) -> Result<(Replica, u64)> {
        let mut client = connect(addr, key, CONNECT_TIMEOUT).await?;
        let status = async {
            client
                .status(StatusRequest {})
                .await
                .map_err(|s| remote("secondary", s.message()))
        };
        let applied = within(NO_PROGRESS_TIMEOUT, "(waiting for its status)", status)
            .await?
            .into_inner()
            .last_applied_epoch;
        if applied != shipped || applied == 0 {
            return Err(Error::Remote(format!(
                "the secondary is at epoch {applied} and the last point shipped is {shipped}: \
                 verify once a point has been applied"
            )));
        }
        let epoch = Epoch(applied);
        Ok((Replica::Secondary { client, epoch }, applied))
    }

    /// This datastore's newest point in the object store at `url`, once
    /// it is the point `shipped`.
    async fn object_point_at(
        &self,
        url: &S3Url,
        s3: &S3Options,
        shipped: u64,
    ) -> Result<(Replica, u64)> {
        let repo = Repo::open(url, s3, None).await?;
        let dir = self
            .ds
            .paths
            .object_cache(&repo.id_hex())
            .with_extension("verify");
        let index = {
            let (dir, repo) = (dir.clone(), repo.clone());
            blocking("opening verify's object index", move || {
                Cache::open(&dir, &repo)
            })
            .await?
        };
        let series = self.ds.format.id.clone();
        let newest = manifest::list_points(&repo, &series).await?.last().copied();
        let Some(seq) = newest else {
            return Err(Error::Remote(format!(
                "{url} holds no point of this datastore yet: verify once one is published"
            )));
        };
        let reader = PointReader::open(repo, Arc::new(index), &series, seq, 0).await?;
        let epoch = reader.manifest().epoch;
        if epoch != shipped || epoch == 0 {
            return Err(Error::Remote(format!(
                "{url}'s newest point of this datastore is of epoch {epoch} and the last point \
                 shipped is {shipped}: verify once a point has been published"
            )));
        }
        Ok((Replica::Object(Box::new(reader)), epoch))
    }

    /// Compares the clean blocks of `file` with `replica`, chunk by chunk.
    async fn verify_file(
        &self,
        replica: &mut Replica,
        file: &Arc<TrackedFile>,
        tally: &mut Tally,
    ) -> Result<FileVerdict> {
        let bs = self.ds.format.block_size.bytes();
        let blocks = file.size().div_ceil(bs);
        let key = match replica {
            Replica::Secondary { .. } => self.key.clone(),
            Replica::Object(reader) => reader.repo().key.clone(),
        };
        let mut verdict = FileVerdict::default();
        for start in (0..blocks).step_by(CHUNK as usize) {
            let chunk = start..(start + CHUNK).min(blocks);
            let count = chunk.end - chunk.start;
            let vf = hash_clean(file.clone(), chunk, key.clone()).await?;
            tally.checked += vf.blocks.len() as u64;
            tally.skipped += count - vf.blocks.len() as u64;
            if vf.blocks.is_empty() {
                continue;
            }
            match replica {
                Replica::Secondary { client, epoch } => {
                    ask_secondary(client, *epoch, vf, &mut verdict).await?
                }
                Replica::Object(reader) => {
                    compare_with_point(reader, &key, bs, vf, &mut verdict).await?
                }
            }
        }
        Ok(verdict)
    }
}

/// Asks the secondary which blocks of `vf` differ at `epoch`.
async fn ask_secondary(
    c: &mut Client,
    epoch: Epoch,
    vf: VerifyFile,
    verdict: &mut FileVerdict,
) -> Result<()> {
    let request = VerifyRequest {
        epoch: epoch.0,
        files: vec![vf],
    };
    // The secondary re-reads and hashes up to a chunk of blocks: as
    // generous as an apply's base deadline.
    let compared = async {
        c.verify(request)
            .await
            .map_err(|s| remote("secondary", s.message()))
    };
    let reply = within(
        APPLY_TIMEOUT_BASE,
        "(waiting for a verify answer)",
        compared,
    )
    .await?
    .into_inner();
    for r in reply.files {
        verdict.path = r.path;
        verdict
            .differing
            .extend(r.differing.into_iter().map(BlockNo));
        if r.size_differs {
            verdict.size_differs = Some(r.size);
        }
    }
    Ok(())
}

/// Notes the blocks of `vf` whose hashes differ from the point's map (a
/// zero entry stands for a block of zeros), as the secondary does: a
/// block past the point's end differs, unless the file is not idle (its
/// size change ships with the next point); so does the size of an idle
/// file. A file the point lacks has size 0.
async fn compare_with_point(
    reader: &PointReader,
    key: &HashKey,
    bs: u64,
    vf: VerifyFile,
    verdict: &mut FileVerdict,
) -> Result<()> {
    let fm = reader.file(vf.file_id).ok();
    let size = fm.map_or(0, |f| f.size);
    if vf.idle && size != vf.size {
        verdict.size_differs = Some(size);
    }
    if let Some(e) = reader.namespace().iter().find(|e| e.ino == vf.file_id) {
        verdict.path.clone_from(&e.path);
    }
    let first = vf.blocks[0];
    let held = match fm {
        Some(fm) => {
            let last = vf.blocks[vf.blocks.len() - 1];
            reader.block_hashes(fm, first..last + 1).await?
        }
        None => Vec::new(),
    };
    let full_zero = key.hash(&vec![0u8; bs as usize]);
    for (b, hash) in vf.blocks.iter().zip(&vf.hashes) {
        let start = b * bs;
        let len = bs.min(vf.size.saturating_sub(start));
        let past_end = start + len > size;
        if past_end && !vf.idle {
            continue;
        }
        let expected = match held.get((b - first) as usize).copied().flatten() {
            Some(h) => h,
            None if len == bs => full_zero,
            None => key.hash(&vec![0u8; len as usize]),
        };
        if past_end || hash.as_slice() != expected.to_bytes() {
            verdict.differing.push(BlockNo(*b));
        }
    }
    Ok(())
}
