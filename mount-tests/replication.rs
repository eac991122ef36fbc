//! Replication end to end: a primary `hbrfs mount --replicate-to` and a
//! secondary `hbrfs serve` run as two real processes talking over
//! 127.0.0.1, driven by real clients (qemu-img, qemu-io, cp, truncate,
//! fallocate) and by small writers of dependent sequence numbers.
//!
//! What "caught up" means is read from `hbrfs status --json` on both sides
//! (see [`wait_applied`]): every test polls for a condition, none sleeps
//! for one. The secondary's mirrored mount is checked against the primary,
//! and the replica folder (plain files) with `qemu-img compare`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle, sleep};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::harness::{
    BLOCK, Mount, create_sparse, detach_all, errno, fuse_mounts_at, hbrfs, json_u64, open_rw,
    path_str, pattern, read, run, sync_file, temp_dir, write_ranges,
};

pub(crate) const MIB: u64 = 1024 * 1024;

/// How often status is polled.
const POLL: Duration = Duration::from_millis(50);

/// How long a secondary gets to listen and mount its mirror, or to exit.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a point may take to reach the secondary in these tests (the
/// RPO is 1 s; applies fsync, and two tests share two cores).
pub(crate) const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The secondary as a real process.

/// A running (or killed) `hbrfs serve REPLICA --listen ADDR --mount MIRROR`.
pub struct Secondary {
    /// The replica folder: plain files a hypervisor could use after failover.
    pub replica: PathBuf,
    /// The read-only mirrored mount of the latest applied point.
    pub mirror: PathBuf,
    /// The address it listens on (`127.0.0.1:PORT`), kept across restarts
    /// so that the primary finds it again.
    pub addr: String,
    child: Option<Child>,
    log_path: PathBuf,
    /// An open-file limit (soft and hard) to run it under, via `prlimit`.
    nofile: Option<u64>,
    /// Whether the replica folder is a tmpfs of its own (unmounted on drop).
    tmpfs: bool,
    /// More arguments for `hbrfs serve`, kept across restarts.
    extra: Vec<String>,
    /// Where the next start aborts (`HBRFS_CRASH_POINT`), if anywhere.
    pub crash_point: Option<String>,
    /// Dropped last, after `Drop` has unmounted the mirror.
    _dir: TempDir,
}

/// Where and how a secondary serves (see [`Secondary::launch`]).
struct Serving<'a> {
    replica: PathBuf,
    addr: &'a str,
    nofile: Option<u64>,
    tmpfs: bool,
}

impl Secondary {
    /// Starts a secondary on a fresh replica folder, listening on a free
    /// port of 127.0.0.1 (read back from `REPLICA/.hbrfs/listen`).
    pub fn start() -> Secondary {
        Secondary::start_limited(None, &[])
    }

    /// Starts a secondary like [`Secondary::start`], with more arguments
    /// for `hbrfs serve`, kept across restarts.
    pub fn start_with_args(extra: &[&str]) -> Secondary {
        Secondary::start_limited(None, extra)
    }

    /// Starts a secondary like [`Secondary::start`], under an open-file
    /// limit of `nofile`, soft and hard (so the daemon cannot raise it),
    /// kept across restarts.
    pub fn start_with_nofile(nofile: u64) -> Secondary {
        Secondary::start_limited(Some(nofile), &[])
    }

    /// Starts a secondary like [`Secondary::start`] whose replica folder
    /// (its state folder with it) is a tmpfs of `size` (`mount -o size=`),
    /// so a larger point fills it; [`Secondary::resize`] grows it.
    pub fn start_on_tmpfs(size: &str) -> Secondary {
        Secondary::start_with(None, &[], Some(size))
    }

    fn start_limited(nofile: Option<u64>, extra: &[&str]) -> Secondary {
        Secondary::start_with(nofile, extra, None)
    }

    fn start_with(nofile: Option<u64>, extra: &[&str], tmpfs: Option<&str>) -> Secondary {
        let dir = temp_dir();
        let replica = dir.path().join("replica");
        if let Some(size) = tmpfs {
            fs::create_dir(&replica).expect("create replica folder");
            let opts = format!("size={size},mode=0755");
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", &opts, "hbrfs-test"])
                .arg(&replica));
        }
        let at = Serving {
            replica,
            addr: "127.0.0.1:0",
            nofile,
            tmpfs: tmpfs.is_some(),
        };
        Secondary::launch(dir, at, extra)
    }

    /// Serves an existing folder (e.g. a demoted primary's backing) on
    /// `addr` (`127.0.0.1:PORT`, fixed in advance so a primary can be
    /// pointed at it first), with more arguments for `hbrfs serve`.
    pub fn start_on(replica: &Path, addr: &str, extra: &[&str]) -> Secondary {
        let at = Serving {
            replica: replica.to_path_buf(),
            addr,
            nofile: None,
            tmpfs: false,
        };
        Secondary::launch(temp_dir(), at, extra)
    }

    /// Starts `hbrfs serve` as `at` says, its mirror and log in `dir`.
    fn launch(dir: TempDir, at: Serving<'_>, extra: &[&str]) -> Secondary {
        let mirror = dir.path().join("mirror");
        fs::create_dir(&mirror).expect("create mirror mountpoint");
        let mut s = Secondary {
            replica: at.replica,
            mirror,
            addr: at.addr.to_string(),
            child: None,
            log_path: dir.path().join("serve.log"),
            nofile: at.nofile,
            tmpfs: at.tmpfs,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            crash_point: None,
            _dir: dir,
        };
        s.spawn_and_wait();
        s
    }

    /// Sets the size of the replica's tmpfs (from `start_on_tmpfs`).
    pub fn resize(&self, size: &str) {
        assert!(self.tmpfs, "resize of a replica that is not a tmpfs");
        let opts = format!("remount,size={size}");
        run(Command::new("mount").args(["-o", &opts]).arg(&self.replica));
    }

    /// The pre-shared key a primary must present (made by `serve`).
    pub fn key_path(&self) -> PathBuf {
        self.replica.join(".hbrfs/auth.key")
    }

    fn listen_file(&self) -> PathBuf {
        self.replica.join(".hbrfs").join("listen")
    }

    fn spawn_and_wait(&mut self) {
        // A listen file left by a killed process must not pass for ours.
        match fs::remove_file(self.listen_file()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", self.listen_file().display()),
        }
        let before = fuse_mounts_at(&self.mirror);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open secondary log");
        writeln!(
            log,
            "=== hbrfs serve {} --listen {} --mount {}",
            self.replica.display(),
            self.addr,
            self.mirror.display()
        )
        .expect("write secondary log");
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(hbrfs());
                c
            }
            None => Command::new(hbrfs()),
        };
        if let Some(place) = &self.crash_point {
            cmd.env("HBRFS_CRASH_POINT", place);
        }
        let mut child = cmd
            .arg("serve")
            .arg(&self.replica)
            .args(["--listen", &self.addr, "--mount"])
            .arg(&self.mirror)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn hbrfs serve");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let addr = fs::read_to_string(self.listen_file()).ok();
            let addr = addr.map(|a| a.trim().to_string()).filter(|a| {
                a.parse::<std::net::SocketAddr>()
                    .is_ok_and(|s| s.port() != 0)
            });
            if let Some(addr) = addr
                && fuse_mounts_at(&self.mirror) > before
            {
                assert!(
                    self.addr.ends_with(":0") || self.addr == addr,
                    "secondary restarted on {addr}, not on {}",
                    self.addr
                );
                self.addr = addr;
                self.child = Some(child);
                return;
            }
            if let Some(status) = child.try_wait().expect("poll hbrfs serve") {
                panic!(
                    "hbrfs serve exited ({status}) before listening and mounting {}\n--- log ---\n{}",
                    self.mirror.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                detach_all(&self.mirror);
                panic!(
                    "hbrfs serve did not listen and mount {} within {START_TIMEOUT:?}\n--- log ---\n{}",
                    self.mirror.display(),
                    self.log()
                );
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// Starts the secondary again on the same folder and address.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart while the secondary runs");
        self.spawn_and_wait();
    }

    /// SIGKILLs the secondary, as a crash would, and detaches the stale
    /// mirror it leaves behind.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: secondary not running");
        signal(&child, libc::SIGKILL);
        let status = child.wait().expect("wait for killed hbrfs serve");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "secondary was not killed (it exited on its own: {status})\n--- log ---\n{}",
            self.log()
        );
        detach_all(&self.mirror);
    }

    /// Whether the secondary process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("poll hbrfs serve").is_none())
    }

    /// Waits until the secondary aborts at its crash point (SIGABRT, as
    /// `state::crash_point` does), and detaches the stale mirror.
    pub fn wait_crashed(&mut self, timeout: Duration) {
        let mut child = self
            .child
            .take()
            .expect("wait_crashed: secondary not running");
        let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "the secondary did not reach its crash point within {timeout:?}\n--- log ---\n{}",
                self.log()
            )
        });
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "the secondary exited otherwise ({status})\n--- log ---\n{}",
            self.log()
        );
        detach_all(&self.mirror);
    }

    /// SIGTERMs the secondary and asserts it unmounts its mirror and exits 0.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("stop: secondary not running");
        signal(&child, libc::SIGTERM);
        let status = wait_child(&mut child, START_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "hbrfs serve did not exit within {START_TIMEOUT:?} of SIGTERM\n--- log ---\n{}",
                self.log()
            )
        });
        assert!(
            status.success(),
            "hbrfs serve exited with {status} after SIGTERM\n--- log ---\n{}",
            self.log()
        );
        assert_eq!(
            fuse_mounts_at(&self.mirror),
            0,
            "mirror {} still mounted after hbrfs serve exited",
            self.mirror.display()
        );
    }

    /// The numbers on the line starting with `key` of the running
    /// secondary's `/proc/PID/NAME`.
    fn proc_numbers(&self, name: &str, key: &str) -> Vec<u64> {
        let pid = self.child.as_ref().expect("secondary running").id();
        let text = fs::read_to_string(format!("/proc/{pid}/{name}"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/{name}: {e}"));
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line in /proc/{pid}/{name}"));
        line.split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    }

    /// The running secondary's open-file limits (soft, hard), from
    /// `/proc/PID/limits`.
    pub fn open_file_limits(&self) -> (u64, u64) {
        let n = self.proc_numbers("limits", "Max open files");
        (n[0], n[1])
    }

    /// The running secondary's peak resident memory (`VmHWM` of
    /// `/proc/PID/status`, in kB), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc_numbers("status", "VmHWM:")[0] * 1024
    }

    /// `hbrfs status -d REPLICA --json`.
    pub fn status(&self) -> Value {
        status_json(&self.replica)
    }

    /// The last epoch applied to the replica, as `hbrfs status` reports it.
    pub fn applied_epoch(&self) -> u64 {
        let s = self.status();
        assert_eq!(s["role"], "secondary", "secondary status: {s}");
        json_u64(&s["last_applied_epoch"])
    }

    /// `MIRROR/rel`.
    pub fn mir(&self, rel: &str) -> PathBuf {
        self.mirror.join(rel)
    }

    /// `REPLICA/rel`.
    pub fn rep(&self, rel: &str) -> PathBuf {
        self.replica.join(rel)
    }

    /// Everything the secondary logged, across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        detach_all(&self.mirror);
        if self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(&self.replica).status();
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child, not yet reaped: the pid is still ours.
    unsafe { libc::kill(pid, sig) };
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(20));
    }
}

