//! `hbrfs status`: a primary answers through its control socket; a
//! secondary's status is read from its state folder and, when it serves,
//! asked of it over gRPC. `--watch` follows a primary's shipping.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::{Target, query, render, resolve_datastore, unexpected};
use crate::auth::AuthKey;
use crate::control::{Answer, Request, Role};
use crate::daemon;
use crate::error::{Error, Result};
use crate::ids::Epoch;
use crate::points::{PointsPaths, read_catalog};
use crate::replica::Applied;
use crate::replicate::{ReplicationReport, SecondaryCounters, ShipProgress};
use crate::state::{ReplicaPaths, STATE_DIR, StatePaths};

/// `status` of a secondary: its applied point, and its live counters when
/// a `hbrfs serve` answers for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct SecondaryStatus {
    /// Always [`Role::Secondary`].
    role: Role,
    /// The replica folder.
    replica: String,
    /// `yes`, or why there is no consistent point yet.
    consistent_point: String,
    /// The last point applied whole.
    last_applied_epoch: u64,
    /// Unix nanoseconds it was applied, 0 for none.
    applied_at_ns: u64,
    /// Whether a running secondary answered.
    serving: bool,
    /// The address the secondary last listened on, when it recorded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// The serving secondary's counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    counters: Option<SecondaryCounters>,
    /// The recovery points kept (`hbrfs points ls` lists them).
    points: PointsSummary,
}

/// The recovery points of a replica, in short.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct PointsSummary {
    /// How many are kept, the live replica included.
    kept: u64,
    /// When the oldest and the newest were applied (unix ns, 0 for none).
    oldest_at_ns: u64,
    newest_at_ns: u64,
    /// Undo bytes they hold.
    undo_bytes: u64,
}

impl PointsSummary {
    fn of(paths: &ReplicaPaths) -> Result<PointsSummary> {
        let points = read_catalog(&PointsPaths::new(paths.points()))?;
        Ok(PointsSummary {
            kept: points.len() as u64,
            oldest_at_ns: points.first().map_or(0, |p| p.at_ns),
            newest_at_ns: points.last().map_or(0, |p| p.at_ns),
            undo_bytes: points.iter().map(|p| p.undo_bytes).sum(),
        })
    }
}

/// Runs `hbrfs status [--watch]` for the datastore or replica `target` names.
pub(super) fn run(target: &Target, watch: bool) -> Result<()> {
    let dir = resolve_datastore(&target.datastore)?;
    if !StatePaths::of(&dir).format().exists() {
        render::record(&secondary(&dir)?, target.json);
        return Ok(());
    }
    if watch {
        return watch_primary(&dir);
    }
    render::print(&query(&dir, &Request::Status)?, target.json);
    Ok(())
}

/// A secondary's status: its applied point, and its counters when serving.
fn secondary(dir: &Path) -> Result<SecondaryStatus> {
    let paths = ReplicaPaths::of(dir);
    if !paths.dir.is_dir() {
        return Err(Error::Usage(format!(
            "{}: neither an hbrfs datastore nor a replica (no {STATE_DIR} folder)",
            dir.display(),
        )));
    }
    let Applied {
        epoch: Epoch(epoch),
        at_ns: at,
        ..
    } = Applied::read(&paths)?;
    let consistent = if epoch == 0 {
        "none yet: the first point (the baseline) has not been applied"
    } else {
        "yes"
    };
    let mut status = SecondaryStatus {
        role: Role::Secondary,
        replica: dir.display().to_string(),
        consistent_point: consistent.into(),
        last_applied_epoch: epoch,
        applied_at_ns: at,
        serving: false,
        listen: None,
        counters: None,
        points: PointsSummary::of(&paths)?,
    };
    if let Ok(addr) = std::fs::read_to_string(paths.listen()) {
        let addr = addr.trim();
        status.listen = Some(addr.to_string());
        let live = AuthKey::load(&daemon::default_key_path(dir))
            .and_then(|key| crate::replicate::remote_status(addr, &key));
        if let Ok(live) = live {
            status.serving = true;
            status.counters = Some(live);
        }
    }
    Ok(status)
}

