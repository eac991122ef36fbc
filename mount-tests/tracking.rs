//! Change tracking seen from outside: real image tools write through the
//! mount, and `hbrfs journal` must report exactly the blocks they changed.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::harness::{
    BLOCK, Mount, assert_same_content, blocks_covering, differing_blocks, json_u64,
    mount_expecting_failure, open_rw, pattern, read, run, stderr, sync_file, temp_dir,
    write_ranges,
};

const MIB: u64 = 1024 * 1024;

/// `(offset, length, byte)` of the qemu-io writes into the raw image: one
/// block-aligned, several unaligned to 64 KiB, one straddling a block
/// boundary by a single byte on each side, and the image's last block.
const RAW_WRITES: &[(u64, u64, u8)] = &[
    (BLOCK, 4096, 0xab),
    (200_000, 100_000, 0xcd),
    (16 * BLOCK - 1, 2, 0x11),
    (10 * MIB + 12_345, 300_000, 0x22),
    (64 * MIB - 4096, 4096, 0x33),
];

/// The qcow2 writes: allocating clusters, a cluster-straddling write, and a
/// rewrite of an already allocated cluster.
const QCOW2_WRITES: &[(u64, u64, u8)] = &[
    (0, 4096, 0xab),
    (200_000, 100_000, 0xcd),
    (10 * MIB, 300_000, 0x11),
    (60 * MIB, 4096, 0x22),
    (4096, 8192, 0x44),
];

/// Runs one qemu-io process with `-c` commands built per range, then a flush.
fn qemu_io(m: &Mount, img: &str, format: &str, cache: &str, verb: &str, ios: &[(u64, u64, u8)]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format, "-t", cache]);
    for &(off, len, byte) in ios {
        cmd.arg("-c")
            .arg(format!("{verb} -P 0x{byte:02x} {off} {len}"));
    }
    cmd.args(["-c", "flush"]).arg(m.mnt(img));
    run(&mut cmd);
}

/// `qemu-img create -f FORMAT MNT/img SIZE`.
fn qemu_img_create(m: &Mount, img: &str, format: &str, size: &str) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(m.mnt(img))
        .arg(size));
}

/// Writes to a raw image with the given qemu cache mode mark exactly the
/// 64 KiB blocks they cover, nothing more, nothing less.
fn raw_writes_dirty_exactly_their_blocks(cache: &str) {
    let m = Mount::start(&[]);
    let img = "disk.raw";
    qemu_img_create(&m, img, "raw", "64M");
    let d0 = m.dirty_blocks(img);
    qemu_io(&m, img, "raw", cache, "write", RAW_WRITES);
    sync_file(&m.mnt(img));
    // qemu-io itself checks the pattern it reads back through the mount.
    qemu_io(&m, img, "raw", cache, "read", RAW_WRITES);
    assert_same_content(&m, img);

    let mut expected = d0.clone();
    for &(off, len, _) in RAW_WRITES {
        expected.extend(blocks_covering(off, len, BLOCK));
    }
    let dirty = m.dirty_blocks(img);
    println!("raw -t {cache}: D0={d0:?} dirty={dirty:?}");
    assert_eq!(dirty, expected, "raw -t {cache}: dirty set != D0 ∪ written");
}

#[test]
fn raw_image_odirect_writes_dirty_exactly_their_blocks() {
    raw_writes_dirty_exactly_their_blocks("none");
}

#[test]
fn raw_image_writeback_writes_dirty_exactly_their_blocks() {
    raw_writes_dirty_exactly_their_blocks("writeback");
}

