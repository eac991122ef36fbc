//! The change journal: a sled database in the state folder holding what a
//! bitmap cannot: stable file ids and their paths, namespace operations in
//! order, and the epochs. Nothing here is touched per write (PERF-NOTES:
//! sled degrades with many keys), only per namespace operation and per cut.
//!
//! Durability: sled's own flush is followed by an fsync of its files and
//! folder, because the journal must not rely on sled alone.

use std::fs::File;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, IoContext, Result};
use crate::ids::{Epoch, FileId};
use crate::proto::journal::{EpochRecord, EpochState, FileRecord, OpKind, OpRecord};

/// The open sled database and its trees.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    db: sled::Db,
    files: sled::Tree,
    inodes: sled::Tree,
    ops: sled::Tree,
    epochs: sled::Tree,
    meta: sled::Tree,
}

fn key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn key_of(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl Journal {
    /// Opens (or creates) the journal in `path`.
    pub fn open(path: &Path) -> Result<Journal> {
        let sled_err = |source| Error::Journal {
            path: path.to_path_buf(),
            source,
        };
        // sled may panic on some corruptions instead of returning an error;
        // a journal we cannot read must be an error the caller handles.
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(path)
                .flush_every_ms(Some(500))
                .open()
        })
        .map_err(|_| Error::BadState {
            path: path.to_path_buf(),
            reason: "sled panicked opening the journal (corrupt)".into(),
        })?;
        let db = opened.map_err(sled_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err);
        Ok(Journal {
            path: path.to_path_buf(),
            files: tree("files")?,
            inodes: tree("inodes")?,
            ops: tree("ops")?,
            epochs: tree("epochs")?,
            meta: tree("meta")?,
            db,
        })
    }

    fn sled<T>(&self, r: sled::Result<T>) -> Result<T> {
        r.map_err(|source| Error::Journal {
            path: self.path.clone(),
            source,
        })
    }

    fn decode<M: Message + Default>(&self, tree: &'static str, bytes: &[u8]) -> Result<M> {
        M::decode(bytes).map_err(|source| Error::Record {
            path: self.path.clone(),
            tree,
            source,
        })
    }

    /// Makes everything recorded so far durable: sled's flush, then an
    /// fsync of its data file and folder.
    pub fn flush(&self) -> Result<()> {
        self.sled(self.db.flush())?;
        let db_file = self.path.join("db");
        File::open(&db_file)
            .and_then(|f| f.sync_all())
            .at(&db_file)?;
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .at(&self.path)
    }

    /// A new, never reused file id.
    pub fn new_file_id(&self) -> Result<FileId> {
        // generate_id is persistent and monotonic; +1 keeps 0 free for "none".
        Ok(FileId(self.sled(self.db.generate_id())? + 1))
    }

    /// Records (or updates) a tracked file.
    pub fn put_file(&self, id: FileId, record: &FileRecord) -> Result<()> {
        self.sled(self.files.insert(key(id.0), record.encode_to_vec()))?;
        self.sled(self.inodes.insert(key(record.backing_ino), &key(id.0)))?;
        Ok(())
    }

    /// Forgets a tracked file.
    pub fn remove_file(&self, id: FileId) -> Result<()> {
        if let Some(old) = self.sled(self.files.remove(key(id.0)))? {
            let record: FileRecord = self.decode("files", &old)?;
            let ino = key(record.backing_ino);
            if self.sled(self.inodes.get(ino))?.as_deref() == Some(&key(id.0)[..]) {
                self.sled(self.inodes.remove(ino))?;
            }
        }
        Ok(())
    }

    /// One tracked file.
    pub fn file(&self, id: FileId) -> Result<Option<FileRecord>> {
        match self.sled(self.files.get(key(id.0)))? {
            Some(v) => Ok(Some(self.decode("files", &v)?)),
            None => Ok(None),
        }
    }

    /// The file id of a backing inode, if tracked.
    pub fn file_by_ino(&self, ino: u64) -> Result<Option<FileId>> {
        Ok(self
            .sled(self.inodes.get(key(ino)))?
            .map(|v| FileId(key_of(&v))))
    }

    /// Every tracked file, by id.
    pub fn files(&self) -> Result<Vec<(FileId, FileRecord)>> {
        self.files
            .iter()
            .map(|kv| {
                let (k, v) = self.sled(kv)?;
                Ok((FileId(key_of(&k)), self.decode("files", &v)?))
            })
            .collect()
    }

    /// Appends a namespace operation; returns its sequence number.
    pub fn append_op(&self, op: &OpRecord) -> Result<u64> {
        let seq = self.sled(self.db.generate_id())? + 1;
        self.sled(self.ops.insert(key(seq), op.encode_to_vec()))?;
        Ok(seq)
    }

    /// Every namespace operation, in order.
    pub fn ops(&self) -> Result<Vec<(u64, OpRecord)>> {
        self.ops
            .iter()
            .map(|kv| {
                let (k, v) = self.sled(kv)?;
                Ok((key_of(&k), self.decode("ops", &v)?))
            })
            .collect()
    }

    /// Operations of epochs after `after` up to and including `through`:
    /// what one shipped point carries.
    pub fn ops_between(&self, after: Epoch, through: Epoch) -> Result<Vec<OpRecord>> {
        Ok(self
            .ops()?
            .into_iter()
            .map(|(_, op)| op)
            .filter(|op| op.epoch > after.0 && op.epoch <= through.0)
            .collect())
    }

    /// Drops the operations of epochs up to `through` once the secondary
    /// applied them: the journal keeps only what is still to ship.
    pub fn prune_ops_through(&self, through: Epoch) -> Result<()> {
        for (seq, op) in self.ops()? {
            if op.epoch <= through.0 {
                self.sled(self.ops.remove(key(seq)))?;
            }
        }
        Ok(())
    }

    fn point(&self, name: &str) -> Result<Option<ShippedPoint>> {
        Ok(self
            .sled(self.meta.get(name))?
            .and_then(|v| ShippedPoint::decode(&v)))
    }

    /// The last point the secondary acknowledged, if any.
    pub fn last_shipped(&self) -> Result<Option<ShippedPoint>> {
        self.point("last_shipped")
    }

    /// The point being shipped, recorded (durably) before it is sent, so a
    /// lost acknowledgement can be recognised after a reconnect.
    pub fn pending_point(&self) -> Result<Option<ShippedPoint>> {
        self.point("pending")
    }

    /// Records the point about to be sent, durably. Written only by
    /// `replicate::point`, the one owner of a point's life.
    pub fn set_pending_point(&self, point: &ShippedPoint) -> Result<()> {
        self.sled(self.meta.insert("pending", point.encode()))?;
        self.flush()
    }

    /// Records that the secondary holds `point`, and that nothing is
    /// pending any more. Written only by `replicate::point`.
    pub fn set_last_shipped(&self, point: &ShippedPoint) -> Result<()> {
        self.sled(self.meta.insert("last_shipped", point.encode()))?;
        self.sled(self.meta.remove("pending")).map(drop)
    }

    /// Number of namespace operations recorded.
    pub fn op_count(&self) -> usize {
        self.ops.len()
    }

    /// Records (or updates) an epoch.
    pub fn put_epoch(&self, epoch: Epoch, record: &EpochRecord) -> Result<()> {
        self.sled(self.epochs.insert(key(epoch.0), record.encode_to_vec()))
            .map(drop)
    }

    /// One epoch.
    pub fn epoch(&self, epoch: Epoch) -> Result<Option<EpochRecord>> {
        match self.sled(self.epochs.get(key(epoch.0)))? {
            Some(v) => Ok(Some(self.decode("epochs", &v)?)),
            None => Ok(None),
        }
    }

    /// Every epoch, in order.
    pub fn epochs(&self) -> Result<Vec<(Epoch, EpochRecord)>> {
        self.epochs
            .iter()
            .map(|kv| {
                let (k, v) = self.sled(kv)?;
                Ok((Epoch(key_of(&k)), self.decode("epochs", &v)?))
            })
            .collect()
    }

    /// The newest epoch and its record, if any epoch exists.
    pub fn last_epoch(&self) -> Result<Option<(Epoch, EpochRecord)>> {
        match self.sled(self.epochs.last())? {
            Some((k, v)) => Ok(Some((Epoch(key_of(&k)), self.decode("epochs", &v)?))),
            None => Ok(None),
        }
    }
}

