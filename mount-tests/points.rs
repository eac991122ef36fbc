//! Recovery points read back (issue 10, items 2 and 3): a primary writes
//! known qemu-io patterns, renames, removes, grows and shrinks files
//! across several points; older points are then read back, exact, through
//! `hbrfs mount-point` (its own process) and through `.points/<name>/` in
//! a `serve --mount` mirror, while the primary keeps writing and newer
//! points apply.
//!
//! Every secondary here keeps every point (`--keep 1ms:1h`), so a point
//! seen applied is still there when it is read back.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::harness::{
    Mount, create_sparse, detach_all, fuse_mounts_at, hbrfs, json_u64, path_str, run, stderr,
    temp_dir, write_ranges,
};
use crate::replication::{
    APPLY_TIMEOUT, MIB, Secondary, Until, primary_for, qemu_io, qemu_io_verify, sha256,
    wait_applied,
};

/// Every point kept, whatever the pace of the points.
const KEEP_ALL: [&str; 2] = ["--keep", "1ms:1h"];

/// How long a point mount gets to come up or go away.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// A foreground `hbrfs` mount command (`mount-point`) as a real process,
/// on a mountpoint of its own; unmounted and stopped on drop.
struct Daemon {
    mountpoint: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Runs `hbrfs ARGS… MOUNTPOINT` and waits until it is mounted;
    /// returns it and how long mounting took, from the spawn.
    fn start(args: &[&str]) -> (Daemon, Duration) {
        let dir = temp_dir();
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("create mountpoint");
        let log = dir.path().join("daemon.log");
        let out = fs::File::create(&log).expect("create log");
        let started = Instant::now();
        let mut child = Command::new(hbrfs())
            .args(args)
            .arg(&mountpoint)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .expect("spawn hbrfs");
        loop {
            if fuse_mounts_at(&mountpoint) > 0 {
                let took = started.elapsed();
                let d = Daemon {
                    mountpoint,
                    child: Some(child),
                    log,
                    _dir: dir,
                };
                return (d, took);
            }
            if let Some(status) = child.try_wait().expect("poll hbrfs") {
                panic!(
                    "hbrfs {args:?} exited ({status}) before mounting\n--- log ---\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < MOUNT_TIMEOUT,
                "hbrfs {args:?} did not mount within {MOUNT_TIMEOUT:?}"
            );
            sleep(Duration::from_millis(5));
        }
    }

    /// `MOUNTPOINT/rel`.
    fn at(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// SIGTERMs it and asserts it unmounts and exits 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("poll") {
                break s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "exited {status}\n--- log ---\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        assert_eq!(fuse_mounts_at(&self.mountpoint), 0, "still mounted");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        detach_all(&self.mountpoint);
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child, not yet reaped: the pid is still ours.
    unsafe { libc::kill(pid, sig) };
}

/// `hbrfs mount-point REPLICA POINT M`.
fn mount_point(sec: &Secondary, point: &str) -> (Daemon, Duration) {
    Daemon::start(&["mount-point", path_str(&sec.replica), point])
}

/// Runs `hbrfs ARGS… M` expecting it to refuse before mounting; returns
/// its stderr.
fn refused(args: &[&str]) -> String {
    let dir = temp_dir();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("create mountpoint");
    let mut child = Command::new(hbrfs())
        .args(args)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hbrfs");
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while child.try_wait().expect("poll").is_none() {
        if fuse_mounts_at(&mnt) > 0 || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            detach_all(&mnt);
            panic!("hbrfs {args:?} should have refused, but it mounted or hung");
        }
        sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "hbrfs {args:?} exited 0");
    stderr(&out)
}

/// What is compared of one path of a point: type and permissions, owner,
/// mtime, size, link target, bytes.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, i64),
    size: u64,
    nlink: u64,
    target: Option<PathBuf>,
    bytes: Option<Vec<u8>>,
}

/// Every path below `root` (the root itself and a top-level `.hbrfs` left
/// out) and what is compared of it.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    snapshot_without(root, ".hbrfs")
}

