//! The mount-time scan: reconciles the journal with what is really in the
//! backing directory (moved, gone and untracked files), loads every bitmap,
//! removes orphan bitmaps, and reports what it found.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use super::Datastore;
use super::recorder::op_record;
use crate::error::{Error, IoContext, Result};
use crate::ids::FileId;
use crate::journal::names;
use crate::proto::journal::{FileRecord, OpKind, OpRecord};
use crate::state::{open_beneath, open_root, walk_files};
use crate::tracking::FileSource;
use crate::wire::MAX_PATH;

/// A regular file the scan found: its names and its size.
type Found = (Vec<Vec<u8>>, u64);

impl Datastore {
    pub(super) fn reconcile(&self) -> Result<ScanReport> {
        let mut found = self.found_files()?;
        let mut report = ScanReport::default();
        let bs = self.format.block_size.bytes();
        let root = open_root(&self.root).at(&self.root)?;
        for (id, mut record) in self.journal.files()? {
            match found.remove(&record.backing_ino) {
                Some((names, size)) => {
                    if self.rename_found(id, &mut record, &names)? {
                        report.moved += 1;
                    }
                    let source = FileSource {
                        reader: Some(self.open_reader(root.as_fd(), &record.path)?),
                        path: record.path.clone(),
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
                    for name in names(&record) {
                        self.found_op(OpKind::Unlink, Some(id), name, b"")?;
                    }
                    self.journal.remove_file(id)?;
                    self.tracker.forget(id);
                    report.gone += 1;
                }
            }
        }
        for (ino, (mut names, size)) in found {
            let path = names.remove(0);
            let reader = self.open_reader(root.as_fd(), &path)?;
            let file = self.track_file(ino, &path, size, reader)?;
            self.found_op(OpKind::Create, Some(file.id), &path, b"")?;
            self.links_found(file.id, &path, names)?;
            report.untracked_blocks += size.div_ceil(bs);
            report.untracked += 1;
            report.tracked += 1;
        }
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

    /// Every name of every regular file below the root (sorted), by
    /// backing inode (a file with several links is one file with several
    /// names), with its size. A path longer than [`MAX_PATH`] refuses the mount: it
    /// could not be replicated.
    fn found_files(&self) -> Result<HashMap<u64, Found>> {
        let mut found: HashMap<u64, Found> = HashMap::new();
        let mut too_long = None;
        walk_files(&self.root, &mut |rel, st| {
            if rel.len() > MAX_PATH {
                too_long.get_or_insert(rel.clone());
            }
            let entry = found.entry(st.st_ino).or_default();
            entry.0.push(rel);
            entry.1 = st.st_size as u64;
        })?;
        if let Some(rel) = too_long {
            return Err(Error::BadState {
                path: self.root.join(OsStr::from_bytes(&rel)),
                reason: format!(
                    "a path longer than {MAX_PATH} bytes below the datastore cannot be replicated; move it higher up"
                ),
            });
        }
        for (names, _) in found.values_mut() {
            names.sort();
        }
        Ok(found)
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

    /// Opens the backing file `rel` for reading, walking from `root` by
    /// descriptors (the root's path joined to `rel` may exceed PATH_MAX).
    fn open_reader(&self, root: BorrowedFd<'_>, rel: &[u8]) -> Result<File> {
        let path = self.root.join(OsStr::from_bytes(rel));
        open_beneath(root, rel, libc::O_RDONLY, 0)
            .map(File::from)
            .at(path)
    }

    /// Brings a known file's names in line with the `found` ones (sorted,
    /// at least one), recording what changed as found at mount: its
    /// shipping name stays if found, else another known name takes its
    /// place, else it is renamed to the first found; names no longer there
    /// are unlinked, new ones linked. Returns whether the shipping name
    /// moved.
    fn rename_found(&self, id: FileId, record: &mut FileRecord, found: &[Vec<u8>]) -> Result<bool> {
        let known: Vec<Vec<u8>> = names(record).map(<[u8]>::to_vec).collect();
        if known.iter().all(|n| found.contains(n)) && found.iter().all(|n| known.contains(n)) {
            return Ok(false);
        }
        let kept = known.iter().find(|n| found.contains(n));
        let path = match kept {
            Some(name) => name.clone(),
            None => {
                self.found_op(OpKind::Rename, Some(id), &record.path, &found[0])?;
                found[0].clone()
            }
        };
        let mut new = found.to_vec();
        new.retain(|n| *n != path && !known.contains(n));
        for stale in known
            .iter()
            .filter(|n| !found.contains(n) && **n != record.path)
        {
            self.found_op(OpKind::Unlink, Some(id), stale, b"")?;
        }
        if kept.is_some_and(|k| *k != record.path) {
            self.found_op(OpKind::Unlink, Some(id), &record.path, b"")?;
        }
        let moved = path != record.path;
        record.more_names = found.iter().filter(|n| **n != path).cloned().collect();
        record.path = path;
        self.journal.put_file(id, record)?;
        self.links_found(id, &record.path, new)?;
        Ok(moved)
    }

    /// Records the other names `more` of the file `id` (at `path`) found
    /// at mount: links on the secondary too, and names in the journal.
    fn links_found(&self, id: FileId, path: &[u8], more: Vec<Vec<u8>>) -> Result<()> {
        if more.is_empty() {
            return Ok(());
        }
        for name in &more {
            self.found_op(OpKind::Link, Some(id), path, name)?;
        }
        if let Some(mut rec) = self.journal.file(id)? {
            for name in more {
                if !names(&rec).any(|n| n == name) {
                    rec.more_names.push(name);
                }
            }
            self.journal.put_file(id, &rec)?;
        }
        Ok(())
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
