//! `hbrfs points`: the recovery points a replica keeps, read from its
//! catalog (no daemon needed: the catalog is written whole and durably),
//! and `hbrfs export` of one of them.

use std::path::Path;

use serde::Serialize;

use super::render;
use crate::error::{Error, Result};
use crate::points::{ExportRequest, PointsPaths, export as export_point, point_name, read_catalog};
use crate::replica::Pair;
use crate::state::ReplicaPaths;

/// One row of `hbrfs points ls`.
#[derive(Debug, Serialize)]
struct PointRow {
    /// The primary's epoch: the point's id.
    epoch: u64,
    /// Its name (apply time, UTC): `.points/<name>/` in the mirror.
    name: String,
    /// When the secondary applied it (unix ns).
    at_ns: u64,
    /// Regular files in it.
    files: u64,
    /// Blocks its apply wrote.
    changed_blocks: u64,
    /// Undo kept with it (compressed bytes), and its blocks.
    undo_bytes: u64,
    undo_blocks: u64,
}

/// Prints the points of the replica at `replica`, oldest first.
pub(super) fn ls(replica: &Path, json: bool) -> Result<()> {
    let paths = PointsPaths::new(ReplicaPaths::of(replica).points());
    let rows: Vec<PointRow> = read_catalog(&paths)?
        .iter()
        .map(|p| PointRow {
            epoch: p.epoch,
            name: point_name(p),
            at_ns: p.at_ns,
            files: p.files,
            changed_blocks: p.changed_blocks,
            undo_bytes: p.undo_bytes,
            undo_blocks: p.undo_blocks,
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    let header = [
        "EPOCH",
        "TIME",
        "FILES",
        "CHANGED BLOCKS",
        "UNDO",
        "UNDO BLOCKS",
    ];
    render::table(&header, &rows, |r| {
        vec![
            r.epoch.to_string(),
            render::time(r.at_ns),
            r.files.to_string(),
            r.changed_blocks.to_string(),
            render::bytes(r.undo_bytes),
            r.undo_blocks.to_string(),
        ]
    });
    Ok(())
}

/// `hbrfs export`: writes the export and prints one line saying what it
/// holds. The block size is the pair's (the undo's unit), read here since
/// `points` sits below `replica`.
pub(super) fn export(
    replica: &Path,
    point: &str,
    since: Option<(String, String)>,
    image: Option<&str>,
    out: &Path,
) -> Result<()> {
    let pair = Pair::read(&ReplicaPaths::of(replica))?.ok_or_else(|| {
        Error::Usage(format!(
            "{}: no primary ever paired with this replica, so it keeps no point",
            replica.display()
        ))
    })?;
    let done = export_point(&ExportRequest {
        replica,
        point,
        since: since.as_ref().map(|(p, b)| (p.as_str(), b.as_str())),
        image,
        out,
        block_size: u64::from(pair.block_size),
    })?;
    let what = match &done.since {
        Some(p1) if done.full.is_none() => format!("the change since point {}", p1.epoch),
        Some(p1) => format!("every block over point {}", p1.epoch),
        None => "in full".to_string(),
    };
    println!(
        "{}: {} of point {} ({}), {what}: {} clusters written, {} zeroed, {}",
        out.display(),
        done.image,
        done.point.epoch,
        point_name(&done.point),
        done.written,
        done.zeroed,
        render::bytes(done.size),
    );
    Ok(())
}
