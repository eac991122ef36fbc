//! Rolls the live replica back to an older retained point (`hbrfs promote
//! --point P`): the namespace made P's, then every block any later point
//! changed written back from the undo chain, then sizes and metadata.
//! The cost follows what changed after P, never the size of the images.
//!
//! Files of P that later points renamed, replaced or removed are kept by
//! hard links first (in `points/rollback/`, or already in a point's kept
//! files), so removing what P did not have never loses what it had. Every
//! step is idempotent: a rollback interrupted by a crash is run again.
//! The caller holds the folder's daemon lock (no apply runs).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::namespace::{self, is_file};
use super::store::{PointsPaths, read_catalog, write_catalog};
use super::undo::read_index;
use super::view::PointView;
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::proto::points::Entry;
use crate::state::{ReplicaPaths, open_root, parent_beneath};
use crate::sys;

/// What a rollback changed in the live replica: what differs now from
/// what the primary that wrote the later points holds, for the new
/// primary to mark dirty.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RolledBack {
    /// Regular files whose blocks were written back (by path in the
    /// point), with the block numbers.
    pub blocks: Vec<(Vec<u8>, Vec<u64>)>,
    /// Paths whose entry the rollback removed, made again or changed.
    pub paths: Vec<Vec<u8>>,
}

/// Rolls the replica at `root` (pair block size `block_size`) back to
/// retained point `to`; the points after it are dropped. Rolling back to
/// the newest point changes nothing.
pub fn rollback_to(root: &Path, to: Epoch, block_size: u64) -> Result<RolledBack> {
    let paths = PointsPaths::new(ReplicaPaths::of(root).points());
    let points = read_catalog(&paths)?;
    if points.iter().filter(|p| p.epoch >= to.0).count() <= 1 {
        return Ok(RolledBack::default());
    }
    let _views_out = super::store::lock(&paths.lock(), libc::LOCK_EX)?;
    roll_back(root, to, block_size, points, &|_| true)
}

/// Rolls the replica at `root` back to its newest recorded point, undoing
/// a point that was being applied in place when a stream broke or the
/// secondary stopped (see `replica::apply`): the newest point's undo
/// holds the old content of every block that apply overwrote, and its
/// kept files what it removed. Only entries at or below a path for which
/// `touched` holds (what the point's operations and files name) are
/// removed: what else is there, the point did not make. Returns the point
/// rolled back to, if any. The caller holds the points lock exclusively.
pub fn undo_in_flight(
    root: &Path,
    block_size: u64,
    touched: &dyn Fn(&[u8]) -> bool,
) -> Result<Option<Epoch>> {
    let paths = PointsPaths::new(ReplicaPaths::of(root).points());
    let points = read_catalog(&paths)?;
    let Some(newest) = points.last().map(|p| Epoch(p.epoch)) else {
        return Ok(None);
    };
    roll_back(root, newest, block_size, points, touched)?;
    Ok(Some(newest))
}

