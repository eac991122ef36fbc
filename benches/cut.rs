//! How long an epoch cut takes in a datastore that is large but nearly
//! idle: 10,000 tracked files nobody writes, and one 1 TiB sparse image
//! with 10 dirty blocks. Invariant 5 (cost follows change) says the cut
//! must cost the 10 blocks, not the 10,001 files or the terabyte.
//!
//! A plain `main` (`harness = false`): stable Rust has no `#[bench]`, and a
//! statistics crate would be a new dependency for one number. `cargo bench
//! --bench cut` runs the full size; `cargo test --all-targets` runs the
//! same code at a small size as a smoke test.
//!
//! Reported, each for a plain `cut()` (no closed set: the slots swap) and
//! for the hand-over `protect_closed()` the replicator does (a closed set
//! exists: the new writes fold into it): the gate hold, which is what
//! writers wait for and what the target of < 1 ms is about, and the whole
//! call including the closed-set count and the journal records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hbrfs::ids::{BlockSize, FileId};
use hbrfs::journal::Journal;
use hbrfs::state::StatePaths;
use hbrfs::tracking::{FileSource, Tracker};

/// One TiB.
const TIB: u64 = 1 << 40;
/// Dirty blocks of the big image per round.
const DIRTY: u64 = 10;

fn source(path: &str, size: u64) -> FileSource {
    FileSource {
        reader: None,
        path: path.as_bytes().to_vec(),
        size,
    }
}

/// Median and maximum of `samples`.
fn summary(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    format!(
        "median {:>9.1} µs, max {:>9.1} µs",
        samples[samples.len() / 2].as_secs_f64() * 1e6,
        samples[samples.len() - 1].as_secs_f64() * 1e6
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (idle_files, rounds) = if full { (10_000, 50) } else { (100, 5) };
    // tmpfs when there is one: the setup makes 10,001 bitmaps, each synced,
    // and the numbers that matter (the gate hold) do no IO.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    let paths = StatePaths::of(dir.path());
    std::fs::create_dir_all(paths.bitmaps()).expect("bitmaps dir");
    std::fs::create_dir_all(paths.preimages()).expect("preimages dir");
    let journal = Arc::new(Journal::open(&paths.journal()).expect("journal"));
    let bs = BlockSize::DEFAULT;
    let tracker = Tracker::new(&paths, bs, journal, true).expect("tracker");

    let setup = Instant::now();
    for i in 0..idle_files {
        tracker
            .track_new(FileId(i + 2), source(&format!("idle-{i}.img"), 1 << 20))
            .expect("idle file");
    }
    let big = tracker
        .track_new(FileId(1), source("big.img", 0))
        .expect("big image");
    big.extended_to(TIB);
    let stride = TIB / DIRTY;
    let write_round = |round: u64| {
        let _gate = tracker.gate();
        for i in 0..DIRTY {
            let offset = i * stride + (round % 16) * bs.bytes();
            big.mark(offset, 4096, 4096).expect("mark");
        }
    };
    write_round(0);
    // Settle: everything written so far is one shipped point.
    let set = tracker
        .protect_closed()
        .expect("cut")
        .expect("a closed set");
    tracker.clear_closed(&set);
    println!(
        "setup in {}: {} idle files + one 1 TiB image, {:.1} s",
        dir.path().display(),
        idle_files,
        setup.elapsed().as_secs_f64()
    );

    let (mut cuts, mut handovers) = (Vec::new(), Vec::new());
    let (mut cut_stalls, mut handover_stalls) = (Vec::new(), Vec::new());
    let stall = || tracker.last_cut_stall().expect("a cut was timed");
    for round in 1..=rounds {
        // A cut with no closed set (the point was applied): closes.
        write_round(round);
        let t = Instant::now();
        tracker.cut().expect("cut");
        cuts.push(t.elapsed());
        cut_stalls.push(stall());
        // The replicator's tick: folds the next writes in and hands over.
        write_round(round + 1);
        let t = Instant::now();
        let set = tracker
            .protect_closed()
            .expect("cut")
            .expect("a closed set");
        handovers.push(t.elapsed());
        handover_stalls.push(stall());
        assert_eq!(set.files.len(), 1, "only the big image holds closed blocks");
        tracker.clear_closed(&set);
    }
    let (count, p99, max) = tracker.cut_stalls();
    println!(
        "gate held, all {count} cuts incl. setup: p99 {:.1} µs, max {:.1} µs (target < 1000 µs)",
        p99 as f64 / 1e3,
        max as f64 / 1e3
    );
    println!(
        "cut(), gate held:               {}",
        summary(&mut cut_stalls)
    );
    println!("cut(), whole (journal records): {}", summary(&mut cuts));
    println!(
        "protect_closed(), gate held:    {}",
        summary(&mut handover_stalls)
    );
    println!(
        "protect_closed(), whole:        {}",
        summary(&mut handovers)
    );
}
