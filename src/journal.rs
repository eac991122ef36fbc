//! The change journal: a sled database in the state folder holding what a
//! bitmap cannot: stable file ids and their paths, namespace operations in
//! order, and the epochs. Nothing here is touched per write (PERF-NOTES:
//! sled degrades with many keys), only per namespace operation and per cut.
//!
//! Durability: sled's own flush is followed by an fsync of its files and
//! folder, because the journal must not rely on sled alone.
//!
//! # Keys that make cost follow change
//!
//! - `ops` is keyed by (epoch, sequence), both big-endian (16 bytes), so the
//!   operations of a point ([`Journal::ops_between`]) and the pruning of
//!   shipped ones ([`Journal::prune_ops_through`]) are range scans, and
//!   pruning removes keys without decoding values. Ops are appended under
//!   the cut gate with a growing epoch, so (epoch, seq) order is append
//!   order. Journals written before this used the bare sequence (8 bytes):
//!   [`Journal::open`] rewrites such ops under their new key in one sled
//!   batch (atomic: a crash leaves either layout, never a mix that loses an
//!   op), keeping their sequence numbers.
//! - `paths` indexes the file records by path: key `path ++ 0x00 ++ id`
//!   (big-endian), empty value, so a rename finds the files at or below a
//!   path with two prefix scans ([`Journal::files_under`]) instead of
//!   decoding every file record. A path has no NUL byte, so `a\0…` is only
//!   `a` itself and `a/…` only what is below it, never `ab`. Several ids may
//!   share a path (a rename onto a tracked file), and a file with several
//!   links has an entry per name. [`Journal::put_file`]
//!   writes the new entry before the record and drops the old one after, so
//!   a crash can leave an extra entry but never miss one; `files_under`
//!   checks each hit against its record, and [`Journal::open`] repairs the
//!   index from the records (and builds it for older journals).

use std::collections::BTreeSet;
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
    /// Path index: `path ++ 0x00 ++ id` → empty (see the module doc).
    paths: sled::Tree,
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

/// Key of an operation in `ops`: epoch then sequence, big-endian, so that
/// one epoch's operations are one range, in append order.
fn op_key(epoch: u64, seq: u64) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Key of a file in the `paths` index.
fn path_key(path: &[u8], id: FileId) -> Vec<u8> {
    [path, &[0], &key(id.0)].concat()
}

/// The file id at the end of a `paths` key.
fn path_key_id(k: &[u8]) -> FileId {
    FileId(key_of(&k[k.len().saturating_sub(8)..]))
}

/// Every name of a tracked file: its path, then its other links.
pub fn names(record: &FileRecord) -> impl Iterator<Item = &[u8]> {
    std::iter::once(&record.path[..]).chain(record.more_names.iter().map(|n| &n[..]))
}

