//! The mount behaves like the backing directory for every operation images
//! need, hides its state folder, and fails clearly when it cannot mount.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use crate::harness::{
    BLOCK, Mount, assert_same_content, blocks_covering, create_sparse, errno,
    mount_expecting_failure, open_rw, path_str, pattern, read, run, stderr, temp_dir, write_ranges,
};

const MIB: u64 = 1024 * 1024;

/// Turns a `-1` syscall result into the thread's errno.
fn check(ret: i64) -> io::Result<i64> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn lseek(f: &File, off: u64, whence: i32) -> io::Result<u64> {
    let off = libc::off_t::try_from(off).expect("offset fits off_t");
    // SAFETY: plain syscall on an fd that `f` keeps open.
    let r = check(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })?;
    Ok(r as u64)
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(r.into()).map(drop)
}

fn get_xattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).expect("name"));
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings; the kernel writes at most buf.len() bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(check(r as i64)?).expect("size"));
    Ok(buf)
}

fn list_xattr(p: &Path) -> io::Result<Vec<String>> {
    let p = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string; the kernel writes at most buf.len() bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(check(r as i64)?).expect("size"));
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn remove_xattr(p: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }.into()).map(drop)
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a pointer to a live statvfs.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }.into())
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", p.display()));
    st
}

/// copy_file_range(2) until `len` bytes are copied.
fn copy_range(src: &File, mut off_in: u64, dst: &File, mut off_out: u64, mut len: u64) {
    while len > 0 {
        let mut i = libc::loff_t::try_from(off_in).expect("offset");
        let mut o = libc::loff_t::try_from(off_out).expect("offset");
        let want = usize::try_from(len).expect("len");
        // SAFETY: both fds stay open; the offsets point to live locals.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, want, 0)
        };
        let n = check(r as i64).unwrap_or_else(|e| panic!("copy_file_range: {e}"));
        assert!(
            n > 0,
            "copy_file_range copied nothing with {len} bytes left"
        );
        let n = n as u64;
        (off_in, off_out, len) = (off_in + n, off_out + n, len - n);
    }
}

/// `journal ls` lists ids by path; a rename keeps the id, moves the path.
#[test]
fn rename_keeps_file_id() {
    let m = Mount::start(&[]);
    write_ranges(&m.mnt("old.img"), &[(0, 100)], BLOCK);
    let id = m.file_id("old.img").expect("old.img listed");
    fs::rename(m.mnt("old.img"), m.mnt("new.img")).expect("rename");
    assert_eq!(m.file_id("new.img"), Some(id), "id changed by rename");
    assert_eq!(m.file_id("old.img"), None, "old path still listed");
    assert!(m.back("new.img").exists() && !m.back("old.img").exists());
    assert_eq!(read(&m.mnt("new.img")), pattern(100, 0));
}

#[test]
fn unlink_removes_file_from_backing_and_journal() {
    let m = Mount::start(&[]);
    write_ranges(&m.mnt("gone.img"), &[(0, 100)], BLOCK);
    assert!(m.file_id("gone.img").is_some());
    fs::remove_file(m.mnt("gone.img")).expect("unlink");
    assert!(!m.back("gone.img").exists(), "backing file survived unlink");
    let e = fs::metadata(m.mnt("gone.img")).expect_err("stat after unlink");
    assert_eq!(errno(&e), libc::ENOENT);
    assert_eq!(m.file_id("gone.img"), None, "journal still lists it");
}

/// A 16-block sparse image with data in blocks 0..3: the shape every
/// fallocate/truncate test starts from. Returns the dirty set it left.
fn image_with_data(m: &Mount, f: &str) -> BTreeSet<u64> {
    create_sparse(&m.mnt(f), 16 * BLOCK);
    let d0 = m.dirty_blocks(f);
    let mut dirty = write_ranges(&m.mnt(f), &[(0, 3 * BLOCK)], BLOCK);
    dirty.extend(d0);
    assert_eq!(m.dirty_blocks(f), dirty);
    dirty
}