/// A secondary and a primary replicating to it every second.
pub(crate) fn pair(extra: &[&str]) -> (Secondary, Mount) {
    let sec = Secondary::start();
    let m = primary_for(&sec, &sec.addr, extra);
    (sec, m)
}

/// A primary on a fresh datastore replicating every second to `sec`,
/// reached at `addr` (its own address, or a proxy's in front of it).
pub(crate) fn primary_for(sec: &Secondary, addr: &str, extra: &[&str]) -> Mount {
    let key = sec.key_path();
    let mut args = vec![
        "--replicate-to",
        addr,
        "--rpo",
        "1s",
        "--auth-key",
        path_str(&key),
    ];
    args.extend_from_slice(extra);
    Mount::start(&args)
}

// ---------------------------------------------------------------------------
// Status.

/// `hbrfs status -d DIR --json`, parsed.
pub(crate) fn status_json(dir: &Path) -> Value {
    let out = Command::new(hbrfs())
        .args(["status", "-d", path_str(dir), "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run hbrfs status");
    assert!(
        out.status.success(),
        "hbrfs status -d {} failed ({})\n--- stderr ---\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hbrfs status printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The primary's status; asserts it is one and replicates.
pub(crate) fn primary_status(m: &Mount) -> Value {
    let s = status_json(&m.backing);
    assert_eq!(s["role"], "primary", "primary status: {s}");
    assert!(
        s["replication"].is_object(),
        "primary status without replication: {s}"
    );
    s
}

/// One of the primary's replication counters.
pub(crate) fn repl_counter(s: &Value, name: &str) -> u64 {
    json_u64(&s["replication"][name])
}

/// Polls the primary's `replication.last_error` until it contains
/// `needle`, and returns it; panics with its status and log after `timeout`.
pub(crate) fn wait_last_error(m: &Mount, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let s = primary_status(m);
        let e = s["replication"]["last_error"].as_str().unwrap_or("");
        if e.contains(needle) {
            return e.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no replication error naming {needle:?} within {timeout:?}:\n{s:#}\n--- log ---\n{}",
            m.log()
        );
        sleep(POLL);
    }
}

/// What [`wait_applied`] waits for.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// The primary has its ack for this epoch (or a later one) and the
    /// secondary reports it applied.
    Epoch(u64),
    /// Nothing is left to ship: no dirty block and no namespace operation
    /// is pending at the primary, every epoch before the open one is
    /// acknowledged, it is connected, and the secondary has applied the
    /// last point the primary shipped. Callers fsync what they
    /// wrote first (the kernel's writeback cache is not the datastore yet).
    CaughtUp,
}

/// Polls `hbrfs status --json` on both sides until `until` holds; returns
/// the primary's last status. Panics with both logs after `timeout`.
pub fn wait_applied(m: &Mount, sec: &Secondary, until: Until, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let p = primary_status(m);
        let shipped = repl_counter(&p, "last_applied_epoch");
        let done = match until {
            Until::Epoch(e) => shipped >= e && sec.applied_epoch() >= e,
            Until::CaughtUp => {
                p["replication"]["connected"] == Value::Bool(true)
                    && json_u64(&p["dirty_blocks"]) == 0
                    && json_u64(&p["ops"]) == 0
                    && shipped > 0
                    // Every closed epoch is acknowledged (the counters are
                    // updated just after the blocks are marked clean).
                    && shipped + 1 >= json_u64(&p["current_epoch"])
                    && sec.applied_epoch() >= shipped
            }
        };
        if done {
            return p;
        }
        if Instant::now() > deadline {
            panic!(
                "replication did not reach {until:?} within {timeout:?}\n\
                 --- primary status ---\n{p:#}\n--- secondary status ---\n{:#}\n\
                 --- primary log ---\n{}\n--- secondary log ---\n{}",
                sec.status(),
                m.log(),
                sec.log()
            );
        }
        sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Comparing the two sides.

/// The primary's image, the replica's file and the mirror's view of it
/// are identical (qemu-img compare, sizes, sha256); returns the hash.
fn assert_three_sides_identical(
    m: &Mount,
    sec: &Secondary,
    name: &str,
    format: &str,
    when: &str,
) -> String {
    qemu_img_compare(format, &m.mnt(name), &sec.rep(name));
    assert_mirror_size(&m.back(name), &sec.mir(name));
    qemu_img_compare(format, &m.mnt(name), &sec.mir(name));
    let (p, r, mir) = (
        sha256(&m.back(name)),
        sha256(&sec.rep(name)),
        sha256(&sec.mir(name)),
    );
    assert_eq!(
        p, r,
        "{name}: replica hash differs from the primary's{when}"
    );
    assert_eq!(
        p, mir,
        "{name}: mirror hash differs from the primary's{when}"
    );
    p
}

/// `sha256sum FILE`, as a real client reads it.
pub(crate) fn sha256(p: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(p));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_string()
}

/// `qemu-img compare -f FMT -F FMT a b` must say identical (exit 0).
pub(crate) fn qemu_img_compare(format: &str, a: &Path, b: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", format])
        .arg(a)
        .arg(b));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("identical"),
        "qemu-img compare {} {}: {said}",
        a.display(),
        b.display()
    );
}

/// One entry of a directory tree, as compared between the two sides.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { size: u64 },
    Symlink(PathBuf),
}

/// Every entry under `root` (the `.hbrfs` state folder and a mirror's
/// `.points` recovery points excluded).
fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            if rel == Path::new(".hbrfs") || rel == Path::new(".points") {
                continue;
            }
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let node = if meta.is_dir() {
                walk(root, &path, out);
                Node::Dir
            } else if meta.file_type().is_symlink() {
                Node::Symlink(fs::read_link(&path).expect("readlink"))
            } else {
                Node::File { size: meta.len() }
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two files hold the same bytes, reading both in 1 MiB chunks.
pub(crate) fn assert_same_bytes(a: &Path, b: &Path) {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba, a);
        let nb = read_full(&mut fb, &mut bb, b);
        if let Some(i) = (0..na.min(nb)).find(|&i| ba[i] != bb[i]) {
            panic!(
                "{} and {} differ first at byte {}",
                a.display(),
                b.display(),
                offset + i as u64
            );
        }
        assert_eq!(
            na,
            nb,
            "{} and {} differ in length after byte {offset}",
            a.display(),
            b.display()
        );
        if na == 0 {
            return;
        }
        offset += na as u64;
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8], p: &Path) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read {}: {e}", p.display()),
        }
    }
    n
}

