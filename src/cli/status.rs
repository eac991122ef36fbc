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
