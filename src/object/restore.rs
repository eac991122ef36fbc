//! `hbrfs restore s3://… POINT DIR`: one point written out whole as plain
//! files, which then seed a replica (`hbrfs serve DIR` indexes what is
//! there when a primary pairs, so the baseline sends only the blocks that
//! differ) or back a fresh primary (`hbrfs mount DIR …`: its uploads to
//! the same repository dedup against the blocks already there).
//!
//! - **All or nothing.** The point is written into
//!   `PARENT/.NAME.hbrfs-restore-partial` and renamed to `DIR` only once
//!   every entry, its data and its metadata are written and synced; a
//!   restore that fails leaves that folder (named in the error, removed
//!   by the next restore into `DIR`) and no `DIR` that looks complete.
//!   `DIR` must be absent or empty (an empty folder is replaced).
//! - **Entries.** Folders, regular files (sparse: zero blocks are not
//!   written), hard links (names of one file id), symlinks, fifos and
//!   sockets; device nodes when the process may make them (else skipped
//!   with a warning, as a replica does without `--allow-devices`). Modes
//!   and times are the point's; owners too when running as root.
//! - **Throughput.** Blocks are fetched [`SEGMENT_BLOCKS`] at a time per
//!   task, neighbours of one pack in one GET, [`SEGMENTS_IN_FLIGHT`]
//!   tasks at once, whatever the number of files.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};

use crate::error::{Error, IoContext, Result};
use crate::proto::points::Entry;
use crate::state::{ShortPath, open_root, parent_beneath, stat_beneath};
use crate::sys::{self, TimeSpec};

use super::read::PointReader;

/// Blocks one task fetches and writes at a time (4 MiB at 64 KiB blocks).
pub const SEGMENT_BLOCKS: u64 = 64;
/// Tasks in flight (each with its merged GETs).
pub const SEGMENTS_IN_FLIGHT: usize = 8;

/// What a restore wrote.
#[derive(Debug, Default)]
pub struct Restored {
    /// Entries made (every name, the root aside).
    pub entries: u64,
    /// Regular files (once per file id).
    pub files: u64,
    /// Their sizes, summed.
    pub bytes: u64,
    /// Bytes of non-zero blocks written.
    pub data_bytes: u64,
    /// Device nodes left out (not permitted).
    pub devices_skipped: u64,
    /// Ranged GETs and the bytes they fetched.
    pub gets: u64,
    /// Bytes fetched from the store.
    pub fetched: u64,
    /// Wall time, seconds.
    pub secs: f64,
}

/// The folder a restore into `dir` fills before it is renamed to `dir`.
pub fn partial_of(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        Error::Usage(format!(
            "{}: restore into a named folder, not a root",
            dir.display()
        ))
    })?;
    let mut partial = OsStr::new(".").to_os_string();
    partial.push(name);
    partial.push(".hbrfs-restore-partial");
    Ok(dir.with_file_name(partial))
}

/// Checks that `dir` is absent or an empty folder.
fn check_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(Error::Usage(format!(
                "{} is not empty: restore into an empty or absent folder",
                dir.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(Error::Usage(format!(
            "{} is not a folder: restore into an empty or absent folder",
            dir.display()
        ))),
        Err(e) => Err(e).at(dir),
    }
}

/// Writes the point of `reader` into `dir` (absent or empty): see the
/// module's doc.
pub async fn restore(reader: Arc<PointReader>, dir: &Path) -> Result<Restored> {
    let started = Instant::now();
    check_target(dir)?;
    let partial = partial_of(dir)?;
    if partial.exists() {
        log::warn!(
            "removing {}, left by a restore that did not finish",
            partial.display()
        );
        std::fs::remove_dir_all(&partial).at(&partial)?;
    }
    std::fs::create_dir(&partial).at(&partial)?;
    let root = open_root(&partial).at(&partial)?;
    let mut done = Restored::default();
    let files = make_entries(&reader, &root, &partial, &mut done)?;
    done.files = files.len() as u64;
    let mut segments = Vec::new();
    for (file_id, (rel, file)) in &files {
        let size = reader.file(*file_id)?.size;
        done.bytes += size;
        file.set_len(size)
            .at(partial.join(OsStr::from_bytes(rel)))?;
        let blocks = size.div_ceil(reader.repo().block_size());
        let mut first = 0;
        while first < blocks {
            let last = (first + SEGMENT_BLOCKS).min(blocks);
            segments.push((*file_id, first..last));
            first = last;
        }
    }
    let written: Vec<u64> = futures_util::stream::iter(segments.into_iter().map(|(id, blocks)| {
        let reader = reader.clone();
        let (rel, file) = &files[&id];
        let path = partial.join(OsStr::from_bytes(rel));
        async move { write_segment(&reader, id, blocks, file, &path).await }
    }))
    .buffer_unordered(SEGMENTS_IN_FLIGHT)
    .try_collect()
    .await?;
    done.data_bytes = written.iter().sum();
    set_metadata(&reader, &root, &partial)?;
    let synced = File::open(&partial).at(&partial)?;
    sys::syncfs(synced.as_fd()).at(&partial)?;
    std::fs::rename(&partial, dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(
            e.kind(),
            format!(
                "renaming the finished restore {} to it: {e}",
                partial.display()
            ),
        ),
    })?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
    }
    let f = reader.fetched();
    done.gets = f.gets.load(Ordering::Relaxed);
    done.fetched = f.bytes.load(Ordering::Relaxed);
    done.secs = started.elapsed().as_secs_f64();
    Ok(done)
}