/// What `status --check` found, as a monitor reads it from the exit code
/// (Nagios plugin convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Health {
    /// Exit 0: replicating, the replica younger than `--max-age`.
    Ok,
    /// Exit 1: the replica older than `--max-age`, or no point yet.
    Warning,
    /// Exit 2: stalled, not connected with an error, older than twice
    /// `--max-age`, or no daemon answers.
    Critical,
}

impl Health {
    /// The exit code.
    pub(super) fn code(self) -> i32 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Critical => "CRITICAL",
        }
    }
}

/// A ship making no progress for this long is stalled, whatever the
/// connection says: the failure contract notices a stall within 30 s.
const STALL_AFTER_S: f64 = 30.0;

/// Runs `hbrfs status --check`: prints one line and returns the health.
/// Every failure to find out is critical, so a broken check never passes.
pub(super) fn check(target: &Target, max_age: Duration) -> Health {
    let (health, line) = check_target(&target.datastore, max_age)
        .unwrap_or_else(|e| (Health::Critical, e.to_string()));
    println!("{}: {line}", health.label());
    health
}

fn check_target(given: &Path, max_age: Duration) -> Result<(Health, String)> {
    let dir = resolve_datastore(given)?;
    let paths = StatePaths::of(&dir);
    if !paths.format().exists() {
        let s = secondary(&dir)?;
        return Ok(match (s.serving, s.listen) {
            (true, Some(addr)) => (
                Health::Ok,
                format!(
                    "secondary serving on {addr}, epoch {} applied",
                    s.last_applied_epoch
                ),
            ),
            (_, addr) => (
                Health::Critical,
                format!(
                    "secondary {} is not serving (no answer at {})",
                    dir.display(),
                    addr.as_deref().unwrap_or("any recorded address")
                ),
            ),
        });
    }
    let Some(answer) = crate::control::ask(&paths.socket(), &Request::Status)? else {
        return Ok((
            Health::Critical,
            format!("no hbrfs daemon answers for {}", dir.display()),
        ));
    };
    let Answer::Status(status) = answer else {
        return Err(unexpected(&dir));
    };
    Ok(match status.replication {
        Some(r) => judge(&r, max_age),
        None => (
            Health::Critical,
            format!(
                "{} does not replicate (mounted without --replicate-to)",
                dir.display()
            ),
        ),
    })
}

/// What a primary replicates to, as a message names it: "secondary" (as
/// older daemons report no target), or the object store's address.
fn target_name(r: &ReplicationReport) -> &str {
    if r.target.starts_with("s3://") {
        &r.target
    } else {
        "secondary"
    }
}

/// Judges a primary's replication against `max_age`: stalled or
/// disconnected with an error is critical, and so is a replica older than
/// twice `max_age`; older than `max_age`, or no point applied yet, warns.
fn judge(r: &ReplicationReport, max_age: Duration) -> (Health, String) {
    let max = max_age.as_secs_f64();
    let silent = format!("no answer from the {}", target_name(r));
    let cause = if r.last_error.is_empty() {
        &silent
    } else {
        &r.last_error
    };
    let stalled = || match r.seconds_since_progress {
        Some(s) => format!("stalled for {s:.0} s: {cause}"),
        None => format!("stalled, no progress yet: {cause}"),
    };
    let shipping_stuck =
        r.shipping.is_some() && r.seconds_since_progress.is_some_and(|s| s > STALL_AFTER_S);
    if (!r.connected && !r.last_error.is_empty()) || shipping_stuck {
        return (Health::Critical, stalled());
    }
    let Some(age) = r.replica_age_ms.map(|ms| ms as f64 / 1e3) else {
        let why = if r.connected {
            "connected, no point applied yet (the baseline is shipping)".to_string()
        } else {
            format!("not connected to the {} yet", target_name(r))
        };
        return (Health::Warning, why);
    };
    let line = format!(
        "replica age {age:.1} s (max {max:.0} s), epoch {} applied | replica_age={age:.3}s;{max};{}",
        r.last_applied_epoch,
        2.0 * max
    );
    let health = if age > 2.0 * max {
        Health::Critical
    } else if age > max {
        Health::Warning
    } else {
        Health::Ok
    };
    (health, line)
}

