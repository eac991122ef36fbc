//! `hbrfs gc s3://BUCKET/PREFIX`: one garbage collection of an object
//! store (`object::gc`), and its report.

use std::path::PathBuf;
use std::time::Duration;

use super::render;
use crate::error::{Error, Result};
use crate::keep::Retention;
use crate::object::gc::{self, GcOptions, GcReport};
use crate::object::{Repo, S3Options, S3Url};

/// What `hbrfs gc` was given.
pub(super) struct GcArgs {
    pub repo: String,
    pub endpoint: Option<String>,
    pub grace: Duration,
    pub dry_run: bool,
    pub keep: Option<Retention>,
    pub cache_dir: Option<PathBuf>,
    pub json: bool,
}

/// Runs one GC and prints what it found and did.
pub(super) fn run(args: GcArgs) -> Result<()> {
    let url = S3Url::parse(&args.repo).unwrap_or_else(|| {
        Err(Error::Usage(format!(
            "{}: gc takes an object store, s3://BUCKET/PREFIX",
            args.repo
        )))
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Remote(format!("starting the async runtime: {e}")))?;
    let report = rt.block_on(async {
        let opts = S3Options::reader(args.endpoint.clone());
        let repo = Repo::open(&url, &opts, None).await?;
        let cache_dir = args
            .cache_dir
            .clone()
            .unwrap_or_else(|| gc::default_cache_dir(&repo));
        let opts = GcOptions {
            grace: args.grace,
            dry_run: args.dry_run,
            keep: args.keep.clone(),
            cache_dir,
        };
        gc::run(&repo, &opts).await
    })?;
    if args.json {
        render::record(&report, true);
        return Ok(());
    }
    print!("{}", text(&url, &report));
    Ok(())
}

/// The report as lines for a person.
fn text(url: &S3Url, r: &GcReport) -> String {
    let b = render::bytes;
    let verb = if r.dry_run { "would" } else { "did" };
    let mut out = format!(
        "{url}: GC{}\n",
        if r.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<13} {v}\n"));
    let dropped: Vec<String> = r.dropped.iter().map(|(s, q)| format!("{s}/{q}")).collect();
    line(
        "retention",
        format!("{verb} let {} points go {:?}", r.dropped.len(), dropped),
    );
    line(
        "live points",
        format!("{} ({} distinct map chunks)", r.points, r.map_chunks),
    );
    line(
        "packs",
        format!(
            "{} ({}); referenced {} ({}, of which {} live blobs)",
            r.packs,
            b(r.pack_bytes),
            r.referenced_packs,
            b(r.referenced_bytes),
            b(r.live_blob_bytes)
        ),
    );
    line(
        "young",
        format!(
            "{} ({}): unreferenced, younger than the grace period",
            r.young_packs,
            b(r.young_bytes)
        ),
    );
    line(
        "candidates",
        format!("{} ({})", r.candidates, b(r.candidate_bytes)),
    );
    line(
        "deleted",
        format!(
            "{verb} delete {} packs ({} freed) and {} index segments",
            r.deleted,
            b(r.freed_bytes),
            r.segments_deleted
        ),
    );
    let dead: u64 = r.sparse.iter().map(|s| s.bytes - s.live_bytes).sum();
    line(
        "sparse",
        format!(
            "{} packs under half live ({} dead in them)",
            r.sparse.len(),
            b(dead)
        ),
    );
    line(
        "repack",
        format!(
            "{verb} copy the live blobs of {} of them ({}) into {} new packs; \
             the old ones go after the grace period",
            r.repacked,
            b(r.repacked_bytes),
            if r.dry_run {
                "some".to_string()
            } else {
                r.repack_packs.to_string()
            }
        ),
    );
    let q = &r.requests;
    line(
        "requests",
        format!(
            "{} LIST, {} GET, {} PUT, {} DELETE in {:.1} s",
            q.lists,
            q.gets,
            q.puts,
            q.deletes,
            r.elapsed_ms as f64 / 1000.0
        ),
    );
    out
}
