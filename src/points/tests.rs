//! The points core on a real folder: applies are played by hand through
//! the undo writer (as `replica::apply` does), then every kept point is
//! read back through a view, after thinning and after a rollback.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::ids::Epoch;
use crate::proto::points::PointRecord;
use crate::state::{ReplicaPaths, now_ns};

const BS: u64 = 4096;

fn block(byte: u8) -> Vec<u8> {
    vec![byte; BS as usize]
}

fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open")
}

/// Plays one point: `change` gets the undo writer, then the point is
/// recorded at `at_ns`.
fn point(
    keeper: &PointKeeper,
    root: &Path,
    epoch: u64,
    at_ns: u64,
    change: impl FnOnce(&mut undo::UndoWriter),
) {
    let mut undo = keeper.undo_before(Epoch(epoch), BS).expect("undo");
    if let Some(undo) = undo.as_mut() {
        change(undo);
    }
    let record = PointRecord {
        epoch,
        at_ns,
        ..Default::default()
    };
    keeper
        .applied(root, record, undo.as_mut())
        .expect("applied");
}

/// Overwrites block `b` of `path` with `byte`, saving it first.
fn write(undo: &mut undo::UndoWriter, path: &Path, b: u64, byte: u8) {
    let f = rw(path);
    let ino = f.metadata().expect("stat").ino();
    undo.save(&f, ino, b, false, path).expect("save");
    undo.sync().expect("sync");
    f.write_all_at(&block(byte), b * BS).expect("write");
}

/// The content of `path` in point `epoch`, or `None` if it has no such
/// file.
fn read(root: &Path, epoch: u64, path: &str) -> Option<Vec<u8>> {
    let view = PointView::open(root, epoch, BS).expect("view");
    let e = view
        .entries()
        .iter()
        .find(|e| e.path == path.as_bytes())?
        .clone();
    let mut buf = vec![0u8; e.size as usize + 100];
    let n = view.read(e.ino, e.size, 0, &mut buf).expect("read");
    buf.truncate(n);
    Some(buf)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn every_kept_point_reads_back_exact_after_overwrites_truncates_removals_thinning_and_rollback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (a, b) = (root.join("a"), root.join("b"));
    fs::write(&a, cat(&[&block(1), &block(1), &block(1)])).expect("a");
    fs::write(&b, block(0xb)).expect("b");
    let paths = PointsPaths::new(ReplicaPaths::of(root).points());
    let s = Duration::from_secs;
    let keeper = PointKeeper::open(paths.clone(), Retention::new(vec![(s(1), s(3600))], None))
        .expect("keeper");
    let t0 = now_ns() - 60_000_000_000;
    let sec = 1_000_000_000;
    point(&keeper, root, 1, t0, |_| {});
    point(&keeper, root, 2, t0 + 2 * sec, |u| write(u, &a, 1, 2));
    point(&keeper, root, 3, t0 + 4 * sec, |u| {
        let f = rw(&a);
        let ino = f.metadata().expect("stat").ino();
        u.save_tail(&f, ino, BS + BS / 2, &a).expect("tail");
        f.set_len(BS + BS / 2).expect("truncate");
        let parent = File::open(root).expect("root");
        let st = crate::sys::statat(parent.as_fd(), "b".as_ref()).expect("stat b");
        u.keep_removed(parent.as_fd(), "b".as_ref(), &st)
            .expect("keep b");
        fs::remove_file(&b).expect("rm b");
        fs::write(root.join("c"), block(0xc)).expect("c");
    });
    point(&keeper, root, 4, t0 + 6 * sec, |u| {
        fs::rename(root.join("c"), root.join("d")).expect("rename");
        write(u, &a, 0, 4);
    });
    let p1 = cat(&[&block(1), &block(1), &block(1)]);
    let p2 = cat(&[&block(1), &block(2), &block(1)]);
    let p3 = cat(&[&block(1), &block(2)[..BS as usize / 2]]);
    let p4 = cat(&[&block(4), &block(2)[..BS as usize / 2]]);
    let check = |kept_4: bool| {
        assert_eq!(read(root, 1, "a"), Some(p1.clone()), "a at point 1");
        assert_eq!(
            read(root, 1, "b"),
            Some(block(0xb)),
            "b at point 1 (removed later)"
        );
        assert_eq!(read(root, 2, "a"), Some(p2.clone()), "a at point 2");
        assert_eq!(
            read(root, 3, "a"),
            Some(p3.clone()),
            "a at point 3 (truncated)"
        );
        assert_eq!(read(root, 3, "b"), None, "b is gone at point 3");
        assert_eq!(
            read(root, 3, "c"),
            Some(block(0xc)),
            "c at point 3 (renamed later)"
        );
        if kept_4 {
            assert_eq!(read(root, 4, "a"), Some(p4.clone()), "a at point 4");
        }
    };
    check(true);
    // A view of the newest point opened before the next applies stays
    // that point.
    let newest = PointView::open(root, 4, BS).expect("view of point 4");
    let ino = newest
        .entries()
        .iter()
        .find(|e| e.path == b"a")
        .expect("a")
        .ino;
    let mut first = vec![0u8; BS as usize];
    newest.read(ino, BS, 0, &mut first).expect("read");
    // Two more points in the same second as point 4: the middle one is
    // thinned into point 4, which still composes exactly.
    point(&keeper, root, 5, t0 + 6 * sec + 100, |u| write(u, &a, 0, 5));
    newest.read(ino, BS, 0, &mut first).expect("read again");
    assert_eq!(first, block(4), "a view of point 4 shows point 5's write");
    drop(newest);
    point(&keeper, root, 6, t0 + 6 * sec + 200, |u| write(u, &a, 0, 6));
    let kept: Vec<u64> = keeper.list().iter().map(|p| p.epoch).collect();
    assert_eq!(kept, [1, 2, 3, 4, 6], "point 5 is thinned into point 4");
    assert_eq!(keeper.list()[3].thinned, 1);
    check(true);
    drop(keeper);
    // Back to point 2: the live folder is point 2 again.
    let back = rollback_to(root, Epoch(2), BS).expect("rollback");
    assert_eq!(fs::read(&a).expect("a"), p2);
    assert_eq!(fs::read(&b).expect("b"), block(0xb));
    assert!(!root.join("d").exists() && !root.join("c").exists());
    assert!(
        back.blocks
            .iter()
            .any(|(p, blocks)| p == b"a" && blocks.contains(&0))
    );
    let kept: Vec<u64> = read_catalog(&paths)
        .expect("catalog")
        .iter()
        .map(|p| p.epoch)
        .collect();
    assert_eq!(kept, [1, 2]);
    assert_eq!(read(root, 1, "a"), Some(p1));
}

