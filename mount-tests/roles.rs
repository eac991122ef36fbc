//! Roles end to end (issue 10, items 4 and 5): failover with `hbrfs
//! promote`, failback with `hbrfs demote` and a new primary shipping only
//! the difference, and the refusals that keep two primaries from writing
//! one replica. Real processes on loopback, real mounts, images compared
//! byte for byte at every step.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{
    BLOCK, Mount, assert_replica_matches, hbrfs, json_u64, mount_expecting_failure, path_str, read,
    run, stderr, temp_dir,
};
use crate::replication::{
    APPLY_TIMEOUT, MIB, Secondary, Until, pair, qemu_io, repl_counter, wait_applied,
};

/// A port of 127.0.0.1 free now, for a secondary a primary must be
/// pointed at before it starts.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").to_string()
}

/// `hbrfs ARGS`, not expected to succeed.
fn hbrfs_out(args: &[&str]) -> Output {
    Command::new(hbrfs())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hbrfs")
}

/// `hbrfs ARGS`, which must succeed; returns what it printed.
fn hbrfs_ok(args: &[&str]) -> String {
    let out = run(Command::new(hbrfs()).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hbrfs ARGS` must fail saying `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = hbrfs_out(args);
    assert!(!out.status.success(), "hbrfs {args:?} succeeded");
    let said = stderr(&out);
    assert!(said.contains(needle), "hbrfs {args:?} said: {said}");
}

/// Writes `len` bytes of `pattern` at `off` in the raw image `file` with
/// qemu-io (O_DIRECT), flushed.
fn write_pattern(file: &Path, off: u64, len: u64, pattern: u8) {
    qemu_io(
        "raw",
        "none",
        &[format!("write -P {pattern:#x} {off} {len}")],
        file,
    );
}

/// The two files are identical, byte for byte.
fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (read(a), read(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// A primary over `backing` (on `mnt`) replicating every second to `addr`
/// with the pair key at `key`, once its control socket answers.
fn primary_to(backing: &Path, mnt: &Path, addr: &str, key: &Path) -> Mount {
    fs::create_dir_all(mnt).expect("create mountpoint");
    let args = [
        "--replicate-to",
        addr,
        "--rpo",
        "1s",
        "--auth-key",
        path_str(key),
    ];
    let m = Mount::start_on(backing, mnt, &args);
    // The daemon serves its control socket just after it mounts; `status`
    // in between would open the journal the daemon holds.
    let socket = backing.join(".hbrfs/control.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no control socket:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

/// A pair (a fresh primary replicating to a fresh secondary) holding one
/// raw image `vm.img` of `size` with `pattern` over its first `written`
/// bytes, applied at the secondary; the pair's key is copied to
/// `DIR/pair.key`, since the secondary's own copy changes role with it.
struct Replicated {
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
    sec: Secondary,
    m: Mount,
}

fn replicated_image(size: &str, written: u64, pattern: u8) -> Replicated {
    let dir = temp_dir();
    let key = dir.path().join("pair.key");
    let (sec, m) = pair(&[]);
    fs::copy(sec.key_path(), &key).expect("keep the pair's key");
    let image = m.mnt("vm.img");
    run(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&image)
        .arg(size));
    write_pattern(&image, 0, written, pattern);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    Replicated { dir, key, sec, m }
}

/// Unplanned failover and failback: the primary is killed, the replica
/// promoted and written to; the old primary comes back with writes it
/// never shipped, is demoted and served, and the new primary ships it
/// only the union of what each side wrote after the common base. The
/// images end identical, and what was offered and sent follows the
/// changed blocks, not the image.
#[test]
fn roles_failover_then_failback_ships_only_the_difference() {
    let Replicated {
        dir,
        key,
        sec: mut a,
        m: mut old,
    } = replicated_image("64M", 16 * MIB, 0xa1);
    let old_backing = old.backing.clone();
    assert_same(&old.back("vm.img"), &a.replica.join("vm.img"));

    // Failover: the primary dies; the replica is promoted and written to.
    old.kill9();
    let applied = a.applied_epoch();
    a.stop();
    let said = hbrfs_ok(&["promote", path_str(&a.replica)]);
    assert!(said.contains("promoted"), "{said}");
    let back_addr = free_addr();
    let mut new = primary_to(&a.replica, &dir.path().join("new-mnt"), &back_addr, &key);
    assert!(
        !new.log().contains("will be replicated in full"),
        "the promoted folder was tracked anew:\n{}",
        new.log()
    );
    let stats = new.journal(&["stats"]);
    assert_eq!(
        json_u64(&stats["dirty_blocks"]),
        0,
        "nothing dirty after promote"
    );
    let epoch = json_u64(&stats["current_epoch"]);
    assert!(
        epoch > applied,
        "epoch {epoch} after promote, not above {applied}"
    );
    let new_image = new.mnt("vm.img");
    write_pattern(&new_image, 32 * MIB, 4 * MIB, 0xb2);

    writes_it_never_ships(&mut old);

    // Failback: demote it, serve it, let the new primary ship the difference.
    let said = hbrfs_ok(&["demote", path_str(&old_backing)]);
    assert!(said.contains("resync list of"), "{said}");
    let extra = ["--auth-key", path_str(&key)];
    let s = Secondary::start_on(&old_backing, &back_addr, &extra);
    fs::write(new.mnt("only-new.txt"), b"new primary").expect("write");
    run(Command::new("sync").arg("-f").arg(new.mnt("only-new.txt")));
    let p = wait_applied(&new, &s, Until::CaughtUp, APPLY_TIMEOUT);
    assert_same(&a.replica.join("vm.img"), &old_backing.join("vm.img"));
    assert_same(
        &a.replica.join("only-new.txt"),
        &old_backing.join("only-new.txt"),
    );
    assert!(
        !old_backing.join("only-old.txt").exists(),
        "the old side's own file stayed"
    );
    assert!(
        !old_backing.join(".hbrfs/resync").exists(),
        "the resync list stayed"
    );
    assert_replica_matches(&a.replica, &old_backing);

    // Changed since the base: 64 blocks here, 32 there, two small files.
    assert_cost_follows_change(&p, 64 + 32 + 2);
    new.stop();
    drop(s);
}

/// The old primary comes back and writes what it never ships (its
/// secondary is gone: 2 MiB of its image and a file of its own), then
/// dies again.
fn writes_it_never_ships(old: &mut Mount) {
    old.restart();
    write_pattern(&old.mnt("vm.img"), 8 * MIB, 2 * MIB, 0xc3);
    let own = old.mnt("only-old.txt");
    fs::write(&own, b"written on the old primary after the base").expect("write");
    run(Command::new("sync").arg("-f").arg(&own));
    old.kill9();
}

/// What the primary's status `p` says it offered and sent is at most
/// twice the `changed` blocks (no full read, no full copy); prints it.
fn assert_cost_follows_change(p: &serde_json::Value, changed: u64) {
    let offered = repl_counter(p, "blocks_offered");
    let sent = repl_counter(p, "blocks_sent");
    let wire = repl_counter(p, "wire_bytes");
    let raw = repl_counter(p, "raw_bytes_sent");
    eprintln!(
        "failback: {changed} blocks changed, {offered} offered, {sent} sent \
         ({raw} bytes before compression), {wire} bytes on the wire"
    );
    assert!(
        offered <= 2 * changed,
        "{offered} blocks offered for {changed} changed"
    );
    assert!(
        raw <= 2 * changed * BLOCK,
        "{raw} bytes sent for {changed} changed blocks"
    );
    assert!(
        wire <= 2 * changed * BLOCK,
        "{wire} bytes on the wire for {changed} changed blocks"
    );
}

/// Two primaries must never write one replica: promote refuses while the
/// replica is served, a replica refuses to be mounted as a primary, a
/// promoted folder refuses to be served, and demote refuses while the
/// primary's daemon runs.
#[test]
fn roles_refusals_keep_one_primary_per_pair() {
    let (mut sec, m) = pair(&[]);
    fs::write(m.mnt("a.txt"), b"a").expect("write");
    run(Command::new("sync").arg("-f").arg(m.mnt("a.txt")));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let replica = path_str(&sec.replica).to_string();
    refused(&["promote", &replica], "in use by another hbrfs process");
    refused(
        &["demote", path_str(&m.backing)],
        "in use by another hbrfs process",
    );
    sec.stop();
    let mnt = temp_dir();
    let out = mount_expecting_failure(&sec.replica, mnt.path(), &[]);
    let said = stderr(&out);
    assert!(
        said.contains("is a replica of datastore") && said.contains("hbrfs promote"),
        "{said}"
    );
    hbrfs_ok(&["promote", &replica]);
    refused(
        &["serve", &replica, "--listen", "127.0.0.1:0"],
        "promoted at point",
    );
    refused(&["promote", &replica], "already promoted");
}

/// `promote --point P` rolls the live replica back to P (its content is
/// the point's, what came later is gone), and the failback that follows
/// ships the rolled-back blocks and paths to the old primary too.
#[test]
fn roles_promote_at_an_older_point_rolls_back_to_it_and_fails_back() {
    let Replicated {
        dir,
        key,
        mut sec,
        mut m,
    } = replicated_image("16M", 4 * MIB, 0xa1);
    let image = m.mnt("vm.img");
    let point = sec.applied_epoch().to_string();
    let at_point = read(&sec.replica.join("vm.img"));
    // Points are kept one a second: the next one must be in another second.
    std::thread::sleep(Duration::from_millis(1100));
    write_pattern(&image, 2 * MIB, 4 * MIB, 0xb2);
    fs::write(m.mnt("later.txt"), b"after the point").expect("write");
    run(Command::new("sync").arg("-f").arg(m.mnt("later.txt")));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert!(
        read(&sec.replica.join("vm.img")) != at_point,
        "the later point applied"
    );

    m.kill9();
    sec.stop();
    let said = hbrfs_ok(&["promote", path_str(&sec.replica), "--point", &point]);
    assert!(said.contains("rolled back"), "{said}");
    assert!(
        read(&sec.replica.join("vm.img")) == at_point,
        "not rolled back to the point"
    );
    assert!(
        !sec.replica.join("later.txt").exists(),
        "a later file survived the rollback"
    );

    // The old primary holds the later point: failback ships it the point's.
    hbrfs_ok(&["demote", path_str(&m.backing)]);
    let back_addr = free_addr();
    let s = Secondary::start_on(&m.backing, &back_addr, &["--auth-key", path_str(&key)]);
    let mut new = primary_to(&sec.replica, &dir.path().join("new-mnt"), &back_addr, &key);
    let p = wait_applied(&new, &s, Until::CaughtUp, APPLY_TIMEOUT);
    assert!(
        read(&m.backing.join("vm.img")) == at_point,
        "the old primary kept later blocks"
    );
    assert!(
        !m.backing.join("later.txt").exists(),
        "the old primary kept a later file"
    );
    assert_replica_matches(&sec.replica, &m.backing);
    // 64 blocks rolled back (2 MiB..6 MiB), nothing else.
    let offered = repl_counter(&p, "blocks_offered");
    assert!(
        offered <= 2 * 64,
        "{offered} blocks offered for 64 rolled back"
    );
    new.stop();
}

/// Moves the primary role from `from` (a running primary replicating to
/// the secondary `to`) to `to`'s folder: `hbrfs migrate`, stop the
/// secondary, `hbrfs promote`; then serves `from`'s folder on a new
/// address and mounts `to`'s folder as the primary replicating to it.
fn migrate(from: &mut Mount, to: &mut Secondary, key: &Path, mnt: &Path) -> (Mount, Secondary) {
    let said = hbrfs_ok(&["migrate", path_str(&from.mountpoint), "--timeout", "60s"]);
    assert!(said.contains("migrated"), "{said}");
    assert!(
        from.wait_exit().success(),
        "the primary did not stop cleanly"
    );
    to.stop();
    hbrfs_ok(&["promote", path_str(&to.replica)]);
    let addr = free_addr();
    let s = Secondary::start_on(&from.backing, &addr, &["--auth-key", path_str(key)]);
    let p = primary_to(&to.replica, mnt, &addr, key);
    (p, s)
}

/// What a primary offered since it started, once `sec` caught up.
fn offered_when_caught_up(m: &Mount, sec: &Secondary) -> u64 {
    let p = wait_applied(m, sec, Until::CaughtUp, APPLY_TIMEOUT);
    repl_counter(&p, "blocks_offered")
}

/// After a migration to the primary `p` (replicating to `s`): the first
/// point offers no block and both folders are identical; then 1 MiB
/// written at `off` ships as its 16 blocks, and they are identical again.
fn assert_zero_resync_then_ship(p: &Mount, s: &Secondary, off: u64, pattern: u8) {
    assert_eq!(
        offered_when_caught_up(p, s),
        0,
        "a resync after a migration"
    );
    assert_replica_matches(&p.backing, &s.replica);
    write_pattern(&p.mnt("vm.img"), off, MIB, pattern);
    assert_eq!(offered_when_caught_up(p, s), 16, "only the new writes ship");
    assert_replica_matches(&p.backing, &s.replica);
}

/// A planned migration loses nothing and resyncs nothing: the first
/// point after the swap offers no block, new writes ship as usual, and
/// the same works back again.
#[test]
fn roles_planned_migration_has_zero_loss_and_zero_resync_and_back() {
    let Replicated {
        dir,
        key,
        sec: mut a,
        mut m,
    } = replicated_image("16M", 4 * MIB, 0xa1);

    let (mut there, mut b) = migrate(&mut m, &mut a, &key, &dir.path().join("mnt-b"));
    assert_zero_resync_then_ship(&there, &b, 8 * MIB, 0xb2);
    let (back, c) = migrate(&mut there, &mut b, &key, &dir.path().join("mnt-c"));
    assert_zero_resync_then_ship(&back, &c, 12 * MIB, 0xc3);
    drop((back, c));
}