/// [`snapshot`] without the top-level `.hbrfs` and `skip`.
fn snapshot_without(root: &Path, skip: &str) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).expect("below").to_path_buf();
            if rel == Path::new(".hbrfs") || rel.starts_with(skip) {
                continue;
            }
            let m = fs::symlink_metadata(&p).expect("lstat");
            if m.is_dir() {
                todo.push(p.clone());
            }
            let seen = Seen {
                mode: m.mode(),
                owner: (m.uid(), m.gid()),
                mtime: (m.mtime(), m.mtime_nsec()),
                size: if m.is_dir() { 0 } else { m.len() },
                nlink: if m.is_dir() { 0 } else { m.nlink() },
                target: m.is_symlink().then(|| fs::read_link(&p).expect("readlink")),
                bytes: m.is_file().then(|| fs::read(&p).expect("read")),
            };
            out.insert(rel, seen);
        }
    }
    out
}

/// Asserts a point shows exactly what the primary held.
fn assert_same_tree(what: &str, want: &BTreeMap<PathBuf, Seen>, got: &BTreeMap<PathBuf, Seen>) {
    let short = |s: &Seen| {
        let b = s.bytes.as_ref().map(|b| b.len());
        format!(
            "{:o} {:?} {:?} {} {:?} bytes:{b:?}",
            s.mode, s.owner, s.mtime, s.size, s.target
        )
    };
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("{}: missing", p.display())),
            Some(g) if g != w => diffs.push(format!(
                "{}:\n  want {}\n  got  {}{}",
                p.display(),
                short(w),
                short(g),
                if g.bytes != w.bytes {
                    " (bytes differ)"
                } else {
                    ""
                }
            )),
            Some(_) => {}
        }
    }
    for p in got.keys().filter(|p| !want.contains_key(*p)) {
        diffs.push(format!("{}: only in the point", p.display()));
    }
    assert!(diffs.is_empty(), "{what} differs:\n{}", diffs.join("\n"));
}

/// Waits until everything written has applied; returns the applied point
/// and what the primary holds (which that point must show for ever).
fn settle(m: &Mount, sec: &Secondary) -> (u64, BTreeMap<PathBuf, Seen>) {
    wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    (sec.applied_epoch(), snapshot(&m.backing))
}

/// `hbrfs points ls --json REPLICA`: epoch → name.
fn point_names(sec: &Secondary) -> BTreeMap<u64, String> {
    let out = run(Command::new(hbrfs()).args(["points", path_str(&sec.replica), "ls", "--json"]));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("points ls prints JSON");
    rows.as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                json_u64(&r["epoch"]),
                r["name"].as_str().expect("name").to_string(),
            )
        })
        .collect()
}

fn io(cmds: &[&str]) -> Vec<String> {
    cmds.iter().map(|c| c.to_string()).collect()
}

