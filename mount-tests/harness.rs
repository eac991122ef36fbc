//! Spawns the real `hbrfs` binary on a fresh datastore and mounts it for real.
//!
//! Every test owns one [`Mount`]: a temp dir under /tmp holding `backing/`,
//! `mnt/` and the daemon's log. The harness waits for the mount by polling
//! `/proc/self/mountinfo` (never by sleeping), and a mount that does not come
//! up panics with the daemon's log: these tests never skip.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The default tracking block size of a datastore (64 KiB).
pub const BLOCK: u64 = 64 * 1024;

/// How often mount state is polled.
const POLL: Duration = Duration::from_millis(20);

/// How long a daemon gets to mount, or to exit after SIGTERM.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// The binary under test.
pub fn hbrfs() -> &'static str {
    env!("CARGO_BIN_EXE_hbrfs")
}

/// A running (or stopped) `hbrfs mount` daemon on a real FUSE mount.
pub struct Mount {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    /// The extra arguments after `mount BACKING MNT`, reused by `restart`.
    args: Vec<String>,
    /// Environment variables the daemon gets (an object store's
    /// credentials), reused by `restart`.
    env: Vec<(String, String)>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Holds the directories (or only the log for `start_on`); dropped last,
    /// after `Drop for Mount` has unmounted, so removal never walks the mount.
    _dir: TempDir,
}

impl Mount {
    /// Mounts a fresh, empty datastore: `TMP/backing` on `TMP/mnt`.
    pub fn start(extra_args: &[&str]) -> Mount {
        Mount::start_with_env(extra_args, &[])
    }