/// Whether `path` is `prefix` or below it (`prefix/…`, not `prefix…`).
fn is_under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'/')
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
        crate::state::make_state_dirs(path)?;
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
        crate::state::make_private_tree(path)?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err);
        let journal = Journal {
            path: path.to_path_buf(),
            files: tree("files")?,
            inodes: tree("inodes")?,
            paths: tree("paths")?,
            ops: tree("ops")?,
            epochs: tree("epochs")?,
            meta: tree("meta")?,
            db,
        };
        journal.migrate_op_keys()?;
        journal.repair_path_index()?;
        Ok(journal)
    }

    /// Rewrites ops stored under the old 8-byte sequence key with their
    /// (epoch, seq) key, in one atomic batch. Cost: the old ops, once.
    fn migrate_op_keys(&self) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut moved = 0;
        for kv in self.ops.iter() {
            let (k, v) = self.sled(kv)?;
            if k.len() == 8 {
                let op: OpRecord = self.decode("ops", &v)?;
                batch.remove(k.clone());
                batch.insert(&op_key(op.epoch, key_of(&k))[..], v);
                moved += 1;
            }
        }
        if moved > 0 {
            self.sled(self.ops.apply_batch(batch))?;
            self.flush()?;
            log::info!("journal: {moved} operations rekeyed by epoch");
        }
        Ok(())
    }

    /// Makes the `paths` index hold exactly one entry per file record:
    /// builds it for a journal that predates it and drops or adds what a
    /// crash between the record and its entry left. Cost: the files, once
    /// per open (as the mount's scan); writes only what differs.
    fn repair_path_index(&self) -> Result<()> {
        let want: BTreeSet<Vec<u8>> = self
            .files()?
            .iter()
            .flat_map(|(id, rec)| names(rec).map(|n| path_key(n, *id)))
            .collect();
        let mut have = BTreeSet::new();
        for k in self.paths.iter().keys() {
            have.insert(self.sled(k)?.to_vec());
        }
        if want == have {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for k in have.difference(&want) {
            batch.remove(&k[..]);
        }
        for k in want.difference(&have) {
            batch.insert(&k[..], &[][..]);
        }
        self.sled(self.paths.apply_batch(batch))
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

    /// Records (or updates) a tracked file, and each of its names in the
    /// path index (new entries first, old ones dropped last: a crash leaves
    /// an extra entry, never a missing one).
    pub fn put_file(&self, id: FileId, record: &FileRecord) -> Result<()> {
        for name in names(record) {
            self.sled(self.paths.insert(path_key(name, id), &[][..]))?;
        }
        let old = self.sled(self.files.insert(key(id.0), record.encode_to_vec()))?;
        self.sled(self.inodes.insert(key(record.backing_ino), &key(id.0)))?;
        if let Some(old) = old {
            let old: FileRecord = self.decode("files", &old)?;
            for name in names(&old).filter(|n| !names(record).any(|m| m == *n)) {
                self.sled(self.paths.remove(path_key(name, id)))?;
            }
        }
        Ok(())
    }

    /// Forgets a tracked file (its record, inode and path entries).
    pub fn remove_file(&self, id: FileId) -> Result<()> {
        if let Some(old) = self.sled(self.files.remove(key(id.0)))? {
            let record: FileRecord = self.decode("files", &old)?;
            let ino = key(record.backing_ino);
            if self.sled(self.inodes.get(ino))?.as_deref() == Some(&key(id.0)[..]) {
                self.sled(self.inodes.remove(ino))?;
            }
            for name in names(&record) {
                self.sled(self.paths.remove(path_key(name, id)))?;
            }
        }
        Ok(())
    }

    /// The tracked files with a name (any of their links) that is `prefix`
    /// or below it (`prefix/…`; `a` matches `a` and `a/x`, not `ab`), by
    /// id: what a rename of
    /// `prefix` moves. Two prefix scans of the path index; only the hits
    /// are decoded, and each is checked against its record. An empty
    /// `prefix` (the root) is every file.
    pub fn files_under(&self, prefix: &[u8]) -> Result<Vec<(FileId, FileRecord)>> {
        if prefix.is_empty() {
            return self.files();
        }
        let mut ids = BTreeSet::new();
        for sep in [0, b'/'] {
            for k in self.paths.scan_prefix([prefix, &[sep]].concat()).keys() {
                ids.insert(path_key_id(&self.sled(k)?));
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(rec) = self.file(id)? {
                if names(&rec).any(|n| is_under(n, prefix)) {
                    out.push((id, rec));
                }
            }
        }
        Ok(out)
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

    /// Appends a namespace operation under its epoch; returns its
    /// sequence number (global, growing).
    pub fn append_op(&self, op: &OpRecord) -> Result<u64> {
        let seq = self.sled(self.db.generate_id())? + 1;
        self.sled(self.ops.insert(op_key(op.epoch, seq), op.encode_to_vec()))?;
        Ok(seq)
    }

    /// Decodes the ops of a range of `ops` keys, with their sequence.
    fn decode_ops(&self, range: sled::Iter) -> Result<Vec<(u64, OpRecord)>> {
        range
            .map(|kv| {
                let (k, v) = self.sled(kv)?;
                Ok((key_of(&k[8..]), self.decode("ops", &v)?))
            })
            .collect()
    }

    /// Every namespace operation, in order (by epoch, then sequence: the
    /// order they were appended), with its sequence number.
    pub fn ops(&self) -> Result<Vec<(u64, OpRecord)>> {
        self.decode_ops(self.ops.iter())
    }

    /// Operations of epochs after `after` up to and including `through`:
    /// what one shipped point carries, decoded one at a time as they are
    /// taken, so a backlog of hundreds of thousands of operations is never
    /// all in memory. One range scan: cost follows the operations
    /// returned, not the journal.
    pub fn ops_between(
        &self,
        after: Epoch,
        through: Epoch,
    ) -> impl Iterator<Item = Result<OpRecord>> + '_ {
        let first = after.0.checked_add(1).filter(|&e| e <= through.0);
        let range = first.map(|first| {
            self.ops
                .range(op_key(first, 0)..=op_key(through.0, u64::MAX))
        });
        range.into_iter().flatten().map(|kv| {
            let (_, v) = self.sled(kv)?;
            self.decode("ops", &v)
        })
    }

    /// Drops the operations of epochs up to `through` once the secondary
    /// applied them: the journal keeps only what is still to ship. One range
    /// scan of keys and one batch; nothing is decoded.
    pub fn prune_ops_through(&self, through: Epoch) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.ops.range(..=op_key(through.0, u64::MAX)).keys() {
            batch.remove(self.sled(k)?);
        }
        self.sled(self.ops.apply_batch(batch))
    }

    /// Drops the records of epochs before `first`, the first epoch of the
    /// point the secondary just applied: they belong to points applied
    /// before it, and nothing reads them again. With a point cut as soon
    /// as the link is idle (many a second under light load), keeping them
    /// would grow the journal by one record per point for ever (PERF-NOTES:
    /// sled degrades with many keys). One range scan and one batch.
    pub fn prune_epochs_before(&self, first: Epoch) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.epochs.range(..key(first.0)).keys() {
            batch.remove(self.sled(k)?);
        }
        self.sled(self.epochs.apply_batch(batch))
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
        OpKind::Mknod => "mknod",
        OpKind::Meta => "meta",
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
    use proptest::prelude::*;

    use super::*;

    /// A fresh journal folder for test `name`.
    fn fresh(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hbrfs-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn op(epoch: u64, path: &str) -> OpRecord {
        OpRecord {
            kind: OpKind::Create as i32,
            epoch,
            path: path.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn paths(ops: &[OpRecord]) -> Vec<&str> {
        ops.iter()
            .map(|o| std::str::from_utf8(&o.path).unwrap())
            .collect()
    }

    fn file(path: &str, ino: u64) -> FileRecord {
        FileRecord {
            path: path.as_bytes().to_vec(),
            backing_ino: ino,
            created_ns: 0,
            more_names: Vec::new(),
        }
    }

    fn under(j: &Journal, prefix: &str) -> Vec<(u64, String)> {
        j.files_under(prefix.as_bytes())
            .unwrap()
            .into_iter()
            .map(|(id, r)| (id.0, String::from_utf8(r.path).unwrap()))
            .collect()
    }

    fn ops_between(j: &Journal, after: u64, through: u64) -> Vec<OpRecord> {
        j.ops_between(Epoch(after), Epoch(through))
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn ops_are_ranged_and_pruned_by_epoch() {
        let dir = fresh("epochs");
        let j = Journal::open(&dir).unwrap();
        let mut seqs = Vec::new();
        for (epoch, path) in [(1, "a"), (1, "b"), (2, "c"), (3, "d"), (3, "e"), (5, "f")] {
            seqs.push(j.append_op(&op(epoch, path)).unwrap());
        }
        let all = j.ops().unwrap();
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs);
        let between = |a, t| ops_between(&j, a, t);
        assert_eq!(paths(&between(0, 1)), ["a", "b"]);
        assert_eq!(paths(&between(1, 3)), ["c", "d", "e"]);
        assert_eq!(paths(&between(3, u64::MAX)), ["f"]);
        assert!(between(3, 3).is_empty());
        assert!(between(4, 2).is_empty());
        assert!(between(u64::MAX, u64::MAX).is_empty());
        j.prune_ops_through(Epoch(2)).unwrap();
        assert_eq!(paths(&between(0, 9)), ["d", "e", "f"]);
        assert_eq!(j.op_count(), 3);
        j.prune_ops_through(Epoch(u64::MAX)).unwrap();
        assert_eq!(j.op_count(), 0);
    }

    #[test]
    fn ops_under_old_sequence_keys_are_rekeyed_at_open() {
        let dir = fresh("migrate");
        let before: Vec<u64>;
        {
            let j = Journal::open(&dir).unwrap();
            // What an older build wrote: the sequence (from sled's id
            // generator, as `append_op` draws it) as the whole key. The
            // order of epochs also shows the rekeyed ops keep append order.
            for (epoch, path) in [(1, "a"), (2, "b"), (2, "c"), (4, "d")] {
                let seq = j.db.generate_id().unwrap() + 1;
                j.ops
                    .insert(key(seq), op(epoch, path).encode_to_vec())
                    .unwrap();
            }
            j.flush().unwrap();
            before = j.ops.iter().keys().map(|k| key_of(&k.unwrap())).collect();
        }
        let j = Journal::open(&dir).unwrap();
        assert!(j.ops.iter().keys().all(|k| k.unwrap().len() == 16));
        let all = j.ops().unwrap();
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), before);
        assert_eq!(
            paths(&all.into_iter().map(|(_, o)| o).collect::<Vec<_>>()),
            ["a", "b", "c", "d"]
        );
        assert_eq!(paths(&ops_between(&j, 1, 2)), ["b", "c"]);
        let seq = j.append_op(&op(4, "e")).unwrap();
        assert!(seq > *before.last().unwrap());
        j.prune_ops_through(Epoch(2)).unwrap();
        assert_eq!(paths(&ops_between(&j, 0, 9)), ["d", "e"]);
    }

    #[test]
    fn files_under_matches_the_path_and_below_it_only() {
        let dir = fresh("under");
        let j = Journal::open(&dir).unwrap();
        for (id, path) in [
            (1, "a"),
            (2, "a/x"),
            (3, "ab"),
            (4, "a/b/c"),
            (5, "b"),
            (6, "a.img"),
        ] {
            j.put_file(FileId(id), &file(path, 100 + id)).unwrap();
        }
        let ids = |prefix| {
            under(&j, prefix)
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("a"), [1, 2, 4]);
        assert_eq!(ids("a/b"), [4]);
        assert_eq!(ids("ab"), [3]);
        assert_eq!(ids("a/"), Vec::<u64>::new());
        assert_eq!(ids("c"), Vec::<u64>::new());
        assert_eq!(ids(""), [1, 2, 3, 4, 5, 6]);
        // A rename (put_file with the new path) moves the index entry.
        j.put_file(FileId(2), &file("b/x", 102)).unwrap();
        assert_eq!(ids("a"), [1, 4]);
        assert_eq!(ids("b"), [2, 5]);
        // Two ids on one path (a rename onto a tracked file) both show.
        j.put_file(FileId(4), &file("b", 104)).unwrap();
        assert_eq!(
            under(&j, "b"),
            [(2, "b/x".into()), (4, "b".into()), (5, "b".into())]
        );
        j.remove_file(FileId(5)).unwrap();
        assert_eq!(ids("b"), [2, 4]);
        assert_eq!(j.paths.len(), j.files.len());
    }

    #[test]
    fn every_name_of_a_file_is_indexed() {
        let dir = fresh("names");
        let j = Journal::open(&dir).unwrap();
        let mut rec = file("a", 11);
        rec.more_names = vec![b"d/b".to_vec(), b"e".to_vec()];
        j.put_file(FileId(1), &rec).unwrap();
        assert_eq!(under(&j, "d"), [(1, "a".into())]);
        assert_eq!(under(&j, "e"), [(1, "a".into())]);
        // A name dropped from the record leaves the index.
        rec.more_names = vec![b"e".to_vec()];
        j.put_file(FileId(1), &rec).unwrap();
        assert!(under(&j, "d").is_empty());
        assert_eq!(j.paths.len(), 2);
        drop(j);
        let j = Journal::open(&dir).unwrap();
        assert_eq!(j.paths.len(), 2, "the repair at open keeps every name");
        j.remove_file(FileId(1)).unwrap();
        assert_eq!(j.paths.len(), 0);
    }

    #[test]
    fn the_path_index_is_built_and_repaired_at_open() {
        let dir = fresh("repair");
        {
            let j = Journal::open(&dir).unwrap();
            j.put_file(FileId(1), &file("d/one", 11)).unwrap();
            j.put_file(FileId(2), &file("d/two", 12)).unwrap();
            // An older journal had no index; a crash can leave a stale entry.
            j.paths.clear().unwrap();
            j.paths
                .insert(path_key(b"d/gone", FileId(2)), &[][..])
                .unwrap();
            // Stale entries never show, even before the repair.
            assert!(under(&j, "d/gone").is_empty());
            j.flush().unwrap();
        }
        let j = Journal::open(&dir).unwrap();
        assert_eq!(under(&j, "d"), [(1, "d/one".into()), (2, "d/two".into())]);
        let keys: Vec<Vec<u8>> = j.paths.iter().keys().map(|k| k.unwrap().to_vec()).collect();
        assert_eq!(
            keys,
            [path_key(b"d/one", FileId(1)), path_key(b"d/two", FileId(2))]
        );
    }

    /// Paths of up to three components from a small alphabet, so prefixes
    /// collide often (`a`, `ab`, `a/b`…).
    fn a_path() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "ab", "b", "a.b"], 1..4)
            .prop_map(|c| c.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn files_under_equals_a_filter_of_every_file(
            files in proptest::collection::vec(a_path(), 1..12),
            renames in proptest::collection::vec((0usize..12, a_path()), 0..6),
            prefix in a_path(),
        ) {
            let dir = fresh("prop");
            let j = Journal::open(&dir).unwrap();
            for (i, path) in files.iter().enumerate() {
                j.put_file(FileId(i as u64 + 1), &file(path, i as u64)).unwrap();
            }
            for (i, path) in renames {
                let id = FileId((i % files.len()) as u64 + 1);
                j.put_file(id, &file(&path, 0)).unwrap();
            }
            let want: Vec<(u64, String)> = j
                .files()
                .unwrap()
                .into_iter()
                .filter(|(_, r)| r.path == prefix.as_bytes() || r.path.starts_with(format!("{prefix}/").as_bytes()))
                .map(|(id, r)| (id.0, String::from_utf8(r.path).unwrap()))
                .collect();
            prop_assert_eq!(under(&j, &prefix), want);
            prop_assert_eq!(j.paths.len(), j.files.len());
            drop(j);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

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
                more_names: Vec::new(),
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
