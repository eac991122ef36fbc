//! A bounded secondary (issue 9, item 5): a point's size is not limited by
//! a message, and the secondary's memory does not grow with it. Two real
//! processes on 127.0.0.1, as in `replication`:
//!
//! - a backlog of 300,000 namespace operations (create, rename, unlink
//!   churn made while the secondary is stopped) lands once it is back:
//!   up to protocol 2 they travelled in one Begin message, which was over
//!   the 16 MiB message limit, so every retry failed for ever;
//! - a point of 1,000,000 offers (zero blocks of a sparse 4 KiB-block
//!   image) lands while the secondary's peak RSS stays under a stated
//!   bound: up to protocol 2 it kept every offer and staged block of the
//!   point in memory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use hbrfs::wire::MAX_MESSAGE;

use crate::harness::sync_file;
use crate::replication::{
    MIB, Secondary, Until, assert_trees_identical, primary_for, repl_counter, wait_applied,
};

/// Namespace operations in the backlog.
const BACKLOG_OPS: usize = 300_000;

/// Long names, so that the backlog's operations weigh what images with
/// real names do (over 100 bytes a path): 300,000 of them are ~45 MB
/// encoded, well over the 16 MiB a message may carry.
const CHURN_DIR: &str = "churn/a-folder-with-the-long-name-that-image-stores-tend-to-have";

/// The name of churn file `i`, before (`tmp`) or after its rename.
fn churn_name(i: usize, suffix: &str) -> String {
    format!("{CHURN_DIR}/vm-{i:07}-disk-0-flat-a-long-name-as-hypervisors-make-them.{suffix}")
}

/// Creates, renames and unlinks files through the mount until `ops`
/// namespace operations are made; every 10,000th file is kept (with a
/// little content) so the replica has something to compare. Returns how
/// long it took, and the bytes of the paths the operations carry (a
/// lower bound of their encoded size).
fn churn(mnt: &Path, ops: usize) -> (Duration, usize) {
    let started = Instant::now();
    let mut made = 0;
    let mut bytes = 0;
    let mut i = 0;
    while made < ops {
        let (tmp_name, done_name) = (churn_name(i, "tmp"), churn_name(i, "img"));
        // create tmp, rename tmp → img, unlink img.
        bytes += 2 * tmp_name.len() + 2 * done_name.len();
        let tmp = mnt.join(tmp_name);
        let done = mnt.join(done_name);
        let mut f = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        made += 1;
        if i % 10_000 == 0 {
            f.write_all(format!("kept file {i}\n").as_bytes())
                .expect("write a kept file");
        }
        drop(f);
        fs::rename(&tmp, &done).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
        made += 1;
        if i % 10_000 != 0 {
            fs::remove_file(&done).unwrap_or_else(|e| panic!("unlink {}: {e}", done.display()));
            made += 1;
        }
        i += 1;
    }
    (started.elapsed(), bytes)
}

#[test]
fn a_backlog_of_300000_namespace_operations_lands_once_the_secondary_is_back() {
    let mut sec = Secondary::start();
    let m = primary_for(&sec, &sec.addr, &[]);
    fs::create_dir_all(m.mnt(CHURN_DIR)).expect("mkdir the churn folder");
    wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(60));
    sec.stop();
    let (took, bytes) = churn(&m.mountpoint, BACKLOG_OPS);
    assert!(
        bytes > MAX_MESSAGE,
        "the backlog's paths ({bytes} bytes) would fit one message: the test proves nothing"
    );
    let ops = crate::harness::json_u64(&m.journal(&["stats"])["ops"]);
    assert!(
        ops >= BACKLOG_OPS as u64,
        "only {ops} operations are pending in the journal"
    );
    println!(
        "backlog: {BACKLOG_OPS} operations ({:.1} MiB of paths) through the mount in {:.1} s \
         ({:.0} ops/s)",
        bytes as f64 / MIB as f64,
        took.as_secs_f64(),
        BACKLOG_OPS as f64 / took.as_secs_f64()
    );
    let started = Instant::now();
    sec.restart();
    wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(600));
    println!(
        "backlog: shipped and applied in {:.1} s after the secondary came back",
        started.elapsed().as_secs_f64()
    );
    assert_trees_identical(&m, &sec);
}

/// Offers in the big point: blocks of 4 KiB.
const OFFERS: u64 = 1_000_000;
/// The bound on the secondary's peak RSS while it receives and applies a
/// point of [`OFFERS`] offers. Before the bound (protocol 2) it peaked at
/// several times this; after, at a few dozen MiB whatever the point.
const RSS_BOUND: u64 = 64 * MIB;

#[test]
fn a_point_of_a_million_offers_lands_with_the_secondarys_peak_rss_under_64_mib() {
    let sec = Secondary::start();
    let m = primary_for(&sec, &sec.addr, &["--block-size", "4K"]);
    let image = m.mnt("big.img");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&image)
        .expect("create big.img");
    f.set_len(OFFERS * 4096).expect("size big.img");
    wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(60));
    let before = sec.peak_rss();
    let offered = repl_counter(&crate::replication::primary_status(&m), "blocks_offered");
    // Punching the whole (sparse) image marks every block dirty in one
    // call, cheaply: a million zero blocks, offered as zero markers.
    let len = libc::off_t::try_from(OFFERS * 4096).expect("fits off_t");
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on an open descriptor we own; no memory passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, len) };
    assert_eq!(
        rc,
        0,
        "punch {}: {}",
        image.display(),
        std::io::Error::last_os_error()
    );
    drop(f);
    sync_file(&image);
    let started = Instant::now();
    let p = wait_applied(&m, &sec, Until::CaughtUp, Duration::from_secs(240));
    let offered = repl_counter(&p, "blocks_offered") - offered;
    let peak = sec.peak_rss();
    println!(
        "{offered} offers shipped and applied in {:.1} s; secondary peak RSS {:.1} MiB before the \
         point, {:.1} MiB after (bound {} MiB)",
        started.elapsed().as_secs_f64(),
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        RSS_BOUND / MIB
    );
    assert!(
        offered >= OFFERS,
        "only {offered} offers were made: the point is not one of a million"
    );
    assert!(
        peak < RSS_BOUND,
        "the secondary's peak RSS reached {} MiB for a point of {offered} offers (bound {} MiB)",
        peak / MIB,
        RSS_BOUND / MIB
    );
    assert_eq!(
        fs::metadata(sec.rep("big.img"))
            .expect("replica big.img")
            .len(),
        OFFERS * 4096
    );
}
