//! Visible health (issue 9, item 7): the `--metrics` endpoints of a live
//! primary and secondary scraped over loopback, `hbrfs status --check`'s
//! exit codes for a healthy pair and a pair whose secondary is gone, and
//! the one log line per point shipped or applied.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::{Mount, hbrfs, json_u64, path_str, pattern, sync_file};
use crate::replication::{APPLY_TIMEOUT, MIB, Secondary, Until, primary_for, wait_applied};

/// `--metrics` on a free port of loopback; the daemon logs the one it got.
const METRICS_ANY: [&str; 2] = ["--metrics", "127.0.0.1:0"];

/// The address the daemon whose `log` this is serves metrics on (the
/// newest, after restarts).
fn metrics_addr(log: &str) -> String {
    let tail = log
        .rsplit_once("metrics at http://")
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .1;
    tail.split(['/', ' ', '\n']).next().unwrap().to_string()
}

/// Scrapes `http://addr/metrics` with a plain HTTP/1.1 GET; returns every
/// sample by its name with labels (`hbrfs_errors_total{kind="io"}`).
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("read the metrics");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape of {addr}: {head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            let v = value.parse().unwrap_or_else(|e| panic!("{l}: {e}"));
            (name.to_string(), v)
        })
        .collect()
}

/// One sample; panics naming what the scrape held instead.
fn sample(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{m:#?}"))
}

/// `hbrfs status --check -d dir`: its exit code and its output.
fn check(dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(hbrfs())
        .args(["status", "--check", "--max-age", "30s", "-d", path_str(dir)])
        .stdin(Stdio::null())
        .output()
        .expect("run hbrfs status --check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 1, "--check prints one line: {text:?}");
    (out.status.code().expect("an exit code"), text)
}

/// A monitor sees a stall: `status --check -d dir` is critical, says
/// `stalled for N s:` and names `cause`.
pub(crate) fn assert_stalled(dir: &std::path::Path, cause: &str) {
    let (code, line) = check(dir);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("CRITICAL: stalled for ") && line.contains(cause),
        "{line}"
    );
}

/// Polls `status --check -d dir` until it exits `code` with `needle` in
/// its line; returns the line.
fn wait_check(dir: &std::path::Path, code: i32, needle: &str, m: &Mount) -> String {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let (c, line) = check(dir);
        if c == code && line.contains(needle) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "status --check never exited {code} with {needle:?}; last: {c} {line}\n--- log ---\n{}",
            m.log()
        );
        sleep(Duration::from_millis(200));
    }
}

/// Writes `len` bytes of `pattern(seed)` to `rel` on the mount and syncs.
fn write_synced(m: &Mount, rel: &str, len: u64, seed: u64) {
    std::fs::write(m.mnt(rel), pattern(len as usize, seed)).expect("write through the mount");
    sync_file(&m.mnt(rel));
}

