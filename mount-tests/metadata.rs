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
    assert_replica_matches, hbrfs, json_u64, mount_expecting_failure, path_str, pattern, run,
    stderr, temp_dir, xattrs,
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

/// One change to a file's data, made by root or by an unprivileged user.
struct DataChange {
    /// The file's name and its mode before the change.
    name: &'static str,
    mode: u32,
    /// The shell command making the change (`$F` is the file).
    command: &'static str,
    /// Whether it runs as `nobody` (no CAP_FSETID) rather than root.
    unprivileged: bool,
}

/// Every way a file's data changes, each of which drops setuid/setgid
/// for a caller without CAP_FSETID (and setgid only with group execute).
const DATA_CHANGES: &[DataChange] = &[
    DataChange {
        name: "append",
        mode: 0o6777,
        command: "echo y >> \"$F\"",
        unprivileged: true,
    },
    DataChange {
        name: "direct",
        mode: 0o6777,
        command: "dd if=/dev/zero of=\"$F\" bs=4k count=1 oflag=direct conv=notrunc status=none",
        unprivileged: true,
    },
    DataChange {
        name: "truncate",
        mode: 0o6777,
        command: "truncate -s 1 \"$F\"",
        unprivileged: true,
    },
    DataChange {
        name: "o-trunc",
        mode: 0o6777,
        command: ": > \"$F\"",
        unprivileged: true,
    },
    DataChange {
        name: "fallocate",
        mode: 0o6777,
        command: "fallocate -l 1M \"$F\"",
        unprivileged: true,
    },
    DataChange {
        name: "sgid-no-x",
        mode: 0o2767,
        command: "echo y >> \"$F\"",
        unprivileged: true,
    },
    DataChange {
        name: "root-write",
        mode: 0o6777,
        command: "echo y >> \"$F\"",
        unprivileged: false,
    },
    DataChange {
        name: "root-trunc",
        mode: 0o6777,
        command: "truncate -s 1 \"$F\"",
        unprivileged: false,
    },
];

/// Makes every change of [`DATA_CHANGES`] in `dir` (files of 64 KiB
/// first); returns each file's mode right after its change.
fn change_data_in(dir: &Path) -> Vec<(&'static str, u32)> {
    DATA_CHANGES
        .iter()
        .map(|c| {
            let f = dir.join(c.name);
            fs::write(&f, pattern(65536, 3)).expect("write");
            chmod(&f, c.mode);
            let mut cmd = if c.unprivileged {
                let mut cmd = Command::new("setpriv");
                cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]);
                cmd
            } else {
                Command::new("sh")
            };
            run(cmd.args(["-c", c.command]).env("F", &f));
            let mode = fs::metadata(&f).expect("stat").permissions().mode() & 0o7777;
            (c.name, mode)
        })
        .collect()
}

/// The mount handles killing privileges itself (it negotiates
/// FUSE_HANDLE_KILLPRIV_V2, which spares a getxattr per write): every way
/// of changing a file's data drops setuid/setgid exactly as ext4 does for
/// the same user, seen through the mount at once (not after the attribute
/// timeout); a write drops `security.capability`; the replica gets the
/// modes.
#[test]
fn privileges_drop_on_data_changes_as_on_ext4_and_replicate() {
    let (sec, m) = pair(&[]);
    let native = temp_dir();
    for dir in [native.path(), m.mountpoint.parent().expect("parent")] {
        // `nobody` must reach the files.
        chmod(dir, 0o755);
    }
    chmod(&m.mountpoint, 0o755);
    let want = change_data_in(native.path());
    assert!(
        want.iter().any(|&(_, mode)| mode & 0o6000 == 0)
            && want.iter().any(|&(_, mode)| mode & 0o4000 != 0),
        "the native run should both drop and keep bits: {want:?}"
    );
    let got = change_data_in(&m.mountpoint);
    assert_eq!(got, want, "modes after each change: mount vs ext4");
    // The backing files agree with what the mount showed.
    let backing = change_data_modes(&m.backing);
    assert_eq!(backing, want, "backing modes");

    // A file capability goes with the first write, as on ext4.
    let cap = m.mnt("cap");
    fs::write(&cap, b"x").expect("write");
    let has_cap = || {
        let names = xattrs(&cap);
        names.iter().any(|(n, _)| n == b"security.capability")
    };
    run(Command::new("setcap").args(["cap_net_raw+ep", path_str(&cap)]));
    assert!(has_cap(), "setcap through the mount");
    run(Command::new("sh")
        .args(["-c", "echo y >> \"$F\""])
        .env("F", &cap));
    assert!(!has_cap(), "a write keeps security.capability");

    sync();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica_matches(&m.backing, &sec.replica);
}

/// The modes of the files [`change_data_in`] made in `dir`.
fn change_data_modes(dir: &Path) -> Vec<(&'static str, u32)> {
    DATA_CHANGES
        .iter()
        .map(|c| {
            let meta = fs::metadata(dir.join(c.name)).expect("stat");
            (c.name, meta.permissions().mode() & 0o7777)
        })
        .collect()
}

/// A fallocate that only grows a file (no block written) is a change of
/// its epoch: after the write's point is cut, the new size still ships.
#[test]
fn a_fallocate_that_grows_a_file_ships_its_size() {
    let (sec, m) = pair(&[]);
    let f = m.mnt("grown");
    fs::write(&f, pattern(65536, 5)).expect("write");
    sync();
    m.cut();
    run(Command::new("fallocate").args(["-l", "3M", path_str(&f)]));
    sync();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let size = fs::metadata(sec.replica.join("grown")).expect("stat").len();
    assert_eq!(size, 3 << 20, "size on the replica");
    assert_replica_matches(&m.backing, &sec.replica);
}