/// Fetches the non-zero blocks `blocks` of file `id` and writes them into
/// `file`; returns the bytes written.
async fn write_segment(
    reader: &PointReader,
    id: u64,
    blocks: std::ops::Range<u64>,
    file: &File,
    path: &Path,
) -> Result<u64> {
    let fm = reader.file(id)?;
    let bs = reader.repo().block_size();
    let hashes = reader.block_hashes(fm, blocks.clone()).await?;
    let wanted: Vec<_> = blocks
        .zip(hashes)
        .filter_map(|(b, h)| h.map(|h| (b, h)))
        .collect();
    let located = reader.locate_blocks(id, &wanted).await?;
    let mut content = HashMap::with_capacity(located.len());
    reader
        .fetch_located(&located, |h, raw| {
            content.insert(h, raw);
        })
        .await?;
    let mut written = 0;
    for (block, h) in wanted {
        let start = block * bs;
        let need = (fm.size.min(start + bs) - start) as usize;
        let raw = content.get(&h).map(Vec::as_slice).unwrap_or_default();
        if raw.len() < need {
            return Err(Error::BadState {
                path: path.to_path_buf(),
                reason: format!(
                    "{}: block {block} holds {} bytes, the file's size needs {need}",
                    reader.name(),
                    raw.len()
                ),
            });
        }
        file.write_all_at(&raw[..need], start).at(path)?;
        written += need as u64;
    }
    Ok(written)
}

/// Makes every entry of the point below `root` (folders private until
/// [`set_metadata`]); returns each regular file's first name and its
/// open file, by file id.
fn make_entries(
    reader: &PointReader,
    root: &OwnedFd,
    partial: &Path,
    done: &mut Restored,
) -> Result<HashMap<u64, (Vec<u8>, File)>> {
    let mut files: HashMap<u64, (Vec<u8>, File)> = HashMap::new();
    for e in reader.namespace() {
        let at = || partial.join(OsStr::from_bytes(&e.path));
        let (dir, name) =
            parent_beneath(root.as_fd(), &e.path, None).map_err(|err| Error::BadState {
                path: at(),
                reason: format!("{}: entry {:?}: {err}", reader.name(), shown(e)),
            })?;
        done.entries += 1;
        match e.mode & libc::S_IFMT {
            libc::S_IFDIR => sys::mkdirat(dir.as_fd(), name, 0o700).at(at())?,
            libc::S_IFREG => match files.get(&e.ino) {
                Some((first, _)) => {
                    let (fdir, fname) = parent_beneath(root.as_fd(), first, None).at(at())?;
                    sys::linkat(fdir.as_fd(), fname, dir.as_fd(), name).at(at())?;
                }
                None => {
                    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                    let fd = sys::openat(Some(dir.as_fd()), name, flags, 0o600).at(at())?;
                    files.insert(e.ino, (e.path.clone(), File::from(fd)));
                }
            },
            libc::S_IFLNK => {
                let target = Path::new(OsStr::from_bytes(&e.target));
                sys::symlinkat(target, dir.as_fd(), name).at(at())?;
            }
            libc::S_IFIFO | libc::S_IFSOCK => {
                sys::mknodat(dir.as_fd(), name, e.mode & libc::S_IFMT | 0o600, 0).at(at())?
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                match sys::mknodat(dir.as_fd(), name, e.mode, e.rdev) {
                    Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                        log::warn!("{}: device node left out (not permitted)", at().display());
                        done.devices_skipped += 1;
                        done.entries -= 1;
                    }
                    other => other.at(at())?,
                }
            }
            other => {
                return Err(Error::BadState {
                    path: at(),
                    reason: format!(
                        "{}: entry {:?} of unknown type {other:o}",
                        reader.name(),
                        shown(e)
                    ),
                });
            }
        }
    }
    Ok(files)
}

fn shown(e: &Entry) -> String {
    String::from_utf8_lossy(&e.path).into_owned()
}

/// Gives every entry, then the root, the point's modes, owners (as root)
/// and times: children before their folders, so a folder's time is not
/// changed again and a read-only folder does not block its children.
fn set_metadata(reader: &PointReader, root: &OwnedFd, partial: &Path) -> Result<()> {
    let as_root = sys::euid() == 0;
    let mut seen = std::collections::HashSet::new();
    let rootless = Entry::default();
    let top = reader.manifest().root.as_ref().unwrap_or(&rootless);
    let entries = reader.namespace().iter().rev().chain([top]);
    for e in entries {
        let kind = e.mode & libc::S_IFMT;
        if kind == libc::S_IFREG && !seen.insert(e.ino) {
            continue;
        }
        let missing = [libc::S_IFCHR, libc::S_IFBLK].contains(&kind)
            && stat_beneath(root.as_fd(), &e.path).is_err();
        if missing {
            continue;
        }
        let at = partial.join(OsStr::from_bytes(&e.path));
        let short = ShortPath::beneath(root.as_fd(), &e.path, None).at(&at)?;
        if as_root {
            sys::lchown(short.path(), e.uid, e.gid).at(&at)?;
        }
        if kind != libc::S_IFLNK && e.mode != 0 {
            std::fs::set_permissions(
                short.path(),
                std::os::unix::fs::PermissionsExt::from_mode(e.mode & 0o7777),
            )
            .at(&at)?;
        }
        let t = TimeSpec::At(
            e.mtime_ns.div_euclid(1_000_000_000),
            e.mtime_ns.rem_euclid(1_000_000_000),
        );
        sys::utimens_nofollow(short.path(), t, t).at(&at)?;
    }
    Ok(())
}