/// [`rollback_to`] once the catalog `points` is read.
fn roll_back(
    root: &Path,
    to: Epoch,
    block_size: u64,
    points: Vec<crate::proto::points::PointRecord>,
    touched: &dyn Fn(&[u8]) -> bool,
) -> Result<RolledBack> {
    let paths = PointsPaths::new(ReplicaPaths::of(root).points());
    let view = PointView::open_to_settle(root, to.0, block_size)?;
    let later: Vec<_> = points.iter().filter(|p| p.epoch >= to.0).collect();
    let mut changed: HashMap<u64, Vec<u64>> = HashMap::new();
    for p in &later {
        let (index, _) = read_index(&paths.undo_index(p.epoch, p.generation))?;
        for (ino, block) in index.into_keys() {
            changed.entry(ino).or_default().push(block);
        }
    }
    let kept: Vec<PathBuf> = later
        .iter()
        .map(|p| paths.kept_files(p.epoch, p.generation))
        .collect();
    let attic = paths.dir.join("rollback");
    crate::state::make_state_dirs(&attic)?;
    let mut done = RolledBack::default();
    let root_fd = open_root(root).at(root)?;
    let rollback = Rollback {
        root,
        root_fd: &root_fd,
        attic: &attic,
        kept: &kept,
    };
    rollback.keep_files(view.entries())?;
    rollback.remove_others(view.entries(), touched, &mut done.paths)?;
    rollback.make_missing(view.entries(), &mut done.paths)?;
    for e in view.entries().iter().filter(|e| is_file(e)) {
        let mut blocks = changed.remove(&e.ino).unwrap_or_default();
        blocks.retain(|b| b * block_size < e.size);
        blocks.sort_unstable();
        blocks.dedup();
        rollback.write_back(&view, e, &blocks, block_size)?;
        if !blocks.is_empty() {
            done.blocks.push((e.path.clone(), blocks));
        }
    }
    rollback.set_metadata(view.entries())?;
    let synced = File::open(root).and_then(|r| sys::syncfs(r.as_fd()));
    synced.at(root)?;
    let mut kept_points: Vec<_> = points.into_iter().filter(|p| p.epoch <= to.0).collect();
    if let Some(newest) = kept_points.last_mut() {
        newest.generation += 1;
        newest.undo_bytes = 0;
        newest.undo_blocks = 0;
    }
    write_catalog(&paths, &kept_points)?;
    drop(view);
    super::retention::remove_unnamed(&paths, &kept_points)?;
    fs::remove_dir_all(&attic).at(&attic)?;
    Ok(done)
}

/// The parts of one rollback.
struct Rollback<'a> {
    root: &'a Path,
    root_fd: &'a OwnedFd,
    /// Links to the point's files that are live, by inode.
    attic: &'a Path,
    /// The kept-files folders of the point and every later one.
    kept: &'a [PathBuf],
}