/// qcow2 allocates clusters, L2 tables and refcount blocks behind our back:
/// whatever it changes must be dirty, and nothing it left alone may be.
#[test]
fn qcow2_every_changed_block_is_dirty_and_nothing_else() {
    let m = Mount::start(&[]);
    let img = "disk.qcow2";
    qemu_img_create(&m, img, "qcow2", "64M");
    sync_file(&m.mnt(img));
    let before = read(&m.back(img));
    let d0 = m.dirty_blocks(img);
    qemu_io(&m, img, "qcow2", "none", "write", QCOW2_WRITES);
    sync_file(&m.mnt(img));
    qemu_io(&m, img, "qcow2", "none", "read", QCOW2_WRITES);
    run(Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(m.mnt(img)));
    let after = assert_same_content(&m, img);

    let differ = differing_blocks(&before, &after, BLOCK);
    let dirty = m.dirty_blocks(img);
    println!(
        "qcow2: size {} -> {}, D0={d0:?} differ={differ:?} dirty={dirty:?}",
        before.len(),
        after.len()
    );
    let missed: BTreeSet<u64> = differ.difference(&dirty).copied().collect();
    assert!(missed.is_empty(), "changed but not dirty: {missed:?}");
    // The tight bound holds honestly: qemu (strace'd, 10.0) writes the
    // refcount block, the L1 table, new L2 tables and new data clusters, and
    // zero-fills new clusters (fallocate ZERO_RANGE) only where it then writes
    // data. With 64 KiB clusters = 64 KiB blocks every block it touches ends
    // up with new content, and it never rewrites the header with the same
    // bytes. So no block may be dirty beyond D0 (the create) and the changed.
    let allowed: BTreeSet<u64> = d0.union(&differ).copied().collect();
    let extra: BTreeSet<u64> = dirty.difference(&allowed).copied().collect();
    assert!(extra.is_empty(), "dirty without any change: {extra:?}");
}

/// The bitmaps live in mapped files: a clean restart finds the same dirty
/// set, and `journal` reads it from the state folder while no daemon runs.
#[test]
fn dirty_bitmaps_survive_clean_restart() {
    let mut m = Mount::start(&[]);
    let f = "persist.img";
    let written = write_ranges(
        &m.mnt(f),
        &[(0, 1), (5 * BLOCK + 7, 3 * BLOCK), (100 * BLOCK, 10)],
        BLOCK,
    );
    let dirty = m.dirty_blocks(f);
    assert_eq!(dirty, written);
    assert_eq!(m.journal(&["stats"])["daemon_running"], Value::Bool(true));

    m.stop();
    assert!(
        m.back(".hbrfs/clean").exists(),
        "no clean marker after a clean unmount"
    );
    assert_eq!(m.dirty_blocks(f), dirty, "offline journal lost blocks");
    assert_eq!(m.journal(&["stats"])["daemon_running"], Value::Bool(false));

    m.restart();
    assert_eq!(m.dirty_blocks(f), dirty, "restart lost blocks");
    m.stop();

    // The state belongs to the datastore, not to where it was mounted.
    let elsewhere = temp_dir();
    let moved = Mount::start_on(&m.backing, elsewhere.path(), &[]);
    assert_eq!(moved.dirty_blocks(f), dirty, "other mountpoint lost blocks");
    assert!(
        read(&moved.mnt(f))[..1] == pattern(1, 0),
        "data via new mountpoint"
    );
}

/// A datastore's block size is chosen once at creation and then fixed:
/// tracking follows it, and a mount asking for another one is refused.
#[test]
fn custom_block_size_is_used_and_fixed_at_creation() {
    const BS: u64 = 4096;
    let mut m = Mount::start(&["--block-size", "4K"]);
    let f = "small-blocks.img";
    let written = write_ranges(
        &m.mnt(f),
        &[(0, 1), (BS - 1, 2), (10_000, 20_000), (MIB + 5, BS)],
        BS,
    );
    assert_eq!(m.block_size(f), BS);
    assert_eq!(m.dirty_blocks(f), written);
    m.stop();

    let out = mount_expecting_failure(&m.backing, &m.mountpoint, &["--block-size", "128K"]);
    let err = stderr(&out).to_lowercase();
    assert!(
        ["block size", "block_size", "block-size"]
            .iter()
            .any(|s| err.contains(s)),
        "refusal does not mention the block size:\n{err}"
    );

    m.restart();
    assert_eq!(m.dirty_blocks(f), written);
}

