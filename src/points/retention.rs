//! A replica's recovery points under the retention grid (`serve --keep
//! 1s:1h,1m:24h,1h:7d --keep-space N`, decided by [`crate::keep`]): the
//! two ways one goes. The newest point is the live replica; the space cap
//! counts undo bytes; a point a view has pinned stays.
//!
//! The oldest point goes by **expiry**: its folder is removed (its undo
//! composed it from the next point; nothing older needs it). Any other
//! point goes by **thinning**: its undo is merged into the undo of the
//! point before it, that point's records winning (they hold the older
//! content), so the older point still composes exactly. A thinning copies
//! the thinned point's frames once and rewrites the two indexes: its cost
//! follows the undo, never the images.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsFd;

use super::store::{PointsPaths, open_lock, write_catalog};
use super::undo::read_index;
use crate::error::{IoContext, Result};
pub use crate::keep::Retention;
use crate::proto::points::PointRecord;
use crate::state::{make_state_dirs, state_file_options};
use crate::sys;

/// The next of `points` `keep` lets go, none of `pinned`.
fn next(
    keep: &Retention,
    points: &[PointRecord],
    now_ns: u64,
    pinned: &HashSet<u64>,
) -> Option<usize> {
    let times: Vec<u64> = points.iter().map(|p| p.at_ns).collect();
    let undo = points.iter().map(|p| p.undo_bytes).sum();
    keep.next_to_drop(&times, undo, now_ns, |i| !pinned.contains(&points[i].epoch))
}

/// Whether a view holds point `epoch` (its pin is locked).
fn is_pinned(paths: &PointsPaths, epoch: u64) -> Result<bool> {
    let path = paths.pin(epoch);
    if !path.exists() {
        return Ok(false);
    }
    let pin = open_lock(&path)?;
    let free = sys::try_lock_exclusive(pin.as_fd()).at(&path)?;
    Ok(!free)
}

/// Lets go of the points the grid no longer keeps, updating `points` and
/// the catalog. Called with the points lock held exclusively.
pub fn apply(
    paths: &PointsPaths,
    keep: &Retention,
    points: &mut Vec<PointRecord>,
    now_ns: u64,
) -> Result<()> {
    // Only the candidates' pins are checked: a pass costs the points it
    // lets go, not every kept point.
    let mut pinned = HashSet::new();
    while let Some(i) = next(keep, points, now_ns, &pinned) {
        if is_pinned(paths, points[i].epoch)? {
            pinned.insert(points[i].epoch);
            continue;
        }
        let gone = if i == 0 {
            points.remove(0)
        } else {
            thin(paths, points, i)?
        };
        crate::state::crash_point("thin");
        write_catalog(paths, points)?;
        let dir = paths.point(gone.epoch);
        fs::remove_dir_all(&dir).at(&dir)?;
        remove_unnamed(paths, points)?;
        log::debug!("point {} let go ({} points kept)", gone.epoch, points.len());
    }
    Ok(())
}

/// Merges the undo of `points[i]` into `points[i - 1]` as its next
/// generation and removes `points[i]` from the list (not yet from disk:
/// the caller writes the catalog first). Returns the removed record.
fn thin(paths: &PointsPaths, points: &mut Vec<PointRecord>, i: usize) -> Result<PointRecord> {
    let newer = points.remove(i);
    let older = &mut points[i - 1];
    let (epoch, generation) = (older.epoch, older.generation + 1);
    let old_data = paths.undo_data(epoch, older.generation);
    let new_data = paths.undo_data(epoch, generation);
    let new_index = paths.undo_index(epoch, generation);
    for stale in [&new_data, &new_index] {
        if stale.exists() {
            fs::remove_file(stale).at(stale)?;
        }
    }
    // The older data, linked (its frames stay where they are), then the
    // newer's frames the older does not shadow, appended.
    if old_data.exists() {
        fs::hard_link(&old_data, &new_data).at(&new_data)?;
    }
    let (mut index, _) = read_index(&paths.undo_index(epoch, older.generation))?;
    let (theirs, _) = read_index(&paths.undo_index(newer.epoch, newer.generation))?;
    let mut data = state_file_options()
        .append(true)
        .create(true)
        .open(&new_data)
        .at(&new_data)?;
    let mut at = data.metadata().at(&new_data)?.len();
    let their_data_path = paths.undo_data(newer.epoch, newer.generation);
    let their_data = File::open(&their_data_path).ok();
    for (key, mut r) in theirs {
        if index.contains_key(&key) {
            continue;
        }
        if !r.zero {
            let mut frame = vec![0u8; r.stored as usize];
            let from = their_data.as_ref().ok_or_else(|| {
                super::store::bad(&their_data_path, "missing, but its index names frames")
            })?;
            std::os::unix::fs::FileExt::read_exact_at(from, &mut frame, r.offset)
                .at(&their_data_path)?;
            data.write_all(&frame).at(&new_data)?;
            r.offset = at;
            at += frame.len() as u64;
        }
        index.insert(key, r);
    }
    data.sync_all().at(&new_data)?;
    super::undo::write_index(&new_index, &index)?;
    merge_files(paths, older, &newer, generation)?;
    older.generation = generation;
    older.undo_bytes = at;
    older.undo_blocks = index.len() as u64;
    older.thinned += 1 + newer.thinned;
    Ok(newer)
}

