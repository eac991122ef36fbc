//! Metadata replicates (issue 9, item 6): modes, owners, times, xattrs and
//! POSIX ACLs of files, folders, symlinks and FIFOs changed through a
//! replicating mount reach the replica, compared path by path and with
//! `rsync -aHAX`; device nodes are refused, visibly, unless the secondary
//! runs with `--allow-devices`; state folders that are symlinks or belong
//! to another user are refused.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, chown, lchown, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::{
    assert_replica_matches, hbrfs, json_u64, mount_expecting_failure, pattern, run, stderr,
    temp_dir,
};
use crate::replication::{
    APPLY_TIMEOUT, Secondary, Until, pair, primary_for, primary_status, wait_applied,
};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// `touch [-h] -d DATE PATH` (`-h`: the symlink itself).
fn touch(p: &Path, date: &str, symlink_itself: bool) {
    let mut cmd = Command::new("touch");
    if symlink_itself {
        cmd.arg("-h");
    }
    run(cmd.args(["-d", date]).arg(p));
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).expect("name");
    // SAFETY: both are valid C strings; value is readable for its length.
    let r = unsafe {
        libc::setxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

fn remove_xattr(p: &Path, name: &str) {
    let n = CString::new(name).expect("name");
    // SAFETY: both are valid C strings.
    let r = unsafe { libc::removexattr(cpath(p).as_ptr(), n.as_ptr()) };
    assert_eq!(
        r,
        0,
        "removexattr {name} {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

/// `setfacl ARGS PATH` (the `acl` package; contrib/test.sh installs it).
fn setfacl(args: &[&str], p: &Path) {
    run(Command::new("setfacl").args(args).arg(p));
}

fn mknod(p: &Path, mode: u32, dev: libc::dev_t) {
    // SAFETY: cpath is a valid C string.
    let r = unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

fn sync() {
    run(&mut Command::new("sync"));
}

#[test]
fn meta_modes_owners_times_xattrs_acls_of_files_folders_symlinks_and_fifos_replicate() {
    let (sec, m) = pair(&[]);
    let (d, f, l, p) = (m.mnt("d"), m.mnt("d/f"), m.mnt("d/l"), m.mnt("d/p"));
    fs::create_dir(&d).expect("mkdir");
    fs::write(&f, pattern(100_000, 7)).expect("write");
    chmod(&f, 0o640);
    chown(&f, Some(1234), Some(5678)).expect("chown");
    set_xattr(&f, "user.color", b"blue");
    setfacl(&["-m", "u:4242:rw-"], &f);
    setfacl(&["-d", "-m", "g:4343:r-x"], &d);
    symlink("f", &l).expect("symlink");
    lchown(&l, Some(4321), Some(8765)).expect("lchown");
    mknod(&p, libc::S_IFIFO | 0o600, 0);
    chmod(&p, 0o604);
    touch(&l, "2001-02-03 04:05:06.123456789", true);
    touch(&f, "2002-03-04 05:06:07.5", false);
    touch(&p, "2003-04-05 06:07:08", false);
    chmod(&d, 0o751);
    touch(&d, "2004-05-06 07:08:09.25", false);
    sync();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica_matches(&m.backing, &sec.replica);

    // Metadata alone (no content written) ships too, and a removed xattr
    // is removed on the replica.
    chmod(&f, 0o600);
    chown(&f, Some(1), Some(1)).expect("chown");
    remove_xattr(&f, "user.color");
    setfacl(&["-b"], &f);
    touch(&f, "2005-06-07 08:09:10", false);
    touch(&d, "2006-07-08 09:10:11", false);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica_matches(&m.backing, &sec.replica);
}

#[test]
fn meta_device_node_is_refused_visibly_without_allow_devices_and_made_with_it() {
    let null = libc::makedev(1, 3);
    let (sec, m) = pair(&[]);
    mknod(&m.mnt("null"), libc::S_IFCHR | 0o640, null);
    fs::write(m.mnt("after"), b"x").expect("write");
    sync();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert!(
        fs::symlink_metadata(sec.rep("null")).is_err(),
        "a device node was created on a secondary without --allow-devices"
    );
    assert_eq!(fs::read(sec.rep("after")).expect("the point applied"), b"x");
    let s = sec.status();
    let counters = &s["counters"];
    assert!(
        json_u64(&counters["refusals"]) >= 1,
        "secondary status: {s:#}"
    );
    let last = counters["last_refusal"].as_str().unwrap_or("");
    assert!(
        last.contains("null") && last.contains("--allow-devices"),
        "secondary status: {s:#}"
    );
    let p = primary_status(&m);
    assert!(
        json_u64(&p["replication"]["secondary_refusals"]) >= 1,
        "{p:#}"
    );
    let last = p["replication"]["last_secondary_refusal"]
        .as_str()
        .unwrap_or("");
    assert!(last.contains("--allow-devices"), "primary status: {p:#}");
    assert!(sec.log().contains("refused"), "{}", sec.log());
    assert!(m.log().contains("the secondary refused"), "{}", m.log());

    let sec = Secondary::start_with_args(&["--allow-devices"]);
    let m = primary_for(&sec, &sec.addr, &[]);
    mknod(&m.mnt("null"), libc::S_IFCHR | 0o640, null);
    sync();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica_matches(&m.backing, &sec.replica);
    assert_eq!(json_u64(&sec.status()["counters"]["refusals"]), 0);
}

/// `hbrfs serve REPLICA` expecting it to refuse to start; its stderr.
fn serve_expecting_failure(replica: &Path) -> String {
    let mut child = Command::new(hbrfs())
        .arg("serve")
        .arg(replica)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hbrfs serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect");
            panic!("hbrfs serve kept running:\n{}", stderr(&out));
        }
        sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect");
    assert!(!out.status.success(), "hbrfs serve exited 0");
    stderr(&out)
}

#[test]
fn meta_state_folders_that_are_symlinks_or_belong_to_another_user_are_refused() {
    let dir = temp_dir();
    let at = |rel: &str| dir.path().join(rel);
    for rel in ["backing", "mnt", "elsewhere", "owned", "replica"] {
        fs::create_dir(at(rel)).expect("mkdir");
    }
    symlink(at("elsewhere"), at("backing/.hbrfs")).expect("symlink");
    let said = stderr(&mount_expecting_failure(&at("backing"), &at("mnt"), &[]));
    assert!(
        said.contains("backing/.hbrfs") && said.contains("symlink"),
        "{said}"
    );
    assert_eq!(fs::read_dir(at("elsewhere")).expect("ls").count(), 0);

    fs::create_dir(at("owned/.hbrfs")).expect("mkdir");
    chown(at("owned/.hbrfs"), Some(4242), Some(4242)).expect("chown");
    let said = stderr(&mount_expecting_failure(&at("owned"), &at("mnt"), &[]));
    assert!(
        said.contains("owned/.hbrfs") && said.contains("uid 4242"),
        "{said}"
    );

    symlink(at("elsewhere"), at("replica/.hbrfs")).expect("symlink");
    let said = serve_expecting_failure(&at("replica"));
    assert!(
        said.contains("replica/.hbrfs") && said.contains("symlink"),
        "{said}"
    );
    fs::remove_file(at("replica/.hbrfs")).expect("rm");
    fs::create_dir(at("replica/.hbrfs")).expect("mkdir");
    chown(at("replica/.hbrfs"), Some(4242), Some(4242)).expect("chown");
    let said = serve_expecting_failure(&at("replica"));
    assert!(
        said.contains("replica/.hbrfs") && said.contains("uid 4242"),
        "{said}"
    );
    assert_eq!(fs::read_dir(at("elsewhere")).expect("ls").count(), 0);
}
