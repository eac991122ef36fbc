//! The recovery commands of an object store (`s3://BUCKET/PREFIX`):
//! `hbrfs points ls`, `hbrfs restore` and `hbrfs promote` of a point,
//! and what they say. (`mount-point` and `test-failover` are daemons:
//! `crate::daemon::recovery`.)

use std::path::Path;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::render;
use crate::error::{Error, Result};
use crate::mirror::object::runtime;
use crate::object::read::{PointSource, open_point};
use crate::object::restore::{Restored, restore as restore_point};
use crate::object::{Repo, manifest};

/// Manifests `points ls` reads at once.
const LOADS_IN_FLIGHT: usize = 16;

/// One row of `hbrfs points ls s3://…`.
#[derive(Debug, Serialize)]
struct ObjectPointRow {
    /// The datastore whose point it is (its series).
    datastore: String,
    /// Its place in the series: what `mount-point`, `restore` take.
    seq: u64,
    /// The primary's epoch.
    epoch: u64,
    /// When it was cut (unix ns).
    cut_ns: u64,
    /// Regular files in it.
    files: u64,
    /// Blocks it uploaded, and their stored bytes.
    new_blocks: u64,
    new_bytes: u64,
}

/// Prints the points of the repository `src` (one datastore's with
/// `--datastore`), oldest first.
pub(super) fn ls(src: &PointSource, json: bool) -> Result<()> {
    let rt = runtime()?;
    let rows = rt.block_on(async {
        let repo = Repo::open(&src.url, &src.opts, None).await?;
        let series = match &src.datastore {
            Some(_) => vec![manifest::pick_series(&repo, src.datastore.as_deref()).await?],
            None => manifest::list_series(&repo).await?,
        };
        let mut rows = Vec::new();
        for s in &series {
            let seqs = manifest::list_points(&repo, s).await?;
            let loaded: Vec<_> = futures_util::stream::iter(seqs.into_iter().map(|seq| {
                let repo = &repo;
                async move { manifest::load(repo, s, seq).await }
            }))
            .buffered(LOADS_IN_FLIGHT)
            .try_collect()
            .await?;
            rows.extend(loaded.into_iter().flatten().map(|m| ObjectPointRow {
                datastore: s.clone(),
                seq: m.seq,
                epoch: m.epoch,
                cut_ns: m.cut_ns,
                files: m.files.len() as u64,
                new_blocks: m.new_blocks,
                new_bytes: m.new_bytes,
            }));
        }
        Ok::<_, Error>(rows)
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("{} holds no points yet", src.url);
        return Ok(());
    }
    let header = [
        "DATASTORE",
        "SEQ",
        "EPOCH",
        "CUT",
        "FILES",
        "NEW BLOCKS",
        "NEW BYTES",
    ];
    render::table(&header, &rows, |r| {
        vec![
            r.datastore.clone(),
            r.seq.to_string(),
            r.epoch.to_string(),
            render::time(r.cut_ns),
            r.files.to_string(),
            r.new_blocks.to_string(),
            render::bytes(r.new_bytes),
        ]
    });
    Ok(())
}

/// `hbrfs restore s3://… POINT DIR`: restores and prints what it wrote
/// and how fast.
pub(super) fn restore(src: &PointSource, point: &str, dir: &Path) -> Result<(Restored, String)> {
    let rt = runtime()?;
    let (done, name) = rt.block_on(async {
        let (reader, _) = open_point(src, point).await?;
        let reader = Arc::new(reader);
        let name = reader.name();
        Ok::<_, Error>((restore_point(reader, dir).await?, name))
    })?;
    let rate = done.data_bytes as f64 / done.secs.max(1e-9) / 1e6;
    let devices = match done.devices_skipped {
        0 => String::new(),
        n => format!(", {n} device nodes left out (not permitted)"),
    };
    println!(
        "{name} restored into {}: {} entries, {} files of {} ({} of data) in {:.2} s, \
         {rate:.1} MB/s; {} GETs, {} fetched{devices}",
        dir.display(),
        done.entries,
        done.files,
        render::bytes(done.bytes),
        render::bytes(done.data_bytes),
        done.secs,
        done.gets,
        render::bytes(done.fetched),
    );
    Ok((done, name))
}

/// `hbrfs promote s3://… [--point P] --into DIR`: the point restored into
/// `into`, and the command that makes it a primary.
pub(super) fn promote(src: &PointSource, point: &str, into: &Path) -> Result<()> {
    let (_, name) = restore(src, point, into)?;
    println!(
        "{} holds {name}: mount it as the new primary's backing folder:\n  \
         hbrfs mount {} MOUNTPOINT --replicate-to {}{}\n\
         Its first point uploads only what the repository lacks (blocks dedup by keyed hash) \
         and starts a series of its own.",
        into.display(),
        into.display(),
        src.url,
        src.opts
            .endpoint
            .as_deref()
            .map(|e| format!(" --s3-endpoint {e}"))
            .unwrap_or_default()
    );
    Ok(())
}
