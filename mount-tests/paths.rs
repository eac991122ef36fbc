//! Paths of any length and every name of a file, end to end (issue 9,
//! item 1): a primary replicating to a real secondary on loopback.
//!
//! Deep paths: folders of 255-byte names whose bottom file's path is
//! 4,095 bytes relative to the root, so the mountpoint, the backing or the
//! replica joined to it exceeds PATH_MAX. Every step walks with `openat`
//! from a descriptor, as a program `cd`-ing down would. Hard links: a
//! file with several names keeps them all on the replica, as links of one
//! inode, and writes to any name land.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::harness::{BLOCK, Mount, pattern, read, sync_file};
use crate::replication::{APPLY_TIMEOUT, Secondary, Until, pair, wait_applied};

/// Names of the folders down to the deep file: fifteen of 255 bytes and
/// one of 247, so that `…/vm1.img` is 4,095 bytes (PATH_MAX less its NUL).
fn deep_names() -> Vec<String> {
    let mut names: Vec<String> = (0..15)
        .map(|i| format!("{i:02}{}", "d".repeat(253)))
        .collect();
    names.push(format!("15{}", "e".repeat(245)));
    names
}

/// The deep file's name.
const DEEP_FILE: &str = "vm1.img";

fn cstr(name: &str) -> CString {
    CString::new(name).expect("no NUL")
}

/// Checks a libc return value.
fn ok(ret: libc::c_int, what: &str) -> libc::c_int {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
    ret
}

/// Opens `name` in the folder `dir` with `flags`.
fn open_at(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let name = cstr(name);
    // SAFETY: a valid C string; the fd returned is ours.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Walks down `names` from `root` (making each folder when `make`) and
/// returns the bottom folder, as `cd` step by step would.
fn walk_down(root: &Path, names: &[String], make: bool) -> OwnedFd {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let mut dir: OwnedFd = File::open(root)
        .unwrap_or_else(|e| panic!("open {}: {e}", root.display()))
        .into();
    for name in names {
        if make {
            let c = cstr(name);
            // SAFETY: a valid C string.
            ok(
                unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) },
                "mkdirat",
            );
        }
        dir = open_at(&dir, name, flags, 0)
            .unwrap_or_else(|e| panic!("openat {name:.8}… below {}: {e}", root.display()));
    }
    dir
}

/// Creates `name` in `dir` with `data`, chmods it 0600 and fsyncs it.
fn write_at(dir: &OwnedFd, name: &str, data: &[u8]) {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
    let mut f = File::from(open_at(dir, name, flags, 0o644).expect("create the deep file"));
    f.write_all(data).expect("write the deep file");
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .expect("chmod the deep file");
    f.sync_all().expect("fsync the deep file");
}

/// The content of `name` in `dir`, or `None` when it is not there.
fn read_at(dir: &OwnedFd, name: &str) -> Option<Vec<u8>> {
    let f = match open_at(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return None,
        Err(e) => panic!("open {name}: {e}"),
    };
    let mut data = Vec::new();
    File::from(f).read_to_end(&mut data).expect("read");
    Some(data)
}

/// The length of the deep file's path relative to the root.
fn deep_len() -> usize {
    deep_names().iter().map(|n| n.len() + 1).sum::<usize>() + DEEP_FILE.len()
}

/// A top-level file of the deep file's name, replicated, whose replica
/// must never be touched by what happens at the bottom.
fn top_level_decoy(m: &Mount, sec: &Secondary) -> Vec<u8> {
    let top = pattern(2 * BLOCK as usize + 17, 7);
    fs::write(m.mnt(DEEP_FILE), &top).expect("write the top-level file");
    sync_file(&m.mnt(DEEP_FILE));
    wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_eq!(read(&sec.rep(DEEP_FILE)), top);
    top
}

/// The replica's deep file holds `deep` (`None`: it is not there), and
/// its top-level file of the same name still holds `top`.
fn assert_replica(sec: &Secondary, deep: Option<&[u8]>, top: &[u8]) {
    let bottom = walk_down(&sec.replica, &deep_names(), false);
    assert!(
        read_at(&bottom, DEEP_FILE).as_deref() == deep,
        "the deep file on the replica is not as on the primary"
    );
    assert!(
        read(&sec.rep(DEEP_FILE)) == top,
        "the top-level file was touched"
    );
}

/// Writes one more file and waits for it on the replica: replication
/// keeps going.
fn replication_goes_on(m: &Mount, sec: &Secondary) {
    let later = pattern(BLOCK as usize + 5, 9);
    fs::write(m.mnt("later.img"), &later).expect("write later.img");
    sync_file(&m.mnt("later.img"));
    wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_eq!(read(&sec.rep("later.img")), later, "a later write landed");
}

