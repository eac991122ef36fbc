//! The replica is as private as the primary (issue 9, item 6): the mirror
//! mounts `ro,nodev,nosuid` and only for the daemon's user unless asked,
//! and `hbrfs up` makes nothing group- or world-writable.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::{detach_all, fuse_mounts_at, hbrfs, temp_dir};

const START: Duration = Duration::from_secs(30);

/// A daemon run for one test, its mounts detached and the process stopped
/// on drop.
struct Daemon {
    child: Child,
    mounts: Vec<PathBuf>,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &[&Path], mounts: &[PathBuf], log: PathBuf) -> Daemon {
        let out = File::create(&log).expect("create log");
        let child = Command::new(hbrfs())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .expect("spawn hbrfs");
        let mut d = Daemon {
            child,
            mounts: mounts.to_vec(),
            log,
        };
        let deadline = Instant::now() + START;
        while !d.mounts.iter().all(|m| fuse_mounts_at(m) > 0) {
            if let Some(status) = d.child.try_wait().expect("poll hbrfs") {
                panic!("hbrfs exited ({status}) before mounting\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "hbrfs did not mount\n{}",
                d.log()
            );
            sleep(Duration::from_millis(10));
        }
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("poll hbrfs").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            sleep(Duration::from_millis(20));
        }
        for m in &self.mounts {
            detach_all(m);
        }
    }
}

/// The mount options (per mount, then per super block) of the fuse mount
/// at `path`, from /proc/self/mountinfo.
fn fuse_options(path: &Path) -> (Vec<String>, Vec<String>) {
    let target = path.to_str().expect("utf-8 path");
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let line = info
        .lines()
        .rfind(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-");
            f.get(4) == Some(&target) && sep.is_some_and(|s| f[s + 1].starts_with("fuse"))
        })
        .unwrap_or_else(|| panic!("no fuse mount at {target}"));
    let f: Vec<&str> = line.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-").expect("separator");
    let split = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
    (split(f[5]), split(f[sep + 3]))
}

fn serve_mirror(extra: &[&str]) -> (tempfile::TempDir, Daemon, PathBuf) {
    let dir = temp_dir();
    let replica = dir.path().join("replica");
    let mirror = dir.path().join("mirror");
    fs::create_dir(&mirror).expect("mirror mountpoint");
    let mut args: Vec<&Path> = vec![
        Path::new("serve"),
        &replica,
        Path::new("--listen"),
        Path::new("127.0.0.1:0"),
        Path::new("--mount"),
        &mirror,
    ];
    args.extend(extra.iter().map(Path::new));
    let d = Daemon::start(
        &args,
        std::slice::from_ref(&mirror),
        dir.path().join("serve.log"),
    );
    (dir, d, mirror)
}

#[test]
fn the_mirror_mounts_read_only_nodev_nosuid_and_closed_to_other_users() {
    let (_dir, _d, mirror) = serve_mirror(&[]);
    let (mount, sup) = fuse_options(&mirror);
    for opt in ["ro", "nodev", "nosuid"] {
        assert!(mount.iter().any(|o| o == opt), "{opt} missing: {mount:?}");
    }
    assert!(
        !sup.iter().chain(&mount).any(|o| o == "allow_other"),
        "the mirror is open to other users: {mount:?} {sup:?}"
    );
}

#[test]
fn serve_mirror_allow_other_opens_the_mirror_to_other_users_and_keeps_nodev_nosuid() {
    let (_dir, _d, mirror) = serve_mirror(&["--mirror-allow-other"]);
    let (mount, sup) = fuse_options(&mirror);
    for opt in ["ro", "nodev", "nosuid"] {
        assert!(mount.iter().any(|o| o == opt), "{opt} missing: {mount:?}");
    }
    assert!(
        sup.iter().any(|o| o == "allow_other"),
        "no allow_other: {sup:?}"
    );
}

/// Every file and folder under `dir` (not crossing into `skip`), with its
/// mode.
fn walk(dir: &Path, skip: &[PathBuf], out: &mut Vec<(PathBuf, u32)>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if skip.contains(&path) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).expect("lstat");
        if meta.file_type().is_symlink() {
            continue;
        }
        out.push((path.clone(), meta.mode() & 0o7777));
        if meta.is_dir() {
            walk(&path, skip, out);
        }
    }
}

#[test]
fn up_makes_no_group_or_world_writable_file_or_folder_and_private_state_folders() {
    let tmp = temp_dir();
    let dir = tmp.path().join("demo");
    let (mnt, replica_mnt) = (dir.join("mnt"), dir.join("replica-mnt"));
    let d = Daemon::start(
        &[Path::new("up"), &dir, Path::new("--rpo"), Path::new("1s")],
        &[mnt.clone(), replica_mnt.clone()],
        tmp.path().join("up.log"),
    );
    // Something written on the primary and shipped, so bitmaps, journal,
    // preimages and the replica's staging and index all exist.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(mnt.join("disk.img"))
        .expect("create image");
    std::io::Write::write_all(&mut f, &[0xab; 1 << 20]).expect("write image");
    f.sync_all().expect("fsync image");
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::metadata(replica_mnt.join("disk.img"))
        .map(|m| m.len())
        .ok()
        != Some(1 << 20)
    {
        assert!(
            Instant::now() < deadline,
            "the image never reached the replica\n{}",
            d.log()
        );
        sleep(Duration::from_millis(50));
    }
    let mut found = vec![(
        dir.clone(),
        fs::metadata(&dir).expect("stat").mode() & 0o7777,
    )];
    walk(&dir, &[mnt.clone(), replica_mnt.clone()], &mut found);
    drop(d);
    let writable: Vec<String> = found
        .iter()
        .filter(|(_, mode)| mode & 0o022 != 0)
        .map(|(p, mode)| format!("{:o} {}", mode, p.display()))
        .collect();
    assert!(
        writable.is_empty(),
        "group- or world-writable:\n{}",
        writable.join("\n")
    );
    for state in [dir.join("backing/.hbrfs"), dir.join("replica/.hbrfs")] {
        let mode = fs::metadata(&state).expect("state folder").mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", state.display());
    }
    assert!(found.len() > 10, "walked too little: {found:?}");
}
