//! The wake-up of the replicator: "something was dirtied since the last
//! cut", raised by the write path and namespace operations, taken by the
//! cut.
//!
//! The write path must only set bits (PERF-NOTES): a write already sets
//! its file's `touched` flag once per epoch, and only that first touch of a
//! file in an epoch, or a namespace operation, raises this. Raising is a
//! relaxed load when the flag is up already; only its false → true edge
//! (once per cut for the whole datastore) stores a permit in a
//! [`tokio::sync::Notify`] (a compare-and-swap, plus a wake of the
//! replicator's task when it is waiting). No syscall and no lock per write.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// "Dirtied since the last cut", with the replicator's wake-up.
#[derive(Debug, Default)]
pub struct Dirtied {
    /// Up from the first change after a cut until the next cut takes it.
    raised: AtomicBool,
    /// The replicator waits here; a raise with nobody waiting stores one
    /// permit, so a change made while a point ships is seen right after.
    notify: Notify,
}

impl Dirtied {
    /// Notes a change: wakes the replicator on the first one since the
    /// last cut.
    pub fn raise(&self) {
        if !self.raised.load(Ordering::Relaxed) && !self.raised.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Takes the flag down; the replicator's cut (`protect_closed`) calls
    /// it under the exclusive gate, so every change after it raises again.
    pub(super) fn take(&self) {
        self.raised.store(false, Ordering::Release);
    }

    /// Whether something changed since the last cut.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Waits until something changed since the last cut (at once when a
    /// change came while nobody waited).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn only_the_first_change_after_a_cut_wakes_and_a_change_while_busy_is_kept() {
        let d = Dirtied::default();
        d.raise();
        d.raise();
        assert!(d.is_raised());
        tokio::time::timeout(Duration::from_secs(5), d.changed())
            .await
            .expect("the stored permit wakes at once");
        let quiet = tokio::time::timeout(Duration::from_millis(20), d.changed()).await;
        assert!(quiet.is_err(), "the second raise stored no second permit");
        d.take();
        assert!(!d.is_raised());
        d.raise();
        tokio::time::timeout(Duration::from_secs(5), d.changed())
            .await
            .expect("a change after the cut wakes again");
    }
}