    /// [`Mount::start`] with `env` set for the daemon.
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, String)]) -> Mount {
        let dir = temp_dir();
        let backing = dir.path().join("backing");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&backing).expect("create backing dir");
        fs::create_dir(&mountpoint).expect("create mountpoint");
        Mount::launch(dir, backing, mountpoint, extra_args, env)
    }

    /// Mounts the given backing directory on the given mountpoint (both must
    /// outlive the returned `Mount`); the log goes to a temp dir of its own.
    pub fn start_on(backing: &Path, mountpoint: &Path, extra_args: &[&str]) -> Mount {
        Mount::start_on_with_env(backing, mountpoint, extra_args, &[])
    }

    /// [`Mount::start_on`] with `env` set for the daemon.
    pub fn start_on_with_env(
        backing: &Path,
        mountpoint: &Path,
        extra_args: &[&str],
        env: &[(&str, String)],
    ) -> Mount {
        Mount::launch(
            temp_dir(),
            backing.to_path_buf(),
            mountpoint.to_path_buf(),
            extra_args,
            env,
        )
    }

    fn launch(
        dir: TempDir,
        backing: PathBuf,
        mountpoint: PathBuf,
        extra_args: &[&str],
        env: &[(&str, String)],
    ) -> Mount {
        let log_path = dir.path().join("hbrfs.log");
        let mut m = Mount {
            backing,
            mountpoint,
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            child: None,
            log_path,
            _dir: dir,
        };
        m.spawn_and_wait();
        m
    }

    /// Starts the daemon again on the same backing, mountpoint and arguments
    /// after `stop` or `kill9`: this is how persistence is tested.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart while the daemon still runs");
        self.spawn_and_wait();
    }

    fn spawn_and_wait(&mut self) {
        let before = fuse_mounts_at(&self.mountpoint);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        writeln!(
            log,
            "=== hbrfs mount {} {} {}",
            self.backing.display(),
            self.mountpoint.display(),
            self.args.join(" ")
        )
        .expect("write daemon log");
        let mut cmd = Command::new(hbrfs());
        cmd.arg("mount")
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn hbrfs mount");
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if fuse_mounts_at(&self.mountpoint) > before {
                self.child = Some(child);
                return;
            }
            if let Some(status) = child.try_wait().expect("poll hbrfs") {
                panic!(
                    "hbrfs mount exited ({status}) before mounting {}\n--- log ---\n{}",
                    self.mountpoint.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not appear as a fuse mount within {MOUNT_TIMEOUT:?}\n--- log ---\n{}",
                    self.mountpoint.display(),
                    self.log()
                );
            }
            sleep(POLL);
        }
    }

    /// SIGKILLs the daemon, as a crash would, and clears the stale mount it
    /// leaves behind (`umount -l`), so that `restart` can mount again.
    pub fn kill9(&mut self) {
        self.kill9_leave_stale();
        detach_all(&self.mountpoint);
    }

    /// SIGKILLs the daemon and leaves whatever mount remains in place.
    pub fn kill9_leave_stale(&mut self) {
        let mut child = self.child.take().expect("kill9: daemon not running");
        signal(&child, libc::SIGKILL);
        let status = child.wait().expect("wait for killed hbrfs");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "daemon was not killed"
        );
    }

    /// SIGTERMs the daemon and asserts it unmounts and exits successfully.
    pub fn stop(&mut self) {
        let child = self.child.as_ref().expect("stop: daemon not running");
        signal(child, libc::SIGTERM);
        let status = self.wait_exit();
        assert!(
            status.success(),
            "hbrfs exited with {status} after SIGTERM\n--- log ---\n{}",
            self.log()
        );
        assert!(
            !self.is_mounted(),
            "{} still mounted after hbrfs exited",
            self.mountpoint.display()
        );
    }

    /// Waits up to 20 s for the daemon to exit on its own (after a signal or
    /// an outside `umount`); panics with the log if it does not.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("wait_exit: daemon not running");
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("poll hbrfs") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hbrfs did not exit within {MOUNT_TIMEOUT:?}\n--- log ---\n{}",
                    self.log()
                );
            }
            sleep(POLL);
        }
    }

    /// True while the mountpoint is a fuse mount (stale ones included).
    pub fn is_mounted(&self) -> bool {
        fuse_mounts_at(&self.mountpoint) > 0
    }

    /// Runs `hbrfs journal -d BACKING --json ARGS` and parses its output.
    pub fn journal(&self, args: &[&str]) -> Value {
        let mut full = vec!["journal", "-d", path_str(&self.backing), "--json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "hbrfs {full:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hbrfs {full:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs any `hbrfs` subcommand and returns its raw output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(hbrfs())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run hbrfs")
    }

    /// `hbrfs cut -d BACKING`, asserting success.
    pub fn cut(&self) {
        run(Command::new(hbrfs())
            .arg("cut")
            .arg("-d")
            .arg(&self.backing));
    }

    /// Everything the daemon has logged, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// `MNT/rel`: the path through the filesystem under test.
    pub fn mnt(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `BACKING/rel`: the same file seen directly, bypassing FUSE.
    pub fn back(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    /// The dirty blocks of one file (path relative to the datastore), read
    /// from `journal show`'s extents.
    pub fn dirty_blocks(&self, rel_path: &str) -> BTreeSet<u64> {
        let show = self.journal(&["show", rel_path]);
        let extents = show["extents"]
            .as_array()
            .unwrap_or_else(|| panic!("journal show {rel_path}: no extents array: {show}"));
        let mut blocks = BTreeSet::new();
        for e in extents {
            let first = json_u64(&e["first_block"]);
            let n = json_u64(&e["blocks"]);
            assert!(n > 0, "empty extent in journal show {rel_path}: {show}");
            blocks.extend(first..first + n);
        }
        blocks
    }

    /// The block size `journal show` reports for a file.
    pub fn block_size(&self, rel_path: &str) -> u64 {
        json_u64(&self.journal(&["show", rel_path])["block_size"])
    }

    /// The stable id `journal ls` lists for a path, if it lists the path.
    pub fn file_id(&self, rel_path: &str) -> Option<u64> {
        let ls = self.journal(&["ls"]);
        ls["files"]
            .as_array()
            .unwrap_or_else(|| panic!("journal ls: no files array: {ls}"))
            .iter()
            .find(|f| f["path"].as_str().map(trim_slash) == Some(trim_slash(rel_path)))
            .map(|f| json_u64(&f["id"]))
    }
}

impl Drop for Mount {
    /// Leaves no daemon and no mount behind, even when a test panicked, so
    /// that the temp dir can be removed without walking a live mount.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(POLL);
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        detach_all(&self.mountpoint);
    }
}

/// A fresh temp dir under /tmp (never under a FUSE mount or the repo).
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("hbrfs-mt-")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `hbrfs mount BACKING MNT ARGS` expecting it to refuse: returns its
/// output once it exits. A daemon that mounts instead is killed, its mount
/// cleared, and the test fails.
pub fn mount_expecting_failure(backing: &Path, mountpoint: &Path, args: &[&str]) -> Output {
    let before = fuse_mounts_at(mountpoint);
    let mut child = Command::new(hbrfs())
        .arg("mount")
        .arg(backing)
        .arg(mountpoint)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hbrfs mount");
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while child.try_wait().expect("poll hbrfs").is_none() {
        let mounted = fuse_mounts_at(mountpoint) > before;
        if mounted || Instant::now() > deadline {
            signal(&child, libc::SIGTERM);
            sleep(Duration::from_secs(1));
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect hbrfs output");
            if fuse_mounts_at(mountpoint) > before {
                detach_once(mountpoint);
            }
            panic!(
                "hbrfs mount {} {} {args:?} should have failed but {}\n--- stderr ---\n{}",
                backing.display(),
                mountpoint.display(),
                if mounted { "mounted" } else { "kept running" },
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sleep(POLL);
    }
    let out = child.wait_with_output().expect("collect hbrfs output");
    assert!(
        !out.status.success(),
        "hbrfs mount {args:?} exited 0 without mounting"
    );
    out
}

/// How many fuse mounts sit exactly at `path` (mounts can stack).
pub fn fuse_mounts_at(path: &Path) -> usize {
    // No canonicalize: resolving the path would stat a possibly dead mount.
    let target = std::path::absolute(path).expect("absolute path");
    let info = fs::read("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.split(|&b| b == b'\n')
        .filter(|line| {
            let line = String::from_utf8_lossy(line);
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                return false;
            };
            fields.len() > sep + 1
                && fields[sep + 1].starts_with("fuse")
                && unescape_mountinfo(fields[4]) == target.as_os_str().as_bytes()
        })
        .count()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Lazily unmounts every fuse mount at `path` and waits until mountinfo no
/// longer shows one.
pub fn detach_all(path: &Path) {
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while fuse_mounts_at(path) > 0 {
        detach_once(path);
        assert!(
            Instant::now() < deadline,
            "{} still mounted after umount -l",
            path.display()
        );
        sleep(POLL);
    }
}

fn detach_once(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path has NUL");
    // SAFETY: c is a valid NUL-terminated path; umount2 does not keep it.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own, not yet reaped child: the pid is still ours.
    unsafe { libc::kill(pid, sig) };
}

/// Paths handed to the CLI are ours and always UTF-8.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn trim_slash(p: &str) -> &str {
    p.trim_start_matches('/')
}

/// A JSON number field the contract says is an unsigned integer.
pub fn json_u64(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected an unsigned integer, got {v}"))
}

/// The blocks of size `bs` that the byte range `off..off+len` touches.
pub fn blocks_covering(off: u64, len: u64, bs: u64) -> BTreeSet<u64> {
    assert!(len > 0);
    (off / bs..=(off + len - 1) / bs).collect()
}

/// The blocks of size `bs` whose content differs between two versions of a
/// file. The shorter one counts as zero-extended: a file's size travels in
/// the journal, so blocks that only grew as zeros need not be dirty, while
/// any non-zero byte beyond the old end (or old data beyond a new end) does.
pub fn differing_blocks(before: &[u8], after: &[u8], bs: u64) -> BTreeSet<u64> {
    let bs = usize::try_from(bs).expect("block size fits usize");
    let len = before.len().max(after.len());
    // Block `start..start+bs` of `data`, zero-padded past its end.
    let block = |data: &[u8], start: usize| -> Vec<u8> {
        let end = (start + bs).min(len);
        let mut v = data.get(start..end.min(data.len())).unwrap_or(&[]).to_vec();
        v.resize(end - start, 0);
        v
    };
    (0..len.div_ceil(bs))
        .filter(|&b| {
            let start = b * bs;
            let end = start + bs;
            match (before.get(start..end), after.get(start..end)) {
                // Both hold the whole block: compare in place (fast path).
                (Some(x), Some(y)) => x != y,
                _ => block(before, start) != block(after, start),
            }
        })
        .map(|b| b as u64)
        .collect()
}

/// Writes test bytes at each `(offset, length)` of a file (creating it if
/// needed), fsyncs it, and returns the blocks of size `bs` those writes
/// cover, which is exactly what must turn dirty.
pub fn write_ranges(path: &Path, ranges: &[(u64, u64)], bs: u64) -> BTreeSet<u64> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut blocks = BTreeSet::new();
    for &(off, len) in ranges {
        let data = pattern(usize::try_from(len).expect("len fits usize"), off);
        f.write_all_at(&data, off)
            .unwrap_or_else(|e| panic!("write {}@{off}: {e}", path.display()));
        blocks.extend(blocks_covering(off, len, bs));
    }
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    blocks
}

/// Creates a sparse file of `size` bytes with `truncate -s`, as image tools
/// do before writing.
pub fn create_sparse(path: &Path, size: u64) {
    run(Command::new("truncate")
        .arg("-s")
        .arg(size.to_string())
        .arg(path));
}

/// A process's stderr, as text for assertions.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic, non-repeating test bytes (so misplaced blocks show).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// fsyncs one file: pushes what FUSE's writeback cache holds to the daemon
/// (a global `sync` would also wait on other tests' mounts).
pub fn sync_file(p: &Path) {
    File::open(p)
        .and_then(|f| f.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
}

/// Asserts the file reads the same through the mount and on the backing
/// directory, byte for byte.
pub fn assert_same_content(m: &Mount, rel: &str) -> Vec<u8> {
    let through = read(&m.mnt(rel));
    let direct = read(&m.back(rel));
    assert_eq!(through.len(), direct.len(), "{rel}: sizes differ");
    if let Some(i) = (0..through.len()).find(|&i| through[i] != direct[i]) {
        panic!("{rel}: mount and backing differ first at byte {i}");
    }
    through
}

/// Reads a whole file, panicking with the path on error.
pub fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Opens a file for writing without truncating it.
pub fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// The errno of an io::Error, for asserting exact failures.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e}"))
}

/// What [`assert_replica_matches`] compares of one path: its whole
/// `st_mode` (type and permissions), owner, mtime, device number, size,
/// symlink target, extended attributes (POSIX ACLs among them) and, for a
/// regular file, its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, i64),
    rdev: u64,
    size: u64,
    target: Option<PathBuf>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: Option<Vec<u8>>,
}

/// The extended attributes of `p` itself, sorted, read with `llistxattr`
/// and `lgetxattr`.
pub fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: c is a valid C string; names is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = std::ffi::CString::new(name).expect("xattr name");
        let mut value = vec![0u8; 64 * 1024];
        // SAFETY: both are valid C strings; value is writable for its length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(
            len >= 0,
            "lgetxattr {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
        value.truncate(len as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Every path under `root` ("" for `root` itself; the root's `.hbrfs`
/// state folder left out) and what is compared of it.
fn seen_tree(root: &Path) -> std::collections::BTreeMap<PathBuf, Seen> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let rel = p.strip_prefix(root).expect("below root").to_path_buf();
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display())) {
                let child = e.expect("entry").path();
                if p != root || child.file_name() != Some(std::ffi::OsStr::new(".hbrfs")) {
                    todo.push(child);
                }
            }
        }
        let file = m.file_type().is_file();
        let seen = Seen {
            mode: m.mode(),
            owner: (m.uid(), m.gid()),
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: m.rdev(),
            size: if m.is_dir() { 0 } else { m.len() },
            target: m
                .file_type()
                .is_symlink()
                .then(|| fs::read_link(&p).expect("readlink")),
            xattrs: xattrs(&p),
            bytes: file.then(|| read(&p)),
        };
        out.insert(rel, seen);
    }
    out
}