/// The replica folder equals the primary's backing folder: same entries,
/// same types, sizes, link targets and bytes.
pub(crate) fn assert_trees_identical(m: &Mount, sec: &Secondary) {
    let primary = tree(&m.backing);
    let replica = tree(&sec.replica);
    assert_eq!(
        primary, replica,
        "replica tree differs from the primary's backing tree"
    );
    for (rel, node) in &primary {
        if matches!(node, Node::File { .. }) {
            assert_same_bytes(&m.backing.join(rel), &sec.replica.join(rel));
        }
    }
}

/// Bytes actually allocated to a file.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .blocks()
        * 512
}

/// The mirror reports the applied size of a file (the primary's, once
/// caught up): `qemu-img` and hypervisors size images with `stat`.
fn assert_mirror_size(primary: &Path, mirror: &Path) {
    let p = fs::metadata(primary).expect("stat primary").len();
    let r = fs::metadata(mirror).expect("stat mirror").len();
    assert_eq!(
        r,
        p,
        "{}: the mirror reports size {r}, the primary (and the applied point) {p}",
        mirror.display()
    );
}

/// Opening a mirror file for writing must fail with EROFS.
fn assert_erofs(p: &Path) {
    match OpenOptions::new().write(true).open(p) {
        Ok(_) => panic!("{} opened for writing on a read-only mirror", p.display()),
        Err(e) => assert_eq!(
            errno(&e),
            libc::EROFS,
            "open {} for writing: {e}",
            p.display()
        ),
    }
    let created = p.with_file_name("new-file-on-mirror");
    match File::create(&created) {
        Ok(_) => panic!("created {} on a read-only mirror", created.display()),
        Err(e) => assert_eq!(errno(&e), libc::EROFS, "create {}: {e}", created.display()),
    }
}

// ---------------------------------------------------------------------------
// Dependent sequence numbers in two images.

/// One record per sequence number: number `n` (from 1) sits at
/// `(n - 1) * REC` in each image, as `n` and `n ^ tag` (little endian),
/// the rest zero. A record slot inside the file that does not hold exactly
/// that is a torn or mixed point.
const REC: usize = 4096;
const TAG_A: u64 = 0xA5A5_0000_0000_00A1;
const TAG_B: u64 = 0x5A5A_0000_0000_00B2;
const SEQ_A: &str = "seq-a.img";
const SEQ_B: &str = "seq-b.img";

/// How each write of the sequence writer is made durable before the next.
#[derive(Clone, Copy, Debug)]
enum Durable {
    /// O_DIRECT: the write returned means the daemon wrote it (cache=none).
    Direct,
    /// A buffered write followed by fdatasync.
    Fdatasync,
}

/// A 4 KiB-aligned buffer of one record, as O_DIRECT wants.
struct AlignedRecord {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedRecord {
    fn new() -> AlignedRecord {
        let raw = vec![0u8; 2 * REC];
        let start = raw.as_ptr().align_offset(REC);
        AlignedRecord { raw, start }
    }

    fn fill(&mut self, n: u64, tag: u64) -> &[u8] {
        let rec = &mut self.raw[self.start..self.start + REC];
        rec[..8].copy_from_slice(&n.to_le_bytes());
        rec[8..16].copy_from_slice(&(n ^ tag).to_le_bytes());
        rec
    }
}

/// Appends 1, 2, 3, … alternately to A and B under `dir` (A gets n, then
/// B gets n, then A gets n + 1), each write durable before the next one is
/// issued. Runs until `stop`; returns the last n written to both.
fn spawn_seq_writer(
    dir: PathBuf,
    how: Durable,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    thread::spawn(move || {
        let open = |name: &str| {
            let mut o = OpenOptions::new();
            o.create(true).truncate(false).read(true).write(true);
            if let Durable::Direct = how {
                o.custom_flags(libc::O_DIRECT);
            }
            let p = dir.join(name);
            o.open(&p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let files = [(open(SEQ_A), TAG_A, SEQ_A), (open(SEQ_B), TAG_B, SEQ_B)];
        let mut buf = AlignedRecord::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (f, tag, name) in &files {
                let at = n * REC as u64;
                f.write_all_at(buf.fill(n + 1, *tag), at)
                    .unwrap_or_else(|e| panic!("write {name}@{at}: {e}"));
                if let Durable::Fdatasync = how {
                    f.sync_data()
                        .unwrap_or_else(|e| panic!("fdatasync {name}: {e}"));
                }
            }
            n += 1;
            sleep(pace);
        }
        n
    })
}

/// The number of records in one image of the sequence, asserting that
/// every slot inside the file holds its own number.
fn seq_len(data: &[u8], tag: u64, what: &str) -> u64 {
    assert_eq!(
        data.len() % REC,
        0,
        "{what}: size {} is not a whole number of records",
        data.len()
    );
    for (i, rec) in data.chunks(REC).enumerate() {
        let n = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let check = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        let want = i as u64 + 1;
        assert!(
            n == want && check == want ^ tag && rec[16..].iter().all(|&b| b == 0),
            "{what}: record slot {i} holds n={n} check={check:#x}, expected {want} \
             (a torn or mixed point)"
        );
    }
    (data.len() / REC) as u64
}

fn read_or_empty(p: &Path) -> Vec<u8> {
    match fs::read(p) {
        Ok(v) => v,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", p.display()),
    }
}

/// Reads B, then A, under `dir` and checks that B is never ahead of A
/// (A n completed before B n was issued; reading B first means a point
/// applied between the two reads can only move A further ahead).
/// Returns (A's count, B's count).
fn check_seq(dir: &Path) -> (u64, u64) {
    let b = read_or_empty(&dir.join(SEQ_B));
    let a = read_or_empty(&dir.join(SEQ_A));
    let kb = seq_len(&b, TAG_B, &format!("{}/{SEQ_B}", dir.display()));
    let ka = seq_len(&a, TAG_A, &format!("{}/{SEQ_A}", dir.display()));
    assert!(
        kb <= ka,
        "{}: image B holds {kb} numbers but image A only {ka}: B is ahead of A, \
         the point mixes epochs",
        dir.display()
    );
    (ka, kb)
}

// ---------------------------------------------------------------------------
// 1. Image tools.

/// `qemu-io -f FMT -t CACHE -c CMD… FILE` (one process, flushed at exit).
pub(crate) fn qemu_io(format: &str, cache: &str, cmds: &[String], file: &Path) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format, "-t", cache]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.args(["-c", "flush"]).arg(file);
    run(&mut cmd);
}

/// Verifies patterns with `qemu-io -r` (read-only, as the mirror demands).
pub(crate) fn qemu_io_verify(format: &str, cmds: &[String], file: &Path) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", format]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(file));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains("Pattern verification failed") && !said.contains("failed"),
        "qemu-io -r {}: {said}",
        file.display()
    );
}

#[test]
fn qemu_io_patterns_in_raw_and_qcow2_replicate_identically_and_mirror_shows_them() {
    let (sec, m) = pair(&[]);
    // (name, format, qemu cache mode)
    let images = [
        ("raw-direct.img", "raw", "none"),
        ("raw-writeback.img", "raw", "writeback"),
        ("disk-direct.qcow2", "qcow2", "none"),
        ("disk-writeback.qcow2", "qcow2", "writeback"),
    ];
    let round1: Vec<(u64, u64, u8)> = vec![
        (0, MIB, 0x11),
        (3 * MIB, BLOCK, 0x22),
        (10 * MIB + 4096, 8192, 0x33),
        (20 * MIB - 512, 1024, 0x44),
        (63 * MIB, MIB, 0x55),
    ];
    // Overwrites part of round 1, unaligned to blocks, and adds new data.
    let round2: Vec<(u64, u64, u8)> = vec![
        (512 * 1024, 256 * 1024, 0x66),
        (3 * MIB + 4096, 4096, 0x77),
        (40 * MIB, 2 * MIB, 0x88),
    ];
    let writes = |ios: &[(u64, u64, u8)]| -> Vec<String> {
        ios.iter()
            .map(|&(off, len, p)| format!("write -P 0x{p:02x} {off} {len}"))
            .collect()
    };
    let reads = |ios: &[(u64, u64, u8)]| -> Vec<String> {
        ios.iter()
            .map(|&(off, len, p)| format!("read -P 0x{p:02x} {off} {len}"))
            .collect()
    };

    let started = Instant::now();
    for (name, format, _) in images {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(m.mnt(name))
            .arg("64M"));
    }
    for (name, format, cache) in images {
        qemu_io(format, cache, &writes(&round1), &m.mnt(name));
        // qcow2: a zeroed cluster in the middle of written data.
        if format == "qcow2" {
            qemu_io(
                format,
                cache,
                &["write -z 3M 64k".to_string()],
                &m.mnt(name),
            );
        }
        sync_file(&m.mnt(name));
    }
    let after1 = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    println!(
        "round 1 applied at epoch {} after {:?}",
        repl_counter(&after1, "last_applied_epoch"),
        started.elapsed()
    );
    let mut hashes1 = BTreeMap::new();
    for (name, format, _) in images {
        let p = assert_three_sides_identical(&m, &sec, name, format, "");
        // qcow2 zeroed the cluster at 3 MiB after writing it.
        let kept: Vec<(u64, u64, u8)> = round1
            .iter()
            .copied()
            .filter(|&(off, _, _)| format == "raw" || off != 3 * MIB)
            .collect();
        let mut cmds = reads(&kept);
        if format == "qcow2" {
            cmds.push(format!("read -P 0 {} {BLOCK}", 3 * MIB));
        }
        qemu_io_verify(format, &cmds, &sec.mir(name));
        hashes1.insert(name, p);
    }

    // Round 2: overwrites and new data, and the next point must carry them.
    let epoch1 = repl_counter(&after1, "last_applied_epoch");
    for (name, format, cache) in images {
        qemu_io(format, cache, &writes(&round2), &m.mnt(name));
        sync_file(&m.mnt(name));
    }
    let after2 = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let epoch2 = repl_counter(&after2, "last_applied_epoch");
    assert!(
        epoch2 > epoch1,
        "round 2 shipped no new point ({epoch1} → {epoch2})"
    );
    for (name, format, _) in images {
        let p = assert_three_sides_identical(&m, &sec, name, format, " after round 2");
        assert_ne!(p, hashes1[name], "{name}: round 2 changed nothing?");
        qemu_io_verify(format, &reads(&round2), &sec.mir(name));
        assert_erofs(&sec.mir(name));
    }
    println!(
        "qemu images: points {epoch1} and {epoch2}, {:?} in all; primary counters: {:#}",
        started.elapsed(),
        after2["replication"]
    );
}