/// `journal epochs` entries, with the state normalised to lower case.
fn epochs(m: &Mount) -> Vec<Value> {
    m.journal(&["epochs"])["epochs"]
        .as_array()
        .expect("epochs array")
        .clone()
}

fn state(e: &Value) -> String {
    e["state"]
        .as_str()
        .expect("epoch state string")
        .to_lowercase()
        .trim_start_matches("epoch_state_")
        .to_string()
}

fn only_in_state<'a>(all: &'a [Value], wanted: &str) -> &'a Value {
    let found: Vec<&Value> = all.iter().filter(|e| state(e) == wanted).collect();
    assert_eq!(found.len(), 1, "want one {wanted} epoch in {all:#?}");
    found[0]
}

/// A cut closes the open epoch with its files and blocks and opens the next;
/// a second cut while that one is unshipped merges into it.
#[test]
fn cut_closes_epoch_with_its_blocks_and_opens_next() {
    // No automatic cut may interfere with the counts below.
    let m = Mount::start(&["--cut-every", "3600s"]);
    let f = "epoch.img";
    let written = write_ranges(
        &m.mnt(f),
        &[(0, 10), (3 * BLOCK - 1, 2), (10 * BLOCK, BLOCK)],
        BLOCK,
    );
    assert_eq!(written.len(), 4);
    only_in_state(&epochs(&m), "open");

    m.cut();
    let after = epochs(&m);
    let closed = only_in_state(&after, "closed");
    let open = only_in_state(&after, "open");
    assert_eq!(json_u64(&closed["blocks"]), 4, "closed epoch: {closed}");
    assert_eq!(json_u64(&closed["files"]), 1, "closed epoch: {closed}");
    assert!(json_u64(&closed["closed_ns"]) >= json_u64(&closed["opened_ns"]));
    assert!(json_u64(&open["epoch"]) > json_u64(&closed["epoch"]));
    // The closed set is still waiting to ship: the blocks stay dirty.
    assert_eq!(m.dirty_blocks(f), written);

    let more = write_ranges(&m.mnt(f), &[(20 * BLOCK, 1)], BLOCK);
    m.cut();
    let later = epochs(&m);
    // The mount's own first point (its metadata pass, see
    // `replicate::meta`) may have merged an epoch already: find ours.
    let merged = later
        .iter()
        .find(|e| state(e) == "merged" && e["epoch"] == open["epoch"])
        .unwrap_or_else(|| panic!("the open epoch merged: {later:#?}"));
    assert_eq!(merged["merged_into"], closed["epoch"]);
    only_in_state(&later, "closed");
    only_in_state(&later, "open");
    let all: BTreeSet<u64> = written.union(&more).copied().collect();
    assert_eq!(m.dirty_blocks(f), all);
}

/// Normalises an op name: "create", "OP_KIND_CREATE" and "Create" agree.
fn op_name(v: &Value) -> String {
    v.as_str()
        .expect("op name string")
        .to_lowercase()
        .trim_start_matches("op_kind_")
        .to_string()
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").trim_start_matches('/').to_string()
}

