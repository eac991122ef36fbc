//! The `--keep` grid applied to a series of the object store: which point
//! manifests go. The grid is the replicas' own ([`crate::keep`]); deleting
//! a manifest is the only step, since a point owns no blob of its own:
//! blobs shared with other points stay, and those no live point names any
//! more go by GC's mark, grace and sweep (`object::gc`).
//!
//! A point's time is its manifest's `Last-Modified` (when the store took
//! the publish), read from the one listing of the series: applying the
//! grid after each publish costs one LIST and a DELETE per point that
//! goes, never a GET per point kept. Ages are taken against this host's
//! clock, so a store whose clock is off by a few seconds shifts the slots
//! by as much; the grid's steps are far coarser.

use crate::error::Result;
use crate::keep::Retention;
use crate::state::now_ns;

use super::manifest::point_rel;
use super::{Repo, s3};

/// One published point as the grid sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// Its place in the series.
    pub seq: u64,
    /// When the store took it (unix ns).
    pub at_ns: u64,
}

/// The points of `series`, ascending by sequence number, with their
/// publish times; objects under the series that are not point manifests
/// are left out.
pub async fn published(repo: &Repo, series: &str) -> Result<Vec<Published>> {
    let rel = format!("points/{series}");
    let mut found: Vec<Published> = s3::list(repo.store.as_ref(), &repo.url, &rel)
        .await?
        .iter()
        .filter_map(|m| {
            let seq = m.location.filename()?.parse().ok()?;
            let at_ns = m.last_modified.timestamp_nanos_opt()?;
            Some(Published {
                seq,
                at_ns: u64::try_from(at_ns).ok()?,
            })
        })
        .collect();
    found.sort_unstable_by_key(|p| p.seq);
    Ok(found)
}

/// The sequence numbers of `points` (ascending by seq) that `keep` lets go
/// at `now_ns`, ascending; never the newest. The grid wants ascending
/// times: a point published out of order (a clock step) is placed by
/// its time, never by its number.
pub fn to_drop(keep: &Retention, points: &[Published], now_ns: u64) -> Vec<u64> {
    let mut left: Vec<Published> = points.to_vec();
    let newest = left.iter().map(|p| p.seq).max();
    left.sort_by_key(|p| (p.at_ns, p.seq));
    // The newest by number stays, wherever its time puts it.
    if let Some(at) = left.iter().position(|p| Some(p.seq) == newest) {
        let p = left.remove(at);
        left.push(p);
    }
    let mut dropped = Vec::new();
    loop {
        let times: Vec<u64> = left.iter().map(|p| p.at_ns).collect();
        let Some(i) = keep.next_to_drop(&times, 0, now_ns, |_| true) else {
            break;
        };
        dropped.push(left.remove(i).seq);
    }
    dropped.sort_unstable();
    dropped
}

/// Applies `keep` to `series`: deletes the manifests of the points it
/// lets go (never the newest) and returns their sequence numbers. The
/// primary calls it after each publish; `hbrfs gc --keep` for every series
/// first. A point deleted is gone from `points ls` at once; its blobs are
/// freed by a later GC.
pub async fn apply(repo: &Repo, series: &str, keep: &Retention) -> Result<Vec<u64>> {
    let points = published(repo, series).await?;
    let dropped = to_drop(keep, &points, now_ns());
    for seq in &dropped {
        s3::delete(repo.store.as_ref(), &repo.url, &point_rel(series, *seq)).await?;
    }
    if !dropped.is_empty() {
        log::info!(
            "{}: retention let {} points of {series} go ({} kept)",
            repo.url,
            dropped.len(),
            points.len() - dropped.len()
        );
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn at(seq: u64, secs: u64) -> Published {
        Published {
            seq,
            at_ns: secs * S,
        }
    }

    #[test]
    fn the_grid_thins_a_series_and_never_drops_the_newest() {
        let s = Duration::from_secs;
        // Every point for 10 s, one a minute for an hour.
        let keep = Retention::new(vec![(s(1), s(10)), (s(60), s(3600))], None);
        let now = 100_000;
        // Three points in one old minute, two recent ones, one too old.
        let minute = (now - 600) / 60 * 60;
        let points = vec![
            at(1, now - 7200),
            at(2, minute),
            at(3, minute + 10),
            at(4, minute + 20),
            at(5, now - 3),
            at(6, now - 1),
        ];
        assert_eq!(to_drop(&keep, &points, now * S), vec![1, 3, 4]);
        // `none`: only the newest stays, even when its clock ran behind.
        let none = Retention::new(vec![], None);
        let mut skewed = points.clone();
        skewed[5].at_ns = 1;
        assert_eq!(to_drop(&none, &skewed, now * S), vec![1, 2, 3, 4, 5]);
        assert!(to_drop(&none, &[], now * S).is_empty());
        assert!(to_drop(&none, &points[..1], now * S).is_empty());
    }
}
