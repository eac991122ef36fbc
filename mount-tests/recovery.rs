//! Recovery points on a real secondary: every kept point reads back
//! exactly what the primary held when it was cut, while points keep
//! applying, retention thins and expires them, and the secondary is
//! killed in the middle of an apply (after some blocks are overwritten)
//! or of a thinning.
//!
//! Each round writes through the primary's mount, fsyncs, cuts and waits
//! until the secondary applied it, then keeps a copy of the image as the
//! expected content of that epoch. Points are read through
//! `points::PointView` in this process (the library, as `mount-point`
//! and `.points/` use it), holding the points lock like any view.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hbrfs::points::PointView;
use serde_json::Value;

use crate::harness::*;
use crate::replication::{
    APPLY_TIMEOUT, Secondary, Until, primary_for, repl_counter, wait_applied,
};

const IMAGE: &str = "disk.img";
const BS: u64 = 64 * 1024;
/// Blocks in the image.
const BLOCKS: u64 = 64;

/// `hbrfs points ls REPLICA --json`.
fn points_ls(replica: &Path) -> Vec<Value> {
    let out = run(Command::new(hbrfs())
        .arg("points")
        .arg(replica)
        .args(["ls", "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).expect("points ls prints JSON");
    v.as_array().cloned().unwrap_or_default()
}

/// The content of the image in point `epoch`, read through a view.
fn point_image(replica: &Path, epoch: u64) -> Vec<u8> {
    let view = PointView::open(replica, epoch, BS)
        .unwrap_or_else(|e| panic!("view of point {epoch}: {e}"));
    let e = view
        .entries()
        .iter()
        .find(|e| e.path == IMAGE.as_bytes())
        .unwrap_or_else(|| panic!("point {epoch} has no {IMAGE}"))
        .clone();
    let mut buf = vec![0u8; e.size as usize];
    let n = view.read(e.ino, e.size, 0, &mut buf).expect("read a point");
    assert_eq!(n as u64, e.size, "short read of point {epoch}");
    buf
}

/// Writes round `k` (one block overwritten; every fifth round also
/// grows the image by a block, every seventh cuts it back), cuts, waits
/// until it applied; returns (its epoch, the image's content then).
fn round(m: &Mount, sec: &Secondary, k: u64) -> (u64, Vec<u8>) {
    let f = open_rw(&m.mnt(IMAGE));
    let len = f.metadata().expect("stat").len();
    let at = (k * 7919 % BLOCKS) * BS;
    f.write_all_at(&pattern(BS as usize, 1000 + k), at)
        .expect("write");
    if k % 5 == 0 {
        f.write_all_at(&pattern(BS as usize, 5000 + k), len)
            .expect("grow");
    } else if k % 7 == 0 && len > BLOCKS * BS {
        f.set_len(len - BS / 2).expect("shrink");
    }
    f.sync_all().expect("fsync");
    drop(f);
    m.cut();
    let p = wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    (repl_counter(&p, "last_applied_epoch"), read(&m.back(IMAGE)))
}

/// The expected image of kept point `epoch`: that of the last round
/// applied at or before it (`None` before the first round).
fn expected(rounds: &[(u64, Vec<u8>)], epoch: u64) -> Option<&Vec<u8>> {
    rounds
        .iter()
        .rev()
        .find(|(e, _)| *e <= epoch)
        .map(|(_, c)| c)
}

/// Every kept point that holds a round reads back exactly; returns how
/// many were checked.
fn check_points(replica: &Path, rounds: &[(u64, Vec<u8>)]) -> usize {
    let mut checked = 0;
    for p in points_ls(replica) {
        let epoch = json_u64(&p["epoch"]);
        if let Some(want) = expected(rounds, epoch) {
            let got = point_image(replica, epoch);
            assert!(
                got == *want,
                "point {epoch} differs from the primary's image at that point"
            );
            checked += 1;
        }
    }
    checked
}

/// A primary with one image of `BLOCKS` blocks replicating to `sec`.
fn primary_with_image(sec: &Secondary) -> Mount {
    // Each round's writes (a block, a growth or a cut back; the whole
    // image once) must land in one point, as the expected images assume:
    // a cut 1 s after the first change keeps them together.
    let m = primary_for(sec, &sec.addr, &["--coalesce", "1s"]);
    fs::write(m.mnt(IMAGE), pattern((BLOCKS * BS) as usize, 1)).expect("write image");
    sync_file(&m.mnt(IMAGE));
    m
}

#[test]
fn kept_points_read_back_exact_while_applies_thin_and_expire_them() {
    // Every point for 2 s, one per 3-second slot up to 8 s, none older.
    let sec = Secondary::start_with_args(&["--keep", "1s:2s,3s:8s"]);
    let m = primary_with_image(&sec);
    let mut rounds = Vec::new();
    let start = Instant::now();
    let mut k = 0;
    while start.elapsed() < Duration::from_secs(14) {
        rounds.push(round(&m, &sec, k));
        if k % 6 == 5 {
            // Points read back while later ones apply.
            check_points(&sec.replica, &rounds);
        }
        k += 1;
    }
    let kept = points_ls(&sec.replica);
    let checked = check_points(&sec.replica, &rounds);
    assert!(
        checked >= 3,
        "only {checked} kept points to check: {kept:?}"
    );
    assert!(
        kept.len() < rounds.len(),
        "{} rounds, {} points kept: nothing was thinned or expired",
        rounds.len(),
        kept.len()
    );
    let newest = json_u64(&kept.last().expect("a kept point")["at_ns"]);
    for p in &kept {
        let age = Duration::from_nanos(newest - json_u64(&p["at_ns"]));
        assert!(
            age < Duration::from_secs(12),
            "a point {age:?} older than the newest is kept: {kept:?}"
        );
    }
    // Between 2 s and 8 s old, one point per 3-second slot at most.
    let slots: Vec<u64> = kept
        .iter()
        .map(|p| json_u64(&p["at_ns"]))
        .filter(|&t| newest - t > 3_000_000_000)
        .map(|t| t / 3_000_000_000)
        .collect();
    let mut unique = slots.clone();
    unique.dedup();
    assert_eq!(
        slots, unique,
        "two kept points share a 3-second slot: {kept:?}"
    );
}

/// Rounds until the image holds `n` applied rounds.
fn rounds(m: &Mount, sec: &Secondary, ks: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
    ks.map(|k| round(m, sec, k)).collect()
}

/// Kills the secondary at `crash_point` in the apply of a point that
/// rewrites the whole image (several batches of undo), checks it left
/// `record` (`inflight`: a point to roll back; `redo`: one to finish),
/// and that after a restart every point is exact and the replica catches
/// up.
fn killed_in_an_apply_keeps_every_point_exact(crash_point: &str, record: &str) {
    let mut sec = Secondary::start();
    let m = primary_with_image(&sec);
    let mut done = rounds(&m, &sec, 0..3);
    sec.stop();
    sec.crash_point = Some(crash_point.into());
    sec.restart();
    let f = open_rw(&m.mnt(IMAGE));
    f.write_all_at(&pattern((BLOCKS * BS) as usize, 77), 0)
        .expect("rewrite");
    f.sync_all().expect("fsync");
    drop(f);
    m.cut();
    sec.wait_crashed(APPLY_TIMEOUT);
    assert!(
        sec.rep(&format!(".hbrfs/{record}")).exists(),
        "the crash at {crash_point} left no {record} record"
    );
    sec.crash_point = None;
    sec.restart();
    let p = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    done.push((repl_counter(&p, "last_applied_epoch"), read(&m.back(IMAGE))));
    done.extend(rounds(&m, &sec, 3..5));
    assert!(
        check_points(&sec.replica, &done) >= 5,
        "points lost: {:?}",
        points_ls(&sec.replica)
    );
    assert_replica_matches(&m.backing, &sec.replica);
}

/// Killed while blocks are written in place: the point is rolled back at
/// restart (what arrived kept for the primary to resume).
#[test]
fn a_secondary_killed_in_the_middle_of_an_apply_keeps_every_point_exact() {
    killed_in_an_apply_keeps_every_point_exact("apply-blocks", "inflight");
}

/// Killed right after the commit point: the point is finished at restart.
#[test]
fn a_secondary_killed_after_the_commit_point_finishes_the_point_exact() {
    killed_in_an_apply_keeps_every_point_exact("committed", "redo");
}

#[test]
fn a_secondary_killed_in_the_middle_of_a_thinning_keeps_every_point_exact() {
    // One point per 2-second slot: the second point of a slot thins the
    // first into the one before it.
    let mut sec = Secondary::start_with_args(&["--keep", "2s:1h"]);
    sec.stop();
    sec.crash_point = Some("thin".into());
    sec.restart();
    let m = primary_with_image(&sec);
    let mut done = Vec::new();
    let mut k = 0;
    // Rounds until the secondary aborts in its first thinning.
    let crashed = loop {
        let f = open_rw(&m.mnt(IMAGE));
        f.write_all_at(&pattern(BS as usize, 3000 + k), (k % BLOCKS) * BS)
            .expect("write");
        f.sync_all().expect("fsync");
        drop(f);
        m.cut();
        k += 1;
        std::thread::sleep(Duration::from_millis(100));
        if k > 100 {
            break false;
        }
        if !sec.is_running() {
            break true;
        }
    };
    assert!(crashed, "no thinning happened in 100 rounds\n{}", sec.log());
    sec.wait_crashed(APPLY_TIMEOUT);
    sec.crash_point = None;
    sec.restart();
    let p = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    done.push((repl_counter(&p, "last_applied_epoch"), read(&m.back(IMAGE))));
    done.extend(rounds(&m, &sec, 100..115));
    assert!(
        check_points(&sec.replica, &done) >= 2,
        "points lost: {:?}",
        points_ls(&sec.replica)
    );
    assert_replica_matches(&m.backing, &sec.replica);
}
