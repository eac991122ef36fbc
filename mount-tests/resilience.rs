//! Resilience of replication (issue 4, DESIGN invariants 1 and 4), with a
//! real primary (`hbrfs mount --replicate-to`) and secondary (`hbrfs
//! serve`) as in `replication.rs`, whose helpers these tests use:
//!
//! - a TCP proxy between the two cuts every connection every 2-3 s while
//!   fio writes, after a backlog larger than any window between cuts was
//!   written while the secondary was unreachable: the backlog lands while
//!   the cuts go on (streams resume what broken ones staged), the replica
//!   only moves forward, points keep landing between cuts, and it
//!   converges to identical once the cutting stops;
//! - the primary is killed with SIGKILL at random moments during fio: each
//!   restart resumes from the bitmaps (the log says so and how many blocks
//!   it rechecks), never a full resync, and the replica converges;
//! - a second primary datastore is refused by a paired secondary with a
//!   message naming both datastores, while the first keeps replicating;
//! - a proxy that stalls without closing while a point ships is noticed
//!   within 30 s (status says so), and the point resumes on a new
//!   connection once the path works again (issue 9, item 3).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, sleep};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{BLOCK, Mount, create_sparse, json_u64, pattern, sync_file, write_ranges};
use crate::replication::{
    APPLY_TIMEOUT, MIB, Rng, Secondary, Until, assert_same_bytes, assert_trees_identical, pair,
    primary_for, primary_status, qemu_img_compare, repl_counter, sha256, wait_applied,
    wait_last_error,
};

// ---------------------------------------------------------------------------
// fio through the primary's mount.

/// A running `fio` random-write job (O_DIRECT, 64 KiB, half-compressible
/// fresh buffers, so that every block carries new content).
struct Fio {
    child: Child,
}

