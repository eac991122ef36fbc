//! A full file system never stalls in silence and never costs a restart
//! or a full resync (issue 9, items 2 and 4): a secondary whose replica
//! folder is a small tmpfs, a primary whose state folder or backing
//! folder is full. Each failure is shown with its cause, nothing is
//! skipped or marked applied, and once space is freed the point lands
//! byte for byte without restarting either daemon.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Mount, errno, json_u64, pattern, read, run, sync_file, temp_dir};
use crate::replication::{
    APPLY_TIMEOUT, MIB, Secondary, Until, assert_same_bytes, primary_for, primary_on,
    primary_status, wait_applied, wait_last_error,
};

/// How long a cause may take to show on both sides.
const SHOWN: Duration = Duration::from_secs(30);

/// Writes `mib` MiB of incompressible bytes to `rel` on the mount and
/// fsyncs it.
fn write_big(m: &Mount, rel: &str, mib: u64) {
    let p = m.mnt(rel);
    fs::write(&p, pattern((mib * MIB) as usize, mib)).expect("write big file");
    sync_file(&p);
}

/// Polls the secondary's `status` until its `last_error` names `needle`.
fn wait_secondary_error(sec: &Secondary, needle: &str) -> Value {
    let deadline = Instant::now() + SHOWN;
    loop {
        let s = sec.status();
        let e = s["counters"]["last_error"].as_str().unwrap_or("");
        if e.contains(needle) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary's status does not name {needle:?}:\n{s:#}\n--- log ---\n{}",
            sec.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both sides say the replica's file system is full; returns the epoch
/// the replica stays at meanwhile.
fn assert_stuck_on_space(m: &Mount, sec: &Secondary) -> u64 {
    let needle = format!("no space left on {}", sec.replica.display());
    let primary = wait_last_error(m, &needle, SHOWN);
    assert!(primary.starts_with("secondary: "), "{primary}");
    let s = wait_secondary_error(sec, &needle);
    assert!(
        !sec.log().contains("skipped"),
        "the secondary skipped something\n{}",
        sec.log()
    );
    json_u64(&s["last_applied_epoch"])
}

/// A baseline of one small file, applied.
fn baseline(m: &Mount, sec: &Secondary) {
    write_big(m, "small.img", 1);
    wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
}

/// The replica does not hold the point that `big.img` is in.
fn assert_not_applied(m: &Mount, sec: &Secondary, stuck: u64) {
    let shipped = json_u64(&primary_status(m)["replication"]["last_applied_epoch"]);
    assert!(shipped <= stuck, "the primary counts a point applied");
    assert_eq!(sec.applied_epoch(), stuck, "{}", sec.log());
}

/// A secondary on a tmpfs of `size` that a 64 MiB point overfills (the
/// point is rolled back, nothing is committed), killed and restarted
/// while stuck, then given space: the point lands whole.
fn overfill_kill_and_free(size: &str) {
    let mut sec = Secondary::start_on_tmpfs(size);
    let m = primary_for(&sec, &sec.addr, &[]);
    baseline(&m, &sec);
    write_big(&m, "big.img", 64);
    let stuck = assert_stuck_on_space(&m, &sec);
    assert!(
        !sec.replica.join(".hbrfs/redo").exists(),
        "a point that did not fit was committed\n{}",
        sec.log()
    );
    // A crash of the secondary while stuck changes nothing: the point
    // fails again at the primary's resend, and the secondary serves anyway.
    sec.kill9();
    sec.restart();
    assert_eq!(assert_stuck_on_space(&m, &sec), stuck);
    assert_not_applied(&m, &sec, stuck);

    sec.resize("256m");
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    for f in ["big.img", "small.img"] {
        assert_same_bytes(&m.back(f), &sec.rep(f));
    }
    assert_eq!(sec.status()["counters"]["last_error"], "");
    assert!(!m.log().contains("full resync"), "{}", m.log());
}

#[test]
fn a_full_secondary_says_so_on_both_sides_and_catches_up_once_space_is_freed_across_a_kill() {
    // 64 MiB cannot be written on 40 MiB.
    overfill_kill_and_free("40m");
}

/// Each block is written once on the secondary (no staged copy): a 64 MiB
/// point lands on a 100 MiB replica file system, where staging it and
/// applying it would not both have fit.
#[test]
fn a_point_larger_than_half_the_free_space_lands_as_each_block_is_written_once() {
    let sec = Secondary::start_on_tmpfs("100m");
    let m = primary_for(&sec, &sec.addr, &[]);
    baseline(&m, &sec);
    write_big(&m, "big.img", 64);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    for f in ["big.img", "small.img"] {
        assert_same_bytes(&m.back(f), &sec.rep(f));
    }
    assert_eq!(sec.status()["counters"]["last_error"], "", "{}", sec.log());
}

/// A tmpfs of `size` mounted at `path` (made if needed) for as long as it
/// lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(path).expect("create tmpfs mountpoint");
        let opts = format!("size={size},mode=0700");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "hbrfs-test"])
            .arg(path));
        Tmpfs(path.to_path_buf())
    }

    /// Fills it: a file written until the file system says ENOSPC.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut f = File::create(&filler).expect("create filler");
        let chunk = vec![0xAAu8; MIB as usize];
        let err = loop {
            if let Err(e) = f.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(
            errno(&err),
            libc::ENOSPC,
            "filling {}: {err}",
            self.0.display()
        );
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The errno of an operation that must fail closed: ENOSPC (the state
/// folder is full) or EIO, never success.
fn assert_fails_closed<T: std::fmt::Debug>(what: &str, res: std::io::Result<T>) {
    let err = res.expect_err(&format!("{what} succeeded while nothing could track it"));
    assert!(
        matches!(errno(&err), libc::ENOSPC | libc::EIO),
        "{what}: {err}"
    );
}

#[test]
fn a_full_state_folder_fails_new_files_closed_and_they_replicate_once_space_is_freed() {
    let sec = Secondary::start();
    let dir = temp_dir();
    let backing = dir.path().join("backing");
    let bitmaps = Tmpfs::mount(&backing.join(".hbrfs/bitmaps"), "1m");
    let m = primary_on(&sec, &backing, &dir.path().join("mnt"));
    write_big(&m, "small.img", 1);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);

    let filler = bitmaps.fill();
    // A new file cannot get a bitmap: its create fails, it is not written
    // unmarked.
    assert_fails_closed(
        "create through the mount",
        fs::write(m.mnt("new.img"), b"new"),
    );
    // A file that appeared behind hbrfs's back cannot be tracked: its
    // lookup fails, so it cannot be opened and written unmarked.
    fs::write(backing.join("outside.img"), b"outside").expect("write in the backing");
    assert_fails_closed(
        "open of an untrackable file",
        File::open(m.mnt("outside.img")),
    );
    assert!(m.is_mounted(), "the daemon went down\n{}", m.log());
    assert_eq!(read(&m.mnt("small.img")).len() as u64, MIB);

    // Space back: the same operations work, and replicate, no restart.
    fs::remove_file(&filler).expect("remove filler");
    fs::write(m.mnt("new.img"), b"new").expect("create after space was freed");
    sync_file(&m.mnt("new.img"));
    assert_eq!(read(&m.mnt("outside.img")), b"outside");
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    for f in ["new.img", "outside.img", "small.img"] {
        assert_same_bytes(&m.back(f), &sec.rep(f));
    }
    drop(m);
}

#[test]
fn a_full_backing_file_system_fails_writes_with_enospc_and_what_was_written_replicates() {
    let sec = Secondary::start();
    let dir = temp_dir();
    let backing = Tmpfs::mount(&dir.path().join("backing"), "24m");
    let m = primary_on(&sec, &backing.0, &dir.path().join("mnt"));
    write_big(&m, "small.img", 1);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);

    // 32 MiB do not fit in 24: the write or its fsync says ENOSPC.
    let p = m.mnt("big.img");
    let res = fs::write(&p, pattern((32 * MIB) as usize, 7))
        .and_then(|()| File::open(&p).and_then(|f| f.sync_all()));
    let err = res.expect_err("32 MiB fit on a 24 MiB file system");
    assert_eq!(errno(&err), libc::ENOSPC, "{err}");
    assert!(m.is_mounted(), "the daemon went down\n{}", m.log());

    // What did land is marked and replicates.
    sync_file(&p);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.back("big.img"), &sec.rep("big.img"));
    assert_same_bytes(&m.back("small.img"), &sec.rep("small.img"));
    drop(m);
}