/// The kept files of `older` at `generation`: links to its own and to
/// those of `newer` it does not have.
fn merge_files(
    paths: &PointsPaths,
    older: &PointRecord,
    newer: &PointRecord,
    generation: u64,
) -> Result<()> {
    let to = paths.kept_files(older.epoch, generation);
    if to.exists() {
        fs::remove_dir_all(&to).at(&to)?;
    }
    make_state_dirs(&to)?;
    let sources = [
        paths.kept_files(older.epoch, older.generation),
        paths.kept_files(newer.epoch, newer.generation),
    ];
    for from in sources.iter().filter(|d| d.exists()) {
        for entry in fs::read_dir(from).at(from)? {
            let name = entry.at(from)?.file_name();
            let link = to.join(&name);
            if !link.exists() {
                fs::hard_link(from.join(&name), &link).at(&link)?;
            }
        }
    }
    File::open(&to).and_then(|d| d.sync_all()).at(&to)
}

/// Removes what the catalog `points` does not name: folders of points not
/// in it, and generations of its points other than their current one
/// (what an interrupted thinning or apply left).
pub fn remove_unnamed(paths: &PointsPaths, points: &[PointRecord]) -> Result<()> {
    for entry in fs::read_dir(&paths.dir).at(&paths.dir)? {
        let entry = entry.at(&paths.dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(epoch) = name.strip_prefix('E').and_then(|e| e.parse::<u64>().ok()) else {
            continue;
        };
        match points.iter().find(|p| p.epoch == epoch) {
            None => fs::remove_dir_all(entry.path()).at(entry.path())?,
            Some(p) => remove_other_generations(paths, p)?,
        }
    }
    Ok(())
}

fn remove_other_generations(paths: &PointsPaths, p: &PointRecord) -> Result<()> {
    let dir = paths.point(p.epoch);
    let current = [
        paths.undo_index(p.epoch, p.generation),
        paths.undo_data(p.epoch, p.generation),
        paths.kept_files(p.epoch, p.generation),
    ];
    for entry in fs::read_dir(&dir).at(&dir)? {
        let path = entry.at(&dir)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let undo = name.starts_with("undo-") || name.starts_with("files-");
        if !undo || current.contains(&path) {
            continue;
        }
        if path.is_dir() {
            fs::remove_dir_all(&path).at(&path)?;
        } else {
            fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn point(epoch: u64, at_s: u64) -> PointRecord {
        PointRecord {
            epoch,
            at_ns: at_s * 1_000_000_000,
            ..Default::default()
        }
    }

    fn grid() -> Retention {
        let s = Duration::from_secs;
        Retention::new(vec![(s(1), s(10)), (s(60), s(3600))], None)
    }

    #[test]
    fn recent_points_all_stay_older_ones_thin_to_one_per_step_the_oldest_expire() {
        let now = 10_000u64;
        let mut points: Vec<PointRecord> = (0..5).map(|i| point(i + 10, now - 5 + i)).collect();
        assert_eq!(
            next(&grid(), &points, now * 1_000_000_000, &HashSet::new()),
            None
        );
        // Two points in one minute, 20 and 30 minutes old: the newer goes.
        points.insert(0, point(2, now - 1790));
        points.insert(0, point(1, now - 1795));
        let at = (now - 1795) / 60;
        assert_eq!(
            (now - 1790) / 60,
            at,
            "the test's two points share a minute"
        );
        assert_eq!(
            next(&grid(), &points, now * 1_000_000_000, &HashSet::new()),
            Some(1)
        );
        // Pinned, it stays.
        let pinned = HashSet::from([2]);
        assert_eq!(next(&grid(), &points, now * 1_000_000_000, &pinned), None);
        // Older than every span: the oldest goes first.
        points.insert(0, point(0, now - 7200));
        assert_eq!(
            next(&grid(), &points, now * 1_000_000_000, &HashSet::new()),
            Some(0)
        );
    }

    #[test]
    fn the_space_cap_lets_the_oldest_go_and_the_newest_always_stays() {
        let s = Duration::from_secs;
        let keep = Retention::new(vec![(s(1), s(3600))], Some(100));
        let mut points: Vec<PointRecord> = (0..3).map(|i| point(i + 1, 1000 + i)).collect();
        points[0].undo_bytes = 80;
        points[1].undo_bytes = 80;
        let now = 1003 * 1_000_000_000;
        assert_eq!(next(&keep, &points, now, &HashSet::new()), Some(0));
        points.remove(0);
        assert_eq!(next(&keep, &points, now, &HashSet::new()), None);
        let none = Retention::new(vec![], None);
        assert!(!none.keeps_history());
    }
}
