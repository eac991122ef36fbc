//! Who is primary. A folder's role record (`.hbrfs/role`) says which side
//! of its pair a folder is and at which common base point it took that
//! role; the daemons check it before they start (a replica is not mounted
//! as a primary, a promoted folder is not served as a replica), and the
//! commands here change it:
//!
//! - `promote`: failover; a replica becomes a primary at its applied point
//!   (or, with `--point`, at an older point it is rolled back to), with
//!   nothing dirty but what a rollback changed.
//! - `demote`: an old primary becomes a secondary of the new one; what it
//!   wrote after its last shipped point becomes a resync list the new
//!   primary ships back over (failback: only the difference travels).
//! - `migrate`: a planned swap with the running primary: its final point
//!   shipped and applied, then demoted with an empty resync list.
//!
//! Both take the folder's daemon lock, so neither runs while a `mount` or
//! a `serve` of the folder does.
//!
//! # Layout
//!
//! - this file: the [`Role`] record and the daemons' checks.
//! - `promote`: [`promote`], the primary state made from a replica.
//! - `demote`: [`demote`], the resync list made from a primary's state.
//! - `migrate`: [`migrate`], final point, stop, demote.

mod demote;
mod migrate;
mod promote;

use std::fs;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::replica::Pair;
use crate::state::{ReplicaPaths, StatePaths, hex, unhex, write_durably};

pub use demote::{Demoted, demote};
pub use migrate::{Migrated, migrate};
pub use promote::{Promoted, promote};

/// A folder's role, as its role record (`.hbrfs/role`) says.
///
/// Format, one line: `primary base=EPOCH point=HEX` or
/// `secondary base=EPOCH`. `base` is the pair's common base point: the
/// point a promote started from, or the last point a demoted primary had
/// shipped. A folder without the record is what its state says: a
/// replica when it has a pair record, a primary otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Promoted at `base` (point id `point`): a primary now.
    Primary {
        /// The common base point's epoch.
        base: Epoch,
        /// Its id (16 bytes; empty when a rollback's point has none).
        point: Vec<u8>,
    },
    /// Demoted after shipping up to `base`: a secondary now.
    Secondary {
        /// The last epoch it had shipped as a primary.
        base: Epoch,
    },
}

impl Role {
    /// The role record of the folder `root`, `None` when it has none.
    pub fn read(root: &Path) -> Result<Option<Role>> {
        let path = StatePaths::of(root).role();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(path),
        };
        let mut words = text.split_whitespace();
        let which = words.next();
        let mut base = None;
        let mut point = Some(Vec::new());
        for word in words {
            if let Some(v) = word.strip_prefix("base=") {
                base = v.parse().ok().map(Epoch);
            } else if let Some(v) = word.strip_prefix("point=") {
                point = unhex(v);
            }
        }
        match (which, base, point) {
            (Some("primary"), Some(base), Some(point)) => Ok(Some(Role::Primary { base, point })),
            (Some("secondary"), Some(base), _) => Ok(Some(Role::Secondary { base })),
            _ => Err(Error::BadState {
                path,
                reason: format!("unreadable role record {:?}", text.trim()),
            }),
        }
    }

    /// Records the role of `root` durably: the last step of a promote or
    /// demote, so a crash before it leaves the folder in its old role.
    pub fn write(&self, root: &Path) -> Result<()> {
        let line = match self {
            Role::Primary { base, point } => format!("primary base={base} point={}\n", hex(point)),
            Role::Secondary { base } => format!("secondary base={base}\n"),
        };
        write_durably(&StatePaths::of(root).role(), line.as_bytes())
    }
}

/// Refuses to mount `backing` as a primary when it is a replica (a role
/// record saying so, or a pair record without one): mounting it would
/// track it anew and ship it in full, and its pair's primary may still be
/// alive. `hbrfs promote` turns it into a primary first.
pub fn check_mount(backing: &Path) -> Result<()> {
    let role = Role::read(backing)?;
    if matches!(role, Some(Role::Primary { .. })) {
        return Ok(());
    }
    let pair = Pair::read(&ReplicaPaths::of(backing))?;
    match (role, pair) {
        (Some(Role::Secondary { .. }), _) | (None, Some(_)) => Err(Error::Usage(format!(
            "{} is a replica of datastore {}; run `hbrfs promote {}` first (failover), \
             or `hbrfs serve` it",
            backing.display(),
            pair_name(backing),
            backing.display()
        ))),
        _ => Ok(()),
    }
}

/// Refuses to serve `replica` when it was promoted (a primary now: the
/// old primary's points must not overwrite what it wrote since) or is a
/// primary datastore that was never demoted.
pub fn check_serve(replica: &Path) -> Result<()> {
    match Role::read(replica)? {
        Some(Role::Primary { base, point }) => Err(Error::Usage(format!(
            "{} was promoted at point {} (epoch {base}); it is a primary now and takes no points. \
             Mount it with `hbrfs mount`, or `hbrfs demote` it to serve it again",
            replica.display(),
            hex(&point)
        ))),
        Some(Role::Secondary { .. }) => Ok(()),
        None if StatePaths::of(replica).format().exists() => Err(Error::Usage(format!(
            "{} is a primary datastore; run `hbrfs demote {}` first (failback) to serve it",
            replica.display(),
            replica.display()
        ))),
        None => Ok(()),
    }
}

/// The datastore id a replica belongs to, for messages.
fn pair_name(root: &Path) -> String {
    match Pair::read(&ReplicaPaths::of(root)) {
        Ok(Some(p)) => p.datastore_id,
        _ => "(unknown)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record round-trips, and the checks refuse what they must.
    #[test]
    fn role_records_round_trip_and_guard_the_daemons() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::create_dir_all(root.join(".hbrfs")).expect("state folder");
        assert_eq!(Role::read(root).expect("none"), None);
        check_mount(root).expect("a fresh folder mounts");
        check_serve(root).expect("a fresh folder serves");
        let primary = Role::Primary {
            base: Epoch(7),
            point: vec![1, 2],
        };
        primary.write(root).expect("write");
        assert_eq!(Role::read(root).expect("read"), Some(primary));
        let err = check_serve(root).expect_err("promoted");
        assert!(err.to_string().contains("promoted at point 0102"), "{err}");
        check_mount(root).expect("a promoted folder mounts");
        Role::Secondary { base: Epoch(9) }
            .write(root)
            .expect("write");
        assert_eq!(
            Role::read(root).expect("read"),
            Some(Role::Secondary { base: Epoch(9) })
        );
        let err = check_mount(root).expect_err("a replica");
        assert!(err.to_string().contains("run `hbrfs promote"), "{err}");
        fs::write(StatePaths::of(root).role(), "tertiary\n").expect("write");
        assert!(Role::read(root).is_err());
    }
}
