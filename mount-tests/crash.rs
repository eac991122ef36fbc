//! Invariant 1 under fire: kill -9 the daemon at random moments while fio
//! writes through the mount; after a restart every block whose content
//! changed must be dirty. Nothing ships in these tests, so the dirty set
//! only grows and the comparison is against the image as it was before fio.

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::{BLOCK, Mount, create_sparse, differing_blocks, read};

const ROUNDS: usize = 20;
const MIB: u64 = 1024 * 1024;
/// Large enough that fio, rate-limited, leaves most blocks untouched, so the
/// write in flight at the kill usually dirties a block for the first time.
const IMAGE: u64 = 128 * MIB;

/// xorshift64: reproducible from the printed seed, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `lo..hi` for picking test parameters.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// `HBRFS_CRASH_SEED` replays a failing run; otherwise the clock seeds.
fn seed() -> u64 {
    std::env::var("HBRFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
            now.as_nanos() as u64 | 1
        })
}

/// fio random writes for ~3 s: O_DIRECT with 4 KiB-multiple sizes, or
/// buffered with unaligned sizes and an fsync every few writes, at a random
/// rate.
fn spawn_fio(
    path: &std::path::Path,
    direct: bool,
    rate_mib: u64,
    fsync_every: u64,
) -> std::process::Child {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=crash", "--rw=randwrite", "--ioengine=psync"])
        .args(["--time_based", "--runtime=3", "--fallocate=none"])
        .args([
            "--randrepeat=0",
            "--norandommap",
            "--buffer_compress_percentage=0",
        ])
        .arg(format!("--size={IMAGE}"))
        .arg(format!("--rate={rate_mib}m"))
        .arg(format!("--filename={}", path.display()));
    if direct {
        cmd.args(["--direct=1", "--bsrange=4k-256k"]);
    } else {
        // The writeback cache would hold everything until the kill (and
        // lose it with the daemon): frequent fsyncs push writes through.
        cmd.args(["--direct=0", "--bsrange=1k-200k", "--bs_unaligned=1"])
            .arg(format!("--fsync={fsync_every}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

#[test]
fn kill9_during_fio_never_loses_a_changed_block() {
    let seed = seed();
    println!("crash seed {seed} (HBRFS_CRASH_SEED={seed} replays it)");
    let mut rng = XorShift(seed);
    let started = Instant::now();
    let mut m = Mount::start(&[]);
    let (mut changed, mut dirty_total, mut newly_marked) = (0, 0, 0);
    for round in 0..ROUNDS {
        // A fresh sparse image per round: its dirty set holds only what this
        // round marked, so an earlier round cannot hide a lost mark.
        let f = format!("crash-{round}.img");
        create_sparse(&m.mnt(&f), IMAGE);
        let before = read(&m.back(&f));
        let d0 = m.dirty_blocks(&f);

        let direct = rng.next() % 2 == 0;
        let rate = rng.range(8, 40);
        let fsync_every = rng.range(1, 16);
        let delay = rng.range(100, 2500);
        let mut fio = spawn_fio(&m.mnt(&f), direct, rate, fsync_every);
        sleep(Duration::from_millis(delay));
        m.kill9();
        // fio now fails with ENOTCONN; its exit status means nothing here.
        let _ = fio.kill();
        let _ = fio.wait();
        assert!(
            !m.back(".hbrfs/clean").exists(),
            "clean marker present after a crash"
        );
        let after = read(&m.back(&f));
        let differ = differing_blocks(&before, &after, BLOCK);
        // `journal` reads the state folder itself while no daemon runs (the
        // dead daemon's control socket is still there): nothing lost either.
        let offline = m.dirty_blocks(&f);
        let lost_offline: Vec<u64> = differ.difference(&offline).copied().collect();
        assert!(
            lost_offline.is_empty(),
            "round {round} (seed {seed}): offline journal misses {lost_offline:?}"
        );

        m.restart();
        assert!(read(&m.back(&f)) == after, "restart changed the image");
        let dirty = m.dirty_blocks(&f);
        assert!(dirty.is_superset(&offline), "restart dropped dirty blocks");
        let lost: BTreeSet<u64> = differ.difference(&dirty).copied().collect();
        println!(
            "round {round:2}: {} {rate} MiB/s killed after {delay:4} ms: \
             {} blocks changed, {} dirty",
            if direct { "direct  " } else { "buffered" },
            differ.len(),
            dirty.len()
        );
        assert!(
            lost.is_empty(),
            "round {round} (seed {seed}): {} changed blocks not dirty: {lost:?}\n{}",
            lost.len(),
            m.log()
        );
        changed += differ.len();
        dirty_total += dirty.len();
        newly_marked += differ.difference(&d0).count();
        fs::remove_file(m.mnt(&f)).expect("remove round image");
    }
    m.stop();
    println!(
        "crash: {ROUNDS} rounds in {:.1} s, {changed} blocks changed, \
         {dirty_total} dirty, {newly_marked} changed blocks clean before fio",
        started.elapsed().as_secs_f64()
    );
    // Without blocks that were clean before fio wrote them, no lost mark
    // could have shown: the test would have proved nothing.
    assert!(
        newly_marked > 0,
        "no round changed a clean block (seed {seed})"
    );
}
