//! The small records of the replica's state folder and their parsers: the
//! pair (`pair`), the last applied point (`applied`) and the commit point
//! of an apply (`redo`). Each is one short text file written durably
//! (`write_durably`); their formats are fixed, so a replica written by an
//! older build opens with a newer one:
//!
//! - `pair`: `datastore=ID\nblock_size=N\nhash_key=HEX\n`
//! - `applied`: `EPOCH AT_NS POINT_HEX\n`
//! - `redo`: `EPOCH OPS_DONE\n`
//!
//! A leaf of the secondary wing: `hbrfs status` reads `applied` through
//! [`Applied::read`] while no secondary runs.

use std::fs;
use std::path::Path;

use crate::block::HashKey;
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::state::{ReplicaPaths, hex, unhex, write_durably};

/// A record of the state folder that does not parse; `bad()` of old.
pub(super) fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadState {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The pair a replica belongs to, fixed by the first primary that ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The primary datastore's id.
    pub datastore_id: String,
    /// Its block size.
    pub block_size: u32,
    /// The pair's hash key.
    pub key: HashKey,
}

impl Pair {
    /// Reads the pair record of the replica at `paths`; `None` before the
    /// first hello.
    pub fn read(paths: &ReplicaPaths) -> Result<Option<Pair>> {
        let path = paths.pair();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(None);
        };
        let mut id = None;
        let mut bs = None;
        let mut key = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("datastore", v)) => id = Some(v.to_string()),
                Some(("block_size", v)) => bs = v.parse().ok(),
                Some(("hash_key", v)) => key = unhex(v).as_deref().and_then(HashKey::from_bytes),
                _ => {}
            }
        }
        match (id, bs, key) {
            (Some(datastore_id), Some(block_size), Some(key)) => Ok(Some(Pair {
                datastore_id,
                block_size,
                key,
            })),
            _ => Err(bad(
                &path,
                "incomplete pair record (datastore, block_size, hash_key)",
            )),
        }
    }

    /// Records the pair durably: from now on only this primary may ship.
    pub fn write(&self, paths: &ReplicaPaths) -> Result<()> {
        let text = format!(
            "datastore={}\nblock_size={}\nhash_key={}\n",
            self.datastore_id,
            self.block_size,
            hex(self.key.as_bytes())
        );
        write_durably(&paths.pair(), text.as_bytes())
    }
}

/// The last point applied: a primary checks it against its history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its epoch, 0 before the first.
    pub epoch: Epoch,
    /// When it was applied, unix nanoseconds.
    pub at_ns: u64,
    /// The point's random id (empty before the first).
    pub point: Vec<u8>,
}

impl Default for Applied {
    /// Before the first point: epoch 0, no id.
    fn default() -> Applied {
        Applied {
            epoch: Epoch(0),
            at_ns: 0,
            point: Vec::new(),
        }
    }
}

impl Applied {
    /// Reads the applied record of the replica at `paths`; the default
    /// (epoch 0) when no point was applied yet. Also read by `hbrfs status`
    /// while no secondary runs.
    pub fn read(paths: &ReplicaPaths) -> Result<Applied> {
        let path = paths.applied();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(Applied::default());
        };
        let mut words = text.split_whitespace();
        let epoch = words.next().and_then(|w| w.parse().ok());
        let at = words.next().and_then(|w| w.parse().ok());
        let point = words.next().and_then(unhex);
        match (epoch, at, point) {
            (Some(epoch), Some(at_ns), Some(point)) => Ok(Applied {
                epoch: Epoch(epoch),
                at_ns,
                point,
            }),
            _ => Err(bad(&path, "unreadable applied record (epoch, time, point)")),
        }
    }

    /// Records this point durably as the replica's last applied one.
    pub fn write(&self, paths: &ReplicaPaths) -> Result<()> {
        let line = format!("{} {} {}\n", self.epoch, self.at_ns, hex(&self.point));
        write_durably(&paths.applied(), line.as_bytes())
    }
}

/// The commit point of a point applied in place: every block of it is
/// durable, and while this record exists the rest (metadata, the record
/// of the point) is done again at start (see `apply`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redo {
    /// The epoch being applied.
    pub epoch: Epoch,
    /// How many blocks it changed (for its recovery point's record).
    pub blocks: u64,
}

impl Redo {
    /// Reads the redo record of the replica at `paths`; `None` when no
    /// apply is under way.
    pub fn read(paths: &ReplicaPaths) -> Result<Option<Redo>> {
        let path = paths.redo();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(None);
        };
        let mut words = text.split_whitespace();
        let mut number = || words.next().and_then(|w| w.parse().ok());
        let (Some(epoch), Some(blocks)) = (number(), number()) else {
            return Err(bad(&path, "unreadable redo record"));
        };
        Ok(Some(Redo {
            epoch: Epoch(epoch),
            blocks,
        }))
    }

    /// Writes the record durably: the commit point.
    pub fn write(&self, paths: &ReplicaPaths) -> Result<()> {
        let line = format!("{} {}\n", self.epoch, self.blocks);
        write_durably(&paths.redo(), line.as_bytes())
    }

    /// Removes the record once the apply is complete.
    pub fn remove(paths: &ReplicaPaths) -> Result<()> {
        let path = paths.redo();
        fs::remove_file(&path).at(&path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::SECRET_LEN;

    /// The records are byte for byte what earlier builds wrote, and what
    /// they wrote reads back: a replica keeps opening across upgrades.
    #[test]
    fn records_keep_their_format_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = ReplicaPaths::of(dir.path());
        fs::create_dir_all(&paths.dir).expect("state folder");
        let key = HashKey::from_bytes(&[0xab; SECRET_LEN]).expect("key");
        let pair = Pair {
            datastore_id: "ds-1".into(),
            block_size: 65536,
            key,
        };
        pair.write(&paths).expect("pair");
        let text = fs::read_to_string(paths.pair()).expect("pair text");
        let want = format!(
            "datastore=ds-1\nblock_size=65536\nhash_key={}\n",
            "ab".repeat(SECRET_LEN)
        );
        assert_eq!(text, want);
        assert_eq!(Pair::read(&paths).expect("read pair"), Some(pair));

        assert_eq!(Applied::read(&paths).expect("none yet"), Applied::default());
        let applied = Applied {
            epoch: Epoch(42),
            at_ns: 1_700_000_000_000_000_000,
            point: vec![0, 1, 0xfe, 0xff],
        };
        applied.write(&paths).expect("applied");
        let text = fs::read_to_string(paths.applied()).expect("applied text");
        assert_eq!(text, "42 1700000000000000000 0001feff\n");
        assert_eq!(Applied::read(&paths).expect("read applied"), applied);

        assert_eq!(Redo::read(&paths).expect("no redo"), None);
        let redo = Redo {
            epoch: Epoch(43),
            blocks: 7,
        };
        redo.write(&paths).expect("redo");
        let text = fs::read_to_string(paths.redo()).expect("redo text");
        assert_eq!(text, "43 7\n");
        assert_eq!(Redo::read(&paths).expect("read redo"), Some(redo));
        // A record without its count is not one: it was written by a build
        // that staged points, whose apply this one cannot finish.
        fs::write(paths.redo(), "44\n").expect("old redo");
        assert!(Redo::read(&paths).is_err());
        Redo::remove(&paths).expect("remove redo");
        assert_eq!(Redo::read(&paths).expect("gone"), None);
    }
}
