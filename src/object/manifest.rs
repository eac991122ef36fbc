//! Series, point manifests and map chunks.
//!
//! A point is named by its place in its series (`SEQ`: 1, 2, …), which is
//! also its manifest's key, so the create-only write of that key decides
//! which writer owns the point. `points ls` shows each point's epoch too.

use prost::Message;

use crate::block::BlockHash;
use crate::error::{Error, Result};
use crate::proto::object::{MapChunk, PointManifest};

use super::{MAP_CHUNK_BLOCKS, Repo, format, s3};

/// The key of point `seq` of `series` below the prefix.
pub fn point_rel(series: &str, seq: u64) -> String {
    format!("points/{series}/{seq:020}")
}

/// The series in the repository (one per datastore that wrote there).
pub async fn list_series(repo: &Repo) -> Result<Vec<String>> {
    let prefix = repo.key("points");
    s3::REQUESTS.listed();
    let listed = repo
        .store
        .list_with_delimiter(Some(&prefix))
        .await
        .map_err(|e| s3::failed(&repo.url, "listing points/", e))?;
    let mut series: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    series.sort();
    Ok(series)
}

/// The published points of `series`, by sequence number, ascending.
pub async fn list_points(repo: &Repo, series: &str) -> Result<Vec<u64>> {
    let rel = format!("points/{series}");
    let mut seqs: Vec<u64> = s3::list(repo.store.as_ref(), &repo.url, &rel)
        .await?
        .iter()
        .filter_map(|m| m.location.filename().and_then(|f| f.parse().ok()))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// The manifest of point `seq` of `series`; `None` if none is published.
pub async fn load(repo: &Repo, series: &str, seq: u64) -> Result<Option<PointManifest>> {
    let rel = point_rel(series, seq);
    let Some(bytes) = s3::get_opt(repo.store.as_ref(), &repo.url, &rel).await? else {
        return Ok(None);
    };
    let m: PointManifest = format::open(&bytes, &repo.url, &rel)?;
    if m.seq != seq {
        return Err(repo
            .url
            .damaged(&rel, format!("the manifest says it is point {}", m.seq)));
    }
    Ok(Some(m))
}

/// The one series of the repository, or the one named; a clear error when
/// there is none or several and none was named.
pub async fn pick_series(repo: &Repo, named: Option<&str>) -> Result<String> {
    let series = list_series(repo).await?;
    match (named, series.as_slice()) {
        (Some(n), _) if series.iter().any(|s| s == n) => Ok(n.to_string()),
        (Some(n), _) => Err(Error::Usage(format!(
            "{} has no points of datastore {n} (it has: {})",
            repo.url,
            series.join(", ")
        ))),
        (None, [one]) => Ok(one.clone()),
        (None, []) => Err(Error::Usage(format!("{} holds no points yet", repo.url))),
        (None, _) => Err(Error::Usage(format!(
            "{} holds the points of several datastores ({}): name one with --datastore",
            repo.url,
            series.join(", ")
        ))),
    }
}

/// Publishes `m` create-only; `false` if point `m.seq` was already there.
pub async fn publish(repo: &Repo, series: &str, m: &PointManifest) -> Result<bool> {
    let rel = point_rel(series, m.seq);
    s3::put_create(repo.store.as_ref(), &repo.url, &rel, format::seal(m)?).await
}

/// A map chunk of `hashes` (16 bytes each; zero for a zero block): its
/// encoding, whose keyed hash names the blob.
pub fn encode_map(hashes: &[[u8; 16]]) -> Vec<u8> {
    let used = hashes
        .iter()
        .rposition(|h| *h != [0u8; 16])
        .map_or(0, |i| i + 1);
    MapChunk {
        hashes: hashes[..used].concat(),
    }
    .encode_to_vec()
}

/// The hashes of an encoded map chunk, padded with zero hashes to
/// [`MAP_CHUNK_BLOCKS`]; what the blob `what` of `repo` holds.
pub fn decode_map(raw: &[u8], repo: &Repo, what: &str) -> Result<Vec<[u8; 16]>> {
    let chunk = MapChunk::decode(raw).map_err(|e| {
        repo.url
            .damaged(what, format!("a map chunk does not decode: {e}"))
    })?;
    if chunk.hashes.len() % 16 != 0 || chunk.hashes.len() as u64 > MAP_CHUNK_BLOCKS * 16 {
        return Err(repo
            .url
            .damaged(what, format!("a map chunk of {} bytes", chunk.hashes.len())));
    }
    let mut hashes: Vec<[u8; 16]> = chunk
        .hashes
        .chunks_exact(16)
        .map(|h| h.try_into().expect("16 bytes"))
        .collect();
    hashes.resize(MAP_CHUNK_BLOCKS as usize, [0u8; 16]);
    Ok(hashes)
}

/// The hash in a manifest's chunk list or a map entry, `None` for zero.
pub fn hash_of(bytes: &[u8]) -> Option<BlockHash> {
    BlockHash::from_bytes(bytes).filter(|h| h.0 != 0)
}
