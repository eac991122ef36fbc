//! The retention grid (`--keep 1s:1h,1m:24h,1h:7d`, `--keep-space N`):
//! which recovery points stay. Pure (times in, an index out), so every
//! store of points keeps the same ones: a POSIX replica's points
//! (`points::retention`, which thins and expires them) and an object
//! store's manifests (`object::retention`, which deletes them).
//!
//! A point of age A falls in the first tier `STEP:SPAN` with A ≤ SPAN;
//! of the points in one STEP-wide slot of time (unix time / STEP) the
//! oldest stays. The newest point always stays; a point older than every
//! span goes; and while the bytes the points hold exceed the space cap,
//! the oldest go.

use std::time::Duration;

/// What `--keep` and `--keep-space` ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// (step, span) tiers, shortest span first.
    tiers: Vec<(Duration, Duration)>,
    /// The most undo bytes kept, if capped.
    space: Option<u64>,
}

impl Retention {
    /// The default grid: every point for an hour, one a minute for a
    /// day, one an hour for a week.
    pub const DEFAULT: &'static str = "1s:1h,1m:24h,1h:7d";

    /// A grid of (step, span) tiers (empty: keep no history, only the
    /// live replica) and an optional cap on undo bytes.
    pub fn new(mut tiers: Vec<(Duration, Duration)>, space: Option<u64>) -> Retention {
        tiers.sort_by_key(|&(_, span)| span);
        Retention { tiers, space }
    }

    /// Whether any older point is kept (else no undo is saved at all).
    pub fn keeps_history(&self) -> bool {
        !self.tiers.is_empty()
    }

    /// The slot a point taken at `at_ns` falls in at `now_ns`: (tier,
    /// slot), `None` when it is older than every span.
    fn slot(&self, at_ns: u64, now_ns: u64) -> Option<(usize, u64)> {
        let age = Duration::from_nanos(now_ns.saturating_sub(at_ns));
        let (tier, (step, _)) = self
            .tiers
            .iter()
            .enumerate()
            .find(|(_, (_, span))| age <= *span)?;
        let step = step.as_nanos().max(1) as u64;
        Some((tier, at_ns / step))
    }

    /// The index of the next point to let go, if any, of points taken at
    /// `times` (ascending; the last is the newest and always stays) that
    /// hold `undo` bytes in all, among those `free` allows (a view may pin
    /// one). Pure, so every store of points (POSIX replicas, the object
    /// store) keeps the same ones.
    pub fn next_to_drop(
        &self,
        times: &[u64],
        undo: u64,
        now_ns: u64,
        free: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let last = times.len().checked_sub(1)?;
        let by_grid = (0..last)
            .filter(|i| free(*i))
            .find(|&i| match self.slot(times[i], now_ns) {
                None => true,
                Some(slot) => i > 0 && self.slot(times[i - 1], now_ns) == Some(slot),
            });
        let over = self.space.is_some_and(|cap| undo > cap);
        by_grid.or_else(|| over.then(|| (0..last).find(|i| free(*i))).flatten())
    }
}
