//! The mount-time scan: reconciles the journal with what is really in the
//! backing directory (moved, gone and untracked files), loads every bitmap,
//! removes orphan bitmaps, and reports what it found.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;

use super::Datastore;
use super::recorder::op_record;
use crate::error::{IoContext, Result};
use crate::ids::FileId;
use crate::proto::journal::{OpKind, OpRecord};
use crate::state::walk_files;
use crate::tracking::FileSource;

impl Datastore {
    pub(super) fn reconcile(&self) -> Result<ScanReport> {
        let mut found: HashMap<u64, (Vec<u8>, u64)> = HashMap::new();
        walk_files(&self.root, &mut |rel, meta| {
            found.entry(meta.ino()).or_insert((rel, meta.len()));
        })?;
        let mut report = ScanReport::default();
        let bs = self.format.block_size.bytes();
        for (id, mut record) in self.journal.files()? {
            match found.remove(&record.backing_ino) {
                Some((path, size)) => {
                    if path != record.path {
                        self.found_op(OpKind::Rename, Some(id), &record.path, &path)?;
                        record.path = path.clone();
                        self.journal.put_file(id, &record)?;
                        report.moved += 1;
                    }
                    let source = FileSource {
                        reader: Some(self.open_reader(&path)?),
                        path: path.clone(),
                        size,
                    };
                    let (_, problem) = self.tracker.load(id, source)?;
                    if let Some(problem) = problem {
                        log::warn!(
                            "{}: {problem}; treating all of it as dirty",
                            String::from_utf8_lossy(&record.path)
                        );
                        report.bitmaps_rebuilt += 1;
                    }
                    report.tracked += 1;
                }
                None => {
                    self.found_op(OpKind::Unlink, Some(id), &record.path, b"")?;
                    self.journal.remove_file(id)?;
                    self.tracker.forget(id);
                    report.gone += 1;
                }
            }
        }
        for (ino, (path, size)) in found {
            let file = self.track_file(ino, &path, size, self.open_reader(&path)?)?;
            self.found_op(OpKind::Create, Some(file.id), &path, b"")?;
            report.untracked_blocks += size.div_ceil(bs);
            report.untracked += 1;
            report.tracked += 1;
        }
        // Modes, owners, times and xattrs may have changed while nothing
        // was mounted, unseen: the next point reads the metadata of every
        // path (a metadata record of the root found at mount says so).
        self.found_op(OpKind::Meta, None, b"", b"")?;
        self.remove_orphan_bitmaps()?;
        if report.untracked > 0 {
            let why = if self.fresh {
                "the state folder is new"
            } else {
                "they changed while hbrfs was not running, or their state was lost"
            };
            log::warn!(
                "{} file(s) without tracking state ({why}): all {} of their blocks are dirty and will be replicated in full",
                report.untracked,
                report.untracked_blocks
            );
        }
        Ok(report)
    }

    /// Removes bitmaps whose file id the journal no longer knows (a crash
    /// between creating a bitmap and recording its file).
    fn remove_orphan_bitmaps(&self) -> Result<()> {
        let dir = self.paths.bitmaps();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .map(FileId);
            if id.is_none_or(|id| self.tracker.file(id).is_none()) {
                log::info!("removing orphan bitmap {}", path.display());
                fs::remove_file(&path).at(&path)?;
            }
        }
        Ok(())
    }

    fn open_reader(&self, rel: &[u8]) -> Result<File> {
        let path = self.root.join(std::ffi::OsStr::from_bytes(rel));
        File::open(&path).at(path)
    }

    /// Records what the scan found in the open epoch, marked as found at
    /// mount (not seen through the mount).
    fn found_op(&self, kind: OpKind, id: Option<FileId>, path: &[u8], target: &[u8]) -> Result<()> {
        self.append_op(OpRecord {
            found_at_mount: true,
            ..op_record(kind, id, path, target, 0)
        })
    }
}

/// What the mount-time scan found.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanReport {
    /// Files tracked after the scan.
    pub tracked: u64,
    /// Files found without state (new id, fully dirty).
    pub untracked: u64,
    /// Blocks those files hold.
    pub untracked_blocks: u64,
    /// Known files found under another path.
    pub moved: u64,
    /// Known files no longer there.
    pub gone: u64,
    /// Bitmaps that were missing or unreadable.
    pub bitmaps_rebuilt: u64,
}
