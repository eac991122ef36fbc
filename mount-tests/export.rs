//! `hbrfs export` end to end: a primary writes qemu-io patterns in rounds,
//! a real secondary keeps a point per round, and the exports of those
//! points (a full one, then each the change since the one before, chained
//! as backing files) are checked with `qemu-img check`, `qemu-img compare`
//! against a copy of the primary image taken while that point was the
//! newest, and `qemu-img map` for what each layer allocates. The exports
//! run while the primary keeps writing, so the secondary applies new points
//! under them.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    BLOCK, Mount, differing_blocks, hbrfs, json_u64, path_str, read, run, stderr, sync_file,
    temp_dir, write_ranges,
};
use crate::replication::{
    APPLY_TIMEOUT, MIB, Secondary, Until, primary_for, qemu_io, wait_applied,
};

/// Keep every point for the test's length, so none is thinned away.
const KEEP: [&str; 2] = ["--keep", "1ms:1h"];

/// A round of writes, waited until applied: the point it made, and the
/// content of each image right then (the primary is quiet until the next
/// round, so the copy is the point's content).
struct Round {
    epoch: u64,
    disk: Vec<u8>,
    swap: Vec<u8>,
}

/// Writes `cmds` with qemu-io into the raw `disk.img`, runs `more`, waits
/// until the secondary applied it all, and keeps the images' content.
fn round(m: &Mount, sec: &Secondary, cmds: &[&str], more: impl FnOnce()) -> Round {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io("raw", "none", &cmds, &m.mnt("disk.img"));
    more();
    sync_file(&m.mnt("disk.img"));
    let status = wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    Round {
        epoch: json_u64(&status["replication"]["last_applied_epoch"]),
        disk: read(&m.back("disk.img")),
        swap: read(&m.back("swap.img")),
    }
}

/// `hbrfs export REPLICA ARGS…`, whatever it answers.
fn export(sec: &Secondary, args: &[&str]) -> Output {
    Command::new(hbrfs())
        .arg("export")
        .arg(&sec.replica)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hbrfs export")
}

/// The arguments of an export of `image` at `point` to `out`; with
/// `since` (point, backing file), of the change since that point.
fn args<'a>(
    point: &'a str,
    since: Option<(&'a str, &'a str)>,
    image: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    let mut args = vec!["--point", point, "--image", image];
    if let Some((p1, backing)) = since {
        args.extend(["--since", p1, "--backing", backing]);
    }
    args.push(out);
    args
}

/// `hbrfs export` that must succeed; returns its stdout and stderr.
fn export_ok(sec: &Secondary, args: &[&str]) -> String {
    let out = export(sec, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert!(out.status.success(), "hbrfs export {args:?}: {text}");
    text
}

/// `hbrfs export` that must fail saying `needle`, leaving no output file.
fn export_refused(sec: &Secondary, args: &[&str], out: &Path, needle: &str) {
    let existed = out.exists();
    let o = export(sec, args);
    let err = stderr(&o);
    assert!(!o.status.success(), "hbrfs export {args:?} succeeded");
    assert!(
        err.contains(needle),
        "hbrfs export {args:?}: {err:?} lacks {needle:?}"
    );
    assert_eq!(out.exists(), existed, "{args:?} changed {}", out.display());
    let mut tmp = out.as_os_str().to_os_string();
    tmp.push(".tmp");
    assert!(!PathBuf::from(tmp).exists(), "{args:?} left a .tmp");
}

/// `qemu-img check` finds no error and no leak.
fn assert_clean(image: &Path) {
    let out = run(Command::new("qemu-img").arg("check").arg(image));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("No errors were found"),
        "{}: {said}",
        image.display()
    );
}

/// The chain topped by `top` reads exactly `expected`, and is its size
/// (qemu counts in 512-byte sectors).
fn assert_chain_reads(top: &Path, expected: &[u8], dir: &Path) {
    let raw = dir.join("expected.raw");
    fs::write(&raw, expected).expect("write expected raw");
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(top)
        .arg(&raw));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("identical"), "{}: {said}", top.display());
    fs::remove_file(&raw).expect("remove expected raw");
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(top));
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    let want = (expected.len() as u64).next_multiple_of(512);
    assert_eq!(json_u64(&info["virtual-size"]), want, "{}", top.display());
}