impl Fio {
    fn start(file: &Path, size: u64, rate_mib: u64, runtime_s: u64) -> Fio {
        let child = Command::new("fio")
            .args([
                "--name=resilience",
                "--rw=randwrite",
                "--bs=64k",
                "--direct=1",
            ])
            .args(["--ioengine=libaio", "--iodepth=4", "--time_based"])
            .args(["--refill_buffers", "--buffer_compress_percentage=50"])
            .args(["--randrepeat=0", "--norandommap", "--fallocate=none"])
            .args(["--output-format=json"])
            .arg(format!("--runtime={runtime_s}"))
            .arg(format!("--rate={rate_mib}m"))
            .arg(format!("--size={size}"))
            .arg(format!("--filename={}", file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fio");
        Fio { child }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll fio").is_none()
    }

    /// Waits for fio to finish successfully; returns the bytes it wrote.
    fn finish(self) -> u64 {
        let out = self.child.wait_with_output().expect("wait for fio");
        assert!(
            out.status.success(),
            "fio failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "fio printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        json_u64(&report["jobs"][0]["write"]["io_bytes"])
    }

    /// Reaps a fio whose file system went away (the daemon was killed):
    /// its exit status means nothing then.
    fn reap(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After converging: `qemu-img compare` and sha256 say the image is the
/// same on both sides, and so is the whole tree.
fn assert_replica_identical(m: &Mount, sec: &Secondary, image: &str) {
    qemu_img_compare("raw", &m.back(image), &sec.rep(image));
    assert_eq!(
        sha256(&m.back(image)),
        sha256(&sec.rep(image)),
        "{image}: the replica differs after converging"
    );
    assert_trees_identical(m, sec);
}

// ---------------------------------------------------------------------------
// A TCP proxy that cuts connections.

/// What the proxy's threads share.
struct ProxyState {
    upstream: String,
    /// Both sockets of every connection carried, shut down at a cut.
    live: Mutex<Vec<TcpStream>>,
    /// Until then new connections are closed as soon as they are accepted.
    refuse_until: Mutex<Instant>,
    stop: AtomicBool,
    connections: AtomicU64,
    refused: AtomicU64,
    /// Every byte carried from the primary to the secondary, when asked.
    upstream_bytes: Option<Mutex<Vec<u8>>>,
    /// While set, every connection (those carried and those accepted
    /// meanwhile) stops forwarding in both directions without closing:
    /// what it reads is held until the stall ends.
    stalled: AtomicBool,
}

/// `127.0.0.1:PORT` → `upstream`, one pair of std threads per connection.
struct CuttingProxy {
    addr: String,
    state: Arc<ProxyState>,
    acceptor: Option<JoinHandle<()>>,
}

impl CuttingProxy {
    /// A proxy to `upstream`; with `record`, it keeps what it carries
    /// upstream.
    fn start(upstream: &str, record: bool) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            live: Mutex::new(Vec::new()),
            refuse_until: Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            upstream_bytes: record.then(|| Mutex::new(Vec::new())),
            stalled: AtomicBool::new(false),
        });
        let st = state.clone();
        let acceptor = thread::spawn(move || {
            for client in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if Instant::now() < *st.refuse_until.lock().expect("proxy lock") {
                    st.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&st.upstream) else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let clone = |s: &TcpStream| s.try_clone().expect("clone a proxied socket");
                st.live
                    .lock()
                    .expect("proxy lock")
                    .extend([clone(&client), clone(&server)]);
                pump(clone(&client), clone(&server), st.clone(), record);
                pump(server, client, st.clone(), false);
            }
        });
        CuttingProxy {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    /// Shuts down every connection it carries and closes new ones for
    /// `refuse`.
    fn cut(&self, refuse: Duration) {
        *self.state.refuse_until.lock().expect("proxy lock") = Instant::now() + refuse;
        for s in self.state.live.lock().expect("proxy lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl CuttingProxy {
    /// Stalls every connection (`true`): nothing is forwarded any more in
    /// either direction, and nothing is closed; or ends the stall
    /// (`false`), forwarding what was held.
    fn stall(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::SeqCst);
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        self.cut(Duration::ZERO);
    }
}

/// Copies `from` → `to` until either side closes, then closes both;
/// with `record`, keeps a copy of what passed. While the proxy is
/// stalled, what it reads is held, not forwarded (and, once the socket
/// buffers fill, nothing more is read).
fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<ProxyState>, record: bool) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let copied = (|| -> std::io::Result<()> {
            loop {
                let n = from.read(&mut buf)?;
                while st.stalled.load(Ordering::SeqCst) && !st.stop.load(Ordering::SeqCst) {
                    sleep(Duration::from_millis(50));
                }
                if n == 0 {
                    return Ok(());
                }
                if let Some(kept) = st.upstream_bytes.as_ref().filter(|_| record) {
                    kept.lock()
                        .expect("proxy lock")
                        .extend_from_slice(&buf[..n]);
                }
                to.write_all(&buf[..n])?;
            }
        })();
        if let Err(e) = copied {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::BrokenPipe
                        | ErrorKind::NotConnected
                        | ErrorKind::ConnectionAborted
                ),
                "proxy copy: {e}"
            );
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

// ---------------------------------------------------------------------------
// 3. Disconnect and reconnect.

/// Writes `size` bytes of incompressible data sequentially from the start
/// of `file` with O_DIRECT (fio, unthrottled).
fn write_backlog(file: &Path, size: u64) {
    let out = Command::new("fio")
        .args(["--name=backlog", "--rw=write", "--bs=1m", "--direct=1"])
        .args(["--ioengine=libaio", "--iodepth=4", "--refill_buffers"])
        .args(["--fallocate=none", "--randrepeat=0"])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", file.display()))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio backlog: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The secondary's resumed-blocks counter (blocks a broken stream staged
/// that a later stream used instead of asking again).
fn blocks_resumed(sec: &Secondary) -> u64 {
    json_u64(&sec.status()["counters"]["blocks_resumed"])
}

#[test]
fn proxy_cutting_every_2_to_3_s_resumes_a_backlog_larger_than_any_window_and_converges() {
    const IMAGE: u64 = 1024 * MIB;
    // Written while the secondary is unreachable: incompressible, so
    // shipping it takes several times the longest window between cuts.
    const BACKLOG: u64 = 256 * MIB;
    const RATE_MIB: u64 = 10;
    const RUNTIME_S: u64 = 40;
    const REFUSE: Duration = Duration::from_secs(1);
    let sec = Secondary::start();
    let proxy = CuttingProxy::start(&sec.addr, false);
    // The backlog must be one point larger than a window between cuts:
    // the first backlog write must not cut (and hold) a point of its first
    // blocks only, so the cut waits 10 s after a change; a reconnect still
    // ticks at once. And its ship must take several windows whatever the
    // machine's speed: the pipelined ship moved 256 MiB in ~2 s on loopback,
    // so the rate is capped (256 MiB at 32 MiB/s: 8 s, about three windows).
    let m = primary_for(
        &sec,
        &proxy.addr,
        &["--coalesce", "10s", "--max-rate", "32M"],
    );
    let mut rng = Rng::from_time_or_env();
    create_sparse(&m.mnt("disk.img"), IMAGE);
    sync_file(&m.mnt("disk.img"));
    let base = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let wire_before = repl_counter(&base, "wire_bytes");

    // The secondary becomes unreachable; the primary keeps taking writes.
    proxy.cut(Duration::from_secs(3600));
    let disconnected_at = sec.applied_epoch();
    write_backlog(&m.mnt("disk.img"), BACKLOG);
    sync_file(&m.mnt("disk.img"));
    assert_eq!(
        sec.applied_epoch(),
        disconnected_at,
        "shipped through a cut proxy"
    );

    // Reachable again, but cut every 2-3 s while fio keeps writing.
    proxy.cut(Duration::ZERO);
    let mut fio = Fio::start(&m.mnt("disk.img"), IMAGE, RATE_MIB, RUNTIME_S);
    let started = Instant::now();
    // What happened when: cuts, and each new point the replica applied.
    let mut timeline: Vec<(Duration, Event)> = Vec::new();
    let mut last = disconnected_at;
    let mut last_cut = started;
    let mut next_cut = started + Duration::from_millis(2000 + rng.below(1000));
    while fio.running() {
        let e = sec.applied_epoch();
        assert!(
            e >= last,
            "the replica went back from epoch {last} to {e}\n--- secondary log ---\n{}",
            sec.log()
        );
        if e > last {
            timeline.push((started.elapsed(), Event::Applied(e)));
            last = e;
        }
        if Instant::now() >= next_cut {
            // How far the ship in flight (if one is) got before the cut.
            let ship = &primary_status(&m)["replication"]["shipping"];
            let in_flight = (!ship.is_null()).then(|| {
                (
                    json_u64(&ship["blocks_done"]),
                    json_u64(&ship["blocks_total"]),
                )
            });
            proxy.cut(REFUSE);
            last_cut = Instant::now();
            timeline.push((started.elapsed(), Event::Cut(in_flight)));
            next_cut = last_cut + Duration::from_millis(2000 + rng.below(1000));
        }
        // The sampling period (the condition polled is fio's end).
        sleep(Duration::from_millis(100));
    }
    let run_time = started.elapsed();
    let written = BACKLOG + fio.finish();
    let resumed = blocks_resumed(&sec);
    // The cutting stops with fio; the replica must then converge.
    sync_file(&m.mnt("disk.img"));
    let fin = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let converged = last_cut.elapsed();
    let final_epoch = sec.applied_epoch();
    assert!(final_epoch >= last, "the replica went back after the run");
    assert_replica_identical(&m, &sec, "disk.img");

    let wire = repl_counter(&fin, "wire_bytes") - wire_before;
    let cuts = timeline
        .iter()
        .filter(|(_, e)| matches!(e, Event::Cut(_)))
        .count();
    let points = timeline.len() - cuts;
    // Cuts before the first point landed (the backlog's), and the
    // intervals after it in which a point landed.
    let backlog_cuts = timeline
        .iter()
        .take_while(|(_, e)| matches!(e, Event::Cut(_)))
        .count();
    let mut landed = vec![false; cuts + 1];
    let mut interval = 0;
    for (_, e) in &timeline {
        match e {
            Event::Cut(_) => interval += 1,
            Event::Applied(_) => landed[interval] = true,
        }
    }
    let later = &landed[(backlog_cuts + 1).min(cuts)..cuts.max(backlog_cuts + 1).min(cuts + 1)];
    let progressed = later.iter().filter(|l| **l).count();
    let shown: Vec<String> = timeline
        .iter()
        .map(|(t, e)| match e {
            Event::Cut(None) => format!("{:.1}s cut (idle)", t.as_secs_f64()),
            Event::Cut(Some((done, total))) => format!(
                "{:.1}s cut (ship at block {done} of {total})",
                t.as_secs_f64()
            ),
            Event::Applied(n) => format!("{:.1}s epoch {n}", t.as_secs_f64()),
        })
        .collect();
    let log = m.log();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("replication:")).collect();
    println!(
        "disconnects: a {} MiB backlog written while unreachable, then {cuts} cuts (each \
         followed by {REFUSE:?} of refused connections) in {:.1} s of fio at {RATE_MIB} MiB/s; \
         {} connections carried, {} refused; {} failed ships or connects; the backlog point \
         landed after {backlog_cuts} cuts, resuming {resumed} blocks staged by broken streams; \
         {points} points applied during the run (epoch {disconnected_at} → {last}), one or more \
         in {progressed} of the {} intervals after that; converged {:.1} s after the last cut, \
         at epoch {final_epoch}; wire {:.1} MiB for {:.1} MiB written into a {} MiB image \
         ({:.2} of the bytes written, {:.2} of a full copy)\n  timeline: {}",
        BACKLOG / MIB,
        run_time.as_secs_f64(),
        proxy.state.connections.load(Ordering::Relaxed),
        proxy.state.refused.load(Ordering::Relaxed),
        failures.len(),
        later.len(),
        converged.as_secs_f64(),
        wire as f64 / MIB as f64,
        written as f64 / MIB as f64,
        IMAGE / MIB,
        wire as f64 / written as f64,
        wire as f64 / IMAGE as f64,
        shown.join(", "),
    );
    assert!(cuts >= 8, "only {cuts} cuts in the run");
    // The backlog cannot ship within one window: it lands while the cuts
    // go on only because each stream resumes what the broken ones staged.
    assert!(
        backlog_cuts >= 1 && points >= 1,
        "the backlog did not need a reconnect, or never landed during the cuts"
    );
    assert!(resumed > 0, "no stream resumed what a broken one staged");
    // No reconnect starts a point over: between two cuts that found the
    // same point shipping, it went on from about where it was (less the
    // blocks still in flight at the cut: the ship's window of 8 chunks of
    // 4 MiB, 512 blocks of 64 KiB, and the chunks read ahead).
    let in_flight: Vec<(u64, u64)> = timeline
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Cut(Some(at)) => Some(*at),
            _ => None,
        })
        .collect();
    for w in in_flight.windows(2) {
        let ((before, total), (after, same)) = (w[0], w[1]);
        assert!(
            total != same || after + 1024 >= before,
            "a reconnect started the point over: block {before} of {total} at one cut, \
             {after} at the next"
        );
    }
    // After it, points keep landing between cuts.
    assert!(
        points >= 2,
        "after the backlog, only {} points landed while the cuts went on",
        points - 1
    );
    // Reconnects ship what changed, never the image again and never a
    // staged block twice: the wire stays under what was written (fio's
    // half is half-compressible) plus a tenth for resends in flight.
    assert!(
        wire < written + written / 10,
        "{wire} bytes on the wire for {written} bytes written"
    );
}