// ---------------------------------------------------------------------------
// 2. Consistency across images.

/// Pre-images (invariant 2 inside one image): a block rewritten while its
/// point ships travels with the content it had at the cut. With 4 KiB
/// blocks and `--max-rate 1M`, a point of 4 MiB of incompressible blocks
/// and then block X takes seconds to ship, and X is read (five chunks of
/// 256 blocks in, past the reader's lead of three) long after it is
/// rewritten with B just as the ship starts. When that point has landed
/// the replica holds A at X — while the primary already holds B — and the
/// next point brings B.
#[test]
fn a_block_rewritten_while_its_point_ships_lands_with_its_cut_time_content() {
    const BS: u64 = 4096;
    const X: u64 = 5 * 256 + 10;
    // The image must reach the secondary as one point: a cut 3 s after the
    // first change (not 5 ms) keeps the page flush of the fsync together.
    let (sec, m) = pair(&["--block-size", "4K", "--max-rate", "1M", "--coalesce", "3s"]);
    let img = m.mnt("img");
    let a = pattern(BS as usize, 0xA);
    let b = pattern(BS as usize, 0xB);
    {
        let f = File::create(&img).unwrap();
        f.write_all_at(&pattern((4 * 256 * BS) as usize, 1), 0)
            .unwrap();
        f.write_all_at(&a, X * BS).unwrap();
        f.sync_all().unwrap();
    }
    let before = sec.applied_epoch();
    // Wait for the point's ship to start, then rewrite X at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while primary_status(&m)["replication"]["shipping"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the point never started shipping"
        );
        sleep(Duration::from_millis(10));
    }
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&b, X * BS).unwrap();
    f.sync_all().unwrap();
    let ship = primary_status(&m)["replication"]["shipping"].clone();
    assert!(
        json_u64(&ship["blocks_done"]) < 4 * 256,
        "X may have been read before it was rewritten: {ship}"
    );
    // The first point after `before` that holds the image.
    let deadline = Instant::now() + APPLY_TIMEOUT;
    let (epoch, at_x) = loop {
        let e = sec.applied_epoch();
        if e > before && sec.rep("img").exists() {
            let mut got = vec![0u8; BS as usize];
            File::open(sec.rep("img"))
                .unwrap()
                .read_exact_at(&mut got, X * BS)
                .unwrap();
            break (e, got);
        }
        assert!(Instant::now() < deadline, "no point landed");
        sleep(Duration::from_millis(20));
    };
    assert_eq!(
        sec.applied_epoch(),
        epoch,
        "the next point landed while X was being read: the check saw two points"
    );
    assert!(
        at_x == a,
        "epoch {epoch}: the replica's block X is {}, not its content at the cut",
        if at_x == b {
            "the rewrite B"
        } else {
            "neither A nor B"
        }
    );
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.back("img"), &sec.rep("img"));
}

