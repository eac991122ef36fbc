//! The datastore as the mount's [`ChangeRecorder`]: namespace changes go
//! to the journal in the open epoch, and tracked files follow renames and
//! removals.

use super::Datastore;
use crate::error::{Error, Result};
use crate::fs::recorder::{Change, ChangeRecorder, Gate, Gone, NewFile, Tracked};
use crate::ids::FileId;
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
            Change::Node { path } => self.record_op(OpKind::Create, None, path, b"", 0),
            Change::Mkdir { path } => self.record_op(OpKind::Mkdir, None, path, b"", 0),
            Change::Rmdir { path } => self.record_op(OpKind::Rmdir, None, path, b"", 0),
            Change::Symlink { path, target } => {
                self.record_op(OpKind::Symlink, None, path, target, 0)
            }
            Change::Truncated { file, path, size } => {
                self.record_op(OpKind::Truncate, file, path, b"", size)
            }
            Change::Linked { file, from, to } => self.record_op(OpKind::Link, file, from, to, 0),
            Change::Unlinked { path, file } => {
                let mut failed = Failures::default();
                let id = self.name_gone(file, &mut failed);
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
                self.name_gone(replaced, &mut failed);
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
    /// A name of a tracked regular file went away: returns its id (for the
    /// record), and when no name is left, forgets the file.
    fn name_gone(&self, gone: Option<Gone>, failed: &mut Failures) -> Option<FileId> {
        let gone = gone?;
        let id = failed.keep(self.journal.file_by_ino(gone.ino)).flatten()?;
        if gone.last_link {
            failed.keep(self.journal.remove_file(id));
            self.tracker.forget(id);
        }
        Some(id)
    }

    /// Updates the paths of tracked files at or below `from` (and, for an
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
            let new = moved(&rec.path, from, to)
                .or_else(|| exchange.then(|| moved(&rec.path, to, from)).flatten());
            if let Some(new) = new {
                if let Some(t) = self.tracker.file(id) {
                    t.renamed(new.clone());
                }
                rec.path = new;
                failed.keep(self.journal.put_file(id, &rec));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::datastore::Access;

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

        let gone = Some(Gone {
            ino,
            last_link: true,
        });
        ds.record(&Change::Unlinked {
            path: b"b/img",
            file: gone,
        })
        .unwrap();
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
}