#[test]
fn points_three_older_points_read_back_exact_through_mount_point_and_dot_points() {
    let sec = Secondary::start_with_args(&KEEP_ALL);
    let m = primary_for(&sec, &sec.addr, &[]);
    let disk = m.mnt("disk.img");

    // Point A: patterns, a folder, a hard link, a symlink, files that are
    // later removed, renamed, grown.
    create_sparse(&disk, 4 * MIB);
    qemu_io("raw", "none", &io(&["write -P 0x11 0 1M"]), &disk);
    fs::create_dir(m.mnt("vms")).expect("mkdir");
    for (name, p) in [
        ("gone.img", "0x33"),
        ("old.img", "0x44"),
        ("small.img", "0xaa"),
    ] {
        create_sparse(&m.mnt(name), 256 * 1024);
        qemu_io(
            "raw",
            "none",
            &io(&[&format!("write -P {p} 0 128k")]),
            &m.mnt(name),
        );
    }
    fs::hard_link(&disk, m.mnt("vms/disk-link.img")).expect("link");
    symlink("disk.img", m.mnt("current")).expect("symlink");
    // The primary's own `.points`: replicated and kept, but shadowed in
    // the mirror's root by the recovery points.
    fs::create_dir(m.mnt(".points")).expect("mkdir .points");
    write_ranges(&m.mnt(".points/mine"), &[(0, 3000)], 65536);
    let a = settle(&m, &sec);

    // Point B: an overwrite, growth, a removal, a rename.
    qemu_io("raw", "none", &io(&["write -P 0x22 512k 256k"]), &disk);
    run(Command::new("truncate")
        .args(["-s", "1088K"])
        .arg(m.mnt("small.img")));
    qemu_io(
        "raw",
        "none",
        &io(&["write -P 0xbb 1M 64k"]),
        &m.mnt("small.img"),
    );
    fs::remove_file(m.mnt("gone.img")).expect("rm");
    fs::rename(m.mnt("old.img"), m.mnt("vms/new.img")).expect("rename");
    let b = settle(&m, &sec);

    // Point C: another overwrite, a shrink, a new file.
    qemu_io("raw", "none", &io(&["write -P 0x33 0 128k"]), &disk);
    run(Command::new("truncate")
        .args(["-s", "32K"])
        .arg(m.mnt("small.img")));
    write_ranges(&m.mnt("vms/c.img"), &[(0, 200_000)], 65536);
    let c = settle(&m, &sec);

    // Newer points: the live replica moves on.
    qemu_io("raw", "none", &io(&["write -P 0x44 2M 1M"]), &disk);
    fs::remove_file(m.mnt("small.img")).expect("rm");
    let d = settle(&m, &sec);
    assert!(
        a.0 < b.0 && b.0 < c.0 && c.0 < d.0,
        "{} {} {} {}",
        a.0,
        b.0,
        c.0,
        d.0
    );

    for (label, (epoch, want)) in [("A", &a), ("B", &b), ("C", &c)] {
        let (pm, took) = mount_point(&sec, &epoch.to_string());
        assert_same_tree(
            &format!("point {label} ({epoch}) via mount-point"),
            want,
            &snapshot(&pm.mountpoint),
        );
        println!("point {label} (epoch {epoch}) mounted in {took:?}");
    }
    // The patterns, as qemu-io reads them, at A and at B.
    let (pa, _) = mount_point(&sec, &a.0.to_string());
    qemu_io_verify(
        "raw",
        &io(&["read -P 0x11 0 1M", "read -P 0 1M 3M"]),
        &pa.at("disk.img"),
    );
    qemu_io_verify("raw", &io(&["read -P 0x33 0 128k"]), &pa.at("gone.img"));
    let (pb, _) = mount_point(&sec, &b.0.to_string());
    let at_b = [
        "read -P 0x11 0 512k",
        "read -P 0x22 512k 256k",
        "read -P 0x11 768k 256k",
    ];
    qemu_io_verify("raw", &io(&at_b), &pb.at("vms/disk-link.img"));
    qemu_io_verify("raw", &io(&["read -P 0x44 0 128k"]), &pb.at("vms/new.img"));

    // The same points in the mirror's `.points/`, which lists every one.
    let names = point_names(&sec);
    let listed: Vec<String> = fs::read_dir(sec.mir(".points"))
        .expect("list .points")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    for (epoch, want) in [&a, &b, &c, &d] {
        let name = &names[epoch];
        assert!(listed.contains(name), "{name} not in .points: {listed:?}");
        let got = snapshot(&sec.mir(&format!(".points/{name}")));
        assert_same_tree(&format!(".points/{name} (epoch {epoch})"), want, &got);
    }
    assert!(
        !listed.iter().any(|n| n == "mine"),
        "not shadowed: {listed:?}"
    );
    let (_, mut live) = d;
    live.retain(|p, _| !p.starts_with(".points"));
    let mirror = snapshot_without(&sec.mirror, ".points");
    assert_same_tree("the live mirror", &live, &mirror);
    assert!(sec.log().contains("shadowed"), "no warning about .points");
}

/// Reads `p` whole with `sha256sum`; returns the hash and MB/s.
fn timed_sha256(p: &Path) -> (String, f64) {
    let started = Instant::now();
    let h = sha256(p);
    let len = fs::metadata(p).expect("stat").len();
    (h, len as f64 / 1e6 / started.elapsed().as_secs_f64())
}

