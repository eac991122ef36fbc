//! POSIX conformance of the passthrough: the pjdfstest suite (the Rust port,
//! crate `pjdfstest` 0.2.2) run against a live hbrfs mount.
//!
//! The test fails on any failing case that `KNOWN_GAPS.md` (next to this
//! file) does not list, so a regression shows up as a named case while every
//! accepted gap stays documented with its reason. Gaps that pass again are
//! printed so the list can be pruned, but do not fail the test. A skip
//! other than the few every Linux run has (`expected_skip`) fails it too:
//! coverage must not shrink silently.
//!
//! Needs root (pjdfstest's permission cases `seteuid()` to two dummy users)
//! and the tool installed by `contrib/ci/install-pjdfstest.sh`, which also
//! creates those users. Without the tool the test fails rather than skips: a
//! conformance check that silently does not run is worse than none.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::harness::Mount;

/// The whole suite takes ~3 s on ext4; a run this long means the mount hangs.
const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Where `install-pjdfstest.sh` puts the tool, unless `PJDFSTEST` names the
/// binary or `PJDFSTEST_ROOT` the prefix (the script honours the latter too).
fn pjdfstest_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("PJDFSTEST") {
        return PathBuf::from(bin);
    }
    let root = std::env::var_os("PJDFSTEST_ROOT").unwrap_or_else(|| "/opt/pjdfstest".into());
    Path::new(&root).join("bin/pjdfstest")
}

/// A scratch directory outside the mount, removed on drop: it holds the
/// suite's output and serves as the "secondary file system" of the EXDEV
/// cases (any directory outside the FUSE mount is another file system).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("hbrfs-posix-{}-{}", std::process::id(), nanos));
        fs::create_dir_all(dir.join("secondary")).expect("create scratch dir");
        // The EXDEV cases run as root, but keep it reachable like the rest.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod scratch");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The case names listed in KNOWN_GAPS.md: every line of the form
