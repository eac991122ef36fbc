//! The datastore as the mount's [`ChangeRecorder`]: namespace changes go
//! to the journal in the open epoch, and tracked files follow renames and
//! removals.

use std::collections::HashSet;
use std::sync::Mutex;

use super::Datastore;
use crate::error::{Error, Result};
use crate::fs::recorder::{Change, ChangeRecorder, Gate, Gone, NewFile, Tracked};
use crate::ids::{Epoch, FileId};
use crate::journal;
use crate::proto::journal::{OpKind, OpRecord};
use crate::state::now_ns;

impl Datastore {
    /// Records a namespace operation in the open epoch (call under the gate).
    fn record_op(
        &self,
        kind: OpKind,
        file_id: Option<FileId>,
        path: &[u8],
        target: &[u8],
        size: u64,
    ) -> Result<()> {
        self.append_op(op_record(kind, file_id, path, target, size))
    }

    /// Appends `op` to the open epoch, stamped with the epoch and the time
    /// (call under the gate): the one writer of namespace operations.
    pub(super) fn append_op(&self, mut op: OpRecord) -> Result<()> {
        self.tracker.note_op();
        op.epoch = self.tracker.current_epoch().0;
        op.time_ns = now_ns();
        self.journal.append_op(&op).map(drop)
    }
}

/// The journal record of a namespace operation, before it is stamped.
pub(super) fn op_record(
    kind: OpKind,
    file_id: Option<FileId>,
    path: &[u8],
    target: &[u8],
    size: u64,
) -> OpRecord {
    OpRecord {
        kind: kind as i32,
        file_id: file_id.map_or(0, |f| f.0),
        path: path.to_vec(),
        target: target.to_vec(),
        size,
        ..Default::default()
    }
}