/// Shrinking drops data the replica must drop too: the blocks from the new
/// end to the old end turn dirty.
#[test]
fn truncate_shrink_marks_blocks_from_new_end_to_old_end() {
    let m = Mount::start(&[]);
    let f = "shrink.img";
    let mut expected = image_with_data(&m, f);
    let new_len = BLOCK + 100;
    open_rw(&m.mnt(f)).set_len(new_len).expect("truncate");
    expected.extend(1..16);
    assert_eq!(m.dirty_blocks(f), expected);
    assert_eq!(fs::metadata(m.back(f)).expect("stat").len(), new_len);
    let data = assert_same_content(&m, f);
    assert!(data == pattern(3 * BLOCK as usize, 0)[..new_len as usize]);
}

/// `fallocate FLAG -o OFF -l LEN` through the mount zeroes the range (blocks
/// 2..9, partly data, partly hole) and marks every block it touches.
fn fallocate_zeroes_and_marks(flag: &str) {
    let m = Mount::start(&[]);
    let f = "falloc.img";
    let mut expected = image_with_data(&m, f);
    let (off, len) = (2 * BLOCK + 100, 7 * BLOCK);
    run(Command::new("fallocate")
        .args([flag, "-o", &off.to_string(), "-l", &len.to_string()])
        .arg(m.mnt(f)));
    expected.extend(blocks_covering(off, len, BLOCK));
    assert_eq!(m.dirty_blocks(f), expected, "fallocate {flag}");

    let data = assert_same_content(&m, f);
    assert_eq!(
        data.len() as u64,
        16 * BLOCK,
        "fallocate {flag} changed size"
    );
    let mut want = pattern(3 * BLOCK as usize, 0);
    want.resize(16 * BLOCK as usize, 0);
    want[off as usize..(off + len) as usize].fill(0);
    assert!(data == want, "fallocate {flag}: wrong content");
}

#[test]
fn punch_hole_marks_blocks_and_reads_zeros() {
    fallocate_zeroes_and_marks("-p");
}

#[test]
fn zero_range_marks_blocks_and_reads_zeros() {
    fallocate_zeroes_and_marks("-z");
}