/// With `--rpo` a ceiling, an idle link gets a point per change: points
/// every 10 ms (ten seconds of them here; a minute's, 6000, kept 62 in a
/// run by hand) must leave the grid's one point a second, not hundreds,
/// with a catalog (rewritten per point) that does not grow with the
/// points thinned, and every kept point still composes.
#[test]
fn a_point_every_10_ms_keeps_one_a_second_and_a_small_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = root.join("a");
    fs::write(&a, cat(&[&block(0), &block(0)])).expect("a");
    let paths = PointsPaths::new(ReplicaPaths::of(root).points());
    let s = Duration::from_secs;
    // Retention::DEFAULT, "1s:1h,1m:24h,1h:7d".
    let grid = vec![(s(1), s(3600)), (s(60), s(86400)), (s(3600), s(7 * 86400))];
    let keeper = PointKeeper::open(paths.clone(), Retention::new(grid, None)).expect("keeper");
    let (points, step) = (1000u64, 10_000_000u64);
    let t0 = now_ns() - points * step;
    let started = std::time::Instant::now();
    for epoch in 1..=points {
        point(&keeper, root, epoch, t0 + epoch * step, |u| {
            write(u, &a, epoch % 2, epoch as u8)
        });
    }
    let took = started.elapsed();
    let kept = keeper.list();
    assert!(
        (9..=12).contains(&kept.len()),
        "{} points kept of {points} over 10 s",
        kept.len()
    );
    let thinned: u64 = kept.iter().map(|p| p.thinned).sum();
    assert_eq!(
        thinned + kept.len() as u64,
        points,
        "every point is kept or counted"
    );
    let catalog = fs::metadata(paths.catalog()).expect("catalog").len();
    assert!(
        catalog < 100 * kept.len() as u64,
        "the catalog is {catalog} bytes for {} points",
        kept.len()
    );
    eprintln!(
        "{points} points in {took:?} ({:?} per point): {} kept, catalog {catalog} bytes",
        took / points as u32,
        kept.len()
    );
    // Kept points compose through every merged undo: block `b` holds the
    // last byte written to it up to that point (point 1 writes nothing:
    // there is no undo writer before a first point).
    for p in [&kept[0], &kept[kept.len() / 2]] {
        let last_to = |b: u64| {
            (2..=p.epoch)
                .rev()
                .find(|e| e % 2 == b)
                .map_or(0, |e| e as u8)
        };
        let have = read(root, p.epoch, "a").expect("a in the point");
        let firsts: Vec<u8> = have.chunks(BS as usize).map(|c| c[0]).collect();
        assert_eq!(
            firsts,
            [last_to(0), last_to(1)],
            "point {} (thinned {}) of {:?}",
            p.epoch,
            p.thinned,
            kept.iter().map(|p| p.epoch).collect::<Vec<_>>()
        );
    }
}