/// The datastore keeps what the mount changes: namespace changes go to the
/// journal in the open epoch, files are tracked by the tracker, and both
/// follow renames and removals.
impl ChangeRecorder for Datastore {
    fn gate(&self) -> Gate<'_> {
        self.tracker.gate()
    }

    fn track(&self, file: NewFile<'_>) -> Result<Tracked> {
        let tracked = self.track_file(file.ino, file.path, file.size, file.reader)?;
        Ok(tracked)
    }

    fn tracked(&self, ino: u64) -> Result<Option<Tracked>> {
        Ok(self
            .journal
            .file_by_ino(ino)?
            .and_then(|id| self.tracker.file(id))
            .map(|f| f as Tracked))
    }

    fn record(&self, change: &Change<'_>) -> Result<()> {
        match *change {
            Change::Created { file, path } => {
                self.record_op(OpKind::Create, Some(file), path, b"", 0)
            }
            Change::Node { path, mode, rdev } => {
                let arg = u64::from(mode) | u64::from(rdev) << 32;
                self.record_op(OpKind::Mknod, None, path, b"", arg)
            }
            Change::Meta { file, path } => {
                let known = match file {
                    Some(id) => self.journal.file(id)?.map(|rec| rec.path),
                    None => path.map(<[u8]>::to_vec),
                };
                // A file whose last name went (a setattr of an open,
                // unlinked file) has no path left for its metadata.
                let Some(path) = known else {
                    return Ok(());
                };
                let epoch = self.tracker.current_epoch();
                if !self.meta_noted.first(epoch, &path) {
                    return Ok(());
                }
                self.record_op(OpKind::Meta, None, &path, b"", 0)
            }
            Change::Mkdir { path } => self.record_op(OpKind::Mkdir, None, path, b"", 0),
            Change::Rmdir { path } => self.record_op(OpKind::Rmdir, None, path, b"", 0),
            Change::Symlink { path, target } => {
                self.record_op(OpKind::Symlink, None, path, target, 0)
            }
            Change::Truncated { file, path, size } => {
                let path = self.name_of(file, path)?;
                self.record_op(OpKind::Truncate, file, &path, b"", size)
            }
            Change::Linked { file, from, to } => {
                let from = self.name_of(file, from)?;
                if let Some(id) = file {
                    self.name_added(id, to)?;
                }
                self.record_op(OpKind::Link, file, &from, to, 0)
            }
            Change::Unlinked { path, file } => {
                let mut failed = Failures::default();
                let id = self.name_gone(file, path, &mut failed);
                failed.keep(self.record_op(OpKind::Unlink, id, path, b"", 0));
                failed.result()
            }
            Change::Renamed {
                from,
                to,
                flags,
                ino,
                replaced,
            } => {
                let mut failed = Failures::default();
                self.name_gone(replaced, to, &mut failed);
                let id = failed.keep(self.journal.file_by_ino(ino)).flatten();
                let size = u64::from(flags);
                failed.keep(self.record_op(OpKind::Rename, id, from, to, size));
                let exchange = flags & libc::RENAME_EXCHANGE != 0;
                self.repath(from, to, exchange, &mut failed);
                failed.result()
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.journal.flush()
    }

    fn unrecorded(&self, change: &Change<'_>, error: &Error) {
        let mut slot = self.unrecorded.lock().expect("unrecorded lock");
        slot.get_or_insert_with(|| {
            format!("a namespace change ({change}) is not in the journal: {error}")
        });
    }
}

/// The paths whose metadata change one epoch recorded (see
/// `Datastore::meta_noted`). Forgotten when the epoch changes.
#[derive(Debug, Default)]
pub(super) struct MetaNoted {
    /// The epoch (its number) and its paths; no `.await` happens under
    /// the lock.
    noted: Mutex<(u64, HashSet<Vec<u8>>)>,
}

impl MetaNoted {
    /// Whether `path` is noted for the first time in `epoch`.
    fn first(&self, epoch: Epoch, path: &[u8]) -> bool {
        let mut noted = self.noted.lock().expect("meta lock");
        if noted.0 != epoch.0 {
            *noted = (epoch.0, HashSet::new());
        }
        noted.1.insert(path.to_vec())
    }
}

/// The failures of the steps of one recorded change: every step runs, the
/// first failure is what the change returns.
#[derive(Debug, Default)]
struct Failures(Option<Error>);

impl Failures {
    /// `res`'s value, or `None` with its error kept.
    fn keep<T>(&mut self, res: Result<T>) -> Option<T> {
        res.map_err(|e| {
            self.0.get_or_insert(e);
        })
        .ok()
    }

    fn result(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Datastore {
    /// A name of the file (the journal's name of a tracked `file`, else
    /// `given`, the passthrough's): what an operation on it is recorded
    /// under. No name known is an error, never a guess.
    fn name_of(&self, file: Option<FileId>, given: Option<&[u8]>) -> Result<Vec<u8>> {
        let known = match file {
            Some(id) => self.journal.file(id)?.map(|rec| rec.path),
            None => None,
        };
        known
            .or_else(|| given.map(<[u8]>::to_vec))
            .ok_or_else(|| Error::BadState {
                path: self.root.clone(),
                reason: format!("no known name for file {file:?}"),
            })
    }

    /// `name` is a new link of the tracked file `id`.
    fn name_added(&self, id: FileId, name: &[u8]) -> Result<()> {
        let Some(mut rec) = self.journal.file(id)? else {
            return Ok(());
        };
        if !journal::names(&rec).any(|n| n == name) {
            rec.more_names.push(name.to_vec());
            self.journal.put_file(id, &rec)?;
        }
        Ok(())
    }

    /// The name `path` of a tracked regular file went away: returns its id
    /// (for the record). When no name is left the file is forgotten;
    /// otherwise, if `path` was the name its blocks ship under, its next
    /// name takes that place, so they never ship to a removed name.
    fn name_gone(&self, gone: Option<Gone>, path: &[u8], failed: &mut Failures) -> Option<FileId> {
        let gone = gone?;
        let id = failed.keep(self.journal.file_by_ino(gone.ino)).flatten()?;
        if gone.last_link {
            failed.keep(self.journal.remove_file(id));
            self.tracker.forget(id);
            return Some(id);
        }
        let mut rec = failed.keep(self.journal.file(id)).flatten()?;
        if rec.path == path {
            if rec.more_names.is_empty() {
                // Its other names were made behind hbrfs's back; the next
                // mount's scan finds them.
                log::warn!(
                    "{}: removed, and no other name of file {id:?} is known: it keeps this name until the next mount",
                    String::from_utf8_lossy(path)
                );
                return Some(id);
            }
            rec.path = rec.more_names.remove(0);
            if let Some(t) = self.tracker.file(id) {
                t.renamed(rec.path.clone());
            }
        } else {
            rec.more_names.retain(|n| n != path);
        }
        failed.keep(self.journal.put_file(id, &rec));
        Some(id)
    }

    /// Updates the names of tracked files at or below `from` (and, for an
    /// exchange, below `to`) after a rename. Costs the files below the renamed path (the journal's path index),
    /// not every file of the datastore. Both sides of an exchange are
    /// looked up before any record moves.
    fn repath(&self, from: &[u8], to: &[u8], exchange: bool, failed: &mut Failures) {
        let Some(mut files) = failed.keep(self.journal.files_under(from)) else {
            return;
        };
        if exchange {
            let Some(others) = failed.keep(self.journal.files_under(to)) else {
                return;
            };
            files.extend(others);
            files.sort_by_key(|(id, _)| *id);
            files.dedup_by_key(|(id, _)| *id);
        }
        let moved = |path: &[u8], a: &[u8], b: &[u8]| -> Option<Vec<u8>> {
            let rest = path.strip_prefix(a)?;
            (rest.is_empty() || rest[0] == b'/').then(|| [b, rest].concat())
        };
        for (id, mut rec) in files {
            let new_name = |name: &[u8]| {
                moved(name, from, to)
                    .or_else(|| exchange.then(|| moved(name, to, from)).flatten())
                    .unwrap_or_else(|| name.to_vec())
            };
            let path = new_name(&rec.path);
            let mut more: Vec<Vec<u8>> = rec.more_names.iter().map(|n| new_name(n)).collect();
            // A rename onto another name of the same file leaves one name.
            more.sort();
            more.dedup();
            more.retain(|n| *n != path);
            if path != rec.path {
                if let Some(t) = self.tracker.file(id) {
                    t.renamed(path.clone());
                }
            }
            rec.path = path;
            rec.more_names = more;
            failed.keep(self.journal.put_file(id, &rec));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::datastore::Access;

    /// Records that the name `path` of the file with backing inode `ino`
    /// went away.
    fn unlink(ds: &Datastore, path: &[u8], ino: u64, last_link: bool) {
        let file = Some(Gone { ino, last_link });
        ds.record(&Change::Unlinked { path, file }).unwrap();
    }

    #[test]
    fn recorded_rename_moves_tracked_paths_and_unlinking_the_last_name_forgets_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        let img = dir.path().join("a/img");
        fs::write(&img, b"x").unwrap();
        let ino = fs::metadata(&img).unwrap().ino();
        let dir_ino = fs::metadata(dir.path().join("a")).unwrap().ino();
        let ds = Datastore::open(dir.path(), Access::Daemon { block_size: None }).unwrap();
        ds.start().unwrap();
        let id = ds.tracked(ino).unwrap().expect("found by the scan").id();

        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let rename = Change::Renamed {
            from: b"a",
            to: b"b",
            flags: 0,
            ino: dir_ino,
            replaced: None,
        };
        ds.record(&rename).unwrap();
        assert_eq!(ds.journal.file(id).unwrap().unwrap().path, b"b/img");

        unlink(&ds, b"b/img", ino, true);
        assert!(ds.tracked(ino).unwrap().is_none());
        assert!(ds.journal.file(id).unwrap().is_none());
        let ops: Vec<_> = ds
            .journal
            .ops()
            .unwrap()
            .into_iter()
            .map(|(_, op)| op)
            .collect();
        let last = &ops[ops.len() - 2..];
        assert_eq!(last[0].kind, OpKind::Rename as i32);
        assert_eq!(
            (&last[0].path[..], &last[0].target[..]),
            (&b"a"[..], &b"b"[..])
        );
        assert_eq!(last[1].kind, OpKind::Unlink as i32);
        assert_eq!(last[1].file_id, id.0);
    }

    #[test]
    fn a_file_keeps_every_name_and_ships_under_one_that_remains() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, b"x").unwrap();
        let ino = fs::metadata(&a).unwrap().ino();
        let ds = Datastore::open(dir.path(), Access::Daemon { block_size: None }).unwrap();
        ds.start().unwrap();
        let id = ds.tracked(ino).unwrap().expect("found by the scan").id();
        let names = |ds: &Datastore| {
            let rec = ds.journal.file(id).unwrap().unwrap();
            journal::names(&rec).map(<[u8]>::to_vec).collect::<Vec<_>>()
        };

        fs::hard_link(&a, dir.path().join("b")).unwrap();
        let linked = Change::Linked {
            file: Some(id),
            from: None,
            to: b"b",
        };
        ds.record(&linked).unwrap();
        assert_eq!(names(&ds), [b"a".to_vec(), b"b".to_vec()]);
        let rename = Change::Renamed {
            from: b"b",
            to: b"c",
            flags: 0,
            ino,
            replaced: None,
        };
        ds.record(&rename).unwrap();
        assert_eq!(names(&ds), [b"a".to_vec(), b"c".to_vec()]);

        // The name it ships under goes: the other one takes its place.
        unlink(&ds, b"a", ino, false);
        assert_eq!(names(&ds), [b"c".to_vec()]);
        ds.tracker.cut().unwrap();
        assert_eq!(ds.tracker.file(id).unwrap().at_cut().0, b"c");
        let mut ops = ds.journal.ops().unwrap().into_iter().map(|(_, op)| op);
        let link = ops.rfind(|op| op.kind == OpKind::Link as i32).unwrap();
        assert_eq!((&link.path[..], &link.target[..]), (&b"a"[..], &b"b"[..]));
    }
}