#[test]
fn dependent_writes_to_two_images_never_show_b_ahead_of_a_at_any_mirrored_point() {
    // Points follow each other as fast as they apply under continuous
    // writes (the RPO is a ceiling); the observer needs a stable point
    // between two applies now and then, so each cut waits 300 ms for more
    // writes: still many points in the run, each with time to be read.
    let (sec, m) = pair(&["--coalesce", "300ms"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_seq_writer(
        m.mountpoint.clone(),
        Durable::Direct,
        Duration::from_millis(3),
        stop.clone(),
    );
    let run_for = Duration::from_secs(18);
    let started = Instant::now();
    let mut points = BTreeSet::new();
    let (mut checks, mut checks_at_one_point) = (0u64, 0u64);
    let mut last = (0, 0);
    while started.elapsed() < run_for {
        assert!(
            !writer.is_finished(),
            "the writer stopped early (see its panic above)"
        );
        let (at, ka, kb) = observe(&sec);
        checks += 1;
        if let Some(e) = at {
            checks_at_one_point += 1;
            if kb > 0 {
                points.insert(e);
            }
            assert!(
                ka >= last.0 && kb >= last.1,
                "the mirror went back in time: {last:?} → {:?}",
                (ka, kb)
            );
            last = (ka, kb);
        }
        sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().expect("sequence writer panicked");
    let fin = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let (_, ka, kb) = observe_one_point(&sec);
    assert_eq!(
        (ka, kb),
        (n, n),
        "after catching up the mirror must hold every number written"
    );
    assert_same_bytes(&m.back(SEQ_A), &sec.rep(SEQ_A));
    assert_same_bytes(&m.back(SEQ_B), &sec.rep(SEQ_B));
    println!(
        "cross-image consistency: {n} numbers per image, {checks} checks \
         ({checks_at_one_point} within one point), {} distinct points seen: {points:?}; \
         shipped {} epochs in {:?}",
        points.len(),
        repl_counter(&fin, "epochs_shipped"),
        started.elapsed()
    );
    assert!(
        points.len() >= 5,
        "only {} distinct points with data were observed on the mirror ({points:?}): \
         too few to show consistency across many points",
        points.len()
    );
}

/// Reads the sequences from the mirror between two reads of the applied
/// epoch. Returns `Some(e)` when both reads saw the same point `e` (an
/// apply holds the mirror off and moves the epoch before letting it in),
/// and then checks the cut both ways; B is never ahead of A in any case.
fn observe(sec: &Secondary) -> (Option<u64>, u64, u64) {
    let before = sec.applied_epoch();
    let (ka, kb) = check_seq(&sec.mirror);
    let after = sec.applied_epoch();
    assert!(
        after >= before,
        "applied epoch went back: {before} → {after}"
    );
    let at = (before == after).then_some(before);
    if let Some(e) = at {
        assert!(
            ka <= kb + 1,
            "at point {e} image A holds {ka} numbers but B only {kb}: \
             B lost a write that completed before A's last one"
        );
    }
    (at, ka, kb)
}

/// [`observe`] until one observation falls within a single point.
fn observe_one_point(sec: &Secondary) -> (u64, u64, u64) {
    for _ in 0..50 {
        if let (Some(e), ka, kb) = observe(sec) {
            return (e, ka, kb);
        }
    }
    panic!("the applied epoch changed during each of 50 reads of the mirror");
}

// ---------------------------------------------------------------------------
// 3. kill -9 of the secondary.

/// xorshift64*, seeded from the clock (or HBRFS_TEST_SEED), printed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn from_time_or_env() -> Rng {
        let seed = std::env::var("HBRFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
            })
            | 1;
        println!("kill -9 test seed: {seed} (HBRFS_TEST_SEED={seed} to repeat)");
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Rewrites random 1 MiB extents of a 64 MiB image with fresh bytes until
/// `stop`, so that every point carries real data to apply.
fn spawn_bulk_writer(path: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    thread::spawn(move || {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut rng = Rng(seed | 1);
        let mut written = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let at = rng.below(64) * MIB;
            f.write_all_at(&pattern(MIB as usize, rng.next()), at)
                .unwrap_or_else(|e| panic!("write {}@{at}: {e}", path.display()));
            written += MIB;
            if written % (8 * MIB) == 0 {
                f.sync_data()
                    .unwrap_or_else(|e| panic!("fdatasync {}: {e}", path.display()));
            }
            sleep(Duration::from_millis(40));
        }
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
        written
    })
}

/// The epoch an interrupted apply's redo record names, if one is there
/// (`REPLICA/.hbrfs/redo`, see `replica::store`).
fn redo_epoch(sec: &Secondary) -> Option<u64> {
    record_epoch(sec, "redo")
}

/// The epoch of the point being applied in place, if one is.
fn in_flight_epoch(sec: &Secondary) -> Option<u64> {
    record_epoch(sec, "inflight")
}

fn record_epoch(sec: &Secondary, record: &str) -> Option<u64> {
    let text = fs::read_to_string(sec.replica.join(".hbrfs").join(record)).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A point of 300 new files reaches a secondary held to 256 open files:
/// the apply does not hold every file of the point open at once, nothing
/// is skipped, and every file lands whole.
#[test]
fn a_point_of_300_files_applies_whole_on_a_secondary_limited_to_256_open_files() {
    const FILES: usize = 300;
    let mut sec = Secondary::start_with_nofile(256);
    let m = primary_for(&sec, &sec.addr, &[]);
    assert_eq!(sec.open_file_limits(), (256, 256), "prlimit did not take");
    // One point of all 300 files: written while the secondary is down.
    sec.stop();
    fs::create_dir(m.mnt("many")).expect("mkdir many");
    let name = |i: usize| format!("many/f{i:03}");
    for i in 0..FILES {
        let p = m.mnt(&name(i));
        fs::write(&p, format!("file {i}\n").repeat(i + 1))
            .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        sync_file(&p);
    }
    sec.restart();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    for i in 0..FILES {
        assert_same_bytes(&m.back(&name(i)), &sec.rep(&name(i)));
    }
    assert_trees_identical(&m, &sec);
    let log = sec.log();
    assert!(
        !log.contains("skipped") && !log.contains("Too many open files"),
        "the secondary skipped or failed something\n--- log ---\n{log}"
    );
}

fn staging_nonempty(sec: &Secondary) -> bool {
    fs::read_dir(sec.replica.join(".hbrfs").join("staging"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

#[test]
fn secondary_killed_mid_apply_20_times_stays_at_consistent_points_and_converges() {
    const KILLS: usize = 20;
    let (mut sec, m) = pair(&[]);
    let mut rng = Rng::from_time_or_env();
    let stop = Arc::new(AtomicBool::new(false));
    let seq = spawn_seq_writer(
        m.mountpoint.clone(),
        Durable::Fdatasync,
        Duration::from_millis(5),
        stop.clone(),
    );
    let bulk = spawn_bulk_writer(m.mnt("bulk.img"), rng.next(), stop.clone());
    let started = Instant::now();

    let mut last_epoch = 0u64;
    let mut last_counts = (0u64, 0u64);
    let (mut mid_apply, mut mid_staging) = (0usize, 0usize);
    let mut epochs_seen = BTreeSet::new();
    for i in 0..KILLS {
        assert!(
            !seq.is_finished() && !bulk.is_finished(),
            "a writer stopped early"
        );
        let applied_before = sec.applied_epoch();
        if i % 2 == 0 {
            // Wait for an apply to start (its inflight record; the redo
            // record is its commit point), then kill it somewhere inside.
            let deadline = Instant::now() + APPLY_TIMEOUT;
            while in_flight_epoch(&sec).is_none() && redo_epoch(&sec).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "no apply started within {APPLY_TIMEOUT:?} after restart {i}\n\
                     --- primary log ---\n{}\n--- secondary log ---\n{}",
                    m.log(),
                    sec.log()
                );
                sleep(Duration::from_millis(1));
            }
            sleep(Duration::from_millis(rng.below(10)));
        } else {
            // Let at least one point apply since the restart, then kill at
            // a random moment: receiving, staging, applying or idle.
            wait_applied(&m, &sec, Until::Epoch(applied_before + 1), APPLY_TIMEOUT);
            sleep(Duration::from_millis(rng.below(1500)));
        }
        sec.kill9();
        let redo = redo_epoch(&sec);
        let in_flight = in_flight_epoch(&sec);
        let killed_staging = staging_nonempty(&sec);
        if redo.is_some() || in_flight.is_some() {
            mid_apply += 1;
        } else if killed_staging {
            mid_staging += 1;
        }

        sec.restart();
        // The replica must be at a point: not older than before the kill,
        // at the committed epoch if an apply was interrupted, and the
        // sequences must form one crash-consistent cut.
        let e = sec.applied_epoch();
        assert!(
            e >= last_epoch && e >= applied_before,
            "kill {i}: the replica went back from epoch {} to {e}",
            last_epoch.max(applied_before)
        );
        if let Some(r) = redo {
            assert!(
                e >= r,
                "kill {i}: epoch {r} was committed (redo record) when killed, \
                 but after restart the replica is at {e}\n--- secondary log ---\n{}",
                sec.log()
            );
        }
        // A point in flight (no redo record) was rolled back at restart
        // to its base, or applied since by the primary's resend: never
        // between (the sequences below form one crash-consistent cut).
        for (record, r2) in [
            ("redo", redo_epoch(&sec)),
            ("inflight", in_flight_epoch(&sec)),
        ] {
            // Only a new apply, of a later epoch, may have one now.
            if let Some(r2) = r2 {
                assert!(
                    r2 > e,
                    "kill {i}: after restart a {record} record for epoch {r2} is left, at epoch {e}"
                );
            }
        }
        let (at, ka, kb) = observe_one_point(&sec);
        assert!(
            ka >= last_counts.0 && kb >= last_counts.1,
            "kill {i}: the replica lost numbers it held: {last_counts:?} → {:?}",
            (ka, kb)
        );
        println!(
            "kill {i:2} at {:>6.1?}: inflight={in_flight:?} redo={redo:?} staging={} epoch \
             {applied_before} → {e} (checked at {at}), A={ka} B={kb}",
            started.elapsed(),
            redo.is_none() && killed_staging,
        );
        epochs_seen.insert(e);
        last_epoch = e;
        last_counts = (ka, kb);
    }

    stop.store(true, Ordering::Relaxed);
    let n = seq.join().expect("sequence writer panicked");
    let bulk_bytes = bulk.join().expect("bulk writer panicked");
    for f in [SEQ_A, SEQ_B, "bulk.img"] {
        sync_file(&m.mnt(f));
    }
    let fin = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let (_, ka, kb) = observe_one_point(&sec);
    assert_eq!((ka, kb), (n, n), "converged mirror misses numbers");
    for f in [SEQ_A, SEQ_B, "bulk.img"] {
        qemu_img_compare("raw", &m.back(f), &sec.rep(f));
        assert_eq!(
            sha256(&m.back(f)),
            sha256(&sec.mir(f)),
            "{f}: mirror differs"
        );
    }
    assert_trees_identical(&m, &sec);
    println!(
        "{KILLS} kills in {:?}: {mid_apply} during an apply (inflight or redo record present), \
         {mid_staging} while staging; epochs after restarts {epochs_seen:?}; \
         {n} sequence numbers, {} MiB of bulk writes; final epoch {}",
        started.elapsed(),
        bulk_bytes / MIB,
        repl_counter(&fin, "last_applied_epoch")
    );
    // Half the kills aim at an apply (they wait for its redo record); an
    // apply can still finish within the few milliseconds before the kill.
    assert!(
        mid_apply >= KILLS / 4,
        "only {mid_apply} of {KILLS} kills hit an apply in progress"
    );
}

// ---------------------------------------------------------------------------
// 4. Dedup of a copy.

/// Copies a replicated 4 MiB image of random bytes with `copy` (run on
/// the primary mount, from `MNT/orig.img` to `MNT/copy.img`) and asserts,
/// with the primary's counters, that the copy's blocks were answered
/// "have" by the secondary instead of travelling.
fn copy_ships_hash_references_not_blocks(copy: &dyn Fn(&Path, &Path)) {
    let (sec, m) = pair(&[]);
    const SIZE: u64 = 4 * MIB;
    let blocks = SIZE / BLOCK;
    fs::write(m.mnt("orig.img"), pattern(SIZE as usize, 42)).expect("write orig.img");
    sync_file(&m.mnt("orig.img"));
    let before = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    // The original itself had to travel: the counters do count.
    assert!(
        repl_counter(&before, "blocks_sent") >= blocks,
        "the original's {blocks} blocks were not counted as sent: {:#}",
        before["replication"]
    );

    copy(&m.mnt("orig.img"), &m.mnt("copy.img"));
    sync_file(&m.mnt("copy.img"));
    let after = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);

    let delta = |name: &str| repl_counter(&after, name) - repl_counter(&before, name);
    let (sent, have, offered, zero) = (
        delta("blocks_sent"),
        delta("blocks_have"),
        delta("blocks_offered"),
        delta("blocks_zero"),
    );
    let (raw, compressed, wire) = (
        delta("raw_bytes_sent"),
        delta("compressed_bytes_sent"),
        delta("wire_bytes"),
    );
    println!(
        "copy of {blocks} blocks: offered {offered} (zero {zero}), sent {sent}, have {have}, \
         raw {raw} B, compressed {compressed} B, wire {wire} B"
    );
    assert_eq!(
        fs::metadata(sec.rep("copy.img"))
            .expect("replica copy.img")
            .len(),
        SIZE,
        "the replica's copy.img has the wrong size"
    );
    assert_same_bytes(&m.back("copy.img"), &sec.rep("copy.img"));
    assert_same_bytes(&m.back("copy.img"), &sec.mir("copy.img"));
    // A cut may split a block the copy was writing: it travels once half
    // written. Anything more is not dedup.
    assert!(
        sent <= 4,
        "copying a replicated image sent {sent} of its {blocks} blocks"
    );
    assert!(
        have >= blocks - sent,
        "only {have} of the copy's {blocks} blocks were answered from content the replica held"
    );
    assert!(
        wire < SIZE / 10,
        "copying a {SIZE}-byte image put {wire} bytes on the wire"
    );
    let sec_counters = &sec.status()["counters"];
    assert!(
        json_u64(&sec_counters["blocks_have"]) >= blocks - sent,
        "the secondary counted no reuse: {sec_counters}"
    );
}

/// `cp` (coreutils uses copy_file_range, which the mount passes through).
#[test]
fn cp_of_a_replicated_image_ships_hash_references_not_blocks() {
    copy_ships_hash_references_not_blocks(&|from, to| {
        run(Command::new("cp").arg(from).arg(to));
    });
}

/// `dd` copies with plain reads and writes.
#[test]
fn dd_copy_of_a_replicated_image_ships_hash_references_not_blocks() {
    copy_ships_hash_references_not_blocks(&|from, to| {
        run(Command::new("dd")
            .arg(format!("if={}", from.display()))
            .arg(format!("of={}", to.display()))
            .args(["bs=1M", "status=none"]));
    });
}

// ---------------------------------------------------------------------------
// 5. Namespace operations and sparse files.

/// The first byte offset holding data at or after `from` (SEEK_DATA).
fn seek_data(p: &Path, from: u64) -> Option<u64> {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let off = libc::off_t::try_from(from).expect("offset fits off_t");
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(errno(&e), libc::ENXIO, "SEEK_DATA {}: {e}", p.display());
        return None;
    }
    Some(r as u64)
}

#[test]
fn rename_unlink_truncate_punch_mkdir_symlink_replicate_and_sparse_stays_sparse() {
    let (mut sec, m) = pair(&[]);
    let w = |rel: &str, len: u64, seed: u64| {
        fs::write(m.mnt(rel), pattern(len as usize, seed))
            .unwrap_or_else(|e| panic!("write {rel}: {e}"));
        sync_file(&m.mnt(rel));
    };
    fs::create_dir(m.mnt("vms")).expect("mkdir vms");
    fs::create_dir(m.mnt("olddir")).expect("mkdir olddir");
    w("vms/a.img", MIB, 1);
    w("b.img", 256 * 1024, 2);
    w("c.img", MIB, 3);
    w("d.img", MIB, 4);
    w("olddir/x.img", 100_000, 5);
    create_sparse(&m.mnt("sparse.img"), 1024 * MIB);
    write_ranges(&m.mnt("sparse.img"), &[(512 * MIB, MIB)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_trees_identical(&m, &sec);
    assert!(sec.rep("vms/a.img").exists() && sec.rep("b.img").exists());

    fs::rename(m.mnt("vms/a.img"), m.mnt("vms/a2.img")).expect("rename a.img");
    fs::rename(m.mnt("olddir"), m.mnt("newdir")).expect("rename olddir");
    fs::remove_file(m.mnt("b.img")).expect("unlink b.img");
    run(Command::new("truncate")
        .args(["-s", "300000"])
        .arg(m.mnt("c.img")));
    w("e.img", BLOCK, 6);
    run(Command::new("truncate")
        .args(["-s", "10M"])
        .arg(m.mnt("e.img")));
    run(Command::new("fallocate")
        .args(["-p", "-o", "128KiB", "-l", "256KiB"])
        .arg(m.mnt("d.img")));
    fs::create_dir_all(m.mnt("vms/sub/deeper")).expect("mkdir -p");
    w("vms/sub/deeper/f.img", 70_000, 7);
    fs::create_dir(m.mnt("gone")).expect("mkdir gone");
    fs::remove_dir(m.mnt("gone")).expect("rmdir gone");
    std::os::unix::fs::symlink("vms/a2.img", m.mnt("current.img")).expect("symlink");
    for f in ["c.img", "d.img", "e.img"] {
        sync_file(&m.mnt(f));
    }
    let st = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    println!(
        "namespace point {}",
        repl_counter(&st, "last_applied_epoch")
    );

    assert_trees_identical(&m, &sec);
    // The same, spelled out, so that a failure says which operation broke.
    assert!(!sec.rep("vms/a.img").exists(), "rename left the old name");
    assert_same_bytes(&m.back("vms/a2.img"), &sec.rep("vms/a2.img"));
    assert!(
        !sec.rep("olddir").exists(),
        "directory rename left the old name"
    );
    assert!(
        sec.rep("newdir/x.img").is_file(),
        "directory rename lost its file"
    );
    assert!(!sec.rep("b.img").exists(), "unlink did not replicate");
    assert_eq!(
        fs::metadata(sec.rep("c.img")).expect("c.img").len(),
        300_000
    );
    assert_eq!(
        fs::metadata(sec.rep("e.img")).expect("e.img").len(),
        10 * MIB
    );
    assert!(
        sec.rep("vms/sub/deeper").is_dir(),
        "mkdir did not replicate"
    );
    assert!(!sec.rep("gone").exists(), "rmdir did not replicate");
    assert_eq!(
        fs::read_link(sec.rep("current.img")).expect("readlink on replica"),
        Path::new("vms/a2.img")
    );
    let d = read(&sec.rep("d.img"));
    assert!(
        d[128 * 1024..384 * 1024].iter().all(|&b| b == 0),
        "punched range not zero on the replica"
    );
    // Holes stay holes: the punched blocks, the grown tail, the sparse image.
    let slack = BLOCK;
    for f in ["d.img", "e.img", "sparse.img"] {
        let (p, r) = (allocated(&m.back(f)), allocated(&sec.rep(f)));
        println!("{f}: allocated {p} B on the primary, {r} B on the replica");
        assert!(
            r <= p + slack,
            "{f}: the replica allocates {r} bytes, the primary {p}: holes were filled"
        );
    }
    let sparse = sec.rep("sparse.img");
    assert_eq!(fs::metadata(&sparse).expect("sparse").len(), 1024 * MIB);
    assert!(
        allocated(&sparse) <= 2 * MIB,
        "sparse image allocates {} bytes on the replica",
        allocated(&sparse)
    );
    let first = seek_data(&sparse, 0).expect("sparse replica holds no data at all");
    assert!(
        first >= 512 * MIB - BLOCK,
        "sparse replica has data at {first}, before the only write at 512 MiB"
    );
    let mut got = vec![0u8; MIB as usize];
    File::open(&sparse)
        .and_then(|f| f.read_exact_at(&mut got, 512 * MIB))
        .expect("read sparse replica");
    assert!(
        got == pattern(MIB as usize, 512 * MIB),
        "sparse data differs"
    );

    // The mirror shows the same tree as the primary's mount.
    assert_eq!(
        tree(&m.mountpoint),
        tree(&sec.mirror),
        "the mirror's tree differs from the primary mount's"
    );
    assert_same_bytes(&m.mnt("vms/a2.img"), &sec.mir("current.img"));
    assert_erofs(&sec.mir("vms/a2.img"));

    // Without a server, `mount-replica` shows the same point read-only.
    sec.stop();
    let view = temp_dir();
    let mnt = view.path().join("view");
    fs::create_dir(&mnt).expect("mkdir view");
    let mut child = Command::new(hbrfs())
        .arg("mount-replica")
        .arg(&sec.replica)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mount-replica");
    let deadline = Instant::now() + START_TIMEOUT;
    while fuse_mounts_at(&mnt) == 0 {
        if let Some(status) = child.try_wait().expect("poll mount-replica") {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("hbrfs mount-replica exited ({status}) without mounting: {err}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hbrfs mount-replica did not mount within {START_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(20));
    }
    let same = std::panic::catch_unwind(|| {
        assert_eq!(
            tree(&m.mountpoint),
            tree(&mnt),
            "mount-replica tree differs"
        );
        assert_same_bytes(&m.mnt("newdir/x.img"), &mnt.join("newdir/x.img"));
        assert_erofs(&mnt.join("c.img"));
    });
    signal(&child, libc::SIGTERM);
    if wait_child(&mut child, START_TIMEOUT).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    detach_all(&mnt);
    if let Err(e) = same {
        std::panic::resume_unwind(e);
    }
}

/// A primary restored from an older copy of its datastore (state folder
/// included) must not be taken for the one that shipped the newer points:
/// the secondary's last point is not in its history, so it refuses to ship
/// (naming both histories and the way out) and the replica keeps its point.
#[test]
fn primary_restored_from_an_older_copy_is_refused_as_a_diverged_history() {
    let (sec, mut m) = pair(&[]);
    write_ranges(&m.mnt("disk.img"), &[(0, 4 * BLOCK)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(60));
    m.stop();
    let old_copy = temp_dir();
    run(Command::new("cp")
        .arg("-a")
        .arg(&m.backing)
        .arg(old_copy.path()));

    m.restart();
    write_ranges(&m.mnt("disk.img"), &[(8 * BLOCK, 4 * BLOCK)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(60));
    let newer = sec.applied_epoch();
    let replica_before = sha256(&sec.rep("disk.img"));
    m.stop();

    // Put the older copy back, then change something so it has a point to ship.
    fs::remove_dir_all(&m.backing).unwrap();
    let name = m.backing.file_name().unwrap().to_owned();
    fs::rename(old_copy.path().join(name), &m.backing).unwrap();
    m.restart();
    write_ranges(&m.mnt("disk.img"), &[(20 * BLOCK, BLOCK)], BLOCK);

    let error = wait_last_error(&m, "diverged", Duration::from_secs(30));
    assert!(
        error.contains(&format!("epoch {newer}")),
        "names the secondary's point: {error}"
    );
    assert!(error.contains("rm -rf"), "says how to resolve it: {error}");
    assert_eq!(sec.applied_epoch(), newer, "the secondary moved");
    assert_eq!(
        sha256(&sec.rep("disk.img")),
        replica_before,
        "the replica was overwritten"
    );
}

/// A client without the pair's key is refused before it can send anything
/// that touches disk; with a wrong key too.
#[test]
fn primary_without_the_key_is_refused_and_nothing_is_written() {
    let sec = Secondary::start();
    let out = Command::new(hbrfs())
        .args([
            "mount",
            "/nonexistent-backing",
            "/nonexistent-mnt",
            "--replicate-to",
            &sec.addr,
        ])
        .output()
        .expect("run hbrfs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--auth-key"),
        "{out:?}"
    );

    let wrong = temp_dir();
    let wrong_key = wrong.path().join("wrong.key");
    fs::write(&wrong_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let m = Mount::start(&[
        "--replicate-to",
        &sec.addr,
        "--rpo",
        "1s",
        "--auth-key",
        path_str(&wrong_key),
    ]);
    write_ranges(&m.mnt("disk.img"), &[(0, BLOCK)], BLOCK);
    wait_last_error(&m, "wrong key", Duration::from_secs(30));
    assert_eq!(sec.applied_epoch(), 0);
    assert!(
        !sec.replica.join(".hbrfs/pair").exists(),
        "an unauthenticated hello paired the replica"
    );
    assert!(
        !sec.rep("disk.img").exists(),
        "an unauthenticated primary wrote to the replica"
    );
}

/// `--max-rate` caps the replication bandwidth: while a large point ships,
/// the wire rate seen in `status` stays within 10% of the cap (after the
/// one-second burst the bucket allows).
#[test]
fn max_rate_caps_replication_bandwidth_within_ten_percent() {
    const RATE: u64 = 2 * MIB;
    // The 16 MiB must ship as one point (the window below is one ship): a
    // cut 3 s after the first change keeps the page flush together.
    let (sec, m) = pair(&["--max-rate", "2M", "--coalesce", "3s"]);
    // Incompressible data, so wire bytes are about the data's size.
    let data: Vec<u8> = pattern(16 * MIB as usize, 7);
    fs::write(m.mnt("big.img"), &data).unwrap();
    sync_file(&m.mnt("big.img"));
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = primary_status(&m);
        let shipping = !s["replication"]["shipping"].is_null();
        if shipping {
            samples.push((Instant::now(), repl_counter(&s, "wire_bytes")));
        } else if samples.len() > 5 {
            break;
        }
        assert!(Instant::now() < deadline, "the ship did not end:\n{s:#}");
        sleep(Duration::from_millis(100));
    }
    assert_eq!(
        primary_status(&m)["replication"]["max_rate_bytes_per_s"],
        RATE
    );
    // Skip the first second (the bucket starts full).
    let start = samples[0].0 + Duration::from_secs(1);
    let steady: Vec<_> = samples.iter().filter(|(t, _)| *t >= start).collect();
    let (first, last) = (steady.first().unwrap(), steady.last().unwrap());
    let secs = last.0.duration_since(first.0).as_secs_f64();
    assert!(secs > 3.0, "too short a window to judge: {secs} s");
    let rate = (last.1 - first.1) as f64 / secs;
    println!(
        "max-rate 2 MiB/s: measured {:.2} MiB/s over {secs:.1} s",
        rate / MIB as f64
    );
    // The cap holds: never more than 10% above it. (Below it is possible
    // on a loaded machine: the ship also waits for disks and round trips.)
    assert!(
        rate <= 1.1 * RATE as f64,
        "rate {rate} above the cap {RATE}"
    );
    // And the cap is what bounded the ship: unthrottled, 16 MiB go in well
    // under a second here; capped, the ship lasts at least the data beyond
    // the one-second burst divided by the rate.
    let shipped = samples
        .last()
        .unwrap()
        .0
        .duration_since(samples[0].0)
        .as_secs_f64();
    let floor = 0.9 * (16.0 - 2.0) / 2.0;
    assert!(
        shipped >= floor,
        "the ship took {shipped:.1} s, the cap allows no less than {floor:.1} s"
    );
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.mnt("big.img"), &sec.rep("big.img"));
}

/// Seeding: a replica folder that already holds a copy of an image (made
/// by hand before replication started) is indexed when the pair is made,
/// so only the blocks that differ travel; the rest are hash references the
/// secondary verifies.
#[test]
fn seeded_replica_receives_only_the_blocks_that_differ() {
    const SIZE: u64 = 64 * MIB;
    let dir = temp_dir();
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let image = pattern(SIZE as usize, 11);
    fs::write(backing.join("disk.img"), &image).unwrap();

    let sec = Secondary::start();
    fs::write(sec.rep("disk.img"), &image).unwrap();
    // 1% of the blocks change after the copy was taken.
    let changed: Vec<(u64, u64)> = (0..SIZE / BLOCK)
        .step_by(100)
        .map(|b| (b * BLOCK + 17, 100))
        .collect();
    let m = primary_on(&sec, &backing, &mnt);
    write_ranges(&m.mnt("disk.img"), &changed, BLOCK);
    let s = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.mnt("disk.img"), &sec.rep("disk.img"));
    let wire = repl_counter(&s, "wire_bytes");
    let sent = repl_counter(&s, "blocks_sent");
    println!(
        "seeding: {} of {} blocks sent, {wire} wire bytes for a {SIZE}-byte image ({:.2}%)",
        sent,
        SIZE / BLOCK,
        100.0 * wire as f64 / SIZE as f64
    );
    assert!(
        sent <= changed.len() as u64,
        "sent {sent} blocks, only {} differ",
        changed.len()
    );
    assert!(wire < SIZE / 20, "{wire} wire bytes: the seed was not used");
    assert!(sec.log().contains("seeding: indexed"), "{}", sec.log());
}

/// `hbrfs verify --json -d BACKING EXTRA…`: whether it exited 0, and its
/// report.
pub(crate) fn verify_json(backing: &Path, extra: &[&str]) -> (bool, Value) {
    let mut args = vec!["verify", "--json", "-d", path_str(backing)];
    args.extend_from_slice(extra);
    let out = Command::new(hbrfs())
        .args(&args)
        .output()
        .expect("run hbrfs verify");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {out:?}"));
    (out.status.success(), v)
}

/// Flips a byte of block 7 of `file` (a copy of the datastore's
/// `disk.img`, primary or replica, behind hbrfs's back); then `verify` of
/// the datastore at `backing` must name exactly that block and fail, and
/// `verify --repair` mark it to ship again.
pub(crate) fn flip_block_7_and_repair(backing: &Path, file: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 7 * BLOCK + 123).unwrap();
    f.write_all_at(&[byte[0] ^ 0xff], 7 * BLOCK + 123).unwrap();
    f.sync_all().unwrap();
    let (ok, v) = verify_json(backing, &[]);
    assert!(!ok, "verify passed with a flipped byte: {v:#}");
    let diffs = v["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{v:#}");
    assert_eq!(diffs[0]["path"], "disk.img");
    assert_eq!(
        diffs[0]["ranges"],
        serde_json::json!([{"first_block": 7, "blocks": 1}])
    );
    let (ok, v) = verify_json(backing, &["--repair"]);
    assert!(!ok && v["repaired"] == Value::Bool(true), "{v:#}");
}

/// `hbrfs verify` compares primary and replica by block hashes: with
/// writes going on it reports nothing (dirty blocks are not differences);
/// after a byte of a replica file is flipped behind hbrfs's back it names
/// exactly that block and exits non-zero; `--repair` ships it again.
#[test]
fn verify_finds_exactly_a_flipped_replica_byte_and_repair_fixes_it() {
    let (sec, m) = pair(&[]);
    write_ranges(&m.mnt("disk.img"), &[(0, 32 * BLOCK)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let verify = |extra: &[&str]| verify_json(&m.backing, extra);
    // Writes in flight (dirty, not yet shipped) are no difference.
    write_ranges(&m.mnt("disk.img"), &[(40 * BLOCK, BLOCK)], BLOCK);
    let (ok, v) = verify(&[]);
    assert!(ok, "a clean pair failed verify: {v:#}");
    assert_eq!(v["differences"], Value::Array(vec![]), "{v:#}");
    assert!(json_u64(&v["blocks_checked"]) >= 32, "{v:#}");

    // Flip one byte of block 7 in the replica file itself.
    flip_block_7_and_repair(&m.backing, &sec.rep("disk.img"));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.mnt("disk.img"), &sec.rep("disk.img"));
    let (ok, v) = verify(&[]);
    assert!(ok, "still differs after repair: {v:#}");
}

// ---------------------------------------------------------------------------
// `--rpo` is a ceiling, not a period.

/// The RPO of these tests: far longer than any wait they allow, so a point
/// that arrives came from the wake-up, not from the ceiling.
const LONG_RPO: &str = "60s";

/// A fresh pair whose primary runs with `--rpo 60s`, once the secondary
/// holds its (empty) baseline.
fn pair_with_long_rpo() -> (Secondary, Mount) {
    let sec = Secondary::start();
    let key = sec.key_path();
    let args = [
        "--replicate-to",
        &sec.addr,
        "--rpo",
        LONG_RPO,
        "--auth-key",
        path_str(&key),
    ];
    let m = Mount::start(&args);
    // The mount shows before the daemon answers on its control socket.
    let deadline = Instant::now() + START_TIMEOUT;
    while !Command::new(hbrfs())
        .args(["status", "-d", path_str(&m.backing), "--json"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(Instant::now() < deadline, "no control socket:\n{}", m.log());
        sleep(POLL);
    }
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    (sec, m)
}

/// Polls until `replica` holds exactly `want`; returns how long it took,
/// or panics with both logs after `timeout`.
fn wait_replica_bytes(
    m: &Mount,
    sec: &Secondary,
    replica: &Path,
    want: &[u8],
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if fs::read(replica).is_ok_and(|have| have == want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{} did not match the primary within {timeout:?} (--rpo {LONG_RPO})\n\
             --- primary status ---\n{:#}\n--- primary log ---\n{}\n--- secondary log ---\n{}",
            replica.display(),
            primary_status(m),
            m.log(),
            sec.log()
        );
        sleep(Duration::from_millis(10));
    }
}

/// With `--rpo 60s` and the link idle, a write + fsync is on the replica,
/// byte-identical, within seconds: the write wakes the replicator, which
/// cuts after a few ms instead of waiting for the next RPO tick (the old
/// period behaviour waited up to 60 s). Idle, no point is cut.
#[test]
fn with_a_60s_rpo_a_fsynced_write_is_on_the_replica_within_seconds() {
    let (sec, m) = pair_with_long_rpo();
    let path = m.mnt("disk.img");
    let mut image = pattern(4 * MIB as usize, 1);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    let mut took = Vec::new();
    for round in 0..4u64 {
        // A new 256 KiB run somewhere in the image each round (the first
        // round creates the file: a namespace operation plus data).
        let at = (round * 7 % 16) * 256 * 1024;
        let data = pattern(256 * 1024, 100 + round);
        image[at as usize..at as usize + data.len()].copy_from_slice(&data);
        if round == 0 {
            f.write_all_at(&image, 0).unwrap();
        } else {
            f.write_all_at(&data, at).unwrap();
        }
        f.sync_all().unwrap();
        took.push(wait_replica_bytes(
            &m,
            &sec,
            &sec.rep("disk.img"),
            &image,
            Duration::from_secs(10),
        ));
        // A pause unlike any multiple of a period, so a lucky tick could
        // not explain the rounds.
        sleep(Duration::from_millis(300 + 170 * round));
    }
    println!("fsynced write -> replica identical, per round: {took:?} (--rpo {LONG_RPO})");
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.mnt("disk.img"), &sec.rep("disk.img"));
    assert_same_bytes(&m.mnt("disk.img"), &sec.mir("disk.img"));
    // Idle: nothing wakes the replicator, so no point is cut and none ships.
    let before = primary_status(&m);
    sleep(Duration::from_secs(2));
    let after = primary_status(&m);
    for counter in ["points_cut", "epochs_shipped"] {
        assert_eq!(
            repl_counter(&before, counter),
            repl_counter(&after, counter),
            "{counter} moved while nothing changed"
        );
    }
}

/// Under continuous writes (about 25 MB/s with an fdatasync every 8 MiB)
/// and `--rpo 60s`, points keep flowing while the writer runs (each one
/// cut as soon as the one before is applied), and the replica catches up
/// within seconds of the writer's end, identical.
#[test]
fn under_continuous_writes_points_keep_flowing_and_the_replica_catches_up_right_after() {
    let (sec, m) = pair_with_long_rpo();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_bulk_writer(m.mnt("busy.img"), 11, stop.clone());
    let first = repl_counter(&primary_status(&m), "last_applied_epoch");
    let mut applied = BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        applied.insert(sec.applied_epoch());
        sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("writer");
    let ended = Instant::now();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let drain = ended.elapsed();
    applied.retain(|&e| e > first);
    println!(
        "{} MiB written in 8 s; {} points applied while writing; caught up {drain:?} after the writer ended",
        written / MIB,
        applied.len()
    );
    assert!(
        applied.len() >= 3,
        "only {} points applied during 8 s of writes with --rpo {LONG_RPO}: {applied:?}",
        applied.len()
    );
    assert!(
        drain < Duration::from_secs(20),
        "the replica caught up only {drain:?} after the writer ended"
    );
    assert_same_bytes(&m.mnt("busy.img"), &sec.rep("busy.img"));
}

/// A primary replicating to `sec` over `backing` (prepared by the caller).
pub fn primary_on(sec: &Secondary, backing: &Path, mnt: &Path) -> Mount {
    fs::create_dir_all(mnt).expect("create mountpoint");
    let key = sec.key_path();
    let args = [
        "--replicate-to",
        &sec.addr,
        "--rpo",
        "1s",
        "--auth-key",
        path_str(&key),
    ];
    Mount::start_on(backing, mnt, &args)
}

/// Compression that pays: blocks of random data (nothing compresses them)
/// are found by the primary's probe and travel raw, blocks of text are
/// compressed, and both land byte-identical on the replica.
#[test]
fn incompressible_blocks_travel_raw_and_land_byte_identical() {
    let (sec, m) = pair(&[]);
    let image = m.mnt("mixed.img");
    let random = pattern(8 * MIB as usize, 0x5eed);
    let text: Vec<u8> = (0..8 * MIB as usize)
        .map(|i| b"a point of text that compresses well; "[i % 38])
        .collect();
    let f = File::create(&image).unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
    f.write_all_at(&random, 0).expect("write the random half");
    f.write_all_at(&text, 8 * MIB).expect("write the text half");
    drop(f);
    sync_file(&image);
    let p = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same_bytes(&m.backing.join("mixed.img"), &sec.replica.join("mixed.img"));
    let (raw, sent) = (
        repl_counter(&p, "blocks_raw"),
        repl_counter(&p, "blocks_sent"),
    );
    let random_blocks = 8 * MIB / BLOCK;
    assert_eq!(
        raw, random_blocks,
        "{raw} of {sent} blocks sent raw: every one of the {random_blocks} random blocks, no text block"
    );
    assert!(
        repl_counter(&p, "compressed_bytes_sent") < 8 * MIB + 8 * MIB / 10,
        "the text half is compressed, the random half costs its size: {p}"
    );
}

/// A point that changes only block content is written in place while it
/// streams in, and the mirror keeps serving the point before meanwhile:
/// a read of the image during the transfer (held to 8 MiB/s) returns at
/// once with the old content, not after the commit, and once the point is
/// applied the mirror shows the new content.
#[test]
fn the_mirror_serves_the_point_before_while_a_content_only_point_is_in_flight() {
    const MIB_IMAGE: usize = 32;
    let (sec, m) = pair(&["--max-rate", "8M"]);
    let image = m.mnt("disk.img");
    fs::write(&image, pattern(MIB_IMAGE << 20, 1)).expect("write the image");
    sync_file(&image);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let before = sha256(&sec.mir("disk.img"));

    let f = open_rw(&image);
    f.write_all_at(&pattern(MIB_IMAGE << 20, 2), 0)
        .expect("rewrite the image");
    f.sync_all().expect("fsync");
    drop(f);
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while in_flight_epoch(&sec).is_none() {
        assert!(Instant::now() < deadline, "no point went in flight");
        sleep(Duration::from_millis(5));
    }
    let applied = sec.applied_epoch();
    let mut reads = 0;
    while let Some(epoch) = in_flight_epoch(&sec) {
        let read_at = Instant::now();
        let during = sha256(&sec.mir("disk.img"));
        // A read that the commit fell into (it reads in several calls)
        // is not a read during the transfer.
        if in_flight_epoch(&sec) == Some(epoch) && sec.applied_epoch() == applied {
            assert_eq!(
                during, before,
                "read {reads}: the mirror showed a point in flight"
            );
            assert!(
                read_at.elapsed() < Duration::from_secs(2),
                "read {reads} waited {:?} for a point in flight",
                read_at.elapsed()
            );
            reads += 1;
        }
    }
    assert!(reads > 0, "no read fell within the point's transfer");
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_eq!(sha256(&sec.mir("disk.img")), sha256(&m.back("disk.img")));
    println!("{reads} reads of the mirror during the point's transfer, each the point before");
}