/// The guest blocks `top` itself (not its backing) holds data for, and
/// those it marks as zeros.
fn layer(top: &Path) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(top));
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");
    let (mut data, mut zero) = (BTreeSet::new(), BTreeSet::new());
    for e in map.iter().filter(|e| json_u64(&e["depth"]) == 0) {
        let (start, len) = (json_u64(&e["start"]), json_u64(&e["length"]));
        let blocks = start / BLOCK..(start + len).div_ceil(BLOCK);
        // An unallocated cluster of a standalone image is depth 0 but not
        // present; a zero cluster is.
        match (e["data"].as_bool(), e["present"].as_bool()) {
            (Some(true), _) => data.extend(blocks),
            (_, Some(true)) => zero.extend(blocks),
            _ => {}
        }
    }
    (data, zero)
}

/// The blocks of `content` that are not all zeros.
fn nonzero(content: &[u8], among: impl Iterator<Item = u64>) -> BTreeSet<u64> {
    among
        .filter(|&b| {
            let at = (b * BLOCK) as usize;
            content[at..content.len().min(at + BLOCK as usize)]
                .iter()
                .any(|&x| x != 0)
        })
        .collect()
}

/// Checks the export `top` of `now` chained over the export of `before`
/// (or standalone): clean, reads `now` exactly, and holds data for exactly
/// the non-zero blocks that changed (all of them when `full`).
fn check_layer(top: &Path, before: Option<&[u8]>, now: &[u8], full: bool, dir: &Path) {
    assert_clean(top);
    assert_chain_reads(top, now, dir);
    let all = 0..(now.len() as u64).div_ceil(BLOCK);
    let changed = match before {
        Some(before) if !full => differing_blocks(before, now, BLOCK),
        _ => all.collect(),
    };
    let (data, zero) = layer(top);
    let want = nonzero(now, changed.iter().copied());
    let size = fs::metadata(top).expect("stat export").len();
    println!(
        "{}: {} data clusters, {} zero clusters, {size} bytes",
        top.display(),
        data.len(),
        zero.len()
    );
    assert_eq!(data, want, "{}: data clusters", top.display());
    let became_zero: BTreeSet<u64> = changed.difference(&want).copied().collect();
    let old_len = before.map_or(0, |b| (b.len() as u64).div_ceil(BLOCK));
    let must_zero: BTreeSet<u64> = became_zero.into_iter().filter(|&b| b < old_len).collect();
    assert!(
        zero.is_superset(&must_zero) && zero.iter().all(|&b| b < old_len),
        "{}: zero clusters {zero:?}, must hide {must_zero:?} of the backing",
        top.display()
    );
    // Header, data, tables: a few clusters beyond the data.
    assert!(
        size <= (data.len() as u64 + 8) * BLOCK,
        "{}: {size} bytes",
        top.display()
    );
}

/// Writes to `disk.img` through the mount until stopped, so the secondary
/// keeps applying points while exports read older ones.
fn keep_writing(m: &Mount) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let path = m.mnt("disk.img");
    let flag = stop.clone();
    let writer = thread::spawn(move || {
        let mut i = 0;
        while !flag.load(Ordering::Relaxed) {
            write_ranges(&path, &[(2 * MIB + i % 16 * BLOCK, BLOCK)], BLOCK);
            i += 1;
            sleep(Duration::from_millis(100));
        }
    });
    (stop, writer)
}

/// Exports `image` at each round's point into `dir`: the first in full,
/// each next as the change since the one before over its export; checks
/// each layer against `content` of its round. Returns which exports wrote
/// every block over their backing (a replaced file).
fn export_chain(
    sec: &Secondary,
    image: &str,
    rounds: &[&Round],
    content: fn(&Round) -> &[u8],
    dir: &Path,
) -> Vec<bool> {
    let name = format!("{image}.img");
    let mut fallbacks = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        let out = dir.join(format!("{image}-{}.qcow2", r.epoch));
        let point = r.epoch.to_string();
        let prev = i.checked_sub(1).map(|j| rounds[j]);
        let since = prev.map(|p| p.epoch.to_string());
        let backing = since.as_ref().map(|s| format!("{image}-{s}.qcow2"));
        let since = since.as_deref().zip(backing.as_deref());
        let said = export_ok(sec, &args(&point, since, &name, path_str(&out)));
        let full = said.contains("replaced or re-created");
        if full {
            assert!(said.contains("every block"), "{said}");
        }
        check_layer(&out, prev.map(content), content(r), full, dir);
        fallbacks.push(full);
    }
    fallbacks
}

