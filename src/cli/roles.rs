//! `hbrfs promote`, `hbrfs demote` and `hbrfs migrate`: run the role change (`crate::roles`)
//! and say what it did and what to run next, so an operator in the middle
//! of a failover is told the next command rather than left to guess.

use std::path::Path;
use std::time::Duration;

use crate::error::Result;
use crate::state::hex;

/// `hbrfs promote REPLICA [--point P]`.
pub(super) fn promote(replica: &Path, point: Option<&str>) -> Result<()> {
    let p = crate::roles::promote(replica, point)?;
    let dirty = if p.dirty_blocks + p.rolled_back_paths == 0 {
        "nothing dirty".to_string()
    } else {
        format!(
            "rolled back: {} blocks dirty, {} paths to reconcile at failback",
            p.dirty_blocks, p.rolled_back_paths
        )
    };
    println!(
        "{} promoted: primary of datastore {} at the common base epoch {} (point {}), \
         {} files tracked, {dirty}.\n\
         Mount it: hbrfs mount {} MOUNTPOINT [--replicate-to ADDR --auth-key FILE]",
        replica.display(),
        p.datastore_id,
        p.base,
        hex(&p.point),
        p.files,
        replica.display()
    );
    Ok(())
}

/// `hbrfs demote BACKING`.
pub(super) fn demote(backing: &Path) -> Result<()> {
    let d = crate::roles::demote(backing)?;
    let list = if d.paths == 0 {
        "nothing written after it: an empty resync list, nothing ships back".to_string()
    } else {
        format!(
            "resync list of {} paths ({} blocks) for the new primary to ship back",
            d.paths, d.blocks
        )
    };
    println!(
        "{} demoted: a secondary now, after epoch {}; {list}. Its primary state is in {}.\n\
         Serve it: hbrfs serve {} --listen ADDR, and point the new primary at ADDR",
        backing.display(),
        d.base,
        d.aside.display(),
        backing.display()
    );
    Ok(())
}

/// `hbrfs migrate DATASTORE` (its backing directory or its mountpoint).
pub(super) fn migrate(datastore: &Path, timeout: Duration) -> Result<()> {
    let backing = super::resolve_datastore(datastore)?;
    let mountpoint = crate::daemon::mounts()
        .into_iter()
        .find(|m| m.fstype.starts_with("fuse") && Path::new(&m.source) == backing)
        .map(|m| m.point);
    let m = crate::roles::migrate(&backing, mountpoint.as_deref(), timeout)?;
    let backing = backing.as_path();
    println!(
        "{} migrated: the final point (epoch {}) is applied at the secondary; this folder is a \
         secondary now (nothing to resync; primary state in {}).\n\
         On the secondary: stop `hbrfs serve REPLICA`, run `hbrfs promote REPLICA`, then \
         `hbrfs serve {} --listen ADDR` here and `hbrfs mount REPLICA MOUNTPOINT --replicate-to ADDR` there",
        backing.display(),
        m.epoch,
        m.demoted.aside.display(),
        backing.display()
    );
    Ok(())
}