/// Sparse images stay sparse: SEEK_DATA/SEEK_HOLE reach the backing file,
/// the backing allocates only what was written, and only that is dirty.
#[test]
fn sparse_file_seek_data_hole_and_small_allocation() {
    let m = Mount::start(&[]);
    let f = "sparse.img";
    let size = 1024 * MIB;
    let at = 512 * MIB;
    create_sparse(&m.mnt(f), size);
    let mut expected = m.dirty_blocks(f);
    expected.extend(write_ranges(&m.mnt(f), &[(at, BLOCK)], BLOCK));
    assert_eq!(m.dirty_blocks(f), expected);
    assert!(expected.len() < 4, "a sparse grow dirtied {expected:?}");

    let file = File::open(m.mnt(f)).expect("open");
    assert_eq!(lseek(&file, 0, libc::SEEK_DATA).expect("SEEK_DATA"), at);
    assert_eq!(lseek(&file, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"), 0);
    assert_eq!(
        lseek(&file, at, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        at + BLOCK
    );
    let e = lseek(&file, at + BLOCK, libc::SEEK_DATA).expect_err("data after the block");
    assert_eq!(errno(&e), libc::ENXIO);

    let meta = fs::metadata(m.back(f)).expect("stat backing");
    assert_eq!(meta.len(), size);
    assert!(
        meta.blocks() * 512 < MIB,
        "backing allocated {} bytes",
        meta.blocks() * 512
    );
    let mut buf = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut buf, at).expect("read");
    assert!(buf == pattern(BLOCK as usize, at), "data at 512 MiB");
}

/// copy_file_range (the syscall, and `cp`, which uses it) copies the bytes
/// and dirties exactly the destination's blocks.
#[test]
fn copy_file_range_copies_and_marks_destination() {
    let m = Mount::start(&[]);
    write_ranges(&m.mnt("src.img"), &[(0, MIB)], BLOCK);
    let src_data = pattern(MIB as usize, 0);

    let src = File::open(m.mnt("src.img")).expect("open src");
    let dst = File::create(m.mnt("dst.img")).expect("create dst");
    copy_range(&src, 12_345, &dst, 70_000, 200_000);
    dst.sync_all().expect("fsync dst");
    let data = assert_same_content(&m, "dst.img");
    assert_eq!(data.len(), 270_000);
    assert!(data[..70_000].iter().all(|&b| b == 0), "head not zero");
    assert!(
        data[70_000..] == src_data[12_345..212_345],
        "copied bytes differ"
    );
    assert_eq!(
        m.dirty_blocks("dst.img"),
        blocks_covering(70_000, 200_000, BLOCK)
    );

    run(Command::new("cp")
        .arg("--reflink=never")
        .arg(m.mnt("src.img"))
        .arg(m.mnt("cp.img")));
    assert!(assert_same_content(&m, "cp.img") == src_data);
    assert_eq!(m.dirty_blocks("cp.img"), blocks_covering(0, MIB, BLOCK));
}

/// `BACKING/.hbrfs` holds the tracking state: the mount neither shows it nor
/// lets anyone create, replace or enter it.
#[test]
fn state_folder_is_invisible_and_untouchable() {
    let m = Mount::start(&[]);
    let hidden = m.mnt(".hbrfs");
    write_ranges(&m.mnt("x"), &[(0, 1)], BLOCK);
    let names: Vec<_> = fs::read_dir(&m.mountpoint)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x")], "readdir of MNT");
    for e in [
        fs::metadata(&hidden).expect_err("stat .hbrfs"),
        fs::metadata(hidden.join("format")).expect_err("stat .hbrfs/format"),
    ] {
        assert_eq!(errno(&e), libc::ENOENT);
    }
    fs::create_dir(&hidden).expect_err("mkdir .hbrfs");
    File::create(&hidden).expect_err("create .hbrfs");
    fs::rename(m.mnt("x"), &hidden).expect_err("rename onto .hbrfs");
    std::os::unix::fs::symlink("x", &hidden).expect_err("symlink .hbrfs");
    assert!(m.mnt("x").exists(), "x vanished");
    assert!(m.back(".hbrfs/format").is_file(), "state folder damaged");
    assert_eq!(
        errno(&fs::metadata(&hidden).expect_err("stat")),
        libc::ENOENT
    );
}

#[test]
fn xattrs_pass_through() {
    let m = Mount::start(&[]);
    write_ranges(&m.mnt("x.img"), &[(0, 1)], BLOCK);
    let (through, direct) = (m.mnt("x.img"), m.back("x.img"));
    set_xattr(&through, "user.hbrfs.test", b"value-1").expect("setxattr");
    assert_eq!(
        get_xattr(&through, "user.hbrfs.test").expect("get"),
        b"value-1"
    );
    assert_eq!(
        get_xattr(&direct, "user.hbrfs.test").expect("get backing"),
        b"value-1"
    );
    assert!(
        list_xattr(&through)
            .expect("list")
            .contains(&"user.hbrfs.test".to_string())
    );
    remove_xattr(&through, "user.hbrfs.test").expect("removexattr");
    let e = get_xattr(&through, "user.hbrfs.test").expect_err("removed");
    assert_eq!(errno(&e), libc::ENODATA);
    assert_eq!(
        errno(&get_xattr(&direct, "user.hbrfs.test").expect_err("gone")),
        libc::ENODATA
    );
}

#[test]
fn symlink_and_readlink_pass_through() {
    let m = Mount::start(&[]);
    write_ranges(&m.mnt("target.img"), &[(0, 10)], BLOCK);
    std::os::unix::fs::symlink("target.img", m.mnt("link")).expect("symlink");
    assert_eq!(
        fs::read_link(m.mnt("link")).expect("readlink"),
        Path::new("target.img")
    );
    assert_eq!(
        fs::read_link(m.back("link")).expect("backing"),
        Path::new("target.img")
    );
    assert!(
        fs::symlink_metadata(m.mnt("link"))
            .expect("lstat")
            .is_symlink()
    );
    assert_eq!(read(&m.mnt("link")), pattern(10, 0), "follow the link");
}

#[test]
fn directories_mkdir_readdir_rmdir() {
    let m = Mount::start(&[]);
    let d = m.mnt("vms/a");
    fs::create_dir_all(&d).expect("mkdir -p");
    for name in ["one.img", "two.img"] {
        write_ranges(&d.join(name), &[(0, 1)], BLOCK);
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["one.img", "two.img"]);
    assert!(m.back("vms/a/two.img").is_file());
    let e = fs::remove_dir(&d).expect_err("rmdir non-empty");
    assert_eq!(errno(&e), libc::ENOTEMPTY);
    fs::remove_file(d.join("one.img")).expect("unlink");
    fs::remove_file(d.join("two.img")).expect("unlink");
    fs::remove_dir(&d).expect("rmdir");
    assert!(!m.back("vms/a").exists());
    assert_eq!(fs::read_dir(m.mnt("vms")).expect("readdir").count(), 0);
}

/// df on the mount shows the backing filesystem's size and inodes (free
/// space moves while other tests write, so it gets a tolerance).
#[test]
fn statfs_reports_backing_filesystem() {
    let m = Mount::start(&[]);
    let (a, b) = (statvfs(&m.mountpoint), statvfs(&m.backing));
    assert_eq!(
        a.f_blocks * a.f_frsize,
        b.f_blocks * b.f_frsize,
        "total bytes"
    );
    assert_eq!(a.f_files, b.f_files, "total inodes");
    assert_eq!(a.f_namemax, b.f_namemax, "name length");
    let total = (b.f_blocks * b.f_frsize) as f64;
    let (fa, fb) = (
        (a.f_bavail * a.f_frsize) as f64,
        (b.f_bavail * b.f_frsize) as f64,
    );
    assert!((fa - fb).abs() < total * 0.01, "available {fa} vs {fb}");
}

/// QEMU's cache=none opens with O_DIRECT: aligned IO works both ways and
/// marks only its blocks.
#[test]
fn o_direct_aligned_write_and_read() {
    let m = Mount::start(&[]);
    let f = m.mnt("direct.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&f)
        .expect("open O_DIRECT");
    let len = BLOCK as usize;
    let mut raw = vec![0u8; len + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[start..start + len];
    buf.copy_from_slice(&pattern(len, 7));
    file.write_all_at(buf, 12_288).expect("O_DIRECT write");
    buf.fill(0);
    file.read_exact_at(buf, 12_288).expect("O_DIRECT read");
    assert!(*buf == pattern(len, 7), "O_DIRECT read back");
    assert!(read(&m.back("direct.img"))[12_288..] == pattern(len, 7));
    assert_eq!(
        m.dirty_blocks("direct.img"),
        blocks_covering(12_288, BLOCK, BLOCK)
    );
}

#[test]
fn missing_mountpoint_is_named_in_error() {
    let dir = temp_dir();
    let backing = dir.path().join("backing");
    fs::create_dir(&backing).expect("mkdir");
    let missing = dir.path().join("no-such-mnt");
    let err = stderr(&mount_expecting_failure(&backing, &missing, &[]));
    assert!(
        err.contains(path_str(&missing)),
        "mountpoint not named:\n{err}"
    );
}

#[test]
fn missing_backing_is_named_in_error() {
    let dir = temp_dir();
    let missing = dir.path().join("no-such-backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let err = stderr(&mount_expecting_failure(&missing, &mnt, &[]));
    assert!(
        err.contains(path_str(&missing)),
        "backing not named:\n{err}"
    );
    assert!(!missing.exists(), "a missing backing dir was created");
}

/// A second mount stacked on a live one would hide it: refused, and the
/// first keeps serving.
#[test]
fn busy_mountpoint_is_refused() {
    let m = Mount::start(&[]);
    let other = temp_dir();
    let err = stderr(&mount_expecting_failure(other.path(), &m.mountpoint, &[]));
    assert!(
        err.contains(path_str(&m.mountpoint)) && (err.contains("mounted") || err.contains("busy")),
        "refusal does not say the mountpoint is in use:\n{err}"
    );
    assert_eq!(crate::harness::fuse_mounts_at(&m.mountpoint), 1);
    write_ranges(&m.mnt("still.img"), &[(0, 10)], BLOCK);
    assert_eq!(read(&m.back("still.img")), pattern(10, 0));
}

/// After kill -9 the kernel keeps a dead mount (ENOTCONN); mounting over it
/// must fail and tell the operator how to clear it. Cleared, it mounts.
#[test]
fn stale_mount_after_kill9_is_refused_with_the_fix() {
    let mut m = Mount::start(&[]);
    m.kill9_leave_stale();
    assert!(
        m.is_mounted(),
        "kill -9 left no stale mount to test against"
    );
    let e = fs::metadata(m.mnt("x")).expect_err("stat on a dead mount");
    assert_eq!(errno(&e), libc::ENOTCONN);
    let err = stderr(&mount_expecting_failure(&m.backing, &m.mountpoint, &[]));
    assert!(
        ["umount -l", "fusermount3 -u", "fusermount -u"]
            .iter()
            .any(|fix| err.contains(fix)),
        "refusal does not say how to clear the stale mount:\n{err}"
    );
    crate::harness::detach_all(&m.mountpoint);
    m.restart();
    write_ranges(&m.mnt("after.img"), &[(0, 1)], BLOCK);
    m.stop();
}

#[test]
fn sigterm_unmounts_cleanly() {
    let mut m = Mount::start(&[]);
    write_ranges(&m.mnt("kept.img"), &[(0, 10)], BLOCK);
    m.stop();
    assert_eq!(read(&m.back("kept.img")), pattern(10, 0));
    assert!(m.back(".hbrfs/clean").exists(), "no clean marker");
}

#[test]
fn outside_umount_makes_daemon_exit_0() {
    let mut m = Mount::start(&[]);
    write_ranges(&m.mnt("kept.img"), &[(0, 10)], BLOCK);
    run(Command::new("umount").arg(&m.mountpoint));
    let status = m.wait_exit();
    assert!(status.success(), "daemon exited {status}\n{}", m.log());
    assert!(!m.is_mounted());
    assert!(m.back(".hbrfs/clean").exists(), "no clean marker");
}

/// SEEK_DATA/SEEK_HOLE never hide data a writer already wrote: while a
/// file is open for buffered writing the kernel may still hold the pages
/// (the writeback cache is not flushed before the question), so the answer
/// must not claim a hole where fresh data lies. After close the answer is
/// exact again.
#[test]
fn seek_data_never_hides_unflushed_writes() {
    let m = Mount::start(&[]);
    let p = m.mnt("fresh.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&pattern(65536, 3), 262_144).unwrap();
    let seek = |fd: &File, off: i64, whence: i32| {
        // SAFETY: plain lseek on an open descriptor.
        unsafe { libc::lseek(fd.as_raw_fd(), off, whence) }
    };
    let data = seek(&f, 0, libc::SEEK_DATA);
    assert!(
        (0..=262_144).contains(&data),
        "SEEK_DATA skipped fresh data: {data}"
    );
    let hole = seek(&f, data, libc::SEEK_HOLE);
    assert!(
        hole >= 262_144 + 65_536,
        "SEEK_HOLE inside fresh data: {hole}"
    );
    drop(f);
    let f = File::open(&p).unwrap();
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), 262_144, "exact after close");
    assert_eq!(
        seek(&f, 262_144, libc::SEEK_HOLE),
        262_144 + 65_536,
        "exact after close"
    );
}
