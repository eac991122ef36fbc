//! The replicator's counters and their typed report for `hbrfs status`.
//!
//! Counters are atomics bumped on the hot path of a ship; the report reads
//! them once and derives the ratios, so status never waits for a ship.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCounters, ErrorCounts, ErrorKind};
use crate::ids::Epoch;
use crate::object::s3::{REQUESTS, RequestCounts};
use crate::state::now_ns;

/// Counters for `hbrfs status`, shared by the replicator and the control
/// socket.
#[derive(Debug, Default)]
pub struct ReplStats {
    /// Where points go, as `status` names it (set once at start).
    pub(super) target: std::sync::OnceLock<String>,
    pub(super) connected: AtomicBool,
    pub(super) last_applied: AtomicU64,
    /// When the last applied point was cut: the replica's age is measured
    /// from here.
    pub(super) last_applied_cut_ns: AtomicU64,
    pub(super) epochs_shipped: AtomicU64,
    /// Points cut (a held point shipped again is not a new cut).
    pub(super) points_cut: AtomicU64,
    /// Ships of a held point again after its stream broke.
    pub(super) retries: AtomicU64,
    pub(super) blocks_offered: AtomicU64,
    pub(super) blocks_zero: AtomicU64,
    /// Bytes of the blocks offered, and of those that were zero.
    pub(super) bytes_offered: AtomicU64,
    pub(super) bytes_zero: AtomicU64,
    pub(super) blocks_sent: AtomicU64,
    /// Blocks sent raw: the probe found them incompressible.
    pub(super) blocks_raw: AtomicU64,
    pub(super) raw_bytes_sent: AtomicU64,
    pub(super) compressed_bytes_sent: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    last_error: Mutex<String>,
    /// Every failure, by kind.
    errors: ErrorCounters,
    /// `--max-rate`, 0 for none.
    pub(super) max_rate: AtomicU64,
    /// The ship in progress: blocks to offer, blocks offered so far, when
    /// it started (0 when none), and whether it is a full baseline.
    pub(super) ship_total: AtomicU64,
    pub(super) ship_done: AtomicU64,
    pub(super) ship_started_ns: AtomicU64,
    pub(super) ship_wire_start: AtomicU64,
    pub(super) baseline: AtomicBool,
    /// When the secondary last answered or took a message (0 before).
    pub(super) last_progress_ns: AtomicU64,
    /// What the secondary refused to do in applied points (a device node
    /// without `--allow-devices`, an owner it may not set), and the last.
    secondary_refusals: AtomicU64,
    last_secondary_refusal: Mutex<String>,
}

/// What `hbrfs status` shows of the replicator: the counters with the
/// derived ratios. The field names are the JSON the CLI and scripts read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicationReport {
    /// Where points go: `secondary ADDR` or `s3://BUCKET/PREFIX`.
    #[serde(default)]
    pub target: String,
    /// Whether a stream to the secondary (or the object store) is up.
    pub connected: bool,
    /// The newest epoch the secondary applied.
    pub last_applied_epoch: u64,
    /// When that point was cut (ns since the epoch), 0 before the first.
    pub last_applied_cut_ns: u64,
    /// How far the replica lags the primary; null before the first point.
    pub replica_age_ms: Option<u64>,
    /// Points applied since the daemon started.
    pub epochs_shipped: u64,
    /// Points cut since the daemon started.
    pub points_cut: u64,
    /// Times a point was shipped again after its stream broke.
    pub retries: u64,
    /// Block hashes offered.
    pub blocks_offered: u64,
    /// Offered blocks that were all zeros (sent as markers).
    pub blocks_zero: u64,
    /// Blocks the secondary wanted and got.
    pub blocks_sent: u64,
    /// Of those, blocks sent raw (in a zstd frame of raw blocks): the
    /// probe found them incompressible, so no compression was tried.
    #[serde(default)]
    pub blocks_raw: u64,
    /// Non-zero blocks the secondary already held.
    pub blocks_have: u64,
    /// Share of non-zero offered blocks that did not have to be sent.
    pub dedup_ratio: f64,
    /// Bytes of the blocks offered.
    pub bytes_offered: u64,
    /// Bytes of the offered blocks that were all zeros.
    pub bytes_zero: u64,
    /// Bytes of the non-zero offered blocks the secondary already held.
    pub bytes_have: u64,
    /// Uncompressed bytes of the blocks sent.
    pub raw_bytes_sent: u64,
    /// Compressed bytes of the blocks sent.
    pub compressed_bytes_sent: u64,
    /// raw / compressed, 0 before any block.
    pub compression_ratio: f64,
    /// Every byte put on the wire.
    pub wire_bytes: u64,
    /// `--max-rate`, null when unlimited.
    pub max_rate_bytes_per_s: Option<u64>,
    /// The ship in progress, null when nothing ships.
    pub shipping: Option<ShipProgress>,
    /// The last failure, empty when none.
    pub last_error: String,
    /// Failures since the daemon started, by kind.
    pub errors: ErrorCounts,
    /// When the secondary last answered or took a message on the
    /// replication channel (ns since the epoch), 0 before the first.
    pub last_progress_ns: u64,
    /// Seconds since then, null before the first: with `last_error`, how
    /// long replication has been stuck and why.
    pub seconds_since_progress: Option<f64>,
    /// Things the secondary refused to do in points it applied (they
    /// applied without them), since the daemon started.
    pub secondary_refusals: u64,
    /// The last of them, empty when none.
    pub last_secondary_refusal: String,
    /// Requests to the object store (all zero with a secondary).
    #[serde(default)]
    pub object_requests: RequestCounts,
}