#[test]
fn metrics_of_a_live_pair_move_consistently_and_every_point_logs_one_line() {
    let sec = Secondary::start_with_args(&METRICS_ANY);
    let m = primary_for(&sec, &sec.addr, &METRICS_ANY);
    write_synced(&m, "a.img", 4 * MIB, 1);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    // The same content again: the secondary holds it, nothing is sent.
    write_synced(&m, "b.img", 4 * MIB, 1);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let p = scrape(&metrics_addr(&m.log()));
    let s = scrape(&metrics_addr(&sec.log()));

    let shipped = sample(&p, "hbrfs_points_shipped_total");
    assert!(shipped >= 2.0, "two points at least: {p:#?}");
    assert_eq!(shipped, sample(&s, "hbrfs_points_applied_total"));
    assert!(sample(&p, "hbrfs_points_cut_total") >= shipped);
    assert_eq!(
        sample(&p, "hbrfs_blocks_sent_total"),
        sample(&s, "hbrfs_blocks_received_total")
    );
    assert_eq!(
        sample(&p, "hbrfs_bytes_compressed_total"),
        sample(&s, "hbrfs_bytes_received_total")
    );
    assert!(sample(&p, "hbrfs_bytes_sent_total") >= (4 * MIB) as f64);
    assert!(sample(&p, "hbrfs_bytes_offered_total") >= (8 * MIB) as f64);
    assert!(
        sample(&p, "hbrfs_bytes_have_total") >= (4 * MIB) as f64,
        "dedup: {p:#?}"
    );
    assert!(sample(&p, "hbrfs_dedup_ratio") > 0.0);
    assert!(sample(&p, "hbrfs_compression_ratio") > 0.0);
    assert!(sample(&p, "hbrfs_replica_age_seconds") < 60.0);
    assert_eq!(sample(&p, "hbrfs_connected"), 1.0);
    assert!(sample(&p, "hbrfs_seconds_since_progress") < 60.0);
    assert!(sample(&p, "hbrfs_cut_stall_seconds_count") >= shipped);
    assert_eq!(sample(&p, r#"hbrfs_errors_total{kind="refused"}"#), 0.0);
    assert_eq!(
        sample(&s, "hbrfs_last_applied_epoch"),
        sample(&p, "hbrfs_last_applied_epoch")
    );
    assert!(sample(&s, "hbrfs_seconds_since_apply") < 60.0);
    assert_eq!(sample(&s, "hbrfs_apply_pending"), 0.0);
    // `status` shows the same counter as the endpoint.
    assert_eq!(
        json_u64(&sec.status()["counters"]["points_applied"]) as f64,
        shipped
    );

    // One info line per point on each side, with its epoch and numbers.
    let (plog, slog) = (m.log(), sec.log());
    let shipped_lines: Vec<&str> = plog
        .lines()
        .filter(|l| l.contains(" shipped and applied in "))
        .collect();
    let applied_lines: Vec<&str> = slog.lines().filter(|l| l.contains(" applied: ")).collect();
    assert_eq!(shipped_lines.len() as f64, shipped, "{plog}");
    assert_eq!(applied_lines.len() as f64, shipped, "{slog}");
    for l in shipped_lines.iter().chain(&applied_lines) {
        assert!(
            l.contains("INFO")
                && l.contains("epoch ")
                && l.contains(" blocks")
                && l.contains(" bytes"),
            "{l}"
        );
    }
}

#[test]
fn status_check_is_ok_when_healthy_and_critical_with_the_cause_when_the_secondary_is_gone() {
    let mut sec = Secondary::start();
    let m = primary_for(&sec, &sec.addr, &METRICS_ANY);
    write_synced(&m, "a.img", MIB, 2);
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    let (code, line) = check(&m.backing);
    assert_eq!(code, 0, "{line}");
    assert!(line.starts_with("OK: replica age "), "{line}");
    let (code, line) = check(&sec.replica);
    assert_eq!(
        (code, line.starts_with("OK: secondary serving")),
        (0, true),
        "{line}"
    );

    sec.kill9();
    write_synced(&m, "a.img", MIB, 3);
    let line = wait_check(&m.backing, 2, "CRITICAL: stalled for ", &m);
    assert!(line.contains("connect"), "the cause is named: {line}");
    let (code, line) = check(&sec.replica);
    assert_eq!((code, line.contains("not serving")), (2, true), "{line}");
    let p = scrape(&metrics_addr(&m.log()));
    assert!(
        sample(&p, r#"hbrfs_errors_total{kind="remote"}"#) > 0.0,
        "{p:#?}"
    );
    assert_eq!(sample(&p, "hbrfs_connected"), 0.0);
    assert!(
        m.log().contains("WARN") && m.log().contains("; retrying"),
        "retries warn"
    );

    sec.restart();
    wait_applied(&m, &sec, Until::CaughtUp, APPLY_TIMEOUT);
    wait_check(&m.backing, 0, "OK: ", &m);
}