/// Writes qemu-io patterns of 1 MiB at moving offsets of the first
/// `mib` MiB of `img` until stopped.
fn keep_writing(img: PathBuf, mib: u64, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let off = (n * 7 % (mib - 1)) * MIB;
            let cmd = format!("write -P 0x{:02x} {off} 1M", 0x40 + n % 64);
            qemu_io("raw", "none", &[cmd], &img);
            n += 1;
            sleep(Duration::from_millis(100));
        }
        n
    })
}

#[test]
fn points_a_mount_of_a_256_mib_point_comes_up_fast_stays_put_and_converts() {
    let sec = Secondary::start_with_args(&KEEP_ALL);
    let m = primary_for(&sec, &sec.addr, &[]);
    run(Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=256",
            "conv=fsync",
            "status=none",
        ])
        .arg(format!("of={}", m.mnt("big.img").display())));
    let (epoch, _) = (settle_epoch(&m, &sec), ());
    let want = sha256(&m.back("big.img"));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(m.mnt("big.img"), 256, stop.clone());
    let (pm, took) = mount_point(&sec, &epoch.to_string());
    assert!(
        took < Duration::from_secs(2),
        "mounting a point took {took:?}"
    );
    // Newer points apply while it is mounted; it stays at its point.
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while sec.applied_epoch() < epoch + 3 {
        assert!(Instant::now() < deadline, "no newer points applied");
        sleep(Duration::from_millis(50));
    }
    let (got, point_rate) = timed_sha256(&pm.at("big.img"));
    assert_eq!(got, want, "the point mount does not show its point");
    let out = temp_dir();
    let raw = out.path().join("restored.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(pm.at("big.img"))
        .arg(&raw));
    assert_eq!(sha256(&raw), want, "qemu-img convert of the point");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    let after = settle_epoch(&m, &sec);
    let (_, live_rate) = timed_sha256(&sec.mir("big.img"));
    let (again, _) = timed_sha256(&pm.at("big.img"));
    assert_eq!(again, want, "the point changed after {writes} writes");
    let mut pm = pm;
    pm.stop();
    println!(
        "256 MiB point {epoch}: mounted in {took:?}; sequential read {point_rate:.0} MB/s \
         from the point mount vs {live_rate:.0} MB/s from the live mirror; \
         {writes} writes and points up to {after} applied meanwhile"
    );
}

/// Waits until everything written has applied; returns the point.
fn settle_epoch(m: &Mount, sec: &Secondary) -> u64 {
    wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    sec.applied_epoch()
}

#[test]
fn points_mount_point_names_what_is_kept_and_refuses_a_replica_without_points() {
    let sec = Secondary::start_with_args(&KEEP_ALL);
    let m = primary_for(&sec, &sec.addr, &[]);
    write_ranges(&m.mnt("a.img"), &[(0, 100_000)], 65536);
    let epoch = settle_epoch(&m, &sec);
    let said = refused(&["mount-point", path_str(&sec.replica), "999999"]);
    assert!(
        said.contains("no kept point is \"999999\"") && said.contains(&format!("{epoch} (")),
        "{said}"
    );

    let bare = Secondary::start_with_args(&["--keep", "none"]);
    let m2 = primary_for(&bare, &bare.addr, &[]);
    write_ranges(&m2.mnt("a.img"), &[(0, 100_000)], 65536);
    settle_epoch(&m2, &bare);
    let said = refused(&["mount-point", path_str(&bare.replica), "latest"]);
    assert!(said.contains("keeps no recovery points"), "{said}");

    let plain = temp_dir();
    let said = refused(&["mount-point", path_str(plain.path()), "latest"]);
    assert!(said.contains("is not a replica folder"), "{said}");
}