impl Rollback<'_> {
    fn shown(&self, rel: &[u8]) -> PathBuf {
        self.root.join(OsStr::from_bytes(rel))
    }

    /// Links every file of the point that is live into the attic, by
    /// inode, before anything is removed.
    fn keep_files(&self, entries: &[Entry]) -> Result<()> {
        let wanted: HashMap<u64, &Entry> = entries
            .iter()
            .filter(|e| is_file(e))
            .map(|e| (e.ino, e))
            .collect();
        for live in namespace::of(self.root)?
            .entries
            .iter()
            .filter(|e| is_file(e))
        {
            let link = self.attic.join(live.ino.to_string());
            if wanted.contains_key(&live.ino) && !link.exists() {
                let (dir, name) = self.parent(&live.path)?;
                let attic = File::open(self.attic).at(self.attic)?;
                sys::linkat(
                    dir.as_fd(),
                    name,
                    attic.as_fd(),
                    OsStr::new(&live.ino.to_string()),
                )
                .at(&link)?;
            }
        }
        Ok(())
    }

    fn parent<'r>(&self, rel: &'r [u8]) -> Result<(OwnedFd, &'r OsStr)> {
        parent_beneath(self.root_fd.as_fd(), rel, None).at(self.shown(rel))
    }

    /// Removes, deepest first, every live entry the point does not have
    /// as it is (another type, another file, another symlink target),
    /// among those `touched` names.
    fn remove_others(
        &self,
        entries: &[Entry],
        touched: &dyn Fn(&[u8]) -> bool,
        changed: &mut Vec<Vec<u8>>,
    ) -> Result<()> {
        let wanted: HashMap<&[u8], &Entry> =
            entries.iter().map(|e| (e.path.as_slice(), e)).collect();
        let live = namespace::of(self.root)?;
        for e in live.entries.iter().rev() {
            let same = wanted.get(e.path.as_slice()).is_some_and(|w| {
                let kind = |m: u32| m & libc::S_IFMT;
                kind(w.mode) == kind(e.mode)
                    && (!is_file(w) || w.ino == e.ino)
                    && w.target == e.target
                    && w.rdev == e.rdev
            });
            if !same && touched(&e.path) {
                let (dir, name) = self.parent(&e.path)?;
                let is_dir = e.mode & libc::S_IFMT == libc::S_IFDIR;
                sys::unlinkat(dir.as_fd(), name, is_dir).at(self.shown(&e.path))?;
                changed.push(e.path.clone());
            }
        }
        Ok(())
    }

    /// Makes, parents first, every entry of the point that is not there.
    fn make_missing(&self, entries: &[Entry], changed: &mut Vec<Vec<u8>>) -> Result<()> {
        for e in entries {
            let (dir, name) = self.parent(&e.path)?;
            if sys::statat(dir.as_fd(), name).is_ok() {
                continue;
            }
            let shown = self.shown(&e.path);
            match e.mode & libc::S_IFMT {
                libc::S_IFDIR => sys::mkdirat(dir.as_fd(), name, 0o700).at(&shown)?,
                libc::S_IFREG => self.link_file(e, &dir, name)?,
                libc::S_IFLNK => {
                    let target = Path::new(OsStr::from_bytes(&e.target));
                    sys::symlinkat(target, dir.as_fd(), name).at(&shown)?
                }
                kind => sys::mknodat(dir.as_fd(), name, kind | 0o600, e.rdev).at(&shown)?,
            }
            changed.push(e.path.clone());
        }
        Ok(())
    }

    /// Links file `e` back at its path, from the attic or a point's kept
    /// files.
    fn link_file(&self, e: &Entry, dir: &OwnedFd, name: &OsStr) -> Result<()> {
        let ino = e.ino.to_string();
        let from = std::iter::once(self.attic.to_path_buf())
            .chain(self.kept.iter().cloned())
            .map(|d| d.join(&ino))
            .find(|p| p.exists())
            .ok_or_else(|| Error::BadState {
                path: self.shown(&e.path),
                reason: format!("inode {ino} of the point is neither live nor kept"),
            })?;
        let (from_dir, from_name) = (
            from.parent().unwrap_or(Path::new("/")),
            from.file_name().unwrap_or_default(),
        );
        let from_dir = File::open(from_dir).at(from_dir)?;
        sys::linkat(from_dir.as_fd(), from_name, dir.as_fd(), name).at(self.shown(&e.path))
    }

    /// Writes the point's content of `blocks` into file `e` and gives it
    /// the point's size (synced with everything else by one `syncfs`).
    fn write_back(
        &self,
        view: &PointView,
        e: &Entry,
        blocks: &[u64],
        block_size: u64,
    ) -> Result<()> {
        let shown = self.shown(&e.path);
        let (dir, name) = self.parent(&e.path)?;
        if blocks.is_empty() && sys::statat(dir.as_fd(), name).at(&shown)?.st_size as u64 == e.size
        {
            return Ok(());
        }
        let fd = sys::openat(
            Some(dir.as_fd()),
            name,
            libc::O_WRONLY | libc::O_NOFOLLOW,
            0,
        )
        .at(&shown)?;
        let file = File::from(fd);
        let mut buf = vec![0u8; block_size as usize];
        for &b in blocks {
            let n = view.read(e.ino, e.size, b * block_size, &mut buf)?;
            file.write_all_at(&buf[..n], b * block_size).at(&shown)?;
        }
        file.set_len(e.size).at(&shown)
    }

    /// Gives every entry the point's mode, owner and modification time.
    fn set_metadata(&self, entries: &[Entry]) -> Result<()> {
        let by_path: BTreeMap<&[u8], &Entry> =
            entries.iter().map(|e| (e.path.as_slice(), e)).collect();
        for (rel, e) in by_path.iter().rev() {
            let shown = self.shown(rel);
            sys::lchown(&shown, e.uid, e.gid).at(&shown)?;
            if e.mode & libc::S_IFMT != libc::S_IFLNK {
                fs::set_permissions(
                    &shown,
                    std::os::unix::fs::PermissionsExt::from_mode(e.mode & 0o7777),
                )
                .at(&shown)?;
            }
            let ns = 1_000_000_000;
            let t = sys::TimeSpec::At(e.mtime_ns.div_euclid(ns), e.mtime_ns.rem_euclid(ns));
            sys::utimens_nofollow(&shown, sys::TimeSpec::Omit, t).at(&shown)?;
        }
        Ok(())
    }
}