/// Namespace operations are journaled in the order they happened, with
/// their paths, targets and (for truncate) sizes.
#[test]
fn ops_journal_records_namespace_changes_in_order() {
    use std::fs;
    let m = Mount::start(&[]);
    fs::create_dir(m.mnt("d")).expect("mkdir");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.mnt("d/a"))
        .expect("create")
        .set_len(100_000)
        .expect("truncate");
    fs::rename(m.mnt("d/a"), m.mnt("d/b")).expect("rename");
    std::os::unix::fs::symlink("b", m.mnt("d/l")).expect("symlink");
    fs::remove_file(m.mnt("d/b")).expect("unlink file");
    fs::remove_file(m.mnt("d/l")).expect("unlink symlink");
    fs::remove_dir(m.mnt("d")).expect("rmdir");

    let ops = m.journal(&["ops"]);
    let ops: Vec<&Value> = ops["ops"]
        .as_array()
        .expect("ops array")
        .iter()
        .filter(|o| o["found_at_mount"] != Value::Bool(true))
        .filter(|o| text(&o["path"]) == "d" || text(&o["path"]).starts_with("d/"))
        // Metadata records (chmod, utimens: see `replicate::meta`) are not
        // namespace changes; their own tests are in `metadata`.
        .filter(|o| op_name(&o["op"]) != "meta")
        .collect();
    let got: Vec<(String, String, String)> = ops
        .iter()
        .map(|o| (op_name(&o["op"]), text(&o["path"]), text(&o["target"])))
        .collect();
    let want: Vec<(String, String, String)> = [
        ("mkdir", "d", ""),
        ("create", "d/a", ""),
        ("truncate", "d/a", ""),
        ("rename", "d/a", "d/b"),
        ("symlink", "d/l", "b"),
        ("unlink", "d/b", ""),
        ("unlink", "d/l", ""),
        ("rmdir", "d", ""),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want, "ops: {ops:#?}");

    let seqs: Vec<u64> = ops.iter().map(|o| json_u64(&o["seq"])).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq order {seqs:?}");
    assert_eq!(json_u64(&ops[2]["size"]), 100_000);
    let id = json_u64(&ops[1]["file_id"]);
    assert_ne!(id, 0, "a created file gets an id");
    for i in [2, 3, 5] {
        assert_eq!(
            json_u64(&ops[i]["file_id"]),
            id,
            "op {i} names the same file"
        );
    }
}

