//! Planned migration, the primary's half: `hbrfs migrate BACKING` swaps
//! roles with no loss and no resync. It is a documented two-command
//! procedure, not one RPC: the secondary is promoted by `hbrfs promote` on
//! its own host (a promote needs the folder's daemon lock, so `serve` must
//! stop first, and a remote command that stops a daemon and rewrites its
//! state is more than a replication peer should be allowed to ask).
//!
//! Here, with the running primary's daemon:
//! 1. its mount is `syncfs`ed, so what the kernel caches reaches the
//!    datastore;
//! 2. the daemon's replicator ships the final point: this waits (over the
//!    control socket) until nothing is dirty, no operation is pending and
//!    the secondary has applied the last point;
//! 3. the daemon is asked to stop (SIGTERM: a clean unmount, which waits
//!    for the last open file, so the hypervisor must have stopped its
//!    guests) and this waits for its lock;
//! 4. the folder is demoted with an **empty** resync list, or, if anything
//!    was written after the final point, left as it is with an error (mount
//!    it again and retry): zero loss either way.

use std::os::fd::AsFd;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::control::{self, Answer, Request};
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::state::{StatePaths, take_lock};

use super::demote::{Demoted, demote_with};

/// How often the daemon is asked how far the final point is.
const POLL: Duration = Duration::from_millis(100);

/// What a migration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migrated {
    /// The final point's epoch: the secondary's applied point, the base
    /// it is promoted at.
    pub epoch: Epoch,
    /// The demote of this folder (an empty resync list).
    pub demoted: Demoted,
}

/// Migrates the running primary of `backing` (mounted at `mountpoint`)
/// to a secondary, waiting at most `timeout` for the final point and
/// again for the daemon to stop.
pub fn migrate(backing: &Path, mountpoint: Option<&Path>, timeout: Duration) -> Result<Migrated> {
    let backing = backing.canonicalize().at(backing)?;
    let paths = StatePaths::of(&backing);
    if let Some(mnt) = mountpoint {
        let dir = std::fs::File::open(mnt).at(mnt)?;
        crate::sys::syncfs(dir.as_fd()).at(mnt)?;
    }
    let epoch = final_point(&paths, timeout)?;
    stop_daemon(&paths, timeout)?;
    let demoted = demote_with(&backing, true)?;
    Ok(Migrated { epoch, demoted })
}

/// Waits until the daemon's secondary holds everything: nothing dirty,
/// no operation pending, every closed epoch applied; returns the epoch.
fn final_point(paths: &StatePaths, timeout: Duration) -> Result<Epoch> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(Answer::Status(s)) = control::ask(&paths.socket(), &Request::Status)? else {
            return Err(Error::Usage(format!(
                "no hbrfs daemon answers for {}: `hbrfs migrate` needs the running primary",
                paths.dir.display()
            )));
        };
        let Some(r) = s.replication else {
            return Err(Error::Usage(
                "this primary does not replicate (no --replicate-to): there is no secondary to migrate to".into(),
            ));
        };
        let applied = r.last_applied_epoch;
        if r.connected
            && s.stats.dirty_blocks == 0
            && s.stats.ops == 0
            && applied > 0
            && applied + 1 >= s.stats.current_epoch
        {
            return Ok(Epoch(applied));
        }
        if Instant::now() > deadline {
            return Err(Error::Usage(format!(
                "the final point did not reach the secondary within {} s ({} blocks dirty, {} operations \
                 pending, last error: {}); nothing was changed",
                timeout.as_secs(),
                s.stats.dirty_blocks,
                s.stats.ops,
                if r.last_error.is_empty() {
                    "none"
                } else {
                    &r.last_error
                }
            )));
        }
        sleep(POLL);
    }
}

/// Asks the daemon holding `paths`' lock to stop, and waits until the lock
/// is free.
fn stop_daemon(paths: &StatePaths, timeout: Duration) -> Result<()> {
    let lock = paths.dir.join("lock");
    let text = std::fs::read_to_string(&lock).at(&lock)?;
    let pid: i32 = text.trim().parse().map_err(|_| Error::BadState {
        path: lock.clone(),
        reason: format!("no daemon pid in the lock file ({:?})", text.trim()),
    })?;
    crate::sys::terminate(pid).at(format!("pid {pid}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if take_lock(&paths.dir).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Usage(format!(
                "the daemon (pid {pid}) did not stop within {} s: files still open on its mount? \
                 Stop the guests first; nothing was demoted",
                timeout.as_secs()
            )));
        }
        sleep(POLL);
    }
}