/// Asserts that the replica at `replica` equals the primary's backing
/// folder `backing` in content, modes, owners, mtimes, device numbers,
/// symlink targets and xattrs/ACLs, path by path (state folders aside);
/// then, when rsync is installed, that `rsync -aHAX --dry-run
/// --itemize-changes` finds nothing to do. Panics listing every
/// difference.
pub fn assert_replica_matches(backing: &Path, replica: &Path) {
    let (want, got) = (seen_tree(backing), seen_tree(replica));
    let mut diffs = Vec::new();
    for (path, w) in &want {
        match got.get(path) {
            None => diffs.push(format!("{}: missing on the replica", path.display())),
            Some(g) if g != w => {
                let short = |s: &Seen| {
                    let mut s = s.clone();
                    s.bytes = s.bytes.map(|b| b[..b.len().min(16)].to_vec());
                    s
                };
                diffs.push(format!(
                    "{}:\n    primary {:?}\n    replica {:?}",
                    path.display(),
                    short(w),
                    short(g)
                ))
            }
            Some(_) => {}
        }
    }
    for path in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("{}: only on the replica", path.display()));
    }
    assert!(
        diffs.is_empty(),
        "the replica differs:\n{}",
        diffs.join("\n")
    );
    let Ok(out) = Command::new("rsync")
        .args([
            "-aHAX",
            "--dry-run",
            "--itemize-changes",
            "--exclude=/.hbrfs",
        ])
        .arg(format!("{}/", backing.display()))
        .arg(format!("{}/", replica.display()))
        .output()
    else {
        return;
    };
    assert!(out.status.success(), "rsync failed: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.trim().is_empty(),
        "rsync -aHAX finds differences:\n{said}"
    );
}