/// fio's own crc32c verify passes through the mount, the backing file ends
/// up identical to what the mount serves, and every block fio wrote is dirty.
fn fio_verify(direct: bool) {
    let m = Mount::start(&[]);
    let f = "fio.img";
    let size = 64 * MIB;
    run(Command::new("fio")
        .args(["--name=v", "--rw=randwrite", "--bs=4k", "--ioengine=psync"])
        .args(["--verify=crc32c", "--do_verify=1", "--size=64M"])
        // Else fio leaves its verify state file in the working directory.
        .arg("--verify_state_save=0")
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--filename={}", m.mnt(f).display())));
    sync_file(&m.mnt(f));
    assert_same_content(&m, f);
    // randwrite with verify writes every block once (fio's random map).
    let all: BTreeSet<u64> = (0..size / BLOCK).collect();
    assert_eq!(m.dirty_blocks(f), all);
}

#[test]
fn fio_direct_crc32c_verify_and_backing_matches_mount() {
    fio_verify(true);
}

#[test]
fn fio_buffered_crc32c_verify_and_backing_matches_mount() {
    fio_verify(false);
}

/// A journal that cannot be opened does not stop the datastore and loses
/// no change: the daemon says so, moves it aside, and treats every block
/// of every file as dirty (a full resync), instead of panicking.
#[test]
fn unreadable_journal_is_moved_aside_and_everything_becomes_dirty() {
    let mut m = Mount::start(&[]);
    let f = "survivor.img";
    write_ranges(&m.mnt(f), &[(0, 8 * BLOCK)], BLOCK);
    m.cut();
    m.stop();
    // sled checks its config file's checksum on open.
    std::fs::write(m.back(".hbrfs/journal/conf"), b"not a sled config\n").unwrap();
    m.restart();
    let log = m.log();
    assert!(
        log.contains("is unusable") && log.contains("moved aside"),
        "no clear message:\n{log}"
    );
    let aside = std::fs::read_dir(m.back(".hbrfs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("journal.broken-")
        });
    assert!(aside, "the broken journal was not kept for inspection");
    assert_eq!(
        m.dirty_blocks(f),
        (0..8).collect(),
        "every block must be dirty again"
    );
    assert_eq!(read(&m.mnt(f)).len() as u64, 8 * BLOCK, "data intact");
}

/// The largest file hbrfs lets grow: `hbrfs::wire::MAX_FILE_SIZE`, 16 TiB
/// less a 4 KiB block (ext4's limit, and the secondary's).
const MAX_FILE_SIZE: u64 = (1 << 44) - 4096;

/// `len` bytes of `byte` in a 4 KiB-aligned buffer, for O_DIRECT.
fn aligned_buf(raw: &mut Vec<u8>, len: usize, byte: u8) -> &[u8] {
    *raw = vec![byte; len + 4096];
    let off = raw.as_ptr().align_offset(4096);
    &raw[off..off + len]
}

/// Opens `p` read-write with extra open flags.
fn open_with(p: &std::path::Path, flags: i32) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Asserts `res` failed with `want`.
fn assert_errno<T: std::fmt::Debug>(what: &str, res: std::io::Result<T>, want: i32) {
    match res {
        Err(e) => assert_eq!(e.raw_os_error(), Some(want), "{what}: {e}"),
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected errno {want}"),
    }
}

/// `hbrfs journal ls` and `hbrfs cut` answer within a few seconds.
fn assert_answers_quickly(m: &Mount) {
    for what in ["journal ls", "cut"] {
        let start = std::time::Instant::now();
        match what {
            "cut" => m.cut(),
            _ => drop(m.journal(&["ls"])),
        }
        let took = start.elapsed();
        assert!(
            took < std::time::Duration::from_secs(5),
            "hbrfs {what} took {took:?}"
        );
    }
}

/// Issue 9: a write at 2^56 through the mount is refused with EFBIG before
/// anything is marked, so no bitmap grows to 512 GiB and the daemon keeps
/// answering. With O_DIRECT the write itself fails; a buffered write is
/// taken by the kernel's writeback cache (`pwrite` returns 1) and its
/// `fsync` fails with EFBIG, the backing file never seeing it. A write,
/// fallocate, copy_file_range or truncate past the bound is refused alike.
#[test]
fn a_write_at_2_pow_56_gets_efbig_and_marks_nothing() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let m = Mount::start(&[]);
    std::fs::write(m.mnt("f"), b"hello").unwrap();
    std::fs::write(m.mnt("g"), b"hello").unwrap();
    sync_file(&m.mnt("f"));
    sync_file(&m.mnt("g"));
    let mut raw = Vec::new();

    // O_DIRECT: the error comes at the write.
    let f = open_with(&m.mnt("f"), libc::O_DIRECT);
    let buf = aligned_buf(&mut raw, 4096, 0x5a);
    for offset in [1 << 56, MAX_FILE_SIZE, 1 << 62] {
        assert_errno(
            &format!("O_DIRECT pwrite at {offset}"),
            f.write_at(buf, offset),
            libc::EFBIG,
        );
    }
    assert_errno(
        "truncate past the bound",
        f.set_len(MAX_FILE_SIZE + 1),
        libc::EFBIG,
    );
    for (mode, what) in [
        (0, "fallocate"),
        (
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            "punch hole",
        ),
        (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
    ] {
        // SAFETY: plain syscall on an open descriptor.
        let ret = unsafe { libc::fallocate(f.as_raw_fd(), mode, 1 << 56, 4096) };
        let res = if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        assert_errno(&format!("{what} at 2^56"), res, libc::EFBIG);
    }
    let src = std::fs::File::open(m.mnt("g")).unwrap();
    let (mut off_in, mut off_out) = (0i64, 1i64 << 56);
    // SAFETY: plain syscall on open descriptors and live offsets.
    let ret = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            f.as_raw_fd(),
            &mut off_out,
            5,
            0,
        )
    };
    let res = if ret >= 0 {
        Ok(ret)
    } else {
        Err(std::io::Error::last_os_error())
    };
    assert_errno("copy_file_range to 2^56", res, libc::EFBIG);
    drop(f);
    assert_eq!(
        std::fs::metadata(m.mnt("f")).unwrap().len(),
        5,
        "size on the mount"
    );

    // Buffered, through the writeback cache: pwrite is taken, fsync fails.
    let g = open_with(&m.mnt("g"), 0);
    assert_eq!(g.write_at(b"x", 1 << 56).unwrap(), 1, "buffered pwrite");
    assert_errno("fsync after the buffered pwrite", g.sync_all(), libc::EFBIG);
    drop(g);

    for name in ["f", "g"] {
        assert_eq!(
            std::fs::metadata(m.back(name)).unwrap().len(),
            5,
            "{name} on the backing"
        );
        let beyond: Vec<u64> = m
            .dirty_blocks(name)
            .into_iter()
            .filter(|b| *b * BLOCK >= MAX_FILE_SIZE)
            .collect();
        assert!(
            beyond.is_empty(),
            "{name}: blocks marked beyond the bound: {beyond:?}"
        );
    }
    for bitmap in std::fs::read_dir(m.back(".hbrfs/bitmaps")).unwrap() {
        let bitmap = bitmap.unwrap();
        let len = bitmap.metadata().unwrap().len();
        assert!(len <= MIB, "{:?} grew to {len} bytes", bitmap.path());
    }
    assert_answers_quickly(&m);

    // A normal write still works.
    let f = open_rw(&m.mnt("f"));
    f.write_all_at(b"world", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(read(&m.mnt("f")), b"world");
    assert_eq!(assert_same_content(&m, "f"), b"world");
    assert!(m.dirty_blocks("f").contains(&0));
}