#[test]
fn export_chain_of_three_points_reads_each_point_and_holds_only_changed_blocks() {
    let sec = Secondary::start_with_args(&KEEP);
    let m = primary_for(&sec, &sec.addr, &[]);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(m.mnt("disk.img"))
        .arg("32M"));
    write_ranges(&m.mnt("swap.img"), &[(0, 3 * BLOCK + 100)], BLOCK);
    let r1 = round(
        &m,
        &sec,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 5M 64k",
            "write -P 0x33 10489856 8192",
            "write -P 0x44 31M 1M",
        ],
        || {},
    );
    // Zeroes data (5M, 10M) and beyond it; replaces swap.img by a rename.
    let r2 = round(
        &m,
        &sec,
        &[
            "write -P 0x55 512k 256k",
            "write -z 5M 64k",
            "write -z 10M 1M",
            "write -P 0x66 20M 128k",
        ],
        || {
            write_ranges(&m.mnt("swap.new"), &[(BLOCK, 2 * BLOCK)], BLOCK);
            fs::rename(m.mnt("swap.new"), m.mnt("swap.img")).expect("replace swap.img");
        },
    );
    // Grows the image, writes past the old end and over the start.
    run(Command::new("qemu-img")
        .args(["resize", "-q", "-f", "raw"])
        .arg(m.mnt("disk.img"))
        .arg("48M"));
    let r3 = round(
        &m,
        &sec,
        &["write -P 0x77 40M 1M", "write -P 0x88 0 64k"],
        || {},
    );
    assert!(r1.epoch < r2.epoch && r2.epoch < r3.epoch);

    let (stop, writer) = keep_writing(&m);
    // The exports below run while points keep applying: wait for the first.
    let deadline = std::time::Instant::now() + APPLY_TIMEOUT;
    while sec.applied_epoch() <= r3.epoch {
        assert!(
            std::time::Instant::now() < deadline,
            "no point applied while writing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = temp_dir();
    let rounds = [&r1, &r2, &r3];
    let disk = export_chain(&sec, "disk", &rounds, |r| &r.disk, dir.path());
    assert_eq!(disk, [false; 3], "disk.img stayed one file");
    // swap.img at round 2 is another file: written in full over round 1's.
    let swap = export_chain(&sec, "swap", &rounds, |r| &r.swap, dir.path());
    assert_eq!(swap, [false, true, false]);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
}

#[test]
fn export_refuses_unknown_points_reversed_ranges_existing_files_and_ambiguous_images() {
    let sec = Secondary::start_with_args(&KEEP);
    let m = primary_for(&sec, &sec.addr, &[]);
    write_ranges(&m.mnt("swap.img"), &[(0, BLOCK)], BLOCK);
    run(Command::new("truncate")
        .args(["-s", "4M"])
        .arg(m.mnt("disk.img")));
    let r1 = round(&m, &sec, &["write -P 0x11 0 1M"], || {});
    let r2 = round(&m, &sec, &["write -P 0x22 1M 64k"], || {});
    let (p1, p2) = (r1.epoch.to_string(), r2.epoch.to_string());
    let dir = temp_dir();
    let out = dir.path().join("out.qcow2");
    let o = path_str(&out);

    export_refused(&sec, &[o], &out, "holds 2 files: name one with --image");
    export_refused(
        &sec,
        &["--image", "nope.img", o],
        &out,
        "no regular file \"nope.img\"",
    );
    export_refused(
        &sec,
        &["--point", "999999", "--image", "disk.img", o],
        &out,
        "no kept point",
    );
    let reversed = args(&p1, Some((&p2, "b.qcow2")), "disk.img", o);
    export_refused(&sec, &reversed, &out, "is newer than --point");
    let missing = args(&p2, Some((&p1, "b.qcow2")), "disk.img", o);
    export_refused(&sec, &missing, &out, "does not exist");
    export_refused(
        &sec,
        &["--since", &p1, "--image", "disk.img", o],
        &out,
        "--backing",
    );

    // The export of another image is no backing for this one.
    let swap1 = dir.path().join("swap1.qcow2");
    export_ok(&sec, &args(&p1, None, "swap.img", path_str(&swap1)));
    let wrong = args(&p2, Some((&p1, "swap1.qcow2")), "disk.img", o);
    export_refused(&sec, &wrong, &out, "it is not the export of disk.img");

    // An existing file is never overwritten, its own backing least of all.
    fs::write(&out, b"keep me").expect("write out");
    export_refused(&sec, &["--image", "disk.img", o], &out, "exists");
    assert_eq!(read(&out), b"keep me");
    let onto_backing = args(
        &p2,
        Some((&p1, "swap1.qcow2")),
        "swap.img",
        path_str(&swap1),
    );
    export_refused(&sec, &onto_backing, &swap1, "exists");
    assert_clean(&swap1);
}
