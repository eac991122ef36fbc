//! Recovering from an object store (issue 12), against a real SeaweedFS:
//! `points ls s3://…`, `restore` (byte-identical, every entry kind, all
//! or nothing), `mount-point` (byte-identical and lazy: what is read is
//! what travels, also while the newest point uploads), restore seeding a
//! replica, `test-failover` and `promote` of an object-store point.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    Mount, detach_all, fuse_mounts_at, hbrfs, json_u64, path_str, pattern, run, stderr, sync_file,
    temp_dir,
};
use crate::object_publish::{PUBLISH_TIMEOUT, objects, restore, s3_mount, wait_published};
use crate::replication::{
    Secondary, Until, primary_on, primary_status, repl_counter, wait_applied,
};
use crate::s3::S3Server;

const MIB: u64 = 1 << 20;
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// `hbrfs ARGS… --s3-endpoint E` with the server's credentials; must
/// succeed.
fn hbrfs_s3(server: &S3Server, args: &[&str]) -> std::process::Output {
    run(Command::new(hbrfs())
        .args(args)
        .arg("--s3-endpoint")
        .arg(server.endpoint())
        .envs(server.env()))
}

/// `qemu-img compare` of two images: same guest-visible content.
fn qemu_compare(a: &Path, b: &Path) {
    run(Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(a)
        .arg(b));
}