/// A point shipped to the secondary: its epoch and random id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShippedPoint {
    /// The last epoch folded into the point.
    pub epoch: Epoch,
    /// Random id, recorded by both sides.
    pub id: [u8; 16],
}

impl ShippedPoint {
    fn encode(&self) -> Vec<u8> {
        [&self.epoch.0.to_be_bytes()[..], &self.id].concat()
    }

    fn decode(bytes: &[u8]) -> Option<ShippedPoint> {
        (bytes.len() == 24).then(|| ShippedPoint {
            epoch: Epoch(key_of(&bytes[..8])),
            id: bytes[8..].try_into().expect("16 bytes"),
        })
    }

    /// The id as hex, for messages.
    pub fn id_hex(&self) -> String {
        crate::state::hex(&self.id)
    }
}

/// The name users see for an operation kind.
pub fn op_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Unspecified => "unknown",
        OpKind::Create => "create",
        OpKind::Rename => "rename",
        OpKind::Unlink => "unlink",
        OpKind::Mkdir => "mkdir",
        OpKind::Rmdir => "rmdir",
        OpKind::Truncate => "truncate",
        OpKind::Symlink => "symlink",
        OpKind::Link => "link",
    }
}

/// The name users see for an epoch state.
pub fn epoch_state_name(state: EpochState) -> &'static str {
    match state {
        EpochState::Unspecified => "unknown",
        EpochState::Open => "open",
        EpochState::Closed => "closed",
        EpochState::Merged => "merged",
        EpochState::Shipped => "shipped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("hbrfs-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id;
        {
            let j = Journal::open(&dir).unwrap();
            id = j.new_file_id().unwrap();
            let rec = FileRecord {
                path: b"a.img".to_vec(),
                backing_ino: 42,
                created_ns: 1,
            };
            j.put_file(id, &rec).unwrap();
            let op = OpRecord {
                kind: OpKind::Create as i32,
                epoch: 1,
                file_id: id.0,
                path: b"a.img".to_vec(),
                ..Default::default()
            };
            j.append_op(&op).unwrap();
            j.flush().unwrap();
        }
        let j = Journal::open(&dir).unwrap();
        assert_eq!(j.file_by_ino(42).unwrap(), Some(id));
        assert_eq!(j.file(id).unwrap().unwrap().path, b"a.img");
        assert_eq!(j.ops().unwrap().len(), 1);
        assert!(j.new_file_id().unwrap() > id);
        j.remove_file(id).unwrap();
        assert_eq!(j.file_by_ino(42).unwrap(), None);
    }
}