/// The failure contract's liveness (issue 9, item 3): a connection that
/// stops forwarding without closing, while a point ships, is noticed
/// within 30 s: `status` shows the stream down, an error naming the stall
/// and how long since the last progress. Once the path works again the
/// held point ships again on a new connection and the replica converges.
#[test]
fn a_proxy_that_stalls_without_closing_is_noticed_within_30_s_and_the_point_resumes() {
    const IMAGE: u64 = 64 * MIB;
    /// The contract's bound, and a margin for status polling.
    const DETECT: Duration = Duration::from_secs(30);
    const MARGIN: Duration = Duration::from_secs(3);
    let sec = Secondary::start();
    let proxy = CuttingProxy::start(&sec.addr, false);
    // Capped so that the point below ships for several seconds.
    // The backlog ships as one point: a cut 3 s after the first change
    // keeps its page flush together.
    let m = primary_for(&sec, &proxy.addr, &["--max-rate", "8M", "--coalesce", "3s"]);
    create_sparse(&m.mnt("disk.img"), IMAGE);
    sync_file(&m.mnt("disk.img"));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let before = sec.applied_epoch();

    // Incompressible, so the point takes ~8 s at the cap.
    write_backlog(&m.mnt("disk.img"), IMAGE);
    sync_file(&m.mnt("disk.img"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let (done, total) = loop {
        let ship = &primary_status(&m)["replication"]["shipping"];
        if !ship.is_null() && json_u64(&ship["blocks_done"]) > 0 {
            break (
                json_u64(&ship["blocks_done"]),
                json_u64(&ship["blocks_total"]),
            );
        }
        assert!(Instant::now() < deadline, "no point started shipping");
        sleep(Duration::from_millis(20));
    };

    // The path stalls in the middle of the ship: bytes are taken and
    // held, nothing is closed.
    proxy.stall(true);
    let stalled_at = Instant::now();
    let (error, since_progress) = loop {
        let s = primary_status(&m);
        let r = &s["replication"];
        let e = r["last_error"].as_str().unwrap_or("");
        if r["connected"] == false && (e.contains("no progress") || e.contains("keepalive")) {
            break (e.to_string(), r["seconds_since_progress"].as_f64());
        }
        assert!(
            stalled_at.elapsed() < DETECT + MARGIN,
            "a stalled connection was not noticed within {DETECT:?}:\n{s:#}\n--- log ---\n{}",
            m.log()
        );
        sleep(Duration::from_millis(100));
    };
    let detected = stalled_at.elapsed();
    let since_progress = since_progress.expect("seconds_since_progress after a stall");
    assert!(
        since_progress >= 10.0,
        "status says the last progress was {since_progress:.1} s ago, after a stall of {detected:?}"
    );
    assert_eq!(
        sec.applied_epoch(),
        before,
        "a point landed through a stalled proxy"
    );

    // Still stalled: new connections are held too, so each attempt fails
    // by its own deadline and the stream stays down.
    sleep(Duration::from_secs(6));
    let s = primary_status(&m);
    assert_eq!(s["replication"]["connected"], false, "{s:#}");
    crate::health::assert_stalled(&m.backing, "the connection stalled");

    // The path works again: the held point ships again and lands.
    proxy.stall(false);
    let resumed_at = Instant::now();
    sync_file(&m.mnt("disk.img"));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let converged = resumed_at.elapsed();
    assert!(sec.applied_epoch() > before, "the held point never landed");
    assert_replica_identical(&m, &sec, "disk.img");
    let log = m.log();
    let resumed = resumed_after(&log);
    println!(
        "stall: the proxy stalled at block {done} of {total} of a {} MiB point; noticed after \
         {:.1} s (status: {since_progress:.1} s since the last progress; error: {error}); \
         the point landed {:.1} s after the stall ended ({}), and the replica is identical",
        IMAGE / MIB,
        detected.as_secs_f64(),
        converged.as_secs_f64(),
        resumed.map_or("shipped again from the start".to_string(), |n| format!(
            "resumed after {n} offers the secondary held"
        )),
    );
}

/// The offer count of the last "resuming after N offers" in the primary's
/// log, if any.
fn resumed_after(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let (_, rest) = l.split_once("the secondary holds the first ")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The secondary killed with SIGKILL in the middle of a large point (a
/// third to two thirds shipped) and started again: the point resumes from
/// the log the secondary keeps of it, after the offers the log holds (all
/// but the last checkpoint's 32 MiB at most), not from its first block, and
/// the replica converges to identical.
#[test]
fn secondary_killed_in_the_middle_of_a_large_point_resumes_it_from_its_log() {
    const SIZE: u64 = 192 * MIB;
    const BLOCKS: u64 = SIZE / BLOCK;
    let (mut sec, m) = pair(&["--max-rate", "32M"]);
    // The mount's own first point (its metadata pass) may land first.
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    std::fs::write(m.mnt("big.img"), pattern(SIZE as usize, 3)).unwrap();
    sync_file(&m.mnt("big.img"));
    let deadline = Instant::now() + APPLY_TIMEOUT;
    // `before`: the replica's epoch while the large point ships (its
    // base); an RPO tick during the write may have applied a small point
    // of the file's first blocks after the wait above.
    let (done_at_kill, before) = loop {
        let ship = &primary_status(&m)["replication"]["shipping"];
        let done = if ship.is_null() {
            0
        } else {
            json_u64(&ship["blocks_done"])
        };
        if done >= BLOCKS / 3 {
            break (done, sec.applied_epoch());
        }
        assert!(
            Instant::now() < deadline,
            "the point never got a third shipped"
        );
        sleep(Duration::from_millis(20));
    };
    assert!(
        done_at_kill < BLOCKS * 2 / 3,
        "shipped too far before the kill"
    );
    sec.kill9();
    assert_eq!(
        sec.applied_epoch(),
        before,
        "the point applied before the kill"
    );
    sec.restart();
    let fin = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let resumed = resumed_after(&m.log()).unwrap_or(0);
    let wire = repl_counter(&fin, "wire_bytes");
    println!(
        "secondary kill -9: killed at block {done_at_kill} of {BLOCKS}, resumed after {resumed} \
         offers; wire {:.1} MiB for a {} MiB point",
        wire as f64 / MIB as f64,
        SIZE / MIB
    );
    assert!(
        resumed + 512 + 256 >= done_at_kill,
        "resumed after {resumed} offers, though {done_at_kill} were shipped at the kill \
         (a checkpoint every 512 blocks, a chunk in flight)\n--- secondary log ---\n{}",
        sec.log()
    );
    assert_same_bytes(&m.back("big.img"), &sec.rep("big.img"));
    assert!(
        wire < SIZE + SIZE / 3,
        "{wire} bytes on the wire for a {SIZE}-byte point"
    );
}

/// What the disconnect test saw happen.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// The proxy cut every connection; the ship in flight then, if any,
    /// had sent this many of its blocks.
    Cut(Option<(u64, u64)>),
    /// The replica applied a new point, of this epoch.
    Applied(u64),
}

// ---------------------------------------------------------------------------
// 4. kill -9 of the primary.

/// The log lines of the daemon's last start (after the harness's last
/// `=== hbrfs mount` marker).
fn last_start(log: &str) -> &str {
    log.rfind("=== hbrfs mount").map_or(log, |i| &log[i..])
}

/// From "... no full resync: N blocks in M files are marked ...": (N, M).
fn rechecked(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("no full resync: ")? + "no full resync: ".len()..];
    let words: Vec<&str> = rest.split_whitespace().take(6).collect();
    match words[..] {
        [n, "blocks", "in", m, "files", "are"] => Some((n.parse().ok()?, m.parse().ok()?)),
        _ => None,
    }
}

#[test]
fn primary_killed_10_times_during_fio_resumes_from_the_bitmaps_without_a_full_resync() {
    const ROUNDS: usize = 10;
    const IMAGE: u64 = 256 * MIB;
    let (sec, mut m) = pair(&[]);
    let mut rng = Rng::from_time_or_env();
    create_sparse(&m.mnt("disk.img"), IMAGE);
    sync_file(&m.mnt("disk.img"));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let started = Instant::now();
    let (mut blocks_total, mut epochs) = (0u64, Vec::new());
    for round in 0..ROUNDS {
        let fio = Fio::start(&m.mnt("disk.img"), IMAGE, 20, 60);
        let since = Instant::now();
        if round % 2 == 0 {
            // Let a point land since the restart, so that kills also hit
            // a replicator that is running, not only one starting up.
            let e = sec.applied_epoch();
            wait_applied(&m, &sec, Until::Epoch(e + 1), APPLY_TIMEOUT);
        }
        // Then a random moment: writing, cutting, shipping or idle.
        sleep(Duration::from_millis(300 + rng.below(2700)));
        let delay = since.elapsed();
        let applied = sec.applied_epoch();
        m.kill9();
        fio.reap();
        m.restart();
        let log = m.log();
        let start = last_start(&log);
        let line = start
            .lines()
            .find(|l| l.contains("no full resync"))
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: the restart does not say it resumed from the bitmaps:\n{start}"
                )
            });
        let (blocks, files) =
            rechecked(line).unwrap_or_else(|| panic!("round {round}: no block count in {line:?}"));
        for full in ["(full resync)", "shipping everything", "baseline"] {
            assert!(
                !start.contains(full),
                "round {round}: the restart fell back to a full resync:\n{start}"
            );
        }
        assert!(
            blocks < IMAGE / BLOCK,
            "round {round}: {blocks} blocks marked: the whole {}-block image",
            IMAGE / BLOCK
        );
        println!(
            "round {round}: killed after {delay:?} at replica epoch {applied}: \
             {blocks} blocks in {files} files rechecked"
        );
        blocks_total += blocks;
        epochs.push(applied);
    }
    // The last restart's daemon ships what the kills left.
    sync_file(&m.mnt("disk.img"));
    let fin = wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_replica_identical(&m, &sec, "disk.img");
    let log = m.log();
    assert_eq!(
        log.matches("no full resync").count(),
        ROUNDS,
        "one resume line per restart"
    );
    println!(
        "primary kill -9: {ROUNDS} rounds in {:.1} s, {blocks_total} blocks rechecked in all \
         (image {} blocks); replica epochs at the kills {epochs:?}, converged at {}",
        started.elapsed().as_secs_f64(),
        IMAGE / BLOCK,
        repl_counter(&fin, "last_applied_epoch")
    );
    assert!(
        epochs.windows(2).all(|w| w[1] >= w[0]),
        "the replica went back: {epochs:?}"
    );
    assert!(
        epochs.last() > epochs.first(),
        "no point was applied during the kill rounds: {epochs:?}"
    );
}