/// The load average, for figures.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `points ls URL --json`: the rows.
fn points(server: &S3Server, url: &str) -> Vec<Value> {
    let out = hbrfs_s3(server, &["points", "ls", url, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("points ls prints JSON");
    v.as_array().cloned().unwrap_or_default()
}

/// A foreground `hbrfs mount-point` or `test-failover` of an object-store
/// point; unmounted (SIGTERM) and reaped on drop.
struct PointMount {
    child: Child,
    at: PathBuf,
    dir: tempfile::TempDir,
}

impl PointMount {
    /// `hbrfs CMD URL ARGS… MOUNTPOINT` with the server's endpoint, a
    /// cache folder of its own, waited for until mounted.
    fn start(server: &S3Server, cmd: &str, url: &str, args: &[&str]) -> PointMount {
        let dir = temp_dir();
        let at = dir.path().join("mnt");
        fs::create_dir(&at).unwrap();
        let log = fs::File::create(dir.path().join("log")).unwrap();
        let mut child = Command::new(hbrfs())
            .arg(cmd)
            .arg(url)
            .args(args)
            .arg(&at)
            .arg("--s3-endpoint")
            .arg(server.endpoint())
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .envs(server.env())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn hbrfs");
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while fuse_mounts_at(&at) == 0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "hbrfs {cmd} exited ({status}) before mounting: {}",
                    fs::read_to_string(dir.path().join("log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "hbrfs {cmd} did not mount");
            sleep(Duration::from_millis(20));
        }
        PointMount { child, at, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.at.join(rel)
    }

    /// What it logged so far.
    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The root's `user.hbrfs.fetched`: (GETs, bytes).
    fn fetched(&self) -> (u64, u64) {
        let out = run(Command::new("getfattr")
            .args(["--only-values", "-n", "user.hbrfs.fetched"])
            .arg(&self.at));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }
}

impl Drop for PointMount {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        detach_all(&self.at);
    }
}

/// Reads `len` bytes at `offset` of `path`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Asserts that `a` and `b` hold the same bytes (`cmp`, without holding
/// both in memory).
fn assert_same_file(a: &Path, b: &Path) {
    run(Command::new("cmp").arg(a).arg(b).stdout(Stdio::null()));
}

/// A primary's tree of every entry kind, a qcow2 written by qemu-io and a
/// raw image written by dd, published; restored into an absent folder
/// they compare identical (`qemu-img compare`, `cmp`), with their links,
/// modes and times; `points ls` lists the point; a restore into a folder
/// that is not empty is refused and writes nothing. The same point under
/// `mount-point` reads identical, and reading 1 MiB of a 256 MiB image
/// fetches a few MiB, not the image.
#[test]
fn an_object_point_restores_byte_identical_and_mounts_lazily() {
    let server = S3Server::start();
    server.create_bucket("rec");
    let url = "s3://rec/repo";
    let m = s3_mount(&server, url, &server.env(), &[]);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(m.mnt("vm.qcow2"))
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0xa5 40M 1M",
        ])
        .arg(m.mnt("vm.qcow2")));
    const BIG: u64 = 256 * MIB;
    {
        use std::io::Write;
        let mut raw = fs::File::create(m.mnt("disk.raw")).unwrap();
        for seed in 0..BIG / (16 * MIB) {
            raw.write_all(&pattern(16 * MIB as usize, 100 + seed))
                .unwrap();
        }
    }
    fs::create_dir(m.mnt("etc")).unwrap();
    fs::write(m.mnt("etc/conf"), pattern(10_000, 3)).unwrap();
    fs::set_permissions(m.mnt("etc/conf"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::hard_link(m.mnt("etc/conf"), m.mnt("conf.link")).unwrap();
    std::os::unix::fs::symlink("etc/conf", m.mnt("conf.sym")).unwrap();
    run(Command::new("mkfifo").arg(m.mnt("etc/pipe")));
    run(Command::new("mknod")
        .arg(m.mnt("etc/null"))
        .args(["c", "1", "3"]));
    let sparse = fs::File::create(m.mnt("sparse.img")).unwrap();
    sparse.set_len(64 * MIB).unwrap();
    drop(sparse);
    fs::write(m.mnt("small"), b"hello").unwrap();
    std::os::unix::fs::chown(m.mnt("small"), Some(1234), Some(5678)).unwrap();
    for f in ["vm.qcow2", "disk.raw", "etc/conf", "small"] {
        sync_file(&m.mnt(f));
    }
    wait_published(&m, PUBLISH_TIMEOUT);

    let rows = points(&server, url);
    assert!(!rows.is_empty(), "points ls lists no point");
    let last = rows.last().unwrap();
    assert!(json_u64(&last["files"]) >= 5, "{last:#}");
    let table = hbrfs_s3(&server, &["points", "ls", url]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("SEQ"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );

    let dir = temp_dir();
    let out = dir.path().join("restored");
    let t = Instant::now();
    restore(&server, url, "latest", &out);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "restore: {} MiB of data in {secs:.2} s, {:.1} MB/s (load {})",
        BIG / MIB + 4,
        (BIG + 4 * MIB) as f64 / secs / 1e6,
        loadavg()
    );
    qemu_compare(&m.back("vm.qcow2"), &out.join("vm.qcow2"));
    assert_same_file(&m.back("disk.raw"), &out.join("disk.raw"));
    assert_eq!(fs::read(out.join("small")).unwrap(), b"hello");
    let small = fs::metadata(out.join("small")).unwrap();
    assert_eq!((small.uid(), small.gid()), (1234, 5678), "owners restored");
    let null = fs::symlink_metadata(out.join("etc/null")).unwrap();
    assert!(null.file_type().is_char_device(), "{null:?}");
    assert_eq!(
        null.rdev(),
        fs::symlink_metadata(m.back("etc/null")).unwrap().rdev()
    );
    let conf = fs::metadata(out.join("etc/conf")).unwrap();
    assert_eq!(conf.mode() & 0o7777, 0o640);
    assert_eq!(conf.nlink(), 2);
    assert_eq!(
        conf.ino(),
        fs::metadata(out.join("conf.link")).unwrap().ino()
    );
    assert_eq!(
        conf.mtime(),
        fs::metadata(m.back("etc/conf")).unwrap().mtime()
    );
    assert_eq!(
        fs::read_link(out.join("conf.sym")).unwrap(),
        Path::new("etc/conf")
    );
    assert!(
        fs::symlink_metadata(out.join("etc/pipe"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let sparse = fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(sparse.len(), 64 * MIB);
    assert!(sparse.blocks() < 64, "zero blocks were written: {sparse:?}");
    assert!(
        !dir.path().join(".restored.hbrfs-restore-partial").exists(),
        "the partial folder stayed"
    );

    let busy = dir.path().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("x"), b"x").unwrap();
    let refused = Command::new(hbrfs())
        .args(["restore", url, "latest", path_str(&busy), "--s3-endpoint"])
        .arg(server.endpoint())
        .envs(server.env())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);

    let started = Instant::now();
    let pm = PointMount::start(&server, "mount-point", url, &["latest"]);
    let first = read_at(&pm.path("disk.raw"), 100 * MIB, 4096);
    let first_byte = started.elapsed();
    assert_eq!(first, read_at(&m.back("disk.raw"), 100 * MIB, 4096));
    let one = read_at(&pm.path("disk.raw"), 100 * MIB, MIB as usize);
    assert_eq!(one, read_at(&m.back("disk.raw"), 100 * MIB, MIB as usize));
    let (gets, bytes) = pm.fetched();
    println!(
        "lazy mount: first byte {:.0} ms after start; 1 MiB of a 256 MiB image: {gets} GETs, \
         {bytes} bytes",
        first_byte.as_secs_f64() * 1e3
    );
    assert!(
        bytes < 16 * MIB,
        "reading 1 MiB fetched {bytes} bytes: not lazy"
    );
    let t = Instant::now();
    assert_same_file(&m.back("disk.raw"), &pm.path("disk.raw"));
    let secs = t.elapsed().as_secs_f64();
    let (gets, bytes) = pm.fetched();
    println!(
        "lazy mount: sequential read of 256 MiB in {secs:.2} s, {:.1} MB/s; {gets} GETs, \
         {:.2} GETs per MiB (load {})",
        BIG as f64 / secs / 1e6,
        gets as f64 / (bytes as f64 / MIB as f64),
        loadavg()
    );
    qemu_compare(&m.back("vm.qcow2"), &pm.path("vm.qcow2"));
    assert_eq!(fs::read(pm.path("conf.link")).unwrap(), pattern(10_000, 3));
    assert_eq!(
        fs::read_link(pm.path("conf.sym")).unwrap(),
        Path::new("etc/conf")
    );
}

/// A lazy mount of a published point reads it whole while the primary
/// uploads a newer, larger point under `--max-rate`: the mount waits for
/// nothing, and the newer point appears only once whole.
#[test]
fn a_lazy_mount_reads_a_point_while_the_newest_uploads() {
    let server = S3Server::start();
    server.create_bucket("lazy");
    let url = "s3://lazy/repo";
    let m = s3_mount(&server, url, &server.env(), &["--max-rate", "2M"]);
    let first = pattern(4 * MIB as usize, 21);
    fs::write(m.mnt("disk.img"), &first).unwrap();
    sync_file(&m.mnt("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    let before = points(&server, url).len();
    let seq = json_u64(&points(&server, url).last().unwrap()["seq"]).to_string();
    // 24 MiB of incompressible change: about 12 s at 2 MB/s.
    fs::write(m.mnt("disk.img"), pattern(24 * MIB as usize, 22)).unwrap();
    sync_file(&m.mnt("disk.img"));
    sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let pm = PointMount::start(&server, "mount-point", url, &[&seq]);
    assert_eq!(fs::read(pm.path("disk.img")).unwrap(), first);
    let took = t.elapsed();
    let p = primary_status(&m);
    println!("read point {seq} whole in {took:?} while the next uploaded");
    assert!(
        json_u64(&p["dirty_blocks"]) > 0
            || json_u64(&p["replication"]["last_applied_epoch"]) + 1
                < json_u64(&p["current_epoch"]),
        "the change had finished uploading before the read ended: {p:#}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop(pm);
    wait_published(&m, PUBLISH_TIMEOUT);
    assert!(points(&server, url).len() > before);
}

/// A restored folder seeds a replica: `hbrfs serve` on it indexes what
/// is there, and a primary holding the same image ships only hash
/// references, no block content.
#[test]
fn a_restore_seeds_a_replica_so_only_differences_travel() {
    const SIZE: u64 = 32 * MIB;
    let server = S3Server::start();
    server.create_bucket("seed");
    let url = "s3://seed/repo";
    let image = pattern(SIZE as usize, 31);
    let m = s3_mount(&server, url, &server.env(), &[]);
    fs::write(m.mnt("disk.img"), &image).unwrap();
    sync_file(&m.mnt("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    drop(m);

    let dir = temp_dir();
    let replica = dir.path().join("replica");
    restore(&server, url, "latest", &replica);
    let sec = Secondary::start_on(&replica, "127.0.0.1:0", &[]);
    let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&backing).unwrap();
    fs::write(backing.join("disk.img"), &image).unwrap();
    let p = primary_on(&sec, &backing, &mnt);
    let s = wait_applied(&p, &sec, Until::CaughtUp, PUBLISH_TIMEOUT);
    let (sent, wire) = (
        repl_counter(&s, "blocks_sent"),
        repl_counter(&s, "wire_bytes"),
    );
    println!("seeded by restore: {sent} blocks sent, {wire} wire bytes for {SIZE} bytes");
    assert_eq!(sent, 0, "blocks travelled though the replica held them");
    assert!(wire < SIZE / 20, "{wire} wire bytes");
    assert!(sec.log().contains("seeding: indexed"), "{}", sec.log());
    assert_eq!(fs::read(replica.join("disk.img")).unwrap(), image);
}

/// `test-failover s3://…` mounts a writable sandbox over the lazy point:
/// writes read back, the point's bytes show through, nothing reaches the
/// store. `promote s3://… --into DIR` restores the point as a new
/// primary's backing, which mounts and replicates to the same repository
/// uploading only what it lacks.
#[test]
fn test_failover_and_promote_take_an_object_store_point() {
    let server = S3Server::start();
    server.create_bucket("fail");
    let url = "s3://fail/repo";
    let image = pattern(8 * MIB as usize, 41);
    let m = s3_mount(&server, url, &server.env(), &[]);
    fs::write(m.mnt("disk.img"), &image).unwrap();
    sync_file(&m.mnt("disk.img"));
    let published = wait_published(&m, PUBLISH_TIMEOUT);
    drop(m);
    let stored = json_u64(&published["replication"]["object_requests"]["put_bytes"]);

    {
        let sb = PointMount::start(&server, "test-failover", url, &["--point", "latest"]);
        let p = sb.path("disk.img");
        assert_eq!(fs::read(&p).unwrap(), image);
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"sandbox", MIB).unwrap();
        drop(f);
        fs::write(sb.path("new"), b"made in the sandbox").unwrap();
        let got = fs::read(&p).unwrap();
        assert_eq!(&got[MIB as usize..MIB as usize + 7], b"sandbox");
        assert_eq!(got[..MIB as usize], image[..MIB as usize]);
        assert_eq!(fs::read(sb.path("new")).unwrap(), b"made in the sandbox");
    }
    let rows = points(&server, url);
    assert_eq!(rows.len(), 1, "the sandbox published something: {rows:?}");

    let dir = temp_dir();
    let into = dir.path().join("primary");
    let out = hbrfs_s3(
        &server,
        &[
            "promote",
            url,
            "--point",
            "latest",
            "--into",
            path_str(&into),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("hbrfs mount"), "{said}");
    assert_eq!(fs::read(into.join("disk.img")).unwrap(), image);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let endpoint = server.endpoint();
    let args = ["--replicate-to", url, "--s3-endpoint", &endpoint];
    let p = Mount::start_on_with_env(&into, &mnt, &args, &server.env());
    let s = wait_published(&p, PUBLISH_TIMEOUT);
    let sent = json_u64(&s["replication"]["object_requests"]["put_bytes"]);
    println!(
        "promoted primary's first point: {sent} bytes uploaded (the first primary's: {stored})"
    );
    assert!(
        sent < stored / 10,
        "the promoted primary uploaded {sent} bytes of blocks the repository holds"
    );
    let rows = points(&server, url);
    let series: std::collections::BTreeSet<_> =
        rows.iter().map(|r| r["datastore"].to_string()).collect();
    assert_eq!(series.len(), 2, "a series of its own: {rows:?}");
}

/// `hbrfs gc URL --grace 0s ARGS… --json`: the report.
fn gc_now(server: &S3Server, url: &str, args: &[&str]) -> Value {
    let mut all = vec!["gc", url, "--grace", "0s", "--json"];
    all.extend_from_slice(args);
    let out = hbrfs_s3(server, &all);
    serde_json::from_slice(&out.stdout).expect("gc --json prints JSON")
}

/// A pack left sparse by retention is repacked: the first GC copies its
/// live blobs into a new pack, the second lists the old one as a
/// candidate, the third deletes it. A lazy mount whose index was loaded
/// before all that reads the point on from the new copy, and a restore
/// after it is byte-identical; a file with an all-zero map chunk (a hole
/// of more than 256 MiB) is marked and restored like any other.
#[test]
fn gc_repacks_a_sparse_pack_and_readers_follow_the_copy() {
    let server = S3Server::start();
    server.create_bucket("repack");
    let url = "s3://repack/repo";
    let m = s3_mount(&server, url, &server.env(), &[]);
    let block = 64 * 1024;
    let first = pattern(32 * block, 31);
    fs::write(m.mnt("disk.img"), &first).unwrap();
    let hole = 300 * MIB;
    let f = fs::File::create(m.mnt("holes.img")).unwrap();
    f.set_len(hole).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(block, 32), hole - block as u64).unwrap();
    drop(f);
    sync_file(&m.mnt("disk.img"));
    sync_file(&m.mnt("holes.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    // Blocks 4.. rewritten: the first pack keeps 4 live blocks of 32.
    let mut second = first.clone();
    second[4 * block..].copy_from_slice(&pattern(28 * block, 33));
    fs::write(m.mnt("disk.img"), &second).unwrap();
    sync_file(&m.mnt("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    drop(m);
    let newest = json_u64(&points(&server, url).last().unwrap()["seq"]).to_string();
    let pm = PointMount::start(&server, "mount-point", url, &[&newest]);
    sleep(Duration::from_millis(1100));

    let r1 = gc_now(&server, url, &["--keep", "1s:1s"]);
    assert!(!r1["dropped"].as_array().unwrap().is_empty(), "{r1:#}");
    let sparse = r1["sparse"][0]["pack"]
        .as_str()
        .expect("a sparse pack")
        .to_string();
    assert!(json_u64(&r1["repacked"]) >= 1, "{r1:#}");
    assert!(json_u64(&r1["repack_packs"]) >= 1, "{r1:#}");
    assert_eq!(json_u64(&r1["deleted"]), 0, "{r1:#}");
    let key = format!("repo/{sparse}");
    let has = |k: &str| {
        objects(&server, "repack", "repo/data")
            .iter()
            .any(|(o, _)| o == k)
    };
    assert!(has(&key), "{key} before the grace path");
    let r2 = gc_now(&server, url, &[]);
    assert!(json_u64(&r2["candidates"]) >= 1, "{r2:#}");
    assert!(
        !r2["sparse"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["pack"] == sparse.as_str()),
        "the copy keeps its live blobs now: {r2:#}"
    );
    let r3 = gc_now(&server, url, &[]);
    assert!(json_u64(&r3["deleted"]) >= 1, "{r3:#}");
    assert!(!has(&key), "{key} was deleted");
    println!(
        "repack: {} live bytes copied into {} packs; then {} packs ({} bytes) freed",
        json_u64(&r1["repacked_bytes"]),
        json_u64(&r1["repack_packs"]),
        json_u64(&r3["deleted"]),
        json_u64(&r3["freed_bytes"])
    );

    // The mount's index named the deleted pack: it reads on from the copy.
    assert!(fs::read(pm.path("disk.img")).unwrap() == second);
    let tail = read_at(&pm.path("holes.img"), hole - block as u64, block);
    assert!(tail == pattern(block, 32));
    assert!(
        read_at(&pm.path("holes.img"), 0, block)
            .iter()
            .all(|b| *b == 0)
    );
    let log = pm.log();
    assert!(
        log.contains(&format!("{sparse} is gone")),
        "the mount read the deleted pack's blobs elsewhere: {log}"
    );
    drop(pm);
    let dir = temp_dir();
    let out = dir.path().join("restored");
    restore(&server, url, "latest", &out);
    assert!(fs::read(out.join("disk.img")).unwrap() == second);
    assert_eq!(fs::metadata(out.join("holes.img")).unwrap().len(), hole);
    assert!(read_at(&out.join("holes.img"), hole - block as u64, block) == pattern(block, 32));
}

/// `hbrfs restore URL latest DIR` started in the background, with the
/// server's endpoint and credentials.
fn spawn_restore(server: &S3Server, url: &str, dir: &Path) -> Child {
    Command::new(hbrfs())
        .args(["restore", url, "latest", path_str(dir), "--s3-endpoint"])
        .arg(server.endpoint())
        .envs(server.env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hbrfs restore")
}

/// Waits until `path` exists (a restore began writing), at most 60 s.
fn wait_exists(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        sleep(Duration::from_millis(2));
    }
}

/// The store killed while a restore reads: back within seconds, the
/// restore rides it out (retries) and is byte-identical; down for good,
/// the restore fails naming the store, leaves no `DIR` (only its partial
/// folder), and the next restore into `DIR` completes and is identical.
#[test]
fn a_restore_rides_out_a_store_restart_and_fails_clearly_when_it_stays_down() {
    let mut server = S3Server::start();
    server.create_bucket("rfault");
    let url = "s3://rfault/repo";
    let m = s3_mount(&server, url, &server.env(), &[]);
    let image = pattern(128 * MIB as usize, 41);
    fs::write(m.mnt("disk.img"), &image).unwrap();
    sync_file(&m.mnt("disk.img"));
    wait_published(&m, PUBLISH_TIMEOUT);
    drop(m);
    let dir = temp_dir();

    let back = dir.path().join("back");
    let child = spawn_restore(&server, url, &back);
    wait_exists(&dir.path().join(".back.hbrfs-restore-partial"));
    server.kill();
    sleep(Duration::from_secs(1));
    server.restart();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the restore did not ride out the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fs::read(back.join("disk.img")).unwrap() == image);

    let down = dir.path().join("down");
    let partial = dir.path().join(".down.hbrfs-restore-partial");
    let child = spawn_restore(&server, url, &down);
    wait_exists(&partial);
    server.kill();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!(
        "restore with the store down failed after {:?}: {err}",
        t.elapsed()
    );
    assert!(
        !out.status.success(),
        "a restore without its store succeeded"
    );
    assert!(
        err.contains(&server.endpoint().replace("http://", "")) || err.contains("s3://rfault/repo"),
        "{err}"
    );
    assert!(!down.exists(), "a failed restore left {}", down.display());
    assert!(
        partial.exists(),
        "the partial folder is kept, and named: {err}"
    );
    server.restart();
    restore(&server, url, "latest", &down);
    assert!(fs::read(down.join("disk.img")).unwrap() == image);
    assert!(
        !partial.exists(),
        "the next restore removed the partial folder"
    );
}