/// Follows a primary's replication: a progress bar per point shipped.
fn watch_primary(dir: &Path) -> Result<()> {
    let mut watch = Watch::default();
    loop {
        let Answer::Status(status) = query(dir, &Request::Status)? else {
            return Err(unexpected(dir));
        };
        let Some(r) = status.replication else {
            return Err(Error::Usage(format!(
                "{}: this datastore does not replicate",
                dir.display()
            )));
        };
        watch.update(&r);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What `--watch` has shown so far, so it prints only what changed.
#[derive(Default)]
struct Watch {
    /// The bar of the point shipping now.
    bar: Option<ProgressBar>,
    /// The last applied epoch seen.
    last_applied: Option<u64>,
    /// The last connection error printed.
    last_error: String,
}

impl Watch {
    /// Shows one poll of the replicator's counters `r`.
    fn update(&mut self, r: &ReplicationReport) {
        let applied = Some(r.last_applied_epoch);
        match &r.shipping {
            None => {
                if let Some(b) = self.bar.take() {
                    b.finish();
                }
                if applied != self.last_applied {
                    let age = r
                        .replica_age_ms
                        .map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
                    println!(
                        "point {} applied at the secondary (replica age {age})",
                        r.last_applied_epoch
                    );
                }
            }
            Some(p) => self.progress(p),
        }
        self.last_applied = applied;
        let error = r.last_error.clone();
        if !r.connected && !error.is_empty() && error != self.last_error {
            eprintln!("not connected: {error}");
        }
        self.last_error = error;
    }

    /// Moves the bar to the ship in progress `p`, making it if new.
    fn progress(&mut self, p: &ShipProgress) {
        let total = p.blocks_total;
        let b = self.bar.get_or_insert_with(|| {
            let style =
                ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} blocks  {msg}")
                    .expect("literal template")
                    .progress_chars("=> ");
            let b = ProgressBar::new(total).with_style(style);
            let what = if p.baseline { "baseline" } else { "point" };
            b.set_prefix(what);
            b
        });
        b.set_length(total);
        b.set_position(p.blocks_done);
        let rate = p.wire_bytes_per_s as u64;
        let eta = p.eta_s.map_or("-".into(), |s| format!("{s:.0} s"));
        b.set_message(format!("{}/s  ETA {eta}", render::bytes(rate)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicate::ReplStats;

    fn report(
        connected: bool,
        age_s: Option<u64>,
        since: Option<f64>,
        error: &str,
    ) -> ReplicationReport {
        let mut r = ReplStats::default().report();
        r.connected = connected;
        r.replica_age_ms = age_s.map(|s| s * 1000);
        r.seconds_since_progress = since;
        r.last_error = error.into();
        r
    }

    #[test]
    fn check_thresholds() {
        let max = Duration::from_secs(30);
        let judged = |r: &ReplicationReport| judge(r, max);
        assert_eq!(judged(&report(true, Some(3), Some(1.0), "")).0, Health::Ok);
        assert_eq!(judged(&report(true, Some(30), Some(1.0), "")).0, Health::Ok);
        assert_eq!(
            judged(&report(true, Some(31), Some(1.0), "")).0,
            Health::Warning
        );
        assert_eq!(
            judged(&report(true, Some(61), Some(1.0), "")).0,
            Health::Critical
        );
        // An old error on a connection that works again does not count.
        assert_eq!(
            judged(&report(true, Some(3), Some(1.0), "old")).0,
            Health::Ok
        );
        assert_eq!(judged(&report(false, None, None, "")).0, Health::Warning);
        assert_eq!(
            judged(&report(true, None, Some(1.0), "")).0,
            Health::Warning
        );
        let (h, line) = judged(&report(false, Some(3), Some(12.4), "connecting: refused"));
        assert_eq!(h, Health::Critical);
        assert_eq!(line, "stalled for 12 s: connecting: refused");
        let mut stuck = report(true, Some(3), Some(31.0), "");
        stuck.shipping = Some(ShipProgress {
            baseline: false,
            blocks_done: 1,
            blocks_total: 2,
            seconds: 40.0,
            wire_bytes_per_s: 0.0,
            eta_s: None,
        });
        let (h, line) = judged(&stuck);
        assert_eq!(h, Health::Critical);
        assert_eq!(line, "stalled for 31 s: no answer from the secondary");
        stuck.seconds_since_progress = Some(2.0);
        assert_eq!(judged(&stuck).0, Health::Ok);
        assert_eq!(
            [Health::Ok, Health::Warning, Health::Critical].map(Health::code),
            [0, 1, 2]
        );
    }
}