// ---------------------------------------------------------------------------
// 6. Identity: one primary per replica.

/// The datastore id in `BACKING/.hbrfs/format` ("... id=ID").
fn datastore_id(m: &Mount) -> String {
    let format = std::fs::read_to_string(m.back(".hbrfs/format")).expect("read format");
    format
        .split_whitespace()
        .find_map(|w| w.strip_prefix("id="))
        .unwrap_or_else(|| panic!("no id in {format:?}"))
        .to_string()
}

#[test]
fn secondary_refuses_a_second_primary_datastore_naming_both_and_the_first_keeps_replicating() {
    let (sec, m) = pair(&[]);
    write_ranges(&m.mnt("a.img"), &[(0, 4 * BLOCK)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let before = sec.applied_epoch();

    let other = primary_for(&sec, &sec.addr, &[]);
    write_ranges(&other.mnt("intruder.img"), &[(0, 2 * BLOCK)], BLOCK);
    let error = wait_last_error(&other, "refusing", Duration::from_secs(30));
    let (ours, theirs) = (datastore_id(&m), datastore_id(&other));
    assert_ne!(ours, theirs);
    assert!(
        error.contains(&ours) && error.contains(&theirs),
        "the refusal must name the paired datastore {ours} and the refused {theirs}: {error}"
    );
    println!("second primary refused: {error}");
    let s = primary_status(&other);
    assert_eq!(s["replication"]["connected"], false, "{s:#}");
    assert_eq!(repl_counter(&s, "last_applied_epoch"), 0, "{s:#}");

    // The refused primary's mount still works; the first one still ships.
    write_ranges(&other.mnt("intruder.img"), &[(4 * BLOCK, BLOCK)], BLOCK);
    write_ranges(&m.mnt("a.img"), &[(8 * BLOCK, 4 * BLOCK)], BLOCK);
    write_ranges(&m.mnt("b.img"), &[(0, BLOCK)], BLOCK);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert!(sec.applied_epoch() > before, "the first primary stopped");
    qemu_img_compare("raw", &m.back("a.img"), &sec.rep("a.img"));
    assert_trees_identical(&m, &sec);
    assert!(
        !sec.rep("intruder.img").exists(),
        "the refused datastore wrote to the replica"
    );
    let pair_record =
        std::fs::read_to_string(sec.replica.join(".hbrfs/pair")).expect("read the pair record");
    assert!(
        pair_record.contains(&format!("datastore={ours}")),
        "the pair changed: {pair_record}"
    );
}

// ---------------------------------------------------------------------------
// 8. Encryption and authentication on the wire.

/// Everything between the two sides is TLS: recognisable content written
/// to an image (incompressible, so zstd would pass it through unchanged)
/// and the image's name never appear in the bytes the primary sends,
/// though they do reach the replica.
#[test]
fn the_wire_is_encrypted_content_and_names_never_appear_on_it() {
    let sec = Secondary::start();
    let proxy = CuttingProxy::start(&sec.addr, true);
    let m = primary_for(&sec, &proxy.addr, &[]);
    let name = "quarterly-payroll-vm.img";
    let marker: Vec<u8> = pattern(4096, 99);
    let mut data = Vec::new();
    for _ in 0..64 {
        data.extend_from_slice(&marker);
        data.extend_from_slice(&pattern(60 * 1024, data.len() as u64));
    }
    std::fs::write(m.mnt(name), &data).unwrap();
    sync_file(&m.mnt(name));
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    assert_eq!(std::fs::read(sec.rep(name)).unwrap(), data, "the replica");
    let wire = proxy
        .state
        .upstream_bytes
        .as_ref()
        .expect("recording")
        .lock()
        .unwrap()
        .clone();
    assert!(
        wire.len() as u64 > data.len() as u64,
        "only {} bytes passed the proxy for {} bytes of data",
        wire.len(),
        data.len()
    );
    let contains = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        !contains(&marker[..64]),
        "image content in clear on the wire"
    );
    assert!(
        !contains(name.as_bytes()),
        "an image name in clear on the wire"
    );
    // What a capture does show: a TLS handshake, no HTTP/2 preface.
    assert_eq!(
        wire[0], 0x16,
        "the stream does not start with a TLS handshake"
    );
    assert!(!contains(b"PRI * HTTP/2.0"), "plaintext HTTP/2 on the wire");
}

/// A TLS client without the pair's certificate (here `openssl s_client`,
/// with no client certificate) is refused in the handshake: it never gets
/// to send a request, and nothing is written.
#[test]
fn a_tls_client_without_the_pairs_certificate_is_refused_in_the_handshake() {
    let sec = Secondary::start();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &sec.addr,
            "-servername",
            "hbrfs-secondary",
        ])
        .args(["-alpn", "h2", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            // An HTTP/2 preface and a Hello-sized request, to be refused.
            let mut stdin = child.stdin.take().expect("stdin");
            let _ = stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            drop(stdin);
            child.wait_with_output()
        })
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("alert certificate required"),
        "the handshake was not refused:\n{text}"
    );
    assert!(
        !sec.replica.join(".hbrfs/pair").exists(),
        "a client without the certificate paired the replica"
    );
    assert_eq!(sec.applied_epoch(), 0);
}