/// ``- `syscall::case` reason…`` (the first backquoted word of a list item).
fn known_gaps(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("- `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_string())
        .filter(|name| name.contains("::"))
        .collect()
}

/// Outcome of one case, as pjdfstest prints it after the case name.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

/// Per-case outcomes and, for failures and skips, the indented lines
/// pjdfstest prints under the case (the assertion that failed, or why the
/// case was skipped).
struct Report {
    outcomes: BTreeMap<String, Outcome>,
    details: BTreeMap<String, String>,
    summary: Option<String>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequence: ESC [ params final-byte(@..~)
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_report(output: &str) -> Report {
    let mut report = Report {
        outcomes: BTreeMap::new(),
        details: BTreeMap::new(),
        summary: None,
    };
    let mut explained: Option<String> = None;
    for line in strip_ansi(output).lines() {
        if line.starts_with('\t') || line.starts_with(' ') {
            if let Some(name) = &explained {
                let d = report.details.entry(name.clone()).or_default();
                d.push_str(line.trim());
                d.push('\n');
            }
            continue;
        }
        if line.starts_with("Summary:") {
            report.summary = Some(line.to_string());
            continue;
        }
        let Some((name, status)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let outcome = match status.trim() {
            // "failed as expected" cannot occur: the config lists no
            // expected failures, KNOWN_GAPS.md does that job.
            "ok" | "failed as expected" => Outcome::Ok,
            "FAILED" | "PASSED UNEXPECTEDLY" => Outcome::Failed,
            "skipped" => Outcome::Skipped,
            _ => continue,
        };
        explained = (outcome != Outcome::Ok).then(|| name.to_string());
        report.outcomes.insert(name.to_string(), outcome);
    }
    report
}

/// Cases skipped on every Linux run, as KNOWN_GAPS.md explains: the EROFS
/// cases need `allow_remount`, and `link_count_max` cannot learn LINK_MAX
/// through FUSE. Any other skip means lost coverage (a guard tripped over
/// the mount, say) and fails the test like a failure would.
fn expected_skip(name: &str) -> bool {
    name.contains("::erofs_") || name == "link::link_count_max"
}

/// The dummy users must be able to reach the mount: give search permission
/// (only that) on every ancestor that lacks it, e.g. a 0700 temp dir.
fn make_reachable(mountpoint: &Path) {
    for dir in mountpoint.ancestors() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode((mode & 0o7777) | 0o055))
                .unwrap_or_else(|e| panic!("chmod o+rx {}: {e}", dir.display()));
        }
    }
}

#[test]
fn pjdfstest_conformance() {
    let bin = pjdfstest_binary();
    assert!(
        bin.is_file(),
        "pjdfstest not found at {}: run contrib/ci/install-pjdfstest.sh (as root)",
        bin.display()
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the POSIX conformance test must run as root: pjdfstest switches to \
         dummy users for its permission cases and skips them otherwise"
    );
    let config = manifest_path("mount-tests/pjdfstest.toml");
    let gaps_file = manifest_path("mount-tests/KNOWN_GAPS.md");
    let gaps_text = fs::read_to_string(&gaps_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", gaps_file.display()));
    let known = known_gaps(&gaps_text);

    let scratch = Scratch::new();
    let mount = Mount::start(&[]);
    make_reachable(&mount.mountpoint);

    let out_path = scratch.0.join("pjdfstest.out");
    let out = fs::File::create(&out_path).expect("create output file");
    let err = out.try_clone().expect("dup output file");
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&mount.mountpoint)
        .arg("-s")
        .arg(scratch.0.join("secondary"))
        .env("NO_COLOR", "1")
        // The failing assertion is what matters; pjdfstest's own backtraces
        // would bury it.
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    // Poll, so a hung mount fails the test instead of hanging CI.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for pjdfstest") {
            break status;
        }
        if started.elapsed() > SUITE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pjdfstest still running after {SUITE_TIMEOUT:?}; output so far:\n{}\n\
                 hbrfs log:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                mount.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = fs::read_to_string(&out_path).expect("read pjdfstest output");
    let report = parse_report(&output);
    let Some(summary) = &report.summary else {
        panic!(
            "pjdfstest exited ({status}) without a summary:\n{output}\nhbrfs log:\n{}",
            mount.log()
        );
    };
    eprintln!("pjdfstest on hbrfs: {summary} ({:.1?})", started.elapsed());

    let new: Vec<&String> = report
        .outcomes
        .iter()
        .filter(|(name, o)| **o == Outcome::Failed && !known.contains(*name))
        .map(|(name, _)| name)
        .collect();
    let fixed: Vec<&String> = known
        .iter()
        .filter(|n| report.outcomes.get(*n) == Some(&Outcome::Ok))
        .collect();
    if !fixed.is_empty() {
        eprintln!("known gaps that pass now (remove them from KNOWN_GAPS.md): {fixed:?}");
    }
    let unknown: Vec<&String> = known
        .iter()
        .filter(|n| !report.outcomes.contains_key(*n))
        .collect();
    if !unknown.is_empty() {
        eprintln!("KNOWN_GAPS.md names cases pjdfstest did not run: {unknown:?}");
    }

    let skipped: Vec<&String> = report
        .outcomes
        .iter()
        .filter(|(name, o)| **o == Outcome::Skipped && !expected_skip(name))
        .map(|(name, _)| name)
        .collect();

    if !new.is_empty() || !skipped.is_empty() {
        let mut msg = format!(
            "{} pjdfstest case(s) failed on hbrfs that KNOWN_GAPS.md does not list \
             (fix them, or document them there with the reason):\n",
            new.len()
        );
        if !skipped.is_empty() {
            msg.push_str(&format!(
                "and {} case(s) were skipped that run on ext4: {skipped:?}\n",
                skipped.len()
            ));
        }
        for name in new.iter().chain(&skipped) {
            msg.push_str(&format!("\n{name}\n"));
            let detail = report.details.get(*name).map(String::as_str).unwrap_or("");
            for line in detail.lines() {
                msg.push_str(&format!("    {line}\n"));
            }
        }
        msg.push_str(&format!("\n{summary}\nhbrfs log:\n{}", mount.log()));
        panic!("{msg}");
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn parses_outcomes_details_and_gaps() {
        let out = "open::a::regular                 ok\n\
                   open::b                          FAILED\n\
                   \tassertion `left == right` failed\n\
                   \t  left: Err(EACCES)\n\
                   chmod::erofs_named               skipped\n\
                   \tRemounts are not allowed\n\
                   \n\
                   Summary: 1 failed, 1 skipped, 1 passed, 0 expected failures, 3 total\n";
        let r = parse_report(out);
        assert_eq!(r.outcomes["open::a::regular"], Outcome::Ok);
        assert_eq!(r.outcomes["open::b"], Outcome::Failed);
        assert_eq!(r.outcomes["chmod::erofs_named"], Outcome::Skipped);
        assert!(r.details["open::b"].contains("EACCES"));
        assert!(r.details["chmod::erofs_named"].contains("Remounts"));
        assert!(!r.details.contains_key("open::a::regular"));
        assert!(expected_skip("chmod::erofs_named") && !expected_skip("open::a::regular"));
        assert!(r.summary.unwrap().starts_with("Summary: 1 failed"));

        let gaps =
            known_gaps("# x\n- `open::b` reason\n  - `a::b::c`: why\n- not `x::y`\n- `word`\n");
        let want: BTreeSet<String> = ["a::b::c", "open::b"].map(String::from).into();
        assert_eq!(gaps, want);
        assert_eq!(strip_ansi("\x1b[31mFAILED\x1b[0m"), "FAILED");
    }
}