#[test]
fn points_test_failover_sandbox_takes_writes_while_replication_goes_on_and_leaves_no_trace() {
    let sec = Secondary::start_with_args(&KEEP_ALL);
    let m = primary_for(&sec, &sec.addr, &[]);
    let disk = m.mnt("disk.img");
    create_sparse(&disk, 64 * MIB);
    let first = ["write -P 0x11 0 8M", "write -P 0x22 32M 1M"];
    qemu_io("raw", "none", &io(&first), &disk);
    fs::create_dir(m.mnt("vms")).expect("mkdir");
    write_ranges(&m.mnt("vms/notes"), &[(0, 5000)], 65536);
    let (p, want) = settle(&m, &sec);
    let (p_view, _) = mount_point(&sec, &p.to_string());
    let hash_before = sha256(&p_view.at("disk.img"));
    drop(p_view);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(disk.clone(), 64, stop.clone());
    let (mut sb, took) = Daemon::start(&[
        "test-failover",
        path_str(&sec.replica),
        "--point",
        &p.to_string(),
    ]);
    println!("sandbox of point {p} mounted in {took:?}");
    assert_same_tree("the fresh sandbox", &want, &snapshot(&sb.mountpoint));

    // A guest's writes: partial blocks, whole blocks, flushes.
    let img = sb.at("disk.img");
    let second = ["write -P 0x77 4M 2M", "write -P 0x78 100k 5k"];
    qemu_io("raw", "writeback", &io(&second), &img);
    let expect = [
        "read -P 0x11 0 100k",
        "read -P 0x78 100k 5k",
        "read -P 0x11 105k 3991k",
        "read -P 0x77 4M 2M",
        "read -P 0x11 6M 2M",
        "read -P 0x22 32M 1M",
        "read -P 0 33M 31M",
    ];
    qemu_io_verify("raw", &io(&expect), &img);
    // A shrink cuts the point's data off for good; a regrow reads zeros.
    run(Command::new("truncate").args(["-s", "32800K"]).arg(&img));
    run(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    let cut = [
        "read -P 0x22 32M 32k",
        "read -P 0 32800k 32736k",
        "read -P 0x77 4M 2M",
    ];
    qemu_io_verify("raw", &io(&cut), &img);
    // New files: a qcow2 made by qemu-img, a file fio writes and verifies.
    let q = sb.at("vms/new.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("64M"));
    qemu_io("qcow2", "writeback", &io(&["write -P 0x55 1M 3M"]), &q);
    qemu_io_verify(
        "qcow2",
        &io(&["read -P 0x55 1M 3M", "read -P 0 4M 60M"]),
        &q,
    );
    run(Command::new("fio")
        .args(["--name=sandbox", "--rw=randwrite", "--bs=4k", "--size=8M"])
        .args([
            "--ioengine=psync",
            "--fallocate=none",
            "--verify_state_save=0",
            "--verify=crc32c",
            "--do_verify=1",
            "--fsync=32",
        ])
        .arg(format!("--filename={}", sb.at("vms/fio.dat").display())));
    // Names: a rename over a file, a removal.
    fs::rename(sb.at("vms/notes"), sb.at("notes-moved")).expect("rename in sandbox");
    fs::remove_file(sb.at("vms/fio.dat")).expect("rm in sandbox");
    assert!(!sb.at("vms/notes").exists() && sb.at("notes-moved").exists());

    // Points keep applying meanwhile.
    let deadline = Instant::now() + APPLY_TIMEOUT;
    while sec.applied_epoch() < p + 3 {
        assert!(Instant::now() < deadline, "no newer points applied");
        sleep(Duration::from_millis(50));
    }
    sb.stop();
    let sandboxes = sec.replica.join(".hbrfs/sandboxes");
    let left: Vec<_> = fs::read_dir(&sandboxes).expect("sandboxes").collect();
    assert!(left.is_empty(), "the sandbox left scratch behind: {left:?}");

    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    crate::harness::assert_replica_matches(&m.backing, &sec.replica);
    let (p_view, _) = mount_point(&sec, &p.to_string());
    assert_same_tree(
        "the point after the sandbox",
        &want,
        &snapshot(&p_view.mountpoint),
    );
    assert_eq!(sha256(&p_view.at("disk.img")), hash_before);
}