/// The ship in progress, so an operator can tell a long baseline from a
/// stuck stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShipProgress {
    /// Whether the point is a full baseline (the replica held nothing).
    pub baseline: bool,
    /// Blocks offered so far.
    pub blocks_done: u64,
    /// Blocks the point holds.
    pub blocks_total: u64,
    /// Seconds since the ship started.
    pub seconds: f64,
    /// Wire rate of this ship.
    pub wire_bytes_per_s: f64,
    /// Estimated seconds left; null until a block is done.
    pub eta_s: Option<f64>,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl ReplStats {
    /// The counters, with the derived ratios.
    pub fn report(&self) -> ReplicationReport {
        let offered = load(&self.blocks_offered);
        let nonzero = offered.saturating_sub(load(&self.blocks_zero));
        let sent = load(&self.blocks_sent);
        let cut = load(&self.last_applied_cut_ns);
        let progress = load(&self.last_progress_ns);
        let (raw, compressed) = (
            load(&self.raw_bytes_sent),
            load(&self.compressed_bytes_sent),
        );
        let (bytes_offered, bytes_zero) = (load(&self.bytes_offered), load(&self.bytes_zero));
        ReplicationReport {
            target: self.target.get().cloned().unwrap_or_default(),
            connected: self.connected.load(Ordering::Relaxed),
            last_applied_epoch: load(&self.last_applied),
            last_applied_cut_ns: cut,
            replica_age_ms: (cut != 0).then(|| now_ns().saturating_sub(cut) / 1_000_000),
            epochs_shipped: load(&self.epochs_shipped),
            points_cut: load(&self.points_cut),
            retries: load(&self.retries),
            blocks_offered: offered,
            blocks_zero: load(&self.blocks_zero),
            blocks_sent: sent,
            blocks_raw: load(&self.blocks_raw),
            blocks_have: nonzero.saturating_sub(sent),
            dedup_ratio: if nonzero == 0 {
                0.0
            } else {
                (nonzero - sent) as f64 / nonzero as f64
            },
            bytes_offered,
            bytes_zero,
            bytes_have: bytes_offered.saturating_sub(bytes_zero).saturating_sub(raw),
            raw_bytes_sent: raw,
            compressed_bytes_sent: compressed,
            compression_ratio: ratio(raw, compressed),
            wire_bytes: load(&self.wire_bytes),
            max_rate_bytes_per_s: Some(load(&self.max_rate)).filter(|&r| r != 0),
            shipping: self.progress(),
            last_error: self.last_error.lock().expect("error lock").clone(),
            errors: self.errors.report(),
            last_progress_ns: progress,
            seconds_since_progress: (progress != 0)
                .then(|| now_ns().saturating_sub(progress) as f64 / 1e9),
            secondary_refusals: load(&self.secondary_refusals),
            last_secondary_refusal: self
                .last_secondary_refusal
                .lock()
                .expect("refusal lock")
                .clone(),
            object_requests: REQUESTS.report(),
        }
    }

    /// The ship in progress: blocks done of total, wire rate, and an
    /// estimate of the time left; `None` when nothing ships.
    fn progress(&self) -> Option<ShipProgress> {
        let started = load(&self.ship_started_ns);
        if started == 0 {
            return None;
        }
        let secs = now_ns().saturating_sub(started) as f64 / 1e9;
        let (done, total) = (load(&self.ship_done), load(&self.ship_total));
        let rate = load(&self.wire_bytes).saturating_sub(load(&self.ship_wire_start)) as f64
            / secs.max(1e-3);
        let eta = (done > 0).then(|| secs * (total.saturating_sub(done)) as f64 / done as f64);
        Some(ShipProgress {
            baseline: self.baseline.load(Ordering::Relaxed),
            blocks_done: done,
            blocks_total: total,
            seconds: secs,
            wire_bytes_per_s: rate,
            eta_s: eta,
        })
    }

    /// Records progress: the secondary answered, or the stream took a
    /// message.
    pub(super) fn progressed(&self) {
        self.last_progress_ns.store(now_ns(), Ordering::Relaxed);
    }

    /// Records what the secondary refused to do in the applied `epoch`:
    /// logged as errors and shown by `status`.
    pub(super) fn secondary_refused(&self, epoch: u64, refusals: &[String]) {
        for r in refusals {
            log::error!("epoch {epoch}: the secondary refused: {r}");
        }
        if let Some(last) = refusals.last() {
            self.secondary_refusals
                .fetch_add(refusals.len() as u64, Ordering::Relaxed);
            *self.last_secondary_refusal.lock().expect("refusal lock") = last.clone();
        }
    }

    /// Records a failure: the stream is down and `status` says why. A
    /// refusal is an error (that point is never sent again as it was);
    /// anything else is retried, so it warns.
    pub(super) fn fail(&self, e: &Error) {
        if e.kind() == ErrorKind::Refused {
            log::error!("replication: {e}; the point is folded into the next cut");
        } else {
            log::warn!("replication: {e}; retrying");
        }
        self.errors.count(e.kind());
        self.connected.store(false, Ordering::Relaxed);
        *self.last_error.lock().expect("error lock") = e.to_string();
    }

    /// Logs the one info line of a point applied at the secondary, with
    /// what its ship added to the counters since `before`.
    pub(super) fn log_shipped(&self, epoch: Epoch, before: &ReplicationReport, took: Duration) {
        let now = self.report();
        let offered = now.blocks_offered - before.blocks_offered;
        let zero = now.blocks_zero - before.blocks_zero;
        let sent = now.blocks_sent - before.blocks_sent;
        log::info!(
            "epoch {epoch} shipped and applied in {:.3} s: {offered} blocks offered ({sent} sent, {} held by \
             the secondary, {zero} zero), {} bytes of data as {} bytes on the wire",
            took.as_secs_f64(),
            offered.saturating_sub(zero).saturating_sub(sent),
            now.raw_bytes_sent - before.raw_bytes_sent,
            now.wire_bytes - before.wire_bytes,
        );
    }

    /// Starts the progress of a ship of `total` blocks, `done` of them
    /// already held by the secondary from a broken stream.
    pub(super) fn start_ship(&self, total: u64, done: u64, baseline: bool) {
        self.ship_total.store(total, Ordering::Relaxed);
        self.ship_done.store(done, Ordering::Relaxed);
        self.ship_wire_start
            .store(load(&self.wire_bytes), Ordering::Relaxed);
        self.baseline.store(baseline, Ordering::Relaxed);
        self.ship_started_ns.store(now_ns(), Ordering::Relaxed);
    }

    /// Ends the progress of the ship (whether it succeeded or not).
    pub(super) fn end_ship(&self) {
        self.ship_started_ns.store(0, Ordering::Relaxed);
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_keeps_the_json_shape() {
        let stats = ReplStats::default();
        let v = serde_json::to_value(stats.report()).unwrap();
        assert!(v["replica_age_ms"].is_null());
        assert!(v["max_rate_bytes_per_s"].is_null());
        assert!(v["shipping"].is_null());
        assert_eq!(v["dedup_ratio"], 0.0);
        assert!(v["seconds_since_progress"].is_null());
        assert_eq!(v["last_progress_ns"], 0);
        assert_eq!(v.as_object().unwrap().len(), 30);
        assert_eq!(v["errors"]["remote"], 0);
        stats.secondary_refused(3, &["a".into(), "b".into()]);
        let r = stats.report();
        assert_eq!(
            (r.secondary_refusals, &r.last_secondary_refusal[..]),
            (2, "b")
        );
        stats.start_ship(10, 2, true);
        stats.max_rate.store(5, Ordering::Relaxed);
        let v = serde_json::to_value(stats.report()).unwrap();
        assert_eq!(v["shipping"]["blocks_total"], 10);
        assert_eq!(v["shipping"]["baseline"], true);
        assert_eq!(v["max_rate_bytes_per_s"], 5);
        let back: ReplicationReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.shipping.unwrap().blocks_done, 2);
        stats.progressed();
        stats.fail(&Error::Remote("gone".into()));
        stats.bytes_offered.store(30, Ordering::Relaxed);
        stats.bytes_zero.store(10, Ordering::Relaxed);
        stats.raw_bytes_sent.store(5, Ordering::Relaxed);
        let r = stats.report();
        assert_eq!(r.errors.remote, 1);
        assert_eq!(r.bytes_have, 15);
        assert!(!r.connected);
        assert!(r.last_progress_ns > 0);
        assert!(r.seconds_since_progress.unwrap() < 60.0);
    }
}