/// Just below the bound a write works, when the backing takes a file that
/// large (ext4 takes 16 TiB less a block); where it does not, its own error
/// comes through the mount. A write straddling the bound is cut short at
/// it, as the kernel does at a file system's limit.
#[test]
fn a_write_just_below_the_largest_file_works() {
    use std::os::unix::fs::FileExt;
    let m = Mount::start(&[]);
    // What the backing file system itself says about the last byte.
    let probe = m.back("probe");
    let backing = std::fs::File::create(&probe)
        .unwrap()
        .write_at(b"z", MAX_FILE_SIZE - 1)
        .map(drop)
        .map_err(|e| e.raw_os_error());
    std::fs::remove_file(&probe).unwrap();

    std::fs::write(m.mnt("big"), b"").unwrap();
    let f = open_with(&m.mnt("big"), libc::O_DIRECT);
    let mut raw = Vec::new();
    let buf = aligned_buf(&mut raw, 8192, 0x7e);
    let res = f.write_at(buf, MAX_FILE_SIZE - 4096);
    match backing {
        Ok(()) => {
            assert_eq!(
                res.unwrap(),
                4096,
                "straddling write cut short at the bound"
            );
            let last = (MAX_FILE_SIZE - 1) / BLOCK;
            assert!(m.dirty_blocks("big").contains(&last));
            assert_eq!(
                std::fs::metadata(m.back("big")).unwrap().len(),
                MAX_FILE_SIZE
            );
            assert_eq!(
                std::fs::metadata(m.mnt("big")).unwrap().len(),
                MAX_FILE_SIZE
            );
            let mut byte = [0u8; 1];
            std::fs::File::open(m.mnt("big"))
                .unwrap()
                .read_exact_at(&mut byte, MAX_FILE_SIZE - 1)
                .unwrap();
            assert_eq!(byte, [0x7e]);
            assert_answers_quickly(&m);
        }
        Err(errno) => {
            let got = res.unwrap_err();
            assert_eq!(got.raw_os_error(), errno, "the backing's own error: {got}");
        }
    }
    drop(f);
    std::fs::remove_file(m.mnt("big")).unwrap();
}