#[test]
fn long_path_a_file_at_4095_bytes_is_created_written_and_unlinked_on_the_replica_alone() {
    assert_eq!(deep_len(), 4095);
    let (sec, m) = pair(&[]);
    let top = top_level_decoy(&m, &sec);

    let bottom = walk_down(&m.mountpoint, &deep_names(), true);
    let data = pattern(3 * BLOCK as usize + 100, 2);
    write_at(&bottom, DEEP_FILE, &data);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica(&sec, Some(&data), &top);

    let name = cstr(DEEP_FILE);
    // SAFETY: a valid C string.
    ok(
        unsafe { libc::unlinkat(bottom.as_raw_fd(), name.as_ptr(), 0) },
        "unlinkat",
    );
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica(&sec, None, &top);
    replication_goes_on(&m, &sec);
}

#[test]
fn long_path_a_deep_tree_made_while_unmounted_is_scanned_mounted_and_shipped() {
    let (sec, mut m) = pair(&[]);
    let top = top_level_decoy(&m, &sec);
    m.stop();
    let bottom = walk_down(&m.backing, &deep_names(), true);
    let data = pattern(2 * BLOCK as usize + 3, 4);
    write_at(&bottom, DEEP_FILE, &data);
    m.restart();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica(&sec, Some(&data), &top);
    replication_goes_on(&m, &sec);
}

/// Overwrites block 1 of `p` through the mount with fresh content.
fn rewrite_block(p: &Path, seed: u64) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(BLOCK as usize, seed), BLOCK)
        .expect("write");
    f.sync_all().expect("fsync");
}

/// The replica holds `names` as links of one inode, each equal to the
/// primary's file, and none of `gone`.
fn assert_links(m: &Mount, sec: &Secondary, names: &[&str], gone: &[&str]) {
    let want = read(&m.back(names[0]));
    let ino = fs::metadata(sec.rep(names[0])).expect("stat replica").ino();
    for name in names {
        let meta = fs::metadata(sec.rep(name)).unwrap_or_else(|e| panic!("replica {name}: {e}"));
        assert_eq!(meta.ino(), ino, "{name} is not a link of {}", names[0]);
        assert_eq!(meta.nlink(), names.len() as u64, "{name}: links");
        assert!(
            read(&sec.rep(name)) == want,
            "replica {name} differs from the primary"
        );
    }
    for name in gone {
        assert!(!sec.rep(name).exists(), "replica still has {name}");
    }
}

/// A pair whose replica has `a`, written through the primary.
fn a_shipped(blocks: usize, seed: u64) -> (Secondary, Mount) {
    let (sec, m) = pair(&[]);
    fs::write(m.mnt("a"), pattern(blocks * BLOCK as usize, seed)).expect("write a");
    sync_file(&m.mnt("a"));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    (sec, m)
}

#[test]
fn hard_link_writes_to_the_remaining_name_land_after_the_first_is_removed() {
    let (sec, m) = a_shipped(3, 1);
    fs::hard_link(m.mnt("a"), m.mnt("b")).expect("ln a b");
    fs::remove_file(m.mnt("a")).expect("rm a");
    rewrite_block(&m.mnt("b"), 11);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_links(&m, &sec, &["b"], &["a"]);
    replication_goes_on(&m, &sec);
}

#[test]
fn hard_link_writes_to_the_last_name_land_after_a_restart_and_the_others_removed() {
    let (sec, mut m) = a_shipped(3, 1);
    fs::hard_link(m.mnt("a"), m.mnt("b")).expect("ln a b");
    // The scan at the next mount finds both names of one inode.
    m.stop();
    m.restart();
    fs::hard_link(m.mnt("b"), m.mnt("c")).expect("ln b c");
    fs::remove_file(m.mnt("a")).expect("rm a");
    fs::remove_file(m.mnt("b")).expect("rm b");
    rewrite_block(&m.mnt("c"), 11);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_links(&m, &sec, &["c"], &["a", "b"]);
    replication_goes_on(&m, &sec);
}

#[test]
fn hard_link_both_names_share_one_inode_on_the_replica_also_when_found_by_the_scan() {
    let (sec, mut m) = a_shipped(2, 3);
    fs::hard_link(m.mnt("a"), m.mnt("b")).expect("ln a b");
    rewrite_block(&m.mnt("b"), 12);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_links(&m, &sec, &["a", "b"], &[]);

    // Behind the daemon's back: a third name, and `b` goes; the scan at
    // the next mount finds the file's names by its inode.
    m.stop();
    fs::hard_link(m.back("a"), m.back("c")).expect("ln a c");
    fs::remove_file(m.back("b")).expect("rm b");
    m.restart();
    rewrite_block(&m.mnt("c"), 13);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_links(&m, &sec, &["a", "c"], &["b"]);
}
